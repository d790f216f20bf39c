"""Headroom (issue #15): what one Redis primary and one worker process can carry, measured end to end
with real processes against the emulator, then extrapolated to fal jobs of 60 s. Prints tables;
asserts nothing.

    python -m bench headroom                # the three tracking modes (~3-5 minutes on 2 cores)
    python -m bench.headroom [--jobs M] [--inflight K] [--window-s W] [mode ...]

For each completion-tracking mode (fal's status stream, status polling, fal webhooks) one cluster is
started: one redis-server, the emulator, ONE worker process (and ``reframe serve`` for webhooks).
Counters are read from the processes themselves, never from our own metrics:

* Redis: ``INFO commandstats`` (calls and usec per command), ``INFO stats``
  (total_net_input_bytes / total_net_output_bytes) and ``INFO cpu`` (used_cpu_user + used_cpu_sys);
* worker and API: utime + stime of every process in their process group (/proc/<pid>/stat).

Three windows per mode:

1. **idle** (``W`` s, nothing queued or at fal): the fixed background of one worker process (Celery's
   broker loop, heartbeats, tracker ticks) per second;
2. **end to end** (``M`` jobs enqueued one at a time, as ``reframe serve`` does, at a steady rate;
   1 s emulator jobs): everything a job costs from enqueue to its result event, gross and net of
   the idle background over the same time;
3. **in flight** (``K`` jobs held at fal with 1 h emulator jobs, ``W`` s): what a job costs per second
   while it waits at fal (stream keep-alives, status polls, slot-lease renewals), net of idle.

A fal job of ``T`` = 60 s then costs ``end to end (net) + in flight per job-second x (T - 1 s)``,
and the capacity is ``1 core / cost per job / safety factor``. The benchmark's own reads are left
out: ``INFO`` is excluded, and the ``XLEN`` it polls to see the jobs finish is subtracted.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import redis

from bench.clusters import BUDGET_ENV, cluster_with_clip
from bench.report import Row, console, load_average, table
from producer import JobState, Producer
from reframe.localcluster import LocalCluster
from reframe.localproc import wait_until
from worker.contracts.keys import Keys

KEYS = Keys("reframe")  # the settings' default prefix
SECRET = "bench-headroom-secret"
#: fal's job length the capacity is stated for, and the slots of one fal account
JOB_S = 60.0
ACCOUNT_SLOTS = 40
#: emulator processing time of the end-to-end window
PROCESSING_S = 1.0
#: capacity = measured cost x this: Redis is single-threaded (past ~50 % of a core its queueing
#: delay grows fast), a worker process is bound by one GIL; both keep half a core spare for bursts,
#: recoveries and the fixed background.
SAFETY = 2.0
#: tracking mode -> (settings, webhook secret or None)
MODES: dict[str, tuple[dict[str, str], str | None]] = {
    "status stream": ({}, None),
    "polling": ({"REFRAME_USE_STATUS_STREAM": "false"}, None),
    "webhooks": ({}, SECRET),
}
TOP_N = 8


@dataclass
class Snapshot:
    """Counters of the Redis server and of the cluster's processes at one moment."""

    t: float
    calls: dict[str, int]
    usec: dict[str, int]
    net_in: int
    net_out: int
    redis_cpu_s: float
    cpu_s: dict[str, float]

    def minus(self, other: Snapshot) -> Delta:
        names = set(self.calls) | set(other.calls)
        calls = {n: self.calls.get(n, 0) - other.calls.get(n, 0) for n in names}
        usec = {n: self.usec.get(n, 0) - other.usec.get(n, 0) for n in names}
        return Delta(
            seconds=self.t - other.t,
            calls={n: c for n, c in calls.items() if c},
            usec={n: u for n, u in usec.items() if calls[n]},
            net_in=self.net_in - other.net_in,
            net_out=self.net_out - other.net_out,
            redis_cpu_s=self.redis_cpu_s - other.redis_cpu_s,
            cpu_s={k: self.cpu_s[k] - other.cpu_s.get(k, 0.0) for k in self.cpu_s},
        )


@dataclass
class Delta:
    """What happened between two snapshots."""

    seconds: float
    calls: dict[str, int]
    usec: dict[str, int]
    net_in: int
    net_out: int
    redis_cpu_s: float
    cpu_s: dict[str, float]

    @property
    def commands(self) -> int:
        return sum(self.calls.values())

    def scaled(self, factor: float) -> dict[str, float]:
        """The headline figures times ``factor`` (e.g. 1/jobs, or 1/(jobs x seconds))."""
        return {
            "commands": self.commands * factor,
            "bytes_in": self.net_in * factor,
            "bytes_out": self.net_out * factor,
            "redis_cpu_ms": self.redis_cpu_s * 1000 * factor,
            "redis_usec": sum(self.usec.values()) * factor,
            **{f"{k}_cpu_ms": v * 1000 * factor for k, v in self.cpu_s.items()},
        }


