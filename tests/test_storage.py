"""Storage: schema and migrations, the batched writer, pre-aggregated counts and the queries over them."""

import json
import random
import sqlite3
from collections import Counter

import pytest

import pixeld
from pixeld import DAY, Batch, FilteredHit, Query, Range, Store, StorageError, Writer, connect, query_report
from conftest import request_for, section_counts, view, wait_for

T0 = 1_767_225_600  # 2026-01-01 00:00:00 UTC


def test_new_database_gets_the_current_schema_in_wal_mode(tmp_path):
    conn = connect(str(tmp_path / "new.db"))
    assert conn.execute("PRAGMA user_version").fetchone()[0] == pixeld.SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"strings", "agents", "pageview_rows", "event_rows", "pages", "arrivals", "devices", "daily", "filtered"} <= tables
    views = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'view'")}
    assert views == {"pageviews", "events", "pageview_keys", "event_keys"}  # rows whole (for exports), and as reports scan them
    assert conn.execute("SELECT id FROM strings WHERE value = ''").fetchone() == (0,)  # stored in no bytes


def test_an_older_database_is_migrated_and_a_newer_one_refused(tmp_path):
    path = tmp_path / "old.db"
    sqlite3.connect(path).close()  # version 0: an empty SQLite file
    connect(str(path)).close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == pixeld.SCHEMA_VERSION

    newer = sqlite3.connect(path)
    newer.execute(f"PRAGMA user_version = {pixeld.SCHEMA_VERSION + 1}")
    newer.close()
    with pytest.raises(StorageError, match="newer than this pixeld"):
        connect(str(path))
    with pytest.raises(StorageError, match="newer than this pixeld"):
        connect(str(path), readonly=True)


def old_database(path, version, rows=3):
    """A database at an older schema version, with page views and events as that schema held them (every
    string column names one string, the agent column one agent)."""
    conn = sqlite3.connect(path, isolation_level=None)
    pixeld.migrate(conn, 0, target=version)
    string = conn.execute("INSERT INTO strings (value) VALUES ('x')").lastrowid
    combinations = {combo.column for combo in pixeld.COMBOS}  # the views show them beside their members
    agent = conn.execute("INSERT INTO agents (browser, version, os, device) VALUES ('Chrome', '131', 'Windows', 'desktop')").lastrowid
    for table in ("pageviews", "events"):
        columns = [row[1] for row in conn.execute(f"PRAGMA table_info({table})") if row[1] != "id" and row[1] not in combinations]
        values = [agent if column == "agent" else 1 if column in pixeld.ROW_NUMBERS else string for column in columns]
        stored = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'view' AND name = ?", (table,)).fetchone()
        target = "temp.rows" if stored else table  # since ``compact_rows``, rows are stored apart from the view that shows them
        if stored:
            conn.execute(f"CREATE TEMP TABLE rows (id, {', '.join(columns)})")
        for n in range(rows):
            conn.execute(f"INSERT INTO {target} (id, {', '.join(columns)}) VALUES (?, {', '.join('?' * len(columns))})", (pixeld.first_id(T0 + n), *values))
        if stored:
            for statement in pixeld.store_rows_sql(table, ["id", *columns], "temp.rows"):
                conn.execute(statement)
            conn.execute("DROP TABLE temp.rows")
    conn.close()


@pytest.mark.parametrize("version", range(1, pixeld.SCHEMA_VERSION))
def test_the_export_keeps_every_row_of_a_database_migrated_from_an_older_schema(tmp_path, version):
    old_database(tmp_path / "old.db", version)
    conn = connect(str(tmp_path / "old.db"))  # migrates it
    exported = [json.loads(line) for chunk in pixeld.export_lines(conn, Range(0, pixeld.LATEST), "", "ndjson") for line in chunk.splitlines()]
    assert Counter(row["type"] for row in exported) == {"pageview": 3, "event": 3}
    assert all(row["path"] == "x" and row["browser"] == "Chrome" for row in exported)


