"""The ledger: what the emulator saw and did, for tests and benchmarks to assert on.

Times are unix seconds (float). The ledger lives on the event loop thread only, so it needs no locks.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

#: Status recorded for a request whose connection was dropped without any response.
DROPPED_STATUS = 0


def fingerprint(payload: Any) -> str:
    """sha256 hex of the canonical JSON (sorted keys, no spaces) of a submitted input."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass
class Ledger:
    """Append-only records plus counters; ``snapshot()`` is the ``GET /_emulator/ledger`` body."""

    #: HTTP rows, newest last; bounded (oldest dropped) so 10 Hz polling in long benchmarks cannot eat memory.
    requests: deque[dict[str, Any]] = field(default_factory=deque)
    submits: list[dict[str, Any]] = field(default_factory=list)
    submissions: Counter[str] = field(default_factory=Counter)
    cancels: list[dict[str, Any]] = field(default_factory=list)
    webhooks: list[dict[str, Any]] = field(default_factory=list)
    max_in_progress: int = 0
    max_open: int = 0
    in_progress: int = 0
    open: int = 0
    billed_seconds: float = 0.0
    billed_requests: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    count_429: int = 0
    completions: list[dict[str, Any]] = field(default_factory=list)
    #: One row per billed request (what fal's usage export lists): request_id, endpoint_id, t, billed_s.
    billed: list[dict[str, Any]] = field(default_factory=list)
    open_timeline: list[tuple[float, int, int]] = field(default_factory=list)

    @classmethod
    def bounded(cls, max_requests: int | None) -> Ledger:
        """A ledger keeping at most ``max_requests`` HTTP rows (counters stay exact)."""
        return cls(requests=deque(maxlen=max_requests))

    def record_http(
        self, *, t: float, method: str, path: str, op: str, status: int, request_id: str | None
    ) -> None:
        """One HTTP exchange (status 0 = connection dropped without a response)."""
        self.requests.append(
            {"t": t, "method": method, "path": path, "op": op, "status": status, "request_id": request_id}
        )
        if status == 429:
            self.count_429 += 1

    def record_submit(
        self, request_id: str, fp: str, *, store_io: bool = True, output_expiration_s: float | None = None
    ) -> None:
        """An accepted submit (a request was created), with what its headers asked fal to keep."""
        self.submits.append(
            {
                "t": time.time(),
                "request_id": request_id,
                "fingerprint": fp,
                "store_io": store_io,
                "output_expiration_s": output_expiration_s,
            }
        )
        self.submissions[fp] += 1

    def record_cancel(self, request_id: str, outcome: str, code: int) -> None:
        """A cancel call: ``status`` = outcome string (CANCELLATION_REQUESTED, ...), ``code`` = HTTP code."""
        self.cancels.append({"t": time.time(), "request_id": request_id, "status": outcome, "code": code})

    def record_webhook(
        self,
        request_id: str,
        url: str,
        attempt: int,
        status: int | None,
        error: str | None,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
    ) -> None:
        """One webhook delivery attempt (``status`` None = transport error; attempt 0 = dropped by a fault).

        The signed headers and the raw body are kept so tests can replay a genuine delivery.
        """
        self.webhooks.append(
            {
                "t": time.time(),
                "request_id": request_id,
                "url": url,
                "attempt": attempt,
                "status": status,
                "error": error,
                "headers": dict(headers or {}),
                "body": body.decode("utf-8", "replace"),
            }
        )

    def set_counts(self, in_progress: int, open_: int) -> None:
        """Current IN_PROGRESS and open (IN_QUEUE + IN_PROGRESS) counts; tracks the maxima."""
        if (in_progress, open_) != (self.in_progress, self.open):
            # (time, open, in progress) at every change: benchmarks integrate it for utilisation.
            self.open_timeline.append((time.time(), open_, in_progress))
        self.in_progress = in_progress
        self.open = open_
        self.max_in_progress = max(self.max_in_progress, in_progress)
        self.max_open = max(self.max_open, open_)

    def record_terminal(
        self,
        *,
        ok: bool,
        cancelled: bool,
        billed_s: float,
        request_id: str | None = None,
        endpoint_id: str = "",
    ) -> None:
        """A request reached COMPLETED; only successes are billed (failures and cancels are free)."""
        now = time.time()
        self.completed += 1
        self.completions.append({"t": now, "request_id": request_id, "ok": ok})
        if ok:
            self.billed_seconds += billed_s
            self.billed_requests += 1
            self.billed.append(
                {"request_id": request_id, "endpoint_id": endpoint_id, "t": now, "billed_s": billed_s}
            )
        elif cancelled:
            self.cancelled += 1
        else:
            self.failed += 1

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return {
            "requests": list(self.requests),
            "submits": list(self.submits),
            "submissions": dict(self.submissions),
            "max_in_progress": self.max_in_progress,
            "max_open": self.max_open,
            "in_progress": self.in_progress,
            "open": self.open,
            "billed_seconds": round(self.billed_seconds, 6),
            "billed_requests": self.billed_requests,
            "completed": self.completed,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "count_429": self.count_429,
            "cancels": list(self.cancels),
            "webhooks": list(self.webhooks),
            "completions": list(self.completions),
            "billed": list(self.billed),
            "open_timeline": [list(x) for x in self.open_timeline],
        }
