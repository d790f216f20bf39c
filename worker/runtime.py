"""Per-process runtime of a worker: one event loop, one fal client, shared Redis clients.

The fal client is async and lives on a dedicated event-loop thread (the "portal"). Celery task
threads run coroutines on it with :meth:`Portal.call`; the completion tracker runs on the same loop,
so one process follows thousands of in-flight jobs without a thread per job.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import socket
import threading
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis

from config import Settings
from worker import output_store
from worker.contracts.connect import redis_client
from worker.contracts.dedupe import DedupeStore
from worker.contracts.durable import Replication
from worker.contracts.models import Priority
from worker.contracts.netguard import GuardedFetcher
from worker.contracts.store import JobStore, SlotParams
from worker.fal import FalAuthError, FalClient
from worker.flow import FlowControl
from worker.flow.accounts import pool_arg
from worker.metrics import Metrics, get_metrics
from worker.output_store import OutputStore

log = logging.getLogger(__name__)
T = TypeVar("T")


class Portal:
    """An asyncio event loop on its own daemon thread."""

    def __init__(self, name: str = "reframe-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = threading.Event()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._started.set)
        self.loop.run_forever()

    def start(self) -> None:
        """Start the loop thread and wait until it runs."""
        self._thread.start()
        self._started.wait(10)

    def call(self, factory: Callable[[], Coroutine[Any, Any, T]], timeout_s: float | None = None) -> T:
        """Run ``factory()`` on the loop from another thread and wait for its result."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(factory(), self.loop)
        return future.result(timeout_s)

    def spawn(self, coro: Awaitable[Any]) -> Future[Any]:
        """Schedule a coroutine on the loop without waiting."""
        return asyncio.run_coroutine_threadsafe(_as_coro(coro), self.loop)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the loop and join its thread."""
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout_s)


async def _as_coro(aw: Awaitable[Any]) -> Any:
    return await aw


def new_process_id() -> str:
    """``host:pid:random``: unique per process start, readable in ``redis-cli``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class Runtime:
    """Everything a worker process shares between task threads, the tracker and the housekeeper."""

    settings: Settings
    redis: redis.Redis
    store: JobStore
    flow: FlowControl
    portal: Portal
    fal: FalClient
    metrics: Metrics
    #: Every URL a job names (video, image, callback) is fetched through this (worker/contracts/netguard.py).
    fetcher: GuardedFetcher
    rng: random.Random = field(default_factory=random.Random)
    #: This process's identity in Redis (claims, heartbeats): unique per process start.
    process_id: str = field(default_factory=new_process_id)
    #: Hands a just-submitted job to this process's tracker (set by the tracker when it starts).
    track_hook: Callable[[str], None] | None = None
    #: One fal client per fal account (``REFRAME_FAL_ACCOUNTS``), each with that account's key;
    #: ``fal`` is the first account's.
    fal_accounts: dict[str, FalClient] = field(default_factory=dict)

    @classmethod
    def build(cls, settings: Settings, *, metrics: Metrics | None = None) -> Runtime:
        """Create clients (no network traffic yet) and start the event-loop thread."""
        client = redis_client(
            settings,
            socket_timeout=settings.redis_socket_timeout_s,
            socket_keepalive=True,
            health_check_interval=25,
            max_connections=max(64, settings.worker_concurrency * 4),
        )
        store = JobStore(
            client,
            prefix=settings.key_prefix,
            queue=settings.queue_name,
            retention_s=settings.job_retention_s,
            stream_maxlen=settings.results_stream_maxlen,
            dlq_retention_s=settings.dlq_retention_s,
            slot_params=SlotParams(
                capacity=settings.slot_capacity,
                reserved_high=settings.reserved_high_slots,
                lease_ms=round(settings.slot_lease_ttl_s * 1000),
                accounts=pool_arg(settings),
            ),
        )
        m = metrics or get_metrics()
        portal = Portal()
        portal.start()
        clients: dict[str, FalClient] = {}
        for spec in settings.fal_account_specs:
            clients[spec.id] = portal.call(functools.partial(_make_fal, settings, m, spec.id))
        fal = clients[settings.fal_account_specs[0].id]
        return cls(
            settings=settings,
            redis=client,
            store=store,
            flow=FlowControl.from_settings(client, settings),
            portal=portal,
            fal=fal,
            metrics=m,
            fetcher=GuardedFetcher.from_settings(settings),
            fal_accounts=clients,
        )

    def fal_for(self, account: str) -> FalClient:
        """The fal client of ``account``, the account a job's attempt is bound to ('' = the first
        account: records from before accounts). An account that is not configured any more raises
        :class:`FalAuthError`: its requests are never read or cancelled with another account's key."""
        if not account or not self.fal_accounts:
            return self.fal
        client = self.fal_accounts.get(account)
        if client is None:
            raise FalAuthError(f"fal account {account!r} is not configured", op="account", status_code=None)
        return client

    @functools.cached_property
    def replication(self) -> Replication:
        """How many replicas must acknowledge the writes that guard against paying twice."""
        return Replication(self.settings.redis_min_replicas, self.settings.redis_replica_wait_ms)

    @functools.cached_property
    def dedupe(self) -> DedupeStore:
        """The scripts of paying once for identical work (worker/contracts/dedupe.py)."""
        return DedupeStore(self.redis, self.store.keys)

    @functools.cached_property
    def outputs(self) -> OutputStore | None:
        """The output store (worker/output_store.py); None when ``REFRAME_OUTPUT_STORE_URL=off``."""
        return output_store.from_settings(self.settings)

    def now_ms(self) -> int:
        """Redis time in ms: the one clock every worker shares."""
        sec, usec = self.redis.time()
        return int(sec) * 1000 + int(usec) // 1000

    def dispatch(self, job_ids: Sequence[str], *, priority: Priority = Priority.HIGH) -> None:
        """Send ``reframe.submit`` for each job (admitted jobs go in the high lane: they hold a slot)."""
        if not job_ids:
            return
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            key, message = self.store.submit_message(job_id, priority)
            pipe.lpush(key, message)
        pipe.execute()

    def close(self) -> None:
        """Close the fal client, stop the loop, close Redis."""
        for client in {id(c): c for c in [self.fal, *self.fal_accounts.values()]}.values():
            try:
                self.portal.call(client.aclose, timeout_s=5)
            except Exception:
                log.debug("fal client close failed", exc_info=True)
        self.portal.stop()
        self.fetcher.close()
        self.redis.close()


async def _make_fal(settings: Settings, metrics: Metrics, account: str) -> FalClient:
    # Created on the loop thread so httpx binds its pool to this loop.
    return FalClient.from_settings(settings, key=settings.fal_key_of(account), on_request=metrics.fal_request)


_runtime: Runtime | None = None


def install(runtime: Runtime | None) -> None:
    """Make ``runtime`` the process runtime (the worker entry point calls this once)."""
    global _runtime  # noqa: PLW0603 - one runtime per process, set at start-up, not at import
    _runtime = runtime


def get_runtime() -> Runtime:
    """The process runtime; raises if the worker was not started through :func:`worker.app.run_worker`."""
    if _runtime is None:
        raise RuntimeError("worker runtime not installed (start workers with `reframe worker`)")
    return _runtime
