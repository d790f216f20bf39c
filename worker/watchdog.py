"""Process guards of a worker: a per-task deadline and a kombu work-around for broker restarts.

**Task deadline.** Celery's threads pool ignores ``time_limit``/``soft_time_limit`` (only the prefork
pool can kill a child), so nothing stopped a hung task, and Redis redelivered its message once the
visibility timeout passed *while it still ran*. :class:`TaskWatchdog` tracks running tasks from the
``task_prerun``/``task_postrun`` signals and, when one runs longer than
``REFRAME_TASK_TIME_LIMIT_S``, logs it and ends the whole process with :data:`EXIT_TASK_OVERRUN`.
A thread cannot be killed, so the process is; it dies before the visibility timeout (settings
enforce ``visibility_timeout_s > task_time_limit_s + TASK_DEADLINE_MARGIN_S``), so the message is
redelivered only once the hung task is gone. The decision (:meth:`TaskWatchdog.overdue`) is pure
on an injected clock; the thread only calls it.

**Broker restart.** :func:`guard_kombu_restore` fixes a crash of Celery 5.7 / kombu 5.7 on the
Redis transport: after a lost broker connection, ``Consumer.on_connection_error_after_connected``
first ``collect()``s the connection (which sets ``transport.client = None`` but keeps the default
channel) and then ``close()``s it; closing the default channel runs
``QoS.restore_unacked_once``, which needs a new Redis client, whose parameters come from
``transport.client.hostname`` -> ``AttributeError: 'NoneType' object has no attribute 'hostname'``.
That is not a connection error, so Celery calls it an "Unrecoverable error" and the worker exits.
It happens only when the worker holds unacked messages *and* was waiting in BRPOP (spare threads),
so a busy worker died and an idle one survived. The guard makes that restore a no-op when the
transport is already torn down: the messages are still in Redis' unacked index (kombu wrote them
there on delivery), the tasks are still running and cannot ack after the connection loss anyway,
and kombu's visibility-timeout sweep redelivers them later; the idempotent tasks cope. Restoring
them right away would hand a running task's message to a second worker. See
``tests/chaos/test_redis_restart.py``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import signals
from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)

#: Exit status of a worker that ended itself because a task overran its time limit.
EXIT_TASK_OVERRUN = 70
#: Exit status of a worker whose Celery core stopped on an unrecoverable error (Celery's own).
EXIT_UNRECOVERABLE = 1
#: How often the watchdog thread looks at the running tasks.
CHECK_INTERVAL_S = 0.5

_DISPATCH_PREFIX = "reframe.watchdog."


@dataclass(frozen=True, slots=True)
class RunningTask:
    """One task run as the watchdog sees it (``started_s`` on the watchdog's clock)."""

    task_id: str
    name: str
    thread_id: int
    started_s: float


def _exit_now(overdue: list[RunningTask]) -> None:
    """Default overrun action: flush logs and end the process at once (hung threads block a normal exit)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_TASK_OVERRUN)


class TaskWatchdog:
    """Ends the process when a task runs longer than ``limit_s`` (threads pool tasks cannot be killed).

    ``clock`` (monotonic seconds) and ``on_overrun`` are injectable for tests; the default action
    exits with :data:`EXIT_TASK_OVERRUN`. :meth:`install` connects the Celery signals;
    :meth:`start` runs the checking thread.
    """

    def __init__(
        self,
        limit_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_overrun: Callable[[list[RunningTask]], None] = _exit_now,
        check_interval_s: float = CHECK_INTERVAL_S,
    ) -> None:
        if limit_s <= 0:
            raise ValueError("limit_s must be positive")
        self.limit_s = limit_s
        self._clock = clock
        self._on_overrun = on_overrun
        self._interval_s = check_interval_s
        self._lock = threading.Lock()
        self._running: dict[tuple[str, int], RunningTask] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ bookkeeping
    def started(self, task_id: str, name: str, thread_id: int | None = None) -> None:
        """A task run began (in the calling thread unless ``thread_id`` is given)."""
        tid = threading.get_ident() if thread_id is None else thread_id
        with self._lock:
            self._running[(task_id, tid)] = RunningTask(task_id, name, tid, self._clock())

    def finished(self, task_id: str, thread_id: int | None = None) -> None:
        """A task run ended (any outcome)."""
        tid = threading.get_ident() if thread_id is None else thread_id
        with self._lock:
            self._running.pop((task_id, tid), None)

    def running(self) -> list[RunningTask]:
        """The task runs in progress."""
        with self._lock:
            return list(self._running.values())

    def overdue(self, now_s: float | None = None) -> list[RunningTask]:
        """Runs older than the limit at ``now_s`` (default: the clock), oldest first."""
        now = self._clock() if now_s is None else now_s
        late = [t for t in self.running() if now - t.started_s > self.limit_s]
        return sorted(late, key=lambda t: t.started_s)

    def check(self) -> bool:
        """Act on overdue runs (log, then ``on_overrun``); True if there were any."""
        late = self.overdue()
        if not late:
            return False
        now = self._clock()
        for t in late:
            log.critical(
                "task %s[%s] has run %.1fs, over REFRAME_TASK_TIME_LIMIT_S=%.1fs; ending the worker "
                "process (exit %d) so its message is redelivered only after the hung task is gone",
                t.name,
                t.task_id,
                now - t.started_s,
                self.limit_s,
                EXIT_TASK_OVERRUN,
            )
        self._on_overrun(late)
        return True

    # ------------------------------------------------------------------ Celery signals
    def _prerun(self, sender: Any = None, task_id: str | None = None, **_: Any) -> None:
        self.started(str(task_id), str(getattr(sender, "name", None) or "unknown"))

    def _postrun(self, sender: Any = None, task_id: str | None = None, **_: Any) -> None:
        self.finished(str(task_id))

    def install(self) -> None:
        """Connect to ``task_prerun``/``task_postrun`` (idempotent per process)."""
        signals.task_prerun.connect(self._prerun, weak=False, dispatch_uid=_DISPATCH_PREFIX + "prerun")
        signals.task_postrun.connect(self._postrun, weak=False, dispatch_uid=_DISPATCH_PREFIX + "postrun")

    def uninstall(self) -> None:
        """Disconnect the signal receivers again."""
        signals.task_prerun.disconnect(dispatch_uid=_DISPATCH_PREFIX + "prerun")
        signals.task_postrun.disconnect(dispatch_uid=_DISPATCH_PREFIX + "postrun")

    # ------------------------------------------------------------------ thread
    def start(self) -> None:
        """Check every ``check_interval_s`` in a daemon thread (idempotent)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="task-watchdog", daemon=True)
        self._thread.start()
        log.info("task watchdog running: limit %.1fs per task", self.limit_s)

    def stop(self) -> None:
        """Stop the checking thread."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.check()
            except Exception:
                log.exception("task watchdog check failed")


def _torn_down(qos: Any) -> bool:
    """True when the channel's transport was already closed (``transport.client`` is None)."""
    transport = getattr(qos.channel, "connection", None)
    return transport is None or getattr(transport, "client", None) is None


