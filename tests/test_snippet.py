"""snippet.html in a real browser: Debian's headless Chromium, driven by Playwright, against the real
daemon, with a test site served under names that do not look like loopback (site.test, other.test)."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import pixeld
from conftest import free_port, stored_pageviews, wait_for

DESKTOP_CHROME = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"


class Site:
    """The test site: a few pages that embed the snippet, served on a loopback port."""

    def __init__(self, pixeld_url):
        snippet = pixeld.snippet(pixeld_url)
        outbound = snippet.replace("<script data-pixeld=", "<script data-outbound data-pixeld=")
        self.port = free_port()
        other = f"http://other.test:{self.port}"
        self.pages = {
            "/start": f'<title>Elsewhere</title><a id="go" href="http://site.test:{self.port}/post">a post</a>',
            "/post": f"<title>A post</title><p>Hello</p>{snippet}",
            "/spa": f'<title>App</title><button id="next" onclick="history.pushState({{}}, \'\', \'/spa/next\'); document.title = \'Next\'">next</button>{snippet}',
            "/events": f'<title>Events</title><button data-pixeld-event="signup">Sign up</button><a id="out" href="{other}/landing">away</a>{outbound}',
            "/landing": "<title>Landing</title>",
        }
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body = site.pages.get(self.path.split("?")[0].split("#")[0], "").encode()
                self.send_response(200 if body else 404)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path, host="site.test"):
        return f"http://{host}:{self.port}{path}"


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
    assert data["sections"]["campaigns"] == [{"value": "newsletter / email / launch", "count": 1, "percent": 100.0}]
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
    assert len(script.encode()) <= 3712  # with reading time, scroll depth, properties, downloads, forms and 404s; the README states the size
    assert "cookie" not in script.lower()
