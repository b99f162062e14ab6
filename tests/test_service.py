"""pixeld.service: systemd accepts it silently, it is hardened, and its settings are pixeld's own."""

import os
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest

import pixeld
from conftest import ROOT, require_tool, wait_for

UNIT = ROOT / "pixeld.service"


@pytest.fixture
def systemd_analyze():
    return require_tool("systemd-analyze", package="systemd")


def test_systemd_analyze_verify_is_silent(systemd_analyze):
    proc = subprocess.run([systemd_analyze, "verify", str(UNIT)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout == ""


def test_exposure_score_is_at_most_one(systemd_analyze):
    proc = subprocess.run([systemd_analyze, "security", "--offline=true", str(UNIT)], capture_output=True, text=True)
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


def test_unit_is_notify_with_a_watchdog():
    unit = dict(settings())
    assert unit["Type"] == "notify" and int(unit["WatchdogSec"]) > 0


class FakeSystemd:
    """Plays systemd's side of sd_notify: a datagram socket that collects what the daemon says."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(10)
        self.messages = []

    def wait_for(self, word):
        while not any(word in message for message in self.messages):
            self.messages.append(self.sock.recv(4096).decode())
        return next(message for message in self.messages if word in message)


@pytest.mark.parametrize("abstract", [False, True])
def test_ready_status_watchdog_and_stopping_over_notify_socket(start_daemon, tmp_path, abstract):
    path = f"\0pixeld-test-{os.getpid()}-{abstract}" if abstract else str(tmp_path / "notify.sock")
    systemd = FakeSystemd(path)
    address = "@" + path[1:] if abstract else path
    daemon = start_daemon(env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"})
    assert "STATUS=listening on 127.0.0.1:" in systemd.wait_for("READY=1")
    systemd.wait_for("STATUS=ok")
    for _ in range(3):
        systemd.messages = [m for m in systemd.messages if m != "WATCHDOG=1"]
        systemd.wait_for("WATCHDOG=1")  # sent from the serve loop, every 0.2-0.25 s here
    daemon.proc.send_signal(signal.SIGTERM)
    assert "STOPPING=1" in systemd.wait_for("STOPPING=1")
    daemon.stop()
    systemd.sock.close()


def test_watchdog_pings_only_for_the_named_process(start_daemon, tmp_path):
    systemd = FakeSystemd(str(tmp_path / "notify.sock"))
    systemd.sock.settimeout(1.5)
    start_daemon(env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
    systemd.wait_for("READY=1")
    with pytest.raises(socket.timeout):
        systemd.wait_for("WATCHDOG=1")


def test_the_token_from_a_file_appears_neither_in_ps_nor_in_the_log(start_daemon, tmp_path):
    token = "credential-token-5b2f9c"
    (tmp_path / "token").write_text(token + "\n")
    daemon = start_daemon(env={"PIXELD_TOKEN_FILE": str(tmp_path / "token")})
    assert daemon.report(headers={"Authorization": f"Bearer {token}"}).status == 200
    command_line = (open(f"/proc/{daemon.proc.pid}/cmdline", "rb").read()).decode()
    assert token not in command_line
    assert token not in daemon.stop()


ROOT_CACHE = os.environ.get("PIXELD_TEST_ROOT", "/var/cache/pixeld-test/root")


def debian_root():
    """A minimal Debian with systemd and python3, built once with debootstrap and kept for later runs."""
    if not os.path.isdir(ROOT_CACHE):
        building = ROOT_CACHE + ".tmp"
        shutil.rmtree(building, ignore_errors=True)
        os.makedirs(os.path.dirname(ROOT_CACHE), exist_ok=True)
        proc = subprocess.run(
            ["debootstrap", "--variant=minbase", "--include=systemd,systemd-sysv,dbus,python3", "bookworm", building],
            capture_output=True, text=True, timeout=900,
        )
        if proc.returncode:
            pytest.skip(f"debootstrap could not build a Debian root here: {proc.stderr.strip()[-300:]}")
        os.rename(building, ROOT_CACHE)
    return ROOT_CACHE


class Container:
    """A booted systemd in systemd-nspawn; ``run`` executes inside it through nsenter."""

    def __init__(self, root, repo):
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "-D", root, "--volatile=overlay", "--boot", "--register=no", "--keep-unit",
             "--private-network", "--console=read-only", "--quiet", f"--bind-ro={repo}:/mnt/pixeld"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.leader = None
        deadline = time.monotonic() + 60
        while self.leader is None:
            assert self.proc.poll() is None and time.monotonic() < deadline, "the container did not boot"
            found = subprocess.run(["pgrep", "-P", str(self.proc.pid), "-x", "systemd"], capture_output=True, text=True).stdout.split()
            self.leader = found[0] if found else None
            time.sleep(0.1)
        wait_for(lambda: self.run("systemctl is-system-running", check=False).stdout.strip() in ("running", "degraded"), seconds=60)

    def run(self, command, check=True):
        proc = subprocess.run(["nsenter", "-t", self.leader, "-m", "-u", "-i", "-n", "-p", "sh", "-c", command], capture_output=True, text=True, timeout=60)
        if check:
            assert proc.returncode == 0, (command, proc.stdout, proc.stderr)
        return proc

    def http(self, target, ua="Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0"):
        script = (
            "import urllib.request; "
            f"r = urllib.request.urlopen(urllib.request.Request('http://127.0.0.1:8000{target}', headers={{'User-Agent': {ua!r}}}), timeout=10); "
            "print(r.status); print(r.read().decode(errors='replace'))"
        )
        return self.run(f'python3 -c "{script}"').stdout

    def poweroff(self):
        self.run("systemctl poweroff", check=False)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def test_a_wedged_acceptor_stops_the_watchdog(start_daemon, tmp_path):
    """An acceptor process that stops answering (kill -STOP) keeps the owner from pinging the watchdog,
    so systemd restarts the service as it would a wedged loop; the status line says which one."""
    systemd = FakeSystemd(str(tmp_path / "notify.sock"))
    daemon = start_daemon("--workers", "2", env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000"})
    systemd.wait_for("READY=1")
    systemd.wait_for("WATCHDOG=1")
    wedged = daemon.acceptors()[1]
    os.kill(wedged, signal.SIGSTOP)
    try:
        assert f"(pid {wedged}) silent for" in systemd.wait_for("silent for")
        systemd.messages = []
        systemd.sock.settimeout(1.0)
        with pytest.raises(socket.timeout):
            systemd.wait_for("WATCHDOG=1")
    finally:
        os.kill(wedged, signal.SIGCONT)
    systemd.sock.settimeout(10)
    systemd.wait_for("WATCHDOG=1")  # heard from again
    daemon.stop()
    systemd.sock.close()


def test_a_real_systemd_boot():
    """Install pixeld in a booted Debian exactly as the README says, and watch systemd run it."""
    if os.geteuid() != 0:
        pytest.skip("booting a container needs root")
    for tool, package in (("debootstrap", "debootstrap"), ("systemd-nspawn", "systemd-container"), ("nsenter", "util-linux")):
        require_tool(tool, package=package)
    container = Container(debian_root(), str(ROOT))
    try:
        # The README's install steps.
        container.run("cp /mnt/pixeld/pixeld.py /usr/local/bin/pixeld.py && cp /mnt/pixeld/pixeld.service /etc/systemd/system/pixeld.service")
        container.run("systemctl daemon-reload && systemctl enable --now pixeld")
        assert container.run("systemctl is-active pixeld").stdout.strip() == "active"  # Type=notify: active means READY=1 came

        for i in range(5):
            assert container.http(f"/pixel.gif?path=/boot/{i}&host=example.org").startswith("200")
        wait_for(lambda: "Page views               5" in container.http("/report?range=today"), seconds=60)

        owner, mode = container.run("stat -c '%u %a' /var/lib/pixeld/pixeld.db").stdout.split()
        main_pid = container.run("systemctl show -p MainPID --value pixeld").stdout.strip()
        service_uid = container.run(f"awk '/^Uid:/ {{print $2}}' /proc/{main_pid}/status").stdout.strip()
        assert owner == service_uid and 61184 <= int(owner) <= 65519  # systemd's range for dynamic users
        assert mode == "600"  # only that user can read the database

        # The watchdog: a frozen process is restarted. A shorter WatchdogSec keeps the test quick.
        container.run("mkdir -p /etc/systemd/system/pixeld.service.d && printf '[Service]\\nWatchdogSec=2\\n' > /etc/systemd/system/pixeld.service.d/quick.conf")
        container.run("systemctl daemon-reload && systemctl restart pixeld")
        frozen = container.run("systemctl show -p MainPID --value pixeld").stdout.strip()
        container.run(f"kill -STOP {frozen}")
        wait_for(lambda: container.run("systemctl show -p MainPID --value pixeld").stdout.strip() not in (frozen, "0")
                       and container.run("systemctl is-active pixeld", check=False).stdout.strip() == "active", seconds=40)
        assert int(container.run("systemctl show -p NRestarts --value pixeld").stdout) >= 1
        restarts = int(container.run("systemctl show -p NRestarts --value pixeld").stdout)
        main_pid = container.run("systemctl show -p MainPID --value pixeld").stdout.strip()
        acceptors = container.run(f"cat /proc/{main_pid}/task/{main_pid}/children").stdout.split()
        assert len(acceptors) == int(container.run("nproc").stdout) - 1  # an acceptor process per core but one, under the unit's hardening
        if acceptors:  # a frozen acceptor: the watchdog restarts the service too
            container.run(f"kill -STOP {acceptors[0]}")
            wait_for(lambda: int(container.run("systemctl show -p NRestarts --value pixeld").stdout) > restarts
                           and container.run("systemctl is-active pixeld", check=False).stdout.strip() == "active", seconds=40)

        # The README's token recipe: a systemd credential, read with --token-file.
        container.run("install -d -m 700 /etc/pixeld && echo boot-test-token > /etc/pixeld/token && chmod 600 /etc/pixeld/token")
        container.run("printf '[Service]\\nLoadCredential=token:/etc/pixeld/token\\nEnvironment=PIXELD_TOKEN_FILE=%%d/token\\n' > /etc/systemd/system/pixeld.service.d/token.conf")
        container.run("systemctl daemon-reload && systemctl restart pixeld")
        assert "401" in container.run("python3 -c \"import urllib.request, urllib.error\ntry: urllib.request.urlopen('http://127.0.0.1:8000/report')\nexcept urllib.error.HTTPError as e: print(e.code)\"").stdout
        authorized = "import urllib.request; print(urllib.request.urlopen(urllib.request.Request('http://127.0.0.1:8000/report', headers={'Authorization': 'Bearer boot-test-token'})).status)"
        assert container.run(f'python3 -c "{authorized}"').stdout.strip() == "200"

        for i in range(5, 12):
            container.http(f"/pixel.gif?path=/boot/{i}&host=example.org")
        container.run("systemctl stop pixeld")  # a clean stop: everything acknowledged is saved
        count = container.run("python3 -c \"import sqlite3; print(sqlite3.connect('/var/lib/pixeld/pixeld.db').execute('select count(*) from pageviews').fetchone()[0])\"")
        assert count.stdout.strip() == "12"
    finally:
        container.poweroff()
