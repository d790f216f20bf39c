"""A circuit breaker shared by the whole cluster, rate-based over time buckets (resilience4j style).

One HASH ``{prefix}:fc:breaker`` holds the state and a ring of ``BUCKETS`` time buckets (calls and
failures) covering ``window_s``. Every decision is one Lua script on Redis time, so all workers
switch state together and a HALF_OPEN breaker hands out at most ``half_open_probes`` probes across
the cluster (pybreaker's "every worker probes at once" cannot happen).

Which outcomes count as failures is the caller's call: connection errors, timeouts, 5xx and runner
failures count; 4xx validation errors and 429 do not (the rate limiter's pause handles 429).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from enum import StrEnum

import redis

from worker.contracts.lua import load_lua, script_path
from worker.flow._redis import as_int, run, text

#: Time buckets across the window. More buckets follow the window more closely, at more fields.
BUCKETS = 10


class BreakerState(StrEnum):
    """Breaker states."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerDecision:
    """Outcome of :meth:`CircuitBreaker.allow`.

    When ``probe`` is true the caller holds one of the HALF_OPEN probe tokens and must report the
    outcome with ``record(..., probe=True)`` or hand the token back with ``release_probe()``.
    ``retry_at_ms`` (Redis time) is when to ask again if not allowed, else 0.
    """

    allowed: bool
    probe: bool
    state: BreakerState
    retry_at_ms: int


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """The breaker as seen now: state, OPEN deadline (ms), trips in a row, window counts."""

    state: BreakerState
    open_until_ms: int
    trips: int
    calls: int
    failures: int


class CircuitBreaker:
    """Cluster-wide breaker: CLOSED -> OPEN (at a failure ratio) -> HALF_OPEN (probes) -> CLOSED.

    Guarantees (each call one atomic script on Redis time):

    * It trips only when the window holds at least ``min_calls`` calls and the failed share is at
      least ``failure_ratio``; below ``min_calls`` it never trips.
    * OPEN lasts ``min(open_cap_s, open_base_s * 2**trips) * (1 + jitter)`` where ``trips`` counts
      the trips since it last closed and jitter is in ``[0, jitter_ratio)``; it is never shorter
      than a Retry-After given to :meth:`record`.
    * While OPEN, :meth:`allow` refuses everyone. In HALF_OPEN at most ``half_open_probes`` callers
      cluster-wide hold a probe at a time; a probe success returns its token, a probe failure
      re-opens with the next (longer) period, ``close_after_successes`` successes close it.
    * A probe held longer than ``probe_lease_s`` (its holder died) is handed out again.
    """

    def __init__(
        self,
        r: redis.Redis,
        *,
        prefix: str,
        window_s: float,
        min_calls: int,
        failure_ratio: float,
        open_base_s: float,
        open_cap_s: float,
        half_open_probes: int,
        close_after_successes: int,
        rng: random.Random | None = None,
        jitter_ratio: float = 0.1,
        probe_lease_s: float = 60.0,
        half_open_retry_s: float = 1.0,
    ) -> None:
        if not 0 < failure_ratio <= 1:
            raise ValueError("failure_ratio must be in (0, 1]")
        if open_cap_s < open_base_s:
            raise ValueError("open_cap_s must be >= open_base_s")
        if min(window_s, open_base_s, probe_lease_s, half_open_retry_s) <= 0:
            raise ValueError("durations must be > 0")
        if min(min_calls, half_open_probes, close_after_successes) < 1:
            raise ValueError("min_calls, half_open_probes and close_after_successes must be >= 1")
        self.key = f"{prefix}:fc:breaker"
        self.min_calls = min_calls
        self.failure_ratio = failure_ratio
        self.open_base_ms = math.ceil(open_base_s * 1000)
        self.open_cap_ms = math.ceil(open_cap_s * 1000)
        self.close_after_successes = close_after_successes
        self.jitter_ratio = jitter_ratio
        self.half_open_retry_ms = math.ceil(half_open_retry_s * 1000)
        self._common = [
            max(1, math.ceil(window_s * 1000 / BUCKETS)),
            BUCKETS,
            half_open_probes,
            math.ceil(probe_lease_s * 1000),
        ]
        self._rng = rng or random.Random()
        self._allow = r.register_script(load_lua(script_path(__file__, "breaker_allow")))
        self._record = r.register_script(load_lua(script_path(__file__, "breaker_record")))
        self._release_probe = r.register_script(load_lua(script_path(__file__, "breaker_release_probe")))
        self._force_open = r.register_script(load_lua(script_path(__file__, "breaker_force_open")))
        self._snapshot = r.register_script(load_lua(script_path(__file__, "breaker_snapshot")))

    def allow(self) -> BreakerDecision:
        """May the caller submit now? In HALF_OPEN a ``True`` may come with a probe token."""
        reply = run(self._allow, [self.key], [*self._common, self.half_open_retry_ms])
        return BreakerDecision(
            allowed=as_int(reply[0]) == 1,
            probe=as_int(reply[1]) == 1,
            state=BreakerState(text(reply[2])),
            retry_at_ms=as_int(reply[3]),
        )

    def record(self, success: bool, *, probe: bool, retry_after_s: float | None = None) -> BreakerState:
        """Count one outcome; may trip, re-open or close the breaker. Returns the state after it.

        ``probe`` says the call was admitted with a probe token (the token is consumed either way).
        ``retry_after_s`` (from a failed call's Retry-After) is a floor for any OPEN period this
        failure starts, and extends an OPEN period already in force.
        """
        floor_ms = 0 if retry_after_s is None else max(0, math.ceil(retry_after_s * 1000))
        args = [
            *self._common,
            int(success),
            int(probe),
            self.min_calls,
            repr(self.failure_ratio),
            self.open_base_ms,
            self.open_cap_ms,
            repr(self._rng.random()),
            repr(self.jitter_ratio),
            self.close_after_successes,
            floor_ms,
        ]
        return BreakerState(text(run(self._record, [self.key], args)))

    def release_probe(self) -> None:
        """Hand back an unused probe token (the probe call was never made)."""
        run(self._release_probe, [self.key], self._common)

    def force_open_until(self, until_ms: int) -> int:
        """Hold the breaker OPEN until at least ``until_ms`` (Redis time); returns the deadline.

        Never shortens an OPEN period already in force and does not count as a trip.
        """
        return as_int(run(self._force_open, [self.key], [*self._common, until_ms]))

    def state(self) -> BreakerSnapshot:
        """The current state (an OPEN breaker past its deadline shows as HALF_OPEN) and counts."""
        reply = run(self._snapshot, [self.key], self._common)
        return BreakerSnapshot(
            state=BreakerState(text(reply[0])),
            open_until_ms=as_int(reply[1]),
            trips=as_int(reply[2]),
            calls=as_int(reply[3]),
            failures=as_int(reply[4]),
        )
