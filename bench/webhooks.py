"""fal webhooks as the completion path (issue #12), beside the status-stream path (webhooks off).
Real processes; prints a table; asserts nothing.

    python -m bench.webhooks                 # latency and status requests, then memory (~3 minutes)
    python -m bench.webhooks latency         # a part: latency, memory
    python -m bench webhooks                 # the same through the bench runner

* **latency**: two workloads (:data:`WORKLOADS`), each once with webhooks
  (``start_cluster(fal_webhook_secret=...)``: ``reframe serve`` receives them, README "fal webhooks")
  and once without (the status stream), N = 40, 2 workers, 1 s emulator jobs: *steady*, jobs
  arriving one by one at 10/s, so completions are spread as fal's are; *burst*, a backlog enqueued
  at once, so the emulator ends 40 requests in the same instant again and again (a stress case).
  "Completion" is the time the emulator's ledger gives the request's end (``completions[].t``),
  "published" the time of the result event's ``XADD`` id in the results stream (Redis ``TIME``);
  one machine, one clock. fal's status requests per job (status polls and status-stream opens,
  plus result reads) are counted in the emulator's request log, not by our own counters.
* **memory**: 1,000 jobs accepted at the emulator and kept there (1 h emulator jobs; N = 1,000 at
  the emulator and in the cluster settings), one worker process. Its RSS (the whole process group)
  once all are at fal, minus its idle RSS after a warm-up of a few finished jobs, per job; both modes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, cast

import redis

from bench.clusters import BUDGET_ENV, cluster_with_clip, inflight_env
from bench.report import Parts, Row, load_average, parts_main, pct, run_parts
from producer import JobState, Producer
from reframe.localcluster import LocalCluster
from reframe.localproc import wait_until
from worker.contracts.keys import Keys
from worker.webhooks import delivery_key

KEYS = Keys("reframe")  # the settings' default prefix
SECRET = "bench-webhook-secret"
MODES = {"webhooks": SECRET, "status stream": None}
#: What a tracker asks fal about a request (emulator ``op`` names); results are counted apart.
STATUS_OPS = {"status", "stream"}


def _ledger(cluster: LocalCluster) -> dict[str, Any]:
    assert cluster.emulator_control is not None
    return cluster.emulator_control.ledger()


def _wait_terminal(p: Producer, ids: list[str], timeout_s: float) -> None:
    wait_until(
        lambda: all(j is not None and j.terminal for j in p.get_many(ids)),
        timeout_s=timeout_s,
        interval_s=0.2,
        what=f"{len(ids)} jobs terminal",
    )


def _run_batch(p: Producer, url: str, n: int, aspect: str, timeout_s: float) -> list[str]:
    ids = p.enqueue_many([{"video_url": url, "aspect_ratio": aspect}] * n)
    _wait_terminal(p, ids, timeout_s)
    return ids


def _run_paced(p: Producer, url: str, n: int, per_s: float, timeout_s: float) -> list[str]:
    """Enqueue one job every 1/per_s seconds (open loop), then wait for all."""
    ids: list[str] = []
    started = time.monotonic()
    for i in range(n):
        time.sleep(max(0.0, started + i / per_s - time.monotonic()))  # the arrival schedule
        ids.append(p.enqueue({"video_url": url, "aspect_ratio": "9:16"}))
    _wait_terminal(p, ids, timeout_s)
    return ids


def _published_ms(r: redis.Redis) -> dict[str, int]:
    """job id -> ms of its (last) result event's stream id."""
    out: dict[str, int] = {}
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], r.xrange(KEYS.events))
    for sid, fields in entries:
        out[fields[b"job_id"].decode()] = int(sid.decode().split("-")[0])
    return out


def _ms(values: list[float]) -> str:
    return " / ".join(f"{pct(values, q) * 1000:,.0f}" for q in (0.5, 0.95, 0.99)) + " ms"


# ---------------------------------------------------------------------- 1. latency, status requests
#: The two arrival patterns of the latency runs: (name, jobs, arrivals per second or None = all at once).
WORKLOADS = (("steady", 300, 10.0), ("burst", 200, None))


