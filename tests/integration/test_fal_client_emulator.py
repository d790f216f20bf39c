"""FalClient against the real fal emulator over HTTP, one scripted fault at a time.

Each test checks both sides: what the client raised and what the emulator's ledger says happened
(in particular whether a submit created a request, which is what makes an error ambiguous).
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from reframe.demo import make_sample_video
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
    SubmitReceipt,
)

falemu = pytest.importorskip("falemu")
pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

T = TypeVar("T")
KEY = "emu-key-id:emu-key-secret"
MODEL = "fal-ai/luma-dream-machine/ray-2-flash/reframe"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def emu() -> Iterator[Any]:
    with falemu.EmulatorServer(falemu.EmulatorConfig(concurrency=2, processing_time_s=0.2)) as server:
        yield server


@pytest.fixture(autouse=True)
def clean(emu: Any) -> Iterator[None]:
    emu.reset()
    emu.configure(concurrency=2, processing_time_s=0.2, valid_keys=None, locked_keys=[])
    yield
    emu.clear_faults()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-second 160x90 H.264 test clip."""
    out = tmp_path_factory.mktemp("clip") / "clip.mp4"
    return make_sample_video(out, duration_s=1, size="160x90", audio=False)


class Sleeps:
    """A sleep that records and yields but does not wait (faults are consumed by count, not time)."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        await asyncio.sleep(0)


def client_for(emu: Any, sleeps: Sleeps | None = None, **kw: Any) -> FalClient:
    params: dict[str, Any] = {
        "key": KEY,
        "queue_url": emu.url,
        "rest_url": emu.url,
        "cdn_url": emu.url,
        "model_id": MODEL,
        "connect_timeout_s": 2.0,
        "read_timeout_s": 10.0,
        "write_timeout_s": 10.0,
        "pool_timeout_s": 2.0,
        "http_retries": 2,
        "sleep": sleeps or Sleeps(),
    }
    params.update(kw)
    return FalClient(**params)


def with_client(emu: Any, fn: Callable[[FalClient], Awaitable[T]], **kw: Any) -> T:
    async def go() -> T:
        async with client_for(emu, **kw) as client:
            return await fn(client)

    return run(go())


def expect(emu: Any, fn: Callable[[FalClient], Awaitable[Any]], error: type[FalError], **kw: Any) -> FalError:
    async def go() -> FalError:
        async with client_for(emu, **kw) as client:
            try:
                await fn(client)
            except FalError as err:
                return err
        raise AssertionError(f"expected {error.__name__}")

    err = run(go())
    assert type(err) is error, repr(err)
    assert KEY not in str(err) and KEY not in repr(err)
    return err


def ops(emu: Any, op: str) -> list[dict[str, Any]]:
    return [r for r in emu.ledger()["requests"] if r["op"] == op]


@pytest.fixture(scope="module")
def good(clip: Path) -> dict[str, Any]:
    """A valid input that needs no network: the test clip as a data: URI."""
    return {
        "video_url": "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode(),
        "aspect_ratio": "9:16",
    }


async def wait_done(client: FalClient, receipt: SubmitReceipt, timeout_s: float = 30.0) -> QueueStatus:
    deadline = time.monotonic() + timeout_s
    while True:
        status = await client.status(receipt)
        if status.completed or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.05)


# --- the happy path ------------------------------------------------------------------------------


def test_upload_submit_stream_result(emu: Any, clip: Path) -> None:
    async def go(c: FalClient) -> tuple[str, SubmitReceipt, list[QueueStatus], Any, QueueStatus]:
        video_url = await c.upload_file(clip)
        receipt = await c.submit({"video_url": video_url, "aspect_ratio": "9:16"})
        seen = [s async for s in c.stream_status(receipt)]
        output = await c.result(receipt)
        final = await c.status(receipt, logs=True)
        return video_url, receipt, seen, output, final

    video_url, receipt, seen, output, final = with_client(emu, go)
    assert video_url.startswith(emu.url)
    assert receipt.status_url == f"{emu.url}/fal-ai/luma-dream-machine/requests/{receipt.request_id}/status"
    assert seen[-1].status == "COMPLETED" and not seen[-1].failed
    assert {s.status for s in seen} <= {"IN_QUEUE", "IN_PROGRESS", "COMPLETED"}
    assert final.logs and final.metrics is not None
    assert output.video.content_type == "video/mp4"
    downloaded = httpx.get(output.video.url, timeout=10)
    assert downloaded.status_code == 200 and downloaded.content[4:8] == b"ftyp"
    ledger = emu.ledger()
    assert len(ledger["submits"]) == 1 and ledger["billed_requests"] == 1
    assert [r["op"] for r in ledger["requests"] if r["op"] in ("token", "upload")] == ["token", "upload"]


def test_receipt_for_reaches_the_same_request(emu: Any, good: dict[str, Any]) -> None:
    async def go(c: FalClient) -> QueueStatus:
        receipt = await c.submit(good)
        return await c.status(c.receipt_for(receipt.request_id))

    assert with_client(emu, go).status in {"IN_QUEUE", "IN_PROGRESS", "COMPLETED"}


# --- submit faults: never retried, transient vs ambiguous ----------------------------------------


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ({"status": 429, "headers": {"Retry-After": "1"}}, FalTransientError),
        ({"status": 408}, FalTransientError),
        ({"status": 409}, FalTransientError),
        ({"status": 503, "nginx": True}, FalTransientError),
        ({"status": 500}, FalTransientError),
        ({"status": 503}, FalTransientError),
        ({"status": 502, "nginx": True}, FalAmbiguousError),
        ({"status": 504, "nginx": True}, FalAmbiguousError),
        ({"status": 502}, FalAmbiguousError),
        ({"status": 401, "json": {"detail": "No user found for Key ID and Secret"}}, FalAuthError),
        ({"status": 404, "json": {"error": "Error", "message": "Path /x not found"}}, FalNotFoundError),
    ],
    ids=lambda v: (
        f"{v.get('status')}{'-nginx' if v.get('nginx') else ''}" if isinstance(v, dict) else v.__name__
    ),
)
def test_submit_http_faults(
    emu: Any, fault: dict[str, Any], error: type[FalError], good: dict[str, Any]
) -> None:
    emu.set_faults([{"op": "submit", "kind": "http", "times": 1, **fault}])
    sleeps = Sleeps()
    err = expect(emu, lambda c: c.submit(good), error, sleeps=sleeps)
    assert err.status_code == fault["status"]
    if fault.get("headers"):
        assert isinstance(err, FalTransientError) and err.retry_after_s == 1.0
    ledger = emu.ledger()
    assert len(ops(emu, "submit")) == 1, "a submit must never be retried inside the client"
    assert ledger["submits"] == [] and sleeps.calls == []


def test_submit_drop_before_handling_is_ambiguous(emu: Any, good: dict[str, Any]) -> None:
    # The client cannot tell this from a drop after handling; the ledger shows why both must be ambiguous.
    emu.set_faults([{"op": "submit", "kind": "drop", "times": 1}])
    expect(emu, lambda c: c.submit(good), FalAmbiguousError)
    assert len(ops(emu, "submit")) == 1 and emu.ledger()["submits"] == []


def test_submit_drop_after_handling_is_ambiguous_and_was_queued(emu: Any, good: dict[str, Any]) -> None:
    emu.set_faults([{"op": "submit", "kind": "drop", "after_handling": True, "times": 1}])
    expect(emu, lambda c: c.submit(good), FalAmbiguousError)
    assert len(ops(emu, "submit")) == 1 and len(emu.ledger()["submits"]) == 1


def test_submit_read_timeout_is_ambiguous_and_was_queued(emu: Any, good: dict[str, Any]) -> None:
    emu.set_faults([{"op": "submit", "kind": "slow", "delay_s": 1.5, "times": 1}])
    expect(emu, lambda c: c.submit(good), FalAmbiguousError, read_timeout_s=0.3)
    assert len(emu.ledger()["submits"]) == 1


def test_submit_rate_limit_from_emulator(emu: Any, good: dict[str, Any]) -> None:
    emu.configure(submit_rate_per_s=0.5, submit_burst=1)
    try:

        async def go(c: FalClient) -> FalError:
            await c.submit(good)
            try:
                await c.submit(good)
            except FalError as err:
                return err
            raise AssertionError("second submit was not limited")

        err = with_client(emu, go)
    finally:
        emu.configure(submit_rate_per_s=None, submit_burst=10)
    assert type(err) is FalTransientError and err.status_code == 429
    assert err.retry_after_s is not None and err.retry_after_s >= 1.0
    assert len(emu.ledger()["submits"]) == 1


def test_submit_connect_refused_is_transient() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"

    async def go() -> FalError:
        async with FalClient(key=KEY, queue_url=url, rest_url=url, cdn_url=url, model_id=MODEL) as c:
            try:
                await c.submit({"video_url": "https://x.test/v.mp4", "aspect_ratio": "9:16"})
            except FalError as err:
                return err
        raise AssertionError("connected to a closed port")

    assert type(run(go())) is FalTransientError


# --- auth ----------------------------------------------------------------------------------------


def test_unknown_key_is_auth_error(emu: Any, good: dict[str, Any]) -> None:
    emu.configure(valid_keys=["other-id:other-secret"])
    err = expect(emu, lambda c: c.submit(good), FalAuthError)
    assert err.status_code == 401 and "No user found" in str(err)


def test_locked_account_is_auth_error(emu: Any, good: dict[str, Any]) -> None:
    emu.configure(locked_keys=[KEY.split(":", maxsplit=1)[0]])
    err = expect(emu, lambda c: c.submit(good), FalAuthError)
    assert err.status_code == 403 and "locked" in str(err).lower()
    assert emu.ledger()["submits"] == []


# --- status: idempotent, retried in-call ---------------------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [
        {"kind": "http", "status": 503, "nginx": True, "times": 2},
        {"kind": "http", "status": 502, "nginx": True, "times": 2},
        {"kind": "http", "status": 500, "times": 2},
        {"kind": "http", "status": 429, "headers": {"Retry-After": "1"}, "times": 2},
        {"kind": "drop", "times": 2},
    ],
    ids=["nginx503", "nginx502", "json500", "429-retry-after", "drop"],
)
def test_status_faults_are_retried(emu: Any, fault: dict[str, Any], good: dict[str, Any]) -> None:
    async def submit(c: FalClient) -> SubmitReceipt:
        return await c.submit(good)

    receipt = with_client(emu, submit)
    emu.set_faults([{"op": "status", **fault}])
    sleeps = Sleeps()
    status = with_client(emu, lambda c: c.status(receipt), sleeps=sleeps)
    assert status.status in {"IN_QUEUE", "IN_PROGRESS", "COMPLETED"}
    assert len(ops(emu, "status")) == 3 and len(sleeps.calls) == 2
    if "headers" in fault:
        assert all(1.0 <= s <= 1.1 for s in sleeps.calls)


def test_status_faults_exhaust_retries(emu: Any, good: dict[str, Any]) -> None:
    receipt = with_client(emu, lambda c: c.submit(good))
    emu.set_faults([{"op": "status", "kind": "http", "status": 503, "nginx": True, "times": 3}])
    err = expect(emu, lambda c: c.status(receipt), FalTransientError)
    assert err.status_code == 503 and len(ops(emu, "status")) == 3


def test_status_unknown_request_is_not_found(emu: Any) -> None:
    expect(emu, lambda c: c.status(c.receipt_for("00000000-0000-0000-0000-000000000000")), FalNotFoundError)
    assert len(ops(emu, "status")) == 1


# --- stream --------------------------------------------------------------------------------------


def test_stream_drop_is_transient_then_poll_works(emu: Any, good: dict[str, Any]) -> None:
    receipt = with_client(emu, lambda c: c.submit(good))
    emu.set_faults([{"op": "stream", "kind": "drop", "times": 1}])

    async def go(c: FalClient) -> QueueStatus:
        with pytest.raises(FalTransientError):
            async for _ in c.stream_status(receipt):
                pass
        return await wait_done(c, receipt)

    assert with_client(emu, go).completed


def test_stream_http_fault_is_classified(emu: Any, good: dict[str, Any]) -> None:
    receipt = with_client(emu, lambda c: c.submit(good))
    emu.set_faults([{"op": "stream", "kind": "http", "status": 503, "nginx": True, "times": 1}])

    async def consume(c: FalClient) -> None:
        async for _ in c.stream_status(receipt):
            pass

    err = expect(emu, consume, FalTransientError)
    assert err.status_code == 503 and len(ops(emu, "stream")) == 1


# --- result: runner errors, model errors, not ready, expired -------------------------------------


def test_runner_error_completes_failed_and_result_is_runner_error(emu: Any, good: dict[str, Any]) -> None:
    emu.set_faults(
        [{"op": "submit", "kind": "runner_error", "error_type": "runner_disconnected", "times": 1}]
    )

    async def go(c: FalClient) -> QueueStatus:
        receipt = await c.submit(good)
        status = await wait_done(c, receipt)
        with pytest.raises(FalRunnerError) as info:
            await c.result(receipt)
        assert info.value.error_type == "runner_disconnected" and info.value.status_code == 503
        assert info.value.request_id == receipt.request_id
        return status

    status = with_client(emu, go)
    assert status.failed and status.error_type == "runner_disconnected"
    assert len(ops(emu, "result")) == 1, "a replayed runner failure is not fetched again"


@pytest.mark.parametrize(("error_type", "code"), [("request_timeout", 504), ("runner_server_error", 500)])
def test_other_runner_errors(emu: Any, error_type: str, code: int, good: dict[str, Any]) -> None:
    emu.set_faults([{"op": "submit", "kind": "runner_error", "error_type": error_type, "times": 1}])

    async def go(c: FalClient) -> FalError:
        receipt = await c.submit(good)
        await wait_done(c, receipt)
        try:
            await c.result(receipt)
        except FalError as err:
            return err
        raise AssertionError("result succeeded")

    err = with_client(emu, go)
    assert type(err) is FalRunnerError and (err.status_code, err.error_type) == (code, error_type)


def test_validation_error_is_model_error_with_details(emu: Any) -> None:
    async def go(c: FalClient) -> QueueStatus:
        receipt = await c.submit(
            {"video_url": "https://example.invalid/v.mp4"}
        )  # accepted: fal validates later
        status = await wait_done(c, receipt)
        with pytest.raises(FalModelError) as info:
            await c.result(receipt)
        assert info.value.status_code == 422
        assert any(m.startswith("aspect_ratio: Field required") for m in info.value.messages)
        assert isinstance(info.value.detail, list)
        return status

    assert with_client(emu, go).failed


def test_result_before_completion_is_transient(emu: Any, good: dict[str, Any]) -> None:
    emu.configure(processing_time_s=5.0)

    async def go(c: FalClient) -> FalError:
        receipt = await c.submit(good)
        try:
            await c.result(receipt)
        except FalError as err:
            return err
        raise AssertionError("result before completion succeeded")

    err = with_client(emu, go, http_retries=0)
    assert type(err) is FalTransientError and err.status_code == 400
    assert "still in progress" in str(err)


def test_expired_result_is_not_found(emu: Any, good: dict[str, Any]) -> None:
    async def go(c: FalClient) -> None:
        receipt = await c.submit(good)
        await wait_done(c, receipt)
        emu.set_faults([{"op": "result", "kind": "expire_result", "times": 1}])
        with pytest.raises(FalNotFoundError):
            await c.result(receipt)

    with_client(emu, go)


def test_result_user_timeout_is_permanent(emu: Any, good: dict[str, Any]) -> None:
    receipt = with_client(emu, lambda c: c.submit(good))
    emu.set_faults(
        [
            {
                "op": "result",
                "kind": "http",
                "status": 504,
                "headers": {"X-Fal-Request-Timeout-Type": "user"},
                "json": {"detail": "Request timed out", "error_type": "request_timeout"},
                "times": 1,
            }
        ]
    )
    err = expect(emu, lambda c: c.result(receipt), FalPermanentError)
    assert err.error_type == "request_timeout" and len(ops(emu, "result")) == 1


def test_result_ingress_error_is_retried(emu: Any, good: dict[str, Any]) -> None:
    async def go(c: FalClient) -> SubmitReceipt:
        receipt = await c.submit({**good, "aspect_ratio": "1:1"})
        await wait_done(c, receipt)
        return receipt

    receipt = with_client(emu, go)
    emu.set_faults([{"op": "result", "kind": "http", "status": 502, "nginx": True, "times": 1}])
    output = with_client(emu, lambda c: c.result(receipt))
    assert output.video.url and len(ops(emu, "result")) == 2


# --- cancel --------------------------------------------------------------------------------------


def test_cancel_outcomes(emu: Any, good: dict[str, Any]) -> None:
    emu.configure(concurrency=1, processing_time_s=3.0)

    async def go(c: FalClient) -> list[FalCancelAnswer]:
        running = await c.submit(good)
        queued = await c.submit(good)
        outcomes = [await c.cancel(queued), await c.cancel(running)]
        done = await wait_done(c, running)
        assert done.error_type == "client_cancelled"
        outcomes.append(await c.cancel(running))
        outcomes.append(await c.cancel(c.receipt_for("00000000-0000-0000-0000-000000000000")))
        return outcomes

    assert with_client(emu, go) == [
        FalCancelAnswer.REQUESTED,
        FalCancelAnswer.REQUESTED,
        FalCancelAnswer.ALREADY_COMPLETED,
        FalCancelAnswer.NOT_FOUND,
    ]


def test_cancel_is_retried_on_ingress_errors(emu: Any, good: dict[str, Any]) -> None:
    emu.configure(processing_time_s=3.0)
    receipt = with_client(emu, lambda c: c.submit(good))
    emu.set_faults([{"op": "cancel", "kind": "http", "status": 504, "nginx": True, "times": 1}])
    assert with_client(emu, lambda c: c.cancel(receipt)) is FalCancelAnswer.REQUESTED
    assert len(ops(emu, "cancel")) == 2


# --- uploads -------------------------------------------------------------------------------------


def test_upload_falls_back_when_token_fails(emu: Any, clip: Path) -> None:
    emu.set_faults([{"op": "upload", "kind": "http", "status": 401, "times": 1}])  # the token call
    url = with_client(emu, lambda c: c.upload_file(clip))
    assert httpx.get(url, timeout=10).content == clip.read_bytes()
    assert [r["op"] for r in emu.ledger()["requests"] if r["op"] in ("token", "upload")] == [
        "token",
        "upload",
        "upload",
    ]


def test_upload_retries_transient_cdn_errors(emu: Any, clip: Path) -> None:
    emu.set_faults([{"op": "upload", "kind": "http", "status": 503, "nginx": True, "times": 2}])
    url = with_client(emu, lambda c: c.upload_file(clip))
    assert httpx.get(url, timeout=10).content == clip.read_bytes()
