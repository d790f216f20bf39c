"""Budget against a real redis-server: reserve/settle/release, caps, periods, races, invariant."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta

import pytest
import redis

from worker.contracts.lua import INCLUDE_DIR, load_lua
from worker.flow import Budget, BudgetScope, micro_to_usd, usd_to_micro
from worker.flow import budget as budget_mod
from worker.flow._redis import text

# an exception inside a worker thread must fail the test, not just warn
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")

PREFIX = "t"
E = 600_000  # a 10 s video at $0.06/s


@pytest.fixture(params=[True, False], ids=["decoded", "bytes"])
def r(redis_url: str, request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=request.param)
    yield client
    client.close()


def budget(r: redis.Redis, day_usd: float = 100.0, month_usd: float = 1000.0) -> Budget:
    return Budget(r, prefix=PREFIX, daily_cap_usd=day_usd, monthly_cap_usd=month_usd, price_per_s_usd=0.06)


def redis_today(r: redis.Redis) -> date:
    sec, _ = r.time()
    return datetime.fromtimestamp(int(sec), tz=UTC).date()


def test_estimate_rounds_up_to_whole_seconds(r: redis.Redis) -> None:
    b = budget(r)
    assert b.price_per_s_micro == 60_000
    assert b.estimate_micro(10) == E
    assert b.estimate_micro(10.01) == 11 * 60_000
    assert b.estimate_micro(0) == 0
    with pytest.raises(ValueError):
        b.estimate_micro(-1)
    assert usd_to_micro(0.1) == 100_000 and micro_to_usd(1_500_000) == 1.5


def test_reserve_is_idempotent_and_settle_charges_once(r: redis.Redis) -> None:
    b = budget(r)
    assert b.reserve("j", E).ok
    assert b.reserve("j", E).ok
    snap = b.snapshot()
    assert (snap.day_reserved, snap.month_reserved, snap.day_spent) == (E, E, 0)
    assert b.settle("j", E - 60_000) is True
    assert b.settle("j", E) is False  # a duplicate settle changes nothing
    assert b.release("j") is False
    snap = b.snapshot()
    assert (snap.day_spent, snap.day_reserved, snap.month_spent, snap.month_reserved) == (
        E - 60_000,
        0,
        E - 60_000,
        0,
    )


def test_release_drops_the_reservation_without_spending(r: redis.Redis) -> None:
    b = budget(r)
    b.reserve("j", E)
    assert b.reservation("j") is not None
    assert b.release("j") is True
    assert b.release("j") is False
    assert b.reservation("j") is None
    snap = b.snapshot()
    assert (snap.day_spent, snap.day_reserved) == (0, 0)


def test_rejects_at_the_day_then_the_month_cap(r: redis.Redis) -> None:
    b = budget(r, day_usd=1.0, month_usd=1000.0)
    assert b.reserve("a", E).ok
    d = b.reserve("b", E)
    assert not d.ok and d.scope is BudgetScope.DAY
    assert b.reserve("c", 400_000).ok  # exactly up to the cap is fine
    assert not b.reserve("d", 1).ok
    m = budget(r, day_usd=1000.0, month_usd=1.5)
    d = m.reserve("e", E)
    assert not d.ok and d.scope is BudgetScope.MONTH  # 1.0 already reserved this month
    snap = m.snapshot()
    assert snap.day_cap == 1_000_000_000 and snap.month_cap == 1_500_000
    assert snap.usd()["month_reserved_usd"] == 1.0


def test_reservation_records_its_periods(r: redis.Redis) -> None:
    b = budget(r)
    b.reserve("j", E)
    today = redis_today(r)
    res = b.reservation("j")
    assert res is not None
    assert (res.micro, res.day, res.month) == (E, today.isoformat(), today.strftime("%Y-%m"))
    assert r.hget(f"{PREFIX}:fc:budget:day:{today.isoformat()}", "reserved") in (str(E), str(E).encode())
    assert r.ttl(f"{PREFIX}:fc:budget:month:{today:%Y-%m}") > 300 * 86400
    assert list(b.reservations()) == ["j"]


def test_settle_goes_to_the_reserved_periods_after_midnight(r: redis.Redis) -> None:
    b = budget(r)
    old_day, old_month = "2020-01-31", "2020-01"
    # a reservation made before midnight, as reserve() would have written it then
    r.hset(f"{PREFIX}:fc:budget:res", "j", f"{E}|{old_day}|{old_month}|0")
    r.hset(f"{PREFIX}:fc:budget:day:{old_day}", "reserved", E)
    r.hset(f"{PREFIX}:fc:budget:month:{old_month}", "reserved", E)
    assert b.settle("j", 540_000)
    for key in (f"{PREFIX}:fc:budget:day:{old_day}", f"{PREFIX}:fc:budget:month:{old_month}"):
        assert {k if isinstance(k, str) else k.decode(): int(v) for k, v in r.hgetall(key).items()} == {
            "spent": 540_000,
            "reserved": 0,
        }
    snap = b.snapshot()
    assert (snap.day_spent, snap.day_reserved) == (0, 0)


def test_lua_calendar_matches_python(rclient: redis.Redis) -> None:
    script = rclient.register_script(
        load_lua(INCLUDE_DIR / "civil.lua") + "\nlocal y, m, d = civil(tonumber(ARGV[1]))\nreturn {y, m, d}"
    )
    epoch = date(1970, 1, 1)
    days = [0, 59, 60, 365, 10956, 11016, 11017, 19782, 20604, 47541, 47540, 47482, 47483]
    days += random.Random(1).sample(range(0, 80_000), 200)
    for n in days:
        expected = epoch + timedelta(days=n)
        assert script(args=[n]) == [expected.year, expected.month, expected.day], expected


def test_200_concurrent_reservations_admit_exactly_k(redis_url: str) -> None:
    k = 37
    # one connection per thread, so all 200 scripts really are in flight together
    client = redis.Redis.from_url(redis_url, max_connections=256)
    b = budget(client, day_usd=micro_to_usd(k * E), month_usd=1000.0)
    start = threading.Barrier(200)
    results: list[bool] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        start.wait()
        ok = b.reserve(f"job-{i}", E).ok
        with lock:
            results.append(ok)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(200)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert results.count(True) == k
    snap = b.snapshot()
    assert snap.day_reserved == k * E == snap.day_cap
    client.close()


def check_invariant(b: Budget, violations: list[str]) -> None:
    s = b.snapshot()
    if s.day_spent + s.day_reserved > s.day_cap:
        violations.append(f"day {s}")
    if s.month_spent + s.month_reserved > s.month_cap:
        violations.append(f"month {s}")


@pytest.mark.parametrize(("day_usd", "month_usd"), [(3.0, 100.0), (100.0, 2.5)])
def test_invariant_holds_under_random_interleavings(
    rclient: redis.Redis, day_usd: float, month_usd: float
) -> None:
    b = budget(rclient, day_usd=day_usd, month_usd=month_usd)
    violations: list[str] = []
    spent = [0] * 8
    held: list[list[str]] = [[] for _ in range(8)]

    def worker(t: int) -> None:
        rng = random.Random(t)
        for i in range(120):
            op = rng.random()
            if op < 0.5 or not held[t]:
                job = f"{t}-{i}"
                if b.reserve(job, rng.randrange(0, 800_000, 60_000)).ok:
                    held[t].append(job)
            else:
                job = held[t].pop(rng.randrange(len(held[t])))
                res = b.reservation(job)
                assert res is not None
                if op < 0.85:
                    actual = rng.randint(0, res.micro)
                    assert b.settle(job, actual)
                    spent[t] += actual
                else:
                    assert b.release(job)
            check_invariant(b, violations)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert violations == []
    snap = b.snapshot()
    outstanding = b.reservations()
    assert sorted(outstanding) == sorted(j for h in held for j in h)
    assert snap.day_reserved == snap.month_reserved == sum(x.micro for x in outstanding.values())
    assert snap.day_spent == snap.month_spent == sum(spent)


def test_rejects_bad_arguments(r: redis.Redis) -> None:
    b = budget(r)
    with pytest.raises(ValueError):
        b.reserve("j", -1)
    with pytest.raises(ValueError):
        b.settle("j", -1)
    with pytest.raises(ValueError):
        budget(r, day_usd=-1)


def test_scripts_touch_only_the_period_keys_they_were_given(
    r: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every key a script touches is in KEYS (Redis Cluster, Dragonfly): a script given the wrong
    day refuses before writing and names the right one, and the call is repeated with it."""
    b = budget(r)
    today = redis_today(r)
    wrong = "1999-01-01", "1999-01"
    reply = b._reserve(
        keys=[
            b.reservations_key,
            b.reservations_key,
            *b.period_keys(*wrong, padded=True),
            b.reservations_key,
        ],
        args=[PREFIX, "j", 60_000, b.day_cap_micro, b.month_cap_micro, 60, 60, "", "0", ""],
    )
    assert int(reply[0]) == -2 and text(reply[1]) == f"BUDGET_KEYS:{today.isoformat()}|{today:%Y-%m}|"
    assert r.hlen(b.reservations_key) == 0 and not r.exists(b.period_keys(*wrong)[0])
    # A worker whose clock says another day still reserves, settles and reads the right periods.
    monkeypatch.setattr(budget_mod, "utc_periods", lambda now_s=None: wrong)
    assert b.reserve("j", 120_000).ok
    assert b.snapshot().day_reserved == 120_000
    assert b.settle("j", 60_000)
    assert b.snapshot().day_spent == 60_000 and b.snapshot().day_reserved == 0
    assert not r.exists(b.period_keys(*wrong)[0])
