"""Scripted faults: a FIFO of specs, each consumed by the requests it matches.

Kinds and when they are consumed:

* ``http``: the matching HTTP call gets ``status`` with ``headers`` and a ``json`` or ``text`` body (after
  ``delay_s``). ``nginx: true`` makes it an ingress error: an nginx HTML page and *no* ``x-fal-request-id``
  (fal-client retries those on 502/503/504). Otherwise the JSON answer carries ``x-fal-request-id``.
* ``drop``: the connection is closed without any response (httpx: ``RemoteProtocolError``). With
  ``after_handling: true`` the call is processed first (a submit creates its request) and only the response
  is lost - the case that makes clients submit twice.
* ``slow``: the call is processed, then the response waits ``delay_s`` before it is sent.
* ``runner_error``: consumed by the next accepted *submit*; that request later ends COMPLETED with
  ``error_type`` (default ``runner_disconnected``) and its result replays ``status`` (default 503).
* ``bad_output``: consumed by the next accepted *submit*; that request succeeds (and is billed) with a
  wrong output: ``output: ratio`` renders another aspect ratio than the one asked for, ``output: truncate``
  cuts the video to ``keep`` (default 0.5) of its length while the File's ``duration`` still claims the
  whole length (fal bills the file it returned: the cut length).
* ``expire_result``: consumed by the next result GET of a completed request; that result (and later GETs)
  answer 404 as if fal's retention had passed.

Webhook deliveries (``op: webhook``; never matched by ``any``), consumed by the next request that ends
with a ``fal_webhook`` URL:

* ``drop``: the webhook is never sent (a lost webhook; the ledger records it with error ``dropped``);
* ``slow``: the first delivery attempt waits ``delay_s``;
* ``duplicate``: the delivery is made twice, the second (freshly signed) ``delay_s`` after the first.

``op`` is one of submit, status, stream, result, cancel, upload (token, upload and file calls),
upload_part (only the part PUTs of multipart uploads), webhook or any.
``times`` is how many matches consume the spec; -1 keeps it until cleared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

KINDS = frozenset({"http", "drop", "slow", "runner_error", "bad_output", "expire_result", "duplicate"})
#: What a ``bad_output`` fault does to the output.
BAD_OUTPUTS = frozenset({"ratio", "truncate"})
OPS = frozenset({"submit", "status", "stream", "result", "cancel", "upload", "upload_part", "webhook", "any"})
#: Fault kinds applied to webhook deliveries.
WEBHOOK_KINDS = frozenset({"drop", "slow", "duplicate"})
#: Ledger ops that the fault op ``upload`` covers (all of storage).
_UPLOAD_OPS = frozenset({"upload", "upload_part", "token", "file"})
#: Fault kinds applied around an HTTP call by the fault middleware.
HTTP_KINDS = frozenset({"http", "drop", "slow"})

#: Request-error status per error_type, from fal's request-errors table.
ERROR_TYPE_STATUS = {
    "request_timeout": 504,
    "startup_timeout": 504,
    "runner_scheduling_failure": 503,
    "runner_connection_timeout": 503,
    "runner_disconnected": 503,
    "runner_connection_refused": 503,
    "runner_connection_error": 503,
    "runner_incomplete_response": 502,
    "runner_server_error": 500,
    "client_disconnected": 499,
    "client_cancelled": 499,
    "bad_request": 400,
    "internal_error": 500,
}

_ERROR_DETAILS = {
    "runner_disconnected": "Runner disconnected",
    "request_timeout": "Request timed out",
    "runner_server_error": "Runner server error",
    "internal_error": "Internal error",
}

NGINX_TITLES = {
    500: "500 Internal Server Error",
    502: "502 Bad Gateway",
    503: "503 Service Temporarily Unavailable",
    504: "504 Gateway Time-out",
}


@dataclass
class Fault:
    """One scripted fault; see the module docstring for the fields."""

    op: str = "any"
    kind: str = "http"
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    json: Any = None
    text: str | None = None
    nginx: bool = False
    times: int = 1
    delay_s: float = 0.0
    error_type: str | None = None
    after_handling: bool = False
    output: str | None = None
    keep: float = 0.5

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Fault:
        """Parse one control-API fault; raises ``ValueError`` on bad fields."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        fault = cls(**raw)
        if fault.kind not in KINDS:
            raise ValueError(f"fault kind must be one of {sorted(KINDS)}")
        if fault.op not in OPS:
            raise ValueError(f"fault op must be one of {sorted(OPS)}")
        if fault.op == "webhook" and fault.kind not in WEBHOOK_KINDS:
            raise ValueError("op webhook takes the kinds drop, slow and duplicate")
        if fault.kind == "duplicate" and fault.op != "webhook":
            raise ValueError("a duplicate fault needs op webhook")
        if fault.kind == "http" and fault.status is None:
            raise ValueError("an http fault needs a status")
        if fault.kind == "bad_output" and (fault.output not in BAD_OUTPUTS or fault.op != "submit"):
            raise ValueError(f"a bad_output fault needs op submit and output one of {sorted(BAD_OUTPUTS)}")
        if not 0 < fault.keep < 1:
            raise ValueError("keep must be between 0 and 1")
        if fault.times == 0 or fault.times < -1:
            raise ValueError("times must be >= 1 or -1")
        fault.headers = {str(k): str(v) for k, v in (fault.headers or {}).items()}
        return fault

    def matches(self, op: str) -> bool:
        """True if this fault applies to a call of ledger op ``op``."""
        if self.op == "any":
            # never break the control API or key discovery; webhook faults are asked for by name
            return op not in {"other", "jwks", "webhook"}
        if self.op == "upload":
            return op in _UPLOAD_OPS
        return self.op == op

    def runner_failure(self) -> tuple[int, str, str]:
        """(status, error_type, detail) for a ``runner_error`` fault."""
        error_type = self.error_type or "runner_disconnected"
        status = self.status or ERROR_TYPE_STATUS.get(error_type, 503)
        detail = self.text or _ERROR_DETAILS.get(error_type, error_type.replace("_", " ").capitalize())
        return status, error_type, detail


