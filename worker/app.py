"""The Celery app, its tasks, and the worker entry point.

Tasks are thin: each one hands its job id to plain functions (:mod:`worker.submit`,
:mod:`worker.cancel`, :mod:`worker.callbacks`) that are testable without Celery. Metrics of task
execution come from Celery signals (:mod:`worker.signals`), not from task bodies.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

import httpx
from celery import Celery, Task, bootsteps
from celery.signals import worker_ready, worker_shutting_down

from config import Settings
from worker.contracts.keys import KOMBU_PRIORITY_SEP, KOMBU_PRIORITY_STEPS
from worker.contracts.wire import CALLBACK_TASK, CANCEL_TASK, SUBMIT_TASK

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
    }
    return {
        "broker_url": settings.redis_url,
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
    from worker.runtime import get_runtime

    @app.task(name=SUBMIT_TASK, bind=True, acks_late=True)  # type: ignore[untyped-decorator]
    def submit(self: Task, job_id: str) -> str:
        from worker.submit import Submitter

        return str(Submitter(get_runtime()).handle(job_id))

    @app.task(name=CANCEL_TASK, bind=True, acks_late=True, max_retries=5)  # type: ignore[untyped-decorator]
    def cancel(self: Task, job_id: str) -> str:
        from worker.cancel import cancel_at_fal
        from worker.fal import FalError

        try:
            return cancel_at_fal(get_runtime(), job_id)
        except FalError as exc:
            raise self.retry(countdown=min(60, 2**self.request.retries), exc=exc) from None

    @app.task(name=CALLBACK_TASK, bind=True, acks_late=True)  # type: ignore[untyped-decorator]
    def callback(self: Task, job_id: str) -> str:
        return _deliver_callback(self, job_id, settings)


def _deliver_callback(task: Task, job_id: str, settings: Settings) -> str:
    from worker.callbacks import callback_body, deliver
    from worker.fal import backoff_s
    from worker.runtime import get_runtime

    rt = get_runtime()
    rec = rt.store.get(job_id)
    if rec is None or not rec.get("callback_url"):
        return "skipped"
    started = time.monotonic()
    try:
        status = deliver(settings, str(rec["callback_url"]), callback_body(rec), event_id=job_id)
        ok = 200 <= status < 300
        outcome = "delivered" if ok else f"http_{status // 100}xx"
    except httpx.HTTPError as exc:
        ok, outcome = False, type(exc).__name__
    rt.metrics.callback_delivery("delivered" if ok else "failed", time.monotonic() - started)
    if ok:
        rt.store.set_fields(job_id, callback_status="delivered")
        return "delivered"
    attempt = task.request.retries + 1
    if attempt >= settings.callback_max_attempts:
        rt.store.set_fields(job_id, callback_status=f"gave_up:{outcome}")
        rt.metrics.callback_delivery("gave_up")
        return "gave_up"
    # Countdowns stay far below the visibility timeout (capped at 300 s), see celery-ops pitfalls.
    delay = backoff_s(attempt, base_s=2.0, cap_s=min(300.0, settings.visibility_timeout_s / 2), rng=rt.rng)
    raise task.retry(countdown=delay, max_retries=settings.callback_max_attempts)


class _LivenessStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Beats the liveness clock from the consumer's timer, i.e. from Celery's own main loop."""

    requires = ("celery.worker.components:Timer",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.tref: Any = None

    def start(self, parent: Any) -> None:
        from worker import services

        self.tref = parent.timer.call_repeatedly(2.0, services.beat, (), priority=10)

    def stop(self, parent: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()


def run_worker(settings: Settings, *, concurrency: int | None = None, hostname: str | None = None) -> None:
    """Run a Celery worker (threads pool) with the tracker, housekeeper and health server."""
    from worker import services
    from worker.signals import install_celery_signal_handlers

    app = create_app(settings)
    app.steps["worker"].add(_LivenessStep)
    services.prepare(settings)
    install_celery_signal_handlers()
    worker_ready.connect(lambda **_: services.start_background(), weak=False)
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
        app.worker_main(argv)
    finally:
        services.shutdown()
    sys.stdout.flush()
