"""Tenants and fair shares (issue #13): what one admission decision costs when 1,000 tenants have jobs
waiting, and how far the slots held per tenant stray from their weighted max-min share. Prints tables;
asserts nothing.

    python -m bench.tenants                 # every part (~9 minutes on 2 cores)
    python -m bench.tenants decision shares # the parts on Redis alone
    python -m bench tenants                 # the same through the bench runner

* **admission** (a real cluster: Redis, 2 workers, the emulator): N = 40, 1,000 tenants set with
  ``TenantRegistry.set`` (mixed weights, some with ``max_concurrent``), 2 to 5 jobs each, enqueued
  round-robin, 1.5 s emulator jobs. From the emulator's ledger: the time from each request's end to
  the submit that reuses its slot (the k-th completion frees the slot that the (N + k)-th submit
  fills), and per completion the time to the next submit at all, over the backlog. Server time of
  the scripts that hand slots on comes from Redis's SLOWLOG. **baseline**: the same with ~3,500
  jobs of 10 tenants, so what the 1,000 tenants add stands apart from what the cluster costs anyway.
* **decision** (Redis alone): the server time of one ``slot_release`` (which frees a slot and
  admits one waiter: the fair-share decision of worker/contracts/lua/slots_lib.lua, whose
  ``choose()`` visits every tenant with a waiting entry) against a pool holding N = 40 slots with
  10, 100, 1,000 and 5,000 tenants waiting, repeated like ``redis-cli --latency``; server time
  from SLOWLOG (threshold 50 µs, below one decision), round trip from the client.
* **shares** (Redis alone, simulated completions): 100 tenants with Zipf-like backlogs and mixed
  weights; ``SlotPool.release`` of a random holder 40 times a second; every 0.5 s the slots held
  per tenant (``use:<tenant>`` of ``{reframe}:fc:fair``) against the weighted max-min (water-filling)
  share of N among the tenants with work, held + waiting (capped at ``max_concurrent``).
"""

from __future__ import annotations

import bisect
import hashlib
import random
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import redis

from bench.clusters import BUDGET_ENV, cluster_with_clip
from bench.report import Parts, Row, load_average, mean_open, parts_main, pct, run_parts
from producer import JobState, Producer
from reframe.localproc import start_redis
from worker.contracts.keys import Keys
from worker.contracts.lua import INCLUDE_DIR, load_lua, script_path
from worker.contracts.tenants import TenantLimits, TenantRegistry
from worker.flow import slots as slots_module
from worker.flow.slots import SlotPool

KEYS = Keys("reframe")  # the settings' default prefix
N = 40
#: Weights the tenants draw from (seeded), and every how many tenants one has a concurrency cap.
WEIGHTS = (1.0, 1.0, 1.0, 2.0, 3.0, 5.0)
CAP_EVERY = 10


def _ms(values: list[float]) -> str:
    return " / ".join(f"{pct(values, q) * 1000:,.1f}" for q in (0.5, 0.95, 0.99)) + " ms"


def _pool(r: redis.Redis) -> SlotPool:
    return SlotPool(r, prefix=KEYS.root, capacity=N, lease_ttl_ms=3_600_000)


def _set_tenants(
    r: redis.Redis, names: list[str], rng: random.Random, *, caps: bool = True
) -> dict[str, TenantLimits]:
    """Mixed weights; every CAP_EVERY-th tenant may hold at most 1 to 3 slots (with ``caps``)."""
    registry = TenantRegistry(r, KEYS)
    limits = {}
    for i, name in enumerate(names):
        cap = rng.randint(1, 3) if caps and i % CAP_EVERY == CAP_EVERY - 1 else None
        limits[name] = TenantLimits(weight=rng.choice(WEIGHTS), max_concurrent=cap)
        registry.set(name, limits[name])
    return limits


def _sha(name: str) -> str:
    return hashlib.sha1(load_lua(script_path(slots_module.__file__, name)).encode()).hexdigest()


