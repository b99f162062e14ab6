"""Beyond one machine, with a real ClickHouse (chdb, ClickHouse in process): the README's "When one machine is not
enough", tested as written. A real nginx with the README's upstream splits readers by address over two real daemons;
each node's feed (the README's timer command, with its pipefail pipeline into clickhouse-client) ships into one
ClickHouse table made from ``export --schema clickhouse``; the README's SQL then gives the nodes' own reports, summed.
A consumer that dies half-way through a batch loses and duplicates nothing; reading time that arrives after a page
view is in the row ClickHouse ends up with; while a node is down, nginx sends its readers to another; a site's history
imported from another tool is in the README's SQL's numbers as in pixeld's report.

chdb is big (about 900 MB), so it has its own requirements file, which .ci/run installs; without it these tests skip
with the command that installs it. ``clickhouse-client`` itself is tests/clickhouse_client.py: the same arguments,
run by chdb on one database folder."""

import datetime as dt
import http.client
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional
from urllib.parse import urlencode

import pytest

from conftest import CHROME, FIREFOX, IPHONE, PIXELD, ROOT, Daemon, free_port, report_json, require_module, require_tool, run_pixeld, wait_for, write_mmdb
from test_move_in import plausible_zip

import pixeld

FINAL_AFTER = 8  # seconds after which a row is final here, rather than a day (serve --final-after; the feed reads it from the database)
NODES = ("node-a", "node-b")
READERS = [f"127.0.0.{number}" for number in range(10, 50)]  # client addresses: loopback is 127.0.0.0/8
COUNTRIES = {"127.0.0.0/27": "DE", "127.0.0.32/28": "FR"}  # the last two readers have no country
AGENTS = (CHROME, FIREFOX, IPHONE)
PAGES = ("/", "/post/a", "/post/b", "/about")
REFERRERS = ("https://www.google.com/search?q=pixeld", "https://news.ycombinator.com/item?id=1", "", "https://duckduckgo.com/")
SECTIONS = ("pages", "sources", "countries", "browsers")
RANKED_BY = {"sources": "visitors"}  # what a section's rows are ranked by, where it is not their page views
SUMMED = {"pages": ("count",), "sources": ("visitors", "visits", "count"), "countries": ("count",), "browsers": ("count",)}  # a row's counts
AVERAGES = ("visit_duration", "time_on_page", "scroll_depth")  # what does not add up across nodes


@pytest.fixture(scope="module")
def chdb():
    return require_module("chdb", "tests/requirements-clickhouse.txt")


# ---- The README, as written ------------------------------------------------------------------------------------


def readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("## When one machine is not enough\n", 1)[1].split("\n## ", 1)[0]


def readme_sql() -> Dict[str, str]:
    """The section's SQL blocks, by the first word of their comment: once (the view), headline, pages, sources, countries, browsers."""
    blocks = re.findall(r"```sql\n-- (?:The )?(\w+)[^\n]*\n(.*?)```", readme_section(), re.S)
    return {name.lower(): sql for name, sql in blocks}


def readme_block(language: str, containing: str) -> str:
    [block] = [block for block in re.findall(rf"```{language}\n(.*?)```", readme_section(), re.S) if containing in block]
    return block


def readme_feed_command() -> str:
    """The shell command of the README's feed service (its ExecStart), as the timer runs it."""
    unit = readme_block("ini", "pixeld-feed.service")
    [command] = [line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("ExecStart=")]
    return command


# ---- ClickHouse ------------------------------------------------------------------------------------------------


