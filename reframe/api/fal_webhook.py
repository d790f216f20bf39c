"""``POST /v1/fal/webhook``: fal's completion webhooks (issue #12).

fal POSTs the end of every request submitted with ``fal_webhook`` (docs/fal-wire-protocol.md §4)
to ``<REFRAME_PUBLIC_URL>/v1/fal/webhook?t=<attempt token>``. This route:

1. checks the token of the URL (an HMAC under ``REFRAME_WEBHOOK_SECRET`` naming job and attempt);
2. verifies fal's Ed25519 signature over request id, user id, timestamp and the SHA-256 of the
   *raw* body, with the keys of ``REFRAME_FAL_JWKS_URL`` (cached), refusing timestamps outside
   ``REFRAME_WEBHOOK_TOLERANCE_S``;
3. records the delivery once per fal request id and queues a ``reframe.webhook`` task in one
   Redis script (:class:`worker.webhooks.WebhookInbox`); a worker finishes the job through the
   fenced lifecycle.

Answers: 204 recorded (or a duplicate: fal stops retrying either way), 401 for anything not
proven to be fal's webhook for one of our attempts (nothing is written), 503 when Redis is
unreachable (fal retries). No secret and no body is ever logged. Each delivery is counted in
``reframe_api_fal_webhooks_total{outcome}`` (:class:`reframe.api.middleware.ApiMetrics`).

Wiring: the ``reframe serve`` app (``reframe/api/app.py``) includes :data:`router`, which finds the
settings and Redis client on ``app.state.services`` (``.settings``, ``.r``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import redis
from fastapi import APIRouter, Request, Response

from config import Settings
from reframe.api.middleware import ApiMetrics, FalWebhookOutcome
from worker.fal.webhooks import WEBHOOK_PATH, FalWebhookVerifier, WebhookRejected, read_token
from worker.webhooks import WebhookInbox

log = logging.getLogger(__name__)


@dataclass
class FalWebhookReceiver:
    """The verifier (with its JWKS cache) and the inbox of one process; ``metrics`` (the app's
    :class:`ApiMetrics`, when there is one) counts every delivery by outcome."""

    settings: Settings
    verifier: FalWebhookVerifier
    inbox: WebhookInbox
    metrics: ApiMetrics | None = None

    @classmethod
    def build(
        cls, settings: Settings, client: redis.Redis, metrics: ApiMetrics | None = None
    ) -> FalWebhookReceiver:
        """A receiver for ``settings`` writing to ``client``."""
        return cls(settings, FalWebhookVerifier(settings), WebhookInbox(client, settings), metrics)

    def _answer(self, outcome: FalWebhookOutcome, status: int) -> Response:
        if self.metrics is not None:
            self.metrics.fal_webhook(outcome)
        return Response(status_code=status)

    async def receive(self, request: Request) -> Response:
        """Handle one delivery (see the module docstring for the answers)."""
        if self.settings.webhook_secret is None:
            return self._answer("disabled", 404)
        body = await request.body()
        token = request.query_params.get("t", "")
        owner = read_token(self.settings, token) if token else None
        if owner is None:
            log.warning("fal webhook refused: missing or invalid attempt token")
            return self._answer("rejected_token", 401)
        try:
            hook = await self.verifier.verify(request.headers, body)
        except WebhookRejected as why:
            log.warning("fal webhook for job %s refused: %s", owner[0], why)
            return self._answer("rejected_signature", 401)
        except Exception:
            log.warning("fal webhook for job %s: JWKS unavailable", owner[0], exc_info=True)
            return self._answer("unavailable", 503)
        job_id, attempt = owner
        try:
            fresh = await asyncio.to_thread(
                self.inbox.accept, hook, body, job_id=job_id, attempt=attempt, now_ms=int(time.time() * 1000)
            )
        except redis.RedisError:
            log.warning("fal webhook %s for job %s not recorded: Redis unavailable", hook.request_id, job_id)
            return self._answer("unavailable", 503)
        log.info(
            "fal webhook %s for job %s attempt %s: %s",
            hook.request_id,
            job_id,
            attempt,
            "queued" if fresh else "duplicate",
        )
        return self._answer("accepted" if fresh else "duplicate", 204)


def _receiver_of(request: Request) -> FalWebhookReceiver:
    state: Any = request.app.state
    found = getattr(state, "fal_webhook_receiver", None)
    if found is None:
        services = state.services
        metrics = getattr(state, "metrics", None)  # the app's ApiMetrics (reframe/api/app.py)
        found = FalWebhookReceiver.build(services.settings, services.r, metrics)
        state.fal_webhook_receiver = found
    assert isinstance(found, FalWebhookReceiver)
    return found


router = APIRouter()


@router.post(WEBHOOK_PATH, status_code=204, include_in_schema=False)
async def fal_webhook(request: Request) -> Response:
    """fal's completion webhook (settings and Redis from ``app.state.services``)."""
    return await _receiver_of(request).receive(request)


__all__ = ["FalWebhookReceiver", "router"]
