"""Process-level services of a worker: runtime, tracker, housekeeper, health/metrics server.

:func:`prepare` runs before Celery starts; :func:`start_background` once the worker is ready to
consume; :func:`stop_background` when a shutdown begins (so claims and the housekeeping lock are
handed over quickly); :func:`shutdown` at exit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from config import Settings
from worker.health import CONSUMER_LINK, HealthServer
from worker.housekeeper import Housekeeper
from worker.outbox import Outbox
from worker.output_copy import OutputCopier
from worker.presence import STATE_DRAINING, Presence, PresenceBeat, effective_limits
from worker.runtime import Runtime, install
from worker.tracker import Tracker, start_tracker, stop_tracker

log = logging.getLogger(__name__)


@dataclass
class _State:
    runtime: Runtime | None = None
    health: HealthServer | None = None
    housekeeper: Housekeeper | None = None
    tracker: Tracker | None = None
    outbox: Outbox | None = None
    copier: OutputCopier | None = None
    presence: PresenceBeat | None = None
    ready: bool = False


_state = _State()


def _ready() -> bool:
    # Ready = can consume: background started, Celery's consumer connected (worker/health.py
    # CONSUMER_LINK, set by a consumer bootstep) and Redis answering. Never part of liveness.
    rt = _state.runtime
    return bool(_state.ready and CONSUMER_LINK.is_up() and rt is not None and rt.redis.ping())


def prepare(settings: Settings) -> Runtime:
    """Build and install the runtime; start the health/metrics server (not ready yet)."""
    rt = Runtime.build(settings)
    install(rt)
    _state.runtime = rt
    if settings.metrics_port:
        health = HealthServer(
            settings.metrics_host,
            settings.metrics_port,
            rt.metrics.registry,
            liveness_max_age_s=60.0,
            readiness=_ready,
        )
        health.start()
        _state.health = health
    log.info(
        "flow-control limits: max_concurrency=%d fal_accounts=%s reserved_high=%d rate=%.2f/s burst=%d "
        "attempts=%d breaker=%.0f%%/%ds(min %d) budget day=$%.2f month=$%.2f price=$%.3f/s ambiguous=%s",
        settings.slot_capacity,
        ",".join(f"{a.id}:{a.cap}" for a in settings.fal_account_specs),  # ids and caps, never keys
        settings.reserved_high_slots,
        settings.submit_rate_per_s,
        settings.submit_burst,
        settings.retry_max_attempts,
        settings.breaker_failure_ratio * 100,
        settings.breaker_window_s,
        settings.breaker_min_calls,
        settings.budget_daily_usd,
        settings.budget_monthly_usd,
        settings.price_per_s_usd,
        settings.ambiguous_submit_policy.value,
    )
    return rt


def start_background() -> None:
    """Start the tracker and housekeeper and declare the worker ready."""
    rt = _state.runtime
    if rt is None:
        return
    # Presence first: a process must be seen alive before it claims anything, or another
    # housekeeper would take its fresh claims over as a dead process's.
    if _state.presence is None:  # publish limits + heartbeat (worker/presence.py)
        _state.presence = PresenceBeat(
            Presence.from_settings(rt.redis, rt.settings),
            rt.process_id,
            effective_limits(rt.settings),
            interval_ms=rt.settings.heartbeat_interval_ms,
        )
        _state.presence.start()
    _state.tracker = start_tracker(rt)
    hk = Housekeeper(rt)
    hk.start()
    _state.housekeeper = hk
    _state.outbox = Outbox(rt)
    _state.outbox.start()
    store = rt.outputs
    if store is not None:  # copies finished outputs into the store (worker/output_copy.py)
        _state.copier = OutputCopier(rt, store)
        _state.copier.start()
    _state.ready = True
    log.info("worker ready: tracker, housekeeper, outbox and output copier running")


def stop_background() -> None:
    """Stop taking new work in the background threads (idempotent)."""
    _state.ready = False
    if _state.presence is not None:  # keeps beating until shutdown(): it may still finish tasks
        _state.presence.set_state(STATE_DRAINING)
    if _state.housekeeper is not None:
        _state.housekeeper.stop()
        _state.housekeeper = None
    if _state.outbox is not None:
        _state.outbox.stop()
        _state.outbox = None
    if _state.copier is not None:
        _state.copier.stop()
        _state.copier = None
    if _state.runtime is not None and _state.tracker is not None:
        stop_tracker(_state.runtime, _state.tracker)
        _state.tracker = None


def beat() -> None:
    """Liveness beat from Celery's main-loop timer."""
    if _state.health is not None:
        _state.health.beat()


def shutdown() -> None:
    """Stop everything and close clients."""
    stop_background()
    if _state.presence is not None:
        _state.presence.stop()
        _state.presence = None
    if _state.health is not None:
        _state.health.stop()
        _state.health = None
    if _state.runtime is not None:
        _state.runtime.close()
        install(None)
        _state.runtime = None
