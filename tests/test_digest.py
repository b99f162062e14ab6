"""The digest: its period, its contents and their escaping, its MIME structure, and its delivery to a
real SMTP server (aiosmtpd on a loopback port: plain, STARTTLS and TLS with a login) or to sendmail;
a failed send is one line and is not tried twice. Also the mail plumbing that alerts share."""

import email
import email.policy
import os
import re
import shutil
import ssl
import subprocess
import sys

import pytest
from aiosmtpd.smtp import AuthResult

import pixeld
from pixeld import DAY, Config, Memo, Record, Store, connect
from conftest import ROOT, Inbox, free_port, run_pixeld
from test_html import HOSTILE, parsed

NOW = 1_796_601_600 + 8 * 3600  # Monday 2026-12-07 08:00 UTC: the 7d digest covers 2026-11-30 to 2026-12-06
PERIOD = 1_795_996_800  # 2026-11-30 00:00 UTC
SCRIPT, IMAGE = HOSTILE[0], HOSTILE[1]
MAIL_TAGS = {"html", "head", "meta", "title", "body", "h1", "h2", "p", "table", "tr", "td", "b", "ul", "li"}


def record(at, path="/", referrer="", campaign="", title="", site="example.org"):
    """A page view as the import pipeline makes it from an exported row: normalised and classified."""
    row = {"time": at, "site": site, "path": path, "referrer": referrer, "campaign": campaign, "title": title,
           "first_today": 1, "visit_views": 1, "duration": 30}
    accepted = pixeld.read_record(row, Config(), Memo(), "")
    return Record(accepted.view, *accepted.stored)


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "digest.db"
    store = Store(connect(str(path)))
    store.write(pixeld.Batch(records=[
        record(PERIOD - 30 * DAY, referrer="https://old.example/link"),  # seen long before: not new
        record(PERIOD - 3 * DAY, referrer="https://www.google.com/"),
        record(PERIOD - 2 * DAY, "/about"),
        *[record(PERIOD + i * 3600, "/post", referrer="https://news.ycombinator.com/item?id=1") for i in range(3)],
        record(PERIOD + DAY, f"/{SCRIPT}", title=SCRIPT, referrer="https://www.google.com/"),
        record(PERIOD + 2 * DAY, "/post", campaign=f"{IMAGE} / email / dec"),
        record(PERIOD + 3 * DAY, "/", referrer="https://old.example/again"),
        record(PERIOD + 7 * DAY + 60, "/today", referrer="https://today.example/"),  # today: not in the digest
        record(PERIOD + DAY, "/elsewhere", site="other.net"),
    ]))
    store.conn.close()
    return path


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1, trusted by pixeld through SSL_CERT_FILE."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return cert, context


def digest(db, *args, environ=None, capsys=None):
    """Run ``pixeld.py digest`` in this process at NOW: (exit status, stdout, stderr)."""
    code = pixeld.main(["digest", "--db", str(db), *args], environ or {}, clock=lambda: NOW)
    out, err = capsys.readouterr()
    return code, out, err


def test_the_period_is_the_last_complete_one():
    berlin = pixeld.load_zone("Europe/Berlin")
    assert pixeld.digest_range("7d", NOW, pixeld.dt.timezone.utc) == pixeld.Range(PERIOD, PERIOD + 7 * DAY)
    assert pixeld.digest_range("30d", NOW, pixeld.dt.timezone.utc) == pixeld.Range(PERIOD + 7 * DAY - 30 * DAY, PERIOD + 7 * DAY)
    assert pixeld.digest_range("month", NOW, pixeld.dt.timezone.utc) == pixeld.Range(1_793_491_200, 1_796_083_200)  # November 2026
    assert pixeld.digest_range("month", 1_793_491_200 + 3600, berlin) == pixeld.Range(1_790_805_600, 1_793_487_600)  # October, Berlin time