def guard_kombu_restore() -> None:
    """Make kombu's Redis QoS restore/ack/reject no-ops on a torn-down transport (idempotent).

    Why: see the module docstring (Celery 5.7 / kombu 5.7 crash after a Redis restart). A task that
    finishes after the reconnect acks its message on the old channel, which fails the same way
    (``'NoneType' object has no attribute 'client'``); the message stays in Redis' unacked index and
    is redelivered after the visibility timeout, which the idempotent tasks absorb. Applied once at
    worker start by :func:`worker.app.run_worker`; re-check it when upgrading kombu.
    """
    qos_cls: Any = kombu_redis.QoS
    if getattr(qos_cls, "_reframe_guard", False):
        return
    restore_once, ack, reject = qos_cls.restore_unacked_once, qos_cls.ack, qos_cls.reject

    def restore_unacked_once(self: Any, stderr: Any = None) -> Any:
        if not _torn_down(self):
            return restore_once(self, stderr)
        delivered = self._delivered
        if delivered and not getattr(delivered, "restored", False):
            log.warning(
                "broker connection lost with %d unacked message(s): not restoring them now (their tasks "
                "may still run); Redis keeps them and redelivers them after the visibility timeout",
                len(delivered),
            )
        self._on_collect.cancel()
        delivered.clear()
        delivered.restored = True
        return None

    def guarded_ack(self: Any, delivery_tag: Any) -> Any:
        if not _torn_down(self):
            return ack(self, delivery_tag)
        log.info(
            "ack of %s after a broker connection loss skipped: redelivered after the timeout", delivery_tag
        )
        return None

    def guarded_reject(self: Any, delivery_tag: Any, requeue: bool = False) -> Any:
        if not _torn_down(self):
            return reject(self, delivery_tag, requeue=requeue)
        log.info("reject of %s after a broker connection loss skipped", delivery_tag)
        return None

    qos_cls.restore_unacked_once = restore_unacked_once
    qos_cls.ack = guarded_ack
    qos_cls.reject = guarded_reject
    qos_cls._reframe_guard = True
