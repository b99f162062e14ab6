"""pixeld.py top in a real terminal: tmux runs it against the database a real daemon fills; the test reads
the screen, resizes the window, and quits with q."""

import os
import sqlite3
import subprocess
import sys
import time

import pytest

import pixeld
from conftest import CHROME, FIREFOX, IPHONE, PIXELD, require_tool


class Terminal:
    """A tmux server of our own (its own socket, no user config) with one window running a command."""

    def __init__(self, command, width=100, height=30):
        self.program = require_tool("tmux", package="tmux")
        self.socket = f"pixeld-test-{os.getpid()}-{time.monotonic_ns()}"
        self.tmux("new-session", "-d", "-s", "top", "-x", str(width), "-y", str(height), command)

    def tmux(self, *args):
        return subprocess.run([self.program, "-L", self.socket, "-f", "/dev/null", *args], capture_output=True, text=True, check=True).stdout

    def screen(self):
        return self.tmux("capture-pane", "-p", "-t", "top")

    def wait_for(self, check, seconds=15.0):
        deadline = time.monotonic() + seconds
        while True:
            text = self.screen()
            if check(text):
                return text
            assert time.monotonic() < deadline, f"the screen never showed it:\n{text}"
            time.sleep(0.1)

    def close(self):
        subprocess.run([self.program, "-L", self.socket, "kill-server"], capture_output=True)


@pytest.fixture
def terminal():
    opened = []

    def open_terminal(*args, **kwargs):
        opened.append(Terminal(*args, **kwargs))
        return opened[-1]

    yield open_terminal
    for term in opened:
        term.close()


def test_top_shows_the_last_30_minutes_follows_new_hits_survives_resizes_and_quits(start_daemon, terminal, tmp_path):
    daemon = start_daemon("--rate-limit", "0")
    for agent, path in ((CHROME, "/blog/first-post"), (FIREFOX, "/blog/first-post"), (IPHONE, "/about"), (CHROME + " x", "/日本語/<b>")):
        daemon.pixel({"host": "example.org", "path": path, "referrer": "https://news.ycombinator.com/item?id=1"}, {"User-Agent": agent})
    daemon.pixel({"host": "example.org", "path": "/evil"})
    time.sleep(1.5)
    conn = sqlite3.connect(daemon.db)  # a value with escape sequences, as an older version or another tool might have stored it
    with conn:
        conn.execute("UPDATE strings SET value = ? WHERE value = '/evil'", ("/evil\x1b]0;pwned\x07\x1b[2J\x9b31m\u202e",))
    conn.close()
    exit_file = tmp_path / "exit"
    term = terminal(f"env LANG=C.UTF-8 {sys.executable} {PIXELD} top --env-file '' --db {daemon.db} --interval 0.5; echo $? > {exit_file}")
    screen = term.wait_for(lambda text: "Top pages" in text)
    assert "Visitors now 4 " in screen and "last 30 minutes: 5 page views" in screen
    assert "/blog/first-post" in screen and "/about" in screen and "/日本語/<b>" in screen and "Hacker News" in screen
    assert "█" in screen and "q quits" in screen
    assert "/evil]0;pwned[2J31m" in screen and "\x1b" not in screen and "pwned\x07" not in screen
    row = next(line for line in screen.splitlines() if "/blog/first-post" in line)
    assert row.split("│")[0].split() == ["/blog/first-post", "2"] and row.split("│")[1].split() == ["Hacker", "News", "4"]
    assert len(next(line for line in screen.splitlines() if "/日本語/<b>" in line).split("│")[0].rstrip()) < 50  # wide characters count twice

    for _ in range(3):  # new hits show at the next refresh
        daemon.pixel({"host": "example.org", "path": "/blog/first-post"})
    term.wait_for(lambda text: "last 30 minutes: 8 page views" in text)

    term.tmux("resize-window", "-t", "top", "-x", "50", "-y", "16")
    narrow = term.wait_for(lambda text: max(map(len, text.splitlines())) <= 50 and "Top sources" in text)
    assert "│" not in narrow  # one table above the other
    for width, height in ((12, 3), (1, 1), (30, 5)):
        term.tmux("resize-window", "-t", "top", "-x", str(width), "-y", str(height))
        term.wait_for(lambda text: "pixeld" in text or width < 6)
        time.sleep(0.6)  # a refresh at this size, too
        assert not exit_file.exists()
    term.tmux("resize-window", "-t", "top", "-x", "100", "-y", "30")
    term.wait_for(lambda text: "Top pages" in text and "│" in text)
    term.tmux("send-keys", "-t", "top", "q")
    deadline = time.monotonic() + 10
    while not exit_file.exists():
        assert time.monotonic() < deadline, "q did not quit"
        time.sleep(0.1)
    assert exit_file.read_text().strip() == "0"


def test_top_on_an_empty_database_and_without_one(terminal, tmp_path, start_daemon):
    daemon = start_daemon()
    term = terminal(f"env LANG=C.UTF-8 {sys.executable} {PIXELD} top --env-file '' --db {daemon.db} --site example.org")
    screen = term.wait_for(lambda text: "Top pages" in text)
    assert "pixeld top · example.org" in screen and "Visitors now 0 " in screen and "(no page views)" in screen
    result = subprocess.run([sys.executable, str(PIXELD), "top", "--env-file", "", "--db", str(tmp_path / "missing.db")], capture_output=True, text=True, timeout=20)
    assert result.returncode == 2 and result.stderr.startswith("pixeld: no database at")


def test_terminal_text_keeps_nothing_a_terminal_would_obey():
    hostile = "a\x1b[2Jb\x07c\x9b1md\u202ee\u200bf\tg\ufeffh\U000e0001i"
    assert pixeld.terminal_text(hostile) == "a[2Jbc1mdef gh" + "i"
    assert pixeld.terminal_text("/ordinary/path") == "/ordinary/path"
    assert pixeld.text_width("日本") == 4 and pixeld.fit("日本語", 5) == "日本…" and pixeld.pad("日本", 6) == "日本  "
    for height, width in ((1, 1), (2, 5), (3, 12), (8, 40), (30, 100)):  # any size lays out
        assert pixeld.top_lines(None, "", 0, height, width)
