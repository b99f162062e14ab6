"""The command line: defaults, flags and environment, one-line errors, the report and snippet commands."""

import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import pixeld
from conftest import PIXELD, ROOT, bad_start, free_port, request, require_script, run_pixeld, stored_pageviews, wait_for


@pytest.mark.parametrize("command", [[], ["serve"], ["report"], ["export"], ["import"], ["check"], ["doctor"], ["backup"], ["snippet"]])
def test_help_on_every_command(command):
    code, out, _ = run_pixeld(*command, "--help")
    assert code == 0 and out.startswith("usage: pixeld.py")


def test_help_says_what_the_readme_says():
    """The range realtime, HTTP Basic for the token, check's exit status, and the service's settings file."""
    helps = {command: " ".join(run_pixeld(command, "--help")[1].split()) for command in ("serve", "report", "export", "check", "doctor")}
    assert "realtime" in helps["report"] and "realtime" in helps["export"]
    assert "HTTP Basic with the token as the password" in helps["serve"] and "HTTP Basic with the token as the password" in helps["doctor"]
    assert "0 counted, 1 not counted" in helps["check"]
    assert all("--env-file" in helps[command] for command in ("report", "export", "check", "doctor"))
    assert "--ascii [1]" in helps["report"]


def test_version():
    code, out, _ = run_pixeld("--version")
    assert (code, out) == (0, f"pixeld {pixeld.__version__}\n")