def uncompacted(source, path):
    """A copy of ``source`` (the current schema) as the schema before ``compact_rows`` held it: every value a
    column of its own, each flag too, and the empty string an id other than 0 (as it was)."""
    version = pixeld.MIGRATIONS.index(pixeld.compact_rows)
    conn = sqlite3.connect(path, isolation_level=None)
    pixeld.migrate(conn, 0, target=version)
    conn.execute("ATTACH ? AS new", (str(source),))
    empty = conn.execute("SELECT id FROM strings WHERE value = ''").fetchone()[0]
    assert empty > 0
    conn.execute("DELETE FROM strings")
    conn.execute("DELETE FROM daily")
    conn.execute("DELETE FROM monthly")
    conn.execute(f"INSERT INTO strings SELECT CASE id WHEN 0 THEN {empty} ELSE id END, value FROM new.strings")
    for table in ("agents", "meta"):
        conn.execute(f"INSERT OR REPLACE INTO {table} SELECT * FROM new.{table}")
    for table in ("quarters", "filtered"):  # a hit without a host counts under the site ""
        columns = [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]
        conn.execute(f"INSERT INTO {table} SELECT {', '.join(f'CASE site WHEN 0 THEN {empty} ELSE site END' if column == 'site' else column for column in columns)} FROM new.{table}")
    agents = pixeld.DIMENSION_NAMED["agents"].code
    metrics = ", ".join(pixeld.Metrics._fields)
    for table, period in (("daily", "day"), ("monthly", "month")):
        conn.execute(f"INSERT INTO {table} ({period}, site, dim, value, {metrics}) SELECT {period}, CASE site WHEN 0 THEN {empty} ELSE site END, "
                     f"dim, CASE WHEN dim != {agents} AND value = 0 THEN {empty} ELSE value END, {metrics} FROM new.{table}")
    for table in ("pageviews", "events"):
        columns = [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]
        numbers = {"id", "agent", *pixeld.ROW_NUMBERS, "props_first"}
        values = [f"t.{column}" if column in numbers else f"CASE t.{column} WHEN 0 THEN {empty} ELSE t.{column} END" for column in columns]
        conn.execute(f"INSERT INTO {table} ({', '.join(columns)}) SELECT {', '.join(values)} FROM new.{table} t")
    conn.execute("DETACH new")
    conn.close()


def test_compacting_rows_changes_no_report_and_no_export(tmp_path):
    """``compact_rows`` on a database of the schema before it: every report, filtered or not, and every
    exported row is what the same rows give when written in the new layout (its bytes are measured by
    bench/report.py: a few hundred rows fill fewer pages than the combination tables take)."""
    store = Store(connect(str(tmp_path / "new.db")))
    rng = random.Random(3)
    records = [
        pixeld.Record(view(T0 + 600 * n + rng.randrange(600), rng.choice(["/", "/a", "/blog/b", "/blog/c"]), title=rng.choice(["", "A", "B"]),
                           referrer=rng.choice(["", "news.ycombinator.com/item", "google.com"]), source=rng.choice(["", "Google"]),
                           channel=rng.choice(["direct", "search"]), campaign=rng.choice(["", "", "spring"]), country=rng.choice(["", "DE", "FR"]),
                           browser=rng.choice(["Chrome", "Firefox"]), screen=rng.choice(["", "390x844"]), language=rng.choice(["", "de", "en"]),
                           hostname=rng.choice(["", "example.org"]), site=rng.choice(["example.org", "example.org", ""]),
                           first_today=rng.random() < 0.4, firsts=rng.randrange(8), converted=rng.randrange(2)),
                      rng.choice((0, 1, 2)), rng.randrange(300), rng.randrange(60), rng.choice((None, 40, 100)), rng.randrange(2))
        for n in range(600)
    ]
    events = [pixeld.Event(rng.choice(["signup", "404"]), view(T0 + 900 * n, rng.choice(["/a", "/gone"]), country=rng.choice(["", "DE"])),
                           (("plan", rng.choice(["pro", "free"])),), rng.randrange(2)) for n in range(100)]
    store.write(Batch(records=records, events=events, filtered=[FilteredHit(T0 + 60, "", "foreign"), FilteredHit(T0 + 60, "example.org", "bot")]))
    store.conn.close()
    uncompacted(tmp_path / "new.db", tmp_path / "old.db")
    old = connect(str(tmp_path / "old.db"))  # migrates it
    new = connect(str(tmp_path / "new.db"))
    for conn in (old, new):
        conn.execute("VACUUM")
    span = Range(T0 - DAY, T0 + 8 * DAY)
    assert [sorted(query_report(conn, Query(span)).sites) for conn in (old, new)] == [["(no host)", "example.org"]] * 2  # hits without a host
    assert [pixeld.counted_site(conn, "") for conn in (old, new)] == [None, None]  # two sites: neither is the only one
    for filters in ((), (("path", "/blog/*"),), (("country", "DE"), ("browser", "Firefox")), (("source", "Google"),), (("campaign", "spring"),),
                    (("referrer", ""),), (("event", "signup"),), (("hostname", "example.org"), ("language", "de"))):
        reports = [query_report(conn, Query(span, filters=filters)) for conn in (old, new)]
        reports = [pixeld.render_json(report, request_for(report, "json")) for report in reports]
        assert reports[0] == reports[1], filters
    exports = [list(pixeld.export_lines(conn, Range(0, pixeld.LATEST), "", "ndjson")) for conn in (old, new)]
    assert exports[0] == exports[1] and sum(chunk.count("\n") for chunk in exports[0]) == 700
    assert old.execute("SELECT id FROM strings WHERE value = ''").fetchone() == (0,)
    assert old.execute("SELECT count(*) FROM pageview_rows").fetchone() == (600,)


