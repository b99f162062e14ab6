"""Filtering you can see: every kind of hit that is not a page view still gets the GIF, is not
stored as a page view, and shows up in the report's Filtered line."""

import json
import re

import pixeld
from conftest import CHROME, stored_pageviews

HEADLESS = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/131.0.0.0 Safari/537.36"


def test_every_filter_is_tallied_by_reason(start_daemon, tmp_path):
    spam_list = tmp_path / "spam.txt"
    spam_list.write_text("# my own list\nspammy.example\n\n")
    daemon = start_daemon(
        "--site", "example.org", "--site", "www.shop.example", "--spam-list", str(spam_list),
        "--ignore-ip", "192.0.2.0/24", "--rate-limit", "3",
    )
    sends = [
        # (params, headers, reason or None for a page view)
        ({"path": "/", "host": "example.org"}, {}, None),
        ({"path": "/", "host": "blog.example.org"}, {}, None),  # a subdomain of a configured site
        ({"path": "/", "host": "shop.example"}, {"User-Agent": CHROME.replace("131", "130")}, None),  # www. folded
        ({"path": "/", "host": "evil.example"}, {}, "foreign"),
        ({"path": "/"}, {}, "foreign"),  # no host at all
        ({"path": "/", "host": "example.org"}, {"User-Agent": "curl/8.5.0"}, "bot"),
        ({"path": "/", "host": "example.org"}, {"User-Agent": HEADLESS}, "headless"),
        ({"path": "/", "host": "example.org", "bot": "1"}, {}, "headless"),  # navigator.webdriver
        ({"path": "/", "host": "example.org"}, {"Sec-Purpose": "prefetch;prerender"}, "prefetch"),
        ({"path": "/", "host": "example.org"}, {"Purpose": "prefetch"}, "prefetch"),
        ({"path": "/", "host": "example.org"}, {"X-Moz": "prefetch"}, "prefetch"),
        ({"path": "/", "host": "example.org"}, {"X-Purpose": "preview"}, "prefetch"),
        ({"path": "/", "host": "example.org", "referrer": "https://semalt.com/"}, {}, "spam"),
        ({"path": "/", "host": "example.org", "referrer": "http://www.spammy.example/x"}, {}, "spam"),
        ({"path": "/", "host": "example.org", "referrer": "https://sub.darodar.com/"}, {}, "spam"),
        ({"path": "/", "host": "example.org"}, {"X-Forwarded-For": "192.0.2.44"}, "ignored"),
        ({"path": "/r1", "host": "example.org"}, {"X-Forwarded-For": "198.51.100.9"}, None),
        ({"path": "/r2", "host": "example.org"}, {"X-Forwarded-For": "198.51.100.9"}, None),
        ({"path": "/r3", "host": "example.org"}, {"X-Forwarded-For": "198.51.100.9"}, None),
        ({"path": "/r4", "host": "example.org"}, {"X-Forwarded-For": "198.51.100.9"}, "rate-limited"),
    ]
    for params, headers, _ in sends:
        answer = daemon.pixel(params, headers)
        assert answer.status == 200 and answer.body == pixeld.GIF
    daemon.stop()

    stored = stored_pageviews(daemon.db)
    assert [(v["hostname"], v["path"]) for v in stored] == [(p["host"], p["path"]) for p, _, reason in sends if reason is None]
    assert [v["site"] for v in stored][:3] == ["example.org", "example.org", "shop.example"]  # a subdomain counts under its configured site
    expected = {}
    for _, _, reason in sends:
        if reason:
            expected[reason] = expected.get(reason, 0) + 1

    daemon = start_daemon(db=daemon.db)
    data = json.loads(daemon.report("range=today&format=json").text)
    assert data["filtered"] == {"total": sum(expected.values()), **expected}
    text = daemon.report("range=today").text
    assert re.search(
        r"^Filtered +14  \(bots 1, headless 2, prefetch 4, spam 3, foreign site 2, ignored 1, rate-limited 1\)$", text, re.M
    ), text


def test_report_for_one_site_says_so_and_counts_only_it(start_daemon):
    daemon = start_daemon()
    daemon.pixel({"path": "/", "host": "example.org"})
    daemon.pixel({"path": "/x", "host": "other.net"}, {"User-Agent": CHROME.replace("131", "129")})
    daemon.get("/pixel.gif?path=/&host=other.net", {"User-Agent": "curl/8"})
    daemon.stop()
    daemon = start_daemon(db=daemon.db)
    text = daemon.report("range=today&site=www.other.net").text
    assert text.startswith("pixeld report · other.net\n")
    assert re.search(r"^Page views +1 ", text, re.M) and re.search(r"^Filtered +1  \(bots 1\)$", text, re.M)
    everything = daemon.report("range=today").text
    assert everything.startswith("pixeld report · all sites (example.org, other.net)\n")
    assert "example.org/" in everything and "other.net/x" in everything


def test_bad_filter_settings_stop_startup(tmp_path):
    from conftest import run_pixeld

    for args, reason in [
        (["--site", "not a domain"], "cannot parse site"),
        (["--ignore-ip", "300.1.1.1/8"], "cannot parse address to ignore"),
        (["--rate-limit", "-1"], "must not be negative"),
        (["--spam-list", str(tmp_path / "missing.txt")], "cannot read spam list"),
    ]:
        code, _, err = run_pixeld("serve", "--db", str(tmp_path / "p.db"), "--listen", "127.0.0.1:0", *args)
        assert code == 2 and reason in err and err.count("\n") == 1, err
    code, _, err = run_pixeld("serve", "--db", str(tmp_path / "p.db"), "--listen", "127.0.0.1:0", env={"PIXELD_RATE_LIMIT": "many"})
    assert code == 2 and "cannot parse rate limit" in err
