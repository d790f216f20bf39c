"""The Celery app, its tasks, and the worker entry point.

Tasks are thin: each one hands its job id to plain functions (:mod:`worker.submit`,
:mod:`worker.cancel`, :mod:`worker.callbacks`) that are testable without Celery. Metrics of task
execution come from Celery signals (:mod:`worker.signals`), not from task bodies.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from celery import Celery, Task, bootsteps
from celery.signals import worker_init, worker_ready, worker_shutting_down

from config import Settings, load_settings
from worker import services
from worker.cancel import cancel_at_fal
from worker.contracts.connect import broker_transport_options, broker_url
from worker.contracts.keys import KOMBU_PRIORITY_SEP, KOMBU_PRIORITY_STEPS
from worker.contracts.wire import CALLBACK_TASK, CANCEL_TASK, SUBMIT_TASK
from worker.fal import FalError
from worker.health import CONSUMER_LINK
from worker.runtime import get_runtime
from worker.signals import install_celery_signal_handlers
from worker.submit import Submitter
from worker.watchdog import EXIT_UNRECOVERABLE, TaskWatchdog, guard_kombu_restore
from worker.webhooks import WEBHOOK_TASK
from worker.webhooks import run as run_webhook

log = logging.getLogger(__name__)


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings derived from ours (see celery-ops notes in the README for each choice)."""
    transport = {
        # Above every task time limit and claim TTL: a late ack never causes a redelivery.
        "visibility_timeout": int(settings.visibility_timeout_s),
        # kombu sweeps for expired unacked messages every interval x throttle seconds (100 s by
        # default); every ~10 s means a SIGKILLed worker's messages return soon after the timeout.
        "unacked_restore_interval": 5,
        "unacked_restore_throttle": 2,
        "queue_order_strategy": "priority",
        "priority_steps": list(KOMBU_PRIORITY_STEPS),
        "sep": KOMBU_PRIORITY_SEP,
        "socket_timeout": settings.redis_socket_timeout_s,
        "socket_connect_timeout": settings.redis_socket_timeout_s,
        "socket_keepalive": True,
        "health_check_interval": 25,
        "retry_on_timeout": True,
        "client_name": "reframe-worker",
        # Sentinel: the primary's name and the Sentinels' password (worker/contracts/connect.py).
        **broker_transport_options(settings),
    }
    return {
        "broker_url": broker_url(settings),
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "task_default_queue": settings.queue_name,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_backend": None,
        "task_ignore_result": True,
        # At-least-once delivery: a crash mid-task redelivers; every task is idempotent by job id.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_disable_prefetch": True,
        # The threads pool ignores these two; worker/watchdog.py enforces task_time_limit_s.
        "task_soft_time_limit": settings.task_soft_time_limit_s,
        "task_time_limit": settings.task_time_limit_s,
        "worker_soft_shutdown_timeout": settings.worker_soft_shutdown_timeout_s,
        "worker_enable_soft_shutdown_on_idle": True,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        # Task events on, so Flower and celery-exporter work out of the box.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
    }


def create_app(settings: Settings) -> Celery:
    """A Celery app configured from ``settings`` with the reframe tasks registered."""
    app = Celery("reframe", set_as_current=False)
    app.conf.update(celery_config(settings))
    _register_tasks(app, settings)
    return app


def _register_tasks(app: Celery, settings: Settings) -> None:
    @app.task(name=SUBMIT_TASK, bind=True, acks_late=True)  # type: ignore[untyped-decorator]
    def submit(self: Task, job_id: str) -> str:
        return str(Submitter(get_runtime()).handle(job_id))

    @app.task(name=CANCEL_TASK, bind=True, acks_late=True, max_retries=5)  # type: ignore[untyped-decorator]
    def cancel(self: Task, job_id: str) -> str:
        try:
            return cancel_at_fal(get_runtime(), job_id).value
        except FalError as exc:
            raise self.retry(countdown=min(60, 2**self.request.retries), exc=exc) from None

    @app.task(name=WEBHOOK_TASK, bind=True, acks_late=True, max_retries=None)  # type: ignore[untyped-decorator]
    def webhook(self: Task, request_id: str) -> str:
        # A fal completion webhook recorded by the receiver (worker/webhooks.py).
        return run_webhook(get_runtime(), request_id)

    @app.task(name=CALLBACK_TASK, bind=True, acks_late=True)  # type: ignore[untyped-decorator]
    def callback(self: Task, job_id: str) -> str:
        # Callbacks are delivered from the outbox (worker/outbox.py), written in the same step as
        # the job's end; this name stays registered so a message from an older version is acked.
        log.info("legacy callback message for job %s ignored: callbacks go through the outbox", job_id)
        return "outbox"


