"""Cluster-wide gauges computed from Redis at scrape time, for ``reframe exporter`` only.

Why a scrape-time collector and one exporter replica (docs/celery-operations.md §1, §10.1):

* Queue depth, slots, budget and breaker state are properties of the cluster, not of a worker pod.
  If every worker exported them, ``sum()`` over pods would multiply them; so exactly one process
  (``reframe exporter``, one replica) registers :class:`ClusterCollector`.
* Reading Redis at scrape time means a value is never stale: a dead background thread cannot leave
  an old gauge behind, and a Redis outage shows up as ``reframe_cluster_scrape_success 0`` (with
  the settings-derived gauges still exported) instead of a failed scrape.
* It counts *every* kombu priority list of the queue (celery-exporter counts only the priority-0
  list, issue #272), plus our own waiting structures, and reports ages, not just lengths.

Cost per scrape: two pipelined round trips (about 40 O(1)/O(log n) commands, plus one ``HMGET``
per slot holder, bounded by ``2 * max_concurrency``, and at most ``wait_scan`` per wait list), and
four flow-control snapshot scripts (read-only). Every age is measured against Redis ``TIME``, the
clock the job records and flow-control scripts use, so exporter clock skew does not matter.

Redis keys read (docs/design.md): the Celery lists ``Q``, ``Q\\x06\\x163``, ``Q\\x06\\x166``,
``Q\\x06\\x169``; ``P:wait:q`` (+ ``P:fc:fair`` depths), ``P:blocked``, ``P:delayed``, ``P:slots``,
``P:track``, ``P:dlq``, ``P:events``, ``P:job:{id}`` (heads only); kombu's ``unacked`` hash and
``unacked_index`` zset; and flow control through :class:`worker.flow.FlowControl` so the breaker
and budget semantics are exactly the workers'.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.backoff import NoBackoff
from redis.retry import Retry

from config import Settings
from worker.contracts.connect import redis_client
from worker.contracts.keys import KOMBU_PRIORITY_SEP, Keys
from worker.contracts.wire import SUBMIT_TASK, decode_task
from worker.flow import BreakerState, FlowControl, micro_to_usd

log = logging.getLogger(__name__)

#: kombu priority step -> our priority label. Celery priority 0/3/6 are high/normal/low
#: (docs/design.md); the 9 list only receives priority >= 9, which we never send, so it counts as low.
CELERY_STEP_PRIORITY: Final = ((0, "high"), (3, "normal"), (6, "low"), (9, "low"))
PRIORITIES: Final = ("high", "normal", "low")
#: Job states in which a job has not reached fal yet (its age counts as waiting).
WAITING_STATES: Final = frozenset({"QUEUED", "WAITING", "DEFERRED", "BLOCKED"})
#: Record fields holding when a job (last) went to fal, best first.
SUBMITTED_FIELDS: Final = ("submitted_at_ms", "ts_SUBMITTING", "ts_IN_QUEUE")
#: Record fields holding when a job was (last) queued, best first (a DLQ replay resets ts_QUEUED).
QUEUED_FIELDS: Final = ("ts_QUEUED", "created_at_ms")
_RECORD_FIELDS: Final = ("state", *QUEUED_FIELDS, *SUBMITTED_FIELDS)


@dataclass(frozen=True)
class _Spec:
    name: str
    help: str
    labels: tuple[str, ...] = ()


_SPECS: Final = (
    _Spec(
        "reframe_cluster_scrape_success", "1 if the last read of cluster state from Redis succeeded, else 0."
    ),
    _Spec("reframe_cluster_scrape_duration_seconds", "Time the last cluster-state read took."),
    _Spec(
        "reframe_queue_depth",
        "Jobs/messages waiting, by where: celery (task messages on every kombu priority list), wait "
        "(P:wait:q, jobs waiting for a slot, per tenant by priority then FIFO), blocked "
        "(budget cap), delayed (deliberately deferred); priority is 'any' where the key has none.",
        ("where", "priority"),
    ),
    _Spec(
        "reframe_queue_oldest_age_seconds",
        "Age (since the job was queued) of the oldest job still waiting to reach fal, by where and "
        "priority; 0 when nothing waits. Celery: the oldest reframe.submit message (after its eta); "
        "wait: the head job still WAITING; blocked: the oldest budget-blocked job.",
        ("where", "priority"),
    ),
    _Spec(
        "reframe_delayed_overdue_seconds",
        "How far past its due time the most overdue deferred job (P:delayed) is; 0 when none is due. "
        "Growing means nothing is dispatching deferred jobs.",
    ),
    _Spec("reframe_slots_in_use", "fal request slots held (ZCARD P:slots), expired leases included."),
    _Spec(
        "reframe_slots_capacity",
        "Cluster-wide cap of fal requests in flight (max_concurrency, or the sum of the fal accounts' caps).",
    ),
    _Spec(
        "reframe_fal_account_up",
        "1 while a fal account takes new work, 0 while it is drained (its key rejected, or its breaker "
        "open); one series per configured account (REFRAME_FAL_ACCOUNTS; `default` without it).",
        ("account",),
    ),
    _Spec("reframe_fal_account_capacity", "The cap of fal requests in flight of one account.", ("account",)),
    _Spec(
        "reframe_fal_account_slots_in_use",
        "Slots held on one fal account (its requests in flight, expired leases included).",
        ("account",),
    ),
    _Spec(
        "reframe_fal_account_budget_spent_usd",
        "Dollars settled on one fal account in the current UTC day/month (its optional budget, "
        "REFRAME_FAL_ACCOUNTS); kept for every account.",
        ("account", "period"),
    ),
    _Spec(
        "reframe_fal_account_budget_reserved_usd",
        "Dollars reserved by the jobs whose slot is on one fal account (estimates, not yet settled).",
        ("account",),
    ),
    _Spec(
        "reframe_fal_account_budget_cap_usd",
        "The daily/monthly budget of one fal account (+Inf: it declares none). The account takes no "
        "new job while spent + reserved + one largest job would pass it.",
        ("account", "period"),
    ),
    _Spec("reframe_slots_reserved_high", "Slots only high-priority jobs may take (reserved_high_slots)."),
    _Spec(
        "reframe_slot_leases_expired",
        "Slots whose lease deadline passed (holder stopped renewing); they still count against the "
        "capacity until the housekeeper checks fal.",
    ),
    _Spec(
        "reframe_inflight_oldest_age_seconds",
        "Age since submit of the oldest job holding a slot; 0 when none.",
    ),
    _Spec("reframe_tracking_jobs", "In-flight jobs scheduled for completion tracking (ZCARD P:track)."),
    _Spec(
        "reframe_tracking_overdue_jobs",
        "Tracking entries past their due time and not claimed by a tracker (ZCOUNT P:track -inf now).",
    ),
    _Spec(
        "reframe_tracking_overdue_seconds",
        "How far past its due time the most overdue tracking entry is; 0 when none is due.",
    ),
    _Spec(
        "reframe_output_copies_pending",
        "Output copies not done yet: first try or retrying (ZCARD P:outputs:pending); their result "
        "events wait for them.",
    ),
    _Spec(
        "reframe_output_copy_oldest_pending_age_seconds",
        "Age since its job finished of the oldest pending output copy; fal deletes its file when "
        "its media retention ends. 0 when none.",
    ),
    _Spec(
        "reframe_output_copies_failed",
        "Output copies given up (output_copy=failed; ZCARD P:outputs:failed): `reframe outputs retry`.",
    ),
    _Spec(
        "reframe_celery_unacked_messages",
        "Celery messages delivered to a worker and not yet acknowledged (HLEN of kombu's unacked).",
    ),
    _Spec(
        "reframe_celery_unacked_oldest_age_seconds",
        "Age of the oldest unacknowledged message; kombu redelivers it at visibility_timeout.",
    ),
    _Spec(
        "reframe_celery_visibility_timeout_seconds",
        "kombu visibility timeout: an unacked message older than this is redelivered.",
    ),
    _Spec(
        "reframe_breaker_state",
        "Circuit breaker state, one series per state with value 1 for the current one (an OPEN "
        "breaker past its deadline shows as half_open, as the workers see it).",
        ("state",),
    ),
    _Spec(
        "reframe_breaker_open_remaining_seconds", "Seconds until an OPEN breaker lets probes through; else 0."
    ),
    _Spec("reframe_breaker_window_calls", "fal calls counted in the breaker's current window."),
    _Spec("reframe_breaker_window_failures", "Failed fal calls counted in the breaker's current window."),
    _Spec(
        "reframe_rate_pause_remaining_seconds",
        "Seconds left of a cluster-wide submit pause (after a 429 Retry-After); 0 when none.",
    ),
    _Spec("reframe_retry_budget_tokens", "Retry tokens available cluster-wide (retry budget)."),
    _Spec("reframe_budget_spent_usd", "Dollars settled in the current UTC day/month.", ("period",)),
    _Spec(
        "reframe_budget_reserved_usd",
        "Dollars reserved by jobs in flight (estimates, not yet settled) in the current period.",
        ("period",),
    ),
    _Spec(
        "reframe_budget_cap_usd",
        "Spend cap of the period (budget_daily_usd / budget_monthly_usd).",
        ("period",),
    ),
    _Spec(
        "reframe_tenant_spent_usd",
        "Dollars settled by a tenant in the current UTC day/month (its budget period hash); the "
        "REFRAME_METRICS_TOP_TENANTS tenants that spent most this month by name, the rest summed as "
        "tenant=other.",
        ("tenant", "period"),
    ),
    _Spec(
        "reframe_tenant_reserved_usd",
        "Dollars reserved by a tenant's jobs in flight in the current period (same tenants as spent).",
        ("tenant", "period"),
    ),
    _Spec(
        "reframe_tenant_budget_cap_usd",
        "A named tenant's own spend cap of the period (P:tenant:<t>:limits; absent: no tenant cap); "
        "for tenant=other the sum of the caps of the other tenants that have one.",
        ("tenant", "period"),
    ),
    _Spec(
        "reframe_tenant_budget_headroom_usd",
        "A named tenant's cap minus spent minus reserved in the current period (negative: fal billed "
        "more than estimated); only for tenants with a cap; for tenant=other the sum over the other "
        "tenants that have one.",
        ("tenant", "period"),
    ),
    _Spec("reframe_tenants", "Tenants known: with limits (P:tenants) or charged this month (the ledger)."),
    _Spec(
        "reframe_tenants_at_budget_cap",
        "Tenants (all, named or not) whose spent + reserved has reached their own cap of the period.",
        ("period",),
    ),
    _Spec("reframe_ledger_entries", "Entries in the cost ledger (XLEN P:ledger)."),
    _Spec("reframe_dead_letter_jobs", "Jobs in the dead-letter set (ZCARD P:dlq)."),
    _Spec("reframe_result_stream_length", "Entries in the result stream (XLEN P:events)."),
)
_SPEC_BY_NAME: Final = {s.name: s for s in _SPECS}
_ERRORS_NAME: Final = "reframe_cluster_scrape_errors"
_ERRORS_HELP: Final = "Cluster-state reads from Redis that failed since the exporter started."

Sample = tuple[str, tuple[str, ...], float]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _int_or_none(value: Any) -> int | None:
    if value is None:
        return None
    try:
        return int(float(_text(value)))
    except ValueError:
        return None


def _first_int(values: Sequence[Any]) -> int | None:
    for value in values:
        parsed = _int_or_none(value)
        if parsed is not None and parsed > 0:
            return parsed
    return None


def _age_s(now_ms: int, since_ms: int | None) -> float:
    return max(0.0, (now_ms - since_ms) / 1000.0) if since_ms is not None else 0.0


def _eta_ms(raw: Any) -> int | None:
    """Celery's ``eta`` header (ISO 8601) as epoch ms; ``None`` when absent or unreadable."""
    if not raw:
        return None
    try:
        when = datetime.fromisoformat(str(raw))
    except ValueError:
        return None
    if when.tzinfo is None:  # Celery writes aware UTC; a naive value is taken as UTC too
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


