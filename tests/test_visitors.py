"""Privacy section: salted visitor keys in memory, visits, daily uniques and rate limits; then the
whole app with an injected clock: visitors, visits, bounces and durations in the report."""

import pytest

import pixeld
from pixeld import DAY, VISIT_TIMEOUT, Config, Visitors
from conftest import CHROME, FIREFOX, IPHONE, call, report_json

MIDNIGHT = 1_795_824_000  # 2026-11-28 00:00:00 UTC


def test_one_visitor_one_visit_while_page_views_come_within_30_minutes():
    visitors = Visitors(rate_limit=0)
    first = visitors.observe(MIDNIGHT + 3600, "example.org", "198.51.100.1", CHROME)
    second = visitors.observe(MIDNIGHT + 3600 + 600, "example.org", "198.51.100.1", CHROME)
    third = visitors.observe(MIDNIGHT + 3600 + 600 + VISIT_TIMEOUT, "example.org", "198.51.100.1", CHROME)
    assert first.first_today and not second.first_today and not third.first_today
    assert second.step.visit == first.step.visit and (second.step.views, second.step.duration) == (2, 600)
    assert (third.step.views, third.step.duration) == (3, 600 + VISIT_TIMEOUT)
    later = visitors.observe(MIDNIGHT + 3600 + 600 + 2 * VISIT_TIMEOUT + 1, "example.org", "198.51.100.1", CHROME)
    assert later.step.visit != first.step.visit and later.step.views == 1 and not later.first_today


@pytest.mark.parametrize("other", [("blog.example.org", "198.51.100.1", CHROME), ("example.org", "198.51.100.2", CHROME), ("example.org", "198.51.100.1", FIREFOX)])
def test_site_address_and_user_agent_each_make_a_different_visitor(other):
    visitors = Visitors(rate_limit=0)
    mine = visitors.observe(MIDNIGHT + 60, "example.org", "198.51.100.1", CHROME)
    theirs = visitors.observe(MIDNIGHT + 61, *other)
    assert theirs.first_today and theirs.step.visit != mine.step.visit


def test_a_visit_across_midnight_is_one_visit_and_the_visitor_counts_on_both_days():
    visitors = Visitors(rate_limit=0)
    before = visitors.observe(MIDNIGHT - 300, "example.org", "198.51.100.1", CHROME)
    salt_before = visitors.salts()
    after = visitors.observe(MIDNIGHT + 300, "example.org", "198.51.100.1", CHROME)
    assert after.step.start == before.step.start and after.step.views == 2 and after.step.duration == 600
    assert after.first_today  # a new day: counted again
    assert visitors.salts()[0] != salt_before[0] and visitors.salts()[1] == salt_before[0]  # rotated; yesterday's kept a while
    visitors.observe(MIDNIGHT + VISIT_TIMEOUT, "example.org", "198.51.100.9", CHROME)
    assert len(visitors.salts()) == 1  # every visit begun under yesterday's salt has ended: it is gone


def test_after_a_long_gap_yesterday_is_forgotten_at_once():
    visitors = Visitors(rate_limit=0)
    visitors.observe(MIDNIGHT - 5 * DAY, "example.org", "198.51.100.1", CHROME)
    visitors.observe(MIDNIGHT, "example.org", "198.51.100.1", CHROME)
    assert len(visitors.salts()) == 1


def test_rate_limit_per_visitor_per_minute():
    visitors = Visitors(rate_limit=3)
    minute = MIDNIGHT + 600 - 600 % 60
    answers = [visitors.observe(minute + i, "example.org", "198.51.100.1", CHROME) for i in range(5)]
    assert [a is not None for a in answers] == [True, True, True, False, False]
    assert visitors.observe(minute + 61, "example.org", "198.51.100.1", CHROME) is not None
    assert visitors.observe(minute + 5, "example.org", "198.51.100.2", CHROME) is not None  # someone else


def test_visitors_keep_nothing_but_salts_and_hashes():
    visitors = Visitors(rate_limit=0)
    visitors.observe(MIDNIGHT, "example.org", "198.51.100.1", CHROME)
    [generation] = [visitors._current]
    key = generation.key("example.org", "198.51.100.1", CHROME)
    assert key < 2**57 and generation.find(key) == 0 and len(generation) == 1  # a 7-byte keyed hash, and a number
    assert set(generation.keys) == {0, key}


class Clock:
    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


def hit(app, path, ip, ua=CHROME, **params):
    query = "&".join(f"{k}={v}" for k, v in {"path": path, "host": "example.org", **params}.items())
    assert call(app, "/pixel.gif", query, remote=ip, USER_AGENT=ua).body == pixeld.GIF


def between(start, end):
    """The report flags for the time from start to end, in unix seconds."""
    return ("--range", "", "--start", str(start), "--end", str(end))


def make_app(db, clock):
    return pixeld.App(Config(db_path=str(db), flush_interval=0.05), clock=clock, log=lambda message: None)


