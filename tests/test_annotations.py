"""Annotations: notes on days from the command line, on the series in text, JSON, CSV and HTML (escaped),
in export and import (kept once however often imported), over a real SQLite file."""

import csv
import io
import json

import pytest

from pixeld import DAY, Batch, PageView, Record, Store, connect
from conftest import run_pixeld
from test_html import HOSTILE, PIXELD_TAGS, parsed

DEC_1 = 1_796_083_200  # 2026-12-01 00:00:00 UTC
NOTE = "Posted on <b>Hacker News</b> <script>alert(1)</script>"


def view(at, path="/", site="example.org"):
    return PageView(time=at, site=site, path=path, title="", referrer="", country="", browser="Firefox", version="133", os="Linux",
                    device="desktop", screen="", language="en", first_today=True)


@pytest.fixture
def db(tmp_path):
    """Page views on 2026-11-29 to 2026-12-03 for two sites."""
    path = tmp_path / "notes.db"
    store = Store(connect(str(path)))
    records = [Record(view(DEC_1 + day * DAY + 3600 * (day + 5), site=site), 1) for day in range(-2, 3) for site in ("example.org", "other.net")]
    store.write(Batch(records=records))
    store.conn.close()
    return path


def note(db, *args):
    code, out, err = run_pixeld("note", *args, "--db", str(db))
    assert code == 0, err
    return out


def report(db, fmt, *args):
    code, out, err = run_pixeld("report", "--db", str(db), "--start", "2026-11-29", "--end", "2026-12-03", "--format", fmt, *args)
    assert code == 0, err
    return out


def test_note_list_and_delete(db):
    assert note(db, "2026-12-01", NOTE) == f"note 1: 2026-12-01 (every site): {NOTE}\n"
    assert note(db, "2026-12-01", NOTE).endswith("(noted before)\n")  # kept once
    assert note(db, "2026-12-02", "Newsletter\x1b[31m out", "--site", "www.Example.org").startswith("note 2: 2026-12-02 example.org: Newsletter [31m out")
    listed = note(db, "--list").splitlines()
    assert listed == [f"    1  2026-12-01  (every site)  {NOTE}", "    2  2026-12-02  example.org  Newsletter [31m out"]
    assert note(db, "--list", "--site", "other.net").splitlines() == listed[:1]
    assert note(db, "--delete", "2") == "deleted note 2\n"
    assert len(note(db, "--list").splitlines()) == 1


@pytest.mark.parametrize(
    "args, reason",
    [
        (["2026-13-01", "x"], "give a day and a note"),
        (["2026-12-01"], "give a day and a note"),
        (["2026-12-01", "   "], "give a day and a note"),
        (["1999-12-31", "x"], "give a day and a note"),
        (["--delete", "7"], "there is no note 7"),
        (["2026-12-01", "x", "--site", "not a host"], "cannot parse site"),
    ],
)
def test_bad_notes_get_one_line(db, args, reason):
    code, out, err = run_pixeld("note", *args, "--db", str(db))
    assert code == 2 and out == "" and err.count("\n") == 1 and reason in err, err


def test_notes_are_marked_on_the_text_series(db):
    note(db, "2026-12-01", NOTE)
    note(db, "2026-12-02", "Only other.net", "--site", "other.net")
    note(db, "2026-11-01", "Outside the range")
    lines = report(db, "text").splitlines()
    day = next(i for i, line in enumerate(lines) if line.startswith("2026-12-01 Tue"))
    assert lines[day + 1] == f"{'':16} ◆ 2026-12-01 {NOTE}"[:79] + "…"  # cut to the report's 80 columns
    assert lines[day + 3] == f"{'':16} ◆ 2026-12-02 other.net: Only other.net"
    assert "Outside the range" not in "\n".join(lines)
    one_site = report(db, "text", "--site", "example.org", "--ascii")
    assert f"{'':16} * 2026-12-01 Posted on" in one_site and "Only other.net" not in one_site


def test_notes_in_json_and_csv(db):
    note(db, "2026-12-01", NOTE)
    note(db, "2026-12-02", "Only other.net", "--site", "other.net")
    document = json.loads(report(db, "json"))
    assert document["annotations"] == [
        {"id": 1, "date": "2026-12-01", "site": None, "text": NOTE}, {"id": 2, "date": "2026-12-02", "site": "other.net", "text": "Only other.net"},
    ]
    assert json.loads(report(db, "json", "--site", "example.org"))["annotations"] == document["annotations"][:1]
    rows = [row for row in csv.reader(io.StringIO(report(db, "csv"))) if row[0] == "annotation"]
    assert rows == [["annotation", f"2026-12-01 {NOTE}", "", ""], ["annotation", "2026-12-02 other.net: Only other.net", "", ""]]