def test_the_digest_reaches_a_real_smtp_server_as_text_and_html(db, smtp_server, capsys):
    pixeld.main(["note", "2026-12-02", f"Posted on Hacker News {SCRIPT}", "--db", str(db)])
    pixeld.main(["note", "2026-11-20", "Before the period", "--db", str(db)])
    capsys.readouterr()
    inbox, address = smtp_server()
    code, out, err = digest(db, "--to", "me@example.org", "--from", "stats@example.org", "--smtp", address, capsys=capsys)
    assert (code, out) == (0, "") and err == "pixeld: sent the digest to me@example.org\n"
    assert inbox.envelopes[0].mail_from == "stats@example.org" and inbox.envelopes[0].rcpt_tos == ["me@example.org"]
    message = inbox.message()
    assert message["Subject"] == "pixeld digest · all sites · 2026-11-30 – 2026-12-06 UTC (7 days)"
    assert message["To"] == "me@example.org" and message["From"] == "stats@example.org" and message["Message-ID"] and message["Date"]
    assert message.get_content_type() == "multipart/alternative"
    text_part, html_part = message.iter_parts()
    assert text_part.get_content_type() == "text/plain" and html_part.get_content_type() == "text/html"
    assert {part["Content-Transfer-Encoding"] for part in (text_part, html_part)} == {"quoted-printable"}
    text, page = text_part.get_content().replace("\r\n", "\n"), html_part.get_content()

    assert re.search(r"^Page views +7  ▲ 250%$", text, re.M) and re.search(r"^Visitors +7  ▲ 250%$", text, re.M)  # 2 the week before
    top_pages = text.split("Top pages")[1].split("\n\n")[0].splitlines()[1:]
    assert [line.split()[0] for line in top_pages] == ["example.org/post", "example.org/", f"example.org/{SCRIPT}", "other.net/elsewhere"]
    assert top_pages[0].endswith(" 4")
    new_sources = text.split("New sources")[1].split("\n\n")[0]
    assert "Hacker News" in new_sources and IMAGE in new_sources and "Google" not in new_sources and "old.example" not in new_sources
    assert "today.example" not in text and "Before the period" not in text and "Goals" not in text
    assert f"◆ 2026-12-02 Posted on Hacker News {SCRIPT}" in text

    tags, attributes, shown = parsed(page)
    assert tags <= MAIL_TAGS and {name for name, _ in attributes} <= {"lang", "charset", "style", "role"}
    assert "<script" not in page and "<img" not in page and "http" not in page  # nothing from elsewhere
    assert SCRIPT in shown and IMAGE in shown and f"/{SCRIPT}" in shown and "Hacker News" in shown
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;img src=x onerror=alert(2)&gt;" in page


def test_one_site_and_the_goals(db, capsys):
    conn = connect(str(db), readonly=True)
    built = pixeld.build_digest(conn, pixeld.Query(pixeld.digest_range("7d", NOW, pixeld.dt.timezone.utc), site="other.net"))
    conn.close()
    assert [row.value for row in built.report.sections["pages"]] == ["/elsewhere"]
    assert "Goals" not in pixeld.digest_text(built)  # none configured
    code, out, _ = digest(db, "--goal", "Read=path:/post", capsys=capsys)
    assert code == 0 and re.search(r"^Goals +Visitors\nRead \(\d+\.\d%\) +\d+$", out, re.M)
    hostile = built._replace(report=built.report._replace(sections={**built.report.sections, "goals": [pixeld.GoalRow(SCRIPT, 3, 4, 42.0)]}))
    assert re.search(r"^Goals +Visitors\n<script>alert\(1\)</script> \(42\.0%\) +3$", pixeld.digest_text(hostile), re.M)
    assert "&lt;script&gt;alert(1)&lt;/script&gt; (42.0%)</td>" in pixeld.digest_html(hostile) and "<script" not in pixeld.digest_html(hostile)


def test_without_a_transport_the_message_is_printed(db, capsys):
    code, out, err = digest(db, "--site", "example.org", "--range", "30d", capsys=capsys)
    assert code == 0 and err == ""
    message = email.message_from_string(out, policy=email.policy.default)
    assert message["Subject"].startswith("pixeld digest · example.org · 2026-11-07 – 2026-12-06")
    assert [part.get_content_type() for part in message.iter_parts()] == ["text/plain", "text/html"]
    assert "Top pages" in out and "Content-Transfer-Encoding: 8bit" in out  # readable in a terminal


