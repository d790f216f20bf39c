"""Every Redis client of ours, and the Celery broker's, made from the settings in one place.

With ``REFRAME_REDIS_SENTINELS`` set, clients come from redis-py's Sentinel support and the broker
uses kombu's ``sentinel://`` transport: both ask the Sentinels for the primary named
``REFRAME_REDIS_MASTER_NAME`` and follow it through a failover (a connection to a demoted primary
is dropped and the next command asks the Sentinels again). Without it, ``REFRAME_REDIS_URL`` names
one Redis. ``REFRAME_REDIS_PASSWORD`` wins over a password in the URL; the Sentinels' own password is
``REFRAME_REDIS_SENTINEL_PASSWORD``. Nothing connects until the first command.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.sentinel import Sentinel

from config import Settings

__all__ = ["async_redis_client", "broker_transport_options", "broker_url", "redis_client"]


def _url_options(settings: Settings) -> dict[str, Any]:
    """Database, user, password and TLS of ``REFRAME_REDIS_URL``, for Sentinel-managed connections."""
    parts = urlsplit(settings.redis_url)
    db = (parts.path or "/0").lstrip("/") or "0"
    out: dict[str, Any] = {"db": int(db) if db.isdigit() else 0}
    if parts.username:
        out["username"] = parts.username
    password = settings.redis_password_value
    if password:
        out["password"] = password
    if parts.scheme == "rediss":
        out["ssl"] = True
    return out


def _sentinel_kwargs(settings: Settings, options: dict[str, Any]) -> dict[str, Any]:
    """How we talk to the Sentinels themselves: their password and our timeouts."""
    out: dict[str, Any] = {
        "socket_timeout": options.get("socket_timeout") or settings.redis_socket_timeout_s,
        "socket_connect_timeout": options.get("socket_connect_timeout") or settings.redis_socket_timeout_s,
    }
    if settings.redis_sentinel_password is not None and settings.redis_sentinel_password.get_secret_value():
        out["password"] = settings.redis_sentinel_password.get_secret_value()
    return out


def redis_client(settings: Settings, **options: Any) -> redis.Redis:
    """A client of the primary (``options`` are redis-py connection options: timeouts, pool size...)."""
    if settings.sentinel_addresses:
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            settings.sentinel_addresses,
            sentinel_kwargs=_sentinel_kwargs(settings, options),
            **{**_url_options(settings), **options},
        )
        client: redis.Redis = sentinel.master_for(settings.redis_master_name)  # type: ignore[no-untyped-call]
        return client
    pool = redis.ConnectionPool.from_url(settings.redis_url, **options)
    if settings.redis_password is not None and settings.redis_password.get_secret_value():
        pool.connection_kwargs["password"] = settings.redis_password.get_secret_value()
    return redis.Redis.from_pool(pool)


def async_redis_client(settings: Settings, **options: Any) -> aioredis.Redis:
    """:func:`redis_client` for asyncio (the HTTP API's event loop)."""
    if settings.sentinel_addresses:
        sentinel = AsyncSentinel(  # type: ignore[no-untyped-call]
            settings.sentinel_addresses,
            sentinel_kwargs=_sentinel_kwargs(settings, options),
            **{**_url_options(settings), **options},
        )
        aclient: aioredis.Redis = sentinel.master_for(settings.redis_master_name)
        return aclient
    pool = aioredis.ConnectionPool.from_url(settings.redis_url, **options)
    if settings.redis_password is not None and settings.redis_password.get_secret_value():
        pool.connection_kwargs["password"] = settings.redis_password.get_secret_value()
    return aioredis.Redis.from_pool(pool)


def broker_url(settings: Settings) -> str:
    """The Celery broker URL: ``REFRAME_REDIS_URL`` (password from ``REFRAME_REDIS_PASSWORD`` when set),
    or one ``sentinel://`` URL per Sentinel joined by ``;`` (kombu's Sentinel transport)."""
    password = settings.redis_password_value
    if settings.sentinel_addresses:
        db = _url_options(settings)["db"]
        auth = f":{quote(password, safe='')}@" if password else ""
        return ";".join(f"sentinel://{auth}{host}:{port}/{db}" for host, port in settings.sentinel_addresses)
    if settings.redis_password is None or not settings.redis_password.get_secret_value():
        return settings.redis_url
    parts = urlsplit(settings.redis_url)
    if parts.scheme not in {"redis", "rediss"}:
        return settings.redis_url
    host = parts.netloc.rsplit("@", 1)[-1]
    user = quote(parts.username or "", safe="")
    return parts._replace(netloc=f"{user}:{quote(password or '', safe='')}@{host}").geturl()


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """The Sentinel part of kombu's transport options (empty for a plain Redis)."""
    if not settings.sentinel_addresses:
        return {}
    sentinel: dict[str, Any] = {}
    if settings.redis_sentinel_password is not None and settings.redis_sentinel_password.get_secret_value():
        sentinel["password"] = settings.redis_sentinel_password.get_secret_value()
    return {"master_name": settings.redis_master_name, "sentinel_kwargs": sentinel}
