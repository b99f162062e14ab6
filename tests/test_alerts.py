"""Alerts: the last complete hour against that hour's average over the 7 days before, one line per site,
at most one per site, direction and day (remembered in the real database), printed or sent through a
real SMTP server. The clock is injected into ``pixeld.main``."""


import pytest

import pixeld
from pixeld import DAY, Config, Memo, Record, Store, connect
from conftest import free_port, run_pixeld

HOUR = 1_796_601_600 + 14 * 3600  # 2026-12-07 14:00 UTC
NOW = HOUR + 3600 + 600  # 15:10: the last complete hour is 14:00 to 15:00


def views(at, count, site="example.org", referrer=""):
    records = []
    for i in range(count):
        accepted = pixeld.read_record({"time": at + i * 10, "site": site, "path": "/", "referrer": referrer}, Config(), Memo(), "")
        records.append(Record(accepted.view, *accepted.stored))
    return records


@pytest.fixture
def db(tmp_path):
    """A week of steady hours, then a spike on example.org and a drop on drop.net."""
    path = tmp_path / "alerts.db"
    store = Store(connect(str(path)))
    for back in range(1, 8):
        for hour in (HOUR - back * DAY, HOUR + 3600 - back * DAY):
            store.write(pixeld.Batch(records=views(hour, 10) + views(hour, 10, "steady.org") + views(hour, 20, "drop.net")))
    store.write(pixeld.Batch(records=views(HOUR, 8) + views(HOUR + 900, 32, referrer="https://news.ycombinator.com/item?id=1") + views(HOUR, 11, "steady.org")
                             + views(HOUR, 2, "drop.net", "https://www.google.com/") + views(HOUR, 9, "new.example")))
    for later, spiked in ((HOUR + 3600, 50), (HOUR + DAY, 60)):  # the next hour, and the same hour the next day
        store.write(pixeld.Batch(records=views(later, spiked) + views(later, 10, "steady.org") + views(later, 20, "drop.net")))
    store.conn.close()
    return path


def alert(db, *args, now=NOW, capsys=None, environ=None):
    code = pixeld.main(["alert", "--db", str(db), *args], environ or {}, clock=lambda: now)
    out, err = capsys.readouterr()
    return code, out, err


def test_a_spike_and_a_drop_are_raised_once_a_day(db, capsys):
    code, out, err = alert(db, capsys=capsys)
    assert code == 1 and err == ""
    assert out.splitlines() == [
        "drop: drop.net had 2 page views from 14:00 to 15:00 UTC on 2026-12-07, 0.1× the usual 20.0 (that hour's average over the 7 days before); "
        "top source: Google (2 page views)",
        "spike: example.org had 40 page views from 14:00 to 15:00 UTC on 2026-12-07, 4.0× the usual 10.0 (that hour's average over the 7 days before); "
        "top source: Hacker News (32 page views)",
    ]
    assert alert(db, capsys=capsys) == (0, "", "")  # the same hour again
    assert alert(db, now=NOW + 3600, capsys=capsys) == (0, "", "")  # the next hour spikes too (5×), on the same day
    code, out, _ = alert(db, now=NOW + DAY, capsys=capsys)  # the next day: raised again (60 against (40 + 6 · 10) / 7)
    assert code == 1 and out.startswith("spike: example.org had 60 page views from 14:00 to 15:00 UTC on 2026-12-08") and len(out.splitlines()) == 1


def test_thresholds_and_quiet_sites(db, capsys):
    assert alert(db, "--spike", "4.5", "--drop", "0.05", capsys=capsys) == (0, "", "")  # 4.0× and 0.1×: inside both
    code, out, _ = alert(db, "--min-views", "5", "--site", "new.example", capsys=capsys)  # 9 page views, none before
    assert code == 1 and out.startswith("spike: new.example had 9 page views")
    assert "on 2026-12-07, none in that hour over the 7 days before; top source: (direct) (9 page views)" in out
    assert alert(db, "--site", "new.example", now=NOW + DAY, capsys=capsys)[0] == 0  # 9 page views are under --min-views 10


def test_alerts_use_the_time_zone_of_the_clock():
    kolkata, berlin = pixeld.load_zone("Asia/Kolkata"), pixeld.load_zone("Europe/Berlin")
    assert pixeld.last_complete_hour(NOW, kolkata) == HOUR - 1800  # 20:40 in India: 19:00 to 20:00 there, 13:30 UTC
    before = pixeld.same_hour_before(1_793_012_400, berlin, 3)  # 2026-10-26 12:00 CET; summer time ended on the 25th
    assert [pixeld.dt.datetime.fromtimestamp(t, berlin).strftime("%m-%d %H:%M") for t in before] == ["10-25 12:00", "10-24 12:00", "10-23 12:00"]
    assert before[0] - before[1] == DAY + 3600  # a 25-hour day


def test_an_alert_is_sent_instead_of_printed(db, smtp_server, capsys):  # noqa: F811
    inbox, address = smtp_server()
    code, out, err = alert(db, "--site", "example.org", "--to", "me@example.org", "--smtp", address, capsys=capsys)
    assert (code, out, err) == (1, "", "")
    message = inbox.message()
    assert message["Subject"].startswith("pixeld alert: spike: example.org had 40 page views") and message.get_content_type() == "text/plain"
    assert message.get_content().startswith("spike: example.org had 40 page views from 14:00 to 15:00 UTC")
    assert alert(db, "--site", "example.org", "--to", "me@example.org", "--smtp", address, capsys=capsys) == (0, "", "")
    assert len(inbox.envelopes) == 1


def test_an_alert_that_cannot_be_sent_is_raised_by_the_next_run(db, smtp_server, capsys):  # noqa: F811
    address = f"127.0.0.1:{free_port()}"
    code, out, err = alert(db, "--to", "me@example.org", "--smtp", address, capsys=capsys)
    assert (code, out, err) == (2, "", f"pixeld: cannot send through {address}: Connection refused\n")
    inbox, address = smtp_server()
    assert alert(db, "--to", "me@example.org", "--smtp", address, capsys=capsys)[0] == 1
    assert inbox.message().get_content().count("\n") == 2  # both alerts, one line each


def test_the_command_line(tmp_path):
    code, out, err = run_pixeld("alert", "--db", str(tmp_path / "empty.db"))  # the real clock, a new database: nothing to say
    assert (code, out, err) == (0, "", "")
    for args in (["--spike", "1"], ["--drop", "1.5"], ["--min-views", "0"]):
        code, out, err = run_pixeld("alert", "--db", str(tmp_path / "empty.db"), *args)
        assert code == 2 and out == "" and err.count("\n") == 1 and "--spike must be above 1" in err
