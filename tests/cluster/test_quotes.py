"""Quotes agree with what the job is then charged; inputs over the model's limits never reach fal.

Real processes: redis-server, the fal emulator over HTTP, a worker and ``reframe serve``. The judges
are the job's settled cost in its record (``cost_actual_micro``), the emulator's ledger (billed
seconds and every submit it received) and the HTTP answers.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from producer import InvalidRequest, JobState, Producer
from reframe.api.keys import KeyStore
from reframe.demo import make_sample_video
from reframe.localcluster import LocalCluster
from tests.cluster.conftest import ClusterFactory, fingerprint_of, upload

pytestmark = pytest.mark.integration

PRICE_MICRO_PER_S = 60_000  # REFRAME_PRICE_PER_S_USD default 0.06


@pytest.fixture(scope="module")
def cluster(make_cluster: ClusterFactory) -> LocalCluster:
    """One worker and an emulator with 0.5 s jobs."""
    return make_cluster(workers=1, emulator_processing_time_s=0.5, env={"REFRAME_MAX_CONCURRENCY": "3"})


@pytest.fixture(scope="module")
def api_url(cluster: LocalCluster) -> str:
    """Base URL of a ``reframe serve`` in front of the cluster (stopped with it)."""
    url, _proc = cluster.start_api()
    return url


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory, sample_video: Path) -> dict[str, Path]:
    """The 2.5 s sample (with audio), a 3 s clip without audio and a 31 s clip (1 s over 30 s)."""
    root = tmp_path_factory.mktemp("quote-clips")
    return {
        "2.5s": sample_video,
        "3s": make_sample_video(root / "three.mp4", duration_s=3, size="320x180", audio=False),
        "31s": make_sample_video(root / "long.mp4", duration_s=31, size="64x36", audio=False),
    }


def ledger(cluster: LocalCluster) -> dict[str, Any]:
    assert cluster.emulator_control is not None
    return cluster.emulator_control.ledger()


def unique_input(url: str) -> dict[str, Any]:
    return {"video_url": url, "aspect_ratio": "9:16", "prompt": f"quote {uuid.uuid4().hex}"}


def settled_micro(cluster: LocalCluster, job_id: str) -> int:
    r = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    try:
        return int(r.hget(f"{{reframe}}:job:{job_id}", "cost_actual_micro") or -1)
    finally:
        r.close()


@pytest.mark.parametrize("name", ["2.5s", "3s"])
def test_quote_equals_the_settled_cost_and_the_emulators_bill(
    cluster: LocalCluster, clips: dict[str, Path], name: str
) -> None:
    url = upload(cluster.settings(), clips[name])
    with Producer(cluster.settings()) as p:
        q = p.quote(url)
        assert q.would_accept and q.fits_model_limits is True, q.reasons
        assert (q.width, q.height) == (320, 180) and q.size_bytes == clips[name].stat().st_size
        assert q.price_micro == 3 * PRICE_MICRO_PER_S  # 2.5 s and 3 s both bill 3 whole seconds
        billed_before = ledger(cluster)["billed_seconds"]
        job = p.wait(p.enqueue(unique_input(url)), timeout_s=60)
    assert job.state is JobState.SUCCEEDED, job.error
    billed_s = ledger(cluster)["billed_seconds"] - billed_before
    assert settled_micro(cluster, job.id) == q.price_micro
    assert round(billed_s * PRICE_MICRO_PER_S) == q.price_micro


def test_http_quote_is_the_same_function_for_the_keys_tenant(
    cluster: LocalCluster, api_url: str, clips: dict[str, Path]
) -> None:
    url = upload(cluster.settings(), clips["3s"])
    r = redis.Redis.from_url(cluster.redis_url)
    token, _ = KeyStore(r, prefix="reframe").create("quoted", ("enqueue", "read"))
    r.hset("{reframe}:tenant:quoted:limits", mapping={"daily_budget_usd": "0.1"})
    r.close()
    with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
        answer = c.post("/v1/quotes", json={"video_url": url, "aspect_ratio": "9:16"})
        unknown = c.post("/v1/quotes", json={"video_url": url, "aspect_ratio": "9:16", "bogus": 1})
    assert answer.status_code == 200, answer.text
    assert unknown.status_code == 422
    with Producer(cluster.settings()) as p:
        library = p.quote(url, tenant="quoted").model_dump(mode="json")
    got = answer.json()
    assert got["budget"]["tenant"] == "quoted" and got["budget"]["tenant_day_headroom_usd"] == 0.1
    assert got["fits_budget_now"] is False and got["would_accept"] is False  # $0.24 held > $0.10 left
    assert "over tenant quoted's day budget now: the job would wait BLOCKED" in got["reasons"]
    for field in ("price_micro", "estimate_micro", "duration_s", "size_bytes", "width", "height", "reasons"):
        assert got[field] == library[field], field


def test_input_over_the_duration_limit_never_reaches_fal(
    cluster: LocalCluster, clips: dict[str, Path]
) -> None:
    url = upload(cluster.settings(), clips["31s"])
    request = unique_input(url)
    expect = "lasts 31.0s; the model's limit REFRAME_MAX_VIDEO_DURATION_S allows 30s"
    with Producer(cluster.settings()) as p:
        q = p.quote(url)
        assert q.fits_model_limits is False and q.would_accept is False
        assert f"video_url {expect}" in q.reasons
        submits_before = len(ledger(cluster)["submits"])
        # REFRAME_ENQUEUE_PROBE_INPUT on: refused at enqueue, nothing written.
        with (
            Producer(cluster.settings(enqueue_probe_input=True)) as probing,
            pytest.raises(InvalidRequest) as info,
        ):
            probing.enqueue(request, idempotency_key=f"never-{uuid.uuid4().hex}")
        assert expect in str(info.value)
        # Off (the default): enqueued, and the submitter refuses it before any fal call.
        job = p.wait(p.enqueue(request), timeout_s=60)
    assert job.state is JobState.FAILED
    assert job.error is not None and job.error["type"] == "input_too_long"
    assert job.error["message"] == f"video_url: the video {expect}"
    book = ledger(cluster)
    assert len(book["submits"]) == submits_before
    assert book["submissions"].get(fingerprint_of(request), 0) == 0


def test_input_over_the_size_limit_never_reaches_fal(
    make_cluster: ClusterFactory, clips: dict[str, Path]
) -> None:
    small = make_cluster(workers=1, env={"REFRAME_MAX_UPLOAD_BYTES": "50000"})
    size = clips["2.5s"].stat().st_size
    assert size > 50_000
    url = upload(small.settings(max_upload_bytes=10**8), clips["2.5s"])
    request = unique_input(url)
    expect = f"is {size} bytes; the model's limit REFRAME_MAX_UPLOAD_BYTES allows 50000"
    with Producer(small.settings()) as p:
        assert f"video_url {expect}" in p.quote(url).reasons
        with (
            Producer(small.settings(enqueue_probe_input=True)) as probing,
            pytest.raises(InvalidRequest) as info,
        ):
            probing.enqueue(request)
        assert expect in str(info.value)
        job = p.wait(p.enqueue(request), timeout_s=60)
    assert job.state is JobState.FAILED
    assert job.error is not None and job.error["type"] == "input_too_large"
    assert job.error["message"] == f"video_url: the video {expect}"
    assert ledger(small)["submits"] == []


def test_http_enqueue_with_the_probe_on_refuses_before_writing(
    cluster: LocalCluster, clips: dict[str, Path]
) -> None:
    url = upload(cluster.settings(), clips["31s"])
    probing_url, _proc = cluster.start_api(env={"REFRAME_ENQUEUE_PROBE_INPUT": "true"})
    r = redis.Redis.from_url(cluster.redis_url)
    token, _ = KeyStore(r, prefix="reframe").create("probed", ("enqueue", "read"))
    jobs_before = len(r.zrange("{reframe}:tenant:probed:jobs", 0, -1))
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=probing_url, headers=headers, timeout=30) as c:
        one = c.post("/v1/jobs", json={"video_url": url, "aspect_ratio": "9:16"})
        batch = c.post("/v1/jobs/batch", json={"items": [{"video_url": url, "aspect_ratio": "1:1"}]})
    assert one.status_code == 422, one.text
    assert one.json()["errors"][0]["field"] == "video_url"
    assert "REFRAME_MAX_VIDEO_DURATION_S allows 30s" in one.json()["errors"][0]["message"]
    assert batch.status_code == 422 and batch.json()["errors"][0]["field"] == "items[0].video_url"
    assert len(r.zrange("{reframe}:tenant:probed:jobs", 0, -1)) == jobs_before == 0
    r.close()
