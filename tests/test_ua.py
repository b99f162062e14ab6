"""The user-agent reducer: names, major versions, operating systems, device classes and bots."""

import pytest

import pixeld
from pixeld import UserAgent, classify_user_agent

BROWSERS = [
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
     UserAgent("Chrome", "131", "Windows", "desktop")),
    ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.6 Safari/605.1.15",
     UserAgent("Safari", "17", "macOS", "desktop")),
    ("Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
     UserAgent("Firefox", "133", "Linux", "desktop")),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36 Edg/131.0.2903.70",
     UserAgent("Edge", "131", "Windows", "desktop")),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0.0.0 Safari/537.36 OPR/115.0.0.0",
     UserAgent("Opera", "115", "Windows", "desktop")),
    ("Mozilla/5.0 (X11; CrOS x86_64 14541.0.0) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
     UserAgent("Chrome", "131", "ChromeOS", "desktop")),
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
     UserAgent("Safari", "17", "iOS", "phone")),
    ("Mozilla/5.0 (iPad; CPU OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
     UserAgent("Safari", "17", "iOS", "tablet")),
    # Chrome, Firefox and Edge on iOS are themselves, not Safari.
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) CriOS/131.0.6778.73 Mobile/15E148 Safari/604.1",
     UserAgent("Chrome", "131", "iOS", "phone")),
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) FxiOS/133.0 Mobile/15E148 Safari/605.1.15",
     UserAgent("Firefox", "133", "iOS", "phone")),
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.0 EdgiOS/131.2903.68 Mobile/15E148 Safari/605.1.15",
     UserAgent("Edge", "131", "iOS", "phone")),
    # An in-app web view on iOS has no Safari token but is Safari's engine.
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
     UserAgent("Safari", "", "iOS", "phone")),
    ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.6778.81 Mobile Safari/537.36",
     UserAgent("Chrome", "131", "Android", "phone")),
    # Android WebView is Chrome.
    ("Mozilla/5.0 (Linux; Android 13; SM-A536B Build/TP1A.220624.014; wv) AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 Chrome/130.0.6723.107 Mobile Safari/537.36",
     UserAgent("Chrome", "130", "Android", "phone")),
    ("Mozilla/5.0 (Linux; Android 14; SM-X710) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
     UserAgent("Chrome", "131", "Android", "tablet")),
    ("Mozilla/5.0 (Linux; Android 14; SAMSUNG SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) SamsungBrowser/26.0 Chrome/122.0.0.0 Mobile Safari/537.36",
     UserAgent("Samsung Internet", "26", "Android", "phone")),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/128.0.0.0 YaBrowser/24.10.0.0 Safari/537.36",
     UserAgent("Yandex", "24", "Windows", "desktop")),
    ("Mozilla/5.0 (Linux; U; Android 13; en-US; SM-G988U Build/TP1A.220624.014) AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 Chrome/123.0.6312.80 UCBrowser/15.0.7.1383 Mobile Safari/537.36",
     UserAgent("UC Browser", "15", "Android", "phone")),
    ("Mozilla/5.0 (Android 14; Mobile; rv:133.0) Gecko/133.0 Firefox/133.0",
     UserAgent("Firefox", "133", "Android", "phone")),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64; Trident/7.0; rv:11.0) like Gecko",
     UserAgent("Internet Explorer", "11", "Windows", "desktop")),
    ("Mozilla/5.0 (Web0S; Linux/SmartTV) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/94.0.4606.128 Safari/537.36",
     UserAgent("Chrome", "94", "Linux", "other")),
]


@pytest.mark.parametrize("ua, expected", BROWSERS, ids=[e.browser + "/" + e.os + "/" + e.device for _, e in BROWSERS])
def test_browsers(ua, expected):
    assert classify_user_agent(ua) == expected


BOTS = [
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; Googlebot/2.1; +http://www.google.com/bot.html) Chrome/131.0.6778.69 Safari/537.36",
    "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
    "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; GPTBot/1.2; +https://openai.com/gptbot)",
    "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; ClaudeBot/1.0; +claudebot@anthropic.com)",
    "facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)",
    "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)",
    "Mozilla/5.0+(compatible; UptimeRobot/2.0; http://www.uptimerobot.com/)",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/131.0.0.0 Safari/537.36",
    "curl/8.5.0",
    "python-requests/2.32.3",
    "Go-http-client/1.1",
    "Wget/1.21.4",
    "okhttp/4.12.0",
    "Mozilla/5.0 (compatible; YandexBot/3.0; +http://yandex.com/bots)",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/13.1.1 Safari/605.1.15 (Applebot/0.1; +http://www.apple.com/go/applebot)",
    "TelegramBot (like TwitterBot)",
    "WhatsApp/2.23.20.0",
    "Twitterbot/1.0",
    "",
    "   ",
    "Mozilla/5.0",
]


@pytest.mark.parametrize("ua", BOTS)
def test_bots(ua):
    assert classify_user_agent(ua).device == "bot"


def test_bot_names_are_short_labels():
    assert classify_user_agent(BOTS[0]).browser == "Googlebot"
    assert classify_user_agent("curl/8.5.0").browser == "curl"


def test_garbage_gets_an_answer():
    for ua in ("\x00\x01\x02", "Mozilla/5.0 (" * 500, "é" * 5000, "Mozilla/5.0 (Unknown; rv:1) Thing/1"):
        agent = classify_user_agent(ua)
        assert agent.device in ("desktop", "phone", "tablet", "bot", "other")


def test_repeated_user_agents_are_cached_in_a_bounded_memo():
    calls = []

    def counted(ua):
        calls.append(ua)
        return classify_user_agent(ua)

    memo = pixeld.Memo(limit=2)
    for _ in range(3):
        assert memo(counted, BROWSERS[0][0]) == BROWSERS[0][1]
    assert len(calls) == 1
    memo(counted, "a"), memo(counted, "b"), memo(counted, "c")
    assert memo.size() <= 2
