"""Input validation the way fal's runner does it: pydantic-v2-style error lists, reported as a 422 result.

The schema is fal's for ``fal-ai/luma-dream-machine/ray-2-flash/reframe``: ``video_url`` and ``aspect_ratio``
are required; ``image_url``, ``prompt``, ``grid_position_x/y`` and ``x_start/x_end/y_start/y_end`` are
optional. Unknown fields are ignored, as pydantic models do by default.

Choices where fal's schema is silent (documented here because tests and clients depend on them):

* integers must be >= 0, and ``*_end`` must be greater than ``*_start``;
* ``x_start``/``x_end`` (and ``y_start``/``y_end``) only make sense together: one without the other is a
  ``value_error``;
* integral floats (``5.0``) are accepted as ints like pydantic's lax mode; booleans and strings are not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ASPECT_RATIOS: tuple[str, ...] = ("1:1", "16:9", "9:16", "4:3", "3:4", "21:9", "9:21")
INT_FIELDS: tuple[str, ...] = ("grid_position_x", "grid_position_y", "x_start", "x_end", "y_start", "y_end")
_URL_SCHEMES = ("http://", "https://", "data:")
_PYDANTIC_URL = "https://errors.pydantic.dev/2.11/v/"


@dataclass(frozen=True)
class ReframeInput:
    """A validated input."""

    video_url: str
    aspect_ratio: str
    image_url: str | None = None
    prompt: str | None = None
    grid_position_x: int | None = None
    grid_position_y: int | None = None
    x_start: int | None = None
    x_end: int | None = None
    y_start: int | None = None
    y_end: int | None = None


def error(kind: str, field: str, msg: str, value: Any, ctx: dict[str, Any] | None = None) -> dict[str, Any]:
    """One pydantic-v2-style error entry for ``body.<field>``."""
    entry: dict[str, Any] = {"type": kind, "loc": ["body", field], "msg": msg, "input": value}
    if ctx is not None:
        entry["ctx"] = ctx
    entry["url"] = _PYDANTIC_URL + kind
    return entry


def _check_url(name: str, value: Any, required: bool) -> list[dict[str, Any]]:
    if value is None:
        return [error("missing", name, "Field required", None)] if required else []
    if not isinstance(value, str):
        return [error("string_type", name, "Input should be a valid string", value)]
    if not value.lower().startswith(_URL_SCHEMES):
        expected = "'http', 'https' or 'data'"
        return [
            error(
                "url_scheme", name, f"URL scheme should be {expected}", value, {"expected_schemes": expected}
            )
        ]
    return []


def _check_int(name: str, value: Any) -> tuple[int | None, list[dict[str, Any]]]:
    if value is None:
        return None, []
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None, [error("int_type", name, "Input should be a valid integer", value)]
    if isinstance(value, float) and not value.is_integer():
        msg = "Input should be a valid integer, got a number with a fractional part"
        return None, [error("int_from_float", name, msg, value)]
    number = int(value)
    if number < 0:
        return None, [
            error("greater_than_equal", name, "Input should be greater than or equal to 0", value, {"ge": 0})
        ]
    return number, []


def _check_pair(ints: dict[str, int | None], start: str, end: str) -> list[dict[str, Any]]:
    lo, hi = ints.get(start), ints.get(end)
    if lo is None and hi is None:
        return []
    if lo is None or hi is None:
        missing = start if lo is None else end
        return [error("value_error", missing, f"Value error, {start} and {end} must be given together", None)]
    if hi <= lo:
        return [error("value_error", end, f"Value error, {end} must be greater than {start}", hi)]
    return []


def validate_input(payload: Any) -> tuple[ReframeInput | None, list[dict[str, Any]]]:
    """Validate a submitted body; returns (input, []) or (None, errors) with the 422 ``detail`` list."""
    if not isinstance(payload, dict):
        return None, [
            {
                "type": "model_attributes_type",
                "loc": ["body"],
                "msg": "Input should be a valid dictionary or object to extract fields from",
                "input": payload,
            }
        ]
    errors = _check_url("video_url", payload.get("video_url"), required=True)
    ratio = payload.get("aspect_ratio")
    if ratio is None:
        errors.append(error("missing", "aspect_ratio", "Field required", None))
    elif ratio not in ASPECT_RATIOS:
        expected = ", ".join(f"'{r}'" for r in ASPECT_RATIOS[:-1]) + f" or '{ASPECT_RATIOS[-1]}'"
        errors.append(
            error(
                "literal_error", "aspect_ratio", f"Input should be {expected}", ratio, {"expected": expected}
            )
        )
    errors += _check_url("image_url", payload.get("image_url"), required=False)
    prompt = payload.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        errors.append(error("string_type", "prompt", "Input should be a valid string", prompt))
    ints: dict[str, int | None] = {}
    for name in INT_FIELDS:
        ints[name], problems = _check_int(name, payload.get(name))
        errors += problems
    if not errors:
        errors += _check_pair(ints, "x_start", "x_end") + _check_pair(ints, "y_start", "y_end")
    if errors:
        return None, errors
    return ReframeInput(
        video_url=payload["video_url"],
        aspect_ratio=str(ratio),
        image_url=payload.get("image_url"),
        prompt=prompt,
        **ints,
    ), []


def fetch_error(message: str, value: Any) -> list[dict[str, Any]]:
    """The 422 ``detail`` for a ``video_url`` that could not be downloaded or decoded."""
    return [
        {
            "type": "value_error",
            "loc": ["body", "video_url"],
            "msg": f"Value error, {message}",
            "input": value,
        }
    ]
