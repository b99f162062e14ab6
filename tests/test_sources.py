"""Referrer sources and channels: the classifier (parsing section), the report's Sources and Channels
sections and filters end to end, imports, and the migration of a database made before sources."""

import json
import sqlite3

import pytest

import pixeld
from pixeld import classify_source
from conftest import CHROME, FIREFOX, IPHONE, run_pixeld


@pytest.mark.parametrize("referrer, expected", [
    ("google.com", ("Google", "search")),
    ("google.de/search", ("Google", "search")),
    ("google.co.uk", ("Google", "search")),
    ("google.com.br/url", ("Google", "search")),
    ("m.google.co.jp", ("Google", "search")),
    ("bing.com/search", ("Bing", "search")),
    ("duckduckgo.com", ("DuckDuckGo", "search")),
    ("search.brave.com", ("Brave Search", "search")),
    ("ecosia.org", ("Ecosia", "search")),
    ("kagi.com", ("Kagi", "search")),
    ("yandex.ru/search", ("Yandex", "search")),
    ("news.ycombinator.com/item", ("Hacker News", "social")),
    ("old.reddit.com/r/python", ("Reddit", "social")),
    ("out.reddit.com", ("Reddit", "social")),
    ("t.co/AbC123", ("X", "social")),
    ("t.co/ZzZ999", ("X", "social")),
    ("x.com/someone", ("X", "social")),
    ("twitter.com", ("X", "social")),
    ("m.facebook.com", ("Facebook", "social")),
    ("l.facebook.com/l.php", ("Facebook", "social")),
    ("lnkd.in/abc", ("LinkedIn", "social")),
    ("mastodon.social/@someone", ("Mastodon", "social")),
    ("bsky.app/profile/x", ("Bluesky", "social")),
    ("lobste.rs/s/abc", ("Lobsters", "social")),
    ("mail.google.com/mail/u/0", ("Gmail", "email")),
    ("outlook.live.com", ("Outlook.com", "email")),
    ("mail.proton.me", ("Proton Mail", "email")),
    ("chatgpt.com", ("ChatGPT", "ai")),
    ("perplexity.ai/search", ("Perplexity", "ai")),
    ("claude.ai", ("Claude", "ai")),
    ("gemini.google.com/app", ("Gemini", "ai")),
    ("copilot.microsoft.com", ("Copilot", "ai")),
    ("com.google.android.gm", ("Gmail", "email")),
    ("com.google.android.googlequicksearchbox", ("Google", "search")),
    ("com.reddit.frontpage", ("Reddit", "social")),
    ("org.telegram.messenger", ("Telegram", "social")),
    # Webmail: one source per provider, in the email channel, with its hosts in every country and product.
    ("email.ionos.de/appsuite", ("IONOS Mail", "email")),
    ("email.ionos.co.uk", ("IONOS Mail", "email")),
    ("mailbusiness.ionos.fr", ("IONOS Mail", "email")),
    ("deref-gmx.net/mail/client/dereferrer", ("GMX", "email")),
    ("deref-gmx.fr", ("GMX", "email")),
    ("3c-lxa.gmx.net/mail", ("GMX", "email")),
    ("lightmailer.gmx.es", ("GMX", "email")),
    ("deref-web.de/mail/client", ("Web.de Mail", "email")),
    ("suche.web.de/web", ("Web.de", "search")),  # the portal's search stays a search
    ("messagerie.orange.fr", ("Orange Mail", "email")),
    ("orange.fr/webmail/inbox", ("Orange Mail", "email")),  # a mailer at a path of the portal
    ("orange.fr/actu", ("orange.fr", "referral")),
    ("email.bluewin.ch", ("Bluewin Mail", "email")),
    ("email.t-online.de/em", ("T-Online Mail", "email")),
    ("webmail.tim.it", ("TIM Mail", "email")),
    ("upcmail.hispeed.ch", ("UPC Mail", "email")),
    ("mail.vodafone.de", ("Vodafone Mail", "email")),
    ("mail.infomaniak.com", ("Infomaniak Mail", "email")),
    ("mail.yahoo.net", ("Yahoo! Mail", "email")),
    ("fr.mail.yahoo.com", ("Yahoo! Mail", "email")),
    ("mail.yahoo.co.uk/d/folders/1", ("Yahoo! Mail", "email")),  # a name on a country domain, before yahoo.co.uk
    ("mail.aol.com", ("AOL Mail", "email")),
    ("wx.mail.qq.com", ("QQ Mail", "email")),
    ("mail.yandex.kz", ("Yandex Mail", "email")),
    # Search engines: Yandex's short domain, AOL's regional hosts, the Yahoo! portal of Matomo's older list.
    ("ya.ru", ("Yandex", "search")),
    ("aolsearch.com", ("AOL", "search")),
    ("uk.aolsearch.com/search", ("AOL", "search")),
    ("search.aol.fr", ("AOL", "search")),
    ("de.yahoo.com", ("Yahoo!", "search")),
    ("yahoo.co.jp", ("Yahoo! Japan", "search")),
    ("google.cat", ("Google", "search")),
    # AI assistants and chat.
    ("poe.com/chat", ("Poe", "ai")),
    ("character.ai", ("Character.AI", "ai")),
    ("beta.character.ai/chat", ("Character.AI", "ai")),
    ("teams.microsoft.com/l/message", ("Microsoft Teams", "social")),
    ("teams.live.com", ("Microsoft Teams", "social")),
    ("blog.example.net/post", ("blog.example.net", "referral")),
    ("google.com.example.net", ("google.com.example.net", "referral")),
    ("t.co.example.org/x", ("t.co.example.org", "referral")),
    ("notgoogle.com", ("notgoogle.com", "referral")),
    ("google.example.com", ("google.example.com", "referral")),
    ("reddit.com.evil.io", ("reddit.com.evil.io", "referral")),
    ("203.0.113.5/x", ("203.0.113.5", "referral")),
    ("email.ionos.de.example.net", ("email.ionos.de.example.net", "referral")),  # look-alikes of the new kinds of names
    ("mail.yahoo.com.example.org/x", ("mail.yahoo.com.example.org", "referral")),
    ("deref-gmx.example.com", ("deref-gmx.example.com", "referral")),
    ("poe.com.example.io", ("poe.com.example.io", "referral")),
    ("mycharacter.ai", ("mycharacter.ai", "referral")),
    ("example.org/webmail", ("example.org", "referral")),
    ("ionos.de", ("ionos.de", "referral")),  # the host's home page is no mailer
    ("newsletter (campaign)", ("newsletter", "campaign")),
    ("google (campaign)", ("google", "campaign")),
    ("", ("", "direct")),
])
def test_sources_by_name(referrer, expected):
    assert classify_source(referrer) == expected


