"""Privacy: no address, full User-Agent or non-campaign query string reaches the disk or the output."""

import ipaddress
import time
from pathlib import Path

import pytest

import pixeld
from conftest import CHROME, call, stored_pageviews

ADDRESSES = ["198.51.100.213", "203.0.113.177", "2001:db8:dead:beef::1234"]
CANARY_UAS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36 CanaryToolbar/9.8.7-qzx",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1 CanaryApp/5.4.3-vvk",
]
SECRETS = ["sessiontoken-5f3a", "q-private-search-77"]


def forms_of(address: str):
    """The ways an address could be written down: as text, compressed and exploded, and packed."""
    parsed = ipaddress.ip_address(address)
    return [address.encode(), str(parsed).encode(), parsed.exploded.encode(), parsed.packed]


def leaks(data: bytes):
    found = [a for a in ADDRESSES for form in forms_of(a) if form in data]
    found += [ua for ua in CANARY_UAS if ua.encode() in data]
    found += [token for ua in CANARY_UAS for token in ua.split() if token.startswith("Canary") and token.encode() in data]
    found += [secret for secret in SECRETS if secret.encode() in data]
    return found


def database_files(db: Path):
    return [path for path in db.parent.iterdir() if path.name.startswith(db.name)]


@pytest.mark.parametrize("workers", ["0", "2"])
def test_nothing_identifying_reaches_the_database_its_wal_or_the_output(start_daemon, workers):
    """In one process, and with acceptor processes, whose channels carry the address and User-Agent in memory only."""
    daemon = start_daemon("--workers", workers)
    for address in ADDRESSES:
        for ua in CANARY_UAS:
            answer = daemon.pixel(
                {"path": f"/account?token={SECRETS[0]}", "host": "example.org", "referrer": f"https://search.example.net/?q={SECRETS[1]}"},
                {"User-Agent": ua, "X-Forwarded-For": address},
            )
            assert answer.status == 200
    time.sleep(1.5)  # let the writer commit while the daemon runs: the WAL and SHM files exist now
    files = database_files(daemon.db)
    assert {path.name for path in files} >= {"pixeld.db", "pixeld.db-wal", "pixeld.db-shm"}
    for path in files:
        assert leaks(path.read_bytes()) == [], path.name
    output = daemon.stop()
    for path in database_files(daemon.db):
        assert leaks(path.read_bytes()) == [], path.name
    assert leaks(output.encode()) == []

    views = stored_pageviews(daemon.db)
    assert len(views) == len(ADDRESSES) * len(CANARY_UAS)  # they were stored, just not the identifying parts
    assert {v["path"] for v in views} == {"/account"}
    assert {v["referrer"] for v in views} == {"search.example.net"}
    assert {v["browser"] for v in views} == {"Chrome", "Safari"}


def test_the_test_would_notice_a_leak():
    assert leaks(b"...198.51.100.213...") and leaks(ipaddress.ip_address(ADDRESSES[2]).packed)
    assert leaks(b"CanaryToolbar/9.8.7-qzx") and leaks(SECRETS[1].encode())


def test_no_per_request_log_line(start_daemon):
    daemon = start_daemon()
    for _ in range(5):
        daemon.pixel({"path": "/"}, {"X-Forwarded-For": ADDRESSES[0]})
    daemon.get("/nope")
    output = daemon.stop()
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 2, lines  # one at start, one at stop
    assert "listening on" in lines[0] and "stopped" in lines[1]
    assert "127.0.0.1 -" not in output and "GET /" not in output


