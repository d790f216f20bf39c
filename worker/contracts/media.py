"""Read a video's duration cheaply (container header only) through the guarded fetcher.

PyAV never opens a URL itself: it gets a seekable, read-only file object whose reads are HTTP
Range requests made by :class:`worker.contracts.netguard.GuardedFetcher` (checked, pinned, bounded), with a
cap on the total bytes read and one deadline for the whole probe. ``data:`` URIs are decoded
locally. Demuxers that open further resources (HLS, DASH, concat, image sequences, ...) cannot:
only plain container formats are allowed and every nested open is refused.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

import av

from worker.contracts.netguard import GuardedFetcher
from worker.contracts.quotes import MediaInfo

log = logging.getLogger(__name__)

BLOCK_BYTES = 256 * 1024
"""Size of one Range request (a fast-start MP4's header fits in the first one)."""

DEFAULT_PROBE_MAX_BYTES = 32 * 1024 * 1024
"""Most bytes one probe reads when the caller gives no limit (``REFRAME_PROBE_MAX_BYTES``)."""

# Plain containers only: no demuxer that follows references to other files or URLs.
ALLOWED_DEMUXERS = (
    "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,flv,mpegts,ogg,gif,image2pipe,png_pipe,jpeg_pipe,webp_pipe"
)
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class ProbeLimitExceeded(OSError):
    """The probe would read more bytes than allowed, or ran out of time."""


class RangeFile(io.RawIOBase):
    """A read-only, seekable view of a remote file made of HTTP Range requests.

    Blocks of :data:`BLOCK_BYTES` are fetched on demand through ``fetcher`` and kept; the total
    fetched may not pass ``max_total_bytes``. A server that ignores ``Range`` and answers 200 is
    accepted when the whole body fits in the limit. ``deadline`` is a ``clock()`` value.
    """

    def __init__(
        self,
        fetcher: GuardedFetcher,
        url: str,
        *,
        max_total_bytes: int,
        deadline: float,
        clock: Callable[[], float] = time.monotonic,
        block_bytes: int = BLOCK_BYTES,
    ) -> None:
        super().__init__()
        self._fetcher = fetcher
        self._url = url
        self._max_total_bytes = max_total_bytes
        self._deadline = deadline
        self._clock = clock
        self._block_bytes = block_bytes
        self._blocks: dict[int, bytes] = {}
        self._pos = 0
        self.bytes_fetched = 0
        self.requests = 0
        self.size = self._first_block()

    def _remaining_s(self) -> float:
        remaining_s = self._deadline - self._clock()
        if remaining_s <= 0:
            raise ProbeLimitExceeded("probe ran out of time")
        return remaining_s

    def _fetch(self, start: int, end: int) -> tuple[int, bytes, int | None]:
        budget = self._max_total_bytes - self.bytes_fetched
        if budget <= 0:
            raise ProbeLimitExceeded(f"probe would read more than {self._max_total_bytes} bytes")
        self.requests += 1
        result = self._fetcher.get_range(
            self._url, start, end, timeout_s=self._remaining_s(), max_bytes=budget
        )
        self.bytes_fetched += len(result.body)
        self._url = result.url  # later ranges skip redirects already followed (and checked)
        if result.status == 206:
            match = _CONTENT_RANGE.fullmatch(result.headers.get("content-range", "").strip())
            if match is None or int(match.group(1)) != start:
                raise OSError("server sent a malformed Content-Range")
            total = None if match.group(3) == "*" else int(match.group(3))
            return 206, result.body, total
        if result.status == 200:
            return 200, result.body, len(result.body)
        raise OSError(f"server answered HTTP {result.status}")

    def _first_block(self) -> int:
        status, body, total = self._fetch(0, self._block_bytes - 1)
        if status == 200:
            # Whole file in one answer: split it into blocks.
            for i in range(0, max(len(body), 1), self._block_bytes):
                self._blocks[i // self._block_bytes] = body[i : i + self._block_bytes]
            return len(body)
        self._blocks[0] = body
        if total is None:
            raise OSError("server did not say how large the file is")
        return total

    def _block(self, index: int) -> bytes:
        block = self._blocks.get(index)
        if block is None:
            start = index * self._block_bytes
            end = min(start + self._block_bytes, self.size) - 1
            status, block, _ = self._fetch(start, end)
            if status != 206:
                raise OSError("server stopped honouring Range requests")
            self._blocks[index] = block
        return block

    def readable(self) -> bool:
        """Always true."""
        return True

    def seekable(self) -> bool:
        """Always true."""
        return True

    def tell(self) -> int:
        """The current position."""
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move the position (``SEEK_SET``, ``SEEK_CUR``, ``SEEK_END``); no request is made."""
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise OSError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        """Fill ``buffer`` from the current position (fetching one block at most); 0 at the end."""
        if self._pos >= self.size:
            return 0
        index, offset = divmod(self._pos, self._block_bytes)
        block = self._block(index)
        view = memoryview(buffer).cast("B")
        count = min(len(view), len(block) - offset)
        if count <= 0:
            return 0
        view[:count] = block[offset : offset + count]
        self._pos += count
        return count


def decode_data_uri(url: str, *, max_bytes: int) -> bytes:
    """The payload of a ``data:`` URI (base64 or percent-encoded); :class:`ValueError` if malformed
    or over ``max_bytes``."""
    header, sep, payload = url.partition(",")
    if not sep:
        raise ValueError("malformed data: URI (no comma)")
    if header.lower().endswith(";base64"):
        if len(payload) * 3 // 4 > max_bytes:
            raise ValueError("data: URI is over the size limit")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("data: URI has invalid base64") from None
    else:
        data = unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise ValueError("data: URI is over the size limit")
    return data


def _refuse_nested_open(url: str, flags: int, options: dict[str, Any]) -> Any:
    raise PermissionError("the duration probe opens no further resources")


def _media_of(
    source: io.RawIOBase | io.BytesIO | io.BufferedReader,
    *,
    size_bytes: int | None,
    format: str | None = None,
) -> MediaInfo:
    """Duration and resolution from the container header (plain containers only, no nested opens)."""
    with av.open(
        source,
        mode="r",
        format=format,
        options={"format_whitelist": ALLOWED_DEMUXERS, "protocol_whitelist": "none"},
        io_open=_refuse_nested_open,
    ) as container:
        stream = container.streams.video[0] if container.streams.video else None
        duration_s: float | None = None
        if container.duration is not None:
            duration_s = float(container.duration) / 1_000_000
        elif stream is not None and stream.duration is not None and stream.time_base is not None:
            duration_s = float(stream.duration * stream.time_base)
        width = height = None
        if stream is not None:
            width, height = stream.codec_context.width or None, stream.codec_context.height or None
    return MediaInfo(duration_s=duration_s, size_bytes=size_bytes, width=width, height=height)


def _duration_of(source: io.RawIOBase | io.BytesIO, *, format: str | None = None) -> float | None:
    return _media_of(source, size_bytes=None, format=format).duration_s


def probe_media(
    url: str,
    *,
    fetcher: GuardedFetcher,
    timeout_s: float,
    max_bytes: int = DEFAULT_PROBE_MAX_BYTES,
    clock: Callable[[], float] = time.monotonic,
) -> MediaInfo:
    """Size, duration and resolution of the video at ``url`` (http(s) or ``data:``); None where unknown.

    The size is what the server says in its first Range answer (``Content-Range``), or the decoded
    payload of a ``data:`` URI, so it is known even for a file too large to read; the rest comes from
    the container header through ``fetcher``: at most ``max_bytes`` in total and ``timeout_s``
    overall. Never raises: a blocked URL, a timeout or a decode failure leaves fields None; the
    reason is logged without the URL.
    """
    deadline = clock() + timeout_s
    size: int | None = None
    try:
        if url[:5].lower() == "data:":
            data = decode_data_uri(url, max_bytes=max_bytes)
            size = len(data)
            return _media_of(io.BytesIO(data), size_bytes=size)
        with RangeFile(fetcher, url, max_total_bytes=max_bytes, deadline=deadline, clock=clock) as source:
            size = source.size
            return _media_of(source, size_bytes=size)
    except Exception as exc:  # noqa: BLE001 - any failure means "unknown"; the caller has a fallback
        log.info("could not read the video (%s: %s)", type(exc).__name__, _safe_reason(exc))
    return MediaInfo(size_bytes=size)


def video_duration_s(
    url: str,
    *,
    fetcher: GuardedFetcher,
    timeout_s: float,
    max_bytes: int = DEFAULT_PROBE_MAX_BYTES,
    clock: Callable[[], float] = time.monotonic,
) -> float | None:
    """Duration in seconds of the video at ``url`` (http(s) or ``data:``), or None when unknown.

    Reads only what the demuxer needs (the header of a fast-start MP4: usually one Range request)
    through ``fetcher``: :func:`probe_media`'s duration.
    """
    info = probe_media(url, fetcher=fetcher, timeout_s=timeout_s, max_bytes=max_bytes, clock=clock)
    return info.duration_s


class UnreadableVideo(ValueError):
    """A local file that is not a readable video; the message says why (never the contents)."""


def read_local_video(path: Path) -> MediaInfo:
    """Size, duration and resolution of a local video file, read here (container header only).

    The same restricted open as a URL's probe (plain containers, no nested opens), so a playlist or
    concat file cannot make PyAV read other files or URLs. Raises :class:`UnreadableVideo` for a
    file that is not a video with a video stream, :class:`OSError` when it cannot be opened.
    """
    size = path.stat().st_size
    with path.open("rb") as handle:
        try:
            info = _media_of(handle, size_bytes=size)
        except Exception as exc:  # noqa: BLE001 - PyAV raises many types for "not a video"
            raise UnreadableVideo(f"is not a readable video ({type(exc).__name__})") from None
    if info.width is None:
        raise UnreadableVideo("has no video stream")
    return info


@dataclass(frozen=True)
class ContainerInfo:
    """What a finished output's container says: duration, frame size and video codec."""

    duration_s: float | None
    width: int | None
    height: int | None
    codec: str
    size_bytes: int


def read_container(path: Path) -> ContainerInfo:
    """Duration, width, height and video codec of a local file (restricted open as above).

    Raises :class:`UnreadableVideo` when it is not a video with a video stream."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        try:
            with av.open(
                handle,
                mode="r",
                options={"format_whitelist": ALLOWED_DEMUXERS, "protocol_whitelist": "none"},
                io_open=_refuse_nested_open,
            ) as container:
                if not container.streams.video:
                    raise UnreadableVideo("has no video stream")
                stream = container.streams.video[0]
                duration_s: float | None = None
                if container.duration is not None:
                    duration_s = float(container.duration) / 1_000_000
                elif stream.duration is not None and stream.time_base is not None:
                    duration_s = float(stream.duration * stream.time_base)
                ctx = stream.codec_context
                return ContainerInfo(
                    duration_s=duration_s,
                    width=ctx.width or None,
                    height=ctx.height or None,
                    codec=str(ctx.name or ""),
                    size_bytes=size,
                )
        except UnreadableVideo:
            raise
        except Exception as exc:  # noqa: BLE001 - PyAV raises many types for "not a video"
            raise UnreadableVideo(f"is not a readable video ({type(exc).__name__})") from None


def _safe_reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason) if isinstance(reason, str) else type(exc).__name__
