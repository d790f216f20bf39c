"""Issue #12 observability, end to end: what the dashboard's "HTTP API" row and the webhook alerts
read. ``reframe serve`` counts fal's deliveries by outcome (``reframe_api_fal_webhooks_total``);
workers count each end of a fal request by the path that learned it
(``reframe_job_completions_total{via}``): a delivered webhook is ``via="webhook"``, a lost one that
the tracker reconciles after the grace is ``via="status"``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from producer import JobState, Producer
from tests.chaos.conftest import explained, new_tag
from tests.cluster.conftest import upload, wait_terminal
from tests.webhooks.conftest import WebhookCluster

pytestmark = pytest.mark.integration

Factory = Callable[..., WebhookCluster]


def scrape(url: str, name: str) -> dict[str, float]:
    """label value -> sample of the one-label counter ``name`` at ``url``/metrics."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                (value,) = sample.labels.values()
                out[value] = sample.value
    return out


def test_deliveries_and_completion_paths_are_counted(webhook_cluster: Factory, whole_clip: Path) -> None:
    grace_s = 4.0
    wc = webhook_cluster(workers=1, env={"REFRAME_WEBHOOK_GRACE_S": str(grace_s)})
    control = wc.cluster.emulator_control
    assert control is not None
    control.set_faults([{"op": "webhook", "kind": "drop", "times": 1}])  # the first webhook is lost
    url = upload(wc.cluster.settings(), whole_clip)
    (worker,) = wc.cluster.workers
    assert scrape(worker.metrics_url, "reframe_job_completions_total") == {"webhook": 0, "status": 0}
    hooks = "reframe_api_fal_webhooks_total"
    assert set(scrape(wc.api_url, hooks).values()) == {0}  # every outcome is born at 0
    ids: list[str] = []
    with Producer(wc.cluster.settings()) as p, explained(wc.cluster, ids):
        ids.append(p.enqueue({"video_url": url, "aspect_ratio": "9:16", "prompt": new_tag("lost")}))
        wait_terminal(p, ids, timeout_s=120)  # reconciled by the tracker after the grace
        ids += p.enqueue_many(
            [{"video_url": url, "aspect_ratio": "1:1", "prompt": f"{new_tag('hook')} {i}"} for i in range(2)]
        )
        wait_terminal(p, ids, timeout_s=120)
        assert [j.state for j in p.get_many(ids) if j is not None] == [JobState.SUCCEEDED] * 3
    book = wc.ledger()
    assert sorted(str(w.get("error")) for w in book["webhooks"]) == ["None", "None", "dropped"]
    assert scrape(worker.metrics_url, "reframe_job_completions_total") == {"webhook": 2, "status": 1}

    # A forged token, then a genuine URL without fal's signature: refused and counted, nothing else.
    genuine = next(w for w in book["webhooks"] if w["status"] == 204)
    forged = genuine["url"].split("?t=")[0] + "?t=job.1.bm90LW91cnM"
    assert httpx.post(forged, content=genuine["body"], timeout=5).status_code == 401
    assert httpx.post(genuine["url"], content=genuine["body"], timeout=5).status_code == 401
    # The genuine delivery again, as fal would retry it: recognised by its request id.
    headers = {k: v for k, v in genuine["headers"].items() if k.lower().startswith("x-fal-webhook-")}
    headers["content-type"] = "application/json"
    assert httpx.post(genuine["url"], content=genuine["body"], headers=headers, timeout=5).status_code == 204
    assert scrape(wc.api_url, hooks) == {
        "accepted": 2,
        "duplicate": 1,
        "rejected_token": 1,
        "rejected_signature": 1,
        "unavailable": 0,
        "disabled": 0,
    }
    assert scrape(worker.metrics_url, "reframe_job_completions_total") == {"webhook": 2, "status": 1}
