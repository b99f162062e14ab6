"""Counting without consent (CNIL's exemption for audience measurement): the doctor's line per condition,
and objections honoured on the server (Sec-GPC with --honour-gpc). The snippet's opt-out is tested in a
real browser in test_snippet.py."""

import json
import time

from conftest import IPHONE, run_pixeld, stored_pageviews

CONDITIONS = ("own measurement only", "no cross-site identifier", "geolocation no finer than the city", "raw data at most 25 months", "visitors can object")


def consent_lines(*args):
    code, out, err = run_pixeld("doctor", *args)
    lines = {line.split(None, 1)[1].split(":", 1)[0][len("consent, "):]: line for line in out.splitlines() if line.split(None, 1)[-1].startswith("consent, ")}
    return code, lines


def test_the_doctor_checks_each_condition_on_one_line(tmp_path):
    db = str(tmp_path / "pixeld.db")
    code, lines = consent_lines("--db", db)
    assert code == 0 and tuple(lines) == CONDITIONS
    assert all(lines[name].startswith("ok ") for name in CONDITIONS if name != "raw data at most 25 months"), lines
    assert lines["raw data at most 25 months"].startswith("warn ") and "kept forever" in lines["raw data at most 25 months"]
    assert "--honour-gpc would honour Sec-GPC" in lines["visitors can object"] and "#pixeld-optout" in lines["visitors can object"]
    assert "GeoIP is off" in lines["geolocation no finer than the city"]
    _, lines = consent_lines("--db", db, "--keep-days", "760", "--honour-gpc")
    assert lines["raw data at most 25 months"].startswith("ok ") and "after 760 days" in lines["raw data at most 25 months"]
    assert "Sec-GPC: 1 is honoured too" in lines["visitors can object"]
    _, lines = consent_lines("--db", db, "--keep-days", "761")
    assert lines["raw data at most 25 months"].startswith("warn ") and "761 is longer" in lines["raw data at most 25 months"]
    code, out, _ = run_pixeld("doctor", "--db", db, env={"PIXELD_KEEP_DAYS": "400", "PIXELD_HONOUR_GPC": "1"})
    assert "ok    consent, raw data at most 25 months" in out and "Sec-GPC: 1 is honoured too" in out
    code, out, _ = run_pixeld("doctor", "--db", db, "--keep-days", "many")
    assert code == 1 and "fail  consent exemption: cannot be checked" in out


def test_sec_gpc_is_an_objection_with_honour_gpc(start_daemon):
    daemon = start_daemon("--honour-gpc", "--rate-limit", "0")
    gpc = {"Sec-GPC": "1"}
    assert daemon.pixel({"host": "example.org", "path": "/objecting"}, gpc).status == 200  # the GIF, always
    daemon.pixel({"host": "example.org", "path": "/objecting", "event": "signup"}, gpc)
    daemon.pixel({"host": "example.org", "path": "/counted"}, {"Sec-GPC": "0"})
    daemon.pixel({"host": "example.org", "path": "/counted"}, {"User-Agent": IPHONE})
    dry = daemon.get("/pixel.gif?dry_run=1&host=example.org&path=/x", {"User-Agent": IPHONE, **gpc})
    assert dry.text.startswith("filtered: gpc (the browser sent Sec-GPC: 1")
    time.sleep(1.5)
    data = json.loads(daemon.report("range=today&format=json").text)
    assert data["pageviews"] == 2 and data["filtered"]["gpc"] == 2 and data["sections"]["events"] == []
    assert "objected (GPC) 2" in daemon.report("range=today").text
    assert 'outcome="gpc"} 2' in daemon.get("/metrics").text
    assert "Sec-GPC honoured" in daemon.stop()
    assert [view["path"] for view in stored_pageviews(daemon.db)] == ["/counted", "/counted"]


def test_sec_gpc_counts_without_honour_gpc(start_daemon):
    daemon = start_daemon()
    daemon.pixel({"host": "example.org", "path": "/"}, {"Sec-GPC": "1"})
    daemon.stop()
    assert len(stored_pageviews(daemon.db)) == 1
