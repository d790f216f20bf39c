"""The product's spine, end to end, with real processes: producer -> Redis -> Celery workers -> emulator.

The emulator's ledger is the judge of what reached "fal"; the job records and the result stream are
what a user sees.
"""

from __future__ import annotations

import http.server
import math
import signal
import threading
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import av
import httpx
import pytest
import redis

from producer import CancelOutcome, JobState, Producer
from reframe.localcluster import LocalCluster
from reframe.localproc import wait_until
from tests.cluster.conftest import ClusterFactory, fingerprint_of, upload, wait_terminal

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(make_cluster: ClusterFactory) -> LocalCluster:
    """Two workers, an emulator with 3 concurrent runners and 1 s of processing."""
    return make_cluster(
        workers=2,
        emulator_concurrency=3,
        emulator_processing_time_s=1.0,
        env={"REFRAME_MAX_CONCURRENCY": "3"},
    )


@pytest.fixture(scope="module")
def video_url(cluster: LocalCluster, sample_video: Path) -> str:
    """The sample clip uploaded to the emulator's storage."""
    return upload(cluster.settings(), sample_video)


@pytest.fixture
def producer(cluster: LocalCluster) -> Producer:
    """A producer on the cluster's Redis."""
    p = Producer(cluster.settings())
    yield p  # type: ignore[misc]
    p.close()


def unique_input(video_url: str, ratio: str = "9:16", **extra: Any) -> dict[str, Any]:
    """A request no other test sends (the prompt carries a nonce), so ledger counts are per test."""
    return {"video_url": video_url, "aspect_ratio": ratio, "prompt": f"test {uuid.uuid4().hex}", **extra}


def submissions(cluster: LocalCluster, request: dict[str, Any]) -> int:
    """How many times the emulator received a submit of exactly this input."""
    assert cluster.emulator_control is not None
    fp = fingerprint_of(request)
    return int(cluster.emulator_control.ledger()["submissions"].get(fp, 0))


def events_for(cluster: LocalCluster, job_id: str) -> list[dict[str, str]]:
    """Result-stream events of one job."""
    r = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    try:
        return [fields for _id, fields in r.xrange("{reframe}:events") if fields.get("job_id") == job_id]
    finally:
        r.close()


def probe(url: str, tmp_path: Path) -> tuple[int, int, float]:
    """Download and probe an output video: (width, height, seconds)."""
    path = tmp_path / "out.mp4"
    path.write_bytes(httpx.get(url, timeout=30).raise_for_status().content)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return stream.width, stream.height, float(container.duration or 0) / 1e6


@pytest.mark.parametrize("ratio", ["9:16", "1:1", "21:9"])
def test_enqueue_to_succeeded_with_a_real_reframed_video(
    cluster: LocalCluster, producer: Producer, video_url: str, tmp_path: Path, ratio: str
) -> None:
    request = unique_input(video_url, ratio)
    job_id = producer.enqueue(request, metadata={"case": ratio})
    job = producer.wait(job_id, timeout_s=60)
    assert job.state is JobState.SUCCEEDED, job.error
    assert job.video_url and job.fal_request_id
    width, height, seconds = probe(job.video_url, tmp_path)
    num, den = (int(x) for x in ratio.split(":"))
    assert width % 2 == 0 and height % 2 == 0
    assert abs(width / height - num / den) < 0.02, (width, height)
    assert abs(seconds - 2.5) < 0.15
    # fal bills whole seconds of output (REFRAME_BILLING_UNIT_S=1, the emulator's billing_unit_s=1)
    assert job.cost_usd == pytest.approx(math.ceil(seconds - 1e-3) * 0.06, abs=1e-9)
    assert submissions(cluster, request) == 1
    events = events_for(cluster, job_id)
    assert len(events) == 1
    assert (
        events[0]["state"] == "SUCCEEDED"
        and events[0]["v"] == "2"
        and events[0]["event_id"] == f"{job_id}.1"
        and events[0]["video_url"] == job.video_url
    )
    assert '"case"' in events[0]["metadata"]


def test_an_input_of_unreadable_duration_fails_before_any_fal_call(
    cluster: LocalCluster, producer: Producer, video_url: str
) -> None:
    # A well-formed URL whose video cannot be read: no reservation would be an upper bound, so the
    # job fails before fal is asked (REFRAME_UNKNOWN_DURATION_POLICY=refuse, the default).
    base = video_url.split("/files/", 1)[0]
    request = unique_input(f"{base}/files/{uuid.uuid4().hex}/no-such-file.mp4")
    job_id = producer.enqueue(request)
    job = producer.wait(job_id, timeout_s=60)
    assert job.state is JobState.FAILED
    assert job.error is not None and job.error["type"] == "duration_unknown"
    assert "video_url" in job.error["message"]
    assert submissions(cluster, request) == 0
    assert [e["state"] for e in events_for(cluster, job_id)] == ["FAILED"]


