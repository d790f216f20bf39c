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
        t = time.time()
        method, path = scope["method"], scope["path"]
        op, request_id = classify(method, path)
        seen: dict[str, Any] = {"status": DROPPED_STATUS, "request_id": request_id}

        def note(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                for name, value in message.get("headers", []):
                    if name.lower() == b"x-fal-request-id" and seen["request_id"] is None:
                        seen["request_id"] = value.decode()

        async def recording_send(message: Message) -> None:
            note(message)
            await send(message)

        async def swallowing_send(message: Message) -> None:
            note(message)  # the work happened and is recorded; the client never hears of it

        fault = state.faults.take(op, HTTP_KINDS) if state is not None else None
        try:
            if fault is None:
                await self.app(scope, receive, recording_send)
            elif fault.kind == "slow":
                await self.app(scope, receive, _delayed(recording_send, fault.delay_s))
            elif fault.kind == "drop":
                if fault.after_handling:
                    await self.app(scope, receive, swallowing_send)
                seen["status"] = DROPPED_STATUS
                await drop_connection(scope.get(RAW_SEND_KEY, send))
            else:
                if fault.delay_s > 0:
                    await asyncio.sleep(fault.delay_s)
                await _send_fault_response(fault, recording_send, request_id)
        finally:
            # The control API is the test harness talking, not a client of fal: it stays out of the ledger.
            if state is not None and not path.startswith("/_emulator/"):
                state.ledger.record_http(
                    t=t, method=method, path=path, op=op, status=seen["status"], request_id=seen["request_id"]
                )


def _delayed(send: Send, delay_s: float) -> Send:
    async def delayed_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            await asyncio.sleep(delay_s)
        await send(message)

    return delayed_send


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
