"""The ledger and the rest of the control API (``/_emulator/*``)."""

from __future__ import annotations

import hashlib
import json
import time

import httpx

from falemu import EmulatorServer
from tests.emulator.helpers import APP, status, submit, valid_input, wait_status

LEDGER_KEYS = {"requests", "submits", "submissions", "max_in_progress", "max_open", "in_progress", "open",
               "billed_seconds", "billed_requests", "completed", "count_429", "cancels"}  # fmt: skip


def test_ledger_records_every_call_with_its_op(
    emu: EmulatorServer, http: httpx.Client, clip_url: str
) -> None:
    before = time.time()
    sub = submit(http, valid_input(clip_url))
    wait_status(http, sub, "COMPLETED")
    video = http.get(sub["response_url"]).json()["video"]
    with http.stream("GET", sub["status_url"] + "/stream") as response:
        response.read()
    http.put(sub["cancel_url"])
    httpx.get(video["url"])
    http.post("/storage/auth/token")
    http.post("/files/upload", content=b"x")
    httpx.get(f"{emu.url}/.well-known/jwks.json")
    ledger = emu.ledger()
    assert LEDGER_KEYS <= set(ledger)
    ops = [r["op"] for r in ledger["requests"]]
    for op in ("submit", "status", "result", "stream", "cancel", "file", "token", "upload", "jwks"):
        assert op in ops, op
    first = ledger["requests"][0]
    assert set(first) == {"t", "method", "path", "op", "status", "request_id"}
    assert (first["op"], first["method"], first["path"], first["status"]) == (
        "submit",
        "POST",
        f"/{APP}",
        200,
    )
    assert first["request_id"] == sub["request_id"]
    assert before <= first["t"] <= time.time()
    assert all(
        r["request_id"] == sub["request_id"] for r in ledger["requests"] if r["op"] in {"status", "result"}
    )


def test_fingerprints_billing_and_counts(emu: EmulatorServer, http: httpx.Client, clip_url: str) -> None:
    emu.configure(processing_time_s=0.5)
    payload = valid_input(clip_url)
    subs = [submit(http, payload) for _ in range(3)] + [submit(http, {"aspect_ratio": "1:1"})]
    for sub in subs:
        wait_status(http, sub, "COMPLETED")
    ledger = emu.ledger()
    fp = hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert ledger["submissions"][fp] == 3
    assert sum(ledger["submissions"].values()) == 4
    assert [s["request_id"] for s in ledger["submits"]] == [s["request_id"] for s in subs]
    keys = {"t", "request_id", "fingerprint", "store_io", "output_expiration_s"}
    assert all(set(s) == keys for s in ledger["submits"])
    assert ledger["billed_requests"] == 3
    assert abs(ledger["billed_seconds"] - 3 * 2.0) < 0.2  # output duration of the 2 s clip, failures free
    assert ledger["completed"] == 4
    assert (ledger["max_open"], ledger["max_in_progress"]) == (4, 2)


def test_reset_clears_requests_ledger_and_faults_but_keeps_config(
    emu: EmulatorServer, http: httpx.Client, clip_url: str
) -> None:
    emu.configure(concurrency=1, processing_time_s=2.0)
    sub = submit(http, valid_input(clip_url))
    emu.set_faults([{"op": "submit", "kind": "http", "status": 429}])
    emu.reset()
    assert status(http, sub).status_code == 404
    ledger = emu.ledger()
    assert ledger["submits"] == [] and ledger["open"] == 0
    assert [r["op"] for r in ledger["requests"]] == [
        "status"
    ]  # only calls after the reset, control API excluded
    assert http.post(f"/{APP}", json={}).status_code == 200  # the fault is gone
    assert httpx.get(f"{emu.url}/_emulator/config").json()["concurrency"] == 1


def test_configure_returns_the_runtime_config(emu: EmulatorServer) -> None:
    config = emu.configure(submit_rate_per_s=5, valid_keys=["a:b"], webhook_retry_delays_s=[1, 2])
    assert config["submit_rate_per_s"] == 5.0
    assert config["valid_keys"] == ["a:b"]
    assert config["webhook_retry_delays_s"] == [1.0, 2.0]
    assert emu.configure(submit_rate_per_s=None, valid_keys=None)["valid_keys"] is None
