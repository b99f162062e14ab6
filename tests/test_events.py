"""Event properties and pages not found, over real HTTP against the real daemon: what is kept and what is
dropped (and counted in /metrics), visitors per value, the Properties and Not found sections in every
format with hostile text, export and import, the dry run and the command line."""

import csv
import io
import json

import pytest

import pixeld
from conftest import CHROME, FIREFOX, IPHONE, report_json, run_pixeld

PERSONAL = ["reader@example.org", "mailto:a.b+c@mail.example.co.uk", "+49 30 1234567", "(030) 123-4567", "030/1234567",
            "4111 1111 1111 1111", "4111-1111-1111-1111", "DE89370400440532013000", "order 123456789"]
HARMLESS = ["pdf", "2026-12-06", "v1.2.3", "42", "1,299.00", "Chapter 12", "@handle", "a@b", "ISBN 978-3"]
HOSTILE = ["<script>alert(1)</script>", '"><img src=x onerror=alert(2)>', "</td><svg onload=alert(3)>"]


@pytest.mark.parametrize("value", PERSONAL)
def test_a_value_that_looks_personal_is_dropped(value):
    assert pixeld.looks_personal(value)
    assert pixeld.clean_properties([("contact", value), ("format", "pdf")]) == ((("format", "pdf"),), 1)


@pytest.mark.parametrize("value", HARMLESS)
def test_a_harmless_value_is_kept(value):
    assert not pixeld.looks_personal(value)
    assert pixeld.clean_properties([("x", value)]) == ((("x", value),), 0)


def test_limits_on_properties():
    sent = [(f"p{i:02d}", "v") for i in range(15)] + [("p00", "again"), ("", "no name"), ("empty", "")]
    kept, dropped = pixeld.clean_properties(sent)
    assert [name for name, _ in kept] == [f"p{i:02d}" for i in range(10)] and dropped == 0  # ten, the first value of a name
    [(name, value)] = pixeld.clean_properties([("n" * 100, "v" * 500 + "\u202e\x00")])[0]
    assert (len(name), len(value)) == (64, 200)
    assert pixeld.read_properties(pixeld.properties_text(kept))[0] == kept  # the stored form reads back the same
    assert pixeld.read_properties("&".join(f"a{i}=1" for i in range(100))) == ((), 0)  # junk in an import


def event(daemon, name, ip, ua=CHROME, path="/post", **params):
    answer = daemon.pixel({"event": name, "path": path, "host": "example.org", **params}, {"User-Agent": ua, "X-Forwarded-For": ip})
    assert answer.status == 200 and answer.body == pixeld.GIF


def metric(daemon, name):
    lines = [line for line in daemon.get("/metrics").text.splitlines() if line.startswith(f"pixeld_{name} ")]
    return int(float(lines[0].split()[1]))


def properties(document):
    return {(row["property"], row["value"]): (row["count"], row["visitors"]) for row in document["sections"]["properties"]}