def _slowlog(r: redis.Redis, sha: str) -> list[float]:
    """Server seconds of each EVALSHA of ``sha`` in the SLOWLOG."""
    entries = r.slowlog_get(1_000_000)
    out = []
    for e in entries:
        cmd = e["command"]
        words = (cmd.decode(errors="replace") if isinstance(cmd, bytes) else str(cmd)).split()
        if len(words) > 1 and words[0].upper() == "EVALSHA" and words[1] == sha:
            out.append(e["duration"] / 1e6)
    return out


# ---------------------------------------------------------------------- 1. admission, a real cluster
#: Where the Lua scripts live (worker/contracts/lua/__init__.py): SLOWLOG names them by their SHA1.
LUA_DIRS = (INCLUDE_DIR, Path(slots_module.__file__).resolve().parent / "lua", INCLUDE_DIR.parents[1] / "lua")


def _script_names() -> dict[str, str]:
    """SHA1 of every script as Redis gets it -> its file name."""
    return {
        hashlib.sha1(load_lua(f).encode()).hexdigest(): f.stem
        for d in LUA_DIRS
        for f in sorted(d.glob("*.lua"))
        if not f.stem.endswith(("_lib", "_head")) and f.stem != "now"
    }


def _slow_scripts(r: redis.Redis) -> dict[str, list[float]]:
    """Script name -> server seconds of each of its calls in the SLOWLOG."""
    names = _script_names()
    out: dict[str, list[float]] = {}
    for e in r.slowlog_get(1_000_000):
        words = e["command"].decode(errors="replace").split()
        if len(words) > 1 and words[0].upper() == "EVALSHA":
            out.setdefault(names.get(words[1], words[1][:8]), []).append(e["duration"] / 1e6)
    return out


def _redis_cpu_s(r: redis.Redis) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _reuse_delays(submits: list[float], freed: list[float], until: float) -> list[tuple[float, float]]:
    """(freed at, delay) of each slot freed up to ``until``: the k-th freed slot is filled by the
    (first + k)-th submit, ``first`` = the submits before the first slot was freed (N under a backlog)."""
    first = bisect.bisect_left(submits, freed[0])
    return [
        (t, submits[first + k] - t) for k, t in enumerate(freed) if t <= until and first + k < len(submits)
    ]


