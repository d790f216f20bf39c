"""The one guarded HTTP fetcher for every URL a job names (issue #11, SSRF).

A job's ``video_url``, ``image_url`` and ``callback_url`` come from whoever may enqueue, so the
cluster must not let them reach loopback, private networks or cloud metadata. For each request
(and each redirect hop) :class:`GuardedFetcher`:

1. checks the URL's text with :mod:`worker.contracts.urlpolicy` (scheme, userinfo, characters,
   length, IP literals in any spelling, internal host names);
2. resolves the host **once** (``getaddrinfo`` or an injected resolver) and checks *every* address
   against the same ranges; one blocked address refuses the request;
3. connects to the checked address itself (the URL is rewritten to the IP; the ``Host`` header and
   TLS SNI/certificate verification keep the name), so a second DNS answer (rebinding) is never
   used;
4. follows at most ``max_redirects`` redirects for GET, re-checking each hop; POSTs follow none;
5. bounds the response size (streamed, stops past the limit) and the total time of the call.

Refusals raise :class:`BlockedURL` with a reason; messages name the host, never the URL's path or
query (pre-signed URLs carry credentials there). No environment proxy is used.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

from config import Settings
from worker.contracts.urlpolicy import (
    Allowlist,
    CheckedURL,
    IPAddress,
    address_block_reason,
    judge,
    metadata_reason,
    parse_url,
)

Resolver = Callable[[str, int], Sequence[str]]
"""``(host, port) -> IP address strings``; the default is :func:`system_resolver`."""

TransportFactory = Callable[[], httpx.BaseTransport]
"""Makes one transport per pinned origin; tests inject ``httpx.MockTransport`` here."""

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK_BYTES = 64 * 1024


class BlockedURL(Exception):
    """The fetcher refused a URL (or a redirect hop). ``reason`` says why; never retry it."""

    def __init__(self, reason: str, *, host: str = "") -> None:
        self.reason = reason
        self.host = host
        super().__init__(f"blocked: {reason}" + (f" (host {host})" if host else ""))


class ResponseTooLarge(Exception):
    """A response body went past the caller's byte limit (reading stopped there)."""


class FetchTimeout(httpx.TimeoutException):
    """The call's total time ran out (connect, redirects and body together)."""


def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``getaddrinfo`` returns for ``host`` (TCP), in its order, without repeats."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: dict[str, None] = {}
    for info in infos:
        seen.setdefault(str(info[4][0]), None)
    return list(seen)


@dataclass(frozen=True)
class FetchLimits:
    """Limits of one fetcher; :meth:`from_settings` reads them from ``REFRAME_*`` settings."""

    max_url_length: int = 2048
    max_redirects: int = 3
    connect_timeout_s: float = 5.0

    @classmethod
    def from_settings(cls, settings: Settings) -> FetchLimits:
        """From ``REFRAME_MAX_URL_LENGTH``, ``_FETCH_MAX_REDIRECTS``, ``_FETCH_CONNECT_TIMEOUT_S``."""
        return cls(settings.max_url_length, settings.fetch_max_redirects, settings.fetch_connect_timeout_s)


@dataclass(frozen=True)
class PinnedTarget:
    """One checked hop: the logical URL, its parsed parts and the address the connection goes to."""

    checked: CheckedURL
    address: IPAddress

    @property
    def wire_url(self) -> str:
        """The URL with the host replaced by the pinned address (what the transport connects to)."""
        parts = urlsplit(self.checked.url)
        host = f"[{self.address.compressed}]" if self.address.version == 6 else str(self.address)
        return urlunsplit(
            (self.checked.scheme, f"{host}:{self.checked.port}", parts.path or "/", parts.query, "")
        )

    @property
    def host_header(self) -> str:
        """``Host`` as the server expects it: the name (or literal), with a non-default port."""
        c = self.checked
        host = f"[{c.host}]" if c.ip is not None and c.ip.version == 6 else c.host
        default = 443 if c.scheme == "https" else 80
        return host if c.port == default else f"{host}:{c.port}"


@dataclass
class FetchResult:
    """A finished request: status, headers, the (bounded) body and the logical final URL."""

    status: int
    headers: httpx.Headers
    body: bytes
    url: str
    truncated: bool = False


