#!/usr/bin/env python3
"""pixeld: privacy-first web analytics in one file.

A pixel endpoint stores page views without cookies or anything that identifies a person;
``/report`` reads them back as plain text or JSON. Standard library only (Python 3.9+);
``geoip2`` is used for countries when installed and configured.

The file reads in the order data flows, one banner per section: configuration; request
parsing and normalisation; the user-agent reducer; hits (one pipeline for live requests and
imports); privacy (salts, visitor keys, visits); storage (the dimension registry, schema and
migrations, batched inserts and counts); the writer; queries; report parameters and rendering;
export and import; the snippet; the WSGI app; the server; the service (start-up, signals,
sd_notify, watchdog); the command line.
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
import errno
import functools
import gc
import hashlib
import heapq
import hmac
import html
import io
import ipaddress
import itertools
import json
import math
import operator
import os
import queue
import re
import resource
import secrets
import selectors
import shutil
import signal
import socket
import sqlite3
import sys
import threading
import time
import unicodedata
import zoneinfo
from collections import Counter, deque
from functools import lru_cache
from typing import Any, Callable, Deque, Dict, FrozenSet, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Set, Tuple, Union
from urllib.parse import SplitResult, unquote, urlencode, urlsplit
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


def parse_seconds(value: Any, what: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigError(f"cannot parse {what} {value!r}: use seconds, like 10") from None
    if not 0.1 <= seconds <= 3600:
        raise ConfigError(f"{what} must be between 0.1 and 3600 seconds")
    return seconds


def parse_hit_path(value: str) -> str:
    """Another path for the hit endpoint, like ``/hit``: one or more plain segments."""
    if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", value) or value in ("/report", "/export", "/healthz", "/metrics", "/whoami"):
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
MAX_EVENT = 64
MAX_CAMPAIGN = 100
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2028\u2029\u2066-\u2069\ufeff]+")  # and bidi overrides
_HOSTNAME = re.compile(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?|\[[0-9a-f:.]+\]")
_LANGUAGE = re.compile(r"[a-z]{2,3}")
_SCREEN = re.compile(r"\s*(\d{1,6})\s*[,xX]\s*(\d{1,6})\s*")
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
    """``W,H`` (or ``WxH``) as ``"WxH"`` with both in 1..100,000; empty when unknown."""
    match = _SCREEN.fullmatch(value)
    if not match:
        return ""
    width, height = int(match.group(1)), int(match.group(2))
    if not (0 < width <= MAX_SCREEN and 0 < height <= MAX_SCREEN):
        return ""
    return f"{width}x{height}"


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

    def headline(self) -> Dict[str, Optional[float]]:
        """The headline numbers, by their JSON names."""
        return {
            "visitors": self.visitors, "visits": self.visits, "pageviews": self.views, "pages_per_visit": self.pages_per_visit,
            "bounce_rate": self.bounce_rate, "visit_duration": self.visit_duration, "time_on_page": self.time_on_page, "scroll_depth": self.scroll_depth,
        }


def percent(count: int, total: int) -> float:
    return round(100.0 * count / total, 1) if total else 0.0


def _named_metrics(cls: type) -> type:
    """Give a list that holds the metrics in ``Metrics`` order a read-write property per metric."""
    for index, name in enumerate(Metrics._fields):
        setattr(cls, name, property(operator.itemgetter(index), functools.partial(_set_item, index)))
    return cls


def _set_item(index: int, items: List[int], value: int) -> None:
    items[index] = value


@_named_metrics
class Totals(list):
    """Running sums of the metrics while counting, read and written by name (``totals.views += 1``).
    A list underneath, in ``Metrics`` order, because SQL rows and sums come in that order."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__([0] * len(Metrics._fields))

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


Row = Union[ViewsRow, VisitorsRow, EngagementRow, EntryRow, EventRow]


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


class Field(NamedTuple):
    """A value a page view carries, and how an imported (or pixel-sent) value of it is made safe."""

    name: str  # the PageView field, and its column in exports
    clean: Optional[Callable[[str], str]] = None  # None: derived by the hit pipeline (the referrer, a source from its referrer)
    param: str = ""  # the pixel's query parameter that carries it as it is
    default: str = ""  # its value when nothing says otherwise


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


DIMENSIONS: Tuple[Dimension, ...] = (
    Dimension("pages", 1, "path", (Field("path", normalise_path, "path"),), (
        Section("pages", "Pages", filter="path", match="prefix", row=EngagementRow), Section("entry_pages", "Entry pages", row=EntryRow),
    )),
    Dimension("titles", 0, "title", (Field("title", normalise_title, "title"),), in_events=False),
    Dimension("sources", 9, "source", (Field("channel", default="direct"), Field("source")), (
        Section("sources", "Sources", "(direct)", "source", part="source", row=VisitorsRow),
        Section("channels", "Channels", filter="channel", part="channel"),
    )),
    Dimension("referrers", 2, "referrer", (Field("referrer"),), (Section("referrers", "Referrers", "(direct)", "referrer", "prefix"),)),
    Dimension("campaigns", 7, "campaign", (Field("campaign", clean_campaign),), (
        Section("campaigns", "Campaigns", filter="campaign", nothing="(no campaigns)", lists_empty=False),
    )),
    Dimension("campaign_details", 11, "campaign_detail", (
        Field("campaign_content", clean_campaign_part, "utm_content"), Field("campaign_term", clean_campaign_part, "utm_term"),
    ), (
        Section("campaign_content", "Campaign content", filter="content", part="campaign_content", nothing="(no campaign content)", lists_empty=False),
        Section("campaign_terms", "Campaign terms", filter="term", part="campaign_term", nothing="(no campaign terms)", lists_empty=False),
    )),
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
)
EVENT_NAMES = Dimension("events", 8, "name", (Field("event", clean_event),), (  # the events table only
    Section("events", "Events", filter="event", row=EventRow, nothing="(no events)"),
))
AGENT_FIELDS = next(tuple(field.name for field in dim.fields) for dim in DIMENSIONS if dim.column == "agent")  # the agents table's columns
FIELD_SEPARATOR = "\t"  # a text dimension of several fields stores them in one string: "search\tGoogle"
COUNTED = tuple(dim for dim in DIMENSIONS if dim.code)
EVENT_DIMENSIONS = tuple(dim for dim in DIMENSIONS if dim.in_events)
DIMENSION_NAMED = {dim.name: dim for dim in DIMENSIONS + (EVENT_NAMES,)}
SECTIONS: Dict[str, Tuple[Dimension, Section]] = {section.name: (dim, section) for dim in DIMENSIONS + (EVENT_NAMES,) for section in dim.sections}
FILTERS: Dict[str, Tuple[Dimension, Section]] = {section.filter: (dim, section) for dim, section in SECTIONS.values() if section.filter}
VIEW_FIELDS = tuple(field for dim in DIMENSIONS for field in dim.fields)
FIELD_CLEANERS: Dict[str, Callable[[str], str]] = {field.name: field.clean for field in VIEW_FIELDS if field.clean}  # an imported value's cleaner
PARAM_FIELDS = tuple(field for field in VIEW_FIELDS if field.param)  # the fields a pixel request sends as they are
RAW_NEEDS = {  # the metrics each dimension's sections need, in Metrics order
    dim.name: tuple(name for name in Metrics._fields if any(name in section.row.METRICS for section in dim.sections)) for dim in DIMENSIONS + (EVENT_NAMES,)
}


class PageView(collections.namedtuple(
    "PageView", ("time", "site", *(field.name for field in VIEW_FIELDS), "first_today"), defaults=(*(field.default for field in VIEW_FIELDS), False),
)):
    """One page view, normalised: exactly what is stored, and nothing else. Its fields come from
    ``DIMENSIONS``; ``first_today`` marks the visitor's first page view of this UTC day (see Privacy)."""

    __slots__ = ()

    def counted(self, first_today: bool) -> "PageView":
        """This page view with its first-of-the-day flag (on the hot path: faster than ``_replace``)."""
        return PageView._make(self[:-1] + (first_today,))


class Event(NamedTuple):
    """A custom event (``pixeld('event', 'signup')``), with the page view context it happened in.
    ``view.first_today`` means: the visitor's first event of this name today."""

    name: str
    view: PageView


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


def campaign_referrer(campaign: str) -> str:
    """A campaign's source stands in the referrer's place: ``newsletter (campaign)``."""
    source = campaign.split(" / ", 1)[0]
    return f"{source} (campaign)" if source else ""


# Referrer sources: "name|channel|hosts". Generated by bench/sources_table.py from Matomo's
# searchengine-and-social-list (SearchEngines.yml, Socials.yml, AIAssistants.yml; CC0 1.0, earlier
# releases Unlicense): names and hosts only. Webmail services and Android app ids are added by hand.
# "google.{}" stands for every country domain (google.de, google.co.uk); subdomains match their host.
SOURCE_TABLE = """
1.cz|search|1.cz
118 700|search|118700.se foretag.118700.se webben.118700.se
123people|search|123people.com 123people.{}
360search|search|so.360.cn m.so.com
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
AOL|search|search.aol.com search.aol.it aolsearch.aol.com aolrecherche.aol.fr aolrecherches.aol.fr aolimages.aol.fr aim.search.aol.com recherche.aol.fr find.web.aol.com recherche.aol.ca aolsearch.aol.co.uk search.aol.co.uk sucheaol.aol.de suche.aol.de o2suche.aol.de suche.aolsvc.de aolbusqueda.aol.com.mx alicesuche.aol.de alicesuchet.aol.de suchet2.aol.de search.hp.my.aol.com.au search.hp.my.aol.de search.hp.my.aol.it search-intl.netscape.com de.aolsearch.com
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
Baidu|search|baidu.com www1.baidu.com m.baidu.com baidu.co.th zhidao.baidu.com tieba.baidu.com news.baidu.com
Baidu AI|ai|yiyan.baidu.com ai.baidu.com
Bebo|social|bebo.com
Biglobe|search|cgi.search.biglobe.ne.jp images.search.biglobe.ne.jp
bilibili|social|bilibili.com
Bing|search|bing.com {}.bing.com global.bing.com msnbc.msn.com dizionario.it.msn.com enciclopedia.it.msn.com cc.bingj.com com.microsoft.bing
BlackPlanet|social|blackplanet.com
blekko|search|blekko.com
Blogdigger|search|blogdigger.com
Blogpulse|search|blogpulse.com
Bluesky|social|bsky.app skyfeed.app xyz.blueskyweb.app
Bluewin|search|search.bluewin.ch
Brave Search|search|search.brave.com
Buzznet|social|buzznet.com
Canoe.ca|search|web.canoe.ca
Centrum|search|search.centrum.cz morfeo.centrum.cz
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
Deepseek|ai|chat.deepseek.com
Delfi EE|search|otsing.delfi.ee
Delfi lv|search|smart.delfi.lv
dir.com|search|fr.dir.com
DisconnectSearch|search|search.disconnect.me
Discord|social|discord.com discord.gg discordapp.com com.discord
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
GMX|email|gmx.net gmx.de gmx.com gmx.at gmx.ch navigator.gmx.net
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
Ilse NL|search|ilse.nl
iMesh|search|search.imesh.com
Inbox|search|www2.inbox.com
info.com|search|info.com
InfoSpace|search|infospace.com search.kiwee.com searches.vi-view.com search.webssearches.com search.fbdownloader.com searches3.globososo.com wsdsold.infospace.com search.avast.com isearch.babylon.com start.facemoods.com start.funmoods.com search.magentic.com search.searchcompletion.com isearch.glarysoft.com search.chatzum.com home.speedbit.com search.b1.org search.handycafe.com search.v9.com search.iminent.com utorrent.inspsearch.com govome.inspsearch.com
Instagram|social|instagram.com l.instagram.com com.instagram.android
Interia|search|google.interia.pl
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
Needtofind|search|ko.search.need2find.com
Neti|search|neti.ee
Netlog|social|netlog.com
Niconico|social|nicovideo.jp
Nifty|search|search.nifty.com search.azby.fmworld.net videosearch.nifty.com
Nigma|search|nigma.ru
NotebookLM|ai|notebooklm.google.com
OceanHero|search|oceanhero.today
Odnoklassniki|social|odnoklassniki.ru
Onet.pl|search|szukaj.onet.pl
Online.no|search|online.no
Orange|search|busca.orange.es lemoteur.ke.voila.fr lemoteur.orange.fr
Orkut|social|orkut.com
Outlook.com|email|outlook.live.com outlook.office.com outlook.office365.com mail.live.com com.microsoft.office.outlook
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
Poisk.Ru|search|poisk.ru
Presearch|search|presearch.com
PrivacyWall|search|privacywall.org
Proton Mail|email|mail.proton.me mail.protonmail.com ch.protonmail.android
qip.ru|search|search.qip.ru
Qualigo|search|qualigo.at qualigo.ch qualigo.de qualigo.nl
Quendu|search|quendu.com
Qwant|search|qwant.com lite.qwant.com
Qwen|ai|chat.qwen.ai
Rakuten|search|websearch.rakuten.co.jp
Rambler|search|nova.rambler.ru
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
Sharelook|search|sharelook.fr
Skynet|search|skynet.be
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
uol.com.br|search|busca.uol.com.br
URL.ORGanzier|search|url.org
V2EX|social|v2ex.com
Viadeo|social|viadeo.com
Vimeo|social|vimeo.com
Vinden|search|vinden.nl
Vindex|search|vindex.nl search.vindex.nl
Virgilio|search|ricerca.virgilio.it ricercaimmagini.virgilio.it ricercavideo.virgilio.it ricercanews.virgilio.it mobile.virgilio.it
VK|social|vk.com vkontakte.ru
vkrugudruzei.ru|social|vkrugudruzei.ru
Voila|search|search.ke.voila.fr
Volny|search|web.volny.cz
Vuhuv|search|vuhuv.com
Walhello|search|walhello.info walhello.com walhello.de walhello.nl
WAYN|social|wayn.com
Web.de|search|suche.web.de m.suche.web.de
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
Yahoo!|search|search.yahoo.com malaysia.search.yahoo.com {}.search.yahoo.com cade.yahoo.com espanol.search.yahoo.com qc.search.yahoo.com one.cn.yahoo.com r.search.yahoo.com search.offerbox.com ys.mirostart.com images.search.yahoo.com {}.images.yahoo.com cade.images.yahoo.com espanol.images.yahoo.com qc.images.yahoo.com
Yahoo! Japan|search|search.yahoo.co.jp jp.hao123.com home.kingsoft.jp jwsearch.jword.jp image.search.yahoo.co.jp video.search.yahoo.co.jp
Yahoo! Mail|email|mail.yahoo.com mail.yahoo.co.jp com.yahoo.mobile.client.android.mail
Yam|search|search.yam.com
Yandex|search|yandex.ru yandex.com yandex.{} clck.yandex.{} m.yandex.{} yabs.yandex.{} images.yandex.ru images.yandex.com images.yandex.{}
Yandex Mail|email|mail.yandex.ru mail.yandex.com ru.yandex.mail
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
Zoho Mail|email|mail.zoho.com mail.zoho.eu
Zoohoo|search|zoohoo.cz
Zoznam|search|zoznam.sk
Zxuso|search|zxuso.com
묻지마 검색|search|kwzf.net
"""  # end of SOURCE_TABLE
CHANNELS = ("search", "social", "email", "ai", "referral", "campaign", "direct")
_COUNTRY_DOMAIN = re.compile(r"(?:(?:com|co|net|org|gov|edu|ac|or|ne|go|gob|nic)\.)?[a-z]{2}|com|net|org|info|biz")


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
    """(source, channel) of a normalised referrer (``host/path``, or ``name (campaign)``).

    A host matches a known source when it is one of its hosts or a subdomain of one
    (``old.reddit.com``), or its name on a country domain (``google.co.uk``). Look-alikes such as
    ``google.com.example.net`` are ordinary sites: their source is their host."""
    if not referrer:
        return "", "direct"
    if referrer.endswith(" (campaign)"):
        return referrer[: -len(" (campaign)")], "campaign"
    host = referrer.split("/", 1)[0]
    labels = host.split(".")
    for i in range(len(labels)):
        known = SOURCE_HOSTS.get(".".join(labels[i:]))
        if known is None and i + 1 < len(labels) and _COUNTRY_DOMAIN.fullmatch(".".join(labels[i + 1 :])):
            known = SOURCE_COUNTRY_HOSTS.get(labels[i])
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
    r"nutch|heritrix|httrack|zgrab|masscan|nmap|nikto|sqlmap|postman|insomnia|http://|https://|www\.|\.(?:com|net|org)\b(?<=[a-z0-9]\.[a-z]{3})|\.(?:io|co)\b(?<=[a-z0-9]\.[a-z]{2})|"  # a domain name (".NET CLR" is none)
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
_PLATFORM = re.compile(r"^(?:mozilla|opera)/|\bios\b|ucweb|android|iphone|ipad|ipod|windows|macintosh|mac os|linux|cros\b|symbian|blackberry|bb10|midp|j2me|"
                       r"nokia|kaios|tizen|webos|playstation|xbox|nintendo|roku|smart-?tv|cfnetwork|dalvik|\[fban|instagram")

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
        ("iOS", r"iPhone|iPad|iPod|\biOS\b|CPU OS \d|CriOS/|EdgiOS/|FxiOS/|OPiOS/|FBIOS|FBSN/iOS"),
        ("Android", r"Android|\bAdr\b|Silk/|\bKF[A-Z]{2,5} Build|OculusBrowser|^JUC ?\(|FB4A|FBAN/EMA|Dalvik/"),
        ("macOS", r"CFNetwork/.*Darwin/.*(?:x86_64|Mac|arm64e?-apple)"),  # an app on a Mac: its Darwin names the machine
        ("iOS", r"CFNetwork/.*Darwin/"),  # Darwin versions are shared by iOS and macOS; apps that say no more are on phones
        ("ChromeOS", r"\bCrOS\b"),
        ("Windows", r"Windows|Win(?:NT|95|98|32|64)\b"),
        ("macOS", r"Mac OS X|Macintosh|Mac_PowerPC|Darwin/"),
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
# Huawei MatePad/MediaPad, Xiaomi and Redmi Pad, OnePlus OPD, Pixel Tablet); else Android without "Mobile".
_TABLET = re.compile(
    r"ipad|tablet|kindle|silk/|playbook|nexus (?:7|9|10)\b|sm-[tpx]\d|gt-p\d|sch-i800|tab\b(?<=\btab)|lenovo tb|tb(?<=\btb)-?[0-9x]|"
    r"matepad|mediapad|pad\b(?<=\bpad)|opd(?<=\bopd)\d|pixel (?:c|tablet)\b|kf(?<=\bkf)[a-z]{2,4}\b"
)
_PHONE = re.compile(r"mobi|iphone|ipod|phone|opera mini|blackberry|bb10|symbian|nokia|kaios|fennec")
# Devices that are neither computers, phones nor tablets: TVs and their sticks and boxes, consoles,
# cars, VR headsets and watches. They are "other".
_TV = re.compile(
    r"smarttv|smart-tv|smart tv|hbbtv|appletv|apple tv|googletv|google tv|android tv|tv\b(?<=\btv)|crkey|roku|bravia|netcast|web0s|webos.tv|"
    r"aft(?<=\baft)[a-z]{1,4}\b|playstation|xbox|nintendo|oculus|quest \d|qtcarbrowser|tesla|android automotive|carplay|watch os|wearos|watch\b(?<=\bwatch)"
)


def classify_user_agent(ua: str) -> UserAgent:
    """Reduce a User-Agent to (browser, major version, OS, device class); the string itself is not kept.

    ``device`` is ``desktop``, ``phone``, ``tablet``, ``bot`` (crawlers, previews, monitors,
    headless browsers, HTTP libraries, an empty UA) or ``other`` (TVs, consoles, unknown).
    """
    ua = ua.strip()[:1024]
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
        return True
    if "android" in lower_ua:
        lower_ua = _ANDROID_MODEL.sub(r"\1", lower_ua, count=1)
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
    if _TABLET.search(lower_ua) or (os_name == "Android" and "mobile" not in lower_ua):
        return "tablet"
    if _PHONE.search(lower_ua) or os_name in ("iOS", "Windows Phone", "KaiOS"):
        return "phone"
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


class Record(NamedTuple):
    """A page view as stored, with its visit numbers: what export writes and import reads."""

    view: PageView
    visit_views: int = 0  # on a visit's entry page view: the visit's page views; else 0
    duration: int = 0  # on a visit's entry page view: seconds from its first to its last page view or engagement
    engaged: int = 0  # seconds the page was visible
    scroll: Optional[int] = None  # the deepest scroll in percent; None when the page view reported no engagement


class Accepted(NamedTuple):
    """A hit that counts: its page view (or event), and what its in-memory visitor key is made of."""

    view: PageView
    event: str  # the event's name; empty for a page view
    address: str  # never stored: only salted into the visitor key
    user_agent: str
    stored: Tuple[int, int, int, Optional[int]] = (0, 0, 0, None)  # an imported row's visit_views, duration, engaged, scroll
    engagement: Optional[Tuple[float, int]] = None  # an engagement beacon's (seconds, scroll percent): not a page view


Outcome = Union[Accepted, FilteredHit, None]  # None: malformed, ignored without a trace
FILTER_REASONS = {  # reason: (label in the report, why)
    "bot": ("bots", "the User-Agent is a crawler, a link preview, a monitor or an HTTP library"),
    "headless": ("headless", "a headless or automated browser"),
    "prefetch": ("prefetch", "a prefetch, prerender or preview request, for a page nobody may see"),
    "spam": ("spam", "the referrer's domain is on the referrer spam list"),
    "foreign": ("foreign site", "the site is not one of --site"),
    "ignored": ("ignored", "the client address is in --ignore-ip"),
    "rate-limited": ("rate-limited", "more page views from this visitor in a minute than --rate-limit"),
    "dropped": ("dropped (database unavailable)", "the database could not take writes and the queue was full"),
}


