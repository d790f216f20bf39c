"""The pure decisions of the fal client: classification, Retry-After, should_retry, backoff."""

from __future__ import annotations

import json
import pickle
import random
from datetime import UTC, datetime
from email.utils import format_datetime

import httpx
import pytest

from worker.fal import (
    FalAmbiguousError,
    FalAuthError,
    FalCancelAnswer,
    FalError,
    FalModelError,
    FalNotFoundError,
    FalPermanentError,
    FalRunnerError,
    FalTransientError,
    backoff_s,
    cancel_outcome,
    classify_exception,
    classify_response,
    parse_retry_after,
    should_retry,
    status_class,
)

NOW_S = 1_767_225_600.0  # 2026-01-01T00:00:00Z
RID = {"x-fal-request-id": "gw-1", "content-type": "application/json"}
NGINX_502 = b"<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>"
NGINX_503 = NGINX_502.replace(b"502 Bad Gateway", b"503 Service Temporarily Unavailable")
NGINX_504 = NGINX_502.replace(b"502 Bad Gateway", b"504 Gateway Time-out")
DETAIL_422 = [
    {"loc": ["body", "video_url"], "msg": "Field required", "type": "missing"},
    {"loc": ["body", "aspect_ratio"], "msg": "Input should be '1:1' or '16:9'", "type": "enum"},
]


def j(obj: object) -> bytes:
    return json.dumps(obj).encode()


def http_date(delta_s: float) -> str:
    return format_datetime(datetime.fromtimestamp(NOW_S + delta_s, UTC), usegmt=True)


