"""Other tools' trackers, unchanged, counted by pixeld: GoatCounter's /count, Plausible's /api/event and Umami's
/api/send over real HTTP to the real daemon, their official clients (Plausible's npm tracker in Chromium, Umami's
node client), pixeld's tracker at their script addresses, CORS, bad input, the dry run and doctor."""

import http.client
import json
import subprocess
import time
from urllib.parse import urlencode

import pytest

import pixeld
from conftest import CHROME, FIREFOX, Response, WebSite, require_tool, run_pixeld, stored_pageviews, wait_for
from test_privacy import database_files

SITE_ID = "5f1c7a1e-8a8b-4a0e-9d2c-3b4d5e6f7a8b"
DESKTOP_CHROME = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"


def post(daemon, path: str, body, content_type: str = "text/plain", headers=None, query: str = "") -> Response:
    """One POST as their scripts send it: a JSON body (or raw bytes), from Chrome on the site's page."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = http.client.HTTPConnection(daemon.host, daemon.port, timeout=10)
    try:
        sent = {"User-Agent": CHROME, "Content-Type": content_type, "Origin": "https://example.org", **(headers or {})}
        conn.request("POST", path + query, body=data, headers={k: v for k, v in sent.items() if v is not None})
        answer = conn.getresponse()
        return Response(answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read())
    finally:
        conn.close()


def events(daemon, query: str = "range=today") -> dict:
    return {row["value"]: row["count"] for row in daemon.report_json(query)["sections"]["events"]}


def committed(daemon, views: int) -> None:
    wait_for(lambda: daemon.report_json()["pageviews"] == views)


# ---- GoatCounter --------------------------------------------------------------------------------------------


def test_goatcounter_count_takes_what_count_js_sends(start_daemon):
    daemon = start_daemon()
    page = {"Referer": "https://example.org/", "User-Agent": CHROME}
    query = {"p": "/blog/post?x=1", "t": "A post", "r": "https://news.ycombinator.com/item?id=1", "s": "1280,800,2", "q": "?utm_source=Mastodon&secret=9",
             "rnd": "kq8z"}
    answer = daemon.get("/count?" + urlencode(query), page)
    assert (answer.status, answer.headers["content-type"], answer.body) == (200, "image/gif", pixeld.GIF)
    beacon = daemon.get("/count?" + urlencode({"p": "/about", "t": "About", "r": "", "s": "390,844,3", "q": "", "rnd": "a1"}), page, method="POST")
    assert (beacon.status, beacon.body) == (200, pixeld.GIF)  # count.js uses sendBeacon: a POST with the query and no body
    assert daemon.get("/count?" + urlencode({"p": "newsletter-signup", "e": "true", "rnd": "z"}), page).status == 200
    assert daemon.get("/count?" + urlencode({"p": "/bot", "b": "150", "rnd": "z"}), page).status == 200  # count.js's bot flag
    committed(daemon, 2)
    assert events(daemon) == {"newsletter-signup": 1}
    report = daemon.report_json()
    assert report["filtered"] == {"total": 1, "headless": 1}
    daemon.stop()
    first, second = stored_pageviews(daemon.db)
    assert (first["site"], first["path"], first["title"], first["screen"]) == ("example.org", "/blog/post", "A post", "1280x800")
    assert (first["referrer"], first["source"]) == ("mastodon (campaign)", "mastodon")  # q, the page's query, brings its campaign
    assert (second["path"], second["title"], second["screen"]) == ("/about", "About", "390x844")
    assert second["referrer"] == first["referrer"]  # a visit's source belongs to all its page views


# ---- Plausible ----------------------------------------------------------------------------------------------


def test_plausible_api_event_page_views_events_not_found_and_engagement(start_daemon):
    daemon = start_daemon()
    page = "https://example.org/guide?utm_source=newsletter&utm_medium=email&token=secret"
    answer = post(daemon, "/api/event", {"n": "pageview", "u": page, "d": "example.org", "r": "https://duckduckgo.com/", "w": 1280})
    assert (answer.status, answer.body, answer.headers["access-control-allow-origin"]) == (202, b"ok", "*")
    assert post(daemon, "/api/event", {"n": "pageview", "u": "https://example.org/app#/settings", "d": "example.org", "r": None, "h": 1}).status == 202
    assert post(daemon, "/api/event", {"n": "Signup", "u": "https://example.org/guide", "d": "example.org", "p": {"plan": "pro"}}).status == 202
    assert post(daemon, "/api/event", {"n": "Outbound Link: Click", "u": "https://example.org/guide", "d": "example.org",
                                       "p": {"url": "https://github.com/owner/repo?tab=secret"}}).status == 202
    assert post(daemon, "/api/event", {"n": "engagement", "u": page, "d": "example.org", "sd": 80, "e": 42_000}).status == 202
    committed(daemon, 2)
    assert events(daemon) == {"Signup": 1, "outbound:github.com": 1}
    properties = daemon.report_json("range=today&event=Signup")["sections"]["properties"]
    assert [(row["property"], row["value"], row["count"]) for row in properties] == [("plan", "pro", 1)]  # props are event properties
    wait_for(lambda: daemon.report_json()["time_on_page"] == 42.0)
    assert daemon.report_json()["scroll_depth"] == 80.0
    daemon.stop()
    first, second = stored_pageviews(daemon.db)
    assert (first["site"], first["path"], first["referrer"], first["source"]) == ("example.org", "/guide", "newsletter (campaign)", "newsletter")
    assert first["campaign"].startswith("newsletter / email")
    assert second["path"] == "/app#/settings"  # hash-based routing (h=1) keeps the route


def test_plausible_props_and_not_found_become_pixel_parameters():
    """The props map onto the pixel's prop_NAME parameters (the event properties of the goals issue); a link
    event's url (a whole address, with its query) becomes the event's name and is never a property."""
    def params(body):
        return pixeld.foreign_hit("plausible", {"CONTENT_TYPE": "text/plain"}, json.dumps(body).encode(), 0, {}).hit.params

    signup = params({"n": "Signup", "u": "https://example.org/pricing", "d": "example.org", "p": {"plan": "pro", "seats": 3, "trial": True, "deep": {"x": 1}}})
    assert (signup["event"], signup["path"], signup["host"]) == ("Signup", "/pricing", "example.org")
    assert {key: value for key, value in signup.items() if key.startswith("prop_")} == {"prop_plan": "pro", "prop_seats": "3", "prop_trial": "true"}
    legacy = params({"n": "Play", "u": "https://example.org/", "d": "example.org", "p": json.dumps({"track": "intro"})})
    assert legacy["prop_track"] == "intro"  # older scripts send the props as a JSON string
    many = params({"n": "Many", "u": "https://example.org/", "d": "example.org", "p": {f"k{i}": i for i in range(40)}})
    assert sum(key.startswith("prop_") for key in many) == pixeld.MAX_FOREIGN_PROPS
    missing = params({"n": "404", "u": "https://example.org/old-post", "d": "example.org", "p": {"path": "/old-post"}})
    assert (missing["event"], missing["path"]) == ("404", "/old-post") and "prop_path" not in missing
    route = params({"n": "pageview", "u": "https://example.org/app#/search%3Fq%3Dsecret?page=2", "d": "example.org", "h": 1})
    assert pixeld.normalise_path(route["path"]) == "/app#/search"  # a hash route, never its query
    assert pixeld.normalise_path(params({"n": "pageview", "u": "https://example.org/app#/x", "d": "example.org"})["path"]) == "/app"
    download = params({"n": "File Download", "u": "https://example.org/", "d": "example.org", "p": {"url": "https://example.org/files/book.pdf?sig=1"}})
    assert download["event"] == "download:/files/book.pdf" and "prop_url" not in download


# ---- Umami --------------------------------------------------------------------------------------------------


def test_umami_api_send_with_site_ids_and_the_hostname_fallback(start_daemon):
    daemon = start_daemon("--site-id", f"{SITE_ID}=example.org", "--site", "example.org", "--site", "blog.example.net")
    payload = {"website": SITE_ID, "hostname": "www.example.org", "url": "/docs?utm_source=Forum&session=secret", "title": "Docs",
               "referrer": "https://www.reddit.com/r/selfhosted/", "screen": "1440x900", "language": "de-DE"}
    answer = post(daemon, "/api/send", {"type": "event", "payload": payload}, "application/json")
    assert (answer.status, json.loads(answer.body), answer.headers["access-control-allow-origin"]) == (200, {}, "*")
    unknown = {"website": "00000000-0000-4000-8000-000000000000", "hostname": "blog.example.net", "url": "/hello", "screen": "800x600"}
    assert post(daemon, "/api/send", {"type": "event", "payload": unknown}).status == 200
    foreign = {**unknown, "hostname": "elsewhere.example.com"}
    assert post(daemon, "/api/send", {"type": "event", "payload": foreign}).status == 200  # not one of --site: filtered
    signup = {"website": SITE_ID, "hostname": "example.org", "url": "/docs", "name": "signup", "data": {"plan": "team"}}
    assert post(daemon, "/api/send", {"type": "event", "payload": signup}).status == 200
    identify = post(daemon, "/api/send", {"type": "identify", "payload": {"website": SITE_ID, "data": {"email": "reader@example.com"}}})
    assert identify.status == 200
    committed(daemon, 2)
    assert events(daemon) == {"signup": 1}
    properties = daemon.report_json("range=today&event=signup")["sections"]["properties"]
    assert [(row["property"], row["value"]) for row in properties] == [("plan", "team")]  # data is event properties
    assert daemon.report_json()["filtered"] == {"total": 1, "foreign": 1}
    daemon.stop()
    first, second = stored_pageviews(daemon.db)
    assert (first["site"], first["path"], first["title"], first["screen"], first["language"]) == ("example.org", "/docs", "Docs", "1440x900", "de")
    assert (first["referrer"], first["source"]) == ("forum (campaign)", "forum")
    assert (second["site"], second["path"]) == ("blog.example.net", "/hello")


def test_site_ids_come_from_the_environment_and_bad_ones_stop_the_start(start_daemon, tmp_path):
    daemon = start_daemon(env={"PIXELD_SITE_IDS": f"{SITE_ID.upper()}=Example.org, 11111111-2222-4333-8444-555555555555=other.example"})
    post(daemon, "/api/send", {"type": "event", "payload": {"website": SITE_ID, "hostname": "ignored.example", "url": "/"}})
    committed(daemon, 1)
    daemon.stop()
    assert [view["site"] for view in stored_pageviews(daemon.db)] == ["example.org"]
    code, _, err = run_pixeld("serve", "--listen", "127.0.0.1:0", "--db", str(tmp_path / "x.db"), "--site-id", "not-a-uuid=example.org")
    assert code == 2 and err.count("\n") == 1 and "UUID=example.org" in err


# ---- CORS, methods and bad input ----------------------------------------------------------------------------


def test_cors_preflight_for_their_paths_and_nothing_more(start_daemon):
    daemon = start_daemon()
    for path in ("/api/event", "/api/send", "/count"):
        answer = daemon.get(path, {"Origin": "https://example.org", "Access-Control-Request-Method": "POST",
                                   "Access-Control-Request-Headers": "content-type"}, method="OPTIONS")
        assert answer.status == 204 and answer.body == b""
        assert answer.headers["access-control-allow-origin"] == "*" and "POST" in answer.headers["access-control-allow-methods"]
        assert answer.headers["access-control-allow-headers"].lower() == "content-type"
    for path in ("/report", "/pixel.gif", "/export", "/metrics"):
        answer = daemon.get(path, {"Origin": "https://example.org"}, method="OPTIONS")
        assert answer.status == 405 and "access-control-allow-origin" not in answer.headers
    assert "access-control-allow-origin" not in daemon.report().headers
    answer = daemon.get("/api/event")
    assert answer.status == 405 and answer.headers["allow"] == "POST"


@pytest.mark.parametrize("path, status_of", [("/api/event", {"too large": 413}), ("/api/send", {"too large": 413})])
def test_bad_input_is_refused_counted_and_writes_nothing(start_daemon, path, status_of):
    daemon = start_daemon()
    tracker = pixeld.TRACKER_PATHS[path]
    good = {"n": "pageview", "u": "https://example.org/", "d": "example.org"} if tracker == "plausible" else {
        "type": "event", "payload": {"website": SITE_ID, "hostname": "example.org", "url": "/"}}
    cases = [
        ("malformed json", b'{"n": "pageview", "u": ', "text/plain"),
        ("malformed json", b"\xff\xfe not utf-8", "application/json"),
        ("malformed json", b'["a list"]', "application/json"),
        ("malformed json", b"[" * 4000 + b"]" * 4000, "text/plain"),  # deeper than json nests: still a clean refusal
        ("content type", json.dumps(good).encode(), "application/x-www-form-urlencoded"),
        ("content type", json.dumps(good).encode(), "multipart/form-data; boundary=x"),
        ("too large", json.dumps({**good, "padding": "x" * 9000}).encode(), "text/plain"),
        ("too large", b"x" * 200_000, "application/json"),
        ("missing fields", b"{}", "text/plain"),
        ("missing fields", json.dumps({"n": "pageview", "u": "not a url", "d": "example.org", "type": "event", "payload": "nope"}).encode(), "text/plain"),
    ]
    for reason, body, content_type in cases:
        answer = post(daemon, path, body, content_type)
        assert answer.status == status_of.get(reason, 400), (reason, answer.status, answer.body)
        assert answer.headers["content-type"] == "application/json" and answer.headers["access-control-allow-origin"] == "*"
        assert reason in answer.text
    assert daemon.get("/healthz").status == 200
    metrics = daemon.get("/metrics").text
    for reason in {case[0] for case in cases}:
        expected = sum(case[0] == reason for case in cases)
        assert f'pixeld_rejected_requests_total{{tracker="{tracker}",reason="{reason}"}} {expected}' in metrics
    assert post(daemon, path, good).status in (200, 202)  # the connection cap, the writer and the parser are fine
    committed(daemon, 1)
    daemon.stop()
    assert len(stored_pageviews(daemon.db)) == 1


def test_goatcounter_answers_its_gif_whatever_comes(start_daemon):
    daemon = start_daemon()
    for query in ("", "p=", "e=true", "p=%ff%fe&t=%00&s=abc,def&q=%%%", "p=/x&s=99999999,1,1&b=abc"):
        answer = daemon.get("/count?" + query, {"User-Agent": CHROME, "Referer": "https://example.org/"})
        assert (answer.status, answer.body) == (200, pixeld.GIF), query
    assert post(daemon, "/count", b"x" * 50_000, "text/plain").body == pixeld.GIF
    wait_for(lambda: 'outcome="malformed"} 1' in daemon.get("/metrics").text)  # e=true without a name


# ---- Privacy ------------------------------------------------------------------------------------------------

CANARY_ADDRESS = "198.51.100.77"
CANARY_UA = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36 CanaryShell/4.4.4-zzq"
IDENTIFIERS = ["rnd-canary-81f3", "cookie-canary-2b9c", "cache-canary-77aa", "session-canary-0d0d", "visitor@canary.example", "sessid-canary-9911"]


def test_none_of_their_identifiers_reaches_the_disk(start_daemon):
    daemon = start_daemon("--site-id", f"{SITE_ID}=example.org")
    headers = {"User-Agent": CANARY_UA, "X-Forwarded-For": CANARY_ADDRESS, "Cookie": f"_umami={IDENTIFIERS[1]}; plausible_ignore=false"}
    daemon.get(f"/count?p=/a%3Fsid%3D{IDENTIFIERS[5]}&t=A&rnd={IDENTIFIERS[0]}&q=%3Fsid%3D{IDENTIFIERS[5]}", {**headers, "Referer": "https://example.org/"})
    post(daemon, "/api/event", {"n": "pageview", "u": f"https://example.org/b?sid={IDENTIFIERS[5]}", "d": "example.org", "i": True, "v": 36,
                                "session_id": IDENTIFIERS[3]}, headers=headers)
    post(daemon, "/api/send", {"type": "event", "payload": {"website": SITE_ID, "hostname": "example.org", "url": f"/c?sid={IDENTIFIERS[5]}",
                                                            "id": IDENTIFIERS[3], "tag": IDENTIFIERS[3], "sessionId": IDENTIFIERS[3]}},
         "application/json", {**headers, "x-umami-cache": IDENTIFIERS[2]})
    post(daemon, "/api/send", {"type": "identify", "payload": {"website": SITE_ID, "data": {"email": IDENTIFIERS[4]}}}, headers=headers)
    committed(daemon, 3)
    time.sleep(1.2)  # one more flush interval: the WAL holds the commit while the daemon runs
    secrets = [CANARY_ADDRESS, "CanaryShell", *IDENTIFIERS]
    for path in database_files(daemon.db):
        assert [s for s in secrets if s.encode() in path.read_bytes()] == [], path.name
    output = daemon.stop()
    for path in database_files(daemon.db):
        assert [s for s in secrets if s.encode() in path.read_bytes()] == [], path.name
    assert [s for s in secrets if s in output] == []
    assert sorted(view["path"] for view in stored_pageviews(daemon.db)) == ["/a", "/b", "/c"]


# ---- The dry run and doctor ---------------------------------------------------------------------------------


def test_dry_run_says_why_their_hits_count_or_not(start_daemon):
    daemon = start_daemon("--site", "example.org")
    counted = post(daemon, "/api/event", {"n": "Signup", "u": "https://example.org/p", "d": "example.org"}, query="?dry_run=1")
    assert counted.status == 200 and counted.text.startswith("counted as the event 'Signup' on example.org/p")
    foreign = post(daemon, "/api/event", {"n": "pageview", "u": "https://other.example/", "d": "other.example"}, query="?dry_run=1")
    assert foreign.text.startswith("filtered: foreign (the site is not one of --site)")
    bot = post(daemon, "/api/send", {"type": "event", "payload": {"website": SITE_ID, "hostname": "example.org", "url": "/"}},
               headers={"User-Agent": "curl/8.5.0"}, query="?dry_run=1")
    assert bot.text.startswith("filtered: bot")
    refused = post(daemon, "/api/send", b"{", query="?dry_run=1")
    assert refused.text.startswith("refused: malformed json")
    identify = post(daemon, "/api/send", {"type": "identify", "payload": {}}, query="?dry_run=1")
    assert identify.text.startswith("ignored: an Umami identify call")
    count = daemon.get("/count?p=/x&b=1&dry_run=1", {"User-Agent": CHROME, "Referer": "https://example.org/"})
    assert count.text.startswith("filtered: headless")
    proxied = post(daemon, "/api/event", {"n": "pageview", "u": "https://example.org/p", "d": "example.org"}, headers={"X-Forwarded-For": "203.0.113.9"},
                   query="?dry_run=1")
    assert proxied.status == 202  # not allowed to read the report: an ordinary hit, recorded
    committed(daemon, 1)


def test_doctor_checks_their_endpoints_on_a_running_daemon(start_daemon):
    daemon = start_daemon()
    code, out, _ = run_pixeld("doctor", "--db", str(daemon.db), "--url", f"http://127.0.0.1:{daemon.port}")
    assert code == 0, out
    line = next(line for line in out.splitlines() if "other trackers" in line)
    assert line.startswith("ok") and "/count" in line and "/api/event" in line and "/api/send" in line and "/js/script.js" in line


# ---- pixeld's tracker at their script addresses -------------------------------------------------------------


def test_their_script_addresses_serve_pixelds_tracker(start_daemon):
    daemon = start_daemon()
    for path in ("/js/script.js", "/js/plausible.js", "/js/script.outbound-links.js", "/js/script.hash.file-downloads.tagged-events.js",
                 "/js/script.manual.local.js", "/script.js", "/umami.js"):
        answer = daemon.get(path)
        assert answer.status == 200 and answer.body == pixeld.TRACKER_JS.encode(), path
        assert answer.headers["content-type"].startswith("application/javascript") and answer.headers["x-content-type-options"] == "nosniff"
    assert daemon.get("/js/script.js", method="HEAD").body == b""
    for path in ("/js/other.js", "/js/script.js.map", "/js/script..js", "/js/script.JS", "/js/../script.js"):
        assert daemon.get(path).status == 404, path
    assert daemon.get("/js/script.js", method="POST").status == 405


# ---- In a real browser: pixeld's tracker and Plausible's official one ----------------------------------------


@pytest.fixture
def context(browser):
    made = browser.new_context(user_agent=DESKTOP_CHROME, screen={"width": 1234, "height": 987}, viewport={"width": 1000, "height": 600})
    made.add_init_script("Object.defineProperty(navigator, 'webdriver', {get: () => false})")  # the trackers refuse automated browsers
    yield made
    made.close()


LONG_PAGE = '<div style="height: 3000px">long</div>'


def test_a_plausible_tag_kept_as_it_is_is_counted_by_pixelds_tracker(start_daemon, context):
    daemon = start_daemon("--rate-limit", "0")
    stats = f"http://127.0.0.1:{daemon.port}"
    tag = f'<script>window.plausible = window.plausible || function () {{ (window.plausible.q = window.plausible.q || []).push(arguments) }};' \
          f'plausible("Queued", {{props: {{early: "yes"}}}});</script>' \
          f'<script defer data-domain="site.test" src="{stats}/js/script.outbound-links.tagged-events.js"></script>'
    site = WebSite({
        "/start": '<title>Elsewhere</title><a id="go" href="http://site.test:{port}/post">a post</a>',
        "/post": '<title>A post</title><a id="out" target="_blank" href="http://other.test:{port}/landing">away</a>'
                 '<button id="tagged" class="big plausible-event-name=Newsletter+Signup plausible-event-plan=pro">Join</button>'
                 '<button id="api" onclick="plausible(\'Download\', {props: {format: \'pdf\'}})">Get</button>' + LONG_PAGE + tag,
        "/landing": "<title>Landing</title>",
    })
    try:
        page = context.new_page()
        page.goto(site.url("/start", host="other.test"))
        with page.expect_request(lambda request: "/api/event" in request.url):
            page.click("#go")
        committed(daemon, 1)
        page.click("#tagged")
        page.click("#api")
        page.mouse.wheel(0, 2000)
        wait_for(lambda: events(daemon) == {"Queued": 1, "Newsletter Signup": 1, "Download": 1})
        page.click("#out")  # an outbound link (to a new tab)
        wait_for(lambda: events(daemon).get("outbound:other.test") == 1)
        page.close(run_before_unload=True)  # leaving the page sends its reading time and scroll depth
        wait_for(lambda: (daemon.report_json()["scroll_depth"] or 0) > 50 and (daemon.report_json()["time_on_page"] or 0) > 0)
    finally:
        site.server.shutdown()
    daemon.stop()
    [view] = stored_pageviews(daemon.db)
    assert (view["site"], view["path"], view["title"], view["referrer"], view["screen"]) == ("site.test", "/post", "A post", "other.test", "1234x987")


def test_an_umami_tag_kept_as_it_is_is_counted_by_pixelds_tracker(start_daemon, context):
    daemon = start_daemon("--rate-limit", "0", "--site-id", f"{SITE_ID}=site.test")
    stats = f"http://127.0.0.1:{daemon.port}"
    site = WebSite({
        "/app": '<title>App</title><button id="next" onclick="history.pushState({}, \'\', \'/app/next?utm_source=x\')">next</button>'
                '<button id="tagged" data-umami-event="Signup" data-umami-event-plan="team">Join</button>'
                '<button id="api" onclick="umami.track(\'Export\', {kind: \'csv\'})">Export</button>' + LONG_PAGE +
                f'<script defer src="{stats}/script.js" data-website-id="{SITE_ID}"></script>',
        "/untracked": f'<title>No</title><script defer src="{stats}/script.js" data-website-id="{SITE_ID}" data-domains="elsewhere.example"></script>',
        "/manual": f'<title>Manual</title><script defer src="{stats}/script.js" data-website-id="{SITE_ID}" data-auto-track="false"></script>',
    })
    try:
        page = context.new_page()
        page.goto(site.url("/untracked"))  # data-domains names other hosts: nothing is sent
        page.goto(site.url("/manual"))  # data-auto-track="false": only umami.track() counts
        page.evaluate("umami.track()")
        committed(daemon, 1)
        page.goto(site.url("/app"))
        committed(daemon, 2)
        page.mouse.wheel(0, 1500)
        page.click("#next")  # an SPA navigation: the page left reports its reading time and scroll depth
        committed(daemon, 3)
        wait_for(lambda: (daemon.report_json()["scroll_depth"] or 0) > 50 and (daemon.report_json()["time_on_page"] or 0) > 0)
        page.click("#tagged")
        page.click("#api")
        wait_for(lambda: events(daemon) == {"Signup": 1, "Export": 1})
    finally:
        site.server.shutdown()
    daemon.stop()
    views = stored_pageviews(daemon.db)
    assert [(view["site"], view["path"], view["title"]) for view in views] == [
        ("site.test", "/manual", "Manual"), ("site.test", "/app", "App"), ("site.test", "/app/next", "App")]
    assert {view["screen"] for view in views} == {"1234x987"} and {view["language"] for view in views} == {"en"}


def test_plausibles_official_npm_tracker_in_chromium(start_daemon, context, node_clients):
    daemon = start_daemon("--rate-limit", "0")
    endpoint = f"http://127.0.0.1:{daemon.port}/api/event"
    module = (f'<script type="module">import {{ init, track }} from "/vendor/@plausible-analytics/tracker/plausible.js";'
              f'init({{ domain: "site.test", endpoint: "{endpoint}", outboundLinks: true }});'
              f'window.signup = () => track("Signup", {{ props: {{ plan: "pro" }} }});</script>')
    site = WebSite({
        "/start": '<title>Elsewhere</title><a id="go" href="http://site.test:{port}/app">the app</a>',
        "/app": '<title>App</title><button id="next" onclick="history.pushState({}, \'\', \'/app/pricing\')">next</button>'
                '<button id="signup" onclick="signup()">Sign up</button><a id="out" href="http://other.test:{port}/landing">away</a>'
                + LONG_PAGE + module,
        "/landing": "<title>Landing</title>",
    }, modules=node_clients)
    try:
        page = context.new_page()
        page.goto(site.url("/start", host="other.test"))
        with page.expect_response(lambda response: "/api/event" in response.url) as answered:
            page.click("#go")
        assert answered.value.status == 202  # the answer its fetch expects, readable across origins
        committed(daemon, 1)
        page.mouse.wheel(0, 1500)
        page.click("#next")  # an SPA navigation; the page left sends its engagement event (its engaged time counts only with focus)
        committed(daemon, 2)
        wait_for(lambda: (daemon.report_json()["scroll_depth"] or 0) > 50)
        page.click("#signup")
        wait_for(lambda: events(daemon).get("Signup") == 1)
        page.click("#out")
        wait_for(lambda: events(daemon).get("outbound:other.test") == 1)
    finally:
        site.server.shutdown()
    daemon.stop()
    views = stored_pageviews(daemon.db)
    assert [(view["site"], view["path"], view["referrer"]) for view in views] == [
        ("site.test", "/app", "other.test"), ("site.test", "/app/pricing", "other.test")]
    assert {view["browser"] for view in views} == {"Chrome"}


# ---- Umami's node client ------------------------------------------------------------------------------------


def test_umamis_node_client_posts_to_a_real_daemon(start_daemon, node_clients, tmp_path):
    node = require_tool("node", "nodejs", package="nodejs")
    daemon = start_daemon("--site-id", f"{SITE_ID}=example.org")
    script = tmp_path / "client.js"
    script.write_text(f"""
