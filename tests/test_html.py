"""The report in a browser: content negotiation, the HTML renderer (escaping, empty report, every section
and range), Basic auth, the public option, the live view, and real Chromium through Playwright."""

import re
import struct
import time
import zlib
from urllib.parse import parse_qs, urlsplit

import pixeld
from pixeld import Range, ReportData
from conftest import CHROME, IPHONE, make_sections, request_for, wait_for

HOSTILE = ["<script>alert(1)</script>", '"><img src=x onerror=alert(2)>', "<svg onload=alert(3)>", "javascript:alert(4)"]
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
NOW = 1_795_870_000


def sample(**sections):
    query = pixeld.Query(Range(NOW - 7 * 86400, NOW))
    totals, previous = pixeld.Metrics(10, 4, 5, 2, 300), pixeld.Metrics(5, 2, 3, 1, 100)
    rows = make_sections(totals, **{"entry_pages": [("/", 5, 2)], "events": [("signup", 2, 1)], **sections})
    return ReportData(query, ["example.org"], totals, previous, {"bot": 1}, rows, "day", [(NOW - 86400, 3, 2), (NOW, 7, 2)], [])


PIXELD_TAGS = {"html", "head", "meta", "link", "title", "style", "body", "header", "h1", "h2", "p", "nav", "a", "b", "dl", "div", "dt", "dd", "small",
               "figure", "svg", "line", "text", "rect", "figcaption", "main", "section", "table", "tr", "th", "td", "span", "footer"}


def parsed(page):
    """The tags, the attributes and the text of a page, as a browser's parser sees them."""
    from html.parser import HTMLParser

    found = (set(), [], [])

    class Parser(HTMLParser):
        def handle_starttag(self, tag, attrs):
            found[0].add(tag)
            found[1].extend(attrs)

        def handle_data(self, data):
            found[2].append(data)

    parser = Parser()
    parser.feed(page)
    return found[0], found[1], "".join(found[2])


def test_every_visitor_value_is_escaped_in_text_attributes_and_links():
    hostile_rows = [(value, 1) for value in HOSTILE]
    report = sample(pages=hostile_rows, sources=[(v, 1, 1, "referral") for v in HOSTILE], referrers=hostile_rows, campaigns=hostile_rows,
                    events=[(value, 1, 1) for value in HOSTILE])
    page = pixeld.render_html(report, request_for(report, "html", path=HOSTILE[1]))
    tags, attributes, text = parsed(page)
    assert tags <= PIXELD_TAGS, tags - PIXELD_TAGS
    assert page.count("<svg") == 1  # the chart, and nothing a visitor sent
    assert not [name for name, _ in attributes if name.startswith("on")]
    assert not [value for name, value in attributes if name == "href" and value.strip().lower().startswith("javascript")]
    for value in HOSTILE:
        assert value in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&quot;&gt;&lt;img src=x onerror=alert(2)&gt;" in page
    links = re.findall(r'href="([^"]*)"', page)
    assert all(link.startswith("?") or link == "data:," for link in links)
    assert any(parse_qs(urlsplit(link.replace("&amp;", "&")).query).get("event") == [HOSTILE[0]] for link in links)


def test_an_empty_report_and_every_section():
    report = sample(entry_pages=[], events=[])._replace(totals=pixeld.Metrics(), previous=pixeld.Metrics(), series=[])
    request = request_for(report, "html", event="signup")  # the Properties section belongs to one event
    page = pixeld.render_html(report._replace(query=request.query), request)
    for title in pixeld.SECTION_TITLES.values():
        assert f"<h2>{title}</h2>" in page
    assert "(no page views)" in page and "(no events)" in page and "(no properties)" in page and page.endswith("</html>\n")
    assert "<h2>Properties</h2>" not in pixeld.render_html(report, request_for(report, "html"))


