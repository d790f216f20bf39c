"""Benchmarks of Reframe Cluster against the fal emulator, with real processes. Prints tables.

    ./dev bench                 # everything (~4 minutes on 2 cores)
    ./dev bench enqueue e2e     # a subset: enqueue, e2e, inflight, flow, recovery, webhooks, tenants,
                                #   uploads, headroom, durable, accounts

Nothing here is asserted: the floors from the issues are printed next to each figure.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

from bench.accounts import bench_accounts
from bench.clusters import cluster_with_clip, inflight_env
from bench.durable import bench_durable
from bench.headroom import bench_headroom
from bench.outputs import bench_outputs
from bench.recovery import bench_recovery
from bench.report import Row, console, mean_open, pct, table
from bench.tenants import bench_tenants
from bench.uploads import bench_uploads
from bench.webhooks import bench_webhooks
from producer import JobState, Producer
from reframe.localproc import start_redis, wait_until


def bench_enqueue(work: Path) -> list[Row]:
    server = start_redis(work / "redis")
    try:
        from config import load_settings

        settings = load_settings({"REFRAME_REDIS_URL": server.url})
        with Producer(settings) as p:
            single = [
                {"video_url": f"https://cdn.example.com/{i}.mp4", "aspect_ratio": "9:16"} for i in range(2000)
            ]
            started = time.perf_counter()
            for req in single:
                p.enqueue(req)
            rate_single = len(single) / (time.perf_counter() - started)
            many = [
                {"video_url": f"https://cdn.example.com/m{i}.mp4", "aspect_ratio": "1:1"}
                for i in range(30000)
            ]
            batch = settings.enqueue_max_batch  # one atomic script per batch of at most this many
            started = time.perf_counter()
            for i in range(0, len(many), batch):
                p.enqueue_many(many[i : i + batch])
            rate_many = len(many) / (time.perf_counter() - started)
    finally:
        server.stop()
    return [
        ("enqueue() one at a time", f"{rate_single:,.0f} jobs/s", ""),
        ("enqueue_many() in atomic batches of 1,000", f"{rate_many:,.0f} jobs/s", ">= 5,000 jobs/s"),
    ]


def _finished(p: Producer, ids: list[str]) -> int:
    return sum(1 for j in p.get_many(ids) if j is not None and j.terminal)


def _wait_all(p: Producer, ids: list[str], timeout_s: float) -> None:
    wait_until(lambda: _finished(p, ids) == len(ids), timeout_s=timeout_s, interval_s=0.2, what="all jobs")


def bench_e2e(work: Path) -> list[Row]:
    env = {
        "REFRAME_MAX_CONCURRENCY": "40",
        "REFRAME_SUBMIT_RATE_PER_S": "1000",
        "REFRAME_SUBMIT_BURST": "200",
    }
    cluster, url = cluster_with_clip(
        work, "e2e", workers=2, emulator_concurrency=40, emulator_processing_time_s=0.0, env=env
    )
    try:
        n = 400
        with Producer(cluster.settings()) as p:
            started = time.perf_counter()
            ids = p.enqueue_many([{"video_url": url, "aspect_ratio": "9:16"}] * n)
            _wait_all(p, ids, timeout_s=300)
            elapsed = time.perf_counter() - started
            jobs = p.get_many(ids)
        assert cluster.emulator_control is not None
        done_at = {c["request_id"]: c["t"] for c in cluster.emulator_control.ledger()["completions"]}
        lat = [
            j.timestamps_ms[f"ts_{j.state.value}"] / 1000 - done_at[j.fal_request_id]
            for j in jobs
            if j is not None and j.fal_request_id in done_at
        ]
        ok = sum(1 for j in jobs if j is not None and j.state is JobState.SUCCEEDED)
    finally:
        cluster.stop()
    return [
        ("end-to-end, zero processing time (2 workers)", f"{ok / elapsed:,.1f} jobs/s ({ok}/{n} ok)", ""),
        ("fal completion -> result published, p50", f"{pct(lat, 0.5) * 1000:,.0f} ms", "<= 1,000 ms"),
        ("fal completion -> result published, p99", f"{pct(lat, 0.99) * 1000:,.0f} ms", ""),
    ]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_inflight(work: Path, n: int = 1000, window_s: float = 60.0) -> list[Row]:
    env = inflight_env(n)  # 1,000 two-second jobs cost $120: above the default daily cap
    cluster, url = cluster_with_clip(
        work, "inflight", workers=1, emulator_concurrency=40, emulator_processing_time_s=3600.0, env=env
    )
    try:
        r = redis.Redis.from_url(cluster.redis_url)
        with Producer(cluster.settings()) as p:
            ids = p.enqueue_many([{"video_url": url, "aspect_ratio": "1:1"}] * n)
            wait_until(
                lambda: sum(1 for j in p.get_many(ids) if j is not None and j.state.at_fal) == n,
                timeout_s=240,
                interval_s=0.5,
                what=f"{n} jobs at fal",
            )
            wait_until(lambda: r.zcard("{reframe}:track") == n, timeout_s=60, what="all tracked")
            assert cluster.emulator_control is not None
            time.sleep(5)  # let every stream settle before the measurement window
            before = cluster.emulator_control.ledger()["requests"]
            rss_start = _rss_mb(cluster.workers[0].process.pid)
            time.sleep(window_s)  # the measurement window itself
            after = cluster.emulator_control.ledger()["requests"]
            rss = _rss_mb(cluster.workers[0].process.pid)
        new = after[len(before) :]
        polls = sum(1 for x in new if x["op"] == "status")
        streams = sum(1 for x in new if x["op"] == "stream")
        per_job_min = (polls + streams) / n / (window_s / 60)
    finally:
        cluster.stop()
    return [
        (
            f"worker RSS tracking {n} jobs in flight",
            f"{rss:,.0f} MB (at start of window {rss_start:,.0f})",
            "< 300 MB",
        ),
        (
            "fal status requests per in-flight job per minute",
            f"{per_job_min:.3f}",
            "modest (no 10 Hz polling)",
        ),
        ("  of which status polls / stream (re)connects", f"{polls} / {streams} in {window_s:.0f}s", ""),
    ]


def bench_flow(work: Path, n_slots: int = 8, processing_s: float = 2.0, jobs: int = 160) -> list[Row]:
    env = {
        "REFRAME_MAX_CONCURRENCY": str(n_slots),
        "REFRAME_SUBMIT_RATE_PER_S": "100",
        "REFRAME_SUBMIT_BURST": "20",
    }
    cluster, url = cluster_with_clip(
        work,
        "flow",
        workers=3,
        emulator_concurrency=n_slots,
        emulator_processing_time_s=processing_s,
        env=env,
    )
    try:
        with Producer(cluster.settings()) as p:
            ids = p.enqueue_many([{"video_url": url, "aspect_ratio": "4:3"}] * jobs)
            _wait_all(p, ids, timeout_s=600)
            records = p.get_many(ids)
        assert cluster.emulator_control is not None
        book = cluster.emulator_control.ledger()
    finally:
        cluster.stop()
    submits = sorted(s["t"] for s in book["submits"])
    completions = sorted(c["t"] for c in book["completions"])
    backlog_end = submits[-1]  # after the last submit there is no backlog left to fill slots
    utilisation = mean_open(book["open_timeline"], submits[0], backlog_end) / n_slots
    released = sorted(
        j.timestamps_ms["ts_SUCCEEDED"] / 1000 for j in records if j and j.state is JobState.SUCCEEDED
    )
    delays = []
    for t in released:
        nxt = next((s for s in submits if s >= t), None)
        if nxt is not None and t < backlog_end:
            delays.append(nxt - t)
    duration = completions[-1] - submits[0]
    throughput = len(completions) / duration
    ideal = n_slots / processing_s
    return [
        (f"slot utilisation under backlog (N={n_slots})", f"{utilisation:.1%}", ">= 95%"),
        ("slot release -> next submit, p50", f"{pct(delays, 0.5) * 1000:,.0f} ms", ""),
        ("slot release -> next submit, p95", f"{pct(delays, 0.95) * 1000:,.0f} ms", "<= 250 ms"),
        (
            f"throughput under backlog ({processing_s:.0f}s jobs)",
            f"{throughput:.2f} jobs/s = {throughput / ideal:.1%} of N/processing",
            "",
        ),
    ]


SCENARIOS: dict[str, tuple[str, Callable[[Path], list[Row]]]] = {
    "enqueue": ("Producer enqueue rate (local redis-server)", bench_enqueue),
    "e2e": ("End to end against the emulator", bench_e2e),
    "inflight": ("Completion tracking: 1,000 jobs in flight in one worker process", bench_inflight),
    "flow": ("Flow control under backlog (3 workers)", bench_flow),
    "recovery": ("Recovery: worker kills, takeover, N = 40 at defaults (bench/recovery.py)", bench_recovery),
    "webhooks": (
        "fal webhooks vs the status stream: latency, status requests, memory (bench/webhooks.py)",
        bench_webhooks,
    ),
    "tenants": (
        "Tenants: admission with 1,000 tenants waiting, share error under skew (bench/tenants.py)",
        bench_tenants,
    ),
    "uploads": ("Uploads to fal storage: throughput and peak RSS (bench/uploads.py)", bench_uploads),
    "headroom": (
        "Headroom: Redis commands, bytes and CPU per job; jobs/s per Redis and per worker (bench/headroom.py)",
        bench_headroom,
    ),
    "outputs": (
        "Output store: obstore vs boto3 into S3, what the copy adds before publishing (bench/outputs.py)",
        bench_outputs,
    ),
    "durable": (
        "Redis durability: enqueue with a replica's acknowledgement, Sentinel failover (bench/durable.py)",
        bench_durable,
    ),
    "accounts": (
        "fal accounts: choosing the account in the slot scripts (bench/accounts.py)",
        bench_accounts,
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("scenarios", nargs="*", choices=[*SCENARIOS, []], help="default: all")
    args = parser.parse_args(argv)
    # SIGTERM (e.g. `timeout`) must unwind like Ctrl-C so every started process is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    chosen = args.scenarios or list(SCENARIOS)
    console.print(
        f"Reframe Cluster benchmarks on {Path('/proc/cpuinfo').read_text().count('processor')} cores, "
        f"Python {sys.version.split()[0]}"
    )
    with tempfile.TemporaryDirectory(prefix="reframe-bench-") as tmp:
        for name in chosen:
            title, fn = SCENARIOS[name]
            started = time.perf_counter()
            rows = fn(Path(tmp))
            table(f"{title} ({time.perf_counter() - started:.0f}s)", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
