"""CircuitBreaker against a real redis-server: trip rule, OPEN period, cluster-wide probes."""

from __future__ import annotations

import random
import threading
from typing import Any

import pytest
import redis

from reframe.localproc import wait_until
from worker.flow import BreakerState, CircuitBreaker

# an exception inside a worker thread must fail the test, not just warn
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")

PREFIX = "t"
KEY = f"{PREFIX}:fc:breaker"


class NoJitter(random.Random):
    """An rng whose jitter is always 0, so OPEN periods are exact."""

    def random(self) -> float:
        return 0.0


def breaker(r: redis.Redis, **overrides: Any) -> CircuitBreaker:
    params: dict[str, Any] = {
        "window_s": 60.0,
        "min_calls": 10,
        "failure_ratio": 0.5,
        "open_base_s": 0.2,
        "open_cap_s": 10.0,
        "half_open_probes": 1,
        "close_after_successes": 1,
        "rng": NoJitter(),
    }
    params.update(overrides)
    return CircuitBreaker(r, prefix=PREFIX, **params)


def now_ms(r: redis.Redis) -> int:
    sec, usec = r.time()
    return int(sec) * 1000 + int(usec) // 1000


def record_many(b: CircuitBreaker, successes: int, failures: int) -> None:
    for _ in range(successes):
        b.record(True, probe=False)
    for _ in range(failures):
        b.record(False, probe=False)


def trip(b: CircuitBreaker) -> None:
    record_many(b, 0, b.min_calls)
    assert b.state().state is BreakerState.OPEN


def wait_half_open(b: CircuitBreaker) -> None:
    wait_until(
        lambda: b.state().state is BreakerState.HALF_OPEN, timeout_s=5, interval_s=0.01, what="HALF_OPEN"
    )


def test_does_not_trip_below_min_calls(rclient: redis.Redis) -> None:
    b = breaker(rclient)
    record_many(b, 0, 9)
    snap = b.state()
    assert snap.state is BreakerState.CLOSED and snap.calls == 9 and snap.failures == 9
    assert b.allow().allowed


def test_does_not_trip_below_the_ratio(rclient: redis.Redis) -> None:
    b = breaker(rclient)
    record_many(b, 6, 4)
    assert b.state().state is BreakerState.CLOSED


def test_trips_at_the_ratio_and_refuses_everyone(redis_url: str) -> None:
    clients = [redis.Redis.from_url(redis_url, decode_responses=d) for d in (True, False)]
    a, b = (breaker(c) for c in clients)
    record_many(a, 5, 4)
    assert a.state().state is BreakerState.CLOSED
    before = now_ms(clients[0])
    assert b.record(False, probe=False) is BreakerState.OPEN  # 5 of 10 failed
    for x in (a, b):
        d = x.allow()
        assert not d.allowed and not d.probe and d.state is BreakerState.OPEN
        assert d.retry_at_ms >= before + 200
    snap = a.state()
    assert snap.trips == 1 and snap.open_until_ms == b.allow().retry_at_ms
    for c in clients:
        c.close()


def test_old_buckets_leave_the_window(rclient: redis.Redis) -> None:
    b = breaker(rclient, window_s=0.3)
    record_many(b, 0, 9)
    wait_until(lambda: b.state().calls == 0, timeout_s=3, what="window to roll over")
    b.record(False, probe=False)
    assert b.state().state is BreakerState.CLOSED


