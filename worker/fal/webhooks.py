"""fal's completion webhooks as we use them: the URL we register, and fal's signature check.

The URL (``fal_webhook`` on the submit, docs/fal-wire-protocol.md §4) is
``<REFRAME_PUBLIC_URL>/v1/fal/webhook?t=<token>``. The token names the job and the attempt that
submitted, with an HMAC under ``REFRAME_WEBHOOK_SECRET``, so nobody can forge one and a webhook
tells which attempt it belongs to even when that attempt never saw fal's answer (an ambiguous submit).

fal signs every delivery with Ed25519 over ``request_id \\n user_id \\n timestamp \\n
sha256hex(raw body)`` (headers ``X-Fal-Webhook-Request-Id``, ``-User-Id``, ``-Timestamp``,
``-Signature`` in hex), with keys published as a JWKS (``REFRAME_FAL_JWKS_URL``). A delivery is
accepted when any published key verifies it and its timestamp is within
``REFRAME_WEBHOOK_TOLERANCE_S`` of now; the JWKS is cached for ``REFRAME_WEBHOOK_JWKS_CACHE_S``
and fetched again (at most once a minute) when a signature does not verify, since keys rotate.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from config import Settings

WEBHOOK_PATH = "/v1/fal/webhook"
#: Least time between two JWKS fetches caused by a signature that did not verify (forged requests
#: must not turn into a flood of JWKS fetches).
JWKS_REFETCH_MIN_S = 60.0
HEADER_REQUEST_ID = "x-fal-webhook-request-id"
HEADER_USER_ID = "x-fal-webhook-user-id"
HEADER_TIMESTAMP = "x-fal-webhook-timestamp"
HEADER_SIGNATURE = "x-fal-webhook-signature"


# ---------------------------------------------------------------------- attempt tokens
def _token_mac(secret: bytes, job_id: str, attempt: str) -> str:
    mac = hmac.new(secret, f"{job_id}:{attempt}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac[:18]).decode()


def _secret(settings: Settings) -> bytes:
    if settings.webhook_secret is None:
        raise ValueError("REFRAME_WEBHOOK_SECRET is not set")
    return settings.webhook_secret.get_secret_value().encode()


def attempt_token(settings: Settings, job_id: str, attempt: str) -> str:
    """``<job id>.<attempt>.<mac>``: names the submitting attempt; only we can make one."""
    return f"{job_id}.{attempt}.{_token_mac(_secret(settings), job_id, attempt)}"


def read_token(settings: Settings, token: str) -> tuple[str, str] | None:
    """(job id, attempt) of a token made by :func:`attempt_token`, or None when it is not ours."""
    try:
        rest, mac = token.rsplit(".", 1)
        job_id, attempt = rest.rsplit(".", 1)
    except ValueError:
        return None
    if not job_id or not attempt:
        return None
    if not hmac.compare_digest(_token_mac(_secret(settings), job_id, attempt), mac):
        return None
    return job_id, attempt


def webhook_url(settings: Settings, job_id: str, attempt: str) -> str | None:
    """The ``fal_webhook`` URL for one attempt's submit (None when webhooks are off)."""
    if not settings.public_url:
        return None
    token = quote(attempt_token(settings, job_id, attempt), safe="")
    return f"{settings.public_url}{WEBHOOK_PATH}?t={token}"


# ---------------------------------------------------------------------- fal's signature
def signed_message(request_id: str, user_id: str, timestamp: str, body: bytes) -> bytes:
    """The bytes fal signs for one delivery."""
    return f"{request_id}\n{user_id}\n{timestamp}\n{hashlib.sha256(body).hexdigest()}".encode()


class WebhookRejected(Exception):
    """A delivery that is not fal's (bad or missing signature, stale timestamp)."""


