"""JobRecord: the typed view of a job's hash (``{prefix}:job:{id}``).

The hash is the source of truth; this class only decodes it, so callers never repeat
``rec.get("priority") or "normal"``. Fields the worker writes and nobody reads stay in ``extra``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from worker.contracts.models import JobState, Priority

#: Fields stored as JSON text in the hash.
JSON_FIELDS = ("input", "metadata", "result", "error", "last_error")


def text(value: Any) -> str:
    """A Redis reply as ``str``."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _int(value: str | None, default: int = 0) -> int:
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        return default


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def _json(value: str | None) -> Any:
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return json.loads(value)
    return None


@dataclass(frozen=True)
class JobRecord:
    """One job as stored. ``attempt`` is the id of the fal attempt that owns the job right now.

    An attempt id is a number that only grows over every life of the job (replays included), so
    "attempt 7 of job J" names one gate run and at most one fal request for ever.
    """

    id: str
    state: JobState
    priority: Priority
    input: dict[str, Any]
    metadata: dict[str, Any]
    callback_url: str
    idempotency_key: str
    created_at_ms: int
    deadline_s: float | None
    attempts: int
    attempt: str
    replays: int
    fal_request_id: str
    cancel_requested: bool
    estimate_micro: int | None
    cost_actual_micro: int | None
    submit_started_at_ms: int
    submit_process: str
    deferred_total_ms: int
    timestamps: dict[str, int] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def life(self) -> int:
        """1 for the first life, 2 after one dead-letter replay, and so on."""
        return self.replays + 1

    @property
    def event_id(self) -> str:
        """The id of this life's terminal event (and of its callback): unique per life."""
        return f"{self.id}.{self.life}"

    def ts(self, state: JobState) -> int | None:
        """When the job last entered ``state`` (ms, Redis time), if it did."""
        return self.timestamps.get(state.value)

    def get(self, name: str) -> str:
        """A raw field that has no typed attribute ('' when absent)."""
        return self.extra.get(name, "")

    @classmethod
    def from_hash(cls, raw: Mapping[Any, Any]) -> JobRecord:
        """Decode ``HGETALL`` output (bytes or str)."""
        h = {text(k): text(v) for k, v in raw.items()}
        timestamps = {k[3:]: _int(v) for k, v in h.items() if k.startswith("ts_") and v}
        estimate = h.get("estimate_micro")
        actual = h.get("cost_actual_micro")
        return cls(
            id=h.get("id", ""),
            state=JobState(h.get("state") or JobState.QUEUED.value),
            priority=Priority(h.get("priority") or Priority.NORMAL.value),
            input=_json(h.get("input")) or {},
            metadata=_json(h.get("metadata")) or {},
            callback_url=h.get("callback_url", ""),
            idempotency_key=h.get("idempotency_key", ""),
            created_at_ms=_int(h.get("created_at_ms")),
            deadline_s=_float(h.get("deadline_s")),
            attempts=_int(h.get("attempts")),
            attempt=h.get("attempt", ""),
            replays=_int(h.get("replays")),
            fal_request_id=h.get("fal_request_id", ""),
            cancel_requested=h.get("cancel_requested") == "1",
            estimate_micro=_int(estimate) if estimate else None,
            cost_actual_micro=_int(actual) if actual else None,
            submit_started_at_ms=_int(h.get("submit_started_at_ms")),
            submit_process=h.get("submit_process", ""),
            deferred_total_ms=_int(h.get("deferred_total_ms")),
            timestamps=timestamps,
            extra=h,
        )
