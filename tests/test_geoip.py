"""Countries from a real .mmdb, built at test time, read by the optional geoip2 package."""

import json

import pytest

from conftest import require_module, run_pixeld, stored_pageviews, write_mmdb

NETWORKS = {"81.2.69.0/24": "GB", "89.160.20.0/24": "SE", "2001:218::/32": "JP"}


@pytest.fixture(autouse=True)
def geoip2():
    """pixeld's optional GeoIP package, which tests/requirements.txt installs."""
    return require_module("geoip2")


@pytest.fixture
def country_db(tmp_path):
    return write_mmdb(tmp_path / "countries.mmdb", NETWORKS)


def test_countries_land_in_the_report(start_daemon, country_db):
    daemon = start_daemon("--geoip", str(country_db))
    for address in ("81.2.69.142", "81.2.69.160", "89.160.20.112", "2001:218::1", "8.8.8.8", "10.0.0.1"):
        daemon.pixel({"path": "/", "host": "example.org"}, {"X-Forwarded-For": address})
    output = daemon.stop()
    assert "GeoIP on" in output
    assert sorted(v["country"] for v in stored_pageviews(daemon.db)) == ["", "", "GB", "GB", "JP", "SE"]
    code, out, _ = run_pixeld("report", "--db", str(daemon.db), "--range", "today", "--format", "json")
    assert code == 0
    countries = {row["value"]: row["count"] for row in json.loads(out)["sections"]["countries"]}
    assert countries == {"GB": 2, "SE": 1, "JP": 1, "": 2}


def test_an_invalid_mmdb_stops_startup_with_one_line(tmp_path):
    bogus = tmp_path / "bogus.mmdb"
    bogus.write_bytes(b"\x00not a maxmind database\xff" * 64)
    for path in (bogus, tmp_path / "missing.mmdb"):
        code, _, err = run_pixeld("serve", "--db", str(tmp_path / "p.db"), "--geoip", str(path), "--listen", "127.0.0.1:0")
        assert code == 2 and err.count("\n") == 1 and "cannot open GeoIP database" in err and "Traceback" not in err


def test_geoip_without_the_package_stops_startup_with_one_line(tmp_path, country_db):
    shadow = tmp_path / "shadow" / "geoip2"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('geoip2 is not installed here')\n")
    code, _, err = run_pixeld(
        "serve", "--db", str(tmp_path / "p.db"), "--geoip", str(country_db), "--listen", "127.0.0.1:0",
        env={"PYTHONPATH": str(shadow.parent)},
    )
    assert code == 2 and err == "pixeld: --geoip needs the geoip2 package: pip install geoip2\n"
