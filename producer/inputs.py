"""Reading a job's input from the producer's side: quotes, the enqueue probe and dedupe lookups.

Everything here reaches the network or decodes video, so this module loads httpx and PyAV;
:class:`producer.Producer` imports it on first use only, so ``import producer`` stays light
(tests/unit/test_packaging.py). URLs are read only through the guarded fetcher
(worker/contracts/netguard.py), as the submitter reads them.
"""

from __future__ import annotations

import threading
from pathlib import Path

from config import Settings
from worker.contracts.canonical import canonical_key
from worker.contracts.media import UnreadableVideo, probe_media, read_local_video
from worker.contracts.models import InvalidRequest, ReframeInput
from worker.contracts.netguard import GuardedFetcher
from worker.contracts.quotes import MediaInfo


class InputReader:
    """Reads inputs for one producer: one guarded fetcher, made on first use, closed with it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._fetcher: GuardedFetcher | None = None
        self._lock = threading.Lock()

    def fetcher(self) -> GuardedFetcher:
        """The guarded fetcher of this reader (made on first use)."""
        with self._lock:
            if self._fetcher is None:
                self._fetcher = GuardedFetcher.from_settings(self.settings)
            return self._fetcher

    def close(self) -> None:
        """Close the fetcher's connections, if it was made."""
        with self._lock:
            if self._fetcher is not None:
                self._fetcher.close()
                self._fetcher = None

    def probe(self, url: str) -> MediaInfo:
        """Size, duration and resolution of ``url`` through the guarded fetcher (None where unknown)."""
        s = self.settings
        return probe_media(
            url, fetcher=self.fetcher(), timeout_s=s.probe_timeout_s, max_bytes=s.probe_max_bytes
        )

    def canonical_key(self, request: ReframeInput) -> str | None:
        """The canonical key of ``request`` as the submitter computes it (worker/contracts/canonical.py),
        or None when the input gives none."""
        return canonical_key(request.to_fal(), fetcher=self.fetcher(), settings=self.settings).value

    @staticmethod
    def read_file(path: Path) -> MediaInfo:
        """A local video's facts, read here; :class:`InvalidRequest` naming ``video_url`` otherwise."""
        shown = repr(str(path))
        if not path.is_file():
            raise InvalidRequest([("video_url", f"{shown} is neither a URL nor an existing file")])
        try:
            if path.stat().st_size == 0:
                raise InvalidRequest([("video_url", f"{shown} is empty")])
            return read_local_video(path)
        except UnreadableVideo as exc:
            raise InvalidRequest([("video_url", f"{shown} {exc}")]) from None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise InvalidRequest([("video_url", f"{shown} is not readable ({reason})")]) from None
