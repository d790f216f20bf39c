"""A TCP proxy in front of Redis that can lose one reply: the interleaving where a command ran but
its caller never heard back (a dropped connection), made on purpose.

Armed with a marker, the proxy forwards the next client chunk that contains it, then closes that
connection instead of passing the server's answer on. redis-py reconnects and (by its default retry
policy) sends the command again, so the server runs it twice; the second run finds the first run's
write.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

from reframe.localproc import free_port


class ReplyCutter:
    """Forwards 127.0.0.1:<port> to a Redis server; :meth:`arm` loses one reply."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.cuts = 0
        self._marker: bytes | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.2)
        self._thread = threading.Thread(target=self._accept, name="reply-cutter", daemon=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> ReplyCutter:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()

    def arm(self, marker: bytes) -> None:
        """Lose the reply to the next command whose bytes contain ``marker`` (once)."""
        with self._lock:
            self._marker = marker

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            cut = threading.Event()  # this connection's reply is to be lost
            threading.Thread(target=self._up, args=(client, server, cut), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, cut), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, cut: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                with self._lock:
                    if self._marker is not None and self._marker in data:
                        self._marker = None
                        self.cuts += 1
                        cut.set()
                server.sendall(data)
        _close(client, server)

    def _down(self, server: socket.socket, client: socket.socket, cut: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := server.recv(65536):
                if cut.is_set():
                    break  # the command ran; its caller never hears so
                client.sendall(data)
        _close(client, server)


def _close(*socks: socket.socket) -> None:
    for s in socks:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            s.close()


@contextlib.contextmanager
def reply_cutter(target_port: int) -> Iterator[ReplyCutter]:
    """A started :class:`ReplyCutter`, stopped on exit."""
    proxy = ReplyCutter(target_port).start()
    try:
        yield proxy
    finally:
        proxy.stop()
