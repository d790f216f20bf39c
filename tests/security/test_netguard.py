"""The guarded fetcher: pinning, redirects, limits (MockTransport) and SSRF against real servers."""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Iterator

import httpx
import pytest

from worker.contracts.netguard import (
    BlockedURL,
    FetchLimits,
    FetchTimeout,
    GuardedFetcher,
    ResponseTooLarge,
    system_resolver,
)
from worker.contracts.urlpolicy import Allowlist

from .conftest import RecordingServer

PUBLIC = "93.184.215.14"


def mock_fetcher(
    handler: Callable[[httpx.Request], httpx.Response],
    *,
    answers: dict[str, list[str]] | None = None,
    **kwargs: object,
) -> tuple[GuardedFetcher, list[httpx.Request], list[str]]:
    """A fetcher whose transport is a MockTransport and whose resolver is a table; both record."""
    seen: list[httpx.Request] = []
    lookups: list[str] = []
    table = answers if answers is not None else {"media.example.test": [PUBLIC]}

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    def resolver(host: str, port: int) -> list[str]:
        lookups.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "unknown")
        return table[host]

    fetcher = GuardedFetcher(
        resolver=resolver,
        transport_factory=lambda: httpx.MockTransport(record),
        **kwargs,  # type: ignore[arg-type]
    )
    return fetcher, seen, lookups


def ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, content=b"hello")


# --- pure client logic (MockTransport) -------------------------------------------------------------


def test_connection_goes_to_the_checked_address_with_host_header_and_sni() -> None:
    fetcher, seen, lookups = mock_fetcher(ok)
    result = fetcher.get("https://media.example.test/a/b.mp4?sig=1", timeout_s=5, max_bytes=100)
    assert result.status == 200 and result.body == b"hello"
    assert lookups == ["media.example.test"], "resolved exactly once"
    request = seen[0]
    assert str(request.url) == f"https://{PUBLIC}/a/b.mp4?sig=1"
    assert request.headers["host"] == "media.example.test"
    assert request.extensions["sni_hostname"] == "media.example.test"


def test_plain_http_with_port_keeps_the_port_in_host_and_sends_no_sni() -> None:
    fetcher, seen, _ = mock_fetcher(ok)
    fetcher.get("http://media.example.test:8080/x", timeout_s=5, max_bytes=100)
    assert str(seen[0].url) == f"http://{PUBLIC}:8080/x"
    assert seen[0].headers["host"] == "media.example.test:8080"
    assert "sni_hostname" not in seen[0].extensions


def test_ipv6_answer_is_bracketed() -> None:
    fetcher, seen, _ = mock_fetcher(ok, answers={"media.example.test": ["2606:4700::1111"]})
    fetcher.get("https://media.example.test/x", timeout_s=5, max_bytes=100)
    assert str(seen[0].url) == "https://[2606:4700::1111]/x"


@pytest.mark.parametrize(
    ("answers", "reason"),
    [
        (["127.0.0.1"], "loopback"),
        ([PUBLIC, "10.0.0.7"], "private"),  # one bad address is enough
        (["169.254.169.254"], "metadata"),
        (["::1"], "loopback"),
        (["::ffff:127.0.0.1"], "IPv4-mapped"),
        (["fe80::1%eth0"], "link-local"),
        (["100.64.1.1"], "carrier-grade NAT"),
        (["not-an-ip"], "malformed"),
    ],
)
def test_a_name_resolving_to_a_blocked_address_is_refused_before_connecting(
    answers: list[str], reason: str
) -> None:
    fetcher, seen, _ = mock_fetcher(ok, answers={"media.example.test": answers})
    with pytest.raises(BlockedURL, match=reason) as info:
        fetcher.get("https://media.example.test/x.mp4?token=secret", timeout_s=5, max_bytes=100)
    assert seen == []
    assert "secret" not in str(info.value) and "x.mp4" not in str(info.value)


def test_dns_failure_is_a_transient_connect_error() -> None:
    fetcher, seen, _ = mock_fetcher(ok, answers={})
    with pytest.raises(httpx.ConnectError):
        fetcher.get("https://nowhere.example.test/x", timeout_s=5, max_bytes=100)
    assert seen == []


def test_allowlisted_name_may_resolve_to_internal_addresses_but_never_metadata() -> None:
    answers = {"cdn.corp.example": ["10.1.2.3"], "evil.corp.example": ["169.254.169.254"]}
    fetcher, seen, _ = mock_fetcher(
        ok, answers=answers, allow=Allowlist.parse("*.corp.example,cdn.corp.example")
    )
    assert fetcher.get("http://cdn.corp.example/a", timeout_s=5, max_bytes=10).status == 200
    assert seen[0].url.host == "10.1.2.3"
    with pytest.raises(BlockedURL, match="metadata"):
        fetcher.get("http://evil.corp.example/a", timeout_s=5, max_bytes=10)
    assert len(seen) == 1


