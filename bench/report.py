#!/usr/bin/env python3
"""Report speed, memory and disk at 100 thousand, 1 million and 10 million page views.

Builds databases of page views spread over the last 365 days (about 1,000 paths with Zipf-like
popularity, 200 referrers, 50 countries, realistic browsers and screens) by direct inserts
through pixeld's own Store, then measures on the real daemon over HTTP: /report p50 (and the daemon's
CPU time per report, which a busy machine inflates less than the wall clock) for the full year, the
last 7 days, all time (as range=all and as an explicit range over decades), and filtered reports
(one path prefix and one country: over the most recent days holding about a million page views,
over the full year, and over decades); the daemon's peak RSS; bytes on disk per page view; the time to build each database; start-up time; and the
import speed of pixeld's own CSV export.

    python3 bench/report.py [--sizes 100k,1m,10m] [--runs 7] [--dir bench/data] [--keep]
    python3 bench/report.py --keep --compare /tmp/pixeld-before.py --rounds 3   # beside an earlier pixeld.py, alternately
    python3 bench/report.py --visitors 10k,100k,200k --compare /tmp/pixeld-before.py  # daemon RSS with that many visitors today

With --compare, both versions serve a copy of each database each (the earlier one must read its
schema version) and every report is requested of one and then of the other, in turns, so that
both see the machine's same hour; --rounds repeats the whole measurement and prints each round.
"""

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

import common
from common import COUNTRIES, COUNTRY_WEIGHTS, LANGUAGES, PATH_WEIGHTS, PATHS, PIXELD, REFERRERS, USER_AGENTS, Daemon, percentile, pixeld, request

YEAR = 365 * pixeld.DAY


def size(text):
    text = text.lower()
    return int(float(text[:-1]) * {"k": 1e3, "m": 1e6}[text[-1]]) if text[-1] in "km" else int(text)


def build(path, count):
    """Write ``count`` page views over the last 365 days, in batches, as the writer would."""
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    rng = random.Random(7)
    agents = [pixeld.classify_user_agent(ua) for ua, _, _ in USER_AGENTS]
    agent_weights = [weight for _, weight, _ in USER_AGENTS]
    screens = [screen.replace(",", "x") for _, _, screen in USER_AGENTS]
    languages = [pixeld.primary_language(header) for header in LANGUAGES]
    end = int(time.time()) // pixeld.DAY * pixeld.DAY + pixeld.DAY
    store = pixeld.Store(pixeld.connect(path))
    started = time.perf_counter()
    batch = 20_000
    for first in range(0, count, batch):
        n = min(batch, count - first)
        pages = rng.choices(PATHS, PATH_WEIGHTS, k=n)
        referrers = rng.choices(REFERRERS, k=n)
        countries = rng.choices(COUNTRIES, COUNTRY_WEIGHTS, k=n)
        which = rng.choices(range(len(agents)), agent_weights, k=n)
        records = []
        for i in range(n):
            entry = rng.random() < 0.45
            agent = agents[which[i]]
            referrer = pixeld.normalise_referrer(referrers[i], "example.org")
            source, channel = pixeld.classify_source(referrer)
            view = pixeld.PageView(
                end - YEAR + (first + i) * YEAR // count, "example.org", path=pages[i], title="A post", referrer=referrer, source=source, channel=channel,
                country=countries[i], browser=agent.browser, version=agent.version, os=agent.os, device=agent.device, screen=screens[which[i]],
                language=languages[i % len(languages)], first_today=rng.random() < 0.4,
            )
            records.append(pixeld.Record(view, rng.choice((1, 1, 2, 3, 5)) if entry else 0, rng.randrange(600) if entry else 0))
        store.write(pixeld.Batch(records=records))
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.conn.close()
    return time.perf_counter() - started


FILTER = "path=/blog/*&country=DE"
DECADES = "start=0&end=4102444800"  # all time as an explicit range (1970 to 2100), as the 2020 design asked for it


def reports(count):
    """(column, query, runs divisor) of each report timed: a range holding about a million page views for the first filtered one."""
    days = max(1, min(365, round(365 * 1_000_000 / count)))
    return [
        ("year", "range=365d", 1), ("7 days", "range=7d", 1), ("all", "range=all", 1), ("all as a range", DECADES, 1),
        ("filtered", f"range={days}d&{FILTER}", 2), ("filtered, year", f"range=365d&{FILTER}", 2), ("filtered, all as a range", f"{DECADES}&{FILTER}", 2),
    ]


def start_daemon(script, path):
    """A daemon of ``script`` (a pixeld.py) on ``path``."""
    common.PIXELD = script
    try:
        return Daemon(path)
    finally:
        common.PIXELD = PIXELD


