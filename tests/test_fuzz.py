"""Property-based tests: whatever a client sends, the pixel answers the GIF, the report answers 200 or
400 (never 5xx), and every stored value stays inside its normalised domain."""

import json
import re
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pixeld
from conftest import FIREFOX, call, stored_pageviews

KEYS = st.sampled_from(["path", "title", "referrer", "resolution", "host", "bot", "x", "", "path[]", "%"])
ANY_TEXT = st.text(min_size=0, max_size=300)
URLISH = st.one_of(ANY_TEXT, st.builds(lambda s, h, p: f"{s}://{h}/{p}", st.sampled_from(["http", "https", "android-app", ""]), ANY_TEXT, ANY_TEXT))
RAW_BYTES = st.binary(max_size=200).map(lambda b: "".join(f"%{byte:02X}" for byte in b))
VALUES = st.one_of(ANY_TEXT.map(lambda s: quote(s, safe="")), RAW_BYTES, URLISH.map(lambda s: quote(s, safe="")), st.text(alphabet="&=%+;#?", max_size=20))
QUERY = st.lists(st.tuples(KEYS, VALUES), max_size=8).map(lambda pairs: "&".join(f"{k}={v}" for k, v in pairs))
ADDRESSES = st.one_of(st.ip_addresses().map(str), ANY_TEXT, st.just("unknown"), st.just("[::1]:80"))
HEADERS = st.fixed_dictionaries(
    {},
    optional={
        "User-Agent": st.one_of(ANY_TEXT, st.sampled_from([
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
            "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
        ])),
        "Referer": URLISH,
        "Origin": URLISH,
        "X-Forwarded-For": st.lists(ADDRESSES, max_size=4).map(", ".join),
        "Forwarded": st.lists(ADDRESSES, max_size=3).map(lambda xs: ", ".join(f"for={x}" for x in xs)),
        "Accept-Language": st.one_of(ANY_TEXT, st.sampled_from(["de-DE,de;q=0.9", "*", "en;q=abc", "zh-Hant-TW;q=1.0"])),
        "Host": ANY_TEXT,
        "Sec-Purpose": st.sampled_from(["", "prefetch", "prefetch;prerender"]),
    },
)
REMOTE = st.one_of(st.just("127.0.0.1"), st.ip_addresses().map(str), st.just("garbage"))


NOW = 1_795_874_400


def test_pixel_never_fails_and_stores_only_clean_values(tmp_path):
    logged = []
    app = pixeld.App(pixeld.Config(db_path=str(tmp_path / "fuzz.db"), flush_interval=0.05, rate_limit=0), clock=lambda: NOW, log=logged.append)

    @settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
    @given(query=QUERY, headers=HEADERS, remote=REMOTE)
    def pixel(query, headers, remote):
        answer = call(app, "/pixel.gif", query, remote=remote, **headers)
        assert answer.status == 200 and answer.body == pixeld.GIF

    try:
        pixel()
    finally:
        app.close()
    assert logged == []  # no bug reached the log
    views = stored_pageviews(tmp_path / "fuzz.db")
    assert views
    for view in views:
        check_domain(view)


def check_domain(view):
    for key, value in view.items():
        if isinstance(value, str):
            value.encode("utf-8")  # valid UTF-8: no lone surrogates
            assert not re.search(r"[\x00-\x1f\x7f-\x9f]", value), (key, value)
    assert view["path"].startswith("/") and len(view["path"]) <= pixeld.MAX_PATH
    assert len(view["title"]) <= pixeld.MAX_TITLE and len(view["referrer"]) <= pixeld.MAX_REFERRER
    assert view["site"] == "" or (len(view["site"]) <= pixeld.MAX_HOST and pixeld.normalise_host(view["site"]) == view["site"])
    assert re.fullmatch(r"([A-Z]{2})?", view["country"])
    assert re.fullmatch(r"(\d{1,6})?", view["version"])
    assert view["device"] in ("desktop", "phone", "tablet", "other")
    assert view["language"] == "" or re.fullmatch(r"[a-z]{2,3}", view["language"])
    if view["screen"]:
        width, _, height = view["screen"].partition("x")  # a width alone is kept as a width
        assert 0 < int(width) <= pixeld.MAX_SCREEN and 0 < int(height or 1) <= pixeld.MAX_SCREEN