def test_fal_validation_error_fails_once_with_fals_message(
    cluster: LocalCluster, producer: Producer, video_url: str
) -> None:
    # fal accepts the request and its runner rejects the input: the request ends COMPLETED with an
    # error and the result replays fal's 422. What fal *said*: permanent, one submit, no retry.
    assert cluster.emulator_control is not None
    cluster.emulator_control.set_faults(
        [
            {
                "op": "submit",
                "kind": "runner_error",
                "error_type": "validation_error",
                "status": 422,
                "text": "video_url: the video could not be decoded",
                "times": 1,
            }
        ]
    )
    try:
        request = unique_input(video_url)
        job_id = producer.enqueue(request)
        job = producer.wait(job_id, timeout_s=60)
    finally:
        cluster.emulator_control.clear_faults()
    assert job.state is JobState.FAILED
    assert job.error is not None and job.error["type"] == "fal_validation", job.error
    assert "video_url" in job.error["message"]
    assert job.error.get("fal_detail"), "fal's own detail is kept"
    assert job.dead_letter_reason == "fal_validation"
    assert submissions(cluster, request) == 1
    assert [e["state"] for e in events_for(cluster, job_id)] == ["FAILED"]


def test_cancel_while_in_progress_reaches_fal(
    cluster: LocalCluster, producer: Producer, video_url: str
) -> None:
    assert cluster.emulator_control is not None
    cluster.emulator_control.configure(processing_time_s=30.0)
    try:
        job_id = producer.enqueue(unique_input(video_url))
        wait_until(
            lambda: producer.get(job_id).state is JobState.IN_PROGRESS,  # type: ignore[union-attr]
            timeout_s=30,
            what="job in progress",
        )
        request_id = producer.get(job_id).fal_request_id  # type: ignore[union-attr]
        assert producer.cancel(job_id) is CancelOutcome.REQUESTED
        job = producer.wait(job_id, timeout_s=30)
    finally:
        cluster.emulator_control.configure(processing_time_s=1.0)
    assert job.state is JobState.CANCELLED
    cancels = cluster.emulator_control.ledger()["cancels"]
    assert any(c["request_id"] == request_id for c in cancels)
    assert [e["state"] for e in events_for(cluster, job_id)] == ["CANCELLED"]


def test_cancel_before_submit_never_reaches_fal(make_cluster: ClusterFactory, sample_video: Path) -> None:
    # One slot, held by a long job: the second job waits for a slot, then is cancelled.
    small = make_cluster(
        workers=1,
        emulator_concurrency=1,
        emulator_processing_time_s=20.0,
        env={"REFRAME_MAX_CONCURRENCY": "1"},
    )
    url = upload(small.settings(), sample_video)
    with Producer(small.settings()) as p:
        blocker = p.enqueue(unique_input(url))
        wait_until(lambda: p.get(blocker).state.at_fal, timeout_s=30, what="blocker at fal")  # type: ignore[union-attr]
        waiting_request = unique_input(url)
        waiter = p.enqueue(waiting_request)
        wait_until(lambda: p.get(waiter).state is JobState.WAITING, timeout_s=30, what="waiter WAITING")  # type: ignore[union-attr]
        assert p.cancel(waiter) is CancelOutcome.CANCELLED
        assert p.get(waiter).state is JobState.CANCELLED  # type: ignore[union-attr]
        assert p.cancel(blocker) is CancelOutcome.REQUESTED
        wait_terminal(p, [blocker, waiter], timeout_s=30)
        assert submissions(small, waiting_request) == 0
        assert [e["state"] for e in events_for(small, waiter)] == ["CANCELLED"]


def test_idempotent_enqueue_makes_one_job_and_one_submission(
    cluster: LocalCluster, producer: Producer, video_url: str
) -> None:
    request = unique_input(video_url)
    key = f"order-{uuid.uuid4().hex}"
    ids = {producer.enqueue(request, idempotency_key=key) for _ in range(5)}
    assert len(ids) == 1
    job = producer.wait(ids.pop(), timeout_s=60)
    assert job.state is JobState.SUCCEEDED
    assert submissions(cluster, request) == 1


def test_same_task_delivered_twice_submits_once(
    cluster: LocalCluster, producer: Producer, video_url: str
) -> None:
    request = unique_input(video_url)
    job_id = producer.enqueue(request)
    # Deliver the same submit task four more times, as a broker redelivery would.
    for _ in range(4):
        key, message = producer.store.submit_message(job_id, producer.get(job_id).priority)  # type: ignore[union-attr]
        producer.r.lpush(key, message)
    job = producer.wait(job_id, timeout_s=60)
    assert job.state is JobState.SUCCEEDED
    assert submissions(cluster, request) == 1
    assert len(events_for(cluster, job_id)) == 1


