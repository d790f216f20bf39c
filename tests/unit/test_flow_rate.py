"""SubmitRateLimiter (GCRA on Redis time) against a real redis-server."""

from __future__ import annotations

import threading
import time
from bisect import bisect_right

import pytest
import redis

from reframe.localproc import wait_until
from worker.flow import RateLimited, RateReason, SubmitRateLimiter, TenantRateLimiter
from worker.flow.rate import RateDecision

# an exception inside a worker thread must fail the test, not just warn
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")

PREFIX = "t"


def limiter(r: redis.Redis, rate_per_s: float, burst: int) -> SubmitRateLimiter:
    return SubmitRateLimiter(r, prefix=PREFIX, rate_per_s=rate_per_s, burst=burst)


def max_in_window(times_us: list[int], window_us: int) -> int:
    """Most events in any closed window [t, t + W], over every start (not just aligned ones)."""
    times = sorted(times_us)
    return max((bisect_right(times, t + window_us) - i for i, t in enumerate(times)), default=0)


def test_burst_then_rate(rclient: redis.Redis) -> None:
    lim = limiter(rclient, rate_per_s=10, burst=5)
    decisions = [lim.try_acquire() for _ in range(5)]
    assert all(d.allowed and d.reason is RateReason.OK and d.retry_after_ms == 0 for d in decisions)
    denied = lim.try_acquire()
    assert not denied.allowed and denied.reason is RateReason.RATE
    assert 0 < denied.retry_after_ms <= 100
    wait_until(lambda: lim.try_acquire().allowed, timeout_s=2, what="the next token")


def test_burst_of_one_spaces_every_call(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)  # bytes replies
    lim = limiter(r, rate_per_s=20, burst=1)
    assert lim.try_acquire().allowed
    assert not lim.try_acquire().allowed
    assert r.pttl(f"{PREFIX}:fc:gcra") > 0  # the TAT key cleans itself up
    r.close()


def test_sliding_window_bound_under_contention(rclient: redis.Redis) -> None:
    rate, burst = 50.0, 4
    lim = limiter(rclient, rate_per_s=rate, burst=burst)
    allowed_us: list[int] = []
    lock = threading.Lock()
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            d = lim.try_acquire()
            if d.allowed:
                with lock:
                    allowed_us.append(d.at_us)
            else:
                stop.wait(d.retry_after_ms / 1000)  # what a worker does: come back when told

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for th in threads:
        th.start()
    wait_until(lambda: len(allowed_us) >= 75, timeout_s=10, what="75 submits")
    stop.set()
    for th in threads:
        th.join()
    for window_ms in (1, 20, 100, 250, 500, 1000):
        bound = rate * window_ms / 1000 + burst
        assert max_in_window(allowed_us, window_ms * 1000) <= bound, window_ms
    span_s = (max(allowed_us) - min(allowed_us)) / 1e6
    assert len(allowed_us) >= 0.7 * rate * span_s  # not too conservative either


def test_pause_blocks_every_worker_until_the_deadline(redis_url: str) -> None:
    clients = [redis.Redis.from_url(redis_url, decode_responses=d) for d in (True, False)]
    a, b = (limiter(c, rate_per_s=1000, burst=10) for c in clients)
    until = a.pause(0.3)
    assert b.paused_until_ms() == until
    assert a.pause(0.05) == until  # never shortens a pause in force
    for lim in (a, b):
        d = lim.try_acquire()
        assert not d.allowed and d.reason is RateReason.PAUSED
        assert 0 < d.retry_after_ms <= 300
    decisions = []

    def allowed() -> bool:
        decisions.append(b.try_acquire())
        return decisions[-1].allowed

    wait_until(allowed, timeout_s=3, interval_s=0.01, what="end of pause")
    assert all(d.at_us < until * 1000 for d in decisions[:-1])
    assert decisions[-1].at_us >= until * 1000
    assert a.paused_until_ms() is None
    for c in clients:
        c.close()


def test_pause_extends_to_a_longer_deadline(rclient: redis.Redis) -> None:
    lim = limiter(rclient, rate_per_s=1, burst=1)
    short = lim.pause(1)
    longer = lim.pause(5)
    assert longer >= short + 3900
    assert lim.paused_until_ms() == longer
    assert rclient.pttl(f"{PREFIX}:fc:pause_until") > 4000  # expires by itself at the deadline


def test_rejects_bad_configuration(rclient: redis.Redis) -> None:
    with pytest.raises(ValueError):
        limiter(rclient, rate_per_s=0, burst=1)
    with pytest.raises(ValueError):
        limiter(rclient, rate_per_s=1, burst=0)
    with pytest.raises(ValueError):
        limiter(rclient, rate_per_s=1, burst=1).pause(-1)


def test_decision_time_is_redis_time(rclient: redis.Redis) -> None:
    lim = limiter(rclient, rate_per_s=5, burst=1)
    sec, usec = rclient.time()
    d = lim.try_acquire()
    assert d.at_us >= sec * 1_000_000 + usec
    assert abs(d.at_us / 1e6 - time.time()) < 60  # same host here; the value comes from Redis


