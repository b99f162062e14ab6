"""Where each visit came from and what readers did (Privacy, Storage, Queries): a visit's source belongs
to all its page views, goals and their conversion rates, and exit pages. The real app, an injected
clock, a real SQLite file; the report through the app's own /report."""

import json
from urllib.parse import urlencode

import pytest

import pixeld
from pixeld import Config, ConfigError, parse_goals
from conftest import CHROME, FIREFOX, IPHONE, call, report_json, wait_for

NINE = 1_795_856_400  # 2026-11-28 09:00 UTC
HN = "https://news.ycombinator.com/item?id=42"


class Clock:
    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


def make_app(db, clock, *goals):
    return pixeld.App(Config(db_path=str(db), flush_interval=0.05, goals=parse_goals(goals)), clock=clock, log=lambda message: None)


def hit(app, clock, at, ip, ua=CHROME, **params):
    clock.now = at
    query = urlencode({"host": "example.org", **params})
    assert call(app, "/pixel.gif", query, remote=ip, USER_AGENT=ua).body == pixeld.GIF


def settle(app):
    """Wait until the writer has committed every hit handed to it."""
    wait_for(lambda: app.writer.waiting() == 0)


def report(app, **params):
    answer = call(app, "/report", urlencode({"format": "json", "range": "today", **params}))
    assert answer.status == 200, answer.body
    return json.loads(answer.body)


def rows(document, section, *keys):
    return {row["value"]: tuple(row[key] for key in keys) for row in document["sections"][section]}


def test_a_reader_from_hacker_news_who_reads_three_posts_is_one_hacker_news_visitor(tmp_path):
    clock = Clock(NINE)
    app = make_app(tmp_path / "hn.db", clock)
    try:
        hit(app, clock, NINE, "203.0.113.1", path="/post-1", referrer=HN)
        hit(app, clock, NINE + 60, "203.0.113.1", path="/post-2")  # internal navigation: no referrer
        hit(app, clock, NINE + 120, "203.0.113.1", path="/post-3")
        hit(app, clock, NINE + 130, "203.0.113.1", event="subscribe", path="/post-3")
        settle(app)
        document = report(app)
        assert (document["visitors"], document["visits"], document["pageviews"]) == (1, 1, 3)
        assert rows(document, "sources", "visitors", "visits", "count", "percent", "channel") == {"Hacker News": (1, 1, 3, 100.0, "social")}
        assert rows(document, "channels", "visitors", "count") == {"social": (1, 3)}  # no direct traffic at all
        assert rows(document, "referrers", "visitors", "count") == {"news.ycombinator.com/item": (1, 3)}
        for name, value in (("source", "Hacker News"), ("channel", "social"), ("referrer", "news.ycombinator.com/item")):
            filtered = report(app, **{name: value})
            assert (filtered["visitors"], filtered["visits"], filtered["pageviews"]) == (1, 1, 3), name
            assert filtered["sections"]["entry_pages"][0]["value"] == "/post-1" and filtered["sections"]["exit_pages"][0]["value"] == "/post-3"
        assert report(app, source="(direct)")["pageviews"] == 0
        assert rows(report(app, event="subscribe"), "sources", "count") == {"Hacker News": (1,)}  # the event came with the visit too
        text = call(app, "/report", "range=today").body.decode()
        assert next(line for line in text.splitlines() if line.startswith("Hacker News")).split()[2:] == ["1", "100.0%", "1", "3"]
    finally:
        app.close()


