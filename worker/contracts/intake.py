"""Producer intake: the strict contract of every public producer call, and the atomic enqueue.

Each public call of :class:`producer.Producer` has one pydantic model here, in strict mode (no
coercion: ``True`` is not ``1``, ``"5"`` is not ``5``, ``1.0`` is not ``1``) with a bound on every
string, number and mapping. :func:`check_enqueue`, :func:`check_batch` and friends turn *every*
problem of a call into one :class:`InvalidRequest` naming each bad field by path
(``items[2].metadata.k``); nothing reaches Redis before that.

:class:`Intake` then writes a whole batch (records, idempotency claims and Celery submit messages)
with one Lua script, ``lua/enqueue.lua``: all of it or none of it. An idempotency key claimed with a
different request fails the batch with :class:`IdempotencyConflict` naming the items; a key claimed
with the same request answers with the existing job, so retrying the same batch is safe.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from redis.asyncio import Redis as AsyncRedis
from redis.commands.core import AsyncScript

from config import Settings
from worker.contracts.durable import Replication
from worker.contracts.lua import load_lua, script_path
from worker.contracts.models import (
    DEFAULT_MAX_DATA_URI_BYTES,
    DEFAULT_MAX_PROMPT_CHARS,
    InvalidRequest,
    JobState,
    Priority,
    ReframeInput,
)
from worker.contracts.store import JobStore
from worker.contracts.tenants import DEFAULT_TENANT, check_tenant, tenant_idempotency_key
from worker.contracts.urlpolicy import UrlPolicy, check_callback_url

#: Idempotency keys: safe in a Redis key name and a log line; long enough for "tenant:order:uuid".
IDEMPOTENCY_KEY_PATTERN = r"^[A-Za-z0-9._:-]{1,200}$"
#: Job ids are uuid4 hex (32 characters); anything else in this charset is looked up and not found.
JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
#: Longest callback URL (browsers and proxies commonly cap URLs near 2 KiB).
MAX_CALLBACK_URL_CHARS = 2048
#: Largest integer in metadata: consumers that parse JSON numbers as doubles keep it exact.
MAX_METADATA_INT = 2**53
#: Longest wait()/most job ids per get_many(); bounds on arguments, not on jobs.
MAX_WAIT_S = 7 * 86400.0
MAX_JOB_IDS = 10_000

IdempotencyKey = Annotated[str, StringConstraints(pattern=IDEMPOTENCY_KEY_PATTERN)]
JobId = Annotated[str, StringConstraints(pattern=JOB_ID_PATTERN)]
PriorityName = Literal["high", "normal", "low"]

_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")


@dataclass(frozen=True)
class IntakeLimits:
    """The limits a producer enforces, taken from :class:`config.Settings`."""

    max_data_uri_bytes: int = DEFAULT_MAX_DATA_URI_BYTES
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS
    max_metadata_bytes: int = 16 * 1024
    max_metadata_depth: int = 8
    max_metadata_keys: int = 256
    max_deadline_s: float = 6 * 3600.0
    max_batch: int = 1000
    callbacks_allowed: bool = False
    """True when callbacks will be signed (a signing key is set) or unsigned ones are allowed."""
    url_policy: UrlPolicy = field(default_factory=UrlPolicy)
    """Which hosts job URLs may name (``REFRAME_FETCH_ALLOW``, ``REFRAME_MAX_URL_LENGTH``)."""

    @classmethod
    def from_settings(cls, settings: Settings) -> IntakeLimits:
        """The limits configured by ``REFRAME_*`` settings."""
        return cls(
            max_data_uri_bytes=settings.max_data_uri_bytes,
            max_prompt_chars=settings.max_prompt_chars,
            max_metadata_bytes=settings.max_metadata_bytes,
            max_metadata_depth=settings.max_metadata_depth,
            max_metadata_keys=settings.max_metadata_keys,
            max_deadline_s=settings.job_deadline_s,
            max_batch=settings.enqueue_max_batch,
            callbacks_allowed=settings.callback_signing_key is not None
            or settings.callback_secrets is not None
            or settings.callback_tenant_secrets is not None
            or settings.callback_allow_unsigned,
            url_policy=UrlPolicy.from_spec(settings.fetch_allow, max_length=settings.max_url_length),
        )

    def context(self) -> dict[str, Any]:
        """The pydantic validation context the models read their limits from."""
        return {
            "limits": self,
            "max_data_uri_bytes": self.max_data_uri_bytes,
            "max_prompt_chars": self.max_prompt_chars,
            "url_policy": self.url_policy,
        }


def _limits(info: ValidationInfo) -> IntakeLimits:
    found = (info.context or {}).get("limits")
    return found if isinstance(found, IntakeLimits) else IntakeLimits()


# ---------------------------------------------------------------------------------- metadata
def metadata_problems(value: Any, limits: IntakeLimits, path: str = "metadata") -> list[tuple[str, str]]:
    """Every problem of a metadata value, by path: a JSON object of finite numbers, bounded in size.

    Depth counts containers (the object itself is level 1); keys are counted at every level.
    """
    if value is None:
        return []
    if not isinstance(value, dict):
        return [(path, "must be a JSON object (a dict with string keys)")]
    problems: list[tuple[str, str]] = []
    keys = 0

    def walk(node: Any, where: str, depth: int) -> None:
        nonlocal keys
        if isinstance(node, dict | list) and depth > limits.max_metadata_depth:
            problems.append((where, f"nests deeper than {limits.max_metadata_depth} levels"))
            return
        if isinstance(node, dict):
            for key, child in node.items():
                keys += 1
                if not isinstance(key, str):
                    problems.append((f"{where}[{key!r}]", "keys must be strings"))
                    continue
                walk(child, f"{where}.{key}", depth + 1)
        elif isinstance(node, list):
            for i, child in enumerate(node):
                walk(child, f"{where}[{i}]", depth + 1)
        else:
            problem = _scalar_problem(node)
            if problem:
                problems.append((where, problem))

    walk(value, path, 1)
    if keys > limits.max_metadata_keys:
        problems.append((path, f"has {keys} keys; the limit is {limits.max_metadata_keys}"))
    if not problems:
        size = len(encode_metadata(value).encode())
        if size > limits.max_metadata_bytes:
            problems.append((path, f"is {size} bytes as JSON; the limit is {limits.max_metadata_bytes}"))
    return problems


def _scalar_problem(node: Any) -> str | None:
    if node is None or isinstance(node, bool | str):
        return None
    if isinstance(node, int):
        return None if abs(node) <= MAX_METADATA_INT else "integer outside +-2**53 (inexact in JSON)"
    if isinstance(node, float):
        return None if math.isfinite(node) else "must be a finite number (NaN and Infinity are not JSON)"
    return f"{type(node).__name__} is not a JSON value"


def encode_metadata(value: Mapping[str, Any] | None) -> str:
    """Compact JSON of checked metadata (``allow_nan=False``: never writes invalid JSON)."""
    return json.dumps(dict(value or {}), separators=(",", ":"), allow_nan=False)


# ---------------------------------------------------------------------------------- callback
def _callback_url_rule(value: str, policy: UrlPolicy) -> str:
    # The one call site of the callback URL rule: the SSRF policy of worker/contracts/urlpolicy.py.
    try:
        return check_callback_url(value, policy=policy)
    except ValueError as exc:
        raise ValueError(str(exc).removeprefix("callback_url: ")) from None


# ---------------------------------------------------------------------------------- call models
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class EnqueueCall(_Strict):
    """Arguments of ``Producer.enqueue`` (and of one ``enqueue_many`` item)."""

    input: ReframeInput
    idempotency_key: IdempotencyKey | None = None
    priority: PriorityName = "normal"
    metadata: dict[str, Any] | None = None
    callback_url: Annotated[str, StringConstraints(max_length=MAX_CALLBACK_URL_CHARS)] | None = None
    deadline_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    dedupe: bool | None = None
    """Pay once for identical work (None: the tenant's default, else ``REFRAME_DEDUPE_DEFAULT``)."""

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        problems = metadata_problems(value, _limits(info))
        if problems:
            raise ValueError("; ".join(f"{p}: {m}" for p, m in problems))
        return value

    @field_validator("callback_url")
    @classmethod
    def _callback_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if _CONTROL_OR_SPACE.search(value):
            raise ValueError("contains whitespace or control characters")
        _callback_url_rule(value, _limits(info).url_policy)
        if not _limits(info).callbacks_allowed:
            raise ValueError(
                "refused: REFRAME_CALLBACK_SIGNING_KEY is not set, so the callback would be unsigned "
                "(set REFRAME_CALLBACK_ALLOW_UNSIGNED=true to accept that)"
            )
        return value

    @field_validator("deadline_s")
    @classmethod
    def _deadline(cls, value: float | None, info: ValidationInfo) -> float | None:
        limit = _limits(info).max_deadline_s
        if value is not None and value > limit:
            raise ValueError(f"is {value} s; the limit is REFRAME_JOB_DEADLINE_S = {limit} s")
        return value

    @property
    def priority_enum(self) -> Priority:
        """The priority as :class:`Priority`."""
        return Priority(self.priority)


class JobIdCall(_Strict):
    """Arguments of ``Producer.get`` and ``Producer.cancel``."""

    job_id: JobId


class JobIdsCall(_Strict):
    """Arguments of ``Producer.get_many``."""

    job_ids: Annotated[list[JobId], Field(max_length=MAX_JOB_IDS)]


class WaitCall(_Strict):
    """Arguments of ``Producer.wait``."""

    job_id: JobId
    timeout_s: Annotated[float, Field(gt=0, le=MAX_WAIT_S, allow_inf_nan=False)]
    poll_interval_s: Annotated[float, Field(ge=0.01, le=60, allow_inf_nan=False)] = 0.5


def _pairs(exc: ValidationError, prefix: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for raw_path, msg in InvalidRequest.from_validation_error(exc).errors:
        # The input's fields are named as callers write them (``aspect_ratio``, not ``input.aspect_ratio``).
        path = raw_path.removeprefix("input.")
        out.append((f"{prefix}.{path}" if prefix and path else prefix or path, msg))
    return out


def check_call(model: type[_Strict], args: Mapping[str, Any], limits: IntakeLimits) -> Any:
    """Validate ``args`` with ``model``; raise one :class:`InvalidRequest` naming every bad argument."""
    try:
        return model.model_validate(dict(args), context=limits.context())
    except ValidationError as exc:
        raise InvalidRequest(_pairs(exc, "")) from None


def _input_dict(request: Any) -> Any:
    if isinstance(request, ReframeInput):
        return request.model_dump(exclude_none=True)
    if isinstance(request, Mapping):
        return dict(request)
    return request  # the model reports it ("input: Input should be a valid dictionary ...")


def enqueue_problems(
    args: Mapping[str, Any], limits: IntakeLimits, prefix: str
) -> tuple[EnqueueCall | None, list[tuple[str, str]]]:
    """Validate one enqueue call; (call, []) or (None, every problem by path under ``prefix``)."""
    data = dict(args)
    data["input"] = _input_dict(data.get("input"))
    metadata = data.get("metadata")
    if isinstance(metadata, Mapping) and not isinstance(metadata, dict):
        data["metadata"] = metadata = dict(metadata)
    # The metadata walker names nested paths (metadata.k); pydantic would only name "metadata".
    meta_problems = metadata_problems(metadata, limits)
    if meta_problems:
        data["metadata"] = None
    try:
        call = EnqueueCall.model_validate(data, context=limits.context())
    except ValidationError as exc:
        problems = _pairs(exc, prefix)
    else:
        problems = []
    problems += [(f"{prefix}.{p}" if prefix else p, m) for p, m in meta_problems]
    return (None, problems) if problems else (call, [])


def check_enqueue(args: Mapping[str, Any], limits: IntakeLimits) -> EnqueueCall:
    """Validate the arguments of one enqueue; raise :class:`InvalidRequest` naming every bad field."""
    call, problems = enqueue_problems(args, limits, "")
    if call is None:
        raise InvalidRequest(problems)
    return call


def check_batch(items: Sequence[Mapping[str, Any] | str], limits: IntakeLimits) -> list[EnqueueCall]:
    """Validate every item of a batch (items already split into call arguments; a ``str`` entry is
    an item that is not a request at all, with that message); one error lists every problem."""
    if len(items) > limits.max_batch:
        raise InvalidRequest(
            [("items", f"at most {limits.max_batch} per call (REFRAME_ENQUEUE_MAX_BATCH); split the batch")]
        )
    calls: list[EnqueueCall] = []
    problems: list[tuple[str, str]] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            problems.append((f"items[{i}]", item))
            continue
        call, found = enqueue_problems(item, limits, f"items[{i}]")
        problems += found
        if call is not None:
            calls.append(call)
    if problems:
        raise InvalidRequest(problems)
    return calls


# ---------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class EnqueueResult:
    """What an enqueue did for one request."""

    job_id: str
    created: bool
    """False when an idempotency key returned an existing job (nothing new was written)."""
    state: JobState | None
    """QUEUED for a new job; the existing job's state (None if its record has expired)."""
    idempotency_key: str | None = None

    @property
    def existing(self) -> bool:
        """True when this is an earlier job returned for the same idempotency key and input."""
        return not self.created

    def describe(self) -> str:
        """One line for people: ``enqueued job X`` or ``returned existing job X (FAILED)``."""
        if self.created:
            return f"enqueued job {self.job_id}"
        state = self.state.value if self.state else "record expired"
        return f"returned existing job {self.job_id} ({state})"


@dataclass(frozen=True)
class Conflict:
    """One item whose idempotency key is claimed by a different request."""

    index: int
    idempotency_key: str
    job_id: str | None
    """The job holding the key, or None when the other claimant is an earlier item of the same batch."""
    other_index: int | None = None


class IdempotencyConflict(ValueError):
    """An idempotency key was already used for a different request; nothing was enqueued.

    ``conflicts`` lists every conflicting item; ``key`` and ``job_id`` are those of the first.
    """

    def __init__(self, conflicts: list[Conflict], *, batch: bool) -> None:
        self.conflicts = conflicts
        self.key = conflicts[0].idempotency_key
        self.job_id = conflicts[0].job_id or ""
        lines = []
        for c in conflicts:
            path = f"items[{c.index}].idempotency_key" if batch else "idempotency_key"
            who = f"items[{c.other_index}] of the same batch" if c.job_id is None else f"job {c.job_id}"
            lines.append(f"{path}: {c.idempotency_key!r} was already used by {who} with a different request")
        super().__init__("; ".join(lines) + ("; nothing was enqueued" if batch else ""))


# ---------------------------------------------------------------------------------- writing
def record_fields(
    job_id: str,
    call: EnqueueCall,
    request: ReframeInput,
    *,
    default_deadline_s: float,
    idempotency_key: str | None,
) -> list[str]:
    """The initial hash fields of a job, flattened for the enqueue script (``idempotency_key`` as
    stored: namespaced by tenant)."""
    fields = {
        "id": job_id,
        "state": JobState.QUEUED.value,
        "priority": call.priority,
        "input": json.dumps(request.to_fal(), separators=(",", ":")),
        "fingerprint": request.fingerprint(),
        "metadata": encode_metadata(call.metadata),
        "callback_url": call.callback_url or "",
        "idempotency_key": idempotency_key or "",
        "attempts": "0",
        "deadline_s": repr(float(call.deadline_s or default_deadline_s)),
        # '' = not said: the enqueue script resolves it from the tenant's limits or the cluster's default
        "dedupe": "" if call.dedupe is None else ("1" if call.dedupe else "0"),
    }
    return [item for pair in fields.items() for item in pair]


def _dedupe(calls: Sequence[EnqueueCall], *, batch: bool) -> tuple[list[int], dict[int, int]]:
    """(indexes to send, duplicate index -> its first occurrence); raises on in-batch conflicts."""
    first_of: dict[str, int] = {}
    conflicts: list[Conflict] = []
    unique: list[int] = []
    alias: dict[int, int] = {}
    for i, call in enumerate(calls):
        key = call.idempotency_key
        if key is None:
            unique.append(i)
        elif key not in first_of:
            first_of[key] = i
            unique.append(i)
        elif calls[first_of[key]].input.fingerprint() == call.input.fingerprint():
            alias[i] = first_of[key]
        else:
            conflicts.append(Conflict(i, key, None, other_index=first_of[key]))
    if conflicts:
        raise IdempotencyConflict(conflicts, batch=batch)
    return unique, alias


#: Slack past the longest a record can live before its listing-index entry is trimmed (clock skew,
#: slow finishing).
_INDEX_SLACK_S = 86400.0


def index_horizon_ms(settings: Settings) -> int:
    """How long a listing-index entry may be needed: the longest a job record can live after its
    creation (deadline, then the longer of the result and dead-letter retention), plus a day."""
    life_s = (
        settings.job_deadline_s + max(settings.job_retention_s, settings.dlq_retention_s) + _INDEX_SLACK_S
    )
    return int(life_s * 1000)


def _what(results: Sequence[EnqueueResult]) -> str:
    """Names the enqueue in a :class:`NotReplicated` message (the first job and how many)."""
    first = results[0].job_id if results else "?"
    more = f" and {len(results) - 1} more" if len(results) > 1 else ""
    return f"the enqueue of job {first}{more} (retry with the same idempotency key)"


@dataclass(frozen=True)
class _Plan:
    """One call of ``lua/enqueue.lua``: which calls it carries, and its keys and arguments."""

    unique: list[int]
    alias: dict[int, int]
    keys: list[str]
    argv: list[str]


class Intake:
    """Writes validated batches with ``lua/enqueue.lua``: every record, claim, message and index
    entry, or none. :meth:`write` uses the store's Redis client; :meth:`write_async` an asyncio
    client (the HTTP API's event loop), with the same script and the same answers."""

    def __init__(
        self,
        store: JobStore,
        *,
        default_deadline_s: float,
        index_horizon_ms: int,
        dedupe_default: bool = False,
        replication: Replication | None = None,
    ) -> None:
        self.store = store
        #: Replicas that must acknowledge an enqueue before the caller hears of it (else NotReplicated).
        self.replication = replication or Replication(0, 1)
        self.dedupe_default = dedupe_default
        self.default_deadline_s = default_deadline_s
        self.index_horizon_ms = index_horizon_ms
        self.source = load_lua(script_path(__file__, "enqueue"))
        self._script = store.r.register_script(self.source)
        self._async_scripts: dict[int, AsyncScript] = {}

    def write(
        self, calls: Sequence[EnqueueCall], *, batch: bool, tenant: str = DEFAULT_TENANT
    ) -> list[EnqueueResult]:
        """Write the jobs of ``calls`` for ``tenant`` atomically; return one result per call, in order.

        Duplicate idempotency keys inside ``calls`` collapse to one job when their inputs match and
        are a conflict otherwise. Raises :class:`IdempotencyConflict` (nothing written) when any key
        is taken by a different request.
        """
        plan = self._plan(calls, batch=batch, tenant=tenant)
        if plan is None:
            return []
        with self.replication.pinned(self.store.r) as conn:
            raw: Any = self._script(keys=plan.keys, args=plan.argv, client=conn)
            results, existing = self._results(calls, plan, raw, batch=batch)
            self.replication.confirm(conn, _what(results))
        if not existing:
            return results
        pipe = self.store.r.pipeline(transaction=False)
        for job_id in existing:
            pipe.hget(self.store.keys.job(job_id), "state")
        return _with_states(results, dict(zip(existing, pipe.execute(), strict=True)))

    async def write_async(
        self, client: AsyncRedis, calls: Sequence[EnqueueCall], *, batch: bool, tenant: str = DEFAULT_TENANT
    ) -> list[EnqueueResult]:
        """:meth:`write` over an asyncio Redis client (no thread per request)."""
        plan = self._plan(calls, batch=batch, tenant=tenant)
        if plan is None:
            return []
        script = self._async_scripts.get(id(client))
        if script is None:
            script = self._async_scripts[id(client)] = client.register_script(self.source)
        async with self.replication.pinned_async(client) as conn:
            raw: Any = await script(keys=plan.keys, args=plan.argv, client=conn)
            results, existing = self._results(calls, plan, raw, batch=batch)
            await self.replication.confirm_async(conn, _what(results))
        if not existing:
            return results
        async with client.pipeline(transaction=False) as pipe:
            for job_id in existing:
                pipe.hget(self.store.keys.job(job_id), "state")
            states = await pipe.execute()
        return _with_states(results, dict(zip(existing, states, strict=True)))

    def _plan(self, calls: Sequence[EnqueueCall], *, batch: bool, tenant: str) -> _Plan | None:
        check_tenant(tenant)
        unique, alias = _dedupe(calls, batch=batch)
        if not unique:
            return None
        store, keys_of = self.store, self.store.keys
        keys: list[str] = []
        # an empty idempotency key is refused by the contract, so this key can never be a claim
        argv: list[str] = [
            keys_of.idem(""),
            str(len(unique)),
            tenant,
            str(self.index_horizon_ms),
            "1" if self.dedupe_default else "0",
        ]
        for i in unique:
            call = calls[i]
            job_id = uuid.uuid4().hex
            list_key, message = store.submit_message(job_id, call.priority_enum)
            stored_key = (
                tenant_idempotency_key(tenant, call.idempotency_key) if call.idempotency_key else None
            )
            keys += [keys_of.job(job_id), keys_of.idem(stored_key or ""), list_key]
            fields = record_fields(
                job_id,
                call,
                call.input,
                default_deadline_s=self.default_deadline_s,
                idempotency_key=stored_key,
            )
            argv += [job_id, call.input.fingerprint(), message, str(len(fields) // 2), *fields]
        keys += [
            keys_of.queued,
            keys_of.tenant_jobs(tenant),
            keys_of.jobs_index,
            keys_of.tenant_limits(tenant),
        ]
        return _Plan(unique, alias, keys, argv)

    @staticmethod
    def _results(
        calls: Sequence[EnqueueCall], plan: _Plan, raw: Any, *, batch: bool
    ) -> tuple[list[EnqueueResult], list[str]]:
        """The results in call order, and the ids of existing jobs whose state is still to read."""
        unique, alias = plan.unique, plan.alias
        if int(raw[0]) == 0:
            found = []
            for k in range(1, len(raw), 2):
                index = unique[int(raw[k]) - 1]
                key = calls[index].idempotency_key or ""
                found.append(Conflict(index, key, _text(raw[k + 1]) or None))
            raise IdempotencyConflict(found, batch=batch)
        by_index: dict[int, tuple[str, bool]] = {}
        for n, i in enumerate(unique):
            by_index[i] = (_text(raw[3 + 2 * n]), int(raw[2 + 2 * n]) == 1)
        results: list[EnqueueResult] = []
        for i, call in enumerate(calls):
            job_id, created = by_index[alias.get(i, i)]
            # an in-batch duplicate of a job created just now is QUEUED, not "existing"
            state = JobState.QUEUED if created else None
            results.append(EnqueueResult(job_id, created and i not in alias, state, call.idempotency_key))
        existing = list(dict.fromkeys(r.job_id for r in results if r.state is None))
        return results, existing


def _with_states(results: list[EnqueueResult], states: Mapping[str, Any]) -> list[EnqueueResult]:
    """``results`` with the read states of existing jobs filled in (None: the record expired)."""
    out = []
    for result in results:
        raw = states.get(result.job_id) if result.state is None else None
        out.append(replace(result, state=JobState(_text(raw))) if raw else result)
    return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
