"""Running the emulator: a background-thread server for tests and libraries, and the CLI entry point."""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import httpx
import uvicorn

from falemu.app import create_app
from falemu.config import EmulatorConfig


def _bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket ourselves so port 0 resolves to a real port before uvicorn starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must be IPPROTO_TCP: asyncio only sets TCP_NODELAY on accepted sockets of such a listener, and
    # without it Nagle + delayed ACK add ~40 ms to every response (headers and body are separate writes).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _uvicorn_config(app: Any, access_log: bool) -> uvicorn.Config:
    # h11 keeps behaviour identical whether or not httptools happens to be installed (drop faults rely on it).
    return uvicorn.Config(
        app,
        log_level="warning",
        access_log=access_log,
        http="h11",
        lifespan="on",
        timeout_graceful_shutdown=2,
    )


class EmulatorServer:
    """The emulator on a loopback port, served by uvicorn in a background thread.

    Use as a context manager (or ``start()``/``stop()``); ``url`` is ``http://HOST:PORT``. The control helpers
    (``ledger``, ``set_faults``, ...) call the ``/_emulator`` HTTP API, so they behave like remote use.
    """

    def __init__(self, config: EmulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.config = config or EmulatorConfig()
        self.host = host
        self._requested_port = port
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL of the running server."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout_s: float = 15.0) -> EmulatorServer:
        """Start serving; returns once the server accepts connections."""
        if self._server is not None:
            raise RuntimeError("already started")
        sock = _bind(self.host, self._requested_port)
        self.port = sock.getsockname()[1]
        server = uvicorn.Server(_uvicorn_config(create_app(self.config), access_log=False))
        self._server = server
        self._thread = threading.Thread(
            target=lambda: asyncio.run(server.serve(sockets=[sock])), name=f"falemu-{self.port}", daemon=True
        )
        self._thread.start()
        deadline = threading.Event()
        for _ in range(int(timeout_s / 0.02)):
            if server.started:
                return self
            if not self._thread.is_alive():
                break
            deadline.wait(0.02)
        self.stop()
        raise RuntimeError("the fal emulator did not start")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop serving and wait for the thread."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._server, self._thread = None, None

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ---- control API helpers --------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        response = httpx.request(method, self.url + path, json=body, timeout=10.0)
        response.raise_for_status()
        return response.json()

    def ledger(self) -> dict[str, Any]:
        """``GET /_emulator/ledger``."""
        result: dict[str, Any] = self._call("GET", "/_emulator/ledger")
        return result

    def usage_csv(self, start: str | None = None, end: str | None = None) -> str:
        """``GET /_emulator/usage.csv``: the billed requests as fal's usage export (falemu/usage.py)."""
        params = {k: v for k, v in (("start", start), ("end", end)) if v}
        response = httpx.get(self.url + "/_emulator/usage.csv", params=params, timeout=10.0)
        response.raise_for_status()
        return response.text

    def set_faults(self, faults: list[dict[str, Any]]) -> None:
        """Append scripted faults (``POST /_emulator/faults``)."""
        self._call("POST", "/_emulator/faults", {"faults": faults})

    def clear_faults(self) -> None:
        """``DELETE /_emulator/faults``."""
        self._call("DELETE", "/_emulator/faults")

    def configure(self, **changes: Any) -> dict[str, Any]:
        """Partial config update (``POST /_emulator/config``); returns the new run-time config."""
        result: dict[str, Any] = self._call("POST", "/_emulator/config", changes)
        return result

    def reset(self) -> None:
        """``POST /_emulator/reset``."""
        self._call("POST", "/_emulator/reset")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m falemu`` / ``reframe emulator`` flags."""
    parser = argparse.ArgumentParser(
        prog="falemu", description="fal.ai queue emulator for Luma Ray 2 Flash Reframe"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--concurrency", type=int, default=2, help="account concurrency limit")
    parser.add_argument("--processing-time-s", type=float, default=0.0, help="extra seconds IN_PROGRESS")
    parser.add_argument("--result-ttl-s", type=float, default=3600.0)
    parser.add_argument("--submit-rate-per-s", type=float, default=None)
    parser.add_argument("--submit-burst", type=int, default=10)
    parser.add_argument("--max-queue-length", type=int, default=None)
    parser.add_argument(
        "--valid-key",
        action="append",
        dest="valid_keys",
        default=None,
        help="accepted key (repeatable); default accepts any well-formed key",
    )
    parser.add_argument("--locked-key", action="append", dest="locked_keys", default=[])
    parser.add_argument("--public-url", default=None, help="base URL to hand out (default: from Host header)")
    parser.add_argument("--data-dir", default=None, help="uploads and render cache (default: temp dir)")
    parser.add_argument("--render-workers", type=int, default=2)
    parser.add_argument(
        "--max-input-bytes", type=int, default=100 * 1024 * 1024, help="largest input video (422 beyond)"
    )
    parser.add_argument(
        "--unit-price-usd", type=float, default=0.06, help="dollars per billed second (usage export)"
    )
    parser.add_argument("--access-log", action="store_true")
    return parser


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    """An :class:`EmulatorConfig` from parsed CLI flags."""
    from pathlib import Path

    return EmulatorConfig(
        concurrency=args.concurrency,
        processing_time_s=args.processing_time_s,
        result_ttl_s=args.result_ttl_s,
        submit_rate_per_s=args.submit_rate_per_s,
        submit_burst=args.submit_burst,
        max_queue_length=args.max_queue_length,
        valid_keys=args.valid_keys,
        locked_keys=args.locked_keys,
        public_url=args.public_url,
        data_dir=Path(args.data_dir) if args.data_dir else None,
        render_workers=args.render_workers,
        max_input_bytes=args.max_input_bytes,
        unit_price_usd=args.unit_price_usd,
    )


async def _serve(config: EmulatorConfig, host: str, port: int, access_log: bool) -> None:
    sock = _bind(host, port)
    server = uvicorn.Server(_uvicorn_config(create_app(config), access_log))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    if server.started:
        shown = f"[{host}]" if ":" in host else host
        print(f"fal emulator listening on http://{shown}:{sock.getsockname()[1]}", flush=True)
    await task


def build_usage_parser() -> argparse.ArgumentParser:
    """The ``falemu usage`` flags: fetch a running emulator's usage export."""
    parser = argparse.ArgumentParser(
        prog="falemu usage",
        description="Write a running emulator's billed requests as fal's usage export (CSV).",
    )
    parser.add_argument("--url", default="http://127.0.0.1:8765", help="the emulator's base URL")
    parser.add_argument("--out", default="-", help="file to write ('-': standard output)")
    parser.add_argument("--start", default=None, help="ISO 8601 time: only requests billed from then")
    parser.add_argument("--end", default=None, help="ISO 8601 time: only requests billed before then")
    return parser


def usage_main(argv: Sequence[str]) -> int:
    """``falemu usage``: fetch ``/_emulator/usage.csv`` and write it; returns the exit code."""
    args = build_usage_parser().parse_args(list(argv))
    params = {k: v for k, v in (("start", args.start), ("end", args.end)) if v}
    try:
        response = httpx.get(args.url.rstrip("/") + "/_emulator/usage.csv", params=params, timeout=30.0)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        print(f"falemu usage: {args.url}: {exc}", file=sys.stderr)
        return 2
    if args.out == "-":
        sys.stdout.write(response.text)
    else:
        try:
            with open(args.out, "w", encoding="utf-8", newline="") as out:
                out.write(response.text)
        except OSError as exc:
            print(f"falemu usage: --out: {exc}", file=sys.stderr)
            return 2
    return 0


def cli_main(argv: Sequence[str] | None = None) -> int:
    """Run the emulator in the foreground until SIGINT/SIGTERM (or ``usage``: write its usage
    export); returns the exit code."""
    given = list(argv) if argv is not None else sys.argv[1:]
    if given[:1] == ["usage"]:
        return usage_main(given[1:])
    args = build_parser().parse_args(given)
    config = config_from_args(args)
    try:
        config.validate()
    except ValueError as exc:
        print(f"falemu: {exc}", file=sys.stderr)
        return 2
    asyncio.run(_serve(config, args.host, args.port, args.access_log))
    return 0
