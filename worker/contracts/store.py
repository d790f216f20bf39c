"""Job records in Redis and their fenced, atomic transitions.

A record is one hash per job. Every change of state is one Lua script (``lua/``) that first checks
the fence: the current state, and where it matters the attempt that owns the job and its fal
request id. A duplicate or late actor therefore only learns that it lost and changes nothing. The
resources a transition frees (slot, budget reservation) are freed in the same script, and finishing
a job writes its result event and its callback work (the outbox) in that script too, which is why
each life of a job yields exactly one result event and one callback.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis
from redis.commands.core import Script

from worker.contracts.keys import Keys, celery_queue_key, parse_budget_refusal
from worker.contracts.lua import INCLUDE_DIR, load_lua
from worker.contracts.models import TERMINAL_STATES, JobState, Priority
from worker.contracts.record import JobRecord
from worker.contracts.wire import SUBMIT_TASK, task_message

EVENT_SCHEMA_VERSION = "2"

# Fields written as JSON text in the hash.
_JSON_FIELDS = ("input", "metadata", "result", "error", "last_error")


class SlotAction(StrEnum):
    """What a transition does with the job's slot."""

    KEEP = "keep"
    RELEASE = "release"
    """Give it back and admit the next waiting jobs into it (they are returned to dispatch)."""
    DROP = "drop"
    """Give it back without admitting (for callers that do not know the cluster's capacity)."""
    HOLD = "hold"
    """Keep counting it for ``hold_ms`` more: fal may still run a request we cannot see."""


class BudgetAction(StrEnum):
    """What a transition does with the job's budget reservation."""

    KEEP = "keep"
    RELEASE = "release"
    """Drop it without spending: fal definitely did not bill this attempt."""
    SETTLE = "settle"
    """Charge ``settle_micro`` and drop it."""


@dataclass(frozen=True)
class Fence:
    """Who may make a transition: the owning attempt, its fal request, and the allowed states.

    ``attempt`` '' and ``request_id`` None mean "any"; ``from_states`` None means any non-terminal
    state. A caller whose fence no longer matches learns that it lost and changes nothing.
    """

    attempt: str = ""
    request_id: str | None = None
    from_states: Iterable[JobState] | None = None

    def options(self) -> dict[str, Any]:
        """The fence as options of the lifecycle scripts."""
        out: dict[str, Any] = {"attempt": self.attempt}
        if self.request_id is not None:
            out["request_id"] = self.request_id
        if self.from_states is not None:
            out["from"] = sorted(s.value for s in self.from_states)
        return out


@dataclass(frozen=True)
class GateOutcome:
    """Result of :meth:`JobStore.gate`."""

    owner: bool
    """True when this run owns the job as ``attempt``."""
    busy: bool
    """True when another run's gate is live (a duplicate delivery)."""
    attempt: str
    state: str


@dataclass(frozen=True)
class MoveOutcome:
    """Result of a fenced transition: ``ok`` or the state that refused it ('' = no record).

    ``admitted`` are the jobs admitted into the slot this transition freed: dispatch them.
    """

    ok: bool
    state: str
    at_ms: int = 0
    admitted: tuple[str, ...] = ()
    stream_id: str | None = None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class SlotParams:
    """The slot pool's parameters the lifecycle scripts need to admit waiting jobs into a freed slot."""

    capacity: int = 1
    reserved_high: int = 0
    lease_ms: int = 60_000
    #: The fal accounts as ``id:cap,...`` (``lua/accounts_lib.lua``); '' = one account of ``capacity``.
    accounts: str = ""