def time_reports(daemons, queries, runs):
    """p50 in ms of each query on each daemon, asked of each daemon in turn; and the daemon's mean CPU
    time per report in ms (its own and its threads', which a busy machine does not inflate as it does the wall clock)."""
    times = {(label, query): [] for label in daemons for _, query, _ in queries}
    cpu = {}
    for _, query, divisor in queries:
        used = {label: cpu_seconds(daemon.proc.pid) for label, daemon in daemons.items()}
        count = max(3, runs // divisor)
        for run in range(count):
            for label, daemon in (daemons.items() if run % 2 == 0 else reversed(list(daemons.items()))):
                started = time.perf_counter()
                status, body = request(daemon.port, "/report?" + query)
                times[label, query].append((time.perf_counter() - started) * 1000)
                assert status == 200, body[:200]
        cpu.update({(label, query): (cpu_seconds(daemon.proc.pid) - used[label]) * 1000 / count for label, daemon in daemons.items()})
    return {key: (percentile(values, 0.5), cpu[key]) for key, values in times.items()}


def cpu_seconds(pid):
    """CPU time used by a process and its children (workers, if any), its finished threads included."""
    total = 0
    for each in [pid] + [int(child) for child in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout.split()]:
        try:
            with open(f"/proc/{each}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            pass
    return total


def measure_reports(versions, path, count, runs, workdir):
    """Start-up, report p50s and peak RSS of each version on its own copy of the database at ``path``."""
    copies, daemons = [], {}
    try:
        for label, script in versions.items():
            copy = path
            if len(versions) > 1:
                copy = os.path.join(workdir, f"{label}-{os.path.basename(path)}")
                shutil.copyfile(path, copy)
                copies.append(copy)
            daemons[label] = start_daemon(script, copy)
        unfiltered = [query for query in reports(count) if FILTER not in query[1]]
        times = time_reports(daemons, unfiltered, runs)
        rss_unfiltered = {label: daemon.peak_rss_mb() for label, daemon in daemons.items()}
        times.update(time_reports(daemons, [query for query in reports(count) if FILTER in query[1]], runs))
        return {label: (daemon.startup, {name: times[label, query] for name, query, _ in reports(count)}, rss_unfiltered[label], daemon.peak_rss_mb())
                for label, daemon in daemons.items()}
    finally:
        for daemon in daemons.values():
            daemon.stop()
        for copy in copies:
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(copy + suffix):
                    os.remove(copy + suffix)


VISITORS_LUA = r"""
local visitors = tonumber(os.getenv("PIXELD_BENCH_VISITORS"))
local threads, made = {}, 0
setup = function(thread)
  thread:set("first", made)
  made = made + 1
  table.insert(threads, thread)
end
init = function(args)
  step, sent = tonumber(os.getenv("PIXELD_BENCH_THREADS")), 0
end
request = function()
  local n = (first + sent * step) % visitors
  sent = sent + 1
  local address = "10." .. math.floor(n / 65536) % 256 .. "." .. math.floor(n / 256) % 256 .. "." .. n % 256
  return wrk.format("GET", "/pixel.gif?path=%2Fp" .. n % 1000 .. "&host=example.org", {["X-Forwarded-For"] = address,
    ["User-Agent"] = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"})
end
"""


def rss_mb(pid):
    """The resident memory of a process and its children (several workers, if any), in MB."""
    pids, total = [pid], 0
    for child in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout.split():
        pids.append(int(child))
    for each in pids:
        try:
            with open(f"/proc/{each}/status") as status:
                total += next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total / 1024


def remembered(port):
    status, body = request(port, "/metrics")
    match = re.search(rb"^pixeld_remembered_visitors (\d+)", body, re.MULTILINE)
    return int(match.group(1)) if status == 200 and match else 0


def measure_visitors(versions, count, workdir):
    """RSS of each version's daemon on a fresh database before and after ``count`` distinct visitors
    (one page view each, a new address through the trusted proxy each), once the writer has caught up."""
    script = os.path.join(workdir, "visitors.lua")
    with open(script, "w") as handle:
        handle.write(VISITORS_LUA)
    results = {}
    for label, pixeld_py in versions.items():
        db = os.path.join(workdir, f"visitors-{label}.db")
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(db + suffix):
                os.remove(db + suffix)
        common.PIXELD = pixeld_py
        daemon = Daemon(db, "--rate-limit", "0")
        common.PIXELD = PIXELD
        try:
            time.sleep(1)
            before = rss_mb(daemon.proc.pid)
            env = dict(os.environ, PIXELD_BENCH_VISITORS=str(count), PIXELD_BENCH_THREADS="2")
            load = subprocess.Popen(["wrk", "-t2", "-c16", "-d600s", "-s", script, f"http://127.0.0.1:{daemon.port}/"], env=env, stdout=subprocess.DEVNULL)
            try:
                while remembered(daemon.port) < count and load.poll() is None:
                    time.sleep(0.1)
            finally:
                load.terminate()
                load.wait()
            time.sleep(2)
            results[label] = (before, rss_mb(daemon.proc.pid), remembered(daemon.port))
        finally:
            daemon.stop()
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(db + suffix):
                os.remove(db + suffix)
    return results


def measure_import(source_db, workdir):
    export = os.path.join(workdir, "export.csv")
    with open(export, "w") as out:
        subprocess.run([sys.executable, PIXELD, "export", "--db", source_db], stdout=out, check=True)
    target = os.path.join(workdir, "imported.db")
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(target + suffix):
            os.remove(target + suffix)
    rows = sum(1 for _ in open(export)) - 1
    started = time.perf_counter()
    subprocess.run([sys.executable, PIXELD, "import", export, "--db", target], check=True, capture_output=True)
    seconds = time.perf_counter() - started
    os.remove(export)
    return rows / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100k,1m,10m")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
    parser.add_argument("--keep", action="store_true", help="reuse databases built by an earlier run")
    parser.add_argument("--compare", metavar="PIXELD_PY", help="an earlier pixeld.py to measure beside this one, alternately")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the measurements (not the builds) this many times")
    parser.add_argument("--visitors", metavar="COUNTS", help="instead of reports: daemon RSS with this many visitors today (10k,100k,200k)")
    parser.add_argument("--no-import", action="store_true", help="skip the import of pixeld's own CSV export")
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    versions = {"now": PIXELD, **({"before": os.path.abspath(args.compare)} if args.compare else {})}
    if args.visitors:
        with tempfile.TemporaryDirectory(dir=args.dir) as workdir:
            for round_number in range(args.rounds):
                for count in map(size, args.visitors.split(",")):
                    for label, (before, after, kept) in measure_visitors(versions, count, workdir).items():
                        print(f"round {round_number + 1}, {count:>7,} visitors, {label:>6}: RSS {before:.0f} MB at start, {after:.0f} MB after "
                              f"({kept:,} remembered)", flush=True)
        return
    built = {}
    for count in map(size, args.sizes.split(",")):
        path = os.path.join(args.dir, f"report-{count}.db")
        built[count] = "kept" if args.keep and os.path.exists(path) else f"{build(path, count):.0f} s"
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as workdir:
        for round_number in range(args.rounds):
            for count in map(size, args.sizes.split(",")):
                path = os.path.join(args.dir, f"report-{count}.db")
                per_view = os.path.getsize(path) / count
                for label, (startup, times, rss_unfiltered, rss) in measure_reports(versions, path, count, args.runs, workdir).items():
                    rows.append((round_number + 1, label, count, built[count], per_view, startup, times, rss_unfiltered, rss))
                    print(f"round {round_number + 1}, {label:>6}, {count:>11,} page views: built in {built[count]}, {per_view:.1f} B/view, "
                          f"start {startup * 1000:.0f} ms, " + ", ".join(f"{name} {ms:.0f} ms ({cpu:.0f} CPU)" for name, (ms, cpu) in times.items()) +
                          f", RSS {rss_unfiltered:.0f} MB ({rss:.0f} MB after filtered)", flush=True)
    largest_small = max((count for count in map(size, args.sizes.split(",")) if count <= 1_000_000), default=None)
    if largest_small and not args.no_import:
        rate = measure_import(os.path.join(args.dir, f"report-{largest_small}.db"), args.dir)
        print(f"import of pixeld's CSV export ({largest_small:,} rows): {rate:,.0f} rows/s")
    names = [name for name, _, _ in reports(1_000_000)]
    print()
    print("| round | version | page views | build | bytes/view | start | " + " | ".join(f"{name} p50 (CPU)" for name in names) + " | peak RSS (unfiltered / after filtered) |")
    print("|---" * (7 + len(names)) + "|")
    for round_number, label, count, built_in, per_view, startup, times, rss_unfiltered, rss in rows:
        print(f"| {round_number} | {label} | {count:,} | {built_in} | {per_view:.1f} | {startup * 1000:.0f} ms | "
              + " | ".join(f"{ms:.0f} ms ({cpu:.0f})" for ms, cpu in times.values()) + f" | {rss_unfiltered:.0f} / {rss:.0f} MB |")


if __name__ == "__main__":
    main()
