"""A real local HTTP server that records every request it gets (SSRF tests assert it saw none)."""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

Route = Callable[["_Handler"], None]


@dataclass
class Seen:
    """One request the server received."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = False  # a taken port must fail (tests pair servers on one port)

    def __init__(self, host: str, family: socket.AddressFamily, port: int) -> None:
        self.address_family = family
        self.seen: list[Seen] = []
        self.routes: dict[str, Route] = {}
        self.lock = threading.Lock()
        super().__init__((host, port), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _record(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        with self.server.lock:
            self.server.seen.append(Seen(self.command, self.path, dict(self.headers.items()), body))
        route = self.server.routes.get(self.path.split("?", 1)[0])
        if route is None:
            self.reply(200, b"ok")
        else:
            route(self)

    do_GET = do_POST = do_HEAD = _record

    def reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


@dataclass
class RecordingServer:
    """A threaded HTTP/1.1 server on ``host`` and a free port; ``seen`` lists every request."""

    host: str
    family: socket.AddressFamily = socket.AF_INET
    want_port: int = 0
    _server: _Server | None = None
    _thread: threading.Thread | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def start(self) -> RecordingServer:
        self._server = _Server(self.host, self.family, self.want_port)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    @property
    def base(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def seen(self) -> list[Seen]:
        assert self._server is not None
        with self._server.lock:
            return list(self._server.seen)

    def route(self, path: str, handler: Route) -> None:
        assert self._server is not None
        self._server.routes[path] = handler

    def redirect(self, path: str, location: str, status: int = 302) -> None:
        self.route(path, lambda h: h.reply(status, b"", {"Location": location}))

    def serve_bytes(self, path: str, data: bytes, *, ranges: bool = True) -> None:
        """Serve ``data`` at ``path``, honouring ``Range: bytes=a-b`` when ``ranges``."""

        def handler(h: _Handler) -> None:
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", h.headers.get("Range", ""))
            if not ranges or match is None:
                h.reply(200, data, {"Content-Type": "video/mp4", "Accept-Ranges": "bytes"})
                return
            start = int(match.group(1))
            end = min(int(match.group(2) or len(data) - 1), len(data) - 1)
            if start >= len(data):
                h.reply(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                return
            h.reply(
                206,
                data[start : end + 1],
                {"Content-Type": "video/mp4", "Content-Range": f"bytes {start}-{end}/{len(data)}"},
            )

        self.route(path, handler)


def _ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture
def make_server() -> Iterator[Callable[..., RecordingServer]]:
    """Start recording servers (``host`` 127.0.0.1 by default); all are stopped after the test."""
    started: list[RecordingServer] = []

    def factory(host: str = "127.0.0.1", port: int = 0) -> RecordingServer:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        if family == socket.AF_INET6 and not _ipv6_loopback_available():
            pytest.skip("no IPv6 loopback on this machine")
        server = RecordingServer(host, family, port).start()
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture
def target(make_server: Callable[..., RecordingServer]) -> RecordingServer:
    """The server an attacker wants reached: 127.0.0.1, never allowlisted. It must see nothing."""
    return make_server("127.0.0.1")
