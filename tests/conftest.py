"""Shared helpers: the real daemon as a subprocess on a free loopback port, real HTTP, the real database."""

import http.client
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple
from urllib.parse import urlencode

import pytest

ROOT = Path(__file__).resolve().parent.parent
PIXELD = ROOT / "pixeld.py"
sys.path.insert(0, str(ROOT))

import pixeld  # noqa: E402  (importable once ROOT is on the path)

CHROME = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"
IPHONE = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1"
FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0"


def free_port(family: int = socket.AF_INET, host: str = "127.0.0.1") -> int:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class Response:
    def __init__(self, status: int, headers: Dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    @property
    def text(self) -> str:
        return self.body.decode()


def request(host: str, port: int, target: str, headers: Optional[Dict[str, str]] = None, method: str = "GET") -> Response:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, target, headers=headers or {})
        answer = conn.getresponse()
        return Response(answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read())
    finally:
        conn.close()


class Daemon:
    """``pixeld.py serve`` in a subprocess; ``stop()`` sends SIGTERM and returns everything it printed."""

    def __init__(self, db: Path, args: List[str], env: Optional[Dict[str, str]] = None, host: str = "127.0.0.1") -> None:
        self.db, self.host = db, host
        self.port = free_port(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        listen = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("PIXELD_")}
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, str(PIXELD), "serve", "--listen", listen, "--db", str(db), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env,
        )
        self.output = ""
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pixeld exited with {self.proc.returncode}: {self.proc.stdout.read().decode()}")
            try:
                if request(self.host, self.port, "/healthz").status == 200:
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("pixeld did not become ready")

    def get(self, target: str, headers: Optional[Dict[str, str]] = None, method: str = "GET") -> Response:
        return request(self.host, self.port, target, headers, method)

    def pixel(self, params: Optional[Dict[str, str]] = None, headers: Optional[Dict[str, str]] = None) -> Response:
        query = "?" + urlencode(params) if params else ""
        return self.get("/pixel.gif" + query, {"User-Agent": CHROME, **(headers or {})})

    def report(self, query: str = "range=all", headers: Optional[Dict[str, str]] = None) -> Response:
        return self.get("/report?" + query, headers)

    def stop(self, sig: int = signal.SIGTERM) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        out, _ = self.proc.communicate(timeout=30)
        self.output += out.decode(errors="replace")
        return self.output


@pytest.fixture
def start_daemon(tmp_path):
    """Start daemons on demand; every one still running is stopped at the end of the test."""
    daemons: List[Daemon] = []

    def start(*args: str, env: Optional[Dict[str, str]] = None, db: Optional[Path] = None, host: str = "127.0.0.1") -> Daemon:
        daemon = Daemon(db or tmp_path / "pixeld.db", list(args), env, host)
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        daemon.stop()


def stored_pageviews(db: Path) -> List[Dict[str, object]]:
    """Every stored page view with its strings resolved, oldest first."""
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(
            """
            SELECT p.id, site.value, path.value, title.value, referrer.value, country.value,
                   a.browser, a.version, a.os, a.device, screen.value, language.value
            FROM pageviews p
            JOIN strings site ON site.id = p.site JOIN strings path ON path.id = p.path
            JOIN strings title ON title.id = p.title JOIN strings referrer ON referrer.id = p.referrer
            JOIN strings country ON country.id = p.country JOIN agents a ON a.id = p.agent
            JOIN strings screen ON screen.id = p.screen JOIN strings language ON language.id = p.language
            ORDER BY p.id
            """
        ).fetchall()
    finally:
        conn.close()
    rows = [(pixeld.second_of(row[0]),) + row[1:] for row in rows]
    keys = ("time", "site", "path", "title", "referrer", "country", "browser", "version", "os", "device", "screen", "language")
    return [dict(zip(keys, row)) for row in rows]


def run_pixeld(*args: str, env: Optional[Dict[str, str]] = None, timeout: float = 20) -> Tuple[int, str, str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PIXELD_")}
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, str(PIXELD), *args], capture_output=True, text=True, env=full_env, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr
