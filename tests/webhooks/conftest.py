"""Fixtures for the webhook tests (issue #12): a real cluster whose submits ask the fal emulator for
webhooks, and the API (``reframe serve``, which includes ``reframe/api/fal_webhook.py``) on a real
socket receiving them. Judged by the emulator's ledger and by Redis.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from config.settings import child_environment
from reframe.localcluster import LocalCluster, start_cluster
from reframe.localproc import free_port, spawn, wait_until
from tests.chaos.conftest import BASE_ENV, chaos_cluster, whole_clip

__all__ = ["WebhookCluster", "chaos_cluster", "webhook_cluster", "whole_clip"]

WEBHOOK_SECRET = "webhook-test-secret"


@dataclass
class WebhookCluster:
    """A cluster plus the API that receives fal's webhooks."""

    cluster: LocalCluster
    api_url: str

    def ledger(self) -> dict[str, Any]:
        assert self.cluster.emulator_control is not None
        return self.cluster.emulator_control.ledger()


@pytest.fixture
def webhook_cluster(tmp_path: Path) -> Iterator[Callable[..., WebhookCluster]]:
    """Start a cluster with webhooks on (``env`` merged over the short limits; ``workers``)."""
    started: list[LocalCluster] = []

    def factory(*, workers: int = 1, env: dict[str, str] | None = None, **kwargs: Any) -> WebhookCluster:
        api_port = free_port()
        api_url = f"http://127.0.0.1:{api_port}"
        full_env = {
            **BASE_ENV,
            "REFRAME_PUBLIC_URL": api_url,
            "REFRAME_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "REFRAME_WEBHOOK_GRACE_S": "600",
            **(env or {}),
        }
        cluster = start_cluster(tmp_path / f"cluster-{len(started)}", workers=0, env=full_env, **kwargs)
        started.append(cluster)
        cluster.env["REFRAME_FAL_JWKS_URL"] = f"{cluster.fal_url}/.well-known/jwks.json"
        argv = [sys.executable, "-m", "reframe", "serve", "--host", "127.0.0.1", "--port", str(api_port)]
        api = spawn(f"api-{api_port}", argv, log_dir=cluster.workdir, env=child_environment(cluster.env))
        cluster.extra.append(api)

        def up() -> bool:
            if not api.alive():
                raise RuntimeError(f"api exited:\n{api.log_tail()}")
            try:
                return httpx.get(f"{api_url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, timeout_s=60, what="reframe serve")
        for _ in range(workers):
            cluster.start_worker()
        return WebhookCluster(cluster, api_url)

    yield factory
    for cluster in started:
        cluster.stop()
