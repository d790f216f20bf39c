"""Webhook delivery signed the way fal signs it (Ed25519), plus the JWKS that publishes the public key.

Signed message: ``request_id \\n user_id \\n timestamp \\n sha256hex(body)`` (UTF-8), signature sent as hex in
``X-Fal-Webhook-Signature``. A delivery counts as failed on a transport error or a non-2xx answer and is
retried after each of ``webhook_retry_delays_s`` (fal: 10 retries over ~2 h; we compress the schedule).
Webhook faults (``op: webhook`` in :mod:`falemu.faults`) drop, delay or duplicate a delivery.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed_message(request_id: str, user_id: str, timestamp: str, body: bytes) -> bytes:
    """The exact bytes fal signs for a webhook delivery."""
    digest = hashlib.sha256(body).hexdigest()
    return f"{request_id}\n{user_id}\n{timestamp}\n{digest}".encode()


class WebhookSigner:
    """An Ed25519 key pair: signs deliveries and describes itself as a JWKS."""

    def __init__(self, private_key_seed: bytes | None = None, user_id: str = "emulator-user") -> None:
        if private_key_seed is None:
            self._key = Ed25519PrivateKey.generate()
        else:
            self._key = Ed25519PrivateKey.from_private_bytes(private_key_seed)
        self.user_id = user_id
        raw = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self._public_raw = raw
        self.kid = hashlib.sha256(raw).hexdigest()[:16]

    def jwks(self) -> dict[str, Any]:
        """The ``/.well-known/jwks.json`` document."""
        return {
            "keys": [
                {
                    "kty": "OKP",
                    "crv": "Ed25519",
                    "x": _b64url(self._public_raw),
                    "kid": self.kid,
                    "use": "sig",
                    "alg": "EdDSA",
                }
            ]
        }

    def headers(self, request_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        """The four ``X-Fal-Webhook-*`` headers for a body."""
        ts = str(int(time.time()) if timestamp is None else timestamp)
        signature = self._key.sign(signed_message(request_id, self.user_id, ts, body)).hex()
        return {
            "X-Fal-Webhook-Request-Id": request_id,
            "X-Fal-Webhook-User-Id": self.user_id,
            "X-Fal-Webhook-Timestamp": ts,
            "X-Fal-Webhook-Signature": signature,
        }


def webhook_body(request_id: str, status_code: int, payload: Any) -> bytes:
    """fal's webhook JSON: OK with the output, or ERROR with ``Invalid status code: N`` and the error body."""
    ok = status_code < 400
    body: dict[str, Any] = {
        "request_id": request_id,
        # no server-side retries here, so the id of the last attempt is the queue id
        "gateway_request_id": request_id,
        "status": "OK" if ok else "ERROR",
        "payload": payload,
        "error": None if ok else f"Invalid status code: {status_code}",
    }
    return json.dumps(body, separators=(",", ":")).encode()


RecordAttempt = Callable[[str, str, int, "int | None", "str | None", "dict[str, str]", bytes], None]


async def deliver(
    client: httpx.AsyncClient,
    signer: WebhookSigner,
    *,
    url: str,
    request_id: str,
    body: bytes,
    retry_delays_s: list[float],
    timeout_s: float,
    record: RecordAttempt,
) -> bool:
    """POST ``body`` to ``url`` until a 2xx or the schedule runs out; each attempt is signed afresh."""
    for attempt in range(1 + len(retry_delays_s)):
        if attempt:
            await asyncio.sleep(retry_delays_s[attempt - 1])
        headers = {"Content-Type": "application/json", **signer.headers(request_id, body)}
        try:
            response = await client.post(url, content=body, headers=headers, timeout=timeout_s)
        except httpx.HTTPError as exc:
            record(request_id, url, attempt + 1, None, exc.__class__.__name__, headers, body)
            continue
        record(request_id, url, attempt + 1, response.status_code, None, headers, body)
        if 200 <= response.status_code < 300:
            return True
    return False
