"""The Starlette application: fal's queue API, storage API, JWKS and the ``/_emulator`` control API."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from falemu.config import EmulatorConfig
from falemu.faults import Fault
from falemu.gateway import RAW_SEND_KEY, GatewayMiddleware, split_app_path
from falemu.state import COMPLETED, IN_QUEUE, EmulatorState, QueueRequest
from falemu.storage import MultipartError, Storage, assemble, file_url
from falemu.usage import parse_time, usage_csv

NO_USER = "No user found for Key ID and Secret"
BAD_FORMAT = "Invalid Key Authorization header format. Expected '<key_id>:<key_secret>'."
LOCKED = "User is locked. Reason: Exhausted balance. Top up your balance at fal.ai/dashboard/billing"
STILL_RUNNING = "Request is still in progress"


@dataclass
class _Holder:
    state: EmulatorState | None = None


def _state(request: Request) -> EmulatorState:
    holder: _Holder = request.app.state.holder
    assert holder.state is not None, "the emulator state exists only while the app's lifespan runs"
    return holder.state


def _base_url(request: Request) -> str:
    """The URL prefix to hand out: configured public URL, else how this client reached us."""
    configured = _state(request).config.public_url
    return (configured or str(request.base_url)).rstrip("/")


def _json(
    body: Any,
    status: int = 200,
    request_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    extra = dict(headers or {})
    if request_id is not None:
        extra["x-fal-request-id"] = request_id
    return JSONResponse(body, status_code=status, headers=extra)


# ---- auth ---------------------------------------------------------------------------------------------


def _auth_error(request: Request, allow_cdn_token: bool = False) -> JSONResponse | None:
    """None when the caller may proceed, else fal's 401/403 answer."""
    state = _state(request)
    header = request.headers.get("authorization", "")
    scheme, _, credential = header.partition(" ")
    credential = credential.strip()
    if allow_cdn_token and scheme.lower() == "bearer" and state.storage.token_valid(credential):
        return None
    if scheme.lower() != "key" or not credential:
        return _json({"detail": NO_USER}, 401)
    key_id, sep, secret = credential.partition(":")
    if not sep or not key_id or not secret:
        return _json({"detail": BAD_FORMAT}, 401)
    cfg = state.config
    if cfg.valid_keys is not None and credential not in cfg.valid_keys:
        return _json({"detail": NO_USER}, 401)
    if credential in cfg.locked_keys or key_id in cfg.locked_keys:
        return _json({"detail": LOCKED}, 403)
    return None


# ---- queue API ----------------------------------------------------------------------------------------


async def queue_dispatch(request: Request) -> Response:
    """Route ``/{owner}/{app}[/...]``: submit (POST), or requests/{id}[/status[/stream]|/cancel]."""
    split = split_app_path(request.url.path)
    if split is None:
        return _json({"detail": "Not Found"}, 404)
    app_prefix, rest = split
    denied = _auth_error(request)
    if denied is not None:
        return denied
    if request.method == "POST":
        return await _submit(request, app_prefix, rest)
    parts = rest.strip("/").split("/")
    if len(parts) < 2 or parts[0] != "requests":
        return _json({"error": "Error", "message": f"Path /{rest} not found"}, 404)
    request_id, tail = parts[1], "/".join(parts[2:])
    handlers = {
        ("GET", ""): _result,
        ("GET", "status"): _status,
        ("GET", "status/stream"): _stream,
        ("PUT", "cancel"): _cancel,
    }
    handler = handlers.get((request.method, tail))
    if handler is None:
        return _json({"detail": "Method Not Allowed"}, 405)
    return await handler(request, request_id)


def _float_or_none(raw: str | None) -> float | None:
    try:
        value = float(raw) if raw is not None else None
    except ValueError:
        return None
    return value if value is not None and value > 0 else None


def _int_or_none(raw: str | None) -> int | None:
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


