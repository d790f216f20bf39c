"""Webhooks: fal's body, Ed25519 signature verifiable with the JWKS, retries on non-2xx (§4)."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from falemu import EmulatorServer
from tests.emulator.helpers import APP, submit, valid_input, wait_until


class Receiver:
    """A loopback webhook endpoint that records deliveries and answers scripted status codes."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[dict[str, str], bytes]] = []
        self.codes: list[int] = []  # answers for the next deliveries; 200 when empty
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.deliveries.append(({k.lower(): v for k, v in self.headers.items()}, body))
                code = receiver.codes.pop(0) if receiver.codes else 200
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?x=1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    yield rec
    rec.close()


def verify(jwks: dict[str, Any], headers: dict[str, str], body: bytes) -> bool:
    """Verify a delivery the way a fal webhook consumer does."""
    timestamp = headers["x-fal-webhook-timestamp"]
    assert abs(time.time() - int(timestamp)) <= 300
    message = "\n".join([headers["x-fal-webhook-request-id"], headers["x-fal-webhook-user-id"], timestamp,
                         hashlib.sha256(body).hexdigest()]).encode()  # fmt: skip
    signature = bytes.fromhex(headers["x-fal-webhook-signature"])
    for key in jwks["keys"]:
        raw = base64.urlsafe_b64decode(key["x"] + "=" * (-len(key["x"]) % 4))
        try:
            Ed25519PublicKey.from_public_bytes(raw).verify(signature, message)
            return True
        except InvalidSignature:
            continue
    return False


def test_success_webhook_is_signed_and_verifiable(
    emu: EmulatorServer, http: httpx.Client, clip_url: str, receiver: Receiver
) -> None:
    sub = submit(http, valid_input(clip_url), params={"fal_webhook": receiver.url})
    wait_until(lambda: receiver.deliveries, what="webhook delivery")
    headers, body = receiver.deliveries[0]
    jwks = httpx.get(f"{emu.url}/.well-known/jwks.json").json()
    assert jwks["keys"][0]["kty"] == "OKP" and jwks["keys"][0]["crv"] == "Ed25519"
    assert verify(jwks, headers, body)
    assert not verify(jwks, headers, body + b" ")  # tampering breaks it
    payload = json.loads(body)
    assert payload["request_id"] == sub["request_id"] == headers["x-fal-webhook-request-id"]
    assert payload["gateway_request_id"]
    assert payload["status"] == "OK"
    assert payload["error"] is None
    assert payload["payload"] == http.get(sub["response_url"]).json()


def test_error_webhook_carries_the_422(http: httpx.Client, receiver: Receiver) -> None:
    submit(http, {"aspect_ratio": "9:16"}, params={"fal_webhook": receiver.url})
    wait_until(lambda: receiver.deliveries, what="webhook delivery")
    payload = json.loads(receiver.deliveries[0][1])
    assert payload["status"] == "ERROR"
    assert payload["error"] == "Invalid status code: 422"
    assert payload["payload"]["detail"][0]["loc"] == ["body", "video_url"]


def test_non_2xx_is_retried_on_the_schedule(
    emu: EmulatorServer, http: httpx.Client, receiver: Receiver
) -> None:
    receiver.codes = [500, 404]
    sub = submit(http, {}, params={"fal_webhook": receiver.url})
    wait_until(lambda: len(receiver.deliveries) == 3, what="three attempts")
    bodies = {body for _, body in receiver.deliveries}
    assert len(bodies) == 1  # the same body each time, signed afresh
    attempts = [
        (w["attempt"], w["status"]) for w in emu.ledger()["webhooks"] if w["request_id"] == sub["request_id"]
    ]
    assert attempts == [(1, 500), (2, 404), (3, 200)]


def test_delivery_gives_up_after_the_schedule(
    emu: EmulatorServer, http: httpx.Client, receiver: Receiver
) -> None:
    receiver.codes = [503] * 10
    submit(http, {}, params={"fal_webhook": receiver.url})
    # DEFAULTS: three retry delays, so four attempts in all
    wait_until(lambda: len(emu.ledger()["webhooks"]) == 4, what="four attempts")
    assert len(receiver.deliveries) == 4


def test_unreachable_webhook_is_recorded(emu: EmulatorServer, http: httpx.Client) -> None:
    emu.configure(webhook_retry_delays_s=[])
    submit(http, {}, params={"fal_webhook": "http://127.0.0.1:9/hook"})
    rows = wait_until(lambda: emu.ledger()["webhooks"], what="a failed attempt")
    assert rows[0]["status"] is None and rows[0]["error"]
    assert f"/{APP}" in [r["path"] for r in emu.ledger()["requests"]]