class ClickHouse:
    """One ClickHouse database folder: the README's commands reach it through ``clickhouse-client`` (on PATH, as
    tests/clickhouse_client.py), and the test reads it in process."""

    def __init__(self, folder: Path, chdb: Any) -> None:
        self.folder, self.chdb = folder, chdb
        self.bin = folder.parent / "bin"
        self.bin.mkdir(exist_ok=True)
        client = self.bin / "clickhouse-client"
        client.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(ROOT / 'tests' / 'clickhouse_client.py'))} \"$@\"\n")
        client.chmod(0o755)

    def env(self, **more: str) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIXELD_") and k != "CLICKHOUSE_FAIL_AFTER"}
        env.update(PATH=f"{self.bin}:{env.get('PATH', '/usr/bin:/bin')}", CHDB_PATH=str(self.folder), **more)
        return env

    def query(self, sql: str, **params: str) -> List[Dict[str, Any]]:
        database = self.chdb.session.Session(str(self.folder))
        try:
            out = database.query(sql, "JSONEachRow", params=params).data()
        finally:
            database.close()
        return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.fixture
def clickhouse(tmp_path, chdb) -> ClickHouse:
    """A ClickHouse with the feed's table and the report's view, created as the README creates them: ``export --schema clickhouse``
    into clickhouse-client, then the view's SQL."""
    house = ClickHouse(tmp_path / "clickhouse", chdb)
    [create] = [line for line in readme_section().splitlines() if "--schema clickhouse" in line]
    done = subprocess.run(["bash", "-c", "set -o pipefail; " + local(create)], env=house.env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    view = readme_sql()["once"]  # the README's view, pasted into clickhouse-client
    done = subprocess.run(["clickhouse-client", "--multiquery"], input=view, env=house.env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "CREATE VIEW" in view, done.stderr
    assert house.query("SELECT count() AS rows FROM pixeld") == [{"rows": 0}]
    return house


def local(command: str, cursor: Optional[Path] = None) -> str:
    """A README command for this machine: this checkout's pixeld.py run by this Python, and this test's files."""
    ours = f"{shlex.quote(sys.executable)} {shlex.quote(str(PIXELD))}"
    command = command.replace("/usr/bin/python3 /usr/local/bin/pixeld.py", ours).replace("python3 pixeld.py", ours)
    if cursor is not None:
        command = command.replace("/var/lib/pixeld/feed.cursor", shlex.quote(str(cursor)))
    return command


def feed(house: ClickHouse, node: "Node", fail_after: Optional[int] = None) -> subprocess.CompletedProcess:
    """One run of the node's feed: the README's timer command, with the node's settings as its EnvironmentFile gives them."""
    command = readme_feed_command()
    assert command.startswith("/bin/bash -c '") and command.endswith("'"), command
    more = {"PIXELD_DB": str(node.db)}
    if fail_after is not None:
        more["CLICKHOUSE_FAIL_AFTER"] = str(fail_after)
    return subprocess.run(
        ["/bin/bash", "-c", local(shlex.split(command)[2], cursor=node.cursor)],
        env=house.env(**more), capture_output=True, text=True, timeout=120,
    )



# ---- The nodes behind nginx ------------------------------------------------------------------------------------


class Node:
    def __init__(self, name: str, tmp_path: Path) -> None:
        self.name, self.db, self.cursor = name, tmp_path / f"{name}.db", tmp_path / f"{name}.cursor"
        self.daemon: Optional[Daemon] = None  # the node's pixeld, where it runs one


def nginx_config(prefix: Path, port: int, nodes: List[int]) -> Path:
    """The README's nginx configuration, as written, on loopback: its upstream names the daemons, its server listens here."""
    block = readme_block("nginx", "hash $remote_addr consistent")
    servers = re.findall(r"^\s*server \S+:\d+;\n", block, re.M)
    assert len(servers) >= 2, block
    block = block.replace("".join(servers), "".join(f"    server 127.0.0.1:{node};\n" for node in nodes))
    block = block.replace("listen 443 ssl;", f"listen 127.0.0.1:{port};")
    assert not re.search(r"listen\s+443\b", block), block  # the README's own port is gone (a loopback port may hold the digits 443)
    conf = prefix / "nginx.conf"
    conf.write_text(f"worker_processes 1;\npid {prefix}/nginx.pid;\nerror_log stderr;\nevents {{}}\nhttp {{\n{block}\n}}\n")
    for temp in ("client_body_temp", "proxy_temp", "fastcgi_temp", "uwsgi_temp", "scgi_temp", "logs"):
        (prefix / temp).mkdir(exist_ok=True)
    return conf


def node_settings(name: str) -> Dict[str, str]:
    """A node's /etc/pixeld.env as the README gives it, on loopback: nginx's address is 127.0.0.1 here, and the daemon
    listens where the test says (``--listen`` wins over the file)."""
    lines = readme_block("sh", "# /etc/pixeld.env").splitlines()
    settings = dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))
    assert {"PIXELD_LISTEN", "PIXELD_TRUSTED_PROXIES", "PIXELD_NODE"} <= set(settings), settings
    return {**settings, "PIXELD_TRUSTED_PROXIES": "127.0.0.1", "PIXELD_NODE": name}