def test_a_note_in_a_time_zone_marks_its_local_day(db):
    note(db, "2026-12-01", "Berlin")
    document = json.loads(report(db, "json", "--tz", "Europe/Berlin"))
    assert [note["date"] for note in document["annotations"]] == ["2026-12-01"]
    lines = report(db, "text", "--tz", "Europe/Berlin").splitlines()
    assert lines[lines.index(next(line for line in lines if line.startswith("2026-12-01 Tue"))) + 1].endswith("◆ 2026-12-01 Berlin")


def test_every_note_is_escaped_on_the_html_chart(db):
    for number, text in enumerate(HOSTILE):
        note(db, f"2026-12-0{1 + number % 2}", text)
    page = report(db, "html")
    tags, attributes, text = parsed(page)
    assert tags <= PIXELD_TAGS | {"g", "circle", "ul", "li"}
    assert not [name for name, _ in attributes if name.startswith("on")]
    assert all(value in text for value in HOSTILE)  # shown as text, in the marker's title and the list under the chart
    marks = page.split('<g class="a">')[1:]
    assert len(marks) == 2 and all("<circle" in mark for mark in marks)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in marks[0] and "<script>" not in page


def test_export_and_import_carry_notes_once(db, tmp_path):
    note(db, "2026-12-01", NOTE)
    note(db, "2026-12-02", "Only other.net", "--site", "other.net")
    for fmt in ("csv", "ndjson"):
        code, exported, _ = run_pixeld("export", "--db", str(db), "--format", fmt)
        assert code == 0
        if fmt == "ndjson":
            rows = [json.loads(line) for line in exported.splitlines()]
        else:
            rows = list(csv.DictReader(io.StringIO(exported)))
        notes = [row for row in rows if row["type"] == "annotation"]
        expected = [("2026-12-01T00:00:00Z", "", NOTE), ("2026-12-02T00:00:00Z", "other.net", "Only other.net")]
        assert [(row["time"], row["site"], row["note"]) for row in notes] == expected
        assert [row["time"] for row in rows] == sorted(row["time"] for row in rows)  # oldest first, notes among the page views
        path = tmp_path / f"export.{fmt}"
        path.write_text(exported)
        copy = tmp_path / f"copy-{fmt}.db"
        for force in ((), ("--force",)):
            code, _, err = run_pixeld("import", str(path), "--db", str(copy), *force)
            assert code == 0, err
        assert "imported 10 page views" in err and "new annotations" not in err  # the second import added no note
        assert note(copy, "--list") == note(db, "--list")
        assert json.loads(report(copy, "json"))["annotations"] == json.loads(report(db, "json"))["annotations"]


def test_an_export_of_one_site_has_its_notes_and_those_for_every_site(db):
    note(db, "2026-12-01", "Everywhere")
    note(db, "2026-12-02", "Only other.net", "--site", "other.net")
    code, exported, _ = run_pixeld("export", "--db", str(db), "--site", "example.org", "--format", "ndjson")
    assert [row["note"] for row in map(json.loads, exported.splitlines()) if row["type"] == "annotation"] == ["Everywhere"]
    code, exported, _ = run_pixeld("export", "--db", str(db), "--start", "2026-12-02", "--format", "ndjson")
    assert [row["note"] for row in map(json.loads, exported.splitlines()) if row["type"] == "annotation"] == ["Only other.net"]


def test_an_imported_note_is_cleaned_and_filtered_like_a_row(tmp_path):
    lines = [
        {"time": "2026-12-01T00:00:00Z", "type": "annotation", "site": "www.Example.org", "note": "Launch\x00 <script>x</script>"},
        {"time": "2026-12-01T00:00:00Z", "type": "annotation", "site": "foreign.example", "note": "not for us"},
        {"time": "1970-01-01T00:00:00Z", "type": "annotation", "site": "", "note": "too early"},
        {"time": "2026-12-01T00:00:00Z", "type": "annotation", "site": "", "note": ""},
        {"time": "2026-12-01T10:00:00Z", "type": "pageview", "site": "example.org", "path": "/"},
    ]
    path = tmp_path / "in.ndjson"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    copy = tmp_path / "copy.db"
    code, _, err = run_pixeld("import", str(path), "--db", str(copy), "--site", "example.org")
    assert code == 0 and "1 new annotations" in err and "3 lines skipped" in err, err
    assert note(copy, "--list") == "    1  2026-12-01  example.org  Launch <script>x</script>\n"
