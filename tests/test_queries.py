"""Queries: time zones (daylight saving, half-hour offsets), filters, series and the previous period,
over a real SQLite file written by the real Store."""

import datetime as dt
import json
import os
import sqlite3
import threading
import time

import pytest

import pixeld
from pixeld import DAY, Query, Range, Record, Store, connect, load_zone, query_report
from conftest import section_counts, view, wait_for

BERLIN = load_zone("Europe/Berlin")
KOLKATA = load_zone("Asia/Kolkata")


def write(store, **items):
    store.write(pixeld.Batch(**items))


def utc(text):
    return int(dt.datetime.fromisoformat(text).replace(tzinfo=dt.timezone.utc).timestamp())


@pytest.fixture
def store(tmp_path):
    made = Store(connect(str(tmp_path / "q.db")))
    yield made
    made.conn.close()


def test_a_day_with_a_daylight_saving_change_has_25_hours(store):
    # Berlin leaves summer time on 2026-10-25 at 03:00 CEST (01:00 UTC): that local day lasts 25 hours.
    times = [utc("2026-10-24T21:59:00"), utc("2026-10-24T22:00:00"), utc("2026-10-25T00:30:00"), utc("2026-10-25T01:30:00"), utc("2026-10-25T22:59:00"), utc("2026-10-25T23:00:00")]
    write(store, records=[Record(view(t), 1) for t in times])
    span = pixeld.named_range("yesterday", utc("2026-10-26T12:00:00"), lambda: None, BERLIN)
    assert span == Range(utc("2026-10-24T22:00:00"), utc("2026-10-25T23:00:00"))  # 25 hours
    report = query_report(store.conn, Query(span, BERLIN))
    assert report.totals.views == 4 and report.grain == "hour"
    hours = [dt.datetime.fromtimestamp(start, BERLIN).strftime("%H:%M%z") for start, _, _ in report.series]
    assert len(hours) == 25 and hours[2:5] == ["02:00+0200", "02:00+0100", "03:00+0100"]  # 02:00 twice, nothing skipped
    assert [views for _, views, _ in report.series if views] == [1, 1, 1, 1]

    week = query_report(store.conn, Query(Range(utc("2026-10-22T22:00:00"), utc("2026-10-27T23:00:00")), BERLIN))
    days = {dt.datetime.fromtimestamp(start, BERLIN).strftime("%m-%d"): views for start, views, _ in week.series}
    assert week.grain == "day" and days == {"10-23": 0, "10-24": 1, "10-25": 4, "10-26": 1, "10-27": 0}


def test_a_half_hour_zone_gets_exact_days(store):
    # 18:29 and 18:31 UTC fall on two different days in India (UTC+5:30).
    write(store, records=[Record(view(utc("2026-11-27T18:29:00")), 1), Record(view(utc("2026-11-27T18:31:00")), 1)])
    for date, expected in (("2026-11-27", 1), ("2026-11-28", 1)):
        span = pixeld.parse_range({"start": date, "end": date}, time.time(), lambda: None, KOLKATA)
        report = query_report(store.conn, Query(span, KOLKATA))
        assert report.totals.views == expected and sum(views for _, views, _ in report.series) == expected
    two_days = query_report(store.conn, Query(pixeld.parse_range({"start": "2026-11-27", "end": "2026-11-28"}, time.time(), lambda: None, KOLKATA), KOLKATA))
    assert [views for _, views, _ in two_days.series if views] == [1, 1]


def test_series_from_quarter_totals_equals_the_series_from_raw_rows(store):
    start = utc("2026-11-01T00:00:00")
    write(store, records=[Record(view(start + i * 997, f"/p{i % 7}"), i % 3) for i in range(600)])
    for span in (Range(start, start + 7 * DAY), Range(start + 1234, start + 6 * DAY + 77)):
        unfiltered = query_report(store.conn, Query(span, BERLIN))
        filtered = query_report(store.conn, Query(span, BERLIN, filters=(("device", "desktop"),)))  # every row matches; read raw
        assert unfiltered.series == filtered.series
        assert sum(views for _, views, _ in unfiltered.series) == unfiltered.totals.views == filtered.totals.views


