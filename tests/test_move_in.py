"""Moving in from GoatCounter, Plausible and Umami: their exports, written by hand from their documented
formats (GoatCounter's tpl/help/export.md, Plausible's CSV export, Umami's website_event and session
tables), imported by the real command line into a real SQLite file, read back through the report."""

import csv
import gzip
import io
import json
import random
import sqlite3
import zipfile

import pytest

import pixeld
from conftest import CHROME, report_json, run_pixeld

GOATCOUNTER_HEADER = "2Path,Title,Event,UserAgent,Browser,System,Session,Bot,Referrer,Referrer scheme,Screen size,Location,FirstVisit,Date"
SESSION_A, SESSION_B, SESSION_C = "287fb97cbed4e4f-8e4f5c975b8fee06", "c8b722d57674550-bcd20ab1989d7739", "aaaabbbbccccddd-eeeeffff00001111"
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'
HOSTILE_SESSION = HOSTILE + " session"


def goatcounter_rows():
    """Three sessions on 2024-03-01: a visit of three page views from Reddit (and an event), a bounce from a
    grouped referrer, a campaign visit; two later visits from an app and a grouped mailer; and a bot."""
    return [
        ["/blog/a", "Post A", "0", "", "Chrome 86", "Windows 7", SESSION_A, "0", "www.reddit.com/r/golang", "h", "1280,768,1", "US-TX", "1", "2024-03-01T10:00:00Z"],
        ["/blog/b", "Post B", "false", "", "Chrome 86", "Windows 7", SESSION_A, "0", "", "", "1280,768,1", "US-TX", "0", "2024-03-01T10:05:00Z"],
        ["click-cv", "", "1", "", "Chrome 86", "Windows 7", SESSION_A, "0", "", "", "1280,768,1", "US-TX", "0", "2024-03-01T10:06:00Z"],
        ["/", "Home", "true" if False else "0", "", "Safari 14.0", "macOS 10.15", SESSION_B, "0", "Hacker News", "g", "1680,0,1", "RO", "1", "2024-03-01T11:00:00Z"],
        ["/blog/a", "Post A", "0", "", "Firefox 120", "Linux", SESSION_C, "0", "newsletter", "c", "", "DE-BE", "1", "2024-03-01T12:00:00Z"],
        ["/blog/a", "Post A", "0", "", "Firefox 120", "Linux", SESSION_C, "0", "com.google.android.gm", "o", "", "DE-BE", "1", "2024-03-01T14:00:00Z"],
        ["/blog/b", "Post B", "0", "", "Firefox 120", "Linux", SESSION_C, "0", "Email", "g", "", "DE-BE", "1", "2024-03-01T16:00:00Z"],
        ["/wp-login.php", "", "0", "", "", "", "bbbb", "3", "", "", "", "", "1", "2024-03-01T16:30:00Z"],
    ]


def write_csv(path, header, rows, gzipped=False):
    text = io.StringIO()
    text.write(header + "\n")
    csv.writer(text, lineterminator="\n").writerows(rows)
    if gzipped:
        path.write_bytes(gzip.compress(text.getvalue().encode()))
    else:
        path.write_text(text.getvalue())
    return path


def imported(tmp_path, path, *args, db_name="pixeld.db"):
    db = tmp_path / db_name
    code, out, err = run_pixeld("import", str(path), "--db", str(db), *args)
    return code, err, db


def whole(db, *args):
    return report_json(db, "--range", "all", *args)


def section(document, name):
    return {row["value"]: row for row in document["sections"][name]}


def database_bytes(db):
    return b"".join(path.read_bytes() for path in db.parent.glob(db.name + "*"))