def _timings(cluster: LocalCluster, r: redis.Redis, p: Producer, ids: list[str]) -> dict[str, Any]:
    """Latencies of ``ids`` and fal's requests about them, from the emulator's ledger and Redis."""
    book = _ledger(cluster)
    records = {j.fal_request_id: j for j in p.get_many(ids) if j is not None and j.fal_request_id}
    published = _published_ms(r)
    done = {c["request_id"]: c["t"] for c in book["completions"] if c["request_id"] in records}
    # when reframe serve accepted the webhook (the delivery hash of worker/webhooks.py), for the split
    received: dict[str, float] = {}
    for rid in done:
        at = r.hget(delivery_key(KEYS, rid), "received_at_ms")
        if at is not None:
            received[rid] = int(cast(bytes, at)) / 1000
    ops = [x["op"] for x in book["requests"] if x.get("request_id") in records]
    pub = {rid: published[j.id] / 1000 for rid, j in records.items() if j.id in published}
    return {
        "jobs": len(ids),
        "ok": sum(1 for j in records.values() if j.state is JobState.SUCCEEDED),
        "latency": [pub[rid] - t for rid, t in done.items() if rid in pub],
        "to_received": [received[rid] - t for rid, t in done.items() if rid in received],
        "received_to_published": [pub[rid] - received[rid] for rid in done if rid in received and rid in pub],
        "status": sum(1 for op in ops if op in STATUS_OPS),
        "polls": ops.count("status"),
        "streams": ops.count("stream"),
        "results": ops.count("result"),
        "webhooks_204": sum(1 for w in book["webhooks"] if w["status"] == 204 and w["request_id"] in records),
    }


def latency_mode(
    work: Path, mode: str, *, n: int = 40, processing_s: float = 1.0, workers: int = 2
) -> dict[str, dict[str, Any]]:
    """Each workload of :data:`WORKLOADS` through N = ``n`` slots and 1 s emulator jobs in ``mode``."""
    env = {
        "REFRAME_MAX_CONCURRENCY": str(n),
        "REFRAME_SUBMIT_RATE_PER_S": "1000",
        "REFRAME_SUBMIT_BURST": "200",
        **BUDGET_ENV,
    }
    cluster, url = cluster_with_clip(
        work,
        "latency-" + mode.replace(" ", "-"),
        fal_webhook_secret=MODES[mode],
        workers=workers,
        emulator_concurrency=n,
        emulator_processing_time_s=processing_s,
        env=env,
    )
    out: dict[str, dict[str, Any]] = {}
    try:
        control = cluster.emulator_control
        assert control is not None
        r = redis.Redis.from_url(cluster.redis_url)
        with Producer(cluster.settings()) as p:
            _run_batch(p, url, 5, "1:1", timeout_s=120)  # warm-up: connections, scripts, the JWKS
            for workload, jobs, per_s in WORKLOADS:
                control.reset()
                load_before = load_average()
                if per_s is None:
                    ids = _run_batch(p, url, jobs, "9:16", timeout_s=600)
                else:
                    ids = _run_paced(p, url, jobs, per_s, timeout_s=600)
                out[workload] = {**_timings(cluster, r, p, ids), "load": f"{load_before} -> {load_average()}"}
        r.close()
    finally:
        cluster.stop()
    return out


def bench_latency(work: Path) -> list[Row]:
    """Completion -> published and fal status requests per job, webhooks beside the status stream."""
    runs = {mode: latency_mode(work, mode) for mode in MODES}
    rows: list[Row] = []
    for workload, jobs, per_s in WORKLOADS:
        how = (
            f"{jobs} jobs arriving at {per_s:g}/s, 1 s emulator jobs"
            if per_s is not None
            else f"{jobs} jobs at once through N = 40, 1 s emulator jobs (completions 40 at a time)"
        )
        rows.append((f"[b]{workload}[/b]: {how}", "", ""))
        for mode in MODES:
            run = runs[mode][workload]
            rows.append(
                (
                    f"completion -> published, {mode}, p50 / p95 / p99 ({run['ok']}/{run['jobs']} ok)",
                    _ms(run["latency"]),
                    "p50 <= 50 ms" if mode == "webhooks" else "",
                )
            )
            if mode == "webhooks":
                rows.append(
                    (
                        "  of which completion -> webhook accepted by reframe serve",
                        _ms(run["to_received"]),
                        "",
                    )
                )
                rows.append(
                    (
                        "  of which accepted -> result event in the stream",
                        _ms(run["received_to_published"]),
                        "",
                    )
                )
        for mode in MODES:
            run = runs[mode][workload]
            rows.append(
                (
                    f"fal status requests per job, {mode}",
                    f"{run['status'] / run['jobs']:.3f} ({run['polls']} polls, {run['streams']} streams; "
                    f"{run['results'] / run['jobs']:.2f} result reads/job)",
                    "0 when webhooks arrive" if mode == "webhooks" else "",
                )
            )
        hooks = runs["webhooks"][workload]
        rows.append(("  webhooks answered 204", f"{hooks['webhooks_204']}/{hooks['jobs']}", ""))
        for mode in MODES:
            rows.append((f"  load average 1/5 min during the {mode} run", runs[mode][workload]["load"], ""))
    return rows


