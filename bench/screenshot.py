"""The README's screenshot of the HTML report: a week of made-up traffic, imported, served, and
photographed in Debian's Chromium through Playwright.

    python3 bench/screenshot.py [--out bench/report.png] [--width 1000]
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PIXELD = os.path.join(HERE, "..", "pixeld.py")
sys.path.insert(0, os.path.join(HERE, ".."))

import pixeld  # noqa: E402

PAGES = ["/", "/blog/sqlite-is-enough", "/blog/one-file-services", "/about", "/blog/why-no-cookies", "/blog/systemd-hardening"]
REFERRERS = ["", "", "", "", "https://www.google.com/", "https://www.google.de/", "https://news.ycombinator.com/item", "https://old.reddit.com/r/python",
             "https://duckduckgo.com/", "https://t.co/x1", "https://lobste.rs/s/a", "https://blog.example.net/links"]
AGENTS = [("Chrome", "131", "Windows", "desktop", "1920x1080"), ("Safari", "18", "iOS", "phone", "390x844"), ("Firefox", "133", "Linux", "desktop", "2560x1440"),
          ("Chrome", "131", "Android", "phone", "412x915"), ("Safari", "18", "macOS", "desktop", "1512x982"), ("Edge", "131", "Windows", "desktop", "1536x864")]


def traffic(now: int, rng: random.Random):
    """A week of page views as pixeld's own NDJSON export, with visits of one to four pages."""
    for day in range(7):
        for _ in range(rng.randint(120, 200)):
            start = now - (day + 1) * 86400 + rng.randrange(86400)
            agent = rng.choice(AGENTS)
            referrer, country, views = rng.choice(REFERRERS), rng.choice(["US", "DE", "GB", "FR", "IN", "NL", "SE"]), rng.choice([1, 1, 1, 2, 3, 4])
            for n in range(views):
                yield {
                    "time": start + 60 * n, "type": "pageview", "site": "example.org", "path": rng.choice(PAGES), "referrer": referrer if n == 0 else "",
                    "country": country, "browser": agent[0], "version": agent[1], "os": agent[2], "device": agent[3], "screen": agent[4], "language": "en",
                    "first_today": int(n == 0), "visit_views": views if n == 0 else 0, "duration": 60 * (views - 1) if n == 0 else 0,
                    "engaged": rng.randint(5, 400), "scroll": rng.randint(20, 100),
                }
            if rng.random() < 0.1:
                yield {"time": start, "type": "event", "site": "example.org", "path": "/", "event": "signup", "first_today": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(HERE, "report.png"))
    parser.add_argument("--width", type=int, default=1000)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as scratch:
        export, db = os.path.join(scratch, "week.ndjson"), os.path.join(scratch, "pixeld.db")
        with open(export, "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in traffic(int(time.time()), random.Random(7)))
        subprocess.run([sys.executable, PIXELD, "import", export, "--db", db], check=True, capture_output=True)
        port = 8765
        daemon = subprocess.Popen([sys.executable, PIXELD, "serve", "--db", db, "--listen", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(1)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
                page = browser.new_page(viewport={"width": args.width, "height": 900})
                page.goto(f"http://127.0.0.1:{port}/report?range=7d&format=html")
                page.screenshot(path=args.out, full_page=False)
                browser.close()
        finally:
            daemon.terminate()
            daemon.wait()
    print(f"wrote {args.out} (pixeld {pixeld.__version__})")


if __name__ == "__main__":
    main()
