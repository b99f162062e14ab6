"""Running pixeld with confidence: the doctor, /whoami, the dry run (over HTTP and offline), /metrics,
and the hit endpoint at a second path."""

import os
import sqlite3
import time

import pixeld
from conftest import CHROME, run_pixeld, stored_pageviews, write_mmdb

GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"


def doctor(*args):
    code, out, err = run_pixeld("doctor", *args)
    return code, out + err


def level_of(out, topic):
    line = next(line for line in out.splitlines() if line.split(None, 1)[-1].startswith(topic))
    return line.split()[0]


def test_doctor_on_a_healthy_setup(start_daemon, tmp_path):
    daemon = start_daemon("--token", "s3cret")
    daemon.pixel({"path": "/", "host": "example.org"})
    code, out = doctor("--db", str(daemon.db), "--token", "s3cret", "--keep-days", "395", "--url", f"http://127.0.0.1:{daemon.port}")
    assert code == 0, out
    for topic in ("settings", "database", "directory", "token", "GeoIP", "time zone", f"http://127.0.0.1:{daemon.port}/healthz", f"http://127.0.0.1:{daemon.port}/whoami"):
        assert level_of(out, topic) == "ok", (topic, out)
    assert "quick_check ok" in out and "token: set, from --token" in out and "client address: 127.0.0.x" in out
    assert out.rstrip().endswith("0 failed, 0 warnings")


def test_doctor_fails_on_a_corrupt_database_and_a_bad_zone(tmp_path):
    db = tmp_path / "corrupt.db"
    pixeld.connect(str(db)).close()
    data = bytearray(db.read_bytes())
    data[100:4096] = os.urandom(3996)
    db.write_bytes(bytes(data))
    code, out = doctor("--db", str(db), "--timezone", "Mars/Olympus")
    assert code == 1
    assert level_of(out, "database") == "fail" and level_of(out, "time zone") == "fail" and level_of(out, "settings") == "fail"
    code, out = doctor("--db", str(db), "--url", "http://127.0.0.1:9")  # nothing listens on the discard port
    assert code == 1 and level_of(out, "http://127.0.0.1:9/healthz") == "fail"


def test_doctor_on_geoip_files(tmp_path):
    fresh, old = tmp_path / "fresh.mmdb", tmp_path / "old.mmdb"
    write_mmdb(fresh, {"81.2.69.0/24": "GB"}, built=time.time() - 3 * 86400)
    write_mmdb(old, {"81.2.69.0/24": "GB"}, built=time.time() - 90 * 86400)
    db = str(tmp_path / "p.db")
    code, out = doctor("--db", db, "--geoip", str(fresh))
    assert code == 0 and level_of(out, "GeoIP") == "ok" and "built" in out
    code, out = doctor("--db", db, "--geoip", str(old))
    assert code == 0 and level_of(out, "GeoIP") == "warn" and "geoipupdate has probably stopped" in out
    code, out = doctor("--db", db, "--geoip", str(tmp_path / "missing.mmdb"))
    assert code == 1 and level_of(out, "GeoIP") == "fail"


def test_doctor_on_a_full_disk(tiny_filesystem):
    db = os.path.join(tiny_filesystem, "pixeld.db")
    pixeld.connect(db).close()
    with open(os.path.join(tiny_filesystem, "filler"), "wb") as handle:
        try:
            handle.write(b"\0" * (4 << 20))
        except OSError:
            pass
    code, out = doctor("--db", db)
    assert code == 1 and level_of(out, "directory") == "fail" and "free" in out


def whoami(daemon, headers):
    answer = daemon.get("/whoami", headers)
    assert answer.status == 200, answer.text
    return answer.text