def test_sigkill_mid_job_resumes_without_a_second_submission(
    make_cluster: ClusterFactory, sample_video: Path
) -> None:
    crashy = make_cluster(
        workers=1,
        emulator_concurrency=2,
        emulator_processing_time_s=6.0,
        env={"REFRAME_MAX_CONCURRENCY": "2"},
    )
    url = upload(crashy.settings(), sample_video)
    with Producer(crashy.settings()) as p:
        requests = [unique_input(url) for _ in range(2)]
        ids = p.enqueue_many(requests)
        wait_until(
            lambda: all(j is not None and j.state is JobState.IN_PROGRESS for j in p.get_many(ids)),
            timeout_s=30,
            what="jobs in progress",
        )
        crashy.kill_worker(crashy.workers[0], signal.SIGKILL)
        crashy.start_worker(name="replacement")
        wait_terminal(p, ids, timeout_s=90)
        jobs = p.get_many(ids)
    assert [j.state for j in jobs if j] == [JobState.SUCCEEDED, JobState.SUCCEEDED]
    for request in requests:
        assert submissions(crashy, request) == 1
    for job_id in ids:
        assert len(events_for(crashy, job_id)) == 1


def test_every_job_of_a_batch_has_exactly_one_result_event(
    cluster: LocalCluster, producer: Producer, video_url: str
) -> None:
    ids = producer.enqueue_many(
        [unique_input(video_url, ratio) for ratio in ["1:1", "4:3", "3:4", "9:21"] * 3]
    )
    wait_terminal(producer, ids, timeout_s=120)
    counts = Counter()
    r = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    for _id, fields in r.xrange("{reframe}:events"):
        counts[fields["job_id"]] += 1
    r.close()
    assert all(counts[j] == 1 for j in ids), {j: counts[j] for j in ids}
    assert all(j is not None and j.state is JobState.SUCCEEDED for j in producer.get_many(ids))


def test_input_longer_than_the_limit_fails_before_any_fal_call(
    make_cluster: ClusterFactory, sample_video: Path
) -> None:
    strict = make_cluster(workers=1, env={"REFRAME_MAX_VIDEO_DURATION_S": "2"})
    url = upload(strict.settings(), sample_video)  # 2.5 s
    with Producer(strict.settings()) as p:
        request = unique_input(url)
        job = p.wait(p.enqueue(request), timeout_s=60)
    assert job.state is JobState.FAILED
    assert job.error is not None and job.error["type"] == "input_too_long"
    assert "video_url" in job.error["message"]
    assert submissions(strict, request) == 0


class _StallFirstRequest(http.server.BaseHTTPRequestHandler):
    """Serves one video file; the very first request stalls (a worker is killed while it waits)."""

    video: bytes = b""
    stalled = threading.Event()
    release = threading.Event()

    def do_GET(self) -> None:
        if not _StallFirstRequest.stalled.is_set():
            _StallFirstRequest.stalled.set()
            _StallFirstRequest.release.wait(30)
            return
        self.send_response(200)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Content-Length", str(len(self.video)))
        self.end_headers()
        self.wfile.write(self.video)

    def log_message(self, *args: object) -> None:
        pass


def test_sigkill_while_a_job_is_held_unacked_loses_nothing(
    make_cluster: ClusterFactory, sample_video: Path
) -> None:
    # The worker is killed inside reframe.submit, before any fal call (reading the input's duration
    # for the budget estimate): the message is unacked, the job still QUEUED. kombu must hand the
    # message to the replacement after the visibility timeout, and the job must finish normally.
    _StallFirstRequest.video = sample_video.read_bytes()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StallFirstRequest)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cluster = make_cluster(workers=1, emulator_processing_time_s=0.2)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/clip.mp4"
        with Producer(cluster.settings()) as p:
            request = unique_input(url)
            job_id = p.enqueue(request)
            assert _StallFirstRequest.stalled.wait(30), "the worker never read the input"
            cluster.kill_worker(cluster.workers[0], signal.SIGKILL)
            assert p.get(job_id).state is JobState.QUEUED  # type: ignore[union-attr]
            cluster.start_worker(name="replacement")
            job = p.wait(job_id, timeout_s=120)
    finally:
        _StallFirstRequest.release.set()
        server.shutdown()
    assert job.state is JobState.SUCCEEDED, job.error
    assert submissions(cluster, request) == 1
    assert len(events_for(cluster, job_id)) == 1
