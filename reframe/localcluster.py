"""A whole cluster on one machine: redis-server, the fal emulator, worker processes and, when asked,
``reframe serve`` (the HTTP API, which also receives fal's webhooks).

The demo, the integration tests and the benchmarks all start clusters through :func:`start_cluster`,
so they exercise the same real processes a deployment runs (no mocks, no in-process shortcuts).
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from config import Settings, load_settings
from config.settings import child_environment
from reframe.localproc import ManagedProcess, RedisServer, free_port, spawn, start_redis, wait_until

DEMO_FAL_KEY = "local-demo:not-a-secret"


class EmulatorControl:
    """HTTP client of the emulator's control API (``/_emulator/*``)."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, timeout=30)

    def ledger(self) -> dict[str, Any]:
        """Every request, submission and billing figure the emulator recorded."""
        data: dict[str, Any] = self._http.get("/_emulator/ledger").raise_for_status().json()
        return data

    def set_faults(self, faults: list[dict[str, Any]]) -> None:
        """Append scripted faults (see falemu's README for the fields)."""
        self._http.post("/_emulator/faults", json={"faults": faults}).raise_for_status()

    def clear_faults(self) -> None:
        """Drop every scripted fault."""
        self._http.delete("/_emulator/faults").raise_for_status()

    def configure(self, **changes: Any) -> None:
        """Change emulator settings (concurrency, processing_time_s, submit_rate_per_s, ...)."""
        self._http.post("/_emulator/config", json=changes).raise_for_status()

    def reset(self) -> None:
        """Clear the ledger, requests and faults."""
        self._http.post("/_emulator/reset").raise_for_status()

    def close(self) -> None:
        """Close the HTTP client."""
        self._http.close()


@dataclass
class WorkerProcess:
    """A ``reframe worker`` child with its own metrics port."""

    process: ManagedProcess
    metrics_port: int

    @property
    def metrics_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.metrics_port}"

    def ready(self) -> bool:
        """True once /readyz answers 200."""
        try:
            return httpx.get(f"{self.metrics_url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False


@dataclass
class LocalCluster:
    """Handles of the processes of a local cluster; stop it with :meth:`stop` (or use a ``with``)."""

    workdir: Path
    redis_url: str
    fal_url: str
    env: dict[str, str]
    redis: RedisServer | None = None
    emulator: ManagedProcess | None = None
    emulator_control: EmulatorControl | None = None
    workers: list[WorkerProcess] = field(default_factory=list)
    extra: list[ManagedProcess] = field(default_factory=list)
    #: Base URL of the ``reframe serve`` started by ``start_cluster(fal_webhook_secret=...)``.
    api_url: str | None = None

    def settings(self, **overrides: Any) -> Settings:
        """Settings equal to the workers' (from ``env``), plus overrides."""
        return load_settings(self.env, **overrides)

    def start_worker(
        self,
        *,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        wait: bool = True,
        timeout_s: float = 60,
    ) -> WorkerProcess:
        """Start one more ``reframe worker`` and (by default) wait until it is ready."""
        port = free_port()
        child_env = child_environment({**self.env, **(env or {}), "REFRAME_METRICS_PORT": str(port)})
        name = name or f"worker-{len(self.workers) + 1}"
        argv = [sys.executable, "-m", "reframe", "worker", "--hostname", f"{name}@%h"]
        proc = WorkerProcess(spawn(name, argv, log_dir=self.workdir, env=child_env), port)
        self.workers.append(proc)
        if wait:
            self.wait_ready(proc, timeout_s=timeout_s)
        return proc

    def start_exporter(self, *, timeout_s: float = 30) -> WorkerProcess:
        """Start ``reframe exporter`` (cluster-wide gauges) on a free port and wait until it serves."""
        port = free_port()
        env = child_environment({**self.env, "REFRAME_METRICS_PORT": str(port)})
        argv = [sys.executable, "-m", "reframe", "exporter"]
        proc = WorkerProcess(spawn(f"exporter-{port}", argv, log_dir=self.workdir, env=env), port)
        self.extra.append(proc.process)
        self.wait_ready(proc, timeout_s=timeout_s)
        return proc

    def start_api(
        self, *, port: int | None = None, env: Mapping[str, str] | None = None, timeout_s: float = 60
    ) -> tuple[str, ManagedProcess]:
        """Start ``reframe serve`` (the cluster's env plus ``env``) on ``port`` (default: a free one)
        and wait for /readyz; it is stopped with the cluster. Returns its base URL and process."""
        port = port or free_port()
        url = f"http://127.0.0.1:{port}"
        argv = [sys.executable, "-m", "reframe", "serve", "--host", "127.0.0.1", "--port", str(port)]
        proc = spawn(
            f"serve-{port}", argv, log_dir=self.workdir, env=child_environment({**self.env, **(env or {})})
        )
        self.extra.append(proc)

        def ready() -> bool:
            if not proc.alive():
                raise RuntimeError(f"reframe serve exited:\n{proc.log_tail()}")
            try:
                return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout_s=timeout_s, what="reframe serve ready")
        return url, proc

    def open_console(self) -> str:
        """Start ``reframe serve`` unless one runs (``api_url``), create an admin API key for it and
        return the operator console's link with the key in its fragment (``#key=``: browsers never
        send a fragment to the server; the page moves it to the tab's sessionStorage)."""
        import redis

        from reframe.api.keys import KeyStore

        if self.api_url is None:
            self.api_url, _ = self.start_api()
        client = redis.Redis.from_url(self.redis_url)
        try:
            store = KeyStore(client, prefix=self.settings().key_prefix)
            token, _ = store.create("local", ["admin"], label="local console link")
        finally:
            client.close()
        return f"{self.api_url}/console/jobs#key={token}"

    def wait_ready(self, proc: WorkerProcess, *, timeout_s: float = 60) -> None:
        """Wait for a worker's /readyz; raise with its log tail if it dies or times out."""
        try:
            wait_until(
                lambda: proc.ready() or not proc.process.alive(),
                timeout_s=timeout_s,
                what=f"{proc.process.name} ready",
            )
        except TimeoutError:
            raise RuntimeError(f"{proc.process.name} not ready:\n{proc.process.log_tail()}") from None
        if not proc.process.alive():
            raise RuntimeError(f"{proc.process.name} exited:\n{proc.process.log_tail()}")

    def kill_worker(self, proc: WorkerProcess, sig: int = signal.SIGKILL) -> None:
        """Kill a worker (SIGKILL by default) and forget it."""
        proc.process.kill(sig)
        proc.process.popen.wait(timeout=30)
        self.workers.remove(proc)

    def stop(self) -> None:
        """Stop workers (warm shutdown), then the emulator and Redis."""
        for proc in list(self.workers):
            proc.process.stop(timeout_s=30)
        self.workers.clear()
        for extra in self.extra:
            extra.stop()
        if self.emulator_control is not None:
            self.emulator_control.close()
        if self.emulator is not None:
            self.emulator.stop()
        if self.redis is not None:
            self.redis.stop()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def upload_file(settings: Settings, path: Path) -> str:
    """Upload a local file to fal storage (the emulator's, or fal's) with our client; return its URL."""
    import asyncio

    from worker.fal import FalClient

    async def go() -> str:
        client = FalClient.from_settings(settings)
        try:
            return await client.upload_file(path)
        finally:
            await client.aclose()

    return asyncio.run(go())


