"""Cluster-wide submit rate limit: GCRA on Redis time, plus a shared pause for provider pushback.

GCRA (the algorithm of redis-cell and throttled) keeps one number, the theoretical arrival time
(TAT). With emission interval ``T = 1/rate`` and tolerance ``tau = T * (burst - 1)``, a request at
``now`` is allowed when ``max(TAT, now) - now <= tau`` and then moves TAT on by ``T``. Unlike fixed
windows it never lets 2x the rate through at a window edge, and since ``now`` is Redis ``TIME`` a
skewed worker clock changes nothing (flow-control notes §4).

Keys: ``{prefix}:fc:gcra`` (STRING, TAT in integer **microseconds** of Redis time, so that rates
that do not divide a millisecond stay exact) and ``{prefix}:fc:pause_until`` (STRING, ms).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum

import redis

from worker.flow._redis import LUA_NOW, as_int, run, text


class RateReason(StrEnum):
    """Why :meth:`SubmitRateLimiter.try_acquire` decided as it did."""

    OK = "ok"
    RATE = "rate"
    PAUSED = "paused"


@dataclass(frozen=True, slots=True)
class RateDecision:
    """Outcome of one :meth:`SubmitRateLimiter.try_acquire`.

    ``retry_after_ms`` is 0 when allowed; otherwise the earliest time (from now) a retry can succeed
    (a later caller may still take that token first). ``at_us`` is the Redis time of the decision.
    """

    allowed: bool
    retry_after_ms: int
    reason: RateReason
    at_us: int = 0


class RateLimited(Exception):
    """Raised by :meth:`SubmitRateLimiter.acquire` when no token is available now."""

    def __init__(self, decision: RateDecision) -> None:
        super().__init__(f"submit {decision.reason.value}: retry after {decision.retry_after_ms} ms")
        self.decision = decision


# KEYS: 1 gcra, 2 pause_until. ARGV: 1 interval_us, 2 tolerance_us.
# Returns {allowed, retry_after_ms, reason, now_us}.
_TRY_ACQUIRE = (
    LUA_NOW
    + """
local pause = tonumber(redis.call('GET', KEYS[2]))
if pause and pause > now_ms then
  return {0, pause - now_ms, 'paused', string.format('%.0f', now_us)}
end
local interval, tolerance = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now_us
if tat < now_us then tat = now_us end
if tat - now_us > tolerance then
  return {0, math.ceil((tat - now_us - tolerance) / 1000), 'rate', string.format('%.0f', now_us)}
end
local new_tat = tat + interval
-- once TAT is in the past the key means nothing, so let it expire then
local ttl_ms = math.ceil((new_tat - now_us) / 1000) + 1
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', ttl_ms)
return {1, 0, 'ok', string.format('%.0f', now_us)}
"""
)

# KEYS: 1 pause_until. ARGV: 1 pause_ms. Returns the pause deadline (ms).
_PAUSE = (
    LUA_NOW
    + """
local until_ms = now_ms + tonumber(ARGV[1])
local existing = tonumber(redis.call('GET', KEYS[1]))
if existing and existing > until_ms then until_ms = existing end
redis.call('SET', KEYS[1], string.format('%.0f', until_ms), 'PXAT', string.format('%.0f', until_ms))
return until_ms
"""
)

# KEYS: 1 pause_until. Returns the deadline if still in the future, else -1.
_PAUSED_UNTIL = (
    LUA_NOW
    + """
local existing = tonumber(redis.call('GET', KEYS[1]))
if existing and existing > now_ms then return existing end
return -1
"""
)


class SubmitRateLimiter:
    """Cluster-wide GCRA limiter for fal submits, with a shared pause (429/503 Retry-After).

    Guarantees: in every sliding window of length ``W`` (Redis time), at most
    ``rate_per_s * W + burst`` calls are allowed, across all workers; up to ``burst`` calls are
    allowed back to back after an idle period; while a pause is in force nobody is allowed.
    """

    def __init__(self, r: redis.Redis, *, prefix: str, rate_per_s: float, burst: int) -> None:
        if rate_per_s <= 0:
            raise ValueError("rate_per_s must be > 0")
        if burst < 1:
            raise ValueError("burst must be >= 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        # rounded up, so the effective rate can only be a hair below the configured one
        self.interval_us = math.ceil(1_000_000 / rate_per_s)
        self.tolerance_us = self.interval_us * (burst - 1)
        self.gcra_key = f"{prefix}:fc:gcra"
        self.pause_key = f"{prefix}:fc:pause_until"
        self._try = r.register_script(_TRY_ACQUIRE)
        self._pause = r.register_script(_PAUSE)
        self._paused_until = r.register_script(_PAUSED_UNTIL)

    def try_acquire(self) -> RateDecision:
        """Take one submit token if the rate and any pause allow it; never waits."""
        reply = run(self._try, [self.gcra_key, self.pause_key], [self.interval_us, self.tolerance_us])
        return RateDecision(
            allowed=as_int(reply[0]) == 1,
            retry_after_ms=as_int(reply[1]),
            reason=RateReason(text(reply[2])),
            at_us=as_int(reply[3]),
        )

    @contextmanager
    def acquire(self) -> Iterator[RateDecision]:
        """Context-manager form (dramatiq's limiter shape): enter with a token or raise.

        Raises :class:`RateLimited` carrying the decision (``retry_after_ms``, ``reason``). A token
        is spent on entry and never given back: the submit it paced is assumed to have been tried.
        """
        decision = self.try_acquire()
        if not decision.allowed:
            raise RateLimited(decision)
        yield decision

    def pause(self, seconds: float) -> int:
        """Stop every worker's submits for ``seconds`` from now (Redis time); returns the deadline ms.

        Atomic ``max``: a pause never shortens a longer one already in force.
        """
        if seconds < 0:
            raise ValueError("seconds must be >= 0")
        return as_int(run(self._pause, [self.pause_key], [math.ceil(seconds * 1000)]))

    def paused_until_ms(self) -> int | None:
        """The pause deadline (ms, Redis time) if a pause is in force, else None."""
        until = as_int(run(self._paused_until, [self.pause_key], []))
        return None if until < 0 else until