def test_a_value_whose_id_names_nothing_exports_empty_and_keeps_its_row(tmp_path):
    """What a column added with a default that is no string id did: the row must not vanish from the export."""
    old_database(tmp_path / "bad.db", pixeld.SCHEMA_VERSION, rows=2)
    conn = connect(str(tmp_path / "bad.db"))
    conn.execute("UPDATE pages SET title = 987654 WHERE id IN (SELECT page FROM pageview_rows)")
    conn.execute("UPDATE devices SET agent = 987654")
    exported = [json.loads(line) for chunk in pixeld.export_lines(conn, Range(0, pixeld.LATEST), "", "ndjson") for line in chunk.splitlines()]
    assert [(row["type"], row["title"], row["browser"]) for row in exported if row["type"] == "pageview"] == [("pageview", "", "")] * 2


def test_a_new_text_dimension_migrates_older_rows_to_its_empty_value(tmp_path, monkeypatch):
    """``add_text_dimension``: the column's default is the id of the empty value, and older days count under it."""
    themes = pixeld.Dimension("themes", 99, "theme", (pixeld.Field("theme", pixeld.clean_label, "theme"),), (pixeld.Section("themes", "Themes", filter="theme"),))
    monkeypatch.setitem(pixeld.DIMENSION_NAMED, "themes", themes)
    store = Store(connect(str(tmp_path / "new.db")))
    store.write(Batch(records=[pixeld.Record(view(T0 + 60 * n), n % 2) for n in range(5)]))
    conn = store.conn
    conn.execute("BEGIN")
    pixeld.add_text_dimension("themes")(conn, lambda message: None)
    conn.execute("COMMIT")
    empty = conn.execute("SELECT id FROM strings WHERE value = ''").fetchone()[0]
    columns = [row[1] for row in conn.execute("PRAGMA table_info(pageviews)")]
    assert columns[-4:] == ["theme", "page", "arrival", "device"] and len(set(columns)) == len(columns)  # each once, the new one before the ids
    assert {row[0] for row in conn.execute("SELECT theme FROM pageviews UNION ALL SELECT theme FROM events")} <= {empty}
    assert conn.execute("SELECT count(*) FROM pageviews WHERE theme = ?", (empty,)).fetchone()[0] == 5
    for table in ("daily", "monthly"):
        counted = conn.execute(f"SELECT value, sum(views), sum(visits) FROM {table} WHERE dim = 99 GROUP BY value").fetchall()
        assert counted == [(empty, 5, 2)], table


