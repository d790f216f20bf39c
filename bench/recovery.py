"""Recovery benchmarks (issue #10): throughput under worker kills, time to follow a dead worker's jobs
again, and default-settings throughput at N = 40. Real processes; prints a table; asserts nothing.

    python -m bench.recovery            # all three (~5 minutes on 2 cores)
    python -m bench recovery            # the same through the bench runner

Settings are the defaults except where a row says otherwise (the cluster size N, and a budget cap
high enough that the budget never blocks: the budget is not what these rows measure).
"""

from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import redis

from bench.clusters import BUDGET_ENV, cluster_with_clip
from bench.report import Parts, Row, mean_open, parts_main, pct, run_parts
from producer import Producer
from reframe.localcluster import LocalCluster, WorkerProcess
from reframe.localproc import wait_until

PREFIX = "{reframe}"


def _ok_completions(cluster: LocalCluster, start: float, end: float) -> int:
    assert cluster.emulator_control is not None
    book = cluster.emulator_control.ledger()
    return sum(1 for c in book["completions"] if c["ok"] and start <= c["t"] < end)


def _worker_by_pid(cluster: LocalCluster, pid: int) -> WorkerProcess | None:
    return next((w for w in cluster.workers if w.process.pid == pid), None)


# ---------------------------------------------------------------------- 1. throughput under kills
def bench_kill_throughput(
    work: Path, *, n: int = 8, processing_s: float = 1.0, window_s: float = 40.0, kill_every_s: float = 5.0
) -> list[Row]:
    """Completions per second in a steady window, without faults and with a SIGKILL every 5 s."""
    env = {"REFRAME_MAX_CONCURRENCY": str(n), **BUDGET_ENV}
    cluster, url = cluster_with_clip(
        work, "kills", workers=3, emulator_concurrency=n, emulator_processing_time_s=processing_s, env=env
    )
    rng = random.Random(10)
    jobs = int(2.5 * window_s * n / processing_s)
    rates: dict[str, float] = {}
    kills = 0
    ambiguous = 0
    try:
        with Producer(cluster.settings()) as p:
            for phase, aspect in (("baseline", "9:16"), ("kills", "1:1")):
                ids = p.enqueue_many([{"video_url": url, "aspect_ratio": aspect}] * jobs)
                warm_until = time.time() + 10  # the backlog fills every slot first
                wait_until(lambda t=warm_until: time.time() >= t, timeout_s=30, what="warm-up")
                start = time.time()
                next_kill = start + kill_every_s
                while time.time() < start + window_s:
                    if phase == "kills" and time.time() >= next_kill:
                        victim = cluster.workers[rng.randrange(len(cluster.workers))]
                        cluster.kill_worker(victim, signal.SIGKILL)
                        kills += 1
                        cluster.start_worker(name=f"replacement-{kills}", wait=False)
                        next_kill += kill_every_s
                    time.sleep(0.1)  # the kill clock's tick
                rates[phase] = _ok_completions(cluster, start, start + window_s) / window_s
                for job_id in ids:  # end the phase: nothing of it may run into the next window
                    p.cancel(job_id)
                wait_until(
                    lambda i=ids: all(j is not None and j.terminal for j in p.get_many(i)),
                    timeout_s=300,
                    interval_s=0.5,
                    what=f"{phase} batch ended",
                )
                if phase == "kills":
                    ambiguous = sum(
                        1
                        for j in p.get_many(ids)
                        if j is not None and j.dead_letter_reason == "ambiguous_submit"
                    )
                wait_until(
                    lambda: (
                        cluster.emulator_control is not None
                        and cluster.emulator_control.ledger()["open"] == 0
                    ),
                    timeout_s=120,
                    what="nothing open at fal",
                )
    finally:
        cluster.stop()
    ratio = rates["kills"] / rates["baseline"] if rates.get("baseline") else float("nan")
    return [
        (
            f"throughput without faults (N={n}, {processing_s:g}s jobs, 3 workers, {window_s:.0f}s window)",
            f"{rates['baseline']:.2f} jobs/s",
            "",
        ),
        (
            f"throughput with a random worker SIGKILLed every {kill_every_s:g}s (replaced)",
            f"{rates['kills']:.2f} jobs/s = {ratio:.0%} of no faults ({kills} kills, {ambiguous} ambiguous submits)",
            ">= 80%",
        ),
    ]