def test_whoami_directly_through_a_trusted_proxy_and_through_an_untrusted_one(start_daemon):
    daemon = start_daemon("--token", "t0k", "--trusted-proxy", "127.0.0.1/32")
    auth = {"Authorization": "Bearer t0k"}
    assert daemon.get("/whoami").status == 401
    text = whoami(daemon, {**auth, "X-Forwarded-For": "203.0.113.77", "Referer": "https://example.org/post"})
    assert "peer: 127.0.0.1" in text and "trusted proxy: yes" in text
    assert "client address: 203.0.113.x (from X-Forwarded-For)" in text and "site: example.org" in text
    assert "203.0.113.77" not in text and "warning" not in text
    assert "note: no X-Forwarded-For: right for a direct request" in whoami(daemon, auth)
    text = whoami(daemon, {**auth, "X-Forwarded-Proto": "https"})  # a trusted proxy that forgets the header
    assert "client address: 127.0.0.x (from the peer)" in text and "warning: the request came through a trusted proxy that sent no X-Forwarded-For" in text
    other = start_daemon("--token", "t0k", "--trusted-proxy", "10.0.0.0/8")
    text = whoami(other, {**auth, "X-Forwarded-For": "203.0.113.77"})
    assert "trusted proxy: no" in text and "client address: 127.0.0.x (from the peer)" in text and "X-Forwarded-For is ignored" in text
    loopback = start_daemon(db=daemon.db.parent / "open.db")
    assert loopback.get("/whoami").status == 200 and loopback.get("/whoami", {"X-Forwarded-For": "203.0.113.1"}).status == 403


def test_dry_run_says_what_a_hit_would_be_and_stores_nothing(start_daemon, tmp_path):
    spam = tmp_path / "spam.txt"
    spam.write_text("spammy.example\n")
    daemon = start_daemon("--site", "example.org", "--spam-list", str(spam))
    cases = [
        ({"path": "/post", "host": "example.org", "referrer": "https://www.google.de/"}, CHROME, "counted as a page view of example.org/post (title (none), channel search, source Google, referrer google.de, campaign (none), campaign_content (none), campaign_term (none), country (unknown), browser Chrome, version 131, os Windows, device desktop"),
        ({"path": "/", "host": "example.org"}, GOOGLEBOT, "filtered: bot (the User-Agent is a crawler"),
        ({"path": "/", "host": "other.net"}, CHROME, "filtered: foreign (the site is not one of --site)"),
        ({"path": "/", "host": "example.org", "referrer": "https://spammy.example/x"}, CHROME, "filtered: spam (the referrer's domain is on the referrer spam list)"),
        ({"event": "signup", "path": "/", "host": "example.org"}, CHROME, "counted as the event 'signup' on example.org/"),
    ]
    for params, ua, expected in cases:
        answer = daemon.pixel({**params, "dry_run": "1"}, {"User-Agent": ua})
        assert answer.status == 200 and answer.headers["content-type"].startswith("text/plain") and answer.text.startswith(expected), answer.text
    proxied = daemon.pixel({"path": "/", "host": "example.org", "dry_run": "1"}, {"X-Forwarded-For": "203.0.113.9"})
    assert proxied.body == pixeld.GIF  # not allowed to read the report: an ordinary hit
    daemon.stop()
    assert [view["path"] for view in stored_pageviews(daemon.db)] == ["/"]  # only the ordinary hit
    conn = sqlite3.connect(daemon.db)
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 0
    assert conn.execute("SELECT coalesce(sum(hits), 0) FROM filtered").fetchone()[0] == 0
    conn.close()


def test_check_offline(tmp_path):
    """One line on stdout, and an exit status a script can use: 0 counted, 1 not counted, 2 bad usage."""
    code, out, _ = run_pixeld("check", "--ua", GOOGLEBOT, "--host", "example.org")
    assert code == 1 and out.startswith("filtered: bot")
    code, out, _ = run_pixeld("check", "--ua", CHROME, "--host", "example.org", "--path", "/a", "--referrer", "https://t.co/x")
    assert code == 0 and out.startswith("counted as a page view of example.org/a") and "channel social, source X," in out
    code, out, _ = run_pixeld("check", "--ua", CHROME, "--host", "example.org", "--path", "/a")
    assert code == 0 and "source (direct)," in out and "(direct) (direct)" not in out and out.count("\n") == 1
    code, out, _ = run_pixeld("check", "--ua", CHROME, "--host", "example.org", "--ip", "198.51.100.4", "--ignore-ip", "198.51.100.0/24")
    assert code == 1 and out.startswith("filtered: ignored")
    code, out, _ = run_pixeld("check", "--ua", CHROME, "--host", "example.org", "--event", "")
    assert code == 1 and out.startswith("ignored: malformed")
    code, out, err = run_pixeld("check", "--host", "example.org")
    assert code == 1 and out.startswith("filtered: bot") and "no --ua given" in err
    env_file = tmp_path / "pixeld.env"
    env_file.write_text("PIXELD_SITES=example.org\n")  # the service's --site, read as the daemon reads it
    code, out, _ = run_pixeld("check", "--ua", CHROME, "--host", "other.net", "--env-file", str(env_file))
    assert code == 1 and out.startswith("filtered: foreign")
    for bad in (["--ignore-ip", "not-an-address"], ["--no-such-option"]):
        code, out, err = run_pixeld("check", "--ua", CHROME, *bad)
        assert code == 2 and out == "" and err


