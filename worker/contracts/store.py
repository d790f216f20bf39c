"""Job records in Redis and their atomic transitions.

A record is one hash per job. Every change of state is a Lua script that first checks the current
state, so a duplicate or late message can never move a job backwards or finish it twice; finishing
a job, publishing its result event and scheduling its expiry happen in the same script, which is why
each job yields exactly one result event.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from worker.contracts.keys import Keys, celery_queue_key
from worker.contracts.models import TERMINAL_STATES, JobState, Priority
from worker.contracts.wire import SUBMIT_TASK, task_message

EVENT_SCHEMA_VERSION = "1"

# Fields written as JSON text in the hash.
_JSON_FIELDS = ("input", "metadata", "result", "error")

_TRANSITION = """
-- KEYS: job.  ARGV: allowed-from (comma list, '*' = any non-terminal), to-state, field, value, ...
-- A field name starting with '+' is incremented by its value instead of set.
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {0, ''} end
if state == 'SUCCEEDED' or state == 'FAILED' or state == 'CANCELLED' then return {0, state} end
if ARGV[1] ~= '*' then
  local ok = false
  for s in string.gmatch(ARGV[1], '([^,]+)') do if s == state then ok = true end end
  if not ok then return {0, state} end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'ts_' .. ARGV[2], now, 'updated_at_ms', now)
for i = 3, #ARGV, 2 do
  local f = ARGV[i]
  if string.sub(f, 1, 1) == '+' then
    redis.call('HINCRBY', KEYS[1], string.sub(f, 2), ARGV[i + 1])
  else
    redis.call('HSET', KEYS[1], f, ARGV[i + 1])
  end
end
return {1, tostring(now)}
"""

_FINISH = """
-- KEYS: job, events, track, delayed, blocked, dlq
-- ARGV: to-state, retention_ms, stream_maxlen, dead_letter(0|1), n_record_fields, field, value, ...,
--       event field, value, ..., then the allowed-from list as the last element ('*' = any non-terminal)
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {0, ''} end
if state == 'SUCCEEDED' or state == 'FAILED' or state == 'CANCELLED' then return {0, state} end
local allowed = table.remove(ARGV)
if allowed ~= '*' then
  local ok = false
  for s in string.gmatch(allowed, '([^,]+)') do if s == state then ok = true end end
  if not ok then return {0, state} end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local job_id = redis.call('HGET', KEYS[1], 'id')
