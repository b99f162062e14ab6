"""Share links against the real daemon: one site's report, read-only, in every format, without the token;
nothing else; only a hash in the database; new and revoked links count at once."""

import hashlib
import json
import sqlite3

from conftest import run_pixeld

TOKEN = "s3cret-token"


def share(db, *args):
    code, out, err = run_pixeld("share", "--db", str(db), *args)
    assert code == 0, err
    return out.strip(), err


def two_sites(daemon):
    for path in ("/a", "/b", "/a"):
        daemon.pixel({"host": "example.org", "path": path})
    daemon.pixel({"host": "other.org", "path": "/secret-plans"})
    daemon.stop()  # every hit committed


def test_a_share_link_reads_one_sites_report_in_every_format_without_the_token(start_daemon, tmp_path):
    two_sites(start_daemon("--token", TOKEN))
    daemon = start_daemon("--token", TOKEN)
    url, err = share(daemon.db, "example.org", "--url", f"http://127.0.0.1:{daemon.port}/")
    assert url.startswith(f"http://127.0.0.1:{daemon.port}/share/") and "revoke it with pixeld.py share --revoke 1" in err
    path = url[len(f"http://127.0.0.1:{daemon.port}"):]
    assert daemon.get("/report?range=all").status == 401  # the main report still wants the token
    proxied = {"X-Forwarded-For": "203.0.113.9"}  # as it comes through nginx: not a direct loopback request
    data = json.loads(daemon.get(path + "?range=all&format=json", proxied).text)
    assert (data["site"], data["pageviews"]) == ("example.org", 3)
    assert {row["value"] for row in data["sections"]["pages"]} == {"/a", "/b"}
    text = daemon.get(path + "?range=all", proxied)
    assert text.status == 200 and "example.org" in text.text and "other.org" not in text.text and "secret-plans" not in text.text
    csv = daemon.get(path + "/report?range=all&format=csv", proxied)
    assert csv.status == 200 and "totals,pageviews,3," in csv.text and "secret-plans" not in csv.text
    page = daemon.get(path + "?range=all", {**proxied, "Accept": "text/html"})
    assert page.status == 200 and page.headers["content-type"].startswith("text/html") and "secret-plans" not in page.text
    assert page.headers["referrer-policy"] == "no-referrer" and page.headers["cache-control"] == "no-store"  # the secret does not leak
    assert 'href="?site=example.org&amp;range=7d"' in page.text  # the page's links stay on the share link
    assert "anyone with its address can read it" in page.text
    assert daemon.get(path + "?range=7d&site=www.example.org&format=json").status == 200  # the same site, as written elsewhere


def test_a_share_link_opens_nothing_else(start_daemon):
    two_sites(start_daemon())
    daemon = start_daemon("--token", TOKEN)
    path, _ = share(daemon.db, "example.org")
    assert path.startswith("/share/")
    secret = path[len("/share/"):]
    for target in (f"{path}?site=other.org", f"{path}?site=other.org&format=json", f"{path}/export", f"{path}/metrics", f"{path}/whoami",
                   f"{path}/pixel.gif?dry_run=1&host=example.org&path=/x", f"{path}/pixel.gif?host=example.org&path=/x", f"{path}/report/../export"):
        answer = daemon.get(target)
        assert answer.status == 403, target
        assert b"share link" in answer.body
    for target in ("/share/" + secret[:-1] + ("A" if secret[-1] != "A" else "B"), "/share/" + secret[:-1], "/share/", "/share/" + secret + secret):
        assert daemon.get(target).status == 404, target
    for header in (f"Bearer {secret}", "Basic " + __import__("base64").b64encode(f":{secret}".encode()).decode()):
        for endpoint in ("/report", "/export", "/metrics", "/whoami"):
            assert daemon.get(endpoint, {"Authorization": header}).status == 401, endpoint  # the secret is no token
    daemon.stop()
    conn = sqlite3.connect(daemon.db)
    assert conn.execute("SELECT count(*) FROM pageviews").fetchone()[0] == 4  # the refused hit was not recorded
    conn.close()


def test_the_database_keeps_only_a_hash_of_the_secret(start_daemon, tmp_path):
    daemon = start_daemon()
    daemon.pixel({"host": "example.org", "path": "/"})
    path, _ = share(daemon.db, "example.org")
    secret = path.rsplit("/", 1)[1]
    assert len(secret) >= 32
    assert daemon.get(path + "?format=json").status == 200
    daemon.stop()
    for suffix in ("", "-wal", "-shm"):
        file = daemon.db.parent / (daemon.db.name + suffix)
        if file.exists():
            assert secret.encode() not in file.read_bytes()
    conn = sqlite3.connect(daemon.db)
    assert conn.execute("SELECT site, hash FROM shares").fetchall() == [("example.org", hashlib.sha256(secret.encode()).digest())]
    conn.close()


def test_new_and_revoked_links_count_at_once_and_list(start_daemon):
    daemon = start_daemon()
    daemon.pixel({"host": "example.org", "path": "/"})
    daemon.pixel({"host": "blog.example.net", "path": "/post"})
    first, _ = share(daemon.db, "example.org")
    second, _ = share(daemon.db, "www.Blog.Example.NET")
    assert daemon.get(first + "?format=json").status == 200
    assert json.loads(daemon.get(second + "?format=json").text)["site"] == "blog.example.net"
    listed, _ = share(daemon.db, "--list")
    lines = listed.splitlines()
    assert [line.split()[:2] for line in lines] == [["1", "example.org"], ["2", "blog.example.net"]]
    assert first.rsplit("/", 1)[1] not in listed and second.rsplit("/", 1)[1] not in listed
    _, err = share(daemon.db, "--revoke", "1")
    assert "revoked" in err
    assert daemon.get(first + "?format=json").status == 404  # at once, without a restart
    assert daemon.get(second + "?format=json").status == 200
    assert share(daemon.db, "--list")[0].split()[:2] == ["2", "blog.example.net"]
    share(daemon.db, "--revoke", "2")
    assert share(daemon.db, "--list")[0] == "no share links"


def test_share_command_errors(tmp_path):
    db = str(tmp_path / "pixeld.db")
    for args in ((), ("example.org", "--list"), ("--revoke", "7"), ("not a host!",), ("example.org", "--url", "stats.example.org"),
                 ("example.org", "--url", "https://stats.example.org/?x")):
        code, out, err = run_pixeld("share", "--db", db, *args)
        assert code == 2 and err.startswith("pixeld: ") and len(err.strip().splitlines()) == 1, (args, err)
