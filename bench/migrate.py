"""How long the migrations from schema 1 take on a large database: the sources (schema 1 -> 2), and every
later one on the way, the compact row layout (``compact_rows``) among them.

    python3 bench/migrate.py [--rows 10000000]

Builds a schema-1 database (a year of page views, 40% of them with one of 300 referrers, plus
their daily and monthly referrer counts) in bench/data/, then times ``pixeld.connect``, which
migrates it (printing each migration's progress), and checks that the source counts add up to
the referrer counts.
"""

import argparse
import os
import sqlite3
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

import pixeld  # noqa: E402

REFERRERS = ["google.com", "google.de", "t.co/x", "news.ycombinator.com/item", "old.reddit.com/r/x", "mail.google.com", "duckduckgo.com"] + [
    f"site{i}.example.net/page" for i in range(293)
]


def build(path: str, rows: int) -> None:
    if os.path.exists(path):
        os.remove(path)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    pixeld.migrate(conn, 0, target=1)
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO strings (value) VALUES (?)", [("",), ("example.org",)] + [(r,) for r in REFERRERS] + [(f"/p/{i}",) for i in range(1000)])
    conn.execute("INSERT INTO agents (browser, version, os, device) VALUES ('Chrome', '131', 'Windows', 'desktop')")
    empty, site = 1, 2
    first_referrer, first_path = 3, 3 + len(REFERRERS)
    start = pixeld.first_id(1_767_225_600)  # 2026-01-01
    step = (365 * pixeld.DAY << pixeld.ID_SHIFT) // rows
    conn.execute(
        f"""WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < {rows - 1})
        INSERT INTO pageviews SELECT {start} + i * {step}, {site}, {first_path} + i % 1000, {empty},
            CASE WHEN i % 5 < 2 THEN {first_referrer} + (i * 7) % {len(REFERRERS)} ELSE {empty} END,
            {empty}, 1, {empty}, {empty}, i % 3 = 0, i % 4 = 0, 0, {empty} FROM n"""
    )
    for table, period in (("daily", f"((id >> {pixeld.ID_SHIFT}) + {pixeld.ID_EPOCH}) / {pixeld.DAY}"),):
        conn.execute(f"INSERT INTO {table} SELECT {period} AS d, site, 2, referrer, count(*), sum(first_today), sum(visit_views > 0), sum(visit_views = 1), 0 FROM pageviews GROUP BY d, site, referrer")
    conn.create_function("month_of_day", 1, pixeld.month_of_day)
    conn.execute("INSERT INTO monthly SELECT month_of_day(day) AS m, site, dim, value, sum(views), sum(visitors), sum(visits), sum(bounces), sum(duration) FROM daily GROUP BY m, site, dim, value")
    conn.execute("COMMIT")
    conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    args = parser.parse_args()
    os.makedirs(os.path.join(HERE, "data"), exist_ok=True)
    path = os.path.join(HERE, "data", f"migrate-{args.rows}.db")
    started = time.monotonic()
    build(path, args.rows)
    print(f"built a schema-1 database of {args.rows:,} page views in {time.monotonic() - started:.1f} s ({os.path.getsize(path) / 1e6:,.0f} MB)")
    started = time.monotonic()
    conn = pixeld.connect(path, progress=lambda message: print(f"  {message}", file=sys.stderr))
    seconds = time.monotonic() - started
    referrers = conn.execute("SELECT sum(views) FROM daily WHERE dim = 2").fetchone()[0]
    sources = conn.execute("SELECT sum(views) FROM daily WHERE dim = 9").fetchone()[0]
    with_source = conn.execute("SELECT count(*) FROM pageviews WHERE source != (SELECT id FROM strings WHERE value = 'direct' || char(9))").fetchone()[0]
    conn.close()
    assert referrers == sources == args.rows, (referrers, sources)
    print(f"migrated {args.rows:,} page views in {seconds:.1f} s; {with_source:,} got a source other than direct; source counts = referrer counts")


if __name__ == "__main__":
    main()
