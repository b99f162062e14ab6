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
    """Every stored page view, oldest first, as its PageView fields (from the registry, as the export
    reads them), with the time in unix seconds."""
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(pixeld.export_sql("pageviews", "pageview") + " ORDER BY t.id", (0, 1 << 62)).fetchall()
    finally:
        conn.close()
    kept = [name for name in pixeld.PageView._fields if name not in ("time", "first_today")]
    views = [dict(zip(pixeld.EXPORT_FIELDS, row)) for row in rows]
    return [{"time": pixeld.second_of(row[0]), **{name: view[name] for name in kept}} for row, view in zip(rows, views)]


def section_counts(rows: List[object]) -> Dict[str, int]:
    """A report section's rows as {value: count}."""
    return {row.value: row.count for row in rows}


def make_sections(totals: "pixeld.Metrics", **given: List[tuple]) -> Dict[str, list]:
    """Every report section, with sample rows of its kind from tuples: (value, count) for page views,
    (value, count, visitors[, channel]) for visitors and events, (value, visits, bounces) for entry pages."""
    sections = {}
    for name, (_, section) in pixeld.SECTIONS.items():
        rows = []
        for value, count, *more in given.get(name, []):
            second = more[0] if more else 0
            metrics = pixeld.Metrics(visits=count, bounces=second) if section.row is pixeld.EntryRow else pixeld.Metrics(views=count, visitors=second)
            rows.append(section.row.make(value, metrics, totals, {"channel": more[1]} if len(more) > 1 else {}))
        sections[name] = rows
    return sections


def run_pixeld(*args: str, env: Optional[Dict[str, str]] = None, timeout: float = 20) -> Tuple[int, str, str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PIXELD_")}
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, str(PIXELD), *args], capture_output=True, text=True, env=full_env, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr
