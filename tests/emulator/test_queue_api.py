"""Queue API shape: submit, status (poll and stream), result, URL layout and headers (docs/fal-wire-protocol.md §1, §9)."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from falemu import EmulatorServer
from tests.emulator.helpers import APP, status, submit, valid_input, wait_status, wait_until


def test_submit_returns_fal_shape_and_owner_app_urls(
    emu: EmulatorServer, http: httpx.Client, clip_url: str
) -> None:
    response = http.post(f"/{APP}", json=valid_input(clip_url))
    assert response.status_code == 200
    body = response.json()
    request_id = body["request_id"]
    assert uuid.UUID(request_id).version == 4
    assert response.headers["x-fal-request-id"] == request_id
    assert body["status"] == "IN_QUEUE"
    assert isinstance(body["queue_position"], int)
    root = f"{emu.url}/fal-ai/luma-dream-machine/requests/{request_id}"
    assert body["response_url"] == root
    assert body["status_url"] == root + "/status"
    assert body["cancel_url"] == root + "/cancel"


@pytest.mark.parametrize(
    ("path", "prefix"),
    [
        ("fal-ai/luma-dream-machine", "fal-ai/luma-dream-machine"),
        ("fal-ai/luma-dream-machine/ray-2/reframe", "fal-ai/luma-dream-machine"),
        ("someone/other-app/a/b/c", "someone/other-app"),
        ("workflows/someone/flow/run", "workflows/someone/flow"),
    ],
)
def test_submit_accepts_any_app_subpath(http: httpx.Client, clip_url: str, path: str, prefix: str) -> None:
    body = submit(http, valid_input(clip_url), path=path)
    assert f"/{prefix}/requests/{body['request_id']}/status" in body["status_url"]
    assert wait_status(http, body, "COMPLETED")["status"] == "COMPLETED"


def test_submit_accepts_any_json_but_not_garbage(http: httpx.Client) -> None:
    for payload in ({}, [], "text", 42, None):
        assert http.post(f"/{APP}", json=payload).status_code == 200
    bad = http.post(f"/{APP}", content=b"{not json", headers={"Content-Type": "application/json"})
    assert bad.status_code == 400


def test_status_codes_and_bodies_through_the_lifecycle(
    emu: EmulatorServer, http: httpx.Client, clip_url: str
) -> None:
    emu.configure(concurrency=1, processing_time_s=0.6)
    first = submit(http, valid_input(clip_url))
    second = submit(http, valid_input(clip_url))
    queued = status(http, second)
    assert queued.status_code == 202
    assert queued.headers["x-fal-request-id"] == second["request_id"]
    assert queued.json()["status"] == "IN_QUEUE"
    assert queued.json()["queue_position"] == 0
    running = wait_status(http, first, "IN_PROGRESS")
    assert "logs" in running and running["logs"] is None
    assert status(http, first).status_code == 202
    done = wait_status(http, first, "COMPLETED")
    assert status(http, first).status_code == 200
    assert done["logs"] is None
    assert done["metrics"]["inference_time"] >= 0.6
    assert "error" not in done
    for key in ("request_id", "response_url", "status_url", "cancel_url"):
        assert done[key] == first[key] if key != "request_id" else done[key] == first["request_id"]


@pytest.mark.parametrize(("flag", "has_logs"), [("1", True), ("true", True), ("0", False), ("false", False)])
def test_logs_flag_spellings(http: httpx.Client, clip_url: str, flag: str, has_logs: bool) -> None:
    sub = submit(http, valid_input(clip_url))
    wait_status(http, sub, "COMPLETED")
    logs = status(http, sub, logs=flag).json()["logs"]
    if has_logs:
        assert isinstance(logs, list) and logs
        assert {"message", "level", "source", "timestamp"} <= set(logs[0])
    else:
        assert logs is None


def test_unknown_request_is_404_everywhere(http: httpx.Client) -> None:
    base = f"/fal-ai/luma-dream-machine/requests/{uuid.uuid4()}"
    assert http.get(base + "/status").status_code == 404
    assert http.get(base + "/status/stream").status_code == 404
    assert http.get(base).status_code == 404
    cancel = http.put(base + "/cancel")
    assert cancel.status_code == 404
    assert cancel.json()["status"] == "NOT_FOUND"


def test_result_before_completion_is_400(emu: EmulatorServer, http: httpx.Client, clip_url: str) -> None:
    emu.configure(processing_time_s=1.0)
    sub = submit(http, valid_input(clip_url))
    response = http.get(sub["response_url"])
    assert response.status_code == 400
    assert response.json() == {"detail": "Request is still in progress"}


def test_result_success_shape(http: httpx.Client, clip_url: str) -> None:
    sub = submit(http, valid_input(clip_url))
    wait_status(http, sub, "COMPLETED")
    response = http.get(sub["response_url"])
    assert response.status_code == 200
    assert response.headers["x-fal-request-id"] == sub["request_id"]
    video = response.json()["video"]
    assert video["content_type"] == "video/mp4"
    assert video["file_name"].endswith(".mp4")
    download = httpx.get(video["url"])
    assert download.status_code == 200
    assert len(download.content) == video["file_size"]
    assert download.headers["content-type"] == "video/mp4"


def _read_events(response: httpx.Response) -> list[dict[str, object]]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            events.append(json.loads(line[len("data: ") :]))
    return events


def test_status_stream_reports_changes_keepalives_and_closes(
    emu: EmulatorServer, http: httpx.Client, clip_url: str
) -> None:
    emu.configure(concurrency=1, processing_time_s=2.6)
    blocker = submit(http, valid_input(clip_url))
    sub = submit(http, valid_input(clip_url))
    with http.stream("GET", sub["status_url"] + "/stream", params={"logs": "1"}, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _read_events(response)
    statuses = [e["status"] for e in events]
    assert statuses[0] == "IN_QUEUE" and statuses[-1] == "COMPLETED"
    assert "IN_PROGRESS" in statuses
    # 2.6 s in the queue and 2.6 s running with no change in between: keepalive events every <= 2 s
    assert statuses.count("IN_QUEUE") >= 2 and statuses.count("IN_PROGRESS") >= 2
    assert isinstance(events[-1]["logs"], list)
    assert events[0]["queue_position"] == 0
    assert wait_status(http, blocker, "COMPLETED")


def test_stream_of_a_completed_request_sends_one_event(http: httpx.Client, clip_url: str) -> None:
    sub = submit(http, valid_input(clip_url))
    wait_status(http, sub, "COMPLETED")
    with http.stream("GET", sub["status_url"] + "/stream") as response:
        events = _read_events(response)
    assert [e["status"] for e in events] == ["COMPLETED"]
    assert events[0]["logs"] is None


def test_handles_fast_polling(http: httpx.Client, clip_url: str) -> None:
    sub = submit(http, valid_input(clip_url))
    codes = set()

    def done() -> bool:
        response = status(http, sub)
        codes.add(response.status_code)
        return response.json()["status"] == "COMPLETED"

    wait_until(done, timeout_s=20)
    assert codes <= {200, 202}


def test_start_timeout_header_expires_queued_requests(
    emu: EmulatorServer, http: httpx.Client, clip_url: str
) -> None:
    emu.configure(concurrency=1, processing_time_s=1.5)
    running = http.post(
        f"/{APP}", json=valid_input(clip_url), headers={"X-Fal-Request-Timeout": "0.3"}
    ).json()
    queued = http.post(f"/{APP}", json=valid_input(clip_url), headers={"X-Fal-Request-Timeout": "0.3"}).json()
    done = wait_status(http, queued, "COMPLETED", timeout_s=5)
    assert done["error_type"] == "request_timeout"
    result = http.get(queued["response_url"])
    assert result.status_code == 504
    assert result.headers["x-fal-request-timeout-type"] == "user"
    # the one that had started is not affected: the deadline only covers the wait before processing
    assert status(http, running).json()["status"] == "IN_PROGRESS"
    http.put(running["cancel_url"])
