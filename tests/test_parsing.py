"""Request parsing and normalisation: paths, titles, hosts, referrers, screens, languages, client addresses."""

import ipaddress

import pytest

import pixeld
from pixeld import LOOPBACK_NETWORKS


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("/", "/"),
        ("/blog/post", "/blog/post"),
        ("/blog/post?utm_source=x&id=3", "/blog/post"),
        ("/blog/post#comments", "/blog/post"),
        ("/caf%C3%A9", "/café"),  # what location.pathname holds, decoded once
        ("/100%25", "/100%"),  # decoded once, not twice
        ("/a%3Fb", "/a?b"),  # an encoded ? is part of the path, not a query
        ("https://example.org/x/y?z=1#f", "/x/y"),
        ("no-slash", "/no-slash"),
        ("", "/"),
        ("/with\x00nul\x1fand\x7fcontrols", "/with nul and controls"),
        ("/" + "a" * 5000, "/" + "a" * 2047),
        ("/%ff%fe", "/\ufffd\ufffd"),
    ],
)
def test_normalise_path(raw, expected):
    assert pixeld.normalise_path(raw) == expected


def test_title_is_cleaned_and_cut():
    assert pixeld.normalise_title("  Hello\n\tworld  ") == "Hello world"
    assert len(pixeld.normalise_title("x" * 1000)) == 512
    assert pixeld.normalise_title("\x00\x01") == ""
    assert pixeld.normalise_title("evil\u202egnp.exe") == "evil gnp.exe"  # no bidi override reaches the report


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("example.org", "example.org"),
        ("WWW.Example.ORG", "example.org"),
        ("example.org:8080", "example.org"),
        ("blog.example.org.", "blog.example.org"),
        ("[::1]:8000", "[::1]"),
        ("exa mple.org", ""),
        ("<script>", ""),
        ("a" * 300, ""),
        ("", ""),
    ],
)
def test_normalise_host(raw, expected):
    assert pixeld.normalise_host(raw) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("https://www.google.com/", "google.com"),
        ("https://news.ycombinator.com/item?id=123", "news.ycombinator.com/item"),
        ("http://Blog.Other.net/2024/01/post/#top", "blog.other.net/2024/01/post"),
        ("https://example.org/previous-page", ""),  # internal navigation
        ("https://www.example.org/", ""),  # the site itself, www. folded
        ("android-app://com.google.android.gm/", "com.google.android.gm"),
        ("", ""),
        ("not a url", ""),
        ("http://[::1", ""),
        ("http://host:99999999/", ""),
    ],
)
def test_normalise_referrer(raw, expected):
    assert pixeld.normalise_referrer(raw, "example.org") == expected


@pytest.mark.parametrize(
    "raw, expected",
    [("1920,1080", "1920x1080"), ("390x844", "390x844"), ("0,100", ""), ("100001,5", ""), ("abc", ""), ("", ""), ("1920,", ""), ("-1,5", ""),
     ("1280", "1280"), ("1280,0", ""), ("0", "")],  # GoatCounter keeps a width alone: it stays a width
)
def test_normalise_screen(raw, expected):
    assert pixeld.normalise_screen(raw) == expected


@pytest.mark.parametrize(
    "header, expected",
    [
        ("de-DE,de;q=0.9,en;q=0.8", "de"),
        ("en-US", "en"),
        ("fr;q=0.5, pt-BR;q=0.9", "pt"),
        ("*", ""),
        ("", ""),
        ("garbage;;;q=xyz", ""),
        ("zh-Hant-TW", "zh"),
        ("x" * 10000, ""),
    ],
)
def test_primary_language(header, expected):
    assert pixeld.primary_language(header) == expected


def test_parse_query_survives_bad_encoding():
    params = pixeld.parse_query("path=%ff%fe&title=%E2%82&x&resolution=1,2&path=/second")
    assert params["path"] == "\ufffd\ufffd"
    assert params["resolution"] == "1,2"
    assert params["x"] == ""


TRUSTED = LOOPBACK_NETWORKS + (ipaddress.ip_network("10.0.0.0/8"),)


@pytest.mark.parametrize(
    "peer, xff, forwarded, expected",
    [
        ("203.0.113.9", "", "", "203.0.113.9"),
        ("203.0.113.9", "6.6.6.6", "", "203.0.113.9"),  # untrusted peer: its headers are ignored
        ("127.0.0.1", "198.51.100.7", "", "198.51.100.7"),
        ("127.0.0.1", "6.6.6.6, 198.51.100.7", "", "198.51.100.7"),  # a spoofed hop on the left is skipped
        ("127.0.0.1", "198.51.100.7, 10.1.2.3", "", "198.51.100.7"),  # trusted hops on the right are skipped
        ("127.0.0.1", "garbage, 198.51.100.7", "", "198.51.100.7"),
        ("127.0.0.1", "198.51.100.7, garbage", "", "127.0.0.1"),  # garbage where the proxy wrote: the peer
        ("127.0.0.1", "", 'for=192.0.2.60;proto=https, for="[2001:db8::1]:4711"', "2001:db8::1"),
        ("127.0.0.1", "", "for=unknown", "127.0.0.1"),
        ("::ffff:127.0.0.1", "198.51.100.7", "", "198.51.100.7"),  # IPv4-mapped loopback is loopback
        ("127.0.0.1", "198.51.100.7:5555", "", "198.51.100.7"),
        ("not-an-ip", "198.51.100.7", "", None),
    ],
)
def test_client_address(peer, xff, forwarded, expected):
    address = pixeld.client_address(peer, xff, forwarded, TRUSTED)
    assert (str(address) if address else None) == expected


def test_client_address_with_no_trusted_proxies_ignores_headers():
    assert str(pixeld.client_address("127.0.0.1", "198.51.100.7", "", ())) == "127.0.0.1"
