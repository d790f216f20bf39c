"""Operator verbs of the output store: retry given-up copies, sign a URL, clean up past retention.

Used by ``reframe outputs retry|url|cleanup`` (reframe/cli.py). A retry only puts the copy back in
the copy outbox (``worker/lua/output_retry.lua``): the copy reads the output fal already returned
and never submits, so a retried copy is never paid again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis

from worker.contracts.keys import Keys
from worker.contracts.lua import load_lua, script_path
from worker.contracts.record import text
from worker.output_store import OutputStore, StoredObject


@dataclass(frozen=True)
class FailedCopy:
    """A given-up output copy: its event id, job, when it was given up and why."""

    event_id: str
    job_id: str
    failed_at_ms: int
    error: str


class OutputOps:
    """The copy outbox's operator side over one Redis client."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.r = client
        self.keys = keys
        self._retry = client.register_script(load_lua(script_path(__file__, "output_retry")))

    def failed(self, limit: int = 1000) -> list[FailedCopy]:
        """Given-up copies, oldest first."""
        k = self.keys
        rows: list[Any] = list(self.r.zrange(k.outputs_failed, 0, limit - 1, withscores=True))
        out = []
        for member, score in rows:
            event_id = text(member)
            raw: list[Any] = list(self.r.hmget(k.output_entry(event_id), ["job_id", "last_error"]))
            job_id = "" if raw[0] is None else text(raw[0])
            error = "" if raw[1] is None else text(raw[1])
            out.append(FailedCopy(event_id, job_id or event_id.rsplit(".", 1)[0], int(score), error))
        return out

    def event_id_of(self, job_id: str) -> str:
        """The event id of the job's current life ('' when the job is unknown)."""
        raw = self.r.hget(self.keys.job(job_id), "event_id")
        return text(raw) if raw is not None else ""

    def retry(self, event_id: str) -> bool:
        """Make a given-up copy due now with a fresh copy window; False when it is not given up."""
        k = self.keys
        job_id = event_id.rsplit(".", 1)[0]
        keys = [k.outputs_failed, k.outputs_pending, k.output_entry(event_id), k.job(job_id), k.outputs_since]
        return int(self._retry(keys=keys, args=[event_id])) == 1

    def pending(self) -> int:
        """How many copies are pending (first try or retrying)."""
        return int(self.r.zcard(self.keys.outputs_pending))

    def stored_key(self, job_id: str) -> str:
        """The stored output's key of a job ('' when its output was not copied)."""
        raw = self.r.hget(self.keys.job(job_id), "output_key")
        return text(raw) if raw is not None else ""


def cleanup(store: OutputStore, *, now: datetime, retention_s: float, dry_run: bool) -> list[StoredObject]:
    """Delete (unless ``dry_run``) the outputs written more than ``retention_s`` before ``now``;
    returns them."""
    expired = store.expired(now=now, retention_s=retention_s)
    if not dry_run:
        store.delete([o.key for o in expired])
    return expired
