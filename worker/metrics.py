"""Every Prometheus metric a Reframe worker process exposes, and typed helpers to record them.

Design rules (docs/design.md "Metrics and health"; why they matter: docs/celery-operations.md
§1.6 and §5):

* **One registry per process, no multiprocess mode.** Workers run Celery's *threads* pool, so a
  single process serves every task and the plain ``prometheus_client`` registry is correct.
* **Nothing at import time.** :class:`Metrics` registers its collectors on the registry it is given;
  tests build it on a fresh :class:`~prometheus_client.CollectorRegistry`. The process-wide instance
  comes from :func:`get_metrics`, created on first call.
* **Bounded labels only.** No job ids, request ids or pod names (pod identity comes from the
  Prometheus target labels). Every label value is checked against a closed set; anything else is
  recorded as ``other`` (and logged once), so a caller bug can never blow up the series count.
* **Base units.** Seconds, US dollars, plain counts; metric names carry the unit.
* **Cluster-wide gauges are not here.** Queue depth, slots, budget and breaker state are computed
  from Redis at scrape time by :mod:`reframe.exporter.collector` inside ``reframe exporter`` (one
  replica), so ``sum()`` over worker pods never multiplies them.

The worker core calls the helper methods (``metrics.fal_request(...)``, ``metrics.job_finished(...)``);
it never touches the metric objects directly, so names and label sets live in this one file.
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
from collections.abc import Iterable
from importlib import metadata
from typing import Final

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

log = logging.getLogger(__name__)

PREFIX: Final = "reframe"
OTHER: Final = "other"
"""Label value recorded instead of a value outside a label's closed set."""

# --- label vocabularies ---------------------------------------------------------------------------
# Structural labels have closed sets: an unknown value is counted as ``other`` (and logged once).
# Reason labels (retry, deferral, dead letter) are open but capped: the worker core names reasons
# freely (``http_429``, ``breaker_open``, ``retries_exhausted``), each value is normalised to
# ``[a-z0-9_]`` and at most ``MAX_REASONS`` distinct values per label are kept, the rest is ``other``.

PRIORITIES: Final = ("high", "normal", "low")
JOB_OUTCOMES: Final = ("succeeded", "failed", "cancelled", "dead_lettered")
FAL_OPS: Final = ("submit", "status", "stream", "result", "cancel", "upload", "token")
STATUS_CLASSES: Final = ("2xx", "3xx", "4xx", "429", "5xx", "timeout", "network")
"""``error`` is "no usable response" when the caller cannot tell a timeout from a network error."""
AMBIGUOUS_ACTIONS: Final = ("await_webhook", "dead_letter", "resubmit")
"""The ``ambiguous_submit_policy`` that was applied."""
BREAKER_STATES: Final = ("closed", "open", "half_open")
BUDGET_PERIODS: Final = ("day", "month", "tenant_day", "tenant_month")
RESULT_SINKS: Final = ("stream",)
PUBLISH_OUTCOMES: Final = ("ok",)
CALLBACK_OUTCOMES: Final = ("delivered", "failed", "gave_up")
OUTPUT_COPY_OUTCOMES: Final = ("copied", "failed", "gave_up")
OUTPUT_VERIFY_RESULTS: Final = ("ok", "mismatch")
TRACKER_POLL_OUTCOMES: Final = ("ok",)
COMPLETION_PATHS: Final = ("webhook", "status")
DEDUP_OUTCOMES: Final = ("led", "attached", "served", "alone", "no_key")
"""What a job that asked to pay once for identical work got (worker/submit.py): it led the work,
attached to a leader in flight, was served a result without a fal call, went alone (its leader
waits BLOCKED), or had no canonical key (no strong validator, unreadable input)."""
"""How the end of a fal request was learned: fal's webhook, or the tracker's status reads."""
CELERY_TASK_OUTCOMES: Final = ("succeeded", "failed", "retried", "rejected", "ignored", "revoked", OTHER)

#: Distinct values kept per reason label (retry, deferral, dead letter).
MAX_REASONS: Final = 25
_REASON_CHARS: Final = re.compile(r"[^a-z0-9_]+")

