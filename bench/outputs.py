"""The output store (issue #14): which library copies outputs into S3 faster and leaner, and what the
copy adds between a job's completion and its published result. Prints tables; asserts nothing.

    python -m bench.outputs                  # every part (~2 minutes on 2 cores)
    python -m bench.outputs library          # obstore against boto3 only
    python -m bench outputs                  # the same through the bench runner

* **library**: 50 outputs of 12 MiB (a 720p clip of 10-20 s) uploaded in parallel (8 threads)
  to a real S3-compatible server (moto_server on a free port, restarted empty per library), once
  with obstore (``obstore.put`` from the file: multipart, streamed) and once with boto3
  (``upload_file``: its managed multipart transfer). Each library runs in a fresh child process
  that reports its own peak RSS (``VmHWM``) and the RSS it had before the copies; throughput is
  bytes over wall time. moto is a Python server, so absolute MB/s are the server's as much as the
  client's; the comparison is what this part is for.
* **latency**: a real cluster (Redis, 1 worker, the emulator; local store, then S3 on moto), 50
  jobs: per job the time from ``finished_at_ms`` (the terminal state, Redis time) to its event's
  stream id (Redis time of the ``XADD`` the copier's settle script made): what the copy adds
  before the result is published, p50 and p95; and the worker's peak RSS (``VmHWM``) over the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis

from bench.clusters import BUDGET_ENV, cluster_with_clip
from bench.report import Parts, Row, load_average, parts_main, pct, run_parts
from producer import Producer
from reframe.localproc import wait_until
from reframe.locals3 import ACCESS_KEY_ID, BUCKET, SECRET_ACCESS_KEY, S3Server

FILES = 50
FILE_BYTES = 12 * 1024 * 1024
THREADS = 8
JOBS = 50


def _status_kb(pid: int | str, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return 0.0


# ------------------------------------------------------------------ library: one child per library
def _child(library: str, endpoint: str, folder: str) -> None:
    """Upload every file of ``folder`` with ``library``; print JSON: seconds, bytes, RSS before/peak."""
    files = sorted(Path(folder).glob("*.bin"))
    if library == "obstore":  # exactly as the worker copies: worker/output_store.py
        from config import load_settings
        from worker.output_store import from_settings

        env = {
            "REFRAME_OUTPUT_STORE_URL": f"s3://{BUCKET}/bench",
            "REFRAME_OUTPUT_S3_ENDPOINT": endpoint,
            "REFRAME_OUTPUT_S3_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "REFRAME_OUTPUT_S3_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
            "REFRAME_OUTPUT_S3_ALLOW_HTTP": "true",
        }
        store = from_settings(load_settings(env))
        assert store is not None

        def put(path: Path) -> None:
            store.put_file(path.name, path)

    else:
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY,
            region_name="us-east-1",
        )

        def put(path: Path) -> None:
            client.upload_file(str(path), BUCKET, f"bench/{path.name}")

    before = _status_kb("self", "VmRSS")
    started = time.perf_counter()
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(put, files))
    seconds = time.perf_counter() - started
    size = sum(p.stat().st_size for p in files)
    peak = _status_kb("self", "VmHWM")
    print(json.dumps({"seconds": seconds, "bytes": size, "rss_before_kb": before, "rss_peak_kb": peak}))


def bench_library(work: Path) -> list[Row]:
    folder = work / "blobs"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(FILES):
        (folder / f"{i:03d}.bin").write_bytes(os.urandom(FILE_BYTES))
    rows: list[Row] = []
    for library in ("obstore", "boto3"):
        server = S3Server(work / f"moto-{library}").start()
        try:
            out = subprocess.run(
                [sys.executable, "-m", "bench.outputs", "--child", library, server.endpoint, str(folder)],
                check=True,
                capture_output=True,
                text=True,
                timeout=600,
            ).stdout
        finally:
            server.stop()
        got = json.loads(out.strip().splitlines()[-1])
        mb_s = got["bytes"] / 1e6 / got["seconds"]
        rows.append(
            (
                f"{library}: {FILES} x {FILE_BYTES >> 20} MiB, {THREADS} in parallel",
                f"{mb_s:.0f} MB/s; RSS {got['rss_before_kb'] / 1024:.0f} -> peak {got['rss_peak_kb'] / 1024:.0f} MB",
                f"load {load_average()}",
            )
        )
    return rows


# ------------------------------------------------------------------ latency: a real cluster
def _latency(work: Path, name: str, env: dict[str, str]) -> list[Row]:
    cluster, url = cluster_with_clip(
        work,
        name,
        workers=1,
        emulator_concurrency=8,
        emulator_processing_time_s=0.5,
        env={"REFRAME_MAX_CONCURRENCY": "16", "REFRAME_SUBMIT_RATE_PER_S": "100", **BUDGET_ENV, **env},
    )
    try:
        settings = cluster.settings()
        pid = cluster.workers[0].process.pid
        with Producer(settings) as producer:
            ids = [
                producer.enqueue({"video_url": url, "aspect_ratio": "9:16", "prompt": f"{name} {i}"})
                for i in range(JOBS)
            ]
            wait_until(
                lambda: all(j is not None and j.terminal for j in producer.get_many(ids)),
                timeout_s=300,
                interval_s=0.2,
                what="every job published",
            )
        r = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
        added_ms: list[float] = []
        mine = set(ids)
        for stream_id, fields in r.xrange("{reframe}:events"):
            if fields.get("job_id") in mine:
                added_ms.append(int(stream_id.split("-")[0]) - int(fields["finished_at_ms"]))
        copied = sum(r.hget(f"{{reframe}}:job:{j}", "output_copy") == "copied" for j in ids)
        r.close()
        peak_mb = _status_kb(pid, "VmHWM") / 1024
    finally:
        cluster.stop()
    return [
        (
            f"{name}: completion -> published, {copied}/{JOBS} copied",
            f"p50 {pct(added_ms, 0.5):.0f} ms, p95 {pct(added_ms, 0.95):.0f} ms",
            f"worker peak RSS {peak_mb:.0f} MB",
        )
    ]


def bench_latency(work: Path) -> list[Row]:
    rows = _latency(work, "local-store", {})
    server = S3Server(work / "moto-latency").start()
    try:
        rows += _latency(work, "s3-store", server.env())
    finally:
        server.stop()
    return rows


SCENARIOS: Parts = {
    "library": ("obstore vs boto3: 50 outputs into S3 in parallel", bench_library),
    "latency": ("What the copy adds before the result is published", bench_latency),
}


def bench_outputs(work: Path) -> list[Row]:
    """The ``outputs`` scenario of ``python -m bench``: every part."""
    return run_parts(work, SCENARIOS)


def main(argv: list[str] | None = None) -> int:
    args = list(argv if argv is not None else sys.argv[1:])
    if args[:1] == ["--child"]:
        _child(*args[1:4])
        return 0
    return parts_main("outputs", "Output store (issue #14)", SCENARIOS, args)


if __name__ == "__main__":
    raise SystemExit(main())