# (id, op, status, headers, body, expected class, expected retry_after_s)
RESPONSE_CASES: list[tuple[str, str, int, dict[str, str], bytes, type[FalError] | None, float | None]] = [
    ("200 submit", "submit", 200, RID, j({"request_id": "r"}), None, None),
    ("202 status", "status", 202, RID, j({"status": "IN_QUEUE"}), None, None),
    ("408", "submit", 408, {}, b"", FalTransientError, None),
    ("409", "status", 409, RID, j({"detail": "conflict"}), FalTransientError, None),
    ("429 no Retry-After", "submit", 429, RID, j({"detail": "Too many requests"}), FalTransientError, None),
    ("429 Retry-After secs", "submit", 429, {**RID, "Retry-After": "7"}, b"{}", FalTransientError, 7.0),
    ("429 Retry-After date", "status", 429, {"Retry-After": http_date(30)}, b"", FalTransientError, 30.0),
    ("429 Retry-After junk", "submit", 429, {"Retry-After": "soon"}, b"", FalTransientError, None),
    ("nginx 502 submit", "submit", 502, {}, NGINX_502, FalAmbiguousError, None),
    ("nginx 503 submit", "submit", 503, {}, NGINX_503, FalTransientError, None),
    ("nginx 504 submit", "submit", 504, {}, NGINX_504, FalAmbiguousError, None),
    ("nginx 502 status", "status", 502, {}, NGINX_502, FalTransientError, None),
    ("nginx 503 status", "status", 503, {}, NGINX_503, FalTransientError, None),
    ("nginx 504 status", "status", 504, {}, NGINX_504, FalTransientError, None),
    ("nginx 502 result", "result", 502, {}, NGINX_502, FalTransientError, None),
    ("nginx 504 cancel", "cancel", 504, {}, NGINX_504, FalTransientError, None),
    (
        "json 500 submit",
        "submit",
        500,
        RID,
        j({"detail": "Internal error", "error_type": "internal_error"}),
        FalTransientError,
        None,
    ),
    (
        "json 503 submit",
        "submit",
        503,
        {**RID, "Retry-After": "2"},
        j({"detail": "Service unavailable"}),
        FalTransientError,
        2.0,
    ),
    ("json 502 submit", "submit", 502, RID, j({"detail": "Bad gateway"}), FalAmbiguousError, None),
    ("json 504 submit", "submit", 504, RID, j({"detail": "Gateway timeout"}), FalAmbiguousError, None),
    ("json 500 status", "status", 500, RID, j({"detail": "Internal error"}), FalTransientError, None),
    ("json 503 status", "status", 503, RID, j({"detail": "busy"}), FalTransientError, None),
    (
        "json 500 submit retryable=false",
        "submit",
        500,
        {**RID, "X-Fal-Retryable": "false"},
        j({"detail": "no"}),
        FalPermanentError,
        None,
    ),
    (
        "json 504 submit retryable=false stays ambiguous",
        "submit",
        504,
        {**RID, "X-Fal-Retryable": "false"},
        b"{}",
        FalAmbiguousError,
        None,
    ),
    (
        "user timeout 504 submit",
        "submit",
        504,
        {**RID, "X-Fal-Request-Timeout-Type": "user"},
        j({"detail": "Request timed out", "error_type": "request_timeout"}),
        FalPermanentError,
        None,
    ),
    (
        "user timeout 504 result",
        "result",
        504,
        {**RID, "X-Fal-Request-Timeout-Type": "user"},
        j({"detail": "Request timed out"}),
        FalPermanentError,
        None,
    ),
    ("401", "submit", 401, {}, j({"detail": "No user found for Key ID and Secret"}), FalAuthError, None),
    (
        "403 locked",
        "submit",
        403,
        RID,
        j(
            {
                "detail": "User is locked. Reason: Exhausted balance. Top up your balance at fal.ai/dashboard/billing"
            }
        ),
        FalAuthError,
        None,
    ),
    (
        "404 app",
        "submit",
        404,
        {},
        j({"error": "Error", "message": "Path /x not found"}),
        FalNotFoundError,
        None,
    ),
    ("404 request status", "status", 404, RID, j({"detail": "Request not found"}), FalNotFoundError, None),
    (
        "404 request result (expired)",
        "result",
        404,
        RID,
        j({"detail": "Request not found"}),
        FalNotFoundError,
        None,
    ),
    (
        "400 submit",
        "submit",
        400,
        RID,
        j({"detail": "bad request", "error_type": "bad_request"}),
        FalPermanentError,
        None,
    ),
    ("422 submit", "submit", 422, RID, j({"detail": DETAIL_422}), FalPermanentError, None),
    ("422 result", "result", 422, RID, j({"detail": DETAIL_422}), FalModelError, None),
    (
        "400 result still in progress",
        "result",
        400,
        RID,
        j({"detail": "Request is still in progress"}),
        FalTransientError,
        None,
    ),
    ("400 result other", "result", 400, RID, j({"detail": "bad image"}), FalModelError, None),
    (
        "499 result cancelled",
        "result",
        499,
        RID,
        j({"detail": "Request cancelled by client", "error_type": "client_cancelled"}),
        FalPermanentError,
        None,
    ),
    ("413 submit", "submit", 413, {}, b"too large", FalPermanentError, None),
    (
        "runner 503 result",
        "result",
        503,
        {**RID, "X-Fal-Error-Type": "runner_disconnected"},
        j({"detail": "Runner disconnected"}),
        FalRunnerError,
        None,
    ),
    (
        "runner 504 result",
        "result",
        504,
        RID,
        j({"detail": "Request timed out", "error_type": "request_timeout"}),
        FalRunnerError,
        None,
    ),
    (
        "runner 500 result",
        "result",
        500,
        RID,
        j({"detail": "boom", "error_type": "runner_server_error"}),
        FalRunnerError,
        None,
    ),
    ("302 status", "status", 302, {"location": "http://elsewhere"}, b"", FalPermanentError, None),
]


@pytest.mark.parametrize(
    ("op", "code", "headers", "body", "expected", "retry_after"),
    [case[1:] for case in RESPONSE_CASES],
    ids=[case[0] for case in RESPONSE_CASES],
)
def test_classify_response(
    op: str,
    code: int,
    headers: dict[str, str],
    body: bytes,
    expected: type[FalError] | None,
    retry_after: float | None,
) -> None:
    err = classify_response(op, code, httpx.Headers(headers), body, now_s=NOW_S)
    if expected is None:
        assert err is None
        return
    assert type(err) is expected
    assert err.op == op
    assert err.status_code == code
    if isinstance(err, FalTransientError):
        if retry_after is None:
            assert err.retry_after_s is None
        else:
            assert err.retry_after_s == pytest.approx(retry_after)


def test_422_keeps_fal_detail_and_messages() -> None:
    err = classify_response("result", 422, httpx.Headers(RID), j({"detail": DETAIL_422}))
    assert isinstance(err, FalModelError)
    assert err.detail == DETAIL_422
    assert err.messages == ["video_url: Field required", "aspect_ratio: Input should be '1:1' or '16:9'"]
    assert "Field required" in str(err)
    assert err.request_id == "gw-1"


def test_error_type_from_body_then_header() -> None:
    body = classify_response(
        "result", 503, httpx.Headers({**RID, "X-Fal-Error-Type": "x"}), j({"error_type": "y"})
    )
    header = classify_response("result", 503, httpx.Headers({**RID, "X-Fal-Error-Type": "x"}), b"{}")
    assert body is not None and body.error_type == "y"
    assert header is not None and header.error_type == "x"


