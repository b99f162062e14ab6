"""The data model, proven once per dimension of the registry: a dimension added later is covered here
without writing a test. Two readers' hits go to a real daemon; the same page views come back in from
an access log and from pixeld's own export. For every dimension the three databases hold the same
page view and the same report rows, its filter selects it, and it shows in the dry run, in JSON, CSV
and HTML, and in the export. Then the README's recipe for a new dimension, followed to the letter."""

import csv
import io
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from urllib.parse import quote, urlencode

import pytest

import pixeld
from conftest import CHROME, IPHONE, PIXELD, ROOT, Daemon, free_port, request, run_pixeld, stored_pageviews, wait_for, write_mmdb

COUNTRIES = {"81.2.69.0/24": "GB", "89.160.20.0/24": "SE"}
CAMPAIGN = {"utm_source": "newsletter", "utm_medium": "email", "utm_campaign": "launch"}
READERS = [  # two readers who differ in every dimension; each dimension's value is taken from the reader who has it
    {"address": "81.2.69.142", "ua": CHROME, "language": "de-AT,de;q=0.9", "referrer": "https://news.ycombinator.com/item?id=1", "query": {}, "n": 1,
     "host": "example.org"},
    {"address": "89.160.20.112", "ua": IPHONE, "language": "fr-FR,fr;q=0.8", "referrer": "", "query": CAMPAIGN, "n": 2,
     "host": "blog.example.org"},  # a subdomain of the site (--site example.org): the same site, another hostname
]
DIMENSIONS = pixeld.DIMENSIONS + (pixeld.EVENT_NAMES,)
GOALS = {"PIXELD_GOALS": "Sample=path:/sample-path-1"}  # the first reader reaches it: the goals dimension has a value


def sample(field, n):
    """A value the field's cleaner keeps as it is, for a parameter the pixel takes: the cleaner decides."""
    for candidate in (f"/sample-{field.name}-{n}", f"sample {field.name} {n}", f"{1280 + n}x{720 + n}"):
        if field.clean(candidate) == candidate:
            return candidate
    raise AssertionError(f"no sample value survives the cleaner of {field.name}")


def page_params(reader):
    """What the snippet sends for the reader's page view: every parameter field, the referrer and the campaign."""
    params = {field.param: sample(field, reader["n"]) for field in pixeld.PARAM_FIELDS}
    return {**params, "host": reader["host"], "referrer": reader["referrer"], **reader["query"]}


def log_line(reader, when):
    """The reader's page request in an access log: the page's URL with its campaign, the Referer, the User-Agent."""
    path = page_params(reader)["path"] + ("?" + urlencode(reader["query"]) if reader["query"] else "")
    stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(when))
    return f'{reader["address"]} - - [{stamp}] "GET {quote(path, safe="/?=&")} HTTP/1.1" 200 512 "{reader["referrer"] or "-"}" "{reader["ua"]}"\n'


def headers(reader):
    return {"User-Agent": reader["ua"], "Accept-Language": reader["language"], "X-Forwarded-For": reader["address"]}


def dry_run(reader, mmdb, *more):
    """``pixeld.py check`` for the reader's hit: what it would be, said in one line."""
    params = page_params(reader)
    code, out, err = run_pixeld(
        "check", "--ua", reader["ua"], "--accept-language", reader["language"], "--ip", reader["address"], "--geoip", str(mmdb), "--site", "example.org",
        "--host", params.pop("host"), "--path", params.pop("path"), "--referrer", params.pop("referrer"), "--query", urlencode(params), *more,
    )
    assert code == 0, out + err
    return out


