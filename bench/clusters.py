"""The local clusters the benchmarks start: one sample clip uploaded to the emulator, and the settings
that several scenarios share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reframe.demo import make_sample_video
from reframe.localcluster import LocalCluster, start_cluster, upload_file

#: A budget that never blocks a benchmark (the defaults would stop a long backlog after $100): the
#: budget is not what they measure.
BUDGET_ENV = {"REFRAME_BUDGET_DAILY_USD": "100000", "REFRAME_BUDGET_MONTHLY_USD": "1000000"}


def cluster_with_clip(work: Path, name: str, **kw: Any) -> tuple[LocalCluster, str]:
    """``start_cluster(work / name, **kw)`` and the fal storage URL of a 2 s 320x180 sample clip."""
    cluster = start_cluster(work / name, **kw)
    clip = make_sample_video(work / f"{name}.mp4", duration_s=2, size="320x180")
    return cluster, upload_file(cluster.settings(), clip)


def inflight_env(n: int) -> dict[str, str]:
    """Settings for ``n`` jobs at fal at once in one worker: N = ``n``, submits fast enough to get
    them there within seconds, a tracker that may follow them all, a budget that never blocks."""
    return {
        "REFRAME_MAX_CONCURRENCY": str(n),
        "REFRAME_SUBMIT_RATE_PER_S": "300",
        "REFRAME_SUBMIT_BURST": "100",
        "REFRAME_TRACKER_MAX_JOBS": str(2 * n),
        "REFRAME_WORKER_CONCURRENCY": "8",
        **BUDGET_ENV,
    }
