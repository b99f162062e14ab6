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


# Real readers whose UA holds a bot-like word, in-app browsers, and apps: written from each vendor's
# documented format, not taken from any corpus.
READERS = [
    ("Mozilla/5.0 (Linux; Android 9; CUBOT J9 Build/PPR1.180610.011; wv) AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 Chrome/93.0.4577.82 Mobile Safari/537.36",
     UserAgent("Chrome", "93", "Android", "phone")),
    ("Mozilla/5.0 (Linux; Android 10; CUBOT_X30) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.6099.144 Mobile Safari/537.36",
     UserAgent("Chrome", "120", "Android", "phone")),
    ("Mozilla/5.0 (Linux; Android 12; SM-A525F) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/114.0.5735.196 YaBrowser/23.7.1.69 (lite) YaApp_Android/23.71.1 YaSearchBrowser/23.71.1 BroPP/1.0 SA/3 Mobile Safari/537.36",
     UserAgent("Yandex", "23", "Android", "phone")),
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 16_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/16.0 YandexSearch/23.71.2 Mobile/15E148 Safari/605.1.15",
     UserAgent("Yandex", "23", "iOS", "phone")),
    ("Mozilla/5.0 (Linux; Android 13; SM-G991B; wv) AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 Chrome/119.0.6045.163 Mobile Safari/537.36 OPR/79.1.4195.76563",
     UserAgent("Opera", "79", "Android", "phone")),
    ("Mozilla/5.0 (Linux; Android 13; Pixel 7 Build/TQ3A.230805.001; wv) AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 Chrome/116.0.5845.163 Mobile Safari/537.36",
     UserAgent("Chrome", "116", "Android", "phone")),
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/21B74 [FBAN/FBIOS;FBAV/442.0.0.37.104;FBDV/iPhone15,2;FBMD/iPhone;FBSN/iOS;FBSV/17.1;FBSS/3;FBCR/;FBID/phone;FBLC/en_US;FBOP/5]",
     UserAgent("Facebook", "442", "iOS", "phone")),
    ("[FBAN/FBIOS;FBAV/442.0.0.37.104;FBDV/iPhone15,2;FBMD/iPhone;FBSN/iOS;FBSV/17.1]", UserAgent("Facebook", "442", "iOS", "phone")),
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/21B74 [FBAN/FBIOS;FBAV/442.0.0.37.104;FBDV/iPhone15,2;FBMD/iPhone;FBSN/iOS;FBSV/17.1;FBSS/3;FBCR/Telekom.de;FBID/phone;FBLC/de_DE;FBOP/5]",
     UserAgent("Facebook", "442", "iOS", "phone")),  # a carrier's domain name is no sign of a machine
    ("Mozilla/5.0 (Linux; Android 13; Pixel 7 Build/TQ3A.230805.001; wv) AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 Chrome/116.0.5845.163 Mobile Safari/537.36 [FB_IAB/FB4A;FBAV/430.0.0.23.113;]",
     UserAgent("Facebook", "430", "Android", "phone")),
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 16_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148 Instagram 295.0.0.32.119 (iPhone14,5; iOS 16_6; en_US; en; scale=3.00; 1170x2532; 500160174)",
     UserAgent("Instagram", "295", "iOS", "phone")),
    ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.6099.230 Mobile Safari/537.36 Telegram-Android/10.6.1 (Google Pixel 8; Android 14; SDK 34; HIGH)",
     UserAgent("Chrome", "120", "Android", "phone")),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) discord/1.0.9028 Chrome/120.0.6099.291 Electron/28.2.10 Safari/537.36",
     UserAgent("Chrome", "120", "Windows", "desktop")),
    ("MyReader/1.2.3 CFNetwork/1408.0.4 Darwin/22.5.0", UserAgent("", "", "iOS", "phone")),
    ("NetNewsWire/6.1 CFNetwork/1410.0.3 Darwin/22.6.0 (x86_64)", UserAgent("", "", "macOS", "desktop")),
    ("Mozilla/5.0 (Windows; U; Windows NT 6.1; en-US; rv:1.9.2.13) Gecko/20101203 Firefox/3.6.13 (.NET CLR 3.5.30729)",
     UserAgent("Firefox", "3", "Windows", "desktop")),  # ".NET" is no domain name
    ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_3) AppleWebKit/537.36 (KHTML, like Gecko) Brave Chrome/80.0.3987.87 Safari/537.36",
     UserAgent("Brave", "80", "macOS", "desktop")),  # old Brave: its name bare before Chrome/
    ("HTC_Touch Mozilla/4.0 (compatible; MSIE 6.0; Windows CE; IEMobile 7.11)", UserAgent("Internet Explorer", "6", "Windows", "phone")),  # a phone's model first
    ("Mozilla/4.0 (compatible; Elaine/2.0; RIM950)", UserAgent("", "", "", "other")),  # an early BlackBerry (RIM) in "compatible"
    ("Mozilla/5.0 (Ubuntu; X11; Linux x86_64; rv:8.0) Gecko/20100101 Firefox/8.0", UserAgent("Firefox", "8", "Linux", "desktop")),  # Ubuntu's, 2011
]
OTHER_DEVICES = [  # TVs, boxes, consoles and cars are "other"
    "Mozilla/5.0 (Linux; Android 9; BRAVIA 4K GB ATV3 Build/PTT1.190515.001.S52) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/110.0.5481.65 Mobile Safari/537.36",
    "Mozilla/5.0 (SMART-TV; Linux; Tizen 6.0) AppleWebKit/537.36 (KHTML, like Gecko) SamsungBrowser/4.0 Chrome/76.0.3809.146 TV Safari/537.36",
    "Mozilla/5.0 (Linux; Android 9; AFTMM Build/PS7633.3445N; wv) AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 Chrome/120.0.6099.230 Mobile Safari/537.36",
    "Mozilla/5.0 (PlayStation; PlayStation 5/2.26) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/13.0 Safari/605.1.15",
    "Mozilla/5.0 (X11; GNU/Linux) AppleWebKit/537.36 (KHTML, like Gecko) Chromium/79.0.3945.130 Chrome/79.0.3945.130 Safari/537.36 Tesla/2020.16.2.1-e99c70fff409",
    "Mozilla/5.0 (SMART-TV; X11; Linux armv7l) AppleWebKit/537.42 (KHTML, like Gecko) Chromium/25.0.1349.2 Chrome/25.0.1349.2 Safari/537.42",
]
TABLETS = [
    "Mozilla/5.0 (Linux; Android 13; SM-X700) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Linux; Android 13; SM-X700) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Linux; Android 12; Lenovo TB-J606F) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/119.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Linux; Android 11; KFTRWI) AppleWebKit/537.36 (KHTML, like Gecko) Silk/120.3.1 like Chrome/120.0.6099.230 Safari/537.36",
    "Mozilla/5.0 (Linux; Android 13; Redmi Pad SE) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Mobile Safari/537.36",
]
GENERIC_BOTS = [  # no name pixeld knows: the generic signs of a machine
    "Mozilla/5.0 (compatible; ExampleCrawler/1.0)",
    "Mozilla/5.0 (compatible; LinkFetcher/2.0; +https://fetcher.example.net/about)",
    "SiteMonitor/3.1 (ops@monitoring.example)",
    "Acme HTTP Client/1.0",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36 (compatible; ContextAnalyzer/1.0)",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36 AdVerifyScanner/2.4",
    "Mozilla/5.0 (compatible; PreviewMaker; +http://preview.example.org)",
    "TelegramBot (like TwitterBot)",
    "Mozilla/5.0 (compatible; Discordbot/2.0; +https://discordapp.com)",
    "Mozilla/5.0 (compatible; YandexBot/3.0; +http://yandex.com/bots)",
    "Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.6099.216 Mobile Safari/537.36 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Some Service Agent",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko, Quaxo) Chrome/120.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36 Acme-User/1.0",  # an AI assistant's fetch for a user
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36 Acme-Robots/2.0",
    "Mozilla/5.0 (compatible; MSIE 9.0; Windows NT 6.1; Trident/5.0; SiteInsights)",
    "Mozilla/3.0 (compatible; PageCapture 1.0; Windows)",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36 ConsentVerify/1.0",
    "Mozilla/5.0 (reader.example.co; Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",  # a service's domain
    "Mozilla/5.0 (X11; Linux x86_64) Pages.example.io/2.0 AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    "Acme (Beta 2; GNU/Linux)",  # a platform but no product with a version
    "AcmeConnector/1.0 (Linux)",  # a product with a desktop OS alone: no browser
    "Mozilla/5.0 (X11; U; Acme 7.0)",  # a desktop platform and no engine after it
    "Acme_Daily/1.0 Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",  # desktop browsers start with Mozilla/5.0
    "Mozilla/5.0 (Acme; Windows NT 10.0; Win64; x64; rv:128.0) Gecko/20100101 Firefox/128.0",  # a name before the platform
    "Mozilla/4.0 (compatible; MSIE 7.0; Windows NT) Acme/1.0",  # Windows without its version
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/602.1 (KHTML, like Gecko) acme Version/10.0 Safari/602.1",  # a bare name after (KHTML, like Gecko)
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) ACME Chrome/131.0.0.0 Safari/537.36",
]


