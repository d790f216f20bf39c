"""SlotPool against a real redis-server: capacity, idempotency, priority/FIFO, reservation, leases."""

from __future__ import annotations

import collections
import queue
import random
import threading
from collections.abc import Callable, Iterator

import pytest
import redis

from reframe.localproc import wait_until
from worker.flow import SlotPool, SlotStatus

# an exception inside a worker thread must fail the test, not just warn
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")

PREFIX = "t"


@pytest.fixture(params=[True, False], ids=["decoded", "bytes"])
def r(redis_url: str, request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    """A client with and without decode_responses: the pool must handle both."""
    client = redis.Redis.from_url(redis_url, decode_responses=request.param)
    yield client
    client.close()


def pool(r: redis.Redis, capacity: int, reserved_high: int = 0, lease_ttl_ms: int = 60_000) -> SlotPool:
    return SlotPool(
        r, prefix=PREFIX, capacity=capacity, reserved_high=reserved_high, lease_ttl_ms=lease_ttl_ms
    )


def test_acquire_is_idempotent_and_refreshes_the_lease(r: redis.Redis) -> None:
    p = pool(r, 1)
    assert p.acquire("a", "normal").acquired
    first = r.zscore(f"{PREFIX}:slots", "a")
    again = p.acquire("a", "normal")
    assert again.acquired and again.ahead == 0
    assert p.in_use() == 1
    assert r.zscore(f"{PREFIX}:slots", "a") >= first
    # a waiting job asking again is not queued twice
    assert p.acquire("b", "normal").status is SlotStatus.WAITING
    assert p.acquire("b", "normal").status is SlotStatus.WAITING
    assert p.waiting_depths() == {"high": 0, "normal": 1, "low": 0}
    assert r.scard(f"{PREFIX}:fc:waiting") == 1


def test_release_admits_by_priority_then_fifo(r: redis.Redis) -> None:
    p = pool(r, 1)
    assert p.acquire("x", "normal").acquired
    arrivals = [
        ("n1", "normal"),
        ("l1", "low"),
        ("n2", "normal"),
        ("h1", "high"),
        ("l2", "low"),
        ("h2", "high"),
    ]
    for job, prio in arrivals:
        assert p.acquire(job, prio).status is SlotStatus.WAITING
    order = []
    holder = "x"
    for _ in arrivals:
        admitted = p.release(holder)
        assert len(admitted) == 1
        holder = admitted[0]
        order.append(holder)
    assert order == ["h1", "h2", "n1", "n2", "l1", "l2"]
    assert p.release(holder) == []
    assert p.in_use() == 0
    assert p.waiting_depths() == {"high": 0, "normal": 0, "low": 0}


def test_waiting_position_counts_higher_priorities_ahead(r: redis.Redis) -> None:
    p = pool(r, 1)
    p.acquire("x", "low")
    assert p.acquire("l1", "low").ahead == 0
    assert p.acquire("n1", "normal").ahead == 0
    assert p.acquire("l2", "low").ahead == 2  # n1 and l1 go first
    assert p.acquire("h1", "high").ahead == 0
    assert p.acquire("l1", "low").ahead == 2  # asking again: h1 and n1 now ahead


def test_free_slot_is_not_taken_past_an_equal_priority_waiter(r: redis.Redis) -> None:
    p = pool(r, 1)
    p.acquire("x", "normal")
    p.acquire("w", "normal")
    # a slot frees without the admission pass (e.g. a crash between the two): the newcomer must not
    # jump the queue; the waiter at the head can take it when it asks again
    r.zrem(f"{PREFIX}:slots", "x")
    assert p.acquire("late", "normal").status is SlotStatus.WAITING
    assert p.acquire("w", "normal").acquired
    assert p.waiting_depths()["normal"] == 1
    assert p.release("w") == ["late"]


def test_admit_fills_new_capacity_in_order(r: redis.Redis) -> None:
    small = pool(r, 2)
    for job in ("a", "b"):
        assert small.acquire(job, "normal").acquired
    for job in ("c", "d", "e"):
        small.acquire(job, "low")
    assert small.admit() == []
    assert pool(r, 4).admit() == ["c", "d"]
    assert small.waiting_depths()["low"] == 1


def test_reserved_high_slots_only_serve_high(r: redis.Redis) -> None:
    p = pool(r, 3, reserved_high=1)
    assert p.acquire("n1", "normal").acquired
    assert p.acquire("l1", "low").acquired
    assert not p.acquire("n2", "normal").acquired  # the third slot is kept for high
    assert not p.acquire("l2", "low").acquired
    assert p.acquire("h1", "high").acquired
    assert p.in_use() == 3
    assert not p.acquire("h2", "high").acquired
    assert p.release("n1") == ["h2"]  # high first
    assert p.release("h1") == []  # 2 in use: normal/low may not take the reserved slot
    assert p.release("l1") == ["n2"]
    assert p.holds("h2") and p.holds("n2") and p.in_use() == 2


def test_expired_leases_still_count_until_released(r: redis.Redis) -> None:
    p = pool(r, 1, lease_ttl_ms=50)
    assert p.acquire("a", "normal").acquired
    wait_until(lambda: p.expired() == ["a"], timeout_s=3, what="lease expiry")
    assert p.in_use() == 1 and p.holds("a")
    assert not p.acquire("b", "normal").acquired  # the fal request may still be running
    assert p.renew(["a", "ghost"], ttl_ms=60_000) == 1  # fal said "running"
    assert p.expired() == []
    assert not p.holds("ghost")  # renew never creates a slot
    assert p.release("a") == ["b"]
    assert p.renew(["a"]) == 0


def test_withdraw_removes_a_waiter(r: redis.Redis) -> None:
    p = pool(r, 1)
    p.acquire("x", "normal")
    for job in ("a", "b", "c"):
        p.acquire(job, "normal")
    assert p.withdraw("a") is True
    assert p.withdraw("a") is False
    assert p.waiting_depths()["normal"] == 2
    # an id dropped from the waiting set some other way is skipped at admission
    r.srem(f"{PREFIX}:fc:waiting", "b")
    assert p.release("x") == ["c"]
    assert p.waiting_depths()["normal"] == 0
    # release of a waiting (never admitted) job also unqueues it
    p.acquire("d", "normal")
    p.release("d")
    assert r.scard(f"{PREFIX}:fc:waiting") == 0


def test_rejects_bad_configuration(r: redis.Redis) -> None:
    with pytest.raises(ValueError):
        pool(r, 0)
    with pytest.raises(ValueError):
        pool(r, 2, reserved_high=2)
    with pytest.raises(ValueError):
        pool(r, 2).acquire("a", "urgent")


def run_threads(target: Callable[[int], None], n: int) -> None:
    threads = [threading.Thread(target=target, args=(t,)) for t in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def test_capacity_never_exceeded_with_20_threads(rclient: redis.Redis) -> None:
    capacity, reserved = 4, 1
    p = pool(rclient, capacity, reserved_high=reserved)
    prios = {}
    holders: queue.Queue[str] = queue.Queue()
    admitted_once: list[str] = []
    lock = threading.Lock()
    violations: list[str] = []
    stop = threading.Event()

    def take(job: str) -> None:
        with lock:
            admitted_once.append(job)
        holders.put(job)

    def worker(t: int) -> None:
        rng = random.Random(t)
        for i in range(60):
            job = f"{t}-{i}"
            prios[job] = rng.choice(["high", "normal", "low"])
            if p.acquire(job, prios[job]).acquired:
                take(job)
            try:
                victim = holders.get_nowait()
            except queue.Empty:
                continue
            for admitted in p.release(victim):
                take(admitted)

    def monitor() -> None:
        while not stop.is_set():
            held = rclient.zrange(f"{PREFIX}:slots", 0, -1)
            if len(held) > capacity:
                violations.append(f"{len(held)} slots in use")
            if sum(prios.get(j) != "high" for j in held) > capacity - reserved:
                violations.append(f"reserved slots taken: {held}")

    def drain() -> None:
        # releasing every holder admits the rest of the queue
        while not holders.empty():
            for admitted in p.release(holders.get_nowait()):
                take(admitted)

    watcher = threading.Thread(target=monitor)
    watcher.start()
    run_threads(worker, 20)
    drain()
    stop.set()
    watcher.join()
    assert violations == []
    assert sorted(admitted_once) == sorted(prios)  # every job admitted exactly once, none lost
    assert p.in_use() == 0
    assert p.waiting_depths() == {"high": 0, "normal": 0, "low": 0}
    assert rclient.scard(f"{PREFIX}:fc:waiting") == 0


# ---------------------------------------------------------------------- fair shares (issue #13)
def _fill(p: SlotPool, tenant: str, n: int, priority: str = "normal") -> list[str]:
    ids = [f"{tenant}{i}" for i in range(n)]
    for job in ids:
        p.acquire(job, priority, tenant=tenant)
    return ids


def test_a_freed_slot_goes_to_the_tenant_furthest_below_its_share(r: redis.Redis) -> None:
    """A floods first, B comes later: every freed slot goes to B until both hold half."""
    p = pool(r, 4)
    a = _fill(p, "a", 10)
    assert p.in_use_by_tenant() == {"a": 4}  # a lone tenant uses all N
    b = _fill(p, "b", 3)
    assert p.in_use_by_tenant() == {"a": 4}
    assert p.release(a[0]) == ["b0"]  # B is furthest below its share (0/1 < 3/1)
    assert p.release(a[1]) == ["b1"]
    assert p.in_use_by_tenant() == {"a": 2, "b": 2}
    assert p.release(a[2]) == ["a4"]  # tie at 1 each: the older entry
    assert p.release("b0") == ["b2"]
    assert p.release("b1") == ["a5"]  # B has nothing waiting: work-conserving
    assert b == ["b0", "b1", "b2"]


def test_weights_3_to_1_split_the_slots_3_to_1(r: redis.Redis) -> None:
    r.hset(f"{PREFIX}:tenant:params", mapping={"w:heavy": "3", "w:light": "1"})
    p = pool(r, 8)
    heavy = _fill(p, "heavy", 150)
    light = _fill(p, "light", 150)
    # release heavy's slots one by one: each goes to the tenant lowest in use/weight
    for job in heavy[:8]:
        p.release(job)
    assert p.in_use_by_tenant() == {"heavy": 6, "light": 2}
    admitted = collections.Counter()
    holders = [j for j in heavy[8:] + light if p.holds(j)]
    for _ in range(100):  # steady turnover while both wait: the oldest holder ends, the rule refills
        done = holders.pop(0)
        for job in p.release(done):
            admitted[job.rstrip("0123456789")] += 1
            holders.append(job)
        share = p.in_use_by_tenant()
        assert abs(share.get("heavy", 0) - 6) <= 1 and abs(share.get("light", 0) - 2) <= 1, share
    # 3:1 over the window, within one turnover of the 8 slots at its edges
    assert sum(admitted.values()) == 100 and abs(admitted["heavy"] - 3 * admitted["light"]) <= 8, admitted


def test_a_tenant_at_its_max_concurrent_waits_and_leaves_the_slot_to_others(r: redis.Redis) -> None:
    r.hset(f"{PREFIX}:tenant:params", "max:capped", "2")
    p = pool(r, 4)
    _fill(p, "capped", 5)
    assert p.in_use_by_tenant() == {"capped": 2}  # two slots stay free rather than break its cap
    assert p.acquire("other0", "low", tenant="other").acquired
    # what `reframe tenants set` does (worker/contracts/tenants.py): the cap goes, the ready index is
    # rebuilt at the next decision
    r.hdel(f"{PREFIX}:tenant:params", "max:capped")
    r.hdel(f"{PREFIX}:fc:fair", "ix")
    assert p.admit() == ["capped2"]  # a raised cap is used at the next admission


def test_reserved_high_slots_serve_only_high_whatever_the_share(r: redis.Redis) -> None:
    p = pool(r, 3, reserved_high=1)
    _fill(p, "a", 2)
    assert p.acquire("b0", "normal", tenant="b").status is SlotStatus.WAITING  # the last slot is high's
    assert p.acquire("a9", "high", tenant="a").acquired
    assert p.in_use_by_tenant() == {"a": 3}


def test_weights_act_even_when_more_tenants_wait_than_there_are_slots(r: redis.Redis) -> None:
    """20 tenants for 4 slots: every idle tenant ties at zero slots held, and the virtual time
    (1/weight per admission) breaks the tie, so a weight-5 tenant is admitted ~5x as often."""
    tenants = [f"t{i:02d}" for i in range(20)]
    r.hset(f"{PREFIX}:tenant:params", mapping={"w:t00": "5", "w:t01": "5"})
    p = pool(r, 4)
    for t in tenants:
        _fill(p, t, 120)
    admitted: collections.Counter[str] = collections.Counter()
    holders = [j for t in tenants for j in (f"{t}{i}" for i in range(120)) if p.holds(j)]
    for _ in range(400):
        for job in p.release(holders.pop(0)):
            admitted[job[:3]] += 1
            holders.append(job)
    heavy = (admitted["t00"] + admitted["t01"]) / 2
    light = sum(admitted[t] for t in tenants[2:]) / 18
    assert 4 <= heavy / light <= 6, admitted  # weight 5 vs 1
    assert float(r.hget(f"{PREFIX}:fc:fair", "vnow") or 0) > 0


def test_an_idle_tenant_forgets_its_virtual_time(r: redis.Redis) -> None:
    p = pool(r, 1)
    assert p.acquire("a0", "normal", tenant="a").acquired
    assert p.acquire("b0", "normal", tenant="b").status is SlotStatus.WAITING
    assert p.release("a0") == ["b0"]
    # a holds nothing and waits for nothing
    assert r.hget(f"{PREFIX}:fc:fair", "vt:a") is None and r.hget(f"{PREFIX}:fc:fair", "vt:b") is not None
