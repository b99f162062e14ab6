#!/usr/bin/env python3
"""Ingest speed, latency and memory with zero lost page views, under realistic traffic.

Starts the daemon on a loopback port with a fresh database and drives it with ``wrk`` (Debian's
package) and varied pixel requests: paths, referrers, screens, languages, User-Agents, and, by
default, a different client address per request through the trusted proxy's X-Forwarded-For,
as real traffic behind nginx brings (thousands of visitors, not one per User-Agent).

    python3 bench/ingest.py                     # keep-alive and new-connection runs, p50/p99/max, then SIGTERM mid-load
    python3 bench/ingest.py --single-visitor    # one visitor per User-Agent, as earlier versions measured
    python3 bench/ingest.py --paced 6000        # a fixed request rate (wrk's delay()), for latency at part load (--nginx: beside nginx)
    python3 bench/ingest.py --soak 120          # a soak: a new address per hit for 120 s, RSS sampled each second
    python3 bench/ingest.py --nginx             # the same load against nginx's empty_gif, for comparison
    python3 bench/ingest.py --nginx --flask     # and against the 2020 Flask design on gunicorn (bench/flask_design.py)
    python3 bench/ingest.py --paced 3000 --reports bench/data/report-1000000.db  # latency while filtered reports run back to back
    python3 bench/ingest.py --paced 3000 --seconds 130 --feed 60  # latency while the feed ships every minute, runs alternated with none
    python3 bench/ingest.py --trackers          # GoatCounter's /count and Plausible's /api/event beside /pixel.gif, same load

Each run checks the stored page views against wrk's 2xx answers; the exact check (stdlib clients
that count every 2xx they get, SIGTERM in the middle of the load) must show them equal.
"""

import argparse
import multiprocessing
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from urllib.parse import quote

from common import HERE, LANGUAGES, PATH_WEIGHTS, PATHS, PIXELD, REFERRERS, USER_AGENTS, Daemon, free_port, percentile, request

LUA = r"""
local paths, referrers, agents, screens, languages = {PATHS}, {REFERRERS}, {AGENTS}, {SCREENS}, {LANGUAGES}
local close = os.getenv("PIXELD_BENCH_CLOSE") == "1"
local distinct = os.getenv("PIXELD_BENCH_SINGLE") ~= "1"
local pause = tonumber(os.getenv("PIXELD_BENCH_DELAY") or "0")
local endpoint = os.getenv("PIXELD_BENCH_ENDPOINT") or "pixel"
local counter = 0
math.randomseed(os.time() + math.floor(os.clock() * 1000000))
local base = math.random(0, 4000) * 4096
request = function()
  counter = counter + 1
  local agent = math.random(#agents)
  local path, referrer = paths[math.random(#paths)], referrers[math.random(#referrers)]
  local target = "/pixel.gif?path=" .. path .. "&host=example.org&title=A%20post&referrer=" .. referrer .. "&resolution=" .. screens[agent]
  local headers = {["User-Agent"] = agents[agent], ["Accept-Language"] = languages[math.random(#languages)]}
  local method, body = "GET", nil
  if endpoint == "count" then  -- GoatCounter's count.js; the page's address comes in the Referer
    target = "/count?p=" .. path .. "&t=A%20post&r=" .. referrer .. "&s=" .. screens[agent] .. ",1&q=&rnd=" .. math.random(100000, 999999)
    headers["Referer"] = "https://example.org/"
  elseif endpoint == "plausible" then  -- Plausible's script: text/plain JSON with the page's address and the referrer as they are
    local function plain(text) return (text:gsub("%%(%x%x)", function(hex) return string.char(tonumber(hex, 16)) end)) end
    method, target, headers["Content-Type"] = "POST", "/api/event", "text/plain"
    body = '{"n":"pageview","u":"https://example.org' .. plain(path) .. '","d":"example.org","r":"' .. plain(referrer) .. '","w":1280}'
  end
  if distinct then
    local n = (base + counter * 7919 + math.random(0, 7)) % 16777216
    headers["X-Forwarded-For"] = "10." .. math.floor(n / 65536) .. "." .. math.floor(n / 256) % 256 .. "." .. n % 256
  end
  if close then headers["Connection"] = "close" end
  return wrk.format(method, target, headers, body)
end
if pause > 0 then
  delay = function() return pause end
end
done = function(summary, latency, requests)
  local failed = summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout
  io.write(string.format("RESULT %d %d %d %.3f %.3f %.3f\n", summary.requests, summary.errors.status, failed,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
end
"""