def test_visitors_by_source_are_daily_uniques_of_those_who_came_that_way(tmp_path):
    """One reader comes direct, later from Hacker News, and later again direct: one visitor in each
    source, two visits from direct; the headline's visitors stay one."""
    clock = Clock(NINE)
    app = make_app(tmp_path / "back.db", clock)
    try:
        hit(app, clock, NINE, "203.0.113.2", path="/")
        hit(app, clock, NINE + 3600, "203.0.113.2", path="/post", referrer=HN)
        hit(app, clock, NINE + 7200, "203.0.113.2", path="/")
        hit(app, clock, NINE + 7300, "203.0.113.3", ua=FIREFOX, path="/post", referrer=HN)
        settle(app)
        document = report(app)
        assert (document["visitors"], document["visits"]) == (2, 4)
        assert rows(document, "sources", "visitors", "visits") == {"Hacker News": (2, 2), "": (1, 2)}
        hn = report(app, source="Hacker News")
        assert (hn["visitors"], hn["visits"], hn["pageviews"]) == (2, 2, 2)
        assert report(app, source="(direct)")["visitors"] == 1
        assert report(app, source="Hacker News", browser="Firefox")["visitors"] == 1
    finally:
        app.close()


def test_goals_count_visitors_completions_and_conversion_rates_under_every_filter(tmp_path):
    clock = Clock(NINE)
    app = make_app(tmp_path / "goals.db", clock, "Newsletter=event:subscribe", "Thanks=path:/thanks*")
    try:
        hit(app, clock, NINE, "203.0.113.1", path="/post", referrer=HN)
        hit(app, clock, NINE + 10, "203.0.113.1", event="subscribe", path="/post")
        hit(app, clock, NINE + 20, "203.0.113.1", event="subscribe", path="/post")  # twice: one visitor, two completions
        hit(app, clock, NINE + 30, "203.0.113.1", path="/thanks/1")
        hit(app, clock, NINE + 40, "203.0.113.1", path="/thanks/2")
        hit(app, clock, NINE + 50, "203.0.113.2", ua=IPHONE, path="/", referrer="https://www.google.com/")
        hit(app, clock, NINE + 60, "203.0.113.3", ua=FIREFOX, path="/thanks", referrer="https://www.google.com/")
        hit(app, clock, NINE + 70, "203.0.113.4", ua=FIREFOX, path="/")
        settle(app)
        document = report(app)
        assert document["visitors"] == 4 and document["conversion_rate"] == 50.0  # two of four reached a goal
        goals = {row["value"]: (row["visitors"], row["count"], row["conversion_rate"]) for row in document["sections"]["goals"]}
        assert goals == {"Thanks": (2, 3, 50.0), "Newsletter": (1, 2, 25.0)}
        google = report(app, source="Google")
        assert google["visitors"] == 2 and google["conversion_rate"] == 50.0
        assert {row["value"]: row["conversion_rate"] for row in google["sections"]["goals"]} == {"Thanks": 50.0, "Newsletter": 0.0}
        hacker = report(app, source="Hacker News")
        assert {row["value"]: row["visitors"] for row in hacker["sections"]["goals"]} == {"Thanks": 1, "Newsletter": 1}
        assert report(app, browser="Firefox")["conversion_rate"] == 50.0
        text = call(app, "/report", "range=today").body.decode()
        assert "Conversion rate" in text and "Goals" in text
        csv_text = call(app, "/report", "range=today&format=csv").body.decode()
        assert "goals,Thanks,2,50.0" in csv_text and "totals,conversion_rate,50.0," in csv_text
    finally:
        app.close()


def test_without_goals_there_is_no_conversion_rate_and_a_goal_set_later_says_what_it_counts(tmp_path):
    clock = Clock(NINE)
    app = make_app(tmp_path / "later.db", clock)
    hit(app, clock, NINE, "203.0.113.1", path="/thanks")
    app.close()
    assert "conversion_rate" not in report_json(tmp_path / "later.db", "--range", "all")
    clock.now = NINE + 86_400
    app = make_app(tmp_path / "later.db", clock, "Thanks=path:/thanks")  # the day after
    hit(app, clock, NINE + 86_400, "203.0.113.1", path="/thanks")
    app.close()
    document = report_json(tmp_path / "later.db", "--range", "all", "--goal", "Thanks=path:/thanks")
    assert document["sections"]["goals"] == [{"value": "Thanks", "visitors": 1, "count": 2, "conversion_rate": 50.0}]
    assert any("goal Thanks was set on 2026-11-29" in note for note in document["notes"])


