"""Faults: stops under load, a locked database, a full disk, broken database files, backup and restore."""

import json
import os
import shutil
import signal
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

import pytest

import pixeld
from conftest import bad_start, run_pixeld, stored_pageviews, wait_for


def load(daemon, stop, answered, worker):
    """Keep sending page views until stopped; remember when each 2xx answer came."""
    i = 0
    while not stop.is_set():
        try:
            answer = daemon.pixel({"path": f"/load/{worker}/{i}", "host": "example.org"})
        except OSError:
            continue  # the daemon is gone or going: this one was never acknowledged
        if answer.status == 200:
            answered.append(time.monotonic())
        i += 1


def under_load(daemon, seconds):
    stop, answered = threading.Event(), []
    threads = [threading.Thread(target=load, args=(daemon, stop, answered, n)) for n in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    return stop, answered, threads


@pytest.mark.parametrize("workers", ["0", "2"])
def test_sigterm_under_load_keeps_every_acknowledged_page_view(start_daemon, workers):
    daemon = start_daemon("--rate-limit", "0", "--workers", workers)
    stop, answered, threads = under_load(daemon, 2.0)
    daemon.proc.send_signal(signal.SIGTERM)  # while the load goes on
    daemon.proc.wait(timeout=30)
    stop.set()
    for thread in threads:
        thread.join()
    assert daemon.proc.returncode == 0 and len(answered) > 100
    assert len(stored_pageviews(daemon.db)) == len(answered)


def test_an_acceptor_killed_under_load_is_restarted_and_nothing_answered_is_lost(start_daemon):
    """kill -9 on an acceptor process: the owner reads what it handed over to its end, starts another,
    and every hit answered is stored. A hit it read but never answered may be stored too (at most one
    per client in flight); one it never handed over was never answered."""
    daemon = start_daemon("--rate-limit", "0", "--workers", "2")
    stop, answered, threads = under_load(daemon, 1.0)
    victim = daemon.acceptors()[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(daemon.acceptors()) == 2 and victim not in daemon.acceptors())
    before = len(answered)
    wait_for(lambda: len(answered) > before + 200)  # the load goes on, through both
    stop.set()
    for thread in threads:
        thread.join()
    output = daemon.stop()
    assert "ended (signal 9); starting another" in output and daemon.proc.returncode == 0
    assert len(answered) <= len(stored_pageviews(daemon.db)) <= len(answered) + len(threads)


def test_sigkill_under_load_loses_at_most_the_last_flush(start_daemon):
    daemon = start_daemon("--rate-limit", "0")
    stop, answered, threads = under_load(daemon, 3.0)
    daemon.proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    daemon.proc.wait(timeout=30)
    stop.set()
    for thread in threads:
        thread.join()
    conn = sqlite3.connect(daemon.db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    stored = len(stored_pageviews(daemon.db))
    recent = sum(1 for when in answered if when > killed - 2.0)  # the flush interval is 1 s; allow one more
    assert len(answered) - recent <= stored <= len(answered)
    restarted = start_daemon(db=daemon.db)
    assert restarted.pixel({"path": "/after-kill"}).status == 200


def test_a_locked_database_queues_hits_up_to_the_bound_and_counts_the_rest(start_daemon):
    daemon = start_daemon("--queue-limit", "40", "--rate-limit", "0")
    assert daemon.pixel({"path": "/before", "host": "example.org"}).status == 200
    wait_for(lambda: len(stored_pageviews(daemon.db)) == 1)
    backup = sqlite3.connect(daemon.db, isolation_level=None)
    backup.execute("BEGIN IMMEDIATE")  # another process holds the write lock, as a long backup might
    try:
        for i in range(60):
            answer = daemon.pixel({"path": f"/locked/{i}", "host": "example.org"})
            assert answer.status == 200 and answer.body == pixeld.GIF  # never blocked
        wait_for(lambda: daemon.get("/healthz").status == 503, seconds=20)
        health = daemon.get("/healthz").text
        assert "database is locked" in health and "40 hits waiting, 20 dropped" in health
    finally:
        backup.execute("ROLLBACK")
        backup.close()
    wait_for(lambda: daemon.get("/healthz").text == "ok\n", seconds=20)
    wait_for(lambda: len(stored_pageviews(daemon.db)) == 41)  # the writer commits what waited in batches
    report = json.loads(daemon.report("range=today&format=json").text)
    assert report["filtered"] == {"total": 20, "dropped": 20} and report["pageviews"] == 41
    output = daemon.stop()
    assert "dropping hits" in output and "database writable again" in output and "Traceback" not in output


def test_a_full_disk_degrades_and_recovers_by_itself(start_daemon, tiny_filesystem):
    db = os.path.join(tiny_filesystem, "pixeld.db")
    daemon = start_daemon("--rate-limit", "0", db=Path(db))
    daemon.pixel({"path": "/first", "host": "example.org"})
    wait_for(lambda: daemon.get("/healthz").status == 200 and len(stored_pageviews(daemon.db)) == 1)
    filler = os.path.join(tiny_filesystem, "filler")
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass  # the disk is full now
    for i in range(300):
        answer = daemon.pixel({"path": f"/full/{i}", "host": "example.org", "title": "x" * 400})
        assert answer.status == 200 and answer.body == pixeld.GIF
    wait_for(lambda: daemon.get("/healthz").status == 503, seconds=20)
    assert "full" in daemon.get("/healthz").text
    os.remove(filler)  # space returns
    wait_for(lambda: daemon.get("/healthz").status == 200, seconds=20)
    daemon.stop()
    assert len(stored_pageviews(daemon.db)) == 301


def test_database_full_by_max_page_count_in_process(tmp_path):
    """The same recovery, with SQLite's own size cap: works without mount rights."""
    app = pixeld.App(pixeld.Config(db_path=str(tmp_path / "cap.db"), flush_interval=0.05, rate_limit=0), log=lambda message: None)
    try:
        pages = app.writer.store.conn.execute("PRAGMA page_count").fetchone()[0]
        app.writer.store.conn.execute(f"PRAGMA max_page_count = {pages}")
        for i in range(400):
            app.writer.submit(pixeld.PageView(1_795_874_400 + i, "example.org", path=f"/p/{i}", title="t" * 300, browser="Chrome", version="131", os="Windows", device="desktop", language="en"))
        wait_for(lambda: "full" in app.writer.status())
        app.writer.store.conn.execute("PRAGMA max_page_count = 1073741823")
        wait_for(lambda: app.writer.status() == "ok")
    finally:
        app.close()
    assert len(stored_pageviews(tmp_path / "cap.db")) == 400


def test_corrupt_database_at_start(tmp_path):
    db = tmp_path / "corrupt.db"
    pixeld.connect(str(db)).close()
    data = bytearray(db.read_bytes())
    data[100:4096] = os.urandom(3996)  # the schema page, after the header
    db.write_bytes(bytes(data))
    assert "cannot use database" in bad_start(db)


def test_read_only_database_at_start():
    with tempfile.TemporaryDirectory(dir="/tmp") as scratch:
        os.chmod(scratch, 0o755)
        db = os.path.join(scratch, "ro.db")
        pixeld.connect(db).close()
        os.chmod(db, 0o444)
        for suffix in ("-wal", "-shm"):
            if os.path.exists(db + suffix):
                os.remove(db + suffix)
        assert "not writable" in bad_start(db, as_nobody=os.geteuid() == 0)


def test_backup_while_running_and_restore(start_daemon, tmp_path):
    daemon = start_daemon("--rate-limit", "0")
    stop, answered, threads = under_load(daemon, 1.5)
    copy = tmp_path / "backup.db"
    umask = os.umask(0o022)  # the usual umask would make a new file 0644: readable by everyone
    try:
        code, _, err = run_pixeld("backup", str(copy), "--db", str(daemon.db))  # while writes go on
    finally:
        os.umask(umask)
    stop.set()
    for thread in threads:
        thread.join()
    assert code == 0 and "backed up to" in err
    assert copy.stat().st_mode & 0o777 == 0o600  # a copy of every page view, readable only by its owner
    conn = sqlite3.connect(copy)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    backed_up = conn.execute("SELECT count(*) FROM pageviews").fetchone()[0]
    conn.close()
    assert 0 < backed_up <= len(answered)
    assert run_pixeld("backup", str(copy), "--db", str(daemon.db))[0] == 2  # never overwrites
    daemon.stop()

    restored = tmp_path / "restored.db"  # restore: the daemon stopped, the copy put in place, started again
    shutil.copy(copy, restored)
    again = start_daemon(db=restored)
    assert json.loads(again.report("range=all&format=json").text)["pageviews"] == backed_up


def test_a_writer_that_falls_behind_pushes_back_and_loses_nothing(start_daemon):
    """A healthy database but more hits than the queue holds: the server stops reading until the
    writer catches up (clients wait), and every answered hit is stored; nothing is dropped."""
    daemon = start_daemon("--queue-limit", "30", "--rate-limit", "0")
    answered = []

    def send(worker):
        for i in range(100):
            if daemon.pixel({"path": f"/w{worker}/{i}", "host": "example.org"}, {"X-Forwarded-For": f"198.51.100.{worker}"}).status == 200:
                answered.append(i)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    output = daemon.stop()
    assert len(answered) == 600 and len(stored_pageviews(daemon.db)) == 600
    assert "dropping hits" not in output
    conn = sqlite3.connect(daemon.db)
    assert conn.execute("SELECT count(*) FROM filtered WHERE reason = 'dropped'").fetchone()[0] == 0
    conn.close()
