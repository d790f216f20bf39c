"""One real cluster for the console tests: redis-server, the fal emulator, two workers and a
``reframe serve`` (which serves the console under ``/console``), as tests/api/conftest.py starts
them (``reframe/localcluster.py``). Keys are made with the real key store in Redis.

Tenants: ``ops`` (an admin key), ``acme`` and ``globex`` (enqueue + read keys), and a read-only
key of ``globex``. Webhooks are off, so an emulator ``drop`` after handling makes an ambiguous
submit that dead-letters (``REFRAME_AMBIGUOUS_SUBMIT_POLICY=dead_letter``, the default).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis

from reframe.api.keys import KeyStore
from reframe.demo import make_sample_video
from reframe.localcluster import LocalCluster, start_cluster, upload_file
from reframe.localproc import wait_until

pytestmark = pytest.mark.integration


@dataclass
class Console:
    """The running cluster, its API and the keys of the tests."""

    url: str
    cluster: LocalCluster
    redis: redis.Redis
    sample_url: str
    admin: str
    acme: str
    globex: str
    globex_reader: str

    def client(self, token: str) -> httpx.Client:
        """An API client with ``token`` as its bearer."""
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)

    def enqueue(self, token: str, **extra: Any) -> str:
        """Enqueue the sample clip (9:16 unless given) over the API; the job id."""
        body = {"video_url": self.sample_url, "aspect_ratio": "9:16", **extra}
        with self.client(token) as c:
            answer = c.post("/v1/jobs", json=body)
        assert answer.status_code == 201, answer.text
        job_id: str = answer.json()["id"]
        return job_id

    def job(self, job_id: str) -> dict[str, Any]:
        """The job as the admin sees it."""
        with self.client(self.admin) as c:
            found: dict[str, Any] = c.get(f"/v1/jobs/{job_id}").raise_for_status().json()
        return found

    def wait_state(self, job_id: str, states: set[str], timeout_s: float = 60) -> dict[str, Any]:
        """Poll the API until the job is in one of ``states`` (a deadline, never a bare sleep)."""
        seen: dict[str, Any] = {}

        def there() -> bool:
            seen.update(self.job(job_id))
            return seen["state"] in states

        wait_until(there, timeout_s=timeout_s, interval_s=0.1, what=f"job {job_id} in {sorted(states)}")
        return seen


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll until true (deadline)."""
    wait_until(predicate, timeout_s=timeout_s, interval_s=0.1, what=what)


@pytest.fixture(scope="package")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    """The package's cluster (about 10 s to start)."""
    workdir = tmp_path_factory.mktemp("console")
    cluster = start_cluster(
        workdir,
        workers=2,
        emulator_processing_time_s=1.0,
        env={
            "REFRAME_SUBMIT_RATE_PER_S": "100",
            "REFRAME_SUBMIT_BURST": "50",
            "REFRAME_MAX_CONCURRENCY": "6",
            "REFRAME_API_SSE_POLL_INTERVAL_S": "0.1",
            "REFRAME_API_RATE_PER_S": "1000",
            "REFRAME_API_RATE_BURST": "1000",
            "REFRAME_GRAFANA_URL": "http://grafana.invalid/d/reframe-cluster",
            # an ambiguous submit's slot is held for fal's sake; keep the tests' slots free
            "REFRAME_AMBIGUOUS_SLOT_HOLD_S": "1",
        },
    )
    try:
        sample = make_sample_video(workdir / "sample.mp4", duration_s=2.0, size="320x180")
        sample_url = upload_file(cluster.settings(), sample)
        url, _proc = cluster.start_api()
        r = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
        keys = KeyStore(r, prefix="reframe")
        yield Console(
            url=url,
            cluster=cluster,
            redis=r,
            sample_url=sample_url,
            admin=keys.create("ops", ["admin"], label="console tests")[0],
            acme=keys.create("acme", ["enqueue", "read"])[0],
            globex=keys.create("globex", ["enqueue", "read"])[0],
            globex_reader=keys.create("globex", ["read"])[0],
        )
        r.close()
    finally:
        cluster.stop()
