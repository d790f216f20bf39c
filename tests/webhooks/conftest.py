"""Fixtures for the webhook tests (issue #12): a real cluster whose submits ask the fal emulator for
webhooks, and the API (``reframe serve``, which includes ``reframe/api/fal_webhook.py``) on a real
socket receiving them. Judged by the emulator's ledger and by Redis.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from reframe.localcluster import LocalCluster, start_cluster
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
        cluster = start_cluster(
            tmp_path / f"cluster-{len(started)}",
            workers=workers,
            env={**BASE_ENV, "REFRAME_WEBHOOK_GRACE_S": "600", **(env or {})},
            fal_webhook_secret=WEBHOOK_SECRET,
            **kwargs,
        )
        started.append(cluster)
        assert cluster.api_url is not None
        return WebhookCluster(cluster, cluster.api_url)

    yield factory
    for cluster in started:
        cluster.stop()