def test_string_detail_kept() -> None:
    err = classify_response("submit", 403, httpx.Headers({}), j({"detail": "User is locked."}))
    assert err is not None and err.detail == "User is locked." and "User is locked." in str(err)


REQ = httpx.Request("POST", "https://queue.fal.run/fal-ai/x")

EXC_CASES: list[tuple[str, str, httpx.HTTPError, bool, type[FalError]]] = [
    ("connect submit", "submit", httpx.ConnectError("refused", request=REQ), False, FalTransientError),
    (
        "connect submit flagged sent",
        "submit",
        httpx.ConnectError("refused", request=REQ),
        True,
        FalTransientError,
    ),
    ("connect timeout submit", "submit", httpx.ConnectTimeout("t", request=REQ), False, FalTransientError),
    ("pool timeout submit", "submit", httpx.PoolTimeout("t", request=REQ), False, FalTransientError),
    ("read timeout submit sent", "submit", httpx.ReadTimeout("t", request=REQ), True, FalAmbiguousError),
    ("read timeout submit unsent", "submit", httpx.ReadTimeout("t", request=REQ), False, FalTransientError),
    ("write timeout submit sent", "submit", httpx.WriteTimeout("t", request=REQ), True, FalAmbiguousError),
    ("write timeout submit unsent", "submit", httpx.WriteTimeout("t", request=REQ), False, FalTransientError),
    (
        "remote protocol submit sent",
        "submit",
        httpx.RemoteProtocolError("Server disconnected", request=REQ),
        True,
        FalAmbiguousError,
    ),
    (
        "remote protocol submit unsent",
        "submit",
        httpx.RemoteProtocolError("x", request=REQ),
        False,
        FalTransientError,
    ),
    ("read error submit sent", "submit", httpx.ReadError("reset", request=REQ), True, FalAmbiguousError),
    ("read timeout status", "status", httpx.ReadTimeout("t", request=REQ), True, FalTransientError),
    (
        "remote protocol status",
        "status",
        httpx.RemoteProtocolError("x", request=REQ),
        True,
        FalTransientError,
    ),
    ("connect status", "status", httpx.ConnectError("x", request=REQ), False, FalTransientError),
    ("pool timeout result", "result", httpx.PoolTimeout("t", request=REQ), False, FalTransientError),
    ("read timeout cancel", "cancel", httpx.ReadTimeout("t", request=REQ), True, FalTransientError),
    ("read timeout stream", "stream", httpx.ReadTimeout("t", request=REQ), False, FalTransientError),
    (
        "unsupported protocol",
        "submit",
        httpx.UnsupportedProtocol("ftp", request=REQ),
        False,
        FalPermanentError,
    ),
    (
        "local protocol",
        "status",
        httpx.LocalProtocolError("bad header", request=REQ),
        False,
        FalPermanentError,
    ),
]


@pytest.mark.parametrize(
    ("op", "exc", "body_sent", "expected"), [c[1:] for c in EXC_CASES], ids=[c[0] for c in EXC_CASES]
)
def test_classify_exception(op: str, exc: httpx.HTTPError, body_sent: bool, expected: type[FalError]) -> None:
    err = classify_exception(op, exc, body_sent=body_sent)
    assert type(err) is expected
    assert err.op == op
    assert err.status_code is None
    assert type(exc).__name__ in str(err)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("0", 0.0),
        ("5", 5.0),
        (" 12 ", 12.0),
        ("1.5", 1.5),
        ("-3", None),
        ("nan", None),
        ("inf", None),
        ("soon", None),
        ("Wed, 21 Oct 2015 07:28:00", None),  # no zone
        (http_date(120), 120.0),
        (http_date(-60), 0.0),  # already past: the wait is over
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    got = parse_retry_after(value, NOW_S)
    assert got == (pytest.approx(expected) if expected is not None else None)


@pytest.mark.parametrize(
    ("error", "attempt", "max_attempts", "expected"),
    [
        (FalTransientError("x", op="status"), 1, 3, True),
        (FalTransientError("x", op="status"), 2, 3, True),
        (FalTransientError("x", op="status"), 3, 3, False),
        (FalTransientError("x", op="status"), 1, 1, False),
        (FalRunnerError("x", op="result"), 1, 3, True),
        (FalPermanentError("x", op="status"), 1, 3, False),
        (FalAuthError("x", op="status"), 1, 3, False),
        (FalNotFoundError("x", op="status"), 1, 3, False),
        (FalModelError("x", op="result"), 1, 3, False),
        (FalAmbiguousError("x", op="submit"), 1, 3, False),
        (FalError("x", op="status"), 1, 3, False),
    ],
)
def test_should_retry(error: FalError, attempt: int, max_attempts: int, expected: bool) -> None:
    assert should_retry(error, attempt, max_attempts) is expected


