"""The enqueue-time URL policy: every spelling of an internal address is refused, public URLs pass."""

from __future__ import annotations

import ipaddress

import pytest

from worker.contracts import InvalidRequest, parse_input
from worker.contracts.urlpolicy import (
    Allowlist,
    UrlPolicy,
    address_block_reason,
    check_callback_url,
    check_media_url,
    check_url,
    parse_ipv4_loose,
)

ALLOWED = [
    "https://cdn.example.com/clip.mp4",
    "http://cdn.example.com:8080/a/b.mp4?sig=abc&exp=1",
    "https://v3.fal.media/files/x/y.mp4",
    "https://8.8.8.8/clip.mp4",
    "https://[2606:4700:4700::1111]/clip.mp4",
    "https://CDN.Example.COM./clip.mp4",  # case and one trailing dot
    "https://bücher.example/clip.mp4",  # IDNA
]


@pytest.mark.parametrize("url", ALLOWED)
def test_public_urls_pass_unchanged(url: str) -> None:
    assert check_url(url, field="video_url") == url
    assert check_callback_url(url) == url


BLOCKED: list[tuple[str, str]] = [
    # IPv4, plain and in every inet_aton spelling
    ("http://127.0.0.1:6379/", "loopback"),
    ("http://127.1/", "loopback"),
    ("http://2130706433/", "loopback"),
    ("http://0x7f.1/", "loopback"),
    ("http://0x7f000001/", "loopback"),
    ("http://017700000001/", "loopback"),
    ("http://0177.0.0.01/", "loopback"),
    ("http://127.0.0.1./", "loopback"),
    ("http://\uff11\uff12\uff17.\uff10.\uff10.\uff11/", "loopback"),  # fullwidth digits (UTS 46 maps them)
    ("http://0/", "unspecified"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://10.0.0.5/", "private"),
    ("http://172.16.3.4/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://169.254.169.254/latest/meta-data/", "metadata"),
    ("http://2852039166/latest/meta-data/", "metadata"),  # 169.254.169.254 as one number
    ("http://169.254.170.2/v2/credentials", "metadata"),
    ("http://169.254.1.1/", "link-local"),
    ("http://100.64.0.1/", "carrier-grade NAT"),
    ("http://224.0.0.1/", "multicast"),
    ("http://255.255.255.255/", "broadcast"),
    ("http://240.0.0.1/", "private"),
    ("http://192.0.2.10/", "private"),  # documentation range
    # IPv6
    ("http://[::1]/", "loopback"),
    ("http://[0:0:0:0:0:0:0:1]/", "loopback"),
    ("http://[::]/", "unspecified"),
    ("http://[::ffff:127.0.0.1]/", "loopback address in IPv4-mapped form"),
    ("http://[::ffff:7f00:1]/", "loopback address in IPv4-mapped form"),
    ("http://[::ffff:169.254.169.254]/", "metadata"),
    ("http://[::127.0.0.1]/", "IPv4-compatible"),
    ("http://[fe80::1]/", "link-local"),
    ("http://[fe80::1%25eth0]/", "link-local"),
    ("http://[fc00::1]/", "private"),
    ("http://[fd12:3456::1]/", "private"),
    ("http://[fd00:ec2::254]/", "metadata"),
    ("http://[ff02::1]/", "multicast"),
    ("http://[fec0::1]/", "site-local"),
    ("http://[2002:7f00:1::]/", "6to4"),
    ("http://[2002:a9fe:a9fe::]/", "metadata"),
    ("http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/", "Teredo"),  # client 127.0.0.1
    ("http://[64:ff9b::7f00:1]/", "NAT64"),
    ("http://[64:ff9b::a9fe:a9fe]/", "metadata"),
    ("http://[64:ff9b:1::1]/", "NAT64"),
    ("http://[2001:db8::1]/", "address"),  # documentation
    # names
    ("http://localhost/", "internal host name"),
    ("http://LOCALHOST./", "internal host name"),
    ("http://api.localhost/", "internal host name"),
    ("http://metadata.google.internal/computeMetadata/v1/", "internal host name"),
    ("http://instance-data/latest/", "internal host name"),
    ("http://redis:6379/", "single-label"),
    ("http://kubernetes.default.svc/", "internal host name"),
    ("http://db.cluster.local/", "internal host name"),
    ("http://printer.local/", "internal host name"),
    ("http://router.home.arpa/", "internal host name"),
    # text rules
    ("http://user:pw@cdn.example.com/a.mp4", "userinfo"),
    ("http://cdn.example.com@127.0.0.1/a.mp4", "userinfo"),
    ("http://@cdn.example.com/a.mp4", "userinfo"),
    ("http://cdn.example.com/a\r\nX-Injected: 1", "control characters"),
    ("http://cdn.example.com/a\x00.mp4", "control characters"),
    ("http://cdn.example.com/a b.mp4", "whitespace"),
    ("http://cdn.example.com\\@127.0.0.1/", "backslash"),
    ("http://cdn.example.com/\t", "control"),
    ("http://%31%32%37.0.0.1/", "percent-encoded"),
    ("http:///nohost.mp4", "no host"),
    ("http://:80/", "no host"),
    ("ftp://cdn.example.com/a.mp4", "http(s)"),
    ("file:///etc/passwd", "http(s)"),
    ("gopher://127.0.0.1:6379/_PING", "http(s)"),
    ("javascript:alert(1)", "http(s)"),
    ("//cdn.example.com/a.mp4", "http(s)"),
    ("http://cdn.example.com:99999/", "malformed"),
    ("http://cdn.example.com:abc/", "malformed"),
    ("http://256.0.0.1/", "out-of-range"),
    ("http://1.2.3.4.5/", "numeric label"),
    ("http://0x100000000/", "out-of-range"),
    ("http://08.0.0.1/", "malformed octal"),
    ("http://[::1/", "malformed"),
    ("http://[zz::1]/", "malformed"),
    ("http://exa_mple..com/", "no valid host"),
    ("http://" + "a" * 2050 + ".com/", "limit is 2048"),
]


@pytest.mark.parametrize(("url", "reason"), BLOCKED, ids=[u[:60] for u, _ in BLOCKED])
def test_internal_and_malformed_urls_are_refused_with_a_reason(url: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        check_url(url, field="video_url")
    message = str(info.value)
    assert message.startswith("video_url: ")
    assert reason in message
    if "?" in url or "meta-data" in url:
        assert "meta-data" not in message, "messages never echo the URL's path"


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("2130706433", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0177.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("10.1", "10.0.0.1"),
        ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254"),
        ("1.2.3.4", "1.2.3.4"),
        ("example.com", None),
        ("1.2.3.example", None),
    ],
)
def test_loose_ipv4_parsing_matches_inet_aton(host: str, expected: str | None) -> None:
    parsed = parse_ipv4_loose(host)
    assert (str(parsed) if parsed else None) == expected


def test_data_uris_only_for_media_fields() -> None:
    data = "data:video/mp4;base64,AAAA"
    assert check_media_url(data, field="video_url") == data
    with pytest.raises(ValueError, match="callback_url: must be an http"):
        check_callback_url(data)


def test_length_limit_is_configurable() -> None:
    url = "https://cdn.example.com/" + "a" * 100
    policy = UrlPolicy(max_length=64)
    with pytest.raises(ValueError, match="limit is 64"):
        check_callback_url(url, policy=policy)
    assert check_callback_url(url, policy=UrlPolicy(max_length=200)) == url


@pytest.mark.parametrize(
    ("allow", "url", "ok"),
    [
        ("", "http://10.1.2.3/a.mp4", False),
        ("10.0.0.0/8", "http://10.1.2.3/a.mp4", True),
        ("10.0.0.0/8", "http://0x0a010203/a.mp4", True),  # any spelling of an allowed address
        ("10.0.0.0/8", "http://[::ffff:10.1.2.3]/a.mp4", True),
        ("10.0.0.0/8", "http://11.0.0.1/a.mp4", True),  # public anyway
        ("10.0.0.0/8", "http://192.168.0.1/a.mp4", False),
        ("10.0.0.0/8", "http://127.0.0.1/a.mp4", False),
        ("fd12::/16", "http://[fd12::5]/a.mp4", True),
        ("fd12::/16", "http://[fd13::5]/a.mp4", False),
        ("cdn.corp.internal", "http://cdn.corp.internal/a.mp4", True),
        ("cdn.corp.internal", "http://x.cdn.corp.internal/a.mp4", False),
        ("*.corp.internal", "http://x.cdn.corp.internal/a.mp4", True),
        ("*.corp.internal", "http://corp.internal/a.mp4", False),
        ("media", "http://media/a.mp4", True),
        ("0.0.0.0/0", "http://169.254.169.254/latest/", False),  # metadata: never
        ("169.254.169.254/32", "http://169.254.169.254/latest/", False),
        ("::/0", "http://[fd00:ec2::254]/", False),
        ("::/0", "http://[::ffff:169.254.169.254]/", False),
        ("127.0.0.0/8", "http://u:p@127.0.0.1/", False),  # text rules still apply
    ],
)
def test_allowlist(allow: str, url: str, ok: bool) -> None:
    policy = UrlPolicy.from_spec(allow)
    if ok:
        assert check_media_url(url, field="video_url", policy=policy) == url
    else:
        with pytest.raises(ValueError, match="video_url: "):
            check_media_url(url, field="video_url", policy=policy)


@pytest.mark.parametrize("spec", ["http://cdn", "10.0.0.0/33", "*", "a*.b", "-bad-.com"])
def test_malformed_allowlist_entries_are_errors(spec: str) -> None:
    with pytest.raises(ValueError, match="neither a CIDR nor a host name"):
        Allowlist.parse(spec)


def test_allowlist_parses_commas_and_spaces() -> None:
    allow = Allowlist.parse(" 10.0.0.0/8,  cdn.example ,*.corp.example\n fd00::/8 ")
    assert [str(n) for n in allow.networks] == ["10.0.0.0/8", "fd00::/8"]
    assert allow.hosts == ("cdn.example", "*.corp.example")
    assert not Allowlist.parse("")


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2a00:1450:4001:80b::200e", "::ffff:8.8.8.8"]
)
def test_public_addresses_have_no_block_reason(address: str) -> None:
    assert address_block_reason(ipaddress.ip_address(address)) is None


def test_parse_input_applies_the_policy_and_its_allowlist() -> None:
    request = {"video_url": "http://127.0.0.1:9000/files/a.mp4", "aspect_ratio": "9:16"}
    with pytest.raises(InvalidRequest) as info:
        parse_input(request)
    assert info.value.errors == [("video_url", "host not allowed (loopback address)")]
    with pytest.raises(InvalidRequest, match="image_url: host not allowed"):
        parse_input(
            {**request, "video_url": "https://cdn.example.com/a.mp4", "image_url": "http://[::1]/i.png"}
        )
    allowed = parse_input(request, url_policy=UrlPolicy.from_spec("127.0.0.1/32"))
    assert allowed.video_url == request["video_url"]
