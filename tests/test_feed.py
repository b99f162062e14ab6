"""The incremental feed (``export --cursor-file``): each page view, event and imported count once, in its
final state, stamped with its node; a failed consumer resends what it did not take; rows imported later with
old times ship on the next run, and only they; the schemas name every field; bad cursors are one line."""

import json
import os
import re
import sqlite3
import subprocess
import sys
import time

import pytest

import pixeld
from conftest import CHROME, FIREFOX, PIXELD, bad_start, report_json, run_pixeld
from test_engagement import engage
from test_move_in import plausible_zip


def hit(daemon, path, ip, ua=CHROME, **params):
    answer = daemon.pixel({"path": path, "host": "example.org", **params}, {"User-Agent": ua, "X-Forwarded-For": ip})
    assert answer.status == 200


def feed(db, cursor_file, *args):
    """One run of the feed with a cursor file: its rows, and whether it left a next cursor to commit."""
    code, out, err = run_pixeld("export", "--db", str(db), "--cursor-file", str(cursor_file), *args)
    assert code == 0 and err == "", err
    return [json.loads(line) for line in out.splitlines()], os.path.exists(f"{cursor_file}.next")


def commit(cursor_file):
    code, _, err = run_pixeld("export", "--commit-cursor", str(cursor_file))
    assert code == 0, err


def feed_and_commit(db, cursor_file, *args):
    rows, pending = feed(db, cursor_file, *args)
    assert pending
    commit(cursor_file)
    return rows


def stored(db, table="pageviews"):
    conn = sqlite3.connect(db)
    try:
        return [row_id for (row_id,) in conn.execute(f"SELECT id FROM {table} ORDER BY id")]
    finally:
        conn.close()


def wait_until_final(seconds):
    time.sleep(seconds + 1.5)  # past the final delay, and the writer's flush


def test_rows_ship_once_when_final_with_their_visit_engagement_and_node(start_daemon, tmp_path):
    daemon = start_daemon("--node", "edge-1", "--final-after", "4")
    hit(daemon, "/a", "198.51.100.1")
    hit(daemon, "/post", "198.51.100.1")  # the visit grows: its entry row changes, /a is no longer its exit
    hit(daemon, "/c", "198.51.100.2", FIREFOX)
    daemon.pixel({"event": "signup", "path": "/post", "host": "example.org"}, {"User-Agent": CHROME, "X-Forwarded-For": "198.51.100.1"})
    engage(daemon, "/post", "20", "70")
    cursor = tmp_path / "feed.cursor"
    assert feed_and_commit(daemon.db, cursor) == []  # nothing is final yet
    wait_until_final(4)
    rows = feed_and_commit(daemon.db, cursor)
    pageviews = {row["path"]: row for row in rows if row["type"] == "pageview"}
    assert set(pageviews) == {"/a", "/post", "/c"} and [row["event"] for row in rows if row["type"] == "event"] == ["signup"]
    assert {row["node"] for row in rows} == {"edge-1"}
    assert (pageviews["/a"]["visit_views"], pageviews["/a"]["exit"], pageviews["/post"]["exit"], pageviews["/c"]["exit"]) == (2, 0, 1, 1)
    assert (pageviews["/post"]["engaged"], pageviews["/post"]["scroll"], pageviews["/c"]["scroll"]) == (20, 70, None)
    assert sorted(row["id"] for row in rows if row["type"] == "pageview") == stored(daemon.db)
    assert [row["id"] for row in rows if row["type"] == "event"] == stored(daemon.db, "events")
    assert all(list(row) == list(pixeld.FEED_FIELDS) for row in rows)
    report = daemon.report_json("range=today")
    assert (report["pageviews"], report["visitors"], report["visits"]) == (3, sum(row["first_today"] for row in pageviews.values()), 2)
    assert feed_and_commit(daemon.db, cursor) == []  # shipped once


