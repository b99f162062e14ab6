"""Export and import: pixeld's own CSV and NDJSON round trip, the 2020 Flask tool's database, combined
access logs; refusing a file twice; /export behind the report's access rule; flat memory."""

import json
import sqlite3
import subprocess
import sys
import time
from urllib.parse import urlencode

import pytest

import pixeld
from conftest import CHROME, FIREFOX, IPHONE, PIXELD, report_json, run_pixeld, stored_pageviews

ADDRESS = "198.51.100.77"


@pytest.fixture
def live_db(start_daemon):
    """A database written by the real daemon: visits, bounces, referrers, screens."""
    daemon = start_daemon()
    for ip, ua, pages in [("198.51.100.1", CHROME, ["/", "/a", "/b"]), ("198.51.100.2", IPHONE, ["/a"]), ("198.51.100.3", FIREFOX, ["/", "/c"])]:
        for i, page in enumerate(pages):
            daemon.pixel(
                {"path": page, "host": "example.org", "title": f"Title {page}", "referrer": "https://news.example.net/x" if i == 0 else "", "resolution": "1440,900"},
                {"User-Agent": ua, "X-Forwarded-For": ip, "Accept-Language": "de-DE"},
            )
    daemon.stop()
    return daemon.db


def whole_report(db, *args):
    """The JSON report of all the time in the database, without what depends on the moment it was asked for."""
    document = report_json(db, "--range", "all", *args)
    return {key: value for key, value in document.items() if key not in ("start", "end", "previous", "change")}


@pytest.mark.parametrize("fmt", ["csv", "ndjson"])
def test_round_trip_gives_the_same_report(live_db, tmp_path, fmt):
    code, exported, _ = run_pixeld("export", "--db", str(live_db), "--format", fmt)
    assert code == 0
    lines = exported.splitlines()
    assert len(lines) == 6 + (fmt == "csv")
    if fmt == "csv":
        assert lines[0] == ",".join(pixeld.EXPORT_FIELDS)
    else:
        assert set(json.loads(lines[0])) == set(pixeld.EXPORT_FIELDS)
    assert ADDRESS not in exported and "Mozilla" not in exported
    path = tmp_path / f"export.{fmt}"
    path.write_text(exported)
    copy = tmp_path / "copy.db"
    code, _, err = run_pixeld("import", str(path), "--db", str(copy))
    assert code == 0 and "imported 6 page views" in err and "rows/s" in err
    assert whole_report(copy) == whole_report(live_db)
    assert whole_report(copy)["visits"] == 3 and whole_report(copy)["bounce_rate"] == 33.3


def test_the_same_file_is_refused_unless_forced(live_db, tmp_path):
    path = tmp_path / "export.csv"
    path.write_text(run_pixeld("export", "--db", str(live_db))[1])
    copy = tmp_path / "copy.db"
    assert run_pixeld("import", str(path), "--db", str(copy))[0] == 0
    code, _, err = run_pixeld("import", str(path), "--db", str(copy))
    assert code == 2 and "was imported on" in err and "--force" in err and err.count("\n") == 1
    assert run_pixeld("import", str(path), "--db", str(copy), "--force")[0] == 0
    assert whole_report(copy)["pageviews"] == 12


