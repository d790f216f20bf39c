"""Worker presence: each process publishes its effective limits and a heartbeat to Redis.

Keys (prefix ``P``):

- ``P:procs``: ZSET process id -> time of its last beat (ms of Redis ``TIME``, never a worker clock).
- ``P:proc:{process_id}``: STRING, the process's JSON info (:func:`effective_limits`); it expires
  ``heartbeat_ttl_ms`` after the last beat.

A process is *alive* while its last beat is younger than ``heartbeat_ttl_ms``. Every beat also
sweeps entries older than that, so the ZSET never grows with dead processes. Readers:
:meth:`Presence.alive` (with the published info; ``reframe status --cluster``),
:meth:`Presence.alive_ids` and :meth:`Presence.is_alive` (to take over a dead process's work within
``heartbeat_ttl_ms``).

A worker beats from :class:`PresenceBeat`, a daemon thread started by
:func:`worker.services.start_background`; it keeps beating while the worker drains (state
``draining``) and removes its entry only at shutdown, so "alive" means "may still be running tasks".
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import redis
from redis.commands.core import Script

from config import Settings
from worker.contracts.keys import Keys
from worker.contracts.lua import load_lua, script_path

log = logging.getLogger(__name__)

STATE_RUNNING = "running"
STATE_DRAINING = "draining"

#: The published limits that must agree across a cluster (``reframe status --cluster`` compares them).
LIMIT_FIELDS = (
    "max_concurrency",
    "reserved_high_slots",
    "submit_rate_per_s",
    "submit_burst",
    "budget_daily_usd",
    "budget_monthly_usd",
    "price_per_s_usd",
    "queue",
)


def text(value: Any) -> str:
    """A Redis reply as ``str`` (decoded or not)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def as_int(value: Any) -> int:
    """A Redis integer or numeric reply as ``int``."""
    return int(text(value)) if isinstance(value, bytes) else int(value)


def package_version() -> str:
    """The installed ``reframe-cluster`` version ('unknown' when running from a bare checkout)."""
    try:
        return metadata.version("reframe-cluster")
    except metadata.PackageNotFoundError:
        return "unknown"


def effective_limits(settings: Settings, *, hostname: str | None = None) -> dict[str, Any]:
    """What a worker process publishes: the limits it enforces and who it is."""
    return {
        "max_concurrency": settings.slot_capacity,  # the sum of the fal accounts' caps
        "reserved_high_slots": settings.reserved_high_slots,
        "submit_rate_per_s": settings.submit_rate_per_s,
        "submit_burst": settings.submit_burst,
        "budget_daily_usd": settings.budget_daily_usd,
        "budget_monthly_usd": settings.budget_monthly_usd,
        "price_per_s_usd": settings.price_per_s_usd,
        "queue": settings.queue_name,
        "concurrency": settings.worker_concurrency,
        "version": package_version(),
        "hostname": hostname or socket.gethostname(),
    }


@dataclass(frozen=True)
class ProcessInfo:
    """One live process as published: its id, last beat (ms, Redis time) and info."""

    process_id: str
    last_beat_ms: int
    info: dict[str, Any]

    @property
    def state(self) -> str:
        """``running`` or ``draining`` (shutting down, may still finish tasks)."""
        return str(self.info.get("state", STATE_RUNNING))


