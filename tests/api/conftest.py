"""Fixtures for the HTTP API: a real cluster (redis-server, the fal emulator, a worker) and a real
``reframe serve`` process in front of it; keys are created with the real key store in Redis."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis

from config.settings import child_environment
from reframe.api.keys import KeyStore
from reframe.demo import make_sample_video
from reframe.localcluster import LocalCluster, start_cluster, upload_file
from reframe.localproc import ManagedProcess, wait_until

pytestmark = pytest.mark.integration


@dataclass
class Api:
    """A running ``reframe serve`` and what the tests need around it."""

    url: str
    cluster: LocalCluster
    process: ManagedProcess
    redis: redis.Redis
    keys: KeyStore
    sample_url: str

    def key(self, tenant: str, *scopes: str, **kwargs: Any) -> str:
        """A new token for ``tenant`` with ``scopes``."""
        token, _ = self.keys.create(tenant, scopes or ("enqueue", "read"), **kwargs)
        return token

    def client(self, token: str | None = None, **kwargs: Any) -> httpx.Client:
        """An HTTP client of the API, with the token as a bearer if given."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kwargs)

    def body(self, **extra: Any) -> dict[str, Any]:
        """A valid job body for the sample clip."""
        return {"video_url": self.sample_url, "aspect_ratio": "9:16", **extra}

    def settings_env(self) -> dict[str, str]:
        """The environment the server runs with."""
        return child_environment(self.cluster.env)


@pytest.fixture(scope="package")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One cluster with one worker and one ``reframe serve`` for the package's tests."""
    workdir = tmp_path_factory.mktemp("api")
    cluster = start_cluster(
        workdir,
        workers=1,
        emulator_processing_time_s=0.5,
        env={
            "REFRAME_SUBMIT_RATE_PER_S": "100",
            "REFRAME_SUBMIT_BURST": "50",
            "REFRAME_MAX_CONCURRENCY": "4",
            "REFRAME_API_MAX_BODY_BYTES": "65536",
            "REFRAME_MAX_UPLOAD_BYTES": "2000000",
            "REFRAME_API_SSE_POLL_INTERVAL_S": "0.1",
        },
    )
    try:
        sample = make_sample_video(workdir / "sample.mp4", duration_s=2.5, size="320x180")
        sample_url = upload_file(cluster.settings(), sample)
        url, proc = cluster.start_api()
        r = redis.Redis.from_url(cluster.redis_url)
        yield Api(url, cluster, proc, r, KeyStore(r, prefix="reframe"), sample_url)
        proc.stop()
        r.close()
    finally:
        cluster.stop()


def reframe_cli(api: Api, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the ``reframe`` CLI against the test cluster."""
    return subprocess.run(
        [sys.executable, "-m", "reframe", *args],
        check=False,
        env=api.settings_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def created_key_token(api: Api, *args: str) -> dict[str, Any]:
    """``reframe keys create --json ...`` and its parsed output."""
    done = reframe_cli(api, "keys", "create", "--json", *args)
    assert done.returncode == 0, done.stderr
    out: dict[str, Any] = json.loads(done.stdout)
    return out


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll until true (deadline, never a wall-clock assertion)."""
    wait_until(predicate, timeout_s=timeout_s, interval_s=0.1, what=what)