def test_context_manager_enters_with_a_token_or_raises(rclient: redis.Redis) -> None:
    lim = limiter(rclient, rate_per_s=1, burst=1)
    with lim.acquire() as decision:
        assert decision.allowed
    with pytest.raises(RateLimited) as info, lim.acquire():
        pytest.fail("entered without a token")
    assert info.value.decision.reason is RateReason.RATE and info.value.decision.retry_after_ms > 0


# --- pushback edges (issue #10 item 2) ---------------------------------------------------------


def _first_allowed(lim: SubmitRateLimiter, *, timeout_s: float = 5) -> RateDecision:
    """Poll (briefly sleeping as told) until a token comes; every denial is kept for the caller."""
    got: list[RateDecision] = []

    def take() -> bool:
        d = lim.try_acquire()
        got.append(d)
        return d.allowed

    wait_until(take, timeout_s=timeout_s, interval_s=0.002, what="a token")
    return got[-1]


def test_nothing_before_the_deadline_and_the_first_after_it_is_a_lone_probe(rclient: redis.Redis) -> None:
    lim = limiter(rclient, rate_per_s=1000, burst=20)
    until_ms = lim.pause(0.2)
    probe = _first_allowed(lim)
    assert probe.probe and probe.at_us >= until_ms * 1000
    # while the probe is out, everyone else is held (reported as a pause), however full the bucket
    held = [lim.try_acquire() for _ in range(5)]
    assert all(not d.allowed and d.reason is RateReason.PAUSED and 0 < d.retry_after_ms <= 1000 for d in held)
    assert lim.probe_done(probe, ok=True)
    nxt = _first_allowed(lim)
    assert not nxt.probe


def test_after_a_pause_the_bucket_restarts_empty(rclient: redis.Redis) -> None:
    rate, burst = 20.0, 10
    lim = limiter(rclient, rate_per_s=rate, burst=burst)
    interval_us = lim.interval_us
    until_ms = lim.pause(0.1)
    probe = _first_allowed(lim)
    assert lim.probe_done(probe, ok=True)
    times = [probe.at_us] + [_first_allowed(lim).at_us for _ in range(4)]
    # the k-th token after the deadline comes no earlier than deadline + k intervals: no burst
    for k, at_us in enumerate(times):
        assert at_us >= until_ms * 1000 + k * interval_us, (k, at_us - until_ms * 1000)


def test_a_probe_without_an_answer_holds_the_others_for_the_spacing_only(rclient: redis.Redis) -> None:
    lim = SubmitRateLimiter(rclient, prefix=PREFIX, rate_per_s=1000, burst=5, probe_spacing_ms=150)
    lim.pause(0.05)
    probe = _first_allowed(lim)
    assert probe.probe
    assert not lim.probe_done(probe, ok=False)  # a failed probe keeps the others waiting
    nxt = _first_allowed(lim)
    assert not nxt.probe and nxt.at_us >= probe.at_us + 150_000


def test_a_probe_answered_with_pushback_re_arms_the_pause_and_the_probe(rclient: redis.Redis) -> None:
    lim = limiter(rclient, rate_per_s=1000, burst=5)
    lim.pause(0.05)
    probe = _first_allowed(lim)
    second_until = lim.pause(0.1)  # the probe got another 429 with Retry-After
    assert not lim.probe_done(probe, ok=True)  # its mark was replaced by the new pause's
    d = lim.try_acquire()
    assert not d.allowed and d.reason is RateReason.PAUSED
    again = _first_allowed(lim)
    assert again.probe and again.at_us >= second_until * 1000


def test_a_stale_probe_report_never_releases_a_newer_probe(rclient: redis.Redis) -> None:
    lim = SubmitRateLimiter(rclient, prefix=PREFIX, rate_per_s=1000, burst=5, probe_spacing_ms=60_000)
    lim.pause(0.02)
    first = _first_allowed(lim)
    rclient.delete(lim.probe_key)  # as if its spacing had run out
    lim.pause(0.02)
    second = _first_allowed(lim)
    assert first.probe and second.probe and first.at_us != second.at_us
    assert not lim.probe_done(first, ok=True)
    assert not lim.try_acquire().allowed  # still held by the second probe
    assert lim.probe_done(second, ok=True)
    assert not lim.probe_done(lim.try_acquire(), ok=True)  # not a probe: a no-op


def test_a_tenant_rate_paces_only_that_tenant(rclient: redis.Redis) -> None:
    """--submit-rate-per-s: one token per 1/rate seconds for that tenant; other tenants unaffected."""
    tenant_limiter = TenantRateLimiter(rclient, prefix=PREFIX)
    assert tenant_limiter.try_acquire("slow", 2.0).allowed
    second = tenant_limiter.try_acquire("slow", 2.0)
    assert not second.allowed and 400 <= second.retry_after_ms <= 500
    assert tenant_limiter.try_acquire("other", 2.0).allowed  # its own bucket
    assert not tenant_limiter.try_acquire("paused", 0.0).allowed
