"""The official fal-client 1.0.3 works against the emulator with only its host settings changed (§6, tooling §9)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import fal_client
import fal_client.client as fc
import httpx
import pytest

from falemu import EmulatorServer
from tests.emulator.helpers import APP, KEY


@pytest.fixture
def client(emu: EmulatorServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[fal_client.SyncClient]:
    """A SyncClient aimed at the emulator over plain HTTP: the module constants are read at call time."""
    monkeypatch.setattr(fc, "QUEUE_URL_FORMAT", emu.url + "/")
    monkeypatch.setattr(fc, "RUN_URL_FORMAT", emu.url + "/")
    monkeypatch.setattr(fc, "REST_URL", emu.url)
    monkeypatch.setattr(fc, "CDN_URL", emu.url)
    monkeypatch.setattr(fc, "MAX_ATTEMPTS", 4)  # no 60 s retry loops when something is wrong
    monkeypatch.setattr(fc, "MAX_DELAY", 0.5)
    yield fal_client.SyncClient(key=KEY, default_timeout=30)


def test_upload_file_then_subscribe_returns_a_real_video(
    client: fal_client.SyncClient, clip: Path, tmp_path: Path, emu: EmulatorServer
) -> None:
    url = client.upload_file(clip)
    assert url.startswith(emu.url + "/files/")
    updates: list[Any] = []
    result = client.subscribe(APP, {"video_url": url, "aspect_ratio": "9:16"}, with_logs=True,
                              on_queue_update=updates.append, client_timeout=60)  # fmt: skip
    assert set(result) == {"video"}
    video = result["video"]
    assert video["content_type"] == "video/mp4"
    out = tmp_path / "out.mp4"
    out.write_bytes(httpx.get(video["url"]).content)
    with av.open(str(out)) as container:
        ctx = container.streams.video[0].codec_context
        width, height, duration = ctx.width, ctx.height, container.duration / 1_000_000
    assert abs(width / height - 9 / 16) < 0.02 and width % 2 == 0 and height % 2 == 0
    assert abs(duration - 2.0) < 0.1
    assert isinstance(updates[-1], fal_client.Completed)
    ops = [r["op"] for r in emu.ledger()["requests"]]
    assert {"token", "upload", "submit", "status", "result"} <= set(ops)


def test_submit_status_result_and_module_level_helpers(
    client: fal_client.SyncClient, emu: EmulatorServer, clip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    emu.configure(processing_time_s=0.3)
    url = client.upload_file(clip)
    handle = client.submit(APP, {"video_url": url, "aspect_ratio": "1:1"}, webhook_url="http://127.0.0.1:9/x")
    assert isinstance(handle.status(), fal_client.Queued | fal_client.InProgress)
    final = None
    for event in handle.iter_events(with_logs=True, interval=0.05):
        final = event
    assert isinstance(final, fal_client.Completed) and final.error is None
    assert final.metrics["inference_time"] >= 0.3
    assert handle.get()["video"]["file_name"].endswith(".mp4")
    # status/result rebuilt from (app id, request id): the owner/app rule with the endpoint path dropped
    assert isinstance(client.status(APP, handle.request_id), fal_client.Completed)
    assert client.result(APP, handle.request_id) == handle.get()
    monkeypatch.setenv("FAL_KEY", KEY)  # the module-level API reads the key from the environment
    assert fal_client.result(APP, handle.request_id) == handle.get()


def test_cancel(client: fal_client.SyncClient, emu: EmulatorServer) -> None:
    emu.configure(concurrency=1, processing_time_s=3.0)
    blocker = client.submit(APP, {})
    queued = client.submit(APP, {})
    assert isinstance(queued.status(), fal_client.Queued) and queued.status().position == 0
    queued.cancel()
    completed = queued.status()
    assert isinstance(completed, fal_client.Completed) and completed.error_type == "client_cancelled"
    with pytest.raises(fal_client.FalClientHTTPError) as info:
        queued.cancel()  # already completed: 400
    assert info.value.status_code == 400
    blocker.cancel()


def test_failures_surface_as_fal_errors(client: fal_client.SyncClient) -> None:
    with pytest.raises(fal_client.FalClientHTTPError) as info:
        client.subscribe(APP, {"video_url": "https://example.invalid/v.mp4"}, client_timeout=30)
    assert info.value.status_code == 422


def test_client_retries_what_it_should(client: fal_client.SyncClient, emu: EmulatorServer) -> None:
    emu.set_faults([
        {"op": "submit", "kind": "http", "status": 429},
        {"op": "submit", "kind": "http", "status": 502, "nginx": True},
        {"op": "status", "kind": "drop"},
    ])  # fmt: skip
    handle = client.submit(APP, {})
    assert isinstance(handle.status(), fal_client.Status)
    submits = [r["status"] for r in emu.ledger()["requests"] if r["op"] == "submit"]
    assert submits == [429, 502, 200]
    emu.set_faults([{"op": "submit", "kind": "http", "status": 503}])  # JSON 503 from fal: not retried
    with pytest.raises(fal_client.FalClientHTTPError) as info:
        client.submit(APP, {})
    assert info.value.status_code == 503


def test_auth_errors(client: fal_client.SyncClient, emu: EmulatorServer) -> None:
    emu.configure(locked_keys=[KEY])
    with pytest.raises(fal_client.FalClientHTTPError) as info:
        client.submit(APP, {})
    assert info.value.status_code == 403 and "locked" in str(info.value)