def test_redirects_are_followed_with_each_hop_checked_and_resolved() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/start":
            return httpx.Response(302, headers={"Location": "https://other.example.test/next"})
        if request.url.path == "/next":
            return httpx.Response(307, headers={"Location": "/final"})  # relative: same host
        return httpx.Response(200, content=b"done")

    answers = {"media.example.test": [PUBLIC], "other.example.test": ["93.184.215.15"]}
    fetcher, seen, lookups = mock_fetcher(handler, answers=answers)
    result = fetcher.get("https://media.example.test/start", timeout_s=5, max_bytes=100)
    assert result.body == b"done" and result.url == "https://other.example.test/final"
    assert [r.headers["host"] for r in seen] == [
        "media.example.test",
        "other.example.test",
        "other.example.test",
    ]
    assert lookups == ["media.example.test", "other.example.test", "other.example.test"]


@pytest.mark.parametrize(
    "location",
    [
        "http://127.0.0.1:6379/",
        "http://localhost/",
        "http://[::1]/",
        "http://169.254.169.254/latest/meta-data/",
        "http://2130706433/",
        "http://internal.example.test/",  # resolves to loopback
        "file:///etc/passwd",
        "gopher://127.0.0.1:6379/_INFO",
    ],
)
def test_a_redirect_to_a_blocked_target_is_refused(location: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"Location": location})

    answers = {"media.example.test": [PUBLIC], "internal.example.test": ["127.0.0.1"]}
    fetcher, seen, _ = mock_fetcher(handler, answers=answers)
    with pytest.raises(BlockedURL):
        fetcher.get("https://media.example.test/start", timeout_s=5, max_bytes=100)
    assert len(seen) == 1, "only the first, allowed hop was requested"


def test_redirect_limit() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"Location": f"/hop{len(seen)}"})

    fetcher, seen, _ = mock_fetcher(handler, limits=FetchLimits(max_redirects=3))
    with pytest.raises(BlockedURL, match="more than 3 redirects"):
        fetcher.get("https://media.example.test/start", timeout_s=5, max_bytes=100)
    assert len(seen) == 4


def test_body_over_the_limit_stops_reading() -> None:
    fetcher, _, _ = mock_fetcher(lambda r: httpx.Response(200, content=b"x" * 1000))
    with pytest.raises(ResponseTooLarge):
        fetcher.get("https://media.example.test/big", timeout_s=5, max_bytes=999)
    assert fetcher.get("https://media.example.test/big", timeout_s=5, max_bytes=1000).body == b"x" * 1000


def test_total_time_limit_with_an_injected_clock() -> None:
    now = [0.0]

    def handler(request: httpx.Request) -> httpx.Response:
        now[0] += 3.0  # each hop "takes" 3 s
        return httpx.Response(302, headers={"Location": "/again"})

    fetcher, seen, _ = mock_fetcher(handler, clock=lambda: now[0])
    with pytest.raises(FetchTimeout):
        fetcher.get("https://media.example.test/slow", timeout_s=5, max_bytes=100)
    assert len(seen) == 2, "the third hop is not sent after the deadline"


def test_post_never_follows_redirects_and_bounds_the_answer() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/hook":
            return httpx.Response(307, headers={"Location": "http://127.0.0.1:6379/"})
        return httpx.Response(200, content=b"y" * 500)

    fetcher, seen, _ = mock_fetcher(handler)
    result = fetcher.post("https://media.example.test/hook", b"{}", {}, timeout_s=5, max_response_bytes=10)
    assert result.status == 307 and len(seen) == 1
    assert seen[0].method == "POST" and seen[0].content == b"{}"
    big = fetcher.post("https://media.example.test/other", b"{}", {}, timeout_s=5, max_response_bytes=10)
    assert big.body == b"y" * 10 and big.truncated


def test_system_resolver_returns_unique_addresses() -> None:
    assert system_resolver("127.0.0.1", 80) == ["127.0.0.1"]


# --- SSRF against real local servers -------------------------------------------------------------


@pytest.fixture
def fetcher() -> Iterator[GuardedFetcher]:
    """A real fetcher (real sockets) that may reach only 127.0.0.2, standing in for the internet."""
    with GuardedFetcher(allow=Allowlist.parse("127.0.0.2/32"), limits=FetchLimits(connect_timeout_s=2)) as f:
        yield f


def loopback_spellings(port: int) -> list[str]:
    return [
        f"http://127.0.0.1:{port}/x.mp4",
        f"http://127.1:{port}/x.mp4",
        f"http://2130706433:{port}/x.mp4",
        f"http://0x7f.1:{port}/x.mp4",
        f"http://017700000001:{port}/x.mp4",
        f"http://[::ffff:127.0.0.1]:{port}/x.mp4",
        f"http://localhost:{port}/x.mp4",
        f"http://LocalHost.:{port}/x.mp4",
    ]


def test_control_the_target_server_is_reachable_when_allowlisted(target: RecordingServer) -> None:
    """Proves the "saw nothing" assertions below can fail: allowlisted, the same URLs get through."""
    with GuardedFetcher(allow=Allowlist.parse("127.0.0.0/8")) as open_fetcher:
        for url in loopback_spellings(target.port)[:6]:
            assert open_fetcher.get(url, timeout_s=5, max_bytes=100).status == 200
    assert len(target.seen) == 6


