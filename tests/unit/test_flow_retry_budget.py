"""RetryBudget against a real redis-server: retries bounded by ratio * first attempts + floor."""

from __future__ import annotations

import threading

import pytest
import redis

from reframe.localproc import wait_until
from worker.flow import RetryBudget

# an exception inside a worker thread must fail the test, not just warn
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")

PREFIX = "t"


def retry_budget(r: redis.Redis, **kw: float) -> RetryBudget:
    params = {"ratio": 0.2, "min_tokens": 3.0}
    params.update(kw)
    return RetryBudget(r, prefix=PREFIX, **params)


def test_floor_allows_min_tokens_retries_without_traffic(rclient: redis.Redis) -> None:
    rb = retry_budget(rclient)
    assert rb.tokens() == 3.0
    assert [rb.try_spend() for _ in range(4)] == [True, True, True, False]
    assert rb.tokens() == 0.0


def test_ratio_bound_under_total_failure(redis_url: str) -> None:
    """8 workers, every attempt fails and each job wants 4 retries: the budget caps the total."""
    clients = [redis.Redis.from_url(redis_url, decode_responses=i % 2 == 0) for i in range(8)]
    budgets = [retry_budget(c) for c in clients]
    counts = [[0, 0] for _ in budgets]  # first attempts, retries

    def worker(t: int) -> None:
        for _ in range(60):
            budgets[t].record_first_attempt()
            counts[t][0] += 1
            for _ in range(4):
                if not budgets[t].try_spend():
                    break
                counts[t][1] += 1

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    first = sum(c[0] for c in counts)
    retries = sum(c[1] for c in counts)
    assert first == 480
    assert retries <= 0.2 * first + 3
    assert retries >= 0.2 * first + 3 - 1  # and the budget is actually usable
    for c in clients:
        c.close()


def test_tokens_are_capped(rclient: redis.Redis) -> None:
    rb = retry_budget(rclient, ratio=1.0, min_tokens=2.0, max_tokens=5.0)
    for _ in range(20):
        rb.record_first_attempt()
    assert rb.tokens() == 5.0
    assert sum(rb.try_spend() for _ in range(10)) == 5


def test_fractional_ratio_accumulates_exactly(rclient: redis.Redis) -> None:
    rb = retry_budget(rclient, ratio=0.1, min_tokens=0.0)
    for _ in range(9):
        rb.record_first_attempt()
    assert not rb.try_spend()
    rb.record_first_attempt()  # 10 x 0.1 is one whole token, not 0.9999...
    assert rb.try_spend()


def test_idle_bucket_resets_to_the_floor(rclient: redis.Redis) -> None:
    rb = retry_budget(rclient, idle_reset_s=0.05)
    while rb.try_spend():
        pass
    assert rb.tokens() == 0.0
    wait_until(lambda: rb.tokens() == 3.0, timeout_s=3, what="idle reset")
    assert rb.try_spend()


def test_rejects_bad_configuration(rclient: redis.Redis) -> None:
    with pytest.raises(ValueError):
        retry_budget(rclient, ratio=-0.1)
    with pytest.raises(ValueError):
        retry_budget(rclient, idle_reset_s=0)