def test_garbage_is_a_referral_or_direct_never_an_error():
    for referrer in (".", "..", "a..b", "[::1]", "é" * 300, "x" * 2000, "com", "co.uk"):
        source, channel = classify_source(referrer)
        assert channel == "referral" and "/" not in source


def test_the_table_is_compact_and_every_line_well_formed():
    lines = pixeld.SOURCE_TABLE.strip().splitlines()
    assert 150 <= len(lines) <= 600
    names = [line.split("|")[0] for line in lines]
    assert len(names) == len(set(names))  # one row per source
    assert {line.split("|")[1] for line in lines} <= set(pixeld.CHANNELS)


def test_sources_and_channels_end_to_end(start_daemon):
    daemon = start_daemon()
    hits = [
        ("198.51.100.1", CHROME, "https://www.google.com/"), ("198.51.100.2", CHROME, "https://www.google.de/"),
        ("198.51.100.3", IPHONE, "https://google.co.uk/search?q=x"), ("198.51.100.4", FIREFOX, "https://t.co/AbC123"),
        ("198.51.100.5", FIREFOX, "https://t.co/Zz9"), ("198.51.100.6", CHROME, "android-app://com.google.android.gm/"),
        ("198.51.100.7", CHROME, "https://blog.example.net/links"), ("198.51.100.8", CHROME, ""),
    ]
    for ip, ua, referrer in hits:
        daemon.pixel({"path": "/post", "host": "example.org", "referrer": referrer}, {"User-Agent": ua, "X-Forwarded-For": ip})
    daemon.pixel({"path": "/post", "host": "example.org", "utm_source": "newsletter"}, {"X-Forwarded-For": "198.51.100.9"})
    daemon.pixel({"path": "/again", "host": "example.org", "referrer": "https://www.google.com/"}, {"X-Forwarded-For": "198.51.100.1"})
    daemon.stop()  # every hit is committed
    daemon = start_daemon(db=daemon.db)
    document = daemon.report_json("range=all")
    sources = {row["value"]: (row["count"], row["visitors"], row["channel"]) for row in document["sections"]["sources"]}
    assert sources == {
        "Google": (4, 3, "search"), "X": (2, 2, "social"), "Gmail": (1, 1, "email"), "blog.example.net": (1, 1, "referral"),
        "": (1, 1, "direct"), "newsletter": (1, 1, "campaign"),
    }
    assert {row["value"]: row["count"] for row in document["sections"]["channels"]} == {
        "search": 4, "social": 2, "email": 1, "referral": 1, "direct": 1, "campaign": 1,
    }
    drill = daemon.report_json("range=all&source=Google&section=referrers")
    assert {row["value"]: row["count"] for row in drill["sections"]["referrers"]} == {"google.com": 2, "google.de": 1, "google.co.uk/search": 1}
    social = daemon.report_json("range=all&channel=social")
    assert social["pageviews"] == 2 and [row["value"] for row in social["sections"]["sources"]] == ["X"]
    assert daemon.report_json("range=all&source=(direct)")["pageviews"] == 1
    text = daemon.report("range=all").text
    assert text.index("Sources") < text.index("Referrers") and "Channels" in text
    google_line = next(line for line in text.splitlines() if line.startswith("Google "))
    assert google_line.split()[1:] == ["3", "33.3%", "3", "4"]  # visitors (a share of all), visits, page views
    csv_rows = daemon.report("range=all&format=csv").text.splitlines()
    assert {"sources,Google,3,33.3", "sources_visits,Google,3,", "sources_pageviews,Google,4,", "sources_channel,Google,search,"} <= set(csv_rows)
    code, out, _ = run_pixeld("report", "--db", str(daemon.db), "--range", "all", "--channel", "email", "--format", "json")
    assert code == 0 and json.loads(out)["pageviews"] == 1
    code, exported, _ = run_pixeld("export", "--db", str(daemon.db), "--format", "ndjson")
    assert {(row["source"], row["channel"]) for row in map(json.loads, exported.splitlines())} >= {("Google", "search"), ("newsletter", "campaign"), ("", "direct")}