@pytest.fixture
def mixed(store):
    day = utc("2026-11-20T00:00:00")
    rows = [
        view(day + 100, "/blog/a", referrer="news.ycombinator.com/item", country="DE", language="de"),
        view(day + 200, "/blog/b", referrer="google.com", country="DE", browser="Firefox", version="133", os="Linux"),
        view(day + 300, "/blog/", referrer="google.com/search", country="FR", os="macOS", browser="Safari", version="18"),
        view(day + 400, "/about", country="DE", device="phone", os="iOS", browser="Safari", version="17"),
        view(day + 500, "/", site="other.net", country="DE"),
    ]
    write(store, records=[Record(r, 1) for r in rows])
    return Range(day, day + DAY)


@pytest.mark.parametrize(
    "filters, pages",
    [
        ((("path", "/blog/a"),), {"/blog/a"}),
        ((("path", "/blog/*"),), {"/blog/a", "/blog/b", "/blog/"}),
        ((("referrer", "google.com*"),), {"/blog/b", "/blog/"}),
        ((("referrer", ""),), {"/about"}),  # (direct); "/" is another site
        ((("country", "DE"),), {"/blog/a", "/blog/b", "/about"}),
        ((("browser", "Safari"),), {"/blog/", "/about"}),
        ((("browser", "Safari 17"),), {"/about"}),
        ((("os", "Linux"),), {"/blog/b"}),
        ((("device", "phone"),), {"/about"}),
        ((("language", "de"),), {"/blog/a"}),
        ((("path", "/blog/*"), ("country", "DE"), ("browser", "Chrome")), {"/blog/a"}),
        ((("path", "/nowhere"),), set()),
    ],
)
def test_filters(store, mixed, filters, pages):
    report = query_report(store.conn, Query(mixed, site="example.org", filters=filters))
    shown = {row.value for row in report.sections["pages"]}
    assert shown == pages and report.totals.views == len(pages)
    assert sum(views for _, views, _ in report.series) == len(pages)
    assert sum(row.count for row in report.sections["countries"]) == len(pages)


def test_site_with_filters_and_without(store, mixed):
    assert query_report(store.conn, Query(mixed, site="other.net")).totals.views == 1
    assert query_report(store.conn, Query(mixed, site="other.net", filters=(("country", "DE"),))).totals.views == 1
    assert query_report(store.conn, Query(mixed, filters=(("country", "DE"),))).totals.views == 4


def test_previous_period(store):
    day = utc("2026-11-20T00:00:00")
    write(store, records=[Record(view(day - 3 * DAY), 1), Record(view(day + 3600), 1), Record(view(day + 7200), 0)])
    report = query_report(store.conn, Query(Range(day - 2 * DAY, day + DAY)))
    assert report.previous.views == 1 and report.totals.views == 2  # the 3 days before: 1 view
    assert query_report(store.conn, Query(Range(day, day + DAY))).previous.views == 0


def test_retention_deletes_old_page_views_daily_and_keeps_the_counts(tmp_path):
    db = tmp_path / "keep.db"
    now = [utc("2026-11-28T10:00:00")]
    store = Store(connect(str(db)))
    write(store, records=[Record(view(utc("2026-11-01T12:00:00")), 1), Record(view(utc("2026-11-20T12:00:00")), 1), Record(view(utc("2026-11-27T12:00:00")), 1)])
    store.conn.close()

    app = pixeld.App(pixeld.Config(db_path=str(db), keep_days=7, flush_interval=0.05), clock=lambda: now[0], log=lambda message: None)
    wait_for(lambda: count_rows(db) == 1)  # at start: everything before 2026-11-21 is gone
    now[0] += DAY
    time.sleep(0.3)
    assert count_rows(db) == 1  # a day later, 2026-11-27 is still within 7 days
    now[0] += 6 * DAY
    wait_for(lambda: count_rows(db) == 0)  # a week later it is not
    app.close()

    conn = connect(str(db), readonly=True)
    whole = query_report(conn, Query(Range(utc("2026-11-01T00:00:00"), utc("2026-11-29T00:00:00"))))
    assert whole.totals.views == 3 and whole.notes == []  # whole days come from the daily counts
    filtered = query_report(conn, Query(Range(utc("2026-11-01T00:00:00"), utc("2026-11-29T00:00:00")), filters=(("country", ""),)))
    assert filtered.totals.views == 0 and "were deleted (--keep-days)" in filtered.notes[0]


def count_rows(db):
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT count(*) FROM pageviews").fetchone()[0]
    finally:
        conn.close()


