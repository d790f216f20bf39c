"""Issue #14 items 1-3 end to end: real redis-server, real ``reframe worker`` processes, the fal
emulator over HTTP, and a real S3-compatible server (moto_server) for the output store.

* An S3 outage during a run, then SIGKILL of every worker while their jobs are SUCCEEDED and their
  copies pending (the interleaving "between success and copy"): once the store is back and a new
  worker runs, every output is in the bucket byte-identical to fal's file, every job has exactly
  one result event (carrying both locations), nothing was submitted or paid twice, and the pending
  copies were visible in the exporter's gauges meanwhile.
* The emulator returns a wrong-ratio and a truncated output for chosen jobs: exactly those are
  flagged with the measured numbers, the rest verify, and the ledger still reconciles with fal's
  usage export (the truncated output's charge corrected to its verified duration).

The judges are the emulator's ledger and usage export, Redis, and the bucket read with boto3.
"""

from __future__ import annotations

import hashlib
import json
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis

from producer import Producer
from reframe.localcluster import LocalCluster, upload_file
from reframe.localproc import wait_until
from tests.chaos.conftest import KEYS, distinct_inputs, new_tag, scrape_counter
from tests.s3server import S3Server, bucket_objects
from worker.contracts.usage import parse_usage

pytestmark = pytest.mark.integration


JOBS = 5
COPY_ENV = {
    "REFRAME_MAX_CONCURRENCY": "5",
    "REFRAME_OUTPUT_COPY_BACKOFF_CAP_S": "1",  # a recovered store is found within a second
    "REFRAME_OUTPUT_COPY_LEASE_S": "4",  # a killed copier's claims come back quickly
}


def gauge(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).raise_for_status().text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


def records(r: redis.Redis, ids: list[str]) -> dict[str, dict[str, str]]:
    return {job_id: r.hgetall(KEYS.job(job_id)) for job_id in ids}


def test_s3_outage_and_sigkill_between_success_and_copy_lose_and_repay_nothing(
    chaos_cluster: Callable[..., LocalCluster], whole_clip: Path, tmp_path: Path
) -> None:
    tag = new_tag("copy-outage")
    # started while the cluster picks its ports (so none takes the store's), then down from the
    # first copy on
    s3 = S3Server(tmp_path / "moto").start()
    cluster = chaos_cluster(workers=2, env={**COPY_ENV, **s3.env()})
    s3.stop()
    assert cluster.emulator_control is not None
    settings = cluster.settings()
    url = upload_file(settings, whole_clip)
    exporter = cluster.start_exporter()
    r = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    with Producer(settings) as producer:
        ids = [producer.enqueue(req, tenant="acme") for req in distinct_inputs(url, JOBS, tag)]
    try:
        # every job is paid for and SUCCEEDED, every copy failed against the dead store
        wait_until(
            lambda: all(
                rec.get("state") == "SUCCEEDED" and rec.get("output_copy") == "retrying"
                for rec in records(r, ids).values()
            ),
            timeout_s=90,
            what="every job SUCCEEDED with its copy retrying",
        )
        assert r.zcard(KEYS.outputs_pending) == JOBS
        assert not [f for _i, f in r.xrange(KEYS.events) if f.get("job_id") in ids]  # events wait
        wait_until(
            lambda: (
                gauge(exporter.metrics_url, "reframe_output_copies_pending") == JOBS
                and gauge(exporter.metrics_url, "reframe_output_copy_oldest_pending_age_seconds") > 0
            ),
            timeout_s=20,
            what="the exporter shows the pending copies",
        )
        failed_tries = sum(
            scrape_counter(w, 'reframe_output_copies_total{outcome="failed"}') for w in cluster.workers
        )
        assert failed_tries >= JOBS
        # SIGKILL every worker between success and copy; bring the store back; a new worker copies
        for proc in list(cluster.workers):
            cluster.kill_worker(proc, signal.SIGKILL)
        s3.start()
        cluster.start_worker()
        wait_until(
            lambda: all(rec.get("output_copy") == "copied" for rec in records(r, ids).values()),
            timeout_s=90,
            what="every output copied once the store is back",
        )
        recs = records(r, ids)
        bucket = bucket_objects(s3)
        for job_id, rec in recs.items():
            key = rec["output_key"]
            assert key == f"t/acme/{rec['output_sha256']}.mp4"
            stored = bucket[key]
            fal_bytes = httpx.get(json.loads(rec["result"])["video"]["url"], timeout=30).content
            assert (
                hashlib.sha256(stored).hexdigest()
                == hashlib.sha256(fal_bytes).hexdigest()
                == rec["output_sha256"]
            )
            assert rec["output_verify"] == "ok", rec["output_verification"]
        assert set(bucket) == {rec["output_key"] for rec in recs.values()}
        # one event per job, with both locations
        evs = [f for _i, f in r.xrange(KEYS.events) if f.get("job_id") in ids]
        assert Counter(f["job_id"] for f in evs) == dict.fromkeys(ids, 1)
        for f in evs:
            assert f["output_copy"] == "copied" and f["video_url"] and f["output_key"] in bucket
            assert "X-Amz-Signature=" in f["output_url"]
        # nothing submitted or paid twice: fal's ledger and ours
        book = cluster.emulator_control.ledger()
        assert sorted(book["submissions"].values()) == [1] * JOBS
        assert book["billed_requests"] == JOBS
        ours = [f for _i, f in r.xrange(KEYS.ledger) if f["job_id"] in ids]
        assert Counter(f["job_id"] for f in ours) == dict.fromkeys(ids, 1)
        assert all(f["kind"] == "settled" for f in ours)
        wait_until(
            lambda: gauge(exporter.metrics_url, "reframe_output_copies_pending") == 0,
            timeout_s=20,
            what="no pending copies left",
        )
        assert gauge(exporter.metrics_url, "reframe_output_copy_oldest_pending_age_seconds") == 0
    finally:
        r.close()
        s3.stop()