@pytest.fixture
def cluster(tmp_path, start_daemon):
    """Two pixeld nodes (each as the README runs one: its own name, X-Forwarded-For believed from nginx only) behind a
    real nginx with the README's configuration. Yields (nginx's port, the nodes)."""
    require_module("geoip2")
    nginx = require_tool("nginx", package="nginx")
    countries = write_mmdb(tmp_path / "countries.mmdb", COUNTRIES)
    nodes, ports = [], []
    for name in NODES:
        node = Node(name, tmp_path)
        node.daemon = start_daemon("--site", "example.org", "--geoip", str(countries), "--final-after", str(FINAL_AFTER), env=node_settings(name), db=node.db)
        nodes.append(node)
        ports.append(node.daemon.port)
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    port = free_port()
    proxy = subprocess.Popen([nginx, "-p", str(prefix), "-c", str(nginx_config(prefix, port, ports)), "-g", "daemon off;"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: send("127.0.0.1", port, "/healthz").status == 200, seconds=60, proc=proxy)
        yield port, nodes
    finally:
        proxy.terminate()
        proxy.wait(timeout=30)


def send(reader: str, port: int, target: str, agent: str = CHROME) -> http.client.HTTPResponse:
    """One request from the reader's own address (a loopback address of its own) to nginx."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(reader, 0))
    try:
        conn.request("GET", target, headers={"User-Agent": agent})
        answer = conn.getresponse()
        answer.read()
        return answer
    finally:
        conn.close()


def pixel(reader: str, port: int, agent: str, **params: str) -> None:
    assert send(reader, port, "/pixel.gif?" + urlencode({"host": "example.org", **params}), agent).status == 200


def browse(port: int) -> int:
    """Every reader reads a few pages, from their own address and browser; some send reading time, every seventh an
    event. Returns the page views sent."""
    views = 0
    for number, reader in enumerate(READERS):
        agent = AGENTS[number % len(AGENTS)]
        for step in range(1 + number % 4):
            path = PAGES[(number + step) % len(PAGES)]
            referrer = REFERRERS[number % len(REFERRERS)] if step == 0 else "https://example.org" + PAGES[(number + step - 1) % len(PAGES)]
            pixel(reader, port, agent, path=path, referrer=referrer, title="A <b>page</b>")
            views += 1
            if (number + step) % 3 == 0:
                pixel(reader, port, agent, engagement="1", path=path, engaged=str(5 + number), scroll=str(10 + 2 * number))
        if number % 7 == 0:
            pixel(reader, port, agent, event="signup", path=PAGES[number % len(PAGES)])
    return views


def node_report(node: Node) -> Dict[str, Any]:
    return report_json(node.db, "--site", "example.org")


# ---- What the README's SQL says, and what the nodes' reports say -----------------------------------------------


def today() -> Dict[str, str]:
    start = dt.datetime.now(dt.timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    return {"site": "example.org", "start": start.strftime("%Y-%m-%d %H:%M:%S"), "end": (start + dt.timedelta(days=1)).strftime("%Y-%m-%d %H:%M:%S")}


def numbers(row: Dict[str, Any]) -> Dict[str, Any]:
    """A row as ClickHouse's JSON gives it, with 64-bit integers as numbers (ClickHouse may quote them)."""
    return {key: int(value) if isinstance(value, str) and value.isdigit() else value for key, value in row.items()}


def as_report_row(name: str, row: Dict[str, Any]) -> Dict[str, Any]:
    """A section's row from the README's SQL under the names of pixeld's JSON: its first column is the value."""
    (_, value), *rest = numbers(row).items()
    shown = {"value": value, **dict(rest)}
    assert {"value", "count", "percent"} <= set(shown), (name, row)
    return shown


def clickhouse_report(house: ClickHouse, span: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    sql, span = readme_sql(), span or today()
    [headline] = house.query(sql["headline"], **span)
    return {"headline": numbers(headline), **{name: [as_report_row(name, row) for row in house.query(sql[name], **span)] for name in SECTIONS}}


def bounces(node: Node, *span: str) -> int:
    """A node's bounces (today, unless ``span`` says), as its report counts them: the CSV report's bounces per entry page, added up."""
    code, out, err = run_pixeld("report", "--db", str(node.db), "--format", "csv", *(span or ("--range", "today")), "--site", "example.org")
    assert code == 0, err
    return sum(int(line.split(",")[2]) for line in out.splitlines() if line.startswith("entry_bounces,"))


def summed_reports(nodes: List[Node]) -> Dict[str, Any]:
    """The nodes' reports added up: every count summed, the shares worked out from the sums as pixeld works them out,
    and the rows ranked as pixeld ranks them. Averages (visit duration, time on page) are not sums, so not here."""
    reports = [node_report(node) for node in nodes]
    totals = pixeld.Metrics(
        views=sum(r["pageviews"] for r in reports), visitors=sum(r["visitors"] for r in reports), visits=sum(r["visits"] for r in reports),
        bounces=sum(bounces(node) for node in nodes),
    )
    summed: Dict[str, Any] = {"headline": {"pageviews": totals.views, "visitors": totals.visitors, "visits": totals.visits, "bounces": totals.bounces,
                                           "bounce_rate": totals.bounce_rate}}
    for name in SECTIONS:
        rows: Dict[str, Dict[str, Any]] = {}
        for report in reports:
            for row in report["sections"][name]:
                into = rows.setdefault(row["value"], {"value": row["value"], **{key: 0 for key in SUMMED[name]}})
                for key in SUMMED[name]:
                    into[key] += row[key]
                if "channel" in row:
                    into["channel"] = row["channel"]
        ranked = RANKED_BY.get(name, "count")
        base = totals.visitors if ranked == "visitors" else totals.views
        for row in rows.values():
            row["percent"] = pixeld.percent(row[ranked], base)
        summed[name] = sorted(rows.values(), key=lambda row: (-row[ranked], -row["count"], row["value"]))[:10]
    return summed


def without_averages(report: Dict[str, Any]) -> Dict[str, Any]:
    """A report without the numbers that do not add up across nodes: the averages."""
    return {part: {key: value for key, value in rows.items() if key not in AVERAGES} if part == "headline" else
            [{key: value for key, value in row.items() if key not in AVERAGES} for row in rows] for part, rows in report.items()}


# ---- The tests -------------------------------------------------------------------------------------------------


def test_the_readmes_sql_over_two_nodes_gives_their_reports_summed_through_a_failed_consumer(cluster, clickhouse):
    port, nodes = cluster
    views = browse(port)
    wait_for(lambda: sum(node_report(node)["pageviews"] for node in nodes) == views, seconds=60)
    assert all(node_report(node)["pageviews"] for node in nodes), "nginx's hash sends readers to both nodes"
    time.sleep(FINAL_AFTER + 2)  # every row is final

    # One node's rows first: the README's SQL gives that node's report exactly, rates and averages included.
    first = feed(clickhouse, nodes[0])
    assert first.returncode == 0, first.stderr
    ours, theirs = clickhouse_report(clickhouse), node_report(nodes[0])
    assert ours["headline"] == {"pageviews": theirs["pageviews"], "visitors": theirs["visitors"], "visits": theirs["visits"], "bounces": bounces(nodes[0]),
                                "bounce_rate": theirs["bounce_rate"], "visit_duration": theirs["visit_duration"]}
    for name in SECTIONS:
        assert ours[name] == theirs["sections"][name][:10], name

    # The other node's consumer dies half-way through its batch, after ClickHouse took part of it: the run fails
    # (pipefail), and its cursor stays where it was.
    shipped = clickhouse.query("SELECT count() AS rows FROM pixeld")[0]["rows"]
    cursor = nodes[1].cursor.read_bytes() if nodes[1].cursor.exists() else None
    failed = feed(clickhouse, nodes[1], fail_after=5)
    assert failed.returncode != 0
    assert int(clickhouse.query("SELECT count() AS rows FROM pixeld")[0]["rows"]) == int(shipped) + 5
    assert (nodes[1].cursor.read_bytes() if nodes[1].cursor.exists() else None) == cursor

    # Run again: everything that was not taken arrives, and what was taken counts once.
    again = feed(clickhouse, nodes[1])
    assert again.returncode == 0, again.stderr
    ours = clickhouse_report(clickhouse)
    assert without_averages(ours) == summed_reports(nodes)

    # nginx's hash kept each reader on one node: each counts as one visitor, with one visit, over both nodes.
    assert (ours["headline"]["visitors"], ours["headline"]["visits"]) == (len(READERS), len(READERS))

    # Nothing twice: each node's page views and events, once each.
    stored = clickhouse.query("SELECT node, type, count() AS rows, uniqExact(id) AS ids FROM pixeld FINAL GROUP BY node, type ORDER BY node, type")
    signups = sum(1 for number in range(len(READERS)) if number % 7 == 0)
    assert sum(int(row["rows"]) for row in stored if row["type"] == "pageview") == views
    assert sum(int(row["rows"]) for row in stored if row["type"] == "event") == signups
    assert all(row["rows"] == row["ids"] for row in stored) and {row["node"] for row in stored} == set(NODES)

    # What ClickHouse holds names no reader: no address, no User-Agent.
    held = json.dumps(clickhouse.query("SELECT * FROM pixeld"))
    assert not [text for text in READERS + list(AGENTS) if text in held]

    # A later run ships nothing new.
    for node in nodes:
        assert feed(clickhouse, node).returncode == 0
    assert clickhouse.query("SELECT count() AS rows FROM pixeld FINAL WHERE type = 'pageview'")[0]["rows"] in (views, str(views))


def test_reading_time_that_arrives_after_the_page_view_is_in_the_row_clickhouse_holds(cluster, clickhouse):
    port, nodes = cluster
    reader = READERS[0]
    pixel(reader, port, CHROME, path="/long-read", referrer="https://www.google.com/")
    wait_for(lambda: any(node_report(node)["pageviews"] for node in nodes), seconds=60)
    [node] = [node for node in nodes if node_report(node)["pageviews"]]
    assert feed(clickhouse, node).returncode == 0  # before it is final: not shipped, as it can still change
    assert clickhouse.query("SELECT count() AS rows FROM pixeld")[0]["rows"] in (0, "0")
    pixel(reader, port, CHROME, engagement="1", path="/long-read", engaged="95", scroll="80")
    wait_for(lambda: node_report(node)["time_on_page"] == 95.0)
    time.sleep(FINAL_AFTER + 2)
    assert feed(clickhouse, node).returncode == 0
    [row] = clickhouse.query("SELECT path, engaged, scroll FROM pixeld FINAL WHERE type = 'pageview'")
    assert numbers(row) == {"path": "/long-read", "engaged": 95, "scroll": 80}
    [page] = clickhouse.query(readme_sql()["pages"], **today())
    assert as_report_row("pages", page) == node_report(node)["sections"]["pages"][0]


def test_while_a_node_is_down_nginx_sends_its_readers_to_another_and_nothing_stored_is_lost(cluster):
    """The README's recipe when a node dies: its readers' hits go to the other node meanwhile (each counts there once
    more as a visitor that day), what it stored stays, and the pixel never fails."""
    port, nodes = cluster
    for reader in READERS:
        pixel(reader, port, CHROME, path="/before")
    wait_for(lambda: sum(node_report(node)["pageviews"] for node in nodes) == len(READERS), seconds=60)
    counted = {node.name: node_report(node)["visitors"] for node in nodes}
    dead, alive = nodes
    dead.daemon.stop()
    for reader in READERS:
        pixel(reader, port, CHROME, path="/during")
    moved = counted[dead.name]
    assert moved and counted[alive.name], counted  # nginx's hash had spread the readers over both
    wait_for(lambda: node_report(alive)["pageviews"] == counted[alive.name] + len(READERS), seconds=60)
    assert node_report(alive)["visitors"] == counted[alive.name] + moved  # the dead node's readers, new visitors there
    assert node_report(dead)["pageviews"] == node_report(dead)["visitors"] == moved  # what it stored before it stopped


def test_each_node_feeds_clickhouse_every_minute_as_the_daemons_user():
    """The README's feed units: a oneshot service as pixeld.service's own user and state (so it reads the database and
    keeps its cursor there), which commits the cursor only after the whole pipeline succeeded; a timer every minute."""
    def settings(unit: str) -> Dict[str, str]:
        return dict(line.split("=", 1) for line in readme_block("ini", unit).splitlines() if "=" in line and not line.startswith("#"))

    service, timer = settings("pixeld-feed.service"), settings("pixeld-feed.timer")
    assert service["Type"] == "oneshot" and (service["DynamicUser"], service["User"], service["StateDirectory"]) == ("yes", "pixeld", "pixeld")
    command = shlex.split(readme_feed_command())[2]
    assert command.startswith("set -o pipefail; ") and command.count(" | ") == 1
    assert command.endswith(" && /usr/bin/python3 /usr/local/bin/pixeld.py export --commit-cursor /var/lib/pixeld/feed.cursor")
    assert (timer["OnCalendar"], timer["Persistent"]) == ("minutely", "true")


def test_the_readmes_sql_adds_in_the_daily_counts_imported_from_another_tool(tmp_path, clickhouse):
    """A site that moved in from Plausible: its daily counts travel as aggregate rows, and the README's SQL gives the
    report over them, exactly, as pixeld's own report adds them in."""
    node = Node("moved-in", tmp_path)
    code, _, err = run_pixeld("import", str(plausible_zip(tmp_path / "example_org_20240103.zip")), "--db", str(node.db))
    assert code == 0, err
    shipped = feed(clickhouse, node)
    assert shipped.returncode == 0, shipped.stderr
    assert {row["type"] for row in clickhouse.query("SELECT DISTINCT type FROM pixeld")} == {"aggregate"}
    theirs = report_json(node.db, "--range", "all", "--site", "example.org")
    span = {"site": "example.org", **{edge: theirs[edge].replace("T", " ").rstrip("Z") for edge in ("start", "end")}}
    ours = clickhouse_report(clickhouse, span)
    assert theirs["pageviews"] == 38  # what the Plausible export holds, so the comparison is not of nothing
    assert ours["headline"] == {"pageviews": theirs["pageviews"], "visitors": theirs["visitors"], "visits": theirs["visits"],
                                "bounces": bounces(node, "--range", "all"), "bounce_rate": theirs["bounce_rate"], "visit_duration": theirs["visit_duration"]}
    for name in SECTIONS:
        assert ours[name] == theirs["sections"][name][:10], name
