"""Shared helpers, each defined once: the tools the tests need, the real daemon as a subprocess on a free
loopback port, real HTTP, the app called in process, the real database, and waiting for them."""

import email
import email.policy
import http.client
import importlib
import io
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict, Iterable, Iterator, List, NoReturn, Optional, Tuple
from urllib.parse import urlencode
from wsgiref.util import setup_testing_defaults

import pytest

ROOT = Path(__file__).resolve().parent.parent
PIXELD = ROOT / "pixeld.py"
sys.path.insert(0, str(ROOT))

import pixeld  # noqa: E402  (importable once ROOT is on the path)

CHROME = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"
IPHONE = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1"
FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0"


# ---- The tools the tests need -------------------------------------------------------------------------------
# Every test that needs a package or a program asks for it here, in the test or in a fixture. Where it is missing
# the test is skipped, with the reason in the summary (-ra); under CI (the CI variable set) it fails instead,
# because CI installs all of them (.ci/run, tests/requirements*.txt): a test that CI skips can never fail.


def missing(reason: str) -> NoReturn:
    """Skip the test for a missing tool; fail it under CI."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI installs it, so this test must run", pytrace=False)
    pytest.skip(reason)


def require_module(name: str, requirements: str = "tests/requirements.txt") -> ModuleType:
    """A package from ``requirements`` (a file that .ci/run installs), imported into the interpreter that runs the tests."""
    try:
        return importlib.import_module(name)
    except ImportError:
        pass
    missing(f"{name} is not installed (it is in {requirements}: .venv/bin/pip install -r {requirements})")


def require_script(name: str) -> str:
    """The command a package from tests/requirements.txt installs, next to the interpreter that runs the tests
    (the venv's bin/, which is not on PATH unless the venv is activated)."""
    script = Path(sys.executable).parent / name
    if not script.is_file():
        missing(f"{name} is not installed next to {sys.executable} (it is in tests/requirements.txt)")
    return str(script)


def require_tool(*names: str, package: str) -> str:
    """A program from the system (the first of ``names`` found on PATH), which .ci/run installs from ``package``."""
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    missing(f"{names[0]} is not installed (apt-get install {package})")


@pytest.fixture(scope="session")
def node_clients() -> Path:
    """Other tools' official clients, pinned in tests/package.json and its lock file. The first test that needs
    them installs them with ``npm ci`` into tests/node_modules (ignored by git), so a newcomer's run is CI's run."""
    require_tool("node", "nodejs", package="nodejs")
    tests = ROOT / "tests"
    locked = json.loads((tests / "package-lock.json").read_text())["packages"]
    modules = tests / "node_modules"

    def installed(name: str) -> str:
        manifest = modules / name.split("node_modules/", 1)[1] / "package.json"
        return json.loads(manifest.read_text()).get("version", "") if manifest.is_file() else ""

    if any(installed(name) != entry["version"] for name, entry in locked.items() if name):
        npm = require_tool("npm", package="npm")
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=tests, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"npm ci in tests/ failed: {done.stderr.strip()[-500:]}"
    return modules


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """A skip raised by the helpers here is reported at the test that needed the tool, not at this file."""
    report = (yield).get_result()
    if report.skipped and isinstance(report.longrepr, tuple) and Path(report.longrepr[0]).resolve() == Path(__file__).resolve():
        path, line, _ = item.reportinfo()
        report.longrepr = (str(path), (line or 0) + 1, report.longrepr[2])


@pytest.fixture
def browser():
    """Debian's headless Chromium, driven by Playwright (no browser download); test names resolve to loopback."""
    sync_api = require_module("playwright.sync_api")
    chromium = require_tool("chromium", "chromium-browser", package="chromium")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=chromium,
            args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-blink-features=AutomationControlled",
                "--host-resolver-rules=MAP site.test 127.0.0.1, MAP other.test 127.0.0.1",
            ],
        )
        yield launched
        launched.close()