def test_a_file_that_is_not_sqlite_is_refused(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("these are not the pages you are looking for\n" * 100)
    with pytest.raises(StorageError, match="cannot use database"):
        connect(str(path))


def test_readonly_report_connection_needs_an_existing_database(tmp_path):
    with pytest.raises(StorageError, match="no database"):
        connect(str(tmp_path / "missing.db"), readonly=True)


def test_writer_stores_everything_on_close_and_keeps_counts_in_step(tmp_path):
    writer = Writer(connect(str(tmp_path / "w.db")), flush_interval=60)
    rng = random.Random(7)
    views = [
        view(T0 + rng.randrange(3 * DAY), path=rng.choice(["/", "/a", "/b"]), referrer=rng.choice(["", "google.com"]),
             country=rng.choice(["", "DE", "FR"]), screen=rng.choice(["", "390x844"]), language=rng.choice(["en", "de"]))
        for _ in range(500)
    ]
    for item in views:
        writer.submit(item)  # no visit: as for imported page views
    writer.submit(FilteredHit(T0, "example.org", "bot"))
    writer.close()  # the flush interval is a minute: only close() can have written them

    conn = connect(str(tmp_path / "w.db"), readonly=True)
    assert conn.execute("SELECT count(*) FROM pageviews").fetchone()[0] == 500
    for dim in pixeld.COUNTED:
        assert conn.execute("SELECT sum(views) FROM daily WHERE dim = ?", (dim.code,)).fetchone()[0] == 500
    report = query_report(conn, Query(Range(T0, T0 + 3 * DAY)))
    assert report.totals.views == 500
    assert section_counts(report.sections["pages"]) == Counter(v.path for v in views)
    assert section_counts(report.sections["countries"]) == Counter(v.country for v in views)
    assert report.filtered == {"bot": 1}


def test_writer_commits_within_a_second_or_so_without_being_closed(tmp_path):
    path = str(tmp_path / "live.db")
    writer = Writer(connect(path), flush_interval=0.2)
    writer.submit(view(T0))
    reader = connect(path, readonly=True)
    wait_for(lambda: reader.execute("SELECT count(*) FROM pageviews").fetchone()[0] == 1, seconds=5)
    writer.close()


def test_ids_sort_by_time_and_stay_unique_within_a_second(tmp_path):
    store = Store(connect(str(tmp_path / "ids.db")))
    store.write(Batch(views=[(view(T0 + 5), None)] * 3 + [(view(T0 + 1), None)] * 2 + [(view(T0 + 5), None)]))  # back to a second seen
    store.write(Batch(views=[(view(T0 + 5), None)] * 2))  # the same second again, in a later batch
    ids = [row[0] for row in store.conn.execute("SELECT id FROM pageviews")]
    assert len(set(ids)) == 8
    assert sorted(pixeld.second_of(i) for i in ids) == [T0 + 1] * 2 + [T0 + 5] * 6


def test_partial_days_are_counted_exactly_from_page_views(tmp_path):
    store = Store(connect(str(tmp_path / "edges.db")))
    times = [T0 + h * 3600 for h in range(0, 72, 3)]  # every 3 hours for 3 days
    store.write(Batch(views=[(view(t, path=f"/h{(t - T0) // 3600}"), None) for t in times]))
    for start, end in [(T0 + 7 * 3600, T0 + 50 * 3600), (T0 + 3600, T0 + 2 * 3600), (T0, T0 + 2 * DAY), (T0 + 12 * 3600, T0 + 3 * DAY)]:
        report = query_report(store.conn, Query(Range(start, end)))
        expected = [t for t in times if start <= t < end]
        assert report.totals.views == len(expected), (start, end)
        assert {row.value for row in report.sections["pages"]} == {f"/h{(t - T0) // 3600}" for t in expected}


def test_one_site_or_all_sites(tmp_path):
    store = Store(connect(str(tmp_path / "sites.db")))
    store.write(Batch(views=[(view(T0, "/"), None), (view(T0, "/", site="blog.example.org"), None), (view(T0, "/x"), None)]))
    everything = query_report(store.conn, Query(Range(T0, T0 + DAY)))
    assert everything.sites == ["blog.example.org", "example.org"]
    assert section_counts(everything.sections["pages"]) == {"example.org/": 1, "blog.example.org/": 1, "example.org/x": 1}
    one = query_report(store.conn, Query(Range(T0, T0 + DAY), site="example.org"))
    assert one.totals.views == 2 and section_counts(one.sections["pages"]) == {"/": 1, "/x": 1}


def test_a_second_with_more_ids_than_it_holds_spills_into_the_next(tmp_path):
    store = Store(connect(str(tmp_path / "spill.db")))
    per_second = 1 << pixeld.ID_SHIFT
    store.write(Batch(views=[(view(T0), None)] * (per_second + 10) + [(view(T0 + 1), None)] * 5))
    store.write(Batch(views=[(view(T0 + 1), None)] * 5))
    ids = [row[0] for row in store.conn.execute("SELECT id FROM pageviews ORDER BY id")]
    assert len(ids) == len(set(ids)) == per_second + 20
    assert query_report(store.conn, Query(Range(T0, T0 + DAY))).totals.views == per_second + 20


def test_a_failed_batch_is_kept_and_written_later(tmp_path):
    path = str(tmp_path / "locked.db")
    conn = connect(path)
    conn.execute("PRAGMA busy_timeout = 0")
    writer = Writer(conn, flush_interval=0.1, log=lambda message: None)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    writer.submit(view(T0))
    wait_for(lambda: writer.status() != "ok", seconds=5)  # it noticed the lock
    assert "locked" in writer.error
    blocker.execute("ROLLBACK")
    wait_for(lambda: writer.status() == "ok", seconds=5)  # it recovered
    writer.close()
    assert sqlite3.connect(path).execute("SELECT count(*) FROM pageviews").fetchone()[0] == 1
