"""The server: limits, keep-alive, deadlines, and the attacks a small public server meets.

Every attack here is bounded in count and time and aims only at the daemon on loopback."""

import ctypes
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import pixeld
from conftest import CHROME, PIXELD, free_port, request, stored_pageviews, wait_for


def raw(port, data, read=True, timeout=5.0):
    """Send raw bytes; return what the server answered before closing (or until the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while read:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def pixel_request(query, extra=b""):
    return b"GET /pixel.gif?" + query + b" HTTP/1.1\r\nHost: x\r\nUser-Agent: " + CHROME.encode() + b"\r\nConnection: close\r\n" + extra + b"\r\n"


def test_long_pixel_urls_get_the_gif_and_longer_ones_414(start_daemon):
    daemon = start_daemon()
    long_title = b"path=/long&host=example.org&title=" + b"t" * 16_000 + b"&referrer=https%3A%2F%2Fexample.net%2F" + b"r" * 4000
    answer = raw(daemon.port, pixel_request(long_title))
    assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(pixeld.GIF)
    assert raw(daemon.port, pixel_request(b"path=/" + b"x" * 40_000)).startswith(b"HTTP/1.1 414 ")
    assert raw(daemon.port, b"GET /" + b"x" * 40_000).startswith(b"HTTP/1.1 414 ")  # not even finished
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(150))
    assert raw(daemon.port, pixel_request(b"path=/", many)).startswith(b"HTTP/1.1 431 ")
    huge = b"X-Big: " + b"v" * 40_000 + b"\r\n"
    assert raw(daemon.port, pixel_request(b"path=/", huge)).startswith(b"HTTP/1.1 431 ")
    assert raw(daemon.port, b"NONSENSE\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw(daemon.port, b"GET / HTTP/2.0\r\n\r\n").startswith(b"HTTP/1.1 505 ")
    assert raw(daemon.port, b"GET / HTTP/1.1\r\nno colon here\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    output = daemon.stop()
    assert "Traceback" not in output and len(output.splitlines()) == 2
    assert [v["path"] for v in stored_pageviews(daemon.db)] == ["/long"]


def test_keep_alive_and_pipelining(start_daemon):
    daemon = start_daemon()
    one = b"GET /pixel.gif?path=/k%d&host=example.org HTTP/1.1\r\nHost: x\r\nUser-Agent: " + CHROME.encode() + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as sock:
        sock.sendall(b"".join(one % i for i in range(20)))  # twenty requests in one write
        received = b""
        while received.count(b"GIF89a") < 20:
            received += sock.recv(65536)
        sock.sendall(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        while not received.endswith(b"ok\n"):
            received += sock.recv(65536)
    assert received.count(b"HTTP/1.1 200 OK") == 21 and b"Connection: keep-alive" in received
    daemon.stop()
    assert len(stored_pageviews(daemon.db)) == 20


def test_a_request_must_arrive_within_its_total_deadline(start_daemon):
    daemon = start_daemon("--request-timeout", "1")
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as idle, \
            socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as trickle:
        started = time.monotonic()
        trickle.sendall(b"GET /pixel.gif HTTP/1.1\r\n")
        closed = False
        for _ in range(30):  # one header line every 0.2 s: each read is prompt, the request never ends
            try:
                trickle.sendall(b"X-Slow: 1\r\n")
            except OSError:
                closed = True
                break
            time.sleep(0.2)
        assert closed or trickle.recv(10) == b""
        assert idle.recv(10) == b""  # closed too, not hung
        assert time.monotonic() - started < 5.5
    assert daemon.pixel({"path": "/after"}).status == 200


def plausible_post(body, extra=b"", path=b"/api/event"):
    head = b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nUser-Agent: " + CHROME.encode() + b"\r\nContent-Type: text/plain\r\n"
    return head + b"Content-Length: %d\r\n" % len(body) + extra + b"\r\n" + body


def page_view(path):
    return b'{"n":"pageview","u":"https://example.org%s","d":"example.org"}' % path


def test_small_bodies_are_read_and_keep_alive_holds(start_daemon):
    """Other tools' trackers post JSON: bodies up to MAX_BODY are read, in pieces too, and the next request on
    the same connection follows its body (pipelined, as keep-alive allows)."""
    daemon = start_daemon()
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as sock:
        sock.sendall(b"".join(plausible_post(page_view(b"/p%d" % i)) for i in range(10)))  # ten in one write
        received = b""
        while received.count(b"\r\n\r\nok") < 10:
            received += sock.recv(65536)
        request = plausible_post(page_view(b"/split"))
        for piece in (request[:30], request[30:-20], request[-20:-5], request[-5:]):  # the head, then the body, in pieces
            sock.sendall(piece)
            time.sleep(0.1)
        while received.count(b"\r\n\r\nok") < 11:
            received += sock.recv(65536)
        sock.sendall(pixel_request(b"path=/after&host=example.org"))
        while not received.endswith(pixeld.GIF):
            received += sock.recv(65536)
    assert received.count(b"HTTP/1.1 202 Accepted") == 11 and b"Connection: close" not in received.split(b"HTTP/1.1 200")[0]
    daemon.stop()
    assert sorted(v["path"] for v in stored_pageviews(daemon.db)) == sorted(["/after", "/split", *(f"/p{i}" for i in range(10))])


def test_a_body_must_arrive_within_the_deadline_and_a_large_one_is_not_read(start_daemon):
    daemon = start_daemon("--request-timeout", "1")
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as slow:
        body = page_view(b"/never")
        slow.sendall(plausible_post(body)[:-10])  # the head and part of the body, then nothing
        assert slow.recv(10) == b""  # closed at the deadline, unanswered
    assert time.monotonic() - started < 3
    large = b'{"n":"pageview","u":"https://example.org/large","d":"example.org","x":"' + b"x" * 20_000 + b'"}'
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as sock:
        sock.sendall(plausible_post(large) + plausible_post(page_view(b"/next")))  # too large for a tracker: refused, the connection goes on
        received = b""
        while received.count(b"HTTP/1.1 ") < 2 or not received.endswith(b"ok"):
            received += sock.recv(65536)
    assert received.startswith(b"HTTP/1.1 413 ") and b"HTTP/1.1 202 Accepted" in received
    huge = large.replace(b"x" * 20_000, b"x" * 200_000)
    try:
        answer = raw(daemon.port, plausible_post(huge))
    except ConnectionResetError:  # the body is never read: closing with it unread may reset the connection before the answer is read
        answer = b""
    assert answer == b"" or (answer.startswith(b"HTTP/1.1 413 ") and b"Connection: close" in answer)
    chunked = b"POST /api/event HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    answer = raw(daemon.port, chunked)
    assert answer.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in answer
    bad_length = raw(daemon.port, plausible_post(b"{}", path=b"/api/event").replace(b"Content-Length: 2", b"Content-Length: -2"))
    assert bad_length.startswith(b"HTTP/1.1 413 ") and b"Connection: close" in bad_length
    assert daemon.pixel({"path": "/after", "host": "example.org"}).status == 200
    output = daemon.stop()
    assert "Traceback" not in output
    assert [v["path"] for v in stored_pageviews(daemon.db)] == ["/next", "/after"]


def run_attack(port, idle_count, trickle_count, seconds, normal):
    """Hold idle and trickling connections open for a while, as a hostile client would."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    sockets = []
    stop = threading.Event()
    try:
        for i in range(idle_count + trickle_count):
            try:
                sock = socket.socket()
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", port))
                sockets.append(sock)
            except OSError:
                break

        def trickle():
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and not stop.is_set():
                for sock in sockets[idle_count:]:
                    try:
                        sock.send(b"X-Trickle: 1\r\n")
                    except OSError:
                        pass
                time.sleep(0.5)

        trickler = threading.Thread(target=trickle)
        trickler.start()
        result = normal()
        stop.set()
        trickler.join()
        return result
    finally:
        for sock in sockets:
            sock.close()


