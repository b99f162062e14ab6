#!/usr/bin/env python3
"""Measure pixeld's user-agent reducer against two public, labelled yardsticks.

- uap-core's test corpus (``../shared/ua-corpus/uap-core`` by default): browser family, OS,
  crawlers caught, and mainstream browsers taken for bots. A UA that uap-core's device tests
  call a Spider counts as a crawler, not as a browser, even where its browser tests give it a
  browser family (Google Web Preview is "Chrome" there);
- the ``crawler-user-agents`` package from PyPI (MIT): bot recall on its example ``instances``.

Neither corpus is copied into the project: they are development yardsticks, not test fixtures.
Prints the numbers, the misses with ``--misses``, and the reducer's speed, cached (a realistic
mix of repeated UAs, through the App's memo) and uncached (every UA distinct).

    pip install -r bench/requirements.txt
    python3 bench/ua_yardstick.py [CORPUS_DIR] [--misses]
"""

import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import yaml  # noqa: E402  (PyYAML, a development dependency)

import pixeld  # noqa: E402

BROWSERS = {
    "Chrome": "Chrome", "Chrome Mobile": "Chrome", "Chrome Mobile iOS": "Chrome", "Chrome Mobile WebView": "Chrome",
    "Firefox": "Firefox", "Firefox Mobile": "Firefox", "Firefox iOS": "Firefox",
    "Safari": "Safari", "Mobile Safari": "Safari", "Mobile Safari UI/WKWebView": "Safari",
    "Edge": "Edge", "Edge Mobile": "Edge",
    "Opera": "Opera", "Opera Mobile": "Opera",
    "Samsung Internet": "Samsung Internet", "Yandex Browser": "Yandex", "UC Browser": "UC Browser",
}
SYSTEMS = {"Windows": "Windows", "Mac OS X": "macOS", "iOS": "iOS", "Android": "Android", "Linux": "Linux", "Ubuntu": "Linux", "Chrome OS": "ChromeOS"}
CRAWLER_WORDS = ("bot", "spider", "crawler", "slurp", "preview", "fetcher", "headless", "archiver")


def load(directory, name):
    with open(os.path.join(directory, name), encoding="utf-8") as handle:
        return yaml.safe_load(handle)["test_cases"]


def is_browser_like(ua):
    """Browsers announce themselves as Mozilla or Opera; app and library UAs (CFNetwork, okhttp) do not."""
    return ua.startswith(("Mozilla/", "Opera"))


def share(hits, total):
    return f"{hits}/{total} = {100.0 * hits / total:.1f}%" if total else "n/a"


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    show = "--misses" in sys.argv
    here = os.path.dirname(os.path.abspath(__file__))
    directory = args[0] if args else os.path.join(here, "..", "..", "shared", "ua-corpus", "uap-core")
    uas, oses, devices = load(directory, "test_ua.yaml"), load(directory, "test_os.yaml"), load(directory, "test_device.yaml")
    classify = pixeld.classify_user_agent

    labelled_spiders = {r["user_agent_string"] for r in devices if r["family"] == "Spider"}  # uap's own label wins over a family it also gives
    browser_rows = [(r["user_agent_string"], BROWSERS[r["family"]]) for r in uas if r["family"] in BROWSERS and r["user_agent_string"] not in labelled_spiders]
    browser_misses = [(ua, want, classify(ua)) for ua, want in browser_rows if classify(ua).browser != want]
    mainstream_bots = [(ua, want) for ua, want in browser_rows if classify(ua).device == "bot"]

    os_rows = [
        (r["user_agent_string"], SYSTEMS[r["family"]])
        for r in oses
        if r["family"] in SYSTEMS and is_browser_like(r["user_agent_string"]) and r["user_agent_string"] not in labelled_spiders
    ]
    os_misses = [(ua, want, classify(ua)) for ua, want in os_rows if classify(ua).os != want]

    spiders = sorted(labelled_spiders)
    spiders += [r["user_agent_string"] for r in uas if any(w in r["family"].lower() for w in CRAWLER_WORDS)]
    spider_misses = [ua for ua in spiders if classify(ua).device != "bot"]

    people = [r["user_agent_string"] for r in devices if r["family"] in ("iPhone", "iPad", "Generic Smartphone", "Generic Tablet", "Mac")]
    people_bots = [ua for ua in people if classify(ua).device == "bot"]

    print(f"mainstream browser family : {share(len(browser_rows) - len(browser_misses), len(browser_rows))}")
    print(f"mainstream OS (browsers)  : {share(len(os_rows) - len(os_misses), len(os_rows))}")
    print(f"crawlers caught           : {share(len(spiders) - len(spider_misses), len(spiders))}")
    print(f"mainstream taken for bots : {len(mainstream_bots)} of {len(browser_rows)} browsers, {len(people_bots)} of {len(people)} phones/tablets/Macs")

    import crawleruseragents  # noqa: E402  (crawler-user-agents, a bench dependency)

    instances = sorted({ua for entry in crawleruseragents.CRAWLER_USER_AGENTS_DATA for ua in entry.get("instances", [])})
    instance_misses = [ua for ua in instances if classify(ua).device != "bot"]
    print(f"crawler-user-agents bots  : {share(len(instances) - len(instance_misses), len(instances))} of its instances caught")

    sample = [r["user_agent_string"] for r in uas + oses + devices]
    random.seed(1)
    mix = [random.choice(sample[:2000]) for _ in range(200_000)]
    memo = pixeld.Memo()
    started = time.perf_counter()
    for ua in mix:
        memo(classify, ua)
    elapsed = time.perf_counter() - started
    print(f"speed (200,000 UAs, 2,000 distinct, cached): {len(mix) / elapsed:,.0f} UAs/s")
    distinct = sorted(set(sample + instances))
    started = time.perf_counter()
    for ua in distinct:
        classify(ua)
    print(f"speed (uncached, {len(distinct):,} distinct): {len(distinct) / (time.perf_counter() - started):,.0f} UAs/s")

    if show:
        for ua, want, got in browser_misses:
            print(f"BROWSER want {want}: got {got}  {ua}")
        for ua, want, got in os_misses:
            print(f"OS want {want}: got {got}  {ua}")
        for ua in spider_misses:
            print(f"CRAWLER missed: {ua}")
        for ua, want in mainstream_bots:
            print(f"BOT? {want}: {ua}")
        for ua in people_bots:
            print(f"BOT? person: {ua}")
        for ua in instance_misses:
            print(f"CRAWLER-USER-AGENTS missed: {ua}")


if __name__ == "__main__":
    main()
