"""Report parameters, rendering (text and JSON) and the access rule, through the real WSGI app."""

import base64
import io
import json
import re

import pytest

import pixeld
from pixeld import DAY, Config, Range, ReportData, ReportError, parse_range, render_text
from conftest import call, make_sections, request_for, wait_for

NOW = 1_795_874_400  # 2026-11-28 10:00:00 UTC
TODAY = 1_795_824_000  # 2026-11-28 00:00:00 UTC


def no_data():
    return None


@pytest.mark.parametrize(
    "params, expected",
    [
        ({}, Range(TODAY - 29 * DAY, TODAY + DAY)),
        ({"range": "today"}, Range(TODAY, TODAY + DAY)),
        ({"range": "yesterday"}, Range(TODAY - DAY, TODAY)),
        ({"range": "7d"}, Range(TODAY - 6 * DAY, TODAY + DAY)),
        ({"range": "30d"}, Range(TODAY - 29 * DAY, TODAY + DAY)),
        ({"range": "month"}, Range(1_793_491_200, TODAY + DAY)),  # 2026-11-01
        ({"range": "year"}, Range(1_767_225_600, TODAY + DAY)),  # 2026-01-01
        ({"range": "all"}, Range(TODAY, TODAY + DAY)),
        ({"start": "2026-11-01", "end": "2026-11-02"}, Range(1_793_491_200, 1_793_491_200 + 2 * DAY)),  # end date included
        ({"start": "1793491200", "end": "1793494800"}, Range(1_793_491_200, 1_793_494_800)),
        ({"start": "2026-11-01T12:00:00", "end": "2026-11-01T13:30:00Z"}, Range(1_793_534_400, 1_793_539_800)),
        ({"start": "2026-11-01T12:00:00+01:00", "end": "2026-11-02"}, Range(1_793_530_800, 1_793_491_200 + 2 * DAY)),
        ({"start": "2026-11-27"}, Range(TODAY - DAY, TODAY + DAY)),
    ],
)
def test_parse_range(params, expected):
    assert parse_range(params, NOW, no_data) == expected


