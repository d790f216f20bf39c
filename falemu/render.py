"""The real work: reframe a video to an aspect ratio with the ffmpeg binary from the imageio-ffmpeg wheel.

Output size rule: the output's long side is the source's long side capped at ``max_long_side`` (1280 by
default); the short side follows the requested ratio; both are rounded to even pixels (x264 with yuv420p
needs even sizes).

Placement (in output pixels): ``x_start/x_end`` and ``y_start/y_end`` give the edges of the source inside
the canvas (when only one pair is given, the other side keeps the source's aspect ratio);
``grid_position_x/y`` give the top-left corner of the fitted source; without either, the source is scaled
to fit and centred. Everything around it is a blurred, scaled copy of the source (our stand-in for Luma's
generative outpainting; ``prompt`` and ``image_url`` are accepted and ignored).

Renders run as asyncio subprocesses so the event loop keeps serving polls, at most ``workers`` at a time,
and are cached by (input sha256, parameters): benchmarks that submit one clip thousands of times pay once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from falemu.validation import ReframeInput


class RenderError(Exception):
    """The input could not be decoded or ffmpeg failed."""


@dataclass(frozen=True)
class VideoInfo:
    """What the renderer needs to know about a video."""

    width: int
    height: int
    duration_s: float


@dataclass(frozen=True)
class Layout:
    """Output canvas and where the (scaled) source goes on it."""

    out_w: int
    out_h: int
    fg_w: int
    fg_h: int
    fg_x: int
    fg_y: int


@dataclass(frozen=True)
class Rendered:
    """A finished render in the cache."""

    path: Path
    width: int
    height: int
    duration_s: float
    size_bytes: int


def _even(value: float) -> int:
    """Round to the nearest even integer, at least 2."""
    return max(2, round(value / 2) * 2)


def output_size(src_w: int, src_h: int, aspect_ratio: str, max_long_side: int) -> tuple[int, int]:
    """Output (width, height): long side = source long side capped, short side per ratio, both even."""
    num, den = (int(part) for part in aspect_ratio.split(":"))
    long_side = min(max(src_w, src_h), max_long_side)
    if num >= den:
        return _even(long_side), _even(long_side * den / num)
    return _even(long_side * num / den), _even(long_side)


def compute_layout(info: VideoInfo, params: ReframeInput, max_long_side: int) -> Layout:
    """Where the source goes on the output canvas (see the module docstring for the rules)."""
    out_w, out_h = output_size(info.width, info.height, params.aspect_ratio, max_long_side)
    scale = min(out_w / info.width, out_h / info.height)
    fg_w, fg_h = info.width * scale, info.height * scale
    has_x = params.x_start is not None and params.x_end is not None
    has_y = params.y_start is not None and params.y_end is not None
    if has_x:
        fg_w = float(params.x_end - params.x_start)  # type: ignore[operator]
    if has_y:
        fg_h = float(params.y_end - params.y_start)  # type: ignore[operator]
    if has_x and not has_y:
        fg_h = fg_w * info.height / info.width
    elif has_y and not has_x:
        fg_w = fg_h * info.width / info.height
    fg_w_i, fg_h_i = _even(fg_w), _even(fg_h)
    x = params.x_start if has_x else params.grid_position_x
    y = params.y_start if has_y else params.grid_position_y
    fg_x = x if x is not None else (out_w - fg_w_i) // 2
    fg_y = y if y is not None else (out_h - fg_h_i) // 2
    return Layout(out_w, out_h, fg_w_i, fg_h_i, fg_x, fg_y)


def filter_graph(layout: Layout) -> str:
    """ffmpeg filter: blurred cover-scaled background, the scaled source overlaid at its position."""
    w, h = layout.out_w, layout.out_h
    # boxblur fails when the radius exceeds a quarter of the (chroma) plane, so scale it with the canvas.
    radius = max(1, min(20, min(w, h) // 10))
    return (
        f"[0:v]split=2[bg][fg];"
        f"[bg]scale={w}:{h}:force_original_aspect_ratio=increase,crop={w}:{h},boxblur={radius}:2[bgb];"
        f"[fg]scale={layout.fg_w}:{layout.fg_h}[fgs];"
        f"[bgb][fgs]overlay={layout.fg_x}:{layout.fg_y},setsar=1,format=yuv420p[v]"
    )


def probe(path: Path) -> VideoInfo:
    """Width, height and duration of a video with PyAV (blocking, ~10 ms; call it in a thread)."""
    import av  # imported lazily: nothing heavy at package import

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise RenderError("the file has no video stream")
            stream = container.streams.video[0]
            width, height = int(stream.codec_context.width), int(stream.codec_context.height)
            duration = _duration_s(container, stream)
    except RenderError:
        raise
    except Exception as exc:  # av raises many error types for undecodable input
        raise RenderError(f"could not read the video: {exc.__class__.__name__}") from exc
    if width <= 0 or height <= 0:
        raise RenderError("the video has no frame size")
    return VideoInfo(width=width, height=height, duration_s=duration)


def _duration_s(container: object, stream: object) -> float:
    total = getattr(container, "duration", None)
    if total:
        return float(total) / 1_000_000
    duration, time_base = getattr(stream, "duration", None), getattr(stream, "time_base", None)
    if duration and time_base:
        return float(duration * time_base)
    return 0.0


def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary shipped by the imageio-ffmpeg wheel."""
    import imageio_ffmpeg

    return str(imageio_ffmpeg.get_ffmpeg_exe())