def test_no_arguments_serves_on_the_embedded_defaults(tmp_path):
    """No flags and no settings: serve on 127.0.0.1:8000, into ./pixeld.db. The real daemon is given a free port
    through the environment, so that the test does not need port 8000 (the quick start's daemon may hold it)."""
    config = pixeld.config_from(pixeld.build_parser().parse_args(["serve"]), {})
    assert (config.host, config.port, config.db_path) == ("127.0.0.1", 8000, "pixeld.db")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIXELD_")}
    env["PIXELD_LISTEN"] = f"127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, str(PIXELD)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(lambda: request("127.0.0.1", port, "/healthz").status == 200, proc=proc)
        request("127.0.0.1", port, "/pixel.gif?path=/default", {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0"})
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0].decode()
    assert f"listening on http://127.0.0.1:{port}" in out
    assert [v["path"] for v in stored_pageviews(tmp_path / "pixeld.db")] == ["/default"]


@pytest.mark.parametrize(
    "listen, reason",
    [("nonsense", "cannot parse listen address"), ("127.0.0.1:99999", "out of range"), ("[::1:80", "cannot parse listen address"), ("no.such.host.invalid:80", "cannot listen on")],
)
def test_bad_listen_addresses(tmp_path, listen, reason):
    assert reason in bad_start(tmp_path / "p.db", "--listen", listen)


def test_port_in_use(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        err = bad_start(tmp_path / "p.db", "--listen", f"127.0.0.1:{port}")
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in err


def test_a_second_daemon_cannot_join_the_first_ones_port(start_daemon, tmp_path):
    """Acceptor processes share their port (SO_REUSEPORT); another pixeld must not slip into it."""
    first = start_daemon("--workers", "2")
    err = bad_start(tmp_path / "other.db", "--listen", f"127.0.0.1:{first.port}", "--workers", "2")
    assert f"cannot listen on 127.0.0.1:{first.port}: Address already in use" in err


def test_bad_workers(tmp_path):
    assert "cannot parse --workers 'many'" in bad_start(tmp_path / "p.db", "--workers", "many")


def test_database_problems(tmp_path):
    not_sqlite = tmp_path / "notes.db"
    not_sqlite.write_text("plain text, not SQLite\n" * 200)
    assert "cannot use database" in bad_start(not_sqlite)
    assert not_sqlite.read_text().startswith("plain text")  # and it was left alone

    assert "does not exist" in bad_start(tmp_path / "no" / "such" / "dir.db")

    newer = tmp_path / "newer.db"
    conn = sqlite3.connect(newer)
    conn.execute(f"PRAGMA user_version = {pixeld.SCHEMA_VERSION + 5}")
    conn.close()
    assert "newer than this pixeld" in bad_start(newer)


def test_unwritable_database_directory():
    # Root ignores file modes, so the daemon runs as nobody when the tests run as root.
    with tempfile.TemporaryDirectory(dir="/tmp") as scratch:
        os.chmod(scratch, 0o755)
        readonly = os.path.join(scratch, "ro")
        os.mkdir(readonly, 0o555)
        os.chmod(readonly, 0o555)
        assert "not writable" in bad_start(Path(readonly) / "p.db", as_nobody=os.geteuid() == 0)


def test_token_settings(tmp_path):
    assert "cannot read token file" in bad_start(tmp_path / "p.db", "--token-file", str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert "is empty" in bad_start(tmp_path / "p.db", "--token-file", str(empty))
    assert "cannot parse trusted proxy" in bad_start(tmp_path / "p.db", "--trusted-proxy", "10.0.0.0/8", "not-a-network")
    code, _, err = run_pixeld("serve", "--token", "a", "--token-file", "b")
    assert code == 2 and "not allowed with" in err


def test_environment_and_flags(start_daemon, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("from-the-file\n")
    daemon = start_daemon(env={"PIXELD_TOKEN_FILE": str(token_file), "PIXELD_TRUSTED_PROXIES": "10.0.0.0/8, 127.0.0.1"})
    assert daemon.report().status == 401
    assert daemon.report(headers={"Authorization": "Bearer from-the-file"}).status == 200
    output = daemon.stop()
    assert "trusted proxies 10.0.0.0/8, 127.0.0.1/32" in output and "report by token" in output
    assert "from-the-file" not in output

    # A flag wins over the environment: a broken PIXELD_LISTEN and PIXELD_DB do not matter.
    daemon = start_daemon("--token", "from-the-flag", env={"PIXELD_TOKEN": "from-env", "PIXELD_LISTEN": "garbage", "PIXELD_DB": "/nonexistent/x.db"})
    assert daemon.report(headers={"Authorization": "Bearer from-the-flag"}).status == 200
    assert daemon.report(headers={"Authorization": "Bearer from-env"}).status == 401


def test_environment_alone_sets_listen_and_db(tmp_path):
    port = free_port()
    db = tmp_path / "env.db"
    proc = subprocess.Popen(
        [sys.executable, str(PIXELD), "serve"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={"PATH": "/usr/bin:/bin", "PIXELD_LISTEN": f"127.0.0.1:{port}", "PIXELD_DB": str(db)},
    )
    try:
        wait_for(lambda: request("127.0.0.1", port, "/healthz").status == 200, proc=proc)
    finally:
        proc.terminate()
        proc.communicate(timeout=20)
    assert db.exists()


def test_ipv6_listen(start_daemon):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        daemon = start_daemon(host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    assert daemon.pixel({"path": "/v6"}).status == 200
    assert daemon.report().status == 200  # ::1 is loopback
    assert "listening on http://[::1]:" in daemon.stop()
    assert [v["path"] for v in stored_pageviews(daemon.db)] == ["/v6"]


def test_report_command_reads_the_database_while_the_daemon_runs(start_daemon):
    daemon = start_daemon()
    daemon.pixel({"path": "/live", "host": "example.org"})
    wait_for(lambda: len(stored_pageviews(daemon.db)) == 1, proc=daemon.proc)
    code, out, _ = run_pixeld("report", "--db", str(daemon.db))
    assert code == 0 and "/live" in out and re.search(r"^Page views +1 ", out, re.M)
    code, out, _ = run_pixeld("report", "--db", str(daemon.db), "--range", "7d", "--format", "json", "--site", "www.example.org")
    assert code == 0 and json.loads(out)["site"] == "example.org" and json.loads(out)["pageviews"] == 1
    assert daemon.report("range=today").text == run_pixeld("report", "--db", str(daemon.db), "--range", "today")[1]
    ascii_text = daemon.report("range=today&ascii=1").text  # the parameter and the flag of the same name agree
    assert "#" in ascii_text and "█" not in ascii_text
    assert ascii_text == run_pixeld("report", "--db", str(daemon.db), "--range", "today", "--ascii", "1")[1]
    assert ascii_text == run_pixeld("report", "--db", str(daemon.db), "--range", "today", "--ascii")[1]
    assert daemon.report("range=today&ascii=0").text == run_pixeld("report", "--db", str(daemon.db), "--range", "today", "--ascii", "0")[1]


def test_commands_read_the_service_settings_file(start_daemon, tmp_path):
    """``report`` by hand uses the daemon's time zone: both read /etc/pixeld.env (here --env-file). Kiritimati
    is UTC+14, so its today is another day than UTC's, and than Pago Pago's (UTC-11)."""
    daemon = start_daemon(env={"PIXELD_TIMEZONE": "Pacific/Kiritimati"})
    env_file = tmp_path / "pixeld.env"
    env_file.write_text("# the service's settings\n; also a comment\n\nPIXELD_TIMEZONE='Pacific/Kiritimati'\nOTHER=ignored\nPIXELD_SITES = example.org\n")
    served = json.loads(daemon.report("range=today&format=json").text)
    assert served["timezone"] == "Pacific/Kiritimati"

    def today(*args, env=None):
        code, out, err = run_pixeld("report", "--db", str(daemon.db), "--range", "today", "--format", "json", *args, env=env)
        assert code == 0, err
        return {key: json.loads(out)[key] for key in ("timezone", "start", "end")}

    assert today("--env-file", str(env_file)) == {key: served[key] for key in ("timezone", "start", "end")}
    assert today("--env-file", str(env_file), env={"PIXELD_TIMEZONE": "Pacific/Pago_Pago"})["timezone"] == "Pacific/Pago_Pago"  # the environment wins
    assert today("--env-file", str(env_file), "--tz", "UTC")["timezone"] == "UTC"  # and a flag wins over both
    assert today("--env-file", "")["timezone"] == "UTC"  # none read
    code, out, err = run_pixeld("export", "--db", str(daemon.db), "--env-file", str(tmp_path / "missing.env"))
    assert (code, out) == (2, "") and err == f"pixeld: cannot read {tmp_path / 'missing.env'}: No such file or directory\n"


def test_the_service_settings_file_is_read_by_default(tmp_path, monkeypatch, capsys):
    db = tmp_path / "p.db"
    pixeld.connect(str(db)).close()
    env_file = tmp_path / "pixeld.env"
    env_file.write_text("PIXELD_TIMEZONE=Pacific/Kiritimati\n")

    def zone_of_report():
        assert pixeld.main(["report", "--db", str(db), "--format", "json"], environ={}) == 0
        captured = capsys.readouterr()
        return json.loads(captured.out)["timezone"], captured.err

    monkeypatch.setattr(pixeld, "ENV_FILE", str(env_file))  # /etc/pixeld.env, here
    assert zone_of_report() == ("Pacific/Kiritimati", "")
    monkeypatch.setattr(pixeld, "ENV_FILE", str(tmp_path / "missing.env"))  # none: nothing to say
    assert zone_of_report() == ("UTC", "")
    monkeypatch.setattr(pixeld, "ENV_FILE", str(tmp_path))  # there, but not readable as a file: said, and the command goes on
    zone, err = zone_of_report()
    assert zone == "UTC" and err.startswith(f"pixeld: cannot read {tmp_path}: ") and "going on without the service's settings" in err


def test_report_command_errors(tmp_path):
    code, _, err = run_pixeld("report", "--db", str(tmp_path / "missing.db"))
    assert code == 2 and err == f"pixeld: no database at {tmp_path / 'missing.db'}\n"
    sqlite3.connect(tmp_path / "empty.db").close()
    code, _, err = run_pixeld("report", "--db", str(tmp_path / "empty.db"), "--start", "someday")
    assert code == 2 and err.count("\n") == 1


def test_snippet_command_and_snippet_html_agree():
    code, out, _ = run_pixeld("snippet")
    assert code == 0 and out == (ROOT / "snippet.html").read_text()
    code, out, _ = run_pixeld("snippet", "--url", "https://stats.mysite.net/")
    assert "https://stats.example.org" not in out and out.count("https://stats.mysite.net") == 2 and "stats.mysite.net/\"" not in out


def test_python_39_is_enough():
    vermin = require_script("vermin")
    proc = subprocess.run([vermin, "--target=3.9-", "--violations", "--no-tips", "--eval-annotations", str(PIXELD)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_report_flags_and_terminal_width(start_daemon):
    import pty

    daemon = start_daemon()
    daemon.pixel({"path": "/blog/one", "host": "example.org", "title": "x" * 200})
    daemon.pixel({"path": "/about", "host": "example.org"}, {"User-Agent": CHROME_UA_ANDROID})
    wait_for(lambda: len(stored_pageviews(daemon.db)) == 2, proc=daemon.proc)
    code, out, _ = run_pixeld("report", "--db", str(daemon.db), "--range", "7d", "--path", "/blog/*", "--format", "json")
    assert code == 0 and json.loads(out)["pageviews"] == 1 and json.loads(out)["filters"] == {"path": "/blog/*"}
    code, out, _ = run_pixeld("report", "--db", str(daemon.db), "--device", "phone", "--tz", "Europe/Berlin", "--ascii", "--section", "devices")
    assert code == 0 and "Europe/Berlin" in out and "phone" in out and "desktop" not in out
    code, out, _ = run_pixeld("report", "--db", str(daemon.db), "--range", "30d", "--group", "week", "--format", "json", "--path", "/about")
    assert code == 0 and json.loads(out)["series"]["grain"] == "week" and sum(row["pageviews"] for row in json.loads(out)["series"]["rows"]) == 1
    code, _, err = run_pixeld("report", "--db", str(daemon.db), "--group", "decade")
    assert code == 2 and "--group" in err

    leader, follower = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIXELD_")}
    env["COLUMNS"] = "120"
    proc = subprocess.Popen([sys.executable, str(PIXELD), "report", "--db", str(daemon.db), "--range", "today"], stdout=follower, stderr=follower, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closes when the process ends
            break
        if not chunk:
            break
        chunks.append(chunk)
    proc.wait(timeout=20)
    os.close(leader)
    lines = b"".join(chunks).decode().splitlines()
    assert max(len(line.rstrip()) for line in lines) > 80 and all(len(line) <= 120 for line in lines)
    code, out, _ = run_pixeld("report", "--db", str(daemon.db), "--range", "today", env={"COLUMNS": "120"})
    assert max(len(line) for line in out.splitlines()) <= 80  # not a terminal: 80 columns


CHROME_UA_ANDROID = "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.6778.81 Mobile Safari/537.36"