def test_flask_tool_database(tmp_path):
    old = tmp_path / "analytics.db"
    conn = sqlite3.connect(old)
    conn.execute("CREATE TABLE data (id INTEGER PRIMARY KEY, timestamp TEXT, path TEXT, title TEXT, referrer TEXT, country TEXT, device TEXT, width INTEGER, height INTEGER)")
    conn.executemany(
        "INSERT INTO data (timestamp, path, title, referrer, country, device, width, height) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            ("2020-08-10 12:34:56.123456", "/post/hello", "Hello", "https://www.google.com/", "us", "chrome 84", 1920, 1080),
            ("2020-08-10 13:00:00", "/post/hello?ref=x", "Hello", "", "DE", "firefox 79.0", 1280, 800),
            ("2020-08-11 09:00:00", "/", "Home", "https://blog.example.org/about", "", "safari 13", None, None),
            ("2020-08-11 09:30:00", "/", "Home", "", "", "google", 0, 0),
            ("not a time", "/", "", "", "", "chrome 84", 1, 1),
        ],
    )
    conn.commit()
    conn.close()
    db = tmp_path / "pixeld.db"
    code, _, err = run_pixeld("import", str(old), "--db", str(db), "--site", "blog.example.org")
    assert code == 0 and "imported 3 page views" in err and "1 filtered" in err and "1 lines skipped" in err, err
    report = whole_report(db, "--range", "", "--start", "2020-08-01", "--end", "2020-08-31")
    assert {r["value"]: r["count"] for r in report["sections"]["pages"]} == {"/post/hello": 2, "/": 1}
    assert {r["value"] for r in report["sections"]["browsers"]} == {"Chrome 84", "Firefox 79", "Safari 13"}
    assert {r["value"] for r in report["sections"]["countries"]} == {"US", "DE", ""}
    assert {r["value"] for r in report["sections"]["referrers"]} == {"google.com", ""}  # its own site is internal
    assert report["filtered"] == {"total": 1, "bot": 1}


LOG = [
    '{ip} - - [27/Nov/2026:10:00:00 +0000] "GET /blog/post/ HTTP/1.1" 200 5123 "https://www.google.com/" "{chrome}"',
    '{ip} - - [27/Nov/2026:10:00:01 +0000] "GET /static/site.css HTTP/1.1" 200 900 "https://example.org/blog/post/" "{chrome}"',
    '{ip} - - [27/Nov/2026:10:02:00 +0000] "GET /about.html?x=1 HTTP/1.1" 200 2000 "https://example.org/blog/post/" "{chrome}"',
    '203.0.113.9 - - [27/Nov/2026:11:00:00 +0100] "GET / HTTP/2.0" 304 0 "-" "{iphone}"',
    '203.0.113.9 - - [27/Nov/2026:11:00:00 +0100] "GET / HTTP/2.0" 200 10 "-" "{iphone}"',
    '203.0.113.9 - - [27/Nov/2026:11:01:00 +0100] "POST /comment HTTP/2.0" 200 10 "-" "{iphone}"',
    '203.0.113.9 - - [27/Nov/2026:11:01:00 +0100] "GET /missing HTTP/2.0" 404 10 "-" "{iphone}"',
    '66.249.66.1 - - [27/Nov/2026:12:00:00 +0000] "GET /blog/post/ HTTP/1.1" 200 5123 "-" "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"',
    'garbage line',
    '{ip} - - [27/Nov/1900:10:00:00 +0000] "GET /long-ago HTTP/1.1" 200 5 "-" "{chrome}"',  # outside 2000-2100: skipped
    '{ip} - - [27/Nov/2150:10:00:00 +0000] "GET /far-ahead HTTP/1.1" 200 5 "-" "{chrome}"',
]


def test_combined_access_log(tmp_path):
    log = tmp_path / "access.log"
    log.write_text("\n".join(line.format(ip=ADDRESS, chrome=CHROME, iphone=IPHONE) for line in LOG) + "\n")
    db = tmp_path / "pixeld.db"
    code, _, err = run_pixeld("import", str(log), "--db", str(db), "--site", "example.org")
    assert code == 0 and "imported 3 page views" in err and "1 filtered" in err and "3 lines skipped" in err, err
    views = stored_pageviews(db)
    assert [(v["path"], v["referrer"], v["browser"], v["device"]) for v in views] == [
        ("/blog/post/", "google.com", "Chrome", "desktop"),
        ("/", "", "Safari", "phone"),  # 11:00 +0100 is 10:00 UTC: rows sort by time
        ("/about.html", "google.com", "Chrome", "desktop"),  # the visit came from Google
    ]
    report = whole_report(db, "--range", "", "--start", "2026-11-27", "--end", "2026-11-27")
    assert (report["visitors"], report["visits"], report["pageviews"], report["bounce_rate"]) == (2, 2, 3, 50.0)
    assert report["filtered"] == {"total": 1, "bot": 1}
    for path in tmp_path.iterdir():
        if path.name.startswith("pixeld.db"):
            assert ADDRESS.encode() not in path.read_bytes()