def start_emulator(
    workdir: Path,
    *,
    concurrency: int = 4,
    processing_time_s: float = 1.0,
    extra_args: list[str] | None = None,
) -> tuple[ManagedProcess, str]:
    """Start ``python -m falemu`` on a free port and wait until it serves."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "falemu",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--concurrency",
        str(concurrency),
        "--processing-time-s",
        str(processing_time_s),
        *(extra_args or []),
    ]
    proc = spawn(f"emulator-{port}", argv, log_dir=workdir)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if not proc.alive():
            raise RuntimeError(f"emulator exited:\n{proc.log_tail()}")
        return httpx.get(f"{url}/_emulator/ledger", timeout=1).status_code == 200

    try:
        wait_until(up, timeout_s=60, what="fal emulator")
    except TimeoutError:
        proc.stop()
        raise RuntimeError(f"emulator did not start:\n{proc.log_tail()}") from None
    return proc, url


def start_cluster(
    workdir: Path,
    *,
    workers: int = 1,
    redis_url: str | None = None,
    fal_url: str | None = None,
    fal_key: str | None = None,
    emulator_concurrency: int = 4,
    emulator_processing_time_s: float = 1.0,
    emulator_args: list[str] | None = None,
    env: Mapping[str, str] | None = None,
    fal_webhook_secret: str | None = None,
) -> LocalCluster:
    """Start Redis (unless ``redis_url``), the emulator (unless ``fal_url``) and ``workers`` workers.

    With ``fal_webhook_secret``, fal's webhooks are the completion path (README, "fal webhooks"): a
    ``reframe serve`` is started before the workers (``api_url``), ``REFRAME_PUBLIC_URL`` points at
    it, ``REFRAME_WEBHOOK_SECRET`` is the secret and ``REFRAME_FAL_JWKS_URL`` the emulator's JWKS
    (``env`` may override any of them).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    redis_server = None if redis_url else start_redis(workdir / "redis")
    cluster = LocalCluster(
        workdir=workdir,
        redis_url=redis_url or (redis_server.url if redis_server else ""),
        fal_url="",
        env={},
        redis=redis_server,
    )
    try:
        if fal_url is None:
            cluster.emulator, fal_url = start_emulator(
                workdir,
                concurrency=emulator_concurrency,
                processing_time_s=emulator_processing_time_s,
                extra_args=emulator_args,
            )
            cluster.emulator_control = EmulatorControl(fal_url)
        cluster.fal_url = fal_url
        api_port = free_port() if fal_webhook_secret is not None else None
        webhook_env: dict[str, str] = {}
        if fal_webhook_secret is not None:
            webhook_env["REFRAME_PUBLIC_URL"] = f"http://127.0.0.1:{api_port}"
            webhook_env["REFRAME_WEBHOOK_SECRET"] = fal_webhook_secret
            if cluster.emulator:
                webhook_env["REFRAME_FAL_JWKS_URL"] = f"{fal_url}/.well-known/jwks.json"
        cluster.env = {
            "REFRAME_REDIS_URL": cluster.redis_url,
            "REFRAME_FAL_QUEUE_URL": fal_url,
            "REFRAME_FAL_REST_URL": fal_url if cluster.emulator else "https://rest.fal.ai",
            "REFRAME_FAL_CDN_URL": fal_url if cluster.emulator else "https://v3.fal.media",
            "FAL_KEY": fal_key or DEMO_FAL_KEY,
            # The emulator serves the media it stores on loopback: allow exactly that for fetches
            # (the guarded fetcher refuses loopback by default, worker/contracts/netguard.py).
            **({"REFRAME_FETCH_ALLOW": "127.0.0.1/32"} if cluster.emulator else {}),
            # finished outputs are copied into the cluster's own directory (worker/output_store.py)
            "REFRAME_OUTPUT_STORE_URL": f"file://{(workdir / 'outputs').resolve()}",
            **webhook_env,
            **dict(env or {}),
        }
        load_settings(cluster.env)  # fail fast, in this process, on a bad configuration
        if api_port is not None:  # fal's webhooks need their receiver up before the first submit
            cluster.api_url, _ = cluster.start_api(port=api_port)
        for _ in range(workers):
            cluster.start_worker()
    except BaseException:
        cluster.stop()
        raise
    return cluster


@contextlib.contextmanager
def local_cluster(workdir: Path, **kwargs: Any) -> Iterator[LocalCluster]:
    """Context-manager form of :func:`start_cluster`."""
    cluster = start_cluster(workdir, **kwargs)
    try:
        yield cluster
    finally:
        cluster.stop()
