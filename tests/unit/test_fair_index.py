"""The slot pool's indexed fair-share decision against a plain model of the rule.

The scripts keep an index of ready tenants (worker/contracts/lua/slots_lib.lua) so a decision does
not scan every waiting tenant. This drives the real scripts on a real Redis with random acquires,
releases, withdrawals and limit changes, and checks every answer against a straightforward Python
model that scans all tenants the way the rule is stated: lowest slots/weight, then virtual time,
then priority, then FIFO; reserved-high slots serve only high; a tenant at its cap waits.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import redis

from worker.flow import SlotPool

PREFIX = "fx"
PRIORITY = {"high": 1, "normal": 2, "low": 3}
# dyadic weights: slots/weight and virtual times are exact in both Lua and Python, so a tie in one
# is a tie in the other
WEIGHTS = (0.5, 1.0, 2.0, 4.0)


@dataclass
class Model:
    """The rule, by scanning (what the index must agree with)."""

    capacity: int
    reserved: int
    slots: set[str] = field(default_factory=set)
    own: dict[str, str] = field(default_factory=dict)
    use: dict[str, int] = field(default_factory=dict)
    vt: dict[str, float] = field(default_factory=dict)
    vnow: float = 0.0
    seq: int = 0
    queue: dict[str, tuple[str, int, int]] = field(default_factory=dict)  # job -> (tenant, p, seq)
    weight: dict[str, float] = field(default_factory=dict)
    cap: dict[str, int] = field(default_factory=dict)

    def _waiting(self, t: str) -> bool:
        return any(e[0] == t for e in self.queue.values())

    def _forget_if_idle(self, t: str) -> None:
        if self.use.get(t, 0) <= 0 and not self._waiting(t):
            self.vt.pop(t, None)

    def _enqueue(self, job: str, t: str, p: int) -> None:
        if job in self.queue:
            return
        if self.use.get(t, 0) <= 0 and not self._waiting(t) and self.vt.get(t, 0.0) < self.vnow:
            self.vt[t] = self.vnow
        self.seq += 1
        self.queue[job] = (t, p, self.seq)

    def _take(self, job: str, t: str) -> None:
        self.slots.add(job)
        self.own[job] = t
        self.use[t] = self.use.get(t, 0) + 1
        self.vnow = max(self.vnow, self.vt.get(t, 0.0))
        self.vt[t] = self.vt.get(t, 0.0) + 1 / self.weight.get(t, 1.0)

    def _drop(self, job: str) -> None:
        if job not in self.slots:
            return
        self.slots.remove(job)
        t = self.own.pop(job)
        self.use[t] -= 1
        if self.use[t] <= 0:
            del self.use[t]
        self._forget_if_idle(t)

    def unqueue(self, job: str) -> bool:
        entry = self.queue.pop(job, None)
        if entry:
            self._forget_if_idle(entry[0])
        return entry is not None

    def _choose(self) -> str | None:
        if len(self.slots) >= self.capacity:
            return None
        only_high = len(self.slots) >= self.capacity - self.reserved
        heads: dict[str, tuple[int, int, str]] = {}
        for job, (t, p, seq) in self.queue.items():
            if t not in heads or (p, seq) < heads[t][:2]:
                heads[t] = (p, seq, job)
        best: tuple[tuple[float, float, int, int], str] | None = None
        for t, (p, seq, job) in heads.items():
            use = self.use.get(t, 0)
            if (t in self.cap and use >= self.cap[t]) or (only_high and p != 1):
                continue
            key = (use / self.weight.get(t, 1.0), self.vt.get(t, 0.0), p, seq)
            if best is None or key < best[0]:
                best = (key, job)
        return best[1] if best else None

    def _admit_all(self) -> list[str]:
        admitted = []
        while (job := self._choose()) is not None:
            if job not in self.slots:
                self._take(job, self.queue[job][0])
                admitted.append(job)
            self.unqueue(job)
        return admitted

    def acquire(self, job: str, p: int, t: str) -> bool:
        if job in self.slots:
            return True
        self._enqueue(job, t, p)
        if self._choose() == job:
            self._take(job, t)
            self.unqueue(job)
            return True
        return False

    def release(self, job: str) -> list[str]:
        self._drop(job)
        self.unqueue(job)
        return self._admit_all()


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def _set_limits(r: redis.Redis, model: Model, tenant: str, weight: float, cap: int | None) -> None:
    """What `reframe tenants set` writes for the slot scripts (worker/contracts/tenants.py)."""
    pipe = r.pipeline(transaction=True)
    pipe.hset(f"{PREFIX}:tenant:params", f"w:{tenant}", repr(weight))
    if cap is None:
        pipe.hdel(f"{PREFIX}:tenant:params", f"max:{tenant}")
        model.cap.pop(tenant, None)
    else:
        pipe.hset(f"{PREFIX}:tenant:params", f"max:{tenant}", str(cap))
        model.cap[tenant] = cap
    pipe.hdel(f"{PREFIX}:fc:fair", "ix")
    pipe.execute()
    model.weight[tenant] = weight


@pytest.mark.parametrize("seed", range(6))
def test_every_decision_matches_the_scanning_rule(r: redis.Redis, seed: int) -> None:
    rng = random.Random(seed)
    capacity, reserved = rng.choice([(3, 0), (5, 1), (8, 2)])
    pool = SlotPool(r, prefix=PREFIX, capacity=capacity, reserved_high=reserved, lease_ttl_ms=600_000)
    model = Model(capacity=capacity, reserved=reserved)
    tenants = [f"t{i}" for i in range(rng.randint(3, 9))]
    for t in tenants:
        _set_limits(r, model, t, rng.choice(WEIGHTS), rng.choice([None, None, 1, 2]))
    counter = 0
    decisions = 0
    for _ in range(700):
        op = rng.random()
        if op < 0.5:
            counter += 1
            job, t, prio = f"j{counter}", rng.choice(tenants), rng.choice(list(PRIORITY))
            got = pool.acquire(job, prio, tenant=t).acquired
            assert got == model.acquire(job, PRIORITY[prio], t), (job, t, prio)
            decisions += 1
        elif op < 0.85 and model.slots:
            job = rng.choice(sorted(model.slots))
            assert pool.release(job) == model.release(job), job
            decisions += 1
        elif op < 0.95 and model.queue:
            job = rng.choice(sorted(model.queue))
            assert pool.withdraw(job) == model.unqueue(job)
        else:
            _set_limits(r, model, rng.choice(tenants), rng.choice(WEIGHTS), rng.choice([None, 1, 2, 3]))
            assert pool.admit() == model._admit_all()
        assert pool.in_use_by_tenant() == {t: n for t, n in model.use.items() if n > 0}
    # drain: every waiting job is admitted in the rule's order
    while model.slots:
        job = sorted(model.slots)[0]
        assert pool.release(job) == model.release(job)
    assert decisions > 500
    assert r.zcard(f"{PREFIX}:wait:q") == 0
    assert r.zcard(f"{PREFIX}:wait:q:ready") == 0 and r.zcard(f"{PREFIX}:wait:q:ready:high") == 0


def test_a_queue_written_before_the_index_existed_is_indexed_at_the_next_decision(r: redis.Redis) -> None:
    pool = SlotPool(r, prefix=PREFIX, capacity=2, reserved_high=0, lease_ttl_ms=600_000)
    assert pool.acquire("a1", "normal", tenant="a").acquired
    assert pool.acquire("a2", "normal", tenant="a").acquired
    for job, t in (("a3", "a"), ("b1", "b"), ("c1", "c")):
        assert not pool.acquire(job, "normal", tenant=t).acquired
    # an older release's state: the queue and counters, but no index
    r.delete(f"{PREFIX}:wait:q:ready", f"{PREFIX}:wait:q:ready:high")
    r.hdel(f"{PREFIX}:fc:fair", "ix", *(f"rk:{t}" for t in "abc"))
    assert pool.release("a1") == ["b1"]  # b and c hold nothing; b queued first
    assert pool.release("a2") == ["c1"]
    assert pool.release("b1") == ["a3"]
