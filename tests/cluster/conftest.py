"""Fixtures for whole-cluster tests: real redis-server, the fal emulator process, real workers.

Clusters are module-scoped (a worker takes ~1 s to start). Tests never flush Redis while workers
run (kombu keeps routing tables there); each test uses its own job ids instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from producer import Producer
from reframe.demo import make_sample_video
from reframe.localcluster import LocalCluster, start_cluster, upload_file
from reframe.localproc import wait_until
from worker.contracts.models import parse_input
from worker.contracts.urlpolicy import UrlPolicy

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def sample_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2.5 s 16:9 clip (320x180) made with the ffmpeg from the imageio-ffmpeg wheel."""
    return make_sample_video(tmp_path_factory.mktemp("media") / "sample.mp4", duration_s=2.5, size="320x180")


upload = upload_file  # the same helper the demo uses


ClusterFactory = Callable[..., LocalCluster]


@pytest.fixture(scope="module")
def make_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterFactory]:
    """Start clusters for a module; every one started is stopped at the end of the module."""
    started: list[LocalCluster] = []

    def factory(**kwargs: Any) -> LocalCluster:
        env = {
            # Short limits so a SIGKILLed worker's unacked messages come back within the test's deadlines.
            "REFRAME_TASK_SOFT_TIME_LIMIT_S": "20",
            "REFRAME_TASK_TIME_LIMIT_S": "30",
            "REFRAME_VISIBILITY_TIMEOUT_S": "40",
            "REFRAME_TRACKER_CLAIM_TTL_S": "3",
            "REFRAME_SLOT_LEASE_TTL_S": "6",
            "REFRAME_SUBMIT_RATE_PER_S": "100",
            "REFRAME_SUBMIT_BURST": "50",
            **kwargs.pop("env", {}),
        }
        cluster = start_cluster(tmp_path_factory.mktemp("cluster"), env=env, **kwargs)
        started.append(cluster)
        return cluster

    yield factory
    for cluster in started:
        cluster.stop()


def wait_terminal(producer: Producer, job_ids: list[str], timeout_s: float = 60) -> None:
    """Wait (with a deadline) until every job is terminal."""
    wait_until(
        lambda: all(j is not None and j.terminal for j in producer.get_many(job_ids)),
        timeout_s=timeout_s,
        interval_s=0.1,
        what=f"{len(job_ids)} jobs terminal",
    )


def submits_for(ledger: dict[str, Any], request_ids: set[str] | None = None) -> list[dict[str, Any]]:
    """The ledger's submit entries (optionally only those of the given fal request ids)."""
    subs = list(ledger.get("submits", []))
    return [s for s in subs if request_ids is None or s.get("request_id") in request_ids]


#: The local clusters serve media from the emulator on loopback, which they allow for fetches.
LOOPBACK_POLICY = UrlPolicy.from_spec("127.0.0.1/32")


def fingerprint_of(request: dict[str, Any]) -> str:
    """The emulator ledger's fingerprint of a request (the input as fal receives it)."""
    return parse_input(request, url_policy=LOOPBACK_POLICY).fingerprint()
