"""The app is a plain WSGI callable: it runs under gunicorn too, and flushes when gunicorn stops it."""

import http.client
import json
import os
import signal
import subprocess
import sys

from conftest import CHROME, ROOT, free_port, report_json, request, require_module, stored_pageviews, wait_for


def test_pixel_and_report_under_gunicorn(tmp_path):
    require_module("gunicorn")  # run by the interpreter that runs the tests: the venv's bin/ need not be on PATH
    port, db = free_port(), tmp_path / "gunicorn.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIXELD_")}
    env.update(PIXELD_DB=str(db))  # as the README runs it: --chdir names the folder of pixeld.py, from anywhere
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--chdir", str(ROOT), "--bind", f"127.0.0.1:{port}", "--workers", "1", "--threads", "4", "pixeld:create_app()"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
    )
    try:
        wait_for(lambda: request("127.0.0.1", port, "/healthz").status == 200, seconds=20, proc=proc)
        for i in range(5):
            answer = request("127.0.0.1", port, f"/pixel.gif?path=/g{i}&host=example.org", {"User-Agent": CHROME})
            assert answer.status == 200 and answer.headers["content-type"] == "image/gif"
        head = request("127.0.0.1", port, "/pixel.gif?path=/head&host=example.org", {"User-Agent": CHROME}, method="HEAD")
        assert head.status == 200 and head.body == b""
        for path, body, status in (("/api/event", {"n": "pageview", "u": "https://example.org/plausible", "d": "example.org"}, 202),
                                   ("/api/send", {"type": "event", "payload": {"website": "x", "hostname": "example.org", "url": "/umami"}}, 200),
                                   ("/api/event", {"n": "pageview", "u": "https://example.org/", "d": "example.org", "pad": "x" * 20_000}, 413),
                                   ("/api/send", "{not json", 400)):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("POST", path, body=body if isinstance(body, str) else json.dumps(body), headers={"User-Agent": CHROME, "Content-Type": "text/plain"})
            assert conn.getresponse().status == status
            conn.close()
    finally:
        proc.send_signal(signal.SIGTERM)  # gunicorn's graceful stop: the worker exits, the writer flushes
        output = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 0, output
    assert len(stored_pageviews(db)) == 8  # the pixel's six, and one each from Plausible's and Umami's endpoints
    assert report_json(db)["pageviews"] == 8