def test_range_all_starts_on_the_first_day_with_data():
    assert parse_range({"range": "all"}, NOW, lambda: TODAY // DAY - 100) == Range(TODAY - 100 * DAY, TODAY + DAY)


@pytest.mark.parametrize(
    "params, reason",
    [
        ({"start": "yesterday-ish"}, "cannot parse time"),
        ({"start": "2026-13-45"}, "cannot parse time"),
        ({"end": "99999999999999999999"}, "cannot parse time"),
        ({"range": "fortnight"}, "unknown range"),
        ({"range": "0d"}, "unknown range"),
        ({"range": "7d", "start": "2026-11-01"}, "either range or start/end"),
        ({"start": "2026-11-02", "end": "2026-11-01"}, "start must be before end"),
    ],
)
def test_bad_ranges_get_a_reason(params, reason):
    with pytest.raises(ReportError, match=reason):
        parse_range(params, NOW, no_data)


def sample_report(pageviews=3, entry_pages=(), **sections):
    totals = pixeld.Metrics(views=pageviews, visitors=2, visits=3, bounces=1, duration=250)
    previous = pixeld.Metrics(views=pageviews // 2, visitors=2, visits=4, bounces=0, duration=250)
    series = [(TODAY - (6 - i) * DAY, i, i // 2) for i in range(7)]
    query = pixeld.Query(Range(TODAY - 6 * DAY, TODAY + DAY))
    rows = make_sections(totals, entry_pages=list(entry_pages), events=[("signup", 3, 2)], **sections)
    return ReportData(query, ["example.org"], totals, previous, {"bot": 2, "spam": 1}, rows, "day", series, [])


def test_text_report_is_aligned_in_80_columns_and_cuts_long_values():
    long_path = "/" + "very-long-path-segment/" * 10
    rows = [(long_path, 2), ("/", 1)] + [(f"/p{i}", 1) for i in range(12)]
    report = sample_report(pageviews=14, pages=rows, referrers=[("", 3)])
    text = render_text(report, request_for(report))
    lines = text.splitlines()
    assert lines[0] == "pixeld report · all sites (example.org)"
    assert lines[1] == "2026-11-22 – 2026-11-28 UTC (7 days)"
    assert lines[3:10] == [
        "Visitors                 2  = 0%     (daily unique visitors, summed)",
        "Visits                   3  ▼ 25%",
        "Page views              14  ▲ 100%",
        "Pages per visit       4.67  ▲ 167%",
        "Bounce rate          33.3%  new",
        "Visit duration      1m 23s  ▲ 34%",
        "Filtered                 3  (bots 2, spam 1)",
    ]
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    page_rows = [line for line in lines if line.startswith("/very")]
    assert page_rows and page_rows[0].rstrip().endswith("2   14.3%") and "…" in page_rows[0]
    assert "… and 4 more" in lines
    assert any(line.startswith("(direct)") for line in lines)
    assert lines[lines.index("Countries" + " " * 53 + "     Views       %") + 1] == "(no page views)"


def test_json_report_has_the_same_data():
    report = sample_report(pageviews=4, pages=[("/", 3), ("/a", 1)])
    document = json.loads(pixeld.render_json(report, request_for(report, "json")))
    assert document["pageviews"] == 4
    assert (document["visitors"], document["visits"], document["pages_per_visit"], document["bounce_rate"], document["visit_duration"]) == (2, 3, 1.33, 33.3, 83)
    assert document["filtered"] == {"total": 3, "bot": 2, "spam": 1}
    assert document["sections"]["pages"] == [
        {"value": "/", "count": 3, "percent": 75.0, "time_on_page": None, "scroll_depth": None},
        {"value": "/a", "count": 1, "percent": 25.0, "time_on_page": None, "scroll_depth": None},
    ]
    assert document["start"] == "2026-11-22T00:00:00Z" and document["end"] == "2026-11-29T00:00:00Z"
    assert set(document["sections"]) == set(pixeld.SECTION_TITLES) - {"properties"}  # shown with event= only
    assert document["previous"]["pageviews"] == 2 and document["change"]["pageviews"] == 100 and document["change"]["bounce_rate"] is None
    assert document["series"]["grain"] == "day" and document["series"]["rows"][6] == {"start": "2026-11-28T00:00:00Z", "pageviews": 6, "visitors": 3}


@pytest.fixture
def app(tmp_path):
    def make(**settings):
        made = pixeld.App(Config(db_path=str(tmp_path / "app.db"), **settings), clock=lambda: NOW, log=lambda message: None)
        apps.append(made)
        return made

    apps = []
    yield make
    for made in apps:
        made.close()


def test_report_from_direct_loopback_without_a_token(app):
    made = app()
    assert call(made, "/report").status == 200
    assert call(made, "/report", AUTHORIZATION="Basic Og==").status == 200  # the README's curl -u ":$TOKEN" with no token set (":")
    assert call(made, "/report", remote="::1").status == 200
    assert call(made, "/report", remote="::ffff:127.0.0.1").status == 200


@pytest.mark.parametrize("header", ["X_FORWARDED_FOR", "FORWARDED", "X_REAL_IP"])
def test_report_through_a_proxy_is_refused_without_a_token(app, header):
    answer = call(app(), "/report", **{header: "for=203.0.113.5" if header == "FORWARDED" else "203.0.113.5"})
    assert answer.status == 403 and "--token" in answer.text and answer.text.count("\n") == 1


def test_report_from_elsewhere_is_refused_without_a_token(app):
    answer = call(app(), "/report", remote="203.0.113.5")
    assert answer.status == 403 and "--token" in answer.text


def test_report_with_a_token_needs_the_token_even_on_loopback(app):
    made = app(token="s3cret-token")
    assert call(made, "/report").status == 401
    assert call(made, "/report", AUTHORIZATION="Bearer wrong").status == 401
    assert call(made, "/report", AUTHORIZATION="Bearer s3cret-token\u00e9").status == 401
    assert call(made, "/report", remote="203.0.113.5", AUTHORIZATION="Bearer s3cret-token").status == 200
    assert call(made, "/report", X_FORWARDED_FOR="198.51.100.1", AUTHORIZATION="Bearer s3cret-token").status == 200
    assert call(made, "/report", AUTHORIZATION="Basic Og==").status == 401  # curl -u ":$TOKEN" with TOKEN unset
    assert call(made, "/report", AUTHORIZATION="Basic " + base64.b64encode(b":s3cret-token").decode()).status == 200  # and with it set


@pytest.mark.parametrize(
    "query, reason",
    [("start=soon", "cannot parse time"), ("format=xml", "unknown format"), ("range=fortnight", "unknown range"), ("site=%00", "cannot parse site")],
)
def test_bad_report_parameters_get_400_with_one_line(app, query, reason):
    answer = call(app(), "/report", query)
    assert answer.status == 400 and reason in answer.text and answer.text.count("\n") == 1
    assert answer.headers["content-type"].startswith("text/plain")


def test_report_formats(app):
    made = app()
    answer = call(made, "/report", "format=json&range=7d")
    assert answer.status == 200 and answer.headers["content-type"] == "application/json" and json.loads(answer.text)["pageviews"] == 0
    answer = call(made, "/report", "range=today")
    assert answer.status == 200 and answer.headers["content-type"].startswith("text/plain") and "2026-11-28 UTC (1 day)" in answer.text


def test_healthz_index_and_unknown_routes(app):
    made = app()
    answer = call(made, "/healthz")
    assert (answer.status, answer.text) == (200, "ok\n")
    answer = call(made, "/")
    assert answer.status == 200 and '<script data-local data-pixeld="">' in answer.text and answer.headers["content-type"].startswith("text/html")
    assert call(made, "/nope").status == 404
    answer = call(made, "/report", method="POST")
    assert answer.status == 405 and answer.headers["allow"] == "GET, HEAD"


@pytest.fixture
def busy_app(app):
    """An app with page views on eleven paths today and one yesterday."""
    made = app()
    for i in range(12):
        path = f"/p{i:02d}" if i else "/"
        environ_hit(made, path, "203.0.113.%d" % (i + 1), when=NOW - (DAY if i == 11 else 0))
    wait_for(lambda: json.loads(call(made, "/report", "range=2d&format=json").text)["pageviews"] == 12)  # the writer commits within a second
    return made


def environ_hit(app, path, ip, when):
    app.clock = lambda: when
    assert call(app, "/pixel.gif", f"path={path}&host=example.org", USER_AGENT=CHROME_UA, X_FORWARDED_FOR=ip).status == 200
    app.clock = lambda: NOW


CHROME_UA = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"


def test_limit_and_section(busy_app):
    text = call(busy_app, "/report", "range=today").text
    assert "… and 1 more" in text  # 11 pages today, 10 shown
    text = call(busy_app, "/report", "range=today&limit=3").text
    assert "… and 8 more" in text
    answer = call(busy_app, "/report", "range=today&section=pages")
    text = answer.text
    assert answer.status == 200 and "Referrers" not in text and "Visitors" not in text and "… and" not in text
    assert sum(1 for line in text.splitlines() if line.startswith("/")) == 11
    document = json.loads(call(busy_app, "/report", "range=today&format=json&section=entry_pages&limit=2").text)
    assert list(document["sections"]) == ["entry_pages"] and len(document["sections"]["entry_pages"]) == 2
    assert call(busy_app, "/report", "section=nope").status == 400
    assert call(busy_app, "/report", "limit=0").status == 400 and call(busy_app, "/report", "limit=ten").status == 400


def test_time_zone_parameter(busy_app):
    answer = call(busy_app, "/report", "range=today&tz=Asia/Tokyo")
    assert answer.status == 200 and "2026-11-28 Asia/Tokyo (1 day)" in answer.text
    answer = call(busy_app, "/report", "tz=Mars/Olympus_Mons")
    assert answer.status == 400 and "unknown time zone" in answer.text and answer.text.count("\n") == 1


def test_serve_timezone_sets_the_default(app):
    made = app(zone=pixeld.load_zone("America/New_York"))
    text = call(made, "/report", "range=today").text
    assert "2026-11-28 America/New_York (1 day)" in text


def test_ascii_bars_and_changes(busy_app):
    unicode_text = call(busy_app, "/report", "range=2d").text
    ascii_text = call(busy_app, "/report", "range=2d&ascii=1").text
    assert "█" in unicode_text and "▲" in unicode_text or "new" in unicode_text
    assert "#" in ascii_text and not any(ch in ascii_text for ch in "█▏▎▍▌▋▊▉▲▼")


def test_csv_is_long_form(busy_app):
    import csv as csv_module

    answer = call(busy_app, "/report", "range=7d&format=csv&path=/p0*")
    assert answer.status == 200 and answer.headers["content-type"].startswith("text/csv")
    rows = list(csv_module.reader(io.StringIO(answer.text)))
    assert rows[0] == ["section", "value", "count", "percent"]
    sections = {row[0] for row in rows[1:]}
    assert {"totals", "series", "series_visitors", "pages", "entry_pages", "entry_bounces", "countries"} <= sections
    pages = {row[1]: int(row[2]) for row in rows if row[0] == "pages"}
    assert pages == {f"/p0{i}": 1 for i in range(1, 10)}
    assert ["totals", "pageviews", "9", ""] in rows and sum(int(r[2]) for r in rows if r[0] == "series") == 9


@pytest.mark.parametrize("fmt", ["text", "json", "csv"])
def test_filters_with_every_format(busy_app, fmt):
    answer = call(busy_app, "/report", f"range=today&format={fmt}&path=/p1*&browser=Chrome%20131&country=(unknown)&device=desktop")
    body = answer.text
    assert answer.status == 200
    if fmt == "text":
        assert "Filters: path=/p1*, country=(none), browser=Chrome 131, device=desktop" in body
        assert re.search(r"^Page views +1 ", body, re.M)
    elif fmt == "json":
        document = json.loads(body)
        assert document["pageviews"] == 1 and document["filters"]["path"] == "/p1*"
    else:
        assert "totals,pageviews,1," in body


@pytest.mark.parametrize("fmt", ["json", "csv", "text", "html"])
def test_group_sets_the_series_grain_in_every_format(busy_app, fmt):
    answer = call(busy_app, "/report", f"range=30d&group=week&format={fmt}")
    assert answer.status == 200
    mondays = ["2026-11-02", "2026-11-09", "2026-11-16", "2026-11-23"]  # ISO weeks from Monday; the range starts on 2026-10-30
    if fmt == "json":
        series = json.loads(answer.text)["series"]
        assert series["grain"] == "week"
        assert [row["start"][:10] for row in series["rows"]] == ["2026-10-30", *mondays]
        assert series["rows"][-1]["pageviews"] == 12  # yesterday (Friday) and today (Saturday) are one week
    elif fmt == "csv":
        assert [row.split(",")[1][:10] for row in answer.text.splitlines() if row.startswith("series,")] == ["2026-10-30", *mondays]
    elif fmt == "text":
        assert "Page views per week" in answer.text and re.search(r"^2026-11-23 wk .*12 ", answer.text, re.M)
    else:
        assert "Page views per week" in answer.text and 'aria-current=page>week</a>' in answer.text
        assert 'href="?range=30d&amp;group=month"' in answer.text  # the other grains are a link away


def test_group_default_follows_the_range_and_each_grain_works(busy_app):
    grain = lambda query: json.loads(call(busy_app, "/report", query + "&format=json").text)["series"]  # noqa: E731
    assert grain("range=30d")["grain"] == "day" and grain("range=today")["grain"] == "hour"
    hours = grain("range=2d&group=hour")
    assert hours["grain"] == "hour" and len(hours["rows"]) >= 24 and sum(row["pageviews"] for row in hours["rows"]) == 12
    days = grain("range=today&group=day")
    assert days["rows"] == [{"start": "2026-11-28T00:00:00Z", "pageviews": 11, "visitors": 11}]
    months = grain("range=30d&group=month")
    assert [row["start"][:10] for row in months["rows"]] == ["2026-10-30", "2026-11-01"] and months["rows"][1]["pageviews"] == 12
    years = grain("range=30d&group=year")
    assert [row["start"][:10] for row in years["rows"]] == ["2026-10-30"] and years["rows"][0]["pageviews"] == sum(row["pageviews"] for row in months["rows"])  # the range's part of 2026
    tokyo = grain("range=2d&group=day&tz=Asia/Tokyo")
    assert all(row["start"].endswith("T00:00:00+09:00") for row in tokyo["rows"][1:])


def test_group_with_a_filter(busy_app):
    series = json.loads(call(busy_app, "/report", "range=30d&group=week&format=json&path=/p1*").text)["series"]
    assert series["grain"] == "week" and [row["pageviews"] for row in series["rows"]] == [0, 0, 0, 0, 2]  # /p10 yesterday, /p1 today


@pytest.mark.parametrize("query, reason", [("group=decade", "unknown group"), ("group=", ""), ("start=2000-01-01&group=hour", "more than 10,000 points")])
def test_bad_group_gets_400_with_one_line(busy_app, query, reason):
    answer = call(busy_app, "/report", query)
    if not reason:
        assert answer.status == 200  # empty: chosen by the range
        return
    assert answer.status == 400 and reason in answer.text and answer.text.count("\n") == 1
