"""The outermost ASGI layer: classifies every call, records it in the ledger and applies scripted faults.

It sits in front of routing and auth on purpose: fal's ingress (nginx) errors and dropped connections happen
before the request reaches fal's application, so they carry no ``x-fal-request-id`` and no auth check.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from falemu.faults import HTTP_KINDS, Fault, default_fault_body, nginx_page
from falemu.ledger import DROPPED_STATUS

#: Scope key for the server's own ``send`` (stored before Starlette's error middleware wraps it).
RAW_SEND_KEY = "falemu.raw_send"
_NAMESPACES = frozenset({"workflows", "comfy"})
_REQUEST_TAIL = re.compile(r"^requests/([^/]+)(/status/stream|/status|/cancel)?/?$")


def split_app_path(path: str) -> tuple[str, str] | None:
    """``/{ns?}/{owner}/{app}/{rest}`` -> (``{ns?}/{owner}/{app}``, ``rest``); None if too short."""
    parts = [p for p in path.strip("/").split("/") if p]
    size = 3 if parts and parts[0] in _NAMESPACES else 2
    if len(parts) < size:
        return None
    return "/".join(parts[:size]), "/".join(parts[size:])


def classify(method: str, path: str) -> tuple[str, str | None]:
    """The ledger op of a call and the request id in its path (if any)."""
    if path.startswith("/_emulator/"):
        return "other", None
    if path == "/.well-known/jwks.json":
        return "jwks", None
    if path.startswith("/storage/auth/token"):
        return "token", None
    if path.startswith("/files/") and method == "PUT" and "/multipart/" in path:
        return "upload_part", None
    if path.startswith("/storage/upload/") or (path.startswith("/files/") and method in {"POST", "PUT"}):
        return "upload", None
    if path.startswith("/files/"):
        return "file", None
    split = split_app_path(path)
    if split is None:
        return "other", None
    if method == "POST":
        return "submit", None
    match = _REQUEST_TAIL.match(split[1])
    if match is None:
        return "other", None
    tail = match.group(2)
    op = {None: "result", "/status": "status", "/status/stream": "stream", "/cancel": "cancel"}[tail]
    expected = "PUT" if op == "cancel" else "GET"
    return (op if method == expected else "other"), match.group(1)


class GatewayMiddleware:
    """Ledger recording + scripted HTTP faults (``http``, ``drop``, ``slow``)."""

    def __init__(self, app: ASGIApp, state_getter: Callable[[], Any]) -> None:
        self.app = app
        self._state = state_getter  # the EmulatorState exists only once the lifespan has started

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self._state()
        exchange = _Exchange(state, scope["method"], scope["path"])
        fault = state.faults.take(exchange.op, HTTP_KINDS) if state is not None else None

        delay_s = fault.delay_s if fault is not None and fault.kind == "slow" else 0.0

        async def recording_send(message: Message) -> None:
            exchange.note(message)
            if message["type"] == "http.response.start":
                # Record before the client can see the answer (or give up waiting for a slow one): from then
                # on a test may read or reset the ledger.
                exchange.record()
                if delay_s > 0:
                    await asyncio.sleep(delay_s)
            await send(message)

        async def swallowing_send(message: Message) -> None:
            exchange.note(message)  # the work happened; the client never hears of it

        try:
            if fault is None or fault.kind == "slow":
                await self.app(scope, receive, recording_send)
            elif fault.kind == "drop":
                if fault.after_handling:
                    await self.app(scope, receive, swallowing_send)
                exchange.record(DROPPED_STATUS)
                await drop_connection(scope.get(RAW_SEND_KEY, send))
            else:
                if fault.delay_s > 0:
                    await asyncio.sleep(fault.delay_s)
                await _send_fault_response(fault, recording_send, exchange.request_id)
        except Exception:
            exchange.record(500)  # Starlette's error middleware (outside us) answers 500
            raise
        finally:
            exchange.record(DROPPED_STATUS)  # no-op unless nothing was sent at all


class _Exchange:
    """One HTTP call as the ledger sees it; recorded exactly once."""

    def __init__(self, state: Any, method: str, path: str) -> None:
        self.state = state
        self.t = time.time()
        self.method, self.path = method, path
        self.op, self.request_id = classify(method, path)
        self.status = DROPPED_STATUS
        # The control API is the test harness talking, not a client of fal: it stays out of the ledger.
        self.recorded = state is None or path.startswith("/_emulator/")

    def note(self, message: Message) -> None:
        """Pick the status and the request id out of a response start."""
        if message["type"] != "http.response.start":
            return
        self.status = message["status"]
        for name, value in message.get("headers", []):
            if name.lower() == b"x-fal-request-id" and self.request_id is None:
                self.request_id = value.decode()

    def record(self, status: int | None = None) -> None:
        """Append the ledger row (``status`` overrides the noted one)."""
        if self.recorded:
            return
        self.recorded = True
        self.state.ledger.record_http(
            t=self.t,
            method=self.method,
            path=self.path,
            op=self.op,
            status=self.status if status is None else status,
            request_id=self.request_id,
        )


async def drop_connection(send: Send) -> None:
    """Close the TCP connection without sending any response bytes.

    ASGI has no "abort" message, so we reach uvicorn's transport through its ``send`` (a bound method of the
    request cycle; ``send`` must be the server's own, see ``RAW_SEND_KEY``). With another server we fall
    back to a truncated response (headers announcing a body that never comes): also a broken connection.
    """
    cycle = getattr(send, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if transport is not None:
        transport.close()
        # Let connection_lost run so uvicorn marks the cycle disconnected and does not log a missing response.
        for _ in range(3):
            await asyncio.sleep(0)
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"100")]})


async def _send_fault_response(fault: Fault, send: Send, request_id: str | None) -> None:
    status = int(fault.status or 500)
    headers = {k.lower(): v for k, v in fault.headers.items()}
    if fault.nginx:
        body = (fault.text or nginx_page(status)).encode()
        headers.setdefault("content-type", "text/html")
        headers.setdefault("server", "nginx")
        headers.pop("x-fal-request-id", None)  # the marker fal-client uses to tell ingress errors apart
    else:
        if fault.text is not None:
            body = fault.text.encode()
            headers.setdefault("content-type", "text/plain; charset=utf-8")
        else:
            payload = fault.json if fault.json is not None else default_fault_body(status)
            body = json.dumps(payload).encode()
            headers.setdefault("content-type", "application/json")
            if isinstance(payload, dict) and payload.get("error_type"):
                headers.setdefault("x-fal-error-type", str(payload["error_type"]))
        headers.setdefault("x-fal-request-id", request_id or str(uuid.uuid4()))
    headers["content-length"] = str(len(body))
    raw = [(k.encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})
