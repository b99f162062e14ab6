"""Public view counters against the real daemon: /counter/PATH.json and .svg, opt-in, one path's views from
the daily and monthly counts, cacheable, cross-origin, and escaped however hostile the path."""

import json
import time
import xml.etree.ElementTree as ElementTree
from urllib.parse import quote

from conftest import run_pixeld

HOSTILE = ('/<script>alert(1)</script>', '/a"b\'c&d', "/</title><script>x</script>", "/café/日本", "/]]><!--")


def counter(daemon, path, kind="json", query=""):
    return daemon.get("/counter" + quote(path) + "." + kind + ("?" + query if query else ""))


def views(daemon, path, query=""):
    answer = counter(daemon, path, "json", query)
    assert answer.status == 200, answer.text
    return json.loads(answer.text)["views"]


def test_counters_are_off_unless_asked_for(start_daemon):
    daemon = start_daemon()
    daemon.pixel({"host": "example.org", "path": "/post"})
    for kind in ("json", "svg"):
        answer = counter(daemon, "/post", kind)
        assert answer.status == 404 and "access-control-allow-origin" not in answer.headers


def test_a_counter_shows_one_paths_views_in_json_and_svg(start_daemon):
    daemon = start_daemon("--public-counters", "--token", "s3cret")
    for path in ("/post", "/post", "/post/", "/", "/other", *HOSTILE):
        daemon.pixel({"host": "example.org", "path": path})
    assert "report by token, view counters public" in daemon.stop()
    daemon = start_daemon("--public-counters", "--token", "s3cret")
    answer = counter(daemon, "/post")
    assert answer.status == 200 and json.loads(answer.text) == {"path": "/post", "views": 2}
    for name, value in (("cache-control", "max-age=300"), ("access-control-allow-origin", "*"), ("content-type", "application/json"),
                        ("x-content-type-options", "nosniff")):
        assert answer.headers[name] == value
    assert views(daemon, "/post/") == 1 and views(daemon, "/") == 1 and views(daemon, "/nothing-here") == 0
    assert daemon.get("/counter/.json").text == '{"path": "/", "views": 1}\n'  # the home page
    assert views(daemon, "/post*") == 0 and views(daemon, "/pos") == 0  # one path exactly: no prefixes, no other page
    badge = counter(daemon, "/post", "svg")
    assert badge.status == 200 and badge.headers["content-type"] == "image/svg+xml" and badge.headers["cache-control"] == "max-age=300"
    assert "default-src 'none'" in badge.headers["content-security-policy"] and badge.headers["access-control-allow-origin"] == "*"
    svg = ElementTree.fromstring(badge.body)
    assert [text.text for text in svg.iter("{http://www.w3.org/2000/svg}text")] == ["views", "2"]
    assert daemon.get("/counter/post.json", method="HEAD").body == b""
    assert daemon.get("/counter/post.json", method="POST").status == 405  # GET (and HEAD) only
    assert daemon.get("/counter/post.txt").status == 404 and daemon.get("/counter/post").status == 404
    assert daemon.get("/report").status == 401  # counters open nothing else


def test_hostile_paths_are_escaped_in_json_and_svg(start_daemon):
    daemon = start_daemon("--public-counters")
    for path in HOSTILE:
        daemon.pixel({"host": "example.org", "path": path})
    time.sleep(1.5)
    for path in HOSTILE:
        answer = counter(daemon, path)
        assert answer.status == 200, path
        assert "<" not in answer.text and ">" not in answer.text and "&" not in answer.text  # \u003c and friends
        assert json.loads(answer.text) == {"path": path, "views": 1}
        badge = counter(daemon, path, "svg")
        svg = ElementTree.fromstring(badge.body)  # well-formed XML: nothing broke out of the title
        [title] = svg.iter("{http://www.w3.org/2000/svg}title")
        assert title.text == f"{path}: 1 views"
        assert len(list(svg.iter())) == 7 and b"<script" not in badge.body


def test_ranges_and_sites(start_daemon, tmp_path):
    old = int(time.time()) - 400 * 86400
    export = tmp_path / "old.ndjson"
    export.write_text("".join(json.dumps({"time": old + i, "site": "example.org", "path": "/post", "visit_views": 1}) + "\n" for i in range(5)))
    code, _, err = run_pixeld("import", str(export), "--db", str(tmp_path / "pixeld.db"))
    assert code == 0, err
    daemon = start_daemon("--public-counters", "--keep-days", "30")  # deletes the old page views at start: their counts stay
    for _ in range(3):
        daemon.pixel({"host": "example.org", "path": "/post"})
    daemon.pixel({"host": "blog.example.net", "path": "/post"})
    time.sleep(1.5)
    assert "deleted 5 page views" in daemon.stop()
    daemon = start_daemon("--public-counters", "--keep-days", "30")
    assert views(daemon, "/post", "site=example.org") == 8
    assert views(daemon, "/post", "site=example.org&range=all") == 8
    for named in ("today", "7d", "30d", "month", "year"):
        assert views(daemon, "/post", f"site=example.org&range={named}") == 3, named
    assert views(daemon, "/post", "site=example.org&range=yesterday") == 0
    assert views(daemon, "/post", "site=example.org&range=500d") == 8
    assert views(daemon, "/post", "site=www.blog.example.net") == 1 and views(daemon, "/post", "site=nowhere.example") == 0
    for query, reason in (("", "several sites"), ("site=example.org&range=realtime", "whole days"), ("site=example.org&range=forever", "unknown range"),
                          ("site=not%20a%20host", "cannot parse site")):
        answer = counter(daemon, "/post", "json", query)
        assert answer.status == 400 and reason in answer.text and answer.headers["access-control-allow-origin"] == "*", query


def test_one_site_needs_no_site_parameter(start_daemon):
    daemon = start_daemon("--public-counters")
    assert views(daemon, "/post") == 0  # nothing counted yet
    daemon.pixel({"host": "example.org", "path": "/post"})
    time.sleep(1.5)
    assert views(daemon, "/post") == 1