def bench_admission(
    work: Path,
    *,
    tenants: int = 1000,
    per_tenant: tuple[int, int] = (2, 5),
    processing_s: float = 1.5,
    workers: int = 2,
    slow_ms: float = 1.0,
    caps: bool = True,
) -> list[Row]:
    """Release -> next submit at fal with ``tenants`` tenants holding waiting jobs (N = 40)."""
    env = {"REFRAME_MAX_CONCURRENCY": str(N), **BUDGET_ENV}
    cluster, url = cluster_with_clip(
        work,
        "admission",
        workers=workers,
        emulator_concurrency=N,
        emulator_processing_time_s=processing_s,
        env=env,
    )
    rng = random.Random(1300)
    crowd: list[tuple[float, int, int]] = []  # (time, tenants with a waiting entry, entries)
    try:
        r = redis.Redis.from_url(cluster.redis_url)
        names = [f"t{i:04d}" for i in range(tenants)]
        _set_tenants(r, names, rng, caps=caps)
        jobs_of = {t: rng.randint(*per_tenant) for t in names}
        r.config_set("slowlog-log-slower-than", round(slow_ms * 1000))
        r.config_set("slowlog-max-len", 100_000)
        r.slowlog_reset()
        cpu_before = _redis_cpu_s(r)
        ids: list[str] = []
        with Producer(cluster.settings()) as p:
            # round-robin: every tenant's first job, then every second job, ...
            for k in range(max(jobs_of.values())):
                for t in names:
                    if jobs_of[t] > k:
                        ids.append(p.enqueue({"video_url": url, "aspect_ratio": "9:16"}, tenant=t))
            deadline = time.monotonic() + 120 + 3 * len(ids) * processing_s / N
            while not all(j is not None and j.terminal for j in p.get_many(ids)):
                entries = cast(list[bytes], r.zrange(KEYS.wait_queue, 0, -1))
                crowd.append((time.time(), len({e.split(b"|", 1)[0] for e in entries}), len(entries)))
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(ids)} jobs not all terminal")
                time.sleep(1.0)  # the sampling period of the waiting tenants
            records = [j for j in p.get_many(ids) if j is not None]
        redis_cpu = _redis_cpu_s(r) - cpu_before
        slow = _slow_scripts(r)
        assert cluster.emulator_control is not None
        book = cluster.emulator_control.ledger()
    finally:
        cluster.stop()
    submits = sorted(s["t"] for s in book["submits"])
    done_at = {c["request_id"]: c["t"] for c in book["completions"]}
    completions = sorted(done_at.values())
    released = sorted(
        j.timestamps_ms["ts_SUCCEEDED"] / 1000 for j in records if j.state is JobState.SUCCEEDED
    )
    to_release = [
        j.timestamps_ms["ts_SUCCEEDED"] / 1000 - done_at[j.fal_request_id]
        for j in records
        if j.state is JobState.SUCCEEDED and j.fal_request_id in done_at
    ]
    # the backlog lasts while the waiting jobs could fill every slot (a capped tenant's tail cannot)
    backlog_end = max((t for t, _, entries in crowd if entries >= N), default=submits[-1])
    reuse = _reuse_delays(submits, completions, backlog_end)
    after_release = [d for _, d in _reuse_delays(submits, released, backlog_end)]
    nxt = [
        submits[i] - t
        for t in completions
        if t <= backlog_end and (i := bisect.bisect_left(submits, t)) < len(submits)
    ]
    busy = [t for t, n, _ in crowd if n >= 0.9 * tenants]
    busy_reuse = [d for t, d in reuse if busy and busy[0] <= t <= busy[-1]]
    duration = backlog_end - submits[0]
    throughput = sum(1 for t in completions if t <= backlog_end) / duration
    ok = sum(1 for j in records if j.state is JobState.SUCCEEDED)
    peak = max((n for _, n, _ in crowd), default=0)
    rows: list[Row] = [
        (
            f"{len(ids):,} jobs of {tenants:,} tenants ({per_tenant[0]}-{per_tenant[1]} each, round-robin), N = {N}, {processing_s:g}s "
            f"emulator jobs, {workers} workers; tenants waiting: up to {peak:,}, ≥ {0.9 * tenants:,.0f} for "
            f"{(busy[-1] - busy[0]) if busy else 0:.0f}s",
            f"{ok:,}/{len(ids):,} ok",
            "",
        ),
        (
            "fal completion -> the submit that reuses its slot, p50 / p95 / p99",
            _ms([d for _, d in reuse]),
            "p95 <= 250 ms",
        ),
        (f"  the same while ≥ {0.9 * tenants:,.0f} tenants wait", _ms(busy_reuse), "p95 <= 250 ms"),
        ("  of which completion -> slot released (tracker, result, finish script)", _ms(to_release), ""),
        (
            "  of which slot released -> the submit that reuses it (admission, dispatch, submit)",
            _ms(after_release),
            "",
        ),
        ("fal completion -> the next submit at fal, p50 / p95 / p99", _ms(nxt), ""),
        (
            "throughput under the backlog, slot utilisation",
            f"{throughput:.2f} jobs/s = {throughput / (N / processing_s):.1%} of N/processing, "
            f"{mean_open(book['open_timeline'], submits[0], backlog_end) / N:.1%}",
            "",
        ),
        (
            "Redis CPU over the run",
            f"{redis_cpu:.1f} s in {completions[-1] - submits[0]:.0f}s = "
            f"{redis_cpu / (completions[-1] - submits[0]):.0%} of a core",
            "",
        ),
    ]
    for name, times in sorted(slow.items(), key=lambda kv: -sum(kv[1]))[:4]:
        rows.append(
            (
                f"  script calls over {slow_ms:g} ms (SLOWLOG): {name}, p50 / p95 / p99",
                f"{len(times):,} calls, " + _ms(times),
                "",
            )
        )
    rows.append(("load average (1/5 min) at the end", load_average(), ""))
    return rows