# ---------------------------------------------------------------------- 2. death -> followed again
class OwnerPoller:
    """Polls the tracker-owner hash every ~20 ms and remembers when each job's owner changed."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        self.watch: dict[str, tuple[str, float]] = {}  # job -> (dead owner, killed at)
        self.recovered: dict[str, float] = {}  # job -> seconds from the kill to a new owner
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def add(self, jobs: dict[str, str], killed_at: float) -> None:
        with self._lock:
            for job, owner in jobs.items():
                self.watch[job] = (owner, killed_at)

    def pending(self) -> int:
        with self._lock:
            return len(self.watch)

    def _run(self) -> None:
        while not self._stop.is_set():
            owners = {k.decode(): v.decode() for k, v in self.r.hgetall(f"{PREFIX}:track:owner").items()}
            now = time.time()
            with self._lock:
                for job, (dead, killed_at) in list(self.watch.items()):
                    if owners.get(job) not in (None, dead):
                        self.recovered[job] = now - killed_at
                        del self.watch[job]
            self._stop.wait(0.02)

    def start(self) -> OwnerPoller:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def bench_follow_again(work: Path, *, n: int = 24, kills: int = 8) -> list[Row]:
    """Kill a worker holding tracker claims; time until each of its jobs is claimed by another process."""
    env = {"REFRAME_MAX_CONCURRENCY": str(n), **BUDGET_ENV}
    # Jobs stay at fal for the whole run: every claim is live when its owner dies.
    cluster, url = cluster_with_clip(
        work, "follow", workers=3, emulator_concurrency=n, emulator_processing_time_s=3600.0, env=env
    )
    rng = random.Random(11)
    r = redis.Redis.from_url(cluster.redis_url)
    poller = OwnerPoller(redis.Redis.from_url(cluster.redis_url)).start()
    held_lock = 0
    per_kill_max: list[float] = []
    try:
        with Producer(cluster.settings()) as p:
            ids = p.enqueue_many([{"video_url": url, "aspect_ratio": "9:16"}] * n)
            for round_ in range(kills):
                wait_until(
                    lambda: r.hlen(f"{PREFIX}:track:owner") == n,
                    timeout_s=120,
                    what="every job claimed by a tracker (one tracker often claims them all)",
                )
                owners = {k.decode(): v.decode() for k, v in r.hgetall(f"{PREFIX}:track:owner").items()}
                by_proc: dict[str, dict[str, str]] = {}
                for job, proc in owners.items():
                    by_proc.setdefault(proc, {})[job] = proc
                proc_id = rng.choice(sorted(by_proc))
                victim = _worker_by_pid(cluster, int(proc_id.split(":")[1]))
                assert victim is not None, proc_id
                lock = r.get(f"{PREFIX}:housekeeper")
                held_lock += int(bool(lock) and lock.decode().startswith(proc_id))
                killed_at = time.time()
                cluster.kill_worker(victim, signal.SIGKILL)
                poller.add(by_proc[proc_id], killed_at)
                wait_until(
                    lambda: poller.pending() == 0, timeout_s=120, interval_s=0.05, what="jobs followed again"
                )
                per_kill_max.append(max(poller.recovered[j] for j in by_proc[proc_id]))
                cluster.start_worker(name=f"replacement-{round_}")
            for job_id in ids:
                p.cancel(job_id)
    finally:
        poller.stop()
        cluster.stop()
    times = list(poller.recovered.values())
    return [
        (
            f"worker death -> its jobs claimed by another process, p50 ({len(times)} jobs, {kills} kills)",
            f"{pct(times, 0.5):.1f} s",
            "",
        ),
        (
            "worker death -> its jobs claimed by another process, p95",
            f"{pct(times, 0.95):.1f} s",
            "p95 < 10 s",
        ),
        (
            f"  slowest job per kill (victim held the housekeeper lock in {held_lock}/{kills})",
            ", ".join(f"{x:.1f}" for x in per_kill_max) + " s",
            "",
        ),
    ]


# ---------------------------------------------------------------------- 3. N = 40, defaults


def bench_default_n40(
    work: Path, *, n: int = 40, processing_s: float = 5.0, window_s: float = 40.0
) -> list[Row]:
    """Default settings (rate 50/s, burst 10, ...) with N = 40 and 5 s jobs under a backlog."""
    env = {"REFRAME_MAX_CONCURRENCY": str(n), **BUDGET_ENV}
    cluster, url = cluster_with_clip(
        work, "n40", workers=3, emulator_concurrency=n, emulator_processing_time_s=processing_s, env=env
    )
    ideal = n / processing_s
    jobs = int(ideal * (window_s + 20) * 1.3)
    try:
        with Producer(cluster.settings()) as p:
            ids = p.enqueue_many([{"video_url": url, "aspect_ratio": "16:9"}] * jobs)
            start = time.time() + 10  # past the first fill of the slots
            wait_until(lambda: time.time() >= start + window_s, timeout_s=window_s + 30, what="window")
            done = _ok_completions(cluster, start, start + window_s)
            assert cluster.emulator_control is not None
            book: dict[str, Any] = cluster.emulator_control.ledger()
            for job_id in ids:
                p.cancel(job_id)
    finally:
        cluster.stop()
    throughput = done / window_s
    util = mean_open(book["open_timeline"], start, start + window_s) / n
    return [
        (
            f"default settings, N={n}, {processing_s:g}s emulator jobs: throughput ({window_s:.0f}s window)",
            f"{throughput:.2f} jobs/s = {throughput / ideal:.1%} of N/processing",
            ">= 95%",
        ),
        ("  slot utilisation in the window (open at fal / N)", f"{util:.1%}", ""),
    ]


SCENARIOS: Parts = {
    "kills": ("Throughput under a worker SIGKILL every 5 s", bench_kill_throughput),
    "follow": ("Worker death -> its jobs followed again", bench_follow_again),
    "n40": ("Default settings at N = 40", bench_default_n40),
}


def run(work: Path, names: list[str] | None = None, *, print_parts: bool = False) -> list[Row]:
    """Run the recovery benchmarks (all by default); returns every row."""
    return run_parts(work, SCENARIOS, names, print_parts=print_parts)


def bench_recovery(work: Path) -> list[Row]:
    """The ``recovery`` scenario of ``python -m bench``."""
    return run(work)


def main(argv: list[str] | None = None) -> int:
    return parts_main("recovery", "Recovery (issue #10)", SCENARIOS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
