"""Cancel: 202 while queued or running, 400 once completed, 404 when unknown; cancelled = 499 (§1.5)."""

from __future__ import annotations

import httpx

from falemu import EmulatorServer
from tests.emulator.helpers import status, submit, valid_input, wait_status


def _assert_cancelled(http: httpx.Client, sub: dict[str, object]) -> None:
    done = wait_status(http, sub, "COMPLETED")
    assert done["error_type"] == "client_cancelled"
    assert done["error"]
    result = http.get(str(sub["response_url"]))
    assert result.status_code == 499
    assert result.json()["error_type"] == "client_cancelled"
    assert result.headers["x-fal-error-type"] == "client_cancelled"


def test_cancel_in_queue(emu: EmulatorServer, http: httpx.Client, clip_url: str) -> None:
    emu.configure(concurrency=1, processing_time_s=1.5)
    running = submit(http, valid_input(clip_url))
    queued = submit(http, valid_input(clip_url))
    behind = submit(http, valid_input(clip_url))
    assert status(http, behind).json()["queue_position"] == 1
    response = http.put(queued["cancel_url"])
    assert response.status_code == 202
    assert response.json() == {"status": "CANCELLATION_REQUESTED"}
    _assert_cancelled(http, queued)
    assert status(http, behind).json()["queue_position"] == 0  # the cancelled one left the queue
    assert "picked up" not in str(status(http, queued, logs="1").json()["logs"])  # never ran
    http.put(running["cancel_url"])
    http.put(behind["cancel_url"])


def test_cancel_in_progress(emu: EmulatorServer, http: httpx.Client, clip_url: str) -> None:
    emu.configure(processing_time_s=5.0)
    sub = submit(http, valid_input(clip_url))
    wait_status(http, sub, "IN_PROGRESS")
    response = http.put(sub["cancel_url"])
    assert response.status_code == 202
    assert response.json()["status"] == "CANCELLATION_REQUESTED"
    _assert_cancelled(http, sub)  # ends well before the 5 s of processing


def test_cancel_completed_and_unknown(emu: EmulatorServer, http: httpx.Client, clip_url: str) -> None:
    sub = submit(http, valid_input(clip_url))
    wait_status(http, sub, "COMPLETED")
    response = http.put(sub["cancel_url"])
    assert response.status_code == 400
    assert response.json() == {"status": "ALREADY_COMPLETED"}
    assert http.get(sub["response_url"]).status_code == 200  # cancel did not touch the result
    unknown = http.put(sub["cancel_url"].replace(sub["request_id"], "00000000-0000-4000-8000-000000000000"))
    assert unknown.status_code == 404


def test_cancels_are_ledgered_and_not_billed(emu: EmulatorServer, http: httpx.Client, clip_url: str) -> None:
    emu.configure(processing_time_s=5.0)
    sub = submit(http, valid_input(clip_url))
    wait_status(http, sub, "IN_PROGRESS")
    http.put(sub["cancel_url"])
    wait_status(http, sub, "COMPLETED")
    http.put(sub["cancel_url"])
    ledger = emu.ledger()
    assert [(c["request_id"], c["status"]) for c in ledger["cancels"]] == [
        (sub["request_id"], "CANCELLATION_REQUESTED"),
        (sub["request_id"], "ALREADY_COMPLETED"),
    ]
    assert ledger["billed_seconds"] == 0 and ledger["billed_requests"] == 0
    assert ledger["cancelled"] == 1 and ledger["completed"] == 1
