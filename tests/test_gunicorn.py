"""The app is a plain WSGI callable: it runs under gunicorn too, and flushes when gunicorn stops it."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import CHROME, ROOT, free_port, request, stored_pageviews

pytestmark = pytest.mark.skipif(shutil.which("gunicorn") is None, reason="gunicorn is not installed (it is in tests/requirements.txt)")


def test_pixel_and_report_under_gunicorn(tmp_path):
    port, db = free_port(), tmp_path / "gunicorn.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIXELD_")}
    env.update(PIXELD_DB=str(db), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        ["gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1", "--threads", "4", "pixeld:create_app()"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if request("127.0.0.1", port, "/healthz").status == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "gunicorn did not start"
            time.sleep(0.1)
        for i in range(5):
            answer = request("127.0.0.1", port, f"/pixel.gif?path=/g{i}&host=example.org", {"User-Agent": CHROME})
            assert answer.status == 200 and answer.headers["content-type"] == "image/gif"
        head = request("127.0.0.1", port, "/pixel.gif?path=/head&host=example.org", {"User-Agent": CHROME}, method="HEAD")
        assert head.status == 200 and head.body == b""
    finally:
        proc.send_signal(signal.SIGTERM)  # gunicorn's graceful stop: the worker exits, the writer flushes
        output = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 0, output
    assert len(stored_pageviews(db)) == 6
    report = subprocess.run([sys.executable, str(ROOT / "pixeld.py"), "report", "--db", str(db), "--format", "json", "--range", "today"], capture_output=True, text=True)
    assert json.loads(report.stdout)["pageviews"] == 6