def open_descriptors(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.parametrize("fd_limit", [None, 256])
def test_idle_and_trickling_attack_while_a_reader_keeps_reading(tmp_path, fd_limit):
    """1,100 idle and 100 trickling connections (the numbers that stop a plain threaded wsgiref);
    a normal reader's page views are all answered and stored, and the daemon recovers."""
    db, port = tmp_path / "attack.db", free_port()

    def limit():
        if fd_limit:
            resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))

    env = {k: v for k, v in os.environ.items() if not k.startswith("PIXELD_")}
    proc = subprocess.Popen(
        [sys.executable, str(PIXELD), "serve", "--listen", f"127.0.0.1:{port}", "--db", str(db), "--request-timeout", "3", "--rate-limit", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, preexec_fn=limit,
    )
    try:
        wait_for(lambda: request("127.0.0.1", port, "/healthz").status == 200)
        baseline = open_descriptors(proc.pid)

        def normal_reader():
            answered = 0
            for i in range(60):
                answer = request("127.0.0.1", port, f"/pixel.gif?path=/n{i}&host=example.org", {"User-Agent": CHROME})
                answered += answer.status == 200 and answer.body == pixeld.GIF
                time.sleep(0.05)
            return answered

        answered = run_attack(port, 1100, 100, seconds=6, normal=normal_reader)
        assert answered == 60
        wait_for(lambda: open_descriptors(proc.pid) <= baseline + 2, seconds=10)  # every attack socket let go
        assert request("127.0.0.1", port, "/healthz").text == "ok\n"
        assert request("127.0.0.1", port, "/pixel.gif?path=/after&host=example.org", {"User-Agent": CHROME}).status == 200
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 0 and "Traceback" not in output
    assert len(stored_pageviews(db)) == 61


def test_out_of_file_descriptors_the_accept_loop_survives(tmp_path):
    """With so few descriptors that accept() fails with EMFILE, idle connections are let go and a
    normal request still gets through; the loop does not spin."""
    db, port = tmp_path / "emfile.db", free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIXELD_")}
    proc = subprocess.Popen(
        [sys.executable, str(PIXELD), "serve", "--listen", f"127.0.0.1:{port}", "--db", str(db), "--request-timeout", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
        # About 12 descriptors are in use once it runs, and the connection cap never goes below 16:
        # with 20 in all, accept() fails with EMFILE before the cap is reached.
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (20, 20)),
    )
    try:
        wait_for(lambda: request("127.0.0.1", port, "/healthz").status == 200)
        cpu_before = cpu_seconds(proc.pid)
        hogs = [socket.create_connection(("127.0.0.1", port)) for _ in range(60)]
        time.sleep(1.0)
        answer = request("127.0.0.1", port, "/pixel.gif?path=/squeezed&host=example.org", {"User-Agent": CHROME})
        assert answer.status == 200 and answer.body == pixeld.GIF
        assert cpu_seconds(proc.pid) - cpu_before < 0.9  # no busy loop on EMFILE
        for hog in hogs:
            hog.close()
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0].decode()
    assert "Traceback" not in output
    assert [v["path"] for v in stored_pageviews(db)] == ["/squeezed"]


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_sockets(pid):
    return sum(1 for fd in os.listdir(f"/proc/{pid}/fd") if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"))


def test_two_acceptors_both_serve_and_count_visitors_exactly(start_daemon):
    """``--workers 2``: the kernel spreads connections over both acceptor processes, and the one process
    that owns the visitors counts each visitor once, whichever acceptor its hits came through."""
    daemon = start_daemon("--workers", "2", "--rate-limit", "0")
    acceptors = daemon.acceptors()
    assert len(acceptors) == 2
    before = {pid: open_sockets(pid) for pid in acceptors}
    conns = [socket.create_connection(("127.0.0.1", daemon.port), timeout=10) for _ in range(40)]
    for round in range(5):
        for n, conn in enumerate(conns):
            conn.sendall(pixel_request(f"path=/p/{round}&host=example.org".encode()).replace(b"Connection: close", f"X-Forwarded-For: 198.51.100.{n % 20}".encode()))
            answer = b""
            while not answer.endswith(pixeld.GIF):
                answer += conn.recv(4096)
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    held = {pid: open_sockets(pid) - before[pid] for pid in acceptors}
    assert all(count > 0 for count in held.values()) and sum(held.values()) == 40, held  # both serve; each connection stays with one
    for conn in conns:
        conn.close()
    wait_for(lambda: daemon.report_json()["pageviews"] == 200)
    assert daemon.report_json()["visitors"] == 20  # 20 addresses, each over two connections that may have gone to either acceptor


@pytest.mark.parametrize("workers", ["0", "2"])
def test_with_acceptors_every_other_request_is_handed_over_whole(start_daemon, workers):
    """The report, a dry run, a wrong method and other tools' trackers cross to the owner with their
    connection, which keeps working (keep-alive) after the hand-over; as one process answers them."""
    daemon = start_daemon("--workers", workers, "--rate-limit", "0")
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        sock.sendall(
            pixel_request(b"path=/first&host=example.org").replace(b"Connection: close\r\n", b"")
            + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
            + b"GET /pixel.gif?path=/x&dry_run=1 HTTP/1.1\r\nHost: x\r\nUser-Agent: " + CHROME.encode() + b"\r\n\r\n"
        )
        answers = raw_until_closed(sock)
    assert answers.count(b"HTTP/1.1 ") == 3
    assert answers.index(b"200 OK") < answers.index(b"\r\n\r\nok\n") < answers.index(b"counted as a page view")
    assert daemon.get("/pixel.gif", method="DELETE").status == 405
    assert daemon.get("/count?p=/goat&t=x", {"User-Agent": CHROME, "Referer": "https://example.org/"}).status == 200
    assert request("127.0.0.1", daemon.port, "/api/event", {"Content-Type": "text/plain", "User-Agent": CHROME}, "POST").status == 400  # no body
    metrics = daemon.get("/metrics").text  # what was answered before is counted: every channel is read before a hand-over is served
    assert 'pixeld_hits_total{outcome="pageview"} 2' in metrics
    assert 'pixeld_rejected_requests_total{tracker="plausible",reason="malformed json"} 1' in metrics


def raw_until_closed(sock):
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def test_clients_with_huge_user_agents_are_all_answered_and_counted(start_daemon):
    """20 clients at once, each with a 30 KB User-Agent: the hits cross to the owner in messages cut by size
    (not one too long for the channel, which would end the acceptor and leave them all unanswered), each
    answered and stored; the acceptor stays. Two such User-Agents that differ only at the end stay two visitors."""
    daemon = start_daemon("--workers", "1", "--rate-limit", "0")
    acceptors = daemon.acceptors()
    agents = [CHROME + " " + "x" * 30_000 + suffix for suffix in ("a", "b")]
    conns = [socket.create_connection(("127.0.0.1", daemon.port), timeout=10) for _ in range(20)]
    time.sleep(0.3)  # all connected: their requests come in one round
    for n, conn in enumerate(conns):
        conn.sendall(b"GET /pixel.gif?path=/big/" + str(n).encode() + b"&host=example.org HTTP/1.1\r\nHost: x\r\nUser-Agent: "
                     + agents[n % 2].encode() + b"\r\nConnection: close\r\n\r\n")
    answers = [raw_until_closed(conn) for conn in conns]
    for conn in conns:
        conn.close()
    assert all(answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(pixeld.GIF) for answer in answers)
    wait_for(lambda: daemon.report_json()["pageviews"] == 20)
    assert daemon.report_json()["visitors"] == 2
    assert daemon.acceptors() == acceptors
    assert "ended" not in daemon.stop()


def test_an_acceptor_process_that_fails_says_why_without_client_data(tmp_path):
    """An acceptor that cannot go on ends with one line naming the error (here: settings it cannot read)."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with mine, theirs:
        proc = subprocess.Popen([sys.executable, str(PIXELD), pixeld.ACCEPTOR_COMMAND, str(theirs.fileno())], pass_fds=[theirs.fileno()],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        mine.send(b"not the settings")
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert output.decode().strip().startswith("pixeld: acceptor (pid ") and "stopped by an error: UnpicklingError in " in output.decode()
    assert len(output.decode().strip().splitlines()) == 1 and "Traceback" not in output.decode()


def memory_holds(pid, needles):
    """Which of ``needles`` (bytes) a process's writable memory holds, read through /proc (root)."""
    found = set()
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if "rw" not in perms:
                continue
            start, end = (int(part, 16) for part in span.split("-"))
            try:
                mem.seek(start)
                region = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            found.update(needle for needle in needles if needle in region)
    return found


def test_a_restarted_acceptor_holds_nothing_the_owner_saw(start_daemon):
    """An acceptor is a fresh interpreter, on its first start and each restart: it holds none of the raw inputs
    the owner's memory has seen (the User-Agent and address of hits), which a fork would copy into it."""
    if os.geteuid() != 0:
        pytest.skip("reading another process's memory needs root")
    daemon = start_daemon("--workers", "1", "--rate-limit", "0")
    agent, address = CHROME + " DistinctiveBot/7.7.7-q2w9", "198.51.100.77"
    for n in range(50):
        assert daemon.pixel({"path": f"/seen/{n}", "host": "example.org"}, {"User-Agent": agent, "X-Forwarded-For": address}).status == 200
    for n in range(5):  # a dry run the owner reads itself (and records: one with a proxy's header may not see the report)
        assert daemon.get(f"/pixel.gif?path=/dry/{n}&dry_run=1", {"User-Agent": agent, "X-Forwarded-For": address}).status == 200
    wait_for(lambda: daemon.report_json()["filtered"]["total"] == 55)  # counted as a bot's, once each
    needles = {agent.encode(), address.encode()}
    assert memory_holds(daemon.proc.pid, needles) == needles  # the test can fail: the owner has seen both
    [first] = daemon.acceptors()
    with open(f"/proc/{first}/cmdline", "rb") as cmdline:
        assert pixeld.ACCEPTOR_COMMAND.encode() in cmdline.read().split(b"\0")
    os.kill(first, 9)
    wait_for(lambda: len(daemon.acceptors()) == 1 and first not in daemon.acceptors())
    [second] = daemon.acceptors()
    wait_for(lambda: daemon.get("/healthz").status == 200)
    assert memory_holds(second, needles) == set()


def channel_of(pid):
    """A copy of an acceptor process's channel to its owner (``pidfd_getfd``, root): a way to send the owner
    what no acceptor sends."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        for fd in sorted(int(name) for name in os.listdir(f"/proc/{pid}/fd")):
            copy = libc.syscall(438, pidfd, fd, 0)  # pidfd_getfd
            if copy < 0:
                continue
            sock = None
            try:
                sock = socket.socket(fileno=copy)
            except OSError:
                os.close(copy)
                continue
            if sock.family == socket.AF_UNIX and sock.type == socket.SOCK_SEQPACKET:
                return sock
            sock.close()
    finally:
        os.close(pidfd)
    raise AssertionError("no channel")


def test_the_owner_drops_a_message_it_cannot_read_and_goes_on(start_daemon):
    """A message on a channel that is not a batch of hits, or one cut short for its length, costs that message
    (one line in the log), never the owner: it goes on counting, and saves every hit answered at SIGTERM."""
    if os.geteuid() != 0 or not hasattr(os, "pidfd_open"):
        pytest.skip("taking another process's socket needs root and pidfd_getfd")
    daemon = start_daemon("--workers", "1", "--rate-limit", "0")
    assert daemon.pixel({"path": "/before", "host": "example.org"}).status == 200
    with channel_of(daemon.acceptors()[0]) as channel:
        channel.setsockopt(socket.SOL_SOCKET, 32, 1 << 20)  # SO_SNDBUFFORCE: room for a message the owner cannot take whole
        channel.send(b"H" + b"\xff" * 100)
        channel.send(b"H" + pixeld.marshal.dumps([("accepted", "not a page view")]))
        channel.send(b"H" + pixeld.marshal.dumps([pixeld.pack_read(None)] * 100_000))  # 300 KB, over what the owner reads a message into
    for n in range(20):
        assert daemon.pixel({"path": f"/after/{n}", "host": "example.org"}).status == 200
    wait_for(lambda: daemon.report_json()["pageviews"] == 21)
    output = daemon.stop()
    assert daemon.proc.returncode == 0 and "Traceback" not in output
    assert output.count("acceptor 0: dropped a message") == 3, output
    assert len(stored_pageviews(daemon.db)) == 21
