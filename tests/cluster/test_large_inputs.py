"""Large inputs (issue #14, item 5): a 300 MB local file goes to fal storage in parts with bounded memory
from ``reframe enqueue FILE`` and the job on it succeeds end to end; ``POST /v1/uploads`` streams a 120 MB
file the same way.

The file is a real (small, fast-start) MP4 followed by a ``free`` box of zeros up to the size: every reader
(PyAV, the worker's probe, the emulator's ffmpeg) skips the box, so a 300 MB job renders in a second, and
the padding is written sparse, so making the file is instant.

The model's limit ``REFRAME_MAX_UPLOAD_BYTES`` (100 MiB, worker/contracts/quotes.py) and the emulator's
``--max-input-bytes`` are raised to 400 MiB for this module only: a 300 MB input is otherwise refused
(before any upload) as the model refuses it.

Memory is measured, not assumed: the CLI runs under a parent that reports its peak RSS
(``getrusage(RUSAGE_CHILDREN).ru_maxrss``), once for a small clip and once for the 300 MB file; the API
process's ``VmHWM`` is read from ``/proc`` before and after an upload through it. An uploader that read
the file whole would add the file's size (300 MB, 120 MB) to the peak; the bound is 64 MiB.
"""

from __future__ import annotations

import math
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from config.settings import child_environment
from producer import Producer
from reframe.api.keys import KeyStore
from reframe.localcluster import LocalCluster
from reframe.localproc import wait_until
from tests.cluster.conftest import ClusterFactory, upload, wait_terminal

BIG_BYTES = 300 * 1000 * 1000  # the "300 MB"
LIMIT_BYTES = 400 * 1024 * 1024
PART_BYTES = 10 * 1024 * 1024  # REFRAME_FAL_MULTIPART_PART_BYTES's default (fal-client's)
#: The stated bound: uploading 300 MB may add at most this much to a process's peak RSS.
RSS_GROWTH_BOUND_BYTES = 64 * 1024 * 1024

# Runs argv as its only child and prints that child's peak RSS (KiB on Linux) as the last stdout line.
_PEAK_RSS = (
    "import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True); sys.exit(rc)"
)


def padded_video(clip: Path, path: Path, size_bytes: int) -> Path:
    """``clip`` (a fast-start MP4) plus one top-level ``free`` box of zeros, ``size_bytes`` in all (sparse)."""
    data = clip.read_bytes()
    pad = size_bytes - len(data)
    assert 8 <= pad < 2**32
    with path.open("wb") as out:
        out.write(data)
        out.write(struct.pack(">I4s", pad, b"free"))
        out.truncate(size_bytes)
    return path


#: Item 4 of the issue, what fal keeps: output media for this long (dedupe reuse must not outlive it).
EXPIRATION_S = 6


@pytest.fixture(scope="module")
def cluster(make_cluster: ClusterFactory) -> LocalCluster:
    return make_cluster(
        env={
            "REFRAME_MAX_UPLOAD_BYTES": str(LIMIT_BYTES),
            "REFRAME_FAL_STORE_IO": "false",
            "REFRAME_FAL_OUTPUT_EXPIRATION_S": str(EXPIRATION_S),
            "REFRAME_DEDUPE_RETENTION_S": str(EXPIRATION_S),
            # a copy still retried must find fal's file: the copy window stays inside the expiration
            "REFRAME_OUTPUT_COPY_WINDOW_S": str(EXPIRATION_S - 1),
        },
        emulator_args=["--max-input-bytes", str(LIMIT_BYTES)],
    )


