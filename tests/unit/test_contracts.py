"""The reframe input contract: fal's schema exactly, with errors that name the field."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from worker.contracts.models import (
    ASPECT_RATIOS,
    MAX_COORDINATE_PX,
    InvalidRequest,
    ReframeInput,
    parse_input,
)

OK = {"video_url": "https://cdn.example.com/clip.mp4", "aspect_ratio": "9:16"}
SMALL_DATA = "data:video/mp4;base64," + base64.b64encode(b"\x00" * 300).decode()
BIG_DATA = "data:video/mp4;base64," + base64.b64encode(b"\x00" * 3000).decode()


def req(**changes: Any) -> dict[str, Any]:
    out = {**OK, **changes}
    return {k: v for k, v in out.items() if v is not ...}


VALID = [
    pytest.param(req(), id="minimal"),
    *[pytest.param(req(aspect_ratio=r), id=f"ratio-{r}") for r in ASPECT_RATIOS],
    pytest.param(req(video_url="http://cdn.example.com/a.mov"), id="http"),
    pytest.param(req(video_url=SMALL_DATA), id="small-data-uri"),
    pytest.param(req(image_url="https://cdn.example.com/first.png"), id="image-url"),
    pytest.param(req(prompt="a calm beach"), id="prompt"),
    pytest.param(req(grid_position_x=0, grid_position_y=120), id="grid"),
    pytest.param(req(x_start=0, x_end=640, y_start=10, y_end=370), id="box"),
    pytest.param(req(x_start=0, x_end=MAX_COORDINATE_PX, y_start=0, y_end=MAX_COORDINATE_PX), id="box-max"),
    pytest.param(req(prompt="x" * 100), id="prompt-at-limit"),
]

INVALID = [
    pytest.param(req(video_url=...), "video_url: Field required", id="missing-video"),
    pytest.param(req(aspect_ratio=...), "aspect_ratio: Field required", id="missing-ratio"),
    pytest.param(req(aspect_ratio="2:1"), "aspect_ratio: Input should be", id="bad-ratio"),
    pytest.param(req(aspect_ratio="9/16"), "aspect_ratio: Input should be", id="ratio-slash"),
    pytest.param(req(aspect_ratio=916), "aspect_ratio: Input should be", id="ratio-number"),
    pytest.param(
        req(video_url="ftp://x.test/a.mp4"), "video_url: must be an http(s) URL or a data: URI", id="ftp"
    ),
    pytest.param(req(video_url="/local/file.mp4"), "video_url: must be an http(s) URL", id="path"),
    pytest.param(req(video_url="https:///nohost.mp4"), "video_url: URL has no host", id="no-host"),
    pytest.param(req(video_url=""), "video_url: must be an http(s) URL", id="empty"),
    pytest.param(req(video_url=42), "video_url: Input should be a valid string", id="not-a-string"),
    pytest.param(
        req(video_url=BIG_DATA),
        "video_url: data: URI of 3000 bytes is over the 1000-byte limit",
        id="big-data-uri",
    ),
    pytest.param(
        req(video_url="data:video/mp4;base64,@@@"), "video_url: data: URI has invalid base64", id="bad-base64"
    ),
    pytest.param(req(video_url="data:video/mp4;base64"), "video_url: malformed data: URI", id="no-comma"),
    pytest.param(req(image_url="file:///etc/passwd"), "image_url: must be an http(s) URL", id="image-file"),
    pytest.param(req(prompt="x" * 101), "prompt: is 101 characters; the limit is 100", id="prompt-long"),
    pytest.param(
        req(grid_position_x=-1), "grid_position_x: Input should be greater than or equal to 0", id="grid-neg"
    ),
    pytest.param(
        req(grid_position_y="up"), "grid_position_y: Input should be a valid integer", id="grid-str"
    ),
    pytest.param(req(x_start=-5), "x_start: Input should be greater than or equal to 0", id="x-start-neg"),
    pytest.param(req(y_end=1.5), "y_end: Input should be a valid integer", id="y-end-float"),
    pytest.param(req(x_start=100, x_end=100), "x_end must be greater than x_start", id="x-empty"),
    pytest.param(req(x_start=100, x_end=50), "x_end must be greater than x_start", id="x-reversed"),
    pytest.param(req(y_start=9, y_end=3), "y_end must be greater than y_start", id="y-reversed"),
    pytest.param(req(resized_width=100), "resized_width: unknown field", id="luma-only-field"),
    pytest.param(req(x_start=5), "x_end: x_start and x_end must be given together", id="only-x-start"),
    pytest.param(req(y_end=5), "y_start: y_start and y_end must be given together", id="only-y-end"),
    pytest.param(req(grid_position_x=1), "grid_position_y: grid_position_x and grid_position_y", id="grid-x"),
    pytest.param(req(x_start=True, x_end=5), "x_start: Input should be a valid integer", id="bool-int"),
    pytest.param(req(x_start="1", x_end=5), "x_start: Input should be a valid integer", id="str-int"),
    pytest.param(req(x_start=1.0, x_end=5), "x_start: Input should be a valid integer", id="float-int"),
    pytest.param(
        req(x_start=0, x_end=10**30),
        "x_end: Input should be less than or equal to 8192",
        id="huge-coordinate",
    ),
    pytest.param(req(video_url="https://x.test/a\r\nb.mp4"), "video_url: contains control", id="crlf-url"),
    pytest.param(req(video_url="https://x.test/a\x00.mp4"), "video_url: contains control", id="nul-url"),
    pytest.param(
        req(video_url="https://x.test/" + "a" * 5000), "video_url: is 5015 characters", id="long-url"
    ),
    pytest.param(req(prompt="a\x00b"), "prompt: contains control characters", id="nul-prompt"),
    pytest.param(req(callback_url="https://x"), "callback_url: unknown field", id="unknown-field"),
    pytest.param(req(Aspect_Ratio="9:16"), "Aspect_Ratio: unknown field", id="wrong-case"),
]


@pytest.mark.parametrize("data", VALID)
def test_valid_inputs_parse_and_serialise_as_fal_expects(data: dict[str, Any]) -> None:
    model = parse_input(data, max_data_uri_bytes=1000, max_prompt_chars=100)
    body = model.to_fal()
    assert body == {k: v for k, v in data.items() if v is not None}
    assert all(v is not None for v in body.values()), "unset optionals are omitted"


@pytest.mark.parametrize(("data", "message"), INVALID)
def test_invalid_inputs_are_rejected_with_the_field_named(data: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_input(data, max_data_uri_bytes=1000, max_prompt_chars=100)
    assert message in str(info.value)


def test_table_is_large_enough() -> None:
    assert len(VALID) + len(INVALID) >= 30


def test_several_errors_are_all_reported() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_input({"aspect_ratio": "2:1", "bogus": 1})
    fields = [f for f, _ in info.value.errors]
    assert {"video_url", "aspect_ratio", "bogus"} <= set(fields)


def test_fingerprint_ignores_key_order_and_unset_fields() -> None:
    a = ReframeInput.model_validate({"aspect_ratio": "1:1", "video_url": "https://x.test/v.mp4"})
    b = ReframeInput.model_validate(
        {"video_url": "https://x.test/v.mp4", "aspect_ratio": "1:1", "prompt": None}
    )
    assert a.fingerprint() == b.fingerprint()
    c = ReframeInput.model_validate({"video_url": "https://x.test/v.mp4", "aspect_ratio": "9:16"})
    assert a.fingerprint() != c.fingerprint()


def test_input_is_not_a_mapping() -> None:
    with pytest.raises(InvalidRequest, match="input: must be a JSON object"):
        parse_input(["not", "a", "dict"])  # type: ignore[arg-type]