def parse_metrics(text):
    from prometheus_client.parser import text_string_to_metric_families

    return {sample.name + str(sorted(sample.labels.items())): sample.value for family in text_string_to_metric_families(text) for sample in family.samples}


def test_metrics_in_the_prometheus_format_rise_with_hits(start_daemon):
    daemon = start_daemon()
    before = parse_metrics(daemon.get("/metrics").text)
    assert before["pixeld_hits_total[('outcome', 'pageview')]"] == 0
    assert before["pixeld_build_info[('version', '%s')]" % pixeld.__version__] == 1
    for name in ("pixeld_writer_queue_hits[]", "pixeld_dropped_hits_total[]", "pixeld_last_commit_age_seconds[]", "pixeld_commit_duration_seconds[]",
                 "pixeld_database_size_bytes[]", "pixeld_remembered_visitors[]", "pixeld_open_connections[]", "pixeld_uptime_seconds[]"):
        assert name in before, name
    for n in range(3):
        daemon.pixel({"path": f"/{n}", "host": "example.org"}, {"X-Forwarded-For": f"198.51.100.{n}"})
    daemon.pixel({"path": "/", "host": "example.org"}, {"User-Agent": GOOGLEBOT})
    daemon.pixel({"event": "signup", "host": "example.org"}, {"X-Forwarded-For": "198.51.100.1"})
    beacon = {"engagement": "1", "host": "example.org", "engaged": "12", "scroll": "40"}
    daemon.pixel({**beacon, "path": "/1"}, {"X-Forwarded-For": "198.51.100.1"})  # joins that visitor's page view
    daemon.pixel({**beacon, "path": "/never-seen"}, {"X-Forwarded-For": "198.51.100.1"})
    daemon.pixel({"event": "", "host": "example.org"}, {"X-Forwarded-For": "198.51.100.1"})
    time.sleep(1.5)
    after = parse_metrics(daemon.get("/metrics").text)
    assert after["pixeld_hits_total[('outcome', 'pageview')]"] == 3
    assert after["pixeld_hits_total[('outcome', 'bot')]"] == 1 and after["pixeld_hits_total[('outcome', 'event')]"] == 1
    outcomes = {name: value for name, value in after.items() if name.startswith("pixeld_hits_total") and value}
    assert outcomes == {  # engagement beacons, joined or unmatched, and malformed hits have outcomes of their own, as the README lists
        "pixeld_hits_total[('outcome', 'pageview')]": 3, "pixeld_hits_total[('outcome', 'bot')]": 1, "pixeld_hits_total[('outcome', 'event')]": 1,
        "pixeld_hits_total[('outcome', 'engagement')]": 1, "pixeld_hits_total[('outcome', 'unmatched')]": 1, "pixeld_hits_total[('outcome', 'malformed')]": 1,
    }
    assert after["pixeld_remembered_visitors[]"] == 3 and after["pixeld_database_size_bytes[]"] > 0
    assert daemon.get("/metrics", {"X-Forwarded-For": "203.0.113.1"}).status == 403


def test_a_second_hit_path_counts_and_the_snippet_uses_it(start_daemon):
    daemon = start_daemon("--hit-path", "/hit")
    answer = daemon.get("/hit?path=/via-hit&host=example.org", {"User-Agent": CHROME})
    assert answer.status == 200 and answer.body == pixeld.GIF
    daemon.pixel({"path": "/via-pixel", "host": "example.org"})
    daemon.stop()
    assert sorted(view["path"] for view in stored_pageviews(daemon.db)) == ["/via-hit", "/via-pixel"]
    code, out, _ = run_pixeld("snippet", "--url", "https://stats.example.org", "--hit-path", "/hit")
    assert code == 0 and "/hit?" in out and 'src="https://stats.example.org/hit"' in out and "pixel.gif" not in out
    assert run_pixeld("serve", "--hit-path", "/report", "--listen", "127.0.0.1:0")[0] == 2
