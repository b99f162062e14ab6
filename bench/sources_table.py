"""Regenerate pixeld.py's table of referrer sources from Matomo's searchengine-and-social-list.

    python3 bench/sources_table.py DIR            # print the table
    python3 bench/sources_table.py DIR --write    # replace the table between its markers in pixeld.py

DIR holds SearchEngines.yml, Socials.yml and AIAssistants.yml from
https://github.com/matomo-org/searchengine-and-social-list (CC0 1.0; earlier releases Unlicense).
Only facts come over: each source's name and its hosts. Needs PyYAML (bench only; pixeld.py
reads no file at run time). Webmail services, a few social sites and the Android app ids that
the lists lack are added by hand below.
"""

import argparse
import os
import re
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
PIXELD = os.path.join(HERE, "..", "pixeld.py")
BEGIN, END = 'SOURCE_TABLE = """\n', '"""  # end of SOURCE_TABLE\n'

# Products of one company count as that company: a reader of the report wants "Google", not "Google Images".
RENAMES = {
    "Twitter": "X", "reddit": "Reddit", "Brave": "Brave Search", "StartPage": "Startpage", "tumblr": "Tumblr",
    "Vkontakte": "VK", "Mailru": "Mail.ru", "Cốc Cốc": "Coc Coc", "hi5": "Hi5", "gree": "GREE",
}
MERGE_PREFIXES = ("Google ", "Bing ", "Yandex ", "Yahoo! Images", "Yahoo! Directory", "Yahoo! Japan ", "Biglobe ", "auone ", "Seznam ", "Nifty ", "So-net ")
DROP = {"Google%2B", "Crawler", "mozbot", "Facebook", "MySpace", "FriendFeed", "Digg", "ChatGPT", "Perplexity", "You", "Google syndicated search"}
HAND = """
Gmail|email|mail.google.com inbox.google.com com.google.android.gm
Outlook.com|email|outlook.live.com outlook.office.com outlook.office365.com mail.live.com com.microsoft.office.outlook
Yahoo! Mail|email|mail.yahoo.com mail.yahoo.co.jp com.yahoo.mobile.client.android.mail
Proton Mail|email|mail.proton.me mail.protonmail.com ch.protonmail.android
iCloud Mail|email|icloud.com
Fastmail|email|app.fastmail.com fastmail.com com.fastmail.app
Zoho Mail|email|mail.zoho.com mail.zoho.eu
GMX|email|gmx.net gmx.de gmx.com gmx.at gmx.ch navigator.gmx.net
Yandex Mail|email|mail.yandex.ru mail.yandex.com ru.yandex.mail
Mail.ru Mail|email|e.mail.ru touch.mail.ru ru.mail.mailapp
Facebook|social|facebook.com fb.com fb.me m.facebook.com l.facebook.com lm.facebook.com com.facebook.katana com.facebook.lite
Messenger|social|messenger.com com.facebook.orca
Hacker News|social|news.ycombinator.com hckrnws.com
Lobsters|social|lobste.rs
Slack|social|slack.com app.slack.com com.slack
WhatsApp|social|whatsapp.com web.whatsapp.com wa.me com.whatsapp
Threads|social|threads.net threads.com com.instagram.barcelona
Instagram|social|instagram.com l.instagram.com com.instagram.android
X|social|t.co x.com twitter.com mobile.twitter.com com.twitter.android
Reddit|social|reddit.com redd.it com.reddit.frontpage
LinkedIn|social|linkedin.com lnkd.in com.linkedin.android
YouTube|social|youtube.com youtu.be m.youtube.com com.google.android.youtube
Telegram|social|t.me web.telegram.org telegram.org org.telegram.messenger
Discord|social|discord.com discord.gg discordapp.com com.discord
Bluesky|social|bsky.app xyz.blueskyweb.app
Pinterest|social|pinterest.{} pin.it com.pinterest
Lemmy|social|lemmy.world lemmy.ml
Substack|social|substack.com
Medium|social|medium.com
Google|search|com.google.android.googlequicksearchbox com.google.android.apps.searchlite
Bing|search|com.microsoft.bing
DuckDuckGo|search|com.duckduckgo.mobile.android
ChatGPT|ai|chatgpt.com chat.openai.com com.openai.chatgpt
Perplexity|ai|perplexity.ai ai.perplexity.android
You.com|ai|you.com
"""
CHANNELS = {"SearchEngines.yml": "search", "Socials.yml": "social", "AIAssistants.yml": "ai"}


def name_of(name: str) -> str:
    for prefix in MERGE_PREFIXES:
        if name.startswith(prefix):
            return "Yahoo! Japan" if prefix == "Yahoo! Japan " else "Yahoo!" if prefix.startswith("Yahoo!") else prefix.strip()
    return RENAMES.get(name, name)


def host_of(url: str) -> str:
    host = url.strip().lower()
    return host[4:] if host.startswith("www.") else host


def keep_search_host(name: str, host: str) -> bool:
    """Matomo lists portals that merely show an engine's results (``cnn.com`` for Google). By host
    alone those would make every link from them a search: keep a bare domain only when it bears
    the engine's name; keep search subdomains (``search.avg.com``)."""
    if "/" in host:
        return False
    if host.count(".") > 1 or "{}" in host:
        return True
    word = re.sub(r"[^a-z0-9]", "", name.lower().split()[0])
    return word[:5] in host.replace(".", "")


def read(directory: str):
    sources = {}
    for file, channel in CHANNELS.items():
        with open(os.path.join(directory, file), encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
        for raw_name, entries in data.items():
            if raw_name in DROP:
                continue
            name = name_of(str(raw_name))
            hosts = []
            for entry in entries:
                urls = entry.get("urls", []) if isinstance(entry, dict) else [entry]
                hosts += [host_of(u) for u in urls if u and (channel != "search" or keep_search_host(name, host_of(u)))]
            hosts = [h for h in hosts if "/" not in h and h]
            if hosts:
                known = sources.setdefault(name, [channel, []])
                known[1] += [h for h in dict.fromkeys(hosts) if h not in known[1]]
    for line in HAND.strip().splitlines():
        name, channel, hosts = line.split("|")
        known = sources.setdefault(name, [channel, []])
        known[0] = channel
        known[1] += [h for h in hosts.split() if h not in known[1]]
    claimed = {}
    for name in sorted(sources, key=str.lower):
        channel, hosts = sources[name]
        sources[name][1] = [h for h in hosts if claimed.setdefault(h, name) == name]  # a host belongs to one source
    return sources


def table(sources) -> str:
    return "".join(f"{name}|{channel}|{' '.join(hosts)}\n" for name, (channel, hosts) in sorted(sources.items(), key=lambda item: item[0].lower()) if hosts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory")
    parser.add_argument("--write", action="store_true", help="replace the table in pixeld.py")
    args = parser.parse_args()
    text = table(read(args.directory))
    if not args.write:
        sys.stdout.write(text)
        return
    with open(PIXELD, encoding="utf-8") as handle:
        source = handle.read()
    start, end = source.index(BEGIN) + len(BEGIN), source.index(END)
    with open(PIXELD, "w", encoding="utf-8") as handle:
        handle.write(source[:start] + text + source[end:])
    print(f"{len(text.splitlines())} sources written to pixeld.py", file=sys.stderr)


if __name__ == "__main__":
    main()
