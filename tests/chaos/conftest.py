"""Chaos tests reuse the whole-cluster fixtures of :mod:`tests.cluster.conftest`.

Helpers for the fencing and outbox chaos tests (issue #9) live here too: a function-scoped cluster
factory (each test's processes are stopped when it ends, so idle clusters do not eat the shared
cores), a budget sampler, a recording callback receiver and readers of the ledger and of Redis.
Everything judges by what the emulator recorded and what Redis holds, never by the code's counters.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.server
import json
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from reframe.demo import make_sample_video
from reframe.localcluster import LocalCluster, WorkerProcess, start_cluster
from tests.cluster.conftest import make_cluster, sample_video
from worker.contracts.keys import Keys

__all__ = [
    "BudgetSampler",
    "Receiver",
    "chaos_cluster",
    "make_cluster",
    "sample_video",
    "whole_clip",
]

#: The key prefix of every local cluster (settings default).
KEYS = Keys("reframe")
#: fal's price per second in micro-dollars (settings default 0.06 USD).
PRICE_MICRO_PER_S = 60_000

#: The same short limits as :func:`tests.cluster.conftest.make_cluster`.
BASE_ENV = {
    "REFRAME_TASK_SOFT_TIME_LIMIT_S": "20",
    "REFRAME_TASK_TIME_LIMIT_S": "30",
    "REFRAME_VISIBILITY_TIMEOUT_S": "40",
    "REFRAME_TRACKER_CLAIM_TTL_S": "3",
    "REFRAME_SLOT_LEASE_TTL_S": "6",
    "REFRAME_SUBMIT_RATE_PER_S": "100",
    "REFRAME_SUBMIT_BURST": "50",
}


@pytest.fixture(scope="session")
def whole_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3 s clip without audio: the budget estimate (whole seconds) equals fal's bill exactly."""
    return make_sample_video(
        tmp_path_factory.mktemp("chaos-media") / "three-seconds.mp4",
        duration_s=3,
        size="320x180",
        audio=False,
    )


@pytest.fixture
def chaos_cluster(tmp_path: Path) -> Iterator[Callable[..., LocalCluster]]:
    """Start clusters for one test (``start_cluster`` arguments; ``env`` is merged over the short
    limits above); every cluster started is stopped when the test ends."""
    started: list[LocalCluster] = []

    def factory(**kwargs: Any) -> LocalCluster:
        env = {**BASE_ENV, **kwargs.pop("env", {})}
        cluster = start_cluster(tmp_path / f"cluster-{len(started)}", env=env, **kwargs)
        started.append(cluster)
        return cluster

    yield factory
    for cluster in started:
        for proc in cluster.workers:
            # A worker left stopped by a failed test must be able to take its SIGTERM.
            proc.process.kill(signal.SIGCONT)
        cluster.stop()


# ---------------------------------------------------------------------- reading the judges
def ledger(cluster: LocalCluster) -> dict[str, Any]:
    """The emulator's ledger."""
    assert cluster.emulator_control is not None
    return cluster.emulator_control.ledger()


def redis_of(cluster: LocalCluster) -> redis.Redis:
    """A client of the cluster's Redis (str replies)."""
    return redis.Redis.from_url(cluster.redis_url, decode_responses=True)


def distinct_inputs(url: str, n: int, tag: str, aspect_ratio: str = "9:16") -> list[dict[str, Any]]:
    """``n`` inputs with distinct fingerprints (the prompt is accepted and ignored by the model)."""
    return [{"video_url": url, "aspect_ratio": aspect_ratio, "prompt": f"{tag} {i}"} for i in range(n)]


def new_tag(name: str) -> str:
    """A unique tag for a test run (printed, so a failure names it)."""
    tag = f"{name}-{uuid.uuid4().hex[:8]}"
    print(f"chaos run tag: {tag}")
    return tag


def redis_day(r: redis.Redis) -> str:
    """Today's UTC date by Redis ``TIME`` (the clock the budget scripts use)."""
    seconds, _micro = r.time()
    return dt.datetime.fromtimestamp(int(seconds), tz=dt.UTC).strftime("%Y-%m-%d")


def budget_day(r: redis.Redis) -> tuple[int, int]:
    """(spent, reserved) micro-dollars of today's budget hash."""
    raw = r.hmget(f"{KEYS.root}:fc:budget:day:{redis_day(r)}", "spent", "reserved")
    return int(raw[0] or 0), int(raw[1] or 0)


def events(r: redis.Redis) -> list[tuple[str, dict[str, str]]]:
    """Every entry of the result stream, oldest first."""
    return [(sid, dict(fields)) for sid, fields in r.xrange(KEYS.events, "-", "+")]


