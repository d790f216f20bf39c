"""Request and state models shared by producer and worker.

:class:`ReframeInput` is exactly fal's input schema for ``fal-ai/luma-dream-machine/ray-2-flash/reframe``
(docs/fal-wire-protocol.md §8): unknown fields are rejected and unset optionals are omitted when serialised.
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
from pydantic_core import PydanticCustomError

from worker.contracts.urlpolicy import UrlPolicy, validate_url

ASPECT_RATIOS = ("1:1", "16:9", "9:16", "4:3", "3:4", "21:9", "9:21")
AspectRatio = Literal["1:1", "16:9", "9:16", "4:3", "3:4", "21:9", "9:21"]

DEFAULT_MAX_DATA_URI_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_PROMPT_CHARS = 2000
#: Largest pixel coordinate accepted. fal's schema gives no maximum, but Ray 2 Flash renders at most
#: 720p (1280 px on the long side; about 1680 for 21:9) and 8K video is 7680 px wide, so 8192 admits
#: every box or grid position that can mean something while stopping absurd values (``10**30``)
#: before money is spent; it also keeps every coordinate exact in any JSON consumer.
MAX_COORDINATE_PX = 8192
#: Longest http(s) URL accepted for video_url/image_url (CDNs and fal storage URLs are far shorter;
#: common servers refuse request lines over 8 KiB). data: URIs are bounded by their size limit.
MAX_HTTP_URL_CHARS = 4096
#: Characters never allowed in a URL or prompt sent on: C0 controls (NUL, CR, LF, ...) and DEL.
_CONTROL_CHARS = frozenset(chr(c) for c in [*range(0x20), 0x7F])
_PROMPT_ALLOWED_CONTROLS = frozenset("\n\t")


def format_loc(loc: tuple[int | str, ...] | list[int | str], prefix: str = "") -> str:
    """A field path as callers write it: ``items[2].metadata.k`` (``prefix`` goes first)."""
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "input"


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


class CancelOutcome(StrEnum):
    """What a cancel did to a job: the one answer of the library, the CLI, the API and the cancel task."""

    CANCELLED = "cancelled"
    """The job had not reached fal; it is CANCELLED now (its slot and reservation freed)."""
    REQUESTED = "cancel_requested"
    """fal has (or may have) the request; fal was (or will be) asked to cancel it."""
    ALREADY_FINISHED = "already_finished"
    """The job was already in a terminal state (or fal had already completed the request)."""
    NOT_FOUND = "not_found"
    """No such job (or its record expired, or fal no longer knows the request)."""


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
            loc = format_loc(tuple(err.get("loc", ())))
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            ctx = err.get("ctx") or {}
            if err.get("type") == "field_pairs" and isinstance(ctx.get("problems"), list):
                prefix = format_loc(tuple(err.get("loc", ())))
                prefix = "" if prefix == "input" else prefix + "."
                pairs += [(prefix + str(f), str(m)) for f, m in ctx["problems"]]
                continue
            if err.get("type") == "extra_forbidden":
                msg = "unknown field"
            pairs.append((loc, msg))
        return cls(pairs)


def _check_media_url(value: str, info: ValidationInfo, *, required_scheme_hint: str) -> str:
    scheme = urlsplit(value).scheme.lower()
    if scheme in ("http", "https"):
        # SSRF rules (issue #11): the deployment's allowlist and length limit come in the context.
        policy = (info.context or {}).get("url_policy")
        policy = policy if isinstance(policy, UrlPolicy) else UrlPolicy()
        return validate_url(value, allow=policy.allow, max_length=policy.max_length, allow_data=False)
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

    # strict: no coercion (True is not 1, "5" is not 5, 5.0 is not 5), so what fal gets is what was sent.
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True, strict=True)

    video_url: str = Field(description="Source video: http(s) URL (or a data: URI up to a size cap).")
    aspect_ratio: AspectRatio = Field(description="Target aspect ratio.")
    image_url: str | None = Field(default=None, description="Optional first-frame image for reframing.")
    prompt: str | None = Field(default=None, description="Optional text guidance.")
    grid_position_x: int | None = Field(
        default=None, ge=0, le=MAX_COORDINATE_PX, description="Source x position in the output."
    )
    grid_position_y: int | None = Field(
        default=None, ge=0, le=MAX_COORDINATE_PX, description="Source y position in the output."
    )
    x_start: int | None = Field(
        default=None, ge=0, le=MAX_COORDINATE_PX, description="Left edge of the source, output pixels."
    )
    x_end: int | None = Field(
        default=None, ge=0, le=MAX_COORDINATE_PX, description="Right edge of the source, output pixels."
    )
    y_start: int | None = Field(
        default=None, ge=0, le=MAX_COORDINATE_PX, description="Top edge of the source, output pixels."
    )
    y_end: int | None = Field(
        default=None, ge=0, le=MAX_COORDINATE_PX, description="Bottom edge of the source, output pixels."
    )

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

    @field_validator("video_url", "image_url", mode="before")
    @classmethod
    def _url_text(cls, value: Any, info: ValidationInfo) -> Any:
        # Length and characters only; which URLs are allowed is _check_media_url's job (it runs after).
        if not isinstance(value, str):
            return value  # the strict str type reports it
        if value.strip().lower().startswith("data:"):
            limit = int((info.context or {}).get("max_data_uri_bytes", DEFAULT_MAX_DATA_URI_BYTES))
            limit = limit * 2 + 4096  # a coarse cap only; _check_media_url checks the decoded size
        else:
            limit = MAX_HTTP_URL_CHARS
        if len(value) > limit:
            raise ValueError(f"is {len(value)} characters; the limit is {limit}")
        if any(ch in _CONTROL_CHARS for ch in value.strip()):
            raise ValueError("contains control characters (NUL, CR, LF, ...)")
        if any(ch.isspace() for ch in value.strip()):
            raise ValueError("contains whitespace; percent-encode it")
        return value

    @field_validator("prompt", mode="after")
    @classmethod
    def _prompt_text(cls, value: str | None) -> str | None:
        if value is not None and any(c in _CONTROL_CHARS - _PROMPT_ALLOWED_CONTROLS for c in value):
            raise ValueError("contains control characters (only newline and tab are allowed)")
        return value

    @model_validator(mode="after")
    def _ranges(self) -> ReframeInput:
        # fal's schema is silent; falemu/validation.py documents the same rules (pairs together, ordered).
        problems: list[tuple[str, str]] = []
        pairs = (("x_start", "x_end"), ("y_start", "y_end"), ("grid_position_x", "grid_position_y"))
        for start, end in pairs:
            lo, hi = getattr(self, start), getattr(self, end)
            if (lo is None) != (hi is None):
                problems.append((start if lo is None else end, f"{start} and {end} must be given together"))
            elif lo is not None and hi is not None and start != "grid_position_x" and hi <= lo:
                problems.append((end, f"{end} must be greater than {start}"))
        if problems:
            # One error carrying every (field, message); InvalidRequest.from_validation_error expands it.
            raise PydanticCustomError(
                "field_pairs", "; ".join(f"{f}: {m}" for f, m in problems), {"problems": problems}
            )
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
    url_policy: UrlPolicy | None = None,
) -> ReframeInput:
    """Validate a request; raise :class:`InvalidRequest` whose message names each bad field.

    ``url_policy`` (allowlist and URL length from ``REFRAME_FETCH_ALLOW``/``REFRAME_MAX_URL_LENGTH``)
    defaults to the strict policy: no internal address or name is allowed.
    """
    if isinstance(data, ReframeInput):
        data = data.model_dump(exclude_none=True)
    if not isinstance(data, dict):
        raise InvalidRequest([("input", "must be a JSON object")])
    context: dict[str, Any] = {"max_data_uri_bytes": max_data_uri_bytes, "max_prompt_chars": max_prompt_chars}
    context["url_policy"] = url_policy or UrlPolicy()
    try:
        return ReframeInput.model_validate(data, context=context)
    except ValidationError as exc:
        raise InvalidRequest.from_validation_error(exc) from None
