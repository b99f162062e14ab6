"""The test helpers themselves: a missing tool skips the test here, with its reason in the summary, and fails
it under CI, which installs every tool; tools found are used, whatever PATH says."""

import os
import subprocess
import sys

from conftest import READS_SETTINGS_FILE, ROOT, require_module, require_script, require_tool, run_pixeld

NEEDS = '''
import pytest
from conftest import require_module, require_script, require_tool


@pytest.fixture
def missing_program():
    return require_tool("pixeld-no-such-program", "pixeld-nor-this", package="pixeld-no-such-package")


def test_a_package():
    require_module("pixeld_no_such_package")


def test_a_script():
    require_script("pixeld-no-such-script")


def test_a_program():
    require_tool("pixeld-no-such-program", package="pixeld-no-such-package")


def test_a_fixture_that_needs_a_program(missing_program):
    pass


def test_what_is_there():
    assert require_module("json").dumps(1) == "1"
'''


def run_pytest(tmp_path, source, ci):
    """pytest with the project's configuration (pyproject.toml) and this conftest, on a test file of its own."""
    (tmp_path / "test_needs.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = str(ROOT / "tests")
    if ci:
        env["CI"] = "true"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path), "-p", "conftest", "-p", "no:cacheprovider",
         str(tmp_path / "test_needs.py")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_a_missing_tool_is_a_skip_with_its_reason_at_the_test(tmp_path):
    code, out = run_pytest(tmp_path, NEEDS, ci=False)
    assert code == 0 and "1 passed, 4 skipped" in out and "pyproject.toml" in out, out  # the summary comes from the project's -ra
    installs = "tests/requirements.txt: .venv/bin/pip install -r tests/requirements.txt"
    assert f"SKIPPED [1] test_needs.py:11: pixeld_no_such_package is not installed (it is in {installs})" in out, out
    assert "SKIPPED [1] test_needs.py:15: pixeld-no-such-script is not installed next to" in out, out
    assert "SKIPPED [1] test_needs.py:19: pixeld-no-such-program is not installed (apt-get install pixeld-no-such-package)" in out, out
    assert "SKIPPED [1] test_needs.py:23: pixeld-no-such-program is not installed" in out, out
    assert "conftest.py" not in out


def test_under_ci_a_missing_tool_fails_the_run(tmp_path):
    code, out = run_pytest(tmp_path, NEEDS, ci=True)
    assert code == 1 and "3 failed, 1 passed, 1 error" in out, out  # the fixture's failure is an error at setup
    assert "skipped" not in out and out.count("; CI installs it, so this test must run") == 8, out  # in the report and the summary


def test_tools_from_the_requirements_are_found_next_to_the_interpreter_without_path(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("CI", "true")  # nothing here may skip
    assert require_script("vermin").startswith(os.path.dirname(sys.executable))
    assert require_module("gunicorn").__name__ == "gunicorn"
    assert subprocess.run([require_script("vermin"), "--version"], capture_output=True, text=True).returncode == 0
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert require_tool("pixeld-no-such-program", "sh", package="dash") == "/usr/bin/sh"


def test_ci_runs_the_readmes_test_command_with_ci_set():
    """.ci/run runs the README's test command, exactly, with CI set: a skip for a tool it installs fails there."""
    readme = (ROOT / "README.md").read_text().splitlines()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    [command] = [line for line in readme if line.endswith("/python -m pytest")]
    assert command in ci
    assert 'export CI="${CI:-true}"' in ci and ci.index('export CI="${CI:-true}"') < ci.index(command)


def test_ci_installs_the_optional_requirements_before_the_tests():
    """Requirements kept out of the README's default install (chdb, for the ClickHouse tests) are installed by .ci/run,
    into the same venv, before the README's test command runs: under CI their tests run."""
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    [command] = [index for index, line in enumerate(ci) if line.endswith("/python -m pytest")]
    optional = sorted(path.name for path in (ROOT / "tests").glob("requirements-*.txt"))
    assert optional
    for name in optional:
        [install] = [index for index, line in enumerate(ci) if line.endswith(f".venv/bin/pip install -q -r tests/{name}")]
        assert install < command


def test_the_commands_the_tests_run_read_no_settings_file():
    """run_pixeld gives every command that takes --env-file none, so /etc/pixeld.env (the quick start's service's,
    say) changes no test. The list of those commands is pixeld's own."""
    listed = run_pixeld("--help")[1].split("COMMAND\n", 1)[1].split("\n\n")[0]
    commands = [line.split()[0] for line in listed.splitlines()]
    assert {"serve", "report", "snippet"} <= set(commands)
    assert tuple(command for command in commands if "--env-file" in run_pixeld(command, "--help")[1]) == READS_SETTINGS_FILE