@pytest.fixture
def tiny_filesystem() -> Iterator[str]:
    """A 2 MiB tmpfs, so the disk really fills; skipped where mounting is not allowed (it needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tiny tmpfs needs root")
    mountpoint = tempfile.mkdtemp(prefix="pixeld-full-")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", mountpoint], capture_output=True, text=True)
    if mounted.returncode:
        os.rmdir(mountpoint)
        pytest.skip(f"cannot mount a tiny tmpfs here: {mounted.stderr.strip()}")
    yield mountpoint
    subprocess.run(["umount", "-l", mountpoint], check=False)
    os.rmdir(mountpoint)


def write_mmdb(path: Path, countries: Dict[str, str], built: Optional[float] = None) -> Path:
    """A real MaxMind country database (networks to ISO codes), built at test time; ``built`` sets its build time."""
    mmdb_writer, netaddr = require_module("mmdb_writer"), require_module("netaddr")
    writer = mmdb_writer.MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoLite2-Country", languages=["en"], description="pixeld test")
    for network, code in countries.items():
        writer.insert_network(netaddr.IPSet([network]), {"country": {"iso_code": code, "names": {"en": code}}})
    real = mmdb_writer.time.time
    if built is not None:
        mmdb_writer.time.time = lambda: built
    try:
        writer.to_db_file(str(path))
    finally:
        mmdb_writer.time.time = real
    return path


# ---- Waiting -------------------------------------------------------------------------------------------------


def wait_for(check: Callable[[], object], seconds: float = 15.0, proc: Optional[subprocess.Popen] = None) -> None:
    """Poll ``check`` until it is true. A socket or database that is not ready yet counts as false; the process
    that should answer (``proc``), if given, must stay alive."""
    deadline = time.monotonic() + seconds
    while True:
        if proc is not None and proc.poll() is not None:
            output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise AssertionError(f"exited with {proc.returncode}: {output}")
        try:
            if check():
                return
        except (OSError, sqlite3.Error):
            pass
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# ---- The real daemon over real HTTP --------------------------------------------------------------------------


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
        wait_for(lambda: request(self.host, self.port, "/healthz").status == 200, proc=self.proc)

    def get(self, target: str, headers: Optional[Dict[str, str]] = None, method: str = "GET") -> Response:
        return request(self.host, self.port, target, headers, method)

    def pixel(self, params: Optional[Dict[str, str]] = None, headers: Optional[Dict[str, str]] = None) -> Response:
        query = "?" + urlencode(params) if params else ""
        return self.get("/pixel.gif" + query, {"User-Agent": CHROME, **(headers or {})})

    def report(self, query: str = "range=all", headers: Optional[Dict[str, str]] = None) -> Response:
        return self.get("/report?" + query, headers)

    def report_json(self, query: str = "range=today") -> Dict[str, object]:
        """The JSON report over HTTP, from loopback."""
        answer = self.report(query + "&format=json")
        assert answer.status == 200, answer.text
        return json.loads(answer.text)

    def acceptors(self) -> List[int]:
        """The acceptor processes (``--workers``): the daemon's children."""
        children = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as stat:
                        if int(stat.read().rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                            children.append(int(entry))
                except (OSError, IndexError, ValueError):
                    pass  # gone meanwhile
        return sorted(children)

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


class WebSite:
    """A web site for the browser tests, on a loopback port under real-looking names (site.test, other.test):
    it serves ``pages`` (``{port}`` in them becomes its port), answers 404 for the paths in ``missing``, keeps
    the bodies of what forms post (``posted``), and serves the files of ``modules`` under /vendor/."""

    def __init__(self, pages: Optional[Dict[str, str]] = None, missing: Iterable[str] = (), modules: Optional[Path] = None) -> None:
        self.port, self.pages, self.missing = free_port(), dict(pages or {}), set(missing)
        self.posted: List[str] = []
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?")[0].split("#")[0]
                body, kind = site.pages.get(path, "").replace("{port}", str(site.port)).encode(), "text/html; charset=utf-8"
                if path.startswith("/vendor/") and modules is not None:
                    body, kind = (modules / path[len("/vendor/"):]).read_bytes(), "text/javascript"
                self.send_response(404 if not body or path in site.missing else 200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                site.posted.append(self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode())
                self.do_GET()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str, host: str = "site.test") -> str:
        return f"http://{host}:{self.port}{path}"


# ---- A real mail server (aiosmtpd) for the digest and the alerts ----------------------------------------------


class Inbox:
    """What an SMTP server received: each message's envelope, and each DATA attempt."""

    def __init__(self, answer="250 OK"):
        self.envelopes, self.attempts, self.answer = [], 0, answer

    async def handle_DATA(self, server, session, envelope):
        self.attempts += 1
        if self.answer.startswith("250"):
            self.envelopes.append(envelope)
        return self.answer

    def message(self):
        assert len(self.envelopes) == 1
        return email.message_from_bytes(self.envelopes[0].content, policy=email.policy.default)


@pytest.fixture
def smtp_server():
    """Start aiosmtpd on a free loopback port; every server started is stopped at the end."""
    started = []

    def start(inbox=None, **options):
        inbox = inbox or Inbox()
        controller = require_module("aiosmtpd.controller").Controller(inbox, hostname="127.0.0.1", port=free_port(), **options)
        controller.start()
        started.append(controller)
        return inbox, f"127.0.0.1:{controller.port}"

    yield start
    for controller in started:
        controller.stop()


# ---- The app in process, as a WSGI server calls it -------------------------------------------------------------


def latin1(text: str) -> str:
    """What a WSGI server hands over: the bytes on the wire, decoded as latin-1 (PEP 3333)."""
    return text.encode("utf-8", "surrogatepass").decode("latin-1")


def call(app: "pixeld.App", path: str, query: str = "", method: str = "GET", remote: str = "127.0.0.1", body: bytes = b"", content_type: str = "",
         **headers: str) -> Response:
    """One request to the WSGI app. Headers are named as in HTTP (``User-Agent``) or as keywords (``USER_AGENT``)."""
    environ = {"PATH_INFO": path, "QUERY_STRING": latin1(query), "REQUEST_METHOD": method, "REMOTE_ADDR": remote}
    environ.update({"HTTP_" + name.upper().replace("-", "_"): latin1(value) for name, value in headers.items()})
    if body or content_type:
        environ.update({"wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body)), "CONTENT_TYPE": content_type})
    setup_testing_defaults(environ)
    environ["wsgi.errors"] = io.StringIO()
    answer: Dict[str, object] = {}

    def start_response(status: str, response_headers: List[Tuple[str, str]]) -> None:
        answer.update(status=int(status[:3]), headers={name.lower(): value for name, value in response_headers})

    body = b"".join(app(environ, start_response))
    return Response(answer["status"], answer["headers"], body)


# ---- Values and reports --------------------------------------------------------------------------------------


def view(at: int, path: str = "/", **fields: object) -> "pixeld.PageView":
    """A normalised page view at ``at``: a Chrome desktop visitor's first of the day, unless fields say otherwise."""
    values = dict(time=at, site="example.org", path=path, title="", referrer="", country="", browser="Chrome", version="131",
                  os="Windows", device="desktop", screen="1920x1080", language="en", first_today=True)
    values.update(fields)
    return pixeld.PageView(**values)


def request_for(report: "pixeld.ReportData", fmt: str = "text", limit: Optional[int] = None, section: str = "", ascii: bool = False,
                **params: str) -> "pixeld.ReportRequest":
    """How ``report`` is asked for: its format, and the query's parameters (filters among them) as the page's links carry them."""
    query = report.query._replace(filters=pixeld.parse_filters(params))
    return pixeld.ReportRequest(query, fmt, limit, section, ascii, tuple(params.items()))


def report_json(db: Path, *args: str) -> Dict[str, object]:
    """``pixeld.py report --format json`` on a database file: today, unless ``args`` give the range."""
    code, out, err = run_pixeld("report", "--db", str(db), "--format", "json", "--range", "today", *args)
    assert code == 0, err
    return json.loads(out)


# ---- The database and the command line -----------------------------------------------------------------------


def stored_pageviews(db: Path) -> List[Dict[str, object]]:
    """Every stored page view, oldest first, as its PageView fields (from the registry, as the export
    reads them), with the time in unix seconds."""
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(pixeld.export_sql("pageviews", "pageview") + " ORDER BY t.id", (0, 1 << 62)).fetchall()
    finally:
        conn.close()
    kept = ["site", *(field.name for field in pixeld.VIEW_FIELDS)]
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


# The commands that read the service's settings file (/etc/pixeld.env) unless told otherwise. The tests tell them
# otherwise, as they leave out the PIXELD_* environment: a machine's own pixeld settings must not change a test.
READS_SETTINGS_FILE = ("report", "export", "import", "check", "doctor", "backup", "share", "top", "note", "digest", "alert")


def run_pixeld(*args: str, env: Optional[Dict[str, str]] = None, timeout: float = 20) -> Tuple[int, str, str]:
    """``pixeld.py`` with these arguments, without the machine's settings (unless a test gives ``--env-file``)."""
    if args and args[0] in READS_SETTINGS_FILE and not any(arg.startswith("--env-file") for arg in args):
        args = (args[0], "--env-file", "", *args[1:])
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PIXELD_")}
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, str(PIXELD), *args], capture_output=True, text=True, env=full_env, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def bad_start(db: Path, *args: str, env: Optional[Dict[str, str]] = None, as_nobody: bool = False) -> str:
    """``serve`` with a bad setting, on a free port unless ``args`` say: it must exit 2 with exactly one line on
    stderr. ``as_nobody`` drops root (which ignores file modes) and runs a readable copy of pixeld.py with the
    system Python, since nobody may not read a checkout in a private home."""
    cmd = [sys.executable, str(PIXELD), "serve", "--listen", "127.0.0.1:0", "--db", str(db), *args]
    if as_nobody:
        copy = os.path.join(os.path.dirname(str(db)), "pixeld.py")
        shutil.copy(PIXELD, copy)
        os.chmod(copy, 0o644)
        python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
        cmd = [require_tool("setpriv", package="util-linux"), "--reuid=65534", "--regid=65534", "--clear-groups", python, copy, *cmd[2:]]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PIXELD_")}
    full_env.update(env or {})
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=20)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("pixeld: ") and "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr
