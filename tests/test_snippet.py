"""snippet.html in a real browser: Debian's headless Chromium, driven by Playwright, against the real
daemon, with a test site served under names that do not look like loopback (site.test, other.test)."""

import queue

import pytest

import pixeld
from conftest import WebSite, stored_pageviews, wait_for

DESKTOP_CHROME = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"


class Site(WebSite):
    """The test site: a few pages that embed the snippet."""

    def __init__(self, pixeld_url):
        super().__init__(missing={"/missing"})  # /missing is served with 404 Not Found
        snippet = pixeld.snippet(pixeld_url)
        outbound = snippet.replace("<script data-pixeld=", "<script data-outbound data-pixeld=")
        other = f"http://other.test:{self.port}"
        self.pages.update({
            "/start": f'<title>Elsewhere</title><a id="go" href="http://site.test:{self.port}/post">a post</a>',
            "/post": f"<title>A post</title><p>Hello</p>{snippet}",
            "/spa": f'<title>App</title><button id="next" onclick="history.pushState({{}}, \'\', \'/spa/next\'); document.title = \'Next\'">next</button>{snippet}',
            "/events": f'<title>Events</title><button data-pixeld-event="signup">Sign up</button><a id="out" href="{other}/landing">away</a>{outbound}',
            "/landing": "<title>Landing</title>",
            "/privacy": f'<title>Privacy</title><a id="optout" href="#pixeld-optout">Do not count my visits</a>{snippet}',
        })


@pytest.fixture
def setup(start_daemon, browser):
    daemon = start_daemon("--rate-limit", "0")
    site = Site(f"http://127.0.0.1:{daemon.port}")
    context = browser.new_context(user_agent=DESKTOP_CHROME, screen={"width": 1234, "height": 987}, viewport={"width": 1000, "height": 700})
    yield daemon, site, context
    context.close()
    site.server.shutdown()


def test_a_page_view_with_javascript(setup):
    daemon, site, context = setup
    page = context.new_page()
    page.goto(site.url("/start", host="other.test"))
    with page.expect_request(lambda request: "/pixel.gif" in request.url):
        page.click("#go")
    wait_for(lambda: daemon.report_json()["pageviews"] == 1)
    daemon.stop()
    [view] = stored_pageviews(daemon.db)
    assert (view["site"], view["path"], view["title"], view["referrer"], view["screen"]) == ("site.test", "/post", "A post", "other.test", "1234x987")
    assert (view["browser"], view["device"], view["language"]) == ("Chrome", "desktop", "en")


def test_a_page_view_with_javascript_off_comes_from_the_noscript_image(start_daemon, browser):
    daemon = start_daemon("--rate-limit", "0")
    site = Site(f"http://127.0.0.1:{daemon.port}")
    context = browser.new_context(user_agent=DESKTOP_CHROME, java_script_enabled=False)
    page = context.new_page()
    with page.expect_request(lambda request: "/pixel.gif" in request.url):
        page.goto(site.url("/post?utm_source=x"))
    wait_for(lambda: daemon.report_json()["pageviews"] == 1)
    context.close()
    daemon.stop()
    [view] = stored_pageviews(daemon.db)
    assert (view["site"], view["path"], view["title"]) == ("site.test", "/post", "")  # the page, from the full Referer


def test_single_page_app_navigation(setup):
    daemon, site, context = setup
    page = context.new_page()
    page.goto(site.url("/spa"))
    wait_for(lambda: daemon.report_json()["pageviews"] == 1)
    page.click("#next")
    wait_for(lambda: daemon.report_json()["pageviews"] == 2)
    page.go_back()  # popstate back to /spa: a page view again
    wait_for(lambda: daemon.report_json()["pageviews"] == 3)
    daemon.stop()
    assert [(v["path"], v["referrer"]) for v in stored_pageviews(daemon.db)] == [("/spa", ""), ("/spa/next", ""), ("/spa", "")]


def test_events_from_data_attributes_the_api_and_outbound_links(setup):
    daemon, site, context = setup
    page = context.new_page()
    page.goto(site.url("/events"))
    page.click("text=Sign up")
    page.evaluate("pixeld('event', 'from-the-api')")
    page.click("#out")  # navigates away: the beacon still goes
    page.wait_for_url("**/landing")
    wait_for(lambda: len(daemon.report_json()["sections"]["events"]) == 3)
    events = {row["value"]: (row["count"], row["visitors"]) for row in daemon.report_json()["sections"]["events"]}
    assert events == {"signup": (1, 1), "from-the-api": (1, 1), "outbound:other.test": (1, 1)}
    assert daemon.report_json()["pageviews"] == 1  # events are not page views
    signups = daemon.report_json("range=today&event=signup")
    assert signups["pageviews"] == 1 and signups["sections"]["pages"][0]["value"] == "/events"


def test_campaign_links(setup):
    daemon, site, context = setup
    page = context.new_page()
    page.goto(site.url("/post?utm_source=Newsletter&utm_medium=email&utm_campaign=launch&secret=1"))
    wait_for(lambda: daemon.report_json()["pageviews"] == 1)
    data = daemon.report_json()
    assert data["sections"]["campaigns"] == [{"value": "newsletter / email / launch", "visitors": 1, "percent": 100.0, "visits": 1, "count": 1}]
    assert data["sections"]["referrers"][0]["value"] == "newsletter (campaign)"
    daemon.stop()
    assert stored_pageviews(daemon.db)[0]["path"] == "/post"  # never a query string


def test_opting_yourself_out_with_the_hash(setup):
    daemon, site, context = setup
    page = context.new_page()
    messages = []
    page.on("dialog", lambda dialog: (messages.append(dialog.message), dialog.accept()))
    sent = []
    page.on("request", lambda request: sent.append(request.url) if "/pixel.gif" in request.url else None)
    page.goto(site.url("/post#pixeld-ignore"))
    assert messages == ["pixeld: this browser is no longer counted"]
    page.goto(site.url("/spa"))
    page.click("#next")
    page.wait_for_timeout(1000)
    assert sent == [] and daemon.report_json()["pageviews"] == 0
    page.goto(site.url("/post#pixeld-ignore"))  # the same hash again: counted again
    assert messages[-1] == "pixeld: this browser is counted again"
    page.reload()
    wait_for(lambda: daemon.report_json()["pageviews"] == 1)


def test_a_visitor_objects_from_the_privacy_page_or_the_api(setup):
    daemon, site, context = setup
    page = context.new_page()
    messages, sent = [], []
    page.on("dialog", lambda dialog: (messages.append(dialog.message), dialog.accept()))
    page.goto(site.url("/privacy"))
    wait_for(lambda: daemon.report_json()["pageviews"] == 1)  # the privacy page itself, before the click
    page.on("request", lambda request: sent.append(request.url) if "/pixel.gif" in request.url else None)
    with page.expect_event("dialog"):  # Playwright delivers the dialog while we wait in its API, not in time.sleep
        page.click("#optout")  # a link on the same page: no reload
    assert messages == ["pixeld: this browser is no longer counted"]
    page.goto(site.url("/post"))
    page.goto(site.url("/events"))
    page.click("text=Sign up")
    page.evaluate("pixeld('event', 'from-the-api')")
    page.goto(site.url("/landing"))  # leaving /events: no engagement beacon either
    page.wait_for_timeout(1000)
    assert sent == [] and daemon.report_json()["pageviews"] == 1 and daemon.report_json()["sections"]["events"] == []
    page.goto(site.url("/privacy"))
    with page.expect_event("dialog"):
        page.click("#optout")  # the same link again: counted again
    assert messages[-1] == "pixeld: this browser is counted again"
    page.goto(site.url("/post"))
    wait_for(lambda: daemon.report_json()["pageviews"] == 2)

    api = context.browser.new_context(user_agent=DESKTOP_CHROME).new_page()  # a site's own button calls pixeld('optout')
    api.goto(site.url("/spa"))
    wait_for(lambda: daemon.report_json()["pageviews"] == 3)
    api.evaluate("pixeld('optout')")
    api.click("#next")
    api.goto(site.url("/post"))
    api.wait_for_timeout(1000)
    assert daemon.report_json()["pageviews"] == 3
    api.context.close()


def test_nothing_is_sent_from_localhost(setup):
    daemon, site, context = setup
    page = context.new_page()
    sent = []
    page.on("request", lambda request: sent.append(request.url) if "/pixel.gif" in request.url else None)
    for host in ("localhost", "127.0.0.1"):
        page.goto(site.url("/post", host=host))
        page.evaluate("pixeld('event', 'local')")
    page.wait_for_timeout(1000)
    assert sent == []
    assert daemon.report_json()["pageviews"] == 0 and daemon.report_json()["sections"]["events"] == []


