"""Queue state: requests, the FIFO scheduler under the concurrency limit, the runner, cancel and results.

Everything here runs on the server's event loop thread; nothing is shared across threads, so no locks.

Open-question answers (fal documents none of these; see falemu/README.md):

* result before completion: 400 ``{"detail": "Request is still in progress"}``;
* unknown request id: 404 ``{"detail": "Request not found"}`` (cancel: ``{"status": "NOT_FOUND", ...}``);
* cancel while queued or running: 202 ``CANCELLATION_REQUESTED``; the request ends COMPLETED with
  ``error_type`` ``client_cancelled`` at once (a running render is abandoned) and its result is 499;
* a validation failure ends COMPLETED with ``error`` = first message and ``error_type`` ``validation_error``;
  its result replays 422 with fal's ``{"detail": [...]}`` list;
* the concurrency limit is one account-wide limit (the emulator serves one account, whatever the key);
  the ledger still counts requests open per key id (``account``), and ``isolate_accounts`` makes
  each key id see only its own requests, as separate fal accounts would.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from falemu.config import EmulatorConfig
from falemu.faults import WEBHOOK_KINDS, Fault, FaultBook
from falemu.fetch import FetchError, fetch_input
from falemu.ledger import Ledger, fingerprint
from falemu.render import RenderCache, RenderError
from falemu.storage import Storage, file_url
from falemu.validation import ReframeInput, fetch_error, validate_input
from falemu.webhooks import WebhookSigner, deliver, webhook_body

IN_QUEUE = "IN_QUEUE"
IN_PROGRESS = "IN_PROGRESS"
COMPLETED = "COMPLETED"


@dataclass
class Outcome:
    """What the model "returned": replayed verbatim by the result endpoint and sent to the webhook."""

    status_code: int
    body: Any
    error: str | None = None
    error_type: str | None = None
    billed_s: float = 0.0
    user_timeout: bool = False  # a 504 caused by the client's X-Fal-Request-Timeout

    @property
    def ok(self) -> bool:
        """True for a successful (2xx) outcome."""
        return self.status_code < 400

    def headers(self) -> dict[str, str]:
        """Extra response headers of the replayed result: request errors name their type, model 422s don't."""
        is_request_error = isinstance(self.body, dict) and isinstance(self.body.get("detail"), str)
        headers = {"X-Fal-Error-Type": self.error_type} if self.error_type and is_request_error else {}
        if self.error_type == "request_timeout" and self.user_timeout:
            headers["X-Fal-Request-Timeout-Type"] = "user"
        return headers


def request_error(status_code: int, detail: str, error_type: str) -> Outcome:
    """A fal request error: ``{"detail": str, "error_type": str}``."""
    return Outcome(status_code, {"detail": detail, "error_type": error_type}, detail, error_type)


def cancelled_outcome() -> Outcome:
    """The outcome of a cancelled request (499 ``client_cancelled``)."""
    return request_error(499, "Request cancelled by client", "client_cancelled")


