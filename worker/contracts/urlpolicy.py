"""Which URLs a job may make the cluster fetch or call (issue #11, SSRF).

Pure functions, importable by the producer (no I/O, no httpx): :func:`check_url` validates a URL's
text at enqueue time, :func:`address_block_reason` judges one IP address (the guarded fetcher in
``worker/contracts/netguard.py`` applies it to every address a host name resolves to).

Rules: ``http``/``https`` only (``data:`` only where the caller allows it); bounded length; no
control characters, whitespace or userinfo; a host is required. A host that is an IP literal in
any spelling (``2130706433``, ``0x7f.1``, ``017700000001``, ``[::ffff:127.0.0.1]``, ``[fe80::1%25eth0]``)
is parsed the way ``inet_aton`` and URL parsers would and must not lie in a blocked range
(loopback, private, link-local, multicast, unspecified, broadcast, carrier-grade NAT, reserved,
documentation, cloud metadata, and IPv6 forms that embed such an IPv4 address). Names such as
``localhost``, ``*.localhost``, ``metadata.google.internal`` and single-label names are refused.

An :class:`Allowlist` (``REFRAME_FETCH_ALLOW``: CIDRs and host names, empty by default) lets a
deployment reach an internal CDN. Cloud metadata addresses stay blocked even then.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import idna

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_MAX_URL_LENGTH = 2048
"""Longest URL accepted when the caller passes no limit (``REFRAME_MAX_URL_LENGTH``)."""

METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    {
        ipaddress.IPv4Address("169.254.169.254"),  # AWS, GCP, Azure, OpenStack, ...
        ipaddress.IPv4Address("169.254.170.2"),  # AWS ECS task metadata
        ipaddress.IPv4Address("100.100.100.200"),  # Alibaba Cloud
        ipaddress.IPv6Address("fd00:ec2::254"),  # AWS IMDS over IPv6
    }
)
"""Cloud instance-metadata endpoints: blocked always, whatever the allowlist says."""

_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"),)
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215 local-use translation prefix
_IPV4_COMPAT = ipaddress.IPv6Network("::/96")  # deprecated IPv4-compatible addresses (::a.b.c.d)

BLOCKED_HOST_NAMES = frozenset(
    {
        "localhost",
        "localhost.localdomain",
        "ip6-localhost",
        "ip6-loopback",
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "instance-data",
        "instance-data.ec2.internal",
    }
)
"""Host names refused outright (compared lower-case, without a trailing dot)."""

BLOCKED_HOST_SUFFIXES = (".localhost", ".local", ".internal", ".home.arpa", ".cluster.local", ".svc")
"""Name suffixes that only ever mean "inside this network"; refused unless allowlisted."""

_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
_NUMERIC_PART = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")
_FORBIDDEN_CHARS = re.compile(r"[\x00-\x20\x7f\\]")


class Allowlist:
    """Networks and host names a deployment deliberately lets jobs reach (e.g. an internal CDN).

    Entries are CIDRs or single addresses (``10.20.0.0/16``, ``fd12::/48``, ``10.1.2.3``), exact host
    names (``cdn.corp.example``) or suffix patterns (``*.cdn.corp.example``, which matches
    sub-domains, not the bare name). An empty allowlist allows nothing extra.
    """

    def __init__(self, networks: tuple[IPNetwork, ...] = (), hosts: tuple[str, ...] = ()) -> None:
        self.networks = networks
        self.hosts = tuple(h.lower().rstrip(".") for h in hosts)

    @classmethod
    def parse(cls, spec: str | None) -> Allowlist:
        """Parse ``REFRAME_FETCH_ALLOW`` (entries separated by commas or whitespace).

        Raises :class:`ValueError` naming the first entry that is neither a CIDR nor a host name.
        """
        networks: list[IPNetwork] = []
        hosts: list[str] = []
        for entry in re.split(r"[\s,]+", spec or ""):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            name = entry.lower().rstrip(".")
            bare = name.removeprefix("*.")
            if not bare or "*" in bare or not all(_LABEL.match(label) for label in bare.split(".")):
                raise ValueError(f"allowlist entry {entry!r} is neither a CIDR nor a host name")
            hosts.append(name)
        return cls(tuple(networks), tuple(hosts))

    def __bool__(self) -> bool:
        return bool(self.networks or self.hosts)

    def __repr__(self) -> str:
        return f"Allowlist(networks={[str(n) for n in self.networks]}, hosts={list(self.hosts)})"

    def allows_host(self, host: str) -> bool:
        """True when the (lower-case, ASCII) host name is listed, exactly or by a ``*.`` pattern."""
        host = host.lower().rstrip(".")
        for pattern in self.hosts:
            if pattern.startswith("*."):
                if host.endswith(pattern[1:]):
                    return True
            elif host == pattern:
                return True
        return False

    def allows_ip(self, ip: IPAddress) -> bool:
        """True when ``ip`` lies in a listed network (mapped IPv6 forms are compared as IPv4 too)."""
        candidates: list[IPAddress] = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
        return any(c in net for c in candidates for net in self.networks if c.version == net.version)


EMPTY_ALLOWLIST = Allowlist()


@dataclass(frozen=True)
class UrlPolicy:
    """The enqueue-time URL rules a deployment configured: allowlist and length limit.

    Pass one to :func:`worker.contracts.models.parse_input` (``url_policy=``) so the producer checks
    ``video_url``/``image_url`` with the deployment's allowlist; build it with :meth:`from_spec`.
    """

    allow: Allowlist = field(default_factory=Allowlist)
    max_length: int = DEFAULT_MAX_URL_LENGTH

    @classmethod
    def from_spec(cls, allow_spec: str | None, *, max_length: int = DEFAULT_MAX_URL_LENGTH) -> UrlPolicy:
        """Build from ``REFRAME_FETCH_ALLOW`` and ``REFRAME_MAX_URL_LENGTH`` values."""
        return cls(Allowlist.parse(allow_spec), max_length)


def parse_ipv4_loose(host: str) -> ipaddress.IPv4Address | None:
    """Parse ``host`` the way ``inet_aton`` (and WHATWG URL parsers) read IPv4: 1 to 4 parts, each
    decimal, octal (leading 0) or hex (``0x``); the last part fills the remaining bytes.

    Returns None when ``host`` is not numeric in that sense; raises :class:`ValueError` when it looks
    numeric but is out of range (such hosts must not be handed to a resolver).
    """
    parts = host.split(".")
    if parts and parts[-1] == "":
        parts.pop()  # one trailing dot is allowed
    if not parts or len(parts) > 4 or not all(_NUMERIC_PART.match(p) for p in parts):
        return None
    values: list[int] = []
    for part in parts:
        if part.startswith("0x"):
            values.append(int(part[2:] or "0", 16))
        elif len(part) > 1 and part.startswith("0"):
            if not all(c in "01234567" for c in part):
                raise ValueError(f"host {host!r} is a malformed octal IPv4 address")
            values.append(int(part, 8))
        else:
            values.append(int(part))
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (4 - len(head)):
        raise ValueError(f"host {host!r} is an out-of-range numeric IPv4 address")
    number = last
    for i, v in enumerate(head):
        number += v << (8 * (3 - i))
    return ipaddress.IPv4Address(number)


def _v4_reason(ip: ipaddress.IPv4Address) -> str | None:
    checks = (
        (ip in METADATA_ADDRESSES, "cloud metadata address"),
        (ip.is_unspecified, "unspecified address"),
        (ip.is_loopback, "loopback address"),
        (ip == ipaddress.IPv4Address("255.255.255.255"), "broadcast address"),
        (ip.is_link_local, "link-local address"),
        (ip.is_multicast, "multicast address"),
        (ip in _CGNAT, "carrier-grade NAT address"),
        (ip.is_private, "private address"),
        (ip.is_reserved, "reserved address"),
        (not ip.is_global, "not a public address"),
    )
    return next((reason for hit, reason in checks if hit), None)


def _embedded_v4(ip: ipaddress.IPv6Address) -> list[tuple[str, ipaddress.IPv4Address]]:
    """IPv4 addresses an IPv6 address carries (mapped, compatible, 6to4, Teredo, NAT64)."""
    found: list[tuple[str, ipaddress.IPv4Address]] = []
    if ip.ipv4_mapped is not None:
        found.append(("IPv4-mapped", ip.ipv4_mapped))
    if ip in _IPV4_COMPAT and int(ip) > 1:
        found.append(("IPv4-compatible", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)))
    if ip.sixtofour is not None:
        found.append(("6to4", ip.sixtofour))
    if ip.teredo is not None:
        server, client = ip.teredo
        found.extend((("Teredo", server), ("Teredo", client)))
    if any(ip in net for net in _NAT64):
        found.append(("NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)))
    return found


def _without_scope(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        return ipaddress.IPv6Address(ip.compressed.split("%", 1)[0])
    return ip


def metadata_reason(ip: IPAddress) -> str | None:
    """ "cloud metadata address" when ``ip`` is (or embeds) one; such addresses are never allowed."""
    ip = _without_scope(ip)
    if ip in METADATA_ADDRESSES:
        return "cloud metadata address"
    if isinstance(ip, ipaddress.IPv6Address):
        for kind, v4 in _embedded_v4(ip):
            if v4 in METADATA_ADDRESSES:
                return f"cloud metadata address in {kind} form"
    return None


def address_block_reason(ip: IPAddress, allow: Allowlist = EMPTY_ALLOWLIST) -> str | None:
    """Why the cluster must not connect to ``ip``, or None when it may.

    Cloud metadata addresses are blocked even when allowlisted; any other address in an allowlisted
    network is allowed.
    """
    ip = _without_scope(ip)
    reason = metadata_reason(ip)
    if reason is not None:
        return reason
    if allow.allows_ip(ip):
        return None
    if isinstance(ip, ipaddress.IPv4Address):
        return _v4_reason(ip)
    embedded = _embedded_v4(ip)
    for kind, v4 in embedded:
        reason = None if allow.allows_ip(v4) else _v4_reason(v4)
        if reason is not None:
            return f"{reason} in {kind} form"
    if embedded:
        return None  # an IPv6 spelling of public IPv4 addresses: they decide
    checks = (
        (ip.is_unspecified, "unspecified address"),
        (ip.is_loopback, "loopback address"),
        (ip.is_link_local, "link-local address"),
        (ip.is_site_local, "site-local address"),
        (ip.is_multicast, "multicast address"),
        (ip in _NAT64_LOCAL, "local-use NAT64 address"),
        (ip.is_private, "private address"),
        (ip.is_reserved, "reserved address"),
        (not ip.is_global, "not a public address"),
    )
    return next((reason for hit, reason in checks if hit), None)


def host_name_block_reason(host: str, allow: Allowlist = EMPTY_ALLOWLIST) -> str | None:
    """Why a (lower-case ASCII) host *name* is refused before any resolution, or None."""
    if allow.allows_host(host):
        return None
    if host in BLOCKED_HOST_NAMES:
        return "internal host name"
    if any(host.endswith(suffix) for suffix in BLOCKED_HOST_SUFFIXES):
        return "internal host name"
    if "." not in host:
        return "single-label host name"
    return None


@dataclass(frozen=True)
class CheckedURL:
    """A URL that passed :func:`parse_url`'s text rules, with its host parsed.

    ``ip`` is set when the host is an IP literal (in whatever spelling); ``host`` is then its
    canonical text, else the lower-case ASCII (IDNA) host name. ``data:`` URLs have ``host == ""``.
    """

    url: str
    scheme: str
    host: str
    port: int
    ip: IPAddress | None


def _ascii_host(raw: str) -> str:
    host = raw.lower()
    if not host.isascii():
        try:
            host = idna.encode(host, uts46=True).decode("ascii").lower()
        except idna.IDNAError:
            raise ValueError("host is not a valid internationalised name") from None
    return host[:-1] if host.endswith(".") else host


def _parse_ipv6_literal(bracketed: str) -> tuple[str, IPAddress]:
    inner = bracketed[1:-1]
    if "%" in inner:
        inner, _, zone = inner.partition("%")
        zone = zone.removeprefix("25")
        if not re.fullmatch(r"[A-Za-z0-9._~-]+", zone):
            raise ValueError("host has a malformed IPv6 zone id")
    try:
        v6 = ipaddress.IPv6Address(inner)
    except ValueError:
        raise ValueError("host is a malformed IPv6 literal") from None
    return v6.compressed, v6


def _parse_host(netloc_host: str) -> tuple[str, IPAddress | None]:
    if netloc_host.startswith("["):
        return _parse_ipv6_literal(netloc_host)
    if "%" in netloc_host:
        raise ValueError("host must not be percent-encoded")
    host = _ascii_host(netloc_host)
    if not host or ".." in host or host.startswith("."):
        raise ValueError("URL has no valid host")
    v4 = parse_ipv4_loose(host)
    if v4 is not None:
        return str(v4), v4
    labels = host.split(".")
    if not all(_LABEL.match(label) for label in labels):
        raise ValueError("host is not a valid host name")
    if labels[-1].isdigit() or labels[-1].startswith("0x"):
        raise ValueError("host name must not end in a numeric label")
    return host, None


def _split_netloc_host(netloc: str) -> str:
    if netloc.startswith("["):
        end = netloc.find("]")
        rest = netloc[end + 1 :] if end > 0 else "x"
        if rest and not rest.startswith(":"):
            raise ValueError("malformed IPv6 host")
        return netloc[: end + 1]
    return netloc.rsplit(":", 1)[0] if ":" in netloc else netloc


def parse_url(url: str, *, allow_data: bool = False, max_length: int = DEFAULT_MAX_URL_LENGTH) -> CheckedURL:
    """Check the text rules of ``url`` (not the address ranges) and return its parsed parts.

    Raises :class:`ValueError` with a message that names the problem but never echoes the URL
    (it may carry a pre-signed token). ``data:`` URLs raise too unless ``allow_data``.
    """
    if not isinstance(url, str):
        raise ValueError("must be a string")
    if len(url) > max_length:
        raise ValueError(f"URL is {len(url)} characters; the limit is {max_length}")
    if _FORBIDDEN_CHARS.search(url):
        raise ValueError("URL contains whitespace, a backslash or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"malformed URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme == "data" and allow_data:
        return CheckedURL(url, scheme, "", 0, None)
    if scheme not in ("http", "https"):
        hint = " or a data: URI" if allow_data else ""
        raise ValueError(f"must be an http(s) URL{hint}")
    if "@" in parts.netloc:
        raise ValueError("URL must not contain userinfo (user:password@)")
    netloc_host = _split_netloc_host(parts.netloc)
    if not netloc_host:
        raise ValueError("URL has no host")
    host, ip = _parse_host(netloc_host)
    return CheckedURL(url, scheme, host, port or (443 if scheme == "https" else 80), ip)


def validate_url(
    url: str,
    *,
    allow: Allowlist = EMPTY_ALLOWLIST,
    max_length: int = DEFAULT_MAX_URL_LENGTH,
    allow_data: bool,
) -> str:
    """Return ``url`` when a job may name it; else raise :class:`ValueError` with the reason
    (without a field name and never echoing the URL)."""
    reason = judge(parse_url(url, allow_data=allow_data, max_length=max_length), allow)
    if reason is not None:
        raise ValueError(f"host not allowed ({reason})")
    return url


def check_url(
    url: str,
    *,
    field: str,
    allow: Allowlist = EMPTY_ALLOWLIST,
    max_length: int = DEFAULT_MAX_URL_LENGTH,
    allow_data: bool = False,
) -> str:
    """Return ``url`` unchanged when a job may name it in ``field``; raise :class:`ValueError`
    whose message is ``"<field>: <reason>"`` (never the URL itself).

    A host *name* that passes is checked again at fetch time, address by address, by the guarded
    fetcher (``worker/contracts/netguard.py``).
    """
    try:
        return validate_url(url, allow=allow, max_length=max_length, allow_data=allow_data)
    except ValueError as exc:
        raise ValueError(f"{field}: {exc}") from None


def judge(parsed: CheckedURL, allow: Allowlist) -> str | None:
    """The reason the parsed URL's host is refused (IP ranges, internal names), or None."""
    if parsed.scheme == "data":
        return None
    if parsed.ip is not None:
        return address_block_reason(parsed.ip, allow)
    return host_name_block_reason(parsed.host, allow)


def check_media_url(url: str, *, field: str, policy: UrlPolicy | None = None) -> str:
    """:func:`check_url` for ``video_url``/``image_url`` (``data:`` URIs allowed)."""
    policy = policy or UrlPolicy()
    return check_url(url, field=field, allow=policy.allow, max_length=policy.max_length, allow_data=True)


def check_callback_url(url: str, *, policy: UrlPolicy | None = None) -> str:
    """:func:`check_url` for ``callback_url`` (http(s) only, never ``data:``). For the producer."""
    policy = policy or UrlPolicy()
    return check_url(url, field="callback_url", allow=policy.allow, max_length=policy.max_length)