class RenderCache:
    """Renders keyed by (input sha256, parameters), with concurrent identical renders merged into one."""

    def __init__(
        self, cache_dir: Path, *, workers: int, preset: str, timeout_s: float, max_long_side: int
    ) -> None:
        self._dir = cache_dir
        self._dir.mkdir(parents=True, exist_ok=True)
        self._slots = asyncio.Semaphore(max(1, workers))
        self._preset = preset
        self._timeout_s = timeout_s
        self._max_long_side = max_long_side
        self._done: dict[str, Rendered] = {}
        self._inflight: dict[str, asyncio.Task[Rendered]] = {}
        self._probes: dict[str, VideoInfo] = {}

    async def info(self, src: Path, src_sha: str) -> VideoInfo:
        """Probe ``src`` once per content hash."""
        if src_sha not in self._probes:
            self._probes[src_sha] = await asyncio.to_thread(probe, src)
        return self._probes[src_sha]

    async def render(self, src: Path, src_sha: str, params: ReframeInput) -> Rendered:
        """The reframed MP4 for this input and these parameters, rendering it if not cached."""
        key = _cache_key(src_sha, params)
        if key in self._done:
            return self._done[key]
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._render(key, src, src_sha, params))
            self._inflight[key] = task
            task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        # shield: a cancelled request must not kill a render that other requests are waiting for.
        rendered = await asyncio.shield(task)
        self._done[key] = rendered
        return rendered

    async def _render(self, key: str, src: Path, src_sha: str, params: ReframeInput) -> Rendered:
        info = await self.info(src, src_sha)
        layout = compute_layout(info, params, self._max_long_side)
        out = self._dir / f"{key}.mp4"
        tmp = self._dir / f"{key}.{os.getpid()}.tmp.mp4"
        async with self._slots:
            await self._run_ffmpeg(src, tmp, layout)
        tmp.replace(out)  # atomic: a half-written file is never served
        out_info = await asyncio.to_thread(probe, out)
        return Rendered(
            path=out,
            width=out_info.width,
            height=out_info.height,
            duration_s=out_info.duration_s,
            size_bytes=out.stat().st_size,
        )

    async def truncated(self, rendered: Rendered, keep_s: float) -> Rendered:
        """A copy of ``rendered`` cut to its first ``keep_s`` seconds (the ``bad_output`` fault)."""
        out = self._dir / f"{rendered.path.stem}.cut{int(keep_s * 1000)}.mp4"
        if not out.exists():
            tmp = self._dir / f"{out.stem}.{os.getpid()}.tmp.mp4"
            argv = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", "-i"]
            argv += [
                str(rendered.path),
                "-t",
                f"{keep_s:.3f}",
                "-c",
                "copy",
                "-movflags",
                "+faststart",
                str(tmp),
            ]
            async with self._slots:
                await self._exec(argv, tmp)
            tmp.replace(out)
        info = await asyncio.to_thread(probe, out)
        return Rendered(
            path=out,
            width=info.width,
            height=info.height,
            duration_s=info.duration_s,
            size_bytes=out.stat().st_size,
        )

    async def _run_ffmpeg(self, src: Path, dst: Path, layout: Layout) -> None:
        argv = [
            ffmpeg_exe(),
            "-hide_banner",
            "-loglevel",
            "error",
            "-nostdin",
            "-y",
            "-i",
            str(src),
            "-filter_complex",
            filter_graph(layout),
            "-map",
            "[v]",
            "-map",
            "0:a?",
            "-c:v",
            "libx264",
            "-preset",
            self._preset,
            "-crf",
            "23",
            "-pix_fmt",
            "yuv420p",
            "-c:a",
            "aac",
            "-movflags",
            "+faststart",
            str(dst),
        ]
        await self._exec(argv, dst)

    async def _exec(self, argv: list[str], dst: Path) -> None:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        try:
            _, stderr = await asyncio.wait_for(proc.communicate(), timeout=self._timeout_s)
        except (TimeoutError, asyncio.CancelledError):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            dst.unlink(missing_ok=True)
            raise
        if proc.returncode != 0:
            dst.unlink(missing_ok=True)
            tail = stderr.decode(errors="replace").strip().splitlines()[-3:]
            raise RenderError("ffmpeg failed: " + " | ".join(tail))


def _cache_key(src_sha: str, params: ReframeInput) -> str:
    # video_url/prompt/image_url do not change the pixels we produce; the content hash stands for the video.
    relevant = {k: v for k, v in asdict(params).items() if k not in {"video_url", "prompt", "image_url"}}
    blob = src_sha + json.dumps(relevant, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