@pytest.mark.parametrize("password_from", ["file", "credential"])
def test_starttls_and_a_login_with_a_password_from_a_file_or_a_credential(db, smtp_server, certificate, tmp_path, monkeypatch, capsys, password_from):
    cert, context = certificate
    logins = []

    def authenticator(server, session, envelope, mechanism, auth_data):
        logins.append((auth_data.login, auth_data.password))
        return AuthResult(success=auth_data.password == b"s3cret pass", handled=False)

    inbox, address = smtp_server(tls_context=context, require_starttls=True, authenticator=authenticator, auth_required=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    (tmp_path / "smtp-password").write_text("s3cret pass\n")
    if password_from == "file":
        source, environ = ["--smtp-password-file", str(tmp_path / "smtp-password")], {}
    else:
        source, environ = ["--smtp-credential", "smtp-password"], {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    code, _, err = digest(db, "--to", "me@example.org", "--smtp", address, "--starttls", "--smtp-user", "pixeld", *source, environ=environ, capsys=capsys)
    assert code == 0, err
    assert logins == [(b"pixeld", b"s3cret pass")] and inbox.message()["Subject"].startswith("pixeld digest")


def test_tls_from_the_start(db, smtp_server, certificate, monkeypatch, capsys):
    cert, context = certificate
    inbox, address = smtp_server(ssl_context=context)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    code, _, err = digest(db, "--to", "me@example.org", "--smtp", address, "--tls", capsys=capsys)
    assert code == 0, err
    assert inbox.message().get_content_type() == "multipart/alternative"


def test_an_untrusted_certificate_is_refused(db, smtp_server, certificate, capsys):
    inbox, address = smtp_server(tls_context=certificate[1], require_starttls=True)
    code, _, err = digest(db, "--to", "me@example.org", "--smtp", address, "--starttls", capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and "CERTIFICATE_VERIFY_FAILED" in err and inbox.envelopes == []


def test_a_refused_login_is_one_line_and_sends_nothing(db, smtp_server, certificate, tmp_path, monkeypatch, capsys):
    cert, context = certificate
    refuse = lambda *args: AuthResult(success=False, handled=False)  # noqa: E731
    inbox, address = smtp_server(tls_context=context, require_starttls=True, authenticator=refuse, auth_required=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    (tmp_path / "password").write_text("wrong")
    login = ["--smtp-user", "pixeld", "--smtp-password-file", str(tmp_path / "password")]
    code, out, err = digest(db, "--to", "me@example.org", "--smtp", address, "--starttls", *login, capsys=capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"pixeld: {address} refused the login of pixeld: 535") and "wrong" not in err
    assert inbox.attempts == 0


def test_a_server_that_fails_the_message_gets_it_once(db, smtp_server, tmp_path):
    inbox, address = smtp_server(Inbox("451 4.3.0 try again later"))
    code, out, err = run_pixeld("digest", "--db", str(db), "--to", "me@example.org", "--smtp", address)
    assert code == 2 and out == "" and err == f"pixeld: {address} answered 451 4.3.0 try again later\n"
    assert inbox.attempts == 1


def test_no_server_is_one_line(db):
    address = f"127.0.0.1:{free_port()}"
    code, out, err = run_pixeld("digest", "--db", str(db), "--to", "me@example.org", "--smtp", address)
    assert (code, out, err) == (2, "", f"pixeld: cannot send through {address}: Connection refused\n")


@pytest.mark.parametrize(
    "args, reason",
    [
        (["--smtp", "127.0.0.1:25"], "give the recipient with --to"),
        (["--to", "me@example.org", "--smtp", ":25"], "cannot parse --smtp"),
        (["--to", "not an address", "--sendmail"], "cannot use the address"),
        (["--to", "me@example.org", "--smtp", "mail.example.org:587", "--smtp-user", "u", "--smtp-password-file", "/dev/null"], "--starttls or --tls"),
        (["--to", "me@example.org", "--smtp", "127.0.0.1:25", "--smtp-user", "u"], "--smtp-password-file FILE or --smtp-credential NAME"),
        (["--to", "me@example.org", "--smtp", "127.0.0.1:25", "--smtp-user", "u", "--smtp-credential", "pw"], "needs $CREDENTIALS_DIRECTORY"),
        (["--to", "me@example.org", "--smtp", "127.0.0.1:25", "--smtp-user", "u", "--smtp-password-file", "/no/such/file"], "cannot read the mail password"),
        (["--to", "me@example.org", "--smtp", "127.0.0.1:25", "--sendmail"], "either --smtp or --sendmail"),
        (["--starttls"], "need --smtp HOST:PORT"),
    ],
)
def test_bad_mail_options_get_one_line_before_anything_is_read(tmp_path, args, reason):
    code, out, err = run_pixeld("digest", "--db", str(tmp_path / "none.db"), *args)
    assert code == 2 and out == "" and err.count("\n") == 1 and reason in err, err


@pytest.fixture
def fake_sendmail(tmp_path):
    """A sendmail that keeps its arguments and the message, or fails when asked to."""
    program = tmp_path / "sendmail"
    program.write_text(
        f"#!{sys.executable}\nimport os, sys\n"
        f"open({str(tmp_path / 'args')!r}, 'w').write(' '.join(sys.argv[1:]))\n"
        f"open({str(tmp_path / 'message')!r}, 'wb').write(sys.stdin.buffer.read())\n"
        "if os.environ.get('FAIL'):\n    sys.stderr.write('sendmail: queue is full\\nmore\\n')\n    sys.exit(75)\n"
    )
    program.chmod(0o755)
    return program


def test_sendmail_gets_the_message_once(db, fake_sendmail, tmp_path):
    code, out, err = run_pixeld("digest", "--db", str(db), "--to", "me@example.org", "--sendmail", str(fake_sendmail))
    assert (code, out) == (0, "") and "sent the digest to me@example.org" in err
    assert (tmp_path / "args").read_text() == "-t -i"
    message = email.message_from_bytes((tmp_path / "message").read_bytes(), policy=email.policy.default)
    assert message["To"] == "me@example.org" and message.get_content_type() == "multipart/alternative"


def test_a_failing_sendmail_is_one_line(db, fake_sendmail):
    code, out, err = run_pixeld("digest", "--db", str(db), "--to", "me@example.org", "--sendmail", str(fake_sendmail), env={"FAIL": "1"})
    assert (code, out, err) == (2, "", f"pixeld: {fake_sendmail} exited with status 75: sendmail: queue is full\n")
    code, out, err = run_pixeld("digest", "--db", str(db), "--to", "me@example.org", "--sendmail", "/no/such/sendmail")
    assert (code, out, err) == (2, "", "pixeld: cannot run /no/such/sendmail: No such file or directory\n")


def test_the_default_sendmail_is_the_usual_path():
    args = pixeld.build_parser().parse_args(["digest", "--to", "me@example.org", "--sendmail"])
    assert pixeld.mail_settings(args, {}).sendmail == "/usr/sbin/sendmail"
    assert os.path.basename(pixeld.SENDMAIL) == "sendmail"


def readme_units():
    """The systemd units the README gives, by file name: the digest's and the alerts' (and the ClickHouse feed's)."""
    blocks = re.findall(r"```ini\n# /etc/systemd/system/(\S+)\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return {name: f"# /etc/systemd/system/{name}\n{body}" for name, body in blocks}


def unit_settings(text):
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))


def test_the_readme_units_are_a_weekly_digest_and_an_hourly_alert():
    units = readme_units()
    assert set(units) == {"pixeld-digest.service", "pixeld-digest.timer", "pixeld-alert.service", "pixeld-alert.timer",
                          "pixeld-feed.service", "pixeld-feed.timer"}  # the feed's: tests/test_clickhouse.py
    digest_timer, alert_timer = unit_settings(units["pixeld-digest.timer"]), unit_settings(units["pixeld-alert.timer"])
    assert digest_timer["OnCalendar"].startswith("Mon ") and digest_timer["Persistent"] == "true"
    assert alert_timer["OnCalendar"] == "*-*-* *:05:00"
    for name in ("pixeld-digest.service", "pixeld-alert.service"):
        service = unit_settings(units[name])
        assert service["Type"] == "oneshot" and "Restart" not in service  # sent once: never started again after a failure
        assert service["DynamicUser"] == "yes" and service["User"] == "pixeld" and service["StateDirectory"] == "pixeld"  # pixeld.service's user
        command = service["ExecStart"].split()
        assert command[:2] == ["/usr/bin/python3", "/usr/local/bin/pixeld.py"] and "--smtp-credential" in command
        credential = service["LoadCredential"].split(":", 1)[0]
        args = pixeld.build_parser().parse_args(command[2:])
        assert args.smtp_credential == credential and args.starttls and "--smtp-password" not in service["ExecStart"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (apt-get install systemd)")
def test_systemd_analyze_verify_accepts_the_readme_units(tmp_path):
    units = readme_units()
    for name, text in units.items():
        (tmp_path / name).write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", *sorted(str(tmp_path / name) for name in units)], capture_output=True, text=True)
    assert (done.returncode, done.stderr) == (0, "")
