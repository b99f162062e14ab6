"""Hostnames: the page's host is stored beside its site. A host under a configured --site counts under
that site (blog.example.org under example.org) with its own row in the Hostnames section and its
hostname= filter; without --site a host is a site of its own. Older databases take their site as the
hostname of older rows and older days."""

import json
import sqlite3

import pixeld
from pixeld import DAY, Store, connect
from conftest import CHROME, run_pixeld, stored_pageviews, wait_for

T0 = 1_767_225_600  # 2026-01-01 00:00:00 UTC
HOSTS = {"blog.example.org": 3, "docs.example.org": 2, "www.example.org": 1}  # www. is folded: example.org


def send(daemon, hosts):
    for n, (host, views) in enumerate(hosts.items()):
        for i in range(views):
            daemon.pixel({"path": f"/p{i}", "host": host}, {"X-Forwarded-For": f"198.51.100.{n}"})


def test_subdomains_of_a_configured_site_are_its_hostnames(start_daemon):
    daemon = start_daemon("--site", "example.org")
    send(daemon, HOSTS)
    daemon.pixel({"path": "/", "host": "<script>alert(1)</script>.example.org"})  # no hostname: the host is invalid, so no site either
    wait_for(lambda: len(stored_pageviews(daemon.db)) == 6)
    document = daemon.report_json("range=today")
    assert document["sites"] == ["example.org"] and document["pageviews"] == 6 and document["filtered"]["foreign"] == 1
    rows = {row["value"]: (row["count"], row["visitors"]) for row in document["sections"]["hostnames"]}
    assert rows == {"blog.example.org": (3, 1), "docs.example.org": (2, 1), "example.org": (1, 1)}
    blog = daemon.report_json("range=today&site=example.org&hostname=BLOG.example.org")
    assert blog["pageviews"] == 3 and blog["filters"] == {"hostname": "blog.example.org"}
    assert [row["value"] for row in blog["sections"]["pages"]] == ["/p0", "/p1", "/p2"]
    text = daemon.report("range=today&section=hostnames").text
    assert "Hostnames" in text and "docs.example.org" in text and "script" not in text
    page = daemon.report("range=today&format=html").text
    assert "<h2>Hostnames</h2>" in page and '?range=today&amp;hostname=docs.example.org' in page
    assert "alert" not in json.dumps(stored_pageviews(daemon.db))
    code, out, _ = run_pixeld("check", "--site", "example.org", "--host", "docs.example.org", "--path", "/", "--ua", CHROME)
    assert code == 0 and "a page view of example.org/" in out and "hostname docs.example.org" in out


def test_without_a_configured_site_each_host_is_a_site(start_daemon):
    daemon = start_daemon()
    send(daemon, HOSTS)
    wait_for(lambda: len(stored_pageviews(daemon.db)) == 6)
    document = daemon.report_json("range=today")
    assert document["sites"] == ["blog.example.org", "docs.example.org", "example.org"]
    hosts = ("blog.example.org", "docs.example.org", "example.org")
    assert {view["site"]: view["hostname"] for view in stored_pageviews(daemon.db)} == {host: host for host in hosts}


def test_an_import_takes_the_site_from_the_configured_sites_and_keeps_the_hostname(tmp_path):
    rows = [  # pixeld's export from before hostnames (site is the host), and from after
        {"time": T0, "type": "pageview", "site": "blog.example.org", "path": "/a"},
        {"time": T0 + 60, "type": "pageview", "site": "example.org", "hostname": "docs.example.org", "path": "/b"},
    ]
    (tmp_path / "rows.ndjson").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert run_pixeld("import", str(tmp_path / "rows.ndjson"), "--db", str(tmp_path / "p.db"), "--site", "example.org")[0] == 0
    assert [(v["site"], v["hostname"], v["path"]) for v in stored_pageviews(tmp_path / "p.db")] == [
        ("example.org", "blog.example.org", "/a"), ("example.org", "docs.example.org", "/b"),
    ]


def test_older_rows_and_days_take_their_site_as_their_hostname(tmp_path):
    """A database from before hostnames: its rows' site was the page's host, so the migration copies it, in batches, and counts older days."""
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db, isolation_level=None)
    pixeld.migrate(conn, 0, target=pixeld.MIGRATIONS.index(pixeld.add_hostnames))  # the schema just before hostnames
    store = Store(conn)
    strings = {value: store.intern(value) for value in ("", "x", "blog.example.org", "example.org", "signup")}
    agent = store.agent(pixeld.UserAgent("Chrome", "131", "Windows", "desktop"))
    for n in range(40):
        site, when = ("blog.example.org", "example.org")[n % 2], T0 + n * 3 * DAY
        for table in ("pageviews", "events") if n == 0 else ("pageviews",):
            columns = [row[1] for row in conn.execute(f"PRAGMA table_info({table})") if row[1] != "id"]
            named = {"agent": agent, "site": strings[site], "name": strings["signup"], **{number: 1 for number in pixeld.ROW_NUMBERS}}
            values = [named.get(column, strings["x"]) for column in columns]
            conn.execute(f"INSERT INTO {table} (id, {', '.join(columns)}) VALUES (?, {', '.join('?' * len(columns))})", (pixeld.first_id(when), *values))
        for table, column, period in (("daily", "day", when // DAY), ("monthly", "month", pixeld.month_of_day(when // DAY))):  # counted under the page
            conn.execute(f"INSERT INTO {table} ({column}, site, dim, value, views, visitors, visits, bounces, duration) VALUES (?, ?, 1, ?, 1, 1, 1, 1, 0) "
                         "ON CONFLICT DO UPDATE SET views = views + 1, visitors = visitors + 1, visits = visits + 1, bounces = bounces + 1",
                         (period, strings[site], strings["x"]))
    conn.close()
    said = []
    connect(str(db), progress=said.append).close()
    assert "counting older days under their hostnames" in said
    assert {(v["site"], v["hostname"]) for v in stored_pageviews(db)} == {("blog.example.org", "blog.example.org"), ("example.org", "example.org")}
    plain = sqlite3.connect(db)
    assert plain.execute("SELECT count(*) FROM events WHERE hostname = site").fetchone()[0] == 1
    code, out, err = run_pixeld("report", "--db", str(db), "--range", "all", "--format", "json")
    document = json.loads(out)
    assert code == 0, err
    rows = {row["value"]: row["count"] for row in document["sections"]["hostnames"]}
    assert rows == {"blog.example.org": 20, "example.org": 20} and sum(rows.values()) == document["pageviews"]
    code, out, _ = run_pixeld("report", "--db", str(db), "--range", "all", "--format", "json", "--hostname", "blog.example.org")
    assert json.loads(out)["pageviews"] == 20
