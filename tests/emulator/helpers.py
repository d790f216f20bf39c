"""Helpers shared by the emulator tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from reframe.demo import make_sample_video

APP = "fal-ai/luma-dream-machine/ray-2-flash/reframe"
KEY = "test-key-id:test-key-secret"
AUTH = {"Authorization": f"Key {KEY}"}

#: The run-time config every test starts from (the session server is shared, so each test restores it).
DEFAULTS: dict[str, Any] = {
    "concurrency": 2,
    "processing_time_s": 0.0,
    "submit_rate_per_s": None,
    "submit_burst": 10,
    "valid_keys": None,
    "locked_keys": [],
    "result_ttl_s": 3600.0,
    "webhook_retry_delays_s": [0.05, 0.05, 0.05],
    "max_queue_length": None,
    "isolate_accounts": False,
}


def make_clip(path: Path, *, size: str = "320x180", duration_s: float = 2.0, audio: bool = True) -> Path:
    """An H.264 test clip made with the imageio-ffmpeg binary (the project's one clip generator)."""
    return make_sample_video(path, duration_s=duration_s, size=size, audio=audio)


def wait_until(predicate: Callable[[], Any], *, timeout_s: float = 15.0, what: str = "condition") -> Any:
    """Poll until ``predicate()`` is truthy and return its value; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.02)


def submit(
    http: httpx.Client,
    payload: Any,
    *,
    path: str = APP,
    params: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Submit and return the JSON body (asserting 200)."""
    response = http.post(f"/{path}", json=payload, params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def status(http: httpx.Client, sub: dict[str, Any], logs: str = "0") -> httpx.Response:
    """GET the status URL of a submit response."""
    return http.get(sub["status_url"], params={"logs": logs})


def wait_status(
    http: httpx.Client, sub: dict[str, Any], wanted: str, timeout_s: float = 20.0
) -> dict[str, Any]:
    """Poll until the request reaches ``wanted`` and return that status body."""

    def reached() -> dict[str, Any] | None:
        body: dict[str, Any] = status(http, sub).json()
        return body if body["status"] == wanted else None

    result: dict[str, Any] = wait_until(reached, timeout_s=timeout_s, what=f"{sub['request_id']} {wanted}")
    return result


def valid_input(video_url: str, aspect_ratio: str = "9:16", **extra: Any) -> dict[str, Any]:
    """A valid reframe input."""
    return {"video_url": video_url, "aspect_ratio": aspect_ratio, **extra}