# ---- GoatCounter -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gzipped", [False, True], ids=["plain", "gzipped"])
@pytest.mark.parametrize("header", [GOATCOUNTER_HEADER, "2," + GOATCOUNTER_HEADER[1:]], ids=["test-data header", "help-page header"])
def test_goatcounter_export(tmp_path, header, gzipped):
    path = write_csv(tmp_path / ("export.csv.gz" if gzipped else "export.csv"), header, goatcounter_rows(), gzipped)
    code, err, db = imported(tmp_path, path, "--site", "example.org")
    assert code == 0, err
    assert "imported 7 page views and events" in err and "1 filtered" in err and "rows/s" in err
    report = whole(db)
    # Sessions A, B and C are three visitors of the day; C came back twice after more than 30 minutes: five visits.
    assert (report["visitors"], report["visits"], report["pageviews"]) == (3, 5, 6)
    assert report["bounce_rate"] == 80.0 and report["visit_duration"] == 60  # A: 5 minutes over two page views
    assert report["filtered"] == {"total": 1, "bot": 1}
    sources = section(report, "sources")
    assert sources["Reddit"]["channel"] == "social" and sources["Hacker News"]["channel"] == "social"
    assert sources["newsletter"]["channel"] == "campaign" and sources["Gmail"]["channel"] == "email" and sources["Email"]["channel"] == "email"
    assert set(section(report, "referrers")) == {"reddit.com/r/golang", "news.ycombinator.com", "newsletter (campaign)", "com.google.android.gm", "Email (email)"}
    assert section(report, "campaigns")["newsletter /  / "]["visitors"] == 1
    assert {name: row["count"] for name, row in section(report, "browsers").items()} == {"Chrome 86": 2, "Safari 14": 1, "Firefox 120": 3}
    assert set(section(report, "operating_systems")) == {"Windows", "macOS", "Linux"}
    assert section(report, "devices")["desktop"]["count"] == 6
    assert {name: row["count"] for name, row in section(report, "screens").items()} == {"1280x768": 2, "1680": 1, "": 3}
    assert {name: row["count"] for name, row in section(report, "countries").items()} == {"US": 2, "RO": 1, "DE": 3}
    assert section(report, "events")["click-cv"]["count"] == 1
    stored = database_bytes(db)
    for session in (SESSION_A, SESSION_B, SESSION_C):
        assert session.encode() not in stored and session[:15].encode() not in stored