# ---------------------------------------------------------------------- 2. one decision, Redis alone
def _decision_cost(r: redis.Redis, tenants: int, repeat: int, rng: random.Random) -> dict[str, Any]:
    r.flushall()
    names = [f"t{i:05d}" for i in range(tenants)]
    _set_tenants(r, names, rng)
    pool = _pool(r)
    seq = 0

    def job(tenant: str) -> str:
        nonlocal seq
        seq += 1
        return f"{tenant}-{seq}"

    holders: list[str] = []
    for i in range(N):  # N slots held by the first tenants
        j = job(names[i % tenants])
        pool.acquire(j, "normal", tenant=names[i % tenants])
        holders.append(j)
    for _round in range(3):  # then 3 waiting jobs per tenant, round-robin
        for name in names:
            pool.acquire(job(name), "normal", tenant=name)
    holders = [x.decode() for x in cast(list[bytes], r.zrange(pool.slots_key, 0, -1))]
    # every call is logged (the indexed decision takes tens of µs); Redis 7 also logs the commands
    # inside a script, which _slowlog drops by matching the script's sha
    r.config_set("slowlog-log-slower-than", 0)
    r.config_set("slowlog-max-len", 100_000)
    r.slowlog_reset()
    trips = []
    for _ in range(repeat):
        victim = holders.pop(rng.randrange(len(holders)))
        started = time.perf_counter()
        admitted = pool.release(victim)
        trips.append(time.perf_counter() - started)
        holders += admitted
        tenant = victim.rsplit("-", 1)[0]
        pool.acquire(job(tenant), "normal", tenant=tenant)  # keep every tenant's line as long
    server = _slowlog(r, _sha("slot_release"))
    r.config_set("slowlog-log-slower-than", 10_000)
    return {"server": server, "trip": trips, "waiting": r.zcard(pool.wait_key)}


def bench_decision(
    work: Path, *, repeat: int = 300, counts: tuple[int, ...] = (10, 100, 1000, 5000)
) -> list[Row]:
    """Server time of one slot_release (free + one fair decision) against T tenants waiting."""
    server = start_redis(work / "decision-redis")
    rng = random.Random(13)
    rows: list[Row] = []
    try:
        r = redis.Redis.from_url(server.url)
        for tenants in counts:
            got = _decision_cost(r, tenants, repeat, rng)
            rows.append(
                (
                    f"slot_release + one decision, {tenants:,} tenants waiting ({got['waiting']:,} entries): "
                    f"server p50 / p95 / p99 ({repeat} calls)",
                    _ms(got["server"]),
                    "",
                )
            )
            rows.append(("  round trip from the client, p50 / p95 / p99", _ms(got["trip"]), ""))
    finally:
        server.stop()
    rows.append(("load average (1/5 min) at the end", load_average(), ""))
    return rows


# ---------------------------------------------------------------------- 3. share error, Redis alone
def water_fill(n: float, demand: Mapping[str, float], weight: Mapping[str, float]) -> dict[str, float]:
    """The weighted max-min share of ``n`` slots: every tenant gets ``level * weight`` unless its
    demand is less, in which case it gets its demand and the rest is shared again."""
    share: dict[str, float] = {}
    active = {t for t, d in demand.items() if d > 0}
    left = n
    while active:
        level = left / sum(weight[t] for t in active)
        sated = {t for t in active if demand[t] <= level * weight[t]}
        if not sated:
            share.update({t: level * weight[t] for t in active})
            break
        for t in sated:
            share[t] = demand[t]
            left -= demand[t]
        active -= sated
    return share