def test_an_automated_browser_is_flagged(start_daemon, browser):
    daemon = start_daemon("--rate-limit", "0")
    site = Site(f"http://127.0.0.1:{daemon.port}")
    context = browser.new_context(user_agent=DESKTOP_CHROME)
    page = context.new_page()
    page.add_init_script("Object.defineProperty(navigator, 'webdriver', {get: () => true})")
    with page.expect_request(lambda request: "/pixel.gif" in request.url and "bot=1" in request.url):
        page.goto(site.url("/post"))
    wait_for(lambda: daemon.report_json()["filtered"].get("headless") == 1)
    assert daemon.report_json()["pageviews"] == 0
    context.close()


def test_the_snippet_stays_small():
    import re

    script = re.search(r"<script[^>]*>(.*?)</script>", pixeld.snippet(), re.S).group(1)
    assert len(script.encode()) <= 4096  # reading time, scroll depth, the opt-out, properties, downloads, forms and 404s; the README states the size
    assert "cookie" not in script.lower()


# ---- Event properties, downloads, forms and pages not found --------------------------------------------------

SECRET = "s3cret-Value-4711"
KEEP_ON_PAGE = "<script>document.addEventListener('click', function (v) { v.preventDefault(); });</script>"  # after the snippet: it still sees the click


def with_options(snippet, options):
    return snippet.replace("<script data-pixeld=", f"<script {options} data-pixeld=")


def pixel_requests(page, daemon):
    """Every request the page sends to pixeld, collected in a queue as the browser sends it."""
    sent = queue.Queue()
    page.on("request", lambda request: sent.put(request) if f":{daemon.port}/" in request.url else None)
    return sent


def drained(sent):
    found = []
    while not sent.empty():
        found.append(sent.get())
    return found


def events_named(daemon, query="range=today"):
    return {row["value"]: row["count"] for row in daemon.report_json(query)["sections"]["events"]}


def test_event_properties_from_the_api_and_data_attributes(setup):
    daemon, site, context = setup
    snippet = pixeld.snippet(f"http://127.0.0.1:{daemon.port}")
    button = '<button id="dl" data-pixeld-event="download" data-pixeld-prop-format="pdf" data-pixeld-prop-Chapter="2">PDF</button>'
    site.pages["/props"] = f"<title>Props</title>{button}{snippet}"
    page = context.new_page()
    sent = pixel_requests(page, daemon)
    page.goto(site.url("/props"))
    page.click("#dl")
    page.evaluate("pixeld('event', 'download', {format: 'epub', email: 'reader@example.org'})")
    wait_for(lambda: events_named(daemon).get("download") == 2)
    urls = [request.url for request in drained(sent)]
    assert any("prop_format=pdf" in url and "prop_chapter=2" in url for url in urls), urls  # attribute names are lower case in HTML
    document = daemon.report_json("range=today&event=download")
    found = {(row["property"], row["value"]): (row["count"], row["visitors"]) for row in document["sections"]["properties"]}
    assert found == {("format", "pdf"): (1, 1), ("format", "epub"): (1, 1), ("chapter", "2"): (1, 1)}
    assert "pixeld_dropped_event_properties_total 1" in daemon.get("/metrics").text


def test_downloads_are_counted_when_opted_in(setup):
    daemon, site, context = setup
    snippet = pixeld.snippet(f"http://127.0.0.1:{daemon.port}")
    links = (f'<a id="pdf" href="/files/book.pdf">book</a><a id="zip" href="http://other.test:{site.port}/pub/code.ZIP?v=2">code</a>'
             '<a id="page" href="/about.html">about</a><a id="txt" href="/notes.txt">notes</a>')
    site.pages["/files"] = f"<title>Files</title>{links}{with_options(snippet, 'data-downloads')}{KEEP_ON_PAGE}"
    own_list = with_options(snippet, 'data-downloads="txt, md"')
    site.pages["/own-list"] = f"<title>Own list</title>{links}{own_list}{KEEP_ON_PAGE}"
    site.pages["/off"] = f"<title>Off</title>{links}{snippet}{KEEP_ON_PAGE}"
    page = context.new_page()
    for path in ("/off", "/files", "/own-list"):
        page.goto(site.url(path))
        for link in ("#pdf", "#zip", "#page", "#txt"):
            page.click(link)
    wait_for(lambda: sum(events_named(daemon).values()) == 3 and daemon.report_json()["pageviews"] == 3)
    page.wait_for_timeout(500)
    assert events_named(daemon) == {"download:/files/book.pdf": 1, "download:other.test/pub/code.ZIP": 1, "download:/notes.txt": 1}
    on_page = daemon.report_json("range=today&event=download:/files/book.pdf")["sections"]["pages"]
    assert on_page == [{"value": "/files", "count": 1, "percent": 100.0, "time_on_page": None, "scroll_depth": None}]