class GuardedResponse:
    """A streamed response whose body iteration enforces the byte limit and the deadline."""

    def __init__(
        self,
        response: httpx.Response,
        url: str,
        *,
        max_bytes: int | None,
        deadline: float,
        clock: Callable[[], float],
    ) -> None:
        self.response = response
        self.url = url
        self.status_code = response.status_code
        self.headers = response.headers
        self._max_bytes = max_bytes
        self._deadline = deadline
        self._clock = clock
        self.bytes_read = 0

    def iter_bytes(self) -> Iterator[bytes]:
        """The body in chunks; raises :class:`ResponseTooLarge` or :class:`FetchTimeout` past a limit."""
        for chunk in self.response.iter_bytes(_CHUNK_BYTES):
            self.bytes_read += len(chunk)
            if self._max_bytes is not None and self.bytes_read > self._max_bytes:
                raise ResponseTooLarge(f"response body is over the {self._max_bytes}-byte limit")
            if self._clock() > self._deadline:
                raise FetchTimeout("fetch took longer than its time limit")
            yield chunk

    def read(self) -> bytes:
        """The whole (bounded) body."""
        return b"".join(self.iter_bytes())


class GuardedFetcher:
    """Fetch job-named URLs safely: checked, resolved once, pinned, bounded. Thread-safe.

    ``allow`` lets a deployment reach internal networks or names (``REFRAME_FETCH_ALLOW``); metadata
    addresses stay blocked. ``resolver``, ``transport_factory``, ``verify`` and ``clock`` exist for
    tests. Close it (or use it as a context manager) to drop pooled connections.
    """

    def __init__(
        self,
        *,
        allow: Allowlist | None = None,
        limits: FetchLimits | None = None,
        resolver: Resolver = system_resolver,
        transport_factory: TransportFactory | None = None,
        verify: ssl.SSLContext | bool = True,
        clock: Callable[[], float] = time.monotonic,
        user_agent: str = "reframe-cluster/1",
    ) -> None:
        self.allow = allow if allow is not None else Allowlist()
        self.limits = limits or FetchLimits()
        self._resolver = resolver
        self._verify = verify
        self._factory = transport_factory or self._default_transport
        self._clock = clock
        self._user_agent = user_agent
        self._transports: dict[tuple[str, str, int, str], httpx.BaseTransport] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> GuardedFetcher:
        """A fetcher with the deployment's allowlist and limits (``kwargs`` as in the constructor)."""
        return cls(
            allow=Allowlist.parse(settings.fetch_allow), limits=FetchLimits.from_settings(settings), **kwargs
        )

    def _default_transport(self) -> httpx.BaseTransport:
        return httpx.HTTPTransport(verify=self._verify, retries=0)

    def __enter__(self) -> GuardedFetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every pooled connection."""
        with self._lock:
            transports, self._transports = list(self._transports.values()), {}
        for transport in transports:
            transport.close()

    # --- checking ---------------------------------------------------------------------------------

    def check(self, url: str) -> PinnedTarget:
        """Check ``url`` and resolve it once; return the pinned target or raise :class:`BlockedURL`.

        DNS failures raise ``httpx.ConnectError`` (transient, unlike a refusal).
        """
        try:
            checked = parse_url(url, max_length=self.limits.max_url_length)
        except ValueError as exc:
            raise BlockedURL(str(exc)) from None
        reason = judge(checked, self.allow)
        if reason is not None:
            raise BlockedURL(reason, host=checked.host)
        if checked.ip is not None:
            return PinnedTarget(checked, checked.ip)
        try:
            answers = list(self._resolver(checked.host, checked.port))
        except OSError as exc:
            raise httpx.ConnectError(f"could not resolve {checked.host} ({type(exc).__name__})") from None
        if not answers:
            raise httpx.ConnectError(f"{checked.host} did not resolve to any address")
        addresses: list[IPAddress] = []
        name_allowed = self.allow.allows_host(checked.host)
        for answer in answers:
            try:
                address = ipaddress.ip_address(answer.split("%", 1)[0])
            except ValueError:
                raise BlockedURL("resolver returned a malformed address", host=checked.host) from None
            found = metadata_reason(address) if name_allowed else address_block_reason(address, self.allow)
            if found is not None:
                raise BlockedURL(f"{checked.host} resolves to a {found}", host=checked.host)
            addresses.append(address)
        return PinnedTarget(checked, addresses[0])

    # --- requests ---------------------------------------------------------------------------------

    def _transport(self, target: PinnedTarget) -> httpx.BaseTransport:
        # One pool per (scheme, name, port, address): a TLS connection verified for one name is
        # never reused for another name on the same address.
        key = (target.checked.scheme, target.checked.host, target.checked.port, str(target.address))
        with self._lock:
            transport = self._transports.get(key)
            if transport is None:
                transport = self._transports[key] = self._factory()
            return transport

    def _send(
        self,
        target: PinnedTarget,
        method: str,
        headers: Mapping[str, str],
        body: bytes | None,
        deadline: float,
    ) -> httpx.Response:
        remaining_s = deadline - self._clock()
        if remaining_s <= 0:
            raise FetchTimeout("fetch took longer than its time limit")
        timeout = httpx.Timeout(remaining_s, connect=min(self.limits.connect_timeout_s, remaining_s))
        extensions: dict[str, Any] = {"timeout": timeout.as_dict()}
        if target.checked.scheme == "https" and target.checked.ip is None:
            extensions["sni_hostname"] = target.checked.host
        all_headers = {"User-Agent": self._user_agent, **headers, "Host": target.host_header}
        request = httpx.Request(
            method, target.wire_url, headers=all_headers, content=body, extensions=extensions
        )
        return self._transport(target).handle_request(request)

    @contextmanager
    def stream(
        self,
        url: str,
        *,
        timeout_s: float,
        max_bytes: int | None,
        headers: Mapping[str, str] | None = None,
    ) -> Iterator[GuardedResponse]:
        """GET ``url``, following checked redirects; yield the final response to stream its body.

        ``timeout_s`` bounds the whole call including reading the body; ``max_bytes`` the body.
        Raises :class:`BlockedURL` (also for too many redirects), :class:`FetchTimeout`,
        :class:`ResponseTooLarge` while iterating, or ``httpx.HTTPError`` for transport errors.
        """
        deadline = self._clock() + timeout_s
        current = url
        for _hop in range(self.limits.max_redirects + 1):
            target = self.check(current)
            response = self._send(target, "GET", headers or {}, None, deadline)
            location = response.headers.get("location")
            if response.status_code in REDIRECT_STATUSES and location:
                response.close()
                current = urljoin(current, location)
                continue
            try:
                yield GuardedResponse(
                    response, current, max_bytes=max_bytes, deadline=deadline, clock=self._clock
                )
            finally:
                response.close()
            return
        raise BlockedURL(f"more than {self.limits.max_redirects} redirects")

    def get(
        self, url: str, *, timeout_s: float, max_bytes: int, headers: Mapping[str, str] | None = None
    ) -> FetchResult:
        """GET ``url`` (checked redirects followed) and read its body, at most ``max_bytes``."""
        with self.stream(url, timeout_s=timeout_s, max_bytes=max_bytes, headers=headers) as response:
            body = response.read()
            return FetchResult(response.status_code, response.headers, body, response.url)

    def get_range(self, url: str, start: int, end: int, *, timeout_s: float, max_bytes: int) -> FetchResult:
        """GET bytes ``start..end`` (inclusive) of ``url``; the server may answer 206 or a whole 200."""
        headers = {"Range": f"bytes={start}-{end}", "Accept-Encoding": "identity"}
        return self.get(url, timeout_s=timeout_s, max_bytes=max_bytes, headers=headers)

    def post(
        self,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        *,
        timeout_s: float,
        max_response_bytes: int,
    ) -> FetchResult:
        """POST ``body`` to ``url`` without following redirects; read at most ``max_response_bytes``
        of the answer (the rest is dropped, ``truncated`` is set)."""
        deadline = self._clock() + timeout_s
        target = self.check(url)
        response = self._send(target, "POST", headers, body, deadline)
        try:
            guarded = GuardedResponse(response, url, max_bytes=None, deadline=deadline, clock=self._clock)
            kept = bytearray()
            truncated = False
            for chunk in guarded.iter_bytes():
                kept += chunk
                if len(kept) > max_response_bytes:
                    truncated = True
                    del kept[max_response_bytes:]
                    break
            return FetchResult(response.status_code, response.headers, bytes(kept), url, truncated)
        finally:
            response.close()