@dataclass(frozen=True)
class FalWebhook:
    """One verified delivery: fal's request id and its parsed JSON body."""

    request_id: str
    body: dict[str, Any]

    @property
    def ok(self) -> bool:
        """fal's ``status`` is ``OK`` (the model answered 2xx)."""
        return self.body.get("status") == "OK"

    @property
    def status_code(self) -> int | None:
        """The HTTP status fal saw from the model, from ``error: "Invalid status code: N"`` (None if OK)."""
        if self.ok:
            return None
        error = str(self.body.get("error") or "")
        digits = error.rsplit(":", 1)[-1].strip()
        return int(digits) if digits.isdigit() else None


def _public_keys(jwks: Mapping[str, Any]) -> list[Ed25519PublicKey]:
    keys = []
    for jwk in jwks.get("keys") or []:
        if not isinstance(jwk, dict) or jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
            continue
        x = str(jwk.get("x") or "")
        try:
            raw = base64.urlsafe_b64decode(x + "=" * (-len(x) % 4))
            keys.append(Ed25519PublicKey.from_public_bytes(raw))
        except (ValueError, binascii.Error):
            continue
    return keys


class FalWebhookVerifier:
    """Checks fal's webhook signatures against its JWKS (cached; one per process)."""

    def __init__(
        self,
        settings: Settings,
        *,
        http: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = settings.fal_jwks_url
        self.cache_s = settings.webhook_jwks_cache_s
        self.tolerance_s = settings.webhook_tolerance_s
        self._http = http
        self._clock = clock
        self._keys: list[Ed25519PublicKey] = []
        self._fetched_at: float | None = None
        self._lock = asyncio.Lock()

    async def _fetch(self) -> None:
        own = self._http is None
        client = self._http or httpx.AsyncClient(timeout=10.0)
        try:
            response = await client.get(self.url)
            response.raise_for_status()
            self._keys = _public_keys(response.json())
            self._fetched_at = self._clock()
        finally:
            if own:
                await client.aclose()

    async def keys(self, *, refresh: bool = False) -> list[Ed25519PublicKey]:
        """The cached keys, fetched when stale (or when ``refresh`` and the last fetch is a minute old)."""
        async with self._lock:
            now = self._clock()
            age = None if self._fetched_at is None else now - self._fetched_at
            if age is None or age >= self.cache_s or (refresh and age >= JWKS_REFETCH_MIN_S):
                await self._fetch()
            return list(self._keys)

    async def verify(self, headers: Mapping[str, str], body: bytes) -> FalWebhook:
        """The verified delivery, or :class:`WebhookRejected` (``headers`` looked up lower-case)."""
        request_id = headers.get(HEADER_REQUEST_ID, "")
        user_id = headers.get(HEADER_USER_ID, "")
        timestamp = headers.get(HEADER_TIMESTAMP, "")
        signature_hex = headers.get(HEADER_SIGNATURE, "")
        if not (request_id and user_id and timestamp and signature_hex):
            raise WebhookRejected("missing X-Fal-Webhook-* headers")
        try:
            ts = int(timestamp)
            signature = bytes.fromhex(signature_hex)
        except ValueError:
            raise WebhookRejected("malformed timestamp or signature") from None
        if abs(self._clock() - ts) > self.tolerance_s:
            raise WebhookRejected("timestamp outside the tolerance")
        message = signed_message(request_id, user_id, timestamp, body)
        if not self._any_verifies(await self.keys(), signature, message) and not self._any_verifies(
            await self.keys(refresh=True), signature, message
        ):
            raise WebhookRejected("signature does not verify with any published key")
        try:
            parsed = json.loads(body)
        except ValueError:
            raise WebhookRejected("body is not JSON") from None
        if not isinstance(parsed, dict) or parsed.get("request_id") != request_id:
            raise WebhookRejected("body does not name the signed request id")
        return FalWebhook(request_id=request_id, body=parsed)

    @staticmethod
    def _any_verifies(keys: list[Ed25519PublicKey], signature: bytes, message: bytes) -> bool:
        for key in keys:
            try:
                key.verify(signature, message)
            except InvalidSignature:
                continue
            return True
        return False


__all__ = [
    "WEBHOOK_PATH",
    "FalWebhook",
    "FalWebhookVerifier",
    "WebhookRejected",
    "attempt_token",
    "read_token",
    "signed_message",
    "webhook_url",
]
