"""Time on page and scroll depth: engagement beacons over HTTP (joined in memory to the visitor's page
view, filtered like page views, malformed ones ignored) and from the real snippet in Chromium."""

import json
import sqlite3
import time

import pytest

import pixeld
from conftest import CHROME, IPHONE, report_json, run_pixeld, wait_for
from test_snippet import DESKTOP_CHROME, Site

GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"


def engage(daemon, path, engaged, scroll, ip="198.51.100.1", ua=CHROME, **extra):
    query = {"engagement": "1", "path": path, "host": "example.org", "engaged": engaged, "scroll": scroll, **extra}
    answer = daemon.pixel(query, {"User-Agent": ua, "X-Forwarded-For": ip})
    assert answer.status == 200 and answer.body == pixeld.GIF
    return answer


def rows(db):
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT s.value, p.engaged, p.scroll, p.visit_views, p.duration FROM pageviews p JOIN strings s ON s.id = p.path ORDER BY p.id").fetchall()
    finally:
        conn.close()


def test_engagement_is_joined_to_the_page_view_and_counted_once(start_daemon):
    daemon = start_daemon()
    daemon.pixel({"path": "/post", "host": "example.org"}, {"X-Forwarded-For": "198.51.100.1"})
    daemon.pixel({"path": "/other", "host": "example.org"}, {"X-Forwarded-For": "198.51.100.2"})
    engage(daemon, "/post", "20.5", "40")
    engage(daemon, "/post", "10", "70")  # a later beacon: more time, a deeper scroll
    engage(daemon, "/post", "5", "30")  # shallower than before: only the time counts
    engage(daemon, "/post", "3000", "100")  # capped at 30 minutes per page view
    engage(daemon, "/other", "12", "50", ip="198.51.100.2")
    output = daemon.stop()
    assert "Traceback" not in output
    assert rows(daemon.db) == [("/post", 1800, 100, 1, 1800), ("/other", 12, 50, 1, 12)]
    document = report_json(daemon.db)
    assert document["pageviews"] == 2 and document["time_on_page"] == 906.0 and document["scroll_depth"] == 75.0
    assert document["visit_duration"] == 906  # a one-page visit lasts as long as it was read
    pages = {row["value"]: (row["time_on_page"], row["scroll_depth"]) for row in document["sections"]["pages"]}
    assert pages == {"/post": (1800.0, 100.0), "/other": (12.0, 50.0)}
    assert report_json(daemon.db, "--path", "/other")["time_on_page"] == 12.0  # filtered reports count raw rows
    text = run_pixeld("report", "--db", str(daemon.db), "--range", "today")[1]
    assert "Time on page" in text and "Scroll depth" in text and "30m 00s" in text


def test_a_page_without_engagement_reads_as_unknown_not_as_unread(start_daemon):
    """A page whose views reported no engagement (no JavaScript, never shown) shows "–", not 0s and 0%."""
    import csv
    import io

    daemon = start_daemon()
    daemon.pixel({"path": "/read", "host": "example.org"}, {"X-Forwarded-For": "198.51.100.1"})
    engage(daemon, "/read", "0", "0")  # reported: shown for a moment, never scrolled, which is 0s and 0%
    daemon.pixel({"path": "/noscript", "host": "example.org"}, {"X-Forwarded-For": "198.51.100.2"})
    daemon.stop()
    pages = {row["value"]: row for row in report_json(daemon.db)["sections"]["pages"]}
    assert (pages["/read"]["time_on_page"], pages["/read"]["scroll_depth"]) == (0.0, 0.0)
    assert (pages["/noscript"]["time_on_page"], pages["/noscript"]["scroll_depth"]) == (None, None)  # JSON: null
    text = run_pixeld("report", "--db", str(daemon.db), "--range", "today", "--section", "pages")[1]
    lines = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.startswith("/")}
    assert lines["/read"][-2:] == ["0s", "0%"] and lines["/noscript"][-2:] == ["–", "–"]
    html = run_pixeld("report", "--db", str(daemon.db), "--range", "today", "--section", "pages", "--format", "html")[1]
    row = html.split(">/noscript</a>", 1)[1].split("</tr>", 1)[0]
    assert row.endswith('<td class="n">–</td><td class="n">–</td>')
    cells = [row for row in csv.reader(io.StringIO(run_pixeld("report", "--db", str(daemon.db), "--format", "csv")[1])) if row[1] == "/noscript"]
    assert ["pages_time_on_page", "/noscript", "", ""] in cells and ["pages_scroll_depth", "/noscript", "", ""] in cells
    daemon = start_daemon(db=daemon.db)  # the headline too, when nothing in the range reported engagement
    document = json.loads(daemon.report("range=today&format=json&path=/noscript").text)
    assert document["time_on_page"] is None and document["scroll_depth"] is None and document["change"]["time_on_page"] is None


