#!/usr/bin/env python3
"""Report speed, memory and disk at 100 thousand, 1 million and 10 million page views.

Builds databases of page views spread over the last 365 days (about 1,000 paths with Zipf-like
popularity, 200 referrers, 50 countries, realistic browsers and screens) by direct inserts
through pixeld's own Store, then measures on the real daemon over HTTP: /report p50 for the full
year, the last 7 days, and a filtered report (one path prefix and one country, over the most
recent days holding about a million page views); the daemon's
peak RSS; bytes on disk per page view; the time to build each database; start-up time; and the
import speed of pixeld's own CSV export.

    python3 bench/report.py [--sizes 100k,1m,10m] [--runs 7] [--dir bench/data] [--keep]
"""

import argparse
import os
import random
import subprocess
import sys
import time

from common import COUNTRIES, COUNTRY_WEIGHTS, LANGUAGES, PATH_WEIGHTS, PATHS, PIXELD, REFERRERS, USER_AGENTS, Daemon, percentile, pixeld

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


def time_report(daemon, query, runs):
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        status, body = request_report(daemon, query)
        times.append((time.perf_counter() - started) * 1000)
        assert status == 200, body[:200]
    return percentile(times, 0.5)


def request_report(daemon, query):
    from common import request

    return request(daemon.port, "/report?" + query)


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
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    rows = []
    for count in map(size, args.sizes.split(",")):
        path = os.path.join(args.dir, f"report-{count}.db")
        built = "kept" if args.keep and os.path.exists(path) else f"{build(path, count):.0f} s"
        per_view = os.path.getsize(path) / count
        daemon = Daemon(path)
        try:
            year = time_report(daemon, "range=365d", args.runs)
            week = time_report(daemon, "range=7d", args.runs)
            rss_unfiltered = daemon.peak_rss_mb()
            days = max(1, min(365, round(365 * 1_000_000 / count)))  # a range holding about a million page views
            filtered = time_report(daemon, f"range={days}d&path=/blog/*&country=DE", max(3, args.runs // 2))
            filtered_year = time_report(daemon, "range=365d&path=/blog/*&country=DE", 3)
            rss = daemon.peak_rss_mb()
            startup = daemon.startup
        finally:
            daemon.stop()
        rows.append((count, built, per_view, startup, year, week, filtered, filtered_year, rss_unfiltered, rss))
        print(f"{count:>11,} page views: built in {built}, {per_view:.1f} B/view, start {startup * 1000:.0f} ms, year {year:.0f} ms, "
              f"7 days {week:.0f} ms, filtered {filtered:.0f} ms (full year {filtered_year:.0f} ms), RSS {rss_unfiltered:.0f} MB ({rss:.0f} MB after filtered)", flush=True)
    largest_small = max((r[0] for r in rows if r[0] <= 1_000_000), default=None)
    if largest_small:
        rate = measure_import(os.path.join(args.dir, f"report-{largest_small}.db"), args.dir)
        print(f"import of pixeld's CSV export ({largest_small:,} rows): {rate:,.0f} rows/s")
    print()
    print("| page views | build | bytes/view | start | year p50 | 7 days p50 | filtered p50 (≤ 1M views) | filtered, full year | peak RSS (unfiltered / after filtered) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for count, built, per_view, startup, year, week, filtered, filtered_year, rss_unfiltered, rss in rows:
        print(f"| {count:,} | {built} | {per_view:.1f} | {startup * 1000:.0f} ms | {year:.0f} ms | {week:.0f} ms | {filtered:.0f} ms | {filtered_year:.0f} ms | {rss_unfiltered:.0f} / {rss:.0f} MB |")


if __name__ == "__main__":
    main()