# --- histogram buckets (seconds) ----------------------------------------------------------------
# Chosen for this workload: fal reframes take tens of seconds to minutes, queueing can take hours
# under a budget or breaker, and HTTP calls take milliseconds to tens of seconds.
END_TO_END_BUCKETS: Final = (
    1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 900, 1800, 3600, 7200, 21600,
)  # fmt: skip
QUEUE_WAIT_BUCKETS: Final = (
    0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600,
)  # fmt: skip
FAL_QUEUE_BUCKETS: Final = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
INFERENCE_BUCKETS: Final = (1, 2, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200)
HTTP_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
RATE_WAIT_BUCKETS: Final = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5)
TASK_RUNTIME_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 90, 300)
CALLBACK_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
OUTPUT_COPY_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

#: Distinct exception class names kept per task before further ones are recorded as ``other``.
MAX_EXCEPTION_CLASSES: Final = 30
#: Distinct Celery task names kept before further ones are recorded as ``other``.
MAX_TASK_NAMES: Final = 30


def _version() -> str:
    try:
        return metadata.version("reframe-cluster")
    except metadata.PackageNotFoundError:  # running from a source tree without an install
        return "unknown"


class _Guard:
    """Maps label values outside a closed set to ``other``, logging each unknown value once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._warned: set[tuple[str, str]] = set()
        self._open_sets: dict[str, set[str]] = {}

    def closed(self, label: str, value: str, allowed: Iterable[str]) -> str:
        if value in allowed:
            return value
        self._warn(label, value)
        return OTHER

    def capped(self, label: str, value: str, cap: int) -> str:
        """Admit the first ``cap`` distinct values of an open label (task names, exception classes)."""
        with self._lock:
            seen = self._open_sets.setdefault(label, set())
            if value in seen:
                return value
            if len(seen) < cap:
                seen.add(value)
                return value
        self._warn(label, value)
        return OTHER

    def reason(self, label: str, value: object) -> str:
        """Normalise a free-form reason to ``[a-z0-9_]{1,40}`` and cap the distinct values."""
        text = _REASON_CHARS.sub("_", str(value).strip().lower()).strip("_")[:40] or "unknown"
        return self.capped(label, text, MAX_REASONS)

    def _warn(self, label: str, value: str) -> None:
        key = (label, value)
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        log.warning("metrics: label %s=%r is not in its closed set; recorded as %r", label, value, OTHER)


def _seconds(value: float) -> float:
    # A clock step (NTP, VM migration) can make a measured interval negative; a negative observation
    # would land in the lowest bucket and corrupt _sum, so clamp it to zero.
    return value if value > 0 else 0.0


class Metrics:
    """All metrics of one worker process, registered on ``registry``.

    Construct one per registry (tests use a fresh :class:`CollectorRegistry`); production code gets
    the process-wide instance from :func:`get_metrics`. Every method is thread-safe (the underlying
    ``prometheus_client`` objects lock) and never raises on a bad label value.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        # The ``*_created`` series (one per counter and histogram child) say nothing a dashboard
        # uses and would double the series count.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry
        self._guard = _Guard()
        p = PREFIX

        # --- process identity ----------------------------------------------------------------
        self.worker_info = Gauge(
            f"{p}_worker_info",
            "Always 1 in a Reframe worker process; version is the package version. Alerts use it to "
            "tell 'no worker is being scraped' from 'workers are idle'.",
            ["version"],
            registry=registry,
        )
        self.worker_info.labels(version=_version()).set(1)

        # --- jobs --------------------------------------------------------------------------------
        self.jobs_enqueued = Counter(
            f"{p}_jobs_enqueued_total",
            "Jobs accepted into the cluster by this process (first receipt of a job, by priority). "
            "Replays from the dead-letter set count again.",
            ["priority"],
            registry=registry,
        )
        self.jobs_finished = Counter(
            f"{p}_jobs_finished_total",
            "Jobs that reached a terminal outcome in this process: succeeded, failed, cancelled, or "
            "dead_lettered (failed and parked in the dead-letter set for an operator).",
            ["outcome", "priority"],
            registry=registry,
        )
        self.job_end_to_end = Histogram(
            f"{p}_job_end_to_end_seconds",
            "Time from enqueue to the terminal state (includes queueing, deliberate delays, fal "
            "queueing and inference), by outcome and priority.",
            ["outcome", "priority"],
            buckets=END_TO_END_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            f"{p}_job_queue_wait_seconds",
            "Time from enqueue to the first fal submit attempt, EXCLUDING deliberate delays (backoff, "
            "breaker open, rate pause, budget block): the time the cluster kept the job waiting for "
            "a worker or a slot.",
            ["priority"],
            buckets=QUEUE_WAIT_BUCKETS,
            registry=registry,
        )
        self.jobs_deferred = Counter(
            f"{p}_jobs_deferred_total",
            "Jobs put aside on purpose until a later time (the P:delayed set), by reason.",
            ["reason"],
            registry=registry,
        )

        # --- fal ---------------------------------------------------------------------------------
        self.fal_queue_time = Histogram(
            f"{p}_fal_queue_seconds",
            "Time a request spent in fal's own queue: accepted submit to IN_PROGRESS.",
            buckets=FAL_QUEUE_BUCKETS,
            registry=registry,
        )
        self.fal_inference_time = Histogram(
            f"{p}_fal_inference_seconds",
            "Time fal spent running a request: IN_PROGRESS to COMPLETED.",
            buckets=INFERENCE_BUCKETS,
            registry=registry,
        )
        self.fal_requests = Counter(
            f"{p}_fal_requests_total",
            "HTTP calls to fal by operation and status class (2xx, 3xx, 4xx, 429, 5xx; timeout, network "
            "or error when no response arrived). In-call retries count as separate calls.",
            ["op", "status_class"],
            registry=registry,
        )
        self.fal_request_duration = Histogram(
            f"{p}_fal_request_duration_seconds",
            "Duration of one HTTP call to fal (until headers for the status stream), by operation.",
            ["op"],
            buckets=HTTP_BUCKETS,
            registry=registry,
        )
        self.retries = Counter(
            f"{p}_retries_total",
            "Job-level retries scheduled (a new fal submit later), by reason.",
            ["reason"],
            registry=registry,
        )
        self.ambiguous_submits = Counter(
            f"{p}_ambiguous_submits_total",
            "Submits whose outcome was unknown (timeout or dropped connection after sending), by the "
            "step taken: await_webhook (webhooks on: wait for the attempt's webhook to adopt it), then "
            "the policy: dead_letter (never pay twice) or resubmit (risk of a double charge).",
            ["action"],
            registry=registry,
        )
        self.dedup_saved = Counter(
            f"{p}_dedup_saved_usd_total",
            "Dollars not spent because a job reused an identical job's result (the cost of the job it "
            "was served from), counted by the process that served it.",
            registry=registry,
        )
        self.dedup_jobs = Counter(
            f"{p}_dedup_jobs_total",
            "Jobs that asked to pay once for identical work, by what they got (a job that attaches and "
            "is later served counts once in each).",
            ["outcome"],
            registry=registry,
        )
        self.spend = Counter(
            f"{p}_spend_usd_total",
            "Dollars settled against the budget by this process (actual cost of finished requests).",
            registry=registry,
        )

        # --- flow control ------------------------------------------------------------------------
        self.rate_limit_wait = Histogram(
            f"{p}_rate_limit_wait_seconds",
            "In-task waits for a cluster-wide submit-rate token (GCRA). Waits longer than "
            "max_rate_wait_s are deferred instead and are counted in reframe_jobs_deferred_total.",
            buckets=RATE_WAIT_BUCKETS,
            registry=registry,
        )
        self.rate_limit_pauses = Counter(
            f"{p}_rate_limit_pauses_total",
            "Cluster-wide submit pauses started by this process after fal answered 429.",
            registry=registry,
        )
        self.rate_limit_pause_seconds = Counter(
            f"{p}_rate_limit_pause_seconds_total",
            "Seconds of cluster-wide submit pause requested by this process (Retry-After, clamped).",
            registry=registry,
        )
        self.breaker_transitions = Counter(
            f"{p}_breaker_transitions_total",
            "Circuit-breaker state changes made by this process (closed, open, half_open).",
            ["from_state", "to_state"],
            registry=registry,
        )
        self.budget_rejections = Counter(
            f"{p}_budget_rejections_total",
            "Submits refused because the day or month spend cap would be exceeded (the job is "
            "blocked until the period rolls over or the cap is raised).",
            ["period"],
            registry=registry,
        )
        self.dead_letters = Counter(
            f"{p}_dead_letters_total",
            "Jobs moved to the dead-letter set by this process, by reason.",
            ["reason"],
            registry=registry,
        )

        # --- results -----------------------------------------------------------------------------
        self.stream_trimmed_unread_events = Counter(
            f"{p}_result_stream_trimmed_unread_total",
            "Result events trimmed past REFRAME_RESULTS_STREAM_MAXLEN before every consumer group "
            "had read them (the hard ceiling bit: a consumer is too slow or gone).",
            registry=registry,
        )
        self.results_published = Counter(
            f"{p}_results_published_total",
            "Terminal result events written to the result stream (sink=stream, outcome=ok), each in "
            "the same atomic step as the job's end and its callback work.",
            ["sink", "outcome"],
            registry=registry,
        )
        self.callback_deliveries = Counter(
            f"{p}_callback_deliveries_total",
            "Callback POST attempts by outcome: delivered (2xx), failed (any other answer or none; "
            "retried from the outbox), gave_up (retry window over, or a 410/blocked target).",
            ["outcome"],
            registry=registry,
        )
        self.callback_duration = Histogram(
            f"{p}_callback_duration_seconds",
            "Duration of one callback POST.",
            buckets=CALLBACK_BUCKETS,
            registry=registry,
        )
        self.output_copies = Counter(
            f"{p}_output_copies_total",
            "Output copy tries by outcome: copied (stored and verified), failed (retried from the "
            "copy outbox), gave_up (copy window over or fal's file gone: output_copy=failed).",
            ["outcome"],
            registry=registry,
        )
        self.output_copy_duration = Histogram(
            f"{p}_output_copy_duration_seconds",
            "Duration of one successful output copy (download from fal, verify, upload).",
            buckets=OUTPUT_COPY_BUCKETS,
            registry=registry,
        )
        self.output_copy_bytes = Counter(
            f"{p}_output_copy_bytes_total", "Bytes of outputs copied into the store.", registry=registry
        )
        self.output_verify = Counter(
            f"{p}_output_verify_total",
            "Copied outputs checked against their request: ok, or mismatch (wrong aspect ratio or "
            "duration; recorded on the job with the measured numbers).",
            ["result"],
            registry=registry,
        )

        # --- completion tracker ------------------------------------------------------------------
        self.tracker_jobs = Gauge(
            f"{p}_tracker_jobs",
            "In-flight jobs this process's tracker is following right now.",
            registry=registry,
        )
        self.tracker_capacity = Gauge(
            f"{p}_tracker_capacity_jobs",
            "Most jobs this process's tracker follows at once (tracker_max_jobs).",
            registry=registry,
        )
        self.tracker_stream_reconnects = Counter(
            f"{p}_tracker_status_stream_reconnects_total",
            "Times the tracker reopened fal's status stream for a job after it broke.",
            registry=registry,
        )
        self.tracker_polls = Counter(
            f"{p}_tracker_status_polls_total",
            "Status polls (fallback when the stream is unavailable) answered, by outcome (ok).",
            ["outcome"],
            registry=registry,
        )
        self.job_completions = Counter(
            f"{p}_job_completions_total",
            "Ends of fal requests applied to their jobs by this process (succeeded, failed, cancelled, "
            "lost, or a runner failure retried), by the path that learned them: via=webhook (fal's "
            "completion webhook) or via=status (the tracker's status stream, polls and result reads).",
            ["via"],
            registry=registry,
        )

        # --- Celery tasks (fed by worker.signals) ------------------------------------------------
        self.celery_tasks_started = Counter(
            f"{p}_celery_tasks_started_total",
            "Celery tasks started in this process, by task name.",
            ["task"],
            registry=registry,
        )
        self.celery_tasks = Counter(
            f"{p}_celery_tasks_total",
            "Celery tasks finished in this process, by task name and outcome (succeeded, failed, "
            "retried, rejected, ignored, revoked).",
            ["task", "outcome"],
            registry=registry,
        )
        self.celery_task_runtime = Histogram(
            f"{p}_celery_task_runtime_seconds",
            "Celery task run time (prerun to postrun), by task and outcome, failures included.",
            ["task", "outcome"],
            buckets=TASK_RUNTIME_BUCKETS,
            registry=registry,
        )
        self.celery_tasks_active = Gauge(
            f"{p}_celery_tasks_active",
            "Celery tasks running in this process right now, by task name.",
            ["task"],
            registry=registry,
        )
        self.celery_task_exceptions = Counter(
            f"{p}_celery_task_exceptions_total",
            "Exceptions that failed or retried a Celery task, by task and exception class "
            f"(the first {MAX_EXCEPTION_CLASSES} classes seen, then 'other').",
            ["task", "exception"],
            registry=registry,
        )

        self._preinitialise()

    def _preinitialise(self) -> None:
        # Create the expected series at 0 so rate()/increase() and ratio alerts see the first event
        # (a series born at 1 loses that increment) and dashboards show 0 rather than "No data".
        table: list[tuple[Counter | Histogram, dict[str, Iterable[str]]]] = [
            (self.jobs_enqueued, {"priority": PRIORITIES}),
            (self.queue_wait, {"priority": PRIORITIES}),
            (self.jobs_finished, {"outcome": JOB_OUTCOMES, "priority": PRIORITIES}),
            (self.fal_request_duration, {"op": FAL_OPS}),
            (self.fal_requests, {"op": FAL_OPS, "status_class": STATUS_CLASSES}),
            (self.ambiguous_submits, {"action": AMBIGUOUS_ACTIONS}),
            (self.budget_rejections, {"period": BUDGET_PERIODS}),
            (self.results_published, {"sink": RESULT_SINKS, "outcome": PUBLISH_OUTCOMES}),
            (self.callback_deliveries, {"outcome": CALLBACK_OUTCOMES}),
            (self.output_copies, {"outcome": OUTPUT_COPY_OUTCOMES}),
            (self.output_verify, {"result": OUTPUT_VERIFY_RESULTS}),
            (self.tracker_polls, {"outcome": TRACKER_POLL_OUTCOMES}),
            (self.job_completions, {"via": COMPLETION_PATHS}),
            (self.dedup_jobs, {"outcome": DEDUP_OUTCOMES}),
        ]
        for metric, labels in table:
            names = list(labels)
            for values in itertools.product(*(labels[n] for n in names)):
                metric.labels(**dict(zip(names, values, strict=True)))

    # --- label helpers ---------------------------------------------------------------------------

    def _priority(self, priority: str) -> str:
        return self._guard.closed("priority", str(priority), PRIORITIES)

    def _task(self, task: str) -> str:
        return self._guard.capped("task", task, MAX_TASK_NAMES)

    # --- jobs --------------------------------------------------------------------------------------

    def job_enqueued(self, priority: str) -> None:
        """Count a job accepted into the cluster."""
        self.jobs_enqueued.labels(priority=self._priority(priority)).inc()

    def job_finished(self, outcome: str, priority: str, e2e_s: float | None) -> None:
        """Count a terminal outcome and observe enqueue→terminal time (``None`` when unknown)."""
        out = self._guard.closed("outcome", str(outcome), JOB_OUTCOMES)
        prio = self._priority(priority)
        self.jobs_finished.labels(outcome=out, priority=prio).inc()
        if e2e_s is not None:
            self.job_end_to_end.labels(outcome=out, priority=prio).observe(_seconds(e2e_s))

    def job_queue_wait(self, priority: str, wait_s: float) -> None:
        """Observe enqueue→first submit, with deliberate delays already subtracted by the caller."""
        self.queue_wait.labels(priority=self._priority(priority)).observe(_seconds(wait_s))

    def job_deferred(self, reason: str) -> None:
        """Count a job parked in the delayed set, by reason (e.g. ``breaker_open``, ``paused``)."""
        self.jobs_deferred.labels(reason=self._guard.reason("defer_reason", reason)).inc()

    # --- fal ---------------------------------------------------------------------------------------

    def fal_request(self, op: str, status_class: str, duration_s: float) -> None:
        """Count one HTTP call to fal and observe its duration.

        ``status_class`` comes from :func:`worker.fal.policy.status_class`.
        """
        o = self._guard.closed("op", op, FAL_OPS)
        klass = self._guard.closed("status_class", status_class, STATUS_CLASSES)
        self.fal_requests.labels(op=o, status_class=klass).inc()
        self.fal_request_duration.labels(op=o).observe(_seconds(duration_s))

    def fal_queued(self, queue_s: float) -> None:
        """Observe the time a request waited in fal's queue (submit accepted → IN_PROGRESS)."""
        self.fal_queue_time.observe(_seconds(queue_s))

    def fal_inference(self, inference_s: float) -> None:
        """Observe fal's processing time (IN_PROGRESS → COMPLETED)."""
        self.fal_inference_time.observe(_seconds(inference_s))

    def retry(self, reason: str) -> None:
        """Count a job-level retry (a later resubmit) by reason (e.g. ``http_429``, ``connect``)."""
        self.retries.labels(reason=self._guard.reason("retry_reason", reason)).inc()

    def ambiguous_submit(self, action: str) -> None:
        """Count an ambiguous submit by the policy applied (dead_letter, resubmit)."""
        self.ambiguous_submits.labels(action=self._guard.closed("action", action, AMBIGUOUS_ACTIONS)).inc()

    def spent(self, usd: float) -> None:
        """Add settled spend in dollars (negative values, e.g. refunds of reservations, are ignored)."""
        if usd > 0:
            self.spend.inc(usd)

    def dedup(self, outcome: str, saved_usd: float = 0.0) -> None:
        """Count a dedupe decision; a served job adds the dollars it did not spend."""
        self.dedup_jobs.labels(outcome=self._guard.closed("outcome", outcome, DEDUP_OUTCOMES)).inc()
        if saved_usd > 0:
            self.dedup_saved.inc(saved_usd)

    # --- flow control ------------------------------------------------------------------------------

    def rate_limit_waited(self, wait_s: float) -> None:
        """Observe an in-task wait for a submit-rate token (0 when a token was free)."""
        self.rate_limit_wait.observe(_seconds(wait_s))

    def rate_limit_paused(self, pause_s: float) -> None:
        """Count a cluster-wide pause this process started after a 429, and its length."""
        self.rate_limit_pauses.inc()
        self.rate_limit_pause_seconds.inc(_seconds(pause_s))

    def breaker_transition(self, from_state: str, to_state: str) -> None:
        """Count a breaker state change; states are case-insensitive (``OPEN`` == ``open``)."""
        f = self._guard.closed("breaker_state", from_state.lower(), BREAKER_STATES)
        t = self._guard.closed("breaker_state", to_state.lower(), BREAKER_STATES)
        self.breaker_transitions.labels(from_state=f, to_state=t).inc()

    def budget_rejection(self, period: str) -> None:
        """Count a submit refused by the ``day`` or ``month`` spend cap."""
        self.budget_rejections.labels(period=self._guard.closed("period", period, BUDGET_PERIODS)).inc()

    def dead_letter(self, reason: str) -> None:
        """Count a job moved to the dead-letter set, by reason (e.g. ``retries_exhausted``)."""
        self.dead_letters.labels(reason=self._guard.reason("dead_letter_reason", reason)).inc()

    # --- results -----------------------------------------------------------------------------------

    def result_published(self) -> None:
        """Count a terminal result event written to the result stream."""
        self.results_published.labels(sink="stream", outcome="ok").inc()

    def stream_trimmed_unread(self, entries: int) -> None:
        """Count result events trimmed past the hard ceiling that a consumer group had not read."""
        self.stream_trimmed_unread_events.inc(max(0, entries))

    def callback_delivery(self, outcome: str, duration_s: float | None = None) -> None:
        """Count a callback attempt (delivered, failed, gave_up) and its duration."""
        out = self._guard.closed("callback_outcome", outcome, CALLBACK_OUTCOMES)
        self.callback_deliveries.labels(outcome=out).inc()
        if duration_s is not None:
            self.callback_duration.observe(_seconds(duration_s))

    def output_copy(self, outcome: str, duration_s: float | None = None, size_bytes: int = 0) -> None:
        """Count an output copy try (copied, failed, gave_up), its duration and bytes when copied."""
        out = self._guard.closed("output_copy_outcome", outcome, OUTPUT_COPY_OUTCOMES)
        self.output_copies.labels(outcome=out).inc()
        if duration_s is not None:
            self.output_copy_duration.observe(_seconds(duration_s))
        if size_bytes > 0:
            self.output_copy_bytes.inc(size_bytes)

    def output_verified(self, result: str) -> None:
        """Count a verification of a copied output (ok, mismatch)."""
        self.output_verify.labels(
            result=self._guard.closed("output_verify", result, OUTPUT_VERIFY_RESULTS)
        ).inc()

    # --- tracker -----------------------------------------------------------------------------------

    def tracker_load(self, jobs: int, capacity: int | None = None) -> None:
        """Set how many jobs this process tracks now (and, optionally, its capacity)."""
        self.tracker_jobs.set(max(0, jobs))
        if capacity is not None:
            self.tracker_capacity.set(capacity)

    def tracker_stream_reconnect(self) -> None:
        """Count a reopened status stream."""
        self.tracker_stream_reconnects.inc()

    def tracker_poll(self, outcome: str) -> None:
        """Count an answered status poll (outcome ``ok``)."""
        out = self._guard.closed("poll_outcome", outcome, TRACKER_POLL_OUTCOMES)
        self.tracker_polls.labels(outcome=out).inc()

    def job_completion(self, via: str) -> None:
        """Count a fal request's end applied to its job, by how it was learned (webhook, status)."""
        self.job_completions.labels(via=self._guard.closed("via", via, COMPLETION_PATHS)).inc()

    # --- Celery ------------------------------------------------------------------------------------

    def celery_task_started(self, task: str) -> None:
        """A Celery task began (task_prerun)."""
        t = self._task(task)
        self.celery_tasks_started.labels(task=t).inc()
        self.celery_tasks_active.labels(task=t).inc()

    def celery_task_finished(self, task: str, outcome: str, runtime_s: float | None) -> None:
        """A Celery task ended (task_postrun); ``runtime_s`` is ``None`` if its start was not seen."""
        t = self._task(task)
        out = self._guard.closed("task_outcome", outcome, CELERY_TASK_OUTCOMES)
        self.celery_tasks.labels(task=t, outcome=out).inc()
        if runtime_s is not None:
            self.celery_task_runtime.labels(task=t, outcome=out).observe(_seconds(runtime_s))
            # Only a task whose start we counted may decrement, or the gauge would drift below 0.
            self.celery_tasks_active.labels(task=t).dec()

    def celery_task_exception(self, task: str, exception: str) -> None:
        """An exception failed or retried a Celery task (class name, capped cardinality)."""
        exc = self._guard.capped("exception", exception, MAX_EXCEPTION_CLASSES)
        self.celery_task_exceptions.labels(task=self._task(task), exception=exc).inc()


_instance: Metrics | None = None
_instance_lock = threading.Lock()


def get_metrics() -> Metrics:
    """The process-wide :class:`Metrics` on the default registry, created on first call."""
    global _instance  # noqa: PLW0603 - the one lazily created process-wide instance
    if _instance is None:
        with _instance_lock:
            if _instance is None:
                _instance = Metrics(REGISTRY)
    return _instance
