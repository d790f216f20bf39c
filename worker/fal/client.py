"""The async client of fal's queue API (submit, status, status stream, result, cancel, upload).

Layering, after stripe-python: :meth:`FalClient._send` does one HTTP attempt and turns any httpx
exception into a classified :class:`~worker.fal.errors.FalError`; the pure functions of
:mod:`worker.fal.policy` classify responses and decide retries and backoff; one loop,
:meth:`FalClient._idempotent`, connects them. Submits never go through that loop: fal has no
idempotency key, so only the job level, which owns flow control and the ledger, may repeat one.

Use one client per process and from one event loop (its connection pool belongs to that loop).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import mimetypes
import os
import random
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from worker.fal.errors import (
    FalAmbiguousError,
    FalAuthError,
    FalError,
    FalPermanentError,
    FalRunnerError,
    FalTransientError,
)
from worker.fal.models import FalCancelAnswer, QueueStatus, ReframeOutput, SubmitReceipt, request_urls
from worker.fal.policy import (
    PRE_SEND_ERRORS,
    RandomSource,
    backoff_s,
    cancel_outcome,
    classify_exception,
    classify_response,
    should_retry,
    status_class,
)
from worker.fal.upload import OnProgress, Part, UploadProgress, file_body, part_size, plan_parts

if TYPE_CHECKING:
    from config import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

OnRequest = Callable[[str, str, float], None]
"""Called after every HTTP attempt with ``(op, status_class, duration_s)``."""
Sleep = Callable[[float], Awaitable[None]]

USER_AGENT = "reframe-cluster/0.1 (+httpx)"
FAL_PRIORITIES = frozenset({"normal", "low"})
TOKEN_REFRESH_MARGIN_S = 60.0  # renew the CDN token this long before fal says it expires


class _SendProgress:
    """An httpcore ``trace`` hook that notes whether the request body started to go out.

    That is what separates a safe-to-repeat submit failure (nothing sent) from an ambiguous one.
    """

    def __init__(self) -> None:
        self.traced = False
        self.body_started = False

    async def __call__(self, event: str, info: dict[str, Any]) -> None:
        self.traced = True
        if ".send_request_body." in event:
            self.body_started = True

    def body_sent(self, exc: httpx.HTTPError) -> bool:
        if self.traced:
            return self.body_started
        # No trace events (a transport without httpcore, e.g. tests' MockTransport): assume the
        # worst once the error is not one of the connect-phase ones.
        return not isinstance(exc, PRE_SEND_ERRORS)


class _CdnToken(BaseModel):
    token: str
    token_type: str = "Bearer"  # noqa: S105 - an auth scheme name, not a secret
    base_url: str | None = None
    expires_at: datetime | None = None


class _UploadTarget(BaseModel):
    upload_url: str
    file_url: str


class _Uploaded(BaseModel):
    access_url: str


class _MultipartTarget(BaseModel):
    access_url: str
    uploadId: str  # fal's field name


class _CompletedUpload(BaseModel):
    access_url: str | None = None


class SseDecoder:
    """Incremental decoder of ``text/event-stream`` lines into event data (WHATWG rules).

    Comments (``:keepalive``) are skipped, multi-line ``data:`` fields joined with ``\\n``, and
    fields other than ``data`` ignored. Feed it lines without their line endings.
    """

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        """Take one line; return an event's data when the line completes one."""
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value.removeprefix(" "))
        return None

    def flush(self) -> str | None:
        """The pending event's data, if any (called at end of stream too)."""
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        return data


def parse_status_event(data: str) -> QueueStatus | None:
    """A status from one SSE event's data, or ``None`` for anything else (pings, garbage)."""
    try:
        return QueueStatus.model_validate_json(data)
    except ValidationError:
        log.debug("ignoring a status stream event that is not a status: %.200s", data)
        return None