local nrec = tonumber(ARGV[5])
local rec = {'state', ARGV[1], 'ts_' .. ARGV[1], now, 'updated_at_ms', now, 'finished_at_ms', now}
for i = 6, 5 + nrec * 2 do rec[#rec + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(rec))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('ZREM', KEYS[3], job_id)
redis.call('ZREM', KEYS[4], job_id)
redis.call('ZREM', KEYS[5], job_id)
if ARGV[4] == '1' then
  redis.call('ZADD', KEYS[6], now, job_id)
  redis.call('HSET', KEYS[1], 'dead_letter', '1')
end
local ev = {'v', '1', 'job_id', job_id, 'state', ARGV[1], 'finished_at_ms', tostring(now),
            'attempts', redis.call('HGET', KEYS[1], 'attempts') or '0',
            'priority', redis.call('HGET', KEYS[1], 'priority') or '',
            'created_at_ms', redis.call('HGET', KEYS[1], 'created_at_ms') or '',
            'metadata', redis.call('HGET', KEYS[1], 'metadata') or '{}'}
for i = 6 + nrec * 2, #ARGV do ev[#ev + 1] = ARGV[i] end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(ev))
return {1, tostring(now), id}
"""

_REPLAY = """
-- KEYS: job, dlq, celery list.  ARGV: message, job_id
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {0, ''} end
if redis.call('ZSCORE', KEYS[2], ARGV[2]) == false then return {0, 'NOT_DEAD_LETTERED'} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('PERSIST', KEYS[1])
redis.call('HDEL', KEYS[1], 'fal_request_id', 'fal_status_url', 'fal_response_url', 'fal_cancel_url',
  'error', 'result', 'finished_at_ms', 'dead_letter', 'dead_letter_reason', 'queue_position',
  'cancel_requested', 'cost_actual_micro', 'ts_SUCCEEDED', 'ts_FAILED', 'ts_CANCELLED')
redis.call('HSET', KEYS[1], 'state', 'QUEUED', 'ts_QUEUED', now, 'updated_at_ms', now, 'attempts', '0')
redis.call('HINCRBY', KEYS[1], 'replays', 1)
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('LPUSH', KEYS[3], ARGV[1])
return {1, tostring(now)}
"""


@dataclass(frozen=True)
class TransitionOutcome:
    """Result of a transition: ``ok`` or the state that refused it ('' when the record is gone)."""

    ok: bool
    state: str
    at_ms: int = 0
    stream_id: str | None = None


def _now_ms_from(raw: Any) -> int:
    return int(raw.decode() if isinstance(raw, bytes) else raw)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class JobStore:
    """Reads and writes job records. Thread-safe (redis-py clients are)."""

    def __init__(
        self, client: redis.Redis, *, prefix: str, queue: str, retention_s: float, stream_maxlen: int
    ):
        self.r = client
        self.keys = Keys(prefix)
        self.queue = queue
        self.retention_ms = int(retention_s * 1000)
        self.stream_maxlen = stream_maxlen
        self._transition = client.register_script(_TRANSITION)
        self._finish = client.register_script(_FINISH)
        self._replay = client.register_script(_REPLAY)

    # ---------------------------------------------------------------- producer side
    # Enqueueing (records, idempotency claims, messages) lives in worker/contracts/intake.py.
    def submit_message(self, job_id: str, priority: Priority) -> tuple[str, str]:
        """(list key, message) of the ``reframe.submit`` task for ``job_id``."""
        pri = priority.celery_priority
        return celery_queue_key(self.queue, pri), task_message(
            SUBMIT_TASK, [job_id], queue=self.queue, priority=pri
        )

    def replay(self, job_id: str, priority: Priority) -> TransitionOutcome:
        """Bring a dead-lettered job back to QUEUED with a new submit message."""
        list_key, message = self.submit_message(job_id, priority)
        raw = self._replay(keys=[self.keys.job(job_id), self.keys.dlq, list_key], args=[message, job_id])
        return TransitionOutcome(ok=int(raw[0]) == 1, state=_text(raw[1]))

    # ---------------------------------------------------------------- reads
    def get(self, job_id: str) -> dict[str, Any] | None:
        """The record as a dict with JSON fields decoded, or None."""
        raw = self.r.hgetall(self.keys.job(job_id))
        return decode_record(raw) if raw else None

    def get_many(self, job_ids: Sequence[str]) -> list[dict[str, Any] | None]:
        """Records of several jobs in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(self.keys.job(job_id))
        return [decode_record(raw) if raw else None for raw in pipe.execute()]

    def state(self, job_id: str) -> JobState | None:
        """The current state only."""
        raw = self.r.hget(self.keys.job(job_id), "state")
        return JobState(_text(raw)) if raw else None

    # ---------------------------------------------------------------- transitions
    def transition(
        self, job_id: str, allowed_from: Iterable[JobState] | str, to: JobState, **fields: Any
    ) -> TransitionOutcome:
        """Move a non-terminal job to ``to`` if it is in ``allowed_from`` ('*' = any non-terminal).

        Keyword fields are set on the record (dicts/lists as JSON); a name starting with ``incr_``
        is incremented instead (``incr_attempts=1``).
        """
        allowed = allowed_from if isinstance(allowed_from, str) else ",".join(s.value for s in allowed_from)
        argv: list[str] = [allowed, to.value]
        for name, value in fields.items():
            field = "+" + name.removeprefix("incr_") if name.startswith("incr_") else name
            argv += [field, _encode(value)]
        raw = self._transition(keys=[self.keys.job(job_id)], args=argv)
        return TransitionOutcome(
            ok=int(raw[0]) == 1,
            state=_text(raw[1]) if int(raw[0]) == 0 else to.value,
            at_ms=_now_ms_from(raw[1]) if int(raw[0]) == 1 else 0,
        )

    def set_fields(self, job_id: str, **fields: Any) -> None:
        """Set informational fields (no state change) on an existing record."""
        key = self.keys.job(job_id)
        mapping = {name: _encode(value) for name, value in fields.items()}
        # HSET on a missing key would resurrect an expired record; only write if it exists.
        self.r.eval(
            "if redis.call('EXISTS', KEYS[1]) == 1 then "
            "return redis.call('HSET', KEYS[1], unpack(ARGV)) end return 0",
            1,
            key,
            *[x for kv in mapping.items() for x in kv],
        )

    def incr_field(self, job_id: str, field: str, delta: int) -> int:
        """Add ``delta`` to an integer field of an existing record; return the new value (0 if gone)."""
        raw = self.r.eval(
            "if redis.call('EXISTS', KEYS[1]) == 1 then "
            "return redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2]) end return 0",
            1,
            self.keys.job(job_id),
            field,
            delta,
        )
        return int(raw)

    def finish(
        self,
        job_id: str,
        to: JobState,
        *,
        record: Mapping[str, Any],
        event: Mapping[str, Any],
        dead_letter: bool = False,
        allowed_from: Iterable[JobState] | str = "*",
    ) -> TransitionOutcome:
        """Finish a job exactly once: terminal state, expiry, result event, all in one script.

        ``allowed_from`` restricts the states it may finish from ('*' = any non-terminal state).
        """
        if to not in TERMINAL_STATES:
            raise ValueError(f"{to} is not terminal")
        allowed = allowed_from if isinstance(allowed_from, str) else ",".join(s.value for s in allowed_from)
        rec = [x for k, v in record.items() for x in (k, _encode(v))]
        ev = [x for k, v in event.items() for x in (k, _encode(v))]
        k = self.keys
        raw = self._finish(
            keys=[k.job(job_id), k.events, k.track, k.delayed, k.blocked, k.dlq],
            args=[
                to.value,
                str(self.retention_ms),
                str(self.stream_maxlen),
                "1" if dead_letter else "0",
                str(len(rec) // 2),
                *rec,
                *ev,
                allowed,
            ],
        )
        if int(raw[0]) == 0:
            return TransitionOutcome(ok=False, state=_text(raw[1]))
        return TransitionOutcome(ok=True, state=to.value, at_ms=_now_ms_from(raw[1]), stream_id=_text(raw[2]))


def _encode(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, bool):
        return "1" if value else "0"
    if value is None:
        return ""
    return str(value)


def decode_record(raw: Mapping[Any, Any]) -> dict[str, Any]:
    """Decode a record hash: bytes to str, JSON fields parsed, ``*_ms`` and counters to int."""
    rec: dict[str, Any] = {_text(k): _text(v) for k, v in raw.items()}
    for name in _JSON_FIELDS:
        if rec.get(name):
            with contextlib.suppress(ValueError):
                rec[name] = json.loads(rec[name])
        elif name in rec:
            rec[name] = None
    for name, value in list(rec.items()):
        if (
            name.endswith("_ms")
            or name.startswith("ts_")
            or name in {"attempts", "replays", "queue_position"}
            or name.endswith("_micro")
        ) and value not in ("", None):
            with contextlib.suppress(ValueError):
                rec[name] = int(value)
    return rec