@dataclass
class QueueRequest:
    """One submitted request."""

    id: str
    app_prefix: str
    endpoint: str
    payload: Any
    base_url: str
    webhook_url: str | None
    generation: int
    runner_fault: Fault | None = None
    #: The key id that submitted it (its fal account); never the secret.
    account: str = ""
    output_fault: Fault | None = None
    #: ``X-Fal-Store-IO``: False drops the input payload once the request ends (and hides both payloads).
    store_io: bool = True
    #: ``X-Fal-Object-Lifecycle-Preference``'s expiration: the output media is gone this long after it is made
    output_expiration_s: float | None = None
    status: str = IN_QUEUE
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    completed_at: float | None = None
    outcome: Outcome | None = None
    expired: bool = False
    logs: list[dict[str, Any]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def changed(self) -> asyncio.Event:
        """An event set at the next change of this request (renewed lazily: notify stays O(1))."""
        if self._changed.is_set():
            self._changed = asyncio.Event()
        return self._changed

    def notify(self) -> None:
        """Wake everyone waiting for a change (status streams)."""
        self._changed.set()

    def log(self, message: str, level: str = "INFO") -> None:
        """Append a runner log line in fal's ``RequestLog`` shape."""
        stamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        self.logs.append({"message": message, "level": level, "source": "USER", "timestamp": stamp})

    @property
    def endpoint_id(self) -> str:
        """The full endpoint id as fal's usage export names it (``owner/app/path``)."""
        return "/".join(p for p in (self.app_prefix, self.endpoint.strip("/")) if p)

    def urls(self) -> dict[str, str]:
        """response_url, status_url and cancel_url (owner/app form: fal drops the endpoint path)."""
        root = f"{self.base_url}/{self.app_prefix}/requests/{self.id}"
        return {"response_url": root, "status_url": f"{root}/status", "cancel_url": f"{root}/cancel"}


class TokenBucket:
    """Submit rate limiter; ``take()`` returns 0 when allowed, else seconds until a token is free."""

    def __init__(self) -> None:
        self._tokens = 0.0
        self._stamp = time.monotonic()
        self._primed = False

    def take(self, rate_per_s: float, burst: int) -> float:
        """Consume one token if there is one."""
        now = time.monotonic()
        if not self._primed:
            self._tokens, self._primed = float(burst), True
        self._tokens = min(float(burst), self._tokens + (now - self._stamp) * rate_per_s)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / rate_per_s


class EmulatorState:
    """The queue, its requests and the machinery that runs them."""

    def __init__(self, config: EmulatorConfig, data_dir: Path) -> None:
        self.config = config
        self.ledger = Ledger.bounded(config.ledger_max_requests)
        self.faults = FaultBook()
        self.storage = Storage(data_dir / "files")
        self.cache = RenderCache(
            data_dir / "renders",
            workers=config.render_workers,
            preset=config.x264_preset,
            timeout_s=config.render_timeout_s,
            max_long_side=config.max_long_side,
        )
        self.inputs_dir = data_dir / "inputs"
        self.inputs_dir.mkdir(parents=True, exist_ok=True)
        self.signer = WebhookSigner(config.webhook_private_key, config.webhook_user_id)
        self.http = httpx.AsyncClient()
        self.requests: dict[str, QueueRequest] = {}
        self._queue: deque[str] = deque()
        self._running: set[str] = set()
        self._bucket = TokenBucket()
        self._queue_event = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()
        self._generation = 0

    # ---- submit -------------------------------------------------------------------------------------

    def admit(self, query_max_queue: int | None) -> tuple[int, dict[str, Any], dict[str, str]] | None:
        """Gateway checks before a submit is accepted: rate limit and queue length. None = admitted."""
        cfg = self.config
        if cfg.submit_rate_per_s is not None:
            wait_s = self._bucket.take(cfg.submit_rate_per_s, cfg.submit_burst)
            if wait_s > 0:
                retry_after = str(max(1, int(wait_s + 0.999)))
                return 429, {"detail": "Rate limit exceeded, retry later"}, {"Retry-After": retry_after}
        limits = [v for v in (cfg.max_queue_length, query_max_queue) if v is not None]
        if limits and len(self._queue) >= min(limits):
            return 429, {"detail": "Queue is full: the request exceeds the maximum queue length"}, {}
        return None

    def submit(
        self,
        *,
        app_prefix: str,
        endpoint: str,
        payload: Any,
        base_url: str,
        webhook_url: str | None,
        runner_fault: Fault | None,
        start_timeout_s: float | None = None,
        account: str = "",
        output_fault: Fault | None = None,
        store_io: bool = True,
        output_expiration_s: float | None = None,
    ) -> QueueRequest:
        """Create a request IN_QUEUE (no validation: fal validates in the runner) and schedule.

        ``start_timeout_s`` (from ``X-Fal-Request-Timeout``) bounds the time spent IN_QUEUE: a request not
        started by then ends COMPLETED with a 504 ``request_timeout`` (``X-Fal-Request-Timeout-Type: user``).
        ``store_io`` and ``output_expiration_s`` are what the submit's headers asked fal to keep; the ledger
        records both with the submit.
        """
        req = QueueRequest(
            id=str(uuid.uuid4()),
            app_prefix=app_prefix,
            endpoint=endpoint,
            payload=payload,
            base_url=base_url,
            webhook_url=webhook_url,
            generation=self._generation,
            runner_fault=runner_fault,
            account=account,
            output_fault=output_fault,
            store_io=store_io,
            output_expiration_s=output_expiration_s,
        )
        self.requests[req.id] = req
        self._queue.append(req.id)
        self.ledger.record_submit(
            req.id, fingerprint(payload), account, store_io=store_io, output_expiration_s=output_expiration_s
        )
        self._update_counts()
        self._schedule()
        if start_timeout_s is not None and req.status == IN_QUEUE:
            asyncio.get_running_loop().call_later(start_timeout_s, self._start_deadline, req)
        return req

    def _start_deadline(self, req: QueueRequest) -> None:
        if req.status != IN_QUEUE or req.generation != self._generation:
            return  # it started (the deadline stops counting once processing starts) or was reset away
        self._queue.remove(req.id)
        self._queue_moved()
        outcome = request_error(504, "Request timed out", "request_timeout")
        outcome.user_timeout = True
        self._finish(req, outcome)

    # ---- status ----------------------------------------------------------------------------------------

    @property
    def queue_changed(self) -> asyncio.Event:
        """An event set at the next change of the queue's membership (every IN_QUEUE request's position).

        Streams of queued requests wait on this one event instead of each request being notified on every
        start: with thousands queued, per-request notification would be O(n) per start.
        """
        if self._queue_event.is_set():
            self._queue_event = asyncio.Event()
        return self._queue_event

    def _queue_moved(self) -> None:
        self._queue_event.set()

    def queue_position(self, req: QueueRequest) -> int:
        """Requests ahead of ``req`` in the FIFO (0 = next)."""
        return self._queue.index(req.id)

    def status_body(self, req: QueueRequest, with_logs: bool) -> dict[str, Any]:
        """The status JSON: IN_QUEUE has queue_position; every status has ``logs`` (null unless asked)."""
        body: dict[str, Any] = {
            "status": req.status,
            "request_id": req.id,
            **req.urls(),
            "logs": list(req.logs) if with_logs else None,
        }
        if req.status == IN_QUEUE:
            body["queue_position"] = self.queue_position(req)
        elif req.status == COMPLETED:
            started = req.started_at or req.completed_at or 0.0
            body["metrics"] = {"inference_time": round((req.completed_at or started) - started, 3)}
            if req.outcome is not None and not req.outcome.ok:
                body["error"] = req.outcome.error
                body["error_type"] = req.outcome.error_type
        return body

    def result_expired(self, req: QueueRequest) -> bool:
        """True once the result is gone (ttl passed or expired on demand)."""
        ttl = self.config.result_ttl_s
        if req.expired:
            return True
        return ttl is not None and req.completed_at is not None and time.time() > req.completed_at + ttl

    # ---- cancel ----------------------------------------------------------------------------------------

    def cancel(self, request_id: str) -> tuple[int, str]:
        """Cancel: (HTTP code, outcome string) per fal's cancel statuses."""
        req = self.requests.get(request_id)
        if req is None:
            code, outcome = 404, "NOT_FOUND"
        elif req.status == COMPLETED:
            code, outcome = 400, "ALREADY_COMPLETED"
        else:
            code, outcome = 202, "CANCELLATION_REQUESTED"
            if req.status == IN_QUEUE:
                self._queue.remove(req.id)
                self._queue_moved()
                self._finish(req, cancelled_outcome())
            elif req.task is not None:
                req.log("Cancellation requested", "WARN")
                req.task.cancel()  # the runner catches it and finishes the request as client_cancelled
        self.ledger.record_cancel(request_id, outcome, code)
        return code, outcome

    # ---- scheduling and running ------------------------------------------------------------------------

    def _schedule(self) -> None:
        """Start queued requests while the account has free concurrency (FIFO)."""
        while self._queue and len(self._running) < self.config.concurrency:
            req = self.requests[self._queue.popleft()]
            req.status = IN_PROGRESS
            req.started_at = time.time()
            req.log("Request picked up by a runner")
            self._running.add(req.id)
            req.task = asyncio.create_task(self._run(req), name=f"falemu-run-{req.id}")
            req.notify()
            self._queue_moved()
        self._update_counts()

    def reschedule(self) -> None:
        """Re-evaluate the queue (after a concurrency change)."""
        self._schedule()

    async def _run(self, req: QueueRequest) -> None:
        try:
            outcome = await self._process(req)
            # Every outcome, failures included, stays IN_PROGRESS for the configured extra time, so tests
            # can rely on "at least processing_time_s in progress" whatever the input.
            await asyncio.sleep(self.config.processing_time_s)
        except asyncio.CancelledError:
            outcome = cancelled_outcome()
        except Exception as exc:  # noqa: BLE001 - an emulator bug must still end the request, like a crashed runner
            outcome = request_error(
                500, f"Runner server error: {exc.__class__.__name__}", "runner_server_error"
            )
        self._finish(req, outcome)

    async def _process(self, req: QueueRequest) -> Outcome:
        if req.runner_fault is not None:
            status, error_type, detail = req.runner_fault.runner_failure()
            req.log(detail, "ERROR")
            return request_error(status, detail, error_type)
        params, errors = validate_input(req.payload)
        if params is None:
            req.log("Input validation failed", "ERROR")
            return Outcome(422, {"detail": errors}, _first_msg(errors), "validation_error")
        return await self._reframe(req, params)

    async def _reframe(self, req: QueueRequest, params: ReframeInput) -> Outcome:
        cfg = self.config
        req.log("Downloading input video")
        try:
            fetched = await fetch_input(
                params.video_url,
                storage=self.storage,
                client=self.http,
                inputs_dir=self.inputs_dir,
                max_bytes=cfg.max_input_bytes,
                timeout_s=cfg.fetch_timeout_s,
            )
            info = await self.cache.info(fetched.path, fetched.sha256)
        except (FetchError, RenderError) as exc:
            errors = fetch_error(str(exc), params.video_url)
            return Outcome(422, {"detail": errors}, _first_msg(errors), "validation_error")
        if cfg.max_input_duration_s is not None and info.duration_s > cfg.max_input_duration_s:
            errors = fetch_error(f"video is longer than {cfg.max_input_duration_s:g} s", params.video_url)
            return Outcome(422, {"detail": errors}, _first_msg(errors), "validation_error")
        req.log(f"Reframing {info.width}x{info.height} {info.duration_s:.2f}s to {params.aspect_ratio}")
        bad = req.output_fault.output if req.output_fault is not None else None
        claimed_s: float | None = None
        try:
            if bad == "ratio":  # a scripted wrong output: another aspect ratio than asked for
                wrong = "16:9" if params.aspect_ratio in {"1:1", "9:16", "3:4", "9:21"} else "9:16"
                rendered = await self.cache.render(
                    fetched.path, fetched.sha256, replace(params, aspect_ratio=wrong)
                )
            else:
                rendered = await self.cache.render(fetched.path, fetched.sha256, params)
            if bad == "truncate" and req.output_fault is not None:
                claimed_s = rendered.duration_s  # the File still claims the whole length
                rendered = await self.cache.truncated(rendered, rendered.duration_s * req.output_fault.keep)
        except RenderError as exc:
            return request_error(500, str(exc), "runner_server_error")
        expires_at = None if req.output_expiration_s is None else time.time() + req.output_expiration_s
        stored = self.storage.alias(rendered.path, f"{req.id}.mp4", "video/mp4", expires_at)
        video = {
            "url": file_url(req.base_url, stored),
            "content_type": "video/mp4",
            "file_name": stored.file_name,
            "file_size": rendered.size_bytes,
            "width": rendered.width,
            "height": rendered.height,
            "duration": round(claimed_s if claimed_s is not None else rendered.duration_s, 3),
        }
        req.log("Done")
        # fal bills the output it returned
        return Outcome(
            200, {"video": video}, billed_s=billable_s(rendered.duration_s, self.config.billing_unit_s)
        )

    def _finish(self, req: QueueRequest, outcome: Outcome) -> None:
        if req.status == COMPLETED:
            return
        req.status = COMPLETED
        req.outcome = outcome
        req.completed_at = time.time()
        if not req.store_io:
            req.payload = None  # X-Fal-Store-IO: 0: fal keeps no input payload once the request is done
        self._running.discard(req.id)
        req.notify()
        if req.generation != self._generation:
            return  # a request from before a reset: keep the new ledger clean
        self.ledger.account_closed(req.account)
        self.ledger.record_terminal(
            ok=outcome.ok,
            cancelled=outcome.error_type == "client_cancelled",
            billed_s=outcome.billed_s,
            request_id=req.id,
            endpoint_id=req.endpoint_id,
        )
        self._schedule()
        if req.webhook_url:
            fault = self.faults.take("webhook", WEBHOOK_KINDS)
            self._spawn(self._send_webhook(req, outcome, fault))

    async def _send_webhook(self, req: QueueRequest, outcome: Outcome, fault: Fault | None = None) -> None:
        assert req.webhook_url is not None
        body = webhook_body(req.id, outcome.status_code, outcome.body)
        ledger = self.ledger
        if fault is not None and fault.kind == "drop":
            ledger.record_webhook(req.id, req.webhook_url, 0, None, "dropped")
            return
        if fault is not None and fault.kind == "slow":
            await asyncio.sleep(fault.delay_s)
        times = 2 if fault is not None and fault.kind == "duplicate" else 1
        for n in range(times):
            if n:
                await asyncio.sleep(fault.delay_s if fault is not None else 0.0)
            await deliver(
                self.http,
                self.signer,
                url=req.webhook_url,
                request_id=req.id,
                body=body,
                retry_delays_s=list(self.config.webhook_retry_delays_s),
                timeout_s=self.config.webhook_timeout_s,
                record=ledger.record_webhook,
            )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _update_counts(self) -> None:
        self.ledger.set_counts(len(self._running), len(self._running) + len(self._queue))

    # ---- lifecycle -------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget requests, ledger and faults (config, stored files and the render cache stay)."""
        self._generation += 1
        for req in self.requests.values():
            if req.task is not None and not req.task.done():
                req.task.cancel()
        for task in self._background:
            task.cancel()
        for req in self.requests.values():
            if req.status == IN_QUEUE:  # never ran: end it quietly so its open streams close
                req.status, req.outcome, req.completed_at = COMPLETED, cancelled_outcome(), time.time()
            req.notify()
        self.requests.clear()
        self._queue.clear()
        self._queue_moved()
        self._running.clear()
        self.ledger = Ledger.bounded(self.config.ledger_max_requests)
        self.faults.clear()
        self._bucket = TokenBucket()

    async def close(self) -> None:
        """Stop runners and webhook senders and close the HTTP client."""
        pending = list(self._background)
        pending += [r.task for r in self.requests.values() if r.task is not None]
        self.reset()  # cancels them all
        with contextlib.suppress(Exception):
            await asyncio.gather(*pending, return_exceptions=True)
        await self.http.aclose()


def _first_msg(errors: list[dict[str, Any]]) -> str:
    first = errors[0]
    loc = ".".join(str(part) for part in first.get("loc", [])[1:]) or "body"
    return f"{loc}: {first.get('msg', 'invalid')}"


def billable_s(duration_s: float, unit_s: float) -> float:
    """Seconds billed for ``duration_s`` of output: whole units, rounded up (``unit_s`` 0: exact)."""
    if unit_s <= 0:
        return duration_s
    # a tiny tolerance so 3.0000001 s of container rounding does not bill a 4th second
    return math.ceil(duration_s / unit_s - 1e-6) * unit_s
