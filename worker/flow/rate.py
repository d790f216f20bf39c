"""Cluster-wide submit rate limit: GCRA on Redis time, plus a shared pause for provider pushback.

GCRA (the algorithm of redis-cell and throttled) keeps one number, the theoretical arrival time
(TAT). With emission interval ``T = 1/rate`` and tolerance ``tau = T * (burst - 1)``, a request at
``now`` is allowed when ``max(TAT, now) - now <= tau`` and then moves TAT on by ``T``. Unlike fixed
windows it never lets 2x the rate through at a window edge, and since ``now`` is Redis ``TIME`` a
skewed worker clock changes nothing (docs/flow-control-notes.md §4).

Pushback (a 429/503 with ``Retry-After``, issue #10): :meth:`SubmitRateLimiter.pause` holds every
worker until the deadline; the first token after it is a lone **probe** (the others wait until the
submitter reports its answer with :meth:`SubmitRateLimiter.probe_done`, or at most
``probe_spacing_ms``); and the bucket restarts *empty* at the deadline (TAT = deadline + tolerance),
so the burst allowance can never send a volley straight into a fresh pushback. Each decision is one
script in ``worker/flow/lua/`` (``rate_acquire``, ``rate_pause``, ``rate_probe_done``,
``rate_paused_until``).

Keys: ``{prefix}:fc:gcra`` (STRING, TAT in integer **microseconds** of Redis time, so that rates
that do not divide a millisecond stay exact), ``{prefix}:fc:pause_until`` (STRING, ms) and
``{prefix}:fc:rate_probe`` (STRING: ``due`` after a pause, ``inflight:<us>`` while the probe is out).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum

import redis

from worker.contracts.lua import load_lua, script_path
from worker.flow._redis import as_int, run, text

#: Longest the probe after a pause holds the other submits when its answer is never reported.
DEFAULT_PROBE_SPACING_MS = 1000


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
    ``probe`` is True for the first token after a pause: the caller should report the submit's
    answer with :meth:`SubmitRateLimiter.probe_done` (until then, or ``probe_spacing_ms``, every
    other caller is told ``PAUSED``).
    """

    allowed: bool
    retry_after_ms: int
    reason: RateReason
    at_us: int = 0
    probe: bool = False


class RateLimited(Exception):
    """Raised by :meth:`SubmitRateLimiter.acquire` when no token is available now."""

    def __init__(self, decision: RateDecision) -> None:
        super().__init__(f"submit {decision.reason.value}: retry after {decision.retry_after_ms} ms")
        self.decision = decision