class JobStore:
    """Reads and writes job records. Thread-safe (redis-py clients are)."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str,
        queue: str,
        retention_s: float,
        stream_maxlen: int,
        dlq_retention_s: float | None = None,
        slot_params: SlotParams | None = None,
    ):
        self.r = client
        self.keys = Keys(prefix)
        self.queue = queue
        self.retention_ms = int(retention_s * 1000)
        self.dlq_retention_ms = int((dlq_retention_s or retention_s) * 1000)
        self.stream_maxlen = stream_maxlen
        self.slot_params = slot_params or SlotParams()
        self._gate = client.register_script(load_lua(INCLUDE_DIR / "gate.lua"))
        self._move = client.register_script(load_lua(INCLUDE_DIR / "move.lua"))
        self._finish = client.register_script(load_lua(INCLUDE_DIR / "finish.lua"))
        self._replay = client.register_script(load_lua(INCLUDE_DIR / "replay.lua"))
        self._redeliver = client.register_script(load_lua(INCLUDE_DIR / "outbox_redeliver.lua"))
        self._forget = client.register_script(load_lua(INCLUDE_DIR / "forget.lua"))
        self._gate_release = client.register_script(load_lua(INCLUDE_DIR / "gate_release.lua"))
        self._resolve_ambiguous = client.register_script(load_lua(INCLUDE_DIR / "ambiguous_resolve.lua"))

    # ---------------------------------------------------------------- producer side
    # Enqueueing (records, idempotency claims, messages) lives in worker/contracts/intake.py.
    def submit_message(self, job_id: str, priority: Priority) -> tuple[str, str]:
        """(list key, message) of the ``reframe.submit`` task for ``job_id``."""
        pri = priority.celery_priority
        return celery_queue_key(self.queue, pri), task_message(
            SUBMIT_TASK, [job_id], queue=self.queue, priority=pri
        )

    def replay(self, job_id: str, priority: Priority, *, force: bool = False) -> MoveOutcome:
        """Bring a dead-lettered job back to QUEUED (a new life) with a new submit message.

        Refused with state ``NEEDS_FORCE:<reason>`` when fal may hold and bill the dead attempt's
        request (an ambiguous submit, a result we could not read) unless ``force``: a replay then
        risks paying twice, and the caller must say so.
        """
        list_key, message = self.submit_message(job_id, priority)
        idem = _text(self.r.hget(self.keys.job(job_id), "idempotency_key") or "")
        raw = self._replay(
            keys=[self.keys.job(job_id), self.keys.dlq, list_key, self.keys.idem(idem), self.keys.queued],
            args=[message, job_id, "1" if force else "0", self.retention_ms],
        )
        ok = int(raw[0]) == 1
        return MoveOutcome(ok=ok, state=JobState.QUEUED.value if ok else _text(raw[1]))

    def redeliver_callback(self, event_id: str) -> bool:
        """Put a given-up callback back in the outbox, due now, with a fresh retry window."""
        k = self.keys
        raw = self._redeliver(keys=[k.outbox, k.outbox_entry(event_id), k.callbacks_failed], args=[event_id])
        return int(raw) == 1

    def failed_callbacks(self, limit: int = 100) -> list[dict[str, str]]:
        """Given-up callbacks, oldest first: event id, job id, url, attempts, last error, failed_at_ms."""
        ids = [_text(x) for x in self.r.zrange(self.keys.callbacks_failed, 0, limit - 1)]
        pipe = self.r.pipeline(transaction=False)
        for event_id in ids:
            pipe.hgetall(self.keys.outbox_entry(event_id))
        out = []
        for event_id, raw in zip(ids, pipe.execute(), strict=True):
            entry = {_text(k): _text(v) for k, v in raw.items() if _text(k) != "body"}
            out.append({"event_id": event_id, **entry})
        return out

    # ---------------------------------------------------------------- reads
    def get(self, job_id: str) -> dict[str, Any] | None:
        """The record as a dict with JSON fields decoded, or None."""
        raw = self.r.hgetall(self.keys.job(job_id))
        return decode_record(raw) if raw else None

    def record(self, job_id: str) -> JobRecord | None:
        """The typed record, or None."""
        raw = self.r.hgetall(self.keys.job(job_id))
        return JobRecord.from_hash(raw) if raw else None

    def get_many(self, job_ids: Sequence[str]) -> list[dict[str, Any] | None]:
        """Records of several jobs in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(self.keys.job(job_id))
        return [decode_record(raw) if raw else None for raw in pipe.execute()]

    def cancel_requested(self, job_id: str) -> bool:
        """True when a cancel was asked for while the job was (maybe) at fal."""
        return _text(self.r.hget(self.keys.job(job_id), "cancel_requested") or "") == "1"

    def ensure_tracked(self, job_id: str) -> bool:
        """Make sure a tracker follows the job soon (due now unless already tracked); True if added."""
        now_s, now_us = self.r.time()
        return bool(self.r.zadd(self.keys.track, {job_id: int(now_s) * 1000 + int(now_us) // 1000}, nx=True))

    def state(self, job_id: str) -> JobState | None:
        """The current state only."""
        raw = self.r.hget(self.keys.job(job_id), "state")
        return JobState(_text(raw)) if raw else None

    # ---------------------------------------------------------------- fenced transitions
    def gate(self, job_id: str, *, gate_ttl_ms: int, process_id: str = "") -> GateOutcome:
        """Take the job's gate as a new attempt (see ``lua/gate.lua``)."""
        k = self.keys
        raw = self._gate(keys=[k.job(job_id), k.delayed, k.queued], args=[job_id, gate_ttl_ms, process_id])
        code, value = int(raw[0]), _text(raw[1])
        if code == 1:
            return GateOutcome(owner=True, busy=False, attempt=value, state="")
        if code == 2:
            return GateOutcome(owner=False, busy=True, attempt=value, state="")
        return GateOutcome(owner=False, busy=False, attempt="", state=value)

    def _periods(self, job_id: str) -> tuple[str, str, str]:
        """The UTC (day, month, tenant) the job's reservation is charged to (today's and no tenant
        when it has none)."""
        raw = self.r.hget(self.keys.reservations, job_id)
        if raw:
            parts = _text(raw).split("|")
            if len(parts) >= 3:
                return parts[1], parts[2], parts[4] if len(parts) >= 5 else ""
        t = time.gmtime()
        return f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}", f"{t.tm_year:04d}-{t.tm_mon:02d}", ""

    def on(self, client: redis.Redis) -> JobStore:
        """This store writing over ``client`` (the same scripts), e.g. one pinned connection whose
        writes :class:`worker.contracts.durable.Replication` then confirms."""
        twin = copy.copy(self)
        twin.r = client
        return twin

    def run_job_script(self, script: Script, job_id: str, extra_keys: Sequence[str], args: list[Any]) -> Any:
        """Run a lifecycle script (KEYS as ``lua/job_head.lua``, then ``extra_keys``) for ``job_id``.

        Retried with the budget periods the script names when they changed meanwhile.

        The scripts touch only keys passed in KEYS; when the job's reservation periods changed
        between the read here and the script (a reservation taken meanwhile), the script refuses
        with ``BUDGET_KEYS:<day>|<month>|<tenant>`` before writing anything.
        """
        day, month, tenant = self._periods(job_id)
        raw: Any = None
        for _ in range(3):
            keys = [*self._job_keys(job_id, day, month, tenant), *extra_keys]
            raw = script(keys=keys, args=args, client=self.r)
            refusal = _text(raw[1]) if int(raw[0]) == 0 and len(raw) > 1 else ""
            if not refusal.startswith("BUDGET_KEYS:"):
                return raw
            day, month, tenant = parse_budget_refusal(refusal)
        raise RuntimeError(f"budget periods of job {job_id} kept changing under the script")

    def resolve_ambiguous(
        self,
        job_id: str,
        attempt: str,
        request_id: str,
        *,
        charged_micro: int,
        billed_micro: int,
        fields: Mapping[str, Any] | None,
        day: str,
        month: str,
        tenant: str = "",
    ) -> MoveOutcome:
        """Record the request a dead-lettered ambiguous submit turned out to have, correct its
        charge to what fal billed, and free its held slot (see ``lua/ambiguous_resolve.lua``).

        ``day`` and ``month`` are the periods the dead letter was charged to; ``tenant`` the job's.
        """
        opt = {
            **self.resource_options(SlotAction.RELEASE, BudgetAction.KEEP, 0, 0),
            "attempt": attempt,
            "request_id": request_id,
            "charged_micro": int(charged_micro),
            "billed_micro": int(billed_micro),
            "set": {k: _encode(v) for k, v in (fields or {}).items()} or None,
        }
        keys = self._job_keys(job_id, day, month, tenant)
        raw = self._resolve_ambiguous(keys=keys, args=[job_id, _options(opt)])
        if int(raw[0]) == 0:
            return MoveOutcome(ok=False, state=_text(raw[1]))
        return MoveOutcome(
            ok=True, state="FAILED", at_ms=int(raw[1]), admitted=tuple(_text(x) for x in raw[2:])
        )

    def release_gate(self, job_id: str, attempt: str) -> bool:
        """End the live gate of ``attempt`` (its run died) and make the job due now; True if it did."""
        raw = self._gate_release(keys=[self.keys.job(job_id), self.keys.delayed], args=[job_id, attempt])
        return int(raw) == 1

    def _job_keys(self, job_id: str, day: str, month: str, tenant: str) -> list[str]:
        k = self.keys
        periods = k.budget_periods(day, month, tenant)
        if len(periods) == 2:
            periods += [k.reservations, k.reservations]  # no tenant: never touched, never declared
        return [
            k.job(job_id),
            k.slots,
            k.waiting,
            k.wait_queue,
            k.fair,
            k.tenant_params,
            k.reservations,
            k.delayed,
            k.blocked,
            k.track,
            k.track_owner,
            *periods,
            k.ledger,
        ]

    def resource_options(
        self, slot: SlotAction, budget: BudgetAction, settle_micro: int, hold_ms: int
    ) -> dict[str, Any]:
        """The slot/budget options every lifecycle script takes (``lua/job_head.lua``)."""
        p = self.slot_params
        return {
            "slot": slot.value,
            "budget": budget.value,
            "settle_micro": int(settle_micro),
            "hold_ms": int(hold_ms),
            "capacity": p.capacity,
            "accounts": p.accounts or str(p.capacity),
            "reserved": p.reserved_high,
            "lease_ms": p.lease_ms,
            "bprefix": self.keys.root,
        }

    def move(
        self,
        job_id: str,
        to: JobState,
        fence: Fence,
        *,
        slot: SlotAction = SlotAction.KEEP,
        budget: BudgetAction = BudgetAction.KEEP,
        settle_micro: int = 0,
        hold_ms: int = 0,
        park_at_ms: int | None = None,
        blocked: bool = False,
        track_at_ms: int | None = None,
        track_by: str = "",
        untrack: bool = False,
        fields: Mapping[str, Any] | None = None,
        incr: Mapping[str, int] | None = None,
        delete: Sequence[str] = (),
        ledger_kind: str = "settled",
        bind_account: bool = False,
    ) -> MoveOutcome:
        """One fenced transition of a live job and what it frees or parks (see ``lua/move.lua``).

        A settlement (``budget`` SETTLE) appends a ledger entry of ``ledger_kind``. With
        ``bind_account`` the record's ``fal_account`` becomes the account of the job's slot."""
        if to in TERMINAL_STATES:
            raise ValueError(f"{to} is terminal: use finish()")
        opt: dict[str, Any] = {
            **fence.options(),
            **self.resource_options(slot, budget, settle_micro, hold_ms),
            "to": to.value,
            "ledger_kind": ledger_kind,
            "blocked": blocked,
            "untrack": untrack,
            "set": {k: _encode(v) for k, v in (fields or {}).items()} or None,
            "incr": dict(incr or {}) or None,
            "del": list(delete) or None,
            "bind_account": bind_account,
        }
        if park_at_ms is not None:
            opt["park_at_ms"] = int(park_at_ms)
        if track_at_ms is not None:
            opt["track_at_ms"] = int(track_at_ms)
            opt["track_by"] = track_by
        raw = self.run_job_script(self._move, job_id, [], [job_id, _options(opt)])
        if int(raw[0]) == 0:
            return MoveOutcome(ok=False, state=_text(raw[1]))
        return MoveOutcome(
            ok=True, state=to.value, at_ms=int(raw[1]), admitted=tuple(_text(x) for x in raw[2:])
        )

    def finish(
        self,
        job_id: str,
        to: JobState,
        fence: Fence,
        *,
        event_id: str,
        slot: SlotAction = SlotAction.RELEASE,
        budget: BudgetAction = BudgetAction.RELEASE,
        settle_micro: int = 0,
        hold_ms: int = 0,
        dead_letter: bool = False,
        fields: Mapping[str, Any] | None = None,
        event: Mapping[str, Any] | None = None,
        callback: Mapping[str, Any] | None = None,
        idempotency_key: str = "",
        ledger_kind: str = "settled",
        billed_s: str = "",
        copy: Mapping[str, Any] | None = None,
    ) -> MoveOutcome:
        """End the job's life exactly once (see ``lua/finish.lua``).

        ``event_id`` must be the record's :attr:`~worker.contracts.record.JobRecord.event_id`;
        ``callback`` holds the members of the callback body besides those the script writes.
        ``copy`` (a success only): the fields of an output copy entry; the event and callback are
        then held in it until the copy is settled (``worker/lua/output_settle.lua``).
        """
        if to not in TERMINAL_STATES:
            raise ValueError(f"{to} is not terminal")
        tail = json.dumps(dict(callback or {}), separators=(",", ":"), sort_keys=True, allow_nan=False)
        opt = {
            **fence.options(),
            **self.resource_options(slot, budget, settle_micro, hold_ms),
            "to": to.value,
            "event_id": event_id,
            "ledger_kind": ledger_kind,
            "billed_s": billed_s,
            "retention_ms": self.retention_ms,
            "dlq_retention_ms": self.dlq_retention_ms,
            "dead_letter": dead_letter,
            "set": {k: _encode(v) for k, v in (fields or {}).items()} or None,
            "event": {k: _encode(v) for k, v in (event or {}).items()} or None,
            "body_tail": tail[1:] if tail != "{}" else '"_":null}',
            "copy": {k: _encode(v) for k, v in copy.items()} if copy else None,
        }
        k = self.keys
        extra = [
            k.events,
            k.dlq,
            k.outbox,
            k.outbox_entry(event_id),
            k.idem(idempotency_key),
            k.outputs_pending,
            k.output_entry(event_id),
            k.outputs_since,
        ]
        raw = self.run_job_script(self._finish, job_id, extra, [job_id, _options(opt)])
        if int(raw[0]) == 0:
            return MoveOutcome(ok=False, state=_text(raw[1]))
        return MoveOutcome(
            ok=True,
            state=to.value,
            at_ms=int(raw[1]),
            stream_id=_text(raw[2]),
            admitted=tuple(_text(x) for x in raw[3:]),
        )

    def forget(self, job_id: str) -> MoveOutcome:
        """Take a job whose record is gone out of every index and free what it held.

        ``ok`` False when the record exists (nothing changed). ``admitted``: jobs admitted into the
        freed slot, to dispatch.
        """
        opt = self.resource_options(SlotAction.RELEASE, BudgetAction.RELEASE, 0, 0)
        raw = self.run_job_script(self._forget, job_id, [], [job_id, _options(opt)])
        if int(raw[0]) == 0:
            return MoveOutcome(ok=False, state="exists")
        return MoveOutcome(ok=True, state="", admitted=tuple(_text(x) for x in raw[1:]))

    def field(self, job_id: str, name: str) -> str:
        """One field of the job's record ('' when absent)."""
        raw = self.r.hget(self.keys.job(job_id), name)
        return _text(raw) if raw is not None else ""

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


def _options(opt: Mapping[str, Any]) -> str:
    # None values are left out: cjson turns JSON null into a userdata the scripts would misread.
    return json.dumps({k: v for k, v in opt.items() if v is not None}, separators=(",", ":"))


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
