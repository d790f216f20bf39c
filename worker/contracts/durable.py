"""Writes that survive a failover: a write counts only once enough replicas acknowledged it.

Redis replicates asynchronously: the primary answers a write before any replica has it, so a
failover to a replica (or a restart without the AOF) can lose an answered write. ``WAIT n ms``
blocks until ``n`` replicas acknowledged every write the *same connection* made before it (the
connection's replication offset), so the write and the ``WAIT`` must share one connection:
:meth:`Replication.pinned` lends one connection of the pool for both. Replication is one ordered
stream, so acknowledging a write also acknowledges every write the primary took before it (the
slot and budget reservation made earlier for the same job, for instance).

On Redis 7.2 and later, ``WAITAOF 1 n ms`` is used when the primary runs an AOF: the write is then
also fsynced to the primary's and ``n`` replicas' AOF (every node of a production Redis runs one,
since any may be promoted). Older servers (the tests' redis-server 6.2) get ``WAIT``.

If the connection broke and was re-made between the write and the ``WAIT`` (redis-py retries a
command on a fresh connection), a ``WAIT`` on the new connection would cover nothing and answer at
once; such a write counts as not acknowledged. Callers take their conservative path then
(README, "Redis durability").

With one replica, the replica that acknowledged is the one Sentinel can promote, so an
acknowledged write survives the primary's loss. With more, Sentinel promotes the reachable replica
with the largest replication offset, which holds every write any replica acknowledged; only a
replica that acknowledged and was then cut off as well can take an acknowledged write with it,
which is why ``REFRAME_REDIS_MIN_REPLICAS`` is best set to the number of replicas minus the number
that may be down at once, and why Sentinel needs a quorum.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio as aioredis

log = logging.getLogger(__name__)

__all__ = ["NotReplicated", "Replication"]

#: First server version with ``WAITAOF``.
WAITAOF_VERSION = (7, 2)


class NotReplicated(redis.RedisError):
    """A write was not acknowledged by ``wanted`` replicas within the wait.

    The write may still be on the primary (and may or may not survive a failover); the message says
    which write, how many replicas acknowledged it and how many were wanted. Never names a secret.
    """

    def __init__(self, what: str, *, acked: int, wanted: int, timeout_ms: int, detail: str = "") -> None:
        self.what = what
        self.acked = acked
        self.wanted = wanted
        extra = f" ({detail})" if detail else ""
        super().__init__(
            f"{what}: {acked} of {wanted} Redis replicas acknowledged it within {timeout_ms} ms"
            f"{extra} (REFRAME_REDIS_MIN_REPLICAS)"
        )


def _version(text: str) -> tuple[int, int]:
    parts = [*text.split("."), "0", "0"][:2]
    try:
        return int(parts[0]), int(parts[1])
    except ValueError:
        return (0, 0)


def _socket_of(client: redis.Redis | aioredis.Redis) -> object:
    """The socket (asyncio: the stream writer) under a single-connection client; a new object after
    any reconnect, None before the first command."""
    conn: Any = client.connection
    if conn is None:
        return None
    return getattr(conn, "_sock", None) or getattr(conn, "_writer", None)


@dataclass
class Replication:
    """How many replicas must acknowledge a write, and how long to wait (0 replicas: no wait)."""

    min_replicas: int
    timeout_ms: int
    _use_waitaof: bool | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def on(self) -> bool:
        """True when writes wait for replicas."""
        return self.min_replicas > 0

    @contextlib.contextmanager
    def pinned(self, client: redis.Redis) -> Iterator[redis.Redis]:
        """A client on one connection of ``client``'s pool, for a write and its :meth:`confirm`.

        Without replicas to wait for, ``client`` itself (no connection is set aside).
        """
        if not self.on:
            yield client
            return
        one = redis.Redis(connection_pool=client.connection_pool, single_connection_client=True)
        try:
            yield one
        finally:
            one.close()  # gives the connection back to the shared pool

    def confirm(self, pinned: redis.Redis, what: str) -> None:
        """Wait until ``min_replicas`` acknowledged every write ``pinned`` made (call it right after
        the write, nothing in between); raise :class:`NotReplicated` otherwise."""
        if not self.on:
            return
        # No command ran since the write, so this is the socket the write went over.
        before = _socket_of(pinned)
        try:
            if self._waitaof(pinned):
                local, acked = pinned.waitaof(1, self.min_replicas, self.timeout_ms)
                if int(local) < 1:
                    acked = 0
            else:
                acked = pinned.wait(self.min_replicas, self.timeout_ms)
        except redis.RedisError as exc:
            raise NotReplicated(
                what, acked=0, wanted=self.min_replicas, timeout_ms=self.timeout_ms, detail=type(exc).__name__
            ) from exc
        if before is None or _socket_of(pinned) is not before:
            raise NotReplicated(
                what,
                acked=0,
                wanted=self.min_replicas,
                timeout_ms=self.timeout_ms,
                detail="the connection was re-made after the write",
            )
        if int(acked) < self.min_replicas:
            raise NotReplicated(what, acked=int(acked), wanted=self.min_replicas, timeout_ms=self.timeout_ms)

    @contextlib.asynccontextmanager
    async def pinned_async(self, client: aioredis.Redis) -> AsyncIterator[aioredis.Redis]:
        """:meth:`pinned` for an asyncio client."""
        if not self.on:
            yield client
            return
        one = aioredis.Redis(connection_pool=client.connection_pool, single_connection_client=True)
        try:
            yield one
        finally:
            await one.aclose()

    async def confirm_async(self, pinned: aioredis.Redis, what: str) -> None:
        """:meth:`confirm` for an asyncio client (``WAIT`` only: the API's enqueue)."""
        if not self.on:
            return
        before = _socket_of(pinned)
        try:
            acked = await pinned.wait(self.min_replicas, self.timeout_ms)
        except redis.RedisError as exc:
            raise NotReplicated(
                what, acked=0, wanted=self.min_replicas, timeout_ms=self.timeout_ms, detail=type(exc).__name__
            ) from exc
        if before is None or _socket_of(pinned) is not before:
            raise NotReplicated(
                what,
                acked=0,
                wanted=self.min_replicas,
                timeout_ms=self.timeout_ms,
                detail="the connection was re-made after the write",
            )
        if int(acked) < self.min_replicas:
            raise NotReplicated(what, acked=int(acked), wanted=self.min_replicas, timeout_ms=self.timeout_ms)

    def _waitaof(self, client: redis.Redis) -> bool:
        """Whether the server has ``WAITAOF`` and runs an AOF (asked once per process)."""
        with self._lock:
            if self._use_waitaof is None:
                info: Any = client.info("server")
                persistence: Any = client.info("persistence")
                self._use_waitaof = _version(str(info.get("redis_version", "0"))) >= WAITAOF_VERSION and bool(
                    int(persistence.get("aof_enabled", 0))
                )
            return self._use_waitaof