async def _submit(request: Request, app_prefix: str, endpoint: str) -> Response:
    state = _state(request)
    rejected = state.admit(_int_or_none(request.query_params.get("fal_max_queue_length")))
    if rejected is not None:
        status, body, headers = rejected
        return _json(body, status, headers=headers)
    raw = await request.body()
    try:
        payload = json.loads(raw) if raw.strip() else {}
    except ValueError:
        return _json({"detail": "Invalid JSON body"}, 400)
    start_timeout_s = _float_or_none(request.headers.get("x-fal-request-timeout"))
    store_io = request.headers.get("x-fal-store-io", "1").strip().lower() not in {"0", "false", "no"}
    runner_fault = state.faults.take("submit", frozenset({"runner_error"}))
    output_fault = None if runner_fault else state.faults.take("submit", frozenset({"bad_output"}))
    req = state.submit(
        app_prefix=app_prefix,
        endpoint=endpoint,
        payload=payload,
        base_url=_base_url(request),
        webhook_url=request.query_params.get("fal_webhook"),
        runner_fault=runner_fault,
        output_fault=output_fault,
        start_timeout_s=start_timeout_s,
        store_io=store_io,
        output_expiration_s=_lifecycle_expiration_s(request),
        account=_key_id(request),
    )
    body = {"status": "IN_QUEUE", "request_id": req.id, **req.urls(), "queue_position": _position(state, req)}
    return _json(body, 200, req.id)


def _position(state: EmulatorState, req: QueueRequest) -> int:
    return state.queue_position(req) if req.status == IN_QUEUE else 0


def _key_id(request: Request) -> str:
    scheme, _, credential = request.headers.get("authorization", "").partition(" ")
    return credential.strip().split(":", 1)[0] if scheme.lower() == "key" else ""


def _find(request: Request, request_id: str) -> QueueRequest | None:
    """The request, unless accounts are isolated and it belongs to another key id's account."""
    state = _state(request)
    req = state.requests.get(request_id)
    if req is not None and state.config.isolate_accounts and req.account != _key_id(request):
        return None
    return req


def _wants_logs(request: Request) -> bool:
    return request.query_params.get("logs", "0").lower() in {"1", "true", "yes"}


async def _status(request: Request, request_id: str) -> Response:
    req = _find(request, request_id)
    if req is None:
        return _json({"detail": "Request not found"}, 404, request_id)
    body = _state(request).status_body(req, _wants_logs(request))
    return _json(body, 200 if req.status == COMPLETED else 202, req.id)