@dataclass(frozen=True)
class CeleryHead:
    """What the exporter needs from the oldest message of a Celery list."""

    job_id: str | None
    eta_ms: int | None


def parse_celery_message(raw: Any) -> CeleryHead | None:
    """Read the job id and eta of a ``reframe.submit`` message in kombu's Redis envelope.

    Returns ``None`` for other tasks (their job ages say nothing about waiting) or unreadable
    messages. The body is task protocol 2, ``[args, kwargs, embed]``, base64 per
    ``properties.body_encoding``.
    """
    task = decode_task(_text(raw))
    if task is None or task[0].get("task") != SUBMIT_TASK:
        return None
    headers, args, kwargs = task
    job_id = args[0] if args else kwargs.get("job_id")
    return CeleryHead(job_id=str(job_id) if job_id else None, eta_ms=_eta_ms(headers.get("eta")))


@dataclass
class _Raw:
    """The replies of one scrape's Redis reads."""

    now_ms: int
    celery_depths: list[int] = field(default_factory=list)
    celery_tails: list[CeleryHead | None] = field(default_factory=list)
    wait_depths: list[int] = field(default_factory=list)
    wait_heads: list[list[str]] = field(default_factory=list)
    blocked_head: Any = None
    delayed_head: Any = None
    track_head: Any = None
    unacked_head: Any = None
    blocked_n: int = 0
    delayed_n: int = 0
    slots_n: int = 0
    track_n: int = 0
    dlq_n: int = 0
    slot_holders: list[str] = field(default_factory=list)
    unacked_n: int = 0
    events_n: int = 0
    copies_pending: int = 0
    copies_failed: int = 0
    copies_oldest: Any = None
    records: dict[str, list[str | None]] = field(default_factory=dict)
    expired_n: int = 0
    overdue_n: int = 0