def lua_list(values):
    return "{" + ", ".join('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values) + "}"


def wrk_script(directory):
    rng = random.Random(3)
    paths = [quote(p, safe="") for p in rng.choices(PATHS, PATH_WEIGHTS, k=400)]
    script = LUA.replace("{PATHS}", lua_list(paths)).replace("{REFERRERS}", lua_list([quote(r, safe="") for r in REFERRERS]))
    script = script.replace("{AGENTS}", lua_list([ua for ua, _, _ in USER_AGENTS])).replace("{SCREENS}", lua_list([s for _, _, s in USER_AGENTS]))
    script = script.replace("{LANGUAGES}", lua_list(LANGUAGES))
    path = os.path.join(directory, "pixel.lua")
    with open(path, "w") as handle:
        handle.write(script)
    return path


def stored(db):
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT count(*) FROM pageviews").fetchone()[0]
    finally:
        conn.close()


def wrk(directory, url, seconds, connections, close=False, single=False, delay_ms=0.0, endpoint="pixel"):
    """Run wrk; return (requests/s, 2xx answers, socket errors, p50, p99, max in ms)."""
    env = dict(os.environ, PIXELD_BENCH_CLOSE="1" if close else "0", PIXELD_BENCH_SINGLE="1" if single else "0", PIXELD_BENCH_DELAY=str(delay_ms),
               PIXELD_BENCH_ENDPOINT=endpoint)
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", wrk_script(directory), url], capture_output=True, text=True, env=env,
    ).stdout
    answered, non_2xx, failed, p50, p99, worst = next(line for line in out.splitlines() if line.startswith("RESULT")).split()[1:]
    rate = float(next(line for line in out.splitlines() if line.startswith("Requests/sec")).split()[1])
    return rate, int(answered) - int(non_2xx), int(failed), float(p50), float(p99), float(worst)


class Reports:
    """Filtered full-year reports requested back to back while the load runs (the worst an operator can do)."""

    QUERY = "/report?range=365d&path=/blog/*&country=DE"

    def __init__(self, port):
        self.port, self.times, self.done = port, [], threading.Event()
        self.thread = threading.Thread(target=self.run)
        self.thread.start()

    def run(self):
        while not self.done.is_set():
            started = time.perf_counter()
            assert request(self.port, self.QUERY)[0] == 200
            self.times.append((time.perf_counter() - started) * 1000)

    def stop(self):
        self.done.set()
        self.thread.join()
        return f"; meanwhile {len(self.times)} filtered full-year reports, p50 {percentile(self.times, 0.5):.0f} ms"


class Feeder:
    """The feed (``export --cursor-file``, then ``--commit-cursor``) run every ``every`` seconds while the load
    runs, as a timer would; its rows go to a pipe that counts them."""

    def __init__(self, db, every, directory):
        self.db, self.every, self.cursor = db, every, os.path.join(directory, "feed.cursor")
        self.runs, self.done = [], threading.Event()  # (seconds, rows) of each run
        self.thread = threading.Thread(target=self.run)
        self.thread.start()

    def run(self):
        while not self.done.wait(self.every):
            started = time.perf_counter()
            proc = subprocess.Popen([sys.executable, PIXELD, "export", "--env-file", "", "--db", self.db, "--cursor-file", self.cursor], stdout=subprocess.PIPE)
            rows = sum(block.count(b"\n") for block in iter(lambda: proc.stdout.read(1 << 20), b""))
            assert proc.wait() == 0
            subprocess.run([sys.executable, PIXELD, "export", "--commit-cursor", self.cursor], check=True)
            self.runs.append((time.perf_counter() - started, rows))

    def stop(self):
        self.done.set()
        self.thread.join()
        shipped = ", ".join(f"{rows:,} rows in {seconds:.2f} s" for seconds, rows in self.runs)
        return f"; meanwhile the feed every {self.every:g} s: {shipped or 'no run'}"


