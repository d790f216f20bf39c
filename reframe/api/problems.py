"""RFC 9457 problem details: every error of the HTTP API is one ``application/problem+json`` body.

A problem names its ``type`` (a URN per kind of error), a ``title``, the HTTP ``status`` and a
``detail`` for people; validation problems add ``errors``: one ``{"field", "message"}`` per bad
field, named by path exactly as the producer library names them (``aspect_ratio``,
``items[2].metadata.k``). No problem ever carries a stack trace, an API key or ``FAL_KEY``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, Field
from starlette.responses import Response

PROBLEM_MEDIA_TYPE = "application/problem+json"
TYPE_PREFIX = "urn:reframe:problem:"


class FieldError(BaseModel):
    """One bad field of a request."""

    field: str = Field(description="Path of the field (`aspect_ratio`, `items[2].metadata.k`).")
    message: str = Field(description="What is wrong with it.")


class Problem(BaseModel):
    """An RFC 9457 problem details object."""

    type: str = Field(description="A URN naming the kind of problem (`urn:reframe:problem:<slug>`).")
    title: str = Field(description="Short summary of the kind of problem.")
    status: int = Field(description="The HTTP status code.")
    detail: str = Field(description="What happened in this case, for people.")
    errors: list[FieldError] | None = Field(default=None, description="Bad fields (validation only).")


class ProblemError(Exception):
    """Raise to answer with a problem; the app's handler renders it."""

    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str,
        *,
        errors: Iterable[tuple[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.title = title
        self.detail = detail
        self.errors = list(errors) if errors is not None else None
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The problem as a JSON-ready dict."""
        doc: dict[str, Any] = {
            "type": TYPE_PREFIX + self.slug,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if self.errors is not None:
            doc["errors"] = [{"field": f, "message": m} for f, m in self.errors]
        return doc

    def response(self) -> Response:
        """The problem as a Starlette response."""
        return Response(
            content=json.dumps(self.body(), separators=(",", ":")),
            status_code=self.status,
            media_type=PROBLEM_MEDIA_TYPE,
            headers=self.headers,
        )


def invalid(
    errors: Iterable[tuple[str, str]], detail: str = "the request has invalid fields"
) -> ProblemError:
    """422: the request names bad fields."""
    return ProblemError(422, "validation", "Invalid request", detail, errors=errors)


def not_found(what: str) -> ProblemError:
    """404 without saying whether the thing exists for someone else."""
    return ProblemError(404, "not-found", "Not found", f"no {what} (or it is not yours, or it expired)")


def body_too_large(limit_bytes: int) -> ProblemError:
    """413 naming the limit."""
    return ProblemError(
        413, "body-too-large", "Request body too large", f"the body is larger than {limit_bytes} bytes"
    )


#: The statuses a route of the API may answer with a problem (documented in the OpenAPI schema).
PROBLEM_STATUSES = (400, 401, 403, 404, 405, 409, 413, 415, 422, 429, 500, 502, 503)