@pytest.mark.parametrize("value", ["=event:x", "A=page:/x", "A=path:thanks", "A=event:", "A", "N" * 65 + "=event:x"])
def test_a_goal_that_cannot_be_read_stops_start_up(value):
    with pytest.raises(ConfigError, match="cannot parse goal"):
        parse_goals([value])


def test_goals_from_the_environment_and_twice_by_name():
    assert [goal.name for goal in pixeld.goals_of(pixeld.build_parser().parse_args(["serve"]), {"PIXELD_GOALS": "A=event:a; B c=path:/b*"})] == ["A", "B c"]
    with pytest.raises(ConfigError, match="defined twice"):
        parse_goals(["A=event:a", "A=path:/a"])


def test_exits_are_each_visits_last_page_view_and_add_up_to_visits(tmp_path):
    clock = Clock(NINE)
    app = make_app(tmp_path / "exits.db", clock)
    try:
        for offset, ip, path in [(0, "1", "/"), (60, "1", "/a"), (120, "1", "/b"), (200, "2", "/"), (300, "3", "/a"), (360, "3", "/"),
                                 (300 + 3600, "3", "/b")]:  # the third reader's second visit, an hour later
            hit(app, clock, NINE + offset, f"203.0.113.{ip}", path=path)
        settle(app)
        document = report(app)
        exits = {row["value"]: (row["count"], row["exit_rate"]) for row in document["sections"]["exit_pages"]}
        assert exits == {"/b": (2, 100.0), "/": (2, 66.7)}
        assert sum(count for count, _ in exits.values()) == document["visits"] == 4
        assert {row["value"]: row["count"] for row in report(app, path="/b")["sections"]["exit_pages"]} == {"/b": 2}
        conn = pixeld.connect(str(tmp_path / "exits.db"), readonly=True)
        assert conn.execute("SELECT sum(exit), count(*) FROM pageviews").fetchone() == (4, 7)
        assert conn.execute("SELECT sum(exits) FROM daily WHERE dim = 1").fetchone() == (4,)
    finally:
        app.close()


def test_a_page_not_found_keeps_the_link_that_led_to_it_within_a_visit(tmp_path):
    """Within a visit from Hacker News, a broken link on the site itself is the site's to fix: the
    missing page's source is that internal link (direct), not the visit's source."""
    clock = Clock(NINE)
    app = make_app(tmp_path / "missing.db", clock)
    try:
        hit(app, clock, NINE, "203.0.113.1", path="/post", referrer=HN)
        hit(app, clock, NINE + 30, "203.0.113.1", path="/gone", referrer="https://example.org/post")
        hit(app, clock, NINE + 31, "203.0.113.1", event="404", path="/gone", referrer="https://example.org/post")
        hit(app, clock, NINE + 40, "203.0.113.2", ua=FIREFOX, path="/old", referrer=HN)
        hit(app, clock, NINE + 41, "203.0.113.2", ua=FIREFOX, event="404", path="/old", referrer=HN)
        settle(app)
        document = report(app)
        assert rows(document, "sources", "count") == {"Hacker News": (3,)}  # the page views belong to their visits
        missing = {row["value"]: [source["value"] for source in row["sources"]] for row in document["sections"]["not_found"]}
        assert missing == {"/gone": ["(direct)"], "/old": ["news.ycombinator.com/item"]}
    finally:
        app.close()


def test_a_campaigns_content_and_term_belong_to_its_visit(tmp_path):
    clock = Clock(NINE)
    app = make_app(tmp_path / "content.db", clock)
    try:
        hit(app, clock, NINE, "203.0.113.1", path="/", utm_source="newsletter", utm_medium="email", utm_campaign="dec", utm_content="header", utm_term="tea")
        hit(app, clock, NINE + 60, "203.0.113.1", path="/post")
        settle(app)
        document = report(app, campaign="newsletter / email / dec")
        assert document["pageviews"] == 2
        assert rows(document, "campaign_content", "count") == {"header": (2,)} and rows(document, "campaign_terms", "count") == {"tea": (2,)}
    finally:
        app.close()