def test_every_range_link_and_filter_removal():
    report = sample(pages=[("/a", 3)])
    request = request_for(report, "html", range="7d", country="DE", path="/a")
    page = pixeld.render_html(report._replace(query=request.query), request)
    for name in pixeld.RANGE_LINKS:
        assert f">{name}</a>" in page
    links = {text: parse_qs(urlsplit(href.replace("&amp;", "&")).query) for href, text in re.findall(r'<a href="([^"]*)"[^>]*>([^<]*)</a>', page)}
    assert links["today"] == {"range": ["today"], "country": ["DE"], "path": ["/a"]}  # a range link keeps the filters
    assert re.search(r'<a href="[^"]*range=7d[^"]*" aria-current=page>7d</a>', page)
    removals = [parse_qs(urlsplit(href.replace("&amp;", "&")).query) for href in re.findall(r'<a href="([^"]*)" title="remove">', page)]
    assert removals == [{"range": ["7d"], "country": ["DE"]}, {"range": ["7d"], "path": ["/a"]}]
    assert links["/a"] == {"range": ["7d"], "country": ["DE"], "path": ["/a"]}
    assert "time zone UTC" in page


def test_content_negotiation_basic_auth_and_headers(start_daemon):
    daemon = start_daemon("--token", "s3cret")
    daemon.pixel({"path": "/post", "host": "example.org"})
    answer = daemon.report("range=today", {"Accept": BROWSER_ACCEPT})
    assert answer.status == 401 and answer.headers["www-authenticate"].startswith('Basic realm="pixeld"')
    basic = {"Authorization": "Basic " + __import__("base64").b64encode(b":s3cret").decode()}
    wrong = {"Authorization": "Basic " + __import__("base64").b64encode(b"me:nope").decode()}
    assert daemon.report("range=today", wrong).status == 401
    html_answer = daemon.report("range=today", {**basic, "Accept": BROWSER_ACCEPT})
    assert html_answer.status == 200 and html_answer.headers["content-type"] == "text/html; charset=utf-8"
    csp = html_answer.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp
    assert html_answer.headers["x-content-type-options"] == "nosniff" and html_answer.headers["referrer-policy"] == "no-referrer"
    assert html_answer.headers["cache-control"] == "no-store"
    text_answer = daemon.report("range=today", {**basic, "Accept": "*/*"})
    assert text_answer.headers["content-type"].startswith("text/plain") and text_answer.text.startswith("pixeld report")
    bearer = daemon.report("range=today&format=html", {"Authorization": "Bearer s3cret"})
    assert bearer.headers["content-type"].startswith("text/html")


def test_a_public_report_is_open_but_export_is_not(start_daemon):
    daemon = start_daemon("--public-report", "--token", "s3cret")
    answer = daemon.report("range=today", {"Accept": BROWSER_ACCEPT, "X-Forwarded-For": "203.0.113.5"})
    assert answer.status == 200 and "This report is public" in answer.text
    assert daemon.report("range=today&format=json", {"X-Forwarded-For": "203.0.113.5"}).status == 200
    assert daemon.get("/export", {"X-Forwarded-For": "203.0.113.5"}).status == 401
    assert daemon.get("/metrics", {"X-Forwarded-For": "203.0.113.5"}).status == 401
    open_daemon = start_daemon(db=daemon.db.parent / "env.db", env={"PIXELD_PUBLIC_REPORT": "1"})
    assert open_daemon.report("range=today", {"X-Forwarded-For": "203.0.113.5"}).status == 200
    assert open_daemon.get("/export", {"X-Forwarded-For": "203.0.113.5"}).status == 403


def test_the_live_view(start_daemon):
    daemon = start_daemon()
    for n, path in enumerate(["/a", "/a", "/b"]):
        daemon.pixel({"path": path, "host": "example.org", "referrer": "https://news.ycombinator.com/item"}, {"X-Forwarded-For": f"198.51.100.{n}"})
    wait_for(lambda: daemon.report_json("range=realtime")["pageviews"] == 3)
    document = daemon.report_json("range=realtime")
    assert document["visitors_now"] == 3 and document["series"]["grain"] == "minute" and len(document["series"]["rows"]) == 30
    assert document["sections"]["sources"][0]["value"] == "Hacker News"
    assert "Visitors now" in daemon.report("range=realtime").text
    page = daemon.report("range=realtime&format=html").text
    assert '<meta http-equiv="refresh" content="30">' in page and "Visitors now" in page
    assert '<meta http-equiv="refresh"' not in daemon.report("range=today&format=html").text


def png_colours(path):
    """How many different byte values the decoded image rows hold: a blank page has very few."""
    data = path.read_bytes()
    chunks, offset = [], 8
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if kind == b"IDAT":
            chunks.append(data[offset + 8 : offset + 8 + length])
        offset += 12 + length
    return len(set(zlib.decompress(b"".join(chunks))))