def rounding_floor(share: Mapping[str, float]) -> float:
    """Sum |x - share| of the best whole-slot allocation x (largest remainders): the error no
    scheduler of whole slots can avoid."""
    base = {t: int(v) for t, v in share.items()}
    extra = round(sum(share.values())) - sum(base.values())
    for t in sorted(share, key=lambda t: share[t] - base[t], reverse=True)[:extra]:
        base[t] += 1
    return sum(abs(base[t] - v) for t, v in share.items())


def _sample(r: redis.Redis, pool: SlotPool) -> tuple[dict[str, int], dict[str, int]]:
    """Slots held and jobs waiting per tenant, read in one transaction."""
    pipe = r.pipeline(transaction=True)
    pipe.hgetall(pool.fair_key)
    pipe.zrange(pool.wait_key, 0, -1)
    fair, entries = pipe.execute()
    held = {k.decode()[4:]: int(v) for k, v in fair.items() if k.startswith(b"use:")}
    waiting: dict[str, int] = {}
    for e in entries:
        t = e.decode().split("|", 1)[0]
        waiting[t] = waiting.get(t, 0) + 1
    return held, waiting


def zipf_backlogs(tenants: int, top: int, rng: random.Random) -> list[int]:
    """``top / rank**1.2`` jobs for the tenant of each rank, at least 2 to 5: a few with hundreds,
    most with a handful."""
    return [max(rng.randint(2, 5), round(top / rank**1.2)) for rank in range(1, tenants + 1)]


def bench_shares(
    work: Path, *, tenants: int = 100, top: int = 600, releases_per_s: float = 40.0, sample_s: float = 0.5
) -> list[Row]:
    """Share error over time under Zipf backlogs, with SlotPool.release of random holders."""
    server = start_redis(work / "shares-redis")
    rng = random.Random(1313)
    try:
        r = redis.Redis.from_url(server.url)
        names = [f"z{i:03d}" for i in range(tenants)]
        limits = _set_tenants(r, names, rng)
        weight = {t: limits[t].weight for t in names}
        backlog = dict(zip(names, zipf_backlogs(tenants, top, rng), strict=True))
        jobs = [f"{t}-{k}" for t in names for k in range(backlog[t])]
        rng.shuffle(jobs)  # every tenant arrives at once, its jobs spread over the arrival order
        pool = _pool(r)
        warm = [f"warmup-{i}" for i in range(N)]
        for j in warm:  # the slots are full when the backlog arrives: every slot it gets is a decision
            pool.acquire(j, "normal", tenant="warmup")
        for j in jobs:
            pool.acquire(j, "normal", tenant=j.rsplit("-", 1)[0])
        samples: list[dict[str, Any]] = []
        started = time.monotonic()
        next_sample = started
        k = 0
        while True:
            if k >= N and time.monotonic() >= next_sample:  # sampled once the warm-up jobs have all ended
                held, waiting = _sample(r, pool)
                if not waiting:
                    break
                samples.append(_share_sample(held, waiting, limits))
                next_sample += sample_s
            holders = cast(list[bytes], r.zrange(pool.slots_key, 0, -1))
            pool.release(warm[k] if k < N else rng.choice(holders).decode())
            k += 1
            time.sleep(max(0.0, started + k / releases_per_s - time.monotonic()))  # the completion clock
        elapsed = time.monotonic() - started
    finally:
        server.stop()

    def stats(key: str, fmt: Callable[[float], str]) -> str:
        values = [s[key] for s in samples]
        return " / ".join(fmt(v) for v in (sum(values) / len(values), pct(values, 0.95), max(values)))

    # while at least N tenants wait, each one's ideal is under one slot: compare time averages
    crowd = [s for s in samples if s["waiting"] >= N]
    avg_held = {t: sum(s["held"].get(t, 0) for s in crowd) / max(1, len(crowd)) for t in names}
    avg_ideal = {t: sum(s["ideal"].get(t, 0.0) for s in crowd) / max(1, len(crowd)) for t in names}
    by_weight = []
    for w in sorted(set(weight.values())):
        group = [t for t in names if weight[t] == w and limits[t].max_concurrent is None]
        held_w = sum(avg_held[t] for t in group) / len(group)
        ideal_w = sum(avg_ideal[t] for t in group) / len(group)
        by_weight.append(f"w{w:g}: {held_w:.2f} vs {ideal_w:.2f}")
    averaged = sum(abs(avg_held[t] - avg_ideal[t]) for t in names) / N
    return [
        (
            f"{tenants} tenants, backlogs {max(backlog.values())} … {min(backlog.values())} jobs "
            f"(total {len(jobs):,}), weights {'/'.join(f'{w:g}' for w in sorted(set(WEIGHTS)))}, every "
            f"{CAP_EVERY}th capped at 1-3; {releases_per_s:g} releases/s; {len(samples)} samples in {elapsed:.0f}s",
            "",
            "",
        ),
        ("share error sum|held - ideal| / N: mean / p95 / max", stats("error", lambda v: f"{v:.1%}"), ""),
        ("  the whole-slot rounding floor of the same samples", stats("floor", lambda v: f"{v:.1%}"), ""),
        (
            "largest per-tenant |held - ideal|: mean / p95 / max",
            stats("largest", lambda v: f"{v:.2f}") + " slots",
            "within one slot (README)",
        ),
        (
            f"while ≥ N = {N} tenants wait ({len(crowd)} samples): time-averaged error sum|avg held - avg ideal| / N",
            f"{averaged:.1%}",
            "",
        ),
        ("  slots held per uncapped tenant, time-averaged, vs ideal, by weight", "; ".join(by_weight), ""),
        ("load average (1/5 min) at the end", load_average(), ""),
    ]


