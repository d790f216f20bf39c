"""Callback delivery from the outbox, and the result stream's trimming.

Finishing a job writes its callback work (an entry with the body snapshot taken at finish) in the
same script as the terminal state (:mod:`worker.contracts.store`), so a crash between the two cannot
lose a callback. Every worker process runs one :class:`Outbox` thread: it claims due entries with a
lease, POSTs them through the guarded fetcher (:func:`worker.callbacks.deliver`), and settles each
try in one script: delivered (entry gone), retry (full-jitter backoff), or failed after
``callback_retry_window_s`` (kept in ``callbacks:failed`` for ``reframe callbacks redeliver``).
Delivery is at least once; the ``X-Reframe-Event-Id`` header is unique per life of a job, so a
receiver that de-duplicates by it keeps every life's event and drops only true duplicates.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from worker.callbacks import deliver, disable, is_disabled
from worker.contracts.lua import load_lua, script_path
from worker.contracts.netguard import BlockedURL
from worker.contracts.record import text
from worker.fal import backoff_s
from worker.runtime import Runtime

log = logging.getLogger(__name__)

#: Result-stream entries kept even when no consumer group needs them (late XREAD waiters).
STREAM_KEEP = 10_000


class Outbox:
    """Delivers due callbacks of the whole cluster (any process may deliver any entry)."""

    def __init__(self, rt: Runtime, *, workers: int = 8, interval_s: float = 0.2) -> None:
        self.rt = rt
        self.interval_s = interval_s
        keys = rt.store.keys
        self.keys = keys
        self._claim = rt.redis.register_script(load_lua(script_path(__file__, "outbox_claim")))
        self._settle = rt.redis.register_script(load_lua(script_path(__file__, "outbox_settle")))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reframe-callback")
        self._slots = threading.Semaphore(workers * 4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="reframe-outbox", daemon=True)

    def start(self) -> None:
        """Start the claiming thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop claiming; deliveries under way finish (their leases cover a crash)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.warning("outbox claim failed", exc_info=True)
            self._stop.wait(self.interval_s)

    def run_once(self, limit: int = 32) -> list[str]:
        """Claim due deliveries and hand them to the delivery threads; returns the claimed ids."""
        lease_ms = int(self.rt.settings.callback_lease_s * 1000)
        raw = self._claim(keys=[self.keys.outbox], args=[limit, lease_ms])
        ids = [text(x) for x in raw]
        for event_id in ids:
            self._slots.acquire()
            self._pool.submit(self._deliver_released, event_id)
        return ids

    def _deliver_released(self, event_id: str) -> None:
        try:
            self.deliver_one(event_id)
        except Exception:
            log.exception("callback %s: delivery crashed; its lease returns it", event_id)
        finally:
            self._slots.release()

    def deliver_one(self, event_id: str) -> str:
        """Try one delivery and settle it: ``delivered``, ``retry`` or ``failed``."""
        s = self.rt.settings
        entry = {text(k): text(v) for k, v in self.rt.redis.hgetall(self.keys.outbox_entry(event_id)).items()}
        if not entry:
            self._settle_try(event_id, "", "delivered", "gone")
            return "gone"
        if is_disabled(self.rt.redis, self.keys, entry["url"]):
            # The endpoint answered 410 before: given up without a request (listed, redeliverable).
            self._settle_try(event_id, entry.get("job_id", ""), "failed", "endpoint_disabled")
            self.rt.metrics.callback_delivery("gave_up")
            return "failed"
        started = time.monotonic()
        try:
            status = deliver(
                s, entry["url"], entry["body"].encode(), event_id=event_id, tenant=entry.get("tenant", "")
            )
            ok, what = 200 <= status < 300, f"http_{status}"
            permanent = status == 410  # the receiver says the endpoint is gone for good
            if permanent:
                disable(self.rt.redis, self.keys, entry["url"])
                what = "endpoint_disabled: http_410"
                log.warning("callback endpoint of %s answered 410: disabled", event_id)
        except BlockedURL as err:
            ok, what, permanent = (
                False,
                f"blocked:{err.reason}" if hasattr(err, "reason") else "blocked",
                True,
            )
        except httpx.HTTPError as exc:
            ok, what, permanent = False, type(exc).__name__, False
        self.rt.metrics.callback_delivery("delivered" if ok else "failed", time.monotonic() - started)
        job_id = entry.get("job_id", "")
        if ok:
            self._settle_try(event_id, job_id, "delivered", what)
            return "delivered"
        attempts = int(entry.get("attempts") or 0) + 1
        age_ms = self.rt.now_ms() - int(entry.get("created_at_ms") or 0)
        if permanent or age_ms >= s.callback_retry_window_s * 1000:
            self._settle_try(event_id, job_id, "failed", what)
            self.rt.metrics.callback_delivery("gave_up")
            log.warning("callback %s given up after %d tries (%s)", event_id, attempts, what)
            return "failed"
        delay_s = backoff_s(attempts, base_s=2.0, cap_s=s.callback_backoff_cap_s, rng=self.rt.rng)
        self._settle_try(event_id, job_id, "retry", what, due_ms=self.rt.now_ms() + int(delay_s * 1000))
        return "retry"

    def _settle_try(self, event_id: str, job_id: str, outcome: str, what: str, *, due_ms: int = 0) -> None:
        k = self.keys
        self._settle(
            keys=[k.outbox, k.outbox_entry(event_id), k.callbacks_failed, k.job(job_id)],
            args=[event_id, outcome, due_ms, what, int(self.rt.settings.dlq_retention_s * 1000)],
        )