async def _stream(request: Request, request_id: str) -> Response:
    req = _find(request, request_id)
    if req is None:
        return _json({"detail": "Request not found"}, 404, request_id)
    state = _state(request)
    with_logs = _wants_logs(request)

    async def events() -> AsyncIterator[bytes]:
        while True:
            # Taken before the body, so a change in between is not missed. A queued request changes only when
            # the queue does (start, cancel, timeout all remove it from the queue).
            changed = state.queue_changed if req.status == IN_QUEUE else req.changed
            yield f"data: {json.dumps(state.status_body(req, with_logs))}\n\n".encode()
            if req.status == COMPLETED:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=state.config.stream_keepalive_s)

    headers = {"x-fal-request-id": req.id, "cache-control": "no-cache", "x-accel-buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


async def _result(request: Request, request_id: str) -> Response:
    state = _state(request)
    req = _find(request, request_id)
    if req is None:
        return _json({"detail": "Request not found"}, 404, request_id)
    if req.status != COMPLETED or req.outcome is None:
        return _json({"detail": STILL_RUNNING}, 400, req.id)
    if not state.result_expired(req) and state.faults.take("result", frozenset({"expire_result"})):
        req.expired = True
    if state.result_expired(req):
        return _json({"detail": "Request not found"}, 404, req.id)
    outcome = req.outcome
    return _json(outcome.body, outcome.status_code, req.id, outcome.headers())


async def _cancel(request: Request, request_id: str) -> Response:
    if _find(request, request_id) is None and request_id in _state(request).requests:
        return _json({"status": "NOT_FOUND", "detail": "Request not found"}, 404, request_id)
    code, outcome = _state(request).cancel(request_id)
    body: dict[str, Any] = {"status": outcome}
    if code == 404:
        body["detail"] = "Request not found"
    return _json(body, code, request_id)


# ---- storage ------------------------------------------------------------------------------------------


async def storage_token(request: Request) -> Response:
    """``POST /storage/auth/token?storage_type=fal-cdn-v3``: a short-lived CDN upload token."""
    denied = _auth_error(request)
    if denied is not None:
        return denied
    state = _state(request)
    token, expires = state.storage.issue_token(state.config.cdn_token_ttl_s)
    expires_at = datetime.fromtimestamp(expires, UTC).isoformat()
    return _json(
        {"token": token, "token_type": "Bearer", "base_url": _base_url(request), "expires_at": expires_at}
    )


def _lifecycle_expiration_s(request: Request) -> float | None:
    """``expiration_duration_seconds`` of ``X-Fal-Object-Lifecycle-Preference`` (or, as fal-client sends
    on uploads, ``X-Fal-Object-Lifecycle``); ``None`` (fal's default retention) when absent, null or
    unreadable."""
    raw = request.headers.get("x-fal-object-lifecycle-preference") or request.headers.get(
        "x-fal-object-lifecycle"
    )
    if not raw:
        return None
    try:
        value = json.loads(raw).get("expiration_duration_seconds")
    except (ValueError, AttributeError):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        return None
    return float(value)


def _expires_at(request: Request) -> float | None:
    seconds = _lifecycle_expiration_s(request)
    return None if seconds is None else time.time() + seconds


async def _receive_to(request: Request, path: Path) -> tuple[int, str]:
    """Stream the request body into ``path`` (a temporary name, renamed when complete): (size, MD5 hex).

    Written in 1 MiB batches off the event loop; a 300 MB upload never sits in memory.
    """
    digest = hashlib.md5(usedforsecurity=False)
    size = 0
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    out = await asyncio.to_thread(tmp.open, "wb")
    try:
        batch = bytearray()
        async for chunk in request.stream():
            digest.update(chunk)
            size += len(chunk)
            batch += chunk
            if len(batch) >= 1024 * 1024:
                await asyncio.to_thread(out.write, bytes(batch))
                batch.clear()
        if batch:
            await asyncio.to_thread(out.write, bytes(batch))
        await asyncio.to_thread(out.close)
        await asyncio.to_thread(tmp.replace, path)
    except BaseException:
        out.close()
        tmp.unlink(missing_ok=True)
        raise
    return size, digest.hexdigest()


async def files_upload(request: Request) -> Response:
    """``POST /files/upload``: raw bytes in, ``{"access_url"}`` out (CDN token or Key auth)."""
    denied = _auth_error(request, allow_cdn_token=True)
    if denied is not None:
        return denied
    storage = _state(request).storage
    key, path = storage.new_path()
    await _receive_to(request, path)
    stored = storage.register(
        key,
        path,
        request.headers.get("x-fal-file-name"),
        request.headers.get("content-type"),
        _expires_at(request),
    )
    return _json({"access_url": file_url(_base_url(request), stored)})


async def upload_initiate(request: Request) -> Response:
    """``POST /storage/upload/initiate``: reserve a file; the bytes follow with ``PUT upload_url``."""
    denied = _auth_error(request)
    if denied is not None:
        return denied
    try:
        spec = await request.json()
    except ValueError:
        spec = {}
    spec = spec if isinstance(spec, dict) else {}
    storage = _state(request).storage
    key, name, signature = storage.initiate(spec.get("file_name"), spec.get("content_type"))
    base = _base_url(request)
    file_url_ = f"{base}/files/{key}/{name}"
    return _json({"upload_url": f"{file_url_}?signature={signature}", "file_url": file_url_})


async def files_put(request: Request) -> Response:
    """``PUT upload_url``: the signed-URL upload (the signature in the query is the credential)."""
    storage = _state(request).storage
    key = request.path_params["key"]
    claimed = storage.claim_pending(key, request.query_params.get("signature"))
    if claimed is None:
        return _json({"detail": "Invalid or expired upload URL"}, 403)
    name, reserved_type = claimed
    path = storage.path_for(key)
    await _receive_to(request, path)
    storage.register(key, path, name, request.headers.get("content-type") or reserved_type, None)
    return Response(status_code=200)


async def multipart_initiate(request: Request) -> Response:
    """``POST /files/upload/multipart``: ``{"access_url", "uploadId"}``.

    The parts go to ``PUT {access_url}/multipart/{uploadId}/{n}``, then
    ``POST {access_url}/multipart/{uploadId}/complete`` makes the file.
    """
    denied = _auth_error(request, allow_cdn_token=True)
    if denied is not None:
        return denied
    upload = _state(request).storage.start_multipart(
        request.headers.get("x-fal-file-name"), request.headers.get("content-type"), _expires_at(request)
    )
    access_url = f"{_base_url(request)}/files/{upload.key}/{upload.file_name}"
    return _json({"access_url": access_url, "uploadId": upload.upload_id})


async def multipart_part(request: Request) -> Response:
    """``PUT .../multipart/{uploadId}/{n}``: one part, streamed to its own file; its ETag (MD5) in the answer.

    Sending a part again replaces it (the ETag follows the new bytes), so a retried part is safe.
    """
    denied = _auth_error(request, allow_cdn_token=True)
    if denied is not None:
        return denied
    storage = _state(request).storage
    upload = storage.multipart(request.path_params["key"], request.path_params["upload_id"])
    number = _int_or_none(request.path_params["part"])
    if upload is None or upload.completed is not None:
        return _json({"detail": "Upload not found"}, 404)
    if number is None or not 1 <= number <= 10_000:
        return _json({"detail": "Part number must be between 1 and 10000"}, 400)
    _, md5 = await _receive_to(request, Storage.part_path(upload, number))
    etag = f'"{md5}"'
    upload.etags[number] = etag
    return Response(status_code=200, headers={"ETag": etag})


async def multipart_complete(request: Request) -> Response:
    """``POST .../multipart/{uploadId}/complete`` with ``{"parts": [{"partNumber", "etag"}]}``: the parts,
    in number order, become the file. Completing a completed upload again answers the same URL."""
    denied = _auth_error(request, allow_cdn_token=True)
    if denied is not None:
        return denied
    storage = _state(request).storage
    upload = storage.multipart(request.path_params["key"], request.path_params["upload_id"])
    if upload is None:
        return _json({"detail": "Upload not found"}, 404)
    try:
        body = await request.json()
        parts = [(int(p["partNumber"]), str(p["etag"])) for p in body["parts"]]
    except (ValueError, KeyError, TypeError):
        return _json({"detail": 'Expected {"parts": [{"partNumber": int, "etag": str}, ...]}'}, 400)
    async with upload.lock:
        if upload.completed is None:
            path = storage.path_for(upload.key)
            try:
                await asyncio.to_thread(assemble, upload, parts, path)
            except MultipartError as exc:
                return _json({"detail": str(exc)}, 400)
            upload.completed = storage.register(
                upload.key, path, upload.file_name, upload.content_type, upload.expires_at
            )
    return _json({"access_url": file_url(_base_url(request), upload.completed)})


async def files_get(request: Request) -> Response:
    """``GET /files/{key}/{name}``: public, like fal's CDN (range requests supported); 404 once expired."""
    stored = _state(request).storage.get(request.path_params["key"])
    if stored is None or not stored.path.exists():
        return _json({"detail": "File not found"}, 404)
    return FileResponse(stored.path, media_type=stored.content_type, filename=None)


async def jwks(request: Request) -> Response:
    """The webhook signing keys."""
    return _json(_state(request).signer.jwks())


# ---- control API --------------------------------------------------------------------------------------


async def control_ledger(request: Request) -> Response:
    """``GET /_emulator/ledger``."""
    return _json(_state(request).ledger.snapshot())


async def control_usage(request: Request) -> Response:
    """``GET /_emulator/usage.csv[?start=ISO&end=ISO]``: billed requests as fal's usage export."""
    state = _state(request)
    try:
        start, end = (
            parse_time(request.query_params[name]) if request.query_params.get(name) else None
            for name in ("start", "end")
        )
    except ValueError as exc:
        return _json({"detail": f"bad start or end: {exc}"}, 400)
    text = usage_csv(state.ledger.billed, state.config.unit_price_usd, start=start, end=end)
    return Response(text, media_type="text/csv; charset=utf-8")


async def control_faults(request: Request) -> Response:
    """``POST`` appends scripted faults, ``DELETE`` clears them, ``GET`` lists the pending ones."""
    book = _state(request).faults
    if request.method == "DELETE":
        book.clear()
    elif request.method == "POST":
        try:
            body = await request.json()
            faults = [Fault.from_dict(raw) for raw in body["faults"]]
        except (ValueError, KeyError, TypeError) as exc:
            return _json({"detail": f"bad faults: {exc}"}, 400)
        book.add(faults)
    return _json({"faults": [vars(f) for f in book.pending()]})


async def control_config(request: Request) -> Response:
    """``POST`` applies a partial config update; ``GET`` shows the run-time config."""
    state = _state(request)
    if request.method == "POST":
        try:
            changes = await request.json()
            state.config.update(dict(changes))
        except (ValueError, TypeError) as exc:
            return _json({"detail": f"bad config: {exc}"}, 400)
        state.reschedule()  # a higher concurrency starts queued requests right away
    return _json(state.config.as_dict())


async def control_payloads(request: Request) -> Response:
    """``GET /_emulator/requests/{id}/payloads``: what fal stored of a request's input and output.

    404 for a request submitted with ``X-Fal-Store-IO: 0``: fal keeps no payloads then, and neither do we
    (the input is dropped once the request ends; the result stays readable for its retention only).
    """
    req = _state(request).requests.get(request.path_params["request_id"])
    if req is None:
        return _json({"detail": "Request not found"}, 404)
    if not req.store_io:
        return _json({"detail": "Payloads not stored (X-Fal-Store-IO: 0)", "store_io": False}, 404)
    output = req.outcome.body if req.outcome is not None else None
    return _json({"request_id": req.id, "store_io": True, "input": req.payload, "output": output})


async def control_reset(request: Request) -> Response:
    """``POST /_emulator/reset``: clear ledger, requests and faults."""
    _state(request).reset()
    return _json({"ok": True})


# ---- assembly -----------------------------------------------------------------------------------------


class EmulatorApp(Starlette):
    """Starlette, plus the server's raw ``send`` kept in the scope so a drop fault can close the socket."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Remember the server's ``send`` before Starlette's own middleware wraps it."""
        if scope["type"] == "http":
            scope[RAW_SEND_KEY] = send
        await super().__call__(scope, receive, send)


def create_app(config: EmulatorConfig | None = None) -> Starlette:
    """Build the ASGI app. The state (temp dir, keys, HTTP client) is created when the lifespan starts."""
    cfg = config or EmulatorConfig()
    cfg.validate()
    holder = _Holder()

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        owned = cfg.data_dir is None
        data_dir = Path(tempfile.mkdtemp(prefix="falemu-")) if cfg.data_dir is None else cfg.data_dir
        holder.state = EmulatorState(cfg, data_dir)
        try:
            yield
        finally:
            await holder.state.close()
            holder.state = None
            if owned:
                shutil.rmtree(data_dir, ignore_errors=True)

    routes = [
        Route("/_emulator/ledger", control_ledger, methods=["GET"]),
        Route("/_emulator/usage.csv", control_usage, methods=["GET"]),
        Route("/_emulator/faults", control_faults, methods=["GET", "POST", "DELETE"]),
        Route("/_emulator/config", control_config, methods=["GET", "POST"]),
        Route("/_emulator/reset", control_reset, methods=["POST"]),
        Route("/_emulator/requests/{request_id}/payloads", control_payloads, methods=["GET"]),
        Route("/.well-known/jwks.json", jwks, methods=["GET"]),
        Route("/storage/auth/token", storage_token, methods=["POST"]),
        Route("/storage/upload/initiate", upload_initiate, methods=["POST"]),
        Route("/files/upload", files_upload, methods=["POST"]),
        Route("/files/upload/multipart", multipart_initiate, methods=["POST"]),
        Route("/files/{key}/{name}/multipart/{upload_id}/complete", multipart_complete, methods=["POST"]),
        Route("/files/{key}/{name}/multipart/{upload_id}/{part}", multipart_part, methods=["PUT"]),
        Route("/files/{key}/{name:path}", files_put, methods=["PUT"]),
        Route("/files/{key}/{name:path}", files_get, methods=["GET", "HEAD"]),
        Route("/{path:path}", queue_dispatch, methods=["GET", "POST", "PUT"]),
    ]
    app = EmulatorApp(
        routes=routes,
        lifespan=lifespan,
        middleware=[Middleware(GatewayMiddleware, state_getter=lambda: holder.state)],
    )
    app.state.holder = holder
    return app
