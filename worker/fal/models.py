"""The fal queue API's JSON shapes, as far as we read them.

Every model tolerates unknown fields: fal adds fields over time (``gateway_request_id``,
``width``/``height`` on files), and a new field must never fail a request that succeeded.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict


class _Tolerant(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class SubmitReceipt(_Tolerant):
    """What a submit returns: the request id and the three URLs to follow it.

    Store it whole: the URLs are the ones fal returned (the docs say to use them rather than
    build them), or, when fal sent none, the owner/app fallback of :func:`request_urls`.
    """

    request_id: str
    status_url: str
    response_url: str
    cancel_url: str
    queue_position: int | None = None


class QueueStatus(_Tolerant):
    """One status report. A failed request is ``COMPLETED`` with ``error``/``error_type`` set."""

    status: Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    queue_position: int | None = None
    logs: list[object] | None = None
    metrics: dict[str, object] | None = None
    error: str | None = None
    error_type: str | None = None

    @property
    def completed(self) -> bool:
        """True once fal is done with the request, successfully or not."""
        return self.status == "COMPLETED"

    @property
    def failed(self) -> bool:
        """True when the request completed with an error (the result endpoint replays it)."""
        return self.completed and (self.error is not None or self.error_type is not None)


class FalFile(_Tolerant):
    """fal's ``File`` object (``url`` on fal's CDN plus optional metadata)."""

    url: str
    content_type: str | None = None
    file_name: str | None = None
    file_size: int | None = None


class ReframeOutput(_Tolerant):
    """The result of Luma Ray 2 Flash Reframe: ``{"video": File}``."""

    video: FalFile


class FalCancelAnswer(StrEnum):
    """What fal answered a cancel. The values are fal's own status strings."""

    REQUESTED = "CANCELLATION_REQUESTED"
    """fal removed the queued request or signalled the runner; it ends COMPLETED either way."""
    ALREADY_COMPLETED = "ALREADY_COMPLETED"
    """Too late: the request had already completed (and may be charged)."""
    NOT_FOUND = "NOT_FOUND"
    """fal does not know the request (never queued, or no longer kept)."""


_LEGACY_APP_ID = re.compile(r"^([0-9]+)-([a-zA-Z0-9-]+)$")
_NAMESPACES = frozenset({"workflows", "comfy"})


def app_path(model_id: str) -> str:
    """The ``[namespace/]owner/alias`` part of ``model_id``, endpoint path dropped.

    The rule: docs/fal-wire-protocol.md §1.3.

    ``fal-ai/luma-dream-machine/ray-2-flash/reframe`` → ``fal-ai/luma-dream-machine``. Mirrors
    ``AppId.from_endpoint_id`` of fal-client; raises ``ValueError`` for an id it cannot parse.
    """
    parts = model_id.strip("/").split("/")
    if len(parts) == 1:
        match = _LEGACY_APP_ID.match(parts[0])
        if match is None:
            raise ValueError(f"invalid fal model id {model_id!r}")
        return f"{match.group(1)}/{match.group(2)}"
    if parts[0] in _NAMESPACES:
        if len(parts) < 3:
            raise ValueError(f"invalid fal model id {model_id!r}")
        return "/".join(parts[:3])
    return "/".join(parts[:2])


def request_urls(queue_url: str, model_id: str, request_id: str) -> tuple[str, str, str]:
    """``(status_url, response_url, cancel_url)`` of ``request_id`` by the owner/app rule."""
    base = f"{queue_url.rstrip('/')}/{app_path(model_id)}/requests/{request_id}"
    return f"{base}/status", base, f"{base}/cancel"