def test_engagement_after_the_final_delay_changes_neither_the_row_nor_the_report(start_daemon, tmp_path):
    """What the feed shipped is what pixeld counts: a beacon for a page view that is final is left out of both."""
    daemon = start_daemon("--final-after", "4", "--node", "n")
    hit(daemon, "/late", "198.51.100.5")
    engage(daemon, "/late", "5", "10", ip="198.51.100.5")  # in time
    wait_until_final(4)
    rows = feed_and_commit(daemon.db, tmp_path / "c")
    engage(daemon, "/late", "30", "90", ip="198.51.100.5")  # too late: the row is final
    daemon.stop()
    assert [(row["engaged"], row["scroll"]) for row in rows] == [(5, 10)]
    conn = sqlite3.connect(daemon.db)
    assert conn.execute("SELECT engaged, scroll FROM pageviews").fetchall() == [(5, 10)]
    conn.close()
    document = report_json(daemon.db, "--range", "all")
    assert (document["time_on_page"], document["scroll_depth"]) == (5.0, 10.0)


def pipeline(db, cursor, consumer):
    """The README's pipeline: the cursor advances only when the export and its consumer both succeeded."""
    script = (f"set -o pipefail; {sys.executable} {PIXELD} export --env-file '' --db {db} --cursor-file {cursor} | {consumer} "
              f"&& {sys.executable} {PIXELD} export --commit-cursor {cursor}")
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60).returncode


def test_a_failed_consumer_gets_the_same_rows_again_and_nothing_twice(start_daemon, tmp_path):
    daemon = start_daemon("--final-after", "2", "--node", "n")
    for number in range(40):
        hit(daemon, f"/page/{number}", f"198.51.100.{number + 1}")
    wait_until_final(2)
    daemon.stop()
    cursor = tmp_path / "feed.cursor"
    assert pipeline(daemon.db, cursor, f"tee {tmp_path / 'attempt'} | (head -c 300 >/dev/null; exit 1)") != 0
    assert not cursor.exists()
    assert pipeline(daemon.db, cursor, f"cat > {tmp_path / 'taken'}") == 0
    taken = [json.loads(line) for line in (tmp_path / "taken").read_text().splitlines()]
    assert (tmp_path / "attempt").read_text() == (tmp_path / "taken").read_text()  # the same rows, in the same order
    assert sorted(row["id"] for row in taken) == stored(daemon.db) and len(taken) == 40
    assert pipeline(daemon.db, cursor, f"cat > {tmp_path / 'again'}") == 0 and (tmp_path / "again").read_text() == ""
    # An export that fails (no database) leaves no next cursor, so a consumer that succeeds commits nothing.
    before = cursor.read_text()
    assert pipeline(tmp_path / "missing.db", cursor, "cat > /dev/null") != 0
    assert cursor.read_text() == before


def test_rows_imported_later_into_shipped_seconds_ship_on_the_next_run_and_only_they(start_daemon, tmp_path):
    daemon = start_daemon("--final-after", "2", "--node", "n")
    for number in range(10):
        hit(daemon, f"/page/{number}", f"198.51.100.{number + 1}")
    wait_until_final(2)
    daemon.stop()
    cursor = tmp_path / "feed.cursor"
    first = feed_and_commit(daemon.db, cursor)
    assert len(first) == 10
    code, out, _ = run_pixeld("export", "--db", str(daemon.db), "--format", "ndjson")
    (tmp_path / "again.ndjson").write_text(out)
    code, _, err = run_pixeld("import", str(tmp_path / "again.ndjson"), "--db", str(daemon.db))
    assert code == 0, err
    second = feed_and_commit(daemon.db, cursor)
    assert len(second) == 10 and not {row["id"] for row in first} & {row["id"] for row in second}
    assert {row["time"] for row in second} == {row["time"] for row in first}  # the same seconds as rows already shipped
    assert sorted(row["path"] for row in second) == sorted(row["path"] for row in first)
    assert sorted(row["id"] for row in first + second) == stored(daemon.db)
    assert feed_and_commit(daemon.db, cursor) == []