def test_loopback_in_any_spelling_is_never_requested(
    fetcher: GuardedFetcher, target: RecordingServer
) -> None:
    for url in loopback_spellings(target.port):
        with pytest.raises(BlockedURL):
            fetcher.get(url, timeout_s=5, max_bytes=100)
    assert target.seen == []


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://10.0.0.1/",
        "http://192.168.0.1/",
        "http://[fc00::1]/",
        "http://0.0.0.0/",
    ],
)
def test_private_and_metadata_targets_open_no_connection(url: str) -> None:
    made: list[httpx.BaseTransport] = []

    def factory() -> httpx.BaseTransport:
        made.append(httpx.HTTPTransport())
        return made[-1]

    with GuardedFetcher(transport_factory=factory) as f, pytest.raises(BlockedURL):
        f.get(url, timeout_s=5, max_bytes=100)
    assert made == [], "no transport (and so no socket) was created"


def test_public_looking_name_resolving_to_loopback(target: RecordingServer) -> None:
    resolver = lambda host, port: ["127.0.0.1"] if host == "media.example.test" else []  # noqa: E731
    with GuardedFetcher(resolver=resolver) as f, pytest.raises(BlockedURL, match="resolves to a loopback"):
        f.get(f"http://media.example.test:{target.port}/clip.mp4", timeout_s=5, max_bytes=100)
    assert target.seen == []


def _server_pair(make_server: Callable[..., RecordingServer]) -> tuple[RecordingServer, RecordingServer]:
    """An allowed server on 127.0.0.2 and a target on 127.0.0.1 listening on the same port."""
    for _ in range(20):
        public = make_server("127.0.0.2")
        try:
            return public, make_server("127.0.0.1", port=public.port)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
    pytest.fail("no port free on both 127.0.0.1 and 127.0.0.2")


def test_dns_rebinding_the_connection_goes_to_the_address_that_was_checked(
    make_server: Callable[..., RecordingServer], fetcher: GuardedFetcher
) -> None:
    public, target = _server_pair(make_server)
    answers = iter([["127.0.0.2"], ["127.0.0.1"], ["127.0.0.1"]])  # first answer allowed, then rebound
    lookups: list[str] = []

    def rebinding(host: str, port: int) -> list[str]:
        lookups.append(host)
        return next(answers)

    url = f"http://media.example.test:{public.port}/clip.mp4"
    with GuardedFetcher(allow=Allowlist.parse("127.0.0.2/32"), resolver=rebinding) as f:
        assert f.get(url, timeout_s=5, max_bytes=100).status == 200
        assert lookups == ["media.example.test"], "one resolution per request; httpx never resolves again"
        with pytest.raises(BlockedURL, match="loopback"):
            f.get(url, timeout_s=5, max_bytes=100)  # the next request sees the rebound answer and refuses
    assert [(s.method, s.headers["Host"]) for s in public.seen] == [
        ("GET", f"media.example.test:{public.port}")
    ]
    assert target.seen == []


@pytest.mark.parametrize(
    "location",
    [
        "http://127.0.0.1:{port}/stolen",
        "http://localhost:{port}/stolen",
        "http://2130706433:{port}/stolen",
        "http://[::ffff:127.0.0.1]:{port}/stolen",
        "http://169.254.169.254/latest/meta-data/",
    ],
)
def test_redirect_from_an_allowed_server_to_loopback(
    location: str,
    make_server: Callable[..., RecordingServer],
    fetcher: GuardedFetcher,
    target: RecordingServer,
) -> None:
    public = make_server("127.0.0.2")
    public.redirect("/clip.mp4", location.format(port=target.port))
    with pytest.raises(BlockedURL):
        fetcher.get(f"{public.base}/clip.mp4", timeout_s=5, max_bytes=100)
    assert [s.path for s in public.seen] == ["/clip.mp4"]
    assert target.seen == []


def test_ipv6_loopback_is_never_requested(
    make_server: Callable[..., RecordingServer], fetcher: GuardedFetcher
) -> None:
    target6 = make_server("::1")
    for url in (f"http://[::1]:{target6.port}/x", f"http://[0:0:0:0:0:0:0:1]:{target6.port}/x"):
        with pytest.raises(BlockedURL, match="loopback"):
            fetcher.get(url, timeout_s=5, max_bytes=100)
    with GuardedFetcher(resolver=lambda h, p: ["::1"]) as f, pytest.raises(BlockedURL):
        f.get(f"http://v6.example.test:{target6.port}/x", timeout_s=5, max_bytes=100)
    assert target6.seen == []
    with GuardedFetcher(allow=Allowlist.parse("::1/128")) as control:  # control: reachable when allowed
        assert control.get(f"http://[::1]:{target6.port}/x", timeout_s=5, max_bytes=100).status == 200
    assert len(target6.seen) == 1