def test_report_json_has_filters_timezone_and_series_for_the_request(store, mixed):
    query = Query(mixed, BERLIN, "example.org", (("path", "/blog/*"),))
    document = json.loads(pixeld.render_json(query_report(store.conn, query), pixeld.ReportRequest(query, "json", None, "", False)))
    assert document["timezone"] == "Europe/Berlin" and document["filters"] == {"path": "/blog/*"}
    assert document["start"] == "2026-11-20T01:00:00+01:00" and document["series"]["grain"] == "hour"
    assert sum(row["pageviews"] for row in document["series"]["rows"]) == document["pageviews"] == 3


def test_months_days_and_subtracted_days_agree_with_raw_rows(store):
    """Partial months are the monthly row minus the days outside, or the days inside: both exact."""
    start = utc("2026-08-01T00:00:00")
    write(store, records=[Record(view(start + i * 5 * 3600 + 77, f"/p{i % 5}", country="DE" if i % 3 else "FR"), (i % 4) % 3, (i % 7) * ((i % 4) % 3 > 0)) for i in range(600)])
    for first, end in [("2026-08-25", "2026-10-05"), ("2026-08-03", "2026-10-28"), ("2026-08-10", "2026-08-20"), ("2026-09-01", "2026-09-30"), ("2026-08-02T06:00:00", "2026-10-30T18:00:00")]:
        span = pixeld.parse_range({"start": first, "end": end}, time.time(), lambda: None)
        planned = query_report(store.conn, Query(span))
        raw = query_report(store.conn, Query(span, filters=(("device", "desktop"),)))  # every row matches: read raw
        assert planned.totals == raw.totals and planned.previous == raw.previous, (first, end)
        assert planned.sections == raw.sections, (first, end)


def test_a_filtered_report_read_in_chunks_counts_what_the_daily_counts_hold(store, monkeypatch):
    """The raw pass of a filtered report (keys joined by SQLite, counted by Python, a few days at a time,
    with dimensions packed into one key or each in its own) agrees with the daily and monthly counts when
    every row matches, over two sites, with visits and engagement."""
    start = utc("2026-09-01T00:00:00")
    write(store, records=[
        Record(view(start + i * 7 * 3600 + 13, f"/p{i % 5}", site="example.org" if i % 4 else "other.net", referrer="google.com" if i % 3 else "",
                    first_today=bool(i % 2)), (i % 4) % 3, (i % 7) * ((i % 4) % 3 > 0), i % 50 if i % 5 else 0, i % 101 if i % 5 else None)
        for i in range(400)
    ])
    span = pixeld.parse_range({"start": "2026-09-03", "end": "2026-10-20"}, time.time(), lambda: None, BERLIN)
    planned = query_report(store.conn, Query(span, BERLIN))
    whole = query_report(store.conn, Query(span, BERLIN, filters=(("device", "desktop"),)))
    monkeypatch.setattr(pixeld, "MATCHED_CHUNK", 3)
    with pixeld.readers_for(store.conn, [span, span]) as conns:
        assert len(conns) == 2 and conns[1].in_transaction  # a second connection reads every other part
    chunked = query_report(store.conn, Query(span, BERLIN, filters=(("device", "desktop"),)))
    packed = []  # each stored column in a key of its own (a combination's dimensions share one), and all of them in one key
    columns = {pixeld.stored_column(dim.column) for dim in pixeld.COUNTED}
    for combinations in (0, 10**12):
        monkeypatch.setattr(pixeld, "KEY_COMBINATIONS", combinations)
        keys = pixeld.match_keys([store.conn], span, "")
        assert len([key for key in keys if not key.amount]) == (len(columns) if combinations == 0 else 1)
        packed.append(query_report(store.conn, Query(span, BERLIN, filters=(("device", "desktop"),))))
    assert planned.totals.views > 100 and planned.totals.engaged_views > 0 and len(planned.sites) == 2 and planned.previous.views >= 7
    for raw in (whole, chunked, *packed):
        assert raw.totals == planned.totals and raw.series == planned.series and raw.previous == planned.previous
        assert raw.sections == planned.sections


