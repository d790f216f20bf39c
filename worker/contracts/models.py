"""Request and state models shared by producer and worker.

:class:`ReframeInput` is exactly fal's input schema for ``fal-ai/luma-dream-machine/ray-2-flash/reframe``
(``fal-protocol.md`` §8): unknown fields are rejected and unset optionals are omitted when serialised.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from enum import StrEnum
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

ASPECT_RATIOS = ("1:1", "16:9", "9:16", "4:3", "3:4", "21:9", "9:21")
AspectRatio = Literal["1:1", "16:9", "9:16", "4:3", "3:4", "21:9", "9:21"]

DEFAULT_MAX_DATA_URI_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_PROMPT_CHARS = 2000


class Priority(StrEnum):
    """Admission priority of a job. Jobs wait FIFO within a priority; higher priorities go first."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @property
    def celery_priority(self) -> int:
        """kombu's Redis priority (0 is served first) for the job's Celery message."""
        return {"high": 0, "normal": 3, "low": 6}[self.value]


class JobState(StrEnum):
    """The life cycle of a job; see docs/design.md."""

    QUEUED = "QUEUED"
    WAITING = "WAITING"
    BLOCKED = "BLOCKED"
    DEFERRED = "DEFERRED"
    SUBMITTING = "SUBMITTING"
    IN_QUEUE = "IN_QUEUE"
    IN_PROGRESS = "IN_PROGRESS"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        """True for SUCCEEDED, FAILED and CANCELLED."""
        return self in TERMINAL_STATES

    @property
    def at_fal(self) -> bool:
        """True once fal holds the request (IN_QUEUE or IN_PROGRESS)."""
        return self in (JobState.IN_QUEUE, JobState.IN_PROGRESS)


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
PRE_SUBMIT_STATES = frozenset({JobState.QUEUED, JobState.WAITING, JobState.BLOCKED, JobState.DEFERRED})


class InvalidRequest(ValueError):
    """A reframe request that fails validation. ``errors`` holds ``(field, message)`` pairs."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{field}: {msg}" for field, msg in errors))

    @classmethod
    def from_validation_error(cls, exc: ValidationError) -> InvalidRequest:
        """Convert pydantic's error list into field-named messages."""
        pairs: list[tuple[str, str]] = []
        for err in exc.errors(include_url=False, include_input=False):
            loc = ".".join(str(p) for p in err.get("loc", ())) or "input"
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            if err.get("type") == "extra_forbidden":
                msg = "unknown field"
            pairs.append((loc, msg))
        return cls(pairs)


def _check_media_url(value: str, info: ValidationInfo, *, required_scheme_hint: str) -> str:
    scheme = urlsplit(value).scheme.lower()
    if scheme in ("http", "https"):
        if not urlsplit(value).hostname:
            raise ValueError("URL has no host")
        return value
    if scheme == "data":
        limit = int((info.context or {}).get("max_data_uri_bytes", DEFAULT_MAX_DATA_URI_BYTES))
        header, sep, payload = value.partition(",")
        if not sep:
            raise ValueError("malformed data: URI (no comma)")
        size = len(payload) * 3 // 4 if header.endswith(";base64") else len(payload)
        if size > limit:
            raise ValueError(f"data: URI of {size} bytes is over the {limit}-byte limit; upload the file")
        if header.endswith(";base64"):
            try:
                base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("data: URI has invalid base64") from None
        return value
    raise ValueError(f"must be an http(s) URL or a data: URI{required_scheme_hint}")


class ReframeInput(BaseModel):
    """The model input, exactly fal's schema. Build it with :func:`parse_input` for limits."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    video_url: str = Field(description="Source video: http(s) URL (or a data: URI up to a size cap).")
    aspect_ratio: AspectRatio = Field(description="Target aspect ratio.")
    image_url: str | None = Field(default=None, description="Optional first-frame image for reframing.")
    prompt: str | None = Field(default=None, description="Optional text guidance.")
    grid_position_x: int | None = Field(default=None, ge=0, description="Source x position in the output.")
    grid_position_y: int | None = Field(default=None, ge=0, description="Source y position in the output.")
    x_start: int | None = Field(default=None, ge=0, description="Left edge of the source, output pixels.")
    x_end: int | None = Field(default=None, ge=0, description="Right edge of the source, output pixels.")
    y_start: int | None = Field(default=None, ge=0, description="Top edge of the source, output pixels.")
    y_end: int | None = Field(default=None, ge=0, description="Bottom edge of the source, output pixels.")

    @field_validator("video_url")
    @classmethod
    def _video_url(cls, value: str, info: ValidationInfo) -> str:
        return _check_media_url(value, info, required_scheme_hint="")

    @field_validator("image_url")
    @classmethod
    def _image_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else _check_media_url(value, info, required_scheme_hint="")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | None, info: ValidationInfo) -> str | None:
        limit = int((info.context or {}).get("max_prompt_chars", DEFAULT_MAX_PROMPT_CHARS))
        if value is not None and len(value) > limit:
            raise ValueError(f"is {len(value)} characters; the limit is {limit}")
        return value

    @model_validator(mode="after")
    def _ranges(self) -> ReframeInput:
        if self.x_start is not None and self.x_end is not None and self.x_end <= self.x_start:
            raise ValueError("x_end must be greater than x_start")
        if self.y_start is not None and self.y_end is not None and self.y_end <= self.y_start:
            raise ValueError("y_end must be greater than y_start")
        return self

    def to_fal(self) -> dict[str, Any]:
        """The JSON body fal expects: unset optionals omitted."""
        return self.model_dump(exclude_none=True)

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of :meth:`to_fal` (idempotency and duplicate detection)."""
        canonical = json.dumps(self.to_fal(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def parse_input(
    data: ReframeInput | dict[str, Any],
    *,
    max_data_uri_bytes: int = DEFAULT_MAX_DATA_URI_BYTES,
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS,
) -> ReframeInput:
    """Validate a request; raise :class:`InvalidRequest` whose message names each bad field."""
    if isinstance(data, ReframeInput):
        data = data.model_dump(exclude_none=True)
    if not isinstance(data, dict):
        raise InvalidRequest([("input", "must be a JSON object")])
    context = {"max_data_uri_bytes": max_data_uri_bytes, "max_prompt_chars": max_prompt_chars}
    try:
        return ReframeInput.model_validate(data, context=context)
    except ValidationError as exc:
        raise InvalidRequest.from_validation_error(exc) from None