def group_cpu_s(pgid: int) -> float:
    """utime + stime (seconds) of every live process in process group ``pgid``."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # a process that ended while we looked
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])  # utime, stime (stat fields 14, 15)
    return total / tick


class Meter:
    """Takes :class:`Snapshot` s of one cluster; counts its own XLEN polls so they can be removed."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.r = redis.Redis.from_url(cluster.redis_url)
        self.groups = {"worker": cluster.workers[0].process.pid}  # spawn(): each its own group
        for proc in cluster.extra:
            if proc.name.startswith("serve-"):
                self.groups["api"] = proc.pid
        self.xlen_polls = 0

    def snapshot(self) -> Snapshot:
        stats = cast(dict[str, Any], self.r.info("commandstats"))
        calls, usec = {}, {}
        for key, value in stats.items():
            name = key.removeprefix("cmdstat_")
            if name == "info":  # the benchmark's own snapshots
                continue
            calls[name], usec[name] = int(value["calls"]), int(value["usec"])
        calls["xlen"] = calls.get("xlen", 0) - self.xlen_polls  # the benchmark's own polls
        info = cast(dict[str, Any], self.r.info("stats")) | cast(dict[str, Any], self.r.info("cpu"))
        return Snapshot(
            t=time.monotonic(),
            calls=calls,
            usec=usec,
            net_in=int(info["total_net_input_bytes"]),
            net_out=int(info["total_net_output_bytes"]),
            redis_cpu_s=float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
            cpu_s={name: group_cpu_s(pgid) for name, pgid in self.groups.items()},
        )

    def wait_results(self, n: int, timeout_s: float) -> None:
        """Until the result stream holds ``n`` events: one XLEN per poll, counted and removed."""

        def done() -> bool:
            self.xlen_polls += 1
            return int(cast(int, self.r.xlen(KEYS.events))) >= n

        wait_until(done, timeout_s=timeout_s, interval_s=0.5, what=f"{n} result events")


def measure_mode(
    work: Path, mode: str, *, jobs: int, inflight: int, window_s: float, rate_per_s: float
) -> dict[str, Any]:
    """The three windows of one tracking mode on a fresh cluster."""
    settings_env, secret = MODES[mode]
    env = {
        "REFRAME_MAX_CONCURRENCY": str(max(inflight, 40)),
        "REFRAME_SUBMIT_RATE_PER_S": "1000",
        "REFRAME_SUBMIT_BURST": "200",
        "REFRAME_TRACKER_MAX_JOBS": str(2 * max(inflight, 40)),
        **BUDGET_ENV,
        **settings_env,
    }
    cluster, url = cluster_with_clip(
        work,
        "headroom-" + mode.replace(" ", "-"),
        fal_webhook_secret=secret,
        workers=1,
        emulator_concurrency=max(inflight, 40),
        emulator_processing_time_s=PROCESSING_S,
        env=env,
    )
    out: dict[str, Any] = {"load": [load_average()]}
    try:
        control = cluster.emulator_control
        assert control is not None
        meter = Meter(cluster)
        out["redis_version"] = cast(dict[str, Any], meter.r.info("server"))["redis_version"]
        with Producer(cluster.settings()) as p:
            warm = p.enqueue_many([{"video_url": url, "aspect_ratio": "1:1"}] * 5)  # scripts, connections
            meter.wait_results(len(warm), timeout_s=120)
            time.sleep(2.0)  # let the warm-up's trailing work (acks, outbox) finish
            # 1. idle
            a = meter.snapshot()
            time.sleep(window_s)  # the idle window itself
            idle = meter.snapshot().minus(a)
            # 2. end to end: one enqueue per job at a steady rate (an API's arrivals)
            b = meter.snapshot()
            ids = []
            started = time.monotonic()
            for i in range(jobs):
                time.sleep(max(0.0, started + i / rate_per_s - time.monotonic()))  # the arrival schedule
                ids.append(p.enqueue({"video_url": url, "aspect_ratio": "9:16"}))
            meter.wait_results(len(warm) + jobs, timeout_s=600)
            e2e = meter.snapshot().minus(b)
            out["ok"] = sum(1 for j in p.get_many(ids) if j is not None and j.state is JobState.SUCCEEDED)
            out["load"].append(load_average())
            # 3. in flight: K jobs held at fal
            control.configure(processing_time_s=3600.0)
            held = p.enqueue_many([{"video_url": url, "aspect_ratio": "4:3"}] * inflight)
            wait_until(
                lambda: sum(1 for j in p.get_many(held) if j is not None and j.state.at_fal) == inflight,
                timeout_s=300,
                interval_s=0.5,
                what=f"{inflight} jobs at fal",
            )
            time.sleep(3.0)  # the submits' trailing work settles before the window
            d = meter.snapshot()
            time.sleep(window_s)  # the in-flight window itself
            held_delta = meter.snapshot().minus(d)
            out["load"].append(load_average())
        meter.r.close()
    finally:
        cluster.stop()
    out.update(mode=mode, jobs=jobs, inflight=inflight, idle=idle, e2e=e2e, held=held_delta)
    return out