def run_pixeld(directory, name, seconds, connections, close=False, single=False, delay_ms=0.0, *flags, seed=None, endpoint="pixel", feed=0.0):
    """Load a fresh daemon, or one on a copy of ``seed`` while it answers filtered reports back to back, or
    while the feed ships every ``feed`` seconds."""
    db = os.path.join(directory, re.sub(r"\W+", "-", name) + ".db")
    if seed:
        shutil.copy(seed, db)
    before = stored(db) if seed else 0
    daemon = Daemon(db, "--rate-limit", "0", *flags)
    reports = Reports(daemon.port) if seed else None
    feeder = Feeder(db, feed, directory) if feed else None
    rate, ok, failed, p50, p99, worst = wrk(directory, f"http://127.0.0.1:{daemon.port}/", seconds, connections, close, single, delay_ms, endpoint)
    meanwhile = reports.stop() if reports else feeder.stop() if feeder else ""
    rss = daemon.peak_rss_mb()
    daemon.stop()
    count = stored(db) - before
    # wrk stops mid-flight: up to one request per connection was handled but never read by wrk.
    verdict = "none lost" if ok <= count <= ok + connections else "MISMATCH"
    print(f"{name}: {rate:,.0f} req/s, p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {worst:.1f} ms; 2xx {ok:,}, stored {count:,} "
          f"({verdict}; {failed} socket errors); peak RSS {rss:.0f} MB{meanwhile}", flush=True)
    return rate


NGINX_CONF = """
worker_processes 1; daemon off; pid {dir}/nginx.pid; error_log {dir}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{ access_log off; client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir}; uwsgi_temp_path {dir}; scgi_temp_path {dir};
  server {{ listen 127.0.0.1:{port}; location = /pixel.gif {{ empty_gif; }} }} }}
"""