def test_wrong_ratio_and_truncated_outputs_are_flagged_with_measured_numbers(
    chaos_cluster: Callable[..., LocalCluster], whole_clip: Path
) -> None:
    tag = new_tag("verify")
    cluster = chaos_cluster(workers=1, env=COPY_ENV)
    control = cluster.emulator_control
    assert control is not None
    settings = cluster.settings()
    url = upload_file(settings, whole_clip)
    r = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    faults = {1: {"output": "ratio"}, 3: {"output": "truncate", "keep": 0.5}}
    ids: list[str] = []
    with Producer(settings) as producer:
        for i, request in enumerate(distinct_inputs(url, JOBS, tag, aspect_ratio="9:16")):
            if i in faults:  # consumed by the next accepted submit: this job's
                control.set_faults([{"op": "submit", "kind": "bad_output", **faults[i]}])
            job_id = producer.enqueue(request)
            ids.append(job_id)
            wait_until(
                lambda j=job_id: bool(r.hget(KEYS.job(j), "fal_request_id")), timeout_s=30, what="submitted"
            )
        wait_until(
            lambda: all(j and j.terminal for j in producer.get_many(ids)), timeout_s=90, what="all done"
        )
        jobs = {j.id: j for j in producer.get_many(ids) if j is not None}
    try:
        flagged = {job_id for job_id, job in jobs.items() if job.output_verify == "mismatch"}
        assert flagged == {ids[1], ids[3]}, {j: jobs[j].output_verification for j in ids}
        assert all(
            jobs[j].output_verify == "ok" and jobs[j].output_copy == "copied" for j in ids if j not in flagged
        )
        ratio = jobs[ids[1]].output_verification or {}
        assert ratio["width"] > ratio["height"], ratio  # 9:16 asked for, a landscape frame returned
        assert ratio["requested_aspect_ratio"] == "9:16" and abs(ratio["aspect_ratio"] - 16 / 9) < 0.02
        assert any("aspect ratio" in reason for reason in ratio["reasons"])
        cut = jobs[ids[3]].output_verification or {}
        assert cut["input_duration_s"] == pytest.approx(3.0, abs=0.05)
        assert cut["duration_s"] < 2.5 and any("duration" in reason for reason in cut["reasons"]), cut
        ok = jobs[ids[0]].output_verification or {}
        assert (
            ok["width"] < ok["height"]
            and ok["duration_s"] == pytest.approx(3.0, abs=0.2)
            and ok["codec"] == "h264"
        )
        # the events report the verification; the worker counted two mismatches
        evs = {f["job_id"]: f for _i, f in r.xrange(KEYS.events) if f.get("job_id") in ids}
        assert {j for j, f in evs.items() if f["output_verify"] == "mismatch"} == flagged
        assert json.loads(evs[ids[3]]["output_verification"])["duration_s"] == cut["duration_s"]
        worker = cluster.workers[0]
        assert scrape_counter(worker, 'reframe_output_verify_total{result="mismatch"}') == 2
        assert scrape_counter(worker, 'reframe_output_verify_total{result="ok"}') == JOBS - 2
        # settlement uses the verified duration: fal billed the cut file, and so does our ledger
        usage = parse_usage(httpx.get(f"{cluster.fal_url}/_emulator/usage.csv", timeout=10).text)
        fal_micro = {e.request_id: int(e.cost_micro) for e in usage}
        ours: Counter[str] = Counter()
        kinds: dict[str, list[str]] = {}
        for _i, f in r.xrange(KEYS.ledger):
            if f["job_id"] in ids:
                ours[f["request_id"]] += int(f["micro"])
                kinds.setdefault(f["job_id"], []).append(f["kind"])
        assert dict(ours) == fal_micro
        assert kinds[ids[3]] == ["settled", "correction"]
        assert all(kinds[j] == ["settled"] for j in ids if j != ids[3])
        assert jobs[ids[3]].cost_usd == pytest.approx(fal_micro[jobs[ids[3]].fal_request_id or ""] / 1e6)
    finally:
        r.close()
