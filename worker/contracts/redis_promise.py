"""What the Redis we were given promises about keeping a write, checked when a worker or the API starts.

Never paying twice rests on Redis keeping every write it acknowledged: the SUBMITTING intent, the
fal receipt, the budget counters and the idempotency keys (README, "Redis durability"). A Redis
without an AOF forgets everything since its last snapshot when it restarts; one with ``appendfsync
no`` (or ``everysec``, for up to a second) loses what the OS had not flushed when its machine dies;
a replica promoted by a failover lacks what it had not received. :func:`read_promise` reads what the
server says (``INFO persistence``, ``INFO replication`` and ``CONFIG GET appendfsync``, which managed
offerings often refuse) and :func:`risks` names every way it can lose a write we rely on, each in
one line. With ``REFRAME_PRODUCTION=true`` a risk refuses the start; otherwise it is logged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

__all__ = ["RedisPromise", "read_promise", "risks"]


@dataclass(frozen=True)
class RedisPromise:
    """What one Redis primary said about its persistence and replicas."""

    role: str
    aof_enabled: bool
    #: ``always``, ``everysec`` or ``no``; None when ``CONFIG GET`` is refused (managed offerings).
    appendfsync: str | None
    #: Replicas connected and in sync (``state=online``).
    replicas: int


def read_promise(client: redis.Redis) -> RedisPromise:
    """Ask ``client``'s server (three commands; ``CONFIG GET`` may be refused and is then unknown)."""
    persistence: Any = client.info("persistence")
    replication: Any = client.info("replication")
    try:
        config: Any = client.config_get("appendfsync")
        fsync = config.get("appendfsync") or config.get(b"appendfsync")
        appendfsync = fsync.decode() if isinstance(fsync, bytes) else fsync
    except redis.ResponseError:  # CONFIG renamed or disabled (ElastiCache, Memorystore, ...)
        appendfsync = None
    online = 0
    for key, value in replication.items():
        if str(key).startswith("slave") and isinstance(value, dict) and value.get("state") == "online":
            online += 1
    return RedisPromise(
        role=str(replication.get("role", "?")),
        aof_enabled=bool(int(persistence.get("aof_enabled", 0))),
        appendfsync=str(appendfsync) if appendfsync is not None else None,
        replicas=online,
    )


def risks(promise: RedisPromise, *, min_replicas: int) -> list[str]:
    """Every way ``promise`` can lose an acknowledged write we rely on, one line each (empty: none)."""
    out: list[str] = []
    if promise.role != "master":
        out.append(f"the Redis given is a {promise.role}, not the primary")
    if not promise.aof_enabled:
        out.append(
            "AOF is off (appendonly no): a restart loses every write since the last snapshot "
            "(SUBMITTING intents, receipts, budget counters, idempotency keys)"
        )
    if promise.appendfsync == "no":
        out.append("appendfsync no: a crash of the machine loses writes the OS had not flushed")
    if min_replicas == 0:
        if promise.appendfsync is None:
            out.append(
                "appendfsync cannot be read (CONFIG GET refused) and REFRAME_REDIS_MIN_REPLICAS=0: "
                "nothing shows that an acknowledged write survives a crash"
            )
        elif promise.appendfsync == "everysec":
            out.append(
                "appendfsync everysec and REFRAME_REDIS_MIN_REPLICAS=0: a crash loses up to a second "
                "of acknowledged writes (use appendfsync always, or replicas)"
            )
    if promise.replicas < min_replicas:
        out.append(
            f"{promise.replicas} replica(s) in sync, REFRAME_REDIS_MIN_REPLICAS={min_replicas}: "
            "no submit could be acknowledged"
        )
    return out