class FaultBook:
    """The FIFO of scripted faults."""

    def __init__(self) -> None:
        self._faults: list[Fault] = []

    def add(self, faults: list[Fault]) -> None:
        """Append specs at the end of the FIFO."""
        self._faults.extend(faults)

    def clear(self) -> None:
        """Forget every pending spec."""
        self._faults.clear()

    def pending(self) -> list[Fault]:
        """The specs not yet consumed (for inspection)."""
        return list(self._faults)

    def take(self, op: str, kinds: frozenset[str]) -> Fault | None:
        """Consume and return the first spec of one of ``kinds`` that matches ``op``."""
        for index, fault in enumerate(self._faults):
            if fault.kind in kinds and fault.matches(op):
                if fault.times > 0:
                    fault.times -= 1
                    if fault.times == 0:
                        del self._faults[index]
                return fault
        return None


def nginx_page(status: int) -> str:
    """An nginx error page like the ingress sends (the word ``nginx`` is what fal-client looks for)."""
    title = NGINX_TITLES.get(status, f"{status} Error")
    return (
        f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n<center><h1>{title}</h1></center>\r\n"
        "<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
    )


def default_fault_body(status: int) -> dict[str, Any]:
    """A plausible fal JSON error body for an ``http`` fault without an explicit body."""
    if status == 429:
        return {"detail": "Too many requests"}
    if status == 408:
        return {"detail": "Request timeout"}
    if status == 409:
        return {"detail": "Conflict"}
    if status >= 500:
        error_type = "internal_error" if status == 500 else "runner_scheduling_failure"
        if status == 504:
            error_type = "request_timeout"
        return {"detail": _ERROR_DETAILS.get(error_type, "Service unavailable"), "error_type": error_type}
    return {"detail": f"Injected error {status}"}
