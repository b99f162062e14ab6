"""Full campaigns: utm_content and utm_term beside source, medium and name, from the pixel, the snippet
(in Chromium), access logs and pixeld's export, with the campaign rows drilling down into them; and
advertising click ids, which never reach the database or its WAL, whatever parameter brings them."""

import csv
import io
import json
import time
from urllib.parse import quote

import pixeld
from conftest import CHROME, run_pixeld, stored_pageviews, wait_for
from test_privacy import database_files
from test_snippet import DESKTOP_CHROME, Site

HOSTILE = "<script>alert(1)</script>"
LAUNCH = {"utm_source": "newsletter", "utm_medium": "email", "utm_campaign": "launch"}


def test_content_and_term_are_kept_and_the_campaign_drills_down_into_them(start_daemon):
    daemon = start_daemon("--rate-limit", "0")
    for n, (campaign, content, term) in enumerate([(LAUNCH, "banner", "Running Shoes"), (LAUNCH, HOSTILE, ""), (LAUNCH, "banner", ""),
                                                    ({"utm_source": "ads", "utm_campaign": "spring"}, "sidebar", '"><img src=x onerror=alert(2)>')]):
        daemon.pixel({"path": f"/p{n}", "host": "example.org", **campaign, "utm_content": content, "utm_term": term}, {"X-Forwarded-For": f"198.51.100.{n}"})
    daemon.pixel({"path": "/plain", "host": "example.org"})
    wait_for(lambda: daemon.report_json()["pageviews"] == 5)
    sections = daemon.report_json()["sections"]
    assert {row["value"]: row["count"] for row in sections["campaign_content"]} == {"banner": 2, HOSTILE: 1, "sidebar": 1}
    assert {row["value"]: row["count"] for row in sections["campaign_terms"]} == {"running shoes": 1, '"><img src=x onerror=alert(2)>': 1}
    launch = daemon.report_json("range=today&campaign=" + quote("newsletter / email / launch"))
    assert launch["pageviews"] == 3
    assert {row["value"]: row["count"] for row in launch["sections"]["campaign_content"]} == {"banner": 2, HOSTILE: 1}
    assert [row["value"] for row in launch["sections"]["campaign_terms"]] == ["running shoes"]
    assert daemon.report_json("range=today&content=banner")["pageviews"] == 2
    assert daemon.report_json("range=today&term=running%20shoes")["pageviews"] == 1
    assert daemon.report_json("range=today&term=running*")["pageviews"] == 0  # a term is matched whole: a * is a character
    assert daemon.report_json("range=today&content=sidebar&campaign=" + quote("newsletter / email / launch"))["pageviews"] == 0
    text = daemon.report("range=today").text
    assert "Campaign content" in text and "Campaign terms" in text and "running shoes" in text
    page = daemon.report("range=today&format=html").text
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<img" not in page
    assert "?range=today&amp;campaign=newsletter+%2F+email+%2F+launch" in page  # a campaign row links to its drill-down
    rows = list(csv.reader(io.StringIO(daemon.report("range=today&format=csv").text)))
    assert ["campaign_content", HOSTILE, "1", "20.0"] in rows
    daemon.stop()
    exported = run_pixeld("export", "--db", str(daemon.db), "--format", "ndjson")[1]
    assert '"campaign_content": "banner"' in exported and '"campaign_term": "running shoes"' in exported
    copy = daemon.db.parent / "copy.db"
    (daemon.db.parent / "export.ndjson").write_text(exported)
    assert run_pixeld("import", str(daemon.db.parent / "export.ndjson"), "--db", str(copy))[0] == 0
    details = lambda db: [(v["campaign_content"], v["campaign_term"]) for v in stored_pageviews(db)]  # noqa: E731
    assert details(copy) == details(daemon.db)


def test_an_access_log_keeps_content_and_term(tmp_path):
    stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(time.time() - 60))
    target = "/post?utm_source=news&utm_campaign=launch&utm_content=Hero&utm_term=shoes&gclid=CLICK1"
    line = f'198.51.100.1 - - [{stamp}] "GET {target} HTTP/1.1" 200 5 "-" "{CHROME}"\n'
    (tmp_path / "access.log").write_text(line)
    assert run_pixeld("import", str(tmp_path / "access.log"), "--db", str(tmp_path / "p.db"), "--site", "example.org")[0] == 0
    [view] = stored_pageviews(tmp_path / "p.db")
    assert (view["campaign"], view["campaign_content"], view["campaign_term"]) == ("news /  / launch", "hero", "shoes")
    assert not [path for path in database_files(tmp_path / "p.db") if b"CLICK1" in path.read_bytes()]


