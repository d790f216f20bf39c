"""Signed per-job callbacks: POST the terminal event to the job's ``callback_url``.

Signature (like Stripe's): header ``X-Reframe-Signature: t=<unix seconds>,v1=<hex>`` where
``hex = HMAC-SHA256(REFRAME_CALLBACK_SIGNING_KEY, f"{t}.{raw_body}")``. Receivers recompute it over the
raw body, compare in constant time, and reject timestamps older than a few minutes. Deliveries are
at-least-once; ``X-Reframe-Event-Id`` (the job id) lets receivers de-duplicate.

Deliveries go through the guarded fetcher (``worker/netguard.py``): a ``callback_url`` that points
at loopback, a private network or cloud metadata (directly, by DNS, in any IP spelling) is refused
with :class:`BlockedURL` before any connection is made, and redirects are never followed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

from config import Settings
from worker.netguard import BlockedURL, GuardedFetcher

__all__ = ["BlockedURL", "callback_body", "deliver", "sign", "verify"]


def sign(key: bytes, timestamp: int, body: bytes) -> str:
    """The ``X-Reframe-Signature`` header value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(key, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(
    key: bytes, header: str, body: bytes, *, now_s: float | None = None, tolerance_s: float = 300
) -> bool:
    """Check a signature header (for receivers and tests)."""
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        ts = int(fields["t"])
    except (ValueError, KeyError):
        return False
    if abs((now_s if now_s is not None else time.time()) - ts) > tolerance_s:
        return False
    return hmac.compare_digest(sign(key, ts, body), header)


def callback_body(rec: dict[str, Any]) -> bytes:
    """The JSON document POSTed for a finished job."""
    result = rec.get("result") or {}
    video = result.get("video") or {} if isinstance(result, dict) else {}
    doc = {
        "v": 1,
        "job_id": rec.get("id"),
        "state": rec.get("state"),
        "finished_at_ms": rec.get("finished_at_ms"),
        "metadata": rec.get("metadata") or {},
        "video": video or None,
        "cost_usd": (rec["cost_actual_micro"] / 1e6)
        if isinstance(rec.get("cost_actual_micro"), int)
        else None,
        "error": rec.get("error"),
    }
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def deliver(
    settings: Settings, url: str, body: bytes, *, event_id: str, fetcher: GuardedFetcher | None = None
) -> int:
    """POST one callback through the guarded fetcher; return the HTTP status.

    No redirect is followed (a 3xx is returned as the status), the answer is read up to
    ``REFRAME_CALLBACK_MAX_RESPONSE_BYTES`` and the whole call is bounded by
    ``REFRAME_CALLBACK_TIMEOUT_S``. Raises :class:`worker.netguard.BlockedURL` when the target is
    not allowed (a permanent failure: do not retry) and ``httpx.HTTPError`` on transport errors
    (transient). ``fetcher`` defaults to one built from ``settings`` for this call.
    """
    headers = {
        "Content-Type": "application/json",
        "X-Reframe-Event-Id": event_id,
        "User-Agent": "reframe-cluster-callback/1",
    }
    if settings.callback_signing_key is not None:
        key = settings.callback_signing_key.get_secret_value().encode()
        headers["X-Reframe-Signature"] = sign(key, int(time.time()), body)
    own = fetcher is None
    guard = fetcher or GuardedFetcher.from_settings(settings)
    try:
        result = guard.post(
            url,
            body,
            headers,
            timeout_s=settings.callback_timeout_s,
            max_response_bytes=settings.callback_max_response_bytes,
        )
        return result.status
    finally:
        if own:
            guard.close()