@pytest.fixture(scope="module")
def big_video(sample_video: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = padded_video(sample_video, tmp_path_factory.mktemp("big") / "big.mp4", BIG_BYTES)
    yield path
    path.unlink(missing_ok=True)


def enqueue_measured(cluster: LocalCluster, path: Path) -> tuple[str, int, str]:
    """``reframe enqueue PATH``: (job id, the CLI's peak RSS in bytes, its stderr)."""
    argv = [
        sys.executable,
        "-c",
        _PEAK_RSS,
        sys.executable,
        "-m",
        "reframe",
        "enqueue",
        str(path),
        "-a",
        "9:16",
    ]
    done = subprocess.run(
        argv, check=False, env=child_environment(cluster.env), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.split()
    return lines[0], int(lines[-1]) * 1024, done.stderr


def part_puts(cluster: LocalCluster) -> list[dict[str, object]]:
    assert cluster.emulator_control is not None
    return [row for row in cluster.emulator_control.ledger()["requests"] if row["op"] == "upload_part"]


def test_a_300_mb_file_uploads_in_parts_with_bounded_memory_and_the_job_succeeds(
    cluster: LocalCluster, sample_video: Path, big_video: Path
) -> None:
    small_job, small_peak, _ = enqueue_measured(cluster, sample_video)
    assert part_puts(cluster) == []  # a small file goes in one request
    assert cluster.emulator_control is not None
    # fal storage fails two part PUTs (a 503, then a dropped connection): only those parts are sent again
    cluster.emulator_control.set_faults(
        [{"op": "upload_part", "kind": "http", "status": 503}, {"op": "upload_part", "kind": "drop"}]
    )

    job_id, big_peak, stderr = enqueue_measured(cluster, big_video)

    growth = big_peak - small_peak
    print(
        f"reframe enqueue peak RSS: {small_peak / 2**20:.0f} MiB (2.5 s clip), {big_peak / 2**20:.0f} MiB (300 MB)"
    )
    assert growth < RSS_GROWTH_BOUND_BYTES, f"peak RSS grew by {growth / 2**20:.0f} MiB for a 300 MB upload"
    assert "uploading big.mp4" in stderr  # the progress bar (stderr; stdout stays the job id)
    statuses = sorted(int(str(p["status"])) for p in part_puts(cluster))
    assert statuses == sorted([0, 503] + [200] * math.ceil(BIG_BYTES / PART_BYTES))

    with Producer(cluster.settings()) as producer:
        wait_terminal(producer, [small_job, job_id], timeout_s=120)
        job = producer.get(job_id)
        assert job is not None and job.state.value == "SUCCEEDED", job
        # the job's input is the assembled upload, all 300 MB of it
        head = httpx.get(str(job.input["video_url"]), headers={"Range": "bytes=0-0"})
        assert head.headers["content-range"] == f"bytes 0-0/{BIG_BYTES}"


def _peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(1024 * 1024):
            yield chunk


def test_the_http_upload_streams_a_large_file_with_bounded_memory(
    cluster: LocalCluster, sample_video: Path, tmp_path: Path
) -> None:
    # 120 MB: over the multipart threshold (100 MiB) and the RSS bound, at 40% of the 300 MB test's time.
    size_bytes = 120 * 1000 * 1000
    large = tmp_path / "large.bin"
    with large.open("wb") as out:
        out.truncate(size_bytes)
    api_url, api = cluster.start_api()
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        token, _ = KeyStore(client, prefix="reframe").create("uploader", ["enqueue"])
    finally:
        client.close()
    auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"}
    with httpx.Client(base_url=api_url, headers=auth, timeout=120) as http:
        warm = http.post("/v1/uploads", params={"filename": "small.mp4"}, content=sample_video.read_bytes())
        assert warm.status_code == 201, warm.text
        before = _peak_rss_bytes(api.pid)
        puts_before = len(part_puts(cluster))
        answer = http.post("/v1/uploads", params={"filename": "large.bin"}, content=_chunks(large))
    assert answer.status_code == 201, answer.text
    assert answer.json()["size_bytes"] == size_bytes
    growth = _peak_rss_bytes(api.pid) - before
    print(f"reframe serve peak RSS grew by {growth / 2**20:.1f} MiB for a 120 MB upload")
    assert growth < RSS_GROWTH_BOUND_BYTES
    assert len(part_puts(cluster)) - puts_before == math.ceil(size_bytes / PART_BYTES)
    head = httpx.get(answer.json()["url"], headers={"Range": "bytes=0-0"})
    assert head.headers["content-range"] == f"bytes 0-0/{size_bytes}"


def test_workers_ask_fal_to_keep_no_payloads_and_output_media_only_briefly(
    cluster: LocalCluster, sample_video: Path
) -> None:
    """REFRAME_FAL_STORE_IO=false and REFRAME_FAL_OUTPUT_EXPIRATION_S reach fal on the worker's submit, and
    the emulator shows their effect: no stored payloads, and the output is gone after the expiration."""
    assert cluster.emulator_control is not None
    url = upload(cluster.settings(), sample_video)
    with Producer(cluster.settings()) as producer:
        job_id = producer.enqueue({"video_url": url, "aspect_ratio": "1:1"})
        wait_terminal(producer, [job_id], timeout_s=60)
        job = producer.get(job_id)
    assert job is not None and job.state.value == "SUCCEEDED" and job.video_url and job.fal_request_id
    (submit,) = [
        s for s in cluster.emulator_control.ledger()["submits"] if s["request_id"] == job.fal_request_id
    ]
    assert submit["store_io"] is False and submit["output_expiration_s"] == EXPIRATION_S
    payloads = httpx.get(f"{cluster.fal_url}/_emulator/requests/{job.fal_request_id}/payloads")
    assert payloads.status_code == 404 and payloads.json()["store_io"] is False
    output = job.video_url
    wait_until(
        lambda: httpx.get(output).status_code == 404, timeout_s=EXPIRATION_S + 20, what="output media expired"
    )
