"""Regenerate pixeld.py's table of referrer sources from Matomo's searchengine-and-social-list.

    python3 bench/sources_table.py DIR            # print the table
    python3 bench/sources_table.py DIR --write    # replace the table between its markers in pixeld.py

DIR holds SearchEngines.yml, Socials.yml and AIAssistants.yml from
https://github.com/matomo-org/searchengine-and-social-list (CC0 1.0; earlier releases Unlicense).
Only facts come over: each source's name and its hosts. Needs PyYAML (bench only; pixeld.py
reads no file at run time). Webmail services, chat, a few social sites and the Android app ids
that the lists lack are added by hand below, from the providers' own host names; so are the
engines only Matomo's older releases carry (the Yahoo! portal, web.gougou.com) and bare domains
the search filter below drops (ya.ru, so.com). Snowplow's referers.yml (GPL v3) confirmed some
webmail hosts; nothing is generated from it. "mail.yahoo.{}" is a name on any country domain;
"orange.fr/webmail" a host and the first segment of its path.
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
Outlook.com|email|outlook.live.com outlook.office.com outlook.office365.com outlook.cloud.microsoft outlook.com mail.live.com com.microsoft.office.outlook
Yahoo! Mail|email|mail.yahoo.com mail.yahoo.{} com.yahoo.mobile.client.android.mail
AOL Mail|email|mail.aol.com mail.aol.{} com.aol.mobile.aolapp
Proton Mail|email|mail.proton.me mail.protonmail.com ch.protonmail.android
iCloud Mail|email|icloud.com
Fastmail|email|app.fastmail.com fastmail.com com.fastmail.app
Zoho Mail|email|mail.zoho.com mail.zoho.{}
GMX|email|gmx.net gmx.de gmx.com gmx.at gmx.ch gmx.{} deref-gmx.{} navigator.gmx.net
mail.com|email|mail.com deref-mail.com
Web.de Mail|email|web.de deref-web.de
1&1 Mail|email|email.1und1.de deref-1und1.de deref-1und1-02.de
IONOS Mail|email|email.ionos.{} mailbusiness.ionos.{}
T-Online Mail|email|email.t-online.de
Orange Mail|email|messagerie.orange.fr wmail.orange.fr mail01.orange.fr mail02.orange.fr messageriepro3.orange.fr orange.fr/webmail
Bluewin Mail|email|email.bluewin.ch rich-v01.bluewin.ch rich-v02.bluewin.ch
TIM Mail|email|webmail.tim.it
UPC Mail|email|upcmail.hispeed.ch
Vodafone Mail|email|mail.vodafone.de webmail.vodafone.co.nz
Infomaniak Mail|email|mail.infomaniak.com
Freenet Mail|email|webmail.freenet.de
Seznam Mail|email|email.seznam.cz
QQ Mail|email|mail.qq.com exmail.qq.com
126 Mail|email|mail.126.com
163 Mail|email|mail.163.com
Naver Mail|email|mail.naver.com
Daum Mail|email|mail.daum.net mail2.daum.net
Yandex Mail|email|mail.yandex.ru mail.yandex.com mail.yandex.{} ru.yandex.mail
Mail.ru Mail|email|e.mail.ru touch.mail.ru ru.mail.mailapp
Rambler Mail|email|mail.rambler.ru
Ukr.net Mail|email|mail.ukr.net
BigPond|email|webmail.bigpond.com webmail2.bigpond.com basic.messaging.bigpond.com email.telstra.com
iiNet Mail|email|webmail.iinet.net.au mail.iinet.net.au
Optus Mail|email|webmail.optusnet.com.au webmail.optuszoo.com.au
Microsoft Teams|social|teams.microsoft.com teams.live.com teams.cloud.microsoft com.microsoft.teams
Skype|social|web.skype.com
Odnoklassniki|social|ok.ru odnoklassniki.ru
Quora|social|quora.com
Disqus|social|disqus.com disq.us
Pocket|social|getpocket.com
Tildes|social|tildes.net
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
Yandex|search|ya.ru
AOL|search|aolsearch.com search.aol.{}
Yahoo!|search|yahoo.com yahoo.{} espanol.yahoo.com qc.yahoo.com
Yahoo! Japan|search|yahoo.co.jp
Baidu|search|web.gougou.com
360search|search|so.com
Orange|search|search.orange.co.uk
Bing|search|com.microsoft.bing
DuckDuckGo|search|com.duckduckgo.mobile.android
ChatGPT|ai|chatgpt.com chat.openai.com com.openai.chatgpt
Perplexity|ai|perplexity.ai ai.perplexity.android
You.com|ai|you.com
Poe|ai|poe.com
Character.AI|ai|character.ai
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