@pytest.mark.parametrize("engaged, scroll", [
    ("abc", "50"), ("-5", "50"), ("NaN", "50"), ("1e9", "50"), ("10", "-1"), ("10", "abc"), ("999999999", "10"), ("10", ""), ("", "10"),
    ("10\u00e9", "50"), ("\u0661\u0660", "50"), ("Infinity", "50"), ("0x10", "50"),
])
def test_malformed_engagement_gets_the_gif_and_changes_nothing(start_daemon, engaged, scroll):
    daemon = start_daemon()
    daemon.pixel({"path": "/post", "host": "example.org"}, {"X-Forwarded-For": "198.51.100.1"})
    engage(daemon, "/post", engaged, scroll)
    query = "engagement=1&path=/post&host=example.org&engaged=%FF%FE&scroll=%C0"
    assert daemon.get("/pixel.gif?" + query, {"User-Agent": CHROME, "X-Forwarded-For": "198.51.100.1"}).body == pixeld.GIF
    output = daemon.stop()
    assert rows(daemon.db) == [("/post", 0, None, 1, 0)]
    assert "Traceback" not in output and "could not record" not in output


def test_engagement_without_a_page_view_from_a_bot_or_for_another_path_is_dropped(start_daemon):
    daemon = start_daemon("--site", "example.org")
    engage(daemon, "/never-viewed", "30", "80", ip="198.51.100.9")  # before any page view
    daemon.pixel({"path": "/post", "host": "example.org"}, {"X-Forwarded-For": "198.51.100.1"})
    engage(daemon, "/elsewhere", "30", "80")  # a path this visitor never viewed
    engage(daemon, "/post", "30", "80", ua=IPHONE)  # another visitor (another User-Agent)
    engage(daemon, "/post", "30", "80", ua=GOOGLEBOT)
    engage(daemon, "/post", "30", "80", bot="1")  # the snippet saw a webdriver
    daemon.pixel({"engagement": "1", "path": "/post", "host": "other.net", "engaged": "30", "scroll": "80"}, {"X-Forwarded-For": "198.51.100.1"})
    daemon.stop()
    assert rows(daemon.db) == [("/post", 0, None, 1, 0)]
    document = report_json(daemon.db)
    assert document["pageviews"] == 1 and document["time_on_page"] is None
    assert document["filtered"] == {"total": 3, "bot": 1, "headless": 1, "foreign": 1}


def test_an_engagement_is_not_a_page_view_and_a_rate_limited_one_is_dropped(start_daemon):
    daemon = start_daemon("--rate-limit", "2")
    daemon.pixel({"path": "/post", "host": "example.org"}, {"X-Forwarded-For": "198.51.100.1"})
    engage(daemon, "/post", "4", "20")
    engage(daemon, "/post", "4", "90")  # the third hit this minute
    daemon.stop()
    assert rows(daemon.db) == [("/post", 4, 20, 1, 4)]
    assert report_json(daemon.db)["filtered"] == {"total": 1, "rate-limited": 1}


def test_export_and_import_carry_engagement(start_daemon, tmp_path):
    daemon = start_daemon()
    daemon.pixel({"path": "/post", "host": "example.org"}, {"X-Forwarded-For": "198.51.100.1"})
    engage(daemon, "/post", "42", "66")
    daemon.pixel({"path": "/quick", "host": "example.org"}, {"X-Forwarded-For": "198.51.100.2"})
    daemon.stop()
    for fmt in ("csv", "ndjson"):
        exported = tmp_path / f"export.{fmt}"
        exported.write_text(run_pixeld("export", "--db", str(daemon.db), "--format", fmt)[1])
        copy = tmp_path / f"copy-{fmt}.db"
        assert run_pixeld("import", str(exported), "--db", str(copy))[0] == 0
        assert report_json(copy) == report_json(daemon.db)
        assert rows(copy) == rows(daemon.db) == [("/post", 42, 66, 1, 42), ("/quick", 0, None, 1, 0)]