def derive(run: dict[str, Any]) -> dict[str, Any]:
    """Per job, per in-flight job-second, per 60 s job; and the capacities."""
    idle: Delta = run["idle"]
    e2e: Delta = run["e2e"]
    held: Delta = run["held"]
    per_s_idle = idle.scaled(1 / idle.seconds)
    gross = e2e.scaled(1 / run["jobs"])
    net = {k: v - per_s_idle.get(k, 0.0) * e2e.seconds / run["jobs"] for k, v in gross.items()}
    held_per_s = held.scaled(1 / held.seconds)
    inflight = {k: max(0.0, v - per_s_idle.get(k, 0.0)) / run["inflight"] for k, v in held_per_s.items()}
    job60 = {k: net[k] + inflight.get(k, 0.0) * (JOB_S - PROCESSING_S) for k in net}
    worker_jobs_s = 1000 / job60["worker_cpu_ms"] / SAFETY
    # Redis also carries every worker process's idle background; at worker_jobs_s per process that
    # is idle/worker_jobs_s of Redis CPU per job on top of the job's own
    redis_per_job_ms = job60["redis_cpu_ms"] + per_s_idle["redis_cpu_ms"] / worker_jobs_s
    redis_jobs_s = 1000 / redis_per_job_ms / SAFETY
    account_jobs_s = ACCOUNT_SLOTS / JOB_S
    return {
        "idle_per_s": per_s_idle,
        "gross": gross,
        "net": net,
        "inflight": inflight,
        "job60": job60,
        "top": sorted(e2e.calls.items(), key=lambda kv: -kv[1])[:TOP_N],
        # what a job at fal costs, net of the idle background (per job-second)
        "top_held": sorted(
            (
                (
                    name,
                    (calls - idle.calls.get(name, 0) * held.seconds / idle.seconds)
                    / held.seconds
                    / run["inflight"],
                )
                for name, calls in held.calls.items()
            ),
            key=lambda kv: -kv[1],
        )[:TOP_N],
        "redis_per_job_ms": redis_per_job_ms,
        "redis_jobs_s": redis_jobs_s,
        "api_jobs_s": 1000 / job60["api_cpu_ms"] / SAFETY if job60.get("api_cpu_ms") else None,
        "worker_jobs_s": worker_jobs_s,
        "accounts": redis_jobs_s / account_jobs_s,
        "workers_per_account": account_jobs_s / worker_jobs_s,
    }


