"""The 2020 "Privacy Focused Analytics From Scratch" design, rebuilt from its description for
comparison, not taken from its code: a Flask pixel endpoint that writes one SQLite row per hit
(time, path, title, referrer, country, browser, screen) and answers a GIF. ``bench/ingest.py
--flask`` runs it under gunicorn with two sync workers, as that post deployed it.

    FLASK_DESIGN_DB=/tmp/flask.db gunicorn --workers 2 --chdir bench flask_design:app
"""

import base64
import datetime
import os
import sqlite3

from flask import Flask, Response, request

GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
SCHEMA = "CREATE TABLE IF NOT EXISTS data (id INTEGER PRIMARY KEY, timestamp TEXT, path TEXT, title TEXT, referrer TEXT, country TEXT, device TEXT, width INTEGER, height INTEGER)"

app = Flask(__name__)


def database():
    conn = sqlite3.connect(os.environ["FLASK_DESIGN_DB"], timeout=30)
    conn.execute(SCHEMA)
    return conn


@app.route("/pixel.gif")
def pixel():
    args = request.args
    width, _, height = args.get("resolution", "0,0").replace("x", ",").partition(",")
    browser = request.headers.get("User-Agent", "").split("/")[0].lower()
    conn = database()
    with conn:
        conn.execute(
            "INSERT INTO data (timestamp, path, title, referrer, country, device, width, height) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (str(datetime.datetime.now()), args.get("path", ""), args.get("title", ""), args.get("referrer", ""), "", browser, int(width), int(height)),
        )
    conn.close()
    return Response(GIF, mimetype="image/gif")
