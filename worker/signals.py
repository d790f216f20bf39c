"""Celery signal handlers that feed the task metrics in :mod:`worker.metrics`.

Nothing is connected at import time: the worker calls :func:`install_celery_signal_handlers` once
while it starts (tests call it and :func:`uninstall_celery_signal_handlers` around a run).

Why signals and not Celery events: events go through a separate exporter process that loses them on
every restart and cannot count failure runtimes (docs/celery-operations.md §1). Signals fire in the worker
process itself, in the thread that runs the task (threads pool), so the normal registry sees them.

Handlers never raise: a metrics bug must not fail a task. Celery's dispatcher already logs receiver
exceptions, but it would log one per task; we log once per handler instead.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import signals

from worker.metrics import Metrics, get_metrics

log = logging.getLogger(__name__)

#: Celery ``task_postrun`` states mapped to the ``outcome`` label of ``reframe_celery_tasks_total``.
_OUTCOMES = {
    "SUCCESS": "succeeded",
    "FAILURE": "failed",
    "RETRY": "retried",
    "REJECTED": "rejected",
    "IGNORED": "ignored",
    "REVOKED": "revoked",
}

_DISPATCH_PREFIX = "reframe.metrics."


class _Handlers:
    """The connected receivers, bound to one :class:`Metrics`.

    Start times are keyed by (task id, thread id): with the threads pool several tasks run at once,
    and a redelivered message can run the same task id twice concurrently.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._lock = threading.Lock()
        self._started: dict[tuple[str, int], float] = {}
        self._warned: set[str] = set()

    def _failed(self, where: str) -> None:
        if where not in self._warned:
            self._warned.add(where)
            log.exception("metrics signal handler %s failed (further failures are silent)", where)

    def prerun(self, sender: Any = None, task_id: str | None = None, **_: Any) -> None:
        try:
            with self._lock:
                self._started[(str(task_id), threading.get_ident())] = time.monotonic()
            self.metrics.celery_task_started(_task_name(sender))
        except Exception:  # noqa: BLE001 - never fail a task for a metric
            self._failed("task_prerun")

    def postrun(
        self, sender: Any = None, task_id: str | None = None, state: str | None = None, **_: Any
    ) -> None:
        try:
            with self._lock:
                started = self._started.pop((str(task_id), threading.get_ident()), None)
            runtime = None if started is None else time.monotonic() - started
            outcome = _OUTCOMES.get(str(state), "other")
            self.metrics.celery_task_finished(_task_name(sender), outcome, runtime)
        except Exception:  # noqa: BLE001 - see above
            self._failed("task_postrun")

    def failure(self, sender: Any = None, exception: BaseException | None = None, **_: Any) -> None:
        try:
            self.metrics.celery_task_exception(_task_name(sender), _exception_name(exception))
        except Exception:  # noqa: BLE001 - see above
            self._failed("task_failure")

    def retry(self, sender: Any = None, reason: Any = None, **_: Any) -> None:
        # ``reason`` is the exception that caused the retry (or a string when retry() was called
        # without one); either way it is counted by class, never by message text.
        try:
            self.metrics.celery_task_exception(_task_name(sender), _exception_name(reason))
        except Exception:  # noqa: BLE001 - see above
            self._failed("task_retry")


def _task_name(sender: Any) -> str:
    name = getattr(sender, "name", None)
    return str(name) if name else "unknown"


def _exception_name(exc: Any) -> str:
    if isinstance(exc, BaseException):
        return type(exc).__name__
    return "none" if exc is None else "str"


_installed: _Handlers | None = None
_install_lock = threading.Lock()


def install_celery_signal_handlers(metrics: Metrics | None = None) -> None:
    """Connect the task metric handlers (task_prerun/postrun/failure/retry). Idempotent.

    ``metrics`` defaults to the process-wide :func:`~worker.metrics.get_metrics`. Calling again with
    a different instance re-binds the handlers to it.
    """
    global _installed  # noqa: PLW0603 - one set of receivers per process
    with _install_lock:
        if _installed is not None:
            _disconnect()
        handlers = _Handlers(metrics if metrics is not None else get_metrics())
        # weak=False: the receivers are bound methods of an object only this module references;
        # dispatch_uid makes a second connect a no-op instead of a duplicate receiver.
        signals.task_prerun.connect(handlers.prerun, weak=False, dispatch_uid=_DISPATCH_PREFIX + "prerun")
        signals.task_postrun.connect(handlers.postrun, weak=False, dispatch_uid=_DISPATCH_PREFIX + "postrun")
        signals.task_failure.connect(handlers.failure, weak=False, dispatch_uid=_DISPATCH_PREFIX + "failure")
        signals.task_retry.connect(handlers.retry, weak=False, dispatch_uid=_DISPATCH_PREFIX + "retry")
        _installed = handlers


def uninstall_celery_signal_handlers() -> None:
    """Disconnect the handlers again (tests; a no-op when not installed)."""
    global _installed  # noqa: PLW0603
    with _install_lock:
        if _installed is not None:
            _disconnect()
            _installed = None


def _disconnect() -> None:
    signals.task_prerun.disconnect(dispatch_uid=_DISPATCH_PREFIX + "prerun")
    signals.task_postrun.disconnect(dispatch_uid=_DISPATCH_PREFIX + "postrun")
    signals.task_failure.disconnect(dispatch_uid=_DISPATCH_PREFIX + "failure")
    signals.task_retry.disconnect(dispatch_uid=_DISPATCH_PREFIX + "retry")