def ndjson_rows(path, times):
    path.write_text("".join(json.dumps({"time": pixeld.iso(second), "type": "pageview", "site": "example.org", "path": f"/imported/{i}"}) + "\n"
                            for i, second in enumerate(times)))
    return path


def test_imported_rows_of_recent_seconds_ship_once_with_the_import_not_again_with_the_live_rows(start_daemon, tmp_path):
    daemon = start_daemon("--final-after", "2", "--node", "n")
    hit(daemon, "/live", "198.51.100.1")
    now = int(time.time())
    code, _, err = run_pixeld("import", str(ndjson_rows(tmp_path / "recent.ndjson", [now - 1, now, now])), "--db", str(daemon.db))
    assert code == 0, err
    cursor = tmp_path / "feed.cursor"
    assert sorted(row["path"] for row in feed_and_commit(daemon.db, cursor)) == ["/imported/0", "/imported/1", "/imported/2"]
    wait_until_final(2)
    daemon.stop()
    assert [row["path"] for row in feed_and_commit(daemon.db, cursor)] == ["/live"]
    assert feed_and_commit(daemon.db, cursor) == []


def test_an_unfinished_import_waits_and_its_rows_are_not_shipped_as_live_ones(tmp_path):
    """An import still writing (its log entries not done) holds back its own rows and every later import's."""
    db = tmp_path / "pixeld.db"
    code, _, err = run_pixeld("import", str(ndjson_rows(tmp_path / "old.ndjson", [1_700_000_000, 1_700_000_001])), "--db", str(db))
    assert code == 0, err
    conn = sqlite3.connect(db)
    conn.execute("UPDATE feed_log SET done = 0, at = ?", (int(time.time()),))  # as while the import runs
    conn.commit()
    cursor = tmp_path / "c"
    assert feed_and_commit(db, cursor) == []
    conn.execute("UPDATE feed_log SET done = 1")
    conn.commit()
    conn.close()
    assert len(feed_and_commit(db, cursor)) == 2
    assert feed_and_commit(db, cursor) == []


def test_imported_aggregates_ship_as_their_own_rows_and_a_new_import_revises_them(tmp_path):
    db = tmp_path / "pixeld.db"
    archive = plausible_zip(tmp_path / "example_org.zip")
    code, _, err = run_pixeld("import", str(archive), "--db", str(db))
    assert code == 0, err
    cursor = tmp_path / "c"
    first = feed_and_commit(db, cursor)
    conn = sqlite3.connect(db)
    imported = conn.execute("SELECT count(*), sum(views) FROM imported WHERE section = ''").fetchone()
    assert len(first) == conn.execute("SELECT count(*) FROM imported").fetchone()[0]
    conn.close()
    assert {row["type"] for row in first} == {"aggregate"} and all(list(row) == list(pixeld.AGGREGATE_FIELDS) for row in first)
    headline = [row for row in first if row["section"] == ""]
    assert (len(headline), sum(row["views"] for row in headline)) == imported
    assert {row["time"] for row in headline} == {"2024-01-01T00:00:00Z", "2024-01-02T00:00:00Z"} and {row["site"] for row in first} == {"example.org"}
    assert len({row["id"] for row in first}) == len(first)
    assert feed_and_commit(db, cursor) == []
    code, _, err = run_pixeld("import", str(archive), "--db", str(db), "--force")
    assert code == 0, err
    again = feed_and_commit(db, cursor)
    assert {row["id"] for row in again} == {row["id"] for row in first}  # the same rows, replaced by a later revision
    assert min(row["revision"] for row in again) > max(row["revision"] for row in first)


def schema_columns(engine):
    code, out, err = run_pixeld("export", "--schema", engine)
    assert code == 0, err
    return [name for name in re.findall(r"^    (\w+) ", out, re.MULTILINE) if name != "PRIMARY"]