def test_imports_get_sources(tmp_path):
    old = tmp_path / "flask.db"
    conn = sqlite3.connect(old)
    conn.execute("CREATE TABLE data (id INTEGER PRIMARY KEY, timestamp TEXT, path TEXT, title TEXT, referrer TEXT, country TEXT, device TEXT, width INTEGER, height INTEGER)")
    conn.executemany("INSERT INTO data (timestamp, path, title, referrer, country, device, width, height) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [
        ("2020-08-10 12:00:00", "/", "", "https://www.google.fr/", "", "chrome 84", 1, 1),
        ("2020-08-10 13:00:00", "/", "", "https://news.ycombinator.com/item?id=1", "", "chrome 84", 1, 1),
    ])
    conn.commit()
    conn.close()
    db = tmp_path / "p.db"
    assert run_pixeld("import", str(old), "--db", str(db), "--site", "example.org")[0] == 0
    code, out, _ = run_pixeld("report", "--db", str(db), "--start", "2020-08-01", "--end", "2020-08-31", "--format", "json")
    assert {row["value"]: row["channel"] for row in json.loads(out)["sections"]["sources"]} == {"Google": "search", "Hacker News": "social"}


def make_version_1_database(path, rows):
    """A database as pixeld made it before sources existed: schema version 1, with page views, an event and counts."""
    conn = sqlite3.connect(path, isolation_level=None)
    pixeld.migrate(conn, 0, target=1)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    store = pixeld.Store(conn)
    strings = {value: store.intern(value) for value in ("", "example.org", "/", "google.de", "t.co/x", "newsletter (campaign)", "newsletter /  / ", "signup")}
    agent = store.agent(pixeld.UserAgent("Chrome", "131", "Windows", "desktop"))
    start = 1_790_000_000
    conn.execute("BEGIN")
    referrers = ["google.de", "t.co/x", "", "newsletter (campaign)"]
    for i in range(rows):
        referrer = referrers[i % 4]
        campaign = "newsletter /  / " if referrer.endswith("(campaign)") else ""
        row_id = pixeld.first_id(start + i * 60)
        conn.execute("INSERT INTO pageviews VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     (row_id, strings["example.org"], strings["/"], strings[""], strings[referrer], strings[""], agent, strings[""], strings[""], 1, 1, 0, strings[campaign]))
        day = (start + i * 60) // pixeld.DAY
        for table, period in (("daily", day), ("monthly", pixeld.month_of_day(day))):
            for code, value in ((1, strings["/"]), (2, strings[referrer])):
                conn.execute(f"INSERT INTO {table} VALUES (?, ?, ?, ?, 1, 1, 1, 1, 0) ON CONFLICT DO UPDATE SET views = views + 1, visitors = visitors + 1, visits = visits + 1, bounces = bounces + 1", (period, strings["example.org"], code, value))
    conn.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 1, 0, 0, ?)",
                 (pixeld.first_id(start), strings["example.org"], strings["/"], strings["signup"], strings["t.co/x"], strings[""], agent, strings[""], strings[""], strings[""]))
    conn.execute("COMMIT")
    conn.close()
    return start


