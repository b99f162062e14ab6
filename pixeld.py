#!/usr/bin/env python3
"""pixeld: privacy-first web analytics in one file.

A pixel endpoint stores page views without cookies or anything that identifies a person;
``/report`` reads them back as plain text or JSON. Standard library only (Python 3.9+);
``geoip2`` is used for countries when installed and configured.

The file reads in the order data flows, one banner per section: configuration; the data model
(the dimension registry with each value's cleaner, page views, metrics, the report's row
kinds); request parsing and normalisation; the user-agent reducer; hits (one pipeline for live
requests and imports); other trackers' hits (GoatCounter's, Plausible's and Umami's, turned into
pixel hits); privacy (salts, visitor keys, visits, goals); storage (schema and migrations,
batched inserts and counts); the writer; queries; report parameters and rendering;
export and import; the snippet; the WSGI app; the server; the service (start-up, signals,
sd_notify, watchdog); the digest and alerts (the e-mail, its sending, the hourly
comparison); the command line.
"""

import argparse
import array
import atexit
import base64
import bisect
import collections
import concurrent.futures
import contextlib
import csv
import dataclasses
import datetime as dt
import email.message
import email.policy
import email.utils
import errno
import functools
import gc
import gzip
import hashlib
import heapq
import hmac
import html
import io
import ipaddress
import itertools
import json
import marshal
import math
import multiprocessing
import operator
import os
import pickle
import queue
import re
import resource
import secrets
import select
import selectors
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
import unicodedata
import zipfile
import zlib
import zoneinfo
from collections import Counter, deque
from functools import lru_cache
from typing import IO, Any, Callable, Deque, Dict, FrozenSet, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Set, Tuple, Union
from urllib.parse import SplitResult, parse_qsl, quote, unquote, urlencode, urlsplit
from urllib.parse import clear_cache as clear_url_cache  # undocumented, in every Python 3
from wsgiref.handlers import BaseHandler, format_date_time

__version__ = "0.1.0"

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


###############################################################################
# Configuration ###############################################################
###############################################################################

DAY = 86_400
DEFAULT_LISTEN = "127.0.0.1:8000"
DEFAULT_DB = "pixeld.db"
DEFAULT_HIT_PATH = "/pixel.gif"
LOOPBACK_NETWORKS: Tuple[IPNetwork, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)


# Other tools' script addresses, served pixeld's tracker: Plausible's, combined too (/js/script.hash.outbound-links.js), and Umami's old one
TRACKER_SCRIPT = re.compile(r"/js/(script|plausible)(\.[a-z-]{1,20}){0,8}\.js|/umami\.js")


# Referrer spam: domains that fake visits to advertise themselves. Subdomains match too.
SPAM_DOMAINS = frozenset(
    """
    semalt.com buttons-for-website.com buttons-for-your-website.com darodar.com ilovevitaly.com
    ilovevitaly.ru priceg.com hulfingtonpost.com best-seo-offer.com best-seo-solution.com
    4webmasters.org blackhatworth.com free-social-buttons.com get-free-traffic-now.com
    social-buttons.com simple-share-buttons.com trafficmonetize.org webmonetizer.net
    floating-share-buttons.com free-share-buttons.com event-tracking.com o-o-6-o-o.com
    o-o-8-o-o.com humanorightswatch.org sharebutton.net success-seo.com videos-for-your-business.com
    site-auditor.online traffic2cash.xyz rank-checker.online seo-platform.com uptime.com.ua
    googlsucks.com 100dollars-seo.com kambasoft.com savetubevideo.com screentoolkit.com
    """.split()
)


class ConfigError(Exception):
    """A setting that stops startup: reported as one line on stderr, exit status 2."""


class Goal(NamedTuple):
    """What an operator counts as an outcome: an event by its name, or a page by its path (a trailing
    ``*`` matches a prefix)."""

    name: str
    kind: str  # event or path
    pattern: str

    def reached_by_path(self, path: str) -> bool:
        if self.kind != "path":
            return False
        return path.startswith(self.pattern[:-1]) if self.pattern.endswith("*") else path == self.pattern

    def reached_by_event(self, name: str) -> bool:
        return self.kind == "event" and name == self.pattern


MAX_GOALS = 31  # a visitor's goals of the day are bits of one 32-bit number, beside the bit "converted"


FINAL_AFTER = 25 * 3600  # a page view no longer changes this long after its second (serve --final-after): a day and the 30 minutes after midnight
NODE_NAME = re.compile(r"[a-z0-9](?:[a-z0-9._-]{0,62})")


@dataclasses.dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8000
    db_path: str = DEFAULT_DB
    geoip_path: str = ""
    token: str = ""
    trusted_proxies: Tuple[IPNetwork, ...] = LOOPBACK_NETWORKS
    sites: Tuple[str, ...] = ()
    spam_domains: FrozenSet[str] = SPAM_DOMAINS
    ignore_networks: Tuple[IPNetwork, ...] = ()
    rate_limit: int = 60
    zone: dt.tzinfo = dt.timezone.utc
    keep_days: int = 0
    request_timeout: float = 10.0
    queue_limit: int = 100_000
    flush_interval: float = 1.0
    hit_path: str = DEFAULT_HIT_PATH  # served as well as /pixel.gif (a neutral name that content blockers do not match)
    public_report: bool = False  # anyone may read /report (never /export)
    public_counters: bool = False  # anyone may read one path's views at /counter/PATH.json and .svg
    honour_gpc: bool = False  # a hit with Sec-GPC: 1 is an objection: filtered, not stored
    goals: Tuple[Goal, ...] = ()
    site_ids: Tuple[Tuple[str, str], ...] = ()  # Umami website ids and the sites they name
    workers: int = 0  # acceptor processes beside the one that owns the visitors and the writer; 0: one process does all
    node: str = ""  # stamps the feed's rows (serve --node): which pixeld of several collected them
    final_after: int = FINAL_AFTER  # seconds after which a stored page view no longer changes (FINAL_AFTER)


def parse_listen(value: str) -> Tuple[str, int]:
    """Parse ``HOST:PORT`` or ``[IPV6]:PORT`` into a host and a port."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]]*):(\d{1,5})", value.strip())
    if not match:
        raise ConfigError(f"cannot parse listen address {value!r}: use HOST:PORT or [IPV6]:PORT")
    host = match.group(1) or match.group(3) or "0.0.0.0"
    port = int(match.group(2) or match.group(4))
    if port > 65535:
        raise ConfigError(f"listen port {port} is out of range 0-65535")
    return host, port


def parse_networks(values: Iterable[str], what: str) -> Tuple[IPNetwork, ...]:
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise ConfigError(f"cannot parse {what} {value!r}: use an address or CIDR") from None
    return tuple(networks)


def parse_domain(value: str, what: str) -> str:
    """A domain from the command line or a list file: lower case, ``www.`` dropped."""
    domain = value.strip().lower().rstrip(".")
    domain = domain[4:] if domain.startswith("www.") else domain
    if not re.fullmatch(r"[a-z0-9_]([a-z0-9_.-]{0,251}[a-z0-9_])?", domain):
        raise ConfigError(f"cannot parse {what} {value!r}: use a hostname like example.org")
    return domain


def parse_count(value: Any, what: str) -> int:
    try:
        count = int(value)
    except ValueError:
        raise ConfigError(f"cannot parse {what} {value!r}: use a whole number") from None
    if count < 0:
        raise ConfigError(f"{what} must not be negative")
    return count


def parse_node(value: Any) -> str:
    """A node's name: lower-case letters, digits, dots, dashes and underscores, at most 63; empty for none."""
    name = str(value).strip()
    if name and not NODE_NAME.fullmatch(name):
        raise ConfigError(f"node name {name[:80]!r} is not one: use up to 63 lower-case letters, digits, dots, dashes or underscores")
    return name


def default_node() -> str:
    """This machine's host name, as a node's name when it makes one (else none)."""
    name = socket.gethostname().lower()
    return name if NODE_NAME.fullmatch(name) else ""


def parse_final_after(value: Any) -> int:
    seconds = parse_count(value, "--final-after")
    if not 1 <= seconds <= 30 * DAY:
        raise ConfigError("--final-after must be between 1 second and 30 days")
    return seconds


def parse_seconds(value: Any, what: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigError(f"cannot parse {what} {value!r}: use seconds, like 10") from None
    if not 0.1 <= seconds <= 3600:
        raise ConfigError(f"{what} must be between 0.1 and 3600 seconds")
    return seconds


def parse_goals(values: Iterable[str]) -> Tuple[Goal, ...]:
    """``NAME=event:signup`` or ``NAME=path:/thanks*``, each once by name."""
    goals: Dict[str, Goal] = {}
    for value in values:
        name, _, definition = value.partition("=")
        kind, _, pattern = definition.partition(":")
        name, pattern = " ".join(name.split()), pattern.strip()
        if not name or len(name) > 64 or "\t" in name or kind not in ("event", "path") or not pattern or (kind == "path" and not pattern.startswith("/")):
            raise ConfigError(f"cannot parse goal {value[:80]!r}: use NAME=event:signup or NAME=path:/thanks*")
        if name in goals:
            raise ConfigError(f"goal {name!r} is defined twice")
        goals[name] = Goal(name, kind, pattern)
    if len(goals) > MAX_GOALS:
        raise ConfigError(f"{len(goals)} goals: pixeld counts at most {MAX_GOALS}")
    return tuple(goals.values())


def parse_site_ids(values: Iterable[str]) -> Tuple[Tuple[str, str], ...]:
    """``UUID=example.org``: the site that an Umami website id names."""
    pairs: Dict[str, str] = {}
    for value in values:
        website, equals, site = value.partition("=")
        website = website.strip().lower()
        if not equals or not re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", website):
            raise ConfigError(f"cannot parse site id {value[:80]!r}: use UUID=example.org, with the website id from Umami's tracking code")
        pairs[website] = parse_domain(site, "site of a site id")
    return tuple(pairs.items())


def parse_hit_path(value: str) -> str:
    """Another path for the hit endpoint, like ``/hit``: one or more plain segments."""
    taken = ("/report", "/export", "/healthz", "/metrics", "/whoami", "/count", "/api/event", "/api/send", "/script.js")
    if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", value) or value in taken or TRACKER_SCRIPT.fullmatch(value):
        raise ConfigError(f"cannot use hit path {value[:60]!r}: use a plain path like /hit that no other endpoint uses")
    return value


def read_spam_list(path: str) -> FrozenSet[str]:
    """One domain per line; blank lines and ``#`` comments are skipped."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = [line.split("#", 1)[0].strip() for line in handle]
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read spam list {path}: {error_reason(error)}") from None
    return frozenset(parse_domain(line, f"domain in {path}") for line in lines if line)


def read_token_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            token = handle.read().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read token file {path}: {error_reason(error)}") from None
    if not token:
        raise ConfigError(f"token file {path} is empty")
    return token


def open_geoip(path: str) -> Callable[[str], Any]:
    """Open a GeoLite2/DB-IP country (or city) ``.mmdb`` with ``geoip2``, the one optional import,
    and return its lookup (``country`` or ``city``, chosen once here, not per hit)."""
    try:
        import geoip2.database
    except ImportError:
        raise ConfigError("--geoip needs the geoip2 package: pip install geoip2") from None
    try:
        reader = geoip2.database.Reader(path)
    except (OSError, ValueError, RuntimeError) as error:
        raise ConfigError(f"cannot open GeoIP database {path}: {error_reason(error)}") from None
    kind = reader.metadata().database_type
    if "City" in kind:
        return reader.city
    if "Country" in kind:
        return reader.country
    raise ConfigError(f"GeoIP database {path} is not a country or city database")


def load_zone(name: str) -> dt.tzinfo:
    """A time zone by its IANA name (``Europe/Berlin``), from the standard library's zoneinfo."""
    if name.upper() == "UTC":
        return dt.timezone.utc
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        raise ConfigError(f"unknown time zone {name[:60]!r}: use a name like Europe/Berlin or UTC") from None


def error_reason(error: BaseException) -> str:
    """The human part of an exception, without the errno prefix or a traceback."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


###############################################################################
# Data model: page views, the dimension registry, metrics #####################
###############################################################################

MAX_PATH = 2048
MAX_TITLE = 512
MAX_REFERRER = 1024
MAX_HOST = 253
MAX_SCREEN = 100_000
MAX_PARAM = 8192
MAX_EVENT = 200  # room for "download:/a/path/file.pdf"
MAX_CAMPAIGN = 100
MAX_PROPS = 10  # event properties an event keeps at most
MAX_PROP_NAME = 64
MAX_PROP_VALUE = 200
NOT_FOUND_EVENT = "404"  # the event a site's 404 page sends (pixeld('404'), and Plausible's): the Not found section reads it
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2028\u2029\u2066-\u2069\ufeff]+")  # and bidi overrides
_HOSTNAME = re.compile(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?|\[[0-9a-f:.]+\]")
_LANGUAGE = re.compile(r"[a-z]{2,3}")
_SCREEN = re.compile(r"\s*(\d{1,6})\s*(?:[,xX]\s*(\d{1,6})\s*)?")
DEVICES = ("desktop", "phone", "tablet", "bot", "other")
CLICK_IDS = (  # advertising and mailing click ids: each names one click, and so one person; never stored, wherever they come
    "gclid", "gclsrc", "gbraid", "wbraid", "dclid", "gad_source", "fbclid", "msclkid", "twclid", "ttclid", "li_fat_id", "yclid", "ysclid", "mc_eid", "mc_cid",
    "_hsenc", "_hsmi", "igshid", "epik", "rdt_cid", "s_kwcid", "ef_id", "irclickid", "obclid", "sccid", "_kx", "vero_id", "oly_enc_id", "oly_anon_id",
    "wickedid", "srsltid", "scid", "qclid", "cvid", "mkt_tok",
)
_CLICK_ID = re.compile(r"[?&;]?\b(?:" + "|".join(CLICK_IDS) + r")=[^&;#\s]*", re.IGNORECASE)

# How each stored value is made safe. The hit pipeline calls these through the App's ``Memo``
# (never through a cache of their own): what a visitor sent must not outlive the salt.


def clean_text(value: str, limit: int) -> str:
    """Drop control characters, fold runs of white space, cut to ``limit`` characters, and drop
    click ids (``gclid=...``), which every stored text goes through."""
    if value.isascii() and value.isprintable():
        value = " ".join(value.split())[:limit]
    else:
        value = " ".join(_CONTROL.sub(" ", value).split())
        value = "".join(ch for ch in value if unicodedata.category(ch) not in ("Cs", "Co", "Cn"))[:limit]
    return _CLICK_ID.sub("", value).strip() if "=" in value else value


def normalise_path(value: str) -> str:
    """The URL path only: no scheme, host, query or fragment; percent-decoded once; at most 2,048 characters."""
    if "://" in value[:16]:
        value = url_path(value)
    value = value.split("#", 1)[0].split("?", 1)[0]
    value = clean_text(unquote(value, errors="replace"), MAX_PATH)
    if not value.startswith("/"):
        value = "/" + value
    return value[:MAX_PATH]


def normalise_title(value: str) -> str:
    return clean_text(value, MAX_TITLE)


def normalise_host(value: str) -> str:
    """A lower-case hostname with the port and a leading ``www.`` dropped; empty when invalid."""
    host = value.strip().lower().rstrip(".")
    if host.startswith("["):
        host = host.split("]", 1)[0] + "]"
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host.startswith("www."):
        host = host[4:]
    if len(host) > MAX_HOST or not _HOSTNAME.fullmatch(host):
        return ""
    return host


def split_url(url: str) -> Optional[SplitResult]:
    """``urlsplit``, or None for the malformed URLs it rejects (bad IPv6 hosts and ports)."""
    try:
        parts = urlsplit(url)
        parts.port
    except ValueError:
        return None
    return parts


def url_host(url: str) -> str:
    """The normalised host of an absolute URL, or empty."""
    parts = split_url(url)
    return normalise_host(parts.netloc.rsplit("@", 1)[-1]) if parts else ""


def url_path(url: str) -> str:
    parts = split_url(url)
    return parts.path if parts else ""


def normalise_screen(value: str) -> str:
    """``W,H`` (or ``WxH``) as ``"WxH"`` with both in 1..100,000; a width alone (``W``, as GoatCounter
    keeps screens) as ``"W"``; empty when unknown."""
    match = _SCREEN.fullmatch(value)
    if not match:
        return ""
    width, height = int(match.group(1)), int(match.group(2) or -1)
    if not (0 < width <= MAX_SCREEN and (0 < height <= MAX_SCREEN or match.group(2) is None)):
        return ""
    return f"{width}x{height}" if match.group(2) else str(width)


def clean_campaign_part(value: str) -> str:
    """A campaign's content or term (``utm_content``, ``utm_term``), lower-cased as its source, medium and name are."""
    return clean_text(value, MAX_CAMPAIGN).lower()


def clean_campaign(value: str) -> str:
    """A stored ``source / medium / campaign`` string, from an import."""
    parts = [clean_text(part, MAX_CAMPAIGN).lower() for part in value.split(" / ")[:3]]
    return " / ".join(parts + [""] * (3 - len(parts))) if any(parts) else ""


def clean_country(value: str) -> str:
    value = value.upper()
    return value if len(value) == 2 and value.isalpha() and value.isascii() else ""


def clean_version(value: str) -> str:
    return value if value.isdigit() and len(value) <= 6 else ""


def clean_language(value: str) -> str:
    return value if _LANGUAGE.fullmatch(value) else ""


def clean_label(value: str) -> str:
    return clean_text(value, 32)


def clean_device(value: str) -> str:
    return value if value in DEVICES and value != "bot" else ""


def clean_event(value: str) -> str:
    return clean_text(value, MAX_EVENT)


def clean_goal_names(value: str) -> str:
    """The goals a page view reached first (names joined by tabs, as stored), from an import."""
    return "\t".join(sorted({name for name in (" ".join(part.split())[:64] for part in value.split("\t")[:MAX_GOALS]) if name}))


Properties = Tuple[Tuple[str, str], ...]  # an event's properties: (name, value) pairs, sorted by name
_EMAIL = re.compile(r"[^\s@]+@[^\s@]+\.[^\s@]+")
_PHONE_NUMBER = re.compile(r"\+?[\d\s().\-/]+")
_DIGIT_RUN = re.compile(r"\d(?:[ -]?\d){8,}")  # nine digits or more, perhaps grouped: a card, an account, an IBAN's digits
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def looks_personal(value: str) -> bool:
    """Whether a property value looks like an e-mail address, a phone number (seven digits or more, in
    nothing but digits, spaces and punctuation) or a long run of digits: such a value is never stored."""
    if _EMAIL.search(value) or _DIGIT_RUN.search(value):
        return True
    return bool(_PHONE_NUMBER.fullmatch(value)) and sum(ch.isdigit() for ch in value) >= 7 and not _ISO_DATE.fullmatch(value.strip())


def clean_properties(pairs: Iterable[Tuple[str, str]]) -> Tuple[Properties, int]:
    """The properties an event keeps, and how many values were dropped as personal. Names up to 64
    characters and values up to 200, cleaned as any visitor text; empty ones are skipped; the first
    name wins; at most 10, in the order sent, then sorted by name."""
    kept: Dict[str, str] = {}
    dropped = 0
    for raw_name, raw_value in pairs:
        name, value = clean_text(raw_name, MAX_PROP_NAME), clean_text(raw_value, MAX_PROP_VALUE)
        if not name or not value or name in kept:
            continue
        if looks_personal(value):
            dropped += 1
        elif len(kept) < MAX_PROPS:
            kept[name] = value
    return tuple(sorted(kept.items())), dropped


def properties_text(props: Properties) -> str:
    """The stored (and exported) form of properties: ``name=value`` pairs, percent-encoded, joined by ``&``."""
    return urlencode(props, quote_via=quote)


def read_properties(text: str) -> Tuple[Properties, int]:
    """Properties from their stored or exported form (``format=pdf&lang=en``), cleaned again."""
    try:
        return clean_properties(parse_qsl(text, max_num_fields=4 * MAX_PROPS) if text else ())
    except ValueError:  # more fields than any event keeps
        return (), 0


class Metrics(NamedTuple):
    """The numbers counted for every dimension value, per day and month; also a report's headline,
    with the ratios derived from them."""

    views: int = 0
    visitors: int = 0  # daily unique visitors, summed over the days
    visits: int = 0
    bounces: int = 0  # visits with one page view
    duration: int = 0  # seconds from first page view to last page view or engagement, summed over visits
    engaged: int = 0  # seconds the page was visible, summed over page views
    engaged_views: int = 0  # page views that reported engagement
    scroll: int = 0  # each such page view's deepest scroll, in percent, summed
    exits: int = 0  # page views that were the last of their visit
    converted: int = 0  # visitors who reached a goal, daily, summed (counted on the page view or event that reached the first)

    @property
    def pages_per_visit(self) -> float:
        return round(self.views / self.visits, 2) if self.visits else 0.0

    @property
    def bounce_rate(self) -> float:
        return percent(self.bounces, self.visits)

    @property
    def visit_duration(self) -> int:
        return round(self.duration / self.visits) if self.visits else 0

    @property
    def time_on_page(self) -> Optional[float]:
        """Average engaged seconds over the page views that reported engagement (not over every page
        view: a page view without JavaScript, or never shown, says nothing about reading); None
        when none did, which is unknown, not zero."""
        return round(self.engaged / self.engaged_views, 1) if self.engaged_views else None

    @property
    def scroll_depth(self) -> Optional[float]:
        """Average deepest scroll, in percent, over the page views that reported engagement; None when none did."""
        return round(self.scroll / self.engaged_views, 1) if self.engaged_views else None

    @property
    def conversion_rate(self) -> float:
        return percent(self.converted, self.visitors)

    def headline(self, goals: bool = False) -> Dict[str, Optional[float]]:
        """The headline numbers, by their JSON names; the conversion rate when there are goals."""
        numbers = {
            "visitors": self.visitors, "visits": self.visits, "pageviews": self.views, "pages_per_visit": self.pages_per_visit,
            "bounce_rate": self.bounce_rate, "visit_duration": self.visit_duration, "time_on_page": self.time_on_page, "scroll_depth": self.scroll_depth,
        }
        return {**numbers, "conversion_rate": self.conversion_rate} if goals else numbers


def percent(count: int, total: int) -> float:
    return round(100.0 * count / total, 1) if total else 0.0


def _named_metrics(cls: type) -> type:
    """Give a list that holds the metrics in ``Metrics`` order a read-write property per metric."""
    for index, name in enumerate(Metrics._fields):
        setattr(cls, name, property(operator.itemgetter(index), functools.partial(_set_item, index)))
    return cls


def _set_item(index: int, items: List[int], value: int) -> None:
    items[index] = value


NO_METRICS = (0,) * len(Metrics._fields)


@_named_metrics
class Totals(list):
    """Running sums of the metrics while counting, read and written by name (``totals.views += 1``).
    A list underneath, in ``Metrics`` order, because SQL rows and sums come in that order."""

    __slots__ = ()

    def __init__(self, metrics: Iterable[int] = NO_METRICS) -> None:
        """Zeros, or a copy of metrics in ``Metrics`` order (numbers, not NULLs) to start from."""
        super().__init__(metrics)

    def add(self, metrics: Sequence[int], sign: int = 1) -> None:
        """Add (or take away) a row of metrics in ``Metrics`` order, as SQL selects them."""
        for index, amount in enumerate(metrics):
            self[index] += sign * (amount or 0)

    def grow(self, name: str, amount: int) -> None:
        self[METRIC_INDEX[name]] += amount

    def frozen(self) -> Metrics:
        return Metrics._make(self)


METRIC_INDEX = {name: index for index, name in enumerate(Metrics._fields)}


def format_duration(seconds: int) -> str:
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


NOT_REPORTED = "–"  # a time on page or scroll depth where no page view reported engagement: unknown, not 0s and 0%


def format_time_on_page(seconds: Optional[float]) -> str:
    return NOT_REPORTED if seconds is None else format_duration(round(seconds))


def format_scroll_depth(depth: Optional[float]) -> str:
    return NOT_REPORTED if depth is None else f"{depth:.0f}%"


# The kinds of report section, one row type each: what a row shows, which metrics it needs, and how
# it reads as JSON, CSV and table cells. ``count`` ranks the rows and sizes their bars.


class ViewsRow(NamedTuple):
    """A value's page views and their share of all page views."""

    value: str
    count: int
    percent: float

    METRICS = ("views",)
    SHOWN_BY = "views"  # a value is a row when it has some of this
    COLUMNS = (("Views", 10), ("%", 8))  # header and width in text
    OTHERS = False  # whether a row names the other parts of its value (a source's channel)

    @classmethod
    def make(cls, value: str, sums: Metrics, totals: Metrics, others: Dict[str, str]) -> "ViewsRow":
        return cls(value, sums.views, percent(sums.views, totals.views))

    def cells(self) -> Tuple[str, ...]:
        return (f"{self.count:,}", f"{self.percent:.1f}%")

    def json(self) -> Dict[str, Any]:
        return {"value": self.value, "count": self.count, "percent": self.percent}

    def csv(self, section: str) -> List[List[Any]]:
        return [[section, self.value, self.count, self.percent]]


class VisitorsRow(NamedTuple):
    """Page views, their share and the visitors, and the other parts of the value (a source's channel)."""

    value: str
    count: int
    percent: float
    visitors: int
    others: Tuple[Tuple[str, str], ...] = ()

    METRICS = ("views", "visitors")
    SHOWN_BY = "views"  # a value is a row when it has some of this
    COLUMNS = ViewsRow.COLUMNS + (("Visitors", 10),)
    OTHERS = True

    @classmethod
    def make(cls, value: str, sums: Metrics, totals: Metrics, others: Dict[str, str]) -> "VisitorsRow":
        return cls(value, sums.views, percent(sums.views, totals.views), sums.visitors, tuple(others.items()))

    def cells(self) -> Tuple[str, ...]:
        return (f"{self.count:,}", f"{self.percent:.1f}%", f"{self.visitors:,}")

    def json(self) -> Dict[str, Any]:
        return {"value": self.value, "count": self.count, "percent": self.percent, "visitors": self.visitors, **dict(self.others)}

    def csv(self, section: str) -> List[List[Any]]:
        details = [("visitors", self.visitors), *self.others]
        return [[section, self.value, self.count, self.percent], *([f"{section}_{key}", self.value, extra, ""] for key, extra in details)]


class EngagementRow(NamedTuple):
    """Page views, their share, and how they were read: time on page and scroll depth."""

    value: str
    count: int
    percent: float
    time_on_page: Optional[float]  # None (JSON null, an empty CSV cell, "–" in text and HTML): no page view reported engagement
    scroll_depth: Optional[float]

    METRICS = ("views", "engaged", "engaged_views", "scroll")
    SHOWN_BY = "views"  # a value is a row when it has some of this
    COLUMNS = ViewsRow.COLUMNS + (("Time", 9), ("Scroll", 8))
    OTHERS = False

    @classmethod
    def make(cls, value: str, sums: Metrics, totals: Metrics, others: Dict[str, str]) -> "EngagementRow":
        return cls(value, sums.views, percent(sums.views, totals.views), sums.time_on_page, sums.scroll_depth)

    def cells(self) -> Tuple[str, ...]:
        return (f"{self.count:,}", f"{self.percent:.1f}%", format_time_on_page(self.time_on_page), format_scroll_depth(self.scroll_depth))

    def json(self) -> Dict[str, Any]:
        return {"value": self.value, "count": self.count, "percent": self.percent, "time_on_page": self.time_on_page, "scroll_depth": self.scroll_depth}

    def csv(self, section: str) -> List[List[Any]]:
        return [[section, self.value, self.count, self.percent], [f"{section}_time_on_page", self.value, self.time_on_page, ""],
                [f"{section}_scroll_depth", self.value, self.scroll_depth, ""]]


class EntryRow(NamedTuple):
    """The visits that began on a page, their share of all visits, and how many of them bounced."""

    value: str
    count: int
    percent: float
    bounces: int

    METRICS = ("visits", "bounces")
    SHOWN_BY = "visits"  # a value is a row when it has some of this
    COLUMNS = (("Visits", 10), ("Bounce rate", 12))
    OTHERS = False

    @classmethod
    def make(cls, value: str, sums: Metrics, totals: Metrics, others: Dict[str, str]) -> "EntryRow":
        return cls(value, sums.visits, percent(sums.visits, totals.visits), sums.bounces)

    @property
    def bounce_rate(self) -> float:
        return percent(self.bounces, self.count)

    def cells(self) -> Tuple[str, ...]:
        return (f"{self.count:,}", f"{self.bounce_rate:.1f}%")

    def json(self) -> Dict[str, Any]:
        return {"value": self.value, "visits": self.count, "bounce_rate": self.bounce_rate}

    def csv(self, section: str) -> List[List[Any]]:
        return [["entry_pages", self.value, self.count, self.percent], ["entry_bounces", self.value, self.bounces, self.bounce_rate]]


class EventRow(NamedTuple):
    """How often an event was sent, and by how many visitors."""

    value: str
    count: int
    visitors: int

    METRICS = ("views", "visitors")
    SHOWN_BY = "views"  # a value is a row when it has some of this
    COLUMNS = (("Count", 10), ("Visitors", 10))
    OTHERS = False

    @classmethod
    def make(cls, value: str, sums: Metrics, totals: Metrics, others: Dict[str, str]) -> "EventRow":
        return cls(value, sums.views, sums.visitors)

    def cells(self) -> Tuple[str, ...]:
        return (f"{self.count:,}", f"{self.visitors:,}")

    def json(self) -> Dict[str, Any]:
        return {"value": self.value, "count": self.count, "visitors": self.visitors}

    def csv(self, section: str) -> List[List[Any]]:
        return [["events", self.value, self.count, ""], ["event_visitors", self.value, self.visitors, ""]]


class AcquisitionRow(NamedTuple):
    """Where visits came from: the visitors (daily uniques, summed), their visits and page views, and
    the other parts of the value (a source's channel). Ranked by visitors, as the peers rank them."""

    value: str
    count: int  # visitors
    percent: float  # of all visitors
    visits: int
    pageviews: int
    others: Tuple[Tuple[str, str], ...] = ()

    METRICS = ("views", "visitors", "visits")
    SHOWN_BY = "views"  # a value is a row when it has some of this
    COLUMNS = (("Visitors", 10), ("%", 8), ("Visits", 9), ("Views", 9))
    OTHERS = True

    @classmethod
    def make(cls, value: str, sums: Metrics, totals: Metrics, others: Dict[str, str]) -> "AcquisitionRow":
        return cls(value, sums.visitors, percent(sums.visitors, totals.visitors), sums.visits, sums.views, tuple(others.items()))

    def cells(self) -> Tuple[str, ...]:
        return (f"{self.count:,}", f"{self.percent:.1f}%", f"{self.visits:,}", f"{self.pageviews:,}")

    def json(self) -> Dict[str, Any]:
        return {"value": self.value, "visitors": self.count, "percent": self.percent, "visits": self.visits, "count": self.pageviews, **dict(self.others)}

    def csv(self, section: str) -> List[List[Any]]:
        details = [("visits", self.visits), ("pageviews", self.pageviews), *self.others]
        return [[section, self.value, self.count, self.percent], *([f"{section}_{key}", self.value, extra, ""] for key, extra in details)]


class ExitRow(NamedTuple):
    """The visits that ended on a page, and their share of that page's views (its exit rate)."""

    value: str
    count: int  # exits
    exit_rate: float

    METRICS = ("views", "exits")
    SHOWN_BY = "exits"  # a value is a row when it has some of this
    COLUMNS = (("Exits", 10), ("Rate", 8))
    OTHERS = False

    @classmethod
    def make(cls, value: str, sums: Metrics, totals: Metrics, others: Dict[str, str]) -> "ExitRow":
        return cls(value, sums.exits, percent(sums.exits, sums.views))

    def cells(self) -> Tuple[str, ...]:
        return (f"{self.count:,}", f"{self.exit_rate:.1f}%")

    def json(self) -> Dict[str, Any]:
        return {"value": self.value, "count": self.count, "exit_rate": self.exit_rate}

    def csv(self, section: str) -> List[List[Any]]:
        return [[section, self.value, self.count, self.exit_rate]]


class GoalRow(NamedTuple):
    """A goal: the visitors who reached it (daily uniques, summed), how often it was reached, and the
    visitors who reached it as a share of all visitors."""

    value: str
    count: int  # visitors who converted
    completions: int
    conversion_rate: float

    METRICS = ("views",)  # the report counts its rows from the pages, events and goals it has counted (``_goal_rows``)
    SHOWN_BY = "views"  # a value is a row when it has some of this
    COLUMNS = (("Visitors", 10), ("Count", 10), ("Rate", 8))
    OTHERS = False

    def cells(self) -> Tuple[str, ...]:
        return (f"{self.count:,}", f"{self.completions:,}", f"{self.conversion_rate:.1f}%")

    def json(self) -> Dict[str, Any]:
        return {"value": self.value, "visitors": self.count, "count": self.completions, "conversion_rate": self.conversion_rate}

    def csv(self, section: str) -> List[List[Any]]:
        return [[section, self.value, self.count, self.conversion_rate], [f"{section}_completions", self.value, self.completions, ""]]


class PropertyRow(NamedTuple):
    """One value of one event property: how often the event carried it, and by how many visitors."""

    value: str  # as shown: "format: pdf"
    count: int
    visitors: int
    property: str
    property_value: str

    METRICS = ()  # read from raw event rows, not from counted metrics
    COLUMNS = EventRow.COLUMNS
    OTHERS = False

    @classmethod
    def of(cls, name: str, value: str, count: int, visitors: int) -> "PropertyRow":
        return cls(f"{name}: {value}", count, visitors, name, value)

    def cells(self) -> Tuple[str, ...]:
        return (f"{self.count:,}", f"{self.visitors:,}")

    def json(self) -> Dict[str, Any]:
        return {"property": self.property, "value": self.property_value, "count": self.count, "visitors": self.visitors}

    def csv(self, section: str) -> List[List[Any]]:
        """The fourth column names the property."""
        return [[section, self.property_value, self.count, self.property], [f"{section}_visitors", self.property_value, self.visitors, self.property]]


class NotFoundRow(NamedTuple):
    """A missing page readers asked for, how often, and the sources that sent them there, most first."""

    value: str
    count: int
    sources: Tuple[Tuple[str, int], ...]  # (referrer as shown, count)

    METRICS = ()
    COLUMNS = (("Count", 8), ("Top source", 34))
    OTHERS = False

    def cells(self) -> Tuple[str, ...]:
        top = f"{self.sources[0][0]} ({self.sources[0][1]:,})" if self.sources else ""
        more = f" +{len(self.sources) - 1}" if len(self.sources) > 1 else ""
        return (f"{self.count:,}", cut(top, 32 - len(more)) + more)

    def json(self) -> Dict[str, Any]:
        return {"value": self.value, "count": self.count, "sources": [{"value": source, "count": count} for source, count in self.sources]}

    def csv(self, section: str) -> List[List[Any]]:
        """One line for the path, then one per source: the fourth column names the source."""
        return [[section, self.value, self.count, ""], *([f"{section}_source", self.value, count, source] for source, count in self.sources)]


def cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


Row = Union[ViewsRow, VisitorsRow, EngagementRow, EntryRow, EventRow, AcquisitionRow, ExitRow, GoalRow, PropertyRow, NotFoundRow]


def text_columns(kind: type, rows: Sequence[Row]) -> Tuple[Tuple[str, int], ...]:
    """The columns a text report shows for a section's rows: time and scroll only when some page
    reported engagement, since 80 columns leave no room to spare."""
    if kind is EngagementRow and all(row.time_on_page is None for row in rows):  # type: ignore[union-attr]
        return ViewsRow.COLUMNS
    return kind.COLUMNS  # type: ignore[attr-defined, no-any-return]


class Section(NamedTuple):
    """A report section fed by a dimension, and the report parameter that filters on it."""

    name: str  # the section's key in JSON and CSV, and its ``section=`` value
    title: str
    empty: str = "(none)"  # how the empty value is shown (and the filter value that matches it)
    filter: str = ""  # the query parameter that filters on it
    match: str = "exact"  # exact, prefix (a trailing * matches a prefix), upper or lower (exact, case folded), agent
    part: str = ""  # for a dimension of several fields: the one the section shows and the filter matches
    row: type = ViewsRow  # the section's kind: what its rows show
    nothing: str = "(no page views)"  # what an empty section says
    lists_empty: bool = True  # whether the empty value is a row (page views without a campaign are not)
    computed: bool = False  # its rows come from other sections' counts (goals), not from its dimension's
    link: str = ""  # the filter a row's link adds when the section has none of its own (entry pages link to their path)
    needs: str = ""  # the filter without which the section is not shown (properties belong to one event)


class Field(NamedTuple):
    """A value a page view carries, and how an imported (or pixel-sent) value of it is made safe."""

    name: str  # the PageView field, and its column in exports
    clean: Optional[Callable[[str], str]] = None  # None: derived by the hit pipeline (the referrer, a source from its referrer)
    param: str = ""  # the pixel's query parameter that carries it as it is
    default: str = ""  # its value when nothing says otherwise
    by_visitor: bool = False  # the in-memory visitors set it (see Privacy), not the hit: a dry run cannot know it


class Dimension(NamedTuple):
    """Something stored with every page view and counted per day: the one place that says so.

    ``PageView``, the schema's columns, the writer's keys and counts, the filtered report's keys,
    filters, report sections and labels, the dry run, and export and import fields all derive
    from ``DIMENSIONS``. Adding one is an entry here and a migration (``add_text_dimension``)."""

    name: str
    code: int  # persisted in daily.dim and monthly.dim: never change or reuse one; 0 means stored, not counted
    column: str  # its column in pageviews and events (a string id; the agent's is an agent id)
    fields: Tuple[Field, ...]  # the PageView fields it holds, which are also its export fields
    sections: Tuple[Section, ...] = ()
    in_events: bool = True  # whether events carry it too
    visitors: str = "first_today"  # SQL on a raw row: does it count a visitor for its value (a visitor's first of the day, or first from a source)
    per_visit: bool = False  # a visit's first page view sets it for the whole visit (where the visit came from)


VISIT_FIRSTS = ("sources", "referrers", "campaigns")  # the dimensions that count their own visitors: a bit each in a row's ``firsts``


ALL_VISIT_FIRSTS = (1 << len(VISIT_FIRSTS)) - 1  # a visitor's first page view of the day is the first of its source, referrer and campaign too


DIMENSIONS: Tuple[Dimension, ...] = (
    Dimension("pages", 1, "path", (Field("path", normalise_path, "path"),), (
        Section("pages", "Pages", filter="path", match="prefix", row=EngagementRow), Section("entry_pages", "Entry pages", row=EntryRow, link="path"),
        Section("exit_pages", "Exit pages", row=ExitRow, link="path"),
    )),
    Dimension("titles", 0, "title", (Field("title", normalise_title, "title"),), in_events=False),
    Dimension("sources", 9, "source", (Field("channel", default="direct"), Field("source")), (
        Section("sources", "Sources", "(direct)", "source", part="source", row=AcquisitionRow),
        Section("channels", "Channels", filter="channel", part="channel", row=AcquisitionRow),
    ), visitors="(firsts & 1)", per_visit=True),
    Dimension("referrers", 2, "referrer", (Field("referrer"),), (
        Section("referrers", "Referrers", "(direct)", "referrer", "prefix", row=AcquisitionRow),
    ), visitors="(firsts >> 1 & 1)", per_visit=True),
    Dimension("campaigns", 7, "campaign", (Field("campaign", clean_campaign),), (
        Section("campaigns", "Campaigns", filter="campaign", row=AcquisitionRow, nothing="(no campaigns)", lists_empty=False),
    ), visitors="(firsts >> 2 & 1)", per_visit=True),
    Dimension("campaign_details", 11, "campaign_detail", (
        Field("campaign_content", clean_campaign_part, "utm_content"), Field("campaign_term", clean_campaign_part, "utm_term"),
    ), (
        Section("campaign_content", "Campaign content", filter="content", part="campaign_content", nothing="(no campaign content)", lists_empty=False),
        Section("campaign_terms", "Campaign terms", filter="term", part="campaign_term", nothing="(no campaign terms)", lists_empty=False),
    ), per_visit=True),
    Dimension("countries", 3, "country", (Field("country", clean_country),), (Section("countries", "Countries", "(unknown)", "country", "upper"),)),
    Dimension("agents", 4, "agent", (Field("browser", clean_label), Field("version", clean_version), Field("os", clean_label), Field("device", clean_device)), (
        Section("browsers", "Browsers", "(unknown)", "browser", "agent", "browser"),
        Section("operating_systems", "Operating systems", "(unknown)", "os", "agent", "os"),
        Section("devices", "Devices", "(unknown)", "device", "agent", "device"),
    )),
    Dimension("screens", 5, "screen", (Field("screen", normalise_screen, "resolution"),), (Section("screens", "Screen sizes", "(unknown)", "screen"),)),
    Dimension("languages", 6, "language", (Field("language", clean_language),), (Section("languages", "Languages", "(unknown)", "language", "lower"),)),
    Dimension("hostnames", 10, "hostname", (Field("hostname", normalise_host),), (  # the page's own host; its site may be a --site it belongs to
        Section("hostnames", "Hostnames", "(no host)", "hostname", "lower", row=VisitorsRow),
    )),
    Dimension("goals", 12, "goals", (Field("goals", clean_goal_names, by_visitor=True),), (Section("goals", "Goals", row=GoalRow, nothing="(no goals reached)", computed=True),), in_events=False),
)
EVENT_NAMES = Dimension("events", 8, "name", (Field("event", clean_event),), (  # the events table only
    Section("events", "Events", filter="event", row=EventRow, nothing="(no events)"),
))
EVENT_DETAILS = (  # sections read from raw event rows, not counted per value
    Section("properties", "Properties", row=PropertyRow, nothing="(no properties)", needs="event"),
    Section("not_found", "Not found", "(direct)", link="path", row=NotFoundRow, nothing="(no pages not found)"),
)
AGENT_FIELDS = next(tuple(field.name for field in dim.fields) for dim in DIMENSIONS if dim.column == "agent")  # the agents table's columns
FIELD_SEPARATOR = "\t"  # a text dimension of several fields stores them in one string: "search\tGoogle"
COUNTED = tuple(dim for dim in DIMENSIONS if dim.code)
EVENT_DIMENSIONS = tuple(dim for dim in DIMENSIONS if dim.in_events)
DIMENSION_NAMED = {dim.name: dim for dim in DIMENSIONS + (EVENT_NAMES,)}
COUNTED_SECTIONS: Dict[str, Tuple[Dimension, Section]] = {section.name: (dim, section) for dim in DIMENSIONS + (EVENT_NAMES,) for section in dim.sections}
SECTIONS = {**COUNTED_SECTIONS, **{section.name: (EVENT_NAMES, section) for section in EVENT_DETAILS}}  # every section, in report order
FILTERS: Dict[str, Tuple[Dimension, Section]] = {section.filter: (dim, section) for dim, section in SECTIONS.values() if section.filter}
VIEW_FIELDS = tuple(field for dim in DIMENSIONS for field in dim.fields)
FIELD_CLEANERS: Dict[str, Callable[[str], str]] = {field.name: field.clean for field in VIEW_FIELDS if field.clean}  # an imported value's cleaner
PARAM_FIELDS = tuple(field for field in VIEW_FIELDS if field.param)  # the fields a pixel request sends as they are
RAW_NEEDS = {  # the metrics each dimension's sections need, in Metrics order
    dim.name: tuple(name for name in Metrics._fields if any(name in section.row.METRICS for section in dim.sections)) for dim in DIMENSIONS + (EVENT_NAMES,)
}


VISITOR_FLAGS = ("first_today", "firsts", "converted")  # what the in-memory visitors say of a page view (see Privacy)


class PageView(collections.namedtuple(
    "PageView", ("time", "site", *(field.name for field in VIEW_FIELDS), *VISITOR_FLAGS), defaults=(*(field.default for field in VIEW_FIELDS), False, 0, 0),
)):
    """One page view, normalised: exactly what is stored, and nothing else. Its fields come from
    ``DIMENSIONS``; then what the visitors in memory say of it: ``first_today``, the visitor's first page
    view of this UTC day; ``firsts``, a bit per ``VISIT_FIRSTS`` dimension whose value this visitor
    brings for the first time today; ``converted``, the first goal the visitor reached today."""

    __slots__ = ()

    def counted(self, first_today: bool, firsts: int = 0, converted: int = 0) -> "PageView":
        """This page view with what the visitors say of it (on the hot path: faster than ``_replace``)."""
        return PageView._make(self[: -len(VISITOR_FLAGS)] + (first_today, firsts, converted))


class Event(NamedTuple):
    """A custom event (``pixeld('event', 'signup', {plan: 'pro'})``), with the page view context it
    happened in. ``view.first_today`` means: the visitor's first event of this name today; bit ``i``
    of ``props_first``: the visitor's first event of this name with property ``i`` at this value today."""

    name: str
    view: PageView
    props: Properties = ()
    props_first: int = 0


class FilteredHit(NamedTuple):
    """Hits that are not page views, tallied per day and reason."""

    time: int
    site: str
    reason: str
    count: int = 1


###############################################################################
# Request parsing and normalisation ###########################################
###############################################################################

PREFETCH_HEADERS = {"HTTP_SEC_PURPOSE": "prefetch", "HTTP_PURPOSE": "prefetch", "HTTP_X_MOZ": "prefetch", "HTTP_X_PURPOSE": "preview"}


class Memo:
    """Bounded in-memory caches for the normalisers that see raw client input (addresses, full
    User-Agents, referrer URLs): ``memo(function, *args)``. The App owns one and empties it when
    the visitor salt rotates, so no raw input outlives the salt; nothing here is written anywhere."""

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self._tables: Dict[Callable[..., Any], Dict[Tuple[Any, ...], Any]] = {}

    def __call__(self, function: Callable[..., Any], *args: Any) -> Any:
        table = self._tables.get(function)
        if table is None:
            table = self._tables[function] = {}
        try:
            return table[args]
        except KeyError:
            pass
        if len(table) >= self.limit:
            table.clear()
        value = table[args] = function(*args)
        return value

    def cleaned(self, cleaners: Sequence[Tuple[str, Callable[[str], Any]]], get: Callable[[str], Any]) -> Dict[str, Any]:
        """``{name: self(clean, text)}`` for many fields at once, where ``get(name)`` gives a field's value
        (None, text, or what ``str`` makes text): an import's hot loop, where a call per field costs
        more than reading the cache."""
        tables, fields = self._tables, {}
        for name, clean in cleaners:
            value = get(name)
            if value.__class__ is not str:
                value = "" if value is None else str(value)
            table = tables.get(clean)
            found = None if table is None else table.get((value,))
            fields[name] = self(clean, value) if found is None else found
        return fields

    def size(self) -> int:
        return sum(len(table) for table in self._tables.values())

    def holds(self, text: str) -> bool:
        """Whether any argument or value held contains ``text``: the proof that a secret is gone."""
        return any(text in repr(entry) for table in self._tables.values() for entry in table.items())

    def clear(self) -> None:
        """Forget everything, and the standard library's cache of recently split URLs too (referrers)."""
        self._tables.clear()
        clear_url_cache()


def parse_query(query_string: str, memo: Optional["Memo"] = None) -> Dict[str, str]:
    """Decode a query string leniently: the first value of each of at most 64 keys, invalid UTF-8 replaced.
    With the App's memo, repeated encoded values (paths, titles, referrers) are decoded once."""
    params: Dict[str, str] = {}
    for pair in query_string[: 4 * MAX_PARAM].split("&", 64)[:64]:
        key, _, value = pair.partition("=")
        if key:
            value = memo(decode_component, value) if memo is not None and "%" in value else decode_component(value)
            params.setdefault(decode_component(key), value[:MAX_PARAM])
    return params


def decode_component(text: str) -> str:
    if "+" in text:
        text = text.replace("+", " ")
    return unquote(text, errors="replace") if "%" in text else text


def normalise_referrer(value: str, site: str) -> str:
    """Host and path of the referring page, ``www.`` folded; empty when direct or internal."""
    parts = split_url(value.strip())
    if parts is None:
        return ""
    host = normalise_host(parts.netloc.rsplit("@", 1)[-1])
    if not host or host == site:
        return ""
    path = clean_text(unquote(parts.path, errors="replace"), MAX_REFERRER)
    return (host + path.rstrip("/"))[:MAX_REFERRER]


def primary_language(accept_language: str) -> str:
    """The primary subtag of the most preferred language in ``Accept-Language``: ``de`` for ``de-AT,de;q=0.9``."""
    best, best_q = "", 0.0
    for item in accept_language[:512].split(","):
        tag, _, params = item.strip().partition(";")
        quality = 1.0
        match = re.fullmatch(r"\s*q\s*=\s*([01](?:\.\d{0,3})?)\s*", params) if params else None
        if params and not match:
            continue
        if match:
            quality = float(match.group(1))
        subtag = tag.split("-", 1)[0].strip().lower()
        if quality > best_q and _LANGUAGE.fullmatch(subtag):
            best, best_q = subtag, quality
    return best


def parse_ip(value: str) -> Optional[IPAddress]:
    """An IP address from a header or peer value (brackets, ports and IPv4-mapped IPv6 allowed), else None."""
    try:  # the common case, a plain dotted quad, without ipaddress's slower string parsing
        return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, value))
    except (OSError, ValueError):
        pass
    value = value.strip().strip('"')
    if value.startswith("["):
        value = value[1:].split("]", 1)[0]
    elif value.count(":") == 1:
        value = value.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(value.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def forwarded_chain(x_forwarded_for: str, forwarded: str) -> List[str]:
    """The proxy chain, client first: ``X-Forwarded-For`` if present, else the ``for=`` of ``Forwarded``."""
    if x_forwarded_for.strip():
        return [part for part in x_forwarded_for.split(",")]
    chain = []
    for element in forwarded.split(","):
        for pair in element.split(";"):
            name, _, value = pair.partition("=")
            if name.strip().lower() == "for":
                chain.append(value)
    return chain


def client_address(peer: str, x_forwarded_for: str, forwarded: str, trusted: Sequence[IPNetwork]) -> Optional[IPAddress]:
    """The visitor's address: the peer, unless the peer is a trusted proxy.

    Behind trusted proxies the chain is walked right to left, skipping trusted hops; the first
    untrusted address is the client. Garbage in the chain falls back to the peer, so a client
    cannot smuggle an address past the proxy that appended the real one.
    """
    peer_ip = parse_ip(peer)
    if peer_ip is None or not is_in(peer_ip, trusted):
        return peer_ip
    hops = forwarded_chain(x_forwarded_for[:4096], forwarded[:4096])
    for hop in reversed(hops):
        address = parse_ip(hop)
        if address is None:
            return peer_ip
        if not is_in(address, trusted):
            return address
    return parse_ip(hops[0]) if hops else peer_ip


def is_in(address: IPAddress, networks: Sequence[IPNetwork]) -> bool:
    for net in networks:
        if address.version == net.version and address in net:
            return True
    return False


CAMPAIGN_PARAMS = ("utm_source", "utm_medium", "utm_campaign", "utm_content", "utm_term", "ref", "source")  # what a page's address passes on


def campaign_of(params: Dict[str, str]) -> Tuple[str, str]:
    """``source / medium / campaign`` from ``utm_*`` (``ref`` or ``source`` for the source), and the source alone."""
    source = clean_text(params.get("utm_source") or params.get("ref") or params.get("source") or "", MAX_CAMPAIGN).lower()
    parts = [source] + [clean_text(params.get(name, ""), MAX_CAMPAIGN).lower() for name in ("utm_medium", "utm_campaign")]
    return (" / ".join(parts) if any(parts) else ""), source


_NAMED_REFERRER = re.compile(r"([^/]{1,64}) \((search|social|email|ai|referral)\)")  # never a host and path: a name has no "/"


def named_referrer(value: str) -> str:
    """A referrer that names its source and channel instead of a page, as an import found it:
    ``Email (email)`` for GoatCounter's mailers grouped as one; empty for any other value."""
    match = _NAMED_REFERRER.fullmatch(value.strip())
    return f"{clean_text(match.group(1), MAX_CAMPAIGN)} ({match.group(2)})" if match and clean_text(match.group(1), MAX_CAMPAIGN) else ""


def campaign_referrer(campaign: str) -> str:
    """A campaign's source stands in the referrer's place: ``newsletter (campaign)``."""
    source = campaign.split(" / ", 1)[0]
    return f"{source} (campaign)" if source else ""


# Referrer sources: "name|channel|hosts". Generated by bench/sources_table.py from Matomo's
# searchengine-and-social-list (SearchEngines.yml, Socials.yml, AIAssistants.yml; CC0 1.0, earlier
# releases Unlicense): names and hosts only. Webmail services, chat and Android app ids are added by hand.
# "google.{}" stands for every country domain (google.de, google.co.uk), "mail.yahoo.{}" too
# (mail.yahoo.fr); "orange.fr/webmail" is a host and the first segment of its path; subdomains match their host.
SOURCE_TABLE = """
1&1 Mail|email|email.1und1.de deref-1und1.de deref-1und1-02.de
1.cz|search|1.cz
118 700|search|118700.se foretag.118700.se webben.118700.se
123people|search|123people.com 123people.{}
126 Mail|email|mail.126.com
163 Mail|email|mail.163.com
360search|search|so.360.cn m.so.com so.com
Abacho|search|abacho.de abacho.com abacho.co.uk se.abacho.com tr.abacho.com abacho.at abacho.fr abacho.es abacho.ch abacho.it
ABCsøk|search|verden.abcsok.no
Acoon|search|acoon.de
Aguea|search|chercherfr.aguea.com
Alexa|search|alexa.com search.toolbars.alexa.com
Alice Adsl|search|rechercher.aliceadsl.fr
All.by|search|all.by
Allaverksamheter|search|allaverksamheter.se
Allesklar|search|allesklar.de allesklar.at allesklar.ch
AllTheInternet|search|alltheinternet.com
AllTheWeb|search|alltheweb.com
AlohaFind|search|alohafind.com
AltaVista|search|altavista.com search.altavista.com listings.altavista.com altavista.de altavista.fr {}.altavista.com be-nl.altavista.com be-fr.altavista.com
AOL|search|search.aol.com search.aol.it aolsearch.aol.com aolrecherche.aol.fr aolrecherches.aol.fr aolimages.aol.fr aim.search.aol.com recherche.aol.fr find.web.aol.com recherche.aol.ca aolsearch.aol.co.uk search.aol.co.uk sucheaol.aol.de suche.aol.de o2suche.aol.de suche.aolsvc.de aolbusqueda.aol.com.mx alicesuche.aol.de alicesuchet.aol.de suchet2.aol.de search.hp.my.aol.com.au search.hp.my.aol.de search.hp.my.aol.it search-intl.netscape.com de.aolsearch.com aolsearch.com search.aol.{}
AOL Mail|email|mail.aol.com mail.aol.{} com.aol.mobile.aolapp
Apollo7|search|apollo7.de
Aport|search|sm.aport.ru
Arama|search|arama.com
Arcor|search|arcor.de
Arianna|search|arianna.libero.it arianna.com
Ask|search|ask.com web.ask.com int.ask.com mws.ask.com images.ask.com images.{}.ask.com ask.reference.com askkids.com iwon.ask.com ask.co.uk {}.ask.com {}.qbyrd.com www1.search-results.com int.search-results.com {}.search-results.com search.ask.com {}.search.ask.com avira-int.ask.com search.tb.ask.com nortonsafe.search.ask.com avira.search.ask.com int.search.tb.ask.com
Atlas|search|searchatlas.centrum.cz
auone|search|search.auone.jp sp-search.auone.jp sp-web.search.auone.jp sp-image.search.auone.jp
Austronaut|search|www2.austronaut.at www1.austronaut.at
Avira SafeSearch|search|search.avira.com search.avira.net safesearch.avira.com
Babylon|search|search.babylon.com searchassist.babylon.com
Badoo|social|badoo.com
Baidu|search|baidu.com www1.baidu.com m.baidu.com baidu.co.th zhidao.baidu.com tieba.baidu.com news.baidu.com web.gougou.com
Baidu AI|ai|yiyan.baidu.com ai.baidu.com
Bebo|social|bebo.com
Biglobe|search|cgi.search.biglobe.ne.jp images.search.biglobe.ne.jp
BigPond|email|webmail.bigpond.com webmail2.bigpond.com basic.messaging.bigpond.com email.telstra.com
bilibili|social|bilibili.com
Bing|search|bing.com {}.bing.com global.bing.com msnbc.msn.com dizionario.it.msn.com enciclopedia.it.msn.com cc.bingj.com com.microsoft.bing
BlackPlanet|social|blackplanet.com
blekko|search|blekko.com
Blogdigger|search|blogdigger.com
Blogpulse|search|blogpulse.com
Bluesky|social|bsky.app skyfeed.app xyz.blueskyweb.app
Bluewin|search|search.bluewin.ch
Bluewin Mail|email|email.bluewin.ch rich-v01.bluewin.ch rich-v02.bluewin.ch
Brave Search|search|search.brave.com
Buzznet|social|buzznet.com
Canoe.ca|search|web.canoe.ca
Centrum|search|search.centrum.cz morfeo.centrum.cz
Character.AI|ai|character.ai
Charter|search|charter.net
Chat+|ai|chatplus.com chat-gpt.org
ChatGLM|ai|chatglm.cn
ChatGPT|ai|chatgpt.com chat.openai.com com.openai.chatgpt
Claro Search|search|claro-search.com
Classmates.com|social|classmates.com
Claude|ai|claude.ai
Clix|search|pesquisa.clix.pt
Coc Coc|search|coccoc.com
Comcast|search|search.comcast.net
Compuserve.com (Enhanced by Google)|search|websearch.cs.com
Conduit.com|search|search.conduit.com images.search.conduit.com
Copilot|ai|copilot.microsoft.com
Cuil|search|cuil.com
Cyworld|social|global.cyworld.com
Daemon search|search|daemon-search.com my.daemon-search.com
DasOertliche|search|dasoertliche.de www2.dasoertliche.de
DasTelefonbuch|search|www1.dastelefonbuch.de
Daum|search|search.daum.net
Daum Mail|email|mail.daum.net mail2.daum.net
Deepseek|ai|chat.deepseek.com
Delfi EE|search|otsing.delfi.ee
Delfi lv|search|smart.delfi.lv
dir.com|search|fr.dir.com
DisconnectSearch|search|search.disconnect.me
Discord|social|discord.com discord.gg discordapp.com com.discord
Disqus|social|disqus.com disq.us
dmoz|search|dmoz.org editors.dmoz.org
Douban|social|douban.com
Douyin|social|douyin.com
Douyu|social|douyu.com
Dribbble|social|dribbble.com
Duck.ai|ai|duck.ai
DuckDuckGo|search|duckduckgo.com r.duckduckgo.com duckduckgogg42xjoc72x3sjasowoarfbgcmvfimaftt6twagswzczad.onion com.duckduckgo.mobile.android
Earthlink|search|search.earthlink.net
Ecosia|search|ecosia.org
El Mundo|search|ariadna.elmundo.es
Eniro|search|eniro.se
Entireweb|search|entireweb.com
eo|search|eo.st
EpicSearch.in|search|epicsearch.in
Eurip|search|eurip.com
Euroseek|search|euroseek.com
Everyclick|search|everyclick.com
Exalead|search|exalead.fr exalead.com
Excite|search|search.excite.it search.excite.fr search.excite.de search.excite.co.uk search.excite.es search.excite.nl msxml.excite.com excite.co.jp
Facebook|social|facebook.com fb.com fb.me m.facebook.com l.facebook.com lm.facebook.com com.facebook.katana com.facebook.lite
Fast Browser Search|search|fastbrowsersearch.com
Fastmail|email|app.fastmail.com fastmail.com com.fastmail.app
Fetlife|social|fetlife.com
Findhurtig|search|findhurtig.dk
Fireball|search|fireball.de fireball.com
Firstsfind|search|firstsfind.com
Fixsuche|search|fixsuche.de
Flickr|social|flickr.com
Flix.de|search|flix.de
Flixster|social|flixster.com
Fooooo|search|search.fooooo.com
Forestle|search|forestle.org {}.forestle.org forestle.mobi
Fotolog|social|fotolog.com
Foursquare|social|foursquare.com
Francite|search|recherche.francite.com
Free|search|search.free.fr search1-2.free.fr search1-1.free.fr
FreeCause|search|search.freecause.com
Freenet|search|suche.freenet.de
Freenet Mail|email|webmail.freenet.de
Freespoke|search|freespoke.com
Friends Reunited|social|friendsreunited.com
Friendster|social|friendster.com
Frontier|search|search.frontier.com
Gaia Online|social|gaiaonline.com
GAIS|search|gais.cs.ccu.edu.tw
Gemini|ai|gemini.google.com bard.google.com
Geni.com|social|geni.com
Genieo|search|search.genieo.com
Geona|search|geona.net
Gibiru|search|gibiru.com
Gigablast|search|gigablast.com
Gigablast (Directory)|search|dir.gigablast.com
GitHub|social|github.com
Gmail|email|mail.google.com inbox.google.com com.google.android.gm
GMX|email|gmx.net gmx.de gmx.com gmx.at gmx.ch gmx.{} deref-gmx.{} navigator.gmx.net
Gnadenmeer|search|gnadenmeer.de
Gomeo|search|gomeo.com
goo|search|search.goo.ne.jp ocnsearch.goo.ne.jp
Google|search|google.com google.{} encrypted.google.com www2.google.com ipv6.google.com go.google.com wwwgoogle.com wwwgoogle.{} gogole.{} gppgle.{} googel.{} search.avg.com isearch.avg.com com.google.android.googlequicksearchbox search.chedot.com search.darkoogle.com search.foxtab.com search.hiyo.com search.incredimail.com search1.incredimail.com search2.incredimail.com search3.incredimail.com search4.incredimail.com search.sweetim.com search.juno.com search.zum.com find.tdc.dk it.luna.tv searchresults.verizon.com search.walla.co.il search.alot.com suche.gmx.net search.gmx.com search.incredibar.com www1.delta-search.com search.1und1.de suche.1und1.de search.zonealarm.com start.lenovo.com {}.wow.com search.leonardo.it optuszoo.com.au search.dolphin-browser.jp netlavis.azione.jp search.nan.so cgi2.nintendo.co.jp search.smt.docomo.ne.jp image.search.smt.docomo.ne.jp searches.safehomepage.com searches.f-secure.com search.f-secure.com webcache.googleusercontent.com search.bt.com search.abv.bg search.xfinity.com blogsearch.google.com blogsearch.google.{} cse.google.com cse.google.{} images.google.com images.google.{} maps.google.com maps.google.{} news.google.com news.google.{} scholar.google.com scholar.google.{} translate.google.com video.google.com com.google.android.apps.searchlite
GoYellow.de|search|goyellow.de
GREE|social|gree.jp
Grok|ai|grok.com
Gule Sider|search|gulesider.no
Haboo|social|habbo.com
Hacker News|social|news.ycombinator.com hckrnws.com
Haosou|search|haosou.com
Hi5|social|hi5.com
HighBeam|search|highbeam.com
Hit-Parade|search|req.hit-parade.com class.hit-parade.com
Holmes|search|holmes.ge
Hooseek|search|hooseek.com
Hotbot|search|hotbot.com
Huya|social|huya.com
Hyves|social|hyves.nl
I-play|search|start.iplay.com
iAsk|ai|iask.ai
Icerocket|search|blogs.icerocket.com
iCloud Mail|email|icloud.com
ICQ|search|icq.com search.icq.com
identi.ca|social|identi.ca
iiNet Mail|email|webmail.iinet.net.au mail.iinet.net.au
Ilse NL|search|ilse.nl
iMesh|search|search.imesh.com
Inbox|search|www2.inbox.com
info.com|search|info.com
Infomaniak Mail|email|mail.infomaniak.com
InfoSpace|search|infospace.com search.kiwee.com searches.vi-view.com search.webssearches.com search.fbdownloader.com searches3.globososo.com wsdsold.infospace.com search.avast.com isearch.babylon.com start.facemoods.com start.funmoods.com search.magentic.com search.searchcompletion.com isearch.glarysoft.com search.chatzum.com home.speedbit.com search.b1.org search.handycafe.com search.v9.com search.iminent.com utorrent.inspsearch.com govome.inspsearch.com
Instagram|social|instagram.com l.instagram.com com.instagram.android
Interia|search|google.interia.pl
IONOS Mail|email|email.ionos.{} mailbusiness.ionos.{}
Isodelen|search|isodelen.se
IxQuick|search|ixquick.com eu.ixquick.com ixquick.de us.ixquick.com s1.us.ixquick.com s2.us.ixquick.com s3.us.ixquick.com s4.us.ixquick.com s5.us.ixquick.com s8-eu.ixquick.com s1-eu.ixquick.de s2-eu4.ixquick.com s5-eu4.ixquick.com
Jasper|ai|app.jasper.ai
Jungle Key|search|junglekey.com junglekey.fr
Jungle Spider|search|jungle-spider.de
Junior Safe Search|search|juniorsafesearch.com
Jyxo|search|jyxo.1188.cz
K9 Safe Search|search|k9safesearch.com
Kagi|search|kagi.com
KARMA|search|karmasearch.org
Kataweb|search|kataweb.it
Kensaq|search|kensaq.com
Kvasir|search|kvasir.no
La Toile Du Québec (Google)|search|web.toile.com
Laban|search|laban.vn
lang-8|social|lang-8.com
Last.fm|social|last.fm lastfm.ru lastfm.de lastfm.es lastfm.fr lastfm.it lastfm.jp lastfm.pl lastfm.com.br lastfm.se lastfm.com.tr
Latne|search|latne.lv
Le Chat|ai|chat.mistral.ai
Lemmy|social|lemmy.world lemmy.ml
Lilo|search|search.lilo.org
LinkedIn|social|linkedin.com lnkd.in linkedin.android com.linkedin.android
LiveJournal|social|livejournal.ru livejournal.com
Lo.st|search|lo.st
Lobsters|social|lobste.rs
Local Moxie|search|localmoxie.com
LookAny|search|lookany.com
Lookseek|search|search.lookseek.com
Looksmart|search|looksmart.com
Lycos|search|search.lycos.com lycos.{}
maailm.com|search|maailm.com
mail.com|email|mail.com deref-mail.com
Mail.ru|search|go.mail.ru
Mail.ru Mail|email|e.mail.ru touch.mail.ru ru.mail.mailapp
Mamma|search|mamma.com mamma75.mamma.com
Mastodon|social|mastodon.social mastodon.cloud mastodon.technology mastodon.xyz mastodon.at mastodon.art mamot.fr pawoo.net mstdn.io mstdn.jp friends.nico ro-mastodon.puyo.jp quey.org botsin.space social.tchncs.de knzk.me mastodont.cat bitcoinhackers.org fosstodon.org chaos.social cybre.space vis.social typo.social front-end.social hachyderm.io mastodon.online newsie.social mstdn.social indieweb.social sfba.social mas.to mstdn.party c.im mastodonapp.uk universeodon.com social.vivaldi.net ohai.social toot.community masto.ai mastodon.scot mastodon.world mastodon.nz graphics.social org.joinmastodon.android mastodon.eus mastodon.jalgi.eus tkm.eus
Medium|social|medium.com
Meinestadt.de|search|meinestadt.de
MeinVZ|social|meinvz.net
Messenger|social|messenger.com com.facebook.orca
Meta AI|ai|meta.ai
Meta.ua|search|meta.ua
MetaCrawler DE|search|s1.metacrawler.de s2.metacrawler.de s3.metacrawler.de
Metager|search|meta.rrzn.uni-hannover.de metager.de
Metager2|search|metager2.de
Microsoft Teams|social|teams.microsoft.com teams.live.com teams.cloud.microsoft com.microsoft.teams
MissEvan|social|missevan.com
Mister Wong|search|mister-wong.com mister-wong.de
Mixi|social|mixi.jp
MoiKrug.ru|social|moikrug.ru
Mojeek|search|mojeek.com
Monstercrawler|search|monstercrawler.com
Multiply|social|multiply.com
my.mail.ru|social|my.mail.ru
MyHeritage|social|myheritage.com
MyLife|social|mylife.ru
MyPrivateSearch|search|myprivatesearch.com
Myspace|social|myspace.com
MyWebSearch|search|ms114.mysearch.com ms146.mysearch.com kf.mysearch.myway.com ki.mysearch.myway.com search.myway.com search.mywebsearch.com
myYearbook|social|myyearbook.com
Najdi.si|search|najdi.si
Nasza-klasa.pl|social|nk.pl
Nate|search|search.nate.com
Naver|search|search.naver.com
Naver Mail|email|mail.naver.com
Needtofind|search|ko.search.need2find.com
Neti|search|neti.ee
Netlog|social|netlog.com
Niconico|social|nicovideo.jp
Nifty|search|search.nifty.com search.azby.fmworld.net videosearch.nifty.com
Nigma|search|nigma.ru
NotebookLM|ai|notebooklm.google.com
OceanHero|search|oceanhero.today
Odnoklassniki|social|odnoklassniki.ru ok.ru
Onet.pl|search|szukaj.onet.pl
Online.no|search|online.no
Optus Mail|email|webmail.optusnet.com.au webmail.optuszoo.com.au
Orange|search|busca.orange.es lemoteur.ke.voila.fr lemoteur.orange.fr search.orange.co.uk
Orange Mail|email|messagerie.orange.fr wmail.orange.fr mail01.orange.fr mail02.orange.fr messageriepro3.orange.fr orange.fr/webmail
Orkut|social|orkut.com
Outlook.com|email|outlook.live.com outlook.office.com outlook.office365.com outlook.cloud.microsoft outlook.com mail.live.com com.microsoft.office.outlook
Ozone|social|qzone.qq.com
Paperball|search|paperball.de
Peepeth|social|peepeth.com
PeopleCheck|search|extern.peoplecheck.de
PeoplePC|search|search.peoplepc.com
Perplexity|ai|perplexity.ai ai.perplexity.android
Picsearch|search|picsearch.com
Pinterest|social|pinterest.com pinterest.ca pinterest.ch pinterest.co.uk pinterest.com.au pinterest.de pinterest.dk pinterest.es pinterest.fr pinterest.ie pinterest.info pinterest.jp pinterest.nz pinterest.pt pinterest.se at.pinterest.com ch.pinterest.com cl.pinterest.com co.pinterest.com dk.pinterest.com es.pinterest.com hu.pinterest.com id.pinterest.com ie.pinterest.com in.pinterest.com it.pinterest.com kr.pinterest.com mx.pinterest.com nl.pinterest.com nz.pinterest.com ph.pinterest.com pt.pinterest.com ru.pinterest.com se.pinterest.com pinterest.{} pin.it com.pinterest
Pixelfed|social|pixelfed.social pixelfed.de pxlmo.com metapixl.com pix.toot.wales pixelfed.uno pixey.org
Plaxo|social|plaxo.com
Plazoo|search|plazoo.com
PlusNetwork|search|plusnetwork.com
Pocket|social|getpocket.com
Poe|ai|poe.com
Poisk.Ru|search|poisk.ru
Presearch|search|presearch.com
PrivacyWall|search|privacywall.org
Proton Mail|email|mail.proton.me mail.protonmail.com ch.protonmail.android
qip.ru|search|search.qip.ru
QQ Mail|email|mail.qq.com exmail.qq.com
Qualigo|search|qualigo.at qualigo.ch qualigo.de qualigo.nl
Quendu|search|quendu.com
Quora|social|quora.com
Qwant|search|qwant.com lite.qwant.com
Qwen|ai|chat.qwen.ai
Rakuten|search|websearch.rakuten.co.jp
Rambler|search|nova.rambler.ru
Rambler Mail|email|mail.rambler.ru
Reddit|social|reddit.com np.reddit.com pay.reddit.com com.reddit.frontpage redd.it
Renren|social|renren.com
Riksdelen|search|riksdelen.se
Road Runner|search|search.rr.com
rpmfind|search|rpmfind.net fr2.rpmfind.net
Sapo|search|pesquisa.sapo.pt
Scour.com|search|scour.com
Search.ch|search|search.ch
Search.com|search|search.com
Searchalot|search|searchalot.com
SearchCanvas|search|searchcanvas.com
SearchLock|search|searchlock.com results.searchlock.com
Searchy|search|searchy.co.uk
SeeSaa|search|search.seesaa.jp
Setooz|search|bg.setooz.com da.setooz.com el.setooz.com fa.setooz.com ur.setooz.com {}.setooz.com
Seznam|search|search.seznam.cz videa.seznam.cz
Seznam Mail|email|email.seznam.cz
Sharelook|search|sharelook.fr
Skynet|search|skynet.be
Skype|social|web.skype.com
Skyrock|social|skyrock.com
Slack|social|slack.com app.slack.com com.slack
sm.cn|search|m.sm.cn so.m.sm.cn m.sp.sm.cn yz.m.sm.cn quark.sm.cn
sm.de|search|sm.de
SmartAddressbar|search|search.smartaddressbar.com
SmartShopping|search|search.smartshopping.com
Snap.do|search|search.snap.do
Snapchat|social|snapchat.com com.snapchat.android
So-net|search|so-net.ne.jp video.so-net.ne.jp
Softonic|search|search.softonic.com
Sogou|search|sogou.com m.sogou.com wap.sogou.com english.sogou.com
Sonico.com|social|sonico.com
Soso|search|soso.com
SoundCloud|social|soundcloud.com gate.sc
Sourceforge|social|sourceforge.net
Sputnik|search|sputnik.ru
StackOverflow|social|stackoverflow.com
Startpage|search|startpage.com classic.startpage.com eu.startpage.com s6-eu5.ixquick.com s2-eu4.startpage.com s6-eu4.startpage.com s7-eu4.startpage.com s1-eu5.startpage.com s2-eu5.startpage.com s4-eu5.startpage.com s5-eu5.startpage.com s6-eu5.startpage.com s7-eu5.startpage.com s8-eu5.startpage.com s10-eu5.startpage.com s11-eu5.startpage.com s12-eu5.startpage.com s13-eu5.startpage.com s14-eu5.startpage.com startpagel6srwcjlue4zgq3zevrujfaow726kjytqbbjyrswwmjzcqd.onion
Startpagina (Google)|search|startgoogle.startpagina.nl
Startsiden|search|startsiden.no
Stract|search|stract.com
StudiVZ|social|studivz.net
StumbleUpon|social|stumbleupon.com
Substack|social|substack.com
Suche.info|search|suche.info
Suchmaschine.com|search|suchmaschine.com
Suchnase|search|suchnase.de
Surf Canyon|search|surfcanyon.com
Swiggle|search|swiggle.org.uk
Swisscows|search|swisscows.com
T-Online|search|suche.t-online.de brisbane.t-online.de navigationshilfe.t-online.de
T-Online Mail|email|email.t-online.de
Tagged|social|login.tagged.com
talimba|search|talimba.com
TalkTalk|search|talktalk.co.uk
Taringa!|social|taringa.net
Tarmot|search|tarmot.com
Technorati|search|technorati.com
Telegram|social|web.telegram.org org.telegram.messenger t.me telegram.org
Teoma|search|teoma.com
Terra|search|buscador.terra.es buscador.terra.cl buscador.terra.com.br
Threads|social|threads.net l.threads.net threads.com l.threads.com com.instagram.barcelona
TikTok|social|tiktok.com
Tildes|social|tildes.net
TIM Mail|email|webmail.tim.it
Tiscali|search|search.tiscali.it search-dyn.tiscali.it hledani.tiscali.cz
Tixuma|search|tixuma.de
Toolbarhome|search|toolbarhome.com vshare.toolbarhome.com
Toppreise.ch|search|toppreise.ch fr.toppreise.ch de.toppreise.ch en.toppreise.ch
Torry|search|torry.io
Trouvez.com|search|trouvez.com
TrovaRapido|search|trovarapido.com
Trusted Search|search|trusted-search.com
Trustnav|search|search.trustnav.com
Tuenti|social|tuenti.com
Tumblr|social|tumblr.com t.umblr.com
TUSK Search|search|tusksearch.com
Twingly|search|twingly.com
Twitcast|social|twitcasting.tv
Ukr.net Mail|email|mail.ukr.net
uol.com.br|search|busca.uol.com.br
UPC Mail|email|upcmail.hispeed.ch
URL.ORGanzier|search|url.org
V2EX|social|v2ex.com
Viadeo|social|viadeo.com
Vimeo|social|vimeo.com
Vinden|search|vinden.nl
Vindex|search|vindex.nl search.vindex.nl
Virgilio|search|ricerca.virgilio.it ricercaimmagini.virgilio.it ricercavideo.virgilio.it ricercanews.virgilio.it mobile.virgilio.it
VK|social|vk.com vkontakte.ru
vkrugudruzei.ru|social|vkrugudruzei.ru
Vodafone Mail|email|mail.vodafone.de webmail.vodafone.co.nz
Voila|search|search.ke.voila.fr
Volny|search|web.volny.cz
Vuhuv|search|vuhuv.com
Walhello|search|walhello.info walhello.com walhello.de walhello.nl
WAYN|social|wayn.com
Web.de|search|suche.web.de m.suche.web.de
Web.de Mail|email|web.de deref-web.de
Web.nl|search|web.nl
weborama|search|weborama.fr
WebSearch|search|websearch.com
WeChat|social|wechat.com mp.weixin.qq.com open.weixin.qq.com channels.weixin.qq.com
Wedoo|search|fr.wedoo.com en.wedoo.com es.wedoo.com
WeeWorld|social|weeworld.com
Weibo|social|weibo.com t.cn
WhatsApp|social|whatsapp.com web.whatsapp.com wa.me com.whatsapp
Winamp|search|search.winamp.com
Windows Live Spaces|social|login.live.com
Wirtualna Polska|search|szukaj.wp.pl
Witch|search|witch.de
Woopie|search|woopie.jp
Workplace|social|workplace.com l.workplace.com lm.workplace.com
Writesonic|ai|app.writesonic.com
www värav|search|search.www.ee
X|social|twitter.com t.co x.com mobile.twitter.com com.twitter.android
Xanga|social|xanga.com
XING|social|xing.com
Yahoo!|search|search.yahoo.com malaysia.search.yahoo.com {}.search.yahoo.com cade.yahoo.com espanol.search.yahoo.com qc.search.yahoo.com one.cn.yahoo.com r.search.yahoo.com search.offerbox.com ys.mirostart.com images.search.yahoo.com {}.images.yahoo.com cade.images.yahoo.com espanol.images.yahoo.com qc.images.yahoo.com yahoo.com yahoo.{} espanol.yahoo.com qc.yahoo.com
Yahoo! Japan|search|search.yahoo.co.jp jp.hao123.com home.kingsoft.jp jwsearch.jword.jp image.search.yahoo.co.jp video.search.yahoo.co.jp yahoo.co.jp
Yahoo! Mail|email|mail.yahoo.com mail.yahoo.{} com.yahoo.mobile.client.android.mail
Yam|search|search.yam.com
Yandex|search|yandex.ru yandex.com yandex.{} clck.yandex.{} m.yandex.{} yabs.yandex.{} images.yandex.ru images.yandex.com images.yandex.{} ya.ru
Yandex Mail|email|mail.yandex.ru mail.yandex.com mail.yandex.{} ru.yandex.mail
Yasni|search|yasni.de yasni.com yasni.co.uk yasni.ch yasni.at
Yatedo|search|yatedo.com yatedo.fr
Yellowmap|search|yellowmap.de
Yep|search|yep.com
Yippy|search|search.yippy.com
Yongzin|search|yongzin.com
You.com|ai|you.com
YouGoo|search|yougoo.fr
YouTube|social|youtube.com youtu.be m.youtube.com com.google.android.youtube
ZapMeta|search|zapmeta.com zapmeta.{} {}.zapmeta.com zapmetasearch.{}
Zhongsou|search|p.zhongsou.com
Zoek|search|www3.zoek.nl
Zoeken|search|zoeken.nl
Zoho Mail|email|mail.zoho.com mail.zoho.{}
Zoohoo|search|zoohoo.cz
Zoznam|search|zoznam.sk
Zxuso|search|zxuso.com
묻지마 검색|search|kwzf.net
"""  # end of SOURCE_TABLE
CHANNELS = ("search", "social", "email", "ai", "referral", "campaign", "direct")
_COUNTRY_DOMAIN = re.compile(r"(?:(?:com|co|net|org|gov|edu|ac|or|ne|go|gob|nic)\.)?[a-z]{2}|com|net|org|info|biz|cat")


def load_sources(table: str) -> Tuple[Dict[str, Tuple[str, str]], Dict[str, Tuple[str, str]]]:
    """The table as two lookups: exact hosts, and the names that take any country domain."""
    exact: Dict[str, Tuple[str, str]] = {}
    country: Dict[str, Tuple[str, str]] = {}
    for line in table.strip().splitlines():
        name, channel, hosts = line.split("|")
        for host in hosts.split():
            host = host[3:] if host.startswith("{}.") else host  # a country subdomain: any subdomain matches anyway
            if host.endswith(".{}"):
                country.setdefault(host[:-3], (name, channel))
            else:
                exact.setdefault(host, (name, channel))
    return exact, country


SOURCE_HOSTS, SOURCE_COUNTRY_HOSTS = load_sources(SOURCE_TABLE)


def classify_source(referrer: str) -> Tuple[str, str]:
    """(source, channel) of a normalised referrer (``host/path``, ``name (campaign)``, or an import's ``name (channel)``).

    A host matches a known source when it is one of its hosts or a subdomain of one
    (``old.reddit.com``), or its name on a country domain (``google.co.uk``, ``mail.yahoo.fr``), or
    a host and the first segment of a path listed as such (``orange.fr/webmail``). Look-alikes such
    as ``google.com.example.net`` are ordinary sites: their source is their host."""
    if not referrer:
        return "", "direct"
    if referrer.endswith(" (campaign)"):
        return referrer[: -len(" (campaign)")], "campaign"
    if referrer.endswith(")") and _NAMED_REFERRER.fullmatch(referrer):
        name, channel = _NAMED_REFERRER.fullmatch(referrer).groups()  # type: ignore[union-attr]
        return name, channel
    host, _, path = referrer.partition("/")
    known = SOURCE_HOSTS.get(host + "/" + path.split("/", 1)[0]) if path else None  # a mailer at a path: orange.fr/webmail
    if known is not None:
        return known
    labels = host.split(".")
    countries = [j for j in (len(labels) - 1, len(labels) - 2) if j > 0 and _COUNTRY_DOMAIN.fullmatch(".".join(labels[j:]))]
    for i in range(len(labels)):
        known = SOURCE_HOSTS.get(".".join(labels[i:]))
        for j in countries:  # the longest name first: mail.yahoo.co.uk is Yahoo! Mail before yahoo.co.uk is Yahoo!
            if known is None and i < j:
                known = SOURCE_COUNTRY_HOSTS.get(".".join(labels[i:j]))
        if known is not None:
            return known
    return host, "referral"


def is_prefetch(environ: Dict[str, Any]) -> bool:
    """Prefetch, prerender and preview requests load the pixel for a page nobody may ever see."""
    return any(word in environ[header].lower() for header, word in PREFETCH_HEADERS.items() if header in environ)


def in_domains(host: str, domains: Union[FrozenSet[str], Tuple[str, ...]]) -> bool:
    """Whether ``host`` is one of ``domains`` or a subdomain of one."""
    parts = host.split(".")
    return any(".".join(parts[i:]) in domains for i in range(len(parts)))


def site_of(host: str, sites: Tuple[str, ...]) -> str:
    """The site a page's host counts under: the most specific ``--site`` it is or belongs to
    (``blog.example.org`` under ``example.org``), else the host itself."""
    parts = host.split(".")
    return next((".".join(parts[i:]) for i in range(len(parts)) if ".".join(parts[i:]) in sites), host)


def lookup_country(lookup: Optional[Callable[[str], Any]], address: Optional[IPAddress]) -> str:
    """ISO country code of an address from the GeoIP lookup, or empty. The address is not kept."""
    if lookup is None or address is None or not address.is_global:
        return ""
    try:
        code = lookup(str(address)).country.iso_code
    except Exception:  # not found, or a database that cannot answer: the country is unknown
        return ""
    return code if isinstance(code, str) and re.fullmatch(r"[A-Z]{2}", code) else ""


###############################################################################
# User-agent reducer ##########################################################
###############################################################################


class UserAgent(NamedTuple):
    browser: str
    version: str
    os: str
    device: str


# Bot markers, matched on the lower-cased UA after an Android device model is cut out (a phone
# called "CUBOT J9" is no bot). Crawlers put "bot" at the end of their product name (Googlebot/2.1,
# AhrefsBot; SemrushBot), a generic word (crawler, spider, fetch, monitor, preview, scan), an info
# URL or an e-mail address in their UA; HTTP libraries and automation name themselves.
_BOT = re.compile(  # every branch starts with a literal, so the engine skips ahead quickly
    r"bot(?:\b|[/_;:-])|robots?\b|crawl|spider|slurp|scrap|archiv|index(?:er|ing)|fetch|preview(?<!developerpreview)|capture|screenshot|"
    r"monitor|headless|phantomjs|selenium|webdriver|puppeteer|playwright|lighthouse|pagespeed|ptst/|"
    r"curl/|wget|python|java/|\(java\)|go-http|okhttp|libwww|http[ _-]?client|http_request|axios|node-fetch|"
    r"undici|aiohttp|httpx|ruby\b|perl\b|php/|facebookexternalhit|facebookcatalog|"
    r"telegrambot|slackbot|slack-imgproxy|discordbot|embedly|skypeuripreview|uptime|pingdom|statuscake|gtmetrix|gomezagent|"
    r"newrelic|datanyze|thumbnail|feedfetcher|feedburner|newsgator|netvibes|rss(?:\b|/|reader)|ahrefs|semrush|mj12|"
    r"petalbot|yandex(?!search|browser)[a-z]*/|baiduspider|daum|yeti/|qwantify|applebot|"
    r"chatgpt|claude|anthropic|ccbot|bytespider|google-|googleagent|mediapartners|adsbot|"
    r"apis-google|googleother|google favicon|googleimageproxy|ia_archiver|wordpress|validator|checker|linkcheck|link sleuth|scan|"
    r"analy[sz]er|verifier|verify|insights|audit|survey|inspector|synthetic|exporter|retriever|resolver|optimi[sz]er|sitemap|research|-user/|"
    r"agent\b|probe\b|proxy\b|"
    r"nutch|heritrix|httrack|zgrab|masscan|nmap|nikto|sqlmap|postman|insomnia|http://|https://|www\.|\.(?:com|net|org)\b(?<=[a-z0-9]\.[a-z]{3})|"
    r"\.(?:io|co)\b(?<=[a-z0-9]\.[a-z]{2})(?<! [a-z]{2}\.co)|"  # a domain name (".NET CLR" is none, nor an app's id in reverse, "jp.co.yahoo.android")
    r"@[a-z0-9-]+\.[a-z]{2}|\[at\]|\(compatible(?:\)|; (?!msie|konqueror)(?![^)]*(?:linux|windows|android|mac os|blackberry|rim\d)))|"
    r"windows nt[;)]|"  # Windows names its version ("Windows NT 10.0")
    r"\(khtml, like gecko(?:[,;] (?!safari/)|\) (?!mobile\b|brave\b)[a-z][\w.-]* (?:chrome|version)/)"  # browsers send "(KHTML, like Gecko)" as
    # it is (old Konqueror adds Safari/) and follow it with products and versions (old Brave: "Brave Chrome/"); tools add a bare name
)
# Matched at the start. A desktop browser's UA starts with Mozilla/5.0 and its platform ("Windows NT 10.0",
# "Macintosh", "X11"; old ones "Windows; U") and names its engine after it.
_BOT_WHOLE = re.compile("|".join((
    r"mozilla/\d\.\d$",  # a bare Mozilla
    r"mozilla/\d\.\d \(compatible(?:; [^;)]*)?\)$",  # or its "compatible" comment alone
    r"[a-z0-9_.-]+/[0-9.]+(?:$| \((?:linux|windows|macintosh|x11)\)$)",  # one product and version alone, or with a desktop OS alone
    r"[a-z0-9_.-]+/[0-9.]+ mozilla/5\.0 \((?:windows nt|macintosh|x11)",  # a name before a desktop browser's Mozilla/5.0
    r"mozilla/5\.0 (?:\[[a-z-]+\] )?\((?:windows|macintosh|x11)[^)]*\)$",  # a desktop platform and no engine after it
    r"mozilla/5\.0 \((?!windows|macintosh|x11|compatible|ie \d|[a-z];|ubuntu;|smart-tv;)[^;)]+; (?:[^)]*; )?(?:windows nt \d|macintosh;|x11;)",  # a name before
    # the platform (Ubuntu's old Firefox and Samsung's 2013 TVs put theirs there: "Ubuntu; X11", "SMART-TV; X11")
    r"whatsapp/",
)))
_VERSIONED = re.compile(r"/\d")  # every browser and app names a product with its version ("Gecko/20100101", "Dalvik/2.1.0")
_ANDROID_MODEL = re.compile(r"(android[ \d.]*;(?: [a-z]{2}[-_][a-z]{2,3};)?)[^;)]*")
# A reader's UA names a browser (Mozilla/, Opera/) or a platform; anything else is a tool or a service.
_PLATFORM = re.compile(r"^(?:mozilla|opera)/|\bios\b|ucweb|ucbrowser|android|iphone|ipad|ipod|windows|macintosh|mac os|linux|cros\b|symbian|blackberry|bb10|"
                       r"midp|j2me|up\.browser|maui|teleca|obigo|netfront|nokia|kaios|tizen|webos|playstation|xbox|nintendo|roku|smart-?tv|hbbtv|"
                       r"cfnetwork|dalvik|\[fban|instagram")
# Readers whose UA names no product with a version: apps that send an Apple model alone ("iPhone11Pro",
# "iPodTouch7", "iPhone14,2") and MediaTek's feature-phone browser ("MAUI_WAP_Browser").
_BARE_READER = re.compile(r"(?:iphone|ipad|ipod)[a-z0-9 ,._]*|maui[a-z0-9 _-]*")
# Instagram's suffix lists the phone's maker and model ("...; CUBOT; KINGKONG 5 Pro; ..."): no sign of a machine.
_INSTAGRAM_DEVICE = re.compile(r"(instagram [\d.]+ )(?:android )?\([^)]*\)")
_SPACED_SLASH = re.compile(r" +/ +(?=\d)")  # "Mozilla / 5.0", "Chrome / 79"

_BROWSERS: Tuple[Tuple[str, Tuple[str, ...], "re.Pattern[str]"], ...] = tuple(  # most specific first
    (name, tuple(keys.split()), re.compile(pattern))  # (name, literals one of which the UA must hold, pattern)
    for name, keys, pattern in (
        ("Edge", "Edg", r"\b(?:Edge?|EdgA|EdgiOS)/(\d+)"),
        ("UC Browser", "UC UBrowser", r"UC ?Browser/?(\d+)|UCWEB/?(\d+)?|UCMobile/(\d+)|\bUBrowser/(\d+)"),
        ("Opera Mini", "Opera", r"Opera Mini/(\d+)"),
        ("Opera", "OP Opera", r"\b(?:OPR|OPT|OPiOS|OPX)/(\d+)|Opera[/ ](?:.*Version/)?(\d+)"),
        ("Samsung Internet", "SamsungBrowser", r"SamsungBrowser/(\d+)"),
        ("Yandex", "Ya", r"YaBrowser/(\d+)|YaSearchBrowser/(\d+)|YandexSearch(?:Browser)?/(\d+)|YaApp_\w+/(\d+)"),
        ("Vivaldi", "Vivaldi", r"Vivaldi/(\d+)"),
        ("Brave", "Brave", r"Brave(?: Chrome)?/(\d+)"),
        ("Whale", "Whale", r"Whale/(\d+)"),
        ("QQ Browser", "QQBrowser", r"M?QQBrowser/(\d+)"),
        ("Sogou", "Sogou MetaSr", r"SogouMobileBrowser/(\d+)|SE (\d+)\.X MetaSr"),
        ("Baidu", "baidu BIDU bdbrowser", r"baidubrowser/(\d+)|BIDUBrowser[ /](\d+)|bdbrowser\w*/(\d+)"),
        ("Mi Browser", "MiuiBrowser", r"(?:XiaoMi/)?MiuiBrowser/(\d+)"),
        ("Huawei Browser", "HuaweiBrowser", r"HuaweiBrowser/(\d+)"),
        ("Honor Browser", "HiBrowser HONORBrowser", r"HiBrowser/(\d+)|HONORBrowser/(\d+)"),
        ("DuckDuckGo", "DuckDuckGo Ddg", r"DuckDuckGo/(\d+)|Ddg/(\d+)"),
        ("Silk", "Silk", r"Silk/(\d+)"),
        ("Puffin", "Puffin", r"Puffin/(\d+)"),
        ("Seznam", "SznProhlizec", r"SznProhlizec/(\d+)"),
        ("Avast", "Avast", r"Avast/(\d+)"),
        ("AVG", "AVG", r"AVG/(\d+)"),
        ("Coc Coc", "coc_coc", r"coc_coc_browser/(\d+)"),
        ("Facebook", "FB", r"FB(?:AN|AV|_IAB)/(?:[A-Za-z0-9]+;FBAV/)?(\d+)?"),
        ("Instagram", "Instagram", r"Instagram (\d+)"),
        ("Pale Moon", "PaleMoon", r"PaleMoon/(\d+)"),
        ("Waterfox", "Waterfox", r"Waterfox/(\d+)"),
        ("SeaMonkey", "SeaMonkey", r"SeaMonkey/(\d+)"),
        ("Firefox", "Firefox FxiOS Focus Klar", r"(?:Firefox|FxiOS|Focus|Klar)/(\d+)"),
        ("Internet Explorer", "MSIE Trident IEMobile", r"MSIE (\d+)|Trident/.*rv:(\d+)|IEMobile[/ ](\d+)"),
        ("Chrome", "Chrom CriOS", r"(?:Chrome|CriOS|Chromium)/(\d+)"),
        ("Safari", "Safari Mobile/", r"Version/(\d+)[.\d]* (?:Mobile/\S+ )?Safari/|Mobile/\w+(?:$| )|Safari/(\d+)"),
    )
)

_OS: Tuple[Tuple[str, "re.Pattern[str]"], ...] = tuple(
    (name, re.compile(pattern))
    for name, pattern in (
        ("Windows Phone", r"Windows Phone|Windows Mobile|WPDesktop|ZuneWP"),
        ("iOS", r"iPhone|iPad|iPod|\biOS\b|CPU OS \d|CriOS/|EdgiOS/|FxiOS/|OPiOS/|FBIOS|FBSN/iOS|dv\(iP"),  # UC Browser's compact form: "dv(iPh12,1)"
        ("ChromeOS", r"Chromebook|Pixelbook"),  # Android apps on a Chromebook name it as their model
        ("Android", r"Android|\bAdr\b|Silk/|\bKF[A-Z]{2,5} Build|OculusBrowser|^JUC ?\(|FB4A|FBAN/EMA|Dalvik/"),
        ("macOS", r"CFNetwork/.*Darwin/.*(?:x86_64|Mac|arm64e?-apple)"),  # an app on a Mac: its Darwin names the machine
        ("iOS", r"CFNetwork/.*Darwin/"),  # Darwin versions are shared by iOS and macOS; apps that say no more are on phones
        ("ChromeOS", r"\bCrOS\b"),
        ("Windows", r"Windows|Win(?:NT|95|98|32|64)\b"),
        ("macOS", r"Mac OS X|Macintosh|Mac_PowerPC|Mac OS/\d|Darwin/"),  # Office for Mac: "Mac OS/11.1"
        ("KaiOS", r"KAIOS|KaiOS"),
        ("Tizen", r"Tizen"),
        ("HarmonyOS", r"HarmonyOS|OpenHarmony"),
        ("FreeBSD", r"FreeBSD"),
        ("OpenBSD", r"OpenBSD"),
        ("Linux", r"Linux|Ubuntu|X11|Fedora|Debian"),
    )
)

_HEADLESS = re.compile(r"headless|phantomjs|puppeteer|playwright|selenium|webdriver|lighthouse")
_IOS_DEVICE = re.compile(r"iPhone|iPad|iPod")
# The bot and device patterns match the lower-cased UA: much faster than re.IGNORECASE.
# Tablets by their well-known model prefixes (Galaxy Tab SM-T/SM-X/SM-P, Lenovo TB-, Kindle Fire KF…,
# Huawei MatePad/MediaPad, Xiaomi and Redmi Pad, OnePlus OPD, Pixel Tablet, XOOM), even when the UA says "Mobile";
# else Android without "Mobile" that names no phone and no laptop.
_TABLET = re.compile(
    r"ipad|tablet|kindle|silk/|playbook|nexus (?:7|9|10)\b|sm-[tpx]\d|gt-p\d|sch-i800|tab\b(?<=\btab)|lenovo tb|tb(?<=\btb)-?[0-9x]|"
    r"matepad|mediapad|pad\b(?<=\bpad)|opd(?<=\bopd)\d|pixel (?:c|tablet)\b|kf(?<=\bkf)[a-z]{2,4}\b|xoom"
)
# Phones by their token or their system (feature phones: J2ME, WAP browsers, UC Browser's compact form).
_PHONE = re.compile(
    r"mobi|iphone|ipod|phone|opera mini|blackberry|bb10|symbian|nokia|kaios|fennec|midp|cldc|j2me|up\.browser|maui|teleca|obigo|netfront|pr\(ucbrowser"
)
# Android without "Mobile": apps and in-app browsers (Dalvik/) on phones name the phone's maker or model (Samsung
# Galaxy SM-A/G/N/S..., Pixel, Redmi, OPPO, OnePlus and realme CPH/RMX, Motorola, LG, Huawei, Xiaomi, vivo, Sony
# Xperia, Tecno, Infinix); laptops and Chromebooks that run Android apps name theirs.
_PHONE_MODEL = re.compile(
    r"sm-[abefgjmnsw]\d|gt-[is]\d|sgh-|pixel (?:\d|fold)|redmi|poco|cph\d{4}|rmx\d{4}|oneplus|oppo|realme|moto(?:rola)?\b|"
    r"xt\d{4}|lm-[a-z]\d|huawei|xiaomi|vivo\b|xperia|tecno|infinix"
)
_LAPTOP = re.compile(r"chromebook|pixelbook|elitebook|probook|latitude|inspiron|thinkpad|vivobook|zenbook|macbook")
# Devices that are neither computers, phones nor tablets: TVs and their sticks and boxes, consoles,
# cars, VR headsets and watches. They are "other".
_TV = re.compile(
    r"smarttv|smart-tv|smart tv|hbbtv|appletv|apple tv|googletv|google tv|android tv|tv\b(?<=\btv)|crkey|roku|bravia|netcast|web0s|webos.tv|"
    r"viera|ce-html|nettv|vidaa|aquos|inettvbrowser|brightsign|"
    r"aft(?<=\baft)[a-z]{1,4}\b|playstation|xbox|nintendo|oculus|quest \d|qtcarbrowser|tesla|android automotive|carplay|watch os|wearos|watch\b(?<=\bwatch)"
)


def classify_user_agent(ua: str) -> UserAgent:
    """Reduce a User-Agent to (browser, major version, OS, device class); the string itself is not kept.

    ``device`` is ``desktop``, ``phone``, ``tablet``, ``bot`` (crawlers, previews, monitors,
    headless browsers, HTTP libraries, an empty UA) or ``other`` (TVs, consoles, unknown).
    """
    ua = ua.strip()[:1024]
    if " / " in ua:
        ua = _SPACED_SLASH.sub("/", ua)
    lower = ua.lower()
    if is_bot(lower):
        return UserAgent(bot_name(ua), "", "", "bot")
    browser, version = browser_of(ua)
    os_name = os_of(ua)
    return UserAgent(browser, version, os_name, device_of(lower, os_name))


def is_headless(ua: str) -> bool:
    """Headless and automated browsers, told apart from other bots in the filtered tally."""
    return bool(_HEADLESS.search(ua.lower()))


def is_bot(lower_ua: str) -> bool:
    if not _PLATFORM.search(lower_ua) or not _VERSIONED.search(lower_ua):
        return not _BARE_READER.fullmatch(lower_ua)
    if "android" in lower_ua:
        lower_ua = _ANDROID_MODEL.sub(r"\1", lower_ua, count=1)
    if "instagram " in lower_ua:
        lower_ua = _INSTAGRAM_DEVICE.sub(r"\1", lower_ua, count=1)
    return bool(_BOT.search(lower_ua) or _BOT_WHOLE.match(lower_ua))


def bot_name(ua: str) -> str:
    """A short name for a bot, for the record of what was filtered: ``Googlebot``, ``curl``."""
    match = re.search(r"([A-Za-z][\w.-]*(?:bot|crawler|spider))\b", ua, re.IGNORECASE) or re.match(r"([A-Za-z][\w.-]*)", ua)
    return match.group(1)[:32] if match else ""


def browser_of(ua: str) -> Tuple[str, str]:
    """The most specific browser token wins: Opera's OPR/ or YaBrowser/ over the Chrome/ beside it,
    also in an Android WebView (``; wv)``), which is otherwise Chrome."""
    for name, keys, pattern in _BROWSERS:
        match = pattern.search(ua) if any(key in ua for key in keys) else None
        if match:
            return name, next((group for group in match.groups() if group), "")
    if "AppleWebKit/" in ua and _IOS_DEVICE.search(ua):
        return "Safari", ""  # an in-app WKWebView: Safari's engine without Safari's token
    return "", ""


def os_of(ua: str) -> str:
    for name, pattern in _OS:
        if pattern.search(ua):
            return name
    return ""


def device_of(lower_ua: str, os_name: str) -> str:
    if _TV.search(lower_ua):
        return "other"
    if _TABLET.search(lower_ua):
        return "tablet"
    if _PHONE.search(lower_ua) or os_name in ("iOS", "Windows Phone", "KaiOS"):
        return "phone"
    if os_name == "Android":
        return "desktop" if _LAPTOP.search(lower_ua) else "phone" if _PHONE_MODEL.search(lower_ua) else "tablet"
    if os_name in ("Windows", "macOS", "Linux", "ChromeOS", "FreeBSD", "OpenBSD"):
        return "desktop"
    return "other"


###############################################################################
# Hits: one pipeline for live requests and imports ############################
###############################################################################


class RawHit(NamedTuple):
    """What a hit brings before anything is decided, from a pixel request or an access-log line."""

    time: int
    params: Dict[str, str]  # path, title, referrer, host, resolution, event, utm_* ...
    user_agent: str = ""
    page_url: str = ""  # the page that loaded the pixel (its Referer or Origin header)
    accept_language: str = ""
    peer: str = ""
    forwarded_for: str = ""
    forwarded: str = ""
    prefetch: bool = False
    gpc: bool = False  # the browser sent Sec-GPC: 1 (Global Privacy Control)


class Record(NamedTuple):
    """A page view as stored, with its visit numbers: what export writes and import reads."""

    view: PageView
    visit_views: int = 0  # on a visit's entry page view: the visit's page views; else 0
    duration: int = 0  # on a visit's entry page view: seconds from its first to its last page view or engagement
    engaged: int = 0  # seconds the page was visible
    scroll: Optional[int] = None  # the deepest scroll in percent; None when the page view reported no engagement
    exit: int = 0  # 1 on the last page view of its visit (so far)


class Accepted(NamedTuple):
    """A hit that counts: its page view (or event), and what its in-memory visitor key is made of."""

    view: PageView
    event: str  # the event's name; empty for a page view
    address: str  # never stored: only salted into the visitor key
    user_agent: str
    stored: Tuple[int, int, int, Optional[int], int] = (0, 0, 0, None, 0)  # an imported row's visit_views, duration, engaged, scroll, exit
    engagement: Optional[Tuple[float, int]] = None  # an engagement beacon's (seconds, scroll percent): not a page view
    props: Properties = ()  # an event's properties
    props_first: int = 0  # an imported event's first-of-the-day bits per property (see Event)
    dropped_props: int = 0  # property values dropped because they look personal (counted in /metrics)


Outcome = Union[Accepted, FilteredHit, None]  # None: malformed, ignored without a trace
FILTER_REASONS = {  # reason: (label in the report, why)
    "bot": ("bots", "the User-Agent is a crawler, a link preview, a monitor or an HTTP library"),
    "headless": ("headless", "a headless or automated browser"),
    "prefetch": ("prefetch", "a prefetch, prerender or preview request, for a page nobody may see"),
    "spam": ("spam", "the referrer's domain is on the referrer spam list"),
    "foreign": ("foreign site", "the site is not one of --site"),
    "ignored": ("ignored", "the client address is in --ignore-ip"),
    "rate-limited": ("rate-limited", "more page views from this visitor in a minute than --rate-limit"),
    "gpc": ("objected (GPC)", "the browser sent Sec-GPC: 1, an objection that --honour-gpc honours"),
    "dropped": ("dropped (database unavailable)", "the database could not take writes and the queue was full"),
}


def raw_hit(environ: Dict[str, Any], now: int, memo: Optional[Memo] = None) -> RawHit:
    """The parts of a WSGI request that a hit may use."""
    return RawHit(
        now, parse_query(environ.get("QUERY_STRING", ""), memo), environ.get("HTTP_USER_AGENT", ""),
        environ.get("HTTP_REFERER", "") or environ.get("HTTP_ORIGIN", ""), environ.get("HTTP_ACCEPT_LANGUAGE", ""),
        environ.get("REMOTE_ADDR", ""), environ.get("HTTP_X_FORWARDED_FOR", ""), environ.get("HTTP_FORWARDED", ""),
        is_prefetch(environ), environ.get("HTTP_SEC_GPC", "").strip() == "1",
    )


def read_hit(hit: RawHit, config: Config, memo: Memo, country_of: Callable[[Optional[IPAddress]], str]) -> Outcome:
    """Decide what a hit is, for live requests and access logs alike: filtered, malformed (None), or a
    normalised page view, event or engagement beacon."""
    params = hit.params
    host = memo(normalise_host, params["host"]) if params.get("host") else memo(url_host, hit.page_url)
    site = site_of(host, config.sites)
    address = client_address(hit.peer, hit.forwarded_for, hit.forwarded, config.trusted_proxies)  # a new address is the rule: no memo
    campaign, campaign_source = campaign_of(params)
    referrer = f"{campaign_source} (campaign)" if campaign_source else memo(normalise_referrer, params.get("referrer", ""), host)
    agent = memo(classify_user_agent, hit.user_agent)
    reason = filter_reason(config, site, address, agent, hit.user_agent, referrer, hit.prefetch, bool(params.get("bot")))
    reason = reason or ("gpc" if hit.gpc and config.honour_gpc else "")
    if reason:
        return FilteredHit(hit.time, site if reason != "foreign" else "", reason)
    event = clean_event(params["event"]) if "event" in params else ""
    engagement = parse_engagement(params) if params.get("engagement") else None
    if ("event" in params and not event) or (params.get("engagement") and engagement is None):
        return None
    props, dropped = clean_properties((name[5:], value) for name, value in params.items() if name.startswith("prop_")) if event else ((), 0)
    if not params.get("path"):
        params = {**params, "path": url_path(hit.page_url)}
    sent = {field.name: memo(field.clean, params.get(field.param, "")) for field in PARAM_FIELDS}
    source, channel = memo(classify_source, referrer)
    view = PageView(
        time=hit.time, site=site, referrer=referrer, country=country_of(address), browser=agent.browser, version=agent.version, os=agent.os,
        device=agent.device, language=memo(primary_language, hit.accept_language), campaign=campaign, source=source, channel=channel, hostname=host, **sent,
    )
    return Accepted(view, event, str(address or ""), hit.user_agent, engagement=engagement, props=props, dropped_props=dropped)


MAX_ENGAGED = 30 * 60  # engaged seconds counted per page view at most
_SECONDS = re.compile(r"\d{1,6}(?:\.\d{1,3})?", re.ASCII)
_PERCENT = re.compile(r"\d{1,3}(?:\.\d{1,3})?", re.ASCII)


def parse_engagement(params: Dict[str, str]) -> Optional[Tuple[float, int]]:
    """An engagement beacon's seconds (at most a day) and scroll depth (clamped to 100), or None when
    either is malformed: ``abc``, negative, ``NaN``, ``1e9``, or too large to be true."""
    seconds, scroll = params.get("engaged", ""), params.get("scroll", "")
    if not _SECONDS.fullmatch(seconds) or not _PERCENT.fullmatch(scroll) or float(seconds) > DAY:
        return None
    return float(seconds), min(100, round(float(scroll)))


def read_record(row: Dict[str, Any], config: Config, memo: Memo, default_site: str) -> Outcome:
    """An exported or foreign row (already reduced: no address, no User-Agent), every value normalised
    as a live hit's would be and filtered by the same rules; None when it is unusable."""
    when = parse_stamp(row.get("time"))
    if when is None:
        return None
    get = row.get
    fields = memo.cleaned(FIELD_CLEANING, get)  # values repeat: clean each once
    host = memo(normalise_host, _text(get("site")) or default_site)
    fields["hostname"] = fields["hostname"] or host  # rows from before hostnames: the site was the host
    site = memo(site_of, host, config.sites)
    referrer = _text(get("referrer"))
    fields["referrer"] = campaign_referrer(fields["campaign"]) or memo(named_referrer, referrer) or memo(normalise_referrer, with_scheme(referrer), fields["hostname"])
    fields["source"], fields["channel"] = memo(classify_source, fields["referrer"])
    first_today = _text(get("first_today")) in ("1", "True", "true")
    firsts = bounded(get("firsts"), ALL_VISIT_FIRSTS) if "firsts" in row else ALL_VISIT_FIRSTS * first_today  # older exports: a day's first
    view = PageView._make((when, site, *CLEANED_VIEW_FIELDS(fields), first_today, firsts, bounded(get("converted"), 1)))
    agent = UserAgent(view.browser, view.version, view.os, "bot" if _text(get("device")) == "bot" else view.device)
    reason = filter_reason(config, site, None, agent, "", view.referrer)
    if reason:
        return FilteredHit(when, site if reason != "foreign" else "", reason)
    kind = _text(get("type")) or "pageview"
    event = clean_event(_text(get("event"))) if kind == "event" else ""
    if kind == "event" and not event:
        return None
    visit_views = bounded(get("visit_views"), 1_000_000)
    scroll = None if _text(get("scroll")) == "" else bounded(get("scroll"), 100)
    stored = (
        visit_views, bounded(get("duration"), 10 * DAY) if visit_views else 0, bounded(get("engaged"), MAX_ENGAGED) if scroll is not None else 0,
        scroll, bounded(get("exit"), 1),
    )
    props, dropped = read_properties(_text(get("props"))) if event else ((), 0)
    props_first = bounded(get("props_first"), (1 << MAX_PROPS) - 1)
    # a duration belongs to a visit's entry; engagement to a page view that reported it
    return Accepted(view, event, "", "", stored, props=props, props_first=props_first, dropped_props=dropped)


FIELD_CLEANING = tuple(FIELD_CLEANERS.items())
CLEANED_VIEW_FIELDS = operator.itemgetter(*(field.name for field in VIEW_FIELDS))  # a record's fields, cleaned, in PageView order


def _text(value: Any) -> str:
    """A record's value as text: None is empty."""
    return value if value.__class__ is str else "" if value is None else str(value)


def filter_reason(
    config: Config, site: str, address: Optional[IPAddress], agent: UserAgent, user_agent: str, referrer: str, prefetch: bool = False, webdriver: bool = False
) -> str:
    """Why a hit is not a page view, or empty when it is one. ``webdriver``: the snippet saw ``navigator.webdriver``."""
    if address is not None and is_in(address, config.ignore_networks):
        return "ignored"
    if config.sites and not in_domains(site, config.sites):
        return "foreign"
    if prefetch:
        return "prefetch"
    if agent.device == "bot":
        return "headless" if is_headless(user_agent) else "bot"
    if webdriver:
        return "headless"
    if referrer and in_domains(referrer.split("/", 1)[0], config.spam_domains):
        return "spam"
    return ""


SHOWN_EMPTY = {field.name: dim.sections[0].empty if dim.sections else "(none)" for dim in DIMENSIONS for field in dim.fields if not field.by_visitor}  # as reports show it


def explain(outcome: Outcome) -> str:
    """One line on what a hit would be, for a dry run and ``pixeld.py check``."""
    if outcome is None:
        return "ignored: malformed (an event without a name)"
    if isinstance(outcome, FilteredHit):
        return f"filtered: {outcome.reason} ({FILTER_REASONS[outcome.reason][1]})"
    view = outcome.view
    what = f"the event {outcome.event!r}{explain_properties(outcome)} on" if outcome.event else "a page view of"
    if outcome.event == NOT_FOUND_EVENT:
        what = "a page not found (the event '404'; the Not found section lists it with its referrer):"
    details = ", ".join(f"{name} {getattr(view, name) or empty}" for name, empty in SHOWN_EMPTY.items() if name != "path")
    return f"counted as {what} {view.site or '(no host)'}{view.path} ({details}), unless the visitor is over the rate limit"


def explain_properties(hit: Accepted) -> str:
    kept = ", ".join(f"{name}={value!r}" for name, value in hit.props)
    dropped = f"{hit.dropped_props} property value(s) dropped: they look like an e-mail address, a phone number or an account" if hit.dropped_props else ""
    return f" ({'; '.join(filter(None, (f'properties {kept}' if kept else '', dropped)))})" if kept or dropped else ""


def with_scheme(referrer: str) -> str:
    """Exported referrers are host and path; foreign ones may be full URLs."""
    return referrer if "://" in referrer or not referrer else "http://" + referrer


def parse_stamp(value: Any) -> Optional[int]:
    """Unix seconds, or an ISO or SQLite datetime (UTC unless it says), between 2000 and 2100."""
    text = str(value or "").strip()
    if len(text) == 20 and text[10] == "T" and text[19] == "Z" and text[:4].isdigit():  # pixeld's own export
        return parse_export_stamp(text)
    try:
        if re.fullmatch(r"\d+(\.\d+)?", text):
            when = int(float(text))
        else:
            moment = dt.datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
            when = int((moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)).timestamp())
    except (ValueError, OverflowError):
        return None
    return in_time_range(when)


EARLIEST, LATEST = 946_684_800, 4_102_444_800  # 2000-01-01 and 2100-01-01: the times a hit may have


def in_time_range(seconds: int) -> Optional[int]:
    """The time, when it is one a hit may have (visits keep times in 32 bits); else None."""
    return seconds if EARLIEST <= seconds < LATEST else None


def bounded(value: Any, limit: int) -> int:
    try:
        number = int(value or 0)
    except (TypeError, ValueError):
        return 0
    return min(max(number, 0), limit)


def parse_export_stamp(text: str) -> Optional[int]:
    """``2026-11-28T14:05:09Z``, quickly: days come from a small cache, the time from slicing."""
    try:
        seconds = _midnight(text[:10]) + int(text[11:13]) * 3600 + int(text[14:16]) * 60 + int(text[17:19])
    except ValueError:
        return None
    return in_time_range(seconds)


@lru_cache(maxsize=1024)
def _midnight(date: str) -> int:
    return int(dt.datetime.strptime(date, "%Y-%m-%d").replace(tzinfo=dt.timezone.utc).timestamp())


###############################################################################
# Other trackers: GoatCounter, Plausible and Umami hits as pixel hits #########
###############################################################################

# Pages that still carry another tool's tracker keep being counted: each tool's request is translated
# into the pixel's own parameters (a RawHit) and then takes the one pipeline, read_hit -> place -> the
# writer. Nothing else of their payload is kept: no ids, no session or cache tokens, no `rnd`.

MAX_BODY = 8 * 1024  # a tracker's JSON body at most (theirs are a few hundred bytes); a larger one is refused
MAX_FOREIGN_PROPS = 10  # properties taken from one event, as many as the pixel takes
TRACKER_PATHS = {"/count": "goatcounter", "/api/event": "plausible", "/api/send": "umami"}
FOREIGN_PROBLEMS = ("too large", "content type", "malformed json", "missing fields")  # bad input, as /metrics counts it
JSON_TYPES = ("application/json", "text/plain")  # Plausible's script posts text/plain, Umami's application/json
PLAUSIBLE_LINK_EVENTS = {"Outbound Link: Click": "outbound:", "File Download": "download:"}  # named as pixeld's own events are
TRUE = ("1", "true", "on", "yes")


class ForeignHit(NamedTuple):
    """What another tool's request comes to: a hit for the pipeline, or nothing to record and why."""

    hit: Optional[RawHit]
    problem: str = ""  # bad input: a short reason, for /metrics, the answer and the dry run
    note: str = ""  # a well-formed request that records nothing (Umami's identify)


def foreign_hit(tracker: str, environ: Dict[str, Any], body: bytes, now: int, site_ids: Dict[str, str], memo: Optional[Memo] = None) -> ForeignHit:
    """A GoatCounter, Plausible or Umami request as the pixel hit it stands for, or why it is not one."""
    base = raw_hit(environ, now, memo)  # their query, for GoatCounter; the headers, for all
    if tracker == "goatcounter":
        return ForeignHit(base._replace(params=goatcounter_params(base.params)))
    data = json_body(environ, body)
    if isinstance(data, str):
        return ForeignHit(None, data)
    if tracker == "plausible":
        return plausible_hit(base, data)
    return umami_hit(base, data, site_ids)


def json_body(environ: Dict[str, Any], body: bytes) -> Union[Dict[str, Any], str]:
    """A JSON object posted as text or JSON, or what is wrong with it."""
    length = environ.get("CONTENT_LENGTH") or "0"
    if not length.isdigit() or int(length) > MAX_BODY or len(body) > MAX_BODY:
        return "too large"
    if environ.get("CONTENT_TYPE", "").partition(";")[0].strip().lower() not in JSON_TYPES + ("",):
        return "content type"
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return "malformed json"
    return data if isinstance(data, dict) else "malformed json"


def goatcounter_params(query: Dict[str, str]) -> Dict[str, str]:
    """GoatCounter's ``/count``: p path (or an event's name with e=true), t title, r referrer, s screen
    ``W,H,scale``, q the page's query (its campaign), b non-zero for a bot; rnd is ignored."""
    params = {key: value for key, value in parse_query(query.get("q", "").lstrip("?")).items() if key in CAMPAIGN_PARAMS}
    params.update(title=query.get("t", ""), referrer=query.get("r", ""), resolution=",".join(query.get("s", "").split(",")[:2]))
    if query.get("e", "").lower() in TRUE:
        params["event"] = query.get("p", "")  # an event has no page of its own: the page comes from the Referer
    else:
        params["path"] = query.get("p", "")
    if query.get("b", "0") not in ("", "0"):
        params["bot"] = "1"
    return params


def plausible_hit(base: RawHit, data: Dict[str, Any]) -> ForeignHit:
    """Plausible's ``/api/event``: n name, u page URL, d domain (the site), r referrer, h hash routing,
    p props, i interactive; ``engagement`` brings sd (scroll %) and e (engaged ms). pixeld's own script
    adds t (title) and s (screen ``W,H``)."""
    name, url, domain = data.get("n"), data.get("u"), data.get("d")
    parts = split_url(url) if isinstance(url, str) else None
    if not isinstance(name, str) or not name or not isinstance(domain, str) or parts is None or not parts.netloc:
        return ForeignHit(None, "missing fields")
    route = quote(unquote(parts.fragment).split("?", 1)[0], safe="/") if data.get("h") else ""  # hash routing: /#/about, never its query
    path = parts.path + ("%23" + route if route else "")
    params = page_params(parts.query, path, text_of(data.get("t")), text_of(data.get("r")), text_of(data.get("s")))
    params["host"] = domain.split(",", 1)[0]
    if name == "engagement":
        return ForeignHit(base._replace(params={**params, **engagement_params(data.get("e"), data.get("sd"), 1000)}, page_url=url))
    if name != "pageview":
        props = parse_props(data.get("p"))
        prefix = PLAUSIBLE_LINK_EVENTS.get(name)
        if prefix:  # its url prop holds a whole address: only the host (or the file's path) is kept, as the snippet does
            link = props.pop("url", "")
            name = prefix + (url_host(link) if prefix == "outbound:" else url_path(link) or "/")
        params.update(event_params(name, props))
    return ForeignHit(base._replace(params=params, page_url=url))


def umami_hit(base: RawHit, data: Dict[str, Any], site_ids: Dict[str, str]) -> ForeignHit:
    """Umami's ``/api/send``: ``{"type": "event", "payload": {website, hostname, url, title, referrer,
    screen, language, name, data}}``. The website id names the site (``--site-id``), else the hostname
    does. ``identify`` records nothing; ``engagement`` (engaged seconds, scroll %) comes from pixeld's script."""
    kind, payload = data.get("type"), data.get("payload")
    if kind == "identify" and isinstance(payload, dict):
        return ForeignHit(None, note="an Umami identify call: pixeld keeps nothing that identifies a visitor")
    website = payload.get("website") if isinstance(payload, dict) else None
    if kind not in ("event", "engagement") or not isinstance(website, str) or not isinstance(payload, dict):
        return ForeignHit(None, "missing fields")
    site = site_ids.get(website.strip().lower()) or text_of(payload.get("hostname"))
    parts = split_url(text_of(payload.get("url")) or "/") or split_url("/")
    params = page_params(parts.query, parts.path, text_of(payload.get("title")), text_of(payload.get("referrer")), text_of(payload.get("screen")))
    params["host"] = site
    if kind == "engagement":
        params.update(engagement_params(payload.get("engaged"), payload.get("scroll"), 1))
    elif payload.get("name") is not None:
        params.update(event_params(text_of(payload.get("name")), parse_props(payload.get("data"))))
    language = text_of(payload.get("language"))
    return ForeignHit(base._replace(params=params, accept_language=language or base.accept_language))  # no site named: the Origin's


def page_params(query: str, path: str, title: str, referrer: str, screen: str) -> Dict[str, str]:
    """The pixel's page parameters; of the page's query only its campaign."""
    params = {key: value for key, value in parse_query(query).items() if key in CAMPAIGN_PARAMS}
    params.update(path=path or "/", title=title, referrer=referrer, resolution=screen)
    return params


def engagement_params(engaged: Any, scroll: Any, per_second: int) -> Dict[str, str]:
    """An engagement beacon's parameters; without two numbers, the pipeline's own check finds it malformed."""
    if not all(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) for value in (engaged, scroll)):
        return {"engagement": "1"}
    return {"engagement": "1", "engaged": f"{engaged / per_second:.1f}", "scroll": f"{max(0, scroll):.0f}"}


def event_params(name: str, props: Dict[str, str]) -> Dict[str, str]:
    """An event with its properties (``prop_NAME``, as the pixel takes them). Plausible's ``404`` is the
    snippet's page not found, the event ``404`` on the missing page, whose path prop it needs no more."""
    return {"event": name, **{f"prop_{key}": value for key, value in props.items() if not (name == NOT_FOUND_EVENT and key == "path")}}


def parse_props(value: Any) -> Dict[str, str]:
    """At most ``MAX_FOREIGN_PROPS`` properties with text, number or true/false values (Plausible's older
    scripts send them as a JSON string); nested values are dropped."""
    if isinstance(value, str):
        try:
            value = json.loads(value[:MAX_BODY])
        except (ValueError, RecursionError):
            return {}
    if not isinstance(value, dict):
        return {}
    props = {}
    for key, item in value.items():
        if isinstance(item, bool):
            item = "true" if item else "false"
        if isinstance(key, str) and key and isinstance(item, (str, int, float)) and len(props) < MAX_FOREIGN_PROPS:
            props[key] = str(item)
    return props


def text_of(value: Any) -> str:
    return value if isinstance(value, str) else ""


###############################################################################
# Privacy: salts, visitor keys, visits ########################################
###############################################################################

VISIT_TIMEOUT = 30 * 60  # a visit ends after 30 minutes without a page view
MAX_VISITORS = 200_000  # beyond this many in a day, new visitors are counted but not remembered
KEY_SLOTS = 1 << (2 * MAX_VISITORS - 1).bit_length()  # a generation's key table: at most half full
RECENT_PAGES = 4  # page views per visit that engagement can still reach (a reader with a few tabs open)
UNWRITTEN = 0xFFFFFFFF  # in ``entry`` and ``page_row``: the writer has not written that row (yet)


class Generation:
    """A salt and the visitors keyed with it. It lives for one UTC day, plus the tail of its visits.

    Visitors are numbered in the order they come, and what is known of each (the rate limit, the
    current visit, its latest page views) sits in typed arrays at that number. Keys find numbers
    in an open-addressing table of two arrays, sized for ``MAX_VISITORS`` at most half full:
    about 110 bytes per visitor in all, where a dict and a few Python objects each took 830.
    Times are unix seconds. The request side, under the app's lock, owns everything but the row
    columns; the writer sets ``entry`` and ``page_row`` (where it wrote the row, as an offset it
    reads back the same way) once it has written the row, and only while the visit or page view
    there is still the one it wrote.
    """

    __slots__ = ("salt", "day", "keys", "numbers", "counted", "minute", "minute_views", "start", "last", "views", "entry",
                 "page_path", "page_time", "page_row", "next_page", "events", "origin", "heir", "arrival", "arrivals", "arrival_ids",
                 "seen", "more_seen", "goals")

    def __init__(self, day: int, slots: int = KEY_SLOTS) -> None:
        self.salt = secrets.token_bytes(32)
        self.day = day
        self.keys = array.array("Q", [0]) * slots  # visitor keys (0: a free slot) ...
        self.numbers = array.array("I", [0]) * slots  # ... and the number of each, in the same slot
        self.counted = bytearray()  # 1 once the visitor's first page view of the day is counted
        self.minute = array.array("I")  # the rate limit's minute, and the visitor's hits in it
        self.minute_views = array.array("H")
        self.start = array.array("I")  # the current visit: its first and latest page view, and its page views (0: none)
        self.last = array.array("I")
        self.views = array.array("I")
        self.entry = array.array("I")  # where its first page view was written
        self.page_path = array.array("I")  # RECENT_PAGES slots per visitor: a hash of the path, its time, its row
        self.page_time = array.array("I")
        self.page_row = array.array("I")
        self.next_page = bytearray()  # the slot the visitor's next page view takes
        self.events: Dict[int, Set[str]] = {}  # the names of the events a visitor sent today (most send none), and "name\tproperty\tvalue"
        self.origin: Dict[int, Tuple[int, int]] = {}  # a visit carried over from yesterday: yesterday's day and number
        self.heir: Dict[int, Tuple["Generation", int]] = {}  # yesterday's visitors carried into today: where to
        self.arrival = array.array("I")  # where the current visit came from: an index into ``arrivals`` (0: direct)
        self.arrivals: List[Arrival] = [DIRECT]  # the day's distinct arrivals, each kept once
        self.arrival_ids: Dict[Arrival, int] = {DIRECT: 0}
        self.seen = array.array("I")  # per ``VISIT_FIRSTS`` dimension, a hash of the first value the visitor brought today (0: none)
        self.more_seen: Dict[int, Set[Tuple[int, int]]] = {}  # the few who come back another way on the same day: (bit, hash)
        self.goals = array.array("I")  # the goals the visitor reached today: a bit per goal, and CONVERTED once any is reached

    def key(self, site: str, address: str, user_agent: str) -> int:
        """A keyed hash of 56 bits, never 0."""
        data = f"{site}\0{address}\0{user_agent}".encode("utf-8", "replace")
        return int.from_bytes(hashlib.blake2b(data, key=self.salt, digest_size=7).digest(), "little") | 1 << 56

    def __len__(self) -> int:
        return len(self.counted)

    def find(self, key: int) -> int:
        """The visitor's number, or -1."""
        slot = self._slot(key)
        return self.numbers[slot] if self.keys[slot] else -1

    def _slot(self, key: int) -> int:
        """Where the key is, or the free slot where it goes (linear probing)."""
        keys = self.keys
        mask = len(keys) - 1
        slot = key & mask
        while keys[slot] and keys[slot] != key:
            slot = (slot + 1) & mask
        return slot

    def add(self, key: int) -> int:
        """Number a new visitor (below ``MAX_VISITORS`` only)."""
        slot, number = self._slot(key), len(self.counted)
        self.keys[slot], self.numbers[slot] = key, number
        self.counted.append(0)
        self.next_page.append(0)
        self.minute_views.append(0)
        for column in (self.minute, self.start, self.last, self.views):
            column.append(0)
        self.entry.append(UNWRITTEN)
        self.arrival.append(0)
        self.goals.append(0)
        self.seen.extend(NO_SEEN)
        self.page_path.extend(NO_PAGES)
        self.page_time.extend(NO_PAGES)
        self.page_row.extend(UNWRITTEN_PAGES)
        return number

    def carry(self, number: int, yesterday: "Generation", old: int) -> None:
        """Continue a visit begun under yesterday's salt. The writer may not have told yesterday yet
        where it wrote the visit's rows: yesterday passes that on (``heir``)."""
        for column in ("start", "last", "views", "entry", "next_page"):
            getattr(self, column)[number] = getattr(yesterday, column)[old]
        self.arrival[number] = self.arrival_id(yesterday.arrivals[yesterday.arrival[old]])
        for column in ("page_path", "page_time", "page_row"):
            getattr(self, column)[number * RECENT_PAGES : (number + 1) * RECENT_PAGES] = getattr(yesterday, column)[old * RECENT_PAGES : (old + 1) * RECENT_PAGES]
        self.origin[number] = yesterday.origin.get(old, (yesterday.day, old))
        yesterday.heir[old] = (self, number)

    def visit_key(self, number: int) -> Tuple[int, int, int]:
        """Names the visitor's current visit in the writer's batch, the same before and after midnight."""
        day, first = self.origin.get(number, (self.day, number))
        return day, first, self.start[number]

    def step(self, number: int, now: int, path: str, arrival: "Arrival") -> "VisitStep":
        """Place a page view in the visitor's visit, beginning a new one after 30 idle minutes: a new
        visit came the way its first page view says (``arrival``). The latest page views stay reachable
        across visits: a beacon from a tab left open still lands."""
        previous = None
        views, last, page_time, next_page = self.views[number], self.last[number], self.page_time, self.next_page[number]
        if not views or now - last > VISIT_TIMEOUT:
            start = self.start[number] = self.last[number] = last = now
            views = self.views[number] = 1
            self.entry[number] = UNWRITTEN
            self.origin.pop(number, None)
            self.arrival[number] = self.arrival_id(arrival)
        else:
            start = self.start[number]
            views = self.views[number] = views + 1
            if now > last:
                last = self.last[number] = now
            before = number * RECENT_PAGES + (next_page - 1) % RECENT_PAGES
            if page_time[before] >= start:
                previous = (before, page_time[before])
        slot = number * RECENT_PAGES + next_page
        self.next_page[number] = (next_page + 1) % RECENT_PAGES
        self.page_path[slot], page_time[slot], self.page_row[slot] = path_hash(path), now, UNWRITTEN
        return VisitStep(self, number, start, views, last - start, slot, self.visit_key(number), previous)

    def arrival_id(self, arrival: "Arrival") -> int:
        found = self.arrival_ids.get(arrival)
        if found is None:
            found = self.arrival_ids[arrival] = len(self.arrivals)
            self.arrivals.append(arrival)
        return found

    def current_arrival(self, number: int, now: int) -> Optional["Arrival"]:
        """How the visitor's visit came, while it goes on; None when the visitor has no visit now."""
        if not self.views[number] or now - self.last[number] > VISIT_TIMEOUT:
            return None
        return self.arrivals[self.arrival[number]]

    def firsts(self, number: int, arrival: "Arrival") -> int:
        """A bit per ``VISIT_FIRSTS`` dimension whose value the visitor brings for the first time today."""
        bits = 0
        for index, value in enumerate(arrival[at] for at in FIRSTS_AT):
            wanted, slot = (hash(value) & 0x7FFFFFFF) | 1, number * len(VISIT_FIRSTS) + index
            if not self.seen[slot]:
                self.seen[slot] = wanted
            elif self.seen[slot] != wanted:
                more = self.more_seen.setdefault(number, set())
                if (index, wanted) in more:
                    continue
                more.add((index, wanted))
            else:
                continue
            bits |= 1 << index
        return bits

    def reach(self, number: int, reached: Iterable[int]) -> Tuple[List[int], int]:
        """Note the goals (indexes) a page view or event reached: those first reached today, and 1 when
        they are the visitor's first goal today (a conversion)."""
        done, first = self.goals[number], []
        for index in reached:
            if not done >> index & 1:
                first.append(index)
                done |= 1 << index
        converted = int(bool(first) and not done >> CONVERTED_BIT & 1)
        self.goals[number] = done | (converted << CONVERTED_BIT)
        return first, converted

    def find_page(self, number: int, path: str) -> int:
        """The slot of the visit's latest page view of this path, or -1."""
        wanted, newest = path_hash(path), self.next_page[number]
        for back in range(1, RECENT_PAGES + 1):
            slot = number * RECENT_PAGES + (newest - back) % RECENT_PAGES
            if self.page_time[slot] and self.page_path[slot] == wanted:
                return slot
        return -1

    def wrote_page(self, slot: int, seen: int, row: int) -> None:
        if self.page_time[slot] == seen and 0 <= row < UNWRITTEN:
            self.page_row[slot] = row
        heir = self.heir.get(slot // RECENT_PAGES)
        if heir is not None:
            heir[0].wrote_page(heir[1] * RECENT_PAGES + slot % RECENT_PAGES, seen, row)

    def page_row_of(self, slot: int, seen: int) -> Optional[int]:
        """Where the page view in this slot was written, if it is still the one seen at ``seen``."""
        row = self.page_row[slot]
        return row if self.page_time[slot] == seen and row != UNWRITTEN else None

    def wrote_entry(self, number: int, start: int, row: int) -> None:
        if self.start[number] == start and 0 <= row < UNWRITTEN:
            self.entry[number] = row
        heir = self.heir.get(number)
        if heir is not None:
            heir[0].wrote_entry(heir[1], start, row)

    def entry_of(self, number: int, start: int) -> Optional[int]:
        """Where the first page view of the visit that began at ``start`` was written, if it was."""
        row = self.entry[number]
        return row if self.start[number] == start and row != UNWRITTEN else None


class SessionGeneration(Generation):
    """An import's generation. Its visitors name themselves by a session id from the file being imported
    (GoatCounter's ``Session``, Umami's ``session_id``), not by a reader's address and User-Agent: the
    key only has to tell them apart, in memory, for the day. Python's own string hash (itself randomly
    keyed per process) of the salt and the id does that ten times faster than a keyed BLAKE2b."""

    __slots__ = ()

    def key(self, site: str, address: str, user_agent: str) -> int:
        return hash((self.salt, site, address, user_agent)) & KEY_MASK | 1 << 56


KEY_MASK = (1 << 56) - 1
NO_PAGES = array.array("I", [0] * RECENT_PAGES)
NO_SEEN = array.array("I", [0] * len(VISIT_FIRSTS))
CONVERTED_BIT = MAX_GOALS  # in ``Generation.goals``: the visitor reached a goal today


# Where a visit came from, as its first page view says: the values of the ``per_visit`` dimensions
# (source and channel, referrer, campaign and its content and term). They are stamped on every page
# view and event of the visit, so that internal navigation is never counted as direct.
Arrival = Tuple[str, ...]
ARRIVAL_FIELDS = tuple(field.name for dim in DIMENSIONS if dim.per_visit for field in dim.fields)
arrival_of: Callable[[PageView], Arrival] = operator.attrgetter(*ARRIVAL_FIELDS)
DIRECT = arrival_of(PageView(0, ""))
FIRSTS_AT = tuple(ARRIVAL_FIELDS.index(DIMENSION_NAMED[name].fields[-1].name) for name in VISIT_FIRSTS)  # each VISIT_FIRSTS value in an arrival
UNWRITTEN_PAGES = array.array("I", [UNWRITTEN] * RECENT_PAGES)


def path_hash(path: str) -> int:
    return hash(path) & 0x7FFFFFFF


class VisitStep(NamedTuple):
    """A page view's place in its visit, as the writer needs it: handed over in memory only."""

    generation: Optional[Generation]  # None for a visitor beyond MAX_VISITORS: counted, never remembered
    number: int  # the visitor's number in the generation
    start: int  # when the visit began: with the generation and number, it names the visit
    views: int  # page views in the visit so far, this one included
    duration: int  # seconds from the visit's first page view to this one
    slot: int  # where the generation keeps this page view for engagement to find
    visit: Tuple[int, int, int]  # names the visit in the writer's batch (``Generation.visit_key``)
    previous: Optional[Tuple[int, int]] = None  # the visit's page view before this one: its slot and time (it is no longer the exit)


class Engagement(NamedTuple):
    """Engaged time and scroll for a page view seen earlier: handed to the writer in memory only."""

    generation: Generation
    number: int
    start: int  # the visit's start
    slot: int  # the page view's slot in the generation
    time: int  # the page view's time: the slot still holds it when its time matches
    seconds: float  # engaged since the previous beacon
    scroll: int  # the deepest scroll so far, 0-100
    visit: Tuple[int, int, int]


class Observation(NamedTuple):
    first_today: bool
    step: VisitStep
    arrival: Arrival  # how the page view's visit came


class Visitors:
    """Unique visitors, visits and rate limits, from keys that exist only in memory.

    A visitor key is a keyed hash of site, client address and full User-Agent, with a random
    salt that is replaced at 00:00 UTC. The previous salt is kept only until every visit begun
    under it has ended (30 idle minutes after midnight), so a visit can run across midnight.
    Nothing here is ever persisted: a restart forgets everyone. Not thread-safe; the app
    holds a lock around ``observe`` and the hand-over to the writer.
    """

    def __init__(self, rate_limit: int, on_new_salt: Callable[[], None] = lambda: None, goals: Sequence[Goal] = (),
                 generation: Callable[[int], Generation] = Generation) -> None:
        self.rate_limit = rate_limit
        self.on_new_salt = on_new_salt
        self.goals = tuple(goals)
        self.generation = generation  # a day's visitors: ``SessionGeneration`` for an import's
        self._current = Generation(-1, slots=1)  # a placeholder: the first hit brings the first real day
        self._previous: Optional[Generation] = None

    def admit(self, hit: Accepted) -> Tuple[Union[PageView, Event, Engagement, FilteredHit, None], Optional[VisitStep]]:
        """What the writer gets for an accepted hit: the page view in its visit, the event, the engagement
        joined to its page view (None when it has none), or a rate-limited tally."""
        view = hit.view
        if hit.engagement is not None:
            return self.engage(view.time, view.site, hit.address, hit.user_agent, view.path, *hit.engagement), None
        own = arrival_of(view)
        if hit.event:
            seen = self.observe_event(view.time, view.site, hit.address, hit.user_agent, hit.event, own, hit.props)
            if seen is None:
                return FilteredHit(view.time, view.site, "rate-limited"), None
            first, props_first, arrival, converted = seen
            if hit.event != NOT_FOUND_EVENT:  # a missing page keeps the link that led to it: its sources are what to fix
                view = arrived(view, own, arrival)
            return Event(hit.event, view.counted(first, 0, converted), hit.props, props_first), None
        observation = self.observe(view.time, view.site, hit.address, hit.user_agent, view.path, own)
        if observation is None:
            return FilteredHit(view.time, view.site, "rate-limited"), None
        firsts, first_goals, converted = self.flags(observation, self.reached_by_path(view.path))
        return self.shown(view, own, observation.arrival, first_goals).counted(observation.first_today, firsts, converted), observation.step

    def reached_by_path(self, path: str) -> List[int]:
        """The goals (indexes) a page view of this path reaches."""
        return [index for index, goal in enumerate(self.goals) if goal.reached_by_path(path)] if self.goals else []

    def flags(self, observation: Observation, reached: List[int]) -> Tuple[int, List[int], int]:
        """What a page view placed in its visit brings: a bit per ``VISIT_FIRSTS`` value the visitor brings
        for the first time today, the goals (of ``reached``) first reached today, and whether it is the
        visitor's first goal today."""
        step = observation.step
        if step.generation is None:  # a visitor not remembered: each page view counts as a new one
            return ALL_VISIT_FIRSTS, reached, int(bool(reached))
        new = step.views == 1 or observation.first_today  # a visit comes one way all along: only its first page view, or the day's, can bring a new one
        firsts = step.generation.firsts(step.number, observation.arrival) if new else 0
        first_goals, converted = step.generation.reach(step.number, reached) if reached else ([], 0)
        return firsts, first_goals, converted

    def shown(self, view: PageView, own: Arrival, arrival: Arrival, first_goals: List[int]) -> PageView:
        """The page view as stored: as its visit came (``arrived``), naming the goals it reached first today."""
        view = arrived(view, own, arrival)
        if first_goals:
            view = view._replace(goals="\t".join(sorted(self.goals[index].name for index in first_goals)))
        return view

    def observe(self, now: int, site: str, address: str, user_agent: str, path: str = "", arrival: Arrival = DIRECT) -> Optional[Observation]:
        """Place a page view in its visit (a new visit came as ``arrival`` says); None when the visitor is
        over the rate limit."""
        self._rotate(now)
        generation = self._current
        number = self._find(now, site, address, user_agent)
        if number < 0:
            return Observation(True, VisitStep(None, -1, now, 1, 0, -1, (-1, -1, now)), arrival)
        if self.rate_limit > 0 and not self._within_rate_limit(generation, number, now):
            return None
        first_today = not generation.counted[number]
        generation.counted[number] = 1
        step = generation.step(number, now, path, arrival)
        return Observation(first_today, step, generation.arrivals[generation.arrival[number]])

    def engage(self, now: int, site: str, address: str, user_agent: str, path: str, seconds: float, scroll: int) -> Optional[Union[Engagement, FilteredHit]]:
        """Join engagement to the visitor's latest page view of that path, in memory; None when there is none."""
        self._rotate(now)
        for generation in filter(None, (self._current, self._previous)):
            number = generation.find(generation.key(site, address, user_agent))
            if number >= 0 and generation.views[number]:
                break
        else:
            return None
        if not self._within_rate_limit(generation, number, now):
            return FilteredHit(now, site, "rate-limited")
        slot = generation.find_page(number, path)
        if slot < 0:
            return None
        return Engagement(generation, number, generation.start[number], slot, generation.page_time[slot], seconds, scroll, generation.visit_key(number))

    def observe_event(
        self, now: int, site: str, address: str, user_agent: str, name: str, arrival: Arrival = DIRECT, props: Properties = ()
    ) -> Optional[Tuple[bool, int, Arrival, int]]:
        """Whether this is the visitor's first event of this name today; a bit per property that is set
        when it is the visitor's first event of this name with that property value today; how the visit
        it belongs to came (the event's own ``arrival`` when none goes on); and whether it is the
        visitor's first goal today. None over the rate limit. Names and values seen are held per salt,
        in memory only, as the key is."""
        self._rotate(now)
        generation = self._current
        number = self._find(now, site, address, user_agent)
        reached = [index for index, goal in enumerate(self.goals) if goal.reached_by_event(name)]
        if number < 0:
            return True, (1 << len(props)) - 1, arrival, int(bool(reached))
        if not self._within_rate_limit(generation, number, now):
            return None
        seen = generation.events.setdefault(number, set())
        first = name not in seen
        seen.add(name)
        bits = 0
        for index, pair in enumerate(props):
            key = FIELD_SEPARATOR.join((name, *pair))  # a tab never survives cleaning, so this is no event name
            if key not in seen:
                seen.add(key)
                bits |= 1 << index
        converted = generation.reach(number, reached)[1] if reached else 0
        return first, bits, generation.current_arrival(number, now) or arrival, converted

    def _rotate(self, now: int) -> None:
        day = now // DAY
        if day > self._current.day:
            self._previous = self._current if day == self._current.day + 1 else None
            self._current = self.generation(day)
            self.on_new_salt()
        if self._previous is not None and now >= self._current.day * DAY + VISIT_TIMEOUT:
            self._previous = None  # every visit begun under it has ended, or moved on to today's key

    def _find(self, now: int, site: str, address: str, user_agent: str) -> int:
        """The visitor's number today, continuing a visit from yesterday; -1 past MAX_VISITORS."""
        generation = self._current
        key = generation.key(site, address, user_agent)
        number = generation.find(key)
        if number >= 0:
            return number
        if len(generation) >= MAX_VISITORS:
            return -1
        number = generation.add(key)
        yesterday = self._previous
        if yesterday is not None:
            old = yesterday.find(yesterday.key(site, address, user_agent))
            if old >= 0 and yesterday.views[old] and now - yesterday.last[old] <= VISIT_TIMEOUT:
                generation.carry(number, yesterday, old)
        return number

    def _within_rate_limit(self, generation: Generation, number: int, now: int) -> bool:
        if self.rate_limit <= 0:
            return True
        if generation.minute[number] != now // 60:
            generation.minute[number], generation.minute_views[number] = now // 60, 0
        generation.minute_views[number] = min(0xFFFF, generation.minute_views[number] + 1)
        return generation.minute_views[number] <= self.rate_limit

    def remembered(self) -> int:
        """How many visitor keys are held in memory."""
        return len(self._current) + (len(self._previous) - len(self._previous.heir) if self._previous is not None else 0)

    def salts(self) -> List[bytes]:
        """The salts held right now, so tests can prove they never reach the disk."""
        return [generation.salt for generation in (self._current, self._previous) if generation is not None]


def arrived(view: PageView, own: Arrival, arrival: Arrival) -> PageView:
    """The page view (which came as ``own`` says) as its visit came: internal navigation takes the
    visit's referrer, campaign and source."""
    if own == arrival:
        return view
    return view._replace(**dict(zip(ARRIVAL_FIELDS, arrival)))


Item = Union[PageView, Record, Event, Engagement, FilteredHit]  # what the writer takes


def place(outcome: Outcome, visitors: Optional[Visitors]) -> Tuple[Optional[Item], Optional[VisitStep]]:
    """What the writer gets for a hit, live or imported: a filtered tally as it is; an accepted hit
    placed in its visit by the in-memory visitors (``Visitors.admit``); or, without visitors, an
    exported row that brings its visit's numbers along, as a record or an event. None for a
    malformed hit, or engagement for no page view seen."""
    if outcome is None or isinstance(outcome, FilteredHit):
        return outcome, None
    if visitors is not None:
        return visitors.admit(outcome)
    if outcome.event:
        return Event(outcome.event, outcome.view, outcome.props, outcome.props_first & ((1 << len(outcome.props)) - 1)), None
    return Record(outcome.view, *outcome.stored), None


###############################################################################
# Storage #####################################################################
###############################################################################

QUARTER = 15 * 60  # totals per site are kept per quarter hour: every time zone's day starts on one
ID_EPOCH = 1_577_836_800  # 2020-01-01: page view ids count seconds from here, so they fit in seven bytes
ID_SHIFT = 16  # a page view's id is its second << 16 | a sequence: rows sort by time without an index
SLICE = 128  # rows the writer handles before it yields the interpreter to the serve loop
BATCH_LIMIT = 500  # page views in one batch at most: past this the writer commits before its interval is up
HOLD_AFTER = 10_000  # hits waiting for a healthy writer past which the server stops reading requests
EPOCH_DATE = dt.date(1970, 1, 1)


ROW_METRICS = Metrics(  # what one raw row adds to each metric, in SQL: (when it counts, what it adds)
    views=("1", "1"), visitors=("first_today", "1"), visits=("visit_views > 0", "1"), bounces=("visit_views = 1", "1"),
    duration=("duration", "duration"), engaged=("engaged", "engaged"), engaged_views=("scroll IS NOT NULL", "1"), scroll=("scroll", "scroll"),
    exits=("exit", "1"), converted=("converted", "1"),
)
def row_metrics(visitors: str = "first_today") -> Metrics:
    """What one raw row adds to each metric, with the visitors of a dimension (``Dimension.visitors``)."""
    return ROW_METRICS._replace(visitors=(visitors, "1"))


def raw_metrics(visitors: str = "first_today") -> Metrics:
    """The metrics in SQL over raw rows, with the visitors of a dimension."""
    return Metrics(*(f"sum({when})" if adds == "1" else f"coalesce(sum({adds}), 0)" for when, adds in row_metrics(visitors)))


RAW_METRICS = raw_metrics()
SUMMED_METRICS = ", ".join(f"sum({name})" for name in Metrics._fields)  # SQL over daily and monthly counts


ROW_FLAGS = (("first_today", 0, 1), ("exit", 1, 1), ("converted", 2, 1), ("firsts", 3, len(VISIT_FIRSTS)))  # (name, lowest bit, bits) in ``flags``
FLAG_NAMES = tuple(name for name, _, _ in ROW_FLAGS)
FLAG_BITS = {name: bit for name, bit, _ in ROW_FLAGS}


class Combo(NamedTuple):
    """Columns of page view and event rows stored as one: the id of their combination, in a table of its own.
    Their values come together (a path with its title and host; a visit's source, referrer and campaign; a
    browser with its screen and language), so a few thousand combinations stand for millions of rows, and
    one id of a byte or two takes the place of three or four columns, each a header byte and a value."""

    table: str
    column: str
    members: Tuple[str, ...]


COMBOS = (
    Combo("pages", "page", ("path", "title", "hostname")),
    Combo("arrivals", "arrival", ("source", "referrer", "campaign", "campaign_detail")),
    Combo("devices", "device", ("agent", "screen", "language")),
)
COMBO_OF = {member: combo for combo in COMBOS for member in combo.members}
COMBO_TABLES = {combo.column: combo.table for combo in COMBOS}  # a stored combination's column -> the table of its ids (others hold string ids)
ROW_TABLES = {"pageviews": "pageview_rows", "events": "event_rows"}  # the view that shows rows whole (for exports), and the table that stores them
KEY_VIEWS = {"pageviews": "pageview_keys", "events": "event_keys"}  # the view reports scan: combinations as their ids, each flag as a column


def stored_column(column: str) -> str:
    """The stored column (and key view's) that holds a row column: its combination's, or its own."""
    combo = COMBO_OF.get(column)
    return combo.column if combo else column


def stored_columns(columns: Sequence[str]) -> List[str]:
    """Row columns as stored: a combination's members as its one column, the flags as ``flags``."""
    return [*dict.fromkeys(stored_column(column) for column in columns if column not in FLAG_NAMES), "flags"]


def store_rows_sql(table: str, columns: Sequence[str], source: str, value: Callable[[str], str] = lambda column: f"b.{column}", where: str = "") -> List[str]:
    """SQL that stores rows read from ``source`` (as ``b``, with ``columns`` as readers name them, ``value`` of
    each) in the table of ``table``'s rows: each combination not yet known, then the rows with their
    combinations' ids. A member the rows do not hold (an event's title) is the empty string, id 0."""
    statements, joins, ids = [], [], {}
    for combo in COMBOS:
        members = [value(member) if member in columns else "0" for member in combo.members]
        statements.append(f"INSERT OR IGNORE INTO {combo.table} ({', '.join(combo.members)}) SELECT DISTINCT {', '.join(members)} FROM {source} AS b{where}")
        joins.append(f"CROSS JOIN {combo.table} ON " + " AND ".join(f"{combo.table}.{member} = {sql}" for member, sql in zip(combo.members, members)))
        ids[combo.column] = f"{combo.table}.id"
    flags = " | ".join(f"({value(name)} << {bit})" for name, bit, _ in ROW_FLAGS)
    stored = stored_columns(columns)
    selected = [ids.get(column) or (flags if column == "flags" else value(column)) for column in stored]
    statements.append(f"INSERT INTO {ROW_TABLES[table]} ({', '.join(stored)}) SELECT {', '.join(selected)} FROM {source} AS b {' '.join(joins)}{where}")
    return statements


def create_row_views(conn: sqlite3.Connection, table: str, columns: Sequence[str]) -> None:
    """The views on a table's stored rows: ``table`` shows them as ``columns``, every member of a combination
    and each flag a column (for exports, and whoever reads rows whole), then the combinations' ids;
    ``KEY_VIEWS[table]`` what reports test and count, without a join (SQLite joins for every row of an
    aggregate, used or not)."""
    flags = {name: f"r.flags >> {bit} & {(1 << bits) - 1} AS {name}" for name, bit, bits in ROW_FLAGS}
    stored = [row[1] for row in conn.execute(f"PRAGMA table_info({ROW_TABLES[table]})")]
    combos = [combo for combo in COMBOS if combo.column in stored]
    whole = [flags.get(column) or (f"{COMBO_OF[column].table}.{column} AS {column}" if column in COMBO_OF else f"r.{column}") for column in columns]
    whole += [f"r.{combo.column}" for combo in combos]  # what a report's filters test (``filter_ids``)
    joins = " ".join(f"LEFT JOIN {combo.table} ON {combo.table}.id = r.{combo.column}" for combo in combos)
    conn.execute(f"CREATE VIEW {table} AS SELECT {', '.join(whole)} FROM {ROW_TABLES[table]} AS r {joins}")
    keys = [f"r.{column}" for column in stored] + list(flags.values())
    conn.execute(f"CREATE VIEW {KEY_VIEWS[table]} AS SELECT {', '.join(keys)} FROM {ROW_TABLES[table]} AS r")


def add_row_column(conn: sqlite3.Connection, table: str, definition: str) -> None:
    """Add a column to page view or event rows: to the table itself before ``compact_rows``, after it to
    the table that stores them, and to the views that show them."""
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'view' AND name = ?", (table,)).fetchone():
        conn.execute(f"ALTER TABLE {table} ADD COLUMN {definition}")
        return
    combinations = {combo.column for combo in COMBOS}  # the view shows them last, after the row's columns
    columns = [row[1] for row in conn.execute(f"PRAGMA table_info({table})") if row[1] not in combinations]
    conn.execute(f"ALTER TABLE {ROW_TABLES[table]} ADD COLUMN {definition}")
    conn.execute(f"DROP VIEW {table}")
    conn.execute(f"DROP VIEW {KEY_VIEWS[table]}")
    create_row_views(conn, table, [*columns, definition.split()[0]])


def add_sources(conn: sqlite3.Connection, progress: Callable[[str], None]) -> None:
    """Migration 2: page views and events get a source and channel, derived from the referrer they
    stored, and so do the daily and monthly counts (from their referrer counts). Only rows with a
    referrer are rewritten, a week of them per statement, with progress for a large file."""
    direct = _intern(conn, FIELD_SEPARATOR.join(("direct", "")))
    for table in ("pageviews", "events"):
        conn.execute(f"ALTER TABLE {table} ADD COLUMN source INTEGER NOT NULL DEFAULT {direct}")
    conn.execute("CREATE TEMP TABLE source_of (referrer INTEGER PRIMARY KEY, source INTEGER NOT NULL)")
    referrers = conn.execute(
        "SELECT id, value FROM strings WHERE id IN (SELECT referrer FROM pageviews UNION SELECT referrer FROM events "
        "UNION SELECT value FROM daily WHERE dim = 2 UNION SELECT value FROM monthly WHERE dim = 2)"
    ).fetchall()
    conn.executemany("INSERT INTO temp.source_of VALUES (?, ?)", [(i, _intern(conn, FIELD_SEPARATOR.join(classify_source(value)[::-1]))) for i, value in referrers])
    no_referrer = _string_id(conn, "")
    for table in ("pageviews", "events"):
        first, last = conn.execute(f"SELECT min(id), max(id) FROM {table}").fetchone()
        if first is None:
            continue
        shown = time.monotonic()
        for start in range(second_of(first), second_of(last) + 1, 7 * DAY):
            conn.execute(
                f"UPDATE {table} SET source = (SELECT source FROM temp.source_of WHERE referrer = {table}.referrer) "
                "WHERE id >= ? AND id < ? AND referrer != ?", (first_id(start), first_id(start + 7 * DAY), no_referrer),
            )
            if time.monotonic() - shown >= 1:
                shown = time.monotonic()
                progress(f"adding sources to {table}: {100 * (start - second_of(first)) // max(1, second_of(last) - second_of(first)):.0f}%")
    code, referrer_code = DIMENSION_NAMED["sources"].code, DIMENSION_NAMED["referrers"].code
    for table, period in (("daily", "day"), ("monthly", "month")):
        conn.execute(
            f"INSERT INTO {table} SELECT {period}, site, {code}, m.source, sum(views), sum(visitors), sum(visits), sum(bounces), sum(duration) FROM {table} "
            f"JOIN temp.source_of m ON m.referrer = {table}.value WHERE dim = {referrer_code} GROUP BY {period}, site, m.source"
        )
    conn.execute("DROP TABLE temp.source_of")


def resource_referrers(conn: sqlite3.Connection, progress: Callable[[str], None]) -> None:
    """Migration 5: page views and events whose referrer the sources table now knows (webmail hosts
    per country, more engines, AI chats) get that source and channel, a week of rows per statement,
    with progress. The daily and monthly source counts move with them: each referrer's counts leave
    the source its latest kept page view carried (with none kept, its host as a referral: what an
    unknown host was) and join the new one. A visitor who came by two such referrers in a day counts
    twice in the new source. Browser, OS and device cannot be re-derived: the User-Agent is never stored."""
    latest = dict(conn.execute("SELECT referrer, source FROM (SELECT referrer, source, max(id) FROM pageviews GROUP BY referrer)"))
    referrers = conn.execute(
        "SELECT id, value FROM strings WHERE id IN (SELECT referrer FROM pageviews UNION SELECT referrer FROM events "
        "UNION SELECT value FROM daily WHERE dim = 2 UNION SELECT value FROM monthly WHERE dim = 2)"
    ).fetchall()
    known = []  # (referrer, the source its counts were kept under, its source now)
    for referrer, value in referrers:
        source, channel = classify_source(value)
        if channel not in ("referral", "direct", "campaign"):
            was = latest.get(referrer) or _string_id(conn, FIELD_SEPARATOR.join(("referral", value.split("/", 1)[0])))
            known.append((referrer, was, _intern(conn, FIELD_SEPARATOR.join((channel, source)))))
    conn.execute("CREATE TEMP TABLE resourced (referrer INTEGER PRIMARY KEY, was INTEGER NOT NULL, now INTEGER NOT NULL)")
    conn.executemany("INSERT INTO temp.resourced VALUES (?, ?, ?)", known)
    for table in ("pageviews", "events"):
        first, last = conn.execute(f"SELECT min(id), max(id) FROM {table}").fetchone()
        shown = time.monotonic()
        for start in range(second_of(first), second_of(last) + 1, 7 * DAY) if first is not None else ():
            now = f"(SELECT now FROM temp.resourced WHERE referrer = {table}.referrer)"
            week = (first_id(start), first_id(start + 7 * DAY))
            conn.execute(f"UPDATE {table} SET source = {now} WHERE id >= ? AND id < ? AND source != coalesce({now}, source)", week)
            if time.monotonic() - shown >= 1:
                shown = time.monotonic()
                progress(f"re-deriving sources in {table}: {100 * (start - second_of(first)) // max(1, second_of(last) - second_of(first)):.0f}%")
    code, referrer_code, metrics = DIMENSION_NAMED["sources"].code, DIMENSION_NAMED["referrers"].code, counted_columns(conn)
    for table, period in (("daily", "day"), ("monthly", "month")):
        moves = conn.execute(
            f"SELECT r.{period}, r.site, m.was, m.now, {', '.join(f'sum(r.{name})' for name in metrics)} "
            f"FROM {table} r JOIN temp.resourced m ON m.referrer = r.value WHERE r.dim = {referrer_code} AND m.was != m.now "
            f"AND EXISTS (SELECT 1 FROM {table} o WHERE o.{period} = r.{period} AND o.site = r.site AND o.dim = {code} AND o.value = m.was) "
            f"GROUP BY r.{period}, r.site, m.was, m.now"
        ).fetchall()
        key = f"{period} = ? AND site = ? AND dim = {code} AND value = ?"
        conn.executemany(f"UPDATE {table} SET {', '.join(f'{name} = max(0, {name} - ?)' for name in metrics)} WHERE {key}",
                         [(*move[4:], *move[:3]) for move in moves])
        conn.executemany(f"DELETE FROM {table} WHERE {key} AND views = 0", [move[:3] for move in moves])
        conn.executemany(
            f"INSERT INTO {table} ({period}, site, dim, value, {', '.join(metrics)}) VALUES (?, ?, {code}, ?, {', '.join('?' * len(metrics))}) "
            f"ON CONFLICT ({period}, site, dim, value) DO UPDATE SET {', '.join(f'{name} = {name} + excluded.{name}' for name in metrics)}",
            [(move[0], move[1], move[3], *move[4:]) for move in moves],
        )
    conn.execute("DROP TABLE temp.resourced")


Migration = Callable[[sqlite3.Connection, Callable[[str], None]], None]


def counted_columns(conn: sqlite3.Connection) -> List[str]:
    """The metrics the daily and monthly counts hold at this point of the migrations (later ones add more)."""
    return [row[1] for row in conn.execute("PRAGMA table_info(daily)")][4:]


def add_text_dimension(name: str) -> Migration:
    """The migration that brings a new text dimension (``DIMENSIONS[name]``) into older databases.

    Its column defaults to the id of its empty value, interned here: every older row then shows
    the empty value, in reports and exports alike (a default that is not a string id would make the
    row's value nothing at all). Older days count all their page views under the empty value, so
    the new section adds up to the headline over any range."""

    def migration(conn: sqlite3.Connection, progress: Callable[[str], None]) -> None:
        dim = DIMENSION_NAMED[name]
        empty = _intern(conn, FIELD_SEPARATOR.join("" for _ in dim.fields))
        for table in ("pageviews", "events") if dim.in_events else ("pageviews",):
            add_row_column(conn, table, f"{dim.column} INTEGER NOT NULL DEFAULT {empty}")
        if dim.code and conn.execute("SELECT 1 FROM daily LIMIT 1").fetchone():  # a new database has no older days to speak of
            progress(f"counting older days under the new dimension {name}")
            pages = DIMENSION_NAMED["pages"].code
            sums = ", ".join(f"sum({column})" for column in counted_columns(conn))
            for table, period in (("daily", "day"), ("monthly", "month")):
                conn.execute(f"INSERT INTO {table} SELECT {period}, site, {dim.code}, {empty}, {sums} FROM {table} WHERE dim = {pages} GROUP BY {period}, site")

    return migration


def add_event_properties(conn: sqlite3.Connection, progress: Callable[[str], None]) -> None:
    """Events get their properties (a string id, the empty string's for older rows) and a bit per
    property that marks a visitor's first event with that value on the day; and an index by name,
    so that the pages not found (and a report on one event) read that event's rows only."""
    empty = _intern(conn, "")
    conn.execute(f"ALTER TABLE events ADD COLUMN props INTEGER NOT NULL DEFAULT {empty}")
    conn.execute("ALTER TABLE events ADD COLUMN props_first INTEGER NOT NULL DEFAULT 0")
    conn.execute("CREATE INDEX events_by_name ON events (name)")  # one event's rows (404s, event=) without reading every event


def add_hostnames(conn: sqlite3.Connection, progress: Callable[[str], None]) -> None:
    """Migration: page views and events get the page's hostname. Before it, a page's host was its
    site, so older rows take their site (a week of rows per statement, with progress), and older
    days count their page views under it."""
    dim = DIMENSION_NAMED["hostnames"]
    empty = _intern(conn, "")
    for table in ("pageviews", "events"):
        conn.execute(f"ALTER TABLE {table} ADD COLUMN {dim.column} INTEGER NOT NULL DEFAULT {empty}")
        first, last = conn.execute(f"SELECT min(id), max(id) FROM {table}").fetchone()
        if first is None:
            continue
        shown = time.monotonic()
        for start in range(second_of(first), second_of(last) + 1, 7 * DAY):
            conn.execute(f"UPDATE {table} SET {dim.column} = site WHERE id >= ? AND id < ?", (first_id(start), first_id(start + 7 * DAY)))
            if time.monotonic() - shown >= 1:
                shown = time.monotonic()
                progress(f"adding hostnames to {table}: {100 * (start - second_of(first)) // max(1, second_of(last) - second_of(first)):.0f}%")
    if conn.execute("SELECT 1 FROM daily LIMIT 1").fetchone():  # a new database has no older days to speak of
        progress("counting older days under their hostnames")
    pages = DIMENSION_NAMED["pages"].code
    for table, period in (("daily", "day"), ("monthly", "month")):
        conn.execute(f"INSERT INTO {table} SELECT {period}, site, {dim.code}, site, {SUMMED_METRICS} FROM {table} WHERE dim = {pages} GROUP BY {period}, site")


def note_feed_settings(conn: sqlite3.Connection, node: str, final_after: int, now: int) -> None:
    """Keep the daemon's node name and final delay in ``meta``, where the feed (``export``) reads them:
    rows carry neither. The name is the key (``node NAME``), since when the value."""
    conn.execute("DELETE FROM meta WHERE key LIKE 'node %' AND key != ?", (f"node {node}",))
    conn.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (f"node {node}", now))
    conn.execute("INSERT OR REPLACE INTO meta VALUES ('final_after', ?)", (final_after,))


def feed_settings(conn: sqlite3.Connection) -> Tuple[str, int]:
    """The node name and the final delay the daemon last served this file with (none, and the default, if never)."""
    node = conn.execute("SELECT substr(key, 6) FROM meta WHERE key LIKE 'node %' ORDER BY value DESC LIMIT 1").fetchone()
    final_after = conn.execute("SELECT value FROM meta WHERE key = 'final_after'").fetchone()
    return (node[0] if node else ""), (final_after[0] if final_after else FINAL_AFTER)


def _string_id(conn: sqlite3.Connection, value: str) -> int:
    row = conn.execute("SELECT id FROM strings WHERE value = ?", (value,)).fetchone()
    return row[0] if row else -1


def _intern(conn: sqlite3.Connection, value: str) -> int:
    conn.execute("INSERT OR IGNORE INTO strings (value) VALUES (?)", (value,))
    return conn.execute("SELECT id FROM strings WHERE value = ?", (value,)).fetchone()[0]


def visits_goals_and_exits(conn: sqlite3.Connection, progress: Callable[[str], None]) -> None:
    """Migration 6: rows say which visitor counts they open (``firsts``), whether they were the last of
    their visit (``exit``) and the first goal of the day (``converted``); the counts gain exits and
    conversions; page views gain the goals they reached. Older rows cannot be placed in visits (no visit
    is stored), so from today on a visit's source is its first page view's, and ``meta`` says since when."""
    for table in ("pageviews", "events"):
        for column in ("firsts", "exit", "converted"):
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")
    for table in ("daily", "monthly"):
        for column in ("exits", "converted"):
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")
    conn.execute("DROP INDEX monthly_by_value")
    conn.execute(
        "CREATE INDEX monthly_by_value ON monthly (dim, site, value, month, views, visitors, visits, bounces, duration, engaged, engaged_views, scroll, exits, converted)"
    )
    add_text_dimension("goals")(conn, progress)
    if conn.execute("SELECT 1 FROM pageviews LIMIT 1").fetchone():
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('visit_sources_since', ?)", (int(time.time()) // DAY,))


def compact_rows(conn: sqlite3.Connection, progress: Callable[[str], None]) -> None:
    """Migration: page view and event rows take about half the bytes. SQLite spends a header byte on every
    column, and stores 0 and 1 in no bytes: values that come together are stored as one combination
    (``COMBOS``), the four numbers of a bit or three each (``ROW_FLAGS``) as one column, ``flags``, and
    the empty string, which most campaign, goals and referrer columns hold, takes the id 0. Each table is
    copied into its new layout (``ROW_TABLES``) a week of rows per statement, with progress; views under
    the old names show the rows as they were (``create_row_views``)."""
    for combo in COMBOS:
        conn.execute(f"CREATE TABLE {combo.table} (id INTEGER PRIMARY KEY, {', '.join(f'{m} INTEGER NOT NULL' for m in combo.members)}, UNIQUE ({', '.join(combo.members)}))")
    empty = _string_id(conn, "")
    if empty > 0:
        conn.execute("UPDATE strings SET id = 0 WHERE id = ?", (empty,))
        agents = DIMENSION_NAMED["agents"].code
        for counts in ("daily", "monthly"):
            conn.execute(f"UPDATE {counts} SET value = 0 WHERE value = ? AND dim != {agents}", (empty,))
        for counts in ("daily", "monthly", "quarters", "filtered", "imported"):  # hits without a host count under the site ""
            conn.execute(f"UPDATE {counts} SET site = 0 WHERE site = ?", (empty,))
        conn.execute("UPDATE feed_log SET low = 0, high = 0 WHERE tbl = 'imported' AND low = ?", (empty,))
    else:
        conn.execute("INSERT INTO strings (id, value) VALUES (0, '')")
    numbers = {"id", "agent", *ROW_NUMBERS, "props_first"}
    for table, stored in ROW_TABLES.items():
        described = {row[1]: row for row in conn.execute(f"PRAGMA table_info({table})")}
        columns = list(described)
        declared = [f"{name} INTEGER PRIMARY KEY" if name == "id" else f"{name} INTEGER" + (" NOT NULL" if name not in described or described[name][3] else "")
                    for name in stored_columns(columns)]
        conn.execute(f"CREATE TABLE {stored} ({', '.join(declared)})")
        value = (lambda column: f"b.{column}" if column in numbers or empty <= 0 else f"CASE b.{column} WHEN {empty} THEN 0 ELSE b.{column} END")
        statements = store_rows_sql(table, columns, table, value, " WHERE b.id >= ? AND b.id < ?")
        first, last = conn.execute(f"SELECT min(id), max(id) FROM {table}").fetchone()
        shown = time.monotonic()
        for start in range(second_of(first), second_of(last) + 1, 7 * DAY) if first is not None else ():
            for statement in statements:
                conn.execute(statement, (first_id(start), first_id(start + 7 * DAY)))
            if time.monotonic() - shown >= 1:
                shown = time.monotonic()
                progress(f"compacting {table}: {100 * (start - second_of(first)) // max(1, second_of(last) - second_of(first)):.0f}%")
        conn.execute(f"DROP TABLE {table}")
        create_row_views(conn, table, columns)
    conn.execute("CREATE INDEX events_by_name ON event_rows (name)")


MIGRATIONS: Tuple[Union[str, Migration], ...] = (
    """
    CREATE TABLE strings (id INTEGER PRIMARY KEY, value TEXT NOT NULL UNIQUE);
    CREATE TABLE agents (
        id INTEGER PRIMARY KEY,
        browser TEXT NOT NULL, version TEXT NOT NULL, os TEXT NOT NULL, device TEXT NOT NULL,
        UNIQUE (browser, version, os, device));
    CREATE TABLE pageviews (
        id INTEGER PRIMARY KEY,
        site INTEGER NOT NULL, path INTEGER NOT NULL, title INTEGER NOT NULL,
        referrer INTEGER NOT NULL, country INTEGER NOT NULL, agent INTEGER NOT NULL,
        screen INTEGER NOT NULL, language INTEGER NOT NULL,
        first_today INTEGER NOT NULL, visit_views INTEGER NOT NULL, duration INTEGER NOT NULL,
        campaign INTEGER NOT NULL);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        site INTEGER NOT NULL, path INTEGER NOT NULL, name INTEGER NOT NULL,
        referrer INTEGER NOT NULL, country INTEGER NOT NULL, agent INTEGER NOT NULL,
        screen INTEGER NOT NULL, language INTEGER NOT NULL,
        first_today INTEGER NOT NULL, visit_views INTEGER NOT NULL, duration INTEGER NOT NULL,
        campaign INTEGER NOT NULL);
    CREATE TABLE daily (
        day INTEGER NOT NULL, site INTEGER NOT NULL, dim INTEGER NOT NULL, value INTEGER NOT NULL,
        views INTEGER NOT NULL, visitors INTEGER NOT NULL, visits INTEGER NOT NULL,
        bounces INTEGER NOT NULL, duration INTEGER NOT NULL,
        PRIMARY KEY (day, site, dim, value)) WITHOUT ROWID;
    CREATE TABLE monthly (
        month INTEGER NOT NULL, site INTEGER NOT NULL, dim INTEGER NOT NULL, value INTEGER NOT NULL,
        views INTEGER NOT NULL, visitors INTEGER NOT NULL, visits INTEGER NOT NULL,
        bounces INTEGER NOT NULL, duration INTEGER NOT NULL,
        PRIMARY KEY (month, site, dim, value)) WITHOUT ROWID;
    CREATE TABLE filtered (
        day INTEGER NOT NULL, site INTEGER NOT NULL, reason TEXT NOT NULL, hits INTEGER NOT NULL,
        PRIMARY KEY (day, site, reason)) WITHOUT ROWID;
    CREATE TABLE quarters (
        quarter INTEGER NOT NULL, site INTEGER NOT NULL,
        views INTEGER NOT NULL, visitors INTEGER NOT NULL, visits INTEGER NOT NULL,
        PRIMARY KEY (quarter, site)) WITHOUT ROWID;
    CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
    CREATE TABLE imports (fingerprint TEXT PRIMARY KEY, name TEXT NOT NULL, rows INTEGER NOT NULL, at INTEGER NOT NULL) WITHOUT ROWID;
    """,
    add_sources,
    """
    ALTER TABLE pageviews ADD COLUMN engaged INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE pageviews ADD COLUMN scroll INTEGER;
    ALTER TABLE events ADD COLUMN engaged INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE events ADD COLUMN scroll INTEGER;
    ALTER TABLE daily ADD COLUMN engaged INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE daily ADD COLUMN engaged_views INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE daily ADD COLUMN scroll INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE monthly ADD COLUMN engaged INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE monthly ADD COLUMN engaged_views INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE monthly ADD COLUMN scroll INTEGER NOT NULL DEFAULT 0;
    """,
    # A report adds up a year of monthly counts per value: this index holds them in that order.
    """
    CREATE INDEX monthly_by_value ON monthly (dim, site, value, month, views, visitors, visits, bounces, duration, engaged, engaged_views, scroll);
    """,
    resource_referrers,
    visits_goals_and_exits,
    # Share links: one site's report, read-only, for whoever holds the secret; only its hash is kept.
    """
    CREATE TABLE shares (id INTEGER PRIMARY KEY, site TEXT NOT NULL, hash BLOB NOT NULL UNIQUE, created INTEGER NOT NULL);
    """,
    # Notes on days (pixeld.py note): a site's, or every site's when site is empty. The same note is kept once.
    """
    CREATE TABLE annotations (id INTEGER PRIMARY KEY, date TEXT NOT NULL, site TEXT NOT NULL, text TEXT NOT NULL, UNIQUE (date, site, text));
    """,
    # Alerts raised (pixeld.py alert): one per site, direction and local day at most.
    """
    CREATE TABLE alerts (
        site TEXT NOT NULL, direction TEXT NOT NULL, date TEXT NOT NULL, hour INTEGER NOT NULL, views INTEGER NOT NULL, usual REAL NOT NULL,
        PRIMARY KEY (site, direction, date)) WITHOUT ROWID;
    """,
    add_event_properties,
    # Another tool's daily aggregates (Plausible's CSV export): per day, site, report section and the value it shows there.
    # ``section`` '' holds the day's headline numbers; ``detail`` the other part a value names (a source's channel).
    """
    CREATE TABLE imported (
        day INTEGER NOT NULL, site INTEGER NOT NULL, section TEXT NOT NULL, value TEXT NOT NULL, detail TEXT NOT NULL,
        views INTEGER NOT NULL, visitors INTEGER NOT NULL, visits INTEGER NOT NULL, bounces INTEGER NOT NULL, duration INTEGER NOT NULL,
        engaged INTEGER NOT NULL, engaged_views INTEGER NOT NULL, scroll INTEGER NOT NULL, exits INTEGER NOT NULL, converted INTEGER NOT NULL,
        PRIMARY KEY (day, site, section, value)) WITHOUT ROWID;
    """,
    add_hostnames,
    add_text_dimension("campaign_details"),
    # What each import wrote, for the feed (export --cursor-file): rows imported with old times ship on its next run, once.
    # ``tbl`` pageviews or events: ``ids`` the row ids written (``pack_ids``), from ``low`` to ``high``; ``imported``: the
    # days replaced (``pack_ids``) of the site whose string id ``low`` (and ``high``) holds. ``done`` once the import has ended.
    """
    CREATE TABLE feed_log (
        seq INTEGER PRIMARY KEY, at INTEGER NOT NULL, done INTEGER NOT NULL, tbl TEXT NOT NULL, low INTEGER NOT NULL, high INTEGER NOT NULL, ids BLOB NOT NULL);
    CREATE INDEX feed_log_by_range ON feed_log (tbl, high, low);
    """,
    compact_rows,
)
SCHEMA_VERSION = len(MIGRATIONS)
IMPORTED_COLUMNS = ("day", "site", "section", "value", "detail", *Metrics._fields)
ROW_NUMBERS = ("first_today", "visit_views", "duration", "engaged", "scroll", "firsts", "exit", "converted")  # what a raw row holds beside its dimensions
PAGEVIEW_COLUMNS = ("id", "site", *(dim.column for dim in DIMENSIONS), *ROW_NUMBERS)
EVENT_EXTRAS = ("props", "props_first")  # what an event row holds beside a page view's columns: its properties
EVENT_COLUMNS = ("id", "site", *(dim.column for dim in EVENT_DIMENSIONS), EVENT_NAMES.column, *ROW_NUMBERS, *EVENT_EXTRAS)
STORE_EVENTS = store_rows_sql("events", EVENT_COLUMNS, "temp.event_batch")  # a batch's events, from a temporary table as a reader names their columns
COUNTED_KEYS = tuple((index, dim.code) for index, dim in enumerate(DIMENSIONS, start=1) if dim.code)  # (place in a row's keys, code)
STORED_KEYS = slice(1, 2 + len(DIMENSIONS))  # a row's site and dimension ids, as ``Store._keys`` makes them
STORED_VISIT_VIEWS, STORED_DURATION, STORED_ENGAGED, STORED_SCROLL, STORED_EXIT = (
    PAGEVIEW_COLUMNS.index(name) for name in ("visit_views", "duration", "engaged", "scroll", "exit")
)
KeyGetters = Tuple[Tuple[bool, Callable[[PageView], Any]], ...]  # per stored column: (is it the agent, how to get its value)


def key_getters(dimensions: Sequence[Dimension]) -> KeyGetters:
    """How the writer gets each dimension's stored value from a PageView: a string (several fields
    joined, as a source's "search\tGoogle"), or the agent's tuple."""
    getters = []
    for dim in dimensions:
        get = operator.itemgetter(*(PageView._fields.index(field.name) for field in dim.fields))
        if len(dim.fields) > 1 and dim.column != "agent":
            get = (lambda fields: lambda view: FIELD_SEPARATOR.join(fields(view)))(get)
        getters.append((dim.column == "agent", get))
    return tuple(getters)


PAGEVIEW_KEYS, EVENT_KEYS = key_getters(DIMENSIONS), key_getters(EVENT_DIMENSIONS)


def insert_sql(table: str, columns: Sequence[str]) -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


NO_HOST = "(no host)"


class StorageError(Exception):
    """The database cannot be opened or used: reported as one line."""


def connect(path: str, readonly: bool = False, progress: Callable[[str], None] = lambda message: None) -> sqlite3.Connection:
    """Open the database: read-write (creating and migrating it), or read-only for reports."""
    if readonly and not os.path.exists(path):
        raise StorageError(f"no database at {path}")
    try:
        if readonly:
            conn = sqlite3.connect(f"file:{_uri_path(path)}?mode=ro", uri=True, check_same_thread=False)
        else:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StorageError(f"database {path} has schema version {version}, newer than this pixeld ({SCHEMA_VERSION}): upgrade pixeld.py")
        if not readonly:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            if version and version < SCHEMA_VERSION:
                progress(f"migrating the database from schema version {version} to {SCHEMA_VERSION}")
            migrate(conn, version, progress)
        elif version < SCHEMA_VERSION:
            raise StorageError(f"database {path} has schema version {version}: start the daemon once to migrate it")
    except sqlite3.Error as error:
        raise StorageError(f"cannot use database {path}: {error}") from None
    return conn


def _uri_path(path: str) -> str:
    return os.path.abspath(path).replace("?", "%3f").replace("#", "%23")


def migrate(conn: sqlite3.Connection, version: int, progress: Callable[[str], None] = lambda message: None, target: int = SCHEMA_VERSION) -> None:
    """Apply the migrations after ``version`` up to ``target``, each in one transaction with its version bump."""
    for number in range(version, target):
        conn.execute("BEGIN IMMEDIATE")
        try:
            migration = MIGRATIONS[number]
            if callable(migration):
                migration(conn, progress)
            else:
                for statement in migration.split(";"):
                    if statement.strip():
                        conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


MONTH_OF_DAY_SQL = (  # month_of_day() in SQL, for a column named day
    "(CAST(strftime('%Y', day * 86400, 'unixepoch') AS INTEGER) - 1970) * 12 + CAST(strftime('%m', day * 86400, 'unixepoch') AS INTEGER) - 1"
)


@lru_cache(maxsize=4096)
def month_of_day(day: int) -> int:
    """The UTC month (months since January 1970) of a day (days since 1970-01-01)."""
    date = EPOCH_DATE + dt.timedelta(days=day)
    return (date.year - 1970) * 12 + date.month - 1


def first_day_of_month(month: int) -> int:
    year, index = divmod(month, 12)
    return (dt.date(1970 + year, index + 1, 1) - EPOCH_DATE).days


def first_id(second: int) -> int:
    """The smallest page view id of a second (more than 65,536 views in one second spill into the next)."""
    return (second - ID_EPOCH) << ID_SHIFT


def second_of(pageview_id: int) -> int:
    return (pageview_id >> ID_SHIFT) + ID_EPOCH


FIRST_ID = first_id(0)  # below every id


def final_margin(final_after: int) -> int:
    """How much sooner than ``final_after`` the writer stops changing a row than the feed ships it: a write
    transaction that began before the feed read, and commits after, cannot have changed a row the feed shipped."""
    return min(60, max(1, final_after // 10))


def pack_ids(ids: Sequence[int]) -> bytes:
    """Row ids (or days), sorted, as the feed log keeps them: deltas, compressed (about two bytes an id)."""
    ordered = sorted(ids)
    deltas = array.array("q", [ordered[0], *(b - a for a, b in zip(ordered, ordered[1:]))]) if ordered else array.array("q")
    return zlib.compress(deltas.tobytes(), 1)


def unpack_ids(packed: bytes) -> List[int]:
    deltas = array.array("q")
    deltas.frombytes(zlib.decompress(packed))
    return list(itertools.accumulate(deltas))


@dataclasses.dataclass
class Batch:
    """What one commit writes: the writer fills it (``add``) with what ``place`` gives. Records (rows
    that bring their visits' numbers) are written as they are; imports write theirs, reduced where
    they are read, with ``Store.write_rows``."""

    views: List[Tuple[PageView, Optional[VisitStep]]] = dataclasses.field(default_factory=list)  # live, placed in their visits
    records: List[Record] = dataclasses.field(default_factory=list)  # imported, with their visits' numbers
    events: List[Event] = dataclasses.field(default_factory=list)
    engagements: List[Engagement] = dataclasses.field(default_factory=list)
    filtered: List[FilteredHit] = dataclasses.field(default_factory=list)

    def add(self, item: Item, step: Optional[VisitStep] = None) -> None:
        if isinstance(item, PageView):
            self.views.append((item, step))
        elif isinstance(item, Record):
            self.records.append(item)
        elif isinstance(item, Event):
            self.events.append(item)
        elif isinstance(item, Engagement):
            self.engagements.append(item)
        else:
            self.filtered.append(item)

    def __len__(self) -> int:
        return len(self.views) + len(self.records) + len(self.events) + len(self.engagements) + len(self.filtered)


class Store:
    """The writer's side of the database: interned strings and agents, batched inserts and counts.

    A page view row carries no identifier. ``first_today`` marks a visitor's first page view of
    the day; ``visit_views`` and ``duration`` are set only on a visit's entry row, which the
    writer updates as the visit grows. Daily counts per site and dimension, and per-site totals
    per quarter hour, are kept in step.

    Only one thread uses a Store. Its caches mirror committed rows; a failed batch clears
    them, because the rolled-back transaction may have created rows the cache still names.
    """

    def __init__(self, conn: sqlite3.Connection, shares_cpu: bool = True, final_after: int = 0, logs_writes: bool = False) -> None:
        self.conn = conn
        self._sliced: Callable[[Iterable[Any]], Iterator[Any]] = sliced if shares_cpu else iter  # an import serves no pixel: it need not yield
        self._strings: Dict[str, int] = {}
        self._agents: Dict[Tuple[str, str, str, str], int] = {}
        self._values: Dict[Union[str, Tuple[str, ...]], int] = {}  # for ``write_rows``: strings and agents alike
        self._ids = {table: TimeIds(conn, stored) for table, stored in ROW_TABLES.items()}
        self.final_after = final_after  # the daemon's: rows older than this are final, and left as they are
        self._changeable_from = FIRST_ID  # the oldest row id the batch being written may still change ...
        self._late: Set[int] = set()  # ... beside the rows it stores late, which no feed has shipped yet
        self._written: Optional[Dict[str, List[int]]] = {"pageviews": [], "events": []} if logs_writes else None  # an import's: for the feed log
        self.logged: List[int] = []  # the feed log entries this store wrote

    def write(self, batch: Batch, now: Optional[int] = None) -> None:
        """Commit a batch at once: live page views (placed in their visits), imported records, events,
        engagement and filtered hits. Given the time (the daemon's writer), rows that are final by then
        (``final_after``) stay as they are: engagement or a visit's growth that reaches them is not counted."""
        with self._committed(now) as tally:
            self._insert(batch.records, tally)
            remember = self._insert_live(batch.views, batch.engagements, tally)
            self._insert_events(batch.events, tally)
            self._tally_filtered(batch.filtered)
        remember()

    def write_rows(self, rows: Sequence["StoredValues"], events: Sequence[Event], filtered: Sequence[FilteredHit]) -> None:
        """Commit an import's batch: page views reduced to what is stored where they were read
        (``stored_values``, so that only interning is left here), events and filtered hits."""
        with self._committed() as tally:
            if rows:
                numbered = self._interned_rows(rows)
                tally.count_rows(numbered)
                self._note_written("pageviews", [row[0] for row in numbered])
            self._insert_events(events, tally)
            self._tally_filtered(filtered)

    @contextlib.contextmanager
    def _committed(self, now: Optional[int] = None) -> Iterator["Tally"]:
        """One transaction, and the counts it adds; on failure it is rolled back and the caches forgotten."""
        self.conn.execute("BEGIN IMMEDIATE")
        for ids in self._ids.values():
            ids.clear()
        self._changeable_from = first_id(now - self.final_after + final_margin(self.final_after)) if now is not None and self.final_after else FIRST_ID
        self._late.clear()
        try:
            tally = Tally(self.conn, self._sliced)
            yield tally
            tally.save()
            self._log_written()
            self.conn.execute("COMMIT")
        except BaseException:
            self._strings.clear()
            self._agents.clear()
            self._values.clear()
            if self._written is not None:
                for written in self._written.values():
                    written.clear()
            if self.conn.in_transaction:  # SQLite may have rolled back already (a full disk, say)
                self.conn.execute("ROLLBACK")
            raise

    def _interned_rows(self, rows: Sequence["StoredValues"]) -> List[Tuple[Any, ...]]:
        """Rows as ``Tally.count_rows`` takes them: an id by time, the values interned, the numbers as they are."""
        ids = self._ids["pageviews"]
        ids.load(min(row[0] for row in rows), max(row[0] for row in rows))
        get, end = self._values.get, 2 + len(PAGEVIEW_KEYS)
        numbered = []
        for row in rows:
            keys = tuple(map(get, row[1:end]))
            if None in keys:
                keys = tuple(self._value_id(value) for value in row[1:end])
            numbered.append((ids.next(row[0]), *keys, *row[end:], row[0]))
        return numbered

    def _value_id(self, value: Union[str, Tuple[str, ...]]) -> int:
        """The id of a stored value: an agent's (a tuple of its fields) or a string's."""
        found = self._values.get(value)
        if found is None:
            found = self._values[value] = self.agent(UserAgent(*value)) if isinstance(value, tuple) else self.intern(value)
        return found

    def _note_written(self, table: str, row_ids: List[int]) -> None:
        """Remember the ids a batch wrote for the feed log: all of an import's, and the daemon's stored late."""
        if self._written is not None:  # an import's: it has no final delay, so nothing it stores is late
            self._written[table].extend(row_ids)
        else:
            self._log_late(table, row_ids)

    def _log_written(self) -> None:
        """An import's batch: note the ids it wrote in the feed log, so that the feed ships them once."""
        for table, written in (self._written or {}).items():
            if written:
                self._log(table, min(written), max(written), pack_ids(written))
                written.clear()

    def _log_late(self, table: str, row_ids: Sequence[int]) -> None:
        """The daemon's rows stored so late that they are final already (the database was unavailable for
        long): the feed may have passed their seconds, so they are logged as an import's are, and ship once."""
        late = [row_id for row_id in row_ids if row_id < self._changeable_from]
        if late:
            self._log(table, min(late), max(late), pack_ids(late), done=1)
            if table == "pageviews":
                self._late.update(late)

    def _log(self, table: str, low: int, high: int, ids: bytes, done: int = 0) -> None:
        cursor = self.conn.execute("INSERT INTO feed_log (at, done, tbl, low, high, ids) VALUES (?, ?, ?, ?, ?, ?)", (int(time.time()), done, table, low, high, ids))
        if not done:
            self.logged.append(cursor.lastrowid or 0)

    def end_log(self) -> None:
        """The import has ended: what it wrote no longer changes, and the feed may ship it."""
        for first in range(0, len(self.logged), 500):
            chunk = self.logged[first : first + 500]
            self.conn.execute(f"UPDATE feed_log SET done = 1 WHERE seq IN ({', '.join('?' * len(chunk))})", chunk)
        self.logged.clear()

    def replace_imported(self, site: str, days: "Aggregates") -> Tuple[int, int]:
        """Write another tool's daily aggregates for a site in one transaction, replacing what an earlier
        import wrote for the same days (so importing again counts nothing twice). Days on which pixeld
        has page views of its own are left out: they would count twice. Returns (days written, left out)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            site_id = self.intern(site)
            own = {day for (day,) in self.conn.execute("SELECT DISTINCT day FROM daily WHERE site = ? AND dim = 1 AND views > 0", (site_id,))}
            kept = {day: values for day, values in days.items() if day not in own}
            self.conn.executemany("DELETE FROM imported WHERE day = ? AND site = ?", [(day, site_id) for day in kept])
            self.conn.executemany(insert_sql("imported", IMPORTED_COLUMNS), (
                (day, site_id, section, value, detail, *totals) for day, values in kept.items() for (section, value), (detail, totals) in values.items()
            ))
            if kept:
                self._log("imported", site_id, site_id, pack_ids(sorted(kept)), done=1)
            self.conn.execute("COMMIT")
        except BaseException:
            self._strings.clear()
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise
        return len(kept), len(days) - len(kept)

    def _insert(self, records: Sequence[Record], tally: "Tally") -> List[Tuple[int, Tuple[int, ...]]]:
        """Insert page view rows and count them (``Tally.count_rows``); return each row's id and interned keys."""
        if not records:
            return []
        ids = self._ids["pageviews"]
        ids.load(min(r.view.time for r in records), max(r.view.time for r in records))
        rows, placed = [], []
        for view, visit_views, duration, engaged, scroll, exit in self._sliced(records):
            keys = self._keys(view, PAGEVIEW_KEYS)
            row_id = ids.next(view.time)
            rows.append((row_id, *keys, int(view.first_today), visit_views, duration, engaged, scroll, view.firsts, exit, view.converted, view.time))
            placed.append((row_id, keys))
        tally.count_rows(rows)
        self._note_written("pageviews", [row_id for row_id, _ in placed])
        return placed

    def _insert_events(self, events: Sequence[Event], tally: "Tally") -> None:
        if not events:
            return
        ids = self._ids["events"]
        ids.load(min(e.view.time for e in events), max(e.view.time for e in events))
        rows = []
        for name, view, props, props_first in events:
            keys = self._keys(view, EVENT_KEYS)
            name_id = self.intern(name)
            rows.append((ids.next(view.time), *keys, name_id, int(view.first_today), 0, 0, 0, None, view.firsts, 0, view.converted,
                         self.intern(properties_text(props)), props_first))
            tally.event(view.time, keys[0], name_id, int(view.first_today), view.converted)
        self.conn.execute("DELETE FROM temp.event_batch")
        self.conn.executemany(insert_sql("temp.event_batch", EVENT_COLUMNS), rows)
        for statement in STORE_EVENTS:
            self.conn.execute(statement)
        self._note_written("events", [row[0] for row in rows])

    def _insert_live(self, views: Sequence[Tuple[PageView, Optional[VisitStep]]], engagements: Sequence[Engagement], tally: "Tally") -> Callable[[], None]:
        """Insert live page views, add engagement to the page views it belongs to, then bring the entry
        rows of growing visits up to date; return what to remember once the transaction has committed.

        Memory holds only where each visit's first page view and latest page views were written; what
        they show so far is read back from their rows."""
        placed = self._insert([Record(view, int(step is not None and step.views == 1), exit=1) for view, step in views], tally)
        entries: Entries = {}  # a visit begun in this batch -> its entry row, and the step that wrote it
        targets: Dict[int, List[int]] = {}  # a growing visit's entry row -> [page views, duration, day] it should show
        followed: List[int] = []  # page views that another of their visit's came after: no longer its exit
        for (view, step), (row_id, _) in self._sliced(zip(views, placed)):
            if step is None or step.generation is None:
                continue
            if step.previous is not None:
                offset = step.generation.page_row_of(*step.previous)
                if offset is not None:
                    followed.append(first_id(step.previous[1]) + offset)
            step.generation.wrote_page(step.slot, view.time, row_id - first_id(view.time))
            if step.views == 1:
                entries[step.visit] = (row_id, step)
            else:
                _grow(targets, entries, step, step.views, step.duration)
        self._engage(engagements, entries, targets, tally)
        self._grow_visits(targets, tally)
        self._no_longer_exits(followed, tally)

        def remember() -> None:
            for row_id, step in self._sliced(entries.values()):
                step.generation.wrote_entry(step.number, step.start, row_id - first_id(step.start))  # type: ignore[union-attr]

        return remember

    def _engage(self, engagements: Sequence[Engagement], entries: "Entries", targets: Dict[int, List[int]], tally: "Tally") -> None:
        """Add engaged seconds (capped per page view) and the deepest scroll to each page view's row and
        counts, on the page view's day; a later, deeper scroll adds only the difference. The visit then
        lasts at least until the end of that engagement."""
        batch: Dict[int, Tuple[float, int, Engagement]] = {}  # page view row -> (seconds to add, deepest scroll, latest beacon)
        for engagement in engagements:
            offset = engagement.generation.page_row_of(engagement.slot, engagement.time)
            if offset is None:  # its page view was never written, or is no longer remembered
                continue
            row_id = first_id(engagement.time) + offset
            added, deepest, _ = batch.get(row_id, (0.0, -1, engagement))
            batch[row_id] = (added + engagement.seconds, max(deepest, engagement.scroll), engagement)
        stored = self._stored(batch)
        updates = []
        for row_id, (added, deepest, engagement) in batch.items():
            row = stored.get(row_id)
            if row is None:
                continue
            engaged, scroll = row[STORED_ENGAGED], row[STORED_SCROLL]
            total, deepest = min(MAX_ENGAGED, engaged + round(added)), max(deepest, -1 if scroll is None else scroll)
            updates.append((total, deepest, row_id))
            tally.engagement(engagement.time // DAY, row[STORED_KEYS], total - engaged, int(scroll is None), deepest - (scroll or 0))
            _grow(targets, entries, engagement, 0, engagement.time + total - engagement.start)
        self.conn.executemany("UPDATE pageview_rows SET engaged = ?, scroll = ? WHERE id = ?", updates)

    def _grow_visits(self, targets: Dict[int, List[int]], tally: "Tally") -> None:
        """Bring each growing visit's entry row, and its day's counts, up to the visit's page views and duration."""
        stored = self._stored(targets)
        updates = []
        for row_id, (views, duration, day) in self._sliced(targets.items()):
            row = stored.get(row_id)
            if row is None or not row[STORED_VISIT_VIEWS]:  # deleted meanwhile, or not an entry row
                continue
            written_views, written_duration = row[STORED_VISIT_VIEWS], row[STORED_DURATION]
            views, duration = max(views, written_views), max(duration, written_duration)
            if (views, duration) == (written_views, written_duration):
                continue
            updates.append((views, duration, row_id))
            tally.visit_grew(day, row[STORED_KEYS], -1 if written_views == 1 and views > 1 else 0, duration - written_duration)
        self.conn.executemany("UPDATE pageview_rows SET visit_views = ?, duration = ? WHERE id = ?", updates)

    def _no_longer_exits(self, row_ids: Sequence[int], tally: "Tally") -> None:
        """A visit's exit is its last page view: the page views that others followed lose the mark, and their counts an exit."""
        stored = self._stored(row_ids)
        updates = []
        for row_id in row_ids:
            row = stored.get(row_id)
            if row is not None and row[STORED_EXIT]:
                updates.append((row_id,))
                tally.grew(second_of(row_id) // DAY, row[STORED_KEYS], (("exits", -1),))
        self.conn.executemany(f"UPDATE pageview_rows SET flags = flags & ~{1 << FLAG_BITS['exit']} WHERE id = ?", updates)

    def _stored(self, row_ids: Iterable[int]) -> Dict[int, Tuple[Any, ...]]:
        """Page view rows by id, as written so far (in this transaction too), in ``PAGEVIEW_COLUMNS`` order;
        only those the batch may still change (a final row is left out, as a deleted one is)."""
        ids, found = [row_id for row_id in row_ids if row_id >= self._changeable_from or row_id in self._late], {}
        for first in range(0, len(ids), 500):
            chunk = ids[first : first + 500]
            for row in self.conn.execute(f"SELECT {', '.join(PAGEVIEW_COLUMNS)} FROM pageviews WHERE id IN ({', '.join('?' * len(chunk))})", chunk):
                found[row[0]] = row
        return found

    def prune(self, before: int, chunk: int = 50_000) -> int:
        """Delete page views older than ``before``, a chunk per transaction so the writer never
        stalls for long; the counts stay, so unfiltered reports still cover those days."""
        deleted = 0
        while True:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                count = self.conn.execute(
                    "DELETE FROM pageview_rows WHERE id IN (SELECT id FROM pageview_rows WHERE id < ? ORDER BY id LIMIT ?)", (first_id(before), chunk)
                ).rowcount
                if count < chunk:
                    self.conn.execute(
                        "INSERT INTO meta VALUES ('pruned_before', ?) ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)", (before,)
                    )
                self.conn.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
            deleted += count
            if count < chunk:
                return deleted

    def _keys(self, view: PageView, getters: KeyGetters) -> Tuple[int, ...]:
        """Interned ids: the site, then one per dimension (the writer's hot path: the caches answer
        almost always, ``intern`` and ``agent`` only on a miss)."""
        strings, agents = self._strings, self._agents
        site = strings.get(view.site)
        keys = [self.intern(view.site) if site is None else site]
        for is_agent, value_of in getters:
            value = value_of(view)
            found = agents.get(value) if is_agent else strings.get(value)  # 0 is an id: the empty string's
            if found is None:
                found = self.agent(UserAgent(*value)) if is_agent else self.intern(value)
            keys.append(found)
        return tuple(keys)

    def note_goals(self, goals: Sequence[Goal], day: int) -> None:
        """Remember the day each page goal was first counted: its visitors are known from then on."""
        self.conn.executemany("INSERT OR IGNORE INTO meta VALUES (?, ?)", [(f"goal {goal.name}", day) for goal in goals if goal.kind == "path"])

    def _tally_filtered(self, hits: Sequence[FilteredHit]) -> None:
        counts: Counter = Counter()
        for hit in hits:
            counts[hit.time // DAY, self.intern(hit.site), hit.reason] += hit.count
        self.conn.executemany(
            "INSERT INTO filtered VALUES (?, ?, ?, ?) "
            "ON CONFLICT (day, site, reason) DO UPDATE SET hits = hits + excluded.hits",
            [key + (n,) for key, n in counts.items()],
        )

    def intern(self, value: str) -> int:
        found = self._strings.get(value)
        if found is None:
            found = self._strings[value] = _intern(self.conn, value)
        return found

    def agent(self, agent: UserAgent) -> int:
        key = tuple(agent)
        found = self._agents.get(key)  # type: ignore[arg-type]
        if found is None:
            self.conn.execute("INSERT OR IGNORE INTO agents (browser, version, os, device) VALUES (?, ?, ?, ?)", key)
            found = self.conn.execute(
                "SELECT id FROM agents WHERE browser = ? AND version = ? AND os = ? AND device = ?", key
            ).fetchone()[0]
            self._agents[key] = found  # type: ignore[index]
        return found


Entries = Dict[Tuple[int, int, int], Tuple[int, VisitStep]]
StoredValues = Tuple[Any, ...]  # a page view's time, its site and dimension values (``PAGEVIEW_KEYS``), then its ``ROW_NUMBERS``


def stored_dimensions(view: PageView) -> Tuple[Any, ...]:
    """A page view's site and dimension values, before interning (``PAGEVIEW_KEYS``)."""
    return (view.site, *[get(view) for _, get in PAGEVIEW_KEYS])


def stored_values(record: Record, dimensions: Callable[[PageView], Tuple[Any, ...]] = stored_dimensions) -> StoredValues:
    """A page view reduced to what is stored, before interning (``Store.write_rows``): made where an
    import reads its rows, so that the writer's process is left little more than SQLite's work.
    ``dimensions`` may remember the values of page views that repeat."""
    view = record.view
    return (view.time, *dimensions(view), int(view.first_today), record.visit_views, record.duration, record.engaged, record.scroll, view.firsts,
            record.exit, view.converted)


HeldView = Tuple[int, Tuple[Any, ...], bool, int, int]  # an imported page view held in its visit: time, ``stored_dimensions``, first_today, firsts, converted


def held_values(view: HeldView, visit_views: int = 0, duration: int = 0, exit: int = 0) -> StoredValues:
    """A held page view reduced to what is stored, as ``stored_values`` reduces its ``Record`` (it reported no engagement)."""
    time, dimensions, first_today, firsts, converted = view
    return (time, *dimensions, int(first_today), visit_views, duration, 0, None, firsts, exit, converted)


Aggregates = Dict[int, Dict[Tuple[str, str], Tuple[str, Totals]]]  # day -> (section, value) -> (detail, metrics): another tool's daily counts


MAX_NOTE = 200  # characters of an annotation


class Annotation(NamedTuple):
    """A note on a day of the series (``pixeld.py note``), for one site, or for every site when ``site`` is empty."""

    id: int
    date: str  # YYYY-MM-DD: a calendar day, whichever time zone a report is shown in
    site: str
    text: str


def note_date(value: str) -> Optional[str]:
    """An ISO date between 2000 and 2099, or None."""
    try:
        day = dt.date.fromisoformat(value.strip()) if re.fullmatch(r"\s*\d{4}-\d{2}-\d{2}\s*", value) else None
    except ValueError:
        return None
    return day.isoformat() if day and 2000 <= day.year < 2100 else None


def add_annotation(conn: sqlite3.Connection, date: str, site: str, text: str) -> Tuple[int, bool]:
    """Keep a note once: the same text on the same day and site is stored once, so a second import adds
    nothing. Returns its id, and whether it is new. The text is cleaned as a visitor's would be."""
    text = clean_text(text, MAX_NOTE)
    added = conn.execute("INSERT OR IGNORE INTO annotations (date, site, text) VALUES (?, ?, ?)", (date, site, text)).rowcount == 1
    return conn.execute("SELECT id FROM annotations WHERE date = ? AND site = ? AND text = ?", (date, site, text)).fetchone()[0], added


def delete_annotation(conn: sqlite3.Connection, note_id: int) -> bool:
    return conn.execute("DELETE FROM annotations WHERE id = ?", (note_id,)).rowcount == 1


def claim_alert(conn: sqlite3.Connection, site: str, direction: str, date: str, hour: int, views: int, usual: float) -> bool:
    """Remember an alert before it is raised; False when one of this site and direction was raised that day already."""
    return conn.execute("INSERT OR IGNORE INTO alerts VALUES (?, ?, ?, ?, ?, ?)", (site, direction, date, hour, views, usual)).rowcount == 1


def release_alert(conn: sqlite3.Connection, site: str, direction: str, date: str) -> None:
    """Forget an alert that could not be sent, so that the next run raises it."""
    conn.execute("DELETE FROM alerts WHERE site = ? AND direction = ? AND date = ?", (site, direction, date))


def _grow(targets: Dict[int, List[int]], entries: Entries, seen: Union[VisitStep, Engagement], views: int, duration: int) -> None:
    """Note what a visit should show on its entry row: at least ``views`` page views and ``duration`` seconds.
    Its entry row was written in this batch, or earlier (and the visit's generation knows where)."""
    written = entries.get(seen.visit)
    entry = written[0] if written else None
    if entry is None and seen.generation is not None:
        offset = seen.generation.entry_of(seen.number, seen.start)
        entry = None if offset is None else first_id(seen.start) + offset
    if entry is not None:
        target = targets.setdefault(entry, [0, 0, seen.start // DAY])
        target[0], target[1] = max(target[0], views), max(target[1], duration)


class TimeIds:
    """Ids for one table that sort by time: second << 16 | a sequence, unique within the table.

    The committed rows of a batch's seconds are loaded once per batch; a second that overflowed
    spills into the next one, which then starts after the spill."""

    def __init__(self, conn: sqlite3.Connection, table: str) -> None:
        self.conn = conn
        self.table = table
        self._next: Dict[int, int] = {}  # second -> next free id, within the batch being written
        self._loaded: List[Tuple[int, int]] = []  # ranges of seconds whose committed ids are known

    def clear(self) -> None:
        self._next.clear()
        self._loaded.clear()

    def load(self, first: int, last: int) -> None:
        """Learn, in one query, the last committed id of every second from ``first`` to ``last``."""
        self._loaded.append((first, last))
        rows = self.conn.execute(
            f"SELECT id >> {ID_SHIFT}, max(id) FROM {self.table} WHERE id >= ? AND id < ? GROUP BY id >> {ID_SHIFT}", (first_id(first), first_id(last + 1))
        )
        for shifted, last_id in rows:
            second = shifted + ID_EPOCH
            self._next[second] = max(self._next.get(second, 0), last_id + 1)

    def next(self, second: int) -> int:
        next_id = self._next.get(second)
        if next_id is None:
            low = first_id(second)
            if not any(first <= second <= last for first, last in self._loaded):
                last = self.conn.execute(f"SELECT max(id) FROM {self.table} WHERE id >= ? AND id < ?", (low, first_id(second + 1))).fetchone()[0]
                low = low if last is None else last + 1
            next_id = max(low, self._next.get(second - 1, low))
        self._next[second] = next_id + 1
        return next_id


class Tally:
    """What one batch adds to the counts: per day (and month), site and dimension, and per quarter
    hour and site. The same page view counts in its day and in its month.

    New page views are counted by SQLite, from a temporary copy of the batch's rows: the writer's
    Python then does little per row, and leaves the interpreter to the serve loop. Changes to page
    views counted earlier (a visit that grew, engagement) and events are added up here."""

    def __init__(self, conn: sqlite3.Connection, slices: Callable[[Iterable[Any]], Iterator[Any]]) -> None:
        self.conn = conn
        self._sliced = slices
        self._daily: Dict[Tuple[int, int, int, int], Totals] = {}
        conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS changes ({', '.join(CHANGE_COLUMNS)})")
        conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS batch ({', '.join(BATCH_COLUMNS)})")
        conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS event_batch ({', '.join(EVENT_COLUMNS)})")
        conn.execute("DELETE FROM temp.changes")

    def count_rows(self, rows: Sequence[Tuple[Any, ...]]) -> None:
        """Insert page view rows (``BATCH_COLUMNS``) and count them in every dimension and quarter hour."""
        conn = self.conn
        conn.execute("DELETE FROM temp.batch")
        conn.executemany(insert_sql("temp.batch", BATCH_COLUMNS), rows)
        for statement in STORE_BATCH:
            conn.execute(statement)
        conn.execute(
            f"INSERT INTO temp.changes ({', '.join(CHANGE_COLUMNS)}) "
            + " UNION ALL ".join(f"SELECT time / {DAY}, site, {code}, {column}, {metrics} FROM temp.batch GROUP BY 1, 2, 4" for code, column, metrics in COUNTED_COLUMNS)
        )
        conn.execute(
            f"INSERT INTO quarters SELECT time / {QUARTER}, site, count(*), sum(first_today), sum(visit_views > 0) FROM temp.batch GROUP BY 1, 2 "
            "ON CONFLICT (quarter, site) DO UPDATE SET views = views + excluded.views, visitors = visitors + excluded.visitors, visits = visits + excluded.visits"
        )

    def event(self, time: int, site: int, name: int, first_today: int, converted: int) -> None:
        total = self._daily.setdefault((time // DAY, site, EVENT_NAMES.code, name), Totals())
        total.views += 1
        total.visitors += first_today
        total.converted += converted

    def engagement(self, day: int, keys: Tuple[int, ...], seconds: int, views: int, scroll: int) -> None:
        """A page view's engagement grew: count it on the page view's day."""
        self.grew(day, keys, (("engaged", seconds), ("engaged_views", views), ("scroll", scroll)))

    def visit_grew(self, day: int, keys: Tuple[int, ...], bounces: int, duration: int) -> None:
        self.grew(day, keys, (("bounces", bounces), ("duration", duration)))

    def grew(self, day: int, keys: Tuple[int, ...], changes: Sequence[Tuple[str, int]]) -> None:
        """Add changes to some metrics of a page view already counted, in every dimension it counts in."""
        site, daily = keys[0], self._daily
        for index, code in COUNTED_KEYS:
            total = daily.get((day, site, code, keys[index]))
            if total is None:
                total = daily[day, site, code, keys[index]] = Totals()
            for metric, amount in changes:
                total.grow(metric, amount)

    def save(self) -> None:
        """Add the batch's changes to the daily counts and, added up per UTC month by SQLite, to the
        monthly counts."""
        conn = self.conn
        conn.executemany(insert_sql("temp.changes", CHANGE_COLUMNS), (key + tuple(total) for key, total in self._sliced(self._daily.items())))
        added = ", ".join(f"{name} = {name} + excluded.{name}" for name in Metrics._fields)
        conn.execute(f"INSERT INTO daily SELECT day, site, dim, value, {SUMMED_METRICS} FROM temp.changes GROUP BY day, site, dim, value ON CONFLICT (day, site, dim, value) DO UPDATE SET {added}")
        conn.execute(
            f"INSERT INTO monthly SELECT {MONTH_OF_DAY_SQL} AS m, site, dim, value, {SUMMED_METRICS} FROM temp.changes GROUP BY m, site, dim, value "
            f"ON CONFLICT (month, site, dim, value) DO UPDATE SET {added}"
        )


CHANGE_COLUMNS = ("day", "site", "dim", "value", *Metrics._fields)
BATCH_COLUMNS = (*PAGEVIEW_COLUMNS, "time")  # a batch's new page view rows, with the second they count in
STORE_BATCH = store_rows_sql("pageviews", PAGEVIEW_COLUMNS, "temp.batch")  # a batch's page view rows into their stored table (``count_rows``)
COUNTED_COLUMNS = tuple((dim.code, dim.column, ", ".join(raw_metrics(dim.visitors))) for dim in COUNTED)  # what a batch counts, per dimension


def sliced(items: Iterable[Any]) -> Iterator[Any]:
    """The items, one by one, letting the serve loop have the interpreter every SLICE of them: the
    writer's batches are thousands of rows of Python, and the pixel must not wait for them."""
    for number, item in enumerate(items, 1):
        if number % SLICE == 0:
            time.sleep(0)
        yield item


def share_hash(secret: str) -> bytes:
    """What the database keeps of a share link's secret: its SHA-256 (the secret has 192 random bits, so no salt is needed)."""
    return hashlib.sha256(secret.encode("utf-8", "replace")).digest()


def add_share(conn: sqlite3.Connection, site: str, now: int) -> Tuple[int, str]:
    """A new share link for one site: its id and its secret, which is shown once and never stored."""
    secret = secrets.token_urlsafe(24)
    cursor = conn.execute("INSERT INTO shares (site, hash, created) VALUES (?, ?, ?)", (site, share_hash(secret), now))
    return cursor.lastrowid or 0, secret


def revoke_share(conn: sqlite3.Connection, share_id: int) -> bool:
    return conn.execute("DELETE FROM shares WHERE id = ?", (share_id,)).rowcount > 0


###############################################################################
# Writer: one thread, batched commits #########################################
###############################################################################


class Writer:
    """The one thread that writes: request threads hand it hits; it commits a batch at least once a
    second, and as soon as ``BATCH_LIMIT`` hits are waiting. Small batches keep the pixel's latency
    low: the serve loop waits for the interpreter while the writer turns a batch into rows, so a
    second's worth at once made every hit in that stretch wait (p99 at half load 10 ms; 3 ms now).

    When the database is healthy but the writer falls behind, ``backlogged()`` says so and the
    server stops reading new requests until the queue drains: TCP holds the clients, and no
    answered hit is dropped. A batch that fails to commit (database locked, disk full) is kept and
    tried again until it lands, so nothing acknowledged is lost; meanwhile new hits wait in
    memory, up to ``queue_limit``. Past that they are dropped, never blocking the pixel, and
    counted: the count is written as a ``dropped`` tally once the database takes writes again.
    ``close()`` drains the queue and commits before returning.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        flush_interval: float = 1.0,
        log: Callable[[str], None] = print,
        keep_days: int = 0,
        clock: Callable[[], float] = time.time,
        queue_limit: int = 100_000,
        goals: Sequence[Goal] = (),
        final_after: int = FINAL_AFTER,
    ) -> None:
        self.store = Store(conn, final_after=final_after)
        self.goals = goals
        self.flush_interval = flush_interval
        self.log = log
        self.keep_days = keep_days
        self.clock = clock
        self.queue_limit = queue_limit
        self.error = ""
        self.dropped = 0  # since start
        self._unsaved_drops = 0
        self._drops_lock = threading.Lock()
        self._pruned_day = -1
        self.last_commit = time.monotonic()
        self.commit_seconds = 0.0  # how long the last commit took
        self._pending: Deque[Tuple[Item, Optional[VisitStep]]] = deque()  # handed over, not yet in a batch
        self._wake = threading.Event()  # set when a batch's worth is pending, or to close
        self._closing = False
        self._batch_size = min(BATCH_LIMIT, max(1, queue_limit // 2))
        self._batch = Batch()  # being written, and kept until it is
        self._thread = threading.Thread(target=self._run, name="pixeld-writer", daemon=True)
        self._thread.start()

    def submit(self, hit: Item, step: Optional[VisitStep] = None) -> None:
        waiting = self.waiting()
        if waiting >= self.queue_limit and (self.error or waiting >= 2 * self.queue_limit):  # a failing database, or no server holding back
            with self._drops_lock:
                if not self.dropped:
                    self.log(f"dropping hits: {self.queue_limit:,} are waiting for the database")
                self.dropped += 1
                self._unsaved_drops += 1
            return
        self._pending.append((hit, step))
        if len(self._pending) >= self._batch_size and not self._wake.is_set():
            self._wake.set()

    def backlogged(self) -> bool:
        """Healthy but behind: the server should stop reading until the queue drains."""
        return not self.error and self.waiting() >= min(self.queue_limit, HOLD_AFTER)

    def waiting(self) -> int:
        """Hits accepted but not yet committed."""
        return len(self._pending) + len(self._batch)

    def status(self) -> str:
        if not self._thread.is_alive():
            return "the writer has stopped"
        if not self.error:
            return "ok"
        return f"degraded: {self.error}; {self.waiting():,} hits waiting, {self.dropped:,} dropped"

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        self._thread.join()
        self.store.conn.close()

    def _run(self) -> None:
        try:
            self.store.note_goals(self.goals, int(self.clock()) // DAY)
        except sqlite3.Error as error:
            self._note_error(f"cannot note the goals: {error}")
        closing = False
        while not closing:
            deadline = time.monotonic() + self.flush_interval
            closing = self._collect_until(deadline)
            self._flush(final=closing)
            self._prune_once_a_day()

    def _collect_until(self, deadline: float) -> bool:
        """Sleep until the deadline, or until a batch's worth of hits is pending, then move them into the
        batch; True when asked to close. The writer wakes once per batch, not once per hit: waking it per
        hit made it take the interpreter from the serve loop thousands of times a second."""
        if len(self._pending) < self._batch_size:
            self._wake.wait(max(0.0, deadline - time.monotonic()))
        self._wake.clear()
        closing, pending, batch = self._closing, self._pending, self._batch
        while pending and (closing or len(batch.views) < self._batch_size):
            batch.add(*pending.popleft())
        return closing

    def _flush(self, final: bool) -> None:
        """Write the batch, with the hits dropped since the last one as a tally; a batch that fails stays."""
        with self._drops_lock:
            drops, self._unsaved_drops = self._unsaved_drops, 0
        if drops:
            self._batch.add(FilteredHit(int(self.clock()), "", "dropped", drops))
        attempts = 0
        while self._batch:
            try:
                started = time.monotonic()
                self.store.write(self._batch, int(self.clock()))
                self.last_commit, self.commit_seconds = time.monotonic(), time.monotonic() - started
            except Exception as error:  # a locked or full database, or worse: keep the batch, try again
                self._note_error(f"cannot write to the database: {error}")
                attempts += 1
                if not final or attempts >= 10:
                    return
                time.sleep(0.5)
            else:
                self._batch = Batch()
                if self.error:
                    self.log("database writable again")
                self.error = ""

    def _prune_once_a_day(self) -> None:
        """With ``--keep-days N``, delete page views older than N days, at start and then daily."""
        today = int(self.clock()) // DAY
        if not self.keep_days or today == self._pruned_day:
            return
        try:
            deleted = self.store.prune((today - self.keep_days) * DAY)
        except sqlite3.Error as error:
            self._note_error(f"cannot delete old page views: {error}")
            return
        self._pruned_day = today
        if deleted:
            self.log(f"deleted {deleted:,} page views older than {self.keep_days} days; their counts stay")

    def _note_error(self, message: str) -> None:
        if message != self.error:
            self.log(message)
        self.error = message


###############################################################################
# Queries #####################################################################
###############################################################################


class Range(NamedTuple):
    """A half-open time range [start, end) in unix seconds."""

    start: int
    end: int


class Query(NamedTuple):
    """What a report counts: a time range, shown in a time zone, for one site or all, with filters."""

    range: Range
    zone: dt.tzinfo = dt.timezone.utc
    site: str = ""
    filters: Tuple[Tuple[str, str], ...] = ()  # (name, value): path, referrer, country, browser, os, device, language
    now: Optional[int] = None  # for a live report (range=realtime): the moment "visitors now" counts back from
    goals: Tuple[Goal, ...] = ()  # the operator's goals, for the Goals section and the conversion rate
    grain: str = ""  # the series' buckets (group=): hour, day, week or month; empty: chosen by the range (series_grain)


class ReportData(NamedTuple):
    query: Query
    sites: List[str]
    totals: Metrics
    previous: Metrics  # the same length of time just before the range
    filtered: Dict[str, int]
    sections: Dict[str, List[Row]]  # every section's rows, of its kind (``Section.row``), ranked by count
    grain: str  # hour, day, week or month
    series: List[Tuple[int, int, int]]  # (bucket start, page views, visitors)
    notes: List[str]
    visitors_now: Optional[int] = None  # live reports: visitors with a page view in the last five minutes
    annotations: List[Annotation] = []  # notes on the days the range touches


class Members:
    """What the combination ids of stored rows stand for (``COMBOS``): a dimension's value in each, read
    where a report needs them, once per report (a site with many paths has many combinations)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.tables: Dict[str, Dict[int, Tuple[int, ...]]] = {combo.table: {} for combo in COMBOS}

    def of(self, column: str, ids: Iterable[int]) -> Optional[Dict[int, int]]:
        """Row column ``column``'s value id by the id its stored column holds, for ``ids`` at least (None: the same id)."""
        combo = COMBO_OF.get(column)
        if combo is None:
            return None
        known, wanted = self.tables[combo.table], set(ids)
        missing = sorted(wanted - known.keys())
        for first in range(0, len(missing), 500):
            chunk = missing[first : first + 500]
            rows = self.conn.execute(f"SELECT id, {', '.join(combo.members)} FROM {combo.table} WHERE id IN ({', '.join('?' * len(chunk))})", chunk)
            known.update((row[0], row[1:]) for row in rows)
        index = combo.members.index(column)
        return {stored: known[stored][index] for stored in wanted}


class Scope(NamedTuple):
    """Which page views count: one site (or all), and SQL conditions on raw rows (empty when unfiltered)."""

    site_id: Optional[int]
    where: str  # " AND …" with each filter's ids written in
    table: str = "pageviews"  # raw rows to count: pageviews, or events (with event=)
    visitors: str = "first_today"  # what counts a visitor: with a filter on where visits came from, the first of the day that came that way

    @property
    def filtered(self) -> bool:
        return bool(self.where)


Counts = Dict[str, Dict[Tuple[int, int], Totals]]  # dimension -> (site id, value id) -> metrics (those its sections need: RAW_NEEDS)


def query_report(conn: sqlite3.Connection, query: Query) -> ReportData:
    """Count everything the query asks for.

    Unfiltered, whole UTC days come from ``daily`` and only partial days at the edges of the
    range from raw page views, so the cost grows with days and distinct values, not with
    traffic. The series comes from quarter-hour totals, which makes a day in any time zone
    exact. Filters are conditions on the raw page views, so a filtered report reads the rows
    of its range, once (``_count_matching``). All of it reads one snapshot of the database.
    """
    conn.execute("BEGIN")
    try:
        return _query_report(conn, query)
    finally:
        conn.execute("COMMIT")


def _query_report(conn: sqlite3.Connection, query: Query) -> ReportData:
    span = query.range
    scope = _scope(conn, query)
    before = Range(2 * span.start - span.end, span.start)
    days = counted_days(conn)
    counted, counted_before = with_counts(span, days), with_counts(before, days)
    previous = _totals(conn, counted_before, scope)
    if query.goals:  # the previous period's conversions are only shown beside a conversion rate
        events_before = _count(conn, counted_before, scope._replace(table="events", visitors="first_today"), (EVENT_NAMES,))["events"]
        previous = _with_event_conversions(previous, events_before)
    grain, bounds = series_bounds(span, query.zone, query.grain)
    imported = _imported(conn, span, query.zone, scope)
    if scope.filtered:
        counts, moments, totals = _count_matching(conn, counted, bounds, scope)
    else:
        counts, moments = _count(conn, counted, scope, COUNTED), None
        totals = _total(counts["pages"])
        previous = _plus(previous, _imported(conn, before, query.zone, scope).totals)
    series = _with_imported_days(_series(conn, counted, grain, bounds, scope, moments), bounds, imported, query.zone)
    counts.update(_count(conn, counted, scope._replace(table="events", visitors="first_today"), (EVENT_NAMES,)))
    totals = _plus(_with_event_conversions(totals, counts["events"]), imported.totals)
    labels = _labeller(conn, counts, multi_site=not query.site)
    sections = {**_sections(counts, labels, totals, imported.sections), **_event_details(conn, span, scope, imported.sections.get("not_found", {}))}
    sections["goals"] = _goal_rows(counts, labels, totals, query.goals)
    return ReportData(
        query=query,
        sites=_sites(conn, span, query.site, None if scope.filtered else {site for site, _ in counts["pages"]}),
        totals=totals,
        previous=previous,
        filtered=_count_filtered(conn, span, scope.site_id),
        sections=sections,
        visitors_now=None if query.now is None else _visitors_now(conn, query.now, scope),
        grain=grain,
        series=series,
        notes=_retention_notes(conn, span, scope) + _visit_notes(conn, span, query.goals) + _imported_notes(conn, span, query.zone, scope, imported),
        annotations=annotations_in(conn, span, query.zone, query.site),
    )


ImportedSections = Dict[str, Dict[str, Tuple[str, Totals]]]  # section -> value shown -> (detail, metrics)
# The report sections that imported daily aggregates (Plausible's export) feed; a report names the others.
IMPORTED_SECTIONS = (
    "pages", "entry_pages", "exit_pages", "sources", "channels", "referrers", "campaigns", "countries", "browsers", "operating_systems", "devices", "events",
    "not_found",
)


class Imported(NamedTuple):
    """Another tool's daily aggregates (``Store.replace_imported``) on the whole days of a report's range."""

    days: List[int]
    totals: Metrics  # the headline numbers
    by_day: Dict[int, Tuple[int, int]]  # page views and visitors per day, for the series
    sections: "ImportedSections"


def _imported(conn: sqlite3.Connection, span: Range, zone: dt.tzinfo, scope: Scope) -> Imported:
    """The imported daily aggregates a report adds to its own: an imported day counts when the range
    holds that whole calendar day in the report's time zone. A filtered report adds none: the
    aggregates cannot be filtered."""
    if scope.filtered:
        return Imported([], Metrics(), {}, {})
    clause, args = _site_clause(scope.site_id)
    days = [day for (day,) in conn.execute(
        f"SELECT DISTINCT day FROM imported WHERE day >= ? AND day <= ?{clause}", (span.start // DAY - 1, span.end // DAY + 1) + args,
    ) if span.start <= _local_day_start(day, zone) and _local_day_start(day + 1, zone) <= span.end]
    totals, by_day, sections = Totals(), {}, {}
    for first in range(0, len(days), 500):
        chunk = days[first : first + 500]
        marks = ",".join("?" * len(chunk))
        by_day.update((day, (views, visitors)) for day, views, visitors in conn.execute(
            f"SELECT day, sum(views), sum(visitors) FROM imported WHERE section = '' AND day IN ({marks}){clause} GROUP BY day", (*chunk, *args),
        ))
        for section, value, detail, *metrics in conn.execute(
            f"SELECT section, value, min(detail), {SUMMED_METRICS} FROM imported WHERE day IN ({marks}){clause} GROUP BY section, value",
            (*chunk, *args),
        ):
            if not section:
                totals.add(metrics)
                continue
            _, total = sections.setdefault(section, {}).setdefault(value, (detail, Totals()))
            total.add(metrics)
    return Imported(days, totals.frozen(), by_day, sections)


def _local_day_start(day: int, zone: dt.tzinfo) -> int:
    """Where a calendar day (days since 1970-01-01) begins in a time zone."""
    return local_midnight(EPOCH_DATE + dt.timedelta(days=day), zone)


def _plus(metrics: Metrics, more: Metrics) -> Metrics:
    return Metrics(*(a + b for a, b in zip(metrics, more)))


def _with_imported_days(series: "Moments", bounds: List[int], imported: Imported, zone: dt.tzinfo) -> "Moments":
    """The series with each imported day's page views and visitors in the bucket where the day begins."""
    rows = [list(row) for row in series]
    for day, (views, visitors) in imported.by_day.items():
        row = rows[bisect.bisect_right(bounds, _local_day_start(day, zone)) - 1]
        row[1] += views
        row[2] += visitors
    return [(start, views, visitors) for start, views, visitors in rows]


def _imported_notes(conn: sqlite3.Connection, span: Range, zone: dt.tzinfo, scope: Scope, imported: Imported) -> List[str]:
    """Say which days include imported aggregates, and what leaves them out: a filter, or a section the export does not carry."""
    if scope.filtered:
        unfiltered = _imported(conn, span, zone, scope._replace(where=""))
        if unfiltered.days:
            return [f"imported daily aggregates ({_day_spans(unfiltered.days)}) are not included: a filtered report counts pixeld's own page views only"]
        return []
    if not imported.days:
        return []
    missing = [SECTIONS[name][1].title for name in SECTIONS if name not in IMPORTED_SECTIONS]
    return [f"includes imported daily aggregates for {_day_spans(imported.days)}; not in {', '.join(missing)}, nor in time on page and scroll depth, "
            "which the export does not carry"]


def _day_spans(days: Sequence[int]) -> str:
    """``2024-01-01 to 2024-03-31, 2024-05-02`` for a list of day numbers."""
    spans: List[List[int]] = []
    for day in sorted(days):
        if spans and spans[-1][1] == day - 1:
            spans[-1][1] = day
        else:
            spans.append([day, day])
    return ", ".join(iso_date(first) if first == last else f"{iso_date(first)} to {iso_date(last)}" for first, last in spans)


def _with_event_conversions(totals: Metrics, events: Dict[Tuple[int, int], Totals]) -> Metrics:
    """The headline's conversions: a visitor's first goal of the day is a page view or an event."""
    return totals._replace(converted=totals.converted + sum(total.converted for total in events.values()))


LIVE_WINDOW = 5 * 60  # "visitors now": a page view in the last five minutes


def _visitors_now(conn: sqlite3.Connection, now: int, scope: Scope) -> int:
    """Visits whose last page view (their entry row's time plus duration) came in the last five minutes:
    a visitor has one visit at a time, so this counts visitors. Visits last a day at most."""
    clause, args = _raw_clause(scope)
    return conn.execute(
        f"SELECT count(*) FROM {KEY_VIEWS[scope.table]} WHERE id >= ? AND id < ? AND visit_views > 0 AND (id >> {ID_SHIFT}) + {ID_EPOCH} + duration >= ?{clause}",
        (first_id(now - DAY), first_id(now + 1), now - LIVE_WINDOW) + args,
    ).fetchone()[0]


def _total(counted: Dict[Tuple[int, int], Totals]) -> Metrics:
    return Metrics(*(sum(column) for column in zip(*counted.values()))) if counted else Metrics()


def filter_ids(name: str, value: str) -> Tuple[str, str, Tuple[str, ...]]:
    """The stored column one filter tests on a raw row, and SQL for the ids it matches: its dimension's, or of
    the combinations that hold them (``COMBOS``)."""
    column, sql, args = value_ids(name, value)
    combo = COMBO_OF.get(column)
    return (combo.column, f"SELECT id FROM {combo.table} WHERE {column} IN ({sql})", args) if combo else (column, sql, args)


def value_ids(name: str, value: str) -> Tuple[str, str, Tuple[str, ...]]:
    """The column of the dimension one filter tests, and SQL for the ids it matches, as its section says it matches."""
    dim, section = FILTERS[name]
    if section.part == "browser":  # a name, or a name and a major version: "Chrome" or "Chrome 131"
        return "agent", "SELECT id FROM agents WHERE browser = ? OR browser || ' ' || version = ?", (value, value)
    if section.part and dim.column == "agent":
        return "agent", f"SELECT id FROM agents WHERE {section.part} = ?", (value,)
    if section.part == "source":  # sources are stored as "channel\tsource", and the channels are few
        values = tuple(FIELD_SEPARATOR.join((channel, value)) for channel in CHANNELS)
        return dim.column, f"SELECT id FROM strings WHERE value IN ({', '.join('?' * len(values))})", values
    if section.part == dim.fields[0].name:  # the first of several fields ("channel\tsource"): a range of the strings' index
        return dim.column, "SELECT id FROM strings WHERE value >= ? AND value < ?", (value + FIELD_SEPARATOR, value + FIELD_SEPARATOR + "\U0010ffff")
    if section.part == dim.fields[-1].name:  # the last: among the values ever counted (stored values hold no tab)
        pattern = "*" + FIELD_SEPARATOR + re.sub(r"([*?[])", r"[\1]", value)
        return dim.column, f"SELECT id FROM strings WHERE id IN (SELECT value FROM monthly WHERE dim = {dim.code}) AND value GLOB ?", (pattern,)
    if section.match == "prefix" and value.endswith("*"):
        return dim.column, "SELECT id FROM strings WHERE value >= ? AND value < ?", (value[:-1], value[:-1] + "\U0010ffff")
    return dim.column, "SELECT id FROM strings WHERE value = ?", (value,)


def _scope(conn: sqlite3.Connection, query: Query) -> Scope:
    """Turn the filters into SQL on ``pageviews`` (on ``events`` with ``event=``). Each filter's ids
    are looked up once, here, and written into the SQL: the parts of a filtered report would each
    look them up again. SQLite tests the conditions in the order written, so the cheap equalities
    come before lookups in a set of ids."""
    site_id = _string_id(conn, query.site) if query.site else None
    if not query.filters:
        return Scope(site_id, "")
    tests = []
    for name, value in query.filters:
        column, sql, args = filter_ids(name, value)
        ids = sorted(row[0] for row in conn.execute(sql, args))
        tests.append(f"{column} = {ids[0]}" if len(ids) == 1 else f"{column} IN ({', '.join(map(str, ids))})")
    if site_id is not None:
        tests.append(f"site = {site_id}")
    tests.sort(key=lambda test: " IN (" in test)
    table = "events" if any(name == EVENT_NAMES.sections[0].filter for name, _ in query.filters) else "pageviews"
    arrivals = [FILTERS[name][0] for name, _ in query.filters if FILTERS[name][0].name in VISIT_FIRSTS]
    visitors = max(arrivals, key=lambda dim: VISIT_FIRSTS.index(dim.name)).visitors if arrivals and table == "pageviews" else "first_today"
    return Scope(site_id, "".join(" AND " + test for test in tests), table, visitors)


# What a filtered report sums per part in SQL: page views and visitors for the series, and what the pages' keys do not count.
PART_SUMS = tuple(name for name in Metrics._fields if name in ("views", "visitors") or name not in RAW_NEEDS["pages"])
REPORT_NICENESS = 10  # how much nicer than the daemon the threads that scan for a report are
MATCHED_CHUNK = 200_000  # page views a filtered report reads in one statement at most, which bounds its memory
Moments = List[Tuple[int, int, int]]  # (a moment in a series bucket, page views, visitors), counted from raw rows


def counted_days(conn: sqlite3.Connection) -> Tuple[Optional[int], Optional[int]]:
    """The first and the last UTC day the daily counts know (None, None for none): every page view and
    event lies between them, also those that ``--keep-days`` has deleted since."""
    return conn.execute("SELECT (SELECT min(day) FROM daily), (SELECT max(day) FROM daily)").fetchone()


def with_counts(span: Range, days: Tuple[Optional[int], Optional[int]]) -> Range:
    """The part of a range that can hold page views and events (``counted_days``), empty at its start when
    none can: a range over decades is counted as ``range=all`` is, not month by empty month."""
    first, last = days
    if first is None or last is None:
        return Range(span.start, span.start)
    start, end = max(span.start, first * DAY), min(span.end, (last + 1) * DAY)
    return Range(start, end) if start < end else Range(span.start, span.start)


class MatchKey(NamedTuple):
    """What a filtered report joins, one key per matching row (SQL), and how to read the keys back."""

    sql: str
    values: Tuple[Tuple[str, int, int, Tuple[Tuple[int, str], ...]], ...]  # (dimension, shift, mask, its (bit, metric)s) of each value id in a key
    amount: str = ""  # or: the metric whose amount follows each key (engaged seconds, scroll)


KEY_BITS = 62  # a packed key is a positive 64-bit integer in SQLite
KEY_COMBINATIONS = 20_000  # value combinations one packed key may take at most, so that few distinct keys come back


def match_keys(conns: Sequence[sqlite3.Connection], span: Range, site_key: str, counted: Sequence[Dimension] = COUNTED) -> List[MatchKey]:
    """Pack the stored ids of several dimensions into one integer key per matching row, above a bit for
    each metric a row may count in (a visitor, a visit, a bounce, an engaged view), so that Counter
    counts value combinations and their metrics at once. A stored column holds one dimension's id, or
    a combination's (``COMBOS``) for all its dimensions at once. Columns share a key while their ids
    fit in ``KEY_BITS`` and the product of their numbers of values in the range (from the monthly
    counts; a combination's, at most its table's) stays under ``KEY_COMBINATIONS``: the more rows a
    key stands for, the fewer keys SQLite joins and Python counts. Each metric that adds an amount
    gets a key of its own per column."""
    tables = {"strings", *COMBO_TABLES.values()}
    largest = {table: max(conn.execute(f"SELECT coalesce(max(id), 1) FROM {table}").fetchone()[0] for conn in conns) for table in tables}
    values = dict(conns[0].execute(
        "SELECT dim, count(DISTINCT value) FROM monthly WHERE month >= ? AND month < ? GROUP BY dim",
        (month_of_day(span.start // DAY), month_of_day((span.end - 1) // DAY) + 1),
    ).fetchall())
    columns: Dict[str, List[Dimension]] = {}  # stored column -> the counted dimensions it holds
    for dim in counted:
        columns.setdefault(stored_column(dim.column), []).append(dim)
    width = {column: largest[COMBO_TABLES.get(column, "strings")].bit_length() for column in columns}
    sizes = {column: min(math.prod(values.get(dim.code, 1) for dim in dims), 1 << width[column]) for column, dims in columns.items()}
    groups: List[List[str]] = []
    for column in columns:
        group = groups[-1] + [column] if groups else []
        fits = sum(width[member] for member in group) + _packed_flags(_flags([dim for member in group for dim in columns[member]]))[2] <= KEY_BITS
        if group and fits and math.prod(sizes[member] for member in group) <= KEY_COMBINATIONS:
            groups[-1] = group
        else:
            groups.append([column])
    keys = []
    for group in groups:
        flags = _flags([dim for column in group for dim in columns[column]])
        packed, position, shift = _packed_flags(flags)
        parts = []
        for column in group:
            packed.append(f"({column} << {shift})")
            for dim in columns[column]:
                metrics = row_metrics(dim.visitors)
                bits = tuple((position[getattr(metrics, metric)[0]], metric) for metric in RAW_NEEDS[dim.name] if getattr(metrics, metric)[0] in flags)
                parts.append((dim.name, shift, (1 << width[column]) - 1, bits))
            shift += width[column]
        keys.append(MatchKey(f"group_concat({site_key}({' | '.join(packed)}))", tuple(parts)))
    for column, dims in columns.items():
        for metric in dict.fromkeys(metric for dim in dims for metric in RAW_NEEDS[dim.name]):
            when, adds = getattr(ROW_METRICS, metric)
            if adds != "1":
                parts = tuple((dim.name, 0, -1, ()) for dim in dims if metric in RAW_NEEDS[dim.name])
                keys.append(MatchKey(f"group_concat(CASE WHEN {when} THEN {site_key}{column} || ' ' || {adds} END)", parts, metric))
    return keys


FLAG_CONDITIONS = {  # the conditions a row's ``flags`` answer bit for bit: a key takes those bits as they are stored
    **{name: FLAG_BITS[name] for name in ("first_today", "exit", "converted")},
    **{DIMENSION_NAMED[name].visitors: FLAG_BITS["firsts"] + index for index, name in enumerate(VISIT_FIRSTS)},
}


def _packed_flags(flags: Sequence[str]) -> Tuple[List[str], Dict[str, int], int]:
    """SQL that packs the conditions a row may count in into the low bits of a key, where each sits, and the
    bits they take: those a row's ``flags`` holds (``FLAG_CONDITIONS``) in one term, as stored from the
    lowest one used, the others above them, a bit each."""
    low = min((FLAG_CONDITIONS[when] for when in flags if when in FLAG_CONDITIONS), default=0)
    position = {when: FLAG_CONDITIONS[when] - low for when in flags if when in FLAG_CONDITIONS}
    mask, top = sum(1 << bit for bit in position.values()), max(position.values(), default=-1) + 1
    packed = [f"(flags >> {low} & {mask})"] if mask else []
    for when in flags:
        if when not in FLAG_CONDITIONS:
            packed.append(f"(({when}) << {top})")
            position[when], top = top, top + 1
    return packed, position, top


def _flags(group: Sequence[Dimension]) -> Tuple[str, ...]:
    """The conditions a row may count in (each a bit of a packed key: a visitor, a visit, a bounce, an exit)
    for the dimensions of one key; each dimension's visitors have their own (``Dimension.visitors``)."""
    needed = {getattr(row_metrics(dim.visitors), metric) for dim in group for metric in RAW_NEEDS[dim.name] if metric != "views"}
    return tuple(sorted(when for when, adds in needed if adds == "1"))


def _count_matching(conn: sqlite3.Connection, span: Range, bounds: List[int], scope: Scope) -> Tuple[Counts, Moments, Metrics]:
    """Count the rows that pass the filters, their totals and their series, in one pass over the range.

    SQLite joins one packed key per matching row and group of dimensions into a string
    (``group_concat``, see ``match_keys``) and Python's Counter counts them; the totals are the
    pages' counts, and what those lack (``PART_SUMS``) is summed in the same statement. The range
    is read in parts that end at the series' bucket edges (each part's page views and visitors are
    its share of a bucket) and hold about ``MATCHED_CHUNK`` page views at most, planned from the
    quarter-hour totals, so the strings stay small; two connections read them at once
    (``readers_for``)."""
    parts, one_site = _reading_plan(conn, span, bounds, scope)
    moments, sums = [], Counter()
    with readers_for(conn, parts) as conns:
        counted = COUNTED if scope.table == "pageviews" else tuple(dim for dim in COUNTED if dim.in_events)
        keys = match_keys(conns, span, "" if one_site is not None else "site || ':' || ", counted)
        joined: List["Counter[str]"] = [Counter() for _ in keys]  # per key: how often each key appeared (or the amounts it carried)
        sums_sql = [getattr(raw_metrics(scope.visitors), metric) for metric in PART_SUMS]
        for part, row in zip(parts, _read_parts(conns, [key.sql for key in keys] + sums_sql, scope, parts)):
            part_sums = dict(zip(PART_SUMS, (value or 0 for value in row[len(keys) :])))
            sums.update(part_sums)
            moments.append((part.start, part_sums["views"], part_sums["visitors"]))
            for key, text, found in zip(keys, row, joined):
                if text and not key.amount:
                    found.update(text.split(","))
                elif text:
                    _add_amounts(found, text)
        counts: Counts = {dim.name: {} for dim in COUNTED}
        members = Members(conns[-1])  # the newest snapshot of the two: it knows every combination either read
        for key, found in zip(keys, joined):
            _add_joined(counts, key, found, one_site, members)
    totals = _total(counts["pages"])._replace(**{metric: sums[metric] for metric in PART_SUMS})
    return counts, moments, totals


@contextlib.contextmanager
def readers_for(conn: sqlite3.Connection, parts: Sequence[Range]) -> Iterator[List[sqlite3.Connection]]:
    """The connections that read a filtered report's parts: ``conn``, and for two parts or more a
    second read-only connection to the same file, in a read transaction of its own, so that two
    cores scan at once. (Its snapshot may be a commit or two newer than ``conn``'s.)"""
    path = conn.execute("PRAGMA database_list").fetchone()[2]
    try:
        helper = connect(path, readonly=True) if len(parts) > 1 and path else None
    except StorageError:  # out of file descriptors, say: one connection reads it all
        helper = None
    if helper is None:
        yield [conn]
        return
    try:
        helper.execute("BEGIN")
        yield [conn, helper]
    finally:
        helper.close()


def _read_parts(conns: Sequence[sqlite3.Connection], columns: Sequence[str], scope: Scope, parts: Sequence[Range]) -> Iterator[Any]:
    """One row of ``columns`` (aggregates) over the rows of each part that pass the filters, in order."""
    sql = f"SELECT {', '.join(columns)} FROM {KEY_VIEWS[scope.table]} WHERE id >= ? AND id < ?{scope.where}"
    return read_parallel(conns, sql, [(first_id(part.start), first_id(part.end)) for part in parts])


def read_parallel(conns: Sequence[sqlite3.Connection], sql: str, arguments: Sequence[Tuple[Any, ...]]) -> Iterator[Any]:
    """Run ``sql`` once per set of arguments, each time on whichever connection is free, and yield the
    first rows in order while the next ones are read: SQLite reads without the GIL while Python counts."""
    free: "queue.SimpleQueue[sqlite3.Connection]" = queue.SimpleQueue()
    for conn in conns:
        free.put(conn)

    def read(args: Tuple[Any, ...]) -> Any:
        conn = free.get()
        try:
            return conn.execute(sql, args).fetchone()
        finally:
            free.put(conn)

    with concurrent.futures.ThreadPoolExecutor(len(conns), thread_name_prefix="report-reader", initializer=yield_the_cpu) as pool:
        pending: Deque["concurrent.futures.Future[Any]"] = deque()
        for args in arguments:
            pending.append(pool.submit(read, args))
            if len(pending) > len(conns):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def yield_the_cpu() -> None:
    """Lower this thread's CPU priority, so that the serve loop and the writer get a core first while a
    report scans. Only Linux keeps a priority per thread; elsewhere the report shares the CPU evenly."""
    if sys.platform.startswith("linux"):
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + REPORT_NICENESS))


def _add_joined(counts: Counts, key: MatchKey, found: "Counter[str]", one_site: Optional[int], members: Members) -> None:
    """Add what one kind of key counted (``match_keys``) to its dimensions' counts (the filtered report's
    hot loop in Python: each part's lookups are made once, and metrics are added by their index)."""
    keys = [((*map(int, text.split(":")),) if one_site is None else (one_site, int(text)), amount) for text, amount in found.items()]
    parts = [
        (counts[name], shift, mask, tuple((bit, METRIC_INDEX[metric]) for bit, metric in bits),
         members.of(DIMENSION_NAMED[name].column, {number >> shift & mask for (_, number), _ in keys}))
        for name, shift, mask, bits in key.values
    ]
    added = METRIC_INDEX[key.amount or "views"]
    for (site, number), amount in keys:
        for counted, shift, mask, bits, values in parts:
            value = number >> shift & mask
            if values is not None:
                value = values[value]
            total = counted.get((site, value))
            if total is None:
                total = counted[site, value] = Totals()
            total[added] += amount
            for bit, index in bits:
                if number >> bit & 1:
                    total[index] += amount


def _add_amounts(sums: "Counter[str]", text: str) -> None:
    """Add up the amounts a ``group_concat`` of keys and amounts carries, per key."""
    for item in text.split(","):
        key, _, amount = item.rpartition(" ")
        sums[key] = sums.get(key, 0) + int(amount)


def _reading_plan(conn: sqlite3.Connection, span: Range, bounds: List[int], scope: Scope) -> Tuple[List[Range], Optional[int]]:
    """Split a range at the series' bucket edges, and at UTC midnights into parts of about
    ``MATCHED_CHUNK`` page views (from the quarter-hour totals); and say which site all its rows
    belong to (None when several may: the quarter-hour totals know the sites of page views, not of events)."""
    site_id = scope.site_id
    clause, args = _site_clause(site_id)
    edges, start, views, sites = set(bounds[1:-1]), span.start, 0, set()
    for day, count, low, high in conn.execute(
        f"SELECT quarter / {DAY // QUARTER} AS day, sum(views), min(site), max(site) FROM quarters WHERE quarter >= ? AND quarter < ?{clause} GROUP BY day",
        (span.start // QUARTER, -(-span.end // QUARTER)) + args,
    ):
        sites.update((low, high))
        if views and views + count > MATCHED_CHUNK and start < day * DAY:
            edges.add(day * DAY)
            start, views = day * DAY, 0
        views += count
    points = sorted(edge for edge in edges if span.start < edge < span.end)
    parts = [Range(first, end) for first, end in zip([span.start] + points, points + [span.end])]
    if site_id is None and (len(sites) != 1 or scope.table != "pageviews"):
        return parts, None
    return parts, site_id if site_id is not None else sites.pop()


class Split(NamedTuple):
    """How an unfiltered range is counted: UTC months, days added or taken away, and raw partial days."""

    months: List[Tuple[int, int]]  # ranges of whole months, from ``monthly``
    days: List[Tuple[int, int, int]]  # (first day, end day, +1 or -1), from ``daily``
    raw: List[Range]  # partial days at the edges, from raw page views


def split_range(conn: sqlite3.Connection, span: Range) -> Split:
    """Plan the cheapest exact sum. A month the range covers only in part is its ``monthly`` row
    minus the days outside the range when those are fewer (or hold nothing yet, like the rest of
    the current month); else the sum of the days inside. Every count is a plain sum, so this is exact."""
    first_day, end_day = -(-span.start // DAY), span.end // DAY
    if first_day >= end_day:
        return Split([], [], [span])
    months: List[Tuple[int, int]] = []
    days: List[Tuple[int, int, int]] = []
    for month in range(month_of_day(first_day), month_of_day(end_day - 1) + 1):
        month_start, month_end = first_day_of_month(month), first_day_of_month(month + 1)
        inside = (max(first_day, month_start), min(end_day, month_end))
        outside = [part for part in ((month_start, inside[0]), (inside[1], month_end)) if part[0] < part[1]]
        outside_days = sum(end - start for start, end in outside)
        if not outside_days or not _has_days(conn, outside):
            months.append((month, month + 1))
        elif outside_days < inside[1] - inside[0]:
            months.append((month, month + 1))
            days += [(start, end, -1) for start, end in outside]
        else:
            days.append((inside[0], inside[1], 1))
    raw = [Range(span.start, first_day * DAY), Range(end_day * DAY, span.end)]
    return Split(merge_ranges(months), days, [r for r in raw if r.start < r.end])


def _has_days(conn: sqlite3.Connection, parts: List[Tuple[int, int]]) -> bool:
    return any(conn.execute("SELECT 1 FROM daily WHERE day >= ? AND day < ? LIMIT 1", part).fetchone() for part in parts)


def merge_ranges(ranges: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
    merged: List[Tuple[int, int]] = []
    for start, end in ranges:
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def _count(conn: sqlite3.Connection, span: Range, scope: Scope, dimensions: Sequence[Dimension]) -> Counts:
    """Months from ``monthly``, days from ``daily``, the rest from raw page views (see ``split_range``)."""
    counts: Counts = {dim.name: {} for dim in dimensions}
    if scope.filtered:
        _count_raw(conn, span, scope, counts)
        return counts
    split = split_range(conn, span)
    for first, end in split.months:
        _count_periods(conn, "monthly", first, end, scope.site_id, counts)
    for first, end, sign in split.days:
        _count_periods(conn, "daily", first, end, scope.site_id, counts, sign)
    for edge in split.raw:
        _count_raw(conn, edge, scope, counts)
    return counts


def _totals(conn: sqlite3.Connection, span: Range, scope: Scope) -> Metrics:
    """The headline numbers alone (for the previous period): sums, without counting per value."""
    if scope.filtered:
        return _matching_totals(conn, span, scope)
    site_clause, site_args = _site_clause(scope.site_id)
    metrics, raw_metrics = SUMMED_METRICS, ", ".join(RAW_METRICS)
    split = split_range(conn, span)
    queries = [(f"SELECT {metrics} FROM monthly WHERE month >= ? AND month < ? AND dim = 1{site_clause}", months + site_args, 1) for months in split.months]
    queries += [(f"SELECT {metrics} FROM daily WHERE day >= ? AND day < ? AND dim = 1{site_clause}", (first, end) + site_args, sign) for first, end, sign in split.days]
    queries += [(f"SELECT {raw_metrics} FROM pageview_keys WHERE id >= ? AND id < ?{site_clause}", (first_id(r.start), first_id(r.end)) + site_args, 1) for r in split.raw]
    sums = Totals()
    for sql, args, sign in queries:
        sums.add(conn.execute(sql, args).fetchone(), sign)
    return sums.frozen()


def _matching_totals(conn: sqlite3.Connection, span: Range, scope: Scope) -> Metrics:
    """The headline numbers alone of the rows that pass the filters (for the previous period), read
    in parts by two connections at once, as ``_count_matching`` reads its range."""
    parts, _ = _reading_plan(conn, span, [span.start, span.end], scope)
    sums = Totals()
    with readers_for(conn, parts) as conns:
        for row in _read_parts(conns, raw_metrics(scope.visitors), scope, parts):
            sums.add(row)
    return sums.frozen()


def _site_clause(site_id: Optional[int]) -> Tuple[str, Tuple[int, ...]]:
    return ("", ()) if site_id is None else (" AND site = ?", (site_id,))


def _add(counts: Counts, name: str, site: int, value: int, metrics: Sequence[int], sign: int = 1) -> None:
    total = counts[name].get((site, value))
    if total is None:
        total = counts[name][site, value] = Totals()
    total.add(metrics, sign)


def _count_periods(conn: sqlite3.Connection, table: str, first: int, end: int, site_id: Optional[int], counts: Counts, sign: int = 1) -> None:
    """Add up (or, with ``sign`` -1, take away) ``daily`` (days first..end) or ``monthly`` (months first..end) counts."""
    names = {dim.code: dim.name for dim in COUNTED + (EVENT_NAMES,) if dim.name in counts}
    counted = {code: counts[name] for code, name in names.items()}
    period = "day" if table == "daily" else "month"
    clause, args = _site_clause(site_id)
    for dim, site, value, *metrics in conn.execute(
        f"SELECT dim, site, value, {SUMMED_METRICS} "
        f"FROM {table} WHERE {period} >= ? AND {period} < ? AND dim IN ({','.join('?' * len(names))}){clause} GROUP BY dim, site, value",
        (first, end, *names) + args,
    ):
        if sign == 1 and (site, value) not in counted[dim]:  # sums of NOT NULL columns: numbers, taken as they are
            counted[dim][site, value] = Totals(metrics)
        else:
            _add(counts, names[dim], site, value, metrics, sign)


def _raw_clause(scope: Scope) -> Tuple[str, Tuple[Any, ...]]:
    return (scope.where, ()) if scope.where else _site_clause(scope.site_id)


def _count_raw(conn: sqlite3.Connection, span: Range, scope: Scope, counts: Counts) -> None:
    """Count raw page views. Pages get every metric (entry pages and the totals come from them);
    the other sections show page views only, which Python counts faster than SQLite can sort."""
    clause, args = _raw_clause(scope)
    bounds = (first_id(span.start), first_id(span.end)) + args
    members, read = Members(conn), {}  # dimensions of one combination share its column, and often its query
    for name in counts:
        dim = DIMENSION_NAMED[name]
        column, table = stored_column(dim.column), KEY_VIEWS[scope.table]
        if RAW_NEEDS[name] != ("views",):
            sql = f"SELECT site, {column}, {', '.join(raw_metrics(dim.visitors))} FROM {table} WHERE id >= ? AND id < ?{clause} GROUP BY site, {column}"
            rows = read.get(sql) or read.setdefault(sql, conn.execute(sql, bounds).fetchall())
        else:
            sql = f"SELECT site, {column} FROM {table} WHERE id >= ? AND id < ?{clause}"
            rows = read.get(sql) or read.setdefault(sql, [(site, value, views) for (site, value), views in Counter(conn.execute(sql, bounds)).items()])
        values = members.of(dim.column, (row[1] for row in rows))
        for site, value, *metrics in rows:
            _add(counts, name, site, value if values is None else values[value], metrics)


def _series(conn: sqlite3.Connection, span: Range, grain: str, bounds: List[int], scope: Scope, moments: Optional[Moments] = None) -> Moments:
    """Page views and visitors per minute, hour, day, week or month of the zone's calendar, between
    ``bounds`` (a filtered report has counted its ``moments`` already)."""
    rows = {start: [start, 0, 0] for start in bounds[:-1]}
    inner = Range(-(-span.start // QUARTER) * QUARTER, span.end // QUARTER * QUARTER)
    if moments is None and (inner.start >= inner.end or grain == "minute"):
        moments = list(_raw_counts(conn, [span], scope, 60 if grain == "minute" else QUARTER))
    elif moments is None:
        for start, views, visitors in _bucket_totals(conn, bounds, inner, scope.site_id):
            rows[start][1] += views
            rows[start][2] += visitors
        moments = list(_raw_counts(conn, [Range(span.start, inner.start), Range(inner.end, span.end)], scope, QUARTER))
    for when, views, visitors in moments:
        row = rows[bounds[bisect.bisect_right(bounds, max(when, span.start)) - 1]]
        row[1] += views
        row[2] += visitors
    return [(start, views, visitors) for start, views, visitors in rows.values()]


def _bucket_totals(conn: sqlite3.Connection, bounds: List[int], inner: Range, site_id: Optional[int]) -> Iterable[Tuple[int, int, int]]:
    """Sum the quarter totals per bucket in SQLite: each bucket is a range scan of the primary key, summed in a
    subquery of its own (grouping the joined rows by bucket would sort every quarter hour first)."""
    clause, args = _site_clause(site_id)
    buckets = [(start, max(start, inner.start) // QUARTER, -(-min(end, inner.end) // QUARTER)) for start, end in zip(bounds, bounds[1:]) if end > inner.start and start < inner.end]
    sums = [f"(SELECT coalesce(sum({name}), 0) FROM quarters WHERE quarter >= first AND quarter < last{clause})" for name in ("views", "visitors")]
    for i in range(0, len(buckets), 300):
        chunk = buckets[i : i + 300]
        values = ",".join("(?, ?, ?)" for _ in chunk)
        yield from conn.execute(
            f"WITH bucket(start, first, last) AS (VALUES {values}) SELECT start, {', '.join(sums)} FROM bucket",
            tuple(value for bucket in chunk for value in bucket) + args + args,
        )


def _raw_counts(conn: sqlite3.Connection, raw_parts: List[Range], scope: Scope, step: int) -> Iterable[Tuple[int, int, int]]:
    """(start of a quarter hour, or of a minute, page views, visitors) counted from raw page views."""
    clause, args = _raw_clause(scope)
    for part in raw_parts:
        if part.start < part.end:
            yield from conn.execute(
                f"SELECT ((id >> {ID_SHIFT}) + {ID_EPOCH}) / {step} * {step} AS q, count(*), sum({scope.visitors}) "
                f"FROM {KEY_VIEWS[scope.table]} WHERE id >= ? AND id < ?{clause} GROUP BY q",
                (first_id(part.start), first_id(part.end)) + args,
            )


def series_grain(span: Range) -> str:
    """Minutes up to an hour, hours up to two days, then days, weeks, months, and years past ten years
    (a range over decades would otherwise chart hundreds of months, nearly all of them before any data)."""
    days = (span.end - span.start) / DAY
    return "minute" if days <= 1 / 24 else "hour" if days <= 2 else "day" if days <= 92 else "week" if days <= 732 else "month" if days <= 3660 else "year"


GRAINS = {"hour": 3600, "day": DAY, "week": 7 * DAY, "month": 28 * DAY, "year": 365 * DAY}  # what group= takes, and each grain's shortest bucket
MAX_BUCKETS = 10_000  # a series' buckets at most: group=hour over years would be a page nobody can read


def series_bounds(span: Range, zone: dt.tzinfo, grain: str = "") -> Tuple[str, List[int]]:
    """The grain for a range (the one asked for, else chosen by its length) and its bucket edges."""
    grain = grain or series_grain(span)
    bounds = [span.start]
    while True:
        following = next_boundary(bounds[-1], grain, zone)
        if following >= span.end:
            return grain, bounds + [span.end]
        bounds.append(following)


def next_boundary(moment: int, grain: str, zone: dt.tzinfo) -> int:
    local = dt.datetime.fromtimestamp(moment, zone)
    if grain == "minute":
        return moment - moment % 60 + 60
    if grain == "hour":  # step in real hours, so a daylight saving change neither skips nor repeats one
        offset = int(local.utcoffset().total_seconds())  # type: ignore[union-attr]
        return moment - (moment + offset) % 3600 + 3600
    date = local.date()
    if grain == "day":
        date += dt.timedelta(days=1)
    elif grain == "week":
        date += dt.timedelta(days=7 - date.weekday())
    elif grain == "month":
        date = (date.replace(day=1) + dt.timedelta(days=32)).replace(day=1)
    else:
        date = dt.date(date.year + 1, 1, 1)
    return local_midnight(date, zone)


def local_midnight(date: dt.date, zone: dt.tzinfo) -> int:
    return int(dt.datetime.combine(date, dt.time(), tzinfo=zone).timestamp())


def _retention_notes(conn: sqlite3.Connection, span: Range, scope: Scope) -> List[str]:
    """Say so when the report needs page views that ``--keep-days`` has deleted."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'pruned_before'").fetchone()
    if not row or span.start >= row[0]:
        return []
    since = dt.datetime.fromtimestamp(row[0], dt.timezone.utc).strftime("%Y-%m-%d")
    if scope.filtered:
        return [f"page views before {since} UTC were deleted (--keep-days): the filtered numbers count only later ones"]
    if span.start % DAY or span.end % DAY:
        return [f"page views before {since} UTC were deleted (--keep-days): partial days before then are not counted"]
    return []


def _count_filtered(conn: sqlite3.Connection, span: Range, site_id: Optional[int]) -> Dict[str, int]:
    """Filtered hits per reason, over the days the range touches (they are only counted per day)."""
    clause, args = _site_clause(site_id)
    rows = conn.execute(
        f"SELECT reason, sum(hits) FROM filtered WHERE day >= ? AND day < ?{clause} GROUP BY reason ORDER BY reason",
        (span.start // DAY, -(-span.end // DAY)) + args,
    )
    return {reason: hits for reason, hits in rows}


def _sites(conn: sqlite3.Connection, span: Range, site: str, counted: Optional[Iterable[int]] = None) -> List[str]:
    """The sites with page views or imported days in the range: those ``counted`` (an unfiltered report's
    pages), or else those of the quarter-hour totals."""
    if site:
        return [site]
    imported = "SELECT DISTINCT site FROM imported WHERE day >= ? AND day < ?"
    days = (span.start // DAY, -(-span.end // DAY))
    if counted is not None:
        ids = set(counted).union(row[0] for row in conn.execute(imported, days))
        return [value or NO_HOST for value in sorted(_strings_by_id(conn, ids).values())]
    rows = conn.execute(
        f"SELECT value FROM strings WHERE id IN (SELECT DISTINCT site FROM quarters WHERE quarter >= ? AND quarter < ? UNION {imported}) ORDER BY value",
        (span.start // QUARTER, -(-span.end // QUARTER)) + days,
    )
    return [value or NO_HOST for (value,) in rows]


Label = Callable[[int, int], str]


def _labeller(conn: sqlite3.Connection, counts: Counts, multi_site: bool) -> Dict[str, Label]:
    """How each report section names a counted (site id, value id): its text, or a part of the agent."""
    agents = {row[0]: UserAgent(*row[1:]) for row in conn.execute("SELECT id, browser, version, os, device FROM agents")}
    ids = {site for counter in counts.values() for site, _ in counter}
    ids.update(value for name, counter in counts.items() if DIMENSION_NAMED[name].column != "agent" for _, value in counter)
    strings = _strings_by_id(conn, ids)
    many_sites = multi_site and len({site for site, _ in counts["pages"]}) > 1
    unknown = UserAgent("", "", "", "")

    def string(_site: int, value: int) -> str:
        return strings.get(value, "")

    def page(site: int, value: int) -> str:
        return (strings.get(site) or NO_HOST) + strings.get(value, "") if many_sites else strings.get(value, "")

    def agent_part(part: str) -> Label:
        if part == "browser":
            return lambda _site, value: " ".join(filter(None, agents.get(value, unknown)[:2]))
        return lambda _site, value: getattr(agents.get(value, unknown), part)

    def string_part(dim: Dimension, part: str) -> Label:
        index = [field.name for field in dim.fields].index(part)
        return lambda _site, value: (strings.get(value, "").split(FIELD_SEPARATOR) + [""] * len(dim.fields))[index]

    def label(dim: Dimension, section: Section) -> Label:
        if not section.part:
            return page if dim.name == "pages" else string
        return agent_part(section.part) if dim.column == "agent" else string_part(dim, section.part)

    return {"text": string, **{name: label(dim, section) for name, (dim, section) in COUNTED_SECTIONS.items()}}


def _sections(counts: Counts, labels: Dict[str, Label], totals: Metrics, imported: Optional["ImportedSections"] = None) -> Dict[str, List[Row]]:
    """Every section's rows, of its kind: a label's counts summed over the values that show as it
    (a browser's versions, a page on several sites), with the imported daily counts shown as it,
    ranked by count. Row kinds that name the other parts of a value (a source's channel) take them
    from its biggest value, or else from the import."""
    sections: Dict[str, List[Row]] = {}
    for name, (dim, section) in COUNTED_SECTIONS.items():
        if section.computed:
            continue
        label, kind = labels[name], section.row
        others = [(other.part, labels[other.name]) for other in dim.sections if kind.OTHERS and other.part and other.part != section.part]
        sums: Dict[str, Totals] = {}  # the counted totals of a value, until another value shows as the same (then a copy)
        copied: Set[str] = set()
        parts: Dict[str, Dict[str, str]] = {}
        counted = counts[dim.name].items()
        for (site, value), metrics in sorted(counted, key=lambda item: -item[1].views) if others else counted:
            shown = label(site, value)
            total = sums.get(shown)
            if total is None:
                sums[shown] = metrics
                parts[shown] = {part: other(site, value) for part, other in others}
                continue
            if shown not in copied:
                copied.add(shown)
                total = sums[shown] = Totals(total)
            total.add(metrics)
        for shown, (detail, metrics) in (imported or {}).get(name, {}).items():
            if shown not in copied:
                copied.add(shown)
                sums[shown] = Totals(sums.get(shown, NO_METRICS))
            sums[shown].add(metrics)
            parts.setdefault(shown, {part: detail for part, _ in others})
        rows = [(kind.make(shown, total.frozen(), totals, parts[shown]), total.views) for shown, total in sums.items()
                if (shown or section.lists_empty) and getattr(total, kind.SHOWN_BY)]
        sections[name] = [row for row, _ in sorted(rows, key=lambda item: (-item[0].count, -item[1], item[0].value))]
    return sections


def _goal_rows(counts: Counts, labels: Dict[str, Label], totals: Metrics, goals: Sequence[Goal]) -> List[Row]:
    """Each goal's visitors, completions and conversion rate. An event goal is its event's count and
    visitors; a page goal is the page views of its pages, and the page views that were a visitor's
    first of the day to reach it (the goals dimension)."""
    text = labels["text"]
    rows = []
    for goal in goals:
        if goal.kind == "event":
            reached = [total for (site, value), total in counts["events"].items() if text(site, value) == goal.pattern]
            completions, visitors = sum(total.views for total in reached), sum(total.visitors for total in reached)
        else:
            completions = sum(total.views for (site, value), total in counts["pages"].items() if goal.reached_by_path(text(site, value)))
            visitors = sum(total.views for (site, value), total in counts["goals"].items() if goal.name in text(site, value).split("\t"))
        rows.append(GoalRow(goal.name, visitors, completions, percent(visitors, totals.visitors)))
    return sorted(rows, key=lambda row: (-row.count, -row.completions, row.value))


def _visit_notes(conn: sqlite3.Connection, span: Range, goals: Sequence[Goal]) -> List[str]:
    """Say so when the range reaches back before sources were per visit, or before a page goal was set."""
    stored = dict(conn.execute("SELECT key, value FROM meta WHERE key = 'visit_sources_since' OR key LIKE 'goal %'"))
    notes = []
    since = stored.get("visit_sources_since")
    if since is not None and span.start < since * DAY:
        notes.append(f"sources before {iso_date(since)} are each page view's own (visits were not kept then): internal navigation counted as direct")
    for goal in goals:
        defined = stored.get(f"goal {goal.name}")
        if goal.kind == "path" and defined is not None and span.start < defined * DAY:
            notes.append(f"goal {goal.name} was set on {iso_date(defined)}: its visitors are counted from then on, its completions all along")
    return notes


def iso_date(day: int) -> str:
    return (EPOCH_DATE + dt.timedelta(days=day)).isoformat()
def _event_details(conn: sqlite3.Connection, span: Range, scope: Scope, imported_not_found: Dict[str, Tuple[str, Totals]]) -> Dict[str, List[Row]]:
    """The sections read from raw event rows (``EVENT_DETAILS``): the properties of the event the report
    is filtered on, and the pages not found (with those of imported days). Events are few beside page
    views, so they are read as stored, with the report's filters."""
    clause, args = _raw_clause(scope)
    bounds = (first_id(span.start), first_id(span.end)) + args
    return {
        "properties": _properties(conn, bounds, clause) if scope.table == "events" else [],
        "not_found": _not_found(conn, bounds, clause, scope.site_id is None, imported_not_found),
    }


def _properties(conn: sqlite3.Connection, bounds: Tuple[Any, ...], clause: str) -> List[Row]:
    """Each property's values: the events that carried it, and their visitors (daily uniques, summed,
    from each row's first-of-the-day bit for that property)."""
    counts: Dict[Tuple[str, str], List[int]] = {}
    no_props = _string_id(conn, "")
    for text, bits, events in conn.execute(
        f"SELECT s.value, e.props_first, count(*) FROM events e JOIN strings s ON s.id = e.props "
        f"WHERE e.id >= ? AND e.id < ? AND e.props != {no_props}{clause} GROUP BY e.props, e.props_first",
        bounds,
    ):
        for index, pair in enumerate(read_properties(text)[0]):
            total = counts.setdefault(pair, [0, 0])
            total[0] += events
            total[1] += events if bits >> index & 1 else 0
    rows = [PropertyRow.of(name, value, count, visitors) for (name, value), (count, visitors) in counts.items()]
    return sorted(rows, key=lambda row: (-row.count, row.property, row.property_value))


def _not_found(
    conn: sqlite3.Connection, bounds: Tuple[Any, ...], clause: str, many_sites: bool, imported: Dict[str, Tuple[str, Totals]]
) -> List[Row]:
    """The paths of the ``404`` events, with the referrers that led there, most first; and those of
    imported days (Plausible's daily counts of its ``404`` events by path), which name no referrer."""
    name = _string_id(conn, NOT_FOUND_EVENT)
    found = conn.execute(
        f"SELECT site, path, referrer, count(*) FROM events WHERE id >= ? AND id < ? AND name = {name}{clause} GROUP BY site, path, referrer", bounds,
    ).fetchall()
    strings = _strings_by_id(conn, {value for row in found for value in row[:3]})
    several = many_sites and len({row[0] for row in found}) > 1
    paths: Dict[str, Counter] = {}
    counts: Counter = Counter()
    for site, path, referrer, count in found:
        shown = (strings.get(site) or NO_HOST) + strings.get(path, "") if several else strings.get(path, "")
        paths.setdefault(shown, Counter())[strings.get(referrer, "") or "(direct)"] += count
        counts[shown] += count
    for path, (_, metrics) in imported.items():
        paths.setdefault(path, Counter())
        counts[path] += metrics.views
    rows = [NotFoundRow(path, counts[path], tuple(sorted(sources.items(), key=lambda item: (-item[1], item[0])))) for path, sources in paths.items()]
    return sorted((row for row in rows if row.count), key=lambda row: (-row.count, row.value))


def _strings_by_id(conn: sqlite3.Connection, ids: Iterable[int]) -> Dict[int, str]:
    wanted, found = sorted(ids), {}
    for i in range(0, len(wanted), 500):
        chunk = wanted[i : i + 500]
        marks = ",".join("?" * len(chunk))
        found.update(conn.execute(f"SELECT id, value FROM strings WHERE id IN ({marks})", chunk))
    return found


def first_day_with_data(conn: sqlite3.Connection) -> Optional[int]:
    return conn.execute("SELECT min(day) FROM (SELECT min(day) AS day FROM daily UNION ALL SELECT min(day) FROM imported)").fetchone()[0]


def views_per_site(conn: sqlite3.Connection, span: Range) -> Dict[str, int]:
    """Page views per site (by name) in a range of whole quarter hours, from the quarter-hour totals."""
    rows = conn.execute(
        "SELECT s.value, sum(q.views) FROM quarters q JOIN strings s ON s.id = q.site WHERE q.quarter >= ? AND q.quarter < ? GROUP BY q.site",
        (span.start // QUARTER, span.end // QUARTER),
    )
    return dict(rows.fetchall())


def annotations_in(conn: sqlite3.Connection, span: Range, zone: dt.tzinfo, site: str = "") -> List[Annotation]:
    """The notes on the days the range touches in its time zone: one site's and those for every site, or all."""
    first, last = (dt.datetime.fromtimestamp(moment, zone).date().isoformat() for moment in (span.start, span.end - 1))
    clause, args = (" AND site IN ('', ?)", (site,)) if site else ("", ())
    rows = conn.execute(f"SELECT id, date, site, text FROM annotations WHERE date >= ? AND date <= ?{clause} ORDER BY date, id", (first, last) + args)
    return [Annotation(*row) for row in rows]


def shared_site(conn: sqlite3.Connection, secret: str) -> Optional[str]:
    """The site a share link's secret opens, or None: found by the secret's hash, which is then
    compared in constant time."""
    wanted = share_hash(secret)
    row = conn.execute("SELECT site, hash FROM shares WHERE hash = ?", (wanted,)).fetchone()
    return row[0] if row is not None and hmac.compare_digest(row[1], wanted) else None


def list_shares(conn: sqlite3.Connection) -> List[Tuple[int, str, int]]:
    """(id, site, created) of every share link."""
    return conn.execute("SELECT id, site, created FROM shares ORDER BY id").fetchall()


def counted_site(conn: sqlite3.Connection, site: str) -> Optional[int]:
    """The id of the site a counter counts: the one named, else the only site with page views (-1
    when there is none); None when several sites have page views and none is named."""
    if site:
        return _string_id(conn, site)
    code = DIMENSION_NAMED["pages"].code
    low = conn.execute("SELECT min(site) FROM monthly WHERE dim = ?", (code,)).fetchone()[0]
    high = conn.execute("SELECT max(site) FROM monthly WHERE dim = ?", (code,)).fetchone()[0]
    if low != high:
        return None
    return -1 if low is None else low


def path_views(conn: sqlite3.Connection, path: str, site_id: int, span: Optional[Range] = None) -> int:
    """Page views of one path on one site, over all time or the whole UTC days ``span`` touches, from
    the monthly and daily counts alone: index look-ups, never a scan of page views."""
    value, code = _string_id(conn, path), DIMENSION_NAMED["pages"].code
    if value < 0 or site_id < 0:
        return 0
    key = "dim = ? AND site = ? AND value = ?"
    if span is None:
        return conn.execute(f"SELECT coalesce(sum(views), 0) FROM monthly WHERE {key}", (code, site_id, value)).fetchone()[0]
    split = split_range(conn, Range(span.start // DAY * DAY, -(-span.end // DAY) * DAY))
    views = 0
    for first, end in split.months:
        views += conn.execute(
            f"SELECT coalesce(sum(views), 0) FROM monthly WHERE {key} AND month >= ? AND month < ?", (code, site_id, value, first, end)
        ).fetchone()[0]
    for first, end, sign in split.days:
        days = tuple(range(first, end))
        views += sign * conn.execute(
            f"SELECT coalesce(sum(views), 0) FROM daily WHERE {key} AND day IN ({', '.join('?' * len(days))})", (code, site_id, value) + days
        ).fetchone()[0]
    return views


###############################################################################
# Report parameters and rendering #############################################
###############################################################################

TEXT_ROWS = 10
WIDTH = 80
CONTENT_TYPES = {"text": "text/plain; charset=utf-8", "json": "application/json", "csv": "text/csv; charset=utf-8", "html": "text/html; charset=utf-8"}
SERIES_FORMATS = {"minute": "%H:%M", "hour": "%Y-%m-%d %H:%M", "day": "%Y-%m-%d %a", "week": "%Y-%m-%d wk", "month": "%Y-%m", "year": "%Y"}
SECTION_TITLES = {name: section.title for name, (_, section) in SECTIONS.items()}
EIGHTHS = " ▏▎▍▌▋▊▉"


class ReportError(Exception):
    """A report parameter that cannot be used: answered with 400 and this one-line reason."""


class ReportRequest(NamedTuple):
    query: Query
    format: str  # text, json or csv
    limit: Optional[int]  # rows per section; None: 10 in text, all in JSON and CSV
    section: str  # one section in full, or every section
    ascii: bool  # bars of '#' and +/- for terminals without Unicode
    params: Tuple[Tuple[str, str], ...] = ()  # the query as given, for the HTML page's links
    public: bool = False  # the operator made the report public: the page says so


def parse_report_request(
    params: Dict[str, str], now: float, first_day: Callable[[], Optional[int]], zone: dt.tzinfo, goals: Sequence[Goal] = ()
) -> ReportRequest:
    """Validate every report parameter, or raise ReportError with the reason."""
    fmt = params.get("format") or "text"
    if fmt not in CONTENT_TYPES:
        raise ReportError(f"unknown format {fmt!r}: use text, json, csv or html")
    if params.get("tz"):
        try:
            zone = load_zone(params["tz"])
        except ConfigError as error:
            raise ReportError(str(error)) from None
    section = params.get("section", "")
    if section and section not in SECTION_TITLES:
        raise ReportError(f"unknown section {section!r}: use one of {', '.join(SECTION_TITLES)}")
    live = params.get("range") == "realtime"
    span = parse_range(params, now, first_day, zone)
    query = Query(span, zone, parse_site(params.get("site", "")), parse_filters(params), int(now) if live else None, tuple(goals), parse_group(params.get("group", ""), span))
    kept = tuple((name, value) for name, value in params.items() if name in LINK_PARAMS)
    return ReportRequest(query, fmt, parse_limit(params.get("limit", "")), section, params.get("ascii", "") not in ("", "0"), kept)


def parse_site(value: str) -> str:
    site = normalise_host(value) if value else ""
    if value and not site:
        raise ReportError(f"cannot parse site {value[:40]!r}: use a hostname")
    return site


def parse_filters(params: Dict[str, str]) -> Tuple[Tuple[str, str], ...]:
    """The filters given, cleaned as stored values are: ``(direct)``, ``(unknown)`` and ``(none)`` match empty values."""
    filters = []
    for name, (_, section) in FILTERS.items():
        value = clean_text(params.get(name, ""), MAX_PATH)
        if not value:
            continue
        if value in ("(direct)", "(unknown)", "(none)"):
            value = ""
        elif section.match in ("upper", "lower"):
            value = value.upper() if section.match == "upper" else value.lower()
        filters.append((name, value))
    return tuple(filters)


def parse_group(value: str, span: Range) -> str:
    """The series' grain that ``group=`` asks for: hour, day, week or month (empty: chosen by the range)."""
    if value and value not in GRAINS:
        raise ReportError(f"unknown group {value!r}: use {', '.join(GRAINS)}")
    if value and (span.end - span.start) // GRAINS[value] > MAX_BUCKETS:
        raise ReportError(f"group={value} makes more than {MAX_BUCKETS:,} points over this range: use a longer grain or a shorter range")
    return value


def parse_limit(value: str) -> Optional[int]:
    if not value:
        return None
    if not re.fullmatch(r"\d{1,6}", value) or int(value) == 0:
        raise ReportError(f"cannot parse limit {value[:20]!r}: use a whole number from 1")
    return int(value)


def parse_range(params: Dict[str, str], now: float, first_day: Callable[[], Optional[int]], zone: dt.tzinfo = dt.timezone.utc) -> Range:
    start, end, named = params.get("start", ""), params.get("end", ""), params.get("range", "")
    if named and (start or end):
        raise ReportError("give either range or start/end, not both")
    if named or not (start or end):
        return named_range(named or "30d", now, first_day, zone)
    today = dt.datetime.fromtimestamp(now, zone).date()
    end_time = parse_time(end, True, zone) if end else local_midnight(today + dt.timedelta(days=1), zone)
    start_time = parse_time(start, False, zone) if start else end_time - 30 * DAY
    if start_time >= end_time:
        raise ReportError("start must be before end")
    return Range(start_time, end_time)


def named_range(name: str, now: float, first_day: Callable[[], Optional[int]], zone: dt.tzinfo = dt.timezone.utc) -> Range:
    """Calendar ranges in the zone that end with today: ``7d`` is today and the six days before it."""
    today = dt.datetime.fromtimestamp(now, zone).date()
    tomorrow = local_midnight(today + dt.timedelta(days=1), zone)
    if name == "realtime":  # the last 30 minutes, to the end of this minute
        end = int(now) - int(now) % 60 + 60
        return Range(end - 30 * 60, end)
    if name == "today":
        return Range(local_midnight(today, zone), tomorrow)
    if name == "yesterday":
        return Range(local_midnight(today - dt.timedelta(days=1), zone), local_midnight(today, zone))
    match = re.fullmatch(r"(\d{1,4})d", name)
    if match and int(match.group(1)) > 0:
        return Range(local_midnight(today - dt.timedelta(days=int(match.group(1)) - 1), zone), tomorrow)
    if name == "month":
        return Range(local_midnight(today.replace(day=1), zone), tomorrow)
    if name == "year":
        return Range(local_midnight(today.replace(month=1, day=1), zone), tomorrow)
    if name == "all":
        first = first_day()
        start = dt.datetime.fromtimestamp(first * DAY, zone).date() if first is not None else today
        return Range(local_midnight(min(start, today), zone), tomorrow)
    raise ReportError(f"unknown range {name[:20]!r}: use realtime, today, yesterday, Nd (7d, 30d, ...), month, year or all")


def parse_time(value: str, is_end: bool, zone: dt.tzinfo = dt.timezone.utc) -> int:
    """Unix seconds, an ISO date (an end date includes that whole day) or an ISO datetime, in the zone unless it says."""
    value = value.strip()
    if re.fullmatch(r"\d{1,11}", value):
        return int(value)
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
            day = dt.datetime.strptime(value, "%Y-%m-%d").date()
            return local_midnight(day + dt.timedelta(days=1) if is_end else day, zone)
        moment = dt.datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=zone)
        return int(moment.timestamp())
    except (ValueError, OverflowError):
        raise ReportError(f"cannot parse time {value[:40]!r}: use unix seconds, 2026-11-01 or 2026-11-01T12:00:00") from None


def zone_name(zone: dt.tzinfo) -> str:
    return getattr(zone, "key", None) or "UTC"


def format_range(span: Range, zone: dt.tzinfo) -> str:
    def stamp(moment: dt.datetime) -> str:
        return moment.strftime("%Y-%m-%d" if moment.time() == dt.time() else "%Y-%m-%d %H:%M:%S")

    start, end = dt.datetime.fromtimestamp(span.start, zone), dt.datetime.fromtimestamp(span.end, zone)
    if start.time() == end.time() == dt.time():
        days = (end.date() - start.date()).days
        dates = stamp(start) if days == 1 else f"{stamp(start)} – {stamp(end - dt.timedelta(days=1))}"
        return f"{dates} {zone_name(zone)} ({days} day{'s' if days != 1 else ''})"
    return f"{stamp(start)} – {stamp(end)} {zone_name(zone)}"


def iso(seconds: int, zone: dt.tzinfo = dt.timezone.utc) -> str:
    moment = dt.datetime.fromtimestamp(seconds, zone)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ") if zone is dt.timezone.utc else moment.isoformat()


def change(current: Optional[float], previous: Optional[float]) -> Optional[int]:
    """Percent change against the previous period; None when there was nothing before (or nothing reported now)."""
    return round(100 * (current - previous) / previous) if previous and current is not None else None


def days_in(span: Range) -> int:
    return round((span.end - span.start) / DAY) or 1


def limited(rows: List[Any], request: ReportRequest, text: bool) -> List[Any]:
    limit = request.limit or (None if request.section or not text else TEXT_ROWS)
    return rows[:limit] if limit else rows


def shown_sections(report: ReportData, request: ReportRequest) -> List[str]:
    if request.section:
        return [request.section]
    filtered = {name for name, _ in report.query.filters}
    return [name for name, (_, section) in SECTIONS.items() if not section.needs or section.needs in filtered]


def render_report(conn: sqlite3.Connection, request: ReportRequest, width: int = WIDTH) -> Tuple[str, str]:
    """The report the request asks for: its text and its content type."""
    data = query_report(conn, request.query)
    renderers = {"json": render_json, "csv": render_csv, "html": render_html, "text": lambda data, request: render_text(data, request, width)}
    return renderers[request.format](data, request), CONTENT_TYPES[request.format]


def render_json(report: ReportData, request: ReportRequest) -> str:
    query = report.query
    now, before = report.totals.headline(bool(query.goals)), report.previous.headline(bool(query.goals))
    document: Dict[str, Any] = {
        "version": __version__,
        "site": query.site or None,
        "sites": report.sites,
        "start": iso(query.range.start, query.zone),
        "end": iso(query.range.end, query.zone),
        "timezone": zone_name(query.zone),
        "filters": dict(query.filters),
        **now,
        "previous": before,
        "change": {name: change(now[name], before[name]) for name in now},
        "filtered": {"total": sum(report.filtered.values()), **report.filtered},
        **({} if report.visitors_now is None else {"visitors_now": report.visitors_now}),
        "series": {
            "grain": report.grain,
            "rows": [{"start": iso(start, query.zone), "pageviews": views, "visitors": visitors} for start, views, visitors in report.series],
        },
        "annotations": [{"id": note.id, "date": note.date, "site": note.site or None, "text": note.text} for note in report.annotations],
        "sections": {},
        "notes": report.notes,
    }
    for name in shown_sections(report, request):
        document["sections"][name] = [row.json() for row in limited(report.sections[name], request, text=False)]
    return json.dumps(document, ensure_ascii=False, indent=2) + "\n"


def render_csv(report: ReportData, request: ReportRequest) -> str:
    """Long form: ``section,value,count,percent``, for spreadsheets."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["section", "value", "count", "percent"])
    for name, number in report.totals.headline(bool(report.query.goals)).items():
        writer.writerow(["totals", name, number, ""])
    for reason, hits in report.filtered.items():
        writer.writerow(["filtered", reason, hits, ""])
    for start, views, visitors in report.series:
        writer.writerow(["series", iso(start, report.query.zone), views, ""])
        writer.writerow(["series_visitors", iso(start, report.query.zone), visitors, ""])
    for note in report.annotations:
        writer.writerow(["annotation", note_label(note, report.query.site), "", ""])
    for name in shown_sections(report, request):
        for row in limited(report.sections[name], request, text=False):
            writer.writerows(row.csv(name))
    return out.getvalue()


def render_text(report: ReportData, request: ReportRequest, width: int = WIDTH) -> str:
    query = report.query
    lines = [
        f"pixeld report · {query.site or 'all sites'}" + ("" if query.site or not report.sites else f" ({', '.join(report.sites)})"),
        format_range(query.range, query.zone),
    ]
    if query.filters:
        lines.append("Filters: " + ", ".join(f"{name}={value or '(none)'}" for name, value in query.filters))
    if not request.section:
        lines += ["", *render_headline(report, request.ascii), *[f"Note: {note}" for note in report.notes]]
        lines += ["", *render_series(report, width, request.ascii)]
    for name in shown_sections(report, request):
        lines += ["", *render_section(name, report.sections[name], request, width)]
    return "\n".join(lines) + "\n"


def headline_rows(report: ReportData, ascii: bool) -> List[Tuple[str, str, str]]:
    """The headline numbers as shown: (title, value, change against the previous period)."""
    goals = bool(report.query.goals)
    now, before = report.totals.headline(goals), report.previous.headline(goals)
    shown = {
        "visitors": f"{now['visitors']:,}",
        "visits": f"{now['visits']:,}",
        "pageviews": f"{now['pageviews']:,}",
        "pages_per_visit": f"{now['pages_per_visit']:.2f}",
        "bounce_rate": f"{now['bounce_rate']:.1f}%",
        "visit_duration": format_duration(int(now["visit_duration"])),
    }
    if report.totals.engaged_views or report.previous.engaged_views:  # shown once some page view reported engagement
        shown["time_on_page"] = format_time_on_page(now["time_on_page"])
        shown["scroll_depth"] = format_scroll_depth(now["scroll_depth"])
    if goals:
        shown["conversion_rate"] = f"{now['conversion_rate']:.1f}%"
    counted = "Events" if any(name == "event" for name, _ in report.query.filters) else "Page views"
    titles = {
        "visitors": "Visitors", "visits": "Visits", "pageviews": counted, "pages_per_visit": "Pages per visit", "bounce_rate": "Bounce rate",
        "visit_duration": "Visit duration", "time_on_page": "Time on page", "scroll_depth": "Scroll depth", "conversion_rate": "Conversion rate",
    }
    return [(titles[name], value, format_change(now[name], before[name], ascii)) for name, value in shown.items()]


def render_headline(report: ReportData, ascii: bool) -> List[str]:
    lines = [f"{title:<16}{value:>10}  {changed:<7}".rstrip() for title, value, changed in headline_rows(report, ascii)]
    if days_in(report.query.range) > 1:
        lines[0] = f"{lines[0]:<37}(daily unique visitors, summed)"
    if report.visitors_now is not None:
        lines.insert(0, f"{'Visitors now':<16}{report.visitors_now:>10,}  (a page view in the last 5 minutes)")
    lines.append(f"{'Filtered':<16}{sum(report.filtered.values()):>10,}" + filtered_breakdown(report.filtered))
    return lines


def format_change(current: Optional[float], previous: Optional[float], ascii: bool) -> str:
    percent_change = change(current, previous)
    if percent_change is None:
        return "new" if current else ""
    if ascii:
        return f"{percent_change:+d}%"
    return f"{'▲' if percent_change > 0 else '▼' if percent_change < 0 else '='} {abs(percent_change)}%"


def filtered_breakdown(filtered: Dict[str, int]) -> str:
    parts = [f"{label} {filtered[reason]:,}" for reason, (label, _) in FILTER_REASONS.items() if filtered.get(reason)]
    return f"  ({', '.join(parts)})" if parts else ""


def render_series(report: ReportData, width: int, ascii: bool) -> List[str]:
    zone = report.query.zone
    formats = SERIES_FORMATS
    bar_width = width - 16 - 1 - 10 - 10
    largest = max((views for _, views, _ in report.series), default=0)
    lines = [f"{'Page views per ' + report.grain:<{width - 20}}{'Views':>10}{'Visitors':>10}"]
    marked = annotations_by_bucket(report)
    for start, views, visitors in report.series:
        label = dt.datetime.fromtimestamp(start, zone).strftime(formats[report.grain])
        lines.append(f"{label:<16} {bar(views, largest, bar_width, ascii):<{bar_width}}{views:>10,}{visitors:>10,}")
        lines += [f"{'':<16} {'*' if ascii else '◆'} {cut(note_label(note, report.query.site), width - 19)}" for note in marked.get(start, ())]
    return lines


def annotations_by_bucket(report: ReportData) -> Dict[int, List[Annotation]]:
    """The notes under the series bucket their day starts in (the first bucket, for a day the range starts within)."""
    starts = [start for start, _, _ in report.series]
    marked: Dict[int, List[Annotation]] = {}
    for note in report.annotations:
        moment = max(local_midnight(dt.date.fromisoformat(note.date), report.query.zone), report.query.range.start)
        index = bisect.bisect_right(starts, moment) - 1
        if index >= 0:
            marked.setdefault(starts[index], []).append(note)
    return marked


def note_label(note: Annotation, report_site: str) -> str:
    """A note as shown: its day and text, with its site on a report of every site."""
    return f"{note.date} {note.site + ': ' if note.site and not report_site else ''}{note.text}"


def bar(value: int, largest: int, width: int, ascii: bool) -> str:
    """A horizontal bar scaled to the largest value, in eighths of a character (or whole '#')."""
    if not largest or not value:
        return ""
    if ascii:
        return "#" * max(1, round(width * value / largest))
    eighths = max(1, round(8 * width * value / largest))
    return "█" * (eighths // 8) + EIGHTHS[eighths % 8].strip()


def render_section(name: str, rows: List[Row], request: ReportRequest, width: int) -> List[str]:
    """A section as an aligned table: its value, cut to fit, then its kind's columns."""
    section = SECTIONS[name][1]
    shown = limited(rows, request, text=True)
    columns = text_columns(section.row, rows)
    label_width = width - sum(column_width for _, column_width in columns)
    lines = [f"{section.title:<{label_width}}" + "".join(header.rjust(column_width) for header, column_width in columns)]
    for row in shown:
        cells = "".join(cell.rjust(column_width) for cell, (_, column_width) in zip(row.cells(), columns))
        lines.append(f"{cut(row.value or section.empty, label_width - 2):<{label_width}}{cells}")
    if len(rows) > len(shown):
        lines.append(f"… and {len(rows) - len(shown):,} more")
    return lines if rows else lines + [section.nothing]


LINK_PARAMS = ("range", "start", "end", "tz", "site", "limit", "section", "group", *FILTERS)  # what the page's links carry over
RANGE_LINKS = ("realtime", "today", "yesterday", "7d", "30d", "month", "year", "all")
SIDE_BY_SIDE = (  # on a wide screen sections sit two by two, in this order (the others follow, as listed); a phone shows them one below the other
    ("pages", "sources"), ("entry_pages", "channels"), ("referrers", "campaigns"), ("campaign_content", "campaign_terms"), ("countries", "devices"),
    ("browsers", "operating_systems"), ("screens", "languages"), ("hostnames", "events"),
)
WIDE_ORDER = {name: place for place, name in enumerate(name for pair in SIDE_BY_SIDE for name in pair)}
PAGE_STYLE = """
:root{--fg:#1d1f21;--muted:#5f6368;--bg:#fff;--line:#e3e3e3;--bar:#dbe8ff;--accent:#1a56db;--chart:#3b82f6}
@media (prefers-color-scheme:dark){:root{--fg:#e8e8e8;--muted:#a0a4a8;--bg:#16181b;--line:#2c2f33;--bar:#1f3354;--accent:#8ab4f8;--chart:#5b9cf6}}
*{box-sizing:border-box}body{margin:0 auto;max-width:60rem;padding:1rem;font:15px/1.45 system-ui,sans-serif;color:var(--fg);background:var(--bg)}
h1{font-size:1.3rem;margin:0}h2{font-size:1.05rem;margin:1.6rem 0 .4rem}a{color:var(--accent);text-decoration:none}a:hover{text-decoration:underline}
.muted,small{color:var(--muted)}nav a{display:inline-block;margin:.15rem .6rem .15rem 0}nav a[aria-current]{font-weight:700;color:var(--fg)}
.public{border:1px solid var(--line);padding:.3rem .6rem;border-radius:.3rem}.filters a{margin-left:.2rem}
dl{display:grid;grid-template-columns:repeat(auto-fit,minmax(9rem,1fr));gap:.6rem;margin:1rem 0}dl div{border:1px solid var(--line);border-radius:.4rem;padding:.5rem .7rem}
dt{color:var(--muted);font-size:.85rem}dd{margin:0;font-size:1.35rem;font-weight:600}dd small{font-size:.8rem;font-weight:400}
svg{width:100%;height:auto;display:block}svg text{fill:var(--muted);font-size:11px}svg rect.b{fill:var(--chart)}svg line{stroke:var(--line)}
svg .a line{stroke:var(--accent);stroke-dasharray:3 3}svg .a circle{fill:var(--accent)}.notes{list-style:none;margin:.3rem 0 0;padding:0}
table{width:100%;border-collapse:collapse;table-layout:fixed}td,th{padding:.25rem .4rem;border-bottom:1px solid var(--line);vertical-align:top}
th{text-align:right;font-weight:600;color:var(--muted);font-size:.85rem}th:first-child{text-align:left}.n{text-align:right;width:5.6rem;font-variant-numeric:tabular-nums}
td.n{overflow-wrap:anywhere}td.l{position:relative;overflow-wrap:anywhere}td.l span{position:absolute;left:0;top:0;bottom:0;background:var(--bar);z-index:-1}td.l a,td.l b{position:relative}
@media (max-width:30rem){.n{width:3.9rem}body{padding:.6rem}}
@media (min-width:62.5rem){body{max-width:84rem;padding:1rem 1.5rem}.n{width:4.4rem}
main{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:0 2.5rem;align-items:start}main>section:only-child{grid-column:1/-1}}
@media print{nav,.filters a{display:none}body{max-width:none;color:#000;background:#fff}a{color:#000}td.l span{background:#ddd;-webkit-print-color-adjust:exact;print-color-adjust:exact}}
"""


def render_html(report: ReportData, request: ReportRequest) -> str:
    """The report as one page for a browser: no JavaScript, nothing loaded from elsewhere, every
    visitor-supplied value escaped in text and attributes and percent-encoded in links."""
    query = report.query
    title = f"pixeld · {query.site or 'all sites'}"
    refresh = '<meta http-equiv="refresh" content="30">' if report.visitors_now is not None else ""
    parts = [
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">{refresh}',
        f'<link rel="icon" href="data:,"><title>{esc(title)}</title><style>{PAGE_STYLE}</style></head><body><header><h1>{esc(title)}</h1>',
        f'<p class="muted">{esc(format_range(query.range, query.zone))} · time zone {esc(zone_name(query.zone))}'
        + (f" · sites: {esc(', '.join(report.sites))}" if not query.site and report.sites else "") + "</p>",
        '<p class="public">This report is public: anyone with its address can read it.</p>' if request.public else "",
        html_range_links(request), html_filters(request), "</header>",
        html_headline(report), html_chart(report), html_group_links(request, report.grain),
        *[f"<p class=\"muted\">Note: {esc(note)}</p>" for note in report.notes],
    ]
    parts.append("<main>")
    for name in shown_sections(report, request):
        parts.append(html_section(name, limited(report.sections[name], request, text=True), report, request))
    parts.append("</main>")
    parts.append(f'<footer><p class="muted">pixeld {__version__} · filtered {sum(report.filtered.values()):,}{esc(filtered_breakdown(report.filtered))}</p></footer></body></html>')
    return "".join(parts) + "\n"


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def report_link(request: ReportRequest, drop: Sequence[str] = (), **changes: str) -> str:
    """A link to this report with some parameters changed or dropped, escaped for an attribute."""
    params = {name: value for name, value in request.params if name not in drop and name not in changes}
    params.update(changes)
    return esc("?" + urlencode(params)) if params else "?"


def html_range_links(request: ReportRequest) -> str:
    given = dict(request.params)
    current = given.get("range", "" if given.get("start") or given.get("end") else "30d")
    links = [
        f'<a href="{report_link(request, drop=("start", "end"), range=name)}"{" aria-current=page" if name == current else ""}>{name}</a>'
        for name in RANGE_LINKS
    ]
    return f'<nav aria-label="ranges">{"".join(links)}</nav>'


def html_group_links(request: ReportRequest, grain: str) -> str:
    """Links that show the series per hour, day, week or month (``group=``)."""
    links = [f'<a href="{report_link(request, group=name)}"{" aria-current=page" if name == grain else ""}>{name}</a>' for name in GRAINS]
    return f'<nav aria-label="series per">per {"".join(links)}</nav>'


def html_filters(request: ReportRequest) -> str:
    if not request.query.filters:
        return ""
    given = dict(request.params)
    shown = [f'{esc(name)} = <b>{esc(given.get(name) or "(none)")}</b> <a href="{report_link(request, drop=(name,))}" title="remove">×</a>' for name, _ in request.query.filters]
    return f'<p class="filters">Filters: {" · ".join(shown)}</p>'


def html_headline(report: ReportData) -> str:
    cells = [f"<div><dt>{esc(title)}</dt><dd>{esc(value)} <small>{esc(changed)}</small></dd></div>" for title, value, changed in headline_rows(report, ascii=False)]
    if report.visitors_now is not None:
        cells.insert(0, f"<div><dt>Visitors now</dt><dd>{report.visitors_now:,} <small>last 5 minutes</small></dd></div>")
    return f"<dl>{''.join(cells)}</dl>"


def html_chart(report: ReportData, width: int = 600, height: int = 150) -> str:
    """The series as an inline SVG bar chart: the largest value on the axis, a date at each end, and
    every bar's value in its <title>."""
    series = report.series
    largest = max((views for _, views, _ in series), default=0)
    top, bottom, left = 12, 22, 36
    step = (width - left) / max(1, len(series))
    label = lambda start: dt.datetime.fromtimestamp(start, report.query.zone).strftime(SERIES_FORMATS[report.grain])  # noqa: E731
    bars = []
    for start, views, visitors in series:
        bar_height = (height - top - bottom) * views / largest if largest else 0
        x = left + step * len(bars)
        bars.append(
            f'<rect class="b" x="{x + step * 0.1:.1f}" y="{height - bottom - bar_height:.1f}" width="{step * 0.8:.1f}" height="{max(bar_height, 0.5):.1f}">'
            f"<title>{esc(label(start))}: {views:,} page views, {visitors:,} visitors</title></rect>"
        )
    axis = [
        f'<line x1="{left}" y1="{height - bottom}" x2="{width}" y2="{height - bottom}"/>',
        f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{largest:,}</text><text x="{left - 4}" y="{height - bottom}" text-anchor="end">0</text>',
    ]
    if series:
        axis.append(f'<text x="{left}" y="{height - 6}">{esc(label(series[0][0]))}</text>')
        axis.append(f'<text x="{width}" y="{height - 6}" text-anchor="end">{esc(label(series[-1][0]))}</text>')
    caption = f"Page views per {report.grain}"
    return (
        f'<figure><svg viewBox="0 0 {width} {height}" role="img" aria-label="{esc(caption)}"><title>{esc(caption)}</title>'
        f'{"".join(axis)}{"".join(bars)}{chart_marks(report, left, step, top, height - bottom)}</svg>'
        f'<figcaption class="muted">{esc(caption)}{html_annotations(report)}</figcaption></figure>'
    )


def chart_marks(report: ReportData, left: int, step: float, top: int, floor: int) -> str:
    """A dashed line with a dot over each bucket that has notes; the notes, escaped, in its <title>."""
    starts, marks = [start for start, _, _ in report.series], []
    for start, notes in annotations_by_bucket(report).items():
        x = left + step * (starts.index(start) + 0.5)
        marks.append(
            f'<g class="a"><line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{floor}"/><circle cx="{x:.1f}" cy="{top}" r="4"/>'
            f"<title>{esc('; '.join(note_label(note, report.query.site) for note in notes))}</title></g>"
        )
    return "".join(marks)


def html_annotations(report: ReportData) -> str:
    items = "".join(f"<li>◆ {esc(note_label(note, report.query.site))}</li>" for note in report.annotations)
    return f'<ul class="notes">{items}</ul>' if items else ""


def row_filter(name: str, value: str, sites: List[str]) -> Dict[str, str]:
    """The filter a row's link adds. On an all-sites report a page is shown as host and path
    (``example.org/about``): its link names both."""
    if name == "path" and not value.startswith("/"):
        site = next((site for site in sites if value.startswith(site + "/")), "")
        if site:
            return {"site": site, "path": value[len(site):]}
    return {name: value}


def html_header(header: str, width: int) -> str:
    """A number column's header; a column wider than a number in text (a source's name) is wider here too, within a third of the screen."""
    wide = f' style="width:min({width * 0.5:.0f}rem,33vw)"' if width > 12 else ""
    return f"<th class=n{wide}>{esc(header)}</th>"


def html_section(name: str, rows: List[Row], report: ReportData, request: ReportRequest) -> str:
    """A section as a table: each row a link that adds the section's filter, with a bar for its share."""
    section = SECTIONS[name][1]
    filter_name = section.filter or section.link  # entry pages and pages not found link to their path; properties to nothing
    headers = [header for header, _ in section.row.COLUMNS]
    largest = max((row.count for row in rows), default=0)
    body = []
    for row in rows:
        shown = row.value or section.empty
        label = f'<a href="{report_link(request, **row_filter(filter_name, shown, report.sites))}">{esc(shown)}</a>' if filter_name else f"<b>{esc(shown)}</b>"
        body.append(
            f'<tr><td class="l"><span style="width:{100 * row.count / largest if largest else 0:.1f}%"></span>{label}</td>'
            + "".join(f'<td class="n">{esc(cell)}</td>' for cell in row.cells()) + "</tr>"
        )
    if not body:
        body.append(f'<tr><td class="l muted" colspan="{len(headers) + 1}">{esc(section.nothing)}</td></tr>')
    head = f'<tr><th>{esc(section.title)}</th>{"".join(html_header(header, width) for header, width in section.row.COLUMNS)}</tr>'
    more = len(report.sections[name]) - len(rows)
    footer = f'<p class="muted"><a href="{report_link(request, section=name)}">all {more + len(rows):,}</a></p>' if more > 0 else ""
    order = WIDE_ORDER.get(name, len(WIDE_ORDER) + list(SECTIONS).index(name))  # ``order`` only acts in the wide layout's grid
    return f'<section style="order:{order}"><h2>{esc(section.title)}</h2><table>{head}{"".join(body)}</table>{footer}</section>'


def render_counter_json(path: str, views: int) -> str:
    """``{"path": ..., "views": N}``, with <, > and & escaped too, so no page can mistake it for markup."""
    text = json.dumps({"path": path, "views": views})
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026") + "\n"


def render_counter_svg(path: str, views: int) -> str:
    """A small badge, "views | 1,234", sized to its text; the path only in its escaped <title>."""
    value = f"{views:,}"
    left, right = 44, 12 + 7 * len(value)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + right}" height="20" role="img" aria-label="views: {value}">'
        f"<title>{esc(path)}: {value} views</title>"
        f'<rect width="{left}" height="20" fill="#555"/><rect x="{left}" width="{right}" height="20" fill="#1a56db"/>'
        f'<g fill="#fff" font-family="Verdana,DejaVu Sans,sans-serif" font-size="11" text-anchor="middle">'
        f'<text x="{left / 2:g}" y="14">views</text><text x="{left + right / 2:g}" y="14">{value}</text></g></svg>\n'
    )


###############################################################################
# Export and import ###########################################################
###############################################################################

EXPORT_FIELDS = (
    "time", "type", "site", *(field.name for dim in DIMENSIONS + (EVENT_NAMES,) for field in dim.fields), *ROW_NUMBERS, *EVENT_EXTRAS, "note",
)
IMPORT_BATCH = 20_000
MISSING: Any = object()  # a cache's answer for what it does not hold
MAX_OUTCOMES = 1 << 17  # distinct row contents an import remembers the reading of (no visitor, no time: see ``_add_visitor_row``)
IMPORT_FORMATS = ("csv", "ndjson", "flask", "combined", "goatcounter", "umami", "plausible")
_COMBINED = re.compile(
    r'(?P<address>\S+) \S+ \S+ \[(?P<time>[^\]]+)\] "(?P<method>[A-Z]+) (?P<target>\S+)[^"]*" '
    r'(?P<status>\d{3}) \S+(?: "(?P<referrer>(?:[^"\\]|\\.)*)" "(?P<agent>(?:[^"\\]|\\.)*)")?'
)
_ASSET = re.compile(r"\.(?!html?$|php$|aspx?$)[a-z0-9]{1,5}$", re.IGNORECASE)


def export_lines(conn: sqlite3.Connection, span: Range, site: str, fmt: str) -> Iterator[str]:
    """Stored page views and events as CSV or NDJSON lines, oldest first, read in chunks so memory stays flat."""
    if fmt == "csv":
        yield ",".join(EXPORT_FIELDS) + "\n"
    clause, args = _site_clause(_string_id(conn, site) if site else None)
    bounds = (first_id(span.start), first_id(span.end)) + args
    tables = [conn.execute(export_sql(table, kind) + clause.replace("site", "t.site") + " ORDER BY t.id", bounds) for table, kind in (("pageviews", "pageview"), ("events", "event"))]
    rows = heapq.merge(*tables, annotation_rows(conn, span, site))
    while True:
        chunk = list(itertools.islice(rows, 1000))
        if not chunk:
            return
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        for row in chunk:
            values = (iso(second_of(row[0])),) + row[1:]
            if fmt == "csv":
                writer.writerow(values)
            else:
                out.write(json.dumps(dict(zip(EXPORT_FIELDS, values)), ensure_ascii=False) + "\n")
        yield out.getvalue()


def export_sql(table: str, kind: str) -> str:
    """SELECT a table's rows in EXPORT_FIELDS order, every dimension resolved to its text; a field the
    table lacks is empty. Left joins: a value whose id names nothing exports empty, and its row stays."""
    selected, joins = export_columns(table, kind)
    return f"SELECT {', '.join(selected)} FROM {table} t {' '.join(joins)} WHERE t.id >= ? AND t.id < ?"


def export_columns(table: str, kind: str, pairs: str = "") -> Tuple[List[str], List[str]]:
    """The SQL of each of EXPORT_FIELDS for a table's rows (the time as the row's id), and the joins they need.
    ``pairs`` names a table of the two-field values already split (id, first, second): faster than splitting each row's."""
    columns = PAGEVIEW_COLUMNS if table == "pageviews" else EVENT_COLUMNS
    selected, joins = ["t.id", f"'{kind}'", "coalesce(s.value, '')"], ["LEFT JOIN strings s ON s.id = t.site"]
    for number, dim in enumerate(DIMENSIONS + (EVENT_NAMES,)):
        if dim.column not in columns:
            selected += ["''"] * len(dim.fields)
        elif dim.column == "agent":
            selected += [f"coalesce(a.{field}, '')" for field in AGENT_FIELDS]
            joins.append("LEFT JOIN agents a ON a.id = t.agent")
        elif len(dim.fields) == 2 and pairs:
            selected += [f"coalesce(j{number}.first, '')", f"coalesce(j{number}.second, '')"]
            joins.append(f"LEFT JOIN {pairs} j{number} ON j{number}.id = t.{dim.column}")
        elif len(dim.fields) == 2:  # "first\tsecond"
            value = f"coalesce(j{number}.value, '')"
            tab = f"instr({value}, char(9))"
            selected += [f"substr({value}, 1, {tab} - 1)", f"substr({value}, {tab} + 1)"]
            joins.append(f"LEFT JOIN strings j{number} ON j{number}.id = t.{dim.column}")
        else:
            selected.append(f"coalesce(j{number}.value, '')")
            joins.append(f"LEFT JOIN strings j{number} ON j{number}.id = t.{dim.column}")
    selected += [f"t.{number}" for number in ROW_NUMBERS]
    if table == "events":  # properties as stored: format=pdf&lang=en
        selected += ["coalesce(p.value, '')", "t.props_first"]
        joins.append("LEFT JOIN strings p ON p.id = t.props")
    else:
        selected += ["''", "0"]
    selected.append("''")  # a note: annotations only
    return selected, joins


def annotation_rows(conn: sqlite3.Connection, span: Range, site: str) -> List[Tuple[Any, ...]]:
    """Notes as export rows of type ``annotation``, placed at their day's UTC midnight: the site and
    the note, every other field empty."""
    rows = []
    for note in annotations_in(conn, Range(max(span.start, EARLIEST), min(span.end, LATEST)), dt.timezone.utc, site):
        midnight = local_midnight(dt.date.fromisoformat(note.date), dt.timezone.utc)
        rows.append((first_id(midnight), "annotation", note.site) + ("",) * (len(EXPORT_FIELDS) - 4) + (note.text,))
    return rows


FEED_FIELDS = ("id", "node", *EXPORT_FIELDS[:-1])  # a page view's or event's row in the feed: the export's (no note), its id and node
AGGREGATE_FIELDS = ("id", "node", "time", "type", "site", "revision", "section", "value", "detail", *Metrics._fields)  # an imported day's count
FEED_ROW_FIELDS = FEED_FIELDS + tuple(name for name in AGGREGATE_FIELDS if name not in FEED_FIELDS)  # every field a feed row can have
FEED_CHUNK = 5000  # rows the feed reads and writes at once
_CURSOR = re.compile(r"1:(\d{1,12}):(\d{1,18})")


class FeedError(Exception):
    """A cursor the feed cannot take, or a feed that cannot be written: one line, exit status 2."""


class FeedCursor(NamedTuple):
    """Where the feed stands: every row not imported, older than ``second``, has shipped; and every
    import in the feed log up to entry ``seq``. Written as ``1:SECOND:SEQ``."""

    second: int
    seq: int

    def __str__(self) -> str:
        return f"1:{self.second}:{self.seq}"


def parse_cursor(text: str) -> FeedCursor:
    """A cursor as the feed wrote it; empty text is the start (everything ships)."""
    text = text.strip()
    if not text:
        return FeedCursor(0, 0)
    match = _CURSOR.fullmatch(text)
    if match is None:
        raise FeedError(f"cursor {text[:40]!r} is not one pixeld wrote (1:SECOND:ENTRY)")
    return FeedCursor(int(match.group(1)), int(match.group(2)))


class LogEntry(NamedTuple):
    seq: int
    table: str
    low: int
    high: int
    ids: bytes


class Feed:
    """One run of the incremental feed: every page view and event once, in its final state, and the
    daily counts imported from other tools, as NDJSON rows; and the cursor after them.

    Rows the daemon wrote ship once older than the final delay (``final_after``, which the daemon
    keeps in ``meta``): it no longer changes them. Rows an import wrote ship, wherever their times
    fall, once their import has ended: the feed log names the ids each import wrote, so that rows of
    the same seconds shipped earlier are not shipped again. Everything is read in one snapshot of the file."""

    def __init__(self, conn: sqlite3.Connection, cursor: FeedCursor, now: int, node: Optional[str] = None) -> None:
        self.conn = conn
        conn.execute("BEGIN")  # one snapshot: the cursor names exactly what is read
        stored_node, self.final_after = feed_settings(conn)
        self.node = stored_node if node is None else node
        last = conn.execute("SELECT coalesce(max(seq), 0) FROM feed_log").fetchone()[0]
        if cursor.seq > last:
            raise FeedError(f"the cursor names import {cursor.seq:,}, and this database has logged {last:,}: is it another database's cursor?")
        if cursor.second > now:
            raise FeedError(f"the cursor stands at {iso(min(cursor.second, LATEST))}, in the future: is it another machine's cursor?")
        self.start = cursor
        self.entries = self._ready_entries(cursor.seq, now)
        self.next = FeedCursor(max(cursor.second, now - self.final_after), self.entries[-1].seq if self.entries else cursor.seq)

    def _ready_entries(self, after: int, now: int) -> List[LogEntry]:
        """The feed log's entries after ``after`` whose imports have ended (or stopped writing, a final
        delay ago), up to the first that has not: the log is read in order."""
        ready = []
        for seq, done, at, table, low, high, ids in self.conn.execute("SELECT seq, done, at, tbl, low, high, ids FROM feed_log WHERE seq > ? ORDER BY seq", (after,)):
            if not done and at > now - self.final_after:
                break
            ready.append(LogEntry(seq, table, low, high, ids))
        return ready

    def lines(self) -> Iterator[str]:
        """The rows, a chunk of lines at a time: the daemon's, then the imports', then imported counts."""
        self.conn.execute("CREATE TEMP TABLE IF NOT EXISTS feed_ids (id INTEGER PRIMARY KEY)")
        self.conn.execute("CREATE TEMP TABLE IF NOT EXISTS feed_pairs (id INTEGER PRIMARY KEY, first TEXT NOT NULL, second TEXT NOT NULL)")
        self.conn.execute(  # every two-field value (a source, a campaign's content and term) holds a tab: nothing else does
            "INSERT OR REPLACE INTO temp.feed_pairs SELECT id, substr(value, 1, instr(value, char(9)) - 1), substr(value, instr(value, char(9)) + 1) "
            "FROM strings WHERE instr(value, char(9)) > 0"
        )
        for table, kind in (("pageviews", "pageview"), ("events", "event")):
            yield from self._chunks(self._live(table, kind))
            yield from self._chunks(self._imported(table, kind))
        yield from self._chunks(self._aggregates())

    def _chunks(self, rows: Union[sqlite3.Cursor, Iterator[Tuple[str]]]) -> Iterator[str]:
        while True:
            chunk = rows.fetchmany(FEED_CHUNK) if isinstance(rows, sqlite3.Cursor) else list(itertools.islice(rows, FEED_CHUNK))
            if not chunk:
                return
            yield "\n".join(row[0] for row in chunk) + "\n"

    def _live(self, table: str, kind: str) -> sqlite3.Cursor:
        """The daemon's rows between the cursor's second and the next one's: every row there but those an import wrote."""
        low, high = first_id(self.start.second), first_id(self.next.second)
        imported = self._fill_ids(
            row_id for (packed,) in self.conn.execute("SELECT ids FROM feed_log WHERE tbl = ? AND high >= ? AND low < ?", (table, low, high))
            for row_id in unpack_ids(packed) if low <= row_id < high
        )
        skip = " AND t.id NOT IN (SELECT id FROM temp.feed_ids)" if imported else ""
        return self.conn.execute(feed_sql(table, kind, f"{table} t") + f" WHERE t.id >= ? AND t.id < ?{skip} ORDER BY t.id", (self.node, low, high))

    def _imported(self, table: str, kind: str) -> sqlite3.Cursor:
        """The rows the newly ended imports wrote, as they are now (a row deleted since is gone)."""
        self._fill_ids(row_id for entry in self.entries if entry.table == table for row_id in unpack_ids(entry.ids))
        return self.conn.execute(feed_sql(table, kind, f"temp.feed_ids f JOIN {table} t ON t.id = f.id") + " ORDER BY t.id", (self.node,))

    def _fill_ids(self, ids: Iterable[int]) -> int:
        self.conn.execute("DELETE FROM temp.feed_ids")
        return self.conn.executemany("INSERT OR IGNORE INTO temp.feed_ids VALUES (?)", ((row_id,) for row_id in ids)).rowcount

    def _aggregates(self) -> Iterator[Tuple[str]]:
        """Another tool's daily counts of the days newly imported (again), as they are now; ``revision`` is
        the import's entry, so that a consumer keeps the latest of a day's rows (a later import replaces it)."""
        latest: Dict[Tuple[int, int], int] = {}
        for entry in self.entries:
            if entry.table == "imported":
                latest.update(((entry.low, day), entry.seq) for day in unpack_ids(entry.ids))
        sql = f"SELECT s.value, i.section, i.value, i.detail, {', '.join(f'i.{name}' for name in Metrics._fields)} FROM imported i JOIN strings s ON s.id = i.site WHERE i.site = ? AND i.day = ?"
        for (site, day), seq in sorted(latest.items(), key=lambda item: (item[0][1], item[0][0])):
            for site_name, section, value, detail, *metrics in self.conn.execute(sql, (site, day)):
                key = hashlib.blake2b(f"{site_name}\t{day}\t{section}\t{value}".encode(), digest_size=8).digest()
                row = (int.from_bytes(key, "big") >> 1, self.node, iso(day * DAY), "aggregate", site_name, seq, section, value, detail, *metrics)
                yield (json.dumps(dict(zip(AGGREGATE_FIELDS, row)), ensure_ascii=False),)

    def close(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")


def feed_sql(table: str, kind: str, source: str) -> str:
    """SELECT a table's rows as the feed's NDJSON lines, made by SQLite: the node is the one parameter."""
    selected, joins = export_columns(table, kind, "temp.feed_pairs")
    time_sql = f"strftime('%Y-%m-%dT%H:%M:%SZ', (t.id >> {ID_SHIFT}) + {ID_EPOCH}, 'unixepoch')"
    pairs = [("id", "t.id"), ("node", "?"), ("time", time_sql), *zip(EXPORT_FIELDS[1:-1], selected[1:-1])]
    fields = ", ".join(f"'{name}', {value}" for name, value in pairs)
    return f"SELECT json_object({fields}) FROM {source} {' '.join(joins)}"


FEED_NAMES = ("node", "type", "site", "channel", "source", "country", "browser", "version", "os", "device", "screen", "language", "hostname", "section")
FEED_NUMBERS = (*ROW_NUMBERS, "props_first", "revision", *Metrics._fields)


def feed_schema(engine: str, table: str = "pixeld") -> str:
    """The CREATE TABLE statement for the feed's rows, every field typed. ClickHouse: a ReplacingMergeTree
    ordered for one site's time ranges; a row shipped again (the same site, time, node, type and id)
    replaces the one before, and of an imported day's counts the latest revision is kept."""
    clickhouse = engine == "clickhouse"
    columns = []
    for name in FEED_ROW_FIELDS:
        if name == "id":
            kind = "UInt64" if clickhouse else "UBIGINT NOT NULL"
        elif name == "time":
            kind = "DateTime('UTC')" if clickhouse else "TIMESTAMP NOT NULL"
        elif name == "scroll":
            kind = "Nullable(UInt64)" if clickhouse else "UBIGINT"
        elif name in FEED_NUMBERS:
            kind = "UInt64 DEFAULT 0" if clickhouse else "UBIGINT DEFAULT 0"
        elif name in FEED_NAMES:
            kind = "LowCardinality(String) DEFAULT ''" if clickhouse else "VARCHAR DEFAULT ''"
        else:
            kind = "String DEFAULT ''" if clickhouse else "VARCHAR DEFAULT ''"
        columns.append(f"    {name} {kind}")
    body = ",\n".join(columns)
    if clickhouse:
        return (f"CREATE TABLE IF NOT EXISTS {table} (\n{body}\n)\nENGINE = ReplacingMergeTree(revision)\n"
                "PARTITION BY toYYYYMM(time)\nORDER BY (site, time, node, type, id);\n")
    return f"CREATE TABLE IF NOT EXISTS {table} (\n{body},\n    PRIMARY KEY (node, type, id)\n);\n"


def parse_export_request(params: Dict[str, str], now: float, first_day: Callable[[], Optional[int]], zone: dt.tzinfo) -> Tuple[str, Range, str]:
    """Format, range (everything unless given) and site of an export."""
    fmt = params.get("format") or "csv"
    if fmt not in ("csv", "ndjson"):
        raise ReportError(f"unknown format {fmt!r}: use csv or ndjson")
    everything = not any(params.get(name) for name in ("range", "start", "end"))
    span = Range(0, LATEST) if everything else parse_range(params, now, first_day, zone)
    return fmt, span, parse_site(params.get("site", ""))


class ImportFailed(Exception):
    """A file that cannot be imported: one line, exit status 2."""


class Importer:
    """Brings page views and events in from files, batched, with progress; refuses a file it has seen
    unless forced, and a file it cannot read.

    Formats: pixeld's own export (``csv``, ``ndjson``); the SQLite database of the 2020 Flask
    tool (``flask``); web server access logs in the combined format (``combined``); GoatCounter's,
    Umami's and Plausible's exports. An ``ImportReader`` reads the rows, in a second process where
    the platform can fork (``read_apart``), so that reading and writing use two cores; this process
    alone writes.
    """

    def __init__(self, conn: sqlite3.Connection, config: Config, geoip: Any, progress: Callable[[str], None]) -> None:
        self.store = Store(conn, shares_cpu=False, logs_writes=True)
        self.config = config
        self.reader = ImportReader(config, geoip)
        self.progress = progress
        self.read = ImportBatch()  # the latest batch: its counts are those of every row read so far
        self.notes = 0
        self.unit = "page views and events"
        self._started = self._reported = time.monotonic()

    def run(self, path: str, fmt: str, force: bool) -> None:
        fingerprint = file_fingerprint(path)
        seen = self.store.conn.execute("SELECT at FROM imports WHERE fingerprint = ?", (fingerprint,)).fetchone()
        if seen and not force:
            when = dt.datetime.fromtimestamp(seen[0], dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            raise ImportFailed(f"{path} was imported on {when}; use --force to import it again")
        try:
            if fmt == "plausible":
                self._import_plausible(path)
            else:
                read_apart(self.reader, path, fmt, self._write)
        finally:
            self.store.end_log()
        self.store.conn.execute(
            "INSERT INTO imports VALUES (?, ?, ?, ?) ON CONFLICT (fingerprint) DO UPDATE SET rows = excluded.rows, at = excluded.at",
            (fingerprint, os.path.basename(path), self.read.imported, int(time.time())),
        )
        seconds = time.monotonic() - self._started
        self.progress(
            f"imported {self.read.imported:,} {self.unit} from {path} in {seconds:.1f} s ({self.read.imported / max(seconds, 1e-9):,.0f} rows/s); "
            f"{self.read.filtered_hits:,} filtered, {self.read.skipped:,} lines skipped" + (f"; {self.notes:,} new annotations" if self.notes else "")
            + self._cpu()
        )

    @staticmethod
    def _cpu() -> str:
        """The CPU time each process took: an import reads and writes on two cores at once (``read_apart``)."""
        reading = cpu_seconds(resource.RUSAGE_CHILDREN)
        return f"; CPU {cpu_seconds(resource.RUSAGE_SELF):.1f} s" + (f" writing, {reading:.1f} s reading" if reading else "")

    def _import_plausible(self, path: str) -> None:
        """Plausible's CSV export: a zip of daily aggregates per report section, not page views. They are
        read whole, checked, and stored as imported daily counts (``Store.replace_imported``) that the
        report adds to its own; nothing is written until every file has been read."""
        aggregates, site, skipped = read_plausible(path, self.reader.site)
        if self.config.sites and not in_domains(site, self.config.sites):
            raise ImportFailed(f"{path} holds the site {site!r}, which is not one of --site")
        written, left_out = self.store.replace_imported(site, aggregates)
        self.read = ImportBatch(imported=sum(len(values) for day, values in aggregates.items()), skipped=skipped)
        self.unit = "daily counts"
        self.progress(f"{site}: daily aggregates for {written:,} days imported" + (
            f"; {left_out:,} days left out, on which pixeld counted page views of its own" if left_out else ""))

    def _write(self, batch: "ImportBatch") -> None:
        try:
            self.store.write_rows(batch.rows, batch.events, batch.filtered)
        except sqlite3.IntegrityError:  # the daemon wrote into the same second meanwhile: ids are recomputed
            self.store.write_rows(batch.rows, batch.events, batch.filtered)
        for date, site, text in batch.notes:
            self.notes += add_annotation(self.store.conn, date, site, text)[1]
        self.read = batch
        now = time.monotonic()
        if now - self._reported >= 1:
            self._reported = now
            self.progress(f"{batch.imported:,} rows, {batch.imported / (now - self._started):,.0f} rows/s")


def cpu_seconds(who: int) -> float:
    """User and system CPU time of this process (``RUSAGE_SELF``) or of its ended children."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


@dataclasses.dataclass
class ImportBatch:
    """What an import's reader hands its writer at a time: page views reduced to what is stored
    (``stored_values``), events, filtered hits and notes (date, site, text); and the rows read so far."""

    rows: List[StoredValues] = dataclasses.field(default_factory=list)
    events: List[Event] = dataclasses.field(default_factory=list)
    filtered: List[FilteredHit] = dataclasses.field(default_factory=list)
    notes: List[Tuple[str, str, str]] = dataclasses.field(default_factory=list)
    imported: int = 0  # page views and events read so far
    filtered_hits: int = 0
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.rows) + len(self.events) + len(self.filtered)


def read_apart(reader: "ImportReader", path: str, fmt: str, write: Callable[[ImportBatch], None]) -> None:
    """Read a file's batches and write each: the reading in a second process where the platform can
    fork, so that it and the writing use two cores, else in this one. The reading process writes
    nothing and touches no database: its batches come over a pipe, an error there is raised here, and
    a process that ended without saying it was done fails the import."""
    if "fork" not in multiprocessing.get_all_start_methods():
        reader.read(path, fmt, write)
        return
    context = multiprocessing.get_context("fork")
    receiving, sending = context.Pipe(duplex=False)
    process = context.Process(target=_read_and_send, args=(reader, path, fmt, sending), name="pixeld import reader", daemon=True)
    process.start()
    sending.close()
    try:
        while True:
            try:
                message = receiving.recv()
            except EOFError:
                process.join()
                raise ImportFailed(f"reading {path} stopped: the reading process ended with status {process.exitcode}") from None
            if message is None:
                return
            if isinstance(message, BaseException):
                raise message
            write(message)
    finally:
        receiving.close()
        if process.is_alive():
            process.terminate()
        process.join()


def _read_and_send(reader: "ImportReader", path: str, fmt: str, pipe: Any) -> None:
    """The reading process: its batches, then None when done, or the error that stopped it."""
    try:
        reader.read(path, fmt, pipe.send)
        pipe.send(None)
    except Exception as error:  # raised again in the writing process
        pipe.send(error)
    finally:
        pipe.close()


class ImportReader:
    """Reads the page views and events of a file, as the daemon reads hits: every row goes through
    the hit pipeline (``read_hit`` for log lines, ``read_record`` for reduced rows), so values are
    normalised and filtered as a live hit's would be. Rows that name their visitor (access logs,
    GoatCounter, Umami) are counted in visits by visitors of the import's own, in memory, and the
    address or session id is dropped; an export's rows bring their visits' numbers along. It hands
    batches (``ImportBatch``) to a writer, and touches no database itself."""

    def __init__(self, config: Config, geoip: Any) -> None:
        self.config = config
        self.site = config.sites[0] if config.sites else ""
        self.geoip = geoip
        self.memo = Memo()
        self.readings: Dict[Tuple[str, ...], Optional[Reading]] = {}  # what a foreign row's content reads as, whatever its time and visitor
        self.visitors = self._visitors(SessionGeneration)  # named by session ids; an access log's are keyed as live ones are (``read``)
        self.visits = ImportVisits()
        self.dimensions: Dict[Tuple[str, ...], Tuple[Any, ...]] = {}  # a page view's stored values by its fields (``stored_dimensions``): most repeat
        self.imported = self.filtered = self.skipped = 0
        self.batch = ImportBatch()
        self.send: Callable[[ImportBatch], None] = lambda batch: None

    def read(self, path: str, fmt: str, send: Callable[[ImportBatch], None]) -> None:
        """Read the file, handing each batch to ``send``; the last one carries the final counts."""
        self.send = send
        if fmt == "combined":  # a reader's address and User-Agent: keyed with BLAKE2b, as the daemon keys them
            self.visitors = self._visitors(Generation)
        readers = {
            "csv": self._read_csv, "ndjson": self._read_ndjson, "flask": self._read_flask, "combined": self._read_combined,
            "goatcounter": self._read_goatcounter, "umami": self._read_umami,
        }
        readers[fmt](path)
        self.batch.rows.extend(self.visits.end_all())
        self._flush()

    def _visitors(self, generation: Callable[[int], Generation]) -> Visitors:
        return Visitors(rate_limit=0, on_new_salt=self.memo.clear, goals=self.config.goals, generation=generation)

    def _dimensions(self, view: PageView) -> Tuple[Any, ...]:
        fields = view[1 : -len(VISITOR_FLAGS)]
        found = self.dimensions.get(fields)
        if found is None:
            if len(self.dimensions) >= MAX_OUTCOMES:
                self.dimensions.clear()
            found = self.dimensions[fields] = stored_dimensions(view)
        return found

    def _read_csv(self, path: str) -> None:
        with open_text(path) as handle:
            reader = csv.reader(handle)
            header = next(reader, [])
            for row in reader:
                self._add_record(dict(zip(header, row)))

    def _read_goatcounter(self, path: str) -> None:
        """GoatCounter's CSV export, version 2 (its ``tpl/help/export.md``), plain or gzipped. Its
        ``Session`` names the visitor: it keys the import's own visitors, in memory, and is dropped."""
        with open_text(path) as handle:
            reader = csv.reader(handle)
            header = goatcounter_header(next(reader, []))
            session, date = header.index("session"), header.index("date")
            content = operator.itemgetter(*(i for i, name in enumerate(header) if name not in ("session", "date", "firstvisit")))
            width, add = len(header), self._add_visitor_row
            for row in reader:
                if not row:
                    continue  # GoatCounter allows blank lines
                if len(row) != width:
                    self._add(None, live=True)
                    continue
                add(content(row), row[date], lambda row=row: goatcounter_record(dict(zip(header, row)), self.memo), row[session])

    def _read_umami(self, path: str) -> None:
        """Umami's ``website_event`` rows joined with their ``session`` (Umami Cloud's data export, or
        ``psql \\copy``), read by column name: where both tables name a column, the event's comes
        first. ``session_id`` keys the import's own visitors, in memory, and is dropped; visits follow
        pixeld's 30-minute rule, so that they compare with pixeld's own (Umami's ``visit_id`` is not needed)."""
        with open_text(path) as handle:
            reader = csv.reader(handle)
            header = [name.strip().lower() for name in next(reader, [])]
            columns = {name: header.index(name) for name in reversed(header)}
            unique = sorted(columns.values())
            content = operator.itemgetter(*(index for index in unique if header[index] not in ("session_id", "visit_id", "created_at", "event_id")))
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    self._add(None, live=True)
                    continue
                fields = {name: row[index] for name, index in columns.items()}
                self._add_visitor_row(content(row), umami_time(fields["created_at"]), lambda fields=fields: umami_record(fields), fields["session_id"])

    def _read_ndjson(self, path: str) -> None:
        with open_text(path) as handle:
            for line in handle:
                try:
                    row = json.loads(line)
                except ValueError:
                    row = None
                self._add_record(row if isinstance(row, dict) else None)

    def _read_flask(self, path: str) -> None:
        """The 2020 Flask tool's ``data(id, timestamp, path, title, referrer, country, device, width, height)``."""
        try:
            source = sqlite3.connect(f"file:{_uri_path(path)}?mode=ro", uri=True)
            rows = source.execute("SELECT timestamp, path, title, referrer, country, device, width, height FROM data ORDER BY id")
            for stamp, page, title, referrer, country, device, width, height in rows:
                browser, _, version = str(device or "").strip().partition(" ")
                self._add_record({
                    "time": stamp, "path": page, "title": title, "referrer": referrer, "country": country,
                    "browser": FLASK_BROWSERS.get(browser.lower(), browser.title()), "version": version.split(".")[0],
                    "screen": f"{width}x{height}", "device": "bot" if browser.lower() in FLASK_BOTS else "",
                })
            source.close()
        except sqlite3.Error as error:
            raise ImportFailed(f"{path} is not a database of the Flask tool: {error}") from None

    def _read_combined(self, path: str) -> None:
        with open_text(path) as handle:
            for line in handle:
                match = _COMBINED.match(line)
                when = parse_log_time(match.group("time")) if match else None
                if match is None or when is None:
                    self.skipped += 1
                    continue
                self._add_log_line(match, when)

    def _add_log_line(self, match: "re.Match[str]", when: int) -> None:
        """A page request in an access log is a hit: its Referer is the page's referrer, its address the visitor's."""
        target = split_url(match.group("target"))
        page = target.path if target else ""
        if match.group("method") != "GET" or not match.group("status").startswith("2") or not page or _ASSET.search(page):
            return
        campaign = {key: value for key, value in parse_query(target.query).items() if key in CAMPAIGN_PARAMS}  # as the snippet sends them
        params = {**campaign, "path": page, "referrer": unescape_log(match.group("referrer") or ""), "host": self.site}
        hit = RawHit(when, params, unescape_log(match.group("agent") or ""), peer=match.group("address"))
        self._add(read_hit(hit, self.config, self.memo, lambda address: lookup_country(self.geoip, address)), live=True)

    def _add_record(self, row: Optional[Dict[str, Any]]) -> None:
        if row and row.get("type") == "annotation":
            self._add_annotation(row)
        else:
            self._add(read_record(row, self.config, self.memo, self.site) if row else None, live=False)

    def _add_annotation(self, row: Dict[str, Any]) -> None:
        """An export's note (kept once however often it is imported, by the writer); one for a site that ``--site`` does not accept is skipped."""
        when, site, text = parse_stamp(row.get("time")), normalise_host(str(row.get("site") or "")), clean_text(str(row.get("note") or ""), MAX_NOTE)
        if when is None or not text or (site and self.config.sites and not in_domains(site, self.config.sites)):
            self.skipped += 1
            return
        self.batch.notes.append((dt.datetime.fromtimestamp(when, dt.timezone.utc).date().isoformat(), site, text))

    def _add_visitor_row(self, content: Tuple[str, ...], when: str, record: Callable[[], Optional[Dict[str, Any]]], visitor: str) -> None:
        """A foreign row that names its visitor (a session id): read as an export's row is (``record``
        makes it one; ``read_record`` reads it), then placed in visits by the import's own visitors, the
        id standing where a live hit's address stands (in memory only). A row without one is a visitor
        of its own. What a row reads as depends on its content alone, not on its time or visitor: rows
        that repeat a page, referrer and agent are read once (``Reading``)."""
        second = parse_stamp(when)
        reading = self.readings.get(content, MISSING) if second is not None else None
        if reading is MISSING:
            reading = self._reading(record())
            if len(self.readings) >= MAX_OUTCOMES:
                self.readings.clear()
            self.readings[content] = reading
        if reading is None:
            self._add(None, live=True)
        elif reading.arrival is not None:
            self._add_view(second, reading, visitor or f"row {self.imported}")  # type: ignore[arg-type]
        elif isinstance(reading.outcome, Accepted):  # an event: its time and visitor (faster than ``_replace``)
            outcome = reading.outcome
            self._add(Accepted._make((PageView._make((second, *outcome.view[1:])), outcome.event, visitor or f"row {self.imported}", *outcome[3:])), live=True)
        else:
            self._add(reading.outcome._replace(time=second), live=True)  # type: ignore[union-attr]

    def _reading(self, row: Optional[Dict[str, Any]]) -> Optional["Reading"]:
        """What a foreign row's content reads as (``read_record``), and for a page view what placing it in its visit needs."""
        outcome = read_record(row, self.config, self.memo, self.site) if row else None
        if outcome is None:
            return None
        if isinstance(outcome, FilteredHit) or outcome.event:
            return Reading(outcome)
        own = arrival_of(outcome.view)
        return Reading(outcome, own, self.visitors.reached_by_path(outcome.view.path), self._dimensions(outcome.view))

    def _add_view(self, second: int, reading: "Reading", visitor: str) -> None:
        """A page view read before (``reading``) at this time, by this visitor: placed in its visit as ``Visitors.admit``
        places a live one, without building the page view again unless its visit came another way or it reached a goal."""
        view = reading.outcome.view  # type: ignore[union-attr]
        observation = self.visitors.observe(second, view.site, visitor, "", view.path, reading.arrival)
        if observation is None:  # over the rate limit: an import sets none
            self._add(FilteredHit(second, view.site, "rate-limited"), live=False)
            return
        self.imported += 1
        firsts, first_goals, converted = self.visitors.flags(observation, reading.reached)
        if first_goals:
            dimensions = self._dimensions(self.visitors.shown(view, reading.arrival, observation.arrival, first_goals))  # type: ignore[arg-type]
        else:
            dimensions = reading.dimensions_as(observation.arrival, self._dimensions)
        self.batch.rows += self.visits.add((second, dimensions, observation.first_today, firsts, converted), observation.step)
        if len(self.batch) >= IMPORT_BATCH:
            self._flush()

    def _add(self, outcome: Outcome, live: bool) -> None:
        """Batch a row as the daemon batches a hit (``place``): rows that name their visitor are placed in
        visits by visitors of the import's own (``ImportVisits`` holds each visit until it ends); an
        export's rows bring their visits along."""
        item, step = place(outcome, self.visitors if live else None)
        if outcome is None:
            self.skipped += 1
        elif isinstance(outcome, FilteredHit):
            self.filtered += 1
        else:
            self.imported += 1
        if isinstance(item, PageView):
            held = (item.time, self._dimensions(item), item.first_today, item.firsts, item.converted)
            self.batch.rows.extend(self.visits.add(held, step))  # type: ignore[arg-type]
        elif isinstance(item, Record):
            self.batch.rows.append(stored_values(item, self._dimensions))
        elif isinstance(item, Event):
            self.batch.events.append(item)
        elif isinstance(item, FilteredHit):
            self.batch.filtered.append(item)
        if len(self.batch) >= IMPORT_BATCH:
            self._flush()

    def _flush(self) -> None:
        """Hand the batch over. What the reader holds by now (the caches, the visits still open) is frozen
        out of the garbage collector, as the daemon's memo is (``collector``): each full collection walked
        it all again, a seventh of the reading. None of it forms cycles: reference counting frees it."""
        self.batch.imported, self.batch.filtered_hits, self.batch.skipped = self.imported, self.filtered, self.skipped
        self.send(self.batch)
        self.batch = ImportBatch()
        gc.freeze()


class Reading:
    """What a foreign row's content reads as, whatever its time and visitor (``ImportReader._add_visitor_row``);
    for a page view, what placing it in its visit needs: how a visit it begins came (None: not a page
    view), the goals its path reaches, and its stored dimensions by how its visit came (``arrived``)."""

    __slots__ = ("outcome", "arrival", "reached", "dimensions")
    MAX_ARRIVALS = 16  # the ways of coming it remembers the dimensions for: most pages are reached a few ways

    def __init__(self, outcome: Union[Accepted, FilteredHit], arrival: Optional[Arrival] = None, reached: Sequence[int] = (),
                 dimensions: Tuple[Any, ...] = ()) -> None:
        self.outcome, self.arrival, self.reached = outcome, arrival, list(reached)
        self.dimensions = {arrival: dimensions}

    def dimensions_as(self, arrival: Arrival, dimensions_of: Callable[[PageView], Tuple[Any, ...]]) -> Tuple[Any, ...]:
        """Its stored dimensions in a visit that came as ``arrival`` says (``dimensions_of`` makes them the first time)."""
        found = self.dimensions.get(arrival)
        if found is None:
            if len(self.dimensions) >= self.MAX_ARRIVALS:
                self.dimensions = {self.arrival: self.dimensions[self.arrival]}
            found = self.dimensions[arrival] = dimensions_of(arrived(self.outcome.view, self.arrival, arrival))  # type: ignore[arg-type,union-attr]
        return found


class OpenVisit:
    """A visit an import holds until it ends: its page views in the order they came, its duration so far,
    its latest page view's time, and whether its entry is among them (see ``ImportVisits``)."""

    __slots__ = ("views", "duration", "last", "entry")

    def __init__(self, entry: bool) -> None:
        self.views: List[HeldView] = []
        self.duration = self.last = 0
        self.entry = entry

    def rows(self) -> List[StoredValues]:
        """Its page views as written once, in their final state: the entry with the visit's page views and
        duration, the latest as the exit."""
        last = len(self.views) - 1
        rows = [held_values(view, exit=int(index == last)) for index, view in enumerate(self.views)]
        if self.entry:
            rows[0] = held_values(self.views[0], last + 1, self.duration, int(last == 0))
        return rows


class ImportVisits:
    """An import's visits, held in memory until no later row can join them, so that each page view is
    written once, in its final state. The daemon writes a visit's page views as they come and then
    updates its entry and exits as it grows; both count the same. A visit ends 30 idle minutes after
    its latest page view; another half hour allows for rows a little out of order. A row later still
    joins the visit in memory, as the daemon's would, but its entry was written: it is written as a
    page view of that visit, and as its exit too."""

    LATE = VISIT_TIMEOUT  # how far out of time order a row may come and still be counted exactly

    def __init__(self) -> None:
        self.open: "collections.OrderedDict[Tuple[int, int, int], OpenVisit]" = collections.OrderedDict()  # least recently grown first
        self.due = 0  # no visit held can end before a page view after this time

    def add(self, view: HeldView, step: VisitStep) -> List[StoredValues]:
        """Place a page view in its visit; return the page views of the visits that have ended, as stored."""
        if step.generation is None:  # a visitor not remembered: a visit of one page view
            return [held_values(view, 1, exit=1)]
        visit = self.open.get(step.visit)
        if visit is None:
            visit = self.open[step.visit] = OpenVisit(entry=step.views == 1)
        else:
            self.open.move_to_end(step.visit)
        visit.views.append(view)
        if step.duration > visit.duration:
            visit.duration = step.duration
        time = view[0]
        if time > visit.last:
            visit.last = time
        if time <= self.due:
            return []
        ended: List[StoredValues] = []
        while self.open:
            self.due = next(iter(self.open.values())).last + VISIT_TIMEOUT + self.LATE
            if self.due >= time:
                break
            ended += self.open.popitem(last=False)[1].rows()
        return ended

    def end_all(self) -> List[StoredValues]:
        """Every visit still held, at the end of the file, as stored."""
        ended = [row for visit in self.open.values() for row in visit.rows()]
        self.open.clear()
        return ended


def open_text(path: str) -> IO[str]:
    """A text file, decompressed when it is gzipped (GoatCounter writes ``.csv.gz``)."""
    with open(path, "rb") as handle:
        gzipped = handle.read(2) == b"\x1f\x8b"
    if gzipped:
        return gzip.open(path, "rt", encoding="utf-8", errors="replace", newline="")
    return open(path, encoding="utf-8", errors="replace", newline="")


GOATCOUNTER_GROUPS = {  # the names GoatCounter gives the referrers it groups (scheme g), as referrers pixeld can place
    "hacker news": "news.ycombinator.com", "google": "google.com", "baidu": "baidu.com", "telegram messenger": "org.telegram.messenger",
    "slack chat": "com.slack", "email": "Email (email)", "rss": "RSS (referral)",
}
DESKTOP_SYSTEMS = frozenset(("Windows", "macOS", "Linux", "ChromeOS", "FreeBSD", "OpenBSD"))
FOREIGN_NAMES = {  # browser and system names as GoatCounter and Umami write them, as pixeld's reducer names them
    "chrome os": "ChromeOS", "chromeos": "ChromeOS", "mac os x": "macOS", "mac os": "macOS", "os x": "macOS", "macos": "macOS", "android os": "Android",
    "ios": "iOS", "windows": "Windows", "linux": "Linux", "msie": "Internet Explorer", "ie": "Internet Explorer", "samsung": "Samsung Internet",
    "samsung browser": "Samsung Internet", "samsungbrowser": "Samsung Internet", "yandexbrowser": "Yandex", "yandex browser": "Yandex",
    "edge-chromium": "Edge", "edge-ios": "Edge", "crios": "Chrome", "chromium-webview": "Chrome", "chrome mobile": "Chrome", "fxios": "Firefox",
    "firefox mobile": "Firefox", "mobile safari": "Safari", "ios-webview": "Safari", "opera-mini": "Opera Mini",
}


UMAMI_BROWSERS = {  # Umami's browser ids (its BROWSERS), as pixeld's reducer names them; bots are filtered
    "ios": "Safari", "ios-webview": "Safari", "crios": "Chrome", "fxios": "Firefox", "edge-chromium": "Edge", "edge-ios": "Edge", "chromium-webview": "Chrome",
    "samsung": "Samsung Internet", "yandexbrowser": "Yandex", "opera-mini": "Opera Mini", "ie": "Internet Explorer", "miui": "Mi Browser", "bb10": "BlackBerry",
}
UMAMI_BOTS = frozenset(("searchbot", "curl", "phantomjs"))
UMAMI_DEVICES = {"desktop": "desktop", "laptop": "desktop", "mobile": "phone", "tablet": "tablet"}
UMAMI_REQUIRED = ("created_at", "url_path", "session_id")


def umami_time(text: str) -> str:
    """``created_at`` as ISO 8601: PostgreSQL writes the offset ``+00``."""
    text = text.strip()
    return text + ":00" if re.search(r"[+-]\d\d$", text) else text


def umami_record(fields: Dict[str, str]) -> Optional[Dict[str, str]]:
    """An Umami event row as pixeld's export names its fields, for ``read_record``: event type 1 is a
    page view, 2 a custom event named ``event_name``; other types (links, pixels, web vitals) are not
    page views (None)."""
    kind = fields.get("event_type", "1").strip() or "1"
    if kind not in ("1", "2"):
        return None
    utm = [fields.get(name, "") for name in ("utm_source", "utm_medium", "utm_campaign")]
    if not any(utm) and fields.get("url_query"):
        campaign = campaign_of(parse_query(fields["url_query"]))[0]
    else:
        campaign = " / ".join(utm) if any(utm) else ""
    domain = fields.get("referrer_domain", "").strip()
    browser = fields.get("browser", "").strip().lower()
    return {
        "time": umami_time(fields["created_at"]), "site": fields.get("hostname", ""), "type": "event" if kind == "2" else "pageview",
        "event": fields.get("event_name", "") if kind == "2" else "",
        "path": fields["url_path"], "title": fields.get("page_title", ""), "referrer": f"{domain}{fields.get('referrer_path', '')}" if domain else "",
        "campaign": campaign, "country": fields.get("country", ""), "browser": UMAMI_BROWSERS.get(browser, browser.title()),
        "os": foreign_name(fields.get("os", ""))[0],
        "device": "bot" if browser in UMAMI_BOTS else UMAMI_DEVICES.get(fields.get("device", "").strip().lower(), ""), "screen": fields.get("screen", ""),
        "language": fields.get("language", "").split("-", 1)[0].strip().lower(),
    }


PLAUSIBLE_TABLES = ("visitors", "sources", "pages", "entry_pages", "exit_pages", "custom_events", "locations", "devices", "browsers", "operating_systems")
_PLAUSIBLE_MEMBER = re.compile(rf"(?:imported_)?({'|'.join(PLAUSIBLE_TABLES)})(?:_\d{{8}}_\d{{8}})?\.csv")
MAX_ZIP_MEMBERS = 64
MAX_ZIP_BYTES = 4 << 30  # all of a zip's files, uncompressed, at most
MAX_ZIP_RATIO = 200  # a file that unpacks to more than 200 times its packed size (past a megabyte) is a zip bomb, not a CSV
PLAUSIBLE_DEVICES = {"desktop": "desktop", "laptop": "desktop", "mobile": "phone", "tablet": "tablet"}
PLAUSIBLE_NAMES = {"microsoft edge": "Edge", "samsung browser": "Samsung Internet", "mac": "macOS", "gnu/linux": "Linux", "ubuntu": "Linux"}
PLAUSIBLE_NOT_EVENTS = frozenset(("pageview", "engagement"))


def plausible_members(path: str) -> Dict[str, zipfile.ZipInfo]:
    """The CSV files of Plausible's export zip by table, checked before any is read: every name is
    one of its tables (no folder, no ``..``, nothing else), once; none is encrypted; sizes are bounded.
    Nothing is ever extracted to disk."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as error:
        raise ImportFailed(f"{path} is not a readable zip file: {error}") from None
    if len(infos) > MAX_ZIP_MEMBERS:
        raise ImportFailed(f"{path} holds {len(infos):,} files: Plausible's export holds {len(PLAUSIBLE_TABLES)}")
    members: Dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        match = _PLAUSIBLE_MEMBER.fullmatch(info.filename)
        if match is None or match.group(1) in members:
            raise ImportFailed(f"{path} holds a file named {info.filename[:100]!r}, which is not one of Plausible's tables: refused")
        if info.flag_bits & 1:
            raise ImportFailed(f"{path} is encrypted: export it again from Plausible")
        if info.file_size > 1 << 20 and info.file_size > MAX_ZIP_RATIO * max(1, info.compress_size):
            raise ImportFailed(f"{path} unpacks {info.filename} to {info.file_size:,} bytes from {info.compress_size:,}: refused as a zip bomb")
        members[match.group(1)] = info
    if sum(info.file_size for info in members.values()) > MAX_ZIP_BYTES:
        raise ImportFailed(f"{path} unpacks to more than {MAX_ZIP_BYTES >> 30} GiB: refused")
    if "visitors" not in members:
        raise ImportFailed(f"{path} is not Plausible's CSV export: it has no imported_visitors file")
    return members


def read_plausible(path: str, site: str) -> Tuple["Aggregates", str, int]:
    """Every file of Plausible's export, as daily counts per report section: (the counts, the site, rows
    skipped). The site is ``site`` or, without one, the host its pages name most. Each value is made safe
    as a live hit's is; a row with a bad date is skipped; a bad number counts as 0; no number is invented."""
    members = plausible_members(path)
    tables: Dict[str, List[Dict[str, str]]] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for table, info in members.items():
                with archive.open(info) as member:
                    reader = csv.reader(io.TextIOWrapper(member, encoding="utf-8", errors="replace", newline=""))
                    header = [name.strip().lower() for name in next(reader, [])]
                    tables[table] = [dict(zip(header, row)) for row in reader if len(row) == len(header)]
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError, csv.Error, RuntimeError) as error:
        raise ImportFailed(f"cannot read {path}: {error}") from None
    if not site:
        hosts = Counter(normalise_host(row.get("hostname", "")) for row in tables.get("pages", []))
        hosts.pop("", None)
        if not hosts:
            raise ImportFailed(f"{path} does not name its site: give it with --site example.org")
        site = hosts.most_common(1)[0][0]
    aggregates: Aggregates = {}
    skipped = 0
    views_of: Dict[Tuple[int, str], int] = {}
    for table in PLAUSIBLE_TABLES:
        for row in tables.get(table, []):
            day = plausible_day(row.get("date", ""))
            if day is None:
                skipped += 1
                continue
            for section, value, detail, metrics in plausible_counts(table, row, site):
                if section == "pages":
                    views_of[day, value] = views_of.get((day, value), 0) + metrics.get("views", 0)
                if section == "exit_pages":
                    metrics = {**metrics, "views": views_of.get((day, value), 0)}  # an exit rate is exits over the page's views
                _, total = aggregates.setdefault(day, {}).setdefault((section, value), (detail, Totals()))
                for name, amount in metrics.items():
                    total.grow(name, amount)
    return aggregates, site, skipped


def plausible_day(text: str) -> Optional[int]:
    """A day number from ``2024-01-31``, between 2000 and 2100; None for anything else."""
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text.strip()):
        return None
    try:
        seconds = in_time_range(_midnight(text.strip()))
    except ValueError:
        return None
    return None if seconds is None else seconds // DAY


def plausible_counts(table: str, row: Dict[str, str], site: str) -> List[Tuple[str, str, str, Dict[str, int]]]:
    """What a row of one of Plausible's tables adds, as (section, value, detail, metrics): section '' is
    the day's headline numbers."""
    number = {name: bounded(row.get(column), 1 << 40) for name, column in (
        ("views", "pageviews"), ("visitors", "visitors"), ("visits", "visits"), ("bounces", "bounces"), ("duration", "visit_duration"),
    )}
    session = {name: number[name] for name in ("views", "visitors", "visits", "bounces", "duration")}
    if table == "visitors":
        return [("", "", "", session)]
    if table == "pages":
        return [("pages", normalise_path(row.get("page", "")), "", {"views": number["views"], "visitors": number["visitors"]})]
    if table == "entry_pages":
        entry = {"visits": bounded(row.get("entrances"), 1 << 40), "bounces": number["bounces"], "duration": number["duration"]}
        return [("entry_pages", normalise_path(row.get("entry_page", "")), "", entry)]
    if table == "exit_pages":
        return [("exit_pages", normalise_path(row.get("exit_page", "")), "", {"exits": bounded(row.get("exits"), 1 << 40)})]
    if table == "custom_events":  # a 404's path is a page not found, as pixeld's own 404 events are; one without a path is an event only
        name = clean_event(row.get("name", ""))
        events = {"views": bounded(row.get("events"), 1 << 40), "visitors": number["visitors"]}
        if not name or name in PLAUSIBLE_NOT_EVENTS:
            return []
        not_found = name == NOT_FOUND_EVENT and row.get("path", "").strip()
        return [("events", name, "", events)] + ([("not_found", normalise_path(row["path"]), "", {"views": events["views"]})] if not_found else [])
    if table == "sources":
        source, channel, referrer, campaign = plausible_source(row, site)
        counts = [("sources", source, channel, session), ("channels", channel, "", session), ("referrers", referrer, "", session)]
        return counts + ([("campaigns", campaign, "", session)] if campaign else [])
    if table == "locations":
        return [("countries", clean_country(row.get("country", "")), "", session)]
    if table == "devices":
        return [("devices", PLAUSIBLE_DEVICES.get(row.get("device", "").strip().lower(), ""), "", session)]
    if table == "browsers":
        name, _ = foreign_name(PLAUSIBLE_NAMES.get(row.get("browser", "").strip().lower(), row.get("browser", "")))
        version = clean_version(row.get("browser_version", "").split(".", 1)[0])
        return [("browsers", " ".join(filter(None, (clean_label(name), version))), "", session)]
    if table == "operating_systems":
        name, _ = foreign_name(PLAUSIBLE_NAMES.get(row.get("operating_system", "").strip().lower(), row.get("operating_system", "")))
        return [("operating_systems", clean_label(name), "", session)]
    return []


SOURCE_NAMES = {name.lower(): (name, channel) for name, channel in {*SOURCE_HOSTS.values(), *SOURCE_COUNTRY_HOSTS.values()}}


def plausible_source(row: Dict[str, str], site: str) -> Tuple[str, str, str, str]:
    """(source, channel, referrer, campaign) of a row of Plausible's sources, as pixeld places a visit:
    by its campaign, else its referrer, else the source's name (a known one gets its channel)."""
    utm = [clean_text(row.get(name, ""), MAX_CAMPAIGN) for name in ("utm_source", "utm_medium", "utm_campaign")]
    if any(utm):
        campaign = clean_campaign(" / ".join([utm[0] or row.get("source", ""), *utm[1:]]))
        referrer = campaign_referrer(campaign)
    else:
        campaign, referrer = "", normalise_referrer(with_scheme(row.get("referrer", "").strip()), site)
    name = clean_text(row.get("source", ""), MAX_CAMPAIGN)
    if not referrer and name and name.lower() != "direct / none":
        known = SOURCE_NAMES.get(name.lower())
        referrer = named_referrer(f"{known[0]} ({known[1]})" if known else f"{name} (referral)")
    return (*classify_source(referrer), referrer, campaign)


def goatcounter_header(header: List[str]) -> List[str]:
    """The column names of a version 2 header, folded (``Referrer scheme`` is ``referrerscheme``): its
    own test data writes ``2Path,Title,...``, its help page ``2,Path,Title,...``."""
    names = header[1:] if header[:1] == ["2"] else [header[0][1:], *header[1:]] if header else []
    return [re.sub(r"[\s_-]", "", name).lower() for name in names]


def goatcounter_record(fields: Dict[str, str], memo: Memo) -> Dict[str, str]:
    """A GoatCounter row as pixeld's export names its fields, for ``read_record``. An event is named
    by its path; ``Bot`` other than 0 makes it a filtered hit; a referrer of every scheme (an address,
    a group's name, a campaign, an app) gets its source and channel; ``US-TX`` is US."""
    event = fields.get("event", "").strip().lower() in ("1", "true", "t")
    browser, version = foreign_name(fields.get("browser", ""))
    system = foreign_name(fields.get("system", ""))[0]
    agent = memo(classify_user_agent, fields["useragent"]) if fields.get("useragent") else None  # only old exports kept it; it is not stored
    bot = fields.get("bot", "0").strip() not in ("", "0") or (agent is not None and agent.device == "bot")
    device = "bot" if bot else agent.device if agent is not None else "desktop" if system in DESKTOP_SYSTEMS else ""
    referrer, campaign = goatcounter_referrer(fields.get("referrer", ""), fields.get("referrerscheme", ""))
    location = fields.get("location", "")
    path = fields.get("path", "")
    return {
        "time": fields.get("date", ""), "type": "event" if event else "pageview", "path": "" if event else path, "event": path if event else "",
        "title": fields.get("title", ""), "referrer": referrer, "campaign": campaign, "country": location[:2] if location[2:3] in ("", "-") else "",
        "browser": browser, "version": version, "os": system, "device": device, "screen": goatcounter_screen(fields.get("screensize", "")),
    }


def goatcounter_referrer(referrer: str, scheme: str) -> Tuple[str, str]:
    """(referrer, campaign) of a GoatCounter referrer and its scheme: ``h`` an address without its
    scheme, ``g`` a group's name, ``c`` a campaign's source, ``o`` anything else (an Android app's id)."""
    referrer = referrer.strip()
    if not referrer:
        return "", ""
    if scheme == "c":
        return "", referrer
    if scheme == "g" and ("." not in referrer or " " in referrer):
        return GOATCOUNTER_GROUPS.get(referrer.lower()) or f"{referrer} (referral)", ""
    return referrer, ""


def goatcounter_screen(value: str) -> str:
    """``1280,768,1`` (width, height, scale) as ``1280,768``; GoatCounter now keeps widths alone (``1280,0,1``): ``1280``."""
    width, _, rest = value.partition(",")
    height = rest.split(",", 1)[0].strip()
    return f"{width},{height}" if height not in ("", "0") else width


def foreign_name(value: str) -> Tuple[str, str]:
    """A browser's or system's name and major version as another tool writes them (``Chrome 86``,
    ``Safari 14.0``, ``Windows 7``, ``Mac OS``), named as pixeld's reducer names them."""
    name, _, version = value.strip().rpartition(" ")
    if not name or not version[:1].isdigit():
        name, version = value.strip(), ""
    return FOREIGN_NAMES.get(name.lower(), name), version.split(".", 1)[0]


FLASK_BROWSERS = {"chrome": "Chrome", "firefox": "Firefox", "safari": "Safari", "edge": "Edge", "msie": "Internet Explorer", "opera": "Opera", "samsungbrowser": "Samsung Internet", "yandex": "Yandex"}
FLASK_BOTS = {"google", "msn", "yahoo", "ask", "aol", "baidu", "bingbot", "googlebot", "yandexbot"}


def parse_log_time(value: str) -> Optional[int]:
    try:
        return in_time_range(int(dt.datetime.strptime(value, "%d/%b/%Y:%H:%M:%S %z").timestamp()))
    except ValueError:
        return None


def unescape_log(value: str) -> str:
    return value.replace('\\"', '"').replace("\\\\", "\\") if value != "-" else ""


SITELESS_FORMATS = {"combined": "an access log", "flask": "a Flask database", "goatcounter": "a GoatCounter export"}


def require_site(fmt: str, config: Config) -> None:
    """An access log's lines and a Flask database's rows name no site, so the import needs --site: with
    none, every page view would have an empty site, and readers' internal navigation would count as
    referrals from the site itself."""
    if fmt in SITELESS_FORMATS and not config.sites:
        raise ImportFailed(f"{SITELESS_FORMATS[fmt]} does not name its site: give the site its pages belong to with --site example.org")


def detect_format(path: str, fmt: str = "") -> str:
    """The file's format (the one given, or detected), once its first lines show that pixeld can read
    it; else ImportFailed, before anything touches the database."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(65536)
        if head.startswith(b"\x1f\x8b"):
            head = check_gzip(path)
    except (OSError, EOFError, zlib.error) as error:
        raise ImportFailed(f"cannot read {path}: {error_reason(error)}") from None
    if not head.strip():
        raise ImportFailed(f"{path} is empty: nothing to import")
    first_line = head.split(b"\n", 1)[0].strip()
    if head.startswith(b"SQLite format 3\x00"):
        detected = "flask"
    elif head.startswith(b"PK\x03\x04"):
        detected = "plausible"
    elif re.match(rb"\d+,?Path,", first_line):
        detected = "goatcounter"
    elif b"url_path" in first_line and b"session_id" in first_line:
        detected = "umami"
    elif head.lstrip().startswith(b"{"):
        detected = "ndjson"
    elif head.startswith(b"time,") or b",path," in head.split(b"\n", 1)[0]:
        detected = "csv"
    else:
        detected = "combined"
    fmt = fmt or detected
    if fmt == "plausible":
        plausible_members(path)
        return fmt
    lines = head.decode("utf-8", "replace").splitlines()[:100]
    if fmt == "csv" and not {"time", "path"} <= set(next(csv.reader(lines[:1]), [])):
        raise ImportFailed(f"{path} is not a pixeld CSV export (it needs at least the columns time and path)")
    if fmt == "goatcounter":
        check_goatcounter_header(path, next(csv.reader(lines[:1]), []))
    if fmt == "umami" and not set(UMAMI_REQUIRED) <= {name.strip().lower() for name in next(csv.reader(lines[:1]), [])}:
        raise ImportFailed(f"{path} is not Umami's events joined with their sessions (it needs at least the columns {', '.join(UMAMI_REQUIRED)})")
    if fmt == "ndjson" and not any(_is_export_object(line) for line in lines):
        raise ImportFailed(f"{path} is not a pixeld NDJSON export (no line is an object with a time)")
    if fmt == "combined" and not any(_COMBINED.match(line) for line in lines):
        raise ImportFailed(f"{path} is not a file pixeld can import: neither an export, a Flask database nor a combined access log")
    return fmt


def check_gzip(path: str) -> bytes:
    """A gzipped file's first 64 KiB, once the whole file has been read through (its checksum too), so
    that a file cut short or damaged is refused before anything is written."""
    with gzip.open(path, "rb") as handle:
        head = handle.read(65536)
        while handle.read(1 << 20):
            pass
    return head


def check_goatcounter_header(path: str, header: List[str]) -> None:
    """Refuse a GoatCounter export of another version, or one without the columns a hit needs."""
    version = re.match(r"\d*", header[0] if header else "").group()  # type: ignore[union-attr]
    if version != "2":
        raise ImportFailed(f"{path} is a GoatCounter export of version {version or 'unknown'}: pixeld reads version 2 (export it again from GoatCounter)")
    missing = [name for name in ("path", "event", "session", "date") if name not in goatcounter_header(header)]
    if missing:
        raise ImportFailed(f"{path} is not a GoatCounter export: its header lacks {', '.join(missing)}")


def _is_export_object(line: str) -> bool:
    try:
        row = json.loads(line)
    except ValueError:
        return False
    return isinstance(row, dict) and "time" in row


def file_fingerprint(path: str) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as error:
        raise ImportFailed(f"cannot read {path}: {error_reason(error)}") from None
    return digest.hexdigest()


###############################################################################
# Snippet #####################################################################
###############################################################################

SNIPPET_PLACEHOLDER = "https://stats.example.org"
# Reading time and scroll depth, measured alike by the snippet and the tracker at other tools' addresses:
# visible milliseconds (``seen``, since ``since``) and the deepest share of the page shown (``depth``).
ENGAGEMENT_TICK = """  function tick() {
    var t = Date.now();
    if (since) seen += t - since;
    since = d.visibilityState == "visible" ? t : 0;
    if (since) depth = Math.max(depth, Math.min(100, Math.round(100 * (scrollY + innerHeight) / d.documentElement.scrollHeight)));
  }"""
SNIPPET = """<!-- pixeld: privacy-first analytics, no cookies. Both URLs below point at your pixeld server. -->
<script data-pixeld="https://stats.example.org">
(function (w, d, l, n) {
  var c = d.currentScript, u = c.getAttribute("data-pixeld") + "/pixel.gif?", e = encodeURIComponent, k = "pixeld-ignore",
    o = "pixeld-optout", s, last, seen = 0, since = 0, depth = 0, sent = 0, f = c.getAttribute("data-downloads"), files = f != null && new RegExp("\\\\.(" +
    (f || "pdf,zip,gz,7z,rar,epub,mp3,mp4,dmg,pkg,exe,msi,deb,apk,iso,docx,xlsx,pptx,csv").replace(/\\W+/g, "|") + ")$", "i");
  try { s = w.localStorage; } catch (x) { s = {}; }
  function flag() {
    var f = l.hash.slice(1);
    if (f == k || f == o) {
      s[f] ? delete s[f] : (s[f] = 1);
      alert("pixeld: this browser is " + (s[f] ? "no longer counted" : "counted again"));
    }
  }
  flag();
  function off() {
    return s[k] || s[o] || (!c.hasAttribute("data-local") && (l.protocol == "file:" || /^(localhost|127\\.|\\[::1\\]$)/.test(l.hostname)));
  }
  function hit(q, more) {
    return u + q + "&host=" + e(l.hostname) + more + (n.webdriver ? "&bot=1" : "");
  }
  function url(q) {
    var p = new URLSearchParams(l.search), m = "";
    %CAMPAIGN_PARAMS%.forEach(function (x) { if (p.get(x)) m += "&" + x + "=" + e(p.get(x)); });
    return hit(q, m);
  }
  function send(x) { off() || (n.sendBeacon ? n.sendBeacon(x) : (new Image().src = x)); }
%TICK%
  function engage() {
    tick();
    if (last && (seen > 99 || depth > sent)) {
      send(hit("engagement=1&path=" + e(last), "&engaged=" + (seen / 1000).toFixed(1) + "&scroll=" + depth));
      seen = 0; sent = depth;
    }
  }
  function view() {
    if (off() || l.pathname == last) return;
    engage();
    new Image().src = url("path=" + e(l.pathname) + "&title=" + e(d.title) + "&referrer=" + e(last ? "" : d.referrer) +
      "&resolution=" + screen.width + "," + screen.height);
    last = l.pathname; seen = depth = sent = 0; tick();
  }
  w.pixeld = function (kind, name, p) {
    var q = kind == "404" ? "&referrer=" + e(d.referrer) : "", x;
    for (x in p) q += "&prop_" + e(x) + "=" + e(p[x]);
    if (kind == "optout") s[o] = 1;
    if (kind == "event" || kind == "404") send(url("event=" + e(name || kind) + "&path=" + e(l.pathname) + q));
  };
  ["pushState", "replaceState"].forEach(function (f) {
    var o = history[f];
    history[f] = function () { var r = o.apply(this, arguments); setTimeout(view); return r; };
  });
  w.addEventListener("popstate", view);
  w.addEventListener("hashchange", flag);
  w.addEventListener("scroll", tick);
  w.addEventListener("pagehide", engage);
  d.addEventListener("visibilitychange", function () { d.hidden ? engage() : tick(); });
  d.addEventListener("click", function (v) {
    var a = v.target.closest("[data-pixeld-event],a[href]"), x = a && a.getAttribute("data-pixeld-event"), p = {};
    if (x) [].forEach.call(a.attributes, function (t) { if (!t.name.indexOf("data-pixeld-prop-")) p[t.name.slice(17)] = t.value; });
    else if (a && files && files.test(a.pathname)) x = "download:" + (a.hostname == l.hostname ? "" : a.hostname) + a.pathname;
    else if (a && c.hasAttribute("data-outbound") && a.hostname && a.hostname != l.hostname) x = "outbound:" + a.hostname;
    x && w.pixeld("event", x, p);
  }, true);
  if (c.hasAttribute("data-forms")) d.addEventListener("submit", function () { w.pixeld("event", "form:" + l.pathname); }, true);
  function start() { view(); if (c.hasAttribute("data-404")) w.pixeld("404"); }
  d.prerendering ? d.addEventListener("prerenderingchange", start, { once: true }) : start();
})(window, document, location, navigator);
</script>
<noscript><img src="https://stats.example.org/pixel.gif" alt="" width="1" height="1" referrerpolicy="no-referrer-when-downgrade"></noscript>
""".replace("%CAMPAIGN_PARAMS%", json.dumps(CAMPAIGN_PARAMS)).replace("%TICK%", ENGAGEMENT_TICK)  # the snippet passes on what the server takes, and no click id


# pixeld's tracker at Plausible's and Umami's script addresses (/js/script.js, /js/script.hash.outbound-links.js,
# /script.js ...), for pages whose script tag loads from their old stats host. It reads their tags' attributes
# (data-domain, data-api; data-website-id, data-host-url, data-domains, data-auto-track), the features in
# Plausible's file name (hash, outbound-links, file-downloads, tagged-events, manual, local), keeps their
# APIs (plausible(name, {props}) with its queue, umami.track(name, data)), posts in their formats (text/plain,
# so no preflight), and reports reading time and scroll depth as the snippet does: Plausible's engagement
# event, or an Umami payload of type "engagement" that only pixeld knows. To Plausible's format it adds t
# (the title) and s (the screen), which Plausible's own script does not send.
TRACKER_JS = r"""(function (w, d, l, n) {
  var c = d.currentScript, a = function (k) { return c.getAttribute(k); }, src = c.src.split(/[?#]/)[0],
    parts = src.split("/").pop().split(".").slice(1, -1), has = function (f) { return parts.indexOf(f) >= 0; },
    site = a("data-website-id"), domain = a("data-domain") || l.hostname, origin = src.split("/").slice(0, 3).join("/"),
    api = site ? (a("data-host-url") || origin).replace(/\/+$/, "") + "/api/send" : a("data-api") || origin + "/api/event",
    domains = (a("data-domains") || "").split(",").map(function (x) { return x.trim(); }).filter(Boolean),
    auto = site ? a("data-auto-track") != "false" : !has("manual"), hash = has("hash"),
    files = /\.(pdf|xlsx?|docx?|txt|rtf|csv|exe|key|pp[st]x?|7z|pkg|rar|gz|zip|avi|mov|mp4|mpe?g|wmv|midi?|mp3|wav|wma|dmg|epub)$/i,
    last, lastUrl, seen = 0, since = 0, depth = 0, sent = 0;
  function off() {
    try { if (localStorage.plausible_ignore == "true" || localStorage.getItem("umami.disabled")) return 1; } catch (x) {}
    if (n.webdriver || (domains.length && domains.indexOf(l.hostname) < 0)) return 1;
    if (a("data-do-not-track") == "true" && (n.doNotTrack == "1" || w.doNotTrack == "1")) return 1;
    return !has("local") && (l.protocol == "file:" || /^(localhost|127\.|\[::1\]$)/.test(l.hostname));
  }
  function post(body, done) {
    var x = JSON.stringify(body);
    if (!w.fetch) return n.sendBeacon && n.sendBeacon(api, x);
    fetch(api, { method: "POST", headers: { "Content-Type": "text/plain" }, body: x, keepalive: true })
      .then(function (r) { done && done({ status: r.status }); }, function (e) { done && done({ error: e }); });
  }
  function send(name, props, done, url, engaged) {
    if (off()) return done && done();
    url = url || l.href;
    var ref = last ? "" : d.referrer, p = url.replace(/^[a-z]+:\/\/[^\/]*/i, "").replace(hash ? /^$/ : /#.*$/, "");
    post(site ? { type: engaged ? "engagement" : "event", payload: {
      website: site, hostname: l.hostname, url: p, title: d.title, referrer: ref, screen: screen.width + "x" + screen.height,
      language: n.language, name: name || undefined, data: props, engaged: engaged && engaged[0], scroll: engaged && engaged[1] } }
      : { n: engaged ? "engagement" : name || "pageview", u: url, d: domain, r: ref || null, h: hash ? 1 : undefined, p: props,
        t: d.title, s: screen.width + "," + screen.height, e: engaged && engaged[0] * 1000, sd: engaged && engaged[1] }, done);
  }
%TICK%
  function engage() {
    tick();
    if (lastUrl && (seen > 99 || depth > sent)) {
      send("", undefined, undefined, lastUrl, [Math.round(seen / 100) / 10, depth]);
      seen = 0; sent = depth;
    }
  }
  function view(force) {
    var here = l.pathname + (hash ? l.hash : "");
    if ((here == last && !force) || off()) return;
    engage();
    send("");
    last = here; lastUrl = l.href; seen = depth = sent = 0; tick();
  }
  var queued = (w.plausible && w.plausible.q) || [];
  w.plausible = function (name, o) {
    o = o || {};
    name == "pageview" ? (send("", o.props, o.callback, o.u), last = l.pathname) : send(name, o.props, o.callback, o.u);
  };
  queued.forEach(function (q) { w.plausible.apply(w, q); });
  w.umami = {
    track: function (x, data) {
      if (!x) return view(1);
      if (typeof x == "function") x = x({ website: site, hostname: l.hostname, url: l.pathname, title: d.title });
      typeof x == "string" ? send(x, data) : x && send(x.name || "", x.data, 0, x.url && l.origin + x.url);
    },
    identify: function () {}
  };
  function tagged(el) {
    for (var i = 0; el && el.getAttribute && i < 4; el = el.parentNode, i++) {
      var name = el.getAttribute("data-umami-event"), props = {}, m, k;
      if (name) {
        for (k = 0; k < el.attributes.length; k++)
          if ((m = /^data-umami-event-(.+)$/.exec(el.attributes[k].name))) props[m[1]] = el.attributes[k].value;
        return [name, props];
      }
      if (has("tagged-events") && typeof el.className == "string")
        el.className.split(/\s+/).forEach(function (x) {
          if ((m = /^plausible-event-(.+?)(?:=|--)(.+)$/.exec(x))) {
            m[2] = m[2].replace(/\+/g, " ");
            m[1] == "name" ? (name = m[2]) : (props[m[1]] = m[2]);
          }
        });
      if (name) return [name, props];
    }
  }
  d.addEventListener("click", function (v) {
    var t = tagged(v.target), link = v.target.closest && v.target.closest("a[href]");
    if (t) send(t[0], t[1]);
    else if (link && has("outbound-links") && link.host && link.host != l.host) send("Outbound Link: Click", { url: link.href });
    else if (link && has("file-downloads") && files.test(link.pathname)) send("File Download", { url: link.href });
  }, true);
  if (auto) {
    ["pushState", "replaceState"].forEach(function (f) {
      var o = history[f];
      history[f] = function () { var r = o.apply(this, arguments); setTimeout(view); return r; };
    });
    w.addEventListener("popstate", function () { view(); });
    if (hash) w.addEventListener("hashchange", function () { view(); });
    d.prerendering ? d.addEventListener("prerenderingchange", function () { view(); }, { once: true }) : view();
  }
  w.addEventListener("scroll", tick);
  w.addEventListener("pagehide", engage);
  d.addEventListener("visibilitychange", function () { d.hidden ? engage() : tick(); });
})(window, document, location, navigator);
""".replace("%TICK%", ENGAGEMENT_TICK)
TRACKER_JS_BYTES = TRACKER_JS.encode()


def snippet(url: str = SNIPPET_PLACEHOLDER, local: bool = False, hit_path: str = DEFAULT_HIT_PATH) -> str:
    """The snippet to paste into pages, pointing at ``url`` and its hit path; ``local`` lets it count on localhost too."""
    text = SNIPPET.replace(SNIPPET_PLACEHOLDER, url.rstrip("/")).replace(DEFAULT_HIT_PATH, hit_path)
    return text.replace("<script data-pixeld=", "<script data-local data-pixeld=") if local else text


###############################################################################
# WSGI app ####################################################################
###############################################################################

GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\x00\x00\x00!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
GIF_HEADERS = [
    ("Content-Type", "image/gif"),
    ("Content-Length", str(len(GIF))),
    ("Cache-Control", "no-store"),
    ("Cross-Origin-Resource-Policy", "cross-origin"),
]
SCRIPT_HEADERS = [
    ("Content-Type", "application/javascript; charset=utf-8"),
    ("Content-Length", str(len(TRACKER_JS_BYTES))),
    ("Cache-Control", "public, max-age=3600"),
    ("X-Content-Type-Options", "nosniff"),
    ("Cross-Origin-Resource-Policy", "cross-origin"),
]
PROXY_HEADERS = ("HTTP_X_FORWARDED_FOR", "HTTP_FORWARDED", "HTTP_X_REAL_IP")
HIT_METHODS = ("GET", "HEAD", "POST")  # hits may come as sendBeacon POSTs
FOREIGN_METHODS = {"/count": HIT_METHODS, "/api/event": ("POST",), "/api/send": ("POST",)}  # other tools' trackers, by path
Environ = Dict[str, Any]
StartResponse = Callable[..., Any]
Answer = Tuple[str, List[Tuple[str, str]], Any]  # status, headers, and bytes or a generator of bytes


def foreign_body(environ: Environ) -> bytes:
    """The JSON body of another tool's tracker, when its size is one a tracker sends."""
    length = environ.get("CONTENT_LENGTH") or "0"
    return environ["wsgi.input"].read(int(length)) if length.isdigit() and 0 < int(length) <= MAX_BODY else b""


def tracker_answer(tracker: str, problem: str) -> Answer:
    """What each tool's tracker expects: GoatCounter a GIF whatever happens; Plausible 202 ``ok``; Umami a
    JSON object. Bad input is a 400 (413 when too large) with the reason, which neither tracker retries."""
    if tracker == "goatcounter":
        return "200 OK", list(GIF_HEADERS), GIF
    if problem:
        status = "413 Payload Too Large" if problem == "too large" else "400 Bad Request"
        body = json.dumps({"errors": {"request": problem}} if tracker == "plausible" else {"error": problem}).encode()
        content_type = "application/json"
    else:
        status, content_type, body = ("202 Accepted", "text/plain; charset=utf-8", b"ok") if tracker == "plausible" else ("200 OK", "application/json", b"{}")
    headers = [("Content-Type", content_type), ("Content-Length", str(len(body))), ("Access-Control-Allow-Origin", "*"), ("Cache-Control", "no-store")]
    return status, headers, body


class Refused(NamedTuple):
    """Another tool's tracker request refused as bad input: counted, by tracker and reason, and nothing more."""

    tracker: str
    problem: str


ReadHit = Union[Outcome, Refused]  # what reading a request to the hit endpoint yields


MAX_CARRIED_AGENT = 512  # characters of a User-Agent carried to the owner: it is reduced already, and only keys the visitor


def carried_agent(user_agent: str) -> str:
    """A User-Agent as the visitor key needs it, short enough for a batch of hits to stay small: a long one
    (a header can hold 30 KB of it) becomes its start and a digest of the whole, so two such stay apart."""
    if len(user_agent) <= MAX_CARRIED_AGENT:
        return user_agent
    digest = hashlib.blake2b(user_agent.encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()
    return user_agent[: MAX_CARRIED_AGENT - len(digest)] + digest


def pack_read(read: ReadHit) -> tuple:
    """A hit read, as plain tuples (``marshal``) to cross a socket between processes, its kind first. The
    visitor key's parts (address, User-Agent) cross only in memory, as they do between threads."""
    if isinstance(read, Refused):
        return ("refused", *read)
    if isinstance(read, FilteredHit):
        return ("filtered", *read)
    if isinstance(read, Accepted):
        return ("accepted", tuple(read.view), read.event, read.address, carried_agent(read.user_agent), read.engagement, read.props, read.dropped_props)
    return ("malformed",)


def unpack_read(packed: tuple) -> ReadHit:
    kind, *fields = packed
    if kind == "refused":
        return Refused(*fields)
    if kind == "filtered":
        return FilteredHit(*fields)
    if kind == "accepted":
        view, event, address, user_agent, engagement, props, dropped = fields
        return Accepted(PageView._make(view), event, address, user_agent, engagement=engagement, props=props, dropped_props=dropped)
    if kind == "malformed":
        return None
    raise ValueError(f"a hit of unknown kind {str(kind)[:20]!r}")


class HitReader:
    """The hit endpoint: the pixel and other tools' trackers. It reads each hit as far as it can without the
    visitors (normalised, its User-Agent reduced, its source classified), hands what it read on, and
    gives the answer: the GIF, or what that tool's tracker expects, whatever the request holds.

    The app answers its hits through one (``App.hit``), and so does each acceptor process
    (``serve --workers N``), as its WSGI app: there what it reads waits in ``outbox``, packed, for the
    server to hand it over to the process that owns the visitors and the writer.

    It holds a memo of raw inputs: the app's, emptied with each new salt; else its own, emptied when
    the UTC day (and so the salt) changes."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.time, log: Callable[[str], None] = print, memo: Optional[Memo] = None) -> None:
        self.config = config
        self.clock = clock
        self.log = log
        self.geoip = open_geoip(config.geoip_path) if config.geoip_path else None
        self.memo = memo if memo is not None else Memo()
        self.day = -1 if memo is None else None  # the UTC day its own memo was last emptied
        self.site_ids = dict(config.site_ids)
        self.methods: Dict[str, Tuple[str, ...]] = {DEFAULT_HIT_PATH: HIT_METHODS, config.hit_path: HIT_METHODS, **FOREIGN_METHODS}
        self.outbox: List[tuple] = []

    def handles(self, environ: Environ) -> bool:
        """The requests an acceptor answers; the owner answers the rest (a dry run, a wrong method, a preflight)."""
        return environ["REQUEST_METHOD"] in self.methods.get(environ["PATH_INFO"], ()) and "dry_run=" not in environ["QUERY_STRING"]

    def __call__(self, environ: Environ, start_response: StartResponse) -> List[bytes]:
        status, headers, body = self.answer(environ, lambda read: self.outbox.append(pack_read(read)))
        start_response(status, headers)
        return [b""] if environ["REQUEST_METHOD"] == "HEAD" else [body]

    def answer(self, environ: Environ, take: Callable[[ReadHit], None]) -> Answer:
        """Read the hit a request carries, give it to ``take``, and answer."""
        now = int(self.clock())
        if self.day is not None and now // DAY != self.day:
            self.day = now // DAY
            self.memo.clear()
        tracker = TRACKER_PATHS.get(environ["PATH_INFO"])
        if tracker is None:
            self.read(lambda: raw_hit(environ, now, self.memo), "pixel", take)
            return "200 OK", list(GIF_HEADERS), GIF
        foreign = foreign_hit(tracker, environ, foreign_body(environ), now, self.site_ids, self.memo)
        if foreign.problem:
            take(Refused(tracker, foreign.problem))
        elif foreign.hit is not None:
            self.read(lambda: foreign.hit, tracker, take)
        return tracker_answer(tracker, foreign.problem)

    def read(self, hit: Callable[[], RawHit], what: str, take: Callable[[ReadHit], None]) -> None:
        try:
            outcome = read_hit(hit(), self.config, self.memo, self.country_of)
        except Exception as error:  # a bug must never break the host page: log one line, still answer
            self.log(f"{what}: could not record a hit: {type(error).__name__}: {error}"[:200])
            return
        take(outcome)

    def country_of(self, address: Optional[IPAddress]) -> str:
        return lookup_country(self.geoip, address)


class App:
    """The WSGI application: ``/pixel.gif`` (and ``--hit-path``) captures, ``/report`` and ``/export``
    read, ``/whoami``, ``/metrics``, ``/healthz`` and ``/`` help.

    The hit endpoint never blocks: it hands the hit to the writer thread. The server may answer
    it without a thread hand-off; it says so in ``nonblocking_paths``.

    It owns the writer, the in-memory visitors, the caches of raw inputs (emptied with each new
    salt), the counts of outcomes and the GeoIP reader. The clock is injected so tests can move
    time (salt rotation, visits, report ranges).
    """

    def __init__(self, config: Config, clock: Callable[[], float] = time.time, log: Callable[[str], None] = print) -> None:
        self.config = config
        self.clock = clock
        self.log = log
        self.hits = HitReader(config, lambda: self.clock(), lambda message: self.log(message), Memo())  # the app's clock and log, even when replaced
        self.memo = self.hits.memo
        conn = connect(config.db_path, progress=log)
        note_feed_settings(conn, config.node, config.final_after, int(clock()))
        self.writer = Writer(conn, config.flush_interval, log, config.keep_days, clock, config.queue_limit, config.goals, config.final_after)
        self.visitors = Visitors(config.rate_limit, on_new_salt=self.memo.clear, goals=config.goals)
        self._visitors_lock = threading.Lock()
        self.closed = False
        self.started = time.monotonic()
        self._readers = threading.local()
        self.outcomes: Counter = Counter()  # hits since start, by outcome: pageview, event, malformed, or a filter reason
        self.dropped_props = 0  # event property values dropped since start because they look personal
        self.rejected: Counter = Counter()  # other trackers' requests refused as bad input, by (tracker, reason)
        self.open_connections: Optional[Callable[[], int]] = None  # set by the server that runs the app, if it knows
        self.nonblocking_paths = tuple(self.hits.methods)
        reads = ("GET", "HEAD")
        self.routes: Dict[str, Tuple[Callable[[Environ], Answer], Tuple[str, ...]]] = {
            **{path: (self.hit, methods) for path, methods in self.hits.methods.items()},
            "/script.js": (self.script, reads),
            "/report": (self.report, reads),
            "/export": (self.export, reads),
            "/whoami": (self.whoami, reads),
            "/metrics": (self.metrics, reads),
            "/healthz": (self.healthz, reads),
            "/": (self.index, reads),
        }

    def close(self) -> None:
        """Commit everything acknowledged so far and release the database (once; later calls do nothing)."""
        if not self.closed:
            self.closed = True
            self.writer.close()

    def __call__(self, environ: Environ, start_response: StartResponse) -> List[bytes]:
        method, path = environ.get("REQUEST_METHOD", "GET"), environ.get("PATH_INFO", "")
        route, methods = self.routes.get(path) or self.route_by_prefix(path)
        if route is None:
            status, headers, body = plain("404 Not Found", "not found")
        elif method == "OPTIONS" and path in TRACKER_PATHS:
            status, headers, body = "204 No Content", preflight_headers(methods), b""
        elif method not in methods:
            status, headers, body = plain("405 Method Not Allowed", f"use {' or '.join(methods)}")
            headers.append(("Allow", ", ".join(methods)))
        else:
            status, headers, body = route(environ)
        start_response(status, headers)
        if method == "HEAD":
            if not isinstance(body, bytes):
                body.close()  # type: ignore[union-attr]
            return [b""]
        return [body] if isinstance(body, bytes) else body

    def hit(self, environ: Environ) -> Answer:
        """The pixel and other tools' trackers: the hit is read (``HitReader``), placed in its visit and handed
        to the writer, and the answer is the GIF or what that tool's tracker expects, whatever the request
        holds. A dry run (``dry_run=1``) from a request allowed to read the report says what the hit
        would be, and records nothing."""
        if "dry_run=" in environ.get("QUERY_STRING", "") and self.deny_report(environ) is None:
            return plain("200 OK", self.dry_run(environ))
        return self.hits.answer(environ, self.take)

    def dry_run(self, environ: Environ) -> str:
        now, tracker = int(self.clock()), TRACKER_PATHS.get(environ["PATH_INFO"])
        if tracker is None:
            return explain(read_hit(raw_hit(environ, now), self.config, Memo(), self.hits.country_of))
        foreign = foreign_hit(tracker, environ, foreign_body(environ), now, self.hits.site_ids, Memo())
        return explain_foreign(foreign, self.config, self.hits.country_of)

    def take(self, read: "ReadHit") -> None:
        """A hit read here or by an acceptor process (``HitReader``): another tracker's request refused is
        counted; an outcome is placed in its visit and handed to the writer."""
        try:
            if isinstance(read, Refused):
                self.rejected[read.tracker, read.problem] += 1
            else:
                self.admit(read)
        except Exception as error:  # a bug must never break the host page, nor the acceptor's batch: log one line
            self.log(f"could not record a hit: {type(error).__name__}: {error}"[:200])

    def admit(self, outcome: Outcome) -> None:
        """Place a hit already read and hand it to the writer."""
        with self._visitors_lock:  # the writer must see a visit's page views in the order they were placed
            item, step = place(outcome, self.visitors)
            if item is not None:
                self.writer.submit(item, step)
        self.outcomes[outcome_name(outcome, item)] += 1
        if isinstance(outcome, Accepted):
            self.dropped_props += outcome.dropped_props

    def script(self, environ: Environ) -> Answer:
        """pixeld's tracker, at Plausible's and Umami's script addresses."""
        return "200 OK", list(SCRIPT_HEADERS), TRACKER_JS_BYTES

    def overloaded(self) -> bool:
        """For the server: stop reading requests until the writer catches up."""
        return self.writer.backlogged()

    def report(self, environ: Environ) -> Answer:
        """The report, in the format asked for, or HTML when the request prefers it (a browser)."""
        denied = None if self.config.public_report else self.deny_report(environ)
        if denied:
            return denied
        return self.report_answer(environ, public=self.config.public_report)

    def report_answer(self, environ: Environ, public: bool = False) -> Answer:
        """The report a request asks for, once it may see it (``report``, ``shared``)."""
        try:
            conn = self.reader()
        except StorageError as error:
            return plain("503 Service Unavailable", str(error))
        try:
            params = parse_query(environ.get("QUERY_STRING", ""))
            if not params.get("format") and prefers_html(environ.get("HTTP_ACCEPT", "")):
                params["format"] = "html"
            request = parse_report_request(params, self.clock(), lambda: first_day_with_data(conn), self.config.zone, self.config.goals)
            body, content_type = render_report(conn, request._replace(public=public))
            headers = [("Content-Type", content_type), ("Cache-Control", "no-store"), ("Vary", "Accept")]
            return "200 OK", headers + (PAGE_HEADERS if request.format == "html" else []), body.encode()
        except ReportError as error:
            return plain("400 Bad Request", str(error))
        except sqlite3.Error as error:
            conn.close()
            self._readers.conn = None
            return plain("503 Service Unavailable", f"cannot read the database: {error}")

    def route_by_prefix(self, path: str) -> Tuple[Optional[Callable[[Environ], Answer]], Tuple[str, ...]]:
        """The routes that carry a value in their path, and the methods they take: a share link's secret, a
        counter's page, one of the other trackers' script names (``script.outbound-links.js``)."""
        if path.startswith("/share/"):
            return self.shared, ("GET", "HEAD")
        if path.startswith("/counter/") and self.config.public_counters:
            return self.counter, ("GET", "HEAD")
        if TRACKER_SCRIPT.fullmatch(path):
            return self.script, ("GET", "HEAD")
        return None, ()

    def shared(self, environ: Environ) -> Answer:
        """A share link: ``/share/SECRET`` is one site's report, read-only, in every format, without the
        token (also through the proxy). Anything else under it (``/export``, ``/metrics``, ``/whoami``,
        a hit or a dry run) and any other site are refused. The secret is looked up by its hash on
        every request, so a new or revoked link counts at once."""
        secret, _, rest = environ["PATH_INFO"][len("/share/"):].partition("/")
        try:
            conn = self.reader()
        except StorageError as error:
            return plain("503 Service Unavailable", str(error))
        try:
            site = shared_site(conn, secret)
        except sqlite3.Error as error:
            conn.close()
            self._readers.conn = None
            return plain("503 Service Unavailable", f"cannot read the database: {error}")
        if site is None:
            return plain("404 Not Found", "no such share link: it may have been revoked")
        if rest not in ("", "report"):
            return plain("403 Forbidden", "a share link reads one site's report, nothing else")
        params = parse_query(environ.get("QUERY_STRING", ""))
        if params.get("site") and normalise_host(params["site"]) != site:
            return plain("403 Forbidden", f"this share link reads the report of {site} only")
        return self.report_answer({**environ, "QUERY_STRING": urlencode({**params, "site": site})}, public=True)  # the page says who can read it

    def counter(self, environ: Environ) -> Answer:
        """``/counter/PATH.json`` or ``.svg`` (``--public-counters``): one path's page views, for anyone,
        from any origin, over all time or ``range=``; ``site=`` where pixeld counts several sites."""
        stem, dot, kind = environ["PATH_INFO"][len("/counter"):].rpartition(".")
        if not dot or kind not in COUNTER_TYPES:
            return plain("404 Not Found", "use /counter/PATH.json or /counter/PATH.svg")
        path = normalise_path(stem.encode("latin-1", "replace").decode("utf-8", "replace") or "/")  # PATH_INFO holds the bytes as latin-1
        params = parse_query(environ.get("QUERY_STRING", ""))
        try:
            conn = self.reader()
        except StorageError as error:
            return plain("503 Service Unavailable", str(error))
        try:
            span = None
            if params.get("range", "all") != "all":
                if params["range"] == "realtime":
                    raise ReportError("a counter counts whole days: use today, yesterday, Nd (7d, 30d, ...), month, year or all")
                span = named_range(params["range"], self.clock(), lambda: first_day_with_data(conn), self.config.zone)
            site_id = counted_site(conn, parse_site(params.get("site", "")))
            if site_id is None:
                raise ReportError("pixeld counts several sites: name one with site=example.org")
            views = path_views(conn, path, site_id, span)
        except ReportError as error:
            status, headers, body = plain("400 Bad Request", str(error))
            return status, headers + [("Access-Control-Allow-Origin", "*")], body
        except sqlite3.Error as error:
            conn.close()
            self._readers.conn = None
            return plain("503 Service Unavailable", f"cannot read the database: {error}")
        body = render_counter_svg(path, views) if kind == "svg" else render_counter_json(path, views)
        return "200 OK", [("Content-Type", COUNTER_TYPES[kind]), *COUNTER_HEADERS], body.encode()

    def reader(self) -> sqlite3.Connection:
        """This thread's read-only connection for reports, kept open so SQLite's page cache stays
        warm from one report to the next (a new connection reads every page again)."""
        conn = getattr(self._readers, "conn", None)
        if conn is None:
            conn = self._readers.conn = connect(self.config.db_path, readonly=True)
        return conn

    def export(self, environ: Environ) -> Answer:
        """Stream stored page views as CSV or NDJSON, behind the report's access rule."""
        denied = self.deny_report(environ)
        if denied:
            return denied
        params = parse_query(environ.get("QUERY_STRING", ""))
        try:
            conn = connect(self.config.db_path, readonly=True)
        except StorageError as error:
            return plain("503 Service Unavailable", str(error))
        try:
            fmt, span, site = parse_export_request(params, self.clock(), lambda: first_day_with_data(conn), self.config.zone)
        except ReportError as error:
            conn.close()
            return plain("400 Bad Request", str(error))

        def body() -> Iterator[bytes]:
            try:
                for chunk in export_lines(conn, span, site, fmt):
                    yield chunk.encode()
            finally:
                conn.close()

        content_type = "text/csv; charset=utf-8" if fmt == "csv" else "application/x-ndjson"
        disposition = f'attachment; filename="pixeld-export.{fmt}"'
        return "200 OK", [("Content-Type", content_type), ("Content-Disposition", disposition), ("Cache-Control", "no-store")], body()

    def deny_report(self, environ: Environ) -> Optional[Answer]:
        """The report's access rule: the token when one is set, else a direct loopback request."""
        if self.config.token:
            if credentials_match(environ.get("HTTP_AUTHORIZATION", ""), self.config.token):
                return None
            status, headers, body = plain("401 Unauthorized", "send the token: Authorization: Bearer TOKEN, or HTTP Basic with the token as the password (curl -u :TOKEN)")
            headers.append(("WWW-Authenticate", 'Basic realm="pixeld", charset="UTF-8"'))
            return status, headers, body
        peer = parse_ip(environ.get("REMOTE_ADDR", ""))
        if peer is not None and peer.is_loopback and not any(environ.get(name) for name in PROXY_HEADERS):
            return None
        return plain("403 Forbidden", "the report is only for direct loopback requests; set --token to read it from elsewhere")

    def whoami(self, environ: Environ) -> Answer:
        """What pixeld concludes about this request: who sent it, through which proxy, for which site."""
        denied = self.deny_report(environ)
        if denied:
            return denied
        proxied = any(name in environ for name in ("HTTP_VIA", "HTTP_X_FORWARDED_PROTO", "HTTP_X_FORWARDED_HOST", "HTTP_X_REAL_IP"))
        return plain("200 OK", "\n".join(describe_request(raw_hit(environ, int(self.clock())), self.config, proxied)))

    def metrics(self, environ: Environ) -> Answer:
        """Counters and gauges in the Prometheus text format."""
        denied = self.deny_report(environ)
        if denied:
            return denied
        gauges = {
            "writer_queue_hits": ("Hits accepted but not yet committed.", self.writer.waiting()),
            "last_commit_age_seconds": ("Seconds since the writer last committed.", round(time.monotonic() - self.writer.last_commit, 3)),
            "commit_duration_seconds": ("How long the last commit took.", round(self.writer.commit_seconds, 6)),
            "database_size_bytes": ("The database file with its write-ahead log.", database_size(self.config.db_path)),
            "remembered_visitors": ("Visitor keys held in memory.", self.visitors.remembered()),
            "uptime_seconds": ("Seconds since the app started.", round(time.monotonic() - self.started, 3)),
        }
        if self.open_connections is not None:
            gauges["open_connections"] = ("Client connections open.", self.open_connections())
        outcomes = Counter({"pageview": 0, "event": 0, **{reason: 0 for reason in FILTER_REASONS if reason != "dropped"}})
        outcomes.update(self.outcomes)
        rejected = Counter({(tracker, reason): 0 for tracker in ("plausible", "umami") for reason in FOREIGN_PROBLEMS})
        rejected.update(self.rejected)
        refused = {f'tracker="{tracker}",reason="{reason}"': n for (tracker, reason), n in sorted(rejected.items())}
        return "200 OK", [("Content-Type", "text/plain; version=0.0.4; charset=utf-8"), ("Cache-Control", "no-store")], prometheus_text(
            {"hits_total": ("Hits by outcome: page views, events, engagement beacons (unmatched: for no page view remembered), malformed hits, and each filter reason.", {f'outcome="{name}"': n for name, n in sorted(outcomes.items())}),
             "rejected_requests_total": ("Other trackers' requests refused as bad input: too large, content type, malformed JSON, missing fields.", refused),
             "dropped_hits_total": ("Hits dropped because the database could not take them.", self.writer.dropped),
             "dropped_event_properties_total": ("Event property values dropped: they looked like an e-mail address, a phone number or an account.",
                                                self.dropped_props)},
            gauges,
        ).encode()

    def healthz(self, environ: Environ) -> Answer:
        status = self.writer.status()
        return plain("200 OK" if status == "ok" else "503 Service Unavailable", status)

    def index(self, environ: Environ) -> Answer:
        page = INDEX_PAGE.replace("{snippet}", snippet("", local=True, hit_path=self.config.hit_path))
        return "200 OK", [("Content-Type", "text/html; charset=utf-8"), ("Cache-Control", "no-store")], page.encode()


INDEX_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>pixeld</title></head>
<body><h1>pixeld is running</h1>
<p>This page embeds the snippet, so each visit is counted as a page view of this host.
Read the report with <code>curl http://127.0.0.1:8000/report</code> on this machine.</p>
{snippet}</body></html>
"""


def outcome_name(outcome: Outcome, item: Optional[Item]) -> str:
    """What became of a hit, for /metrics: pageview, event, engagement, a filter reason, malformed, or
    unmatched (engagement for no page view seen)."""
    if outcome is None:
        return "malformed"
    if item is None:
        return "unmatched"
    return item.reason if isinstance(item, FilteredHit) else {PageView: "pageview", Event: "event", Engagement: "engagement"}[type(item)]


PAGE_HEADERS = [  # the HTML report loads nothing, runs nothing and leaks no address
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
]


COUNTER_TYPES = {"json": "application/json", "svg": "image/svg+xml"}
COUNTER_HEADERS = [  # a counter is public, cacheable, readable from any origin (GET only: other methods get 405) and runs nothing
    ("Cache-Control", "max-age=300"),
    ("Access-Control-Allow-Origin", "*"),
    ("Cross-Origin-Resource-Policy", "cross-origin"),
    ("X-Content-Type-Options", "nosniff"),
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'"),
]


def preflight_headers(methods: Sequence[str]) -> List[Tuple[str, str]]:
    """CORS for other tools' trackers, which post JSON from the site's pages: any origin, no credentials."""
    return [
        ("Access-Control-Allow-Origin", "*"), ("Access-Control-Allow-Methods", ", ".join(methods)),
        ("Access-Control-Allow-Headers", "Content-Type"), ("Access-Control-Max-Age", "86400"), ("Content-Length", "0"),
    ]


def explain_foreign(foreign: ForeignHit, config: Config, country_of: Callable[[Optional[IPAddress]], str]) -> str:
    """The dry run of another tool's request: what the hit would be, or why there is none."""
    if foreign.problem:
        return f"refused: {foreign.problem} (nothing is recorded)"
    if foreign.hit is None:
        return f"ignored: {foreign.note}"
    return explain(read_hit(foreign.hit, config, Memo(), country_of))


def prefers_html(accept: str) -> bool:
    """Whether an Accept header ranks text/html above text/plain, as browsers do; curl's */* does not."""
    quality: Dict[str, float] = {}
    for item in accept[:1024].split(","):
        media, _, params = item.strip().partition(";")
        match = re.search(r"q\s*=\s*([01](?:\.\d{0,3})?)", params)
        quality[media.strip().lower()] = float(match.group(1)) if match else 1.0
    ranked = lambda *media: max((quality[m] for m in media if m in quality), default=0.0)  # noqa: E731
    return ranked("text/html") > ranked("text/plain", "text/*", "*/*") if "text/html" in quality else False


def credentials_match(authorization: str, token: str) -> bool:
    """Bearer TOKEN, or HTTP Basic with the token as the password (any user name), compared in constant time."""
    scheme, _, value = authorization.strip().partition(" ")
    given = ""
    if scheme.lower() == "bearer":
        given = value.strip()
    elif scheme.lower() == "basic":
        try:
            given = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            given = ""
    return hmac.compare_digest(given.encode("utf-8", "replace"), token.encode("utf-8"))


def describe_request(hit: RawHit, config: Config, proxied: bool) -> List[str]:
    """/whoami: the peer, whether it is a trusted proxy, the client address pixeld would use (masked) and
    where it came from, and the site it would record. Nothing is stored."""
    peer = parse_ip(hit.peer)
    trusted = peer is not None and is_in(peer, config.trusted_proxies)
    address = client_address(hit.peer, hit.forwarded_for, hit.forwarded, config.trusted_proxies)
    via = "X-Forwarded-For" if hit.forwarded_for.strip() else "Forwarded" if hit.forwarded.strip() else ""
    host = normalise_host(hit.params["host"]) if hit.params.get("host") else url_host(hit.page_url)
    site = site_of(host, config.sites) + (f" (hostname {host})" if host and site_of(host, config.sites) != host else "")
    lines = [
        f"peer: {hit.peer or '(unknown)'}",
        f"trusted proxy: {'yes' if trusted else 'no'} (--trusted-proxy {', '.join(map(str, config.trusted_proxies)) or 'none'})",
        f"client address: {mask_address(address)} (from {via if trusted and via else 'the peer'})",
        f"site: {site or '(none: a hit names its site with host= or its Referer)'}",
    ]
    if trusted and not via and (proxied or not peer.is_loopback):  # type: ignore[union-attr]
        lines.append("warning: the request came through a trusted proxy that sent no X-Forwarded-For: every visitor would look like the proxy")
    elif trusted and not via:
        lines.append("note: no X-Forwarded-For: right for a direct request from this machine; through a proxy, every visitor would look like the proxy")
    elif via and not trusted:
        lines.append(f"note: {via} is ignored, because the peer is not a trusted proxy")
    return lines


def mask_address(address: Optional[IPAddress]) -> str:
    """An address with its host part hidden: ``203.0.113.x``, ``2001:db8:1:2::x``."""
    if address is None:
        return "(unknown)"
    if address.version == 4:
        return str(address).rsplit(".", 1)[0] + ".x"
    return ":".join(address.exploded.split(":")[:4]) + "::x"


def database_size(path: str) -> int:
    return sum(os.path.getsize(path + suffix) for suffix in ("", "-wal") if os.path.exists(path + suffix))


def prometheus_text(counters: Dict[str, Tuple[str, Any]], gauges: Dict[str, Tuple[str, Any]]) -> str:
    """Metrics named ``pixeld_NAME`` with their help and type; a counter's value may be {labels: value}."""
    lines = []
    for kind, metrics in (("counter", counters), ("gauge", gauges)):
        for name, (help_text, value) in metrics.items():
            lines += [f"# HELP pixeld_{name} {help_text}", f"# TYPE pixeld_{name} {kind}"]
            values = value if isinstance(value, dict) else {"": value}
            lines += [f"pixeld_{name}{{{labels}}} {number}" if labels else f"pixeld_{name} {number}" for labels, number in values.items()]
    lines += ["# HELP pixeld_build_info The running version.", "# TYPE pixeld_build_info gauge", f'pixeld_build_info{{version="{__version__}"}} 1']
    return "\n".join(lines) + "\n"


def plain(status: str, message: str) -> Answer:
    return status, [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")], (message + "\n").encode()


###############################################################################
# Server ######################################################################
###############################################################################

MAX_REQUEST_LINE = 32 * 1024  # pixel URLs carry a title and a referrer; real browsers stay far below this
MAX_HEADER_BYTES = 32 * 1024
MAX_HEADERS = 100
MAX_READ_BODY = 8 * MAX_BODY  # bodies read, so that even a too large one is answered on a connection that stays usable
THREADS = 4  # a server's threads for everything but the hit (reports, exports), and for slow clients
SEND_TIMEOUT = 10.0
ERROR_STATUSES = {
    "400": "400 Bad Request", "500": "500 Internal Server Error", "408": "408 Request Timeout", "414": "414 URI Too Long",
    "431": "431 Request Header Fields Too Large", "501": "501 Not Implemented", "505": "505 HTTP Version Not Supported",
}


class BadRequest(Exception):
    """A request the server answers itself, with this status, before the app sees it."""


class Connection:
    """A client connection: its socket, its address, what it sent that is not answered yet, and when it
    must have delivered its next request."""

    __slots__ = ("sock", "peer", "buffer", "deadline")

    def __init__(self, sock: socket.socket, peer: Any) -> None:
        self.sock = sock
        self.peer = peer
        self.buffer = b""
        self.deadline = 0.0


class Request(NamedTuple):
    environ: Environ
    keep_alive: bool
    body_size: int = 0  # the body's bytes to read after the head (a tracker's JSON); 0 for none
    body: bytes = b""


def parse_request(head: bytes, peer: Any, server_address: Tuple[str, int]) -> Request:
    """The request line and headers (without the blank line) as a WSGI environ, per PEP 3333."""
    text = head.decode("latin-1").split("\r\n")  # latin-1: one character per byte, so lengths are bytes
    if len(text[0]) > MAX_REQUEST_LINE:
        raise BadRequest("414")
    if len(text) - 1 > MAX_HEADERS or len(head) - len(text[0]) > MAX_HEADER_BYTES:
        raise BadRequest("431")
    parts = text[0].split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1]:
        raise BadRequest("400")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise BadRequest("505" if version.startswith("HTTP/") else "400")
    if "://" in target[:10]:
        target = "/" + target.split("://", 1)[1].partition("/")[2]
    path, _, query = target.partition("?")
    environ: Environ = {
        "REQUEST_METHOD": method.upper(),
        "SCRIPT_NAME": "",
        "PATH_INFO": unquote(path.partition("#")[0], encoding="latin-1"),
        "QUERY_STRING": query.partition("#")[0],
        "SERVER_NAME": server_address[0],
        "SERVER_PORT": str(server_address[1]),
        "SERVER_PROTOCOL": version,
        "REMOTE_ADDR": peer[0] if isinstance(peer, tuple) else "",
        "REMOTE_PORT": str(peer[1]) if isinstance(peer, tuple) else "",
    }
    for line in text[1:]:
        name, colon, value = line.partition(":")
        key = environ_key(name)
        if not colon or not key:
            raise BadRequest("400")
        environ[key] = environ[key] + "," + value.strip() if key in environ else value.strip()
    connection = environ.get("HTTP_CONNECTION", "").lower()
    keep_alive = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
    length = environ.get("CONTENT_LENGTH", "")
    body_size = int(length) if length.isdigit() and len(length) < 10 and int(length) <= MAX_READ_BODY and "HTTP_TRANSFER_ENCODING" not in environ else 0
    if (length not in ("", "0") and not body_size) or "HTTP_TRANSFER_ENCODING" in environ:
        keep_alive = False  # a body that is not read (chunked, or far larger than any tracker's) ends the connection with this request
    return Request(environ, keep_alive, body_size)


def environ_key(name: str) -> str:
    """A header's WSGI environ key (``User-Agent`` is ``HTTP_USER_AGENT``), or empty for a malformed name.
    The usual headers are looked up; others are converted each time, so no cache keeps what a client sent."""
    known = KNOWN_HEADERS.get(name)
    if known is not None:
        return known
    if not name or name != name.strip() or " " in name:
        return ""
    key = name.upper().replace("-", "_")
    return key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key


KNOWN_HEADERS = {
    name: "HTTP_" + name.upper().replace("-", "_")
    for spelling in (str.title, str.lower)
    for name in map(spelling, (
        "Host", "User-Agent", "Accept", "Accept-Language", "Accept-Encoding", "Referer", "Origin", "Connection", "Cookie", "Authorization",
        "X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "X-Real-IP", "Forwarded", "Via", "DNT", "Sec-GPC", "Purpose", "Sec-Purpose",
        "Sec-Fetch-Dest", "Sec-Fetch-Mode", "Sec-Fetch-Site", "Sec-CH-UA", "Sec-CH-UA-Mobile", "Sec-CH-UA-Platform", "Priority", "Cache-Control", "Pragma",
    ))
}
KNOWN_HEADERS.update({spelling(name): name.upper().replace("-", "_") for spelling in (str.title, str.lower) for name in ("Content-Type", "Content-Length")})


INLINE_ENVIRON = {
    "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
    "wsgi.errors": sys.stderr, "SERVER_SOFTWARE": f"pixeld/{__version__}",
}


def answer_directly(app: Any, request: Request, log: Callable[[str], None]) -> Tuple[bytes, bool]:
    """Run the app for a request of a non-blocking path (the hit) and return the whole response and
    whether the connection stays open. The same protocol as ResponseHandler, without wsgiref's
    per-request bookkeeping: the hit endpoint answers a fixed, small, complete body."""
    environ = {**INLINE_ENVIRON, "wsgi.input": io.BytesIO(request.body), **request.environ}
    answer: List[Any] = []

    def start_response(status: str, headers: List[Tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        answer[:] = [status, headers]
        return lambda data: None

    try:
        body = b"".join(app(environ, start_response))
    except Exception as error:  # as wsgiref does: a failing app is a 500, and the connection closes
        log(f"request failed: {type(error).__name__}: {error}"[:200])
        return error_response("500"), False
    status, headers = answer
    keep_alive = request.keep_alive and any(name == "Content-Length" for name, _ in headers)
    lines = [f"HTTP/1.1 {status}\r\nDate: {http_date()}\r\nServer: pixeld/{__version__}\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in headers]
    if not keep_alive:
        lines.append("Connection: close\r\n")
    elif request.environ["SERVER_PROTOCOL"] == "HTTP/1.0":
        lines.append("Connection: keep-alive\r\n")
    return "".join(lines).encode("latin-1") + b"\r\n" + body, keep_alive


class ResponseHandler(BaseHandler):
    """wsgiref runs the app for one request. The response is collected and sent in one go;
    a long streamed body (an export) goes out in 64 KiB pieces, and then the connection closes."""

    os_environ: Dict[str, str] = {}
    http_version = "1.1"
    origin_server = True
    server_software = f"pixeld/{__version__}"
    wsgi_multithread = True
    wsgi_multiprocess = False
    wsgi_run_once = False

    def __init__(self, request: Request, log: Callable[[str], None], stream_to: Optional[socket.socket] = None) -> None:
        self.request = request
        self.keep_alive = request.keep_alive
        self.log = log
        self.stream_to = stream_to
        self.chunks: List[bytes] = []
        self.size = 0

    def get_stdin(self) -> Any:
        return io.BytesIO(self.request.body)

    def get_stderr(self) -> Any:
        return sys.stderr

    def add_cgi_vars(self) -> None:
        self.environ.update(self.request.environ)

    def cleanup_headers(self) -> None:
        super().cleanup_headers()
        if "Content-Length" not in self.headers:
            self.keep_alive = False
        if not self.keep_alive:
            self.headers["Connection"] = "close"
        elif self.request.environ["SERVER_PROTOCOL"] == "HTTP/1.0":
            self.headers["Connection"] = "keep-alive"

    def send_preamble(self) -> None:
        """The status line, Date and Server in one piece (wsgiref writes them one by one)."""
        self._write(f"HTTP/1.1 {self.status}\r\nDate: {http_date()}\r\nServer: {self.server_software}\r\n".encode("latin-1"))

    def log_exception(self, exc_info: Any) -> None:
        self.log(f"request failed: {exc_info[0].__name__}: {exc_info[1]}"[:200])

    def _write(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)

    def _flush(self) -> None:
        if self.stream_to is not None and self.size >= 65536:
            self.stream_to.sendall(self.take())

    def take(self) -> bytes:
        data = b"".join(self.chunks)
        self.chunks, self.size = [], 0
        return data


@lru_cache(maxsize=2)
def _http_date(second: int) -> str:
    return format_date_time(second)


def http_date() -> str:
    return _http_date(int(time.time()))


def error_response(code: str) -> bytes:
    status = ERROR_STATUSES[code]
    body = f"{status[4:].lower()}\n".encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def connection_limit() -> int:
    """How many connections to hold: raise the soft open-file limit to the hard one (at most
    65,536), and stay well below it, so accepting never runs the process out of descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65_536 if hard == resource.RLIM_INFINITY else min(hard, 65_536)
    if soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return max(16, min(soft - 64, 16_384))


class Server:
    """An HTTP/1.1 server for a WSGI app, built to face the open internet on a small machine.

    One thread owns every socket: it accepts, reads and parses requests without blocking, so idle
    and slow clients cost a socket, never a thread. Each connection must deliver a complete
    request within ``request_timeout`` seconds (a total deadline, not a per-read timeout), and
    request lines and headers are capped, and so are bodies (the JSON that other tools' trackers post:
    past ``MAX_READ_BODY`` a body is not read, and its connection ends with the answer). When
    connections reach the cap (kept below the open-file limit) or ``accept`` fails for lack of file
    descriptors, the longest-waiting idle connection is closed. Paths the app declares non-blocking (the pixel) are answered on this thread, keeping the
    hot path free of hand-offs; everything else runs on a small pool of threads. Keep-alive,
    ``TCP_NODELAY``, and one send per response.
    """

    def __init__(
        self, app: Any, listener: Optional[socket.socket], log: Callable[[str], None], request_timeout: float = 10.0, threads: int = THREADS,
        address: Optional[Tuple[str, int]] = None,
    ) -> None:
        """``listener``: the socket to accept from; None for the process that owns the visitors when acceptor
        processes take every connection (``--workers``): it serves the connections they hand over (``adopt``)."""
        self.app = app
        self.log = log
        self.request_timeout = request_timeout
        self.inline_paths = frozenset(getattr(app, "nonblocking_paths", ()))
        self.overloaded: Callable[[], bool] = getattr(app, "overloaded", lambda: False)
        self.resumed: Callable[[float], None] = lambda held: None  # told how long the server held back (``_hold``)
        self.listener = listener
        self.address = address or listener.getsockname()[:2]  # type: ignore[union-attr]
        self.max_connections = connection_limit()
        self.selector = selectors.DefaultSelector()
        if listener is not None:
            listener.setblocking(False)
            self.selector.register(listener, selectors.EVENT_READ)
        self.wake_reader, self.wake_writer = socket.socketpair()
        self.wake_reader.setblocking(False)
        self.wake_writer.setblocking(False)
        self.selector.register(self.wake_reader, selectors.EVENT_READ)
        self.waiting: Dict[socket.socket, Connection] = {}  # waiting for a request, oldest first
        self.busy = 0
        self.accept_paused_until = 0.0
        self.listener_closed = False
        self.jobs: "queue.SimpleQueue[Optional[Tuple[Connection, Optional[Request], bytes]]]" = queue.SimpleQueue()
        self.returned: "queue.SimpleQueue[Tuple[Connection, bool]]" = queue.SimpleQueue()
        self.threads = [threading.Thread(target=self._work, name=f"pixeld-thread-{n}", daemon=True) for n in range(threads)]
        for thread in self.threads:
            thread.start()

    def serve(self, stopping: threading.Event, heartbeat: Callable[[], None]) -> None:
        """Serve until ``stopping`` is set; ``heartbeat`` runs every quarter second from this loop."""
        swept = 0.0
        while not stopping.is_set():
            if self.overloaded():
                self._hold(stopping, heartbeat)
            for key, _ in self.selector.select(timeout=0.25):
                data = key.data
                if data.__class__ is Connection:
                    self._read(data)
                elif key.fileobj is self.listener:
                    self._accept()
                elif key.fileobj is self.wake_reader:
                    self._take_back()
                else:
                    data()  # a channel someone watches here (``watch``)
            self._after_events()
            now = time.monotonic()
            if now - swept >= 0.25:  # deadlines, paused accepting and the heartbeat need no finer grain
                swept = now
                self._expire(now)
                if self.accept_paused_until and now >= self.accept_paused_until:
                    self.accept_paused_until = 0.0
                    self.selector.register(self.listener, selectors.EVENT_READ)
                heartbeat()
        self._shut_down()

    def watch(self, sock: socket.socket, ready: Callable[[], None]) -> None:
        """Call ``ready`` from the serve loop whenever ``sock`` has something to read."""
        self.selector.register(sock, selectors.EVENT_READ, ready)

    def unwatch(self, sock: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.selector.unregister(sock)

    def adopt(self, sock: socket.socket, peer: Any, buffer: bytes) -> None:
        """Serve a connection another process accepted, from the bytes it had read on."""
        if self.listener_closed:
            sock.close()
            return
        sock.setblocking(False)
        conn = Connection(sock, peer)
        conn.buffer = buffer
        self._serve_buffered(conn)

    def _after_events(self) -> None:
        """Runs after each round of events: a subclass sends what it held back."""

    def _hold(self, stopping: threading.Event, heartbeat: Callable[[], None]) -> None:
        """The app cannot keep up: read nothing, accept nothing, until it can. Clients wait in TCP's
        buffers; the time held does not count against their request deadlines."""
        started = beat = time.monotonic()
        while self.overloaded() and not stopping.is_set():
            time.sleep(0.002)
            if time.monotonic() - beat >= 0.25:
                beat = time.monotonic()
                heartbeat()
        held = time.monotonic() - started
        for conn in self.waiting.values():
            conn.deadline += held
        self.resumed(held)

    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, peer = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as error:
                if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._make_room(pause=True)
                return
            if len(self.waiting) + self.busy >= self.max_connections:
                self._make_room(pause=False)
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._read(Connection(sock, peer), first=True)

    def _make_room(self, pause: bool) -> None:
        """Close the longest-waiting idle connection; out of descriptors with none idle, pause accepting."""
        if self.waiting:
            self._close(next(iter(self.waiting.values())))
        elif pause and not self.accept_paused_until:
            self.selector.unregister(self.listener)
            self.accept_paused_until = time.monotonic() + 0.1

    def _read(self, conn: Connection, first: bool = False) -> None:
        """Read what the client sent. A new connection is read at once (``first``): its request has
        usually arrived with it, and then it is answered without ever being watched for reading."""
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            if first:
                self._wait(conn)
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        conn.buffer += data
        self._serve_buffered(conn)

    def _serve_buffered(self, conn: Connection) -> None:
        """Answer every complete request in the buffer that can be answered here; then wait for more."""
        while True:
            end = conn.buffer.find(b"\r\n\r\n")
            if end < 0:
                code = self._incomplete_request_error(conn.buffer)
                if code:
                    self._reject(conn, code)
                else:
                    self._wait(conn)
                return
            try:
                request = parse_request(conn.buffer[:end], conn.peer, self.address)
            except BadRequest as error:
                self._reject(conn, str(error))
                return
            finish = end + 4 + request.body_size
            if len(conn.buffer) < finish:  # the body is on its way: wait for it within the same deadline
                self._wait(conn)
                return
            if not self._take(conn, request._replace(body=conn.buffer[end + 4 : finish]), finish):
                return

    def _take(self, conn: Connection, request: Request, finish: int) -> bool:
        """Answer a request whose bytes end at ``finish`` in the buffer; True to go on with the next one."""
        conn.buffer = conn.buffer[finish:]
        if request.environ["PATH_INFO"] not in self.inline_paths:
            self._unwait(conn)
            self.busy += 1
            self.jobs.put((conn, request, b""))
            return False
        if not self._answer_here(conn, request):
            return False
        self._unwait_keep_registered(conn)
        return True

    @staticmethod
    def _incomplete_request_error(buffer: bytes) -> str:
        line_end = buffer.find(b"\r\n")
        if (line_end < 0 and len(buffer) > MAX_REQUEST_LINE) or line_end > MAX_REQUEST_LINE:
            return "414"
        return "431" if len(buffer) > MAX_REQUEST_LINE + MAX_HEADER_BYTES else ""

    def _answer_here(self, conn: Connection, request: Request) -> bool:
        """Answer a non-blocking request on this thread; True when the connection stays with us."""
        return self._send_answer(conn, *answer_directly(self.app, request, self.log))

    def _send_answer(self, conn: Connection, data: bytes, keep_alive: bool) -> bool:
        """Send a whole answer; True when the connection stays with us."""
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(conn)
            return False
        if sent < len(data):  # the client is not reading: a thread finishes the send, with a timeout, and closes
            self.busy += 1
            self.jobs.put((conn, None, data[sent:]))
            return False
        if not keep_alive:
            self._close(conn)
            return False
        return True

    def _reject(self, conn: Connection, code: str) -> None:
        try:
            conn.sock.send(error_response(code))
        except OSError:
            pass
        self._close(conn)

    def _wait(self, conn: Connection) -> None:
        if conn.sock in self.waiting:
            return
        conn.deadline = time.monotonic() + self.request_timeout
        self.waiting[conn.sock] = conn
        self.selector.register(conn.sock, selectors.EVENT_READ, conn)

    def _unwait_keep_registered(self, conn: Connection) -> None:
        """After a request answered here: a new deadline for the next one, without touching the selector."""
        if self.waiting.pop(conn.sock, None) is not None:
            conn.deadline = time.monotonic() + self.request_timeout
            self.waiting[conn.sock] = conn

    def _unwait(self, conn: Connection) -> None:
        if self.waiting.pop(conn.sock, None) is not None:
            self.selector.unregister(conn.sock)

    def _expire(self, now: float) -> None:
        """The total deadline: a connection that has not delivered a request in time is closed."""
        for conn in list(self.waiting.values()):
            if conn.deadline > now:
                break
            self._close(conn)

    def _close(self, conn: Connection) -> None:
        self._unwait(conn)
        try:
            conn.sock.close()
        except OSError:
            pass

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            conn, request, pending = job
            keep_alive = request is not None
            try:
                conn.sock.settimeout(SEND_TIMEOUT)
                if request is None:
                    conn.sock.sendall(pending)
                else:
                    handler = ResponseHandler(request, self.log, stream_to=conn.sock)
                    handler.run(self.app)
                    conn.sock.sendall(handler.take())
                    keep_alive = handler.keep_alive
                conn.sock.setblocking(False)
            except OSError:
                keep_alive = False
            except Exception as error:  # never let one request take a worker down
                self.log(f"request failed: {type(error).__name__}: {error}"[:200])
                keep_alive = False
            self.returned.put((conn, keep_alive))
            try:
                self.wake_writer.send(b"\0")
            except OSError:
                pass  # the wake-up pipe is full: the loop is waking up anyway

    def _take_back(self) -> None:
        try:
            while self.wake_reader.recv(4096):
                pass
        except OSError:
            pass
        while True:
            try:
                conn, keep_alive = self.returned.get_nowait()
            except queue.Empty:
                return
            self.busy -= 1
            if keep_alive and not self.listener_closed:
                self._serve_buffered(conn)
            else:
                self._close(conn)

    def _shut_down(self, grace: float = 5.0) -> None:
        """Stop accepting, drop idle connections, give the threads a few seconds to finish.

        Every pixel hit was answered (and handed to the writer) on this thread, so nothing that
        was acknowledged waits on a thread: a long export to a slow client must not hold up the
        final flush until systemd loses patience. They are daemon threads; they end with us."""
        self.listener_closed = True
        if self.listener is not None:
            if not self.accept_paused_until:
                self.selector.unregister(self.listener)
            self.listener.close()
        for conn in list(self.waiting.values()):
            self._close(conn)
        deadline = time.monotonic() + grace
        while self.busy and time.monotonic() < deadline:
            self._take_back()
            time.sleep(0.02)
        for _ in self.threads:
            self.jobs.put(None)
        self.selector.close()
        self.wake_reader.close()
        self.wake_writer.close()


HANDOVER_BATCH = 256  # hits in one message to the owner at most: the owner checks its writer's queue between messages
CHANNEL_MESSAGE = 64 * 1024  # bytes in one message to the owner at most, well within the channel's send buffer
CHANNEL_RECEIVE = 4 * CHANNEL_MESSAGE  # what the owner reads a message into: one longer is cut short, and dropped
OWNER_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN)  # what sending on a channel whose owner has gone fails with


class OwnerGone(Exception):
    """The process that owns the visitors has gone: what an acceptor holds is never answered."""


def hit_messages(outbox: List[tuple]) -> Iterator[bytes]:
    """A batch of hits read, as messages for the owner of at most ``CHANNEL_MESSAGE`` bytes each (halved until
    they fit; a hit carries nothing long, so one always fits)."""
    message = b"H" + marshal.dumps(outbox)
    if len(message) <= CHANNEL_MESSAGE or len(outbox) == 1:
        yield message
        return
    half = len(outbox) // 2
    yield from hit_messages(outbox[:half])
    yield from hit_messages(outbox[half:])


class Acceptor(Server):
    """The server of an acceptor process (``serve --workers N``): it accepts on its own socket of the
    shared port, reads and parses requests, and reads each hit as far as it can without the visitors
    (``HitReader``: normalised, its User-Agent reduced, its source classified). The outcomes of a
    round of events go to the process that owns the visitors and the writer in one message on
    ``channel``, and only once the message is there are the hits answered.

    On a Unix socket a message that ``send`` has taken sits in the receiving socket's queue: it is
    the owner's, and stays readable after the acceptor dies (the owner reads a channel to its end
    before it reaps an acceptor, and on SIGTERM before it flushes the writer). So nothing answered is
    lost, without a round trip per batch (which would put the owner's wake-up on every hit's path).
    A round's hits go in messages of at most ``CHANNEL_MESSAGE`` bytes (``hit_messages``).
    Back-pressure: the channel holds a few messages (``net.unix.max_dgram_qlen``, 10 by default); while
    the owner holds back (its writer behind), ``send`` blocks and the acceptor stops reading.

    Every other request (the report, a dry run, a preflight) is handed over with its
    connection: the socket itself crosses the channel (``SCM_RIGHTS``), with the bytes read on it.
    The slow-client defences are the server's own."""

    def __init__(self, reader: "HitReader", listener: socket.socket, channel: socket.socket, log: Callable[[str], None], request_timeout: float = 10.0) -> None:
        super().__init__(reader, listener, log, request_timeout, threads=1)
        self.reader = reader
        self.channel = channel
        self.owner = os.getppid()
        self.held: List[Tuple[Connection, bytes, bool]] = []  # answers waiting for their hits to be handed over
        self.batch = min(HANDOVER_BATCH, max(1, reader.config.queue_limit // 4))  # the owner checks its writer's queue between messages

    def _take(self, conn: Connection, request: Request, finish: int) -> bool:
        if not self.reader.handles(request.environ):
            self._hand_over(conn)
            return False
        conn.buffer = conn.buffer[finish:]
        self.held.append((conn, *answer_directly(self.reader, request, self.log)))
        return False  # the connection's next request waits until this answer is sent

    def _hand_over(self, conn: Connection) -> None:
        try:
            socket.send_fds(self.channel, [b"C" + marshal.dumps((conn.peer, conn.buffer))], [conn.sock.fileno()])
        except OSError as error:
            if error.errno in OWNER_GONE:
                raise OwnerGone() from None
            self._reject(conn, "431")
            return
        self._close(conn)

    def _after_events(self) -> None:
        """Hand the round's hits to the owner, then answer them and go on with what each connection
        sent next (pipelined requests)."""
        while self.held:
            outbox, self.reader.outbox = self.reader.outbox, []
            for start in range(0, len(outbox), self.batch):
                for message in hit_messages(outbox[start : start + self.batch]):
                    self._send(message)
            held, self.held = self.held, []
            for conn, data, keep_alive in held:
                if self._send_answer(conn, data, keep_alive):
                    self._unwait_keep_registered(conn)
                    self._serve_buffered(conn)

    def _send(self, message: bytes) -> None:
        """Send a message, waiting for room; a message the channel cannot take costs its hits (logged), never the acceptor."""
        for _ in range(100):
            try:
                self.channel.send(message)
                return
            except OSError as error:
                if error.errno in OWNER_GONE:
                    raise OwnerGone() from None
                if error.errno != errno.ENOBUFS:
                    self.log(f"acceptor: could not hand hits over: {error_reason(error)}"[:200])
                    return
            time.sleep(0.01)  # the kernel is short of memory for a moment
        self.log("acceptor: could not hand hits over: no memory for the message")

    def beat(self) -> None:
        """Tell the owner this loop is alive (its watchdog), never waiting for room to do so; end with
        an owner that has gone (killed: an acceptor must not keep the port without it)."""
        try:
            self.channel.send(b"B", socket.MSG_DONTWAIT)
        except OSError as error:
            if error.errno in OWNER_GONE:
                raise OwnerGone() from None
        if os.getppid() != self.owner:
            raise OwnerGone()


def listen(host: str, port: int, shared: bool = False, backlog: int = 1024) -> socket.socket:
    """A listening socket; ``shared``: one of several on the same port (``SO_REUSEPORT``), one per acceptor
    process, among which the kernel spreads new connections evenly (so each process wakes for its own
    connections only). With no
    ``backlog`` the socket only holds the port: the owner's, which accepts nothing."""
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind((host, port))
        if backlog:
            listener.listen(backlog)
    except OSError:
        listener.close()
        raise
    listener.setblocking(False)
    return listener


###############################################################################
# Service: start-up, signals, sd_notify and the watchdog ######################
###############################################################################


def notify(message: str) -> None:
    """Tell systemd (``Type=notify``) how we are; without ``NOTIFY_SOCKET`` this does nothing."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError:
        pass


def watchdog_interval() -> float:
    """Half of systemd's ``WatchdogSec=``, or 0 when there is no watchdog for this process."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or (pid and pid != str(os.getpid())):
        return 0.0
    return int(usec) / 2e6


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def make_listener(config: Config) -> socket.socket:
    """The listening socket, or with acceptor processes a socket that holds the port for theirs. The port
    is first taken alone: ``SO_REUSEPORT`` would let a second pixeld (the same user's) join the
    first one's port and quietly take half its hits into another database."""
    try:
        if not config.workers:
            return listen(config.host, config.port)
        with listen(config.host, config.port, backlog=0) as alone:
            port = alone.getsockname()[1]
        return listen(config.host, port, shared=True, backlog=0)
    except OSError as error:
        raise ConfigError(f"cannot listen on {format_address(config.host, config.port)}: {error_reason(error)}") from None


SWITCH_INTERVAL = 0.001  # how long the writer may hold the interpreter while the serve loop waits (Python's default: 5 ms)
GC_FREEZE_INTERVAL = 0.25  # seconds between moving long-lived objects out of the garbage collector's way
GC_FULL_INTERVAL = DAY  # a full collection, for the rare cycle, once a day


def collector() -> Callable[[], None]:
    """Keeps the garbage collector short, called from a serve loop's heartbeat.

    Python's full collections walk every tracked object in the middle of serving: the memo's
    entries, and the hits waiting for the writer (a full collection took up to 60 ms under load).
    Frozen, they are skipped; reference counting still frees them, and a full collection runs
    from here once a day."""
    collected = {"young": time.monotonic(), "full": time.monotonic()}

    def collect() -> None:
        now = time.monotonic()
        if now - collected["full"] >= GC_FULL_INTERVAL:
            collected["full"] = now
            gc.unfreeze()
            gc.collect()
        if now - collected["young"] >= GC_FREEZE_INTERVAL:
            collected["young"] = now
            gc.freeze()  # a constant-time move; the young generation's own collections stay small

    return collect


class Worker:
    """One acceptor process, as its owner sees it."""

    __slots__ = ("slot", "process", "channel", "heard", "listening")

    def __init__(self, slot: int, process: subprocess.Popen, channel: socket.socket) -> None:
        self.slot, self.process, self.channel = slot, process, channel
        self.heard = time.monotonic()
        self.listening = False  # it has said so: its first message

    @property
    def pid(self) -> int:
        return self.process.pid


ACCEPTOR_COMMAND = "acceptor-process"  # the hidden command line of an acceptor process: this file, the command, its channel's descriptor
ACCEPTOR_START = 10.0  # seconds the owner waits for its acceptors to listen before it says it is ready
STOP_GRACE = 10.0  # seconds acceptors get to end at SIGTERM, well inside the unit's TimeoutStopSec (30 s), leaving the rest to the writer


class Supervisor:
    """The acceptor processes (``--workers N``) and their channels, seen from the process that owns the
    visitors and the writer.

    Each acceptor is a fresh interpreter running this file (never a fork: it must hold none of the
    owner's raw inputs, salt or visitors, nor a lock another thread held), with a channel (a
    ``SOCK_SEQPACKET`` socket pair, so each message arrives whole) on which its settings go first. On it
    come batches of hits read (``H``), connections handed over (``C``, the socket itself) and
    heartbeats (``B``); each batch is admitted, in order, to the visitors and the writer. While the
    writer is behind, the owner's loop holds (``Server._hold``): it reads no channel, they fill up, and
    the acceptors stop reading (``Acceptor``).
    An acceptor that ends is restarted (at most once a second per slot); an acceptor silent for
    longer than the watchdog allows keeps the owner from pinging systemd's watchdog."""

    def __init__(self, config: Config, listener: socket.socket, log: Callable[[str], None]) -> None:
        self.config = config
        self.address = listener.getsockname()[:2]
        self.log = log
        self.workers: Dict[int, Worker] = {}  # by slot
        self.started: Dict[int, float] = {}  # when each slot's latest acceptor started
        self.server: Optional[Server] = None
        self.app: Optional[App] = None
        self.adopted: List[Tuple[socket.socket, Any, bytes]] = []  # connections handed over, to serve once every channel is read
        self.stopping = False

    def start(self, server: Server, app: App) -> None:
        """Start the acceptors, and wait (a while) until each listens."""
        self.server, self.app = server, app
        server.resumed = self.resumed
        for slot in range(self.config.workers):
            self._spawn(slot)
        deadline = time.monotonic() + ACCEPTOR_START
        while time.monotonic() < deadline and any(not worker.listening for worker in self.workers.values()):
            self._drain(list(self.workers.values()), 0.1, draining=False)

    def _spawn(self, slot: int) -> None:
        self.started[slot] = time.monotonic()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            process = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), ACCEPTOR_COMMAND, str(theirs.fileno())], stdin=subprocess.DEVNULL, pass_fds=[theirs.fileno()],
            )
            mine.send(pickle.dumps((self.config, self.address)))
        except (OSError, subprocess.SubprocessError) as error:
            self.log(f"cannot start acceptor {slot}: {error_reason(error)}")
            mine.close()
            return
        finally:
            theirs.close()
        mine.setblocking(False)
        worker = self.workers[slot] = Worker(slot, process, mine)
        if self.server is not None:
            self.server.watch(mine, lambda: self._ready(worker))

    def _ready(self, worker: Worker) -> None:
        """A channel has messages. Connections handed over are served once every channel is read: a hit
        answered before a request was sent (``/metrics``, a report) is admitted before it is served."""
        self._receive(worker)
        if self.adopted:
            for other in list(self.workers.values()):
                self._receive(other)
            adopted, self.adopted = self.adopted, []
            for sock, peer, buffer in adopted:
                if self.server is not None and not self.stopping:
                    self.server.adopt(sock, peer, buffer)
                else:
                    sock.close()

    def _receive(self, worker: Worker, draining: bool = False) -> None:
        """Take the messages waiting on a worker's channel, until the writer falls behind: the rest wait
        there, and the acceptors stop reading once the channels are full. ``draining`` (stopping): every
        message, to the channel's end."""
        assert self.app is not None
        while draining or not self.app.overloaded():
            try:
                message, fds, flags, _ = socket.recv_fds(worker.channel, CHANNEL_RECEIVE, 1)
            except BlockingIOError:
                return
            except OSError:
                message, fds, flags = b"", [], 0
            if not message:
                self._ended(worker)
                return
            worker.heard, worker.listening = time.monotonic(), True
            try:
                if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                    raise ValueError(f"a message longer than {CHANNEL_RECEIVE:,} bytes")
                self._take(message, fds)
            except Exception as error:  # one bad message must not take the owner down, nor stop it reading
                self.log(f"acceptor {worker.slot}: dropped a message: {type(error).__name__}: {error}"[:200])
            finally:
                for fd in fds:
                    os.close(fd)

    def _take(self, message: bytes, fds: List[int]) -> None:
        """One message: a batch of hits is admitted; a connection handed over waits in ``adopted`` (its descriptor
        taken out of ``fds``)."""
        assert self.app is not None
        kind = message[:1]
        if kind == b"H":
            for packed in marshal.loads(message[1:]):
                self.app.take(unpack_read(packed))
        elif kind == b"C" and fds:
            peer, buffer = marshal.loads(message[1:])
            self.adopted.append((socket.socket(fileno=fds.pop()), peer, buffer))

    def _ended(self, worker: Worker) -> None:
        if self.server is not None:
            self.server.unwatch(worker.channel)
        worker.channel.close()
        del self.workers[worker.slot]
        code = worker.process.wait()
        if self.stopping:
            return
        how = f"signal {-code}" if code < 0 else f"exit {code}"
        self.log(f"acceptor {worker.slot} (pid {worker.pid}) ended ({how}); starting another")
        self.tend()

    def tend(self) -> None:
        """Start an acceptor in each empty slot, at most once a second per slot (a crashing one must not spin)."""
        for slot in range(self.config.workers):
            if slot not in self.workers and not self.stopping and time.monotonic() - self.started.get(slot, 0.0) >= 1.0:
                self._spawn(slot)

    def resumed(self, held: float) -> None:
        """The owner held back for ``held`` seconds, reading nothing: the acceptors were not silent."""
        for worker in self.workers.values():
            worker.heard += held

    def silent(self, limit: float) -> List[Worker]:
        """The acceptors not heard from for ``limit`` seconds; none while the owner holds back (it reads
        no channel then, and the acceptors wait for room in theirs)."""
        if self.app is not None and self.app.overloaded():
            return []
        now = time.monotonic()
        return [worker for worker in self.workers.values() if now - worker.heard > limit]

    def stop(self, grace: float = STOP_GRACE) -> None:
        """Ask every acceptor to stop and wait for them to end, admitting everything they hand over meanwhile
        (as the writer keeps up). Those still there after ``grace`` (wedged, or waiting for room in their
        channel) are killed, and each channel is read to its end, writer behind or not: what is in it was answered."""
        self.stopping = True
        self.server = None  # closed by now: connections handed over are closed unanswered
        for worker in list(self.workers.values()):
            with contextlib.suppress(OSError):
                worker.process.terminate()
        deadline = time.monotonic() + grace
        while self.workers and time.monotonic() < deadline:
            if self.app is not None and self.app.overloaded():
                time.sleep(0.005)
            else:
                self._drain(list(self.workers.values()), 0.25, draining=False)
        for worker in list(self.workers.values()):
            with contextlib.suppress(OSError):
                worker.process.kill()
        until = time.monotonic() + 5.0
        while self.workers and time.monotonic() < until:
            self._drain(list(self.workers.values()), 0.25, draining=True)
        for worker in list(self.workers.values()):
            self.log(f"acceptor {worker.slot} (pid {worker.pid}) would not end; its channel is closed unread")
            self._ended(worker)
        for sock, _, _ in self.adopted:
            sock.close()

    def _drain(self, workers: List[Worker], timeout: float, draining: bool) -> None:
        ready, _, _ = select.select([worker.channel for worker in workers], [], [], timeout)
        for worker in workers:
            if worker.channel in ready:
                self._receive(worker, draining)


class Settings(pickle.Unpickler):
    """Reads the settings an acceptor process gets on its channel: classes of this file, however it was
    started (``__main__`` or ``pixeld``), and of the standard library."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("__main__", __name__):
            return globals()[name]
        return super().find_class(module, name)


def run_acceptor(fd: int, log: Callable[[str], None]) -> int:
    """An acceptor process, started by the owner of the visitors (``Supervisor``) with its channel on descriptor
    ``fd``: it reads its settings there, listens on the port beside the other acceptors (and says so), serves
    hits until SIGTERM, and ends. An error ends it with one line naming the error's type and where it
    was raised, never what a client sent."""
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    channel = socket.socket(fileno=fd)
    try:
        config, address = Settings(io.BytesIO(channel.recv(CHANNEL_RECEIVE))).load()
        listener = listen(*address, shared=True)
        channel.send(b"B")
        server = Acceptor(HitReader(config, log=log), listener, channel, log, config.request_timeout)
        collect = collector()

        def beat() -> None:
            collect()
            server.beat()

        server.serve(stopping, beat)
    except OwnerGone:
        return 1
    except Exception as error:
        where = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
        log(f"acceptor (pid {os.getpid()}) stopped by an error: {type(error).__name__}" + (f" in {where.name}, line {where.lineno}" if where else ""))
        return 1
    return 0


def heartbeat(app: App, supervisor: Optional[Supervisor] = None) -> Callable[[], None]:
    """Called from the serve loop: pings the systemd watchdog, so a wedged loop gets restarted, keeps
    systemd's status line current, and keeps the garbage collector short (``collector``). With
    acceptor processes, it restarts those that ended, and the watchdog is pinged only while every
    one of them is heard from: a wedged acceptor gets the service restarted as a wedged loop does."""
    interval = watchdog_interval()
    last = [0.0, ""]
    collect = collector()

    def beat() -> None:
        now = time.monotonic()
        collect()
        silent = supervisor.silent(max(2 * interval, 1.0)) if supervisor is not None else []
        if supervisor is not None:
            supervisor.tend()
        if interval and now - last[0] >= interval and not silent:
            last[0] = now
            notify("WATCHDOG=1")
        status = app.writer.status()
        if silent:
            status = f"acceptor {silent[0].slot} (pid {silent[0].pid}) silent for {now - silent[0].heard:.0f} s"
        if status != last[1]:
            last[1] = status
            notify(f"STATUS={status}")

    return beat


def serve(config: Config, log: Callable[[str], None]) -> None:
    """Run until SIGTERM or SIGINT, then stop accepting, finish requests and flush every hit.

    With ``config.workers`` acceptor processes (``--workers``), they take every connection and this
    process owns the visitors, the writer and every request but the hit; else it does everything."""
    sys.setswitchinterval(SWITCH_INTERVAL)
    app = App(config, log=log)
    try:
        listener = make_listener(config)
    except ConfigError:
        app.close()
        raise
    supervisor = Supervisor(config, listener, log) if config.workers else None
    try:
        address = listener.getsockname()[:2]
        server = Server(app, None if supervisor else listener, log, config.request_timeout, address=address)
        app.open_connections = lambda: len(server.waiting) + server.busy
        stopping = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stopping.set())
        if supervisor is not None:
            supervisor.start(server, app)
        log(
            f"version {__version__} listening on http://{format_address(*address)}, "
            + (f"{config.workers} acceptor processes, " if config.workers else "")
            + f"database {os.path.abspath(config.db_path)}, GeoIP {'on' if config.geoip_path else 'off'}, "
            f"trusted proxies {', '.join(map(str, config.trusted_proxies)) or 'none'}, "
            f"report {'public' if config.public_report else 'by token' if config.token else 'from loopback only'}"
            + (", view counters public" if config.public_counters else "") + (", Sec-GPC honoured" if config.honour_gpc else "")
        )
        notify(f"READY=1\nSTATUS=listening on {format_address(*address)}")
        server.serve(stopping, heartbeat(app, supervisor))
    finally:  # whatever ended the loop, every hit answered is saved
        notify("STOPPING=1\nSTATUS=saving the last page views")
        if supervisor is not None:
            supervisor.stop()
        listener.close()
        app.close()
    log("stopped; every page view is saved")


###############################################################################
# Digest and alerts ###########################################################
###############################################################################

DIGEST_RANGES = ("7d", "30d", "month")
DIGEST_ROWS = 5  # pages and sources a digest lists
DIGEST_WIDTH = 72
MAIL_TIMEOUT = 30.0  # seconds a mail server or sendmail has to take a message
SENDMAIL = "/usr/sbin/sendmail"
MAIL_STYLE = {  # the digest's HTML is styled inline: mail readers drop style sheets and load nothing from elsewhere
    "body": "margin:0;padding:16px;background:#ffffff;color:#1d1f21;font:15px/1.45 -apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif",
    "h1": "font-size:19px;margin:0 0 4px", "h2": "font-size:16px;margin:22px 0 6px", "muted": "color:#5f6368;margin:0",
    "table": "border-collapse:collapse;width:100%;max-width:36rem", "cell": "padding:4px 8px 4px 0;border-bottom:1px solid #e3e3e3;overflow-wrap:anywhere",
    "number": "padding:4px 0 4px 8px;border-bottom:1px solid #e3e3e3;text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums",
}


class SendFailed(Exception):
    """Mail that could not be handed over: one line naming the cause. Nothing is tried again, so nothing is sent twice."""


class Mail(NamedTuple):
    """Where a digest or an alert goes: through a mail server, or to sendmail."""

    to: Tuple[str, ...]
    sender: str
    smtp: Optional[Tuple[str, int]] = None
    security: str = ""  # "", "starttls" or "tls"
    user: str = ""
    password: str = ""
    sendmail: str = ""  # the sendmail program, when it takes the message instead of a server


class Digest(NamedTuple):
    report: ReportData
    new_sources: List[Tuple[str, int]]  # sources with page views in the period and none before it, most first


def digest_range(name: str, now: float, zone: dt.tzinfo) -> Range:
    """The last complete period: the 7 or 30 days before today, or the last calendar month."""
    today = dt.datetime.fromtimestamp(now, zone).date()
    if name == "month":
        first = (today.replace(day=1) - dt.timedelta(days=1)).replace(day=1)
        return Range(local_midnight(first, zone), local_midnight(today.replace(day=1), zone))
    return Range(local_midnight(today - dt.timedelta(days=int(name[:-1])), zone), local_midnight(today, zone))


def build_digest(conn: sqlite3.Connection, query: Query) -> Digest:
    """The period's report, and the sources that sent nobody before it (since the first day with data)."""
    report = query_report(conn, query)
    first = first_day_with_data(conn)
    seen: Set[str] = set()
    if first is not None and first * DAY < query.range.start:
        seen = {row.value for row in query_report(conn, query._replace(range=Range(first * DAY, query.range.start))).sections["sources"]}
    return Digest(report, [(row.value, row.count) for row in report.sections["sources"] if row.value and row.value not in seen])


def digest_lists(digest: Digest) -> List[Tuple[str, str, List[Tuple[str, int]]]]:
    """The digest's lists, (title, what is counted, [(label, count)]): the top pages by page views, the top
    sources and the new ones by visitors, and the goals (with their conversion rates) when there are any."""
    sections = digest.report.sections
    lists = [
        ("Top pages", "Views", [(row.value, row.count) for row in sections["pages"][:DIGEST_ROWS]]),
        ("Top sources", "Visitors", [(row.value or "(direct)", row.count) for row in sections["sources"][:DIGEST_ROWS]]),
        ("New sources", "Visitors", digest.new_sources[:DIGEST_ROWS]),
        ("Goals", "Visitors", [(f"{row.value} ({row.conversion_rate:.1f}%)", row.count) for row in sections.get("goals", [])]),  # type: ignore[union-attr]
    ]
    return [(title, counted, rows) for title, counted, rows in lists if rows or title in ("Top pages", "Top sources")]


def digest_subject(digest: Digest) -> str:
    query = digest.report.query
    return f"pixeld digest · {query.site or 'all sites'} · {format_range(query.range, query.zone)}"


def digest_text(digest: Digest) -> str:
    report, width = digest.report, DIGEST_WIDTH
    lines = [digest_subject(digest), "Changes are against the same number of days just before.", ""]
    lines += [f"{title:<16}{value:>10}  {changed}".rstrip() for title, value, changed in headline_rows(report, ascii=False)]
    for title, counted, rows in digest_lists(digest):
        lines += ["", f"{title:<{width - 10}}{counted:>10}"]
        lines += [f"{cut(label, width - 12):<{width - 10}}{count:>10,}" for label, count in rows] or ["(none)"]
    if report.annotations:
        lines += ["", "Notes", *[f"◆ {note_label(note, report.query.site)}" for note in report.annotations]]
    return "\n".join(lines) + "\n"


def digest_html(digest: Digest) -> str:
    """The digest as one HTML page styled inline, nothing loaded from elsewhere, every value escaped."""
    report, style = digest.report, MAIL_STYLE
    rows = "".join(
        f'<tr><td style="{style["cell"]}">{esc(title)}</td><td style="{style["number"]}"><b>{esc(value)}</b></td>'
        f'<td style="{style["number"]};color:#5f6368">{esc(changed)}</td></tr>'
        for title, value, changed in headline_rows(report, ascii=False)
    )
    parts = [
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(digest_subject(digest))}</title></head><body style="{style["body"]}">',
        f'<h1 style="{style["h1"]}">pixeld digest · {esc(report.query.site or "all sites")}</h1>',
        f'<p style="{style["muted"]}">{esc(format_range(report.query.range, report.query.zone))}; changes against the same number of days just before</p>',
        f'<table role="presentation" style="{style["table"]};margin-top:12px">{rows}</table>',
    ]
    for title, counted, listed_rows in digest_lists(digest):
        head = f'<tr><td style="{style["cell"]};color:#5f6368"></td><td style="{style["number"]};color:#5f6368">{esc(counted)}</td></tr>'
        body = "".join(f'<tr><td style="{style["cell"]}">{esc(label)}</td><td style="{style["number"]}">{count:,}</td></tr>' for label, count in listed_rows)
        body = body or "<tr><td>(none)</td></tr>"
        parts.append(f'<h2 style="{style["h2"]}">{esc(title)}</h2><table role="presentation" style="{style["table"]}">{head}{body}</table>')
    if report.annotations:
        notes = "".join(f'<li>◆ {esc(note_label(note, report.query.site))}</li>' for note in report.annotations)
        parts.append(f'<h2 style="{style["h2"]}">Notes</h2><ul style="margin:0;padding-left:0;list-style:none">{notes}</ul>')
    parts.append(f'<p style="{style["muted"]};margin-top:22px;font-size:12px">pixeld {__version__}</p></body></html>')
    return "".join(parts) + "\n"


def mail_message(subject: str, text: str, html_body: str, mail: Mail, cte: str = "quoted-printable") -> email.message.EmailMessage:
    """A message of a plain-text part and, if given, an HTML alternative: quoted-printable to send, so that
    any mail server takes them; 8bit to print, so that a terminal shows them as they are."""
    message = email.message.EmailMessage()
    message["Subject"] = subject
    message["From"] = mail.sender
    if mail.to:
        message["To"] = ", ".join(mail.to)
    message["Date"] = email.utils.formatdate(usegmt=True)
    message["Message-ID"] = email.utils.make_msgid("pixeld", domain=mail.sender.rpartition("@")[2] or "localhost")
    message.set_content(text, cte=cte)
    if html_body:
        message.add_alternative(html_body, subtype="html", cte=cte)
    return message


def send_mail(message: email.message.EmailMessage, mail: Mail) -> None:
    """Hand the message over once, to sendmail or a mail server; SendFailed with the cause when that fails."""
    if mail.sendmail:
        pipe_to_sendmail(message, mail.sendmail)
    elif mail.smtp:
        send_smtp(message, mail)


def pipe_to_sendmail(message: email.message.EmailMessage, program: str) -> None:
    import subprocess

    try:
        done = subprocess.run([program, "-t", "-i"], input=message.as_bytes(), capture_output=True, timeout=MAIL_TIMEOUT)
    except OSError as error:
        raise SendFailed(f"cannot run {program}: {error_reason(error)}") from None
    except subprocess.TimeoutExpired:
        raise SendFailed(f"{program} did not finish within {MAIL_TIMEOUT:.0f} s") from None
    if done.returncode:
        said = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise SendFailed(f"{program} exited with status {done.returncode}" + (f": {clean_text(said[0], 200)}" if said else ""))


def send_smtp(message: email.message.EmailMessage, mail: Mail) -> None:
    """One SMTP session: TLS from the start or after STARTTLS (certificates checked), a login when a user
    is set, one message. Once the server has the message, a failing goodbye is not an error."""
    import smtplib
    import ssl

    assert mail.smtp is not None
    host, port = mail.smtp
    where = format_address(host, port)
    try:
        context = ssl.create_default_context()
        if mail.security == "tls":
            client: smtplib.SMTP = smtplib.SMTP_SSL(host, port, timeout=MAIL_TIMEOUT, context=context)
        else:
            client = smtplib.SMTP(host, port, timeout=MAIL_TIMEOUT)
        try:
            if mail.security == "starttls":
                client.starttls(context=context)
            if mail.user:
                client.login(mail.user, mail.password)
            refused = client.send_message(message)
        finally:
            with contextlib.suppress(smtplib.SMTPException, OSError):
                client.quit()
    except smtplib.SMTPAuthenticationError as error:
        raise SendFailed(f"{where} refused the login of {mail.user}: {smtp_reply(error)}") from None
    except smtplib.SMTPRecipientsRefused as error:
        raise SendFailed(f"{where} refused every recipient: {', '.join(error.recipients)}") from None
    except smtplib.SMTPResponseException as error:
        raise SendFailed(f"{where} answered {smtp_reply(error)}") from None
    except (smtplib.SMTPException, OSError) as error:
        raise SendFailed(f"cannot send through {where}: {error_reason(error)}") from None
    if refused:
        raise SendFailed(f"{where} took the message but refused {', '.join(refused)}")


def smtp_reply(error: Any) -> str:
    text = error.smtp_error.decode("utf-8", "replace") if isinstance(error.smtp_error, bytes) else str(error.smtp_error)
    return f"{error.smtp_code} {clean_text(text, 200)}"


class Alert(NamedTuple):
    """A site's page views in the last complete hour, far above or below the same hour's average over the week before."""

    site: str
    direction: str  # spike or drop
    hour: int  # the hour's start
    views: int
    usual: float  # the same hour's page views, averaged over the 7 days before
    date: str  # the hour's day in the report's time zone: one alert per site, direction and day

    def line(self, zone: dt.tzinfo, top_source: str) -> str:
        """One line: the site, how much, and where the page views came from."""
        start, end = (dt.datetime.fromtimestamp(moment, zone).strftime("%H:%M") for moment in (self.hour, self.hour + 3600))
        how = "none in that hour over the 7 days before"
        if self.usual:
            how = f"{self.views / self.usual:.1f}× the usual {self.usual:,.1f} (that hour's average over the 7 days before)"
        when = f"from {start} to {end} {zone_name(zone)} on {self.date}"
        return f"{self.direction}: {self.site} had {self.views:,} page views {when}, {how}; top source: {top_source}"


def last_complete_hour(now: float, zone: dt.tzinfo) -> int:
    """The start of the last whole hour of the zone's clock (every zone's hours start on a quarter hour)."""
    offset = int(dt.datetime.fromtimestamp(now, zone).utcoffset().total_seconds())  # type: ignore[union-attr]
    return int(now) - (int(now) + offset) % 3600 - 3600


def same_hour_before(hour: int, zone: dt.tzinfo, days: int = 7) -> List[int]:
    """The same hour of the clock on each of the days before (across a daylight saving change too)."""
    local = dt.datetime.fromtimestamp(hour, zone)
    return [int(dt.datetime.combine(local.date() - dt.timedelta(days=back), local.time(), tzinfo=zone).timestamp()) for back in range(1, days + 1)]


def find_alerts(conn: sqlite3.Connection, now: float, zone: dt.tzinfo, spike: float, drop: float, min_views: int, site: str = "") -> List[Alert]:
    """Sites whose last complete hour had at least ``spike`` times, or at most ``drop`` times, the page
    views of that hour's average over the 7 days before. A spike needs ``min_views`` page views, a drop
    an average of ``min_views``: a quiet site's noise raises nothing."""
    hour = last_complete_hour(now, zone)
    current = views_per_site(conn, Range(hour, hour + 3600))
    before = [views_per_site(conn, Range(start, start + 3600)) for start in same_hour_before(hour, zone)]
    sites = [site] if site else sorted(name for name in set(current).union(*before) if name)  # page views without a host are nobody's
    date = dt.datetime.fromtimestamp(hour, zone).date().isoformat()
    alerts = []
    for name in sites:
        views, usual = current.get(name, 0), sum(counts.get(name, 0) for counts in before) / len(before)
        if views >= min_views and views >= spike * usual:
            alerts.append(Alert(name, "spike", hour, views, usual, date))
        elif usual >= min_views and views <= drop * usual:
            alerts.append(Alert(name, "drop", hour, views, usual, date))
    return alerts


def top_source(conn: sqlite3.Connection, alert: Alert, zone: dt.tzinfo) -> str:
    if not alert.views:
        return "none"
    sources = query_report(conn, Query(Range(alert.hour, alert.hour + 3600), zone, alert.site)).sections["sources"]
    top = max(sources, key=lambda row: row.pageviews, default=None)  # type: ignore[union-attr]
    return f"{top.value or '(direct)'} ({top.pageviews:,} page views)" if top else "none"


###############################################################################
# Command line ################################################################
###############################################################################

ENV_FILE = "/etc/pixeld.env"  # the service's settings (pixeld.service: EnvironmentFile=)
ENVIRONMENT = {
    "listen": "PIXELD_LISTEN",
    "db": "PIXELD_DB",
    "geoip": "PIXELD_GEOIP",
    "token": "PIXELD_TOKEN",
    "token_file": "PIXELD_TOKEN_FILE",
    "trusted_proxy": "PIXELD_TRUSTED_PROXIES",
    "site": "PIXELD_SITES",
    "spam_list": "PIXELD_SPAM_LIST",
    "ignore_ip": "PIXELD_IGNORE_IPS",
    "rate_limit": "PIXELD_RATE_LIMIT",
    "workers": "PIXELD_WORKERS",
    "timezone": "PIXELD_TIMEZONE",
    "keep_days": "PIXELD_KEEP_DAYS",
    "request_timeout": "PIXELD_REQUEST_TIMEOUT",
    "queue_limit": "PIXELD_QUEUE_LIMIT",
    "hit_path": "PIXELD_HIT_PATH",
    "public_report": "PIXELD_PUBLIC_REPORT",
    "public_counters": "PIXELD_PUBLIC_COUNTERS",
    "honour_gpc": "PIXELD_HONOUR_GPC",
    "goal": "PIXELD_GOALS",
    "site_id": "PIXELD_SITE_IDS",
    "node": "PIXELD_NODE",
    "final_after": "PIXELD_FINAL_AFTER",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pixeld.py", description="Privacy-first web analytics in one file.")
    parser.add_argument("--version", action="version", version=f"pixeld {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    add_serve_options(commands.add_parser("serve", help="run the daemon (the default)", description="Run the pixeld daemon."))
    add_report_commands(commands)
    add_import_and_check_commands(commands)
    add_operations_commands(commands)
    add_share_and_top_commands(commands)
    add_digest_commands(commands)
    return parser


def add_report_commands(commands: Any) -> None:
    """``report`` and ``export``: the database file read directly."""
    report_cmd = commands.add_parser("report", help="print the report from the database file", description="Print the report straight from the database, also while the daemon runs.")
    add_db_option(report_cmd, "read-only")
    add_env_file_option(report_cmd)
    add_range_options(report_cmd)
    add_goal_option(report_cmd)
    for name in FILTERS:
        report_cmd.add_argument(f"--{name}", default="", help=f"only page views with this {name}" + (" (a trailing * matches a prefix)" if name in ("path", "referrer") else ""))
    report_cmd.add_argument("--limit", default="", help="rows per section (default 10 in text, all in json and csv)")
    report_cmd.add_argument("--group", default="", choices=("", *GRAINS), metavar="GRAIN", help="the series per hour, day, week, month or year (default: by the range)")
    report_cmd.add_argument("--section", default="", help="one section in full: " + ", ".join(SECTION_TITLES))
    report_cmd.add_argument("--ascii", nargs="?", const="1", default="", metavar="1", help="bars of # and changes as +12%% for terminals without Unicode (ascii=1)")
    report_cmd.add_argument("--format", default="text", choices=tuple(CONTENT_TYPES))

    export_cmd = commands.add_parser("export", help="write stored page views as CSV or NDJSON", description="Write the stored page views (they carry no identifiers) to standard output.")
    add_db_option(export_cmd, "read-only")
    add_env_file_option(export_cmd)
    add_range_options(export_cmd, default="everything")
    export_cmd.add_argument("--format", choices=("csv", "ndjson"), help="csv (the default) or ndjson (the feed's only format)")
    feed = export_cmd.add_mutually_exclusive_group()
    feed.add_argument(
        "--cursor-file", metavar="FILE",
        help="the feed: every page view, event and imported count once, final, since the cursor in FILE (none: from the start); "
             "the next cursor goes to FILE.next once every row is written",
    )
    feed.add_argument("--since", metavar="CURSOR", help="the feed since CURSOR ('' for the start); the next cursor is printed on stderr")
    feed.add_argument("--commit-cursor", metavar="FILE", help="take FILE.next as FILE: run it once the feed's consumer has succeeded")
    feed.add_argument("--schema", choices=("clickhouse", "duckdb"), help="print the CREATE TABLE statement for the feed's rows")
    export_cmd.add_argument("--node", metavar="NAME", help="stamp the feed's rows with this node (default: the one the daemon serves this database as)")


def add_import_and_check_commands(commands: Any) -> None:
    """``import`` and ``check``: files and single hits through the pipeline."""
    import_cmd = commands.add_parser(
        "import", help="bring page views in from a file",
        description="Import page views: pixeld's own export, GoatCounter's CSV export, Umami's events, Plausible's CSV export (daily aggregates), "
                    "the 2020 Flask tool's database, or a combined access log.",
    )
    import_cmd.add_argument("file")
    add_db_option(import_cmd, "created if missing")
    add_env_file_option(import_cmd)
    import_cmd.add_argument("--format", default="", choices=IMPORT_FORMATS, help="the file's kind (default: detected)")
    add_filter_options(import_cmd, " The first is the host of rows that name none (Flask database, access logs).")
    add_goal_option(import_cmd)
    import_cmd.add_argument("--geoip", metavar="FILE.mmdb", help="look up countries for access logs; the addresses are then dropped [$PIXELD_GEOIP]")
    import_cmd.add_argument("--force", action="store_true", help="import a file again that was imported before")

    check_cmd = commands.add_parser(
        "check", help="say whether a hit would be counted, and why",
        description="Run one hit through the pipeline offline and say whether it would be counted, and why. Nothing is stored. "
                    "Exit status: 0 counted, 1 not counted (filtered or malformed), 2 a bad option or setting.",
    )
    for name, note in (("ua", "the User-Agent"), ("referrer", "the page's referrer, a full URL"), ("path", "the page's path"), ("host", "the site's hostname"),
                       ("ip", "the client address (for --ignore-ip and the country)"), ("event", "an event's name, to check an event instead of a page view"),
                       ("accept-language", "the Accept-Language header"), ("query", "more of the pixel's parameters, as the snippet sends them: title=Home&utm_source=x")):
        check_cmd.add_argument(f"--{name}", default=None if name == "event" else "", help=note)
    check_cmd.add_argument("--geoip", metavar="FILE.mmdb", help="look the country up [$PIXELD_GEOIP]")
    add_filter_options(check_cmd)
    add_env_file_option(check_cmd)


def add_operations_commands(commands: Any) -> None:
    """``doctor``, ``backup`` and ``snippet``: what an operator runs around the daemon."""
    doctor_cmd = commands.add_parser("doctor", help="check the setup and explain what is wrong", description="Check the database, token, GeoIP file, time zone and state directory, and with --url a running daemon. Exit status 0 when nothing fails.")
    add_serve_options(doctor_cmd)
    add_env_file_option(doctor_cmd)
    doctor_cmd.add_argument("--url", help="a running daemon to check, as your browser or proxy reaches it: http://127.0.0.1:8000 or https://stats.example.org")

    backup_cmd = commands.add_parser("backup", help="copy the database consistently, also while the daemon runs", description="Make a consistent copy of the database with SQLite's online backup, also while the daemon runs.")
    backup_cmd.add_argument("dest", help="the new file; it must not exist yet")
    add_db_option(backup_cmd, "read-only")
    add_env_file_option(backup_cmd)

    snippet_cmd = commands.add_parser("snippet", help="print the HTML snippet for your pages", description="Print the snippet to paste into your pages.")
    snippet_cmd.add_argument("--url", default=SNIPPET_PLACEHOLDER, help="the address pixeld answers on, as your readers' browsers reach it")
    snippet_cmd.add_argument("--hit-path", metavar="PATH", help="the hit path the daemon serves (serve --hit-path) [$PIXELD_HIT_PATH]")


def add_share_and_top_commands(commands: Any) -> None:
    """``share`` (read-only links to one site's report) and ``top`` (the live view)."""
    share_cmd = commands.add_parser(
        "share", help="make, list or revoke read-only links to one site's report",
        description="Make a secret link that shows one site's report, read-only, to whoever holds it, without the token. The database keeps only its hash.",
    )
    share_cmd.add_argument("site", nargs="?", help="the site whose report the new link shows, like example.org")
    share_cmd.add_argument("--url", help="pixeld's address as readers reach it (https://stats.example.org); without it, the path to append is printed")
    share_cmd.add_argument("--list", action="store_true", help="list the links (their ids and sites; the secrets are not kept)")
    share_cmd.add_argument("--revoke", metavar="ID", type=int, help="revoke a link: it stops working at once")
    add_db_option(share_cmd, "created if missing")
    add_env_file_option(share_cmd)

    top_cmd = commands.add_parser(
        "top", help="a live view in the terminal", description="A full-screen live view: visitors now, page views per minute, top pages and sources. q quits."
    )
    add_db_option(top_cmd, "read-only")
    add_env_file_option(top_cmd)
    top_cmd.add_argument("--site", default="", help="one site (hostname) instead of all")
    top_cmd.add_argument("--interval", type=float, default=5.0, help="seconds between refreshes (default 5)")
    top_cmd.add_argument("--tz", default="", help="time zone for the clock and minutes (default $PIXELD_TIMEZONE, as in --env-file, else UTC)")


def add_serve_options(command: argparse.ArgumentParser) -> None:
    """The daemon's settings, for ``serve`` and for ``doctor``, which checks them."""
    command.add_argument("--listen", metavar="HOST:PORT", help=f"address to listen on (default {DEFAULT_LISTEN}; [::1]:8000 for IPv6) [$PIXELD_LISTEN]")
    add_db_option(command, "created on first start")
    command.add_argument("--geoip", metavar="FILE.mmdb", help="GeoLite2/DB-IP country database; needs the geoip2 package [$PIXELD_GEOIP]")
    token = command.add_mutually_exclusive_group()
    token.add_argument("--token", metavar="TOKEN", help="token that /report requires: 'Authorization: Bearer TOKEN', or HTTP Basic with the token as the password (curl -u :TOKEN) [$PIXELD_TOKEN]")
    token.add_argument("--token-file", metavar="PATH", help="read the token from a file, keeping it out of ps [$PIXELD_TOKEN_FILE]")
    command.add_argument(
        "--trusted-proxy", metavar="CIDR", nargs="+", action="extend",
        help="proxies whose X-Forwarded-For/Forwarded are believed (default loopback) [$PIXELD_TRUSTED_PROXIES, comma-separated]",
    )
    add_filter_options(command)
    command.add_argument("--rate-limit", metavar="N", help="page views counted per visitor per minute; 0 for no limit (default 60) [$PIXELD_RATE_LIMIT]")
    command.add_argument("--timezone", metavar="ZONE", help="the report's default time zone, like Europe/Berlin (default UTC) [$PIXELD_TIMEZONE]")
    command.add_argument(
        "--workers", metavar="N",
        help="acceptor processes that answer hits, beside the one that counts and writes them; 0: one process (default: one per core but one) [$PIXELD_WORKERS]",
    )
    command.add_argument("--request-timeout", metavar="SECONDS", help="time a client has to send a whole request (default 10) [$PIXELD_REQUEST_TIMEOUT]")
    command.add_argument("--queue-limit", metavar="N", help="hits held in memory while the database cannot take them; more are dropped and counted (default 100000) [$PIXELD_QUEUE_LIMIT]")
    command.add_argument("--hit-path", metavar="PATH", help="serve the hit endpoint at this path as well as /pixel.gif, like /hit (see Content blockers) [$PIXELD_HIT_PATH]")
    command.add_argument("--public-report", action="store_true", default=None, help="anyone may read /report (never /export); set to 1 [$PIXELD_PUBLIC_REPORT]")
    command.add_argument(
        "--site-id", metavar="UUID=DOMAIN", action="append",
        help="the site an Umami website id stands for, for pages that keep Umami's tracker; repeatable [$PIXELD_SITE_IDS, comma-separated]",
    )
    command.add_argument("--keep-days", metavar="N", help="delete single page views older than N days, daily; counts stay (default: keep all) [$PIXELD_KEEP_DAYS]")
    command.add_argument("--public-counters", action="store_true", default=None, help="anyone may read a page's views at /counter/ [$PIXELD_PUBLIC_COUNTERS]")
    command.add_argument("--node", metavar="NAME", help="this pixeld's name among several, stamped on the feed's rows (default: the host name) [$PIXELD_NODE]")
    command.add_argument(
        "--final-after", metavar="SECONDS",
        help=f"a page view no longer changes this long after it was seen, and the feed ships it (default {FINAL_AFTER}) [$PIXELD_FINAL_AFTER]",
    )
    command.add_argument("--honour-gpc", action="store_true", default=None, help="do not count browsers that send Sec-GPC: 1 [$PIXELD_HONOUR_GPC]")
    add_goal_option(command)


def add_goal_option(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--goal", metavar="NAME=event:NAME|path:/PATH", action="append",
        help="an outcome to count, an event or a page (a trailing * matches a prefix); repeatable [$PIXELD_GOALS, separated by ;]",
    )


def goals_of(args: argparse.Namespace, environ: Dict[str, str]) -> Tuple[Goal, ...]:
    """The goals: the flags, else ``PIXELD_GOALS`` (``A=event:x;B=path:/y*``)."""
    values = getattr(args, "goal", None)
    if values is None:
        values = [part for part in environ.get(ENVIRONMENT["goal"], "").split(";") if part.strip()]
    return parse_goals(values)


def add_filter_options(command: argparse.ArgumentParser, site_note: str = "") -> None:
    """What decides whether a hit counts, the same for ``serve`` and ``import``."""
    command.add_argument(
        "--site", metavar="DOMAIN", action="append",
        help=f"accept only hits for this site and its subdomains; repeatable (default: every host).{site_note} [$PIXELD_SITES, comma-separated]",
    )
    command.add_argument("--spam-list", metavar="FILE", help="more referrer spam domains, one per line, added to the built-in list [$PIXELD_SPAM_LIST]")
    command.add_argument("--ignore-ip", metavar="CIDR", action="append", help="drop hits from these addresses (your own visits); repeatable [$PIXELD_IGNORE_IPS, comma-separated]")


def add_db_option(command: argparse.ArgumentParser, note: str) -> None:
    command.add_argument("--db", metavar="PATH", help=f"SQLite database, {note} (default ./{DEFAULT_DB}) [$PIXELD_DB]")


def add_env_file_option(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--env-file", metavar="PATH",
        help=f"read PIXELD_* settings from this file, as the service does (default {ENV_FILE} when it exists; '' for none); the environment and flags win",
    )


def add_range_options(command: argparse.ArgumentParser, default: str = "30d") -> None:
    command.add_argument("--start", default="", help="start: unix seconds, 2026-11-01 or 2026-11-01T12:00:00 (in --tz)")
    command.add_argument("--end", default="", help="end, exclusive; a date includes that whole day")
    command.add_argument("--range", default="", help=f"realtime (the last 30 minutes), today, yesterday, Nd (7d, 30d, ...), month, year or all (default {default})")
    command.add_argument("--tz", default="", help="time zone for days and times, like Europe/Berlin (default $PIXELD_TIMEZONE, as in --env-file, else UTC)")
    command.add_argument("--site", default="", help="one site (hostname) instead of all")


def with_env_file(args: argparse.Namespace, environ: Dict[str, str]) -> Dict[str, str]:
    """The environment, completed from the service's settings file, so that a command run by hand
    (``report``, ``check``, ``doctor``...) uses the daemon's time zone, sites and filters. ``serve``
    gets the file from systemd (``EnvironmentFile=``), and takes no option."""
    if not hasattr(args, "env_file"):
        return environ
    path = ENV_FILE if args.env_file is None else args.env_file
    if not path or (args.env_file is None and not os.path.exists(path)):
        return environ
    try:
        return {**read_env_file(path), **environ}
    except ConfigError as error:
        if args.env_file is not None:
            raise
        log_line(f"{error}; going on without the service's settings (--env-file '' reads none)")
        return environ


def read_env_file(path: str) -> Dict[str, str]:
    """The ``PIXELD_*`` lines of a systemd environment file: ``NAME=value``, ``#`` and ``;`` comments, optional quotes."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error_reason(error)}") from None
    settings = {}
    for line in lines:
        name, equals, value = line.strip().partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if equals and name.strip().startswith("PIXELD_"):
            settings[name.strip()] = value
    return settings


def setting(args: argparse.Namespace, name: str, environ: Dict[str, str], default: Any = None) -> Any:
    """A flag wins over the environment, which wins over the default."""
    value = getattr(args, name, None)
    if value is not None:
        return value
    return environ.get(ENVIRONMENT[name]) or default


def config_from(args: argparse.Namespace, environ: Dict[str, str]) -> Config:
    host, port = parse_listen(setting(args, "listen", environ, DEFAULT_LISTEN))
    token, token_file = getattr(args, "token", None), getattr(args, "token_file", None)
    if token is None and token_file is None:
        token, token_file = environ.get("PIXELD_TOKEN") or None, environ.get("PIXELD_TOKEN_FILE") or None
    if token is not None and not token.strip():
        raise ConfigError("the token is empty")
    proxies = listed(args, "trusted_proxy", environ)
    spam_list = setting(args, "spam_list", environ)
    return Config(
        host=host,
        port=port,
        db_path=setting(args, "db", environ, DEFAULT_DB),
        geoip_path=setting(args, "geoip", environ, ""),
        token=read_token_file(token_file) if token_file else (token or "").strip(),
        trusted_proxies=parse_networks(proxies, "trusted proxy") if proxies is not None else LOOPBACK_NETWORKS,
        sites=tuple(parse_domain(site, "site") for site in listed(args, "site", environ) or ()),
        spam_domains=SPAM_DOMAINS | read_spam_list(spam_list) if spam_list else SPAM_DOMAINS,
        ignore_networks=parse_networks(listed(args, "ignore_ip", environ) or (), "address to ignore"),
        rate_limit=parse_count(setting(args, "rate_limit", environ, 60), "rate limit"),
        zone=load_zone(setting(args, "timezone", environ, "UTC")),
        keep_days=parse_count(setting(args, "keep_days", environ, 0), "--keep-days"),
        request_timeout=parse_seconds(setting(args, "request_timeout", environ, 10), "--request-timeout"),
        queue_limit=parse_count(setting(args, "queue_limit", environ, 100_000), "--queue-limit"),
        hit_path=parse_hit_path(setting(args, "hit_path", environ, DEFAULT_HIT_PATH)),
        public_report=switched_on(setting(args, "public_report", environ, "")),
        public_counters=switched_on(setting(args, "public_counters", environ, "")),
        honour_gpc=switched_on(setting(args, "honour_gpc", environ, "")),
        goals=goals_of(args, environ),
        site_ids=parse_site_ids(listed(args, "site_id", environ) or ()),
        workers=parse_count(setting(args, "workers", environ, default_workers()), "--workers"),
        node=parse_node(setting(args, "node", environ, default_node())),
        final_after=parse_final_after(setting(args, "final_after", environ, FINAL_AFTER)),
    )


def default_workers() -> int:
    """An acceptor process per core but one, which the owner of the visitors and the writer needs for
    itself (it sets the ceiling); on one core, one process does all (bench/README.md: more acceptors
    than that raised the tail latency, not the throughput)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores - 1


def switched_on(value: Any) -> bool:
    """A switch from a flag (True) or the environment (1, true, yes, on)."""
    return str(value).lower() in ("1", "true", "yes", "on")


def listed(args: argparse.Namespace, name: str, environ: Dict[str, str]) -> Optional[List[str]]:
    """A repeatable option: the flags, else the comma-separated environment variable, else None."""
    values = getattr(args, name, None)
    if values is None and environ.get(ENVIRONMENT[name]):
        values = environ[ENVIRONMENT[name]].replace(",", " ").split()
    return values


def check_database_path(path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ConfigError(f"database directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ConfigError(f"database {path} is not writable (check the directory {directory})")


def command_params(args: argparse.Namespace, names: Iterable[str]) -> Dict[str, str]:
    """The report and export flags as the query parameters /report and /export take."""
    return {name: str(getattr(args, name)) for name in names if getattr(args, name, "")}


def command_zone(args: argparse.Namespace, environ: Dict[str, str]) -> dt.tzinfo:
    return load_zone(args.tz or environ.get("PIXELD_TIMEZONE") or "UTC")


def run_report(args: argparse.Namespace, environ: Dict[str, str]) -> None:
    conn = connect(setting(args, "db", environ, DEFAULT_DB), readonly=True)
    names = ("start", "end", "range", "tz", "site", "format", "limit", "section", "group", "ascii", *FILTERS)
    try:
        request = parse_report_request(command_params(args, names), time.time(), lambda: first_day_with_data(conn), command_zone(args, environ), goals_of(args, environ))
        width = shutil.get_terminal_size((WIDTH, 24)).columns if sys.stdout.isatty() else WIDTH
        body, _ = render_report(conn, request, max(60, width))
    except sqlite3.Error as error:
        raise StorageError(f"cannot read the database: {error}") from None
    finally:
        conn.close()
    sys.stdout.write(body)


def run_export(args: argparse.Namespace, environ: Dict[str, str]) -> None:
    if args.schema:
        sys.stdout.write(feed_schema(args.schema))
        return
    if args.commit_cursor:
        commit_cursor(args.commit_cursor)
        return
    if args.cursor_file is not None or args.since is not None:
        run_feed(args, environ)
        return
    conn = connect(setting(args, "db", environ, DEFAULT_DB), readonly=True)
    try:
        params = command_params(args, ("start", "end", "range", "site", "format"))
        fmt, span, site = parse_export_request(params, time.time(), lambda: first_day_with_data(conn), command_zone(args, environ))
        for chunk in export_lines(conn, span, site, fmt):
            sys.stdout.write(chunk)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader stopped early (| head): not an error
        sys.stdout = open(os.devnull, "w")
    finally:
        conn.close()


def run_feed(args: argparse.Namespace, environ: Dict[str, str]) -> None:
    """The feed: rows to stdout, then (only once all are written) the next cursor, to FILE.next or stderr. It runs
    at the lowest CPU priority: a timer ships it every minute, and the pixel beside it keeps its latency."""
    if args.format == "csv":
        raise FeedError("the feed writes NDJSON only: leave out --format csv")
    if any(getattr(args, name, "") for name in ("range", "start", "end", "site")):
        raise FeedError("the feed ships every site and day once: --range, --start, --end and --site do not apply")
    node = parse_node(args.node) if args.node is not None else None
    pending = f"{args.cursor_file}.next" if args.cursor_file is not None else ""
    if pending:
        try:
            os.remove(pending)  # a cursor left by a run whose consumer failed must never be committed after this run
        except FileNotFoundError:
            pass
        except OSError as error:
            raise FeedError(f"cannot remove {pending}: {error_reason(error)}") from None
    cursor = parse_cursor(read_cursor(args.cursor_file) if pending else args.since)
    if hasattr(os, "nice"):
        os.nice(19)
    conn = connect(setting(args, "db", environ, DEFAULT_DB), readonly=True)
    try:
        feed = Feed(conn, cursor, int(time.time()), node)
        out = sys.stdout.buffer  # UTF-8 whatever the locale: the consumer reads JSON
        for chunk in feed.lines():
            out.write(chunk.encode("utf-8"))
        out.flush()
    except BrokenPipeError:  # the consumer stopped reading: the cursor stays where it was
        sys.stdout = open(os.devnull, "w")
        raise FeedError("the consumer stopped reading: the cursor was not advanced") from None
    except sqlite3.Error as error:
        raise StorageError(f"cannot read the database: {error}") from None
    finally:
        conn.close()
    if pending:
        write_cursor(pending, feed.next)
    else:
        print(f"next cursor: {feed.next}", file=sys.stderr)


def read_cursor(path: str) -> str:
    """The cursor a file holds; a missing file is the start."""
    try:
        with open(path, encoding="ascii") as handle:
            return handle.read(200)
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError) as error:
        raise FeedError(f"cannot read the cursor file {path}: {error_reason(error) if isinstance(error, OSError) else 'not text'}") from None


def write_cursor(path: str, cursor: FeedCursor) -> None:
    """Write a cursor whole (a temporary file, synced, renamed), so that a crash leaves the old one or the new."""
    temporary = f"{path}.tmp"
    try:
        with open(temporary, "w", encoding="ascii") as handle:
            handle.write(f"{cursor}\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        raise FeedError(f"cannot write the cursor file {path}: {error_reason(error)}") from None


def commit_cursor(path: str) -> None:
    """The consumer took every row of the last run: its next cursor becomes the cursor."""
    pending = f"{path}.next"
    try:
        with open(pending, encoding="ascii") as handle:
            parse_cursor(handle.read(200))
        os.replace(pending, path)
    except FileNotFoundError:
        raise FeedError(f"no {pending}: the last feed run did not complete, so there is nothing to commit") from None
    except (OSError, UnicodeDecodeError) as error:
        raise FeedError(f"cannot commit the cursor {pending}: {error_reason(error) if isinstance(error, OSError) else 'not text'}") from None


def run_import(args: argparse.Namespace, environ: Dict[str, str]) -> None:
    """Import with the same filters as ``serve``: its --site, --spam-list and --ignore-ip, and its environment."""
    fmt = detect_format(args.file, args.format)
    db_path = setting(args, "db", environ, DEFAULT_DB)
    check_database_path(db_path)
    geoip_path = setting(args, "geoip", environ, "")
    config = config_from(args, environ)
    require_site(fmt, config)
    conn = connect(db_path, progress=log_line)
    try:
        Importer(conn, config, open_geoip(geoip_path) if geoip_path else None, log_line).run(args.file, fmt, args.force)
    finally:
        conn.close()


def run_backup(args: argparse.Namespace, environ: Dict[str, str]) -> None:
    """SQLite's online backup: a consistent copy while the daemon keeps writing. The copy holds every
    page view, so it is created 0600 whatever the umask, and never replaces an existing file."""
    source = connect(setting(args, "db", environ, DEFAULT_DB), readonly=True)
    try:
        create_private_file(args.dest)
        try:
            target = sqlite3.connect(args.dest)
            try:
                source.backup(target, pages=1024, sleep=0.01)
            finally:
                target.close()
        except sqlite3.Error as error:
            os.remove(args.dest)
            raise StorageError(f"cannot back up to {args.dest}: {error}") from None
    finally:
        source.close()
    log_line(f"backed up to {args.dest}")


def create_private_file(path: str) -> None:
    """Create an empty file only its owner can read, failing if it exists (no window with wider permissions)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        raise ConfigError(f"{path} exists already: name a new file") from None
    except OSError as error:
        raise ConfigError(f"cannot create {path}: {error.strerror}") from None


def run_check(args: argparse.Namespace, environ: Dict[str, str]) -> int:
    """``pixeld.py check``: the dry run, offline, with the same filters as ``serve``. Exit status 0 when
    the hit would count, 1 when it would not (filtered or malformed); a bad option or setting gives 2."""
    config = config_from(args, environ)
    geoip_path = setting(args, "geoip", environ, "")
    geoip = open_geoip(geoip_path) if geoip_path else None
    params = {**parse_query(args.query), "path": args.path, "host": args.host, "referrer": args.referrer, **({"event": args.event} if args.event is not None else {})}
    hit = RawHit(int(time.time()), params, args.ua, accept_language=args.accept_language, peer=args.ip)
    outcome = read_hit(hit, config, Memo(), lambda address: lookup_country(geoip, address))
    print(explain(outcome))
    if not args.ua:
        log_line("no --ua given: a hit without a User-Agent is a bot's")
    return 0 if isinstance(outcome, Accepted) else 1


def run_share(args: argparse.Namespace, environ: Dict[str, str]) -> None:
    """``pixeld.py share``: make a link (printed once), list them, or revoke one."""
    if sum((bool(args.site), args.list, args.revoke is not None)) != 1:
        raise ConfigError("name a site (pixeld.py share example.org), or give --list or --revoke ID")
    if args.url and not re.fullmatch(r"https?://[^/?#\s]+(/[^?#\s]*)?", args.url):
        raise ConfigError(f"cannot use --url {args.url[:60]!r}: give pixeld's address, like https://stats.example.org")
    db_path = setting(args, "db", environ, DEFAULT_DB)
    check_database_path(db_path)
    conn = connect(db_path, progress=log_line)
    try:
        if args.list:
            shares = list_shares(conn)
            for share_id, site, created in shares:
                print(f"{share_id:>5}  {site}  made {dt.datetime.fromtimestamp(created, dt.timezone.utc):%Y-%m-%d %H:%M} UTC")
            if not shares:
                print("no share links")
        elif args.revoke is not None:
            if not revoke_share(conn, args.revoke):
                raise ConfigError(f"there is no share link {args.revoke}: see pixeld.py share --list")
            log_line(f"share link {args.revoke} revoked; it stops working at once")
        else:
            site = parse_domain(args.site, "site")
            share_id, secret = add_share(conn, site, int(time.time()))
            print(f"{(args.url or '').rstrip('/')}/share/{secret}")
            log_line(f"share link {share_id} reads the report of {site}, read-only; it is shown once; revoke it with pixeld.py share --revoke {share_id}")
            if not args.url:
                log_line("append the path above to pixeld's public address (or give --url https://stats.example.org)")
    except sqlite3.Error as error:
        raise StorageError(f"cannot use the database: {error}") from None
    finally:
        conn.close()


TOP_LEVELS = " ▁▂▃▄▅▆▇█"  # a bar's top in eighths of a row


def run_top(args: argparse.Namespace, environ: Dict[str, str]) -> None:
    """``pixeld.py top``: the live view, full screen, read straight from the database like ``report``."""
    import curses
    import locale

    if not 0.5 <= args.interval <= 3600:
        raise ConfigError("--interval must be between 0.5 and 3600 seconds")
    site, zone = parse_site(args.site), command_zone(args, environ)
    conn = connect(setting(args, "db", environ, DEFAULT_DB), readonly=True)
    locale.setlocale(locale.LC_ALL, "")  # curses draws UTF-8 only with the user's locale
    try:
        curses.wrapper(lambda screen: top_loop(screen, lambda now: live_report(conn, site, zone, now), args.interval))
    finally:
        conn.close()


def live_report(conn: sqlite3.Connection, site: str, zone: dt.tzinfo, now: float) -> ReportData:
    """The last 30 minutes, per minute, with visitors now: the report's ``range=realtime``."""
    return query_report(conn, Query(named_range("realtime", now, lambda: None, zone), zone, site, (), int(now)))


def top_loop(screen: Any, read: Callable[[float], ReportData], interval: float) -> None:
    """Read every ``interval`` seconds and draw; redraw at once when the terminal is resized; q quits."""
    import curses

    with contextlib.suppress(curses.error):
        curses.curs_set(0)
    screen.timeout(250)
    report: Optional[ReportData] = None
    error, read_at, now = "", -math.inf, time.time()
    while True:
        if time.monotonic() - read_at >= interval:
            read_at, now = time.monotonic(), time.time()
            try:
                report, error = read(now), ""
            except (sqlite3.Error, StorageError) as failure:
                error = f"cannot read the database: {failure}"
            draw_top(screen, top_lines(report, error, now, *screen.getmaxyx()))
        key = screen.getch()
        if key in (ord("q"), ord("Q")):
            return
        if key == curses.KEY_RESIZE or terminal_resized(screen):
            draw_top(screen, top_lines(report, error, now, *screen.getmaxyx()))


def terminal_resized(screen: Any) -> bool:
    """Whether the terminal's size changed without curses noticing (its SIGWINCH came while we were
    reading the database, say); if so, tell curses."""
    import curses

    try:
        size = os.get_terminal_size(sys.__stdout__.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    if (size.lines, size.columns) == screen.getmaxyx():
        return False
    curses.resizeterm(size.lines, size.columns)
    return True


def draw_top(screen: Any, lines: List[str]) -> None:
    """Paint the lines; a terminal too small for them shows what fits (curses refuses the last cell)."""
    import curses

    screen.erase()
    height, width = screen.getmaxyx()
    for row, line in enumerate(lines[:height]):
        with contextlib.suppress(curses.error):
            screen.addstr(row, 0, fit(line, width - 1 if row == height - 1 else width))
    screen.refresh()


def top_lines(report: Optional[ReportData], error: str, now: float, height: int, width: int) -> List[str]:
    """The live view as lines of text for a terminal of this size: a heading, visitors now, page views
    per minute as bars, then the top pages and sources side by side (one above the other when narrow).
    Every visitor-sent value passes ``terminal_text``."""
    if report is None:
        return [error or "pixeld top: reading the database…"]
    query = report.query
    clock = dt.datetime.fromtimestamp(now, query.zone).strftime("%H:%M:%S")
    title = f"pixeld top · {terminal_text(query.site) or 'all sites'} · {clock} {zone_name(query.zone)}"
    lines = [f"{title}{'q quits':>{max(1, width - text_width(title))}}"]
    lines.append(f"Visitors now {report.visitors_now or 0:,} · last 30 minutes: {report.totals.views:,} page views, {report.totals.visitors:,} visitors")
    lines += ["", *minute_bars(report.series, width, max(1, min(8, (height - 10) // 2)), query.zone), ""]
    rows = max(0, height - len(lines) - 2)
    pages, sources = (report.sections.get(name, []) for name in ("pages", "sources"))
    if width >= 60:
        half = (width - 3) // 2
        left, right = top_table("Top pages", pages, half, rows), top_table("Top sources", sources, half, rows, "(direct)")
        lines += [f"{pad(a, half)} │ {b}" for a, b in itertools.zip_longest(left, right, fillvalue="")]
    else:
        lines += top_table("Top pages", pages, width, max(1, rows // 2)) + top_table("Top sources", sources, width, max(1, rows // 2), "(direct)")
    if error:
        lines = lines[: max(1, height - 1)] + [error]
    return lines


def minute_bars(series: List[Tuple[int, int, int]], width: int, rows: int, zone: dt.tzinfo) -> List[str]:
    """Page views per minute as vertical bars, ``rows`` high, a minute per column (or several columns
    per minute when the terminal is wide); the newest minutes when it is too narrow for all."""
    cell = max(1, min(3, (width - 1) // max(1, len(series))))
    shown = series[-max(1, width // cell):]
    largest = max((views for _, views, _ in shown), default=0)
    heights = [round(8 * rows * views / largest) if largest else 0 for _, views, _ in shown]
    lines = [f"Page views per minute, last {len(shown)} minutes (most: {largest:,})"]
    for row in range(rows - 1, -1, -1):
        lines.append("".join(TOP_LEVELS[min(8, max(0, eighths - 8 * row))] * cell for eighths in heights).rstrip() or " ")
    if shown:
        first, last = (dt.datetime.fromtimestamp(start, zone).strftime("%H:%M") for start in (shown[0][0], shown[-1][0]))
        lines.append(f"{first}{last:>{max(1, cell * len(shown) - 5)}}")
    return lines


def top_table(title: str, rows: Sequence[Row], width: int, count: int, empty: str = "(none)") -> List[str]:
    label = max(1, width - 9)
    lines = [f"{pad(title, label)}{'Views':>9}"]
    lines += [f"{pad(fit(terminal_text(row.value) or empty, label - 1), label)}{row.count:>9,}" for row in rows[:count]]
    return lines if rows else lines + ["(no page views)"]


def terminal_text(value: str) -> str:
    """A visitor-sent value made safe for a terminal: no control characters, escape sequences, format
    characters (bidi overrides, zero widths) or unassigned code points; tabs and breaks become spaces."""
    if value.isascii() and value.isprintable():
        return value
    return "".join(" " if ch in "\t\n\r" else ch for ch in value if ch in "\t\n\r" or not unicodedata.category(ch).startswith("C"))


def text_width(text: str) -> int:
    """Columns a text takes in a terminal: wide East Asian characters take two, combining marks none."""
    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def pad(text: str, width: int) -> str:
    """The text cut or filled with spaces to exactly ``width`` columns."""
    text = fit(text, width)
    return text + " " * (width - text_width(text))


def fit(text: str, width: int) -> str:
    """The text cut to ``width`` columns, with … where it was cut."""
    if text_width(text) <= width:
        return text
    kept, used = [], 0
    for ch in text:
        used += text_width(ch)
        if used > width - 1:
            break
        kept.append(ch)
    return "".join(kept) + "…" if width > 0 else ""


Finding = Tuple[str, str]  # (ok, warn or fail; what was found)


def run_doctor(args: argparse.Namespace, environ: Dict[str, str]) -> int:
    """``pixeld.py doctor``: one line per check; exit status 1 when any fails."""
    db_path = setting(args, "db", environ, DEFAULT_DB)
    findings = [
        *doctor_settings(args, environ), *doctor_database(db_path), doctor_directory(db_path), doctor_token(args, environ),
        doctor_geoip(setting(args, "geoip", environ, "")), doctor_zone(setting(args, "timezone", environ, "UTC")),
    ]
    findings += doctor_consent(args, environ)
    if args.url:
        findings += doctor_daemon(args.url.rstrip("/"), token_of(args, environ))
    for level, message in findings:
        print(f"{level:<5} {message}")
    failed = sum(level == "fail" for level, _ in findings)
    print(f"{failed} failed, {sum(level == 'warn' for level, _ in findings)} warnings" if findings else "nothing to check")
    return 1 if failed else 0


def doctor_settings(args: argparse.Namespace, environ: Dict[str, str]) -> List[Finding]:
    try:
        config_from(args, environ)
    except ConfigError as error:
        return [("fail", f"settings: {error}")]
    return [("ok", "settings: every option and PIXELD_* variable can be used")]


def doctor_database(path: str) -> List[Finding]:
    if not os.path.exists(path):
        return [("warn", f"database {path}: not there yet; serve creates it at first start")]
    try:
        conn = sqlite3.connect(f"file:{_uri_path(path)}?mode=ro", uri=True)
        try:
            verdict = conn.execute("PRAGMA quick_check").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error as error:
        return [("fail", f"database {path}: cannot be read: {error}")]
    size = f"{database_size(path) / 1e6:,.1f} MB"
    if verdict != "ok":
        return [("fail", f"database {path}: quick_check found damage ({verdict[:80]}); restore a backup")]
    if version < SCHEMA_VERSION:
        return [("warn", f"database {path}: {size}, schema version {version}; the next start migrates it to {SCHEMA_VERSION}")]
    if version > SCHEMA_VERSION:
        return [("fail", f"database {path}: schema version {version} is newer than this pixeld ({SCHEMA_VERSION}): upgrade pixeld.py")]
    return [("ok", f"database {path}: {size}, quick_check ok")]


def doctor_directory(path: str) -> Finding:
    """The directory that holds the database (the unit's state directory) must be writable, and have room."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK | os.X_OK):
        return "fail", f"directory {directory}: not writable by this user; the database and its -wal file live there"
    usage = shutil.disk_usage(directory)
    free = f"{usage.free / 1e9:,.2f} GB free of {usage.total / 1e9:,.1f} GB"
    if usage.free < 50e6:
        return "fail", f"directory {directory}: {free}; page views wait in memory and are then dropped when the disk is full"
    if usage.free < 1e9 or usage.free < usage.total / 20:
        return "warn", f"directory {directory}: writable, but only {free}"
    return "ok", f"directory {directory}: writable, {free}"


def token_of(args: argparse.Namespace, environ: Dict[str, str]) -> str:
    try:
        return config_from(args, environ).token
    except ConfigError:
        return ""


def doctor_token(args: argparse.Namespace, environ: Dict[str, str]) -> Finding:
    origins = [(getattr(args, "token", None), "--token (visible to other users in ps: prefer --token-file)"),
               (getattr(args, "token_file", None), f"--token-file {getattr(args, 'token_file', '')}"),
               (environ.get("PIXELD_TOKEN"), "PIXELD_TOKEN"), (environ.get("PIXELD_TOKEN_FILE"), f"PIXELD_TOKEN_FILE {environ.get('PIXELD_TOKEN_FILE')}")]
    origin = next((where for value, where in origins if value), "")
    if not origin:
        return "warn", "token: none; the report answers only direct requests from this machine (set --token-file for a browser or a proxy)"
    try:
        config_from(args, environ)
    except ConfigError as error:
        return "fail", f"token: {error}"
    return "ok", f"token: set, from {origin}"


def doctor_geoip(path: str) -> Finding:
    if not path:
        return "ok", "GeoIP: off; countries are not looked up (--geoip FILE.mmdb turns them on)"
    try:
        open_geoip(path)
        import geoip2.database

        built = geoip2.database.Reader(path).metadata().build_epoch
    except ConfigError as error:
        return "fail", f"GeoIP: {error}"
    age = (time.time() - built) / DAY
    stamp = dt.datetime.fromtimestamp(built, dt.timezone.utc).strftime("%Y-%m-%d")
    if age > 60:
        return "warn", f"GeoIP: {path} was built {stamp}, {age:.0f} days ago; geoipupdate has probably stopped"
    return "ok", f"GeoIP: {path}, built {stamp}"


def doctor_zone(name: str) -> Finding:
    try:
        return "ok", f"time zone: {zone_name(load_zone(name))}"
    except ConfigError as error:
        return "fail", f"time zone: {error}"


MAX_RETENTION_DAYS = 760  # 25 months of the shortest kind (CNIL: raw data kept 25 months at most)


def doctor_consent(args: argparse.Namespace, environ: Dict[str, str]) -> List[Finding]:
    """CNIL's conditions for audience measurement without consent, one line each, as far as pixeld
    can see them from its settings and its code. Informing visitors stays the operator's duty."""
    try:
        config = config_from(args, environ)
    except ConfigError:
        return [("fail", "consent exemption: cannot be checked until the settings can be used (see above)")]
    visitors = Generation(0, slots=2)
    separate = visitors.key("a.example", "192.0.2.1", "UA") != visitors.key("b.example", "192.0.2.1", "UA")
    days = config.keep_days
    return [
        ("ok", "consent, own measurement only: the page views stay in your database on your server; pixeld sends them to nobody"),
        ("ok", "consent, no cross-site identifier: the visitor key includes the site, its salt changes daily and is never stored")
        if separate else ("fail", "consent, no cross-site identifier: the same visitor on two sites gets the same key"),
        ("ok", "consent, geolocation no finer than the city: pixeld keeps the country only" + ("" if config.geoip_path else " (GeoIP is off)")),
        ("warn", "consent, raw data at most 25 months: page views are kept forever; set --keep-days 760 or less (the counts stay)") if not days
        else ("warn", f"consent, raw data at most 25 months: --keep-days {days} is longer; use {MAX_RETENTION_DAYS} or less") if days > MAX_RETENTION_DAYS
        else ("ok", f"consent, raw data at most 25 months: page views are deleted after {days} days; only the per-day counts stay"),
        ("ok", "consent, visitors can object: the snippet honours #pixeld-optout and pixeld('optout'); link it from your privacy page"
         + ("; Sec-GPC: 1 is honoured too" if config.honour_gpc else "; --honour-gpc would honour Sec-GPC: 1 too")),
    ]


def doctor_daemon(url: str, token: str) -> List[Finding]:
    """Ask a running daemon: /healthz, then /whoami with the token, which shows what it concludes about us."""
    import urllib.error
    import urllib.request

    def get(path: str, method: str = "GET", data: Optional[bytes] = None) -> Tuple[int, str]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if data:  # a sample hit, as a reader's browser would send it
            headers.update({"Content-Type": "text/plain", "User-Agent": DOCTOR_BROWSER})
        request = urllib.request.Request(url + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, answer.read(65536).decode("utf-8", "replace")
        except urllib.error.HTTPError as error:
            return error.code, error.read(4096).decode("utf-8", "replace")
        except (OSError, ValueError) as error:
            return 0, error_reason(error)

    status, body = get("/healthz")
    if status != 200:
        return [("fail", f"{url}/healthz: {status or 'no answer'}: {body.strip()[:120]}")]
    findings = [("ok", f"{url}/healthz: {body.strip()}")]
    status, body = get("/whoami")
    if status != 200:
        return findings + [("warn", f"{url}/whoami: {status or 'no answer'}: {body.strip()[:120]}")]
    lines = body.strip().splitlines()
    warned = any(line.startswith("warning:") for line in lines)
    return findings + [("warn" if warned else "ok", f"{url}/whoami: " + "; ".join(lines)), doctor_trackers(get)]


DOCTOR_BROWSER = "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0"


def doctor_trackers(get: Callable[..., Tuple[int, str]]) -> Finding:
    """Other tools' tags pointed at pixeld need /count, /api/event, /api/send and the script addresses to get
    through the proxy too; a dry run of a Plausible page view says what such a hit would be."""
    expected = {**{(path, "OPTIONS"): 204 for path in TRACKER_PATHS}, ("/js/script.js", "GET"): 200, ("/script.js", "GET"): 200}
    answers = {(path, method): get(path, method)[0] for path, method in expected}
    broken = [f"{method} {path} answers {status or 'nothing'}" for (path, method), status in answers.items() if status != expected[path, method]]
    if broken:
        return "warn", "other trackers: " + "; ".join(broken) + " (pages that keep GoatCounter's, Plausible's or Umami's tag need them)"
    sample = json.dumps({"n": "pageview", "u": "https://example.org/doctor", "d": "example.org"}).encode()
    _, verdict = get("/api/event?dry_run=1", "POST", sample)
    listed = "/count, /api/event, /api/send, /js/script.js and /script.js"
    return "ok", f"other trackers: {listed} answer; a Plausible page view from Firefox: {verdict.strip()[:100]}"


def add_digest_commands(commands: Any) -> None:
    """The commands that bring the numbers to the operator: notes on the series, the digest, alerts."""
    note_cmd = commands.add_parser(
        "note", help="note something on a day of the series",
        description="Note what happened on a day (shown on the series, in the digest, and exported); list or delete notes.",
    )
    note_cmd.add_argument("date", nargs="?", help="the day, like 2026-12-01")
    note_cmd.add_argument("text", nargs="?", help="the note, like 'Posted on Hacker News'")
    note_cmd.add_argument("--site", default="", help="the site it concerns (default: every site)")
    action = note_cmd.add_mutually_exclusive_group()
    action.add_argument("--list", action="store_true", help="list the notes (with --site: that site's and those for every site)")
    action.add_argument("--delete", metavar="ID", type=int, help="delete the note with this id (see --list)")
    add_db_option(note_cmd, "created if missing")

    digest_cmd = commands.add_parser(
        "digest", help="write the digest e-mail: the numbers of the last week or month",
        description="Write a short e-mail with the last complete period's numbers, and send it or print it.",
    )
    digest_cmd.add_argument("--range", default="7d", choices=DIGEST_RANGES, help="the 7 or 30 days before today, or the last calendar month (default 7d)")
    add_goal_option(digest_cmd)
    alert_cmd = commands.add_parser(
        "alert", help="say when the last hour's page views spiked or dropped",
        description="Compare the last complete hour's page views with that hour's average over the 7 days before. Exit status 1 when an alert is raised.",
    )
    alert_cmd.add_argument("--spike", metavar="RATIO", type=float, default=3.0, help="alert at this many times the usual page views or more (default 3)")
    alert_cmd.add_argument("--drop", metavar="RATIO", type=float, default=0.3, help="alert at this fraction of the usual page views or less (default 0.3)")
    alert_cmd.add_argument("--min-views", metavar="N", type=int, default=10, help="a spike needs N page views, a drop N usual page views (default 10)")
    add_env_file_option(note_cmd)
    for command, note in ((digest_cmd, "read-only"), (alert_cmd, "it remembers the alerts raised")):
        add_db_option(command, note)
        add_env_file_option(command)
        command.add_argument("--site", default="", help="one site (hostname) instead of all")
        command.add_argument("--tz", default="", help="time zone for days and hours, like Europe/Berlin (default $PIXELD_TIMEZONE, else UTC)")
        command.add_argument("--to", metavar="ADDRESS", action="append", help="send to this address (repeatable); without --smtp or --sendmail it is printed")
        command.add_argument("--from", dest="sender", metavar="ADDRESS", help="the sender's address (default pixeld@ this host's name)")
        command.add_argument("--smtp", metavar="HOST:PORT", help="send through this mail server")
        security = command.add_mutually_exclusive_group()
        security.add_argument("--starttls", action="store_true", help="switch to TLS with STARTTLS (port 587)")
        security.add_argument("--tls", action="store_true", help="speak TLS from the start (port 465)")
        command.add_argument("--smtp-user", metavar="USER", help="log in as this user; the password comes from a file or a systemd credential")
        password = command.add_mutually_exclusive_group()
        password.add_argument("--smtp-password-file", metavar="FILE", help="read the mail server's password from this file")
        password.add_argument("--smtp-credential", metavar="NAME", help="read it from the systemd credential NAME ($CREDENTIALS_DIRECTORY/NAME)")
        command.add_argument("--sendmail", metavar="PROGRAM", nargs="?", const=SENDMAIL, help=f"pipe the message to sendmail -t instead (default {SENDMAIL})")


def digest_commands(clock: Callable[[], float]) -> Dict[str, Callable[[argparse.Namespace, Dict[str, str]], Optional[int]]]:
    return {"note": run_note, "digest": lambda args, environ: run_digest(args, environ, clock), "alert": lambda args, environ: run_alert(args, environ, clock)}


def mail_settings(args: argparse.Namespace, environ: Dict[str, str]) -> Optional[Mail]:
    """Where to send, from the mail options; None to print the message instead."""
    if not args.smtp and not args.sendmail:
        if args.smtp_user or args.starttls or args.tls:
            raise ConfigError("--smtp-user, --starttls and --tls need --smtp HOST:PORT")
        return None
    if args.smtp and args.sendmail:
        raise ConfigError("give either --smtp or --sendmail, not both")
    if not args.to:
        raise ConfigError("give the recipient with --to ADDRESS")
    sender = mail_sender(args)
    for address in (*args.to, sender):
        if not re.fullmatch(r"[^@\s<>,;\"]+@[^@\s<>,;\"]+", address):
            raise ConfigError(f"cannot use the address {address[:60]!r}: use one like you@example.org")
    if args.sendmail:
        return Mail(tuple(args.to), sender, sendmail=args.sendmail)
    host, port = parse_listen(args.smtp)
    if args.smtp.strip().startswith(":"):
        raise ConfigError(f"cannot parse --smtp {args.smtp[:60]!r}: use HOST:PORT, like mail.example.org:587")
    security = "starttls" if args.starttls else "tls" if args.tls else ""
    if args.smtp_user and not security and not is_loopback_name(host):
        raise ConfigError("--smtp-user needs --starttls or --tls: the password would cross the network in clear")
    password = smtp_password(args, environ) if args.smtp_user else ""
    return Mail(tuple(args.to), sender, (host, port), security, args.smtp_user or "", password)


def mail_sender(args: argparse.Namespace) -> str:
    return args.sender or f"pixeld@{socket.gethostname()}"


def smtp_password(args: argparse.Namespace, environ: Dict[str, str]) -> str:
    """The mail server's password, from a file or a systemd credential: never from the command line, where ps shows it."""
    if args.smtp_credential:
        directory = environ.get("CREDENTIALS_DIRECTORY", "")
        if not directory:
            raise ConfigError("--smtp-credential needs $CREDENTIALS_DIRECTORY: run it from a unit with LoadCredential=")
        path = os.path.join(directory, args.smtp_credential)
    elif args.smtp_password_file:
        path = args.smtp_password_file
    else:
        raise ConfigError("--smtp-user needs --smtp-password-file FILE or --smtp-credential NAME")
    try:
        with open(path, encoding="utf-8") as handle:
            password = handle.read().strip("\r\n")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read the mail password from {path}: {error_reason(error)}") from None
    if not password:
        raise ConfigError(f"the mail password file {path} is empty")
    return password


def is_loopback_name(host: str) -> bool:
    address = parse_ip(host)
    return host == "localhost" or (address is not None and address.is_loopback)


def run_note(args: argparse.Namespace, environ: Dict[str, str]) -> None:
    """``pixeld.py note``: add a note to a day, list the notes, or delete one."""
    db_path = setting(args, "db", environ, DEFAULT_DB)
    site = parse_domain(args.site, "site") if args.site else ""
    if args.list:
        conn = connect(db_path, readonly=True)
        try:
            for note in annotations_in(conn, Range(EARLIEST, LATEST), dt.timezone.utc, site):
                print(f"{note.id:>5}  {note.date}  {note.site or '(every site)'}  {note.text}")
        finally:
            conn.close()
        return
    date, text = note_date(args.date or ""), clean_text(args.text or "", MAX_NOTE)
    if args.delete is None and (date is None or not text):
        raise ConfigError("give a day and a note (note 2026-12-01 'Posted on Hacker News'), or --list, or --delete ID")
    check_database_path(db_path)
    conn = connect(db_path, progress=log_line)
    try:
        if args.delete is not None:
            if not delete_annotation(conn, args.delete):
                raise ConfigError(f"there is no note {args.delete} (see note --list)")
            print(f"deleted note {args.delete}")
        else:
            note_id, added = add_annotation(conn, date or "", site, text)
            print(f"note {note_id}: {date} {site or '(every site)'}: {text}" + ("" if added else " (noted before)"))
    finally:
        conn.close()


def run_digest(args: argparse.Namespace, environ: Dict[str, str], clock: Callable[[], float]) -> None:
    """``pixeld.py digest``: the last period's numbers as an e-mail, sent once or printed."""
    mail = mail_settings(args, environ)
    zone, site = command_zone(args, environ), parse_domain(args.site, "site") if args.site else ""
    conn = connect(setting(args, "db", environ, DEFAULT_DB), readonly=True)
    try:
        digest = build_digest(conn, Query(digest_range(args.range, clock(), zone), zone, site, goals=goals_of(args, environ)))
    except sqlite3.Error as error:
        raise StorageError(f"cannot read the database: {error}") from None
    finally:
        conn.close()
    parts = (digest_subject(digest), digest_text(digest), digest_html(digest))
    if mail is None:
        printed = mail_message(*parts, Mail(tuple(args.to or ()), mail_sender(args)), cte="8bit")
        sys.stdout.write(printed.as_bytes(policy=email.policy.default.clone(utf8=True)).decode())
        return
    send_mail(mail_message(*parts, mail), mail)
    log_line(f"sent the digest to {', '.join(mail.to)}")


def run_alert(args: argparse.Namespace, environ: Dict[str, str], clock: Callable[[], float]) -> int:
    """``pixeld.py alert``: one line per site whose last hour spiked or dropped, printed or sent; exit
    status 1 when one was raised. Each is remembered before it is raised, and forgotten again when it
    cannot be sent, so at most one per site, direction and day goes out."""
    if args.spike <= 1 or not 0 <= args.drop < 1 or args.min_views < 1:
        raise ConfigError("--spike must be above 1, --drop from 0 to below 1, and --min-views at least 1")
    mail = mail_settings(args, environ)
    zone, site = command_zone(args, environ), parse_domain(args.site, "site") if args.site else ""
    db_path = setting(args, "db", environ, DEFAULT_DB)
    check_database_path(db_path)
    conn = connect(db_path, progress=log_line)
    try:
        found = find_alerts(conn, clock(), zone, args.spike, args.drop, args.min_views, site)
        claimed = [alert for alert in found if claim_alert(conn, alert.site, alert.direction, alert.date, alert.hour, alert.views, alert.usual)]
        raised = [(alert, alert.line(zone, top_source(conn, alert, zone))) for alert in claimed]
        if raised and mail is not None:
            try:
                send_mail(mail_message(f"pixeld alert: {raised[0][1][:120]}", "\n".join(line for _, line in raised) + "\n", "", mail), mail)
            except SendFailed:
                for alert, _ in raised:
                    release_alert(conn, alert.site, alert.direction, alert.date)
                raise
    except sqlite3.Error as error:
        raise StorageError(f"cannot use the database: {error}") from None
    finally:
        conn.close()
    if mail is None:
        for _, line in raised:
            print(line)
    return 1 if raised else 0


def create_app(environ: Optional[Dict[str, str]] = None) -> App:
    """The WSGI app for another server, configured from ``PIXELD_*`` variables like ``serve``:
    ``gunicorn --workers 1 --threads 8 'pixeld:create_app()'``. One process only: visitors and
    the writer live in it. Its page views are flushed when the process exits."""
    environ = dict(os.environ) if environ is None else environ
    try:
        config = config_from(build_parser().parse_args(["serve"]), environ)
        check_database_path(config.db_path)
        app = App(config, log=log_line)
    except (ConfigError, StorageError) as error:
        raise SystemExit(f"pixeld: {error}") from None
    atexit.register(app.close)
    log_line(f"version {__version__} as a WSGI app, database {os.path.abspath(config.db_path)}")
    return app


def log_line(message: str) -> None:
    print(f"pixeld: {message}", file=sys.stderr, flush=True)


def main(argv: Optional[List[str]] = None, environ: Optional[Dict[str, str]] = None, clock: Callable[[], float] = time.time) -> int:
    argv = sys.argv[1:] if argv is None else argv
    environ = dict(os.environ) if environ is None else environ
    if argv[:1] == [ACCEPTOR_COMMAND] and len(argv) == 2 and argv[1].isdigit():
        return run_acceptor(int(argv[1]), log_line)
    args = build_parser().parse_args(argv or ["serve"])
    commands = {"report": run_report, "export": run_export, "import": run_import, "backup": run_backup, "check": run_check, "doctor": run_doctor}
    commands.update(share=run_share, top=run_top)
    commands.update(digest_commands(clock))
    try:
        environ = with_env_file(args, environ)
        if args.command in commands:
            return commands[args.command](args, environ) or 0
        elif args.command == "snippet":
            sys.stdout.write(snippet(args.url, hit_path=parse_hit_path(setting(args, "hit_path", environ, DEFAULT_HIT_PATH))))
        else:
            config = config_from(args, environ)
            check_database_path(config.db_path)
            serve(config, log_line)
    except (ConfigError, StorageError, ReportError, ImportFailed, SendFailed, FeedError) as error:
        print(f"pixeld: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