CLICK_IDS = {name: f"CLICK{n:02d}X" for n, name in enumerate(pixeld.CLICK_IDS)}


def click_query():
    return "&".join(f"{name}={value}" for name, value in CLICK_IDS.items())


def test_click_ids_never_reach_the_database_or_its_wal(start_daemon, tmp_path):
    daemon = start_daemon("--rate-limit", "0")
    ids = click_query()
    for name, value in list(CLICK_IDS.items()):
        mixed = name.upper() if len(value) % 2 else name  # GCLID= as well as gclid=
        daemon.pixel({  # every parameter that is stored, and the click ids as parameters of their own
            "path": f"/landing%3F{mixed}={value}", "host": "example.org", "title": f"Welcome {mixed}={value}",
            "referrer": f"https://www.google.com/aclk;{name}={value}?{ids}", name: value, **LAUNCH,
            "utm_content": f"{name}={value}", "utm_term": f"x&{name}={value}",
        }, {"Referer": f"https://example.org/landing?{ids}"})
        daemon.pixel({"event": f"signup?{name}={value}", "path": f"/x;{name}={value}", "host": "example.org"})
        daemon.pixel({"host": "example.org"}, {"Referer": f"https://example.org/from-page;{name}={value}?{ids}"})  # the page's URL alone
    wait_for(lambda: daemon.report_json()["pageviews"] == 2 * len(CLICK_IDS))
    time.sleep(1.5)  # the writer has committed: the WAL holds the rows
    files = database_files(daemon.db)
    assert {path.name for path in files} >= {"pixeld.db", "pixeld.db-wal"}
    rows = [(path.name, value) for path in files for value in CLICK_IDS.values() if value.encode() in path.read_bytes()]
    assert rows == []
    output = daemon.stop()
    assert not [value for value in CLICK_IDS.values() if value in output]
    assert not [path.name for path in database_files(daemon.db) for value in CLICK_IDS.values() if value.encode() in path.read_bytes()]
    views = stored_pageviews(daemon.db)
    assert {v["path"] for v in views} == {"/landing", "/from-page"} and {v["title"] for v in views} <= {"Welcome", ""}
    # pixeld's own export, with click ids in every column, imported
    row = {"time": int(time.time()) - 60, "type": "pageview", "site": "example.org", "path": f"/a?{ids}", "title": f"t {ids}",
           "referrer": f"google.com/x;gclid={CLICK_IDS['gclid']}", "campaign": f"gclid={CLICK_IDS['gclid']} / email / launch",
           "campaign_content": f"fbclid={CLICK_IDS['fbclid']}", "campaign_term": f"msclkid={CLICK_IDS['msclkid']}"}
    (tmp_path / "rows.ndjson").write_text(json.dumps(row) + "\n")
    assert run_pixeld("import", str(tmp_path / "rows.ndjson"), "--db", str(tmp_path / "imported.db"))[0] == 0
    assert len(stored_pageviews(tmp_path / "imported.db")) == 1
    assert not [path.name for path in database_files(tmp_path / "imported.db") for value in CLICK_IDS.values() if value.encode() in path.read_bytes()]


def test_the_snippet_sends_content_and_term_and_no_click_id(start_daemon, browser):
    daemon = start_daemon("--rate-limit", "0")
    site = Site(f"http://127.0.0.1:{daemon.port}")
    context = browser.new_context(user_agent=DESKTOP_CHROME)
    try:
        page = context.new_page()
        sent = []
        page.on("request", lambda request: sent.append(request.url) if "/pixel.gif" in request.url else None)
        page.goto(site.url(f"/post?utm_source=news&utm_campaign=launch&utm_content=Hero&utm_term=shoes&{click_query()}"))
        wait_for(lambda: daemon.report_json()["pageviews"] == 1)
        assert "utm_content=Hero" in sent[0] and "utm_term=shoes" in sent[0]
        assert not [value for value in CLICK_IDS.values() if value in sent[0]], sent[0]
        [view] = stored_pageviews(daemon.db)
        assert (view["campaign_content"], view["campaign_term"]) == ("hero", "shoes")
    finally:
        context.close()
        site.server.shutdown()