class Presence:
    """Heartbeats and published limits of worker processes, over one Redis client."""

    def __init__(self, client: redis.Redis, prefix: str, *, ttl_ms: int) -> None:
        self.r = client
        self.procs_key = f"{prefix}:procs"
        self._info_prefix = f"{prefix}:proc:"
        self.ttl_ms = ttl_ms
        self._beat: Script = client.register_script(load_lua(script_path(__file__, "presence_beat")))
        self._alive: Script = client.register_script(load_lua(script_path(__file__, "presence_alive")))
        self._sweep: Script = client.register_script(load_lua(script_path(__file__, "presence_sweep")))

    @classmethod
    def from_settings(cls, client: redis.Redis, settings: Settings) -> Presence:
        """A presence over ``client`` with the prefix and TTL of ``settings``."""
        return cls(client, Keys(settings.key_prefix).root, ttl_ms=settings.heartbeat_ttl_ms)

    def info_key(self, process_id: str) -> str:
        """The key of one process's published info."""
        return self._info_prefix + process_id

    def beat(self, process_id: str, info: dict[str, Any]) -> int:
        """Publish ``info`` and a beat for ``process_id``; sweep dead entries. Returns the beat time (ms)."""
        reply = self._beat(
            keys=[self.procs_key, self.info_key(process_id)],
            args=[process_id, json.dumps(info, sort_keys=True), self.ttl_ms],
        )
        return as_int(reply[0])

    def remove(self, process_id: str) -> None:
        """Forget ``process_id`` at once (a clean shutdown)."""
        pipe = self.r.pipeline(transaction=True)
        pipe.zrem(self.procs_key, process_id)
        pipe.delete(self.info_key(process_id))
        pipe.execute()

    def sweep(self) -> int:
        """Remove entries whose last beat is older than the TTL; return how many."""
        return as_int(self._sweep(keys=[self.procs_key], args=[self.ttl_ms]))

    def _beats(self, window_ms: int | None, process_id: str = "") -> list[tuple[str, int]]:
        reply = self._alive(keys=[self.procs_key], args=[window_ms or self.ttl_ms, process_id])
        rows = list(reply[1:])
        return [(text(rows[i]), as_int(rows[i + 1])) for i in range(0, len(rows), 2)]

    def alive_ids(self, window_ms: int | None = None) -> list[str]:
        """Ids of the processes that beat within ``window_ms`` (default: the TTL)."""
        return [pid for pid, _ in self._beats(window_ms)]

    def is_alive(self, process_id: str, window_ms: int | None = None) -> bool:
        """True if ``process_id`` beat within ``window_ms`` (default: the TTL)."""
        return bool(self._beats(window_ms, process_id))

    def alive(self, window_ms: int | None = None) -> list[ProcessInfo]:
        """The live processes with their published info, ordered by process id."""
        beats = sorted(self._beats(window_ms))
        if not beats:
            return []
        raw = self.r.mget([self.info_key(pid) for pid, _ in beats])
        out = []
        for (pid, beat_ms), blob in zip(beats, raw, strict=True):
            try:
                info = json.loads(text(blob)) if blob is not None else {}
            except ValueError:
                info = {}
            out.append(ProcessInfo(pid, beat_ms, info if isinstance(info, dict) else {}))
        return out


class PresenceBeat:
    """A daemon thread that beats every ``interval_ms`` for one process until :meth:`stop`."""

    def __init__(
        self, presence: Presence, process_id: str, info: dict[str, Any], *, interval_ms: int
    ) -> None:
        self.presence = presence
        self.process_id = process_id
        self._info = dict(info, state=STATE_RUNNING)
        self._interval_s = interval_ms / 1000
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="reframe-presence", daemon=True)

    def start(self) -> None:
        """Beat once now (so the process is visible at once), then every interval."""
        self._beat_once()
        self._thread.start()

    def set_state(self, state: str) -> None:
        """Publish a new state (e.g. ``draining``) with the next beat, which happens now."""
        with self._lock:
            self._info["state"] = state
        self._beat_once()

    def _beat_once(self) -> None:
        with self._lock:
            info = dict(self._info)
        try:
            self.presence.beat(self.process_id, info)
        except redis.RedisError as exc:
            # Redis away: others will see this process as dead after the TTL, which is the truth
            # as far as they can tell. Keep trying.
            log.warning("presence beat failed: %s", type(exc).__name__)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._beat_once()

    def stop(self, *, remove: bool = True) -> None:
        """Stop beating and (by default) remove this process's entry (idempotent)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        if remove:
            try:
                self.presence.remove(self.process_id)
            except redis.RedisError as exc:
                log.warning("presence removal failed (%s); the entry expires on its own", type(exc).__name__)
