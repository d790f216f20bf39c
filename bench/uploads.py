"""Uploads to fal storage (issue #14, item 5): throughput and the uploader's peak memory by file size and
parts in flight. Real processes (the fal emulator on loopback); prints a table; asserts nothing.

    python -m bench.uploads            # ~1 minute
    python -m bench uploads            # the same through the bench runner

Each upload runs in its own process (``FalClient.upload_file`` from the settings, as ``reframe enqueue``
and ``POST /v1/uploads`` call it), under a parent that reports its peak RSS
(``getrusage(RUSAGE_CHILDREN)``). Files are sparse (zeros): the disk is not what is measured. The
emulator writes every byte to disk (parts, then the assembled file), so on loopback the emulator, not
the client, is the bottleneck; against fal the network is.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.report import Parts, Row, load_average, parts_main
from config.settings import child_environment
from reframe.localcluster import start_emulator

MB = 1000 * 1000
MIB = 1024 * 1024

# The child uploads sys.argv[1] with the environment's settings and prints the upload's seconds; the parent
# then prints the child's peak RSS (KiB).
_CHILD = (
    "import sys, time; from pathlib import Path; from config import load_settings; "
    "from reframe.localcluster import upload_file; settings = load_settings(); t = time.perf_counter(); "
    "upload_file(settings, Path(sys.argv[1])); print(time.perf_counter() - t, flush=True)"
)
_UPLOAD = (
    "import resource, subprocess, sys; rc = subprocess.call([sys.executable, '-c', sys.argv[1], sys.argv[2]]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)"
)

#: (size in bytes, parts in flight; None = a single request)
CASES: list[tuple[int, int | None]] = [
    (1 * MB, None),
    (90 * MB, None),
    (300 * MB, 1),
    (300 * MB, 4),
    (300 * MB, 8),
]


def _upload(env: dict[str, str], path: Path) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one upload in its own process (the seconds exclude its start-up)."""
    done = subprocess.run(
        [sys.executable, "-c", _UPLOAD, _CHILD, str(path)], env=child_environment(env), capture_output=True,
        text=True, check=True, timeout=600,
    )  # fmt: skip
    seconds, peak_kib = done.stdout.split()[-2:]
    return float(seconds), int(peak_kib) / 1024


def bench_uploads(work: Path) -> list[Row]:
    emulator, url = start_emulator(work / "emulator", extra_args=["--max-input-bytes", str(400 * MIB)])
    base = {
        "REFRAME_FAL_QUEUE_URL": url,
        "REFRAME_FAL_REST_URL": url,
        "REFRAME_FAL_CDN_URL": url,
        "FAL_KEY": "bench:key",
    }
    rows: list[Row] = []
    try:
        baseline = None
        for size, parallel in CASES:
            path = work / f"upload-{size}.bin"
            with path.open("wb") as out:
                out.truncate(size)
            env = dict(base)
            if parallel is not None:
                env["REFRAME_FAL_MULTIPART_CONCURRENCY"] = str(parallel)
            seconds, peak_mib = _upload(env, path)
            path.unlink()
            baseline = peak_mib if baseline is None else baseline
            how = "one request" if parallel is None else f"10 MiB parts, {parallel} at once"
            rows.append(
                (
                    f"{size / MB:,.0f} MB, {how}",
                    f"{size / MB / seconds:,.0f} MB/s, peak RSS {peak_mib:.0f} MiB (+{peak_mib - baseline:.0f})",
                    "peak RSS within 64 MiB of a 1 MB upload's",
                )
            )
    finally:
        emulator.stop()
    rows.append(("load average (1/5 min)", load_average(), ""))
    return rows


PARTS: Parts = {"uploads": ("Uploads to fal storage (emulator on loopback)", bench_uploads)}

if __name__ == "__main__":
    raise SystemExit(parts_main("uploads", "Uploads to fal storage", PARTS))
