"""The per-process HTTP endpoint: ``/metrics``, ``/livez`` (alias ``/healthz``) and ``/readyz``.

Probe semantics follow docs/celery-operations.md §3.2, which collects what goes wrong with the usual
``celery inspect ping`` probes:

* **Liveness** means "the main loop still turns": the worker core calls :meth:`HealthServer.beat`
  from a Celery timer in the main process, and ``/livez`` answers 200 while the last beat is younger
  than ``liveness_max_age_s``. It does not depend on Redis or the broker, because restarting a pod
  cannot fix a broker outage and only turns it into crash loops.
* **Readiness** means "can consume": a callable supplied by the worker (e.g. broker connection up).
  It may fail during a Redis outage, which takes the pod out of load balancing but never restarts it.
  A readiness callable that raises or takes too long counts as not ready.

The server is stdlib :class:`~http.server.ThreadingHTTPServer` in a daemon thread, so a slow scrape
never blocks a probe. It binds in :meth:`start`; port 0 picks a free port
(:attr:`HealthServer.port` tells which).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

#: Longest a readiness callable may take before the probe answers 503 on its own.
READINESS_TIMEOUT_S = 2.0


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Re-binding right after a restart must not fail on a socket in TIME_WAIT.
    allow_reuse_address = True
    owner: HealthServer


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        owner = self.server.owner
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            try:
                body = generate_latest(owner.registry)
            except Exception:  # a failing collector must not kill the endpoint
                log.exception("metrics exposition failed")
                self._send(500, b"metrics collection failed\n")
                return
            self._send(200, body, CONTENT_TYPE_LATEST)
        elif path in ("/livez", "/healthz"):
            ok, detail = owner.liveness()
            self._send(200 if ok else 503, detail.encode() + b"\n")
        elif path == "/readyz":
            ok, detail = owner.readiness()
            self._send(200 if ok else 503, detail.encode() + b"\n")
        else:
            self._send(404, b"not found: try /metrics, /livez, /readyz, /healthz\n")

    def do_HEAD(self) -> None:
        self.do_GET()

    def _send(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # stdlib signature
        # Probes and scrapes arrive every few seconds; access logs would drown the worker's own.
        return


class HealthServer:
    """``/metrics``, ``/livez``, ``/healthz`` and ``/readyz`` for one process.

    ``registry`` is exposed on ``/metrics``. ``readiness`` is called per ``/readyz`` request (in the
    request's thread, bounded by :data:`READINESS_TIMEOUT_S`). Liveness starts out alive: the clock
    starts at construction, so a worker has ``liveness_max_age_s`` to make its first :meth:`beat`.
    """

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        *,
        liveness_max_age_s: float = 60.0,
        readiness: Callable[[], bool],
    ) -> None:
        if liveness_max_age_s <= 0:
            raise ValueError("liveness_max_age_s must be positive")
        self.host = host
        self.registry = registry
        self.liveness_max_age_s = liveness_max_age_s
        self._readiness = readiness
        self._requested_port = port
        self._last_beat = time.monotonic()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port once started (the requested one before, possibly 0)."""
        if self._server is not None:
            return int(self._server.server_address[1])
        return self._requested_port

    @property
    def url(self) -> str:
        """``http://host:port`` of the running server (loopback when bound to all interfaces)."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        """Bind and serve in a daemon thread. Raises ``OSError`` if the port is taken."""
        if self._server is not None:
            return
        server = _Server((self.host, self._requested_port), _Handler)
        server.owner = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.25}, name="health-server", daemon=True
        )
        self._thread.start()
        log.info("health/metrics server listening on %s", self.url)

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        server, thread = self._server, self._thread
        self._server, self._thread = None, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def beat(self) -> None:
        """Record that the main loop turned (call it from a timer in the main process)."""
        self._last_beat = time.monotonic()

    def beat_age_s(self) -> float:
        """Seconds since the last :meth:`beat` (or construction)."""
        return time.monotonic() - self._last_beat

    def liveness(self) -> tuple[bool, str]:
        """``(alive, detail)``: alive while the last beat is younger than ``liveness_max_age_s``."""
        age = self.beat_age_s()
        if age <= self.liveness_max_age_s:
            return True, f"ok: last beat {age:.1f}s ago"
        return False, f"stale: last beat {age:.1f}s ago (limit {self.liveness_max_age_s:.0f}s)"

    def readiness(self) -> tuple[bool, str]:
        """``(ready, detail)`` from the readiness callable; an exception or a timeout is not ready."""
        result: list[bool] = []
        error: list[BaseException] = []

        def probe() -> None:
            try:
                result.append(bool(self._readiness()))
            except Exception as exc:  # noqa: BLE001 - any failure means not ready
                error.append(exc)

        # Run the check in its own thread so a hung broker call cannot hold the probe past the
        # kubelet's timeout; the probe answers "not ready" and the stray thread finishes later.
        worker = threading.Thread(target=probe, name="readiness-probe", daemon=True)
        worker.start()
        worker.join(READINESS_TIMEOUT_S)
        if worker.is_alive():
            return False, f"not ready: readiness check took over {READINESS_TIMEOUT_S:.0f}s"
        if error:
            return False, f"not ready: {type(error[0]).__name__}: {error[0]}"
        return (True, "ready") if result and result[0] else (False, "not ready")

    def __enter__(self) -> HealthServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ConsumerLink:
    """Whether the Celery consumer holds a broker connection now.

    A consumer bootstep (:mod:`worker.app`) marks it up once the task consumer is running and down
    when the consumer stops or restarts (a lost broker connection), so ``/readyz`` says "cannot
    consume" for exactly as long as Celery is reconnecting. Starts down.
    """

    def __init__(self) -> None:
        self._up = threading.Event()

    def set(self, up: bool) -> None:
        """Record the consumer's connection state."""
        if up:
            self._up.set()
        else:
            self._up.clear()

    def is_up(self) -> bool:
        """True while the consumer is connected."""
        return self._up.is_set()


#: The worker process's consumer link (one Celery consumer per process).
CONSUMER_LINK = ConsumerLink()
