"""A local S3-compatible server for tests and benchmarks: moto's ``moto_server`` (a dev
dependency) in a child process on a fixed port, spoken to over real HTTP like any S3 endpoint.

Its state is in memory: a restart (an outage and a recovery) starts empty, and :meth:`S3Server.start`
creates the bucket again.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from reframe.localproc import ManagedProcess, free_port, spawn, wait_until

BUCKET = "reframe-outputs"
ACCESS_KEY_ID = "test-access-key"
SECRET_ACCESS_KEY = "test-secret-key"  # noqa: S105 - a placeholder: moto accepts any credentials


def _moto_argv(port: int) -> list[str]:
    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    return [exe, "-H", "127.0.0.1", "-p", str(port)]


@dataclass
class S3Server:
    """One moto S3 server; ``port`` stays the same across :meth:`stop` and :meth:`start`."""

    workdir: Path
    port: int = field(default_factory=free_port)
    proc: ManagedProcess | None = None

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL."""
        return f"http://127.0.0.1:{self.port}"

    def env(self, prefix: str = "") -> dict[str, str]:
        """The REFRAME_OUTPUT_* settings that point the output store at this server."""
        return {
            "REFRAME_OUTPUT_STORE_URL": f"s3://{BUCKET}/{prefix}".rstrip("/"),
            "REFRAME_OUTPUT_S3_ENDPOINT": self.endpoint,
            "REFRAME_OUTPUT_S3_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "REFRAME_OUTPUT_S3_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
            "REFRAME_OUTPUT_S3_ALLOW_HTTP": "true",
        }

    def start(self) -> S3Server:
        """Start the server, wait until it answers, create the bucket."""
        self.proc = spawn(f"moto-{self.port}", _moto_argv(self.port), log_dir=self.workdir)

        def up() -> bool:
            try:
                return httpx.get(self.endpoint, timeout=1).status_code < 500
            except httpx.HTTPError:
                return False

        wait_until(up, timeout_s=30, interval_s=0.1, what="moto_server answers")
        httpx.put(f"{self.endpoint}/{BUCKET}", timeout=10).raise_for_status()  # moto: no auth needed
        return self

    def stop(self) -> None:
        """Stop the server (an outage: the port refuses connections)."""
        if self.proc is not None:
            self.proc.stop()
            self.proc = None
