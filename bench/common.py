"""Shared by the benchmarks: run the daemon on a free loopback port, and realistic traffic."""

import http.client
import os
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PIXELD = os.path.join(HERE, "..", "pixeld.py")
sys.path.insert(0, os.path.join(HERE, ".."))

import pixeld  # noqa: E402,F401  (re-exported for the other benchmarks)

PATHS = [f"/blog/{i:04d}-a-post-about-something" if i % 3 else f"/docs/{i:04d}" for i in range(1000)]
PATH_WEIGHTS = [1 / (i + 1) for i in range(1000)]  # Zipf-like: a few pages get most views
REFERRERS = [""] * 60 + [f"https://site{i}.example.net/page/{i}" for i in range(200)]
COUNTRIES = ["US", "DE", "GB", "FR", "IN", "CA", "NL", "BR", "JP", "SE"] + [f"{a}{b}" for a in "KLMNOPQRST" for b in "ABCD"]
COUNTRY_WEIGHTS = [30, 14, 9, 7, 6, 5, 4, 3, 3, 2] + [0.4] * 40
USER_AGENTS = [
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36", 30, "1920,1080"),
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1", 20, "390,844"),
    ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.6778.81 Mobile Safari/537.36", 14, "412,915"),
    ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Safari/605.1.15", 12, "1512,982"),
    ("Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0", 8, "2560,1440"),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36 Edg/131.0.2903.70", 7, "1536,864"),
    ("Mozilla/5.0 (Linux; Android 14; SAMSUNG SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) SamsungBrowser/26.0 Chrome/122.0.0.0 Mobile Safari/537.36", 4, "384,854"),
    ("Mozilla/5.0 (iPad; CPU OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1", 3, "820,1180"),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:133.0) Gecko/20100101 Firefox/133.0", 2, "1366,768"),
]
LANGUAGES = ["en-US,en;q=0.9", "de-DE,de;q=0.9", "fr-FR", "en-GB", "es-ES", "ja", "pt-BR", "nl"]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request(port, target, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", target, headers=headers or {})
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


class Daemon:
    def __init__(self, db, *args):
        self.port = free_port()
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, PIXELD, "serve", "--listen", f"127.0.0.1:{self.port}", "--db", db, *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        while True:
            try:
                if request(self.port, "/healthz")[0] == 200:
                    break
            except OSError:
                time.sleep(0.005)
            if self.proc.poll() is not None:
                raise SystemExit(self.proc.stdout.read().decode())
        self.startup = time.perf_counter() - started

    def peak_rss_mb(self):
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.communicate(timeout=120)[0].decode()


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]