@pytest.mark.parametrize("engine", ["clickhouse", "duckdb"])
def test_each_schema_names_every_field_the_feed_writes(start_daemon, tmp_path, engine):
    daemon = start_daemon("--final-after", "1", "--node", "n")
    hit(daemon, "/a", "198.51.100.1")
    daemon.pixel({"event": "signup", "path": "/a", "host": "example.org", "props": json.dumps({"plan": "pro"})}, {"User-Agent": CHROME})
    wait_until_final(1)
    daemon.stop()
    code, _, err = run_pixeld("import", str(plausible_zip(tmp_path / "p.zip")), "--db", str(daemon.db))
    assert code == 0, err
    written = set()
    for row in feed_and_commit(daemon.db, tmp_path / "c"):
        written.update(row)
    assert {"pageview", "event", "aggregate"} <= {row["type"] for row in feed(daemon.db, tmp_path / "fresh")[0]}
    columns = schema_columns(engine)
    assert set(columns) == written == set(pixeld.FEED_ROW_FIELDS) and len(columns) == len(set(columns))


def test_duckdb_takes_the_feed_with_typed_times(start_daemon, tmp_path):
    duckdb = pytest.importorskip("duckdb", reason="duckdb is not installed (pip install -r tests/requirements.txt)")
    daemon = start_daemon("--final-after", "1", "--node", "edge-2")
    hit(daemon, "/a", "198.51.100.1", title='"</script><script>alert(1)</script>')
    hit(daemon, "/b", "198.51.100.2")
    wait_until_final(1)
    daemon.stop()
    code, _, err = run_pixeld("import", str(plausible_zip(tmp_path / "p.zip")), "--db", str(daemon.db))
    assert code == 0, err
    rows_file = tmp_path / "rows.ndjson"
    code, out, err = run_pixeld("export", "--db", str(daemon.db), "--since", "")
    assert code == 0 and re.fullmatch(r"next cursor: 1:\d+:\d+\n", err), err
    rows_file.write_text(out)
    conn = duckdb.connect()
    conn.execute(schema_text("duckdb"))
    conn.execute(f"INSERT OR REPLACE INTO pixeld BY NAME SELECT * FROM read_json('{rows_file}', format = 'newline_delimited')")
    conn.execute(f"INSERT OR REPLACE INTO pixeld BY NAME SELECT * FROM read_json('{rows_file}', format = 'newline_delimited')")  # shipped twice: kept once
    assert conn.execute("SELECT count(*) FROM pixeld WHERE type = 'pageview'").fetchone()[0] == 2
    assert conn.execute("SELECT title FROM pixeld WHERE path = '/a'").fetchone()[0] == '"</script><script>alert(1)</script>'
    assert conn.execute("SELECT typeof(time), min(time) >= TIMESTAMP '2024-01-01' FROM pixeld GROUP BY 1").fetchall() == [("TIMESTAMP", True)]
    assert conn.execute("SELECT sum(views) FROM pixeld WHERE type = 'aggregate' AND section = ''").fetchone()[0] == 38
    assert {node for (node,) in conn.execute("SELECT DISTINCT node FROM pixeld").fetchall()} == {"edge-2"}


def schema_text(engine):
    code, out, err = run_pixeld("export", "--schema", engine)
    assert code == 0, err
    return out


def test_the_node_comes_from_the_environment_and_export_can_name_another(start_daemon, tmp_path):
    daemon = start_daemon("--final-after", "1", env={"PIXELD_NODE": "env-node"})
    hit(daemon, "/a", "198.51.100.1")
    wait_until_final(1)
    daemon.stop()
    assert [row["node"] for row in feed(daemon.db, tmp_path / "c")[0]] == ["env-node"]
    assert [row["node"] for row in feed(daemon.db, tmp_path / "c", "--node", "other")[0]] == ["other"]


