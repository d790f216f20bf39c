"""What the API's routes share: settings, Redis clients, the producer, keys, tenants, limits.

One :class:`Services` per app, built by :func:`reframe.api.app.create_app` and kept on
``app.state.services`` (routers of other modules, e.g. ``reframe/api/fal_webhook.py``, find it
there). Authentication and the per-key rate limit are one FastAPI dependency made by
:func:`require` (one Redis round trip, ``reframe/api/lua/authorize.lua``).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

import redis
import redis.asyncio as aioredis
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from config import Settings
from producer import Producer
from reframe.api.keys import Authorizer, KeyStore, Principal, Scope
from reframe.api.problems import ProblemError
from reframe.api.tenancy import TenantIndex
from worker.contracts.connect import async_redis_client, redis_client
from worker.contracts.netguard import GuardedFetcher
from worker.flow import FlowControl


@dataclass
class Services:
    """Everything a request may need, built once per process."""

    settings: Settings
    r: redis.Redis
    ar: aioredis.Redis
    producer: Producer
    keys: KeyStore
    tenants: TenantIndex
    flow: FlowControl
    fetcher: GuardedFetcher
    authorizer: Authorizer

    @classmethod
    def build(cls, settings: Settings) -> Services:
        """Clients and helpers for ``settings`` (connections open lazily, on first use)."""
        r = redis_client(
            settings,
            socket_timeout=settings.redis_socket_timeout_s,
            health_check_interval=25,
            max_connections=256,
        )
        ar = async_redis_client(settings, socket_timeout=settings.redis_socket_timeout_s)
        keys = KeyStore(r, prefix=settings.key_prefix)
        authorizer = Authorizer(ar, keys, rate_per_s=settings.api_rate_per_s, burst=settings.api_rate_burst)
        return cls(
            settings=settings,
            r=r,
            ar=ar,
            producer=Producer(settings, client=r),
            keys=keys,
            tenants=TenantIndex(r, settings),
            flow=FlowControl.from_settings(r, settings),
            fetcher=GuardedFetcher.from_settings(settings),
            authorizer=authorizer,
        )

    async def aclose(self) -> None:
        """Close the Redis pools."""
        self.r.close()
        self.fetcher.close()
        await self.ar.aclose()


def services(request: Request) -> Services:
    """The app's :class:`Services`."""
    found: Services = request.app.state.services
    return found


_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer rfk_...`.")
Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _unauthorized(detail: str) -> ProblemError:
    return ProblemError(
        401, "unauthorized", "Unauthorized", detail, headers={"WWW-Authenticate": 'Bearer realm="reframe"'}
    )


async def authenticate(request: Request, credentials: HTTPAuthorizationCredentials | None) -> Principal:
    """The caller's principal, after the per-key rate limit; raises 401 or 429 problems."""
    svc = services(request)
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise _unauthorized("send an API key: Authorization: Bearer <token>")
    found = await svc.authorizer.authorize(credentials.credentials)
    principal = found.principal
    if principal is None:
        raise _unauthorized("the API key is unknown or revoked")
    request.state.principal = principal  # for the access log (key id and tenant, never the token)
    if not found.allowed:
        retry_after_s = max(1, math.ceil(found.retry_after_ms / 1000))
        raise ProblemError(
            429,
            "rate-limited",
            "Too many requests",
            f"this API key's request rate is exhausted; retry in {retry_after_s} s",
            headers={"Retry-After": str(retry_after_s)},
        )
    return principal


def require(scope: Scope) -> Callable[..., Awaitable[Principal]]:
    """A dependency: the caller must hold ``scope`` (admin holds every scope)."""

    async def dependency(request: Request, credentials: Bearer) -> Principal:
        principal = await authenticate(request, credentials)
        if not principal.allows(scope):
            raise ProblemError(403, "forbidden", "Forbidden", f"this API key lacks the {scope.value!r} scope")
        return principal

    return dependency