def test_properties_are_counted_with_their_visitors_and_personal_values_never_stored(start_daemon):
    daemon = start_daemon()
    event(daemon, "download", "198.51.100.1", prop_format="pdf", prop_chapter="1")
    event(daemon, "download", "198.51.100.1", prop_format="pdf", prop_chapter="2")  # the same reader, the same format again
    event(daemon, "download", "198.51.100.1", prop_format="epub", prop_email="reader@example.org")
    event(daemon, "download", "198.51.100.2", ua=IPHONE, prop_format="pdf", prop_card="4111 1111 1111 1111")
    event(daemon, "download", "198.51.100.3", ua=FIREFOX)  # no properties
    event(daemon, "signup", "198.51.100.2", ua=IPHONE, prop_plan="pro", prop_phone="+44 20 7946 0958")
    assert metric(daemon, "dropped_event_properties_total") == 3
    output = daemon.stop()
    wal = daemon.db.parent / (daemon.db.name + "-wal")
    database = daemon.db.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    for secret in ("reader@example.org", "4111 1111", "4111%201111", "7946", "reader%40example.org"):
        assert secret.encode() not in database and secret not in output
    downloads = report_json(daemon.db, "--event", "download")
    assert properties(downloads) == {("chapter", "1"): (1, 1), ("chapter", "2"): (1, 1), ("format", "pdf"): (3, 2), ("format", "epub"): (1, 1)}
    assert [(row["property"], row["value"]) for row in downloads["sections"]["properties"]][:2] == [("format", "pdf"), ("chapter", "1")]  # by count
    assert downloads["sections"]["events"] == [{"value": "download", "count": 5, "visitors": 3}]
    assert properties(report_json(daemon.db, "--event", "signup")) == {("plan", "pro"): (1, 1)}
    assert properties(report_json(daemon.db, "--event", "download", "--device", "phone")) == {("format", "pdf"): (1, 1)}  # filters apply
    assert "properties" not in report_json(daemon.db)["sections"]  # the section belongs to one event
    text = run_pixeld("report", "--db", str(daemon.db), "--range", "today", "--event", "download")[1]
    assert "Properties" in text and "format: pdf" in text
    section = run_pixeld("report", "--db", str(daemon.db), "--range", "today", "--section", "properties", "--event", "download", "--format", "csv")[1]
    assert ["properties", "pdf", "3", "format"] in list(csv.reader(io.StringIO(section)))


def test_pages_not_found_with_the_sources_that_sent_readers(start_daemon):
    daemon = start_daemon()
    for ip, referrer in (("198.51.100.1", "https://news.ycombinator.com/item?id=1"), ("198.51.100.2", "https://news.ycombinator.com/item?id=1"),
                         ("198.51.100.3", "https://www.reddit.com/r/x/"), ("198.51.100.4", "")):
        event(daemon, "404", ip, path="/old-post", referrer=referrer)
    event(daemon, "404", "198.51.100.5", path="/typo", referrer="https://example.org/about")  # an internal link: shown as direct
    event(daemon, "download", "198.51.100.5", path="/old-post")
    daemon.stop()
    document = report_json(daemon.db)
    assert document["sections"]["not_found"] == [
        {"value": "/old-post", "count": 4, "sources": [{"value": "news.ycombinator.com/item", "count": 2}, {"value": "(direct)", "count": 1},
                                                       {"value": "reddit.com/r/x", "count": 1}]},
        {"value": "/typo", "count": 1, "sources": [{"value": "(direct)", "count": 1}]},
    ]
    assert report_json(daemon.db, "--path", "/typo")["sections"]["not_found"][0]["value"] == "/typo"  # filters apply
    assert report_json(daemon.db, "--event", "download")["sections"]["not_found"] == []
    text = run_pixeld("report", "--db", str(daemon.db), "--range", "today")[1]
    assert "Not found" in text and "/old-post" in text and "news.ycombinator.com/item (2) +2" in text


def test_properties_and_pages_not_found_are_escaped_in_every_format(start_daemon):
    daemon = start_daemon()
    for number, value in enumerate(HOSTILE):
        event(daemon, "download", f"198.51.100.{number + 1}", **{f"prop_{value}": value})
        event(daemon, "404", f"198.51.100.{number + 1}", path="/" + value, referrer=f"https://evil.example/{value}")
    daemon.stop()
    for query in ("--event", "download"), ():
        page = run_pixeld("report", "--db", str(daemon.db), "--range", "today", "--format", "html", "--limit", "50", *query)[1]
        assert "<script>alert" not in page and "<img src=x" not in page and "<svg onload" not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    downloads = report_json(daemon.db, "--event", "download")
    assert {(row["property"], row["value"]) for row in downloads["sections"]["properties"]} == {(value, value) for value in HOSTILE}
    missing = {row["value"]: row["sources"] for row in report_json(daemon.db)["sections"]["not_found"]}
    assert set(missing) == {"/" + value for value in HOSTILE}
    spreadsheet = list(csv.reader(io.StringIO(run_pixeld("report", "--db", str(daemon.db), "--range", "today", "--format", "csv", "--event", "download")[1])))
    assert {(row[1], row[3]) for row in spreadsheet if row[0] == "properties"} == {(value, value) for value in HOSTILE}
    text = run_pixeld("report", "--db", str(daemon.db), "--range", "today", "--event", "download", "--limit", "50")[1]
    assert all(f"{value}: {value}"[:40] in text for value in HOSTILE[:1])