def test_visitors_visits_bounces_and_durations_in_the_report(tmp_path):
    db, clock = tmp_path / "v.db", Clock(MIDNIGHT + 9 * 3600)
    app = make_app(db, clock)
    # Alice: three pages over 4 minutes. Bob: one page (a bounce). Carol: a page, then again after 40 minutes.
    for offset, path, ip, ua in [
        (0, "/", "203.0.113.1", CHROME), (60, "/a", "203.0.113.1", CHROME), (240, "/b", "203.0.113.1", CHROME),
        (30, "/a", "203.0.113.2", FIREFOX),
        (100, "/", "203.0.113.3", IPHONE), (100 + 40 * 60, "/", "203.0.113.3", IPHONE),
    ]:
        clock.now = MIDNIGHT + 9 * 3600 + offset
        hit(app, path, ip, ua)
    app.close()
    data = report_json(db, *between(MIDNIGHT, MIDNIGHT + DAY))
    assert (data["visitors"], data["visits"], data["pageviews"]) == (3, 4, 6)
    assert data["bounce_rate"] == 75.0  # Bob and both of Carol's visits
    assert data["pages_per_visit"] == 1.5 and data["visit_duration"] == 60  # 240 s over 4 visits
    assert data["sections"]["entry_pages"] == [
        {"value": "/", "visits": 3, "bounce_rate": 66.7},
        {"value": "/a", "visits": 1, "bounce_rate": 100.0},
    ]
    # The same numbers from raw page views, for a range that is not whole days.
    partial = report_json(db, *between(MIDNIGHT + 3600, MIDNIGHT + 23 * 3600))
    for key in ("visitors", "visits", "pageviews", "bounce_rate", "pages_per_visit", "visit_duration", "sections"):
        assert partial[key] == data[key], key


def test_midnight_and_restart(tmp_path):
    db, clock = tmp_path / "m.db", Clock(MIDNIGHT - 120)
    app = make_app(db, clock)
    hit(app, "/late", "203.0.113.7")
    clock.now = MIDNIGHT + 120
    hit(app, "/after-midnight", "203.0.113.7")
    app.close()
    yesterday, today = report_json(db, *between(MIDNIGHT - DAY, MIDNIGHT)), report_json(db, *between(MIDNIGHT, MIDNIGHT + DAY))
    assert (yesterday["visitors"], yesterday["visits"], yesterday["visit_duration"]) == (1, 1, 240)
    assert (today["visitors"], today["visits"], today["pageviews"]) == (1, 0, 1)  # one visit, begun yesterday
    assert yesterday["bounce_rate"] == 0.0

    app = make_app(db, clock)  # a restart forgets everyone: the same reader counts again today
    clock.now = MIDNIGHT + 180
    hit(app, "/after-restart", "203.0.113.7")
    app.close()
    today = report_json(db, *between(MIDNIGHT, MIDNIGHT + DAY))
    assert (today["visitors"], today["visits"], today["pageviews"]) == (2, 1, 2)


def test_entry_rows_carry_the_visit_and_other_rows_nothing(tmp_path):
    db, clock = tmp_path / "e.db", Clock(MIDNIGHT + 3600)
    app = make_app(db, clock)
    for offset in (0, 10, 95):
        clock.now = MIDNIGHT + 3600 + offset
        hit(app, f"/p{offset}", "203.0.113.5")
    app.close()
    conn = pixeld.connect(str(db), readonly=True)
    rows = conn.execute("SELECT first_today, visit_views, duration FROM pageviews ORDER BY id").fetchall()
    assert rows == [(1, 3, 95), (0, 0, 0), (0, 0, 0)]


def test_beyond_the_cap_visitors_are_counted_but_not_remembered(monkeypatch):
    monkeypatch.setattr(pixeld, "MAX_VISITORS", 3)
    visitors = Visitors(rate_limit=1)
    for n in range(3):
        visitors.observe(MIDNIGHT + n, "example.org", f"198.51.100.{n}", CHROME)
    crowd = [visitors.observe(MIDNIGHT + 10 + n, "example.org", "198.51.100.99", CHROME) for n in range(3)]
    assert visitors.remembered() == 3
    assert all(seen.first_today and seen.step.views == 1 and seen.step.generation is None for seen in crowd)  # no rate limit, no visit
    assert visitors.engage(MIDNIGHT + 20, "example.org", "198.51.100.99", CHROME, "/", 5.0, 50) is None
    assert visitors.observe(MIDNIGHT + 90, "example.org", "198.51.100.1", CHROME).step.views == 2  # the first three still are


@pytest.mark.parametrize("second_page", [False, True])
def test_engagement_across_midnight_lands_on_its_page_view(tmp_path, second_page):
    """The writer writes the whole batch at close: the visit is carried into the new day (with a second
    page view) before the writer has said where it wrote the first page view, and learns it through the carry."""
    db, clock = tmp_path / "n.db", Clock(MIDNIGHT - 10)
    app = make_app(db, clock)
    hit(app, "/late", "203.0.113.8")
    clock.now = MIDNIGHT + 5
    if second_page:
        hit(app, "/early", "203.0.113.8")
    hit(app, "/late", "203.0.113.8", engagement=1, engaged=42, scroll=70)
    app.close()
    conn = pixeld.connect(str(db), readonly=True)
    rows = conn.execute("SELECT visit_views, duration, engaged, scroll FROM pageviews ORDER BY id").fetchall()
    assert rows[0] == ((2 if second_page else 1), 42, 42, 70)  # the visit lasts until the end of its engagement
    yesterday = report_json(db, *between(MIDNIGHT - DAY, MIDNIGHT))
    assert yesterday["time_on_page"] == 42 and yesterday["scroll_depth"] == 70


def test_raw_inputs_are_cached_only_until_the_salt_rotates(tmp_path):
    clock = Clock(MIDNIGHT + 23 * 3600)
    app = make_app(tmp_path / "m.db", clock)
    try:
        hit(app, "/", "203.0.113.9")  # the first hit brings the first salt
        hit(app, "/", "203.0.113.1", referrer="https://news.example.net/a?utm_x=1")
        assert app.memo.size() >= 3  # the address, the User-Agent and the referrer (and more)
        clock.now += 3600  # past 00:00 UTC: a new salt
        hit(app, "/", "203.0.113.2")
        assert app.memo.size() == 0  # emptied with the new salt
        memo = pixeld.Memo(limit=10)
        for n in range(1000):
            memo(str, n)
        assert memo.size() <= 10
    finally:
        app.close()
