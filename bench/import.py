"""Import speed: a GoatCounter CSV export (format version 2) of N rows, imported by ``pixeld.py import``.

    python3 bench/import.py [ROWS] [--gzip]

Builds the file in a temporary folder (a year of hits: sessions of one to six page views, Zipf-like
paths, referrers of every scheme, GoatCounter's browser, system, screen and location values, 1% bots
and 3% events), runs the import as a user would, and prints rows per second from the wall clock and
per second of CPU (the machine may be shared): the CPU of both of the import's processes, reading and
writing, whose own last line gives each.
"""

import csv
import datetime as dt
import gzip
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

from common import PATH_WEIGHTS, PATHS, PIXELD

BROWSERS = [("Chrome 131", "Windows 10", "1920,0,1", 30), ("Safari 18.1", "iOS 18.1", "390,0,1", 20), ("Chrome 131", "Android 14", "412,0,1", 14),
            ("Safari 18.1", "macOS 10.15", "1512,982,2", 12), ("Firefox 133", "Linux", "2560,1440,1", 8), ("Edge 131", "Windows 10", "1536,0,1", 7)]
REFERRERS = [("", "", 60), ("www.reddit.com/r/programming", "h", 8), ("news.ycombinator.com", "h", 6), ("Hacker News", "g", 4), ("Email", "g", 3),
             ("newsletter", "c", 3), ("com.google.android.gm", "o", 2), ("google.com", "h", 10), ("blog.example.net/a-post", "h", 4)]
LOCATIONS = ["US-TX", "US-CA", "DE-BE", "GB", "FR-IDF", "IN", "NL", "BR", "JP", ""]
HEADER = ["2Path", "Title", "Event", "UserAgent", "Browser", "System", "Session", "Bot", "Referrer", "Referrer scheme", "Screen size", "Location",
          "FirstVisit", "Date"]


def write_export(path, rows, seed=7):
    """A GoatCounter export of about ``rows`` rows, in time order, as GoatCounter writes it."""
    rng = random.Random(seed)
    start = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc).timestamp()
    span = 365 * 86400
    agents = [agent[:3] for agent in BROWSERS]
    agent_weights = [agent[3] for agent in BROWSERS]
    referrers = [referrer[:2] for referrer in REFERRERS]
    referrer_weights = [referrer[2] for referrer in REFERRERS]
    opener = gzip.open if path.endswith(".gz") else open
    written = 0
    with opener(path, "wt", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(HEADER)
        moment = start
        while written < rows:
            moment += span / rows * rng.uniform(0.5, 1.5) * 3
            session = f"{rng.getrandbits(60):015x}-{rng.getrandbits(64):016x}"
            browser, system, screen = rng.choices(agents, agent_weights)[0]
            referrer, scheme = rng.choices(referrers, referrer_weights)[0]
            location = rng.choice(LOCATIONS)
            bot = "0" if rng.random() > 0.01 else "3"
            for view in range(min(rng.randint(1, 6), rows - written)):
                page = rng.choices(PATHS, PATH_WEIGHTS)[0]
                event = rng.random() < 0.03
                stamp = dt.datetime.fromtimestamp(moment + view * 40, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
                writer.writerow([
                    "click-" + page.rsplit("/", 1)[-1] if event else page, "" if event else f"Title of {page}", "1" if event else "0", "",
                    browser, system, session, bot, referrer if view == 0 else "", scheme if view == 0 else "", screen, location,
                    "1" if view == 0 else "0", stamp,
                ])
                written += 1
    return written


def main():
    rows = int(next((arg for arg in sys.argv[1:] if arg.isdigit()), "1000000"))
    suffix = ".csv.gz" if "--gzip" in sys.argv else ".csv"
    with tempfile.TemporaryDirectory() as folder:
        export = os.path.join(folder, "goatcounter-export" + suffix)
        started = time.perf_counter()
        written = write_export(export, rows)
        print(f"wrote {written:,} rows ({os.path.getsize(export) / 1e6:.0f} MB) in {time.perf_counter() - started:.0f} s")
        db = os.path.join(folder, "pixeld.db")
        started, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        result = subprocess.run([sys.executable, PIXELD, "import", export, "--db", db, "--site", "example.org", "--env-file", ""],
                                capture_output=True, text=True)
        seconds, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_seconds = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
        print(result.stderr.strip().splitlines()[-1])
        print(f"{written:,} rows in {seconds:.1f} s: {written / seconds:,.0f} rows/s (wall clock, start-up included); "
              f"{cpu_seconds:.1f} s of CPU: {written / cpu_seconds:,.0f} rows per CPU second; database {os.path.getsize(db) / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
