"""Pure decisions of the fal client: classify, retry or not, how long to wait.

No I/O and no hidden randomness: responses come in as status, headers and body bytes, the clock
as ``now_s``, randomness as an injected ``rng``, so every rule is a table test.

Classification (``op`` matters: the same status means different things on submit):

* 2xx: success (``None``).
* 408, 409, 429: transient, carrying ``Retry-After`` when sent.
* 400: permanent; on ``result``, "Request is still in progress" is transient.
* 401, 403 (also the "locked" account): auth. 404: not found.
* 422 and other 4xx: permanent, fal's ``detail`` kept; on ``result`` a model error (the runner's
  4xx replayed), except 499 (``client_cancelled``), which is plain permanent.
* 504 with ``X-Fal-Request-Timeout-Type``: permanent (the start deadline we set expired).
* 502, 504 on ``submit``: ambiguous (a gateway; the upstream may have queued it), whatever else.
* ``X-Fal-Retryable: false`` on fal's own 5xx: permanent.
* other 5xx on ``submit`` (fal's JSON 500/503, ingress 503): transient; refused, not queued.
* 5xx on ``result`` with ``x-fal-request-id``: runner error (the runner's failure replayed).
* any other 5xx (ingress or fal's) on status, stream, result, cancel, upload, token: transient.
* ConnectError, ConnectTimeout, PoolTimeout: transient (nothing left the process).
* UnsupportedProtocol, LocalProtocolError: permanent (our bug).
* any other transport error or timeout: ambiguous on ``submit`` once the body was sent, else
  transient.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Literal, cast

import httpx

from worker.fal.errors import (
    FalAmbiguousError,
    FalAuthError,
    FalError,
    FalModelError,
    FalNotFoundError,
    FalPermanentError,
    FalRunnerError,
    FalTransientError,
)
from worker.fal.models import FalCancelAnswer

StatusClass = Literal["2xx", "3xx", "4xx", "429", "5xx", "timeout", "network"]

RETRYABLE_4XX = frozenset({408, 409, 429})
GATEWAY_AMBIGUOUS = frozenset({502, 504})
INGRESS_CODES = frozenset({502, 503, 504})
STILL_IN_PROGRESS = "still in progress"
CLIENT_CLOSED = 499  # fal's client_cancelled / client_disconnected

# Exceptions raised before a single byte of the request left the process: safe for any op.
PRE_SEND_ERRORS: tuple[type[httpx.HTTPError], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
)
# Exceptions that mean our request was malformed or unsendable: retrying repeats the bug.
OUR_BUGS: tuple[type[httpx.HTTPError], ...] = (httpx.UnsupportedProtocol, httpx.LocalProtocolError)


def status_class(status_code: int | None = None, *, timeout: bool = False) -> StatusClass:
    """The ``status_class`` metrics label of one fal HTTP call.

    ``None`` means no response arrived: ``timeout`` tells a timeout from another transport error
    (``network``). 429 has its own class: throttling is handled (and alerted on) apart from other
    client errors.
    """
    if status_code is None:
        return "timeout" if timeout else "network"
    if status_code == 429:
        return "429"
    for low, label in ((200, "2xx"), (300, "3xx"), (400, "4xx"), (500, "5xx")):
        if low <= status_code < low + 100:
            return cast(StatusClass, label)
    return "network"  # 1xx or garbage: not a usable HTTP answer


def parse_retry_after(value: str | None, now_s: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or HTTP-date).

    Negative, non-finite or unparseable values give ``None`` (no advice). A date in the past
    gives ``0.0``: the server's wait is over.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        return _retry_after_date(text, now_s)
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


def _retry_after_date(text: str, now_s: float) -> float | None:
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; a naive result means no zone was given
        return None
    return max(0.0, when.timestamp() - now_s)


def classify_response(
    op: str,
    status_code: int,
    headers: Mapping[str, str],
    body_bytes: bytes,
    *,
    now_s: float = 0.0,
) -> FalError | None:
    """The error a response stands for, or ``None`` when it is a success for ``op``.

    ``headers`` must look up case-insensitively (``httpx.Headers`` does). ``now_s`` (Unix
    seconds) only matters for an HTTP-date ``Retry-After``. Cancel's 400/404 outcomes are read
    by :func:`cancel_outcome` first; here they are plain errors.
    """
    if 200 <= status_code < 300:
        return None
    facts = _Facts.read(op, status_code, headers, body_bytes, now_s)
    if status_code >= 500:
        return _classify_5xx(facts)
    if status_code >= 400:
        return _classify_4xx(facts)
    return facts.make(FalPermanentError, f"unexpected HTTP {status_code}")


@dataclass(frozen=True, kw_only=True)
class _Facts:
    """What a response says, decoded once."""

    op: str
    status_code: int
    headers: Mapping[str, str]
    detail: object
    error_type: str | None
    text: str
    retry_after_s: float | None
    request_id: str | None

    @classmethod
    def read(cls, op: str, status_code: int, headers: Mapping[str, str], body: bytes, now_s: float) -> _Facts:
        text = body.decode("utf-8", "replace")
        parsed: object = None
        try:
            parsed = json.loads(text) if text.strip() else None
        except ValueError:
            parsed = None
        detail: object = None
        error_type = headers.get("x-fal-error-type") or None
        if isinstance(parsed, dict):
            detail = parsed.get("detail")
            if detail is None and "message" in parsed:  # {"error":"Error","message":"Path /x not found"}
                detail = parsed["message"]
            body_type = parsed.get("error_type")
            error_type = body_type if isinstance(body_type, str) and body_type else error_type
        return cls(
            op=op,
            status_code=status_code,
            headers=headers,
            detail=detail,
            error_type=error_type,
            text=text,
            retry_after_s=parse_retry_after(headers.get("retry-after"), now_s),
            request_id=headers.get("x-fal-request-id") or None,
        )

    @property
    def summary(self) -> str:
        """A short human message: fal's detail when it has one, else the start of the body."""
        if isinstance(self.detail, str) and self.detail:
            return self.detail
        if isinstance(self.detail, list):
            return f"{len(self.detail)} validation error(s): " + "; ".join(
                str(d.get("msg", d)) if isinstance(d, dict) else str(d) for d in self.detail[:5]
            )
        snippet = " ".join(self.text.split())[:200]
        return snippet or f"HTTP {self.status_code}"

    @property
    def from_fal(self) -> bool:
        """fal's own servers tag their answers with ``x-fal-request-id``; ingress (nginx) does not."""
        return self.request_id is not None

    @property
    def user_timeout(self) -> bool:
        return self.status_code == 504 and bool(self.headers.get("x-fal-request-timeout-type"))

    @property
    def retryable_false(self) -> bool:
        return self.headers.get("x-fal-retryable", "").strip().lower() == "false"

    def make(self, cls: type[FalError], note: str | None = None) -> FalError:
        message = f"{note}: {self.summary}" if note else self.summary
        err = cls(
            message,
            op=self.op,
            status_code=self.status_code,
            error_type=self.error_type,
            detail=self.detail,
            request_id=self.request_id,
        )
        if isinstance(err, FalTransientError):
            err.retry_after_s = self.retry_after_s
        return err