const umami = require({json.dumps(str(node_clients / "@umami/node"))}).default;
umami.init({{ websiteId: {json.dumps(SITE_ID)}, hostUrl: {json.dumps(f"http://127.0.0.1:{daemon.port}")}, userAgent: {json.dumps(FIREFOX)} }});
(async () => {{
  const answers = [];
  for (const call of [
    () => umami.track({{ url: "/from-node?utm_source=Newsletter", title: "Node <b>page</b>", hostname: "example.org",
                         referrer: "https://lobste.rs/", screen: "1440x900", language: "fr-FR" }}),
    () => umami.track("signup", {{ plan: "pro" }}),
    () => umami.identify({{ email: "reader@example.com" }}),
  ]) {{
    const answer = await call();
    answers.push([answer.status, await answer.json()]);
  }}
  console.log(JSON.stringify(answers));
}})();
""")
    done = subprocess.run([node, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [[200, {}], [200, {}], [200, {}]]
    committed(daemon, 1)
    assert events(daemon) == {"signup": 1}
    daemon.stop()
    [view] = stored_pageviews(daemon.db)
    assert (view["site"], view["path"], view["title"], view["screen"], view["language"], view["browser"]) == (
        "example.org", "/from-node", "Node <b>page</b>", "1440x900", "fr", "Firefox")
    assert view["source"] == "newsletter"


def test_markup_in_every_field_they_send_is_escaped_in_the_report(start_daemon):
    daemon = start_daemon("--site-id", f"{SITE_ID}=example.org")
    evil = "<script>alert(1)</script>"
    post(daemon, "/api/event", {"n": "pageview", "u": f"https://example.org/{evil}", "d": "example.org", "r": f"https://evil.example/{evil}"})
    post(daemon, "/api/event", {"n": evil, "u": "https://example.org/", "d": "example.org", "p": {evil: evil}})
    umami = {"website": SITE_ID, "url": f"/u{evil}", "title": evil, "referrer": f"https://x.example/{evil}", "screen": evil, "language": evil}
    post(daemon, "/api/send", {"type": "event", "payload": umami})
    post(daemon, "/api/send", {"type": "event", "payload": {**umami, "name": f"u{evil}", "data": {"k": evil}}})
    daemon.get(f"/count?p=/g{evil}&t={evil}&r=https://y.example/{evil}&s={evil}&q=?utm_source={evil}", {"User-Agent": CHROME, "Referer": "https://example.org/"})
    committed(daemon, 3)
    page = daemon.report("range=today&format=html").text
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert {f"/{evil}", f"/u{evil}", f"/g{evil}"} <= {row["value"] for row in daemon.report_json()["sections"]["pages"]}
    assert set(events(daemon)) == {evil, f"u{evil}"}


def test_umamis_do_not_track_attribute_is_honoured(start_daemon, browser):
    daemon = start_daemon("--rate-limit", "0", "--site-id", f"{SITE_ID}=site.test")
    stats = f"http://127.0.0.1:{daemon.port}"
    site = WebSite({
        "/respects": f'<title>DNT</title><script defer src="{stats}/script.js" data-website-id="{SITE_ID}" data-do-not-track="true"></script>',
        "/ignores": f'<title>Plain</title><script defer src="{stats}/script.js" data-website-id="{SITE_ID}"></script>',
    })
    context = browser.new_context(user_agent=DESKTOP_CHROME)
    context.add_init_script("Object.defineProperty(navigator, 'webdriver', {get: () => false});"
                            "Object.defineProperty(navigator, 'doNotTrack', {get: () => '1'})")
    try:
        page = context.new_page()
        page.goto(site.url("/respects"))
        page.goto(site.url("/ignores"))
        committed(daemon, 1)
        time.sleep(1.2)  # one more flush: the first page's hit, had it been sent, would be counted by now
    finally:
        context.close()
        site.server.shutdown()
    daemon.stop()
    assert [view["path"] for view in stored_pageviews(daemon.db)] == ["/ignores"]


def test_plausibles_hash_and_file_download_variants(start_daemon, context):
    daemon = start_daemon("--rate-limit", "0")
    stats = f"http://127.0.0.1:{daemon.port}"
    site = WebSite({
        "/app": '<title>App</title><a id="settings" href="#/settings">settings</a><a id="pdf" href="/files/book.pdf?sig=secret">the book</a>'
                f'<script defer data-domain="site.test" src="{stats}/js/script.hash.file-downloads.js"></script>',
        "/files/book.pdf": "pdf",
    })
    try:
        page = context.new_page()
        page.goto(site.url("/app"))
        committed(daemon, 1)
        page.click("#settings")  # a hash route is a page of its own
        committed(daemon, 2)
        with page.expect_request(lambda request: "/api/event" in request.url and "File Download" in (request.post_data or "")):
            page.click("#pdf")
        wait_for(lambda: events(daemon) == {"download:/files/book.pdf": 1})
    finally:
        site.server.shutdown()
    daemon.stop()
    assert [view["path"] for view in stored_pageviews(daemon.db)] == ["/app", "/app#/settings"]