def test_a_filtered_series_by_the_hour_and_by_the_minute_is_the_unfiltered_one(store):
    """A filtered report's series is the totals of parts that end at its buckets' edges: by the hour
    in a zone half an hour off UTC, and by the minute, it equals the series from the counts."""
    start = utc("2026-09-01T00:00:00")
    write(store, records=[Record(view(start + i * 97, f"/p{i % 3}", first_today=bool(i % 2)), 1) for i in range(1500)])
    for span in (Range(start + 600, start + 2 * DAY - 900), Range(start + 3 * 3600 + 7, start + 4 * 3600 + 7)):
        planned = query_report(store.conn, Query(span, KOLKATA))
        filtered = query_report(store.conn, Query(span, KOLKATA, filters=(("device", "desktop"),)))
        assert planned.grain == filtered.grain and len(planned.series) > 20 and sum(row[1] for row in planned.series) == planned.totals.views > 30
        assert filtered.series == planned.series and filtered.totals == planned.totals


def test_an_event_filter_over_all_sites_keeps_each_events_site(store):
    """The quarter-hour totals know the sites of page views only: events of other sites keep their own."""
    day = utc("2026-11-20T00:00:00")
    write(store, records=[Record(view(day + 60, "/", site="pages.example"), 1)])
    write(store, events=[pixeld.Event("signup", view(day + 120, "/", site="one.example")), pixeld.Event("signup", view(day + 180, "/", site="two.example"))])
    report = query_report(store.conn, Query(Range(day, day + DAY), filters=(("event", "signup"),)))
    assert sorted(section_counts(report.sections["pages"]).items()) == [("one.example/", 1), ("two.example/", 1)]


def test_a_filtered_report_of_a_database_in_memory_is_read_by_its_one_connection():
    """A second connection reads half the parts of a filtered report from the same file; a database in
    memory has no file to open twice, and its one connection reads every part."""
    store = Store(connect(":memory:"))
    start = utc("2026-09-01T00:00:00")
    write(store, records=[Record(view(start + i * 3600, f"/p{i % 3}", first_today=bool(i % 2)), 1) for i in range(24 * 40)])
    span = Range(start, start + 40 * DAY)
    parts, _ = pixeld._reading_plan(store.conn, span, pixeld.series_bounds(span, dt.timezone.utc)[1], pixeld._scope(store.conn, Query(span)))
    assert len(parts) > 1
    with pixeld.readers_for(store.conn, parts) as conns:
        assert conns == [store.conn]
    planned = query_report(store.conn, Query(span))
    filtered = query_report(store.conn, Query(span, filters=(("device", "desktop"),)))
    assert filtered.totals == planned.totals and filtered.sections == planned.sections and filtered.series == planned.series


def test_the_threads_that_scan_for_a_report_yield_the_cpu_to_the_daemon(store):
    """Report readers run at a lower CPU priority than the thread that started them (Linux keeps one per thread)."""
    store.conn.create_function("niceness", 0, lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
    rows = list(pixeld.read_parallel([store.conn], "SELECT niceness()", [(), ()]))
    assert rows == [(min(19, os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) + pixeld.REPORT_NICENESS),)] * 2


@pytest.mark.parametrize("filters", [(), (("country", "DE"),)])
def test_a_range_over_decades_counts_what_its_data_holds_and_charts_years(store, filters):
    """Time before the first and after the last day with counts holds nothing: a range from 1970 to 2100
    counts what the same days within the data count, with a page view at each edge of the data, and
    charts one bucket per year, not 1,560 months."""
    first, last = utc("2025-12-31T23:59:59"), utc("2026-11-28T00:00:00")
    write(store, records=[Record(view(first, "/a", country="DE"), 1), Record(view(first + 1, "/b"), 1), Record(view(last, "/a", country="DE"), 1)])
    decades = query_report(store.conn, Query(Range(0, 4_102_444_800), filters=filters))
    data = query_report(store.conn, Query(Range(utc("2025-12-31T00:00:00"), utc("2026-11-29T00:00:00")), filters=filters))
    assert decades.totals == data.totals and decades.sections == data.sections
    assert decades.totals.views == (2 if filters else 3) and decades.previous == pixeld.Metrics()
    assert decades.grain == "year" and len(decades.series) == 130
    assert {pixeld.iso(start)[:4]: views for start, views, _ in decades.series if views} == {"2025": 1, "2026": 1 if filters else 2}
    empty = query_report(store.conn, Query(Range(utc("2030-01-01T00:00:00"), utc("2031-01-01T00:00:00")), filters=filters))
    assert empty.totals.views == 0 and sum(views for _, views, _ in empty.series) == 0