def test_goatcounter_export_of_an_old_version_or_without_its_columns_is_refused(tmp_path):
    old = write_csv(tmp_path / "v1.csv", "1Path,Title,Event,Bot,Session,FirstVisit,Referrer,Referrer scheme,Browser,Screen size,Location,Date", [])
    code, err, db = imported(tmp_path, old, "--site", "example.org")
    assert code == 2 and "version 1" in err and len(err.strip().splitlines()) == 1 and not db.exists()
    short = write_csv(tmp_path / "short.csv", "2Path,Title,Event", [["/", "x", "0"]])
    code, err, db = imported(tmp_path, short, "--site", "example.org")
    assert code == 2 and "session, date" in err and not db.exists()
    code, err, db = imported(tmp_path, write_csv(tmp_path / "e.csv", GOATCOUNTER_HEADER, goatcounter_rows()))
    assert code == 2 and "--site" in err and not db.exists()
    truncated = tmp_path / "cut.csv.gz"
    truncated.write_bytes(gzip.compress(b"x" * 100_000)[:200])
    code, err, db = imported(tmp_path, truncated, "--site", "example.org")
    assert code == 2 and len(err.strip().splitlines()) == 1 and not db.exists()
    broken = tmp_path / "broken.csv.gz"
    whole_file = gzip.compress((GOATCOUNTER_HEADER + "\n" + "/,t,0,,,,s,0,,,,,1,2024-03-01T10:00:00Z\n" * 50_000).encode())
    broken.write_bytes(whole_file[: len(whole_file) // 2])  # cut in the middle, after a readable start
    code, err, db = imported(tmp_path, broken, "--site", "example.org")
    assert code == 2 and "cannot read" in err and len(err.strip().splitlines()) == 1 and not db.exists()


def test_goatcounter_bad_rows_are_skipped_and_huge_fields_cut(tmp_path):
    good = goatcounter_rows()[0]
    rows = [
        good[:-1] + ["yesterday"],  # a bad date
        good[:-1] + ["1999-12-31T23:59:59Z"],  # before 2000
        good[:5],  # too few columns
        good + ["extra"],  # too many
        ["/" + "p" * 100_000, "t" * 100_000, "0", "", "B" * 50_000 + " 1", "S" * 50_000, "s" * 50_000, "0", "r" * 100_000, "h", "9" * 5000, "Z" * 5000, "1",
         "2024-03-02T00:00:00Z"],
    ]
    path = write_csv(tmp_path / "bad.csv", GOATCOUNTER_HEADER, rows)
    code, err, db = imported(tmp_path, path, "--site", "example.org")
    assert code == 0, err
    assert "imported 1 page views" in err and "4 lines skipped" in err
    report = whole(db)
    (page,) = report["sections"]["pages"]
    assert len(page["value"]) == 2048
    assert all(len(row["value"]) <= 1024 for name in ("referrers", "browsers", "operating_systems", "countries", "screens") for row in report["sections"][name])


def test_importing_twice_counts_nothing_twice(tmp_path):
    path = write_csv(tmp_path / "export.csv", GOATCOUNTER_HEADER, goatcounter_rows())
    code, err, db = imported(tmp_path, path, "--site", "example.org")
    assert code == 0, err
    before = whole(db)
    code, err, _ = imported(tmp_path, path, "--site", "example.org")
    assert code == 2 and "was imported on" in err and "--force" in err
    assert whole(db) == before


# ---- Umami -------------------------------------------------------------------------------------------------

UMAMI_HEADER = (
    "event_id,website_id,session_id,visit_id,created_at,url_path,url_query,utm_source,utm_medium,utm_campaign,utm_content,utm_term,referrer_path,"
    "referrer_query,referrer_domain,page_title,gclid,fbclid,msclkid,ttclid,li_fat_id,twclid,event_type,event_name,tag,hostname,"
    "session_id,website_id,browser,os,device,screen,language,country,region,city,distinct_id,created_at"
)
UMAMI_SESSION = "8f9d4c1e-2b3a-4c5d-9e8f-0a1b2c3d4e5f"


def umami_row(created, path, session=UMAMI_SESSION, visit="v-1", kind="1", name="", referrer=("", ""), title="T", utm=("", "", ""), query="",
              browser="chrome", os_name="Windows 10", device="desktop", screen="1920x1080", language="en-US", country="DE", host="example.org"):
    return ["e", "w", session, visit, created, path, query, *utm, "", "", referrer[1], "", referrer[0], title, "", "", "", "", "", "", kind, name, "", host,
            session, "w", browser, os_name, device, screen, language, country, "BE", "Berlin", "", "2020-01-01 00:00:00+00"]


def test_umami_events_and_sessions(tmp_path):
    rows = [
        umami_row("2024-03-01 10:00:00.123+00", "/a", referrer=("www.google.com", "/search")),
        umami_row("2024-03-01 10:02:00+00", "/b"),
        umami_row("2024-03-01 10:03:00+00", "/b", kind="2", name="signup"),
        umami_row("2024-03-01 10:04:00+00", "/b", kind="5"),  # web vitals: not a page view
        umami_row("2024-03-01T11:00:00Z", "/", session="other-session", browser="ios", os_name="iOS", device="mobile", screen="390x844", language="fr",
                  country="FR", utm=("Newsletter", "email", "march")),
        umami_row("2024-03-01 12:00:00+00", "/", session="bot-session", browser="searchbot", os_name="", device=""),
    ]
    path = write_csv(tmp_path / "umami.csv", UMAMI_HEADER, rows)
    code, err, db = imported(tmp_path, path)
    assert code == 0, err
    assert "imported 4 page views and events" in err and "1 filtered" in err and "1 lines skipped" in err
    report = whole(db)
    assert (report["visitors"], report["visits"], report["pageviews"], report["bounce_rate"]) == (2, 2, 3, 50.0)
    assert report["sites"] == ["example.org"]
    assert section(report, "sources")["Google"]["channel"] == "search" and section(report, "sources")["newsletter"]["channel"] == "campaign"
    assert set(section(report, "browsers")) == {"Chrome", "Safari"} and set(section(report, "operating_systems")) == {"Windows", "iOS"}
    assert set(section(report, "devices")) == {"desktop", "phone"} and set(section(report, "languages")) == {"en", "fr"}
    assert section(report, "events")["signup"]["count"] == 1
    # The event's own created_at is read, not the session's (the same name comes twice in a join).
    assert report["start"].startswith("2024-03-01")
    stored = database_bytes(db)
    assert UMAMI_SESSION.encode() not in stored and b"other-session" not in stored and b"v-1" not in stored


def test_umami_without_its_columns_is_refused(tmp_path):
    path = write_csv(tmp_path / "u.csv", "event_id,url_path,session_id", [["e", "/", "s"]])
    code, err, db = imported(tmp_path, path)
    assert code == 2 and "created_at" in err and not db.exists()


# ---- Plausible ---------------------------------------------------------------------------------------------

PLAUSIBLE = {
    "visitors": "date,visitors,pageviews,bounces,visits,visit_duration\n2024-01-01,10,30,4,12,600\n2024-01-02,5,8,2,6,100\n",
    "sources": "date,source,referrer,utm_source,utm_medium,utm_campaign,utm_content,utm_term,pageviews,visitors,visits,visit_duration,bounces\n"
               "2024-01-01,Google,,,,,,,20,6,7,300,2\n2024-01-01,,,,,,,,10,4,5,300,2\n2024-01-02,Hacker News,news.ycombinator.com/item,,,,,,8,5,6,100,2\n",
    "pages": "date,hostname,page,visits,visitors,pageviews,total_scroll_depth,total_scroll_depth_visits\n"
             "2024-01-01,example.org,/,10,9,20,\\N,0\n2024-01-01,example.org,/about,3,3,10,0,0\n2024-01-02,example.org,/,5,5,8,0,0\n",
    "entry_pages": "date,entry_page,visitors,entrances,visit_duration,bounces,pageviews\n2024-01-01,/,9,12,600,4,30\n2024-01-02,/,5,6,100,2,8\n",
    "exit_pages": "date,exit_page,visitors,visit_duration,exits,bounces,pageviews\n2024-01-01,/about,3,100,5,1,10\n2024-01-01,/,3,100,7,1,10\n",
    "custom_events": "date,name,link_url,path,visitors,events\n2024-01-01,Signup,,,2,3\n2024-01-01,engagement,,,9,40\n",
    "locations": "date,country,region,city,visitors,visits,visit_duration,bounces,pageviews\n2024-01-01,DE,DE-BE,2950159,6,7,300,2,20\n",
    "devices": "date,device,visitors,visits,visit_duration,bounces,pageviews\n2024-01-01,Desktop,6,7,300,2,20\n2024-01-01,Mobile,4,5,300,2,10\n",
    "browsers": "date,browser,browser_version,visitors,visits,visit_duration,bounces,pageviews\n2024-01-01,Chrome,120.0,6,7,300,2,20\n"
                "2024-01-01,Microsoft Edge,119,4,5,300,2,10\n",
    "operating_systems": "date,operating_system,operating_system_version,visitors,visits,visit_duration,bounces,pageviews\n"
                         "2024-01-01,Mac,14,6,7,300,2,20\n2024-01-01,GNU/Linux,,4,5,300,2,10\n",
}


def plausible_zip(path, files=None, names=None):
    with zipfile.ZipFile(path, "w") as archive:
        for table, text in (files or PLAUSIBLE).items():
            archive.writestr((names or {}).get(table, f"imported_{table}_20240101_20240102.csv"), text)
    return path


def test_plausible_export_adds_daily_aggregates_to_the_report(tmp_path):
    code, err, db = imported(tmp_path, plausible_zip(tmp_path / "example_org_20240103.zip"))
    assert code == 0, err
    assert "example.org: daily aggregates for 2 days imported" in err
    report = whole(db)
    assert (report["visitors"], report["visits"], report["pageviews"], report["bounce_rate"]) == (15, 18, 38, 33.3)
    assert report["sites"] == ["example.org"]
    assert sum(row["pageviews"] for row in report["series"]["rows"]) == 38
    assert {name: row["count"] for name, row in section(report, "pages").items()} == {"/": 28, "/about": 10}
    assert section(report, "entry_pages")["/"] == {"value": "/", "visits": 18, "bounce_rate": 33.3}
    assert section(report, "exit_pages")["/about"]["exit_rate"] == 50.0
    sources = section(report, "sources")
    assert (sources["Google"]["visitors"], sources["Google"]["channel"]) == (6, "search") and sources["Hacker News"]["channel"] == "social"
    assert sources[""]["channel"] == "direct"
    assert set(section(report, "referrers")) == {"Google (search)", "news.ycombinator.com/item", ""}
    assert set(section(report, "browsers")) == {"Chrome 120", "Edge 119"} and set(section(report, "operating_systems")) == {"macOS", "Linux"}
    assert set(section(report, "devices")) == {"desktop", "phone"} and set(section(report, "countries")) == {"DE"}
    assert set(section(report, "events")) == {"Signup"}  # engagement is reading time, not a custom event
    assert report["sections"]["screens"] == [] and report["sections"]["languages"] == []
    (note,) = report["notes"]
    assert "2024-01-01 to 2024-01-02" in note and "Screen sizes, Languages" in note
    # One day of two in the range: only that day's aggregates; a filter leaves them out, and says so.
    code, out, _ = run_pixeld("report", "--db", str(db), "--format", "json", "--start", "2024-01-02", "--end", "2024-01-02")
    one_day = json.loads(out)
    assert (one_day["visitors"], one_day["pageviews"]) == (5, 8) and "2024-01-02" in one_day["notes"][0]
    filtered = whole(db, "--country", "DE")
    assert filtered["pageviews"] == 0 and "not included" in filtered["notes"][0] and "filtered report" in filtered["notes"][0]


def test_plausible_again_replaces_and_days_counted_by_pixeld_are_left_out(tmp_path):
    path = plausible_zip(tmp_path / "p.zip")
    code, err, db = imported(tmp_path, path)
    assert code == 0, err
    code, err, _ = imported(tmp_path, path, "--force")
    assert code == 0, err
    assert whole(db)["pageviews"] == 38  # replaced, not added
    # A day pixeld counted itself (here from GoatCounter's export) is not added again from Plausible's.
    gc = write_csv(tmp_path / "gc.csv", GOATCOUNTER_HEADER, [goatcounter_rows()[0][:-1] + ["2024-01-02T10:00:00Z"]])
    other = tmp_path / "other.db"
    assert run_pixeld("import", str(gc), "--db", str(other), "--site", "example.org")[0] == 0
    code, err, _ = imported(tmp_path, path, db_name="other.db")
    assert code == 0 and "1 days left out" in err
    assert whole(other)["pageviews"] == 30 + 1


def test_plausible_404_events_are_pages_not_found_on_the_imported_days(tmp_path):
    """Plausible's export carries each 404 event's path (its ``path`` column): those counts show in Not found, as
    pixeld's own 404 events do, beside the live ones, and a 404 without a path stays an event only."""
    files = {**PLAUSIBLE, "custom_events": "date,name,link_url,path,visitors,events\n2024-01-01,Signup,,,2,3\n"
             "2024-01-01,404,,/old-post,4,5\n2024-01-02,404,,/old-post,1,2\n2024-01-02,404,,/gone?ref=x,1,1\n2024-01-02,404,,,3,3\n"}
    code, err, db = imported(tmp_path, plausible_zip(tmp_path / "p.zip", files=files))
    assert code == 0, err
    live = pixeld_events(tmp_path, [("2024-01-03T10:00:00Z", "/old-post", "news.example.com/link")])
    assert run_pixeld("import", str(live), "--db", str(db))[0] == 0
    report = whole(db)
    assert [(row["value"], row["count"]) for row in report["sections"]["not_found"]] == [("/old-post", 8), ("/gone", 1)]
    assert section(report, "not_found")["/old-post"]["sources"] == [{"value": "news.example.com/link", "count": 1}]
    assert section(report, "events")["404"]["count"] == 5 + 2 + 1 + 3 + 1
    (note,) = report["notes"]
    assert "2024-01-01 to 2024-01-02" in note and "Not found" not in note
    code, out, _ = run_pixeld("report", "--db", str(db), "--format", "json", "--start", "2024-01-02", "--end", "2024-01-02")
    assert [(row["value"], row["count"]) for row in json.loads(out)["sections"]["not_found"]] == [("/old-post", 2), ("/gone", 1)]
    filtered = whole(db, "--country", "DE")
    assert filtered["sections"]["not_found"] == [] and "not included" in filtered["notes"][0]
    code, out, _ = run_pixeld("report", "--db", str(db), "--format", "csv", "--range", "all")
    assert "not_found,/old-post,8," in out


def pixeld_events(tmp_path, events):
    """pixeld's own export holding 404 events: (time, path, referrer)."""
    path = tmp_path / "events.csv"
    rows = [[when, "event", "example.org", page, referrer, "404"] for when, page, referrer in events]
    return write_csv(path, "time,type,site,path,referrer,event", rows)


@pytest.mark.parametrize("name, reason", [
    ("../../imported_visitors_20240101_20240102.csv", "not one of Plausible's tables"),
    ("/etc/imported_visitors.csv", "not one of Plausible's tables"),
    ("imported_visitors/../../x.csv", "not one of Plausible's tables"),
    ("notes.txt", "not one of Plausible's tables"),
])
def test_plausible_zip_with_a_foreign_name_is_refused_before_anything_is_written(tmp_path, name, reason):
    path = plausible_zip(tmp_path / "p.zip", names={"visitors": name})
    code, err, db = imported(tmp_path, path)
    assert code == 2 and reason in err and len(err.strip().splitlines()) == 1
    assert not db.exists()


def test_plausible_zip_bomb_and_broken_zips_are_refused(tmp_path):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("imported_visitors_20240101_20240102.csv", b"date,visitors\n" + b"0" * (64 << 20))
    code, err, db = imported(tmp_path, bomb)
    assert code == 2 and "zip bomb" in err and not db.exists()
    broken = tmp_path / "broken.zip"
    broken.write_bytes(plausible_zip(tmp_path / "whole.zip").read_bytes()[:300])
    code, err, db = imported(tmp_path, broken)
    assert code == 2 and len(err.strip().splitlines()) == 1 and not db.exists()
    without = plausible_zip(tmp_path / "w.zip", files={"pages": PLAUSIBLE["pages"]})
    code, err, db = imported(tmp_path, without)
    assert code == 2 and "imported_visitors" in err and not db.exists()


def test_plausible_bad_dates_and_numbers(tmp_path):
    files = {"visitors": "date,visitors,pageviews,bounces,visits,visit_duration\n2024-13-01,1,1,1,1,1\nnot a date,1,1,1,1,1\n1999-01-01,1,1,1,1,1\n"
                         "2024-01-01,abc,-5,1e9,7,\n",
             "pages": "date,hostname,page\n2024-01-01,example.org\n"}  # a row with a column missing
    code, err, db = imported(tmp_path, plausible_zip(tmp_path / "p.zip", files=files), "--site", "example.org")
    assert code == 0, err
    assert "3 lines skipped" in err
    report = whole(db)
    assert (report["visitors"], report["pageviews"], report["visits"], report["bounce_rate"]) == (0, 0, 7, 0.0)


# ---- Hostile values in every field, in every format ---------------------------------------------------------


def hostile_files(tmp_path):
    goatcounter = write_csv(tmp_path / "gc.csv", GOATCOUNTER_HEADER, [
        ["/" + HOSTILE, HOSTILE, "0", HOSTILE, HOSTILE + " 1", HOSTILE, HOSTILE_SESSION, "0", HOSTILE, "g", HOSTILE, HOSTILE, HOSTILE, "2024-03-01T10:00:00Z"],
        [HOSTILE, HOSTILE, "1", "", HOSTILE, HOSTILE, HOSTILE_SESSION, "0", "evil.example/" + HOSTILE, "h", "1,1,1", "US", "1", "2024-03-01T10:01:00Z"],
        ["/c", HOSTILE, "0", "", "", "", "s2", "0", HOSTILE, "c", "", "", "1", "2024-03-01T10:02:00Z"],
    ])
    row = umami_row("2024-03-02 10:00:00+00", "/" + HOSTILE, title=HOSTILE, referrer=("evil.example", "/" + HOSTILE), utm=(HOSTILE, HOSTILE, HOSTILE),
                    browser=HOSTILE, os_name=HOSTILE, device=HOSTILE, screen=HOSTILE, language=HOSTILE, country=HOSTILE, host="example.org",
                    session=HOSTILE_SESSION)
    umami = write_csv(tmp_path / "umami.csv", UMAMI_HEADER, [row, [*row[:22], "2", HOSTILE, *row[24:]]])
    quoted = '"' + HOSTILE.replace('"', '""') + '"'
    files = {
        "visitors": "date,visitors,pageviews,bounces,visits,visit_duration\n2024-03-03,1,1,1,1,1\n",
        "sources": f"date,source,referrer,utm_source,utm_medium,utm_campaign,utm_content,utm_term,pageviews,visitors,visits,visit_duration,bounces\n"
                   f"2024-03-03,{quoted},{quoted},,,,,,1,1,1,1,1\n2024-03-03,x,,{quoted},{quoted},{quoted},,,1,1,1,1,1\n",
        "pages": f"date,hostname,page,visits,visitors,pageviews\n2024-03-03,example.org,{quoted},1,1,1\n",
        "custom_events": f"date,name,link_url,path,visitors,events\n2024-03-03,{quoted},,,1,1\n",
        "browsers": f"date,browser,browser_version,visitors,visits,visit_duration,bounces,pageviews\n2024-03-03,{quoted},{quoted},1,1,1,1,1\n",
        "operating_systems": f"date,operating_system,operating_system_version,visitors,visits,visit_duration,bounces,pageviews\n2024-03-03,{quoted},,1,1,1,1,1\n",
        "locations": f"date,country,region,city,visitors,visits,visit_duration,bounces,pageviews\n2024-03-03,{quoted},,0,1,1,1,1,1\n",
        "devices": f"date,device,visitors,visits,visit_duration,bounces,pageviews\n2024-03-03,{quoted},1,1,1,1,1\n",
    }
    return goatcounter, umami, plausible_zip(tmp_path / "p.zip", files=files)


def test_hostile_values_in_every_field_are_escaped_in_every_format(tmp_path):
    db = tmp_path / "pixeld.db"
    for path in hostile_files(tmp_path):
        code, _, err = run_pixeld("import", str(path), "--db", str(db), "--site", "example.org")
        assert code == 0, err
    document = whole(db)
    shown = json.dumps(document)
    assert HOSTILE in shown or "<script>" in shown  # the markup arrived, as text: it must be escaped where it is shown
    code, page, err = run_pixeld("report", "--db", str(db), "--range", "all", "--format", "html")
    assert code == 0, err
    assert "<script>" not in page and "<img" not in page and "onerror=alert(1)>" not in page
    assert "&lt;script&gt;" in page
    code, text, _ = run_pixeld("report", "--db", str(db), "--range", "all", "--format", "json")
    assert json.loads(text) == document  # valid JSON whatever the values
    code, table, _ = run_pixeld("report", "--db", str(db), "--range", "all", "--format", "csv")
    assert code == 0 and list(csv.reader(io.StringIO(table)))
    values = [row["value"] for rows in document["sections"].values() for row in rows]
    assert any("<script>" in value for value in values)  # paths, titles, referrers, events keep their text, escaped when shown
    conn = sqlite3.connect(db)
    stored = [value for (value,) in conn.execute("SELECT value FROM strings")] + [value for (value,) in conn.execute("SELECT value FROM imported")]
    assert all(len(value) <= 2048 and "\n" not in value for value in stored)
    assert HOSTILE_SESSION.encode() not in database_bytes(db) and b"s2" not in database_bytes(db)  # sessions are never stored
    conn.close()


def test_hostile_values_are_escaped_in_the_served_report(start_daemon, tmp_path):
    db = tmp_path / "served.db"
    for path in hostile_files(tmp_path):
        assert run_pixeld("import", str(path), "--db", str(db), "--site", "example.org")[0] == 0
    daemon = start_daemon(db=db)
    answer = daemon.report("range=all&format=html")
    assert answer.status == 200 and "<script>" not in answer.text and "&lt;script&gt;" in answer.text
    answer = daemon.report("range=all&format=json")
    assert answer.status == 200 and json.loads(answer.text)["sections"]["pages"]
    daemon.pixel({"path": "/live", "host": "example.org"}, {"User-Agent": CHROME, "X-Forwarded-For": "198.51.100.9"})
    daemon.stop()


# ---- Visits held until they end count as the daemon's -------------------------------------------------------


def interleaved_goatcounter_rows(count, seed=5):
    """``count`` rows over three days, in time order: many sessions at once, some coming back after more than
    30 idle minutes (a new visit) or across midnight, events and bots among them."""
    rng = random.Random(seed)
    start = 1_709_251_200 + 20 * 3600  # 2024-03-01 20:00 UTC
    sessions = [(f"{rng.getrandbits(60):015x}-{i:016x}", rng.choice(["Chrome 120", "Firefox 121", "Safari 17.1"]),
                 rng.choice(["Windows 10", "Linux", "iOS 17"]), rng.choice(["US-TX", "DE", "GB"]), "3" if i % 37 == 0 else "0") for i in range(150)]
    rows, moment = [], start
    for _ in range(count):
        moment += rng.choice([1, 5, 20, 60, 240])
        session, browser, system, location, bot = rng.choice(sessions)
        referrer, scheme = rng.choice([("", ""), ("www.reddit.com/r/x", "h"), ("Hacker News", "g"), ("newsletter", "c")])
        page = rng.choice(["/", "/a", "/b", "/c/d", "/e"])
        event = rng.random() < 0.05
        stamp = pixeld.iso(moment)
        rows.append(["click" if event else page, "" if event else f"Title {page}", "1" if event else "0", "", browser, system, session, bot,
                     referrer, scheme, "1280,768,1", location, "0", stamp])
    return rows


def imported_live(path, db, site):
    """The rows of a GoatCounter export placed in visits and written as the daemon writes live hits: each page
    view as it comes, its visit's entry row and exits updated as the visit grows (``Store.write`` of a ``Batch``),
    a batch covering a few minutes at most, as the daemon's writer does (a batch spanning more than 30 minutes
    could see a visitor's next visit begin before the page views of the last one were written)."""
    config = pixeld.Config(sites=(site,))
    reader = pixeld.ImportReader(config, None)
    visitors = pixeld.Visitors(rate_limit=0, on_new_salt=reader.memo.clear, goals=config.goals)  # the daemon's own, keyed as it keys a hit
    store = pixeld.Store(pixeld.connect(str(db)), shares_cpu=False)
    batch = pixeld.Batch()
    with open(path, newline="") as handle:
        lines = csv.reader(handle)
        header = pixeld.goatcounter_header(next(lines))
        for row in lines:
            fields = dict(zip(header, row))
            outcome = pixeld.read_record(pixeld.goatcounter_record(fields, reader.memo), config, reader.memo, site)
            if isinstance(outcome, pixeld.Accepted):
                outcome = outcome._replace(address=fields["session"])
            item, step = pixeld.place(outcome, visitors)
            if item is not None:
                batch.add(item, step)
            if batch.views and isinstance(item, pixeld.PageView) and item.time - batch.views[0][0].time >= 300:
                store.write(batch)
                batch = pixeld.Batch()
    store.write(batch)
    store.conn.close()


def test_visits_held_until_they_end_count_as_the_daemons(tmp_path):
    path = write_csv(tmp_path / "gc.csv", GOATCOUNTER_HEADER, interleaved_goatcounter_rows(6000))
    code, err, db = imported(tmp_path, path, "--site", "example.org")
    assert code == 0, err
    live = tmp_path / "live.db"
    imported_live(path, live, "example.org")
    for args in (["--range", "all"], ["--start", "2024-03-02", "--end", "2024-03-02"], ["--range", "all", "--path", "/a"]):
        held_report, live_report = (run_pixeld("report", "--db", str(written), "--format", "json", *args) for written in (db, live))
        assert held_report[0] == 0 and held_report == live_report
    counts = ("SELECT d.day, d.dim, coalesce(s.value, a.browser || a.version || a.os || a.device), d.views, d.visitors, d.visits, d.bounces, d.duration, "
              "d.exits FROM daily d LEFT JOIN strings s ON s.id = d.value AND d.dim != 4 LEFT JOIN agents a ON a.id = d.value AND d.dim = 4")
    with sqlite3.connect(db) as held, sqlite3.connect(live) as written:
        assert sorted(held.execute(counts)) == sorted(written.execute(counts))
        assert held.execute("SELECT sum(visit_views > 0), sum(visit_views = 1), sum(exit) FROM pageviews").fetchone() == \
            written.execute("SELECT sum(visit_views > 0), sum(visit_views = 1), sum(exit) FROM pageviews").fetchone()


def test_a_row_far_out_of_time_order_is_counted_in_its_visit(tmp_path):
    """A row that comes hours after its visit was written (an export out of time order) is still a page view of
    that visit: nothing is lost, the visit is counted once, and the late page view is its exit."""
    late = ["/late", "Late", "0", "", "Firefox 120", "Linux", SESSION_A, "0", "", "", "", "DE", "0", "2024-03-01T10:07:00Z"]
    rows = goatcounter_rows()[:2] + [["/x", "X", "0", "", "Chrome 86", "Linux", f"s{hour}", "0", "", "", "", "DE", "1", f"2024-03-01T{hour}:00:00Z"]
                                     for hour in range(11, 16)] + [late]
    code, err, db = imported(tmp_path, write_csv(tmp_path / "gc.csv", GOATCOUNTER_HEADER, rows), "--site", "example.org")
    assert code == 0, err
    report = whole(db)
    assert (report["pageviews"], report["visits"]) == (8, 6)
    assert section(report, "exit_pages")["/late"]["exit_rate"] == 100.0 and section(report, "entry_pages")["/blog/a"]["visits"] == 1