def _share_sample(
    held: Mapping[str, int], waiting: Mapping[str, int], limits: Mapping[str, TenantLimits]
) -> dict[str, Any]:
    """One sample's ideal (water-filling over held + waiting, capped) and its errors."""
    demand = {}
    for t in set(held) | set(waiting):
        cap = limits[t].max_concurrent
        d = held.get(t, 0) + waiting.get(t, 0)
        demand[t] = float(d if cap is None else min(d, cap))
    ideal = water_fill(N, demand, {t: limits[t].weight for t in demand})
    errors = [abs(held.get(t, 0) - ideal[t]) for t in demand]
    return {
        "held": dict(held),
        "ideal": ideal,
        "waiting": len(waiting),
        "error": sum(errors) / N,
        "largest": max(errors),
        "floor": rounding_floor(ideal) / N,
    }


SCENARIOS: Parts = {
    "admission": (
        "Admission with 1,000 tenants waiting: a real cluster (Redis, 2 workers, the emulator)",
        bench_admission,
    ),
    "baseline": (
        "The same cluster and ~3,500 jobs from 10 tenants (no caps): what the scan adds",
        lambda work: bench_admission(work, tenants=10, per_tenant=(300, 400), caps=False),
    ),
    "decision": ("One admission decision in Lua vs tenants waiting (Redis alone)", bench_decision),
    "shares": (
        "Share error over time, 100 tenants, Zipf backlogs (Redis alone, simulated completions)",
        bench_shares,
    ),
}


def bench_tenants(work: Path) -> list[Row]:
    """The ``tenants`` scenario of ``python -m bench``: every part."""
    return run_parts(work, SCENARIOS)


def main(argv: list[str] | None = None) -> int:
    return parts_main("tenants", "Tenants and fair shares (issue #13)", SCENARIOS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
