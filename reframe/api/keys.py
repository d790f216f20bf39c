"""API keys: created, listed and revoked with ``reframe keys``; checked on every request.

A token is ``rfk_<key id>_<secret>`` (the secret is 32 random bytes, URL-safe base64). Redis keeps
only its SHA-256 (a hash of a high-entropy token needs no slow KDF), the tenant it is bound to,
its scopes and its rate: ``P:api:key:<key id>`` (HASH) and ``P:api:keys`` (ZSET key id -> created
ms, for listing). The token is shown once, at creation. Revoking keeps the record (for the list)
with ``revoked_at_ms`` set; a revoked key is refused from the next request on (no cache). Each
request is checked and rate-limited by ``lua/authorize.lua`` (GCRA per key in ``P:api:rl:<key id>``).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis
import redis.asyncio as aioredis

from worker.contracts.keys import Keys
from worker.contracts.lua import load_lua, script_path
from worker.contracts.tenants import check_tenant

TOKEN_PREFIX = "rfk_"  # noqa: S105 - a public prefix that marks our tokens, not a secret
_TOKEN = re.compile(r"^rfk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
_KEY_ID = re.compile(r"^[0-9a-f]{16}$")


class Scope(StrEnum):
    """What a key may do. ``admin`` implies the others and sees every tenant."""

    ENQUEUE = "enqueue"
    """Create, cancel and replay jobs; quotes; uploads."""
    READ = "read"
    """Read jobs, their events and dead letters."""
    ADMIN = "admin"
    """Everything, across tenants."""


_SCOPE_NAMES = frozenset(s.value for s in Scope)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's id (not secret), tenant, scopes and rate."""

    key_id: str
    tenant: str
    scopes: frozenset[Scope]

    @property
    def admin(self) -> bool:
        """True for an admin key."""
        return Scope.ADMIN in self.scopes

    def allows(self, scope: Scope) -> bool:
        """True when the key holds ``scope`` (or is admin)."""
        return self.admin or scope in self.scopes


@dataclass(frozen=True)
class KeyInfo:
    """One key as listed (never the token)."""

    key_id: str
    tenant: str
    scopes: list[str]
    created_at_ms: int
    revoked_at_ms: int | None
    label: str
    rate_per_s: float | None
    burst: int | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return dict(self.__dict__)


def token_hash(token: str) -> str:
    """Hex SHA-256 of a token (what Redis stores)."""
    return hashlib.sha256(token.encode()).hexdigest()


class KeyStore:
    """API keys in Redis under the cluster's prefix."""

    def __init__(self, r: redis.Redis, *, prefix: str) -> None:
        self.r = r
        self.root = Keys(prefix).root
        self.index = f"{self.root}:api:keys"

    def key(self, key_id: str) -> str:
        """The HASH of one key."""
        return f"{self.root}:api:key:{key_id}"

    def create(
        self,
        tenant: str,
        scopes: Iterable[Scope | str],
        *,
        label: str = "",
        rate_per_s: float | None = None,
        burst: int | None = None,
    ) -> tuple[str, KeyInfo]:
        """Create a key; return ``(token, info)``. The token is not stored and cannot be shown again."""
        check_tenant(tenant)
        chosen = sorted({Scope(s).value for s in scopes})
        if not chosen:
            raise ValueError("scope: give at least one of enqueue, read, admin")
        if rate_per_s is not None and not rate_per_s > 0:
            raise ValueError("rate_per_s: must be > 0")
        if burst is not None and burst < 1:
            raise ValueError("burst: must be >= 1")
        key_id = secrets.token_hex(8)
        token = f"{TOKEN_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        now_ms = int(time.time() * 1000)
        fields: dict[str, str] = {
            "sha256": token_hash(token),
            "tenant": tenant,
            "scopes": ",".join(chosen),
            "created_at_ms": str(now_ms),
            "label": label,
            "rate_per_s": "" if rate_per_s is None else repr(float(rate_per_s)),
            "burst": "" if burst is None else str(int(burst)),
        }
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.key(key_id), mapping=dict(fields.items()))
        pipe.zadd(self.index, {key_id: now_ms})
        pipe.execute()
        return token, _info(key_id, fields)

    def list(self) -> list[KeyInfo]:
        """Every key, oldest first (revoked ones included)."""
        ids = [_text(x) for x in self.r.zrange(self.index, 0, -1)]
        pipe = self.r.pipeline(transaction=False)
        for key_id in ids:
            pipe.hgetall(self.key(key_id))
        out = []
        for key_id, raw in zip(ids, pipe.execute(), strict=True):
            if raw:
                out.append(_info(key_id, {_text(k): _text(v) for k, v in raw.items()}))
        return out

    def revoke(self, key_id: str) -> bool:
        """Revoke a key; False if there is no such key (revoking twice keeps the first time)."""
        if not _KEY_ID.fullmatch(key_id) or not self.r.exists(self.key(key_id)):
            return False
        self.r.hsetnx(self.key(key_id), "revoked_at_ms", str(int(time.time() * 1000)))
        return True

    def gcra_key(self, key_id: str) -> str:
        """The STRING holding a key's request-rate state (GCRA theoretical arrival time, us)."""
        return f"{self.root}:api:rl:{key_id}"


@dataclass(frozen=True)
class Authorization:
    """The outcome of one :meth:`Authorizer.authorize`."""

    principal: Principal | None
    """None: unknown key, wrong token or revoked."""
    allowed: bool = False
    retry_after_ms: int = 0


class Authorizer:
    """Checks a token and takes one request of its key's rate in one Redis round trip
    (``lua/authorize.lua``, on the asyncio client: no thread hop per request)."""

    def __init__(self, ar: aioredis.Redis, store: KeyStore, *, rate_per_s: float, burst: int) -> None:
        self.store = store
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._script = ar.register_script(load_lua(script_path(__file__, "authorize")))

    async def authorize(self, token: str) -> Authorization:
        """Who ``token`` is and whether its key may make a request now."""
        match = _TOKEN.fullmatch(token)
        if match is None:
            return Authorization(None)
        key_id = match.group(1)
        keys = [self.store.key(key_id), self.store.gcra_key(key_id)]
        reply: Any = await self._script(keys=keys, args=[token_hash(token), self.rate_per_s, self.burst])
        if int(reply[0]) == 0:
            return Authorization(None)
        scopes = frozenset(Scope(s) for s in _text(reply[2]).split(",") if s in _SCOPE_NAMES)
        principal = Principal(key_id=key_id, tenant=_text(reply[1]), scopes=scopes)
        return Authorization(principal, allowed=int(reply[3]) == 1, retry_after_ms=int(reply[4]))


def _info(key_id: str, h: dict[str, str]) -> KeyInfo:
    return KeyInfo(
        key_id=key_id,
        tenant=h.get("tenant", ""),
        scopes=[s for s in h.get("scopes", "").split(",") if s],
        created_at_ms=int(h.get("created_at_ms") or 0),
        revoked_at_ms=int(h["revoked_at_ms"]) if h.get("revoked_at_ms") else None,
        label=h.get("label", ""),
        rate_per_s=float(h["rate_per_s"]) if h.get("rate_per_s") else None,
        burst=int(h["burst"]) if h.get("burst") else None,
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