def max_open_from_timeline(book: dict[str, Any]) -> int:
    """The most requests open at fal at once, from the ledger's timeline of changes."""
    return max((int(open_) for _t, open_, _p in book.get("open_timeline", [])), default=0)


def worker_of(cluster: LocalCluster, process_id: str) -> WorkerProcess:
    """The worker whose ``Runtime.process_id`` (``host:pid:random``) is ``process_id``."""
    pid = int(process_id.split(":")[1])
    for proc in cluster.workers:
        if proc.process.pid == pid:
            return proc
    raise LookupError(f"no worker of this cluster has pid {pid} ({process_id})")


def scrape_counter(proc: WorkerProcess, name: str) -> float:
    """The value of an unlabelled counter on a worker's /metrics (0 when absent)."""
    text = httpx.get(f"{proc.metrics_url}/metrics", timeout=5).raise_for_status().text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ---------------------------------------------------------------------- the budget sampler
class BudgetSampler:
    """Samples today's budget hash (spent, reserved) in a background thread while a test runs."""

    def __init__(self, r: redis.Redis, *, interval_s: float = 0.02) -> None:
        self.r = r
        self.interval_s = interval_s
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="budget-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            spent, reserved = budget_day(self.r)
            self.samples.append((time.time(), spent, reserved))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> BudgetSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def over(self, cap_micro: int) -> list[tuple[float, int, int]]:
        """Samples in which spent + reserved exceeded ``cap_micro``."""
        return [s for s in self.samples if s[1] + s[2] > cap_micro]


# ---------------------------------------------------------------------- the callback receiver
@dataclass
class Delivery:
    """One request the receiver saw."""

    t: float
    headers: dict[str, str]
    body: bytes

    @property
    def event_id(self) -> str:
        return self.headers.get("x-reframe-event-id", "")

    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data


@dataclass
class Receiver:
    """A real HTTP callback receiver on 127.0.0.1 that records every request (headers and body).

    ``answer(index, delivery)`` (0-based arrival index) returns the status to send; it may block to
    hold the request open. The default answers 200.
    """

    answer: Callable[[int, Delivery], int] = lambda _i, _d: 200
    deliveries: list[Delivery] = field(default_factory=list)
    _server: http.server.ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    def start(self) -> Receiver:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                delivery = Delivery(time.time(), {k.lower(): v for k, v in self.headers.items()}, body)
                with receiver._lock:
                    index = len(receiver.deliveries)
                    receiver.deliveries.append(delivery)
                status = receiver.answer(index, delivery)
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:
                    pass  # the sender is gone (killed): nothing to answer

            def log_message(self, *_args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="callback-receiver", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def seen(self) -> list[Delivery]:
        with self._lock:
            return list(self.deliveries)

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def describe(cluster: LocalCluster, job_ids: list[str]) -> str:
    """The records, slots, track claims and ledger summary: printed when a chaos test fails."""
    r = redis_of(cluster)
    lines = []
    for job_id in job_ids:
        rec = r.hgetall(KEYS.job(job_id))
        skip = {"input", "result", "metadata", "fal_status_url", "fal_response_url", "fal_cancel_url"}
        keep = {k: v for k, v in sorted(rec.items()) if k not in skip}
        lines.append(f"job {job_id}: {keep}")
    lines.append(f"slots: {r.zrange(KEYS.slots, 0, -1, withscores=True)}")
    lines.append(
        f"track: {r.zrange(KEYS.track, 0, -1, withscores=True)} owners {r.hgetall(KEYS.track_owner)}"
    )
    lines.append(f"delayed: {r.zrange(KEYS.delayed, 0, -1, withscores=True)}")
    lines.append(f"reservations: {r.hgetall(KEYS.reservations)} budget(spent, reserved): {budget_day(r)}")
    lines.append(f"housekeeper: {r.get(KEYS.housekeeper_lock)} redis time: {r.time()}")
    lines.append(f"outbox: {r.zrange(KEYS.outbox, 0, -1, withscores=True)}")
    if cluster.emulator_control is not None:
        book = ledger(cluster)
        lines.append(
            "ledger: submits={} billed={} failed={} max_open={} cancels={}".format(
                [(s["request_id"], s["fingerprint"][:8]) for s in book["submits"]],
                book["billed_requests"],
                book["failed"],
                book["max_open"],
                book["cancels"],
            )
        )
    for proc in cluster.workers:
        lines.append(
            f"--- {proc.process.name} (pid {proc.process.pid}) log tail:\n{proc.process.log_tail(30)}"
        )
    return "\n".join(lines)


@contextlib.contextmanager
def explained(cluster: LocalCluster, job_ids: list[str]) -> Iterator[None]:
    """Print :func:`describe` of ``job_ids`` (a list the test may still extend) if the block fails."""
    try:
        yield
    except BaseException:
        print(describe(cluster, job_ids))
        raise