def raw_hit(environ: Dict[str, Any], now: int, memo: Optional[Memo] = None) -> RawHit:
    """The parts of a WSGI request that a hit may use."""
    return RawHit(
        now, parse_query(environ.get("QUERY_STRING", ""), memo), environ.get("HTTP_USER_AGENT", ""),
        environ.get("HTTP_REFERER", "") or environ.get("HTTP_ORIGIN", ""), environ.get("HTTP_ACCEPT_LANGUAGE", ""),
        environ.get("REMOTE_ADDR", ""), environ.get("HTTP_X_FORWARDED_FOR", ""), environ.get("HTTP_FORWARDED", ""),
        is_prefetch(environ),
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
    if reason:
        return FilteredHit(hit.time, site if reason != "foreign" else "", reason)
    event = clean_event(params["event"]) if "event" in params else ""
    engagement = parse_engagement(params) if params.get("engagement") else None
    if ("event" in params and not event) or (params.get("engagement") and engagement is None):
        return None
    if not params.get("path"):
        params = {**params, "path": url_path(hit.page_url)}
    sent = {field.name: memo(field.clean, params.get(field.param, "")) for field in PARAM_FIELDS}
    source, channel = memo(classify_source, referrer)
    view = PageView(
        time=hit.time, site=site, referrer=referrer, country=country_of(address), browser=agent.browser, version=agent.version, os=agent.os,
        device=agent.device, language=memo(primary_language, hit.accept_language), campaign=campaign, source=source, channel=channel, hostname=host, **sent,
    )
    return Accepted(view, event, str(address or ""), hit.user_agent, engagement=engagement)


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
    text = {key: str(value) for key, value in row.items() if value is not None and value != ""}.get
    fields = {name: memo(clean, text(name, "")) for name, clean in FIELD_CLEANERS.items()}  # values repeat: clean each once
    fields["hostname"] = fields["hostname"] or normalise_host(text("site", default_site))  # rows from before hostnames: the site was the host
    site = site_of(normalise_host(text("site", default_site)), config.sites)
    fields["referrer"] = campaign_referrer(fields["campaign"]) or memo(normalise_referrer, with_scheme(text("referrer", "")), fields["hostname"])
    fields["source"], fields["channel"] = memo(classify_source, fields["referrer"])
    view = PageView(time=when, site=site, first_today=text("first_today", "") in ("1", "True", "true"), **fields)
    agent = UserAgent(view.browser, view.version, view.os, "bot" if text("device", "") == "bot" else view.device)
    reason = filter_reason(config, site, None, agent, "", view.referrer)
    if reason:
        return FilteredHit(when, site if reason != "foreign" else "", reason)
    event = clean_event(text("event", "")) if text("type", "pageview") == "event" else ""
    if text("type", "pageview") == "event" and not event:
        return None
    visit_views = bounded(row.get("visit_views"), 1_000_000)
    scroll = None if text("scroll", "") == "" else bounded(row.get("scroll"), 100)
    stored = (visit_views, bounded(row.get("duration"), 10 * DAY) if visit_views else 0, bounded(row.get("engaged"), MAX_ENGAGED) if scroll is not None else 0, scroll)
    return Accepted(view, event, "", "", stored)  # a duration belongs to a visit's entry; engagement to a page view that reported it


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


SHOWN_EMPTY = {field.name: dim.sections[0].empty if dim.sections else "(none)" for dim in DIMENSIONS for field in dim.fields}  # as the report shows it


def explain(outcome: Outcome) -> str:
    """One line on what a hit would be, for a dry run and ``pixeld.py check``."""
    if outcome is None:
        return "ignored: malformed (an event without a name)"
    if isinstance(outcome, FilteredHit):
        return f"filtered: {outcome.reason} ({FILTER_REASONS[outcome.reason][1]})"
    view = outcome.view
    what = f"the event {outcome.event!r} on" if outcome.event else "a page view of"
    details = ", ".join(f"{name} {getattr(view, name) or empty}" for name, empty in SHOWN_EMPTY.items() if name != "path")
    return f"counted as {what} {view.site or '(no host)'}{view.path} ({details}), unless the visitor is over the rate limit"


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
                 "page_path", "page_time", "page_row", "next_page", "events", "origin", "heir")

    def __init__(self, day: int, slots: int = KEY_SLOTS) -> None:
        self.salt = secrets.token_bytes(32)
        self.day = day
        self.keys = array.array("Q", bytes(8 * slots))  # visitor keys (0: a free slot) ...
        self.numbers = array.array("I", bytes(4 * slots))  # ... and the number of each, in the same slot
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
        self.events: Dict[int, Set[str]] = {}  # the names of the events a visitor sent today (most send none)
        self.origin: Dict[int, Tuple[int, int]] = {}  # a visit carried over from yesterday: yesterday's day and number
        self.heir: Dict[int, Tuple["Generation", int]] = {}  # yesterday's visitors carried into today: where to

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
        self.page_path.extend(NO_PAGES)
        self.page_time.extend(NO_PAGES)
        self.page_row.extend(UNWRITTEN_PAGES)
        return number

    def carry(self, number: int, yesterday: "Generation", old: int) -> None:
        """Continue a visit begun under yesterday's salt. The writer may not have told yesterday yet
        where it wrote the visit's rows: yesterday passes that on (``heir``)."""
        for column in ("start", "last", "views", "entry", "next_page"):
            getattr(self, column)[number] = getattr(yesterday, column)[old]
        for column in ("page_path", "page_time", "page_row"):
            getattr(self, column)[number * RECENT_PAGES : (number + 1) * RECENT_PAGES] = getattr(yesterday, column)[old * RECENT_PAGES : (old + 1) * RECENT_PAGES]
        self.origin[number] = yesterday.origin.get(old, (yesterday.day, old))
        yesterday.heir[old] = (self, number)

    def visit_key(self, number: int) -> Tuple[int, int, int]:
        """Names the visitor's current visit in the writer's batch, the same before and after midnight."""
        day, first = self.origin.get(number, (self.day, number))
        return day, first, self.start[number]

    def step(self, number: int, now: int, path: str) -> "VisitStep":
        """Place a page view in the visitor's visit, beginning a new one after 30 idle minutes. The
        latest page views stay reachable across visits: a beacon from a tab left open still lands."""
        if not self.views[number] or now - self.last[number] > VISIT_TIMEOUT:
            self.start[number] = self.last[number] = now
            self.views[number] = 1
            self.entry[number] = UNWRITTEN
            self.origin.pop(number, None)
        else:
            self.views[number] += 1
            self.last[number] = max(self.last[number], now)
        slot = number * RECENT_PAGES + self.next_page[number]
        self.next_page[number] = (self.next_page[number] + 1) % RECENT_PAGES
        self.page_path[slot], self.page_time[slot], self.page_row[slot] = path_hash(path), now, UNWRITTEN
        return VisitStep(self, number, self.start[number], self.views[number], self.last[number] - self.start[number], slot, self.visit_key(number))

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


NO_PAGES = array.array("I", [0] * RECENT_PAGES)
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


class Visitors:
    """Unique visitors, visits and rate limits, from keys that exist only in memory.

    A visitor key is a keyed hash of site, client address and full User-Agent, with a random
    salt that is replaced at 00:00 UTC. The previous salt is kept only until every visit begun
    under it has ended (30 idle minutes after midnight), so a visit can run across midnight.
    Nothing here is ever persisted: a restart forgets everyone. Not thread-safe; the app
    holds a lock around ``observe`` and the hand-over to the writer.
    """

    def __init__(self, rate_limit: int, on_new_salt: Callable[[], None] = lambda: None) -> None:
        self.rate_limit = rate_limit
        self.on_new_salt = on_new_salt
        self._current = Generation(-1, slots=1)  # a placeholder: the first hit brings the first real day
        self._previous: Optional[Generation] = None

    def admit(self, hit: Accepted) -> Tuple[Union[PageView, Event, Engagement, FilteredHit, None], Optional[VisitStep]]:
        """What the writer gets for an accepted hit: the page view in its visit, the event, the engagement
        joined to its page view (None when it has none), or a rate-limited tally."""
        view = hit.view
        if hit.engagement is not None:
            return self.engage(view.time, view.site, hit.address, hit.user_agent, view.path, *hit.engagement), None
        if hit.event:
            first = self.observe_event(view.time, view.site, hit.address, hit.user_agent, hit.event)
            if first is None:
                return FilteredHit(view.time, view.site, "rate-limited"), None
            return Event(hit.event, view.counted(first)), None
        observation = self.observe(view.time, view.site, hit.address, hit.user_agent, view.path)
        if observation is None:
            return FilteredHit(view.time, view.site, "rate-limited"), None
        return view.counted(observation.first_today), observation.step

    def observe(self, now: int, site: str, address: str, user_agent: str, path: str = "") -> Optional[Observation]:
        """Place a page view in its visit; None when the visitor is over the rate limit."""
        self._rotate(now)
        generation = self._current
        number = self._find(now, site, address, user_agent)
        if number < 0:
            return Observation(True, VisitStep(None, -1, now, 1, 0, -1, (-1, -1, now)))
        if not self._within_rate_limit(generation, number, now):
            return None
        first_today = not generation.counted[number]
        generation.counted[number] = 1
        return Observation(first_today, generation.step(number, now, path))

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

    def observe_event(self, now: int, site: str, address: str, user_agent: str, name: str) -> Optional[bool]:
        """Whether this is the visitor's first event of this name today; None over the rate limit."""
        self._rotate(now)
        generation = self._current
        number = self._find(now, site, address, user_agent)
        if number < 0:
            return True
        if not self._within_rate_limit(generation, number, now):
            return None
        names = generation.events.setdefault(number, set())
        first = name not in names
        names.add(name)
        return first

    def _rotate(self, now: int) -> None:
        day = now // DAY
        if day > self._current.day:
            self._previous = self._current if day == self._current.day + 1 else None
            self._current = Generation(day)
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
    return (Event(outcome.event, outcome.view) if outcome.event else Record(outcome.view, *outcome.stored)), None


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
)
RAW_METRICS = Metrics(*(f"sum({when})" if adds == "1" else f"coalesce(sum({adds}), 0)" for when, adds in ROW_METRICS))  # SQL over raw rows
SUMMED_METRICS = ", ".join(f"sum({name})" for name in Metrics._fields)  # SQL over daily and monthly counts


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


Migration = Callable[[sqlite3.Connection, Callable[[str], None]], None]


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
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {dim.column} INTEGER NOT NULL DEFAULT {empty}")
        if dim.code and conn.execute("SELECT 1 FROM daily LIMIT 1").fetchone():  # a new database has no older days to speak of
            progress(f"counting older days under the new dimension {name}")
            pages = DIMENSION_NAMED["pages"].code
            for table, period in (("daily", "day"), ("monthly", "month")):
                conn.execute(f"INSERT INTO {table} SELECT {period}, site, {dim.code}, {empty}, {SUMMED_METRICS} FROM {table} WHERE dim = {pages} GROUP BY {period}, site")

    return migration


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


def _string_id(conn: sqlite3.Connection, value: str) -> int:
    row = conn.execute("SELECT id FROM strings WHERE value = ?", (value,)).fetchone()
    return row[0] if row else -1


def _intern(conn: sqlite3.Connection, value: str) -> int:
    conn.execute("INSERT OR IGNORE INTO strings (value) VALUES (?)", (value,))
    return conn.execute("SELECT id FROM strings WHERE value = ?", (value,)).fetchone()[0]


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
    add_hostnames,
    add_text_dimension("campaign_details"),
)
SCHEMA_VERSION = len(MIGRATIONS)
ROW_NUMBERS = ("first_today", "visit_views", "duration", "engaged", "scroll")  # what a raw row holds beside its dimensions
PAGEVIEW_COLUMNS = ("id", "site", *(dim.column for dim in DIMENSIONS), *ROW_NUMBERS)
EVENT_COLUMNS = ("id", "site", *(dim.column for dim in EVENT_DIMENSIONS), EVENT_NAMES.column, *ROW_NUMBERS)
COUNTED_KEYS = tuple((index, dim.code) for index, dim in enumerate(DIMENSIONS, start=1) if dim.code)  # (place in a row's keys, code)
STORED_KEYS = slice(1, 2 + len(DIMENSIONS))  # a row's site and dimension ids, as ``Store._keys`` makes them
STORED_VISIT_VIEWS, STORED_DURATION, STORED_ENGAGED, STORED_SCROLL = (PAGEVIEW_COLUMNS.index(name) for name in ("visit_views", "duration", "engaged", "scroll"))
KeyGetters = Tuple[Tuple[bool, Callable[[PageView], Any]], ...]  # per stored column: (is it the agent, how to get its value)


def key_getters(dimensions: Sequence[Dimension]) -> KeyGetters:
    """How the writer gets each dimension's stored value from a PageView: a string (several fields
    joined, as a source's "search\tGoogle"), or the agent's tuple."""
    getters = []
    for dim in dimensions:
        get = operator.attrgetter(*(field.name for field in dim.fields))
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