# ---------------------------------------------------------------------- 2. memory per in-flight job
def _pgid_rss_kb(pgid: int) -> int:
    """Summed VmRSS (KB) of every process in the process group (the worker and any child)."""
    total = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            for line in (proc / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue  # a process that ended while we looked
    return total


def _steady_rss_kb(pgid: int, samples: int = 5, every_s: float = 1.0) -> int:
    """The median of a few RSS samples, so one allocation spike does not decide."""
    seen = []
    for _ in range(samples):
        seen.append(_pgid_rss_kb(pgid))
        time.sleep(every_s)  # between samples
    return sorted(seen)[len(seen) // 2]


def memory_mode(work: Path, mode: str, *, n: int = 1000, warmup: int = 20) -> dict[str, Any]:
    """RSS of one worker with ``n`` jobs at fal, minus its idle RSS after ``warmup`` finished jobs."""
    cluster, url = cluster_with_clip(
        work,
        "memory-" + mode.replace(" ", "-"),
        fal_webhook_secret=MODES[mode],
        workers=1,
        emulator_concurrency=n,
        emulator_processing_time_s=0.2,
        env=inflight_env(n),
    )
    try:
        control = cluster.emulator_control
        assert control is not None
        pgid = cluster.workers[0].process.pid  # spawn() starts each process in its own group
        with Producer(cluster.settings()) as p:
            _run_batch(p, url, warmup, "1:1", timeout_s=120)  # every code path loaded once
            time.sleep(5)  # idle: nothing at fal, nothing queued
            idle_kb = _steady_rss_kb(pgid)
            load_before = load_average()
            control.configure(processing_time_s=3600.0)
            control.reset()
            ids = p.enqueue_many([{"video_url": url, "aspect_ratio": "9:16"}] * n)
            wait_until(
                lambda: (
                    sum(1 for j in p.get_many(ids) if j is not None and j.state.at_fal) == n
                    and _ledger(cluster)["open"] == n
                ),
                timeout_s=300,
                interval_s=0.5,
                what=f"{n} jobs at fal",
            )
            time.sleep(10)  # let the submits' and trackers' garbage settle before measuring
            busy_kb = _steady_rss_kb(pgid)
            load_after = load_average()
            book = _ledger(cluster)
    finally:
        cluster.stop()
    ops = [x["op"] for x in book["requests"]]
    return {
        "n": n,
        "idle_kb": idle_kb,
        "busy_kb": busy_kb,
        "open": book["open"],
        "status": sum(1 for op in ops if op in STATUS_OPS),
        "load": f"{load_before} -> {load_after}",
    }


def bench_memory(work: Path) -> list[Row]:
    """Worker memory per in-flight job with 1,000 jobs at fal, webhooks beside the status stream."""
    rows: list[Row] = []
    for mode in MODES:
        run = memory_mode(work, mode)
        per_job_kib = (run["busy_kb"] - run["idle_kb"]) / run["n"]  # VmRSS is in KiB
        rows.append(
            (
                f"worker memory per in-flight job, {mode} ({run['n']:,} at fal, 1 worker)",
                f"{per_job_kib:,.1f} KiB/job (RSS {run['idle_kb'] / 1024:,.0f} MiB idle -> "
                f"{run['busy_kb'] / 1024:,.0f} MiB)",
                "< 30 KB/job" if mode == "webhooks" else "",
            )
        )
        rows.append(
            (
                f"  fal status requests while {run['n']:,} were at fal, {mode}",
                f"{run['status']} ({run['status'] / run['n']:.2f}/job)",
                "",
            )
        )
        rows.append((f"  load average 1/5 min, {mode} run", run["load"], ""))
    return rows


SCENARIOS: Parts = {
    "latency": ("fal webhooks vs status stream: completion -> published, status requests", bench_latency),
    "memory": ("fal webhooks vs status stream: worker memory per in-flight job", bench_memory),
}


def bench_webhooks(work: Path) -> list[Row]:
    """The ``webhooks`` scenario of ``python -m bench``."""
    return run_parts(work, SCENARIOS)


def main(argv: list[str] | None = None) -> int:
    return parts_main("webhook", "fal webhooks (issue #12)", SCENARIOS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