def test_half_open_admits_only_p_probes_across_10_threads(rclient: redis.Redis) -> None:
    b = breaker(rclient, half_open_probes=2, open_base_s=0.05)
    trip(b)
    wait_half_open(b)
    start = threading.Barrier(10)
    decisions = []
    lock = threading.Lock()

    def worker() -> None:
        start.wait()
        d = b.allow()
        with lock:
            decisions.append(d)

    threads = [threading.Thread(target=worker) for _ in range(10)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    allowed = [d for d in decisions if d.allowed]
    assert len(allowed) == 2 and all(d.probe for d in allowed)
    refused = [d for d in decisions if not d.allowed]
    assert all(d.state is BreakerState.HALF_OPEN and d.retry_at_ms > 0 for d in refused)
    b.release_probe()  # one probe was never sent
    assert b.allow().probe
    assert not b.allow().allowed


def test_closes_after_probe_successes(rclient: redis.Redis) -> None:
    b = breaker(rclient, close_after_successes=2, open_base_s=0.05)
    trip(b)
    wait_half_open(b)
    assert b.allow().probe
    assert b.record(True, probe=True) is BreakerState.HALF_OPEN
    assert b.allow().probe  # the successful probe's token came back
    assert b.record(True, probe=True) is BreakerState.CLOSED
    snap = b.state()
    assert snap.trips == 0 and snap.calls == 0  # a clean slate
    d = b.allow()
    assert d.allowed and not d.probe


def test_probe_failure_reopens_for_longer(rclient: redis.Redis) -> None:
    b = breaker(rclient, open_base_s=0.2)
    before = now_ms(rclient)
    trip(b)
    after = now_ms(rclient)
    assert before + 200 <= b.state().open_until_ms <= after + 200
    wait_half_open(b)
    assert b.allow().probe
    before = now_ms(rclient)
    assert b.record(False, probe=True) is BreakerState.OPEN
    after = now_ms(rclient)
    snap = b.state()
    assert snap.trips == 2
    assert before + 400 <= snap.open_until_ms <= after + 400


def test_open_period_is_capped_and_jittered(rclient: redis.Redis) -> None:
    class AlwaysHigh(random.Random):
        def random(self) -> float:
            return 0.999

    b = breaker(rclient, open_base_s=1.0, open_cap_s=2.0, rng=AlwaysHigh())
    rclient.hset(KEY, "trips", 5)  # 1 s * 2**5 is far past the cap
    before = now_ms(rclient)
    trip(b)
    after = now_ms(rclient)
    until = b.state().open_until_ms
    assert before + 2000 + 190 <= until <= after + 2200


def test_open_is_never_shorter_than_retry_after(rclient: redis.Redis) -> None:
    b = breaker(rclient, open_base_s=0.2)
    record_many(b, 0, 9)
    before = now_ms(rclient)
    assert b.record(False, probe=False, retry_after_s=5) is BreakerState.OPEN
    assert b.state().open_until_ms >= before + 5000
    # a later 503 with a longer Retry-After extends the OPEN period
    b.record(False, probe=False, retry_after_s=8)
    assert b.state().open_until_ms >= before + 8000


def test_force_open_until_extends_never_shortens(rclient: redis.Redis) -> None:
    b = breaker(rclient)
    target = now_ms(rclient) + 3000
    assert b.force_open_until(target) == target
    assert b.force_open_until(target - 1000) == target
    d = b.allow()
    assert not d.allowed and d.retry_at_ms == target
    assert b.state().trips == 0


def test_lost_probe_is_handed_out_again_after_its_lease(rclient: redis.Redis) -> None:
    b = breaker(rclient, open_base_s=0.05, probe_lease_s=0.1)
    trip(b)
    wait_half_open(b)
    assert b.allow().probe  # its holder dies without reporting
    assert not b.allow().allowed
    wait_until(lambda: b.allow().probe, timeout_s=3, interval_s=0.01, what="probe lease expiry")


def test_non_probe_outcomes_do_not_change_half_open(rclient: redis.Redis) -> None:
    b = breaker(rclient, open_base_s=0.05)
    trip(b)
    wait_half_open(b)
    b.allow()
    # late results of calls admitted before the trip
    record_many(b, 3, 3)
    assert b.state().state is BreakerState.HALF_OPEN


def test_rejects_bad_configuration(rclient: redis.Redis) -> None:
    with pytest.raises(ValueError):
        breaker(rclient, failure_ratio=0)
    with pytest.raises(ValueError):
        breaker(rclient, open_base_s=5, open_cap_s=1)
    with pytest.raises(ValueError):
        breaker(rclient, half_open_probes=0)