@dataclasses.dataclass
class Batch:
    """What one commit writes. The writer and the importer fill it the same way (``add``)."""

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

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._strings: Dict[str, int] = {}
        self._agents: Dict[Tuple[str, str, str, str], int] = {}
        self._ids = {table: TimeIds(conn, table) for table in ("pageviews", "events")}

    def write(self, batch: Batch) -> None:
        """Commit a batch at once: live page views (placed in their visits), imported records, events,
        engagement and filtered hits."""
        self.conn.execute("BEGIN IMMEDIATE")
        for ids in self._ids.values():
            ids.clear()
        try:
            tally = Tally(self.conn)
            self._insert(batch.records, tally)
            remember = self._insert_live(batch.views, batch.engagements, tally)
            self._insert_events(batch.events, tally)
            self._tally_filtered(batch.filtered)
            tally.save()
            self.conn.execute("COMMIT")
        except BaseException:
            self._strings.clear()
            self._agents.clear()
            if self.conn.in_transaction:  # SQLite may have rolled back already (a full disk, say)
                self.conn.execute("ROLLBACK")
            raise
        remember()

    def _insert(self, records: Sequence[Record], tally: "Tally") -> List[Tuple[int, Tuple[int, ...]]]:
        """Insert page view rows and count them (``Tally.count_rows``); return each row's id and interned keys."""
        if not records:
            return []
        ids = self._ids["pageviews"]
        ids.load(min(r.view.time for r in records), max(r.view.time for r in records))
        rows, placed = [], []
        for view, visit_views, duration, engaged, scroll in sliced(records):
            keys = self._keys(view, PAGEVIEW_KEYS)
            row_id = ids.next(view.time)
            rows.append((row_id, *keys, int(view.first_today), visit_views, duration, engaged, scroll, view.time))
            placed.append((row_id, keys))
        tally.count_rows(rows)
        return placed

    def _insert_events(self, events: Sequence[Event], tally: "Tally") -> None:
        ids = self._ids["events"]
        if events:
            ids.load(min(e.view.time for e in events), max(e.view.time for e in events))
        rows = []
        for name, view in events:
            keys = self._keys(view, EVENT_KEYS)
            name_id = self.intern(name)
            rows.append((ids.next(view.time), *keys, name_id, int(view.first_today), 0, 0, 0, None))
            tally.event(view.time, keys[0], name_id, int(view.first_today))
        self.conn.executemany(insert_sql("events", EVENT_COLUMNS), rows)

    def _insert_live(self, views: Sequence[Tuple[PageView, Optional[VisitStep]]], engagements: Sequence[Engagement], tally: "Tally") -> Callable[[], None]:
        """Insert live page views, add engagement to the page views it belongs to, then bring the entry
        rows of growing visits up to date; return what to remember once the transaction has committed.

        Memory holds only where each visit's first page view and latest page views were written; what
        they show so far is read back from their rows."""
        placed = self._insert([Record(view, int(step is not None and step.views == 1)) for view, step in views], tally)
        entries: Entries = {}  # a visit begun in this batch -> its entry row, and the step that wrote it
        targets: Dict[int, List[int]] = {}  # a growing visit's entry row -> [page views, duration, day] it should show
        for (view, step), (row_id, _) in sliced(zip(views, placed)):
            if step is None or step.generation is None:
                continue
            step.generation.wrote_page(step.slot, view.time, row_id - first_id(view.time))
            if step.views == 1:
                entries[step.visit] = (row_id, step)
            else:
                _grow(targets, entries, step, step.views, step.duration)
        self._engage(engagements, entries, targets, tally)
        self._grow_visits(targets, tally)

        def remember() -> None:
            for row_id, step in sliced(entries.values()):
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
        self.conn.executemany("UPDATE pageviews SET engaged = ?, scroll = ? WHERE id = ?", updates)

    def _grow_visits(self, targets: Dict[int, List[int]], tally: "Tally") -> None:
        """Bring each growing visit's entry row, and its day's counts, up to the visit's page views and duration."""
        stored = self._stored(targets)
        updates = []
        for row_id, (views, duration, day) in sliced(targets.items()):
            row = stored.get(row_id)
            if row is None or not row[STORED_VISIT_VIEWS]:  # deleted meanwhile, or not an entry row
                continue
            written_views, written_duration = row[STORED_VISIT_VIEWS], row[STORED_DURATION]
            views, duration = max(views, written_views), max(duration, written_duration)
            if (views, duration) == (written_views, written_duration):
                continue
            updates.append((views, duration, row_id))
            tally.visit_grew(day, row[STORED_KEYS], -1 if written_views == 1 and views > 1 else 0, duration - written_duration)
        self.conn.executemany("UPDATE pageviews SET visit_views = ?, duration = ? WHERE id = ?", updates)

    def _stored(self, row_ids: Iterable[int]) -> Dict[int, Tuple[Any, ...]]:
        """Page view rows by id, as written so far (in this transaction too), in ``PAGEVIEW_COLUMNS`` order."""
        ids, found = list(row_ids), {}
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
                    "DELETE FROM pageviews WHERE id IN (SELECT id FROM pageviews WHERE id < ? ORDER BY id LIMIT ?)", (first_id(before), chunk)
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
        keys = [strings.get(view.site) or self.intern(view.site)]
        for is_agent, value_of in getters:
            value = value_of(view)
            if is_agent:
                keys.append(agents.get(value) or self.agent(UserAgent(*value)))
            else:
                keys.append(strings.get(value) or self.intern(value))
        return tuple(keys)

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

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._daily: Dict[Tuple[int, int, int, int], Totals] = {}
        conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS changes ({', '.join(CHANGE_COLUMNS)})")
        conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS batch ({', '.join(BATCH_COLUMNS)})")
        conn.execute("DELETE FROM temp.changes")

    def count_rows(self, rows: Sequence[Tuple[Any, ...]]) -> None:
        """Insert page view rows (``BATCH_COLUMNS``) and count them in every dimension and quarter hour."""
        conn = self.conn
        conn.execute("DELETE FROM temp.batch")
        conn.executemany(insert_sql("temp.batch", BATCH_COLUMNS), rows)
        conn.execute(f"INSERT INTO pageviews ({', '.join(PAGEVIEW_COLUMNS)}) SELECT {', '.join(PAGEVIEW_COLUMNS)} FROM temp.batch")
        metrics = ", ".join(RAW_METRICS)
        conn.execute(
            f"INSERT INTO temp.changes ({', '.join(CHANGE_COLUMNS)}) "
            + " UNION ALL ".join(f"SELECT time / {DAY}, site, {code}, {column}, {metrics} FROM temp.batch GROUP BY 1, 2, 4" for code, column in COUNTED_COLUMNS)
        )
        conn.execute(
            f"INSERT INTO quarters SELECT time / {QUARTER}, site, count(*), sum(first_today), sum(visit_views > 0) FROM temp.batch GROUP BY 1, 2 "
            "ON CONFLICT (quarter, site) DO UPDATE SET views = views + excluded.views, visitors = visitors + excluded.visitors, visits = visits + excluded.visits"
        )

    def event(self, time: int, site: int, name: int, first_today: int) -> None:
        total = self._daily.setdefault((time // DAY, site, EVENT_NAMES.code, name), Totals())
        total.views += 1
        total.visitors += first_today

    def engagement(self, day: int, keys: Tuple[int, ...], seconds: int, views: int, scroll: int) -> None:
        """A page view's engagement grew: count it on the page view's day."""
        self._grew(day, keys, (("engaged", seconds), ("engaged_views", views), ("scroll", scroll)))

    def visit_grew(self, day: int, keys: Tuple[int, ...], bounces: int, duration: int) -> None:
        self._grew(day, keys, (("bounces", bounces), ("duration", duration)))

    def _grew(self, day: int, keys: Tuple[int, ...], changes: Sequence[Tuple[str, int]]) -> None:
        """Add changes to some metrics of a page view already counted, in every dimension it counts in."""
        site = keys[0]
        for index, code in COUNTED_KEYS:
            total = self._daily.setdefault((day, site, code, keys[index]), Totals())
            for metric, amount in changes:
                total.grow(metric, amount)

    def save(self) -> None:
        """Add the batch's changes to the daily counts and, added up per UTC month by SQLite, to the
        monthly counts."""
        conn = self.conn
        conn.executemany(insert_sql("temp.changes", CHANGE_COLUMNS), (key + tuple(total) for key, total in sliced(self._daily.items())))
        added = ", ".join(f"{name} = {name} + excluded.{name}" for name in Metrics._fields)
        conn.execute(f"INSERT INTO daily SELECT day, site, dim, value, {SUMMED_METRICS} FROM temp.changes GROUP BY day, site, dim, value ON CONFLICT (day, site, dim, value) DO UPDATE SET {added}")
        conn.execute(
            f"INSERT INTO monthly SELECT {MONTH_OF_DAY_SQL} AS m, site, dim, value, {SUMMED_METRICS} FROM temp.changes GROUP BY m, site, dim, value "
            f"ON CONFLICT (month, site, dim, value) DO UPDATE SET {added}"
        )


CHANGE_COLUMNS = ("day", "site", "dim", "value", *Metrics._fields)
BATCH_COLUMNS = (*PAGEVIEW_COLUMNS, "time")  # a batch's new page view rows, with the second they count in
COUNTED_COLUMNS = tuple((dim.code, dim.column) for dim in COUNTED)


def sliced(items: Iterable[Any]) -> Iterator[Any]:
    """The items, one by one, letting the serve loop have the interpreter every SLICE of them: the
    writer's batches are thousands of rows of Python, and the pixel must not wait for them."""
    for number, item in enumerate(items, 1):
        if number % SLICE == 0:
            time.sleep(0)
        yield item


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
    ) -> None:
        self.store = Store(conn)
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
                self.store.write(self._batch)
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


class Scope(NamedTuple):
    """Which page views count: one site (or all), and SQL conditions on raw rows (empty when unfiltered)."""

    site_id: Optional[int]
    where: str  # " AND …" with each filter's ids written in
    table: str = "pageviews"  # raw rows to count: pageviews, or events (with event=)

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
    previous = _totals(conn, Range(2 * span.start - span.end, span.start), scope)
    grain, bounds = series_bounds(span, query.zone, query.grain)
    if scope.filtered:
        counts, moments, totals = _count_matching(conn, span, bounds, scope)
    else:
        counts, moments = _count(conn, span, scope, COUNTED), None
        totals = _total(counts["pages"])
    series = _series(conn, span, grain, bounds, scope, moments)
    counts.update(_count(conn, span, scope._replace(table="events"), (EVENT_NAMES,)))
    labels = _labeller(conn, counts, multi_site=not query.site)
    return ReportData(
        query=query,
        sites=_sites(conn, span, query.site),
        totals=totals,
        previous=previous,
        filtered=_count_filtered(conn, span, scope.site_id),
        sections=_sections(counts, labels, totals),
        visitors_now=None if query.now is None else _visitors_now(conn, query.now, scope),
        grain=grain,
        series=series,
        notes=_retention_notes(conn, span, scope),
    )


LIVE_WINDOW = 5 * 60  # "visitors now": a page view in the last five minutes


def _visitors_now(conn: sqlite3.Connection, now: int, scope: Scope) -> int:
    """Visits whose last page view (their entry row's time plus duration) came in the last five minutes:
    a visitor has one visit at a time, so this counts visitors. Visits last a day at most."""
    clause, args = _raw_clause(scope)
    return conn.execute(
        f"SELECT count(*) FROM {scope.table} WHERE id >= ? AND id < ? AND visit_views > 0 AND (id >> {ID_SHIFT}) + {ID_EPOCH} + duration >= ?{clause}",
        (first_id(now - DAY), first_id(now + 1), now - LIVE_WINDOW) + args,
    ).fetchone()[0]


def _total(counted: Dict[Tuple[int, int], Totals]) -> Metrics:
    return Metrics(*(sum(column) for column in zip(*counted.values()))) if counted else Metrics()


def filter_ids(name: str, value: str) -> Tuple[str, str, Tuple[str, ...]]:
    """The column one filter tests on a raw row, and SQL for the ids it matches, as its section says it matches."""
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
    return Scope(site_id, "".join(" AND " + test for test in tests), table)


# What a filtered report sums per part in SQL: page views and visitors for the series, and what the pages' keys do not count.
PART_SUMS = tuple(name for name in Metrics._fields if name in ("views", "visitors") or name not in RAW_NEEDS["pages"])
REPORT_NICENESS = 10  # how much nicer than the daemon the threads that scan for a report are
MATCHED_CHUNK = 200_000  # page views a filtered report reads in one statement at most, which bounds its memory
Moments = List[Tuple[int, int, int]]  # (a moment in a series bucket, page views, visitors), counted from raw rows


class MatchKey(NamedTuple):
    """What a filtered report joins, one key per matching row (SQL), and how to read the keys back."""

    sql: str
    values: Tuple[Tuple[str, int, int], ...]  # (dimension, shift, mask) of each value id packed into a key
    flags: Tuple[str, ...] = ()  # the metric of each low bit of a key, lowest first; every key counts a page view
    amount: str = ""  # or: the metric whose amount follows each key (engaged seconds, scroll)


KEY_BITS = 62  # a packed key is a positive 64-bit integer in SQLite
KEY_COMBINATIONS = 20_000  # value combinations one packed key may take at most, so that few distinct keys come back


def match_keys(conns: Sequence[sqlite3.Connection], span: Range, site_key: str) -> List[MatchKey]:
    """Pack the value ids of several dimensions into one integer key per matching row, above a bit for
    each metric a row may count in (a visitor, a visit, a bounce, an engaged view), so that Counter
    counts value combinations and their metrics at once. Dimensions share a key while their ids fit in
    ``KEY_BITS`` and the product of their numbers of values in the range (from the monthly counts)
    stays under ``KEY_COMBINATIONS``: the more rows a key stands for, the fewer keys SQLite joins and
    Python counts. Each metric that adds an amount gets a key of its own per dimension."""
    strings, agents = (max(conn.execute(f"SELECT coalesce(max(id), 1) FROM {table}").fetchone()[0] for conn in conns) for table in ("strings", "agents"))
    width = {dim.name: (agents if dim.column == "agent" else strings).bit_length() for dim in COUNTED}
    values = dict(conns[0].execute(
        "SELECT dim, count(DISTINCT value) FROM monthly WHERE month >= ? AND month < ? GROUP BY dim",
        (month_of_day(span.start // DAY), month_of_day((span.end - 1) // DAY) + 1),
    ).fetchall())
    groups: List[List[Dimension]] = []
    for dim in COUNTED:
        group = groups[-1] + [dim] if groups else []
        fits = sum(width[member.name] for member in group) + len(_flags(group)) <= KEY_BITS
        if group and fits and math.prod(values.get(member.code, 1) for member in group) <= KEY_COMBINATIONS:
            groups[-1] = group
        else:
            groups.append([dim])
    keys = []
    for group in groups:
        flags = _flags(group)
        packed = [f"(({getattr(ROW_METRICS, metric)[0]}) << {bit})" for bit, metric in enumerate(flags)]
        parts, shift = [], len(flags)
        for dim in group:
            packed.append(f"({dim.column} << {shift})")
            parts.append((dim.name, shift, (1 << width[dim.name]) - 1))
            shift += width[dim.name]
        keys.append(MatchKey(f"group_concat({site_key}({' | '.join(packed)}))", tuple(parts), flags))
    for dim in COUNTED:
        for metric in RAW_NEEDS[dim.name]:
            when, adds = getattr(ROW_METRICS, metric)
            if adds != "1":
                keys.append(MatchKey(f"group_concat(CASE WHEN {when} THEN {site_key}{dim.column} || ' ' || {adds} END)", ((dim.name, 0, -1),), (), metric))
    return keys


def _flags(group: Sequence[Dimension]) -> Tuple[str, ...]:
    """The metrics a row may count in (each a bit of a packed key) for the dimensions of one key."""
    needed = {metric for dim in group for metric in RAW_NEEDS[dim.name] if metric != "views" and getattr(ROW_METRICS, metric)[1] == "1"}
    return tuple(name for name in Metrics._fields if name in needed)


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
        keys = match_keys(conns, span, "" if one_site is not None else "site || ':' || ")
        joined: List["Counter[str]"] = [Counter() for _ in keys]  # per key: how often each key appeared (or the amounts it carried)
        for part, row in zip(parts, _read_parts(conns, [key.sql for key in keys] + [getattr(RAW_METRICS, metric) for metric in PART_SUMS], scope, parts)):
            part_sums = dict(zip(PART_SUMS, (value or 0 for value in row[len(keys) :])))
            sums.update(part_sums)
            moments.append((part.start, part_sums["views"], part_sums["visitors"]))
            for key, text, found in zip(keys, row, joined):
                if text and not key.amount:
                    found.update(text.split(","))
                elif text:
                    _add_amounts(found, text)
    counts: Counts = {dim.name: {} for dim in COUNTED}
    for key, found in zip(keys, joined):
        _add_joined(counts, key, found, one_site)
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
    sql = f"SELECT {', '.join(columns)} FROM {scope.table} WHERE id >= ? AND id < ?{scope.where}"
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


def _add_joined(counts: Counts, key: MatchKey, found: "Counter[str]", one_site: Optional[int]) -> None:
    """Add what one kind of key counted (``match_keys``) to its dimensions' counts."""
    for text, amount in found.items():
        site, number = map(int, text.split(":")) if one_site is None else (one_site, int(text))
        for name, shift, mask in key.values:
            counted = counts[name]
            value = number >> shift & mask
            total = counted.get((site, value))
            if total is None:
                total = counted[site, value] = Totals()
            if key.amount:
                total.grow(key.amount, amount)
                continue
            total.views += amount
            for bit, metric in enumerate(key.flags):
                if number >> bit & 1:
                    total.grow(metric, amount)


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
    queries += [(f"SELECT {raw_metrics} FROM pageviews WHERE id >= ? AND id < ?{site_clause}", (first_id(r.start), first_id(r.end)) + site_args, 1) for r in split.raw]
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
        for row in _read_parts(conns, RAW_METRICS, scope, parts):
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
    period = "day" if table == "daily" else "month"
    clause, args = _site_clause(site_id)
    for dim, site, value, *metrics in conn.execute(
        f"SELECT dim, site, value, {SUMMED_METRICS} "
        f"FROM {table} WHERE {period} >= ? AND {period} < ? AND dim IN ({','.join('?' * len(names))}){clause} GROUP BY dim, site, value",
        (first, end, *names) + args,
    ):
        _add(counts, names[dim], site, value, metrics, sign)


def _raw_clause(scope: Scope) -> Tuple[str, Tuple[Any, ...]]:
    return (scope.where, ()) if scope.where else _site_clause(scope.site_id)


def _count_raw(conn: sqlite3.Connection, span: Range, scope: Scope, counts: Counts) -> None:
    """Count raw page views. Pages get every metric (entry pages and the totals come from them);
    the other sections show page views only, which Python counts faster than SQLite can sort."""
    clause, args = _raw_clause(scope)
    bounds = (first_id(span.start), first_id(span.end)) + args
    for name in counts:
        column = DIMENSION_NAMED[name].column
        if RAW_NEEDS[name] != ("views",):
            for site, value, *metrics in conn.execute(
                f"SELECT site, {column}, {', '.join(RAW_METRICS)} "
                f"FROM {scope.table} WHERE id >= ? AND id < ?{clause} GROUP BY site, {column}",
                bounds,
            ):
                _add(counts, name, site, value, metrics)
        else:
            for (site, value), views in Counter(conn.execute(f"SELECT site, {column} FROM {scope.table} WHERE id >= ? AND id < ?{clause}", bounds)).items():
                _add(counts, name, site, value, Metrics(views=views))


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
    """Sum the quarter totals per bucket in SQLite: each bucket is a range scan of the primary key."""
    clause, args = _site_clause(site_id)
    buckets = [(start, max(start, inner.start) // QUARTER, -(-min(end, inner.end) // QUARTER)) for start, end in zip(bounds, bounds[1:])]
    for i in range(0, len(buckets), 300):
        chunk = buckets[i : i + 300]
        values = ",".join("(?, ?, ?)" for _ in chunk)
        yield from conn.execute(
            f"WITH bucket(start, first, last) AS (VALUES {values}) "
            f"SELECT bucket.start, sum(views), sum(visitors) FROM bucket JOIN quarters ON quarter >= first AND quarter < last{clause} "
            "GROUP BY bucket.start",
            tuple(value for bucket in chunk for value in bucket) + args,
        )


def _raw_counts(conn: sqlite3.Connection, raw_parts: List[Range], scope: Scope, step: int) -> Iterable[Tuple[int, int, int]]:
    """(start of a quarter hour, or of a minute, page views, visitors) counted from raw page views."""
    clause, args = _raw_clause(scope)
    for part in raw_parts:
        if part.start < part.end:
            yield from conn.execute(
                f"SELECT ((id >> {ID_SHIFT}) + {ID_EPOCH}) / {step} * {step} AS q, count(*), sum(first_today) "
                f"FROM {scope.table} WHERE id >= ? AND id < ?{clause} GROUP BY q",
                (first_id(part.start), first_id(part.end)) + args,
            )


def series_grain(span: Range) -> str:
    """Minutes up to an hour, hours up to two days, then days, weeks, months."""
    days = (span.end - span.start) / DAY
    return "minute" if days <= 1 / 24 else "hour" if days <= 2 else "day" if days <= 92 else "week" if days <= 732 else "month"


GRAINS = {"hour": 3600, "day": DAY, "week": 7 * DAY, "month": 28 * DAY}  # what group= takes, and each grain's shortest bucket
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
    else:
        date = (date.replace(day=1) + dt.timedelta(days=32)).replace(day=1)
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


def _sites(conn: sqlite3.Connection, span: Range, site: str) -> List[str]:
    if site:
        return [site]
    rows = conn.execute(
        "SELECT value FROM strings WHERE id IN (SELECT DISTINCT site FROM quarters WHERE quarter >= ? AND quarter < ?) ORDER BY value",
        (span.start // QUARTER, -(-span.end // QUARTER)),
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

    return {name: label(dim, section) for name, (dim, section) in SECTIONS.items()}


def _sections(counts: Counts, labels: Dict[str, Label], totals: Metrics) -> Dict[str, List[Row]]:
    """Every section's rows, of its kind: a label's counts summed over the values that show as it
    (a browser's versions, a page on several sites), ranked by count. Row kinds that name the other
    parts of a value (a source's channel) take them from its biggest value."""
    sections: Dict[str, List[Row]] = {}
    for name, (dim, section) in SECTIONS.items():
        label, kind = labels[name], section.row
        others = [(other.part, labels[other.name]) for other in dim.sections if kind.OTHERS and other.part and other.part != section.part]
        sums: Dict[str, Totals] = {}
        parts: Dict[str, Dict[str, str]] = {}
        counted = counts[dim.name].items()
        for (site, value), metrics in sorted(counted, key=lambda item: -item[1].views) if others else counted:
            shown = label(site, value)
            total = sums.get(shown)
            if total is None:
                total = sums[shown] = Totals()
                parts[shown] = {part: other(site, value) for part, other in others}
            total.add(metrics)
        rows = [kind.make(shown, total.frozen(), totals, parts[shown]) for shown, total in sums.items() if shown or section.lists_empty]
        sections[name] = sorted((row for row in rows if row.count), key=lambda row: (-row.count, row.value))
    return sections


def _strings_by_id(conn: sqlite3.Connection, ids: Iterable[int]) -> Dict[int, str]:
    wanted, found = sorted(ids), {}
    for i in range(0, len(wanted), 500):
        chunk = wanted[i : i + 500]
        marks = ",".join("?" * len(chunk))
        found.update(conn.execute(f"SELECT id, value FROM strings WHERE id IN ({marks})", chunk))
    return found


def first_day_with_data(conn: sqlite3.Connection) -> Optional[int]:
    return conn.execute("SELECT min(day) FROM daily").fetchone()[0]


###############################################################################
# Report parameters and rendering #############################################
###############################################################################

TEXT_ROWS = 10
WIDTH = 80
CONTENT_TYPES = {"text": "text/plain; charset=utf-8", "json": "application/json", "csv": "text/csv; charset=utf-8", "html": "text/html; charset=utf-8"}
SERIES_FORMATS = {"minute": "%H:%M", "hour": "%Y-%m-%d %H:%M", "day": "%Y-%m-%d %a", "week": "%Y-%m-%d wk", "month": "%Y-%m"}
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


def parse_report_request(params: Dict[str, str], now: float, first_day: Callable[[], Optional[int]], zone: dt.tzinfo) -> ReportRequest:
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
    query = Query(span, zone, parse_site(params.get("site", "")), parse_filters(params), int(now) if live else None, parse_group(params.get("group", ""), span))
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
    return [request.section] if request.section else list(SECTION_TITLES)


def render_report(conn: sqlite3.Connection, request: ReportRequest, width: int = WIDTH) -> Tuple[str, str]:
    """The report the request asks for: its text and its content type."""
    data = query_report(conn, request.query)
    renderers = {"json": render_json, "csv": render_csv, "html": render_html, "text": lambda data, request: render_text(data, request, width)}
    return renderers[request.format](data, request), CONTENT_TYPES[request.format]


def render_json(report: ReportData, request: ReportRequest) -> str:
    query, now, before = report.query, report.totals.headline(), report.previous.headline()
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
    for name, number in report.totals.headline().items():
        writer.writerow(["totals", name, number, ""])
    for reason, hits in report.filtered.items():
        writer.writerow(["filtered", reason, hits, ""])
    for start, views, visitors in report.series:
        writer.writerow(["series", iso(start, report.query.zone), views, ""])
        writer.writerow(["series_visitors", iso(start, report.query.zone), visitors, ""])
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
    now, before = report.totals.headline(), report.previous.headline()
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
    counted = "Events" if any(name == "event" for name, _ in report.query.filters) else "Page views"
    titles = {
        "visitors": "Visitors", "visits": "Visits", "pageviews": counted, "pages_per_visit": "Pages per visit", "bounce_rate": "Bounce rate",
        "visit_duration": "Visit duration", "time_on_page": "Time on page", "scroll_depth": "Scroll depth",
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
    for start, views, visitors in report.series:
        label = dt.datetime.fromtimestamp(start, zone).strftime(formats[report.grain])
        lines.append(f"{label:<16} {bar(views, largest, bar_width, ascii):<{bar_width}}{views:>10,}{visitors:>10,}")
    return lines


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


def cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


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
table{width:100%;border-collapse:collapse;table-layout:fixed}td,th{padding:.25rem .4rem;border-bottom:1px solid var(--line);vertical-align:top}
th{text-align:right;font-weight:600;color:var(--muted);font-size:.85rem}th:first-child{text-align:left}.n{text-align:right;width:5.6rem;font-variant-numeric:tabular-nums}
td.l{position:relative;overflow-wrap:anywhere}td.l span{position:absolute;left:0;top:0;bottom:0;background:var(--bar);z-index:-1}td.l a,td.l b{position:relative}
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
        f'{"".join(axis)}{"".join(bars)}</svg><figcaption class="muted">{esc(caption)}</figcaption></figure>'
    )


def row_filter(name: str, value: str, sites: List[str]) -> Dict[str, str]:
    """The filter a row's link adds. On an all-sites report a page is shown as host and path
    (``example.org/about``): its link names both."""
    if name == "path" and not value.startswith("/"):
        site = next((site for site in sites if value.startswith(site + "/")), "")
        if site:
            return {"site": site, "path": value[len(site):]}
    return {name: value}


def html_section(name: str, rows: List[Row], report: ReportData, request: ReportRequest) -> str:
    """A section as a table: each row a link that adds the section's filter, with a bar for its share."""
    section = SECTIONS[name][1]
    filter_name = section.filter or SECTIONS["pages"][1].filter  # entry pages filter by path
    headers = [header for header, _ in section.row.COLUMNS]
    largest = max((row.count for row in rows), default=0)
    body = []
    for row in rows:
        shown = row.value or section.empty
        link = report_link(request, **row_filter(filter_name, shown, report.sites))
        body.append(
            f'<tr><td class="l"><span style="width:{100 * row.count / largest if largest else 0:.1f}%"></span><a href="{link}">{esc(shown)}</a></td>'
            + "".join(f'<td class="n">{esc(cell)}</td>' for cell in row.cells()) + "</tr>"
        )
    if not body:
        body.append(f'<tr><td class="l muted" colspan="{len(headers) + 1}">{esc(section.nothing)}</td></tr>')
    head = f'<tr><th>{esc(section.title)}</th>{"".join(f"<th class=n>{esc(header)}</th>" for header in headers)}</tr>'
    more = len(report.sections[name]) - len(rows)
    footer = f'<p class="muted"><a href="{report_link(request, section=name)}">all {more + len(rows):,}</a></p>' if more > 0 else ""
    order = WIDE_ORDER.get(name, len(WIDE_ORDER) + list(SECTIONS).index(name))  # ``order`` only acts in the wide layout's grid
    return f'<section style="order:{order}"><h2>{esc(section.title)}</h2><table>{head}{"".join(body)}</table>{footer}</section>'


###############################################################################
# Export and import ###########################################################
###############################################################################

EXPORT_FIELDS = (
    "time", "type", "site", *(field.name for dim in DIMENSIONS + (EVENT_NAMES,) for field in dim.fields), *ROW_NUMBERS,
)
IMPORT_BATCH = 20_000
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
    rows = heapq.merge(*tables)
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
    columns = PAGEVIEW_COLUMNS if table == "pageviews" else EVENT_COLUMNS
    selected, joins = ["t.id", f"'{kind}'", "coalesce(s.value, '')"], ["LEFT JOIN strings s ON s.id = t.site"]
    for number, dim in enumerate(DIMENSIONS + (EVENT_NAMES,)):
        if dim.column not in columns:
            selected += ["''"] * len(dim.fields)
        elif dim.column == "agent":
            selected += [f"coalesce(a.{field}, '')" for field in AGENT_FIELDS]
            joins.append("LEFT JOIN agents a ON a.id = t.agent")
        elif len(dim.fields) == 2:  # "first\tsecond"
            value = f"coalesce(j{number}.value, '')"
            tab = f"instr({value}, char(9))"
            selected += [f"substr({value}, 1, {tab} - 1)", f"substr({value}, {tab} + 1)"]
            joins.append(f"LEFT JOIN strings j{number} ON j{number}.id = t.{dim.column}")
        else:
            selected.append(f"coalesce(j{number}.value, '')")
            joins.append(f"LEFT JOIN strings j{number} ON j{number}.id = t.{dim.column}")
    selected += [f"t.{number}" for number in ROW_NUMBERS]
    return f"SELECT {', '.join(selected)} FROM {table} t {' '.join(joins)} WHERE t.id >= ? AND t.id < ?"


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
    tool (``flask``); web server access logs in the combined format (``combined``). Every row
    goes through the hit pipeline (``read_hit`` for log lines, ``read_record`` for reduced rows),
    so values are normalised and filtered as a live hit's would be. Access logs are counted in
    visits as live hits are, and their addresses are dropped after the country lookup.
    """

    def __init__(self, conn: sqlite3.Connection, config: Config, geoip: Any, progress: Callable[[str], None]) -> None:
        self.store = Store(conn)
        self.config = config
        self.site = config.sites[0] if config.sites else ""
        self.geoip = geoip
        self.progress = progress
        self.memo = Memo()
        self.visitors = Visitors(rate_limit=0, on_new_salt=self.memo.clear)
        self.imported = self.filtered = self.skipped = 0
        self.batch = Batch()
        self._started = self._reported = time.monotonic()

    def run(self, path: str, fmt: str, force: bool) -> None:
        fingerprint = file_fingerprint(path)
        seen = self.store.conn.execute("SELECT at FROM imports WHERE fingerprint = ?", (fingerprint,)).fetchone()
        if seen and not force:
            when = dt.datetime.fromtimestamp(seen[0], dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            raise ImportFailed(f"{path} was imported on {when}; use --force to import it again")
        readers = {"csv": self._read_csv, "ndjson": self._read_ndjson, "flask": self._read_flask, "combined": self._read_combined}
        readers[fmt](path)
        self._flush()
        self.store.conn.execute(
            "INSERT INTO imports VALUES (?, ?, ?, ?) ON CONFLICT (fingerprint) DO UPDATE SET rows = excluded.rows, at = excluded.at",
            (fingerprint, os.path.basename(path), self.imported, int(time.time())),
        )
        seconds = time.monotonic() - self._started
        self.progress(
            f"imported {self.imported:,} page views and events from {path} in {seconds:.1f} s ({self.imported / max(seconds, 1e-9):,.0f} rows/s); "
            f"{self.filtered:,} filtered, {self.skipped:,} lines skipped"
        )

    def _read_csv(self, path: str) -> None:
        with open(path, encoding="utf-8", errors="replace", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, [])
            for row in reader:
                self._add_record(dict(zip(header, row)))

    def _read_ndjson(self, path: str) -> None:
        with open(path, encoding="utf-8", errors="replace") as handle:
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
        with open(path, encoding="utf-8", errors="replace") as handle:
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
        self._add(read_record(row, self.config, self.memo, self.site) if row else None, live=False)

    def _add(self, outcome: Outcome, live: bool) -> None:
        """Batch a row as the daemon batches a hit (``place``): an access log's lines are placed in
        visits by visitors of the import's own; an export's rows bring their visits along."""
        item, step = place(outcome, self.visitors if live else None)
        if outcome is None:
            self.skipped += 1
        elif isinstance(outcome, FilteredHit):
            self.filtered += 1
        else:
            self.imported += 1
        if item is not None:
            self.batch.add(item, step)
        if len(self.batch) >= IMPORT_BATCH:
            self._flush()

    def _flush(self) -> None:
        try:
            self.store.write(self.batch)
        except sqlite3.IntegrityError:  # the daemon wrote into the same second meanwhile: ids are recomputed
            self.store.write(self.batch)
        self.batch = Batch()
        now = time.monotonic()
        if now - self._reported >= 1:
            self._reported = now
            self.progress(f"{self.imported:,} rows, {self.imported / (now - self._started):,.0f} rows/s")


FLASK_BROWSERS = {"chrome": "Chrome", "firefox": "Firefox", "safari": "Safari", "edge": "Edge", "msie": "Internet Explorer", "opera": "Opera", "samsungbrowser": "Samsung Internet", "yandex": "Yandex"}
FLASK_BOTS = {"google", "msn", "yahoo", "ask", "aol", "baidu", "bingbot", "googlebot", "yandexbot"}


def parse_log_time(value: str) -> Optional[int]:
    try:
        return in_time_range(int(dt.datetime.strptime(value, "%d/%b/%Y:%H:%M:%S %z").timestamp()))
    except ValueError:
        return None


def unescape_log(value: str) -> str:
    return value.replace('\\"', '"').replace("\\\\", "\\") if value != "-" else ""


SITELESS_FORMATS = {"combined": "an access log", "flask": "a Flask database"}


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
    except OSError as error:
        raise ImportFailed(f"cannot read {path}: {error_reason(error)}") from None
    if not head.strip():
        raise ImportFailed(f"{path} is empty: nothing to import")
    if head.startswith(b"SQLite format 3\x00"):
        detected = "flask"
    elif head.lstrip().startswith(b"{"):
        detected = "ndjson"
    elif head.startswith(b"time,") or b",path," in head.split(b"\n", 1)[0]:
        detected = "csv"
    else:
        detected = "combined"
    fmt = fmt or detected
    lines = head.decode("utf-8", "replace").splitlines()[:100]
    if fmt == "csv" and not {"time", "path"} <= set(next(csv.reader(lines[:1]), [])):
        raise ImportFailed(f"{path} is not a pixeld CSV export (it needs at least the columns time and path)")
    if fmt == "ndjson" and not any(_is_export_object(line) for line in lines):
        raise ImportFailed(f"{path} is not a pixeld NDJSON export (no line is an object with a time)")
    if fmt == "combined" and not any(_COMBINED.match(line) for line in lines):
        raise ImportFailed(f"{path} is not a file pixeld can import: neither an export, a Flask database nor a combined access log")
    return fmt


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
SNIPPET = """<!-- pixeld: privacy-first analytics, no cookies. Both URLs below point at your pixeld server. -->
<script data-pixeld="https://stats.example.org">
(function (w, d, l, n) {
  var c = d.currentScript, u = c.getAttribute("data-pixeld") + "/pixel.gif?", e = encodeURIComponent, k = "pixeld-ignore",
    s, last, seen = 0, since = 0, depth = 0, sent = 0;
  try { s = w.localStorage; } catch (x) { s = {}; }
  if (l.hash == "#" + k) {
    s[k] ? delete s[k] : (s[k] = 1);
    alert("pixeld: this browser is " + (s[k] ? "no longer counted" : "counted again"));
  }
  function off() {
    return s[k] || (!c.hasAttribute("data-local") && (l.protocol == "file:" || /^(localhost|127\\.|\\[::1\\]$)/.test(l.hostname)));
  }
  function hit(q, more) {
    return u + q + "&host=" + e(l.hostname) + more + (n.webdriver ? "&bot=1" : "");
  }
  function url(q) {
    var p = new URLSearchParams(l.search), m = "";
    %CAMPAIGN_PARAMS%.forEach(function (x) { if (p.get(x)) m += "&" + x + "=" + e(p.get(x)); });
    return hit(q, m);
  }
  function send(x) { n.sendBeacon ? n.sendBeacon(x) : (new Image().src = x); }
  function tick() {
    var t = Date.now();
    if (since) seen += t - since;
    since = d.visibilityState == "visible" ? t : 0;
    if (since) depth = Math.max(depth, Math.min(100, Math.round(100 * (scrollY + innerHeight) / d.documentElement.scrollHeight)));
  }
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
  w.pixeld = function (kind, name) {
    if (kind == "event" && !off()) send(url("event=" + e(name) + "&path=" + e(l.pathname)));
  };
  ["pushState", "replaceState"].forEach(function (f) {
    var o = history[f];
    history[f] = function () { var r = o.apply(this, arguments); setTimeout(view); return r; };
  });
  w.addEventListener("popstate", view);
  w.addEventListener("scroll", tick);
  w.addEventListener("pagehide", engage);
  d.addEventListener("visibilitychange", function () { d.hidden ? engage() : tick(); });
  d.addEventListener("click", function (v) {
    var a = v.target.closest("[data-pixeld-event],a[href]"), x = a && a.getAttribute("data-pixeld-event");
    if (x || (a && c.hasAttribute("data-outbound") && a.hostname && a.hostname != l.hostname)) w.pixeld("event", x || "outbound:" + a.hostname);
  }, true);
  d.prerendering ? d.addEventListener("prerenderingchange", view, { once: true }) : view();
})(window, document, location, navigator);
</script>
<noscript><img src="https://stats.example.org/pixel.gif" alt="" width="1" height="1" referrerpolicy="no-referrer-when-downgrade"></noscript>
""".replace("%CAMPAIGN_PARAMS%", json.dumps(CAMPAIGN_PARAMS))  # the snippet passes on what the server takes, and no click id


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
PROXY_HEADERS = ("HTTP_X_FORWARDED_FOR", "HTTP_FORWARDED", "HTTP_X_REAL_IP")
Environ = Dict[str, Any]
StartResponse = Callable[..., Any]
Answer = Tuple[str, List[Tuple[str, str]], Any]  # status, headers, and bytes or a generator of bytes


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
        self.geoip = open_geoip(config.geoip_path) if config.geoip_path else None
        self.writer = Writer(connect(config.db_path, progress=log), config.flush_interval, log, config.keep_days, clock, config.queue_limit)
        self.memo = Memo()
        self.visitors = Visitors(config.rate_limit, on_new_salt=self.memo.clear)
        self._visitors_lock = threading.Lock()
        self.closed = False
        self.started = time.monotonic()
        self._readers = threading.local()
        self.outcomes: Counter = Counter()  # hits since start, by outcome: pageview, event, malformed, or a filter reason
        self.open_connections: Optional[Callable[[], int]] = None  # set by the server that runs the app, if it knows
        self.nonblocking_paths = (DEFAULT_HIT_PATH, config.hit_path)
        self.routes: Dict[str, Callable[[Environ], Answer]] = {
            DEFAULT_HIT_PATH: self.pixel,
            config.hit_path: self.pixel,
            "/report": self.report,
            "/export": self.export,
            "/whoami": self.whoami,
            "/metrics": self.metrics,
            "/healthz": self.healthz,
            "/": self.index,
        }

    def close(self) -> None:
        """Commit everything acknowledged so far and release the database (once; later calls do nothing)."""
        if not self.closed:
            self.closed = True
            self.writer.close()

    def __call__(self, environ: Environ, start_response: StartResponse) -> List[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        route = self.routes.get(environ.get("PATH_INFO", ""))
        if route is None:
            status, headers, body = plain("404 Not Found", "not found")
        elif method not in ("GET", "HEAD") and not (method == "POST" and route == self.pixel):  # sendBeacon POSTs
            status, headers, body = plain("405 Method Not Allowed", "use GET or HEAD")
            headers.append(("Allow", "GET, HEAD"))
        else:
            status, headers, body = route(environ)
        start_response(status, headers)
        if method == "HEAD":
            if not isinstance(body, bytes):
                body.close()  # type: ignore[union-attr]
            return [b""]
        return [body] if isinstance(body, bytes) else body

    def pixel(self, environ: Environ) -> Answer:
        """Record the hit and answer the GIF, whatever the request holds. A dry run (``dry_run=1``)
        from a request allowed to read the report says what the hit would be, and records nothing."""
        if "dry_run=" in environ.get("QUERY_STRING", "") and self.deny_report(environ) is None:
            return plain("200 OK", explain(read_hit(raw_hit(environ, int(self.clock())), self.config, Memo(), self.country_of)))
        try:
            self.record(environ)
        except Exception as error:  # a bug must never break the host page: log one line, still answer
            self.log(f"pixel: could not record a hit: {type(error).__name__}: {error}"[:200])
        return "200 OK", list(GIF_HEADERS), GIF

    def record(self, environ: Environ) -> None:
        """Run the hit through the pipeline; place what counts in its visit and hand it to the writer."""
        outcome = read_hit(raw_hit(environ, int(self.clock()), self.memo), self.config, self.memo, self.country_of)
        with self._visitors_lock:  # the writer must see a visit's page views in the order they were placed
            item, step = place(outcome, self.visitors)
            if item is not None:
                self.writer.submit(item, step)
        self.outcomes[outcome_name(outcome, item)] += 1

    def overloaded(self) -> bool:
        """For the server: stop reading requests until the writer catches up."""
        return self.writer.backlogged()

    def country_of(self, address: Optional[IPAddress]) -> str:
        return lookup_country(self.geoip, address)

    def report(self, environ: Environ) -> Answer:
        """The report, in the format asked for, or HTML when the request prefers it (a browser)."""
        denied = None if self.config.public_report else self.deny_report(environ)
        if denied:
            return denied
        try:
            conn = self.reader()
        except StorageError as error:
            return plain("503 Service Unavailable", str(error))
        try:
            params = parse_query(environ.get("QUERY_STRING", ""))
            if not params.get("format") and prefers_html(environ.get("HTTP_ACCEPT", "")):
                params["format"] = "html"
            request = parse_report_request(params, self.clock(), lambda: first_day_with_data(conn), self.config.zone)
            body, content_type = render_report(conn, request._replace(public=self.config.public_report))
            headers = [("Content-Type", content_type), ("Cache-Control", "no-store"), ("Vary", "Accept")]
            return "200 OK", headers + (PAGE_HEADERS if request.format == "html" else []), body.encode()
        except ReportError as error:
            return plain("400 Bad Request", str(error))
        except sqlite3.Error as error:
            conn.close()
            self._readers.conn = None
            return plain("503 Service Unavailable", f"cannot read the database: {error}")

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
        return "200 OK", [("Content-Type", "text/plain; version=0.0.4; charset=utf-8"), ("Cache-Control", "no-store")], prometheus_text(
            {"hits_total": ("Hits by outcome: page views, events, engagement beacons (unmatched: for no page view remembered), malformed hits, and each filter reason.", {f'outcome="{name}"': n for name, n in sorted(outcomes.items())}),
             "dropped_hits_total": ("Hits dropped because the database could not take them.", self.writer.dropped)},
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
WORKERS = 4
SEND_TIMEOUT = 10.0
ERROR_STATUSES = {
    "400": "400 Bad Request", "500": "500 Internal Server Error", "408": "408 Request Timeout", "414": "414 URI Too Long",
    "431": "431 Request Header Fields Too Large", "501": "501 Not Implemented", "505": "505 HTTP Version Not Supported",
}


class BadRequest(Exception):
    """A request the server answers itself, with this status, before the app sees it."""


class Connection:
    __slots__ = ("sock", "peer", "buffer", "deadline")

    def __init__(self, sock: socket.socket, peer: Any) -> None:
        self.sock = sock
        self.peer = peer
        self.buffer = b""
        self.deadline = 0.0


class Request(NamedTuple):
    environ: Environ
    keep_alive: bool


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
    if environ.get("CONTENT_LENGTH", "0") not in ("", "0") or "HTTP_TRANSFER_ENCODING" in environ:
        keep_alive = False  # bodies are not read: the connection ends with this request
    return Request(environ, keep_alive)


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
    environ = {**INLINE_ENVIRON, "wsgi.input": io.BytesIO(), **request.environ}
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
        return io.BytesIO()

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


class Server:
    """An HTTP/1.1 server for a WSGI app, built to face the open internet on a small machine.

    One thread owns every socket: it accepts, reads and parses requests without blocking, so idle
    and slow clients cost a socket, never a thread. Each connection must deliver a complete
    request within ``request_timeout`` seconds (a total deadline, not a per-read timeout), and
    request lines and headers are capped. When connections reach the cap (kept below the open-file
    limit) or ``accept`` fails for lack of file descriptors, the longest-waiting idle connection is
    closed. Paths the app declares non-blocking (the pixel) are answered on this thread, keeping the
    hot path free of hand-offs; everything else runs on a small pool of worker threads. Keep-alive,
    ``TCP_NODELAY``, and one send per response.
    """

    def __init__(self, app: Any, host: str, port: int, log: Callable[[str], None], request_timeout: float = 10.0, workers: int = WORKERS) -> None:
        self.app = app
        self.log = log
        self.request_timeout = request_timeout
        self.inline_paths = frozenset(getattr(app, "nonblocking_paths", ()))
        self.overloaded: Callable[[], bool] = getattr(app, "overloaded", lambda: False)
        self.listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind((host, port))
            self.listener.listen(1024)
        except OSError:
            self.listener.close()
            raise
        self.listener.setblocking(False)
        self.address = self.listener.getsockname()[:2]
        self.max_connections = connection_limit()
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
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
        self.workers = [threading.Thread(target=self._work, name=f"pixeld-worker-{n}", daemon=True) for n in range(workers)]
        for worker in self.workers:
            worker.start()

    def serve(self, stopping: threading.Event, heartbeat: Callable[[], None]) -> None:
        """Serve until ``stopping`` is set; ``heartbeat`` runs every quarter second from this loop."""
        swept = 0.0
        while not stopping.is_set():
            if self.overloaded():
                self._hold(stopping, heartbeat)
            for key, _ in self.selector.select(timeout=0.25):
                if key.fileobj is self.listener:
                    self._accept()
                elif key.fileobj is self.wake_reader:
                    self._take_back()
                else:
                    self._read(key.data)
            now = time.monotonic()
            if now - swept >= 0.25:  # deadlines, paused accepting and the heartbeat need no finer grain
                swept = now
                self._expire(now)
                if self.accept_paused_until and now >= self.accept_paused_until:
                    self.accept_paused_until = 0.0
                    self.selector.register(self.listener, selectors.EVENT_READ)
                heartbeat()
        self._shut_down()

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
            self._serve_buffered(Connection(sock, peer))

    def _make_room(self, pause: bool) -> None:
        """Close the longest-waiting idle connection; out of descriptors with none idle, pause accepting."""
        if self.waiting:
            self._close(next(iter(self.waiting.values())))
        elif pause and not self.accept_paused_until:
            self.selector.unregister(self.listener)
            self.accept_paused_until = time.monotonic() + 0.1

    def _read(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
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
            head, conn.buffer = conn.buffer[:end], conn.buffer[end + 4 :]
            try:
                request = parse_request(head, conn.peer, self.address)
            except BadRequest as error:
                self._reject(conn, str(error))
                return
            if request.environ["PATH_INFO"] not in self.inline_paths:
                self._unwait(conn)
                self.busy += 1
                self.jobs.put((conn, request, b""))
                return
            if not self._answer_here(conn, request):
                return
            self._unwait_keep_registered(conn)

    @staticmethod
    def _incomplete_request_error(buffer: bytes) -> str:
        line_end = buffer.find(b"\r\n")
        if (line_end < 0 and len(buffer) > MAX_REQUEST_LINE) or line_end > MAX_REQUEST_LINE:
            return "414"
        return "431" if len(buffer) > MAX_REQUEST_LINE + MAX_HEADER_BYTES else ""

    def _answer_here(self, conn: Connection, request: Request) -> bool:
        """Answer a non-blocking request on this thread; True when the connection stays with us."""
        data, keep_alive = answer_directly(self.app, request, self.log)
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(conn)
            return False
        if sent < len(data):  # the client is not reading: a worker finishes the send, with a timeout, and closes
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
        """Stop accepting, drop idle connections, give the workers a few seconds to finish.

        Every pixel hit was answered (and handed to the writer) on this thread, so nothing that
        was acknowledged waits on a worker: a long export to a slow client must not hold up the
        final flush until systemd loses patience. Workers are daemon threads; they end with us."""
        self.listener_closed = True
        if not self.accept_paused_until:
            self.selector.unregister(self.listener)
        self.listener.close()
        for conn in list(self.waiting.values()):
            self._close(conn)
        deadline = time.monotonic() + grace
        while self.busy and time.monotonic() < deadline:
            self._take_back()
            time.sleep(0.02)
        for _ in self.workers:
            self.jobs.put(None)
        self.selector.close()
        self.wake_reader.close()
        self.wake_writer.close()


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


def make_server(config: Config, app: App, log: Callable[[str], None]) -> Server:
    try:
        return Server(app, config.host, config.port, log, config.request_timeout)
    except OSError as error:
        raise ConfigError(f"cannot listen on {format_address(config.host, config.port)}: {error_reason(error)}") from None


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def serve(config: Config, log: Callable[[str], None]) -> None:
    """Run until SIGTERM or SIGINT, then stop accepting, finish requests and flush every hit."""
    sys.setswitchinterval(SWITCH_INTERVAL)
    app = App(config, log=log)
    try:
        server = make_server(config, app, log)
    except ConfigError:
        app.close()
        raise
    app.open_connections = lambda: len(server.waiting) + server.busy
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    log(
        f"version {__version__} listening on http://{format_address(*server.address)}, "
        f"database {os.path.abspath(config.db_path)}, GeoIP {'on' if config.geoip_path else 'off'}, "
        f"trusted proxies {', '.join(map(str, config.trusted_proxies)) or 'none'}, "
        f"report {'public' if config.public_report else 'by token' if config.token else 'from loopback only'}"
    )
    notify(f"READY=1\nSTATUS=listening on {format_address(*server.address)}")
    server.serve(stopping, heartbeat(app))
    notify("STOPPING=1\nSTATUS=saving the last page views")
    app.close()
    log("stopped; every page view is saved")


SWITCH_INTERVAL = 0.001  # how long the writer may hold the interpreter while the serve loop waits (Python's default: 5 ms)
GC_FREEZE_INTERVAL = 0.25  # seconds between moving long-lived objects out of the garbage collector's way
GC_FULL_INTERVAL = DAY  # a full collection, for the rare cycle, once a day


def heartbeat(app: App) -> Callable[[], None]:
    """Called from the serve loop: pings the systemd watchdog, so a wedged loop gets restarted, keeps
    systemd's status line current, and keeps the garbage collector short.

    Python's full collections walk every tracked object in the middle of serving: the memo's
    entries, and the hits waiting for the writer (a full collection took up to 60 ms under load).
    Frozen, they are skipped; reference counting still frees them, and a full collection runs
    from here once a day."""
    interval = watchdog_interval()
    last = [0.0, ""]
    collected = {"young": time.monotonic(), "full": time.monotonic()}

    def beat() -> None:
        now = time.monotonic()
        if now - collected["full"] >= GC_FULL_INTERVAL:
            collected["full"] = now
            gc.unfreeze()
            gc.collect()
        if now - collected["young"] >= GC_FREEZE_INTERVAL:
            collected["young"] = now
            gc.freeze()  # a constant-time move; the young generation's own collections stay small
        if interval and now - last[0] >= interval:
            last[0] = now
            notify("WATCHDOG=1")
        status = app.writer.status()
        if status != last[1]:
            last[1] = status
            notify(f"STATUS={status}")

    return beat


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
    "timezone": "PIXELD_TIMEZONE",
    "keep_days": "PIXELD_KEEP_DAYS",
    "request_timeout": "PIXELD_REQUEST_TIMEOUT",
    "queue_limit": "PIXELD_QUEUE_LIMIT",
    "hit_path": "PIXELD_HIT_PATH",
    "public_report": "PIXELD_PUBLIC_REPORT",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pixeld.py", description="Privacy-first web analytics in one file.")
    parser.add_argument("--version", action="version", version=f"pixeld {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    add_serve_options(commands.add_parser("serve", help="run the daemon (the default)", description="Run the pixeld daemon."))

    report_cmd = commands.add_parser("report", help="print the report from the database file", description="Print the report straight from the database, also while the daemon runs.")
    add_db_option(report_cmd, "read-only")
    add_env_file_option(report_cmd)
    add_range_options(report_cmd)
    for name in FILTERS:
        report_cmd.add_argument(f"--{name}", default="", help=f"only page views with this {name}" + (" (a trailing * matches a prefix)" if name in ("path", "referrer") else ""))
    report_cmd.add_argument("--limit", default="", help="rows per section (default 10 in text, all in json and csv)")
    report_cmd.add_argument("--group", default="", choices=("", *GRAINS), metavar="GRAIN", help="the series per hour, day, week or month (default: by the range)")
    report_cmd.add_argument("--section", default="", help="one section in full: " + ", ".join(SECTION_TITLES))
    report_cmd.add_argument("--ascii", nargs="?", const="1", default="", metavar="1", help="bars of # and changes as +12%% for terminals without Unicode (ascii=1)")
    report_cmd.add_argument("--format", default="text", choices=tuple(CONTENT_TYPES))

    export_cmd = commands.add_parser("export", help="write stored page views as CSV or NDJSON", description="Write the stored page views (they carry no identifiers) to standard output.")
    add_db_option(export_cmd, "read-only")
    add_env_file_option(export_cmd)
    add_range_options(export_cmd, default="everything")
    export_cmd.add_argument("--format", default="csv", choices=("csv", "ndjson"))

    import_cmd = commands.add_parser("import", help="bring page views in from a file", description="Import page views: pixeld's own export, the 2020 Flask tool's database, or a combined access log.")
    import_cmd.add_argument("file")
    add_db_option(import_cmd, "created if missing")
    add_env_file_option(import_cmd)
    import_cmd.add_argument("--format", default="", choices=("csv", "ndjson", "flask", "combined"), help="the file's kind (default: detected)")
    add_filter_options(import_cmd, " The first is the host of rows that name none (Flask database, access logs).")
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
    return parser


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
    command.add_argument("--request-timeout", metavar="SECONDS", help="time a client has to send a whole request (default 10) [$PIXELD_REQUEST_TIMEOUT]")
    command.add_argument("--queue-limit", metavar="N", help="hits held in memory while the database cannot take them; more are dropped and counted (default 100000) [$PIXELD_QUEUE_LIMIT]")
    command.add_argument("--hit-path", metavar="PATH", help="serve the hit endpoint at this path as well as /pixel.gif, like /hit (see Content blockers) [$PIXELD_HIT_PATH]")
    command.add_argument("--public-report", action="store_true", default=None, help="anyone may read /report (never /export); set to 1 [$PIXELD_PUBLIC_REPORT]")
    command.add_argument("--keep-days", metavar="N", help="delete single page views older than N days, daily; counts stay (default: keep all) [$PIXELD_KEEP_DAYS]")


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
        public_report=str(setting(args, "public_report", environ, "")).lower() in ("1", "true", "yes", "on"),
    )


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
        request = parse_report_request(command_params(args, names), time.time(), lambda: first_day_with_data(conn), command_zone(args, environ))
        width = shutil.get_terminal_size((WIDTH, 24)).columns if sys.stdout.isatty() else WIDTH
        body, _ = render_report(conn, request, max(60, width))
    except sqlite3.Error as error:
        raise StorageError(f"cannot read the database: {error}") from None
    finally:
        conn.close()
    sys.stdout.write(body)


def run_export(args: argparse.Namespace, environ: Dict[str, str]) -> None:
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


Finding = Tuple[str, str]  # (ok, warn or fail; what was found)


def run_doctor(args: argparse.Namespace, environ: Dict[str, str]) -> int:
    """``pixeld.py doctor``: one line per check; exit status 1 when any fails."""
    db_path = setting(args, "db", environ, DEFAULT_DB)
    findings = [
        *doctor_settings(args, environ), *doctor_database(db_path), doctor_directory(db_path), doctor_token(args, environ),
        doctor_geoip(setting(args, "geoip", environ, "")), doctor_zone(setting(args, "timezone", environ, "UTC")),
    ]
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


def doctor_daemon(url: str, token: str) -> List[Finding]:
    """Ask a running daemon: /healthz, then /whoami with the token, which shows what it concludes about us."""
    import urllib.error
    import urllib.request

    def get(path: str) -> Tuple[int, str]:
        request = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {token}"} if token else {})
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
    return findings + [("warn" if warned else "ok", f"{url}/whoami: " + "; ".join(lines))]


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


def main(argv: Optional[List[str]] = None, environ: Optional[Dict[str, str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    environ = dict(os.environ) if environ is None else environ
    args = build_parser().parse_args(argv or ["serve"])
    commands = {"report": run_report, "export": run_export, "import": run_import, "backup": run_backup, "check": run_check, "doctor": run_doctor}
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
    except (ConfigError, StorageError, ReportError, ImportFailed) as error:
        print(f"pixeld: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