class FalClient:
    """Async client of fal's queue API for one model.

    Timeouts are explicit on every call. Idempotent calls (status, result, cancel, token,
    upload) are retried in-call on transient errors, up to ``http_retries`` times, with full
    jitter backoff; a ``Retry-After`` is honoured as a floor, and one longer than
    ``backoff_cap_s`` is left to the caller (the error carries it in ``retry_after_s``).
    Submits are never retried here. Every failure is a classified
    :class:`~worker.fal.errors.FalError`; the key never appears in one.
    """

    def __init__(
        self,
        *,
        key: str,
        queue_url: str,
        rest_url: str,
        cdn_url: str,
        model_id: str,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 30.0,
        write_timeout_s: float = 30.0,
        pool_timeout_s: float = 10.0,
        stream_read_timeout_s: float = 60.0,
        max_connections: int = 2100,
        http_retries: int = 2,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: RandomSource | None = None,
        sleep: Sleep = asyncio.sleep,
        on_request: OnRequest | None = None,
        clock: Callable[[], float] = time.time,
        store_io: bool = True,
        output_expiration_s: int | None = None,
        multipart_threshold_bytes: int = 100 * 1024 * 1024,
        multipart_part_bytes: int = 10 * 1024 * 1024,
        multipart_concurrency: int = 4,
        upload_part_retries: int = 4,
    ) -> None:
        self._key = key
        self._queue_url = queue_url.rstrip("/")
        self._rest_url = rest_url.rstrip("/")
        self._cdn_url = cdn_url.rstrip("/")
        self._model_id = model_id.strip("/")
        self._http_retries = max(0, http_retries)
        self._backoff_base_s = backoff_base_s
        self._backoff_cap_s = backoff_cap_s
        self._rng: RandomSource = rng if rng is not None else random.Random()
        self._sleep = sleep
        self._on_request = on_request
        self._clock = clock
        self._token: _CdnToken | None = None
        self._submit_headers = submit_headers(store_io=store_io, output_expiration_s=output_expiration_s)
        self._multipart_threshold_bytes = multipart_threshold_bytes
        self._multipart_part_bytes = multipart_part_bytes
        self._multipart_concurrency = max(1, multipart_concurrency)
        self._upload_part_retries = max(0, upload_part_retries)
        self.timeout = httpx.Timeout(
            connect=connect_timeout_s, read=read_timeout_s, write=write_timeout_s, pool=pool_timeout_s
        )
        # Status events can be minutes apart while a request waits; a short read timeout would
        # turn every quiet stream into an error.
        self.stream_timeout = httpx.Timeout(
            connect=connect_timeout_s,
            read=max(read_timeout_s, stream_read_timeout_s),
            write=write_timeout_s,
            pool=pool_timeout_s,
        )
        # The tracker holds one stream per in-flight job (up to tracker_max_jobs), so the pool
        # must be larger than httpx's default of 100 or streams would starve submits.
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=min(100, max_connections)
        )
        self._http = httpx.AsyncClient(
            transport=transport,
            limits=limits,
            timeout=self.timeout,
            follow_redirects=False,  # a redirect must never carry our key to another host
            headers={"User-Agent": USER_AGENT},
        )

    @classmethod
    def from_settings(cls, settings: Settings, **kw: Any) -> FalClient:
        """A client configured from ``settings``; ``kw`` overrides (``transport``, ``on_request``, …)."""
        params: dict[str, Any] = {
            "key": settings.fal_key_value,
            "queue_url": settings.fal_queue_url,
            "rest_url": settings.fal_rest_url,
            "cdn_url": settings.fal_cdn_url,
            "model_id": settings.fal_model_id,
            "connect_timeout_s": settings.fal_connect_timeout_s,
            "read_timeout_s": settings.fal_read_timeout_s,
            "write_timeout_s": settings.fal_write_timeout_s,
            "pool_timeout_s": settings.fal_pool_timeout_s,
            "http_retries": settings.fal_http_retries,
            "backoff_base_s": settings.fal_http_backoff_base_s,
            "backoff_cap_s": settings.fal_http_backoff_cap_s,
            "store_io": settings.fal_store_io,
            "output_expiration_s": settings.fal_output_expiration_s,
            "multipart_threshold_bytes": settings.fal_multipart_threshold_bytes,
            "multipart_part_bytes": settings.fal_multipart_part_bytes,
            "multipart_concurrency": settings.fal_multipart_concurrency,
            "upload_part_retries": settings.fal_upload_part_retries,
        }
        params.update(kw)
        return cls(**params)

    def __repr__(self) -> str:
        return f"FalClient(queue_url={self._queue_url!r}, model_id={self._model_id!r})"

    async def __aenter__(self) -> FalClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    # --- public operations -------------------------------------------------------------------

    async def submit(
        self, payload: dict[str, Any], *, webhook_url: str | None = None, priority: str | None = None
    ) -> SubmitReceipt:
        """Queue one request; return its id and URLs.

        Never retried here. A failure before the body left is a
        :class:`~worker.fal.errors.FalTransientError` (safe to submit again); once fal may have
        read the body, a lost reply is a :class:`~worker.fal.errors.FalAmbiguousError`.
        ``priority`` is fal's ``X-Fal-Queue-Priority``: ``normal`` or ``low``. What fal keeps of the
        request follows the client's ``store_io`` and ``output_expiration_s`` (:func:`submit_headers`).

        A caller that cancels this coroutine (task time limit, shutdown) gets ``CancelledError``,
        not a classified error: treat a submit cancelled mid-flight as ambiguous too.
        """
        if priority is not None and priority not in FAL_PRIORITIES:
            raise ValueError(f"fal queue priority must be one of {sorted(FAL_PRIORITIES)}, not {priority!r}")
        headers = self._headers({"Content-Type": "application/json", **self._submit_headers})
        if priority is not None:
            headers["X-Fal-Queue-Priority"] = priority
        params = {"fal_webhook": webhook_url} if webhook_url else None
        body = json.dumps(payload, separators=(",", ":")).encode()
        url = f"{self._queue_url}/{self._model_id}"
        response = await self._send("submit", "POST", url, headers=headers, content=body, params=params)
        self._raise_for("submit", response)
        return self._receipt_from(response)

    def receipt_for(self, request_id: str) -> SubmitReceipt:
        """A receipt for a known request id, URLs built by the owner/app rule.

        The rule: docs/fal-wire-protocol.md §1.3.
        """
        status_url, response_url, cancel_url = request_urls(self._queue_url, self._model_id, request_id)
        return SubmitReceipt(
            request_id=request_id, status_url=status_url, response_url=response_url, cancel_url=cancel_url
        )

    async def status(self, receipt: SubmitReceipt, *, logs: bool = False) -> QueueStatus:
        """The request's current status (fal answers 202 while queued or running, 200 when done)."""
        return await self._idempotent("status", lambda: self._status_once(receipt, logs))

    async def stream_status(
        self, receipt: SubmitReceipt, *, logs: bool = False
    ) -> AsyncGenerator[QueueStatus, None]:
        """Follow fal's SSE status stream; yield each status until ``COMPLETED``.

        Not retried in-call: a dropped or failed stream raises a classified error (transient for
        a lost connection, or when the stream closes before ``COMPLETED``) and the caller falls
        back to polling :meth:`status`. Wrap it in ``contextlib.aclosing`` when you may stop early.
        """
        url = httpx.URL(receipt.status_url)
        url = url.copy_with(path=url.path.rstrip("/") + "/stream").copy_merge_params(_logs_param(logs))
        headers = self._headers({"Accept": "text/event-stream"})
        started = time.perf_counter()
        recorded = False
        try:
            async with self._http.stream(
                "GET", url, headers=headers, timeout=self.stream_timeout
            ) as response:
                self._record("stream", response.status_code, started)
                recorded = True
                if not 200 <= response.status_code < 300:
                    await response.aread()
                    self._raise_for("stream", response, receipt.request_id)
                async for status in self._statuses(response):
                    yield status
                    if status.completed:
                        return
        except httpx.HTTPError as exc:
            if not recorded:
                self._record("stream", None, started)
            raise self._redacted(
                classify_exception("stream", exc, body_sent=False), receipt.request_id
            ) from exc
        raise self._redacted(
            FalTransientError("status stream closed before COMPLETED", op="stream"), receipt.request_id
        )

    async def result(self, receipt: SubmitReceipt) -> ReframeOutput:
        """The output of a completed request.

        Raises :class:`~worker.fal.errors.FalModelError` (with fal's ``detail``) when the model
        rejected the input, :class:`~worker.fal.errors.FalRunnerError` when it failed on fal's
        side, and a transient error while the request is still running.
        """
        return await self._idempotent("result", lambda: self._result_once(receipt))

    async def cancel(self, receipt: SubmitReceipt) -> FalCancelAnswer:
        """Ask fal to cancel the request; report what that achieved."""
        return await self._idempotent("cancel", lambda: self._cancel_once(receipt))

    async def upload_file(
        self, path: str | os.PathLike[str], *, on_progress: OnProgress | None = None
    ) -> str:
        """Upload a local file to fal's CDN; return its public URL.

        The file is streamed from disk, never read whole into memory (worker/fal/upload.py).
        Up to ``multipart_threshold_bytes`` it goes in one request: the CDN token flow
        (docs/fal-wire-protocol.md §5) and, when any step of it fails, the initiate + PUT flow, as
        fal-client does. Above it, fal's multipart upload: parts of ``multipart_part_bytes``,
        ``multipart_concurrency`` at a time, each retried on its own (``upload_part_retries``,
        with backoff) before the upload fails. ``on_progress(sent, total)`` follows the bytes.
        Storage calls cost nothing at fal and repeat safely: a part PUT again replaces itself.
        """
        file = Path(path)
        content_type = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        try:
            size = (await asyncio.to_thread(file.stat)).st_size
            progress = UploadProgress(size, on_progress)
            if size > self._multipart_threshold_bytes:
                return await self._upload_multipart(file, size, content_type, progress)
            try:
                return await self._upload_v3(file, size, content_type, progress)
            except FalError as primary:
                log.warning("fal CDN upload failed (%s); falling back to initiate + PUT", primary)
                try:
                    return await self._upload_initiate(file, size, content_type, progress)
                except FalError as fallback:
                    raise fallback from primary
        except OSError as exc:
            # The local file, not fal: unreadable, or changed while it was being sent.
            raise FalPermanentError(f"cannot read {file.name}: {exc.strerror or exc}", op="upload") from None

    # --- one attempt of each operation ---------------------------------------------------------

    async def _status_once(self, receipt: SubmitReceipt, logs: bool) -> QueueStatus:
        url = httpx.URL(receipt.status_url).copy_merge_params(_logs_param(logs))
        response = await self._send("status", "GET", url, headers=self._headers())
        self._raise_for("status", response, receipt.request_id)
        return self._parse("status", response, QueueStatus, FalTransientError, receipt.request_id)

    async def _result_once(self, receipt: SubmitReceipt) -> ReframeOutput:
        response = await self._send("result", "GET", receipt.response_url, headers=self._headers())
        self._raise_for("result", response, receipt.request_id)
        # A 200 that is not {"video": File} will not change on a second read.
        return self._parse("result", response, ReframeOutput, FalPermanentError, receipt.request_id)

    async def _cancel_once(self, receipt: SubmitReceipt) -> FalCancelAnswer:
        response = await self._send("cancel", "PUT", receipt.cancel_url, headers=self._headers(), content=b"")
        outcome = cancel_outcome(response.status_code, response.content)
        if outcome is not None:
            return outcome
        self._raise_for("cancel", response, receipt.request_id)
        raise self._redacted(
            FalPermanentError(f"unexpected cancel answer HTTP {response.status_code}", op="cancel"),
            receipt.request_id,
        )

    async def _cdn_auth(self) -> dict[str, str]:
        token = await self._cdn_token()
        return {"Authorization": f"{token.token_type} {token.token}"}

    async def _upload_v3(self, file: Path, size: int, content_type: str, progress: UploadProgress) -> str:
        headers = {
            **await self._cdn_auth(),
            "Accept": "application/json",
            "Content-Type": content_type,
            "Content-Length": str(size),
            "X-Fal-File-Name": _header_safe(file.name),
        }

        async def once() -> str:
            body = file_body(file, 0, size, progress=progress)
            response = await self._send(
                "upload", "POST", f"{self._cdn_url}/files/upload", headers=headers, content=body
            )
            self._raise_for("upload", response)
            return self._parse("upload", response, _Uploaded, FalTransientError).access_url

        try:
            return await self._idempotent("upload", once)
        except FalAuthError:
            self._token = None  # the CDN refused the token: never reuse it
            raise

    async def _upload_initiate(
        self, file: Path, size: int, content_type: str, progress: UploadProgress
    ) -> str:
        url = httpx.URL(f"{self._rest_url}/storage/upload/initiate", params={"storage_type": "gcs"})
        body = json.dumps({"file_name": file.name, "content_type": content_type}).encode()

        async def initiate() -> _UploadTarget:
            headers = self._headers({"Content-Type": "application/json"})
            response = await self._send("upload", "POST", url, headers=headers, content=body)
            self._raise_for("upload", response)
            return self._parse("upload", response, _UploadTarget, FalTransientError)

        target = await self._idempotent("upload", initiate)
        # The upload URL is pre-signed; our key goes along only to hosts we were configured with.
        headers = {"Content-Type": content_type, "Content-Length": str(size)}
        if self._is_own_origin(target.upload_url):
            headers.update(self._headers())

        async def put() -> None:
            content = file_body(file, 0, size, progress=progress)
            response = await self._send("upload", "PUT", target.upload_url, headers=headers, content=content)
            self._raise_for("upload", response)

        await self._idempotent("upload", put)
        return target.file_url

    async def _upload_multipart(
        self, file: Path, size: int, content_type: str, progress: UploadProgress
    ) -> str:
        """fal's multipart upload: initiate, the parts (bounded in parallel), complete.

        No fallback to one request: above the threshold a single request is what fal's storage
        does not take, so a part that keeps failing fails the upload (the caller may try again).
        """
        auth = await self._cdn_auth()
        init_headers = {
            **auth,
            "Accept": "application/json",
            "Content-Type": content_type,
            "X-Fal-File-Name": _header_safe(file.name),
        }

        async def initiate() -> _MultipartTarget:
            response = await self._send(
                "upload", "POST", f"{self._cdn_url}/files/upload/multipart", headers=init_headers, content=b""
            )
            self._raise_for("upload", response)
            return self._parse("upload", response, _MultipartTarget, FalTransientError)

        try:
            target = await self._idempotent("upload", initiate)
        except FalAuthError:
            self._token = None
            raise
        if not self._is_storage_site(target.access_url):
            # The CDN token goes to every part URL; it must not leave fal's storage hosts.
            raise self._redacted(
                FalPermanentError("multipart upload answered with a URL outside fal storage", op="upload")
            )
        root = f"{target.access_url}/multipart/{quote(target.uploadId, safe='')}"
        slots = asyncio.Semaphore(self._multipart_concurrency)

        async def send_part(part: Part) -> dict[str, Any]:
            async with slots:
                etag = await self._idempotent(
                    "upload",
                    lambda: self._put_part(f"{root}/{part.number}", file, part, content_type, progress),
                    retries=self._upload_part_retries,
                )
            return {"partNumber": part.number, "etag": etag}

        parts = plan_parts(size, part_size(size, self._multipart_part_bytes))
        try:
            async with asyncio.TaskGroup() as group:  # the first part that gives up cancels the others
                tasks = [group.create_task(send_part(part)) for part in parts]
        except ExceptionGroup as failed:
            raise _first_error(failed) from None
        done = json.dumps({"parts": [task.result() for task in tasks]}).encode()

        async def complete() -> str:
            headers = {
                **await self._cdn_auth(),
                "Accept": "application/json",
                "Content-Type": "application/json",
            }
            response = await self._send("upload", "POST", f"{root}/complete", headers=headers, content=done)
            self._raise_for("upload", response)
            answer = self._parse("upload", response, _CompletedUpload, FalTransientError)
            return answer.access_url or target.access_url

        return await self._idempotent("upload", complete)

    async def _put_part(
        self,
        url: str,
        file: Path,
        part: Part,
        content_type: str,
        progress: UploadProgress,
    ) -> str:
        """One attempt at one part; its ETag.

        The CDN token is looked up per attempt: a long upload outlives a token, and the cached one is
        renewed before it expires; a part refused with 401 drops it, and its retry fetches a new one.
        """
        headers = {**await self._cdn_auth(), "Content-Type": content_type, "Content-Length": str(part.length)}
        body = file_body(file, part.offset, part.length, progress=progress, part=part.number)
        response = await self._send("upload", "PUT", url, headers=headers, content=body)
        if response.status_code == 401:
            # The token, not the key, was refused (a bad key fails the token call itself): retry the
            # part with a fresh token, within the part's retries.
            self._token = None
            raise self._redacted(FalTransientError("fal storage refused the CDN token", op="upload"))
        self._raise_for("upload", response)
        etag: str | None = response.headers.get("etag")
        if not etag:
            raise self._redacted(
                FalPermanentError(f"part {part.number} was stored without an ETag", op="upload")
            )
        return etag

    async def _cdn_token(self) -> _CdnToken:
        # Two coroutines may both refresh an expiring token; that costs one extra cheap call and
        # avoids an event-loop-bound lock in a client shared across the process.
        if self._token is not None and not self._token_expiring(self._token):
            return self._token
        url = httpx.URL(f"{self._rest_url}/storage/auth/token", params={"storage_type": "fal-cdn-v3"})

        async def once() -> _CdnToken:
            headers = self._headers({"Content-Type": "application/json"})
            response = await self._send("token", "POST", url, headers=headers, content=b"{}")
            self._raise_for("token", response)
            return self._parse("token", response, _CdnToken, FalTransientError)

        self._token = await self._idempotent("token", once)
        return self._token

    def _token_expiring(self, token: _CdnToken) -> bool:
        if token.expires_at is None:
            return True  # no expiry given: do not guess, fetch a fresh one per upload
        return token.expires_at.timestamp() - TOKEN_REFRESH_MARGIN_S <= self._clock()

    # --- plumbing --------------------------------------------------------------------------------

    async def _idempotent(
        self, op: str, call: Callable[[], Awaitable[T]], *, retries: int | None = None
    ) -> T:
        """Run ``call`` and retry it on transient errors while the policy allows.

        ``retries`` overrides ``http_retries`` (multipart parts have their own count).
        """
        max_attempts = 1 + (self._http_retries if retries is None else retries)
        attempt = 1
        while True:
            try:
                return await call()
            except FalError as err:
                delay = self._retry_delay(err, attempt, max_attempts)
                if delay is None:
                    raise
                log.info("fal %s attempt %d failed (%s); retrying in %.2fs", op, attempt, err, delay)
                await self._sleep(delay)
                attempt += 1

    def _retry_delay(self, err: FalError, attempt: int, max_attempts: int) -> float | None:
        """Seconds to wait before the next attempt, or ``None`` to give up and raise ``err``."""
        if not isinstance(err, FalTransientError) or not should_retry(err, attempt, max_attempts):
            return None
        if isinstance(err, FalRunnerError):
            return None  # the result endpoint replays the same failure however often we ask
        if err.retry_after_s is not None and err.retry_after_s > self._backoff_cap_s:
            return None  # a long server-requested pause is the job level's to schedule, not ours
        return backoff_s(
            attempt - 1,
            base_s=self._backoff_base_s,
            cap_s=self._backoff_cap_s,
            rng=self._rng,
            retry_after_s=err.retry_after_s,
        )

    async def _send(
        self,
        op: str,
        method: str,
        url: str | httpx.URL,
        *,
        headers: dict[str, str],
        content: bytes | AsyncIterable[bytes] | None = None,
        params: dict[str, str] | None = None,
    ) -> httpx.Response:
        """One HTTP attempt with explicit timeouts; any httpx error comes out classified."""
        progress = _SendProgress()
        started = time.perf_counter()
        try:
            response = await self._http.request(
                method,
                url,
                headers=headers,
                content=content,
                params=params,
                timeout=self.timeout,
                extensions={"trace": progress},
            )
        except httpx.HTTPError as exc:
            self._record(op, None, started, timeout=isinstance(exc, httpx.TimeoutException))
            err = classify_exception(op, exc, body_sent=progress.body_sent(exc))
            raise self._redacted(err) from exc
        self._record(op, response.status_code, started)
        return response

    def _raise_for(self, op: str, response: httpx.Response, request_id: str | None = None) -> None:
        err = classify_response(
            op, response.status_code, response.headers, response.content, now_s=self._clock()
        )
        if err is not None:
            raise self._redacted(err, request_id)

    def _parse(
        self,
        op: str,
        response: httpx.Response,
        model: type[M],
        on_bad: type[FalError],
        request_id: str | None = None,
    ) -> M:
        try:
            return model.model_validate_json(response.content)
        except ValidationError as exc:
            snippet = " ".join(response.text.split())[:200]
            err = on_bad(
                f"unexpected {model.__name__.strip('_')} body ({exc.error_count()} problem(s)): {snippet}",
                op=op,
                status_code=response.status_code,
                error_type="invalid_response",
            )
            raise self._redacted(err, request_id) from None

    def _receipt_from(self, response: httpx.Response) -> SubmitReceipt:
        try:
            data = response.json()
        except ValueError:
            data = None
        request_id = data.get("request_id") if isinstance(data, dict) else None
        if not isinstance(request_id, str) or not request_id:
            # fal answered 2xx, so it may well have queued the request, but we cannot follow it.
            raise self._redacted(
                FalAmbiguousError(
                    "submit answered without a request id; fal may have queued it",
                    op="submit",
                    status_code=response.status_code,
                    request_id=response.headers.get("x-fal-request-id"),
                )
            )
        assert isinstance(data, dict)
        fallback = self.receipt_for(request_id)
        position = data.get("queue_position")
        return SubmitReceipt(
            request_id=request_id,
            status_url=self._trusted_url(data.get("status_url"), fallback.status_url),
            response_url=self._trusted_url(data.get("response_url"), fallback.response_url),
            cancel_url=self._trusted_url(data.get("cancel_url"), fallback.cancel_url),
            queue_position=position if isinstance(position, int) and not isinstance(position, bool) else None,
        )

    def _trusted_url(self, value: object, fallback: str) -> str:
        """fal's returned URL when it points at our queue host; else the owner/app fallback.

        The key is sent to these URLs, so a URL on any other host is not followed.
        """
        if isinstance(value, str) and value:
            if _origin(value) == _origin(self._queue_url):
                return value
            log.warning("fal returned a URL outside %s; using the owner/app rule", self._queue_url)
        return fallback

    def _is_storage_site(self, url: str) -> bool:
        """True for our own origins and for hosts of the CDN's parent domain (``v3b.fal.media``
        next to ``v3.fal.media``), over the same scheme and port."""
        if self._is_own_origin(url):
            return True
        parsed, cdn = httpx.URL(url), httpx.URL(self._cdn_url)
        if _is_ip(cdn.host):
            return False  # an address has no parent domain
        site = cdn.host.split(".", 1)[-1]
        same_origin_but_host = parsed.scheme == cdn.scheme and parsed.port == cdn.port
        return same_origin_but_host and "." in site and parsed.host.endswith("." + site)

    def _is_own_origin(self, url: str) -> bool:
        return _origin(url) in {_origin(self._queue_url), _origin(self._rest_url), _origin(self._cdn_url)}

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Key {self._key}"
        if extra:
            headers.update(extra)
        return headers

    def _redacted(self, err: FalError, request_id: str | None = None) -> FalError:
        """``err`` with our secrets scrubbed (defence in depth: fal never echoes them)."""
        secrets = [self._key]
        if ":" in self._key:
            secrets.append(self._key.split(":", 1)[1])
        if self._token is not None:
            secrets.append(self._token.token)
        err.redact([s for s in secrets if len(s) >= 4])
        if err.request_id is None:
            err.request_id = request_id
        return err

    def _record(self, op: str, status_code: int | None, started: float, *, timeout: bool = False) -> None:
        if self._on_request is None:
            return
        try:
            self._on_request(op, status_class(status_code, timeout=timeout), time.perf_counter() - started)
        except Exception:
            # A broken metrics hook must not fail a fal call.
            log.warning("fal on_request hook failed", exc_info=True)

    async def _statuses(self, response: httpx.Response) -> AsyncIterator[QueueStatus]:
        decoder = SseDecoder()
        async for line in response.aiter_lines():
            data = decoder.feed(line)
            if data is not None and (status := parse_status_event(data)) is not None:
                yield status
        data = decoder.flush()
        if data is not None and (status := parse_status_event(data)) is not None:
            yield status