class SubmitRateLimiter:
    """Cluster-wide GCRA limiter for fal submits, with a shared pause (429/503 Retry-After).

    Guarantees: in every sliding window of length ``W`` (Redis time), at most
    ``rate_per_s * W + burst`` calls are allowed, across all workers; up to ``burst`` calls are
    allowed back to back after an idle period; while a pause is in force nobody is allowed; the
    first call after a pause is allowed alone (the probe), and the ``k``-th call after the pause's
    deadline comes no earlier than ``deadline + (k - 1) / rate_per_s`` (no burst after a pause).
    """

    def __init__(
        self,
        r: redis.Redis,
        *,
        prefix: str,
        rate_per_s: float,
        burst: int,
        probe_spacing_ms: int = DEFAULT_PROBE_SPACING_MS,
    ) -> None:
        if rate_per_s <= 0:
            raise ValueError("rate_per_s must be > 0")
        if burst < 1:
            raise ValueError("burst must be >= 1")
        if probe_spacing_ms < 1:
            raise ValueError("probe_spacing_ms must be >= 1")
        self.probe_spacing_ms = probe_spacing_ms
        self.rate_per_s = rate_per_s
        self.burst = burst
        # rounded up, so the effective rate can only be a hair below the configured one
        self.interval_us = math.ceil(1_000_000 / rate_per_s)
        self.tolerance_us = self.interval_us * (burst - 1)
        self.gcra_key = f"{prefix}:fc:gcra"
        self.pause_key = f"{prefix}:fc:pause_until"
        self.probe_key = f"{prefix}:fc:rate_probe"
        self._keys = [self.gcra_key, self.pause_key, self.probe_key]
        self._try = r.register_script(load_lua(script_path(__file__, "rate_acquire")))
        self._pause = r.register_script(load_lua(script_path(__file__, "rate_pause")))
        self._probe_done = r.register_script(load_lua(script_path(__file__, "rate_probe_done")))
        self._paused_until = r.register_script(load_lua(script_path(__file__, "rate_paused_until")))

    def try_acquire(self) -> RateDecision:
        """Take one submit token if the rate, any pause and any probe in flight allow it; never waits."""
        reply = run(self._try, self._keys, [self.interval_us, self.tolerance_us, self.probe_spacing_ms])
        return RateDecision(
            allowed=as_int(reply[0]) == 1,
            retry_after_ms=as_int(reply[1]),
            reason=RateReason(text(reply[2])),
            at_us=as_int(reply[3]),
            probe=as_int(reply[4]) == 1,
        )

    def probe_done(self, decision: RateDecision, ok: bool) -> bool:
        """Report the answer to the submit that ``decision`` (a probe) paced; True if others may go now.

        ``ok`` = fal accepted the submit: the other workers may submit at once (at the rate, from an
        empty bucket). Not ok without a new pause (e.g. a 5xx, a timeout): they wait out the probe
        spacing. A 429/503 with ``Retry-After`` calls :meth:`pause` instead (it re-arms the probe).
        A no-op for a decision that was not a probe, or whose probe mark is gone already.
        """
        if not decision.probe:
            return False
        mark = f"inflight:{decision.at_us}"
        return as_int(run(self._probe_done, [self.probe_key], [mark, 1 if ok else 0])) == 1

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

        Atomic ``max``: a pause never shortens a longer one already in force. The bucket restarts
        empty at the deadline and the first submit after it is a probe (see :class:`RateDecision`).
        """
        if seconds < 0:
            raise ValueError("seconds must be >= 0")
        args = [math.ceil(seconds * 1000), self.tolerance_us]
        return as_int(run(self._pause, [self.pause_key, self.gcra_key, self.probe_key], args))

    def paused_until_ms(self) -> int | None:
        """The pause deadline (ms, Redis time) if a pause is in force, else None."""
        until = as_int(run(self._paused_until, [self.pause_key], []))
        return None if until < 0 else until


class TenantRateLimiter:
    """One submit rate per tenant (``reframe tenants set --submit-rate-per-s``), inside the global one.

    The same GCRA script as :class:`SubmitRateLimiter` (``lua/rate_acquire.lua``) on per-tenant keys
    ``{prefix}:fc:gcra:tenant:{t}``, with no pause and no probe (fal's pushback pauses the cluster,
    not one tenant): a tenant's burst is one submit, its long-run rate ``rate_per_s``.
    """

    def __init__(self, r: redis.Redis, *, prefix: str) -> None:
        self.prefix = prefix
        self._try = r.register_script(load_lua(script_path(__file__, "rate_acquire")))

    def try_acquire(self, tenant: str, rate_per_s: float) -> RateDecision:
        """Take one of ``tenant``'s submit tokens at ``rate_per_s``; never waits."""
        if rate_per_s <= 0:
            return RateDecision(
                allowed=False, retry_after_ms=60_000, reason=RateReason.RATE, at_us=0, probe=False
            )
        base = f"{self.prefix}:fc:gcra:tenant:{tenant}"
        interval_us = math.ceil(1_000_000 / rate_per_s)
        # the pause and probe keys are never written: a tenant has neither
        reply = run(self._try, [base, f"{base}:pause", f"{base}:probe"], [interval_us, 0, 1])
        return RateDecision(
            allowed=as_int(reply[0]) == 1,
            retry_after_ms=as_int(reply[1]),
            reason=RateReason(text(reply[2])),
            at_us=as_int(reply[3]),
            probe=False,
        )
