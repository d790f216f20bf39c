"""Validation happens in the runner: submit accepts anything, the result replays fal's 422 (§1.5, §3.1, §8)."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import pytest

from falemu import EmulatorServer
from tests.emulator.helpers import submit, wait_status

OK = "https://example.invalid/video.mp4"  # never fetched: validation fails first

INVALID: list[tuple[str, Any, str, str]] = [
    ("missing video_url", {"aspect_ratio": "9:16"}, "video_url", "missing"),
    ("missing aspect_ratio", {"video_url": OK}, "aspect_ratio", "missing"),
    ("bad aspect_ratio", {"video_url": OK, "aspect_ratio": "2:1"}, "aspect_ratio", "literal_error"),
    ("aspect_ratio not a string", {"video_url": OK, "aspect_ratio": 1.5}, "aspect_ratio", "literal_error"),
    ("video_url not a string", {"video_url": 5, "aspect_ratio": "1:1"}, "video_url", "string_type"),
    ("video_url ftp", {"video_url": "ftp://x/y.mp4", "aspect_ratio": "1:1"}, "video_url", "url_scheme"),
    (
        "image_url bad",
        {"video_url": OK, "aspect_ratio": "1:1", "image_url": "file:///x"},
        "image_url",
        "url_scheme",
    ),
    ("prompt not a string", {"video_url": OK, "aspect_ratio": "1:1", "prompt": 3}, "prompt", "string_type"),
    (
        "grid x not int",
        {"video_url": OK, "aspect_ratio": "1:1", "grid_position_x": "a"},
        "grid_position_x",
        "int_type",
    ),
    (
        "grid y fractional",
        {"video_url": OK, "aspect_ratio": "1:1", "grid_position_y": 1.5},
        "grid_position_y",
        "int_from_float",
    ),
    (
        "bool is not int",
        {"video_url": OK, "aspect_ratio": "1:1", "x_start": True, "x_end": 5},
        "x_start",
        "int_type",
    ),
    (
        "negative",
        {"video_url": OK, "aspect_ratio": "1:1", "y_start": -1, "y_end": 5},
        "y_start",
        "greater_than_equal",
    ),
    (
        "end <= start",
        {"video_url": OK, "aspect_ratio": "1:1", "x_start": 10, "x_end": 10},
        "x_end",
        "value_error",
    ),
    ("lone start", {"video_url": OK, "aspect_ratio": "1:1", "y_start": 10}, "y_end", "value_error"),
]


@pytest.mark.parametrize(("name", "payload", "field", "kind"), INVALID, ids=[row[0] for row in INVALID])
def test_invalid_input_is_accepted_then_fails_with_422(
    http: httpx.Client, name: str, payload: Any, field: str, kind: str
) -> None:
    sub = submit(http, payload)  # accepted into the queue
    done = wait_status(http, sub, "COMPLETED")
    assert done["error"] and done["error_type"] == "validation_error"
    result = http.get(sub["response_url"])
    assert result.status_code == 422
    assert "x-fal-error-type" not in result.headers
    detail = result.json()["detail"]
    assert isinstance(detail, list)
    entry = next(e for e in detail if e["loc"] == ["body", field])
    assert entry["type"] == kind
    assert isinstance(entry["msg"], str) and entry["msg"]


def test_non_object_input_is_a_422(http: httpx.Client) -> None:
    sub = submit(http, ["not", "an", "object"])
    wait_status(http, sub, "COMPLETED")
    result = http.get(sub["response_url"])
    assert result.status_code == 422
    assert result.json()["detail"][0]["loc"] == ["body"]


def test_several_errors_are_reported_together(http: httpx.Client) -> None:
    sub = submit(http, {"aspect_ratio": "5:4", "prompt": 1})
    wait_status(http, sub, "COMPLETED")
    locs = [e["loc"][1] for e in http.get(sub["response_url"]).json()["detail"]]
    assert set(locs) == {"video_url", "aspect_ratio", "prompt"}


@pytest.mark.parametrize(
    ("video_url", "needle"),
    [
        ("{base}/files/0123456789abcdef0123456789abcdef/missing.mp4", "HTTP 404"),
        ("http://127.0.0.1:9/nothing-listens-here.mp4", "Failed to download"),
        (
            "data:video/mp4;base64," + base64.b64encode(b"this is not a video").decode(),
            "could not read the video",
        ),
        ("data:video/mp4;base64,", "empty"),
    ],
)
def test_fetch_failures_are_422_on_video_url(
    emu: EmulatorServer, http: httpx.Client, video_url: str, needle: str
) -> None:
    sub = submit(http, {"video_url": video_url.format(base=emu.url), "aspect_ratio": "9:16"})
    done = wait_status(http, sub, "COMPLETED")
    assert done["error_type"] == "validation_error"
    result = http.get(sub["response_url"])
    assert result.status_code == 422
    entry = result.json()["detail"][0]
    assert entry["loc"] == ["body", "video_url"]
    assert needle in entry["msg"]
    assert emu.ledger()["billed_seconds"] == 0
