"""A cluster-wide retry budget (gRPC retry throttling / Finagle RetryBudget).

Per-job backoff limits how fast one job retries; it does not stop a fleet from multiplying the load
on a failing provider. The budget does: every first attempt earns ``ratio`` retry tokens, every
retry spends one, so retries stay a fixed share of fresh traffic however many jobs fail.

Key ``{prefix}:fc:retry_budget`` (STRING): tokens in integer milli-tokens, so that sums of a ratio
such as 0.2 never drift below a whole token through float rounding. The key expires after
``idle_reset_s`` without activity, which restores the ``min_tokens`` allowance after a quiet period.
"""

from __future__ import annotations

import math

import redis

from worker.contracts.lua import load_lua, script_path
from worker.flow._redis import as_int, run

_MILLI = 1000


class RetryBudget:
    """Token bucket shared by the cluster that bounds retries by first attempts.

    Guarantee: over any period without an idle reset, ``retries <= ratio * first_attempts +
    min_tokens`` (the bucket starts at ``min_tokens``; each first attempt adds ``ratio`` up to
    ``max_tokens``; each retry needs and spends one whole token).
    """

    def __init__(
        self,
        r: redis.Redis,
        *,
        prefix: str,
        ratio: float,
        min_tokens: float,
        max_tokens: float | None = None,
        idle_reset_s: float = 3600.0,
    ) -> None:
        if ratio < 0 or min_tokens < 0:
            raise ValueError("ratio and min_tokens must be >= 0")
        if idle_reset_s <= 0:
            raise ValueError("idle_reset_s must be > 0")
        self.key = f"{prefix}:fc:retry_budget"
        # rounded down: the budget may be a hair stingier than configured, never more generous
        self.ratio_milli = math.floor(ratio * _MILLI)
        self.initial_milli = math.floor(min_tokens * _MILLI)
        top = max(min_tokens, 100.0) if max_tokens is None else max(max_tokens, min_tokens)
        self.max_milli = math.floor(top * _MILLI)
        self.idle_reset_ms = math.ceil(idle_reset_s * 1000)
        self._r = r
        self._apply = r.register_script(load_lua(script_path(__file__, "retry_budget_apply")))

    def _run(self, delta: int, need: int) -> tuple[bool, int]:
        reply = run(
            self._apply, [self.key], [delta, self.initial_milli, self.max_milli, self.idle_reset_ms, need]
        )
        return as_int(reply[0]) == 1, as_int(reply[1])

    def record_first_attempt(self) -> None:
        """Earn ``ratio`` tokens for one first attempt (call it once per job's first submit)."""
        self._run(self.ratio_milli, 0)

    def try_spend(self) -> bool:
        """Spend one token for a retry; False (nothing spent) when less than one token is left."""
        allowed, _ = self._run(-_MILLI, _MILLI)
        return allowed

    def tokens(self) -> float:
        """Tokens available now (for metrics)."""
        raw = self._r.get(self.key)  # a plain read: metrics must not keep an idle bucket alive
        return (self.initial_milli if raw is None else as_int(raw)) / _MILLI