def test_a_database_from_before_sources_is_migrated(tmp_path):
    db = tmp_path / "old.db"
    start = make_version_1_database(db, 400)
    code, _, err = run_pixeld("report", "--db", str(db))
    assert code == 2 and "start the daemon once to migrate it" in err
    conn = pixeld.connect(str(db), progress=lambda message: None)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == pixeld.SCHEMA_VERSION
    conn.close()
    end = start + 400 * 60 + pixeld.DAY
    code, out, err = run_pixeld("report", "--db", str(db), "--start", str(start - start % pixeld.DAY), "--end", str(end - end % pixeld.DAY), "--format", "json")
    assert code == 0, err
    document = json.loads(out)
    assert {row["value"]: (row["count"], row["channel"]) for row in document["sections"]["sources"]} == {
        "Google": (100, "search"), "X": (100, "social"), "": (100, "direct"), "newsletter": (100, "campaign"),
    }
    assert {row["value"]: row["count"] for row in document["sections"]["channels"]} == {"search": 100, "social": 100, "direct": 100, "campaign": 100}
    code, out, _ = run_pixeld("report", "--db", str(db), "--range", "all", "--source", "X", "--event", "signup", "--format", "json")
    assert json.loads(out)["pageviews"] == 1  # the event's own source was filled in too


