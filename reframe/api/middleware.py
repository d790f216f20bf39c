"""ASGI middleware of the API: request metrics and access log, and the request body limit.

Both are plain ASGI (no ``BaseHTTPMiddleware``), so they add little to each request and do not
buffer streamed responses (SSE).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any, Final, Literal, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reframe.api.problems import body_too_large

access_log = logging.getLogger("reframe.api.access")

#: Latency buckets (seconds) of the request histogram: enqueue sits in the low milliseconds.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0)

#: What became of one fal webhook delivery (``reframe/api/fal_webhook.py``): recorded for a worker
#: (accepted), recognised by its request id (duplicate), refused for its URL token or its signature,
#: not recordable now (unavailable: JWKS or Redis down, fal retries) or webhooks are off (disabled).
FalWebhookOutcome = Literal[
    "accepted", "duplicate", "rejected_token", "rejected_signature", "unavailable", "disabled"
]
FAL_WEBHOOK_OUTCOMES: Final[tuple[FalWebhookOutcome, ...]] = get_args(FalWebhookOutcome)


class ApiMetrics:
    """Request count and latency by route template, method and status class (``2xx``...), fal
    webhook deliveries by outcome, and whether webhooks are on (``webhooks_on``).

    Labels never hold a key, a job id or a raw path: an unmatched path is ``route="unmatched"``.
    """

    def __init__(self, registry: CollectorRegistry, *, webhooks_on: bool = False) -> None:
        self.registry = registry
        self.requests = Counter(
            "reframe_api_requests",
            "HTTP API requests answered, by route template, method and status class.",
            ["route", "method", "status_class"],
            registry=registry,
        )
        self.latency = Histogram(
            "reframe_api_request_duration_seconds",
            "HTTP API request latency (to the end of the response body), by route template and method.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.fal_webhooks = Counter(
            "reframe_api_fal_webhooks",
            "fal completion webhooks received, by outcome: accepted, duplicate, rejected_token, "
            "rejected_signature, unavailable (JWKS or Redis down: 503, fal retries), disabled.",
            ["outcome"],
            registry=registry,
        )
        for outcome in FAL_WEBHOOK_OUTCOMES:  # born at 0, so rate() and alerts see the first one
            self.fal_webhooks.labels(outcome)
        self.fal_webhooks_enabled = Gauge(
            "reframe_api_fal_webhooks_enabled",
            "1 when REFRAME_PUBLIC_URL is set: submits ask fal for completion webhooks, so they are "
            "expected here (the alert ReframeFalWebhooksNotArriving uses it); else 0.",
            registry=registry,
        )
        self.fal_webhooks_enabled.set(1 if webhooks_on else 0)

    def fal_webhook(self, outcome: FalWebhookOutcome) -> None:
        """Count one fal webhook delivery by what became of it."""
        if outcome not in FAL_WEBHOOK_OUTCOMES:
            raise ValueError(f"unknown fal webhook outcome {outcome!r}")
        self.fal_webhooks.labels(outcome).inc()


class BodyTooLarge(Exception):
    """A request body went past its limit while being read."""

    def __init__(self, limit_bytes: int) -> None:
        super().__init__(f"body over {limit_bytes} bytes")
        self.limit_bytes = limit_bytes


class ObserveMiddleware:
    """Counts and times every request and writes one JSON access-log line (no keys, no bodies)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            elapsed_s = time.perf_counter() - start
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = str(scope.get("method", ""))
            self.metrics.requests.labels(route, method, f"{status // 100}xx").inc()
            self.metrics.latency.labels(route, method).observe(elapsed_s)
            if access_log.isEnabledFor(logging.INFO):
                principal = getattr(scope.get("state", {}).get("principal"), "key_id", None)
                tenant = getattr(scope.get("state", {}).get("principal"), "tenant", None)
                access_log.info(
                    json.dumps(
                        {
                            "method": method,
                            "route": route,
                            "status": status,
                            "duration_ms": round(elapsed_s * 1000, 2),
                            "key_id": principal,
                            "tenant": tenant,
                            "client": (scope.get("client") or ("", 0))[0],
                        },
                        separators=(",", ":"),
                    )
                )


class BodyLimitMiddleware:
    """Refuses request bodies past a limit with a 413 problem.

    A declared ``Content-Length`` over the limit is refused before the app runs; a body streamed
    past it raises :class:`BodyTooLarge` from ``receive`` (the app renders the 413).
    """

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(str(scope.get("path", "")))
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _drain_refusal(send, limit)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited_receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _drain_refusal(send: Send, limit: int) -> None:
    response: Any = body_too_large(limit).response()
    response.headers["Connection"] = "close"  # the unread body makes the connection unusable
    await response({"type": "http", "method": "POST", "path": "/", "headers": []}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
