"""Hypothesis against the input contract: valid requests round-trip, invalid ones raise InvalidRequest.

Nothing else may escape ``parse_input`` or the producer's enqueue checks, whatever the input.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from worker.contracts.intake import IntakeLimits, check_enqueue
from worker.contracts.models import ASPECT_RATIOS, MAX_COORDINATE_PX, InvalidRequest, parse_input

coordinate = st.integers(min_value=0, max_value=MAX_COORDINATE_PX)
json_scalar = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_like = st.recursive(
    json_scalar,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=5), kids, max_size=4),
)
anything = json_like | st.binary(max_size=10) | st.tuples(st.integers()) | st.sets(st.integers(), max_size=3)


@st.composite
def valid_requests(draw: st.DrawFn) -> dict[str, Any]:
    host = draw(st.from_regex(r"[a-z]{1,10}\.(com|net|org)", fullmatch=True))
    path = draw(st.from_regex(r"[A-Za-z0-9_-]{1,20}", fullmatch=True))
    out: dict[str, Any] = {
        "video_url": f"https://cdn.{host}/{path}.mp4",
        "aspect_ratio": draw(st.sampled_from(ASPECT_RATIOS)),
    }
    if draw(st.booleans()):
        out["prompt"] = draw(
            st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=50)
        )
        if not out["prompt"].strip():
            del out["prompt"]
    for start, end in (("x_start", "x_end"), ("y_start", "y_end")):
        if draw(st.booleans()):
            lo = draw(st.integers(min_value=0, max_value=MAX_COORDINATE_PX - 1))
            out[start], out[end] = lo, draw(st.integers(min_value=lo + 1, max_value=MAX_COORDINATE_PX))
    if draw(st.booleans()):
        out["grid_position_x"], out["grid_position_y"] = draw(coordinate), draw(coordinate)
    return out


@settings(max_examples=300, deadline=None)
@given(valid_requests())
def test_valid_requests_round_trip(data: dict[str, Any]) -> None:
    model = parse_input(data)
    body = model.to_fal()
    assert parse_input(body) == model
    assert body == {k: (v.strip() if isinstance(v, str) else v) for k, v in data.items()}


fields = st.sampled_from(
    [
        "video_url",
        "aspect_ratio",
        "image_url",
        "prompt",
        "x_start",
        "x_end",
        "y_start",
        "y_end",
        "grid_position_x",
        "grid_position_y",
        "bogus",
    ]
)


@settings(max_examples=500, deadline=None)
@given(valid_requests(), st.dictionaries(fields, anything, min_size=1, max_size=4))
def test_mutated_requests_parse_or_raise_invalid_request_only(
    base: dict[str, Any], changes: dict[str, Any]
) -> None:
    data = {**base, **changes}
    try:
        model = parse_input(data)
    except InvalidRequest as exc:
        assert exc.errors and all(field for field, _ in exc.errors)
    else:
        assert parse_input(model.to_fal()) == model


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(valid_requests(), anything),
    st.dictionaries(
        st.sampled_from(["idempotency_key", "priority", "metadata", "callback_url", "deadline_s"]),
        anything,
        max_size=3,
    ),
)
def test_enqueue_arguments_never_escape_as_other_errors(request: Any, options: dict[str, Any]) -> None:
    try:
        check_enqueue({"input": request, **options}, IntakeLimits(callbacks_allowed=True))
    except InvalidRequest as exc:
        assert exc.errors
