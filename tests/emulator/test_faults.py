"""Scripted faults (``POST /_emulator/faults``), rate limits, queue length and result expiry."""

from __future__ import annotations

import time

import httpx
import pytest

from falemu import EmulatorServer
from tests.emulator.helpers import APP, status, submit, valid_input, wait_status, wait_until


@pytest.mark.parametrize(("code", "headers"), [(429, {"Retry-After": "2"}), (429, {}), (408, {}), (409, {})])
def test_http_fault_on_submit(
    emu: EmulatorServer, http: httpx.Client, code: int, headers: dict[str, str]
) -> None:
    emu.set_faults([{"op": "submit", "kind": "http", "status": code, "headers": headers}])
    response = http.post(f"/{APP}", json={})
    assert response.status_code == code
    assert response.headers.get("retry-after") == headers.get("Retry-After")
    assert "x-fal-request-id" in response.headers
    assert http.post(f"/{APP}", json={}).status_code == 200  # times=1: consumed
    ledger = emu.ledger()
    assert len(ledger["submits"]) == 1  # the faulted call created nothing
    assert ledger["count_429"] == (1 if code == 429 else 0)


@pytest.mark.parametrize("code", [502, 503, 504])
def test_nginx_ingress_errors_have_no_request_id(emu: EmulatorServer, http: httpx.Client, code: int) -> None:
    emu.set_faults([{"op": "any", "kind": "http", "status": code, "nginx": True}])
    response = http.post(f"/{APP}", json={})
    assert response.status_code == code
    assert "nginx" in response.text
    assert response.headers["content-type"].startswith("text/html")
    assert "x-fal-request-id" not in response.headers


@pytest.mark.parametrize(
    ("code", "error_type"), [(500, "internal_error"), (503, "runner_scheduling_failure")]
)
def test_json_5xx_carries_request_id(
    emu: EmulatorServer, http: httpx.Client, code: int, error_type: str
) -> None:
    emu.set_faults([{"op": "submit", "kind": "http", "status": code}])
    response = http.post(f"/{APP}", json={})
    assert response.status_code == code
    assert response.headers["x-fal-request-id"]
    assert response.json()["error_type"] == error_type
    assert response.headers["x-fal-error-type"] == error_type


def test_custom_json_and_text_bodies(emu: EmulatorServer, http: httpx.Client) -> None:
    emu.set_faults([
        {"op": "submit", "kind": "http", "status": 504, "json": {"detail": "x"},
         "headers": {"X-Fal-Request-Timeout-Type": "user"}},
        {"op": "submit", "kind": "http", "status": 500, "text": "plain"},
    ])  # fmt: skip
    first = http.post(f"/{APP}", json={})
    assert (first.status_code, first.json(), first.headers["x-fal-request-timeout-type"]) == (
        504,
        {"detail": "x"},
        "user",
    )
    second = http.post(f"/{APP}", json={})
    assert (second.status_code, second.text) == (500, "plain")


def test_faults_match_their_op_in_fifo_order(emu: EmulatorServer, http: httpx.Client) -> None:
    sub = submit(http, {})
    emu.set_faults([
        {"op": "result", "kind": "http", "status": 500},
        {"op": "status", "kind": "http", "status": 409},
        {"op": "status", "kind": "http", "status": 408},
    ])  # fmt: skip
    assert status(http, sub).status_code == 409
    assert status(http, sub).status_code == 408
    assert status(http, sub).status_code in {200, 202}
    assert http.get(sub["response_url"]).status_code == 500
    assert http.get(f"{emu.url}/_emulator/faults").json()["faults"] == []


def test_times_minus_one_lasts_until_cleared(emu: EmulatorServer, http: httpx.Client) -> None:
    emu.set_faults([{"op": "cancel", "kind": "http", "status": 503, "nginx": True, "times": -1}])
    sub = submit(http, {})
    assert [http.put(sub["cancel_url"]).status_code for _ in range(3)] == [503, 503, 503]
    emu.clear_faults()
    assert http.put(sub["cancel_url"]).status_code in {202, 400}


def test_slow_response(emu: EmulatorServer, http: httpx.Client) -> None:
    emu.set_faults([{"op": "submit", "kind": "slow", "delay_s": 0.5}])
    started = time.monotonic()
    response = http.post(f"/{APP}", json={})
    assert response.status_code == 200
    assert time.monotonic() - started >= 0.5
    with pytest.raises(httpx.ReadTimeout):  # a client with a shorter timeout gives up...
        emu.set_faults([{"op": "submit", "kind": "slow", "delay_s": 0.6}])
        http.post(f"/{APP}", json={}, timeout=0.2)
    # ...but the request was accepted anyway (the work happens before the delay)
    wait_until(lambda: len(emu.ledger()["submits"]) == 2, what="both slow submits accepted")


def test_drop_closes_without_response(emu: EmulatorServer, http: httpx.Client) -> None:
    emu.set_faults([{"op": "submit", "kind": "drop"}])
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        http.post(f"/{APP}", json={})
    ledger = emu.ledger()
    assert ledger["submits"] == []
    assert [r["status"] for r in ledger["requests"] if r["op"] == "submit"] == [0]
    assert http.post(f"/{APP}", json={}).status_code == 200  # the server is fine afterwards