REPORT_KEYS = st.sampled_from(["range", "start", "end", "tz", "site", "format", "limit", "section", "ascii", "path", "referrer", "country", "browser", "os", "device", "language", "x"])
REPORT_VALUES = st.one_of(
    ANY_TEXT, RAW_BYTES,
    st.sampled_from(["7d", "0d", "99999d", "all", "today", "2026-11-01", "2026-13-01", "1793491200", "-5", "2026-11-01T25:00", "Europe/Berlin", "Etc/GMT+14", "../../etc/passwd", "json", "csv", "text", "/blog/*", "*", "0", "1"]),
)


def test_report_answers_200_or_400_for_any_parameters(tmp_path):
    app = pixeld.App(pixeld.Config(db_path=str(tmp_path / "r.db"), flush_interval=0.05), clock=lambda: NOW, log=lambda message: None)
    for i in range(30):
        call(app, "/pixel.gif", f"path=/p{i % 4}&host=example.org&resolution=1920,1080", **{"User-Agent": FIREFOX})

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(pairs=st.lists(st.tuples(REPORT_KEYS, REPORT_VALUES.map(lambda s: quote(s, safe=""))), max_size=6))
    def report(pairs):
        answer = call(app, "/report", "&".join(f"{k}={v}" for k, v in pairs))
        assert answer.status in (200, 400), (answer.status, answer.body[:200])
        if answer.status == 400:
            assert answer.body.count(b"\n") == 1

    try:
        report()
    finally:
        app.close()


def test_the_fuzzers_would_notice_a_bad_value():
    good = {"time": NOW, "site": "example.org", "path": "/", "title": "", "referrer": "", "country": "", "browser": "Chrome",
            "version": "131", "os": "Windows", "device": "desktop", "screen": "1920x1080", "language": "en"}
    check_domain(good)
    for key, bad in [("path", "no-slash"), ("title", "a\x00b"), ("screen", "0x5"), ("country", "de"), ("device", "toaster")]:
        try:
            check_domain({**good, key: bad})
        except AssertionError:
            continue
        raise AssertionError(f"{key}={bad!r} passed the domain check")


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | ANY_TEXT,
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4), max_leaves=12)
FIELD = st.one_of(JSON_VALUES, URLISH, st.sampled_from(["pageview", "engagement", "404", "Outbound Link: Click", "File Download", "event", "identify"]))
PLAUSIBLE = st.dictionaries(st.sampled_from(["n", "u", "d", "r", "w", "h", "p", "i", "sd", "e", "t", "s", "x"]), FIELD, max_size=10)
UMAMI = st.fixed_dictionaries({"type": FIELD}, optional={"payload": st.one_of(FIELD, st.dictionaries(
    st.sampled_from(["website", "hostname", "url", "title", "referrer", "screen", "language", "name", "data", "engaged", "scroll", "id"]), FIELD, max_size=10))})
BODIES = st.one_of(PLAUSIBLE.map(json.dumps), UMAMI.map(json.dumps), st.binary(max_size=400).map(lambda b: b.decode("latin-1")))


def test_other_trackers_endpoints_never_fail_and_store_only_clean_values(tmp_path):
    """Whatever JSON (or not) arrives at /api/event and /api/send, the answer is the tracker's own (202, 200, 400
    or 413), never a 5xx; whatever query reaches /count, the GIF."""
    logged = []
    site_ids = (("5f1c7a1e-8a8b-4a0e-9d2c-3b4d5e6f7a8b", "example.org"),)
    app = pixeld.App(pixeld.Config(db_path=str(tmp_path / "fuzz.db"), flush_interval=0.05, rate_limit=0, site_ids=site_ids), clock=lambda: NOW, log=logged.append)

    @settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
    @given(path=st.sampled_from(["/api/event", "/api/send"]), body=BODIES, content_type=st.sampled_from(["text/plain", "application/json", "", "text/html"]),
           headers=HEADERS, remote=REMOTE, query=QUERY)
    def endpoint(path, body, content_type, headers, remote, query):
        answer = call(app, path, method="POST", remote=remote, body=body.encode("utf-8", "surrogatepass"), content_type=content_type, **headers)
        assert answer.status in (200, 202, 400, 413) and answer.headers["access-control-allow-origin"] == "*"
        goatcounter = call(app, "/count", query.replace("path=", "p=").replace("title=", "t=").replace("referrer=", "r="), remote=remote, **headers)
        assert goatcounter.status == 200 and goatcounter.body == pixeld.GIF

    try:
        endpoint()
    finally:
        app.close()
    assert logged == []
    views = stored_pageviews(tmp_path / "fuzz.db")
    assert views
    for view in views:
        check_domain(view)