# A combined access log cannot hold what the page sends beside its address (the title, the screen) nor the
# Accept-Language header, nor the page's host (its rows are the --site's): those dimensions come in from logs empty, or as the site.
LOG_LACKS = {field.name for field in pixeld.PARAM_FIELDS if field.name != "path"} | {"language", "hostname"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The live database (a real daemon), and the same page views imported from an access log and from the export."""
    tmp = tmp_path_factory.mktemp("datamodel")
    mmdb = write_mmdb(tmp / "countries.mmdb", COUNTRIES)
    explained = [dry_run(reader, mmdb) for reader in READERS] + [dry_run(READERS[0], mmdb, "--event", "signup")]
    daemon = Daemon(tmp / "live.db", ["--site", "example.org", "--geoip", str(mmdb)], env=GOALS)
    try:
        for reader in READERS:
            assert daemon.pixel(page_params(reader), headers(reader)).status == 200
        daemon.pixel({"event": "signup", "path": page_params(READERS[0])["path"], "host": "example.org"}, headers(READERS[0]))
        wait_for(lambda: len(stored_pageviews(daemon.db)) == 2)
    finally:
        output = daemon.stop()
    assert "Traceback" not in output
    when = stored_pageviews(tmp / "live.db")[0]["time"]
    code, exported, err = run_pixeld("export", "--db", str(tmp / "live.db"), "--format", "ndjson")
    assert code == 0, err
    (tmp / "export.ndjson").write_text(exported)
    (tmp / "access.log").write_text("".join(log_line(reader, when + i) for i, reader in enumerate(READERS)))
    for name, args in (("export", []), ("log", ["--site", "example.org", "--geoip", str(mmdb)])):
        code, _, err = run_pixeld("import", str(tmp / ("export.ndjson" if name == "export" else "access.log")), "--db", str(tmp / f"{name}.db"), *args, env=GOALS)
        assert code == 0, err
    return {"tmp": tmp, "explained": explained, "exported": [json.loads(line) for line in exported.splitlines()]}


def databases(world, dim):
    """The databases that must agree on a dimension: live and export always; the access log where it can hold it."""
    names = ["live", "export"]
    if not any(field.name in LOG_LACKS for field in dim.fields) and dim is not pixeld.EVENT_NAMES:
        names.append("log")
    return {name: world["tmp"] / f"{name}.db" for name in names}


def reader_with(world, dim):
    """The stored page view (live) of the reader whose value of this dimension is not empty."""
    views = stored_pageviews(world["tmp"] / "live.db")
    if dim is pixeld.EVENT_NAMES:
        return views[0]
    found = [view for view in views if all(view[field.name] for field in dim.fields)]
    assert found, f"no reader has a value for {dim.name}: give READERS one"
    return found[0]


def report(db, *args):
    code, out, err = run_pixeld("report", "--db", str(db), "--range", "all", *args, env=GOALS)
    assert code == 0, err
    return out


def row_value(dim, section, view):
    """The label a section shows for a page view (what a row's link filters on)."""
    if section.part == "browser":
        return f"{view['browser']} {view['version']}"
    return view[section.part or dim.fields[0].name] if dim is not pixeld.EVENT_NAMES else "signup"


@pytest.mark.parametrize("dim", DIMENSIONS, ids=[dim.name for dim in DIMENSIONS])
def test_live_log_and_export_store_the_same_value(world, dim):
    wanted = reader_with(world, dim)
    for name, db in databases(world, dim).items():
        stored = [view for view in stored_pageviews(db) if view["path"] == wanted["path"]]
        assert len(stored) == 1, name
        assert {field.name: stored[0][field.name] for field in dim.fields if dim is not pixeld.EVENT_NAMES} == {
            field.name: wanted[field.name] for field in dim.fields if dim is not pixeld.EVENT_NAMES
        }, name


@pytest.mark.parametrize("section_name", list(pixeld.COUNTED_SECTIONS))
def test_every_section_shows_the_value_alike_and_its_filter_selects_it(world, section_name):
    dim, section = pixeld.COUNTED_SECTIONS[section_name]
    wanted = reader_with(world, dim)
    value = row_value(dim, section, wanted)
    for name, db in databases(world, dim).items():
        document = json.loads(report(db, "--format", "json"))
        rows = {row["value"]: row for row in document["sections"][section_name]}
        assert value in rows, (name, rows)
        if section.filter:
            filtered = json.loads(report(db, "--format", "json", f"--{section.filter}", value))
            assert filtered["pageviews"] == 1 or (dim is pixeld.EVENT_NAMES and filtered["sections"]["events"][0]["count"] == 1), name
            assert filtered["filters"] == {section.filter: value.lower() if section.match == "lower" else value}


@pytest.mark.parametrize("section_name", list(pixeld.COUNTED_SECTIONS))
def test_every_section_is_in_text_csv_and_html(world, section_name):
    dim, section = pixeld.COUNTED_SECTIONS[section_name]
    value = row_value(dim, section, reader_with(world, dim))
    db = world["tmp"] / "live.db"
    text = report(db, "--section", section_name)
    assert section.title in text and value in text
    rows = list(csv.reader(io.StringIO(report(db, "--format", "csv"))))
    assert any(row[1] == value and (row[0] == section_name or row[0] in ("entry_pages", "events")) for row in rows)
    page = report(db, "--format", "html")
    assert f"<h2>{section.title}</h2>" in page and pixeld.esc(value) in page


@pytest.mark.parametrize("dim", DIMENSIONS, ids=[dim.name for dim in DIMENSIONS])
def test_every_dimension_is_in_the_dry_run_and_the_export(world, dim):
    wanted = reader_with(world, dim)
    if dim is pixeld.EVENT_NAMES:
        assert "the event 'signup'" in world["explained"][-1]
        assert any(row["type"] == "event" and row["event"] == "signup" for row in world["exported"])
        return
    explained = world["explained"][[view["path"] for view in stored_pageviews(world["tmp"] / "live.db")].index(wanted["path"])]
    exported = [row for row in world["exported"] if row["type"] == "pageview" and row["path"] == wanted["path"]]
    for field in dim.fields:
        assert f"{field.name} {wanted[field.name]}" in explained or field.name == "path" and wanted["path"] in explained or field.by_visitor
        assert exported[0][field.name] == wanted[field.name]


def test_every_field_is_exported_and_filled_by_some_reader(world):
    """A field no reader fills would be proven only empty: READERS must be given what it needs."""
    views = stored_pageviews(world["tmp"] / "live.db")
    for field in pixeld.VIEW_FIELDS:
        assert field.name in pixeld.EXPORT_FIELDS
        assert any(view[field.name] for view in views), field.name


# The README's recipe for a new dimension, followed to the letter: its two lines, and nothing else.

def recipe_lines():
    text = (ROOT / "README.md").read_text()
    entry = re.search(r"^\s*(Dimension\(\"themes\".*\),)\s*$", text, re.M)
    migration = re.search(r"^\s*(add_text_dimension\(\"themes\"\),)\s*$", text, re.M)
    assert entry and migration, "the README's recipe names a themes dimension and its migration"
    return entry.group(1), migration.group(1)


def with_recipe(tmp_path):
    """pixeld.py with the README's two lines: the entry at the end of DIMENSIONS, the migration at the end of MIGRATIONS."""
    entry, migration = recipe_lines()
    source = PIXELD.read_text()
    source = source.replace("\n)\nEVENT_NAMES = ", f"\n    {entry}\n)\nEVENT_NAMES = ", 1)
    end = source.index("\n)\nSCHEMA_VERSION = ")
    source = source[:end] + f"\n    {migration}" + source[end:]
    patched = tmp_path / "pixeld.py"
    patched.write_text(source)
    return patched


def test_a_dimension_added_by_the_readme_recipe_is_stored_counted_filtered_and_exported(tmp_path):
    db = tmp_path / "recipe.db"
    old = Daemon(db, [])  # the database as this pixeld leaves it, with a page view
    old.pixel({"path": "/before", "host": "example.org"})
    wait_for(lambda: len(stored_pageviews(db)) == 1)
    old.stop()
    patched, port = with_recipe(tmp_path), free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith("PIXELD_")}  # not the machine's settings
    daemon = subprocess.Popen([sys.executable, str(patched), "serve", "--listen", f"127.0.0.1:{port}", "--db", str(db)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(lambda: request("127.0.0.1", port, "/healthz").status == 200, proc=daemon)
        request("127.0.0.1", port, "/pixel.gif?path=/after&host=example.org&theme=dark", {"User-Agent": CHROME})
        wait_for(lambda: sqlite3.connect(db).execute("SELECT count(*) FROM pageviews").fetchone()[0] == 2)
    finally:
        daemon.terminate()
        assert "Traceback" not in daemon.communicate(timeout=30)[0].decode()

    def run(*args):
        done = subprocess.run([sys.executable, str(patched), *args, "--db", str(db), "--env-file", ""], capture_output=True, text=True, timeout=30, env=env)
        assert done.returncode == 0, done.stderr
        return done.stdout

    document = json.loads(run("report", "--format", "json", "--range", "all"))
    assert {row["value"]: row["count"] for row in document["sections"]["themes"]} == {"dark": 1, "": 1}  # the older page view is counted too
    assert json.loads(run("report", "--format", "json", "--range", "all", "--theme", "dark"))["pageviews"] == 1
    exported = list(csv.DictReader(io.StringIO(run("export"))))
    assert [(row["path"], row["theme"]) for row in exported] == [("/before", ""), ("/after", "dark")]