def test_drop_after_handling_creates_the_request(emu: EmulatorServer, http: httpx.Client) -> None:
    emu.set_faults([{"op": "submit", "kind": "drop", "after_handling": True}])
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        http.post(f"/{APP}", json={"x": 1})
    ledger = emu.ledger()
    assert len(ledger["submits"]) == 1
    submit_row = next(r for r in ledger["requests"] if r["op"] == "submit")
    assert submit_row["status"] == 0 and submit_row["request_id"] == ledger["submits"][0]["request_id"]


def test_drop_on_stream(emu: EmulatorServer, http: httpx.Client) -> None:
    sub = submit(http, {})
    emu.set_faults([{"op": "stream", "kind": "drop"}])
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        http.get(sub["status_url"] + "/stream")


def test_runner_error(emu: EmulatorServer, http: httpx.Client, clip_url: str) -> None:
    emu.set_faults([{"op": "submit", "kind": "runner_error", "error_type": "runner_disconnected"}])
    failed = submit(http, valid_input(clip_url))
    fine = submit(http, valid_input(clip_url))
    done = wait_status(http, failed, "COMPLETED")
    assert done["error_type"] == "runner_disconnected"
    assert done["error"] == "Runner disconnected"
    result = http.get(failed["response_url"])
    assert result.status_code == 503
    assert result.json() == {"detail": "Runner disconnected", "error_type": "runner_disconnected"}
    assert result.headers["x-fal-error-type"] == "runner_disconnected"
    wait_status(http, fine, "COMPLETED")
    assert http.get(fine["response_url"]).status_code == 200
    ledger = emu.ledger()
    assert ledger["failed"] == 1 and ledger["billed_requests"] == 1


def test_runner_error_with_explicit_status(emu: EmulatorServer, http: httpx.Client, clip_url: str) -> None:
    emu.set_faults([{"op": "submit", "kind": "runner_error", "error_type": "request_timeout"}])
    sub = submit(http, valid_input(clip_url))
    wait_status(http, sub, "COMPLETED")
    assert http.get(sub["response_url"]).status_code == 504


def test_expire_result_on_demand(emu: EmulatorServer, http: httpx.Client, clip_url: str) -> None:
    sub = submit(http, valid_input(clip_url))
    wait_status(http, sub, "COMPLETED")
    emu.set_faults([{"op": "result", "kind": "expire_result"}])
    assert http.get(sub["response_url"]).status_code == 404
    assert http.get(sub["response_url"]).status_code == 404  # stays expired
    assert status(http, sub).json()["status"] == "COMPLETED"


def test_result_ttl(emu: EmulatorServer, http: httpx.Client, clip_url: str) -> None:
    emu.configure(result_ttl_s=0.3)
    sub = submit(http, valid_input(clip_url))
    wait_status(http, sub, "COMPLETED")
    wait_until(lambda: http.get(sub["response_url"]).status_code == 404, timeout_s=5, what="result expiry")


def test_submit_rate_limit(emu: EmulatorServer, http: httpx.Client) -> None:
    emu.configure(submit_rate_per_s=2.0, submit_burst=3)
    codes = [http.post(f"/{APP}", json={}) for _ in range(5)]
    assert [r.status_code for r in codes] == [200, 200, 200, 429, 429]
    assert int(codes[3].headers["retry-after"]) >= 1
    assert emu.ledger()["count_429"] == 2
    # one token refills after 0.5 s at 2/s
    wait_until(lambda: http.post(f"/{APP}", json={}).status_code == 200, timeout_s=3, what="a refilled token")


def test_max_queue_length_config_and_query(emu: EmulatorServer, http: httpx.Client, clip_url: str) -> None:
    emu.configure(concurrency=1, processing_time_s=3.0, max_queue_length=2)
    subs = [http.post(f"/{APP}", json=valid_input(clip_url)) for _ in range(4)]
    # one running, two queued, the fourth finds the queue full
    assert [r.status_code for r in subs] == [200, 200, 200, 429]
    emu.configure(max_queue_length=None)
    limited = http.post(f"/{APP}", json={}, params={"fal_max_queue_length": "1"})
    assert limited.status_code == 429
    assert http.post(f"/{APP}", json={}, params={"fal_max_queue_length": "5"}).status_code == 200
    for response in subs[:3]:
        http.put(response.json()["cancel_url"])


def test_bad_fault_specs_are_rejected(emu: EmulatorServer) -> None:
    for bad in (
        {"kind": "nope"},
        {"op": "nope", "kind": "drop"},
        {"kind": "http"},
        {"kind": "drop", "times": 0},
        {"kind": "drop", "colour": "red"},
    ):
        assert httpx.post(f"{emu.url}/_emulator/faults", json={"faults": [bad]}).status_code == 400
    assert httpx.post(f"{emu.url}/_emulator/config", json={"concurrency": 0}).status_code == 400
    assert httpx.post(f"{emu.url}/_emulator/config", json={"x264_preset": "slow"}).status_code == 400