def test_import_errors_are_one_line(tmp_path):
    for args, reason in [
        (["missing.log"], "cannot read"),
        (["bad.csv", "--format", "csv"], "is not a pixeld CSV export"),
        (["bad.csv", "--format", "flask", "--site", "example.org"], "is not a database of the Flask tool"),
    ]:
        (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
        code, _, err = run_pixeld("import", str(tmp_path / args[0]), *args[1:], "--db", str(tmp_path / "p.db"))
        assert code == 2 and reason in err and err.count("\n") == 1, err


def test_export_over_http_behind_the_access_rule(start_daemon, live_db):
    daemon = start_daemon("--token", "t0ken", db=live_db)
    assert daemon.get("/export").status == 401
    answer = daemon.get("/export?format=ndjson&range=today", {"Authorization": "Bearer t0ken"})
    assert answer.status == 200 and answer.headers["content-type"] == "application/x-ndjson"
    assert len(answer.text.splitlines()) == 6
    assert daemon.get("/export?format=xml", {"Authorization": "Bearer t0ken"}).status == 400
    open_daemon = start_daemon(db=live_db.parent / "other.db")
    assert open_daemon.get("/export", {"X-Forwarded-For": "203.0.113.1"}).status == 403
    assert open_daemon.get("/export").text == ",".join(pixeld.EXPORT_FIELDS) + "\n"


def peak_memory_of_export(db):
    """The export command's peak RSS in KiB, measured on its own process."""
    code = (
        "import resource, subprocess, sys; "
        f"subprocess.run([sys.executable, {str(PIXELD)!r}, 'export', '--db', {str(db)!r}], stdout=subprocess.DEVNULL, check=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def test_export_memory_stays_flat(tmp_path):
    sizes = {}
    for rows in (5_000, 150_000):
        db = tmp_path / f"{rows}.db"
        store = pixeld.Store(pixeld.connect(str(db)))
        start = 1_790_000_000
        store.write(pixeld.Batch(records=[pixeld.Record(pixeld.PageView(start + i * 7, "example.org", path=f"/page/{i % 997}", title="T", country="DE", browser="Chrome", version="131", os="Windows", device="desktop", language="en")) for i in range(rows)]))
        store.conn.close()
        sizes[rows] = peak_memory_of_export(db)
    assert sizes[150_000] - sizes[5_000] < 8 * 1024, sizes  # 30 times the rows, under 8 MiB more


@pytest.fixture
def rich_db(start_daemon):
    """Page views with campaigns, events and multi-page visits, written by the real daemon."""
    daemon = start_daemon()
    readers = [("198.51.100.1", CHROME), ("198.51.100.2", IPHONE), ("198.51.100.3", FIREFOX)]
    for n, (ip, ua) in enumerate(readers):
        headers = {"User-Agent": ua, "X-Forwarded-For": ip, "Accept-Language": "fr"}
        first = {"utm_source": "Newsletter", "utm_medium": "email", "utm_campaign": "nov"} if n < 2 else {"referrer": "https://news.example.net/x"}
        daemon.pixel({"path": "/", "host": "example.org", "title": "Home", "resolution": "390,844", **first}, headers)
        daemon.pixel({"path": f"/post/{n}", "host": "example.org", "title": f"Post {n}"}, headers)
        daemon.pixel({"event": "signup" if n else "download", "path": f"/post/{n}", "host": "example.org", **first}, headers)
    daemon.pixel({"event": "signup", "path": "/post/1", "host": "example.org"}, {"User-Agent": IPHONE, "X-Forwarded-For": "198.51.100.2"})
    daemon.stop()
    return daemon.db


@pytest.mark.parametrize("fmt", ["csv", "ndjson"])
def test_round_trip_carries_campaigns_events_and_visits(rich_db, tmp_path, fmt):
    code, exported, _ = run_pixeld("export", "--db", str(rich_db), "--format", fmt)
    assert code == 0
    path = tmp_path / f"export.{fmt}"
    path.write_text(exported)
    copy = tmp_path / "copy.db"
    code, _, err = run_pixeld("import", str(path), "--db", str(copy))
    assert code == 0, err
    before, after = whole_report(rich_db), whole_report(copy)
    assert {r["value"]: (r["visitors"], r["count"]) for r in before["sections"]["campaigns"]} == {"newsletter / email / nov": (2, 4)}  # each visit's two page views
    assert {r["value"]: r["count"] for r in before["sections"]["events"]} == {"signup": 3, "download": 1}
    assert before["visits"] == 3 and before["pageviews"] == 6
    for key in before:
        if key != "sections":
            assert after[key] == before[key], key
    for name in before["sections"]:
        assert after["sections"][name] == before["sections"][name], name
    for args in (["--event", "signup"], ["--campaign", "newsletter / email / nov"], ["--referrer", "newsletter (campaign)"]):
        assert whole_report(copy, *args) == whole_report(rich_db, *args), args


@pytest.mark.parametrize(
    "content", [b"", b"\n\n", bytes(range(256)) * 400, b"a,b\n1,2\n", b'{"no": "time"}\n', b"[1, 2]\n"],
    ids=["empty", "blank", "random-bytes", "foreign-csv", "json-without-time", "json-array"],
)
def test_import_refuses_what_it_cannot_read_and_writes_nothing(tmp_path, content):
    path = tmp_path / "input"
    path.write_bytes(content)
    db = tmp_path / "p.db"
    code, _, err = run_pixeld("import", str(path), "--db", str(db))
    assert code == 2 and err.count("\n") == 1 and err.startswith("pixeld: "), err
    assert not db.exists()


def test_an_access_log_needs_its_site_and_keeps_its_campaigns(tmp_path):
    log = tmp_path / "access.log"
    log.write_text("\n".join([
        f'{ADDRESS} - - [27/Nov/2026:10:00:00 +0000] "GET /post?utm_source=Newsletter&utm_medium=email&utm_campaign=Nov&token=s3cret HTTP/1.1" 200 10 "-" "{CHROME}"',
        f'{ADDRESS} - - [27/Nov/2026:10:01:00 +0000] "GET /about HTTP/1.1" 200 10 "https://example.org/post?utm_source=Newsletter" "{CHROME}"',
        f'203.0.113.5 - - [27/Nov/2026:10:02:00 +0000] "GET /?ref=HN&event=signup&host=evil.example&path=/forged HTTP/1.1" 200 10 "-" "{CHROME}"',
    ]) + "\n")
    db = tmp_path / "p.db"
    for fmt in ([], ["--format", "combined"]):  # without a site, internal navigation would become referrals from the site itself
        code, out, err = run_pixeld("import", str(log), "--db", str(db), *fmt)
        assert (code, out) == (2, "") and err == "pixeld: an access log does not name its site: give the site its pages belong to with --site example.org\n"
    assert not db.exists()
    old = tmp_path / "old.db"
    with sqlite3.connect(old) as conn:
        conn.execute("CREATE TABLE data (id INTEGER PRIMARY KEY, timestamp TEXT, path TEXT, title TEXT, referrer TEXT, country TEXT, device TEXT, width INT, height INT)")
    conn.close()
    code, _, err = run_pixeld("import", str(old), "--db", str(db))
    assert code == 2 and err.startswith("pixeld: a Flask database does not name its site") and err.count("\n") == 1

    code, _, err = run_pixeld("import", str(log), "--db", str(db), env={"PIXELD_SITES": "example.org"})  # serve's setting counts
    assert code == 0 and "imported 3 page views" in err, err
    views = stored_pageviews(db)
    assert [(v["site"], v["path"], v["referrer"]) for v in views] == [
        ("example.org", "/post", "newsletter (campaign)"), ("example.org", "/about", "newsletter (campaign)"), ("example.org", "/", "hn (campaign)"),
    ]
    report = report_json(db, "--range", "", "--start", "2026-11-27", "--end", "2026-11-27")
    assert {r["value"]: (r["visitors"], r["count"]) for r in report["sections"]["campaigns"]} == {"newsletter / email / nov": (1, 2), "hn /  / ": (1, 1)}
    assert [r["value"] for r in report["sections"]["channels"]] == ["campaign"]  # /about continued the newsletter's visit
    assert report["sections"]["events"] == []  # only campaign parameters are read from the logged address
    for path in tmp_path.iterdir():
        if path.name.startswith("p.db"):
            assert b"s3cret" not in path.read_bytes() and b"evil.example" not in path.read_bytes()


def test_import_filters_as_serve_does(tmp_path):
    spam = tmp_path / "spam.txt"
    spam.write_text("# ours\nspammy.example\n")
    log = tmp_path / "access.log"
    log.write_text("\n".join([
        f'203.0.113.7 - - [27/Nov/2026:10:00:00 +0000] "GET /a HTTP/1.1" 200 10 "https://spammy.example/x" "{CHROME}"',
        f'198.51.100.9 - - [27/Nov/2026:10:00:00 +0000] "GET /b HTTP/1.1" 200 10 "-" "{CHROME}"',
        f'203.0.113.5 - - [27/Nov/2026:10:00:00 +0000] "GET /c HTTP/1.1" 200 10 "-" "{CHROME}"',
    ]) + "\n")
    db = tmp_path / "p.db"
    code, _, err = run_pixeld("import", str(log), "--db", str(db), "--site", "example.org", "--spam-list", str(spam), "--ignore-ip", "198.51.100.0/24")
    assert code == 0 and "imported 1 page views" in err, err
    report = whole_report(db, "--range", "", "--start", "2026-11-27", "--end", "2026-11-27")
    assert [r["value"] for r in report["sections"]["pages"]] == ["/c"]
    assert report["filtered"] == {"total": 2, "ignored": 1, "spam": 1}


def test_live_hits_and_the_same_access_log_give_the_same_report(start_daemon, tmp_path):
    visits = [("203.0.113.1", CHROME, ["/", "/a", "/b"], "https://www.google.com/search"), ("203.0.113.2", IPHONE, ["/a"], ""),
              ("203.0.113.3", FIREFOX, ["/", "/c"], "https://news.example.net/x"), ("66.249.66.1", "Googlebot/2.1 (+http://www.google.com/bot.html)", ["/"], "")]
    daemon = start_daemon("--site", "example.org")
    lines = []
    for ip, ua, pages, referrer in visits:
        for i, page in enumerate(pages):
            campaign = {"utm_source": "Newsletter", "utm_medium": "email", "utm_campaign": "Nov"} if ua == IPHONE else {}  # the snippet sends them
            daemon.pixel({"path": page, "host": "example.org", "referrer": referrer if i == 0 else f"https://example.org{pages[i - 1]}", **campaign},
                         {"User-Agent": ua, "X-Forwarded-For": ip})
            stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(time.time()))
            target = page + ("?" + urlencode(campaign) if campaign else "")  # the page's address, as the access log has it
            lines.append(f'{ip} - - [{stamp}] "GET {target} HTTP/1.1" 200 10 "{referrer if i == 0 else "https://example.org" + pages[i - 1]}" "{ua}"')
    daemon.stop()
    log = tmp_path / "access.log"
    log.write_text("\n".join(lines) + "\n")
    imported = tmp_path / "imported.db"
    code, _, err = run_pixeld("import", str(log), "--db", str(imported), "--site", "example.org")
    assert code == 0, err
    live, from_log = whole_report(daemon.db, "--range", "today"), whole_report(imported, "--range", "today")
    assert live["pageviews"] == 6 and live["visits"] == 3 and live["filtered"] == {"total": 1, "bot": 1}
    assert [row["value"] for row in live["sections"]["campaigns"]] == ["newsletter / email / nov"]
    for key in ("visitors", "visits", "pageviews", "bounce_rate", "pages_per_visit", "filtered", "sections"):
        assert from_log[key] == live[key], key