def test_the_page_in_chromium_hostile_values_links_and_a_phone(start_daemon, browser, tmp_path):
    daemon = start_daemon("--token", "s3cret", "--rate-limit", "0")
    for n, value in enumerate(HOSTILE):
        headers = {"User-Agent": IPHONE if n % 2 else CHROME, "X-Forwarded-For": f"198.51.100.{n}"}
        daemon.pixel({"path": f"/p/{value}", "host": "example.org", "title": value, "referrer": f"https://evil.example/{value}"}, headers)
        daemon.pixel({"path": "/", "host": "example.org", "utm_source": value, "utm_campaign": value}, headers)
        daemon.pixel({"event": value, "path": "/", "host": "example.org"}, headers)
    daemon.stop()
    daemon = start_daemon("--token", "s3cret", db=daemon.db)
    base = f"http://127.0.0.1:{daemon.port}/report?range=today"
    for viewport in ({"width": 1280, "height": 900}, {"width": 360, "height": 740}):
        context = browser.new_context(http_credentials={"username": "", "password": "s3cret"}, viewport=viewport)
        page = context.new_page()
        dialogs, errors, requests = [], [], []
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("request", lambda request: requests.append(request.url))
        page.goto(base)
        page.wait_for_load_state("load")
        time.sleep(0.3)
        assert dialogs == [] and errors == [], (dialogs, errors)
        assert {url.split("?")[0] for url in requests} == {base.split("?")[0]}, requests
        assert page.evaluate("document.querySelectorAll('script, img, iframe, object, embed, foreignObject').length") == 0
        assert page.evaluate("document.querySelectorAll('svg').length") == 1
        assert page.evaluate("[...document.querySelectorAll('*')].filter(e => [...e.attributes].some(a => a.name.startsWith('on'))).length") == 0
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), page.evaluate("document.documentElement.scrollWidth")
        body = page.inner_text("body")
        assert HOSTILE[0] in body and HOSTILE[1] in body
        box = lambda title: page.locator(f"section:has(h2:text-is('{title}'))").bounding_box()  # noqa: E731
        pairs = [("Pages", "Sources"), ("Countries", "Devices"), ("Browsers", "Operating systems")]
        if viewport["width"] > 1000:  # two by two, side by side
            assert all(box(left)["y"] == box(right)["y"] and box(left)["x"] + box(left)["width"] < box(right)["x"] for left, right in pairs)
        else:  # a phone: one below the other, in the order of the page
            assert all(box(left)["y"] < box(right)["y"] and box(left)["x"] == box(right)["x"] for left, right in pairs)
            assert box("Entry pages")["y"] < box("Sources")["y"]
        shot = tmp_path / f"report-{viewport['width']}.png"
        page.screenshot(path=str(shot), full_page=True)
        assert png_colours(shot) > 20
        context.close()
    context = browser.new_context(http_credentials={"username": "me", "password": "s3cret"})
    page = context.new_page()
    page.goto(base)
    page.click("section:has(h2:text('Pages')) a:text('/')")
    assert parse_qs(urlsplit(page.url).query)["path"] == ["/"]
    assert "Filters: path = /" in page.inner_text("header")
    page.click("header a[title=remove]")
    assert "path" not in parse_qs(urlsplit(page.url).query)
    page.click("nav a:text('7d')")
    assert parse_qs(urlsplit(page.url).query)["range"] == ["7d"]
    context.close()


def test_a_page_of_an_all_sites_report_links_to_its_site_and_path():
    report = sample(pages=[("example.org/about", 2), ("blog.example.net/", 1)])._replace(sites=["blog.example.net", "example.org"])
    page = pixeld.render_html(report, request_for(report, "html", range="7d"))
    links = {text: parse_qs(urlsplit(href.replace("&amp;", "&")).query) for href, text in re.findall(r'<a href="([^"]*)"[^>]*>([^<]*)</a>', page)}
    assert links["example.org/about"] == {"range": ["7d"], "site": ["example.org"], "path": ["/about"]}
    assert links["blog.example.net/"] == {"range": ["7d"], "site": ["blog.example.net"], "path": ["/"]}