def rows_for(run: dict[str, Any]) -> list[Row]:
    d = derive(run)
    g, n, i, j = d["gross"], d["net"], d["inflight"], d["job60"]
    e2e: Delta = run["e2e"]
    api = "api_cpu_ms" in g
    rows: list[Row] = [
        (
            f"[b]{run['mode']}[/b]: {run['jobs']} jobs end to end ({run['ok']} ok) in {e2e.seconds:.0f} s, "
            f"{run['inflight']} held at fal; Redis {run['redis_version']}; load {' -> '.join(run['load'])}",
            "",
            "",
        ),
        (
            "  Redis commands per job, gross / net of idle",
            f"{g['commands']:.1f} / {n['commands']:.1f}",
            "",
        ),
        (
            "  top commands per job",
            ", ".join(f"{name} {calls / run['jobs']:.1f}" for name, calls in d["top"]),
            "",
        ),
        (
            "  Redis bytes in / out per job (net)",
            f"{n['bytes_in']:,.0f} / {n['bytes_out']:,.0f}",
            "",
        ),
        (
            "  Redis CPU per job, gross / net (usec inside commands, net)",
            f"{g['redis_cpu_ms']:.2f} / {n['redis_cpu_ms']:.2f} ms ({n['redis_usec']:.0f} us)",
            "",
        ),
        (
            "  worker CPU per job, gross / net" + (" (+ reframe serve, net)" if api else ""),
            f"{g['worker_cpu_ms']:.1f} / {n['worker_cpu_ms']:.1f} ms"
            + (f" (+ {n['api_cpu_ms']:.1f} ms)" if api else ""),
            "",
        ),
        (
            "  idle background of one worker process, per second",
            f"{d['idle_per_s']['commands']:.1f} commands, Redis {d['idle_per_s']['redis_cpu_ms']:.2f} ms, "
            f"worker {d['idle_per_s']['worker_cpu_ms']:.2f} ms",
            "",
        ),
        (
            "  per job-second at fal: commands / Redis CPU / worker CPU",
            f"{i['commands']:.3f} / {i['redis_cpu_ms']:.4f} ms / {i['worker_cpu_ms']:.3f} ms",
            "",
        ),
        (
            "  top commands per job-second at fal (net)",
            ", ".join(f"{name} {rate:.3f}" for name, rate in d["top_held"] if rate > 0),
            "",
        ),
        (
            f"  one {JOB_S:.0f} s job: commands / bytes in+out / Redis CPU / worker CPU",
            f"{j['commands']:.1f} / {(j['bytes_in'] + j['bytes_out']) / 1024:,.1f} KiB / "
            f"{j['redis_cpu_ms']:.2f} ms / {j['worker_cpu_ms']:.1f} ms"
            + (f" (+ api {j['api_cpu_ms']:.1f} ms)" if api else ""),
            "",
        ),
        (
            "  Redis CPU per job incl. the workers' idle share (idle per s / worker jobs/s)",
            f"{d['redis_per_job_ms']:.2f} ms",
            "",
        ),
        (
            f"  one Redis primary carries (1 core / that / {SAFETY:g})",
            f"{d['redis_jobs_s']:,.0f} jobs/s = {d['accounts']:,.0f} fal accounts "
            f"({ACCOUNT_SLOTS} slots / {JOB_S:.0f} s = {ACCOUNT_SLOTS / JOB_S:.3f} jobs/s each)",
            "",
        ),
        (
            f"  one worker process carries (1 core / worker CPU per job / {SAFETY:g})",
            f"{d['worker_jobs_s']:,.1f} jobs/s = {d['worker_jobs_s'] * JOB_S:,.0f} jobs at fal "
            f"= {d['workers_per_account']:.2f} worker processes per fal account",
            "",
        ),
    ]
    if d["api_jobs_s"] is not None:
        rows.append(
            (
                f"  one reframe serve process receives webhooks for (1 core / its CPU per job / {SAFETY:g})",
                f"{d['api_jobs_s']:,.1f} jobs/s",
                "",
            )
        )
    return rows


def bench_headroom(
    work: Path,
    modes: list[str] | None = None,
    *,
    jobs: int = 300,
    inflight: int = 200,
    window_s: float = 15.0,
    rate_per_s: float = 20.0,
) -> list[Row]:
    """The ``headroom`` scenario of ``python -m bench``: every mode's rows."""
    rows: list[Row] = []
    for mode in modes or list(MODES):
        run = measure_mode(work, mode, jobs=jobs, inflight=inflight, window_s=window_s, rate_per_s=rate_per_s)
        part = rows_for(run)
        table(f"Headroom, {mode}", part)
        rows += part
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.headroom", description=__doc__)
    parser.add_argument("modes", nargs="*", choices=[*MODES, []], help="default: all three")
    parser.add_argument("--jobs", type=int, default=300, help="M: jobs end to end (default 300)")
    parser.add_argument("--inflight", type=int, default=200, help="K: jobs held at fal (default 200)")
    parser.add_argument("--window-s", type=float, default=15.0, help="W: idle and in-flight windows")
    parser.add_argument("--rate", type=float, default=20.0, help="arrivals per second (default 20)")
    args = parser.parse_args(argv)
    # SIGTERM (e.g. `timeout`) must unwind like Ctrl-C so every started process is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    console.print(
        f"Reframe Cluster headroom on {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
        f"load average {load_average()} (1/5 min)"
    )
    with tempfile.TemporaryDirectory(prefix="reframe-headroom-") as tmp:
        bench_headroom(
            Path(tmp),
            args.modes or None,
            jobs=args.jobs,
            inflight=args.inflight,
            window_s=args.window_s,
            rate_per_s=args.rate,
        )
    console.print(f"load average at the end {load_average()} (1/5 min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