@pytest.mark.parametrize("fmt", ["csv", "ndjson"])
def test_export_and_import_carry_properties_and_pages_not_found(start_daemon, tmp_path, fmt):
    daemon = start_daemon()
    event(daemon, "download", "198.51.100.1", prop_format="pdf", prop_lang="en")
    event(daemon, "download", "198.51.100.1", prop_format="pdf", prop_lang="de")
    event(daemon, "download", "198.51.100.2", prop_format="epub", prop_title=HOSTILE[0])
    event(daemon, "404", "198.51.100.3", path="/gone", referrer="https://news.ycombinator.com/")
    daemon.stop()
    exported = tmp_path / f"export.{fmt}"
    code, out, err = run_pixeld("export", "--db", str(daemon.db), "--format", fmt)
    assert code == 0, err
    exported.write_text(out)
    copy = tmp_path / "copy.db"
    code, _, err = run_pixeld("import", str(exported), "--db", str(copy))
    assert code == 0, err
    for db in (daemon.db, copy):
        assert properties(report_json(db, "--event", "download")) == {
            ("format", "pdf"): (2, 1), ("format", "epub"): (1, 1), ("lang", "en"): (1, 1), ("lang", "de"): (1, 1), ("title", HOSTILE[0]): (1, 1)}
        assert report_json(db)["sections"]["not_found"] == [{"value": "/gone", "count": 1, "sources": [{"value": "news.ycombinator.com", "count": 1}]}]
    records = [json.loads(line) for line in out.splitlines()] if fmt == "ndjson" else list(csv.DictReader(io.StringIO(out)))
    stored = sorted(row["props"] for row in records if row["type"] == "event")
    assert stored == ["", "format=epub&title=%3Cscript%3Ealert%281%29%3C%2Fscript%3E", "format=pdf&lang=de", "format=pdf&lang=en"]


def test_an_imported_row_with_personal_or_junk_properties(tmp_path):
    rows = [
        {"time": "2026-11-28T10:00:00Z", "type": "event", "site": "example.org", "path": "/", "event": "download",
         "props": "format=pdf&mail=a%40b.org", "props_first": "3"},
        {"time": "2026-11-28T10:01:00Z", "type": "event", "site": "example.org", "path": "/", "event": "download",
         "props": "%%%&=&format", "props_first": "-9"},
    ]
    source = tmp_path / "rows.ndjson"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    db = tmp_path / "pixeld.db"
    code, _, err = run_pixeld("import", str(source), "--db", str(db))
    assert code == 0, err
    code, out, err = run_pixeld("report", "--db", str(db), "--format", "json", "--event", "download", "--start", "2026-11-28", "--end", "2026-11-28")
    assert code == 0, err
    document = json.loads(out)
    assert properties(document) == {("format", "pdf"): (1, 1)} and b"a@b.org" not in db.read_bytes()


def test_the_dry_run_explains_properties_and_pages_not_found():
    code, out, _ = run_pixeld("check", "--ua", CHROME, "--host", "example.org", "--path", "/post", "--event", "download",
                              "--query", "prop_format=pdf&prop_mail=reader%40example.org")
    assert code == 0 and "the event 'download' (properties format='pdf'; 1 property value(s) dropped" in out, out
    assert "reader@example.org" not in out
    code, out, _ = run_pixeld("check", "--ua", CHROME, "--host", "example.org", "--path", "/gone", "--event", "404", "--referrer", "https://a.example/x")
    assert code == 0 and "a page not found" in out and "example.org/gone" in out and "referrer a.example/x" in out, out