def make_version_4_database(path, rows):
    """A database as pixeld made it before the webmail sources (schema version 4): page views, an event and
    counts whose referrers the table did not know then (a GMX mailer, Poe), and one it knew (Google)."""
    conn = sqlite3.connect(path, isolation_level=None)
    pixeld.migrate(conn, 0, target=4)
    store = pixeld.Store(conn)
    then = {  # referrer: the source the table of the time gave it
        "deref-gmx.net/mail/client/dereferrer": "referral\tderef-gmx.net", "poe.com/chat": "referral\tpoe.com",
        "google.de": "search\tGoogle", "blog.example.net/post": "referral\tblog.example.net",
    }
    ids = {value: store.intern(value) for value in ("", "example.org", "/", "signup", *then, *then.values())}
    agent = store.agent(pixeld.UserAgent("Chrome", "131", "Windows", "desktop"))
    start = 1_790_000_000
    conn.execute("BEGIN")
    for i in range(rows):
        referrer = list(then)[i % len(then)]
        at = start + i * 60
        conn.execute(
            "INSERT INTO pageviews (id, site, path, title, referrer, country, agent, screen, language, first_today, visit_views, duration, campaign, source) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 1, 1, 0, ?, ?)",
            (pixeld.first_id(at), ids["example.org"], ids["/"], ids[""], ids[referrer], ids[""], agent, ids[""], ids[""], ids[""], ids[then[referrer]]),
        )
        day = at // pixeld.DAY
        for table, column, period in (("daily", "day", day), ("monthly", "month", pixeld.month_of_day(day))):
            for code, value in ((1, ids["/"]), (2, ids[referrer]), (9, ids[then[referrer]])):
                conn.execute(f"INSERT INTO {table} ({column}, site, dim, value, views, visitors, visits, bounces, duration) VALUES (?, ?, ?, ?, 1, 1, 1, 1, 0) "
                             "ON CONFLICT DO UPDATE SET views = views + 1, visitors = visitors + 1, visits = visits + 1, bounces = bounces + 1",
                             (period, ids["example.org"], code, value))
    conn.execute(
        "INSERT INTO events (id, site, path, name, referrer, country, agent, screen, language, first_today, visit_views, duration, campaign, source) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 1, 0, 0, ?, ?)",
        (pixeld.first_id(start), ids["example.org"], ids["/"], ids["signup"], ids["poe.com/chat"], ids[""], agent, ids[""], ids[""], ids[""], ids["referral\tpoe.com"]),
    )
    conn.execute("COMMIT")
    conn.close()
    return start


def test_a_database_from_before_the_webmail_sources_is_re_derived(tmp_path):
    db = tmp_path / "old.db"
    start = make_version_4_database(db, 400)
    conn = pixeld.connect(str(db), progress=lambda message: None)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == pixeld.SCHEMA_VERSION
    conn.close()
    end = start + 400 * 60 + pixeld.DAY
    span = ["--start", str(start - start % pixeld.DAY), "--end", str(end - end % pixeld.DAY), "--format", "json"]
    code, out, err = run_pixeld("report", "--db", str(db), *span)
    assert code == 0, err
    document = json.loads(out)
    assert {row["value"]: (row["count"], row["channel"]) for row in document["sections"]["sources"]} == {  # from the counts
        "GMX": (100, "email"), "Poe": (100, "ai"), "Google": (100, "search"), "blog.example.net": (100, "referral"),
    }
    assert {row["value"]: row["count"] for row in document["sections"]["channels"]} == {"email": 100, "ai": 100, "search": 100, "referral": 100}
    _, out, _ = run_pixeld("report", "--db", str(db), "--source", "GMX", "--path", "/", *span)  # from the page views
    assert json.loads(out)["pageviews"] == 100
    _, out, _ = run_pixeld("report", "--db", str(db), "--range", "all", "--source", "Poe", "--event", "signup", "--format", "json")
    assert json.loads(out)["pageviews"] == 1  # the event's own source too
    raw = sqlite3.connect(db)
    for gone in ("referral\tderef-gmx.net", "referral\tpoe.com"):
        assert raw.execute("SELECT count(*) FROM daily WHERE dim = 9 AND value = (SELECT id FROM strings WHERE value = ?)", (gone,)).fetchone()[0] == 0
        assert raw.execute("SELECT count(*) FROM pageviews WHERE source = (SELECT id FROM strings WHERE value = ?)", (gone,)).fetchone()[0] == 0