def submit_headers(*, store_io: bool, output_expiration_s: int | None) -> dict[str, str]:
    """The headers that tell fal what to keep of a request (docs/fal-wire-protocol.md §2.1).

    ``X-Fal-Store-IO: 0`` when its input and output payloads must not be stored; an
    ``X-Fal-Object-Lifecycle-Preference`` with ``expiration_duration_seconds`` when its output media
    must be deleted after that long. Nothing when fal's defaults apply.
    """
    headers: dict[str, str] = {}
    if not store_io:
        headers["X-Fal-Store-IO"] = "0"
    if output_expiration_s is not None:
        preference = {"expiration_duration_seconds": int(output_expiration_s)}
        headers["X-Fal-Object-Lifecycle-Preference"] = json.dumps(preference, separators=(",", ":"))
    return headers


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _first_error(failed: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error that stopped a group of parts: a classified one first, else whatever came."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [failed]
    while pending:
        exc = pending.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            leaves.append(exc)
    return next((e for e in leaves if isinstance(e, FalError)), leaves[0])


def _logs_param(logs: bool) -> dict[str, str]:
    return {"logs": "1" if logs else "0"}


def _origin(url: str) -> tuple[str, str, int | None]:
    parsed = httpx.URL(url)
    return parsed.scheme, parsed.host, parsed.port


def _header_safe(name: str) -> str:
    # Header values must be ASCII; percent-encode anything else in a file name.
    return quote(name, safe=" !#$&'()*+,-.;=@[]^_`{}~")