def run_nginx(directory, seconds, connections, close, delay_ms=0.0):
    port = free_port()
    conf = os.path.join(directory, "nginx.conf")
    with open(conf, "w") as handle:
        handle.write(NGINX_CONF.format(dir=directory, port=port))
    proc = subprocess.Popen(["nginx", "-c", conf, "-p", directory], stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        rate, ok, failed, p50, p99, worst = wrk(directory, f"http://127.0.0.1:{port}/", seconds, connections, close, delay_ms=delay_ms)
    finally:
        proc.terminate()
        proc.wait()
    mode = "paced" if delay_ms else "new connection per request" if close else "keep-alive"
    print(f"nginx empty_gif, {mode}: {rate:,.0f} req/s, p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {worst:.1f} ms", flush=True)
    return rate


def run_flask(directory, seconds, connections, close, delay_ms=0.0):
    """The 2020 Flask design (bench/flask_design.py) on gunicorn with two sync workers, under the same load."""
    port, db = free_port(), os.path.join(directory, f"flask-{int(close)}-{delay_ms:g}.db")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--workers", "2", "--bind", f"127.0.0.1:{port}", "--chdir", HERE, "flask_design:app"],
        env=dict(os.environ, FLASK_DESIGN_DB=db), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        while True:
            try:
                if request(port, "/pixel.gif?path=/warm&resolution=1x1")[0] == 200:
                    break
            except OSError:
                if proc.poll() is not None:
                    raise SystemExit("the Flask design did not start: pip install -r bench/requirements.txt") from None
                time.sleep(0.05)
        rate, ok, failed, p50, p99, worst = wrk(directory, f"http://127.0.0.1:{port}/", seconds, connections, close, delay_ms=delay_ms)
    finally:
        proc.terminate()
        proc.wait()
    with sqlite3.connect(db) as conn:
        count = conn.execute("SELECT count(*) FROM data").fetchone()[0] - 1  # less the warm-up hit
    mode = "paced" if delay_ms else "new connection per request" if close else "keep-alive"
    print(f"the 2020 Flask design on gunicorn, {mode}: {rate:,.0f} req/s, p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {worst:.1f} ms; "
          f"2xx {ok:,}, stored {count:,} ({failed} socket errors)", flush=True)
    return rate


def soak(directory, seconds, connections, delay_ms):
    """A new address per hit for a fixed time; RSS sampled every second; every answered hit must be stored."""
    db = os.path.join(directory, "soak.db")
    daemon = Daemon(db, "--rate-limit", "0")
    samples, stop = [], threading.Event()

    def sample():
        while not stop.wait(1.0):
            with open(f"/proc/{daemon.proc.pid}/status") as status:
                samples.append(next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:")))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rate, ok, failed, p50, p99, worst = wrk(directory, f"http://127.0.0.1:{daemon.port}/", seconds, connections, delay_ms=delay_ms)
    stop.set()
    visitors = remembered(daemon.port)
    output = daemon.stop()
    count = stored(db)
    dropped = re.search(r"dropping hits", output) is not None
    print(f"soak {seconds} s: {rate:,.0f} req/s, p99 {p99:.2f} ms, max {worst:.1f} ms; 2xx {ok:,}, stored {count:,} "
          f"({'none lost' if ok <= count <= ok + connections else 'LOST ' + str(ok - count)}{'; the daemon dropped hits' if dropped else ''})")
    print(f"  RSS: start {samples[0]:.0f} MB, peak {max(samples):.0f} MB, end {samples[-1]:.0f} MB; remembered visitors at the end {visitors:,}; "
          f"{(max(samples) - samples[0]) * 1024 * 1024 / max(1, visitors):.0f} bytes per remembered visitor")


def remembered(port):
    from common import request

    status, body = request(port, "/metrics")
    match = re.search(rb"^pixeld_remembered_visitors (\d+)", body, re.M)
    return int(match.group(1)) if status == 200 and match else 0


def client(args):
    port, seconds, seed = args
    import http.client

    rng = random.Random(seed)
    answered = 0
    deadline = time.monotonic() + seconds
    conn = None
    while time.monotonic() < deadline:
        agent, _, screen = rng.choice(USER_AGENTS)
        target = f"/pixel.gif?path={quote(rng.choice(PATHS), safe='')}&host=example.org&resolution={screen}"
        address = f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}"
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", target, headers={"User-Agent": agent, "X-Forwarded-For": address})
            answer = conn.getresponse()
            answer.read()
            answered += answer.status == 200
        except OSError:
            conn = None  # the daemon stopped: this request was never acknowledged
            time.sleep(0.01)
    return answered


def exact_check(directory, seconds=4, processes=4):
    db = os.path.join(directory, "exact.db")
    daemon = Daemon(db, "--rate-limit", "0")
    with multiprocessing.Pool(processes) as pool:
        pending = pool.map_async(client, [(daemon.port, seconds, n) for n in range(processes)])
        time.sleep(seconds / 2)
        daemon.stop()
        answered = sum(pending.get())
    count = stored(db)
    print(f"SIGTERM in the middle of the load: 2xx answers {answered:,}, stored {count:,}: {'exactly equal' if answered == count else 'LOST PAGE VIEWS'}")


def compare_trackers(directory, seconds, connections, single, rounds=3):
    """Other tools' endpoints beside the pixel: each run in turn on a fresh daemon, three times, and the best of each
    compared, since runs on a shared machine vary by 20-40%."""
    best = {}
    for round in range(1, rounds + 1):
        for endpoint in ("pixel", "count", "plausible"):
            name = {"pixel": "/pixel.gif", "count": "GoatCounter /count", "plausible": "Plausible /api/event"}[endpoint]
            rate = run_pixeld(directory, f"{name}, keep-alive, round {round}", seconds, connections, False, single, endpoint=endpoint)
            best[endpoint] = max(best.get(endpoint, 0), rate)
    for endpoint in ("count", "plausible"):
        print(f"{endpoint}: {best[endpoint]:,.0f} req/s, {best[endpoint] / best['pixel']:.2f}x /pixel.gif ({best['pixel']:,.0f} req/s)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--single-visitor", action="store_true", help="one visitor per User-Agent instead of a new address per hit")
    parser.add_argument("--paced", type=float, default=0, help="a fixed total request rate, for latency at part load")
    parser.add_argument("--soak", type=int, default=0, help="seconds of soak with RSS samples")
    parser.add_argument("--soak-rate", type=float, default=8000, help="the soak's request rate")
    parser.add_argument("--nginx", action="store_true", help="also measure nginx's empty_gif with the same load")
    parser.add_argument("--flask", action="store_true", help="also measure the 2020 Flask design on gunicorn (pip install -r bench/requirements.txt)")
    parser.add_argument("--trackers", action="store_true", help="GoatCounter's /count and Plausible's /api/event beside /pixel.gif, same load")
    parser.add_argument("--reports", metavar="DB", help="with --paced: run on a copy of DB (bench/report.py's) while filtered reports run back to back")
    parser.add_argument("--feed", metavar="SECONDS", type=float, default=0,
                        help="with --paced: runs without and with the feed shipping every SECONDS (rows final after 5 s), alternated twice")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("needs wrk: apt-get install wrk")
    directory = tempfile.mkdtemp(prefix="pixeld-ingest-")
    try:
        if args.soak:
            soak(directory, args.soak, args.connections, 1000 * args.connections / args.soak_rate)
            return
        if args.trackers:
            compare_trackers(directory, args.seconds, args.connections, args.single_visitor)
            return
        if args.paced and args.feed:
            delay = 1000 * args.connections / args.paced
            for attempt in (1, 2):
                for every in (0, args.feed):
                    name = f"paced at {args.paced:,.0f} req/s, {'feed' if every else 'no feed'} {attempt}"
                    run_pixeld(directory, name, args.seconds, args.connections, False, args.single_visitor, delay, "--final-after", "5", feed=every)
            return
        if args.paced:
            delay = 1000 * args.connections / args.paced
            run_pixeld(directory, f"paced at {args.paced:,.0f} req/s", args.seconds, args.connections, False, args.single_visitor, delay)
            if args.reports:
                run_pixeld(directory, f"paced at {args.paced:,.0f} req/s, reports", args.seconds, args.connections, False, args.single_visitor, delay, seed=args.reports)
            if args.nginx and shutil.which("nginx"):  # the floor: what wrk measures on this machine for a server that does nothing
                run_nginx(directory, args.seconds, args.connections, False, delay)
            if args.flask:
                run_flask(directory, args.seconds, args.connections, False, delay)
            return
        mode = "one visitor per User-Agent" if args.single_visitor else "a new address per hit"
        keep = run_pixeld(directory, f"pixeld keep-alive, {mode}", args.seconds, args.connections, False, args.single_visitor)
        fresh = run_pixeld(directory, f"pixeld new connection per request, {mode}", args.seconds, args.connections, True, args.single_visitor)
        if args.nginx and shutil.which("nginx"):
            nginx_keep = run_nginx(directory, args.seconds, args.connections, False)
            nginx_fresh = run_nginx(directory, args.seconds, args.connections, True)
            print(f"pixeld / nginx: keep-alive {keep / nginx_keep:.2f}x, new connection per request {fresh / nginx_fresh:.2f}x")
        if args.flask:
            flask_keep = run_flask(directory, args.seconds, args.connections, False)
            flask_fresh = run_flask(directory, args.seconds, args.connections, True)
            print(f"pixeld / the 2020 Flask design: keep-alive {keep / flask_keep:.0f}x, new connection per request {fresh / flask_fresh:.0f}x")
        exact_check(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
