#!/usr/bin/env python3
"""Ingest speed with zero lost page views.

Starts the daemon on a loopback port with a fresh database and drives it with realistic, varied
pixel requests (paths, referrers, screens, languages, User-Agents): with ``wrk`` when installed,
in keep-alive and connection-per-request modes, or else with a stdlib multi-process client.
Prints requests per second and p50/p99 latency, stops the daemon with SIGTERM, and checks the
stored page views against the 2xx answers. Then an exact check: clients that count every 2xx
answer they get, SIGTERM in the middle of the load, and stored page views must equal them.

    python3 bench/ingest.py [--seconds 10] [--connections 32]
"""

import argparse
import multiprocessing
import os
import random
import shutil
import sqlite3
import subprocess
import tempfile
import time
from urllib.parse import quote

from common import LANGUAGES, PATH_WEIGHTS, PATHS, REFERRERS, USER_AGENTS, Daemon, percentile, request

LUA = r"""
local paths, referrers, agents, screens, languages = {PATHS}, {REFERRERS}, {AGENTS}, {SCREENS}, {LANGUAGES}
local close = os.getenv("PIXELD_BENCH_CLOSE") == "1"
local sent = 0
math.randomseed(os.time())
request = function()
  sent = sent + 1
  local agent = math.random(#agents)
  local target = "/pixel.gif?path=" .. paths[math.random(#paths)] .. "&host=example.org&title=A%20post&referrer=" ..
    referrers[math.random(#referrers)] .. "&resolution=" .. screens[agent]
  local headers = {["User-Agent"] = agents[agent], ["Accept-Language"] = languages[math.random(#languages)]}
  if close then headers["Connection"] = "close" end
  return wrk.format("GET", target, headers)
end
done = function(summary, latency, requests)
  local failed = summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout
  io.write(string.format("RESULT %d %d %d %.3f %.3f\n", summary.requests, summary.errors.status, failed,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
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


def run_wrk(directory, close, seconds, connections):
    db = os.path.join(directory, f"ingest-{'close' if close else 'keepalive'}.db")
    daemon = Daemon(db, "--rate-limit", "0")
    env = dict(os.environ, PIXELD_BENCH_CLOSE="1" if close else "0")
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", wrk_script(directory), f"http://127.0.0.1:{daemon.port}/"],
        capture_output=True, text=True, env=env,
    ).stdout
    daemon.stop()
    answered, non_2xx, failed, p50, p99 = next(line for line in out.splitlines() if line.startswith("RESULT")).split()[1:]
    rate = float(next(line for line in out.splitlines() if line.startswith("Requests/sec")).split()[1])
    ok = int(answered) - int(non_2xx)
    count = stored(db)
    # wrk stops mid-flight: up to one request per connection was handled but never read by wrk.
    verdict = "none lost" if ok <= count <= ok + connections else "MISMATCH"
    print(f"wrk, {'new connection per request' if close else 'keep-alive'}: {rate:,.0f} req/s, p50 {float(p50):.2f} ms, p99 {float(p99):.2f} ms; "
          f"2xx {ok:,}, stored {count:,} ({verdict}; {int(failed)} socket errors)")
    return rate, float(p50), float(p99)


def client(args):
    port, seconds, keep_alive, seed = args
    import http.client

    rng = random.Random(seed)
    answered, latencies = 0, []
    deadline = time.monotonic() + seconds
    conn = None
    while time.monotonic() < deadline:
        agent, _, screen = rng.choice(USER_AGENTS)
        target = f"/pixel.gif?path={quote(rng.choice(PATHS), safe='')}&host=example.org&resolution={screen}"
        started = time.perf_counter()
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", target, headers={"User-Agent": agent, "Connection": "keep-alive" if keep_alive else "close"})
            answer = conn.getresponse()
            answer.read()
            if answer.status == 200:
                answered += 1
                latencies.append((time.perf_counter() - started) * 1000)
            if not keep_alive:
                conn.close()
                conn = None
        except OSError:
            conn = None  # the daemon stopped: this request was never acknowledged
            time.sleep(0.01)
    return answered, latencies


def run_clients(directory, seconds, keep_alive, processes, stop_midway=False):
    db = os.path.join(directory, f"exact-{keep_alive}-{stop_midway}.db")
    daemon = Daemon(db, "--rate-limit", "0")
    with multiprocessing.Pool(processes) as pool:
        pending = pool.map_async(client, [(daemon.port, seconds, keep_alive, n) for n in range(processes)])
        if stop_midway:
            time.sleep(seconds / 2)
            daemon.stop()
        results = pending.get()
    if not stop_midway:
        daemon.stop()
    answered = sum(a for a, _ in results)
    latencies = [x for _, ls in results for x in ls]
    return answered, latencies, stored(db)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="pixeld-ingest-")
    try:
        if shutil.which("wrk"):
            run_wrk(directory, False, args.seconds, args.connections)
            run_wrk(directory, True, args.seconds, args.connections)
        else:
            for keep_alive in (True, False):
                answered, latencies, count = run_clients(directory, args.seconds, keep_alive, os.cpu_count() or 2)
                print(f"stdlib client, {'keep-alive' if keep_alive else 'new connection per request'}: {answered / args.seconds:,.0f} req/s, "
                      f"p50 {percentile(latencies, 0.5):.2f} ms, p99 {percentile(latencies, 0.99):.2f} ms; 2xx {answered:,}, stored {count:,}")
        answered, _, count = run_clients(directory, 4, True, 4, stop_midway=True)
        print(f"SIGTERM in the middle of the load: 2xx answers {answered:,}, stored {count:,}: {'exactly equal' if answered == count else 'LOST PAGE VIEWS'}")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