def _take(replies: Iterator[Any], n: int) -> list[Any]:
    return [next(replies) for _ in range(n)]


class ClusterCollector(Collector):
    """A ``prometheus_client`` collector of cluster state read from Redis on every scrape.

    ``redis_client`` should have short socket timeouts and no retries (a scrape waits for it):
    build it with :func:`exporter_redis_client`. ``kombu_keyprefix``
    is kombu's ``global_keyprefix`` transport option if the Celery app sets one. ``wait_scan``
    bounds how many entries of each wait list are examined to skip withdrawn ids.
    """

    def __init__(
        self,
        redis_client: redis.Redis,
        settings: Settings,
        *,
        kombu_keyprefix: str = "",
        wait_scan: int = 10,
    ) -> None:
        self._r = redis_client
        self._settings = settings
        self._keys = Keys(settings.key_prefix)
        self._flow = FlowControl.from_settings(redis_client, settings)
        self._celery_keys = [
            kombu_keyprefix
            + (settings.queue_name if step == 0 else f"{settings.queue_name}{KOMBU_PRIORITY_SEP}{step}")
            for step, _ in CELERY_STEP_PRIORITY
        ]
        self._unacked_key = f"{kombu_keyprefix}unacked"
        self._unacked_index_key = f"{kombu_keyprefix}unacked_index"
        self._wait_scan = max(1, wait_scan)
        self._slot_scan = 2 * settings.slot_capacity
        self._errors = 0
        self._errors_lock = threading.Lock()
        self._last_error_log = 0.0
        self._tenants = TenantSpend(self._keys, top=settings.metrics_top_tenants)

    # --- Collector protocol --------------------------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        """Metric names without samples (so registering never touches Redis)."""
        families: list[Metric] = [GaugeMetricFamily(s.name, s.help, labels=list(s.labels)) for s in _SPECS]
        families.append(CounterMetricFamily(_ERRORS_NAME, _ERRORS_HELP))
        return families

    def collect(self) -> Iterator[Metric]:
        """Read Redis and yield every family; on a Redis error only the static ones, success 0."""
        started = time.perf_counter()
        samples = self._static_samples()
        try:
            samples.extend(self._redis_samples())
            success = 1.0
        except (redis.RedisError, OSError) as exc:
            success = 0.0
            with self._errors_lock:
                self._errors += 1
                now = time.monotonic()
                noisy = now - self._last_error_log < 60.0
                if not noisy:
                    self._last_error_log = now
            if not noisy:  # one line a minute is enough during an outage
                log.warning("cluster metrics: reading Redis failed: %s: %s", type(exc).__name__, exc)
        samples.append(("reframe_cluster_scrape_success", (), success))
        samples.append(("reframe_cluster_scrape_duration_seconds", (), time.perf_counter() - started))
        yield from _families(samples)
        errors = CounterMetricFamily(_ERRORS_NAME, _ERRORS_HELP)
        errors.add_metric([], float(self._errors))
        yield errors

    # --- readers -------------------------------------------------------------------------------

    def _static_samples(self) -> list[Sample]:
        s = self._settings
        return [
            ("reframe_slots_capacity", (), float(s.slot_capacity)),
            *[("reframe_fal_account_capacity", (a.id,), float(a.cap)) for a in s.fal_account_specs],
            *[
                (
                    "reframe_fal_account_budget_cap_usd",
                    (a.id, period),
                    math.inf if cap is None else float(cap),
                )
                for a in s.fal_account_specs
                for period, cap in (("day", a.daily_usd), ("month", a.monthly_usd))
            ],
            ("reframe_slots_reserved_high", (), float(s.reserved_high_slots)),
            ("reframe_celery_visibility_timeout_seconds", (), float(s.visibility_timeout_s)),
            ("reframe_budget_cap_usd", ("day",), float(s.budget_daily_usd)),
            ("reframe_budget_cap_usd", ("month",), float(s.budget_monthly_usd)),
        ]

    def _read(self) -> _Raw:
        """Two pipelined round trips: sizes and heads, then the records they point at."""
        k = self._keys
        pipe = self._r.pipeline(transaction=False)
        pipe.time()
        for key in self._celery_keys:
            pipe.llen(key)
        for key in self._celery_keys:
            pipe.lindex(key, -1)  # kombu LPUSHes and BRPOPs: the oldest message is the tail
        pipe.hmget(k.fair, [f"depth:{i}" for i in range(1, len(PRIORITIES) + 1)])
        # per tenant, by priority, then FIFO: the first entries of each tenant's line
        pipe.zrangebylex(k.wait_queue, "-", "+", start=0, num=self._wait_scan)
        for key in (k.blocked, k.delayed, k.track, self._unacked_index_key):
            pipe.zrange(key, 0, 0, withscores=True)
        for key in (k.blocked, k.delayed, k.slots, k.track, k.dlq):
            pipe.zcard(key)
        pipe.zrange(k.slots, 0, self._slot_scan - 1)
        pipe.hlen(self._unacked_key)
        pipe.xlen(k.events)
        pipe.zcard(k.outputs_pending)
        pipe.zcard(k.outputs_failed)
        pipe.zrange(k.outputs_since, 0, 0, withscores=True)
        replies = iter(pipe.execute())

        secs, usecs = next(replies)
        raw = _Raw(now_ms=int(secs) * 1000 + int(usecs) // 1000)
        n = len(self._celery_keys)
        raw.celery_depths = [int(next(replies)) for _ in range(n)]
        raw.celery_tails = [parse_celery_message(m) if m is not None else None for m in _take(replies, n)]
        raw.wait_depths = [int(d or 0) for d in next(replies)]
        entries = [_text(m).split("|") for m in next(replies)]
        raw.wait_heads = [
            [e[3] for e in entries if len(e) == 4 and e[1] == str(i)] for i in range(1, len(PRIORITIES) + 1)
        ]
        raw.blocked_head, raw.delayed_head, raw.track_head, raw.unacked_head = _take(replies, 4)
        raw.blocked_n, raw.delayed_n, raw.slots_n, raw.track_n, raw.dlq_n = (
            int(v) for v in _take(replies, 5)
        )
        raw.slot_holders = [_text(m) for m in next(replies)]
        raw.unacked_n, raw.events_n = int(next(replies)), int(next(replies))
        raw.copies_pending, raw.copies_failed = int(next(replies)), int(next(replies))
        raw.copies_oldest = next(replies)

        job_ids = sorted(
            {h.job_id for h in raw.celery_tails if h is not None and h.job_id}
            | {j for heads in raw.wait_heads for j in heads}
            | set(raw.slot_holders)
        )
        pipe = self._r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(k.job(job_id), list(_RECORD_FIELDS))
        pipe.zcount(k.slots, "-inf", raw.now_ms)
        pipe.zcount(k.track, "-inf", raw.now_ms)
        replies2 = pipe.execute()
        raw.records = {
            job_id: [None if v is None else _text(v) for v in vals]
            for job_id, vals in zip(job_ids, replies2, strict=False)
        }
        raw.expired_n, raw.overdue_n = int(replies2[-2]), int(replies2[-1])
        return raw

    def _redis_samples(self) -> list[Sample]:
        raw = self._read()
        now_ms, records = raw.now_ms, raw.records
        out: list[Sample] = []
        # Celery lists, folded onto our three priorities.
        depth_by_prio = dict.fromkeys(PRIORITIES, 0)
        age_by_prio = dict.fromkeys(PRIORITIES, 0.0)
        for (_, prio), depth, head in zip(
            CELERY_STEP_PRIORITY, raw.celery_depths, raw.celery_tails, strict=True
        ):
            depth_by_prio[prio] += depth
            age_by_prio[prio] = max(age_by_prio[prio], self._celery_age(now_ms, head, records))
        for prio in PRIORITIES:
            out.append(("reframe_queue_depth", ("celery", prio), float(depth_by_prio[prio])))
            out.append(("reframe_queue_oldest_age_seconds", ("celery", prio), age_by_prio[prio]))
        # Wait lists: the first entry whose record is still WAITING (others were withdrawn/admitted).
        for prio, depth, heads in zip(PRIORITIES, raw.wait_depths, raw.wait_heads, strict=True):
            age = 0.0
            for job_id in heads:
                rec = records.get(job_id)
                if rec is not None and rec[0] == "WAITING":
                    age = _age_s(now_ms, _first_int(rec[1 : 1 + len(QUEUED_FIELDS)]))
                    break
            out.append(("reframe_queue_depth", ("wait", prio), float(depth)))
            out.append(("reframe_queue_oldest_age_seconds", ("wait", prio), age))
        blocked_age = _age_s(now_ms, _zhead_score(raw.blocked_head))
        out.append(("reframe_queue_depth", ("blocked", "any"), float(raw.blocked_n)))
        out.append(("reframe_queue_oldest_age_seconds", ("blocked", "any"), blocked_age))
        out.append(("reframe_queue_depth", ("delayed", "any"), float(raw.delayed_n)))
        out.append(("reframe_delayed_overdue_seconds", (), _age_s(now_ms, _zhead_score(raw.delayed_head))))

        # In-flight age from the slot holders' records (O(capacity)).
        submits = [
            _first_int(rec[1 + len(QUEUED_FIELDS) :])
            for rec in (records.get(j) for j in raw.slot_holders)
            if rec is not None
        ]
        oldest_submit = min((t for t in submits if t is not None), default=None)
        # kombu scores unacked_index in (float) unix seconds.
        unacked_since = _zhead_score_float(raw.unacked_head)
        unacked_age = max(0.0, now_ms / 1000.0 - unacked_since) if unacked_since is not None else 0.0
        out += [
            ("reframe_slots_in_use", (), float(raw.slots_n)),
            ("reframe_slot_leases_expired", (), float(raw.expired_n)),
            ("reframe_inflight_oldest_age_seconds", (), _age_s(now_ms, oldest_submit)),
            ("reframe_tracking_jobs", (), float(raw.track_n)),
            ("reframe_tracking_overdue_jobs", (), float(raw.overdue_n)),
            ("reframe_tracking_overdue_seconds", (), _age_s(now_ms, _zhead_score(raw.track_head))),
            ("reframe_celery_unacked_messages", (), float(raw.unacked_n)),
            ("reframe_celery_unacked_oldest_age_seconds", (), unacked_age),
            ("reframe_dead_letter_jobs", (), float(raw.dlq_n)),
            ("reframe_result_stream_length", (), float(raw.events_n)),
            ("reframe_output_copies_pending", (), float(raw.copies_pending)),
            (
                "reframe_output_copy_oldest_pending_age_seconds",
                (),
                _age_s(now_ms, _zhead_score(raw.copies_oldest)),
            ),
            ("reframe_output_copies_failed", (), float(raw.copies_failed)),
        ]
        out.extend(self._flow_samples(now_ms))
        out.extend(self._tenants.samples(self._r, now_ms))
        return out

    def _celery_age(
        self, now_ms: int, head: CeleryHead | None, records: dict[str, list[str | None]]
    ) -> float:
        if head is None or not head.job_id:
            return 0.0
        rec = records.get(head.job_id)
        if rec is None or rec[0] not in WAITING_STATES:
            return 0.0
        since = _first_int(rec[1 : 1 + len(QUEUED_FIELDS)])
        if since is None:
            return 0.0
        # A message with a countdown/eta was not meant to run earlier: count from the later of the two
        # (celery-exporter's queue-wait does the same, §1.2).
        if head.eta_ms is not None:
            if head.eta_ms > now_ms:
                return 0.0
            since = max(since, head.eta_ms)
        return _age_s(now_ms, since)

    def _flow_samples(self, now_ms: int) -> list[Sample]:
        flow = self._flow
        breaker = flow.breaker.state()
        budget = flow.budget.snapshot()
        paused_until = flow.rate.paused_until_ms()
        tokens = flow.retry_budget.tokens()
        out: list[Sample] = [
            ("reframe_breaker_state", (state.value,), 1.0 if breaker.state is state else 0.0)
            for state in BreakerState
        ]
        # account ids come from the settings (a closed set of at most 32): bounded labels
        for account in flow.accounts.status():
            out.append(("reframe_fal_account_up", (account.id,), 1.0 if account.usable else 0.0))
            out.append(("reframe_fal_account_slots_in_use", (account.id,), float(account.in_use)))
            out += [
                (
                    "reframe_fal_account_budget_spent_usd",
                    (account.id, "day"),
                    micro_to_usd(account.day_spent_micro),
                ),
                (
                    "reframe_fal_account_budget_spent_usd",
                    (account.id, "month"),
                    micro_to_usd(account.month_spent_micro),
                ),
                (
                    "reframe_fal_account_budget_reserved_usd",
                    (account.id,),
                    micro_to_usd(account.reserved_micro),
                ),
            ]
        remaining = (breaker.open_until_ms - now_ms) / 1000.0 if breaker.state is BreakerState.OPEN else 0.0
        out += [
            ("reframe_breaker_open_remaining_seconds", (), max(0.0, remaining)),
            ("reframe_breaker_window_calls", (), float(breaker.calls)),
            ("reframe_breaker_window_failures", (), float(breaker.failures)),
            (
                "reframe_rate_pause_remaining_seconds",
                (),
                max(0.0, ((paused_until or now_ms) - now_ms) / 1000.0),
            ),
            ("reframe_retry_budget_tokens", (), float(tokens)),
            ("reframe_budget_spent_usd", ("day",), micro_to_usd(budget.day_spent)),
            ("reframe_budget_spent_usd", ("month",), micro_to_usd(budget.month_spent)),
            ("reframe_budget_reserved_usd", ("day",), micro_to_usd(budget.day_reserved)),
            ("reframe_budget_reserved_usd", ("month",), micro_to_usd(budget.month_reserved)),
        ]
        return out


#: Label of the tenants not named (a tenant really called "other" is always counted in it).
OTHER_TENANT: Final = "other"
PERIODS: Final = ("day", "month")
#: Ledger entries read per scrape while catching up with the month (a restarted exporter reads the
#: month's ledger over a few scrapes instead of in one).
LEDGER_READ_PER_SCRAPE: Final = 20_000


def _usd(raw: Any) -> float:
    """Micro-dollars of a budget hash field as dollars; 0 when absent or unreadable."""
    parsed = _int_or_none(raw)
    return micro_to_usd(parsed) if parsed is not None else 0.0


def _cap_usd(raw: Any) -> float | None:
    """A tenant cap (dollars as text); ``None`` when absent, empty or unreadable (no cap)."""
    if raw is None or _text(raw).strip() == "":
        return None
    try:
        value = float(_text(raw))
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


@dataclass
class _TenantPeriods:
    spent: dict[str, float] = field(default_factory=dict)
    reserved: dict[str, float] = field(default_factory=dict)
    cap: dict[str, float | None] = field(default_factory=dict)


class TenantSpend:
    """Per-tenant spend and budget headroom with bounded labels (``reframe exporter`` only).

    Tenants are the members of ``P:tenants`` (tenants with limits) plus every tenant charged this
    UTC month in the cost ledger, which this object tails incrementally (worker/contracts/ledger.py;
    a cursor kept between scrapes, at most :data:`LEDGER_READ_PER_SCRAPE` entries per scrape). For
    each it reads the tenant's budget period hashes of the current day and month
    (``P:fc:budget:tenant:<t>:day:<YYYY-MM-DD>`` / ``...:month:<YYYY-MM>``, fields ``spent`` and
    ``reserved`` in micro-dollars) and its caps (``P:tenant:<t>:limits``, ``daily_budget_usd`` and
    ``monthly_budget_usd``; absent = no cap), all in one pipelined round trip: 3 commands per tenant.
    The ``top`` tenants with the most spent + reserved this month are named; the rest are summed as
    ``tenant="other"`` (caps and headroom over those that have a cap), so a scrape has at most
    ``(top + 1) * 2`` series per metric. ``reframe_tenants_at_budget_cap`` counts every tenant.
    """

    def __init__(self, keys: Keys, *, top: int) -> None:
        self._keys = keys
        self._top = top
        self._month = ""
        self._cursor = "-"
        self._charged: set[str] = set()  # tenants with a ledger entry this month

    def _tail_ledger(self, r: redis.Redis, month: str, month_start_ms: int) -> None:
        if month != self._month:
            self._month, self._cursor, self._charged = month, str(month_start_ms), set()
        start, left = self._cursor, LEDGER_READ_PER_SCRAPE
        charged = set(self._charged)
        while left > 0:
            count = min(left, 5000)
            page = list(r.xrange(self._keys.ledger, start, "+", count=count) or [])
            for _stream_id, fields in page:
                raw = {_text(k): v for k, v in (fields or {}).items()}
                charged.add(_text(raw.get("tenant", "")) or "default")
            if page:
                start = "(" + _text(page[-1][0])
            left -= len(page)
            if len(page) < count:
                break
        self._cursor, self._charged = start, charged

    def _read(self, r: redis.Redis, now_ms: int) -> tuple[list[str], int, dict[str, _TenantPeriods]]:
        when = datetime.fromtimestamp(now_ms / 1000, tz=UTC)
        day, month = when.strftime("%Y-%m-%d"), when.strftime("%Y-%m")
        month_start_ms = int(datetime(when.year, when.month, 1, tzinfo=UTC).timestamp() * 1000)
        self._tail_ledger(r, month, month_start_ms)
        members = {_text(m) for m in (r.smembers(f"{self._keys.root}:tenants") or ())}
        tenants = sorted(members | self._charged)
        root = self._keys.root
        pipe = r.pipeline(transaction=False)
        for t in tenants:
            pipe.hmget(f"{root}:fc:budget:tenant:{t}:day:{day}", ["spent", "reserved"])
            pipe.hmget(f"{root}:fc:budget:tenant:{t}:month:{month}", ["spent", "reserved"])
            pipe.hmget(f"{root}:tenant:{t}:limits", ["daily_budget_usd", "monthly_budget_usd"])
        pipe.xlen(self._keys.ledger)
        replies = pipe.execute()
        per: dict[str, _TenantPeriods] = {}
        for i, t in enumerate(tenants):
            day_v, month_v, caps = replies[3 * i : 3 * i + 3]
            p = per[t] = _TenantPeriods()
            for period, values, cap in (("day", day_v, caps[0]), ("month", month_v, caps[1])):
                p.spent[period], p.reserved[period], p.cap[period] = (
                    _usd(values[0]),
                    _usd(values[1]),
                    _cap_usd(cap),
                )
        return tenants, int(replies[-1]), per

    def samples(self, r: redis.Redis, now_ms: int) -> list[Sample]:
        """The per-tenant samples of one scrape."""
        tenants, ledger_entries, per = self._read(r, now_ms)
        ranked = sorted(
            (
                t
                for t in tenants
                if t != OTHER_TENANT and per[t].spent["month"] + per[t].reserved["month"] > 0
            ),
            key=lambda t: (-(per[t].spent["month"] + per[t].reserved["month"]), t),
        )
        named = ranked[: self._top]
        out: list[Sample] = []
        at_cap = dict.fromkeys(PERIODS, 0)
        other = _TenantPeriods(spent=dict.fromkeys(PERIODS, 0.0), reserved=dict.fromkeys(PERIODS, 0.0))
        other_cap, other_room = dict.fromkeys(PERIODS, 0.0), dict.fromkeys(PERIODS, 0.0)
        for t in tenants:
            p = per[t]
            for period in PERIODS:
                cap = p.cap[period]
                used = p.spent[period] + p.reserved[period]
                at_cap[period] += cap is not None and used >= cap
                if t in named:
                    out.append(("reframe_tenant_spent_usd", (t, period), p.spent[period]))
                    out.append(("reframe_tenant_reserved_usd", (t, period), p.reserved[period]))
                    if cap is not None:
                        out.append(("reframe_tenant_budget_cap_usd", (t, period), cap))
                        out.append(("reframe_tenant_budget_headroom_usd", (t, period), cap - used))
                else:
                    other.spent[period] += p.spent[period]
                    other.reserved[period] += p.reserved[period]
                    if cap is not None:
                        other_cap[period] += cap
                        other_room[period] += cap - used
        for period in PERIODS:
            out.append(("reframe_tenant_spent_usd", (OTHER_TENANT, period), other.spent[period]))
            out.append(("reframe_tenant_reserved_usd", (OTHER_TENANT, period), other.reserved[period]))
            out.append(("reframe_tenant_budget_cap_usd", (OTHER_TENANT, period), other_cap[period]))
            out.append(("reframe_tenant_budget_headroom_usd", (OTHER_TENANT, period), other_room[period]))
            out.append(("reframe_tenants_at_budget_cap", (period,), float(at_cap[period])))
        out.append(("reframe_tenants", (), float(len(tenants))))
        out.append(("reframe_ledger_entries", (), float(ledger_entries)))
        return out


def _zhead_score(head: Any) -> int | None:
    score = _zhead_score_float(head)
    return None if score is None else int(score)


def _zhead_score_float(head: Any) -> float | None:
    """The score of a ``ZRANGE key 0 0 WITHSCORES`` reply, or ``None`` for an empty set."""
    if not head:
        return None
    return float(head[0][1])


def _families(samples: Iterable[Sample]) -> Iterator[Metric]:
    families: dict[str, GaugeMetricFamily] = {}
    for name, labels, value in samples:
        family = families.get(name)
        if family is None:
            spec = _SPEC_BY_NAME[name]
            family = families[name] = GaugeMetricFamily(name, spec.help, labels=list(spec.labels))
        family.add_metric(list(labels), value)
    yield from families.values()


def exporter_redis_client(settings: Settings, *, timeout_s: float = 2.0) -> redis.Redis:
    """A Redis client suited to :class:`ClusterCollector`: short timeouts and no retries.

    redis-py's default retry policy spends several seconds on a refused connection; a scrape should
    instead fail fast and report ``reframe_cluster_scrape_success 0`` (Prometheus scrapes again
    anyway), well inside the scrape timeout.
    """
    timeout = min(timeout_s, settings.redis_socket_timeout_s)
    return redis_client(
        settings,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=30,
    )


def metric_names() -> list[str]:
    """Every metric name this collector can export (for dashboard and rule checks)."""
    return [s.name for s in _SPECS] + [_ERRORS_NAME + "_total"]