def test_form_submissions_are_counted_and_no_field_value_is_ever_sent(setup):
    daemon, site, context = setup
    snippet = with_options(pixeld.snippet(f"http://127.0.0.1:{daemon.port}"), "data-forms")
    site.pages["/contact"] = (
        '<title>Contact</title><form method="post" action="/thanks"><input name="email" type="email"><input name="name">'
        f'<input type="hidden" name="token" value="{SECRET}-hidden"><input type="password" name="pw"><textarea name="note"></textarea>'
        f'<select name="choice"><option>{SECRET}-option</option></select><button id="send">Send</button></form>{snippet}'
    )
    site.pages["/search"] = f'<title>Search</title><form method="get" action="/results"><input name="q"><button id="find">Find</button></form>{snippet}'
    site.pages["/thanks"] = f"<title>Thanks</title>{snippet}"
    site.pages["/results"] = f"<title>Results</title>{snippet}"
    page = context.new_page()
    sent = pixel_requests(page, daemon)
    page.goto(site.url("/contact"))
    page.fill("input[name=email]", f"{SECRET}@example.org")
    page.fill("input[name=name]", SECRET)
    page.fill("input[name=pw]", SECRET + "-pw")
    page.fill("textarea", SECRET + "-note")
    page.click("#send")
    page.wait_for_url("**/thanks")
    page.goto(site.url("/search"))
    page.fill("input[name=q]", SECRET + "-query")
    page.click("#find")
    page.wait_for_url("**/results?q=*")
    wait_for(lambda: events_named(daemon) == {"form:/contact": 1, "form:/search": 1} and daemon.report_json()["pageviews"] == 4)
    page.wait_for_timeout(500)
    assert SECRET in site.posted[0] and f"{SECRET}-hidden" in site.posted[0]  # the form did carry the values, to the site
    requests = drained(sent)
    assert len(requests) >= 6
    for request in requests:
        seen = request.url + str(request.post_data or "") + " ".join(f"{name}: {value}" for name, value in request.all_headers().items())
        assert SECRET not in seen and SECRET.lower() not in seen.lower(), seen
    output = daemon.stop()
    wal = daemon.db.parent / (daemon.db.name + "-wal")
    stored = daemon.db.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    assert SECRET.encode() not in stored and SECRET not in output
    assert [view["path"] for view in stored_pageviews(daemon.db)] == ["/contact", "/thanks", "/search", "/results"]


def test_pages_not_found_from_data_404_and_the_api(setup):
    daemon, site, context = setup
    snippet = pixeld.snippet(f"http://127.0.0.1:{daemon.port}")
    site.pages["/start"] += f'<a id="broken" href="http://site.test:{site.port}/missing">a broken link</a>'
    site.pages["/missing"] = f"<title>Not found</title><p>Sorry</p>{with_options(snippet, 'data-404')}"
    site.pages["/app"] = f"<title>App</title>{snippet}"
    page = context.new_page()
    page.goto(site.url("/start", host="other.test"))
    page.click("#broken")
    wait_for(lambda: daemon.report_json()["sections"]["not_found"])
    page.goto(site.url("/app"))
    page.evaluate("history.pushState({}, '', '/app/no-such-thing'); pixeld('404')")
    wait_for(lambda: len(daemon.report_json()["sections"]["not_found"]) == 2)
    document = daemon.report_json()
    assert document["sections"]["not_found"] == [
        {"value": "/app/no-such-thing", "count": 1, "sources": [{"value": "(direct)", "count": 1}]},
        {"value": "/missing", "count": 1, "sources": [{"value": "other.test", "count": 1}]},
    ]
    assert document["pageviews"] == 3  # the page not found is a page view too
