"""Paying once for identical work: who leads a canonical input, who follows, what is reused.

A job whose ``dedupe`` field is ``1`` (the request's option, else its tenant's ``dedupe`` limit,
else ``REFRAME_DEDUPE_DEFAULT``; resolved by ``lua/enqueue.lua``) gets a canonical key from the
submitter (worker/contracts/canonical.py: the normalised fal input plus the video's content hash, or its URL
plus a strong ETag). Three keys per canonical input (docs/design.md, key table):

* ``P:dedupe:{c}`` names the *leader*, the one job in flight that does the work (its lease is the
  job's deadline plus slack, so a leader that vanished frees the name on its own);
* ``P:dedupe:followers:{c}`` the jobs attached to it, parked until it ends (keyed by the canonical
  input rather than by the leader, so the claim script knows every key it touches before it runs);
* ``P:dedupe:done:{c}`` the job that succeeded with it, for ``REFRAME_DEDUPE_RETENTION_S``.

``lua/dedupe_claim.lua`` decides lead / follow / served in one step fenced by the job's attempt,
and ``lua/dedupe_release.lua`` runs when a leader ends (worker/lifecycle.py ``finish``). Both read
the candidate's record in the same step, so a leader that ended without releasing (a crash between
the two scripts) is recognised by its state: succeeded, it serves; failed or gone, it is replaced.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis

from worker.contracts.keys import Keys
from worker.contracts.lua import load_lua, script_path

#: A canonical key as stored: 64 lowercase hex characters (sha256). Anything else is "no key".
CANONICAL_PATTERN = re.compile(r"^[0-9a-f]{64}$")
#: The record's ``dedupe_key`` when a job asked for dedupe but has no canonical key.
NO_KEY_PREFIX = "none"
#: Extra lease of a leader past the job's deadline (finishing, tracking after the deadline).
LEADER_SLACK_S = 600.0


def canonical_params(fal_input: Mapping[str, Any]) -> str:
    """The normalised parameters of a fal input: every field but ``video_url``, sorted, compact JSON
    (``ReframeInput.to_fal()`` already left unset optionals out)."""
    params = {k: v for k, v in fal_input.items() if k != "video_url"}
    return json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def is_canonical(value: str) -> bool:
    """True for a usable canonical key (a record's ``dedupe_key`` may also say why there is none)."""
    return bool(CANONICAL_PATTERN.fullmatch(value))


class ClaimKind(StrEnum):
    """What :meth:`DedupeStore.claim` decided."""

    REFUSED = "refused"
    """The attempt no longer owns the job in a pre-submit state: touch nothing."""
    LEAD = "lead"
    FOLLOW = "follow"
    SERVED = "served"
    RETRY = "retry"
    ALONE = "alone"
    """The leader waits BLOCKED on its tenant's budget: do the work without waiting for it."""


@dataclass(frozen=True)
class Claim:
    """The answer of the claim script."""

    kind: ClaimKind
    other: str = ""
    """The leader (FOLLOW, ALONE), the job served from (SERVED) or the refusing state (REFUSED)."""
    result: dict[str, Any] | None = None
    cost_micro: int = 0
    """What the served-from job was charged: the money this job saves."""


@dataclass(frozen=True)
class Hit:
    """A job an identical request would reuse now (quotes): in flight or succeeded."""

    job_id: str
    state: str
    cost_micro: int


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class DedupeStore:
    """The dedupe scripts and reads on one Redis client (thread-safe)."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.r = client
        self.keys = keys
        self._claim = client.register_script(load_lua(script_path(__file__, "dedupe_claim")))
        self._release = client.register_script(load_lua(script_path(__file__, "dedupe_release")))

    def _names(self, canonical: str) -> list[str]:
        k = self.keys
        return [k.dedupe_leader(canonical), k.dedupe_done(canonical), k.dedupe_followers(canonical)]

    def claim(
        self,
        job_id: str,
        attempt: str,
        canonical: str,
        *,
        lease_ms: int,
        retention_ms: int,
        refuse_done: str = "",
        ambiguous_hold_ms: int = 0,
    ) -> Claim:
        """Lead, follow or be served for ``canonical`` (see ``lua/dedupe_claim.lua``); fenced by
        ``attempt``. ``refuse_done`` names a succeeded job whose result must not be reused; a leader
        dead-lettered as an ambiguous submit is followed for ``ambiguous_hold_ms``."""
        leader_key, done_key, _followers = names = self._names(canonical)
        for _ in range(5):
            done, leader = (_text(x) if x else "" for x in self.r.mget(done_key, leader_key))
            candidate = done if done and done != refuse_done else leader or done
            cand_key = self.keys.job(candidate) if candidate else self.keys.job(job_id)
            raw = self._claim(
                keys=[self.keys.job(job_id), *names, cand_key],
                args=[
                    job_id,
                    attempt,
                    candidate,
                    int(lease_ms),
                    int(retention_ms),
                    refuse_done,
                    int(ambiguous_hold_ms),
                ],
            )
            code = int(raw[0])
            if code == 4:
                continue  # the names moved between the read and the script: read again
            other = _text(raw[1])
            if code == 0:
                return Claim(ClaimKind.REFUSED, other)
            if code == 1:
                return Claim(ClaimKind.LEAD, other)
            if code == 2:
                return Claim(ClaimKind.FOLLOW, other)
            if code == 5:
                return Claim(ClaimKind.ALONE, other)
            result = json.loads(_text(raw[2]))
            return Claim(ClaimKind.SERVED, other, result if isinstance(result, dict) else None, int(raw[3]))
        return Claim(ClaimKind.RETRY)

    def release(self, job_id: str, canonical: str, *, retention_ms: int) -> list[str]:
        """The job ended: stop leading, remember a success; the followers to dispatch."""
        keys = [self.keys.job(job_id), *self._names(canonical)]
        raw = self._release(keys=keys, args=[job_id, int(retention_ms)])
        return [_text(x) for x in raw]

    def lookup(self, canonical: str) -> Hit | None:
        """The job an identical request would reuse now (read only): a success within the window,
        else a live leader; None when there is none."""
        leader_key, done_key, _followers = self._names(canonical)
        for key in (done_key, leader_key):
            job_id = self.r.get(key)
            if not job_id:
                continue
            state, cost = self.r.hmget(self.keys.job(_text(job_id)), "state", "cost_actual_micro")
            state_text = _text(state) if state else ""
            if key == done_key and state_text != "SUCCEEDED":
                continue
            if key == leader_key and state_text in ("", "FAILED", "CANCELLED", "BLOCKED"):
                continue
            return Hit(_text(job_id), state_text, int(_text(cost)) if cost else 0)
        return None