def _classify_4xx(f: _Facts) -> FalError:
    code = f.status_code
    if code in RETRYABLE_4XX:
        return f.make(FalTransientError)
    if code in (401, 403):
        return f.make(FalAuthError)
    if code == 404:
        return f.make(FalNotFoundError)
    if f.op == "result":
        if code == 400 and STILL_IN_PROGRESS in f.summary.lower():
            return f.make(FalTransientError, "result not ready")
        if code == CLIENT_CLOSED:
            # client_cancelled / client_disconnected: final, but nothing wrong with the input.
            return f.make(FalPermanentError)
        # The result endpoint replays the model's own 4xx (usually a 422 validation error).
        return f.make(FalModelError)
    return f.make(FalPermanentError)


def _classify_5xx(f: _Facts) -> FalError:
    if f.user_timeout:
        # The start deadline we set ourselves (X-Fal-Request-Timeout) expired; fal does not
        # re-queue it and neither official client retries it.
        return f.make(FalPermanentError, "request start timeout")
    if f.op == "submit" and f.status_code in GATEWAY_AMBIGUOUS:
        # A gateway speaks for an upstream that may have queued the request before the gateway
        # gave up (504) or lost the reply (502). No header makes that safe to repeat.
        return f.make(FalAmbiguousError, "gateway error after submit; fal may have queued it")
    if f.from_fal and f.retryable_false:
        return f.make(FalPermanentError)
    if f.op == "submit":
        # fal's 500/503 (JSON, x-fal-request-id) and ingress 503: refused, not queued, not charged.
        return f.make(FalTransientError)
    if f.op == "result" and f.from_fal:
        # fal replays the runner's failure; it is final for this request, transient for the job.
        return f.make(FalRunnerError)
    return f.make(FalTransientError)


