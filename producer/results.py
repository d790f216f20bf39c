"""Consume the result stream of terminal job events with a Redis consumer group.

Event schema (version ``v`` = "1"), every field a string:

| field | meaning |
|---|---|
| `v` | schema version, "1" |
| `job_id` | the job |
| `state` | SUCCEEDED, FAILED or CANCELLED |
| `finished_at_ms`, `created_at_ms` | Redis server time, ms since the epoch |
| `attempts` | fal submits made for the job |
| `priority` | high, normal or low |
| `metadata` | the producer's metadata, JSON |
| `video_url`, `content_type`, `file_size` | SUCCEEDED only |
| `cost_usd` | dollars charged (settled), when known |
| `error_type`, `error_message` | FAILED and CANCELLED only (fal's message kept) |
| `dead_letter` | "1" when the job went to the dead-letter set |

Delivery is at-least-once per consumer group: acknowledge after processing (the iterator does it
after your loop body returns when ``auto_ack`` is true); unacknowledged events of a dead consumer
are claimed by the next reader after ``claim_idle_ms``.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis

from config import Settings
from worker.contracts.connect import redis_client
from worker.contracts.keys import Keys


@dataclass(frozen=True)
class ResultEvent:
    """One terminal event from the stream."""

    stream_id: str
    fields: dict[str, str]

    @property
    def job_id(self) -> str:
        """The job id."""
        return self.fields.get("job_id", "")

    @property
    def state(self) -> str:
        """SUCCEEDED, FAILED or CANCELLED."""
        return self.fields.get("state", "")

    @property
    def metadata(self) -> dict[str, Any]:
        """The producer's metadata."""
        try:
            return dict(json.loads(self.fields.get("metadata") or "{}"))
        except ValueError:
            return {}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class ResultConsumer:
    """Read terminal events through a consumer group (created on first use, from the stream start)."""

    def __init__(
        self,
        settings: Settings,
        group: str,
        consumer: str | None = None,
        *,
        client: redis.Redis | None = None,
        start_id: str = "0",
        claim_idle_ms: int = 60_000,
    ) -> None:
        self.r = client or redis_client(settings, socket_timeout=None)
        self.stream = Keys(settings.key_prefix).events
        self.group = group
        self.consumer = consumer or socket.gethostname()
        self.claim_idle_ms = claim_idle_ms
        try:
            self.r.xgroup_create(self.stream, group, id=start_id, mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read(self, *, count: int = 100, block_ms: int | None = 1000) -> list[ResultEvent]:
        """New events for this consumer (claiming idle ones of dead consumers first)."""
        claimed: Any = self.r.xautoclaim(
            self.stream, self.group, self.consumer, self.claim_idle_ms, "0-0", count=count
        )
        entries = list(claimed[1]) if claimed and len(claimed) > 1 else []
        if not entries:
            got: Any = self.r.xreadgroup(
                self.group, self.consumer, {self.stream: ">"}, count=count, block=block_ms
            )
            entries = [e for _s, items in got or [] for e in items]
        return _events(entries)

    def ack(self, *events: ResultEvent) -> None:
        """Acknowledge processed events."""
        if events:
            self.r.xack(self.stream, self.group, *[e.stream_id for e in events])

    def follow(self, *, auto_ack: bool = True, block_ms: int = 1000) -> Iterator[ResultEvent]:
        """Yield events forever; each is acknowledged once the consumer asks for the next one."""
        while True:
            for event in self.read(block_ms=block_ms):
                yield event
                if auto_ack:
                    self.ack(event)


def _events(entries: Any) -> list[ResultEvent]:
    return [
        ResultEvent(_text(sid), {_text(k): _text(v) for k, v in fields.items()})
        for sid, fields in entries
        if fields
    ]
