"""Read a video's duration cheaply (container header only) for budget estimates and settlement."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def video_duration_s(url: str, *, timeout_s: float) -> float | None:
    """Duration of the video at ``url`` in seconds, or None when it cannot be read.

    PyAV opens the URL through ffmpeg's protocols and reads only the container header (the moov
    atom of a fast-start MP4), so this costs one or two HTTP range reads, not a download.
    """
    import av  # imported lazily: only workers that estimate budgets need it

    try:
        with av.open(url, timeout=(timeout_s, timeout_s)) as container:
            if container.duration is not None:
                return float(container.duration) / 1_000_000
            stream = container.streams.video[0] if container.streams.video else None
            if stream is not None and stream.duration is not None and stream.time_base is not None:
                return float(stream.duration * stream.time_base)
    except Exception as exc:  # noqa: BLE001 - any failure means "unknown"; the caller has a fallback
        log.info("could not read video duration (%s)", type(exc).__name__)
    return None