@pytest.mark.parametrize("content, reason", [
    ("garbage", "is not one pixeld wrote"),
    ("1:abc:0", "is not one pixeld wrote"),
    ("2:0:0", "is not one pixeld wrote"),
    ("1:99999999999:0", "in the future"),
    ("1:0:7", "another database's cursor"),
    (b"\xff\xfe\x00", "cannot read the cursor file"),
])
def test_a_bad_cursor_is_one_line_and_exit_2(tmp_path, content, reason):
    db = tmp_path / "pixeld.db"
    pixeld.connect(str(db)).close()
    cursor = tmp_path / "c"
    if isinstance(content, bytes):
        cursor.write_bytes(content)
    else:
        cursor.write_text(content)
    code, out, err = run_pixeld("export", "--db", str(db), "--cursor-file", str(cursor))
    assert (code, out, err.count("\n")) == (2, "", 1) and reason in err and err.startswith("pixeld: "), err
    assert cursor.exists() and not os.path.exists(f"{cursor}.next")


@pytest.mark.parametrize("args, reason", [
    (["--commit-cursor", "{dir}/never"], "nothing to commit"),
    (["--cursor-file", "{dir}/c", "--format", "csv"], "NDJSON only"),
    (["--cursor-file", "{dir}/c", "--site", "example.org"], "do not apply"),
    (["--since", "", "--node", "Bad Name"], "is not one"),
])
def test_bad_feed_options_are_one_line_and_exit_2(tmp_path, args, reason):
    db = tmp_path / "pixeld.db"
    pixeld.connect(str(db)).close()
    code, out, err = run_pixeld("export", "--db", str(db), *(arg.format(dir=tmp_path) for arg in args))
    assert (code, out, err.count("\n")) == (2, "", 1) and reason in err, err


@pytest.mark.parametrize("args, env", [(["--node", "Edge 1"], {}), ([], {"PIXELD_NODE": "a/b"}), (["--final-after", "0"], {})])
def test_serve_refuses_a_bad_node_name_or_final_delay(tmp_path, args, env):
    assert "pixeld: " in bad_start(tmp_path / "pixeld.db", *args, env=env)


def test_the_plain_export_is_unchanged_beside_the_feed(start_daemon, tmp_path):
    daemon = start_daemon("--node", "n")
    hit(daemon, "/a", "198.51.100.1")
    daemon.stop()
    code, out, _ = run_pixeld("export", "--db", str(daemon.db), "--format", "ndjson")
    assert code == 0 and list(json.loads(out.splitlines()[0])) == list(pixeld.EXPORT_FIELDS)
    code, out, _ = run_pixeld("export", "--db", str(daemon.db))
    assert code == 0 and out.splitlines()[0] == ",".join(pixeld.EXPORT_FIELDS)


def test_rows_the_writer_stores_after_they_are_final_ship_once_though_the_feed_has_passed_them(tmp_path):
    """A page view stored more than the final delay after it was seen (the database unavailable that long) is
    logged as an import's rows are: the next run ships it, and no later run ships it again."""
    db = tmp_path / "pixeld.db"
    conn = pixeld.connect(str(db))
    pixeld.note_feed_settings(conn, "n", 10, int(time.time()))
    now = int(time.time())
    store = pixeld.Store(conn, final_after=10)
    store.write(pixeld.Batch(records=[pixeld.Record(pixeld.PageView(now - 3, "example.org", path="/on-time"), 1, 0)]), now)
    cursor = tmp_path / "c"
    cursor.write_text(str(pixeld.FeedCursor(now - 5, 0)))  # the feed has passed the second of the late row below
    store.write(pixeld.Batch(records=[pixeld.Record(pixeld.PageView(now - 60, "example.org", path="/late"), 1, 0)]), now)
    conn.close()
    assert [row["path"] for row in feed_and_commit(db, cursor)] == ["/late"]
    time.sleep(10)
    assert [row["path"] for row in feed_and_commit(db, cursor)] == ["/on-time"]
    assert feed_and_commit(db, cursor) == []