def test_nothing_links_a_visitors_page_views_across_days_or_restarts(tmp_path):
    """Two readers who differ only by address read the same pages at the same moments, across a
    midnight and a restart. Every stored column except the page must then be identical between
    them: any visitor id, hash or key would tell them apart. Neither salts nor keys reach the disk."""
    import sqlite3

    import pixeld

    db = tmp_path / "linked.db"
    logged = []
    now = [1_795_824_000 - 3600]  # 2026-11-27 23:00 UTC
    secrets_seen = []

    def visit(app, reader, path):
        for query in (f"path={path}-{reader}&host=example.org", f"engagement=1&path={path}-{reader}&host=example.org&engaged=12.5&scroll=60"):
            call(app, "/pixel.gif", query, X_FORWARDED_FOR=ADDRESSES[reader], USER_AGENT=CANARY_UAS[0])
        generation = app.visitors._current
        secrets_seen.extend(app.visitors.salts())
        key = generation.key("example.org", ADDRESSES[reader], CANARY_UAS[0])
        secrets_seen.extend((key.to_bytes(8, "little")[:7], key.to_bytes(8, "big")[1:], str(key).encode()))

    for session in range(2):  # the second session is after a restart
        # The clock jumps a day between commits: a long final delay, so that no beacon's page view is final (and left alone) by then.
        app = pixeld.App(pixeld.Config(db_path=str(db), flush_interval=0.05, final_after=30 * pixeld.DAY), clock=lambda: now[0], log=logged.append)
        for step in range(4):  # 23:00, 23:50, 00:40 and 01:30 (first session), then the next day (second)
            for reader in (0, 1):
                visit(app, reader, f"/s{session}p{step}")
            now[0] += 50 * 60
        now[0] += 22 * 3600
        app.close()

    conn = sqlite3.connect(db)
    columns = [row[1] for row in conn.execute("PRAGMA table_info(pageviews)")]
    visits = ["first_today", "visit_views", "duration", "campaign", "source", "engaged", "scroll", "firsts", "exit", "converted"]
    combinations = ["page", "arrival", "device"]  # ids of value combinations (pixeld.COMBOS), shown beside their values
    assert columns == ["id", "site", "path", "title", "referrer", "country", "agent", "screen", "language", *visits, "goals", "hostname", "campaign_detail", *combinations]
    event_columns = [row[1] for row in conn.execute("PRAGMA table_info(events)")]
    assert event_columns == ["id", "site", "path", "name", "referrer", "country", "agent", "screen", "language", *visits, "props", "props_first", "hostname", "campaign_detail", *combinations]
    stored = [row[1] for row in conn.execute("PRAGMA table_info(pageview_rows)")]
    assert stored == ["id", "site", "page", "arrival", "country", "device", "visit_views", "duration", "engaged", "scroll", "goals", "flags"]
    rows = conn.execute("SELECT * FROM pageviews ORDER BY id").fetchall()
    conn.close()
    assert len(rows) == 16
    assert all((row[columns.index("engaged")], row[columns.index("scroll")]) == (12, 60) for row in rows)  # engagement landed on every row
    readers = [rows[0::2], rows[1::2]]  # each moment: reader 0, then reader 1
    for mine, theirs in zip(*readers):
        assert mine[0] >> pixeld.ID_SHIFT == theirs[0] >> pixeld.ID_SHIFT  # the same second
        page = columns.index("page")
        assert mine[3:page] == theirs[3:page] and mine[page + 1 :] == theirs[page + 1 :] and mine[1] == theirs[1]  # all but the id and the page is the same

    blobs = [path.read_bytes() for path in tmp_path.iterdir() if path.name.startswith("linked.db")] + ["\n".join(logged).encode()]
    for secret in secrets_seen:
        for blob in blobs:
            assert secret not in blob and secret.hex().encode() not in blob
    for blob in blobs:
        assert leaks(blob) == []


def test_no_visitor_input_outlives_the_salt(tmp_path):
    """A path with a secret query string and a distinctive referrer sit in the App's Memo while the salt
    lives, and nowhere once it rotates: the Memo is the only cache of what visitors send."""
    clock = [1_795_910_400 - 3600]  # 2026-11-28 23:00 UTC

    def send(query):
        assert call(app, "/pixel.gif", query, remote="203.0.113.7", USER_AGENT=CHROME).body == pixeld.GIF

    app = pixeld.App(pixeld.Config(db_path=str(tmp_path / "memo.db"), flush_interval=0.05), clock=lambda: clock[0], log=lambda message: None)
    try:
        send("path=%2F&host=example.org")  # the first hit brings the first salt
        send("path=%2Fa%3Ftoken%3Ds3cret&host=example.org&referrer=https%3A%2F%2Fdistinctive-referrer.example%2Fx%3Fq%3D1")
        assert app.memo.holds("s3cret") and app.memo.holds("distinctive-referrer")  # held while the salt lives
        clock[0] += 2 * 3600  # past 00:00 UTC: the next hit brings a new salt
        send("path=%2Fb&host=example.org")
        assert not app.memo.holds("s3cret") and not app.memo.holds("distinctive-referrer")
    finally:
        app.close()
    cached = {name for name, value in vars(pixeld).items() if hasattr(value, "cache_info") and value.__module__ == "pixeld"}
    assert cached == {"month_of_day", "_midnight", "_http_date"}  # numbers and dates only: no normaliser keeps a cache of its own
    assert not hasattr(pixeld.urlsplit, "cache_info") or pixeld.urlsplit.cache_info().currsize == 0  # nor the standard library's URL splitter
