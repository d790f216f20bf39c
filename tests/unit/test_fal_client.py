"""FalClient against scripted httpx.MockTransport sequences (and two raw sockets for body_sent)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Callable, Coroutine
from contextlib import aclosing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from config import load_settings
from worker.fal import (
    FalAmbiguousError,
    FalAuthError,
    FalCancelAnswer,
    FalClient,
    FalError,
    FalModelError,
    FalNotFoundError,
    FalPermanentError,
    FalRunnerError,
    FalTransientError,
    QueueStatus,
    SseDecoder,
    SubmitReceipt,
    app_path,
)

T = TypeVar("T")
KEY = "key-id-1234:very-secret-5678"
MODEL = "fal-ai/luma-dream-machine/ray-2-flash/reframe"
QUEUE = "https://queue.test"
APP_BASE = f"{QUEUE}/fal-ai/luma-dream-machine/requests"
NGINX_503 = b"<html><body><center><h1>503 Service Temporarily Unavailable</h1></center><hr><center>nginx</center></body></html>"
VIDEO = {
    "video": {
        "url": "https://v3.fal.media/files/x.mp4",
        "content_type": "video/mp4",
        "file_name": "x.mp4",
        "file_size": 10,
        "width": 720,
    }
}

Step = httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class Script:
    """A MockTransport handler that plays scripted responses/exceptions and records requests."""

    def __init__(self, *steps: Step) -> None:
        self.steps = list(steps)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        if not self.steps:
            raise AssertionError(f"unexpected request {request.method} {request.url}")
        step = self.steps.pop(0)
        if isinstance(step, Exception):
            raise step
        if isinstance(step, httpx.Response):
            return step
        return step(request)


class Recorder:
    def __init__(self) -> None:
        self.sleeps: list[float] = []
        self.calls: list[tuple[str, str, float]] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    def on_request(self, op: str, status_class: str, duration_s: float) -> None:
        self.calls.append((op, status_class, duration_s))


def make_client(script: Script, rec: Recorder | None = None, **kw: Any) -> FalClient:
    rec = rec or Recorder()
    params: dict[str, Any] = {
        "key": KEY,
        "queue_url": QUEUE,
        "rest_url": "https://rest.test",
        "cdn_url": "https://cdn.test",
        "model_id": MODEL,
        "connect_timeout_s": 1.5,
        "read_timeout_s": 7.0,
        "write_timeout_s": 3.0,
        "pool_timeout_s": 2.0,
        "transport": httpx.MockTransport(script),
        "rng": lambda: 0.5,
        "sleep": rec.sleep,
        "on_request": rec.on_request,
    }
    params.update(kw)
    return FalClient(**params)


def receipt(rid: str = "r-1") -> SubmitReceipt:
    base = f"{APP_BASE}/{rid}"
    return SubmitReceipt(
        request_id=rid, status_url=f"{base}/status", response_url=base, cancel_url=f"{base}/cancel"
    )


def js(status: int, body: object, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json=body, headers={"x-fal-request-id": "gw", **(headers or {})})


def submit_body(rid: str = "r-1", **extra: Any) -> dict[str, Any]:
    base = f"{APP_BASE}/{rid}"
    body = {
        "status": "IN_QUEUE",
        "request_id": rid,
        "response_url": base,
        "status_url": f"{base}/status",
        "cancel_url": f"{base}/cancel",
        "queue_position": 0,
    }
    body.update(extra)
    return body


async def call(client: FalClient, coro_fn: Callable[[FalClient], Coroutine[Any, Any, T]]) -> T:
    async with client:
        return await coro_fn(client)


# --- status and in-call retries ----------------------------------------------------------------


def test_status_503_503_200_is_retried_with_backoff() -> None:
    script = Script(
        httpx.Response(503, content=NGINX_503),
        js(503, {"detail": "busy"}),
        js(200, {"status": "COMPLETED", "logs": None, "metrics": {"inference_time": 4.2}}),
    )
    rec = Recorder()
    status = run(call(make_client(script, rec), lambda c: c.status(receipt())))
    assert status.status == "COMPLETED" and not status.failed
    assert len(script.requests) == 3
    # rng is 0.5: full jitter over min(cap, 0.5 * 2**n) gives 0.25 then 0.5.
    assert rec.sleeps == [0.25, 0.5]
    assert [c[:2] for c in rec.calls] == [("status", "5xx"), ("status", "5xx"), ("status", "2xx")]
    assert str(script.requests[0].url) == f"{APP_BASE}/r-1/status?logs=0"


def test_status_gives_up_after_http_retries() -> None:
    script = Script(*(js(503, {"detail": "busy"}) for _ in range(3)))
    rec = Recorder()
    with pytest.raises(FalTransientError) as info:
        run(call(make_client(script, rec, http_retries=2), lambda c: c.status(receipt())))
    assert len(script.requests) == 3 and len(rec.sleeps) == 2
    assert info.value.request_id == "gw" and info.value.op == "status"


def test_status_accepts_202_and_reads_queue_position_and_logs() -> None:
    script = Script(
        js(202, {"status": "IN_QUEUE", "queue_position": 3, "extra": 1}),
        js(202, {"status": "IN_PROGRESS", "logs": [{"message": "hi"}]}),
    )

    async def go(c: FalClient) -> tuple[QueueStatus, QueueStatus]:
        return await c.status(receipt()), await c.status(receipt(), logs=True)

    first, second = run(call(make_client(script), go))
    assert (first.status, first.queue_position) == ("IN_QUEUE", 3)
    assert second.logs == [{"message": "hi"}]
    assert script.requests[1].url.params["logs"] == "1"


def test_status_failed_completed() -> None:
    script = Script(
        js(
            200,
            {
                "status": "COMPLETED",
                "logs": None,
                "error": "Runner disconnected",
                "error_type": "runner_disconnected",
            },
        )
    )
    status = run(call(make_client(script), lambda c: c.status(receipt())))
    assert status.failed and status.error_type == "runner_disconnected"


def test_status_permanent_errors_are_not_retried() -> None:
    script = Script(js(404, {"detail": "Request not found"}))
    rec = Recorder()
    with pytest.raises(FalNotFoundError):
        run(call(make_client(script, rec), lambda c: c.status(receipt())))
    assert len(script.requests) == 1 and rec.sleeps == []


def test_retry_after_is_honoured_as_a_floor() -> None:
    script = Script(
        js(429, {"detail": "slow"}, {"Retry-After": "2"}), js(202, {"status": "IN_PROGRESS", "logs": None})
    )
    rec = Recorder()
    run(call(make_client(script, rec), lambda c: c.status(receipt())))
    assert len(rec.sleeps) == 1 and 2.0 <= rec.sleeps[0] <= 2.2


def test_long_retry_after_is_left_to_the_caller() -> None:
    script = Script(js(429, {"detail": "slow"}, {"Retry-After": "120"}))
    rec = Recorder()
    with pytest.raises(FalTransientError) as info:
        run(call(make_client(script, rec), lambda c: c.status(receipt())))
    assert info.value.retry_after_s == 120.0 and rec.sleeps == [] and len(script.requests) == 1


def test_transport_errors_on_idempotent_ops_are_retried() -> None:
    req = httpx.Request("GET", f"{APP_BASE}/r-1/status")
    script = Script(
        httpx.ReadTimeout("slow", request=req),
        httpx.RemoteProtocolError("gone", request=req),
        js(202, {"status": "IN_QUEUE", "queue_position": 0}),
    )
    rec = Recorder()
    status = run(call(make_client(script, rec), lambda c: c.status(receipt())))
    assert status.status == "IN_QUEUE" and len(script.requests) == 3
    # A read timeout is labelled "timeout", a dropped connection "network".
    assert [c[1] for c in rec.calls] == ["timeout", "network", "2xx"]


def test_status_garbage_body_is_transient() -> None:
    script = Script(*(httpx.Response(200, text="<html>proxy</html>") for _ in range(3)))
    with pytest.raises(FalTransientError, match="unexpected QueueStatus body"):
        run(call(make_client(script), lambda c: c.status(receipt())))


# --- submit ------------------------------------------------------------------------------------


def test_submit_request_shape_and_receipt() -> None:
    script = Script(js(200, submit_body(queue_position=4)))
    r = run(
        call(
            make_client(script),
            lambda c: c.submit(
                {"video_url": "https://x/v.mp4"}, webhook_url="https://hook.test/cb?a=1", priority="low"
            ),
        )
    )
    req = script.requests[0]
    assert req.method == "POST"
    assert req.url.path == f"/{MODEL}"
    assert req.url.params["fal_webhook"] == "https://hook.test/cb?a=1"
    assert req.headers["authorization"] == f"Key {KEY}"
    assert req.headers["content-type"] == "application/json"
    assert req.headers["x-fal-queue-priority"] == "low"
    assert json.loads(req.content) == {"video_url": "https://x/v.mp4"}
    assert r == SubmitReceipt(**{k: v for k, v in submit_body(queue_position=4).items() if k != "status"})


def test_submit_rejects_unknown_priority() -> None:
    with pytest.raises(ValueError, match="priority"):
        run(call(make_client(Script()), lambda c: c.submit({}, priority="high")))


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (js(503, {"detail": "unavailable"}), FalTransientError),
        (js(500, {"detail": "internal", "error_type": "internal_error"}), FalTransientError),
        (httpx.Response(503, content=NGINX_503), FalTransientError),
        (js(429, {"detail": "slow"}, {"Retry-After": "1"}), FalTransientError),
        (js(502, {"detail": "bad gateway"}), FalAmbiguousError),
        (httpx.Response(504, text="nginx gateway timeout"), FalAmbiguousError),
        (httpx.ConnectError("refused"), FalTransientError),
        (httpx.ConnectTimeout("slow connect"), FalTransientError),
        (httpx.PoolTimeout("no connection"), FalTransientError),
        (httpx.ReadTimeout("no answer"), FalAmbiguousError),
        (httpx.RemoteProtocolError("Server disconnected without sending a response."), FalAmbiguousError),
        (js(401, {"detail": "No user found for Key ID and Secret"}), FalAuthError),
        (
            js(422, {"detail": [{"loc": ["body", "video_url"], "msg": "Field required", "type": "missing"}]}),
            FalPermanentError,
        ),
    ],
    ids=lambda v: getattr(v, "status_code", None) or type(v).__name__,
)
def test_submit_is_never_retried(step: Step, expected: type[FalError]) -> None:
    script = Script(step, js(200, submit_body()))
    rec = Recorder()
    with pytest.raises(expected) as info:
        run(call(make_client(script, rec), lambda c: c.submit({"video_url": "u"})))
    assert type(info.value) is expected and info.value.op == "submit"
    assert len(script.requests) == 1 and rec.sleeps == []


def test_submit_url_fallback_when_response_lacks_urls() -> None:
    script = Script(js(200, {"request_id": "abc", "gateway_request_id": "gw-9"}))
    r = run(call(make_client(script), lambda c: c.submit({})))
    assert r.status_url == f"{APP_BASE}/abc/status"
    assert r.response_url == f"{APP_BASE}/abc"
    assert r.cancel_url == f"{APP_BASE}/abc/cancel"
    assert r.queue_position is None


def test_submit_ignores_urls_on_foreign_hosts() -> None:
    body = submit_body("abc")
    body["status_url"] = "https://evil.test/steal/status"
    script = Script(js(200, body))
    r = run(call(make_client(script), lambda c: c.submit({})))
    assert r.status_url == f"{APP_BASE}/abc/status"
    assert r.response_url == body["response_url"]


def test_submit_2xx_without_request_id_is_ambiguous() -> None:
    script = Script(httpx.Response(200, text="OK", headers={"x-fal-request-id": "gw-7"}))
    with pytest.raises(FalAmbiguousError) as info:
        run(call(make_client(script), lambda c: c.submit({})))
    assert info.value.request_id == "gw-7"


def test_receipt_for_uses_owner_app_rule() -> None:
    client = make_client(Script())
    r = client.receipt_for("rid")
    assert (r.status_url, r.response_url, r.cancel_url) == (
        f"{APP_BASE}/rid/status",
        f"{APP_BASE}/rid",
        f"{APP_BASE}/rid/cancel",
    )
    run(client.aclose())


@pytest.mark.parametrize(
    ("model_id", "expected"),
    [
        (MODEL, "fal-ai/luma-dream-machine"),
        ("fal-ai/flux", "fal-ai/flux"),
        ("/fal-ai/flux/dev/", "fal-ai/flux"),
        ("workflows/me/flow/sub", "workflows/me/flow"),
        ("comfy/me/app", "comfy/me/app"),
        ("123-my-app", "123/my-app"),
    ],
)
def test_app_path(model_id: str, expected: str) -> None:
    assert app_path(model_id) == expected


@pytest.mark.parametrize("model_id", ["justone", "workflows/me", ""])
def test_app_path_rejects(model_id: str) -> None:
    with pytest.raises(ValueError):
        app_path(model_id)


# --- status stream -----------------------------------------------------------------------------


def sse(body: str) -> Callable[[httpx.Request], httpx.Response]:
    def respond(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body.encode(), headers={"content-type": "text/event-stream"})

    return respond


async def collect(it: AsyncGenerator[QueueStatus, None]) -> list[QueueStatus]:
    async with aclosing(it) as stream:
        return [s async for s in stream]


def test_stream_parses_events_keepalives_and_stops_at_completed() -> None:
    body = (
        ": keepalive\r\n\r\n"
        "event: status\r\n"
        'data: {"status":"IN_QUEUE","queue_position":2}\r\n\r\n'
        ":ping\n\n"
        "data: not json\n\n"
        'data: {"status":"IN_PROGRESS",\n'
        'data: "logs":null}\n\n'
        "retry: 1000\n"
        'data:{"status":"COMPLETED","logs":null,"metrics":{"inference_time":1.5}}\n\n'
        'data: {"status":"IN_QUEUE","queue_position":9}\n\n'
    )
    script = Script(sse(body))
    statuses = run(call(make_client(script), lambda c: collect(c.stream_status(receipt()))))
    assert [s.status for s in statuses] == ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    assert statuses[0].queue_position == 2 and statuses[2].metrics == {"inference_time": 1.5}
    req = script.requests[0]
    assert req.url.path == "/fal-ai/luma-dream-machine/requests/r-1/status/stream"
    assert req.headers["accept"] == "text/event-stream"
    timeout = req.extensions["timeout"]
    assert timeout["read"] >= 60.0 and timeout["connect"] == 1.5


def test_stream_final_event_without_blank_line() -> None:
    script = Script(sse('data: {"status":"COMPLETED","logs":null}'))
    statuses = run(call(make_client(script), lambda c: collect(c.stream_status(receipt()))))
    assert [s.status for s in statuses] == ["COMPLETED"]


def test_stream_closed_before_completed_is_transient() -> None:
    script = Script(sse('data: {"status":"IN_PROGRESS","logs":null}\n\n'))
    got: list[QueueStatus] = []

    async def go(c: FalClient) -> None:
        async for s in c.stream_status(receipt()):
            got.append(s)

    with pytest.raises(FalTransientError, match="closed before COMPLETED"):
        run(call(make_client(script), go))
    assert [s.status for s in got] == ["IN_PROGRESS"]


def test_stream_http_error_and_transport_error() -> None:
    script = Script(js(404, {"detail": "Request not found"}), httpx.ReadTimeout("quiet"))
    rec = Recorder()
    client = make_client(script, rec)

    async def go(c: FalClient) -> list[type[FalError]]:
        kinds = []
        for _ in range(2):
            try:
                await collect(c.stream_status(receipt()))
            except FalError as err:
                kinds.append(type(err))
        return kinds

    assert run(call(client, go)) == [FalNotFoundError, FalTransientError]
    assert [c[:2] for c in rec.calls] == [("stream", "4xx"), ("stream", "network")]


def test_sse_decoder_rules() -> None:
    d = SseDecoder()
    assert d.feed(": comment") is None
    assert d.feed("data: a") is None
    assert d.feed("data:b") is None
    assert d.feed("id: 7") is None
    assert d.feed("") == "a\nb"
    assert d.feed("") is None
    assert d.feed("data") is None  # a field with no colon has an empty value
    assert d.flush() == ""


# --- result ------------------------------------------------------------------------------------


def test_result_success_tolerates_extra_fields() -> None:
    script = Script(js(200, VIDEO))
    out = run(call(make_client(script), lambda c: c.result(receipt())))
    assert out.video.url.endswith("x.mp4") and out.video.file_size == 10
    assert out.video.model_extra == {"width": 720}


def test_result_model_error_keeps_details() -> None:
    detail = [{"loc": ["body", "aspect_ratio"], "msg": "Input should be '16:9'", "type": "enum"}]
    script = Script(js(422, {"detail": detail}))
    with pytest.raises(FalModelError) as info:
        run(call(make_client(script), lambda c: c.result(receipt("r-9"))))
    assert info.value.detail == detail
    assert info.value.messages == ["aspect_ratio: Input should be '16:9'"]
    assert len(script.requests) == 1


def test_result_runner_error_is_not_refetched() -> None:
    script = Script(
        js(
            503,
            {"detail": "Runner disconnected", "error_type": "runner_disconnected"},
            {"X-Fal-Error-Type": "runner_disconnected"},
        )
    )
    rec = Recorder()
    with pytest.raises(FalRunnerError) as info:
        run(call(make_client(script, rec), lambda c: c.result(receipt())))
    assert info.value.error_type == "runner_disconnected"
    assert len(script.requests) == 1 and rec.sleeps == []


def test_result_still_in_progress_is_retried() -> None:
    script = Script(js(400, {"detail": "Request is still in progress"}), js(200, VIDEO))
    rec = Recorder()
    out = run(call(make_client(script, rec), lambda c: c.result(receipt())))
    assert out.video.content_type == "video/mp4" and len(rec.sleeps) == 1


def test_result_unexpected_body_is_permanent() -> None:
    script = Script(js(200, {"images": []}))
    with pytest.raises(FalPermanentError, match="unexpected ReframeOutput body") as info:
        run(call(make_client(script), lambda c: c.result(receipt("r-5"))))
    assert info.value.request_id == "r-5" and len(script.requests) == 1


# --- cancel ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (js(202, {"status": "CANCELLATION_REQUESTED"}), FalCancelAnswer.REQUESTED),
        (js(400, {"status": "ALREADY_COMPLETED"}), FalCancelAnswer.ALREADY_COMPLETED),
        (js(404, {"status": "NOT_FOUND"}), FalCancelAnswer.NOT_FOUND),
    ],
)
def test_cancel_outcomes(step: httpx.Response, expected: FalCancelAnswer) -> None:
    script = Script(step)
    assert run(call(make_client(script), lambda c: c.cancel(receipt()))) is expected
    req = script.requests[0]
    assert req.method == "PUT" and req.url.path.endswith("/requests/r-1/cancel") and req.content == b""


def test_cancel_retries_transient() -> None:
    script = Script(httpx.Response(503, content=NGINX_503), js(202, {"status": "CANCELLATION_REQUESTED"}))
    assert run(call(make_client(script), lambda c: c.cancel(receipt()))) is FalCancelAnswer.REQUESTED
    assert len(script.requests) == 2


# --- secrets, timeouts, hooks, settings --------------------------------------------------------


def test_key_is_sent_but_never_in_errors() -> None:
    # A hostile or buggy upstream that echoes the Authorization header back in its error body.
    echo = js(401, {"detail": f"bad header: Key {KEY}"})
    script = Script(echo, httpx.ConnectError(f"cannot connect with {KEY}"))
    client = make_client(script)

    async def go(c: FalClient) -> list[FalError]:
        errors: list[FalError] = []
        for _ in range(2):
            try:
                await c.submit({})
            except FalError as err:
                errors.append(err)
        return errors

    errors = run(call(client, go))
    assert script.requests[0].headers["authorization"] == f"Key {KEY}"
    assert len(errors) == 2
    secret = KEY.split(":")[1]
    for err in errors:
        for text in (str(err), repr(err), str(err.detail), str(err.args)):
            assert secret not in text and KEY not in text
        assert err.__cause__ is None or "Authorization" not in repr(getattr(err.__cause__, "request", None))
    assert KEY not in repr(client) and secret not in repr(client)


def test_explicit_timeouts_on_every_call() -> None:
    script = Script(
        js(200, submit_body()),
        js(202, {"status": "IN_QUEUE", "queue_position": 0}),
        js(200, VIDEO),
        js(202, {"status": "CANCELLATION_REQUESTED"}),
    )

    async def go(c: FalClient) -> None:
        r = await c.submit({})
        await c.status(r)
        await c.result(r)
        await c.cancel(r)

    run(call(make_client(script), go))
    assert len(script.requests) == 4
    for req in script.requests:
        assert req.extensions["timeout"] == {"connect": 1.5, "read": 7.0, "write": 3.0, "pool": 2.0}


def test_on_request_hook_failure_does_not_break_calls() -> None:
    def broken(op: str, status_class: str, duration_s: float) -> None:
        raise RuntimeError("metrics down")

    script = Script(js(202, {"status": "IN_QUEUE", "queue_position": 1}))
    status = run(call(make_client(script, on_request=broken), lambda c: c.status(receipt())))
    assert status.queue_position == 1


def test_from_settings() -> None:
    settings = load_settings(
        {},
        fal_queue_url="http://127.0.0.1:9",
        fal_rest_url="http://127.0.0.1:9",
        fal_cdn_url="http://127.0.0.1:9",
        fal_key="id:secret",
        fal_read_timeout_s=12.0,
        fal_http_retries=0,
    )
    script = Script(js(503, {"detail": "busy"}))
    rec = Recorder()
    client = FalClient.from_settings(settings, transport=httpx.MockTransport(script), sleep=rec.sleep)
    with pytest.raises(FalTransientError):
        run(call(client, lambda c: c.status(c.receipt_for("x"))))
    assert len(script.requests) == 1  # fal_http_retries=0
    req = script.requests[0]
    assert str(req.url) == "http://127.0.0.1:9/fal-ai/luma-dream-machine/requests/x/status?logs=0"
    assert req.headers["authorization"] == "Key id:secret"
    assert req.extensions["timeout"]["read"] == 12.0


# --- uploads -----------------------------------------------------------------------------------


def token_reply(minutes: float = 30) -> httpx.Response:
    expires = (datetime.now(UTC) + timedelta(minutes=minutes)).isoformat()
    return js(
        200,
        {
            "token": "cdn-tok-abc",
            "token_type": "Bearer",
            "base_url": "https://cdn.test",
            "expires_at": expires,
        },
    )


def test_upload_token_flow_and_token_cache(tmp_path: Path) -> None:
    f = tmp_path / "clip.mp4"
    f.write_bytes(b"\x00\x01video")
    script = Script(
        token_reply(),
        js(200, {"access_url": "https://cdn.test/files/a/clip.mp4"}),
        js(200, {"access_url": "https://cdn.test/files/b/clip.mp4"}),
    )

    async def go(c: FalClient) -> list[str]:
        return [await c.upload_file(f), await c.upload_file(str(f))]

    urls = run(call(make_client(script), go))
    assert urls == ["https://cdn.test/files/a/clip.mp4", "https://cdn.test/files/b/clip.mp4"]
    tok, up, _ = script.requests
    assert str(tok.url) == "https://rest.test/storage/auth/token?storage_type=fal-cdn-v3"
    assert tok.headers["authorization"] == f"Key {KEY}" and json.loads(tok.content) == {}
    assert str(up.url) == "https://cdn.test/files/upload"
    assert up.headers["authorization"] == "Bearer cdn-tok-abc"
    assert up.headers["content-type"] == "video/mp4" and up.headers["x-fal-file-name"] == "clip.mp4"
    assert up.content == b"\x00\x01video"


def test_upload_refreshes_expiring_token(tmp_path: Path) -> None:
    f = tmp_path / "a.bin"
    f.write_bytes(b"x")
    script = Script(
        token_reply(minutes=0.5), js(200, {"access_url": "u1"}), token_reply(), js(200, {"access_url": "u2"})
    )

    async def go(c: FalClient) -> list[str]:
        return [await c.upload_file(f), await c.upload_file(f)]

    assert run(call(make_client(script), go)) == ["u1", "u2"]
    assert script.requests[3].headers["content-type"] == "application/octet-stream"


def test_upload_falls_back_to_initiate_and_put(tmp_path: Path) -> None:
    f = tmp_path / "in.mp4"
    f.write_bytes(b"data")
    script = Script(
        js(404, {"detail": "no v3 here"}),  # token endpoint missing → fallback
        js(
            200,
            {
                "upload_url": "https://storage.other.test/signed?sig=1",
                "file_url": "https://cdn.test/files/in.mp4",
            },
        ),
        httpx.Response(200),
    )
    url = run(call(make_client(script), lambda c: c.upload_file(f)))
    assert url == "https://cdn.test/files/in.mp4"
    _, init, put = script.requests
    assert str(init.url) == "https://rest.test/storage/upload/initiate?storage_type=gcs"
    assert json.loads(init.content) == {"file_name": "in.mp4", "content_type": "video/mp4"}
    assert put.method == "PUT" and put.content == b"data"
    assert "authorization" not in put.headers  # the key never goes to a foreign signed URL


def test_upload_fallback_failure_raises_fallback_error(tmp_path: Path) -> None:
    f = tmp_path / "in.mp4"
    f.write_bytes(b"data")
    script = Script(js(401, {"detail": "No user found"}), js(401, {"detail": "No user found"}))
    with pytest.raises(FalAuthError) as info:
        run(call(make_client(script), lambda c: c.upload_file(f)))
    assert info.value.op == "upload" and isinstance(info.value.__cause__, FalAuthError)
    assert info.value.__cause__.op == "token"


# --- body_sent over real sockets (httpcore trace) ------------------------------------------------


async def _server(behaviour: str) -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(
            next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1]
        )
        await reader.readexactly(length)
        if behaviour == "hang":
            await asyncio.sleep(5)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize("behaviour", ["drop", "hang"])
def test_submit_after_body_sent_is_ambiguous_over_real_http(behaviour: str) -> None:
    async def go() -> FalError:
        server, port = await _server(behaviour)
        url = f"http://127.0.0.1:{port}"
        client = FalClient(
            key=KEY, queue_url=url, rest_url=url, cdn_url=url, model_id=MODEL, read_timeout_s=0.3
        )
        try:
            await client.submit({"video_url": "u"})
        except FalError as err:
            return err
        finally:
            await client.aclose()
            server.close()
        raise AssertionError("submit succeeded")

    err = run(go())
    assert type(err) is FalAmbiguousError


def test_submit_connect_refused_is_transient_over_real_http() -> None:
    async def go() -> FalError:
        server, port = await _server("drop")
        server.close()
        await server.wait_closed()
        url = f"http://127.0.0.1:{port}"
        client = FalClient(key=KEY, queue_url=url, rest_url=url, cdn_url=url, model_id=MODEL)
        try:
            await client.submit({})
        except FalError as err:
            return err
        finally:
            await client.aclose()
        raise AssertionError("submit succeeded")

    assert type(run(go())) is FalTransientError


def test_send_progress_uses_trace_when_available() -> None:
    from worker.fal.client import _SendProgress

    progress = _SendProgress()
    run(progress("connection.connect_tcp.complete", {}))
    run(progress("http11.send_request_headers.started", {}))
    # Headers without the body cannot make fal queue anything.
    assert progress.body_sent(httpx.ReadError("reset")) is False
    run(progress("http11.send_request_body.started", {}))
    assert progress.body_sent(httpx.WriteError("broken pipe")) is True
    # Without trace events, only connect-phase errors count as unsent.
    fresh = _SendProgress()
    assert fresh.body_sent(httpx.PoolTimeout("t")) is False
    assert fresh.body_sent(httpx.ReadTimeout("t")) is True
