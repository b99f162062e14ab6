"""pixeld.service: systemd accepts it silently, it is hardened, and its settings are pixeld's own."""

import re
import shutil
import subprocess

import pytest

import pixeld
from conftest import ROOT

UNIT = ROOT / "pixeld.service"
needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (apt-get install systemd)")


@needs_systemd_analyze
def test_systemd_analyze_verify_is_silent():
    proc = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout == ""


@needs_systemd_analyze
def test_exposure_score_is_at_most_one():
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", str(UNIT)], capture_output=True, text=True)
    match = re.search(r"Overall exposure level for pixeld\.service: (\d+\.\d)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    assert float(match.group(1)) <= 1.0


def settings():
    pairs = [line.split("=", 1) for line in UNIT.read_text().splitlines() if "=" in line and not line.startswith("#")]
    return [(key.strip(), value.strip()) for key, value in pairs]


def test_unit_runs_the_installed_file_as_a_dynamic_user_with_its_state_directory():
    unit = dict(settings())
    assert unit["ExecStart"] == "/usr/bin/python3 /usr/local/bin/pixeld.py serve"
    assert unit["DynamicUser"] == "yes" and unit["StateDirectory"] == "pixeld"
    assert unit["Restart"] == "on-failure" and unit["EnvironmentFile"] == "-/etc/pixeld.env"
    assert unit["UMask"] == "0077"


def test_unit_environment_names_pixeld_settings():
    names = {value.split("=", 1)[0] for key, value in settings() if key == "Environment"}
    assert names and names <= set(pixeld.ENVIRONMENT.values())
    assert dict(value.split("=", 1) for key, value in settings() if key == "Environment")["PIXELD_DB"] == "/var/lib/pixeld/pixeld.db"