def test_backoff_full_jitter_bounds_with_seeded_rng() -> None:
    rng = random.Random(1234)
    for attempt in range(12):
        ceiling = min(10.0, 0.5 * 2**attempt)
        samples = [backoff_s(attempt, base_s=0.5, cap_s=10.0, rng=rng) for _ in range(2000)]
        assert all(0.0 <= s <= ceiling for s in samples)
        # Full jitter spreads over the whole range, not a narrow band near the ceiling.
        assert min(samples) < 0.05 * ceiling
        assert max(samples) > 0.95 * ceiling
        assert 0.4 * ceiling < sum(samples) / len(samples) < 0.6 * ceiling


def test_backoff_cap_respected_for_huge_attempts() -> None:
    rng = random.Random(7)
    assert all(backoff_s(a, base_s=0.5, cap_s=10.0, rng=rng) <= 10.0 for a in (30, 100, 10_000))
    assert backoff_s(10_000, base_s=0.5, cap_s=10.0, rng=lambda: 1.0) == 10.0
    assert backoff_s(-5, base_s=0.5, cap_s=10.0, rng=lambda: 1.0) == 0.5


def test_backoff_callable_rng_is_exact() -> None:
    assert backoff_s(0, base_s=1.0, cap_s=60.0, rng=lambda: 0.5) == 0.5
    assert backoff_s(3, base_s=1.0, cap_s=60.0, rng=lambda: 0.25) == 2.0
    assert backoff_s(3, base_s=1.0, cap_s=60.0, rng=lambda: 0.0) == 0.0


@pytest.mark.parametrize("retry_after", [0.0, 0.5, 1.0, 7.0, 49.0, 50.0, 120.0, 900.0])
def test_backoff_retry_after_is_a_floor(retry_after: float) -> None:
    rng = random.Random(99)
    jitter_cap = min(0.1 * retry_after, 5.0)
    samples = [
        backoff_s(a % 5, base_s=0.5, cap_s=10.0, rng=rng, retry_after_s=retry_after) for a in range(2000)
    ]
    assert all(retry_after <= s <= retry_after + jitter_cap for s in samples)
    # The floor wins over the cap: a 900 s Retry-After is never shortened to cap_s.
    assert min(samples) >= retry_after


@pytest.mark.parametrize(
    ("code", "label"),
    [
        (None, "network"),
        (100, "network"),
        (200, "2xx"),
        (202, "2xx"),
        (302, "3xx"),
        (404, "4xx"),
        (429, "429"),
        (500, "5xx"),
        (504, "5xx"),
    ],
)
def test_status_class(code: int | None, label: str) -> None:
    assert status_class(code) == label


@pytest.mark.parametrize(
    ("code", "body", "expected"),
    [
        (202, j({"status": "CANCELLATION_REQUESTED"}), FalCancelAnswer.REQUESTED),
        (200, j({"status": "OK"}), FalCancelAnswer.REQUESTED),
        (400, j({"status": "ALREADY_COMPLETED"}), FalCancelAnswer.ALREADY_COMPLETED),
        (404, j({"status": "NOT_FOUND"}), FalCancelAnswer.NOT_FOUND),
        (400, j({"detail": "bad"}), None),
        (429, b"", None),
        (503, b"", None),
    ],
)
def test_cancel_outcome(code: int, body: bytes, expected: FalCancelAnswer | None) -> None:
    assert cancel_outcome(code, body) == expected


def test_errors_pickle_round_trip() -> None:
    err = classify_response(
        "submit", 429, httpx.Headers({**RID, "Retry-After": "3"}), j({"detail": "slow down"})
    )
    assert isinstance(err, FalTransientError)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is FalTransientError
    assert (back.op, back.status_code, back.retry_after_s, back.request_id, str(back)) == (
        "submit",
        429,
        3.0,
        "gw-1",
        str(err),
    )


def test_redact_scrubs_message_and_detail() -> None:
    err = FalPermanentError("echo key-id:s3cret", op="submit", detail="key-id:s3cret")
    err.redact(["key-id:s3cret"])
    assert "s3cret" not in str(err) and "s3cret" not in repr(err) and "s3cret" not in str(err.detail)
