"""Signed per-job callbacks: POST the terminal event to the job's ``callback_url``.

Headers follow the Standard Webhooks spec (https://www.standardwebhooks.com):

* ``webhook-id``: the event id (``<job id>.<life>``), unique per life of a job, the same on every
  retry, so a receiver de-duplicates on it and still keeps every life's event;
* ``webhook-timestamp``: unix seconds of this try;
* ``webhook-signature``: space-separated ``v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>``,
  one per secret of ``REFRAME_CALLBACK_SECRETS`` (``whsec_<base64 key>``, current first): during a
  rotation every receiver verifies with whichever secret it has. Any Standard Webhooks library
  (PyPI ``standardwebhooks``, npm ``standardwebhooks``, ...) verifies these callbacks.

For compatibility the older headers stay: ``X-Reframe-Event-Id`` always, and with
``REFRAME_CALLBACK_SIGNING_KEY`` ``X-Reframe-Signature: t=<unix seconds>,v1=<hex>`` where
``hex = HMAC-SHA256(key, f"{t}.{raw_body}")`` (:func:`verify`).

An endpoint that answers 410 Gone is disabled: its URL joins the Redis set
``P:callbacks:disabled``, checked before every delivery (:func:`is_disabled`); its callbacks are
given up at once and listed by ``reframe callbacks list``; :func:`enable` takes it out again.

Deliveries go through the guarded fetcher (``worker/contracts/netguard.py``): a ``callback_url`` that points
at loopback, a private network or cloud metadata (directly, by DNS, in any IP spelling) is refused
with :class:`BlockedURL` before any connection is made, and redirects are never followed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import redis

from config import Settings
from worker.contracts.keys import Keys
from worker.contracts.netguard import BlockedURL, GuardedFetcher

__all__ = [
    "BlockedURL",
    "callback_body",
    "deliver",
    "disable",
    "disabled_key",
    "disabled_urls",
    "enable",
    "is_disabled",
    "sign",
    "standard_headers",
    "standard_signature",
    "verify",
]


def standard_signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One Standard Webhooks signature: ``v1,<base64 HMAC-SHA256>`` under a ``whsec_`` secret."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def standard_headers(secrets: list[str], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """``webhook-id``, ``webhook-timestamp`` and (with secrets) ``webhook-signature``."""
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(timestamp)}
    if secrets:
        headers["webhook-signature"] = " ".join(
            standard_signature(secret, msg_id, timestamp, body) for secret in secrets
        )
    return headers


def disabled_key(keys: Keys) -> str:
    """SET ``P:callbacks:disabled``: callback URLs that answered 410 Gone."""
    return f"{keys.root}:callbacks:disabled"


def is_disabled(client: redis.Redis, keys: Keys, url: str) -> bool:
    """True when ``url`` answered 410 and has not been enabled again."""
    return bool(client.sismember(disabled_key(keys), url))


def disable(client: redis.Redis, keys: Keys, url: str) -> bool:
    """Disable ``url`` (it answered 410); True when it was not disabled yet."""
    return bool(client.sadd(disabled_key(keys), url))


def enable(client: redis.Redis, keys: Keys, url: str) -> bool:
    """Enable ``url`` again (an operator's decision); True when it was disabled."""
    return bool(client.srem(disabled_key(keys), url))


def disabled_urls(client: redis.Redis, keys: Keys) -> list[str]:
    """Every disabled callback URL, sorted."""
    return sorted(x.decode() if isinstance(x, bytes) else str(x) for x in client.smembers(disabled_key(keys)))


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
    settings: Settings,
    url: str,
    body: bytes,
    *,
    event_id: str,
    fetcher: GuardedFetcher | None = None,
    tenant: str = "",
) -> int:
    """POST one callback through the guarded fetcher; return the HTTP status.

    No redirect is followed (a 3xx is returned as the status), the answer is read up to
    ``REFRAME_CALLBACK_MAX_RESPONSE_BYTES`` and the whole call is bounded by
    ``REFRAME_CALLBACK_TIMEOUT_S``. Raises :class:`worker.contracts.netguard.BlockedURL` when the target is
    not allowed (a permanent failure: do not retry) and ``httpx.HTTPError`` on transport errors
    (transient). ``fetcher`` defaults to one built from ``settings`` for this call. The Standard
    Webhooks signatures use ``tenant``'s own secrets when it has some
    (``REFRAME_CALLBACK_TENANT_SECRETS``), else the cluster's.
    """
    now = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "X-Reframe-Event-Id": event_id,
        "User-Agent": "reframe-cluster-callback/1",
        **standard_headers(settings.callback_secrets_for(tenant), event_id, now, body),
    }
    if settings.callback_signing_key is not None:
        key = settings.callback_signing_key.get_secret_value().encode()
        headers["X-Reframe-Signature"] = sign(key, now, body)
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
