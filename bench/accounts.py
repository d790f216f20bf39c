"""A pool of fal accounts (issue #15 item 3): what choosing the account costs the slot scripts.
Real redis-server; prints a table; asserts nothing.

    python -m bench accounts

Each row hands one slot on and takes one (``SlotPool.release`` then ``acquire``: two scripts, each
one fair decision plus the accounts' bookkeeping, ``worker/contracts/lua/accounts_lib.lua``) with 8
slots held and 200 jobs of 4 tenants waiting, for a pool of 1, 2 and 8 accounts of 8 slots in all,
and 2 accounts that both have a budget (every job then holds a budget reservation, which the slot
scripts read, check against the account's day and month and rewrite with the account). The time is
the client's per pair (one machine: Redis and the client share the cores).
"""

from __future__ import annotations

import time
from pathlib import Path

import redis

from bench.report import Row, pct
from reframe.localproc import start_redis
from worker.flow.slots import SlotPool

POOLS = (
    ("1 account (8)", "default:8"),
    ("2 accounts (3 + 5)", "a:3,b:5"),
    ("8 accounts (1 each)", ""),
    # caps far above what the bench reserves: the budget checks run, and never refuse
    ("2 accounts (3 + 5) with budgets", "a:3:1000000000000:-,b:5:-:1000000000000#1000"),
)
PAIRS = 2000


def _pairs(r: redis.Redis, spec: str) -> list[float]:
    r.flushall()
    pool = SlotPool(r, prefix="bench", capacity=8, lease_ttl_ms=600_000, accounts=spec)
    if "#" in spec:  # every job holds a reservation (micro|day|month|at_ms|tenant), as after the gate
        jobs = [f"h{i}" for i in range(8)] + [f"w{i}" for i in range(200)] + [f"n{i}" for i in range(PAIRS)]
        r.hset("bench:fc:budget:res", mapping={job: "1000|2026-01-01|2026-01|0|t" for job in jobs})
    held = [f"h{i}" for i in range(8)]
    for job in held:
        pool.acquire(job, "normal", tenant="t0")
    for i in range(200):
        pool.acquire(f"w{i}", "normal", tenant=f"t{i % 4}")
    took: list[float] = []
    for i in range(PAIRS):
        started = time.perf_counter()
        held.extend(pool.release(held.pop(0)))
        pool.acquire(f"n{i}", "normal", tenant=f"t{i % 4}")
        took.append(time.perf_counter() - started)
    return took


def bench_accounts(work: Path) -> list[Row]:
    """Slot hand-on + acquire per pool size (see the module docstring)."""
    server = start_redis(work / "accounts-redis")
    rows: list[Row] = []
    try:
        r = redis.Redis.from_url(server.url)
        for label, spec in POOLS:
            took = _pairs(r, spec or ",".join(f"x{i}:1" for i in range(8)))
            rows.append(
                (
                    f"release + acquire, {label}",
                    f"p50 {pct(took, 0.5) * 1e3:.2f} ms, p95 {pct(took, 0.95) * 1e3:.2f} ms",
                    "no floor (compare the rows)",
                )
            )
        r.close()
    finally:
        server.stop()
    return rows