class _LivenessStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Beats the liveness clock from the consumer's timer, i.e. from Celery's own main loop."""

    requires = ("celery.worker.components:Timer",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.tref: Any = None

    def start(self, parent: Any) -> None:
        self.tref = parent.timer.call_repeatedly(2.0, services.beat, (), priority=10)

    def stop(self, parent: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()


class _ConsumerLinkStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Tells ``/readyz`` whether the consumer is connected: up once consuming, down on stop/restart."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, parent: Any) -> None:
        CONSUMER_LINK.set(True)

    def stop(self, parent: Any) -> None:
        CONSUMER_LINK.set(False)

    def shutdown(self, parent: Any) -> None:
        CONSUMER_LINK.set(False)


def run_celery_worker(app: Celery, argv: list[str]) -> int:
    """Run ``celery worker`` with ``argv`` and return its exit status (``app.worker_main`` drops it).

    ``Celery.start`` turns click's ``Exit`` into a return value and ``worker_main`` discards it, so a
    worker that stopped on an "Unrecoverable error" (status 1) used to end the process with 0, and a
    supervisor restarting only on failure left it dead. The worker's own ``exitcode`` is read too.
    """
    if "worker" not in argv:
        raise ValueError("argv must contain the worker sub-command")
    workers: list[Any] = []

    def remember(sender: Any = None, **_: Any) -> None:
        workers.append(sender)

    worker_init.connect(remember, weak=False, dispatch_uid="reframe.exitcode")
    try:
        returned = app.start(argv=argv)
    finally:
        worker_init.disconnect(dispatch_uid="reframe.exitcode")
    codes = [returned] + [getattr(w, "exitcode", None) for w in workers]
    for code in codes:
        if isinstance(code, int) and code != 0:
            return code
        if code not in (None, 0):  # click may carry a message instead of a number
            return EXIT_UNRECOVERABLE
    return 0


def run_worker(settings: Settings, *, concurrency: int | None = None, hostname: str | None = None) -> None:
    """Run a Celery worker (threads pool) with the tracker, housekeeper and health server.

    Raises ``SystemExit`` with a non-zero status when the worker stopped on an error.
    """
    app = create_app(settings)
    app.steps["worker"].add(_LivenessStep)
    app.steps["consumer"].add(_ConsumerLinkStep)
    guard_kombu_restore()  # Celery/kombu 5.7 crash after a Redis restart (worker/watchdog.py)
    watchdog = TaskWatchdog(settings.task_time_limit_s)
    watchdog.install()
    services.prepare(settings)
    install_celery_signal_handlers()
    worker_ready.connect(lambda **_: services.start_background(), weak=False)
    worker_ready.connect(lambda **_: watchdog.start(), weak=False)
    worker_shutting_down.connect(lambda **_: services.stop_background(), weak=False)
    log.info("effective settings: %s", json.dumps(settings.redacted(), default=str))
    argv = [
        "worker",
        "--pool", "threads",
        "--concurrency", str(concurrency or settings.worker_concurrency),
        "--queues", settings.queue_name,
        "--loglevel", settings.log_level,
        "--without-gossip",
        "--without-mingle",
        "--task-events",
    ]  # fmt: skip
    if hostname:
        argv += ["--hostname", hostname]
    try:
        code = run_celery_worker(app, argv)
    finally:
        watchdog.stop()
        services.shutdown()
    sys.stdout.flush()
    if code != 0:
        log.critical("worker stopped with exit status %d", code)
        raise SystemExit(code)


def __getattr__(name: str) -> Celery:
    """``worker.app.celery`` / ``worker.app.app``: the app built lazily from ``load_settings()``.

    For ``celery -A worker.app inspect active`` and ``celery -A worker.app flower``; nothing is
    built at import time, and the app is built once per process.
    """
    if name not in ("celery", "app"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    global _lazy_app  # noqa: PLW0603 - one app per process, built on first use
    if _lazy_app is None:
        _lazy_app = create_app(load_settings())
    return _lazy_app


_lazy_app: Celery | None = None
