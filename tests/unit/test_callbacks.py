"""Signed callbacks: HMAC-SHA256 over timestamp and body; receivers can verify and reject tampering."""

from __future__ import annotations

import json

import httpx

from config import load_settings
from worker.callbacks import callback_body, deliver, sign, verify
from worker.contracts.netguard import GuardedFetcher


def test_signature_round_trip_and_tamper_detection() -> None:
    key, body = b"k3y", b'{"job_id":"j"}'
    header = sign(key, 1_800_000_000, body)
    assert header.startswith("t=1800000000,v1=")
    assert verify(key, header, body, now_s=1_800_000_010)
    assert not verify(key, header, body + b" ", now_s=1_800_000_010)
    assert not verify(b"other", header, body, now_s=1_800_000_010)
    assert not verify(key, header, body, now_s=1_800_001_000), "stale timestamps are rejected"
    assert not verify(key, "garbage", body)


def test_deliver_posts_the_signed_body_without_leaking_the_key() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    settings = load_settings({"REFRAME_CALLBACK_SIGNING_KEY": "sekret"})
    rec = {
        "id": "j1",
        "state": "SUCCEEDED",
        "metadata": {"a": 1},
        "cost_actual_micro": 150000,
        "result": {"video": {"url": "https://cdn/x.mp4"}},
    }
    body = callback_body(rec)
    fetcher = GuardedFetcher(
        resolver=lambda host, port: ["93.184.215.14"], transport_factory=lambda: httpx.MockTransport(handler)
    )
    with fetcher:
        assert deliver(settings, "https://hooks.test/cb", body, event_id="j1", fetcher=fetcher) == 204
    request = seen[0]
    assert json.loads(request.content)["video"]["url"] == "https://cdn/x.mp4"
    assert json.loads(request.content)["cost_usd"] == 0.15
    assert verify(b"sekret", request.headers["X-Reframe-Signature"], request.content)
    assert "sekret" not in str(request.headers)