@pytest.fixture
def reading(start_daemon, browser):
    daemon = start_daemon("--rate-limit", "0")
    site = Site(f"http://127.0.0.1:{daemon.port}")
    long_text = "".join(f"<p>Paragraph {n}: " + "words " * 40 + "</p>" for n in range(150))
    site.pages["/long"] = f"<title>Long</title>{long_text}{pixeld.snippet(f'http://127.0.0.1:{daemon.port}')}"
    site.pages["/app"] = (
        f'<title>App</title><button id="next" onclick="history.pushState({{}}, \'\', \'/app/next\')">next</button>{long_text}'
        + pixeld.snippet(f"http://127.0.0.1:{daemon.port}")
    )
    context = browser.new_context(user_agent=DESKTOP_CHROME, viewport={"width": 1000, "height": 700})
    yield daemon, site, context
    context.close()
    site.server.shutdown()


def page_rows(daemon):
    return {row["value"]: row for row in daemon.report_json()["sections"]["pages"]}


def test_reading_half_a_long_page_for_two_seconds(reading):
    daemon, site, context = reading
    page = context.new_page()
    page.goto(site.url("/long"))
    page.evaluate("window.scrollTo(0, (document.documentElement.scrollHeight - window.innerHeight) / 2)")
    time.sleep(2.2)
    page.close(run_before_unload=True)
    wait_for(lambda: (page_rows(daemon).get("/long", {}).get("time_on_page") or 0) > 0)
    row = page_rows(daemon)["/long"]
    assert row["time_on_page"] >= 1.5 and 40 <= row["scroll_depth"] <= 70, row


def test_a_single_page_app_sends_the_previous_pages_engagement_first(reading):
    daemon, site, context = reading
    page = context.new_page()
    beacons = []
    page.on("request", lambda request: beacons.append(request.url) if "/pixel.gif" in request.url else None)
    page.goto(site.url("/app"))
    time.sleep(1.2)
    page.click("#next")
    wait_for(lambda: "/app/next" in page_rows(daemon))
    wait_for(lambda: page.evaluate("true") and len(beacons) >= 3)  # Playwright hands request events over only inside its own calls
    kinds = [("engagement" if "engagement=1" in url else "view") + ":" + url.split("path=")[1].split("&")[0] for url in beacons]
    assert kinds[:3] == ["view:%2Fapp", "engagement:%2Fapp", "view:%2Fapp%2Fnext"], kinds
    engaged = [url for url in beacons if "engagement=1" in url][0]
    assert "&host=site.test&engaged=" in engaged and "&scroll=" in engaged
    wait_for(lambda: (page_rows(daemon)["/app"]["time_on_page"] or 0) >= 1)


HIDDEN = """Object.defineProperty(Document.prototype, "visibilityState", {get: () => "hidden"});
Object.defineProperty(Document.prototype, "hidden", {get: () => true});"""


def test_a_background_tab_never_shown_reports_no_engaged_time(reading):
    """Headless Chromium shows every page, so the page's Page Visibility API is made to say what a
    background tab's does ("hidden") before the snippet runs."""
    daemon, site, context = reading
    page = context.new_page()
    page.add_init_script(HIDDEN)
    beacons = []
    page.on("request", lambda request: beacons.append(request.url) if "/pixel.gif" in request.url else None)
    page.goto(site.url("/long"))
    assert page.evaluate("document.visibilityState") == "hidden"
    page.evaluate("window.scrollTo(0, document.documentElement.scrollHeight / 2)")
    time.sleep(1.5)
    page.close(run_before_unload=True)
    wait_for(lambda: "/long" in page_rows(daemon))
    time.sleep(1.5)
    assert [url for url in beacons if "engagement=1" in url] == []
    assert (page_rows(daemon)["/long"]["time_on_page"], page_rows(daemon)["/long"]["scroll_depth"]) == (None, None)