@pytest.mark.parametrize("ua, expected", READERS)
def test_readers_and_apps_are_not_bots(ua, expected):
    assert classify_user_agent(ua) == expected


def test_an_old_konqueror_keeps_its_safari_inside_khtml_and_is_no_bot():
    ua = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/534.34 (KHTML, like Gecko, Safari/534.34) konqueror/4.14"
    assert classify_user_agent(ua).device == "desktop"


@pytest.mark.parametrize("ua", OTHER_DEVICES)
def test_tvs_boxes_consoles_and_cars_are_other(ua):
    assert classify_user_agent(ua).device == "other"


@pytest.mark.parametrize("ua", TABLETS)
def test_tablets_by_model_and_by_the_missing_mobile_token(ua):
    assert classify_user_agent(ua).device == "tablet"


@pytest.mark.parametrize("ua", GENERIC_BOTS)
def test_generic_bot_markers(ua):
    assert classify_user_agent(ua).device == "bot"


# Real clients that were taken for bots or for the wrong device, one kind per line of the issue; each
# written here from the vendor's documented format (model names invented or generic).
REAL_TRAFFIC = [
    # Office for Mac names macOS as "Mac OS/<version>".
    ("Microsoft Office/16.0 (Macintosh; Mac OS/11.1; Microsoft Word 16.44)", UserAgent("", "", "macOS", "desktop")),
    ("Microsoft-MacOutlook/16.81.0 (Mac OS/13.6; Build/16.81.0)", UserAgent("", "", "macOS", "desktop")),
    # Android on laptops and Chromebooks: no "Mobile" and a laptop's model.
    ("Mozilla/5.0 (Linux; Android 11; HP EliteBook x360 1040 G8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
     UserAgent("Chrome", "120", "Android", "desktop")),
    ("Mozilla/5.0 (Linux; Android 9; Latitude 5400) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/118.0.0.0 Safari/537.36",
     UserAgent("Chrome", "118", "Android", "desktop")),
    ("Mozilla/5.0 (Linux; Android 11; Inspiron 14 5410) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/118.0.0.0 Safari/537.36",
     UserAgent("Chrome", "118", "Android", "desktop")),
    ("Mozilla/5.0 (Linux; Android 11; Acme Chromebook 14 Build/RP1A.201005.004; wv) AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 Chrome/119.0.6045.163 Safari/537.36",
     UserAgent("Chrome", "119", "ChromeOS", "desktop")),
    # Apps on phones send no "Mobile": the phone's model says phone; a tablet's model says tablet even with "Mobile".
    ("Dalvik/2.1.0 (Linux; U; Android 13; SM-S911B Build/TP1A.220624.014)", UserAgent("", "", "Android", "phone")),
    ("Dalvik/2.1.0 (Linux; U; Android 14; Pixel 8 Build/AP1A.240305.019)", UserAgent("", "", "Android", "phone")),
    ("Mozilla/5.0 (Linux; Android 12; SM-G998B Build/SP1A.210812.016; wv) AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 Chrome/119.0.6045.163 Safari/537.36 AcmeNews/5.2",
     UserAgent("Chrome", "119", "Android", "phone")),
    ("Dalvik/2.1.0 (Linux; U; Android 13; SM-X700 Build/TP1A.220624.014)", UserAgent("", "", "Android", "tablet")),
    ("Mozilla/5.0 (Linux; Android 12; Lenovo TB-X606F) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/119.0.0.0 Mobile Safari/537.36",
     UserAgent("Chrome", "119", "Android", "tablet")),
    # UC Browser's compact form.
    ("dv(iPh12,1);pr(UCBrowser/13.4.0.1306);ov(15_4);ss(414x896);bt(UC);pm(0);bv(0);nm(0);im(0);nt(2);", UserAgent("UC Browser", "13", "iOS", "phone")),
    ("pf(Linux);la(en-US);re(AppleWebKit/534.31 (KHTML, like Gecko));dv(Acme A100 Build/JDQ39);pr(UCBrowser/9.1.0.297);ov(Android 4.2.2);ss(480*762);",
     UserAgent("UC Browser", "9", "Android", "phone")),
    # Yahoo! JAPAN's app names itself in reverse-domain form: no domain name of a robot.
    (("Mozilla/5.0 (Linux; Android 13; Acme-1 Build/TP1A; wv) AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 Chrome/119.0.6045.163 Mobile Safari/537.36 "
      "YJApp-ANDROID jp.co.yahoo.android.yjtop/4.12.0"), UserAgent("Chrome", "119", "Android", "phone")),
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 16_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148 YJApp-IOS jp.co.yahoo.ipn.appli/4.40.1",
     UserAgent("Safari", "", "iOS", "phone")),
    # Feature phones and WAP browsers.
    ("ACME-X100/1.0 Profile/MIDP-2.0 Configuration/CLDC-1.1 UP.Browser/6.2.3.3.c.1.101 (GUI) MMP/2.0", UserAgent("", "", "", "phone")),
    ("MAUI_WAP_Browser", UserAgent("", "", "", "phone")),
    ("Acme-C3/1.0 MAUI-Browser/1.0 Profile/MIDP-2.0 Configuration/CLDC-1.1", UserAgent("", "", "", "phone")),
    ("ACME-GD510/V100 Teleca/3.1.1 Profile/MIDP-2.1 Configuration/CLDC-1.1", UserAgent("", "", "", "phone")),
    ("Acme-C5/1.0 Obigo/Q05A Profile/MIDP-2.0 Configuration/CLDC-1.1", UserAgent("", "", "", "phone")),
    ("Opera/9.80 (J2ME/MIDP; Opera Mini/4.5.40312/191.283; U; en) Presto/2.12.423 Version/12.16", UserAgent("Opera Mini", "4", "", "phone")),
    ("Opera/9.80 (Android; Opera Mini/7.6.40077/28.2555; U; en) Presto/2.8.119 Version/11.10", UserAgent("Opera Mini", "7", "Android", "phone")),
    # Apps that send an Apple model as their whole UA.
    ("iPhone11Pro", UserAgent("", "", "iOS", "phone")),
    ("iPodTouch7", UserAgent("", "", "iOS", "phone")),
    ("iPhone14,2", UserAgent("", "", "iOS", "phone")),
    ("iPad8,1", UserAgent("", "", "iOS", "tablet")),
    # Odd spacing around the slashes.
    ("Mozilla / 5.0 (Windows NT 10.0; Win64; x64) AppleWebKit / 537.36 (KHTML, like Gecko) Chrome / 79.0.3945.130 Safari / 537.36",
     UserAgent("Chrome", "79", "Windows", "desktop")),
    # A maker whose name holds "bot", inside Instagram's suffix.
    (("Mozilla/5.0 (Linux; Android 11; CUBOT KINGKONG 5 Pro Build/RP1A.200720.011; wv) AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 Chrome/119.0.6045.163 "
      "Mobile Safari/537.36 Instagram 309.1.0.41.113 Android (30/11; 440dpi; 1080x2160; CUBOT; KINGKONG 5 Pro; KINGKONG_5_Pro; mt6762; en_US; 541635890)"),
     UserAgent("Instagram", "309", "Android", "phone")),
]
OTHER_DEVICES_TOO = [  # TVs, set-top boxes and consoles, not bots
    "Mozilla/5.0 (Linux; Android 9; AFTKA Build/PS7633; wv) AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 Chrome/120.0.6099.230 Safari/537.36",
    "HbbTV/1.5.1 (+DRM; Acme; AcmeTV; 1.0; 1.0; ) CE-HTML/1.0",
    "HbbTV/1.2.1 (;Panasonic;VIERA 2013;3.672;4101-0003 0002-0000;)",
    "Mozilla/5.0 (X11; FreeBSD; U; Viera; de-DE) AppleWebKit/537.11 (KHTML, like Gecko) Viera/3.10.14 Chrome/23.0.1271.97 Safari/537.11",
    "Mozilla/5.0 (PlayStation 4 11.00) AppleWebKit/605.1.15 (KHTML, like Gecko)",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; Xbox; Xbox Series X) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36 Edg/120.0.0.0",
    "Mozilla/5.0 (Nintendo Switch; WifiWebAuthApplet) AppleWebKit/606.4 (KHTML, like Gecko) NF/6.0.1.15.4 NintendoBrowser/5.1.0.20393",
]
STILL_BOTS = [  # what the new rules must not let through
    "Mozilla/5.0 (compatible; AcmeBot/1.0; +https://bot.example.co)",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36 (+http://acme.example.jp)",
    "Acme-Fetcher/2.0 (iPhone)",  # a platform word does not make a tool a reader
    "iPhone-Scanner 2.0",
    "Mozilla / 5.0 (compatible; AcmeBot / 1.0)",
    ("Mozilla/5.0 (Linux; Android 12; Acme Build/SP1A; wv) AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 Chrome/119.0.6045.163 Mobile Safari/537.36 "
     "Instagram 309.1.0.41.113 Android (31/12; 440dpi; 1080x2160; Acme; A1; a1; mt6762; en_US; 541635890) AcmeCrawler/1.0"),
]


@pytest.mark.parametrize("ua, expected", REAL_TRAFFIC)
def test_real_traffic_of_apps_laptops_and_old_phones(ua, expected):
    assert classify_user_agent(ua) == expected


@pytest.mark.parametrize("ua", OTHER_DEVICES_TOO)
def test_tvs_set_top_boxes_and_consoles_are_other_not_bots(ua):
    assert classify_user_agent(ua).device == "other"


@pytest.mark.parametrize("ua", STILL_BOTS)
def test_the_new_reader_rules_let_no_bot_through(ua):
    assert classify_user_agent(ua).device == "bot"
