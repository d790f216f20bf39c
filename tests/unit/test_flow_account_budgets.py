"""The optional budget of each fal account, against a real redis-server: the slot scripts choose only
an account whose day and month `spent + reserved` leave room (worker/contracts/lua/accounts_lib.lua),
settlement moves the account's money with the cluster's (budget_lib), a refund frees room, and no
sample of an account's counters ever shows `spent + reserved > cap`."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator

import pytest
import redis

from config.accounts import parse_accounts
from worker.flow.accounts import AccountPool, AccountStatus, accounts_arg
from worker.flow.breaker import CircuitBreaker
from worker.flow.budget import Budget, max_job_micro, utc_periods
from worker.flow.rate import SubmitRateLimiter
from worker.flow.slots import SlotPool, SlotStatus

# an exception inside a worker thread must fail the test, not just warn
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")

PREFIX = "t"
PRICE_USD = 0.1  # 100_000 micro per second
E = 1_000_000  # the largest job: a 10 s video at $0.10/s


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def make(
    r: redis.Redis,
    specs: list[tuple[str, int, float | None]],
    budgets: dict[str, tuple[float | None, float | None]],
) -> tuple[SlotPool, AccountPool, Budget]:
    slots = SlotPool(
        r,
        prefix=PREFIX,
        capacity=sum(cap for _, cap, _ in specs),
        lease_ttl_ms=60_000,
        accounts=accounts_arg(specs, budgets, E),
    )

    def breaker(at: str) -> CircuitBreaker:
        return CircuitBreaker(
            r,
            prefix=at,
            window_s=10,
            min_calls=1,
            failure_ratio=0.5,
            open_base_s=1,
            open_cap_s=2,
            half_open_probes=1,
            close_after_successes=1,
        )

    def rate(at: str, per_s: float | None) -> SubmitRateLimiter:
        return SubmitRateLimiter(r, prefix=at, rate_per_s=per_s or 50.0, burst=5)

    pool = AccountPool.build(r, prefix=PREFIX, slots=slots, specs=specs, breaker=breaker, rate=rate)
    money = Budget(r, prefix=PREFIX, daily_cap_usd=1000, monthly_cap_usd=10_000, price_per_s_usd=PRICE_USD)
    return slots, pool, money


def status(pool: AccountPool) -> dict[str, AccountStatus]:
    return {s.id: s for s in pool.status()}


def within_caps(s: AccountStatus) -> bool:
    day_ok = s.day_cap_micro is None or s.day_spent_micro + s.reserved_micro <= s.day_cap_micro
    month_ok = s.month_cap_micro is None or s.month_spent_micro + s.reserved_micro <= s.month_cap_micro
    return day_ok and month_ok


def start(slots: SlotPool, money: Budget, job: str, micro: int = E) -> SlotStatus:
    """What the gate does: reserve the estimate, then take a slot (or wait)."""
    assert money.reserve(job, micro, tenant="t").ok
    return slots.acquire(job, "normal", tenant="t").status


def test_the_spec_carries_caps_in_micro_dollars_and_the_largest_job() -> None:
    specs: list[tuple[str, int, float | None]] = [("a", 3, None), ("b", 5, 2.0)]
    assert accounts_arg(specs) == "a:3,b:5"
    assert accounts_arg(specs, {"a": (2.5, None)}, 7) == "a:3:2500000:-,b:5#7"
    assert accounts_arg(specs, {"b": (None, None)}) == "a:3,b:5"  # no cap at all: no budget
    # the largest reservation: max duration + margin, in whole billing units, at the price rounded up
    assert max_job_micro(max_duration_s=9.5, margin_s=0.25, price_per_s_usd=0.1, billing_unit_s=1) == E


def test_an_account_with_a_budget_for_k_jobs_runs_exactly_k_and_the_rest_go_elsewhere(r: redis.Redis) -> None:
    # a has slots for 10 but money for 3 of the largest jobs; b has no budget and 2 slots
    slots, pool, money = make(r, [("a", 10, None), ("b", 2, None)], {"a": (3 * E / 1e6, None)})
    got = [start(slots, money, f"j{i}") for i in range(8)]
    assert got.count(SlotStatus.ACQUIRED) == 5 and got.count(SlotStatus.WAITING) == 3
    on = {a: [f"j{i}" for i in range(8) if slots.account_of(f"j{i}") == a] for a in ("a", "b")}
    assert len(on["a"]) == 3 and len(on["b"]) == 2
    s = status(pool)
    assert (s["a"].reserved_micro, s["a"].budget_full, s["a"].usable) == (3 * E, True, False)
    assert s["b"].usable and not s["b"].budget_full
    # each bound reservation names its account; the waiting ones name none yet
    res = money.reservations()
    assert {j: res[j].account for j in on["a"] + on["b"]} == {
        **dict.fromkeys(on["a"], "a"),
        **dict.fromkeys(on["b"], "b"),
    }
    assert {res[f"j{i}"].account for i in range(8) if slots.account_of(f"j{i}") == ""} == {""}
    # a's full budget is not free room: a job on b ending admits a waiter onto b, not a
    money.settle(on["b"][0], E)
    assert [slots.account_of(j) for j in slots.release(on["b"][0])] == ["b"]
    assert all(within_caps(x) for x in pool.status())


def test_settlement_moves_the_accounts_money_with_the_clusters_and_a_refund_frees_room(
    r: redis.Redis,
) -> None:
    slots, pool, money = make(r, [("a", 10, None), ("b", 1, None)], {"a": (3 * E / 1e6, 30 * E / 1e6)})
    for i in range(6):
        start(slots, money, f"j{i}")
    on_a = [f"j{i}" for i in range(6) if slots.account_of(f"j{i}") == "a"]
    waiting = [f"j{i}" for i in range(6) if slots.account_of(f"j{i}") == ""]
    assert len(on_a) == 3 and len(waiting) == 2
    # a success billed in full: the account's reserved becomes spent, as the cluster's does
    before = money.snapshot()
    money.settle(on_a[0], E)
    after, s = money.snapshot(), status(pool)["a"]
    assert (after.day_spent - before.day_spent, before.day_reserved - after.day_reserved) == (E, E)
    assert (s.day_spent_micro, s.month_spent_micro, s.reserved_micro) == (E, E, 2 * E)
    assert slots.release(on_a[0]) == []  # E spent + 2E reserved: no room for a largest job
    # a refund (billed half the estimate) frees half a job's room: not enough yet
    money.settle(on_a[1], E // 2)
    assert slots.release(on_a[1]) == []
    s = status(pool)["a"]
    assert (s.day_spent_micro, s.reserved_micro, s.budget_full) == (E + E // 2, E, True)
    # a release (fal never had it) charges nothing: 1.5E spent, nothing reserved, room for one
    money.release(on_a[2])
    admitted = slots.release(on_a[2])
    assert len(admitted) == 1 and slots.account_of(admitted[0]) == "a"
    s = status(pool)["a"]
    assert (s.day_spent_micro, s.reserved_micro) == (E + E // 2, E) and within_caps(s)
    # the account's spent is the cluster's share charged there: a second settle charges nothing
    assert money.settle(on_a[0], E) is False
    assert status(pool)["a"].day_spent_micro == E + E // 2


def test_an_account_skipped_for_its_budget_comes_back_when_its_period_rolls(r: redis.Redis) -> None:
    slots, pool, money = make(r, [("a", 2, None)], {"a": (1.5 * E / 1e6, None)})
    day, month = utc_periods(int(r.time()[0]))
    # spent of an earlier day (what a settlement yesterday left) does not count today
    r.hset(slots.fair_key, mapping={"abd:a": "2000-01-01", "abs:a:d:2000-01-01": 10 * E})
    assert start(slots, money, "x") is SlotStatus.ACQUIRED
    assert start(slots, money, "y") is SlotStatus.WAITING  # E reserved + E > 1.5E
    money.settle("x", E)
    fair = r.hgetall(slots.fair_key)
    # the newer day replaced the older one: one day field per account
    assert fair["abd:a"] == day and f"abs:a:d:{day}" in fair and "abs:a:d:2000-01-01" not in fair
    assert fair[f"abs:a:m:{month}"] == str(E)
    assert slots.release("x") == []  # spent E today: still no room for another E under 1.5E
    # a new day: what was spent today becomes an earlier day's, which no longer counts
    spent_today = r.hget(slots.fair_key, f"abs:a:d:{day}")
    r.hdel(slots.fair_key, f"abs:a:d:{day}")
    r.hset(slots.fair_key, mapping={"abd:a": "2000-01-02", "abs:a:d:2000-01-02": str(spent_today)})
    assert slots.admit() == ["y"]
    assert within_caps(status(pool)["a"])


def test_a_new_reservation_under_a_kept_slot_binds_to_its_account_or_gives_the_slot_back(
    r: redis.Redis,
) -> None:
    # the ambiguous-resubmit path: the slot is kept, the old reservation settled at its estimate,
    # then the next run reserves again and acquires the slot it holds
    slots, pool, money = make(r, [("a", 2, None), ("b", 1, None)], {"a": (2.5 * E / 1e6, None)})
    assert start(slots, money, "x") is SlotStatus.ACQUIRED and slots.account_of("x") == "a"
    money.settle("x", E)
    assert start(slots, money, "x") is SlotStatus.ACQUIRED and slots.account_of("x") == "a"
    assert money.reservation("x").account == "a"  # type: ignore[union-attr]
    assert status(pool)["a"].reserved_micro == E
    money.settle("x", E)  # a second resubmit: 2E spent, another E does not fit under 2.5E
    assert start(slots, money, "x") is SlotStatus.ACQUIRED
    assert slots.account_of("x") == "b"  # the slot on a went back; b has no budget
    assert status(pool)["a"].reserved_micro == 0 and within_caps(status(pool)["a"])


def test_under_concurrent_jobs_no_account_sample_shows_spent_plus_reserved_over_its_cap(
    r: redis.Redis,
) -> None:
    budgets: dict[str, tuple[float | None, float | None]] = {
        "a": (6 * E / 1e6, 8 * E / 1e6),
        "b": (None, 5 * E / 1e6),
    }
    slots, pool, money = make(r, [("a", 3, None), ("b", 3, None), ("c", 1, None)], budgets)
    samples: list[list[AccountStatus]] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def sampler() -> None:
        while not done.is_set():
            samples.append(pool.status())

    def run(seed: int) -> None:
        rng = random.Random(seed)
        held: list[str] = []
        try:
            for n in range(40):
                job = f"w{seed}-{n}"
                micro = rng.choice([E, E // 2, E // 3])
                if start(slots, money, job, micro) is SlotStatus.ACQUIRED:
                    held.append(job)
                while held and rng.random() < 0.6:
                    done_job = held.pop(rng.randrange(len(held)))
                    res = money.reservation(done_job)
                    assert res is not None
                    money.settle(done_job, rng.randint(0, res.micro))  # billed at most the estimate
                    for admitted in slots.release(done_job):
                        held.append(admitted)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    watcher = threading.Thread(target=sampler)
    watcher.start()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    assert not errors, errors
    assert len(samples) > 10
    bad = [s for snap in samples for s in snap if not within_caps(s)]
    assert not bad, bad[:3]
    # the budgets did bind: a and b were each full at some point
    assert any(s.id == "a" and s.budget_full for snap in samples for s in snap)
    assert any(s.id == "b" and s.budget_full for snap in samples for s in snap)
    # the accounts' reserved are exactly the bound reservations, and each account's spent is its
    # share of the cluster's (c has no budget but keeps the books too)
    final = status(pool)
    bound: dict[str, int] = {}
    for res in money.reservations().values():
        if res.account:
            bound[res.account] = bound.get(res.account, 0) + res.micro
    assert {k: v.reserved_micro for k, v in final.items() if v.reserved_micro} == bound
    assert sum(v.day_spent_micro for v in final.values()) == money.snapshot().day_spent


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a:3", [("a", 3, None, None, None)]),
        ("a:3:2.5:10", [("a", 3, 2.5, 10.0, None)]),
        ("a:3:-:10:200, b:1::-:5", [("a", 3, None, 10.0, 200.0), ("b", 1, None, None, 5.0)]),
    ],
)
def test_accounts_declare_optional_daily_and_monthly_budgets(
    text: str, expected: list[tuple[str, int, float | None, float | None, float | None]]
) -> None:
    assert [(a.id, a.cap, a.rate_per_s, a.daily_usd, a.monthly_usd) for a in parse_accounts(text)] == expected


@pytest.mark.parametrize("bad", ["a:3:-:x", "a:3:-:-1", "a:3:-:5:nan", "a:3:1:2:3:4"])
def test_a_bad_account_budget_is_refused_naming_the_entry(bad: str) -> None:
    with pytest.raises(ValueError, match=f"entry '{bad}'"):
        parse_accounts(bad)
