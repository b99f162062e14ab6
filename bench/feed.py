#!/usr/bin/env python3
"""The feed's speed: rows per second of ``export --cursor-file`` over a database of a million page views.

Builds the database as bench/report.py does (page views over the last 365 days, through pixeld's own
Store), then times, end to end as a timer would run them (a new process, the rows written to a pipe and
counted): the whole feed from the start (every row final by then); the plain ``export --format ndjson``
beside it; an incremental run that finds nothing new (what a timer pays each minute on a quiet site);
and an import's feed log: its bytes per imported row, and the feed of the imported rows alone.

    python3 bench/feed.py [--size 1m] [--runs 3] [--dir bench/data] [--keep]

The pixel's latency while the feed ships every minute is measured by bench/ingest.py --paced N --feed 60.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

from common import PIXELD, percentile, pixeld
from report import build, size


def timed(*args):
    """Run pixeld.py with these arguments; (seconds, lines written, stderr)."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, PIXELD, *args, "--env-file", ""], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = 0
    for block in iter(lambda: proc.stdout.read(1 << 20), b""):
        lines += block.count(b"\n")
    err = proc.stderr.read().decode()
    if proc.wait() != 0:
        raise SystemExit(f"pixeld.py {' '.join(args)} failed: {err}")
    return time.perf_counter() - started, lines, err


def best_of(runs, *args):
    results = [timed(*args) for _ in range(runs)]
    seconds = percentile([seconds for seconds, _, _ in results], 0.5)
    return seconds, results[0][1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1m", help="page views in the database (default 1m)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each measurement; the median is shown")
    parser.add_argument("--dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
    parser.add_argument("--keep", action="store_true", help="keep the database (and reuse it next time)")
    args = parser.parse_args()
    count = size(args.size)
    os.makedirs(args.dir, exist_ok=True)
    db = os.path.join(args.dir, f"feed-{count}.db")
    if not (args.keep and os.path.exists(db)):
        print(f"building {count:,} page views: {build(db, count):.1f} s", flush=True)
    work = tempfile.mkdtemp(prefix="pixeld-feed-")
    cursor = os.path.join(work, "cursor")
    try:
        seconds, rows = best_of(args.runs, "export", "--db", db, "--since", "")
        print(f"feed from the start: {rows:,} rows in {seconds:.2f} s, {rows / seconds:,.0f} rows/s (median of {args.runs}, end to end)")
        seconds, rows = best_of(args.runs, "export", "--db", db, "--format", "ndjson")
        print(f"plain export --format ndjson: {rows:,} rows in {seconds:.2f} s, {rows / seconds:,.0f} rows/s")
        timed("export", "--db", db, "--cursor-file", cursor)
        timed("export", "--commit-cursor", cursor)
        seconds, rows = best_of(args.runs, "export", "--db", db, "--cursor-file", cursor)
        print(f"incremental run with nothing new: {rows:,} rows in {seconds * 1000:.0f} ms (the process's start included)")
        imported = min(count, 100_000)
        sample = os.path.join(work, "sample.ndjson")
        with open(sample, "wb") as handle:
            subprocess.run([sys.executable, PIXELD, "export", "--db", db, "--format", "ndjson", "--env-file", "", "--range", "30d"], stdout=handle, check=True)
        with open(sample, "rb") as handle:
            lines = handle.readlines()[:imported]
        with open(sample, "wb") as handle:
            handle.writelines(lines)
        copy = os.path.join(work, "copy.db")
        subprocess.run([sys.executable, PIXELD, "backup", os.path.join(work, "copy.db"), "--db", db, "--env-file", ""], check=True, capture_output=True)
        timed("import", sample, "--db", copy)
        conn = pixeld.sqlite3.connect(copy)
        log_bytes = conn.execute("SELECT sum(length(ids)) + 40 * count(*) FROM feed_log").fetchone()[0]
        conn.close()
        seconds, rows = timed("export", "--db", copy, "--cursor-file", cursor)[:2]
        print(f"import of {len(lines):,} rows into the same days: feed log {log_bytes:,} bytes ({log_bytes / len(lines):.2f} per imported row); "
              f"the next run ships {rows:,} rows in {seconds:.2f} s")
    finally:
        for name in os.listdir(work):
            os.remove(os.path.join(work, name))
        os.rmdir(work)
        if not args.keep:
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(db + suffix):
                    os.remove(db + suffix)


if __name__ == "__main__":
    main()
