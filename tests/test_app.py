"""The pixel, end to end: the real daemon on a loopback port, real HTTP, then what the database holds."""

import json
import re
import signal
import threading
from urllib.parse import quote

import pytest

import pixeld
from conftest import CHROME, FIREFOX, IPHONE, stored_pageviews


def test_js_style_page_view_is_stored_normalised(start_daemon):
    daemon = start_daemon()
    answer = daemon.pixel(
        {"path": "/blog/caf%C3%A9", "title": "  Café\tnotes ", "referrer": "https://www.google.com/search?q=secret",
         "resolution": "1920,1080", "host": "www.example.org"},
        {"Accept-Language": "de-AT,de;q=0.9,en;q=0.8", "Referer": "https://example.org/"},
    )
    assert answer.status == 200 and answer.body == pixeld.GIF
    daemon.stop()
    [stored] = stored_pageviews(daemon.db)
    assert {k: v for k, v in stored.items() if k != "time"} == {
        "site": "example.org", "path": "/blog/café", "title": "Café notes", "channel": "search", "source": "Google", "referrer": "google.com/search",
        "campaign": "", "country": "", "browser": "Chrome", "version": "131", "os": "Windows", "device": "desktop", "screen": "1920x1080", "language": "de", "goals": "",
        "campaign_content": "", "campaign_term": "", "hostname": "example.org",
    }


def test_noscript_page_view_takes_the_page_from_the_referer_header(start_daemon):
    daemon = start_daemon()
    daemon.get("/pixel.gif", {"User-Agent": FIREFOX, "Referer": "https://www.example.org/about/?utm_source=x#team"})
    daemon.get("/pixel.gif?path=%2Fcontact&title=Contact", {"User-Agent": IPHONE})  # path and title only
    daemon.stop()
    first, second = stored_pageviews(daemon.db)
    assert (first["site"], first["path"], first["referrer"], first["screen"]) == ("example.org", "/about/", "", "")
    assert (second["site"], second["path"], second["title"], second["device"]) == ("", "/contact", "Contact", "phone")


MALFORMED = [
    "/pixel.gif?path=%ff%fe%fd&title=%E2%82&referrer=%00%00&resolution=-5,x&host=%C0%AF",
    "/pixel.gif?resolution=99999999999999999999,1",
    "/pixel.gif?" + "&".join(f"k{i}=v" for i in range(2000)),
    "/pixel.gif?path=" + "a" * 12000,
    "/pixel.gif?=&&&==&path",
    "/pixel.gif?host=[::1&referrer=http://[::1/&path=http://[x",
    "/pixel.gif?referrer=http%3A%2F%2Fexample.com%3A99999999%2F",
    "/pixel.gif?title=" + quote("\u202e\u2028\ud7ff\uffff", safe=""),
]


@pytest.mark.parametrize("target", MALFORMED)
def test_malformed_requests_still_get_the_gif_and_store_clean_values(start_daemon, target):
    daemon = start_daemon()
    headers = {"User-Agent": CHROME, "Accept-Language": ";;;q=abc,\x01", "Referer": "http://[::1", "X-Forwarded-For": "999.1.1.1, ::zz"}
    answer = daemon.get(target, headers)
    assert answer.status == 200 and answer.body == pixeld.GIF
    output = daemon.stop()
    assert "Traceback" not in output and "could not record" not in output
    [stored] = stored_pageviews(daemon.db)
    assert stored["path"].startswith("/") and len(stored["path"]) <= pixeld.MAX_PATH
    for value in stored.values():
        if isinstance(value, str):
            assert not any(ord(ch) < 32 or 0x7F <= ord(ch) <= 0x9F for ch in value), stored


def test_pixel_response_headers_and_head(start_daemon):
    daemon = start_daemon()
    answer = daemon.pixel({"path": "/"})
    assert answer.headers["content-type"] == "image/gif"
    assert answer.headers["cache-control"] == "no-store"
    assert answer.headers["cross-origin-resource-policy"] == "cross-origin"
    assert answer.headers["content-length"] == "43" and len(answer.body) == 43
    assert "set-cookie" not in answer.headers
    head = daemon.get("/pixel.gif?path=/head", {"User-Agent": CHROME}, method="HEAD")
    assert head.status == 200 and head.body == b"" and head.headers["content-length"] == "43"
    daemon.stop()
    assert [v["path"] for v in stored_pageviews(daemon.db)] == ["/", "/head"]


def test_bots_get_the_gif_but_are_only_counted_as_filtered(start_daemon):
    daemon = start_daemon()
    for ua in ("curl/8.5.0", "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)", ""):
        assert daemon.get("/pixel.gif?path=/&host=example.org", {"User-Agent": ua}).body == pixeld.GIF
    daemon.pixel({"path": "/", "host": "example.org"})
    daemon.stop()
    assert len(stored_pageviews(daemon.db)) == 1
    daemon2 = start_daemon(db=daemon.db)
    report = json.loads(daemon2.report("range=all&format=json").text)
    assert report["pageviews"] == 1 and report["filtered"] == {"total": 3, "bot": 3}
    assert re.search(r"^Filtered +3  \(bots 3\)$", daemon2.report("range=all").text, re.M)


def test_report_over_http_shows_what_was_sent(start_daemon):
    daemon = start_daemon()
    for path, ua, screen, lang in [("/", CHROME, "1920,1080", "en-US"), ("/", IPHONE, "390,844", "fr-FR"), ("/about", FIREFOX, "", "en")]:
        daemon.pixel({"path": path, "host": "example.org", "resolution": screen}, {"User-Agent": ua, "Accept-Language": lang})
    daemon.stop()
    daemon = start_daemon(db=daemon.db)
    text = daemon.report("range=today").text
    assert re.search(r"^Page views +3 ", text, re.M)
    for line in ("/                           ", "Chrome 131", "Safari 17", "Firefox 133", "iOS", "phone", "390x844", "fr"):
        assert line in text, line
    sections = json.loads(daemon.report("range=today&format=json").text)["sections"]
    assert sections["pages"][0] == {"value": "/", "count": 2, "percent": 66.7, "time_on_page": None, "scroll_depth": None}
    assert dict((r["value"], r["count"]) for r in sections["devices"]) == {"desktop": 2, "phone": 1}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_clean_stop_keeps_every_acknowledged_page_view(start_daemon, sig):
    daemon = start_daemon("--rate-limit", "0")  # one client sends them all
    answered = []

    def send(worker):
        for i in range(60):
            if daemon.pixel({"path": f"/w{worker}/{i}", "host": "example.org"}).status == 200:
                answered.append(1)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    output = daemon.stop(sig)
    assert daemon.proc.returncode == 0
    assert len(stored_pageviews(daemon.db)) == len(answered) == 300
    assert "stopped; every page view is saved" in output
