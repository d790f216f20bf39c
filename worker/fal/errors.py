"""The typed errors of the fal client.

One small hierarchy, split by what the caller should do next, not by HTTP status:

* :class:`FalTransientError`: fal did not take the call; trying again later is safe
  (:class:`FalRunnerError` narrows it to a request that fal ran and that failed on the runner).
* :class:`FalPermanentError`: trying again cannot help (bad input, bad key, unknown request)
  (:class:`FalAuthError`, :class:`FalNotFoundError`, :class:`FalModelError`).
* :class:`FalAmbiguousError`: a submit whose outcome is unknown; fal may or may not have queued it.

Messages are built from fal's response bodies and httpx's exception texts only; they never carry
the API key or the ``Authorization`` header (the client also scrubs its secrets from them).
"""

from __future__ import annotations

from typing import Any, Literal

FalOp = Literal["submit", "status", "stream", "result", "cancel", "upload", "token"]


class FalError(Exception):
    """A failed fal call.

    Attributes:
        op: the client operation that failed (``submit``, ``status``, ``stream``, ``result``,
            ``cancel``, ``upload``, ``token``).
        status_code: the HTTP status, or ``None`` when no response arrived.
        error_type: fal's machine-readable category (body ``error_type`` or ``X-Fal-Error-Type``).
        detail: fal's ``detail`` as sent: a string for request errors, a list of pydantic errors
            for model (validation) errors, ``None`` when absent.
        request_id: fal's request id when known (``x-fal-request-id`` or the request's own id).
    """

    def __init__(
        self,
        message: str,
        *,
        op: str,
        status_code: int | None = None,
        error_type: str | None = None,
        detail: object = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.op = op
        self.status_code = status_code
        self.error_type = error_type
        self.detail = detail
        self.request_id = request_id

    def __str__(self) -> str:
        parts = [f"fal {self.op} failed: {self.message}"]
        if self.status_code is not None:
            parts.append(f"status={self.status_code}")
        if self.error_type:
            parts.append(f"error_type={self.error_type}")
        if self.request_id:
            parts.append(f"request_id={self.request_id}")
        return " ".join(parts)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(op={self.op!r}, status_code={self.status_code!r}, "
            f"error_type={self.error_type!r}, request_id={self.request_id!r}, message={self.message!r})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only constructors do not survive the default exception pickling, and errors
        # may cross process boundaries (Celery results, logging handlers).
        return (_rebuild, (type(self), self.message, dict(self.__dict__)))

    def redact(self, secrets: list[str]) -> None:
        """Replace every occurrence of ``secrets`` in the message and a string detail by ``***``."""
        for secret in secrets:
            if not secret:
                continue
            self.message = self.message.replace(secret, "***")
            if isinstance(self.detail, str):
                self.detail = self.detail.replace(secret, "***")
        self.args = (self.message,)


def _rebuild(cls: type[FalError], message: str, state: dict[str, Any]) -> FalError:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


class FalTransientError(FalError):
    """fal did not take the call, or not yet; the same call may succeed later.

    Raised for connect errors and pool timeouts, 408, 409, 429, ingress (nginx) 502/503/504,
    fal's own JSON 5xx that reject a call, and timeouts of idempotent calls.

    Attributes:
        retry_after_s: the server's ``Retry-After`` in seconds when it sent one. It is a floor:
            never call again sooner.
    """

    def __init__(
        self,
        message: str,
        *,
        op: str,
        status_code: int | None = None,
        error_type: str | None = None,
        detail: object = None,
        request_id: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(
            message,
            op=op,
            status_code=status_code,
            error_type=error_type,
            detail=detail,
            request_id=request_id,
        )
        self.retry_after_s = retry_after_s


class FalRunnerError(FalTransientError):
    """The request ran and failed on fal's side (runner crash, timeout, 5xx).

    fal reports it as ``COMPLETED`` with ``error_type`` ``runner_*``, ``request_timeout``,
    ``startup_timeout`` or a 5xx result. fal does not charge 5xx, and a new submit of the same
    input may well succeed, so it is transient at the job level. Fetching the result again is
    pointless: it replays the same failure, so the client never retries it in-call.
    """


class FalPermanentError(FalError):
    """Trying again cannot help: a 400 bad request, a validation error, an unexpected status."""


class FalAuthError(FalPermanentError):
    """401 (unknown or malformed key) or 403 (no permission, or the account is locked)."""


class FalNotFoundError(FalPermanentError):
    """404: unknown app or path, or a request id fal does not know (or no longer keeps)."""


class FalModelError(FalPermanentError):
    """The request completed with a model error (a 4xx/422 replayed by the result endpoint).

    ``detail`` keeps fal's list of pydantic errors; :attr:`messages` renders them.
    """

    @property
    def messages(self) -> list[str]:
        """Each validation error as ``"loc: msg"`` (``detail`` itself when it is a string)."""
        if isinstance(self.detail, str):
            return [self.detail]
        if not isinstance(self.detail, list):
            return []
        out = []
        for item in self.detail:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
                msg = str(item.get("msg", ""))
                out.append(f"{loc}: {msg}" if loc else msg)
            else:
                out.append(str(item))
        return out


class FalAmbiguousError(FalError):
    """A submit whose outcome is unknown: fal may or may not have queued (and will charge) it.

    fal has no idempotency key and no client-chosen request id, so a submit cannot be safely
    repeated once fal may have seen it. The outcome is unknown when:

    * the body was sent and then the read timed out, or the connection was reset or dropped
      before a response arrived: fal may have queued the request and lost only the reply;
    * a 502 or 504 answered the submit: a gateway speaks for an upstream that may have accepted
      the request before the gateway gave up on it (504) or lost its reply (502);
    * a 2xx arrived whose body names no request id: fal took it, but we cannot track it.

    A 503, or a 500 that fal itself sends (JSON, with ``x-fal-request-id``), is not ambiguous:
    the gateway refused the call and did not queue it (fal never charges 5xx), so it is transient.
    The job level decides (dead-letter, or resubmit at the risk of paying twice).
    """