def classify_exception(op: str, exc: httpx.HTTPError, *, body_sent: bool) -> FalError:
    """The error an httpx exception stands for.

    ``body_sent`` says whether any of the request body may have reached fal. It only matters
    for ``submit``: once fal may have read the body, losing the reply makes the outcome unknown.
    """
    name = type(exc).__name__
    message = f"{name}: {exc}" if str(exc) else name
    if isinstance(exc, OUR_BUGS):
        return FalPermanentError(message, op=op)
    if isinstance(exc, PRE_SEND_ERRORS):
        return FalTransientError(message, op=op)
    if op == "submit" and body_sent:
        return FalAmbiguousError(f"{message} (after the body was sent; fal may have queued it)", op=op)
    return FalTransientError(message, op=op)


def cancel_outcome(status_code: int, body_bytes: bytes) -> FalCancelAnswer | None:
    """The outcome a cancel response reports, or ``None`` when it is an error to classify.

    202 (or 200, fal's ``OK``) → requested; 400 ``ALREADY_COMPLETED`` → already completed;
    404 → not found. A 400 that does not say ``ALREADY_COMPLETED`` is a real error.
    """
    if status_code in (200, 202):
        return FalCancelAnswer.REQUESTED
    if status_code == 404:
        return FalCancelAnswer.NOT_FOUND
    if status_code == 400 and b"ALREADY_COMPLETED" in body_bytes:
        return FalCancelAnswer.ALREADY_COMPLETED
    return None


def should_retry(error: FalError, attempt: int, max_attempts: int) -> bool:
    """Whether to make attempt ``attempt + 1`` after attempt number ``attempt`` (1-based) failed.

    Never for permanent or ambiguous errors (an ambiguous submit repeated may be paid twice);
    transient errors while fewer than ``max_attempts`` attempts were made.
    """
    return isinstance(error, FalTransientError) and attempt < max_attempts


RandomSource = random.Random | Callable[[], float]

MAX_EXPONENT = 62  # base * 2**62 already exceeds any cap; avoids float overflow for huge attempts


def backoff_s(
    attempt: int,
    *,
    base_s: float,
    cap_s: float,
    rng: RandomSource,
    retry_after_s: float | None = None,
) -> float:
    """Seconds to sleep before retry number ``attempt`` (0-based).

    Without ``Retry-After``: full jitter, ``U(0, min(cap_s, base_s * 2**attempt))``. With a
    ``Retry-After`` of ``r``: ``r + U(0, min(0.1 * r, 5))``. The server's value is a floor and is
    never broken; the small jitter above it keeps many clients from returning in lockstep.
    """
    u = _uniform01(rng)
    if retry_after_s is not None and retry_after_s >= 0:
        return retry_after_s + u * min(0.1 * retry_after_s, 5.0)
    exponent = min(max(attempt, 0), MAX_EXPONENT)
    return u * min(cap_s, base_s * 2.0**exponent)


def _uniform01(rng: RandomSource) -> float:
    value = rng.random() if isinstance(rng, random.Random) else rng()
    return min(max(value, 0.0), 1.0)
