"""Streaming a local file to fal storage: the part plan, file bodies read chunk by chunk, progress.

The upload client (:meth:`worker.fal.client.FalClient.upload_file`) sends one request below
``REFRAME_FAL_MULTIPART_THRESHOLD_BYTES`` and fal's multipart upload above it (initiate, one PUT per
part, complete). Either way the bytes come from the file through :func:`file_body`, one chunk of
:data:`CHUNK_BYTES` at a time, so the memory an upload holds is bounded by the chunks in flight
(parts at once x one chunk), never by the file's size. A body is made afresh for every attempt, so
a retried part re-reads its own range of the file and nothing else.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

#: Bytes read from the file per step of a request body (the most one body holds at once).
CHUNK_BYTES = 1024 * 1024
#: Parts one multipart upload may have (S3's limit, which fal's storage follows).
MAX_PARTS = 10_000

OnProgress = Callable[[int, int], None]
"""Called with ``(bytes_sent, total_bytes)`` as an upload advances (it may go back when a part is retried)."""


@dataclass(frozen=True)
class Part:
    """One part of a multipart upload: fal's 1-based part number and the file range it carries."""

    number: int
    offset: int
    length: int


def plan_parts(size_bytes: int, part_bytes: int) -> list[Part]:
    """Split ``size_bytes`` into parts of ``part_bytes`` (the last one shorter), numbered from 1."""
    if part_bytes <= 0:
        raise ValueError("part_bytes must be positive")
    if size_bytes <= 0:
        return []
    return [
        Part(number=index + 1, offset=offset, length=min(part_bytes, size_bytes - offset))
        for index, offset in enumerate(range(0, size_bytes, part_bytes))
    ]


def part_size(size_bytes: int, wanted_bytes: int) -> int:
    """``wanted_bytes``, or larger when the file would need more than :data:`MAX_PARTS` parts of it."""
    return max(wanted_bytes, -(-size_bytes // MAX_PARTS))


class UploadProgress:
    """Bytes sent per part, summed for the caller's callback; a retried part starts again from 0.

    Runs on one event loop (the parts are coroutines of one upload), so it needs no lock.
    """

    def __init__(self, total_bytes: int, on_progress: OnProgress | None = None) -> None:
        self.total_bytes = total_bytes
        self._on_progress = on_progress
        self._sent: dict[int, int] = {}

    @property
    def sent_bytes(self) -> int:
        """Bytes handed to the transport so far (parts being retried count from their restart)."""
        return sum(self._sent.values())

    def advance(self, part: int, n: int) -> None:
        """``n`` more bytes of ``part`` were handed to the transport."""
        self._sent[part] = self._sent.get(part, 0) + n
        self._report()

    def restart(self, part: int) -> None:
        """``part`` is sent again from its first byte."""
        if self._sent.pop(part, 0):
            self._report()

    def _report(self) -> None:
        if self._on_progress is not None:
            self._on_progress(self.sent_bytes, self.total_bytes)


async def file_body(
    path: Path,
    offset: int,
    length: int,
    *,
    progress: UploadProgress | None = None,
    part: int = 0,
    chunk_bytes: int = CHUNK_BYTES,
) -> AsyncIterator[bytes]:
    """``length`` bytes of ``path`` from ``offset``, read one chunk at a time off the event loop.

    Raises ``OSError`` if the file shrank under us: a short body would be stored as the file.
    """
    if progress is not None:
        progress.restart(part)
    fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
    try:
        left = length
        position = offset
        while left > 0:
            chunk = await asyncio.to_thread(os.pread, fd, min(chunk_bytes, left), position)
            if not chunk:
                raise OSError(f"{path.name} is shorter than expected (changed during the upload)")
            left -= len(chunk)
            position += len(chunk)
            if progress is not None:
                progress.advance(part, len(chunk))
            yield chunk
    finally:
        os.close(fd)
