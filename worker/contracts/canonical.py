"""The canonical key of a job's input: what makes two requests "identical work".

``sha256`` over the normalised fal input without ``video_url`` (worker/contracts/dedupe.py
``canonical_params``) and one of:

* the **content hash** (SHA-256) of the video's bytes, for a ``data:`` URI (decoded) and for a file
  in fal storage (read whole through the guarded fetcher, at most ``REFRAME_MAX_UPLOAD_BYTES`` within
  ``REFRAME_DEDUPE_READ_TIMEOUT_S``): two uploads of the same file are the same work;
* for any other URL, the **URL plus its strong ETag**, from one ranged GET (``Range: bytes=0-0``,
  headers only) through the guarded fetcher: a strong ETag names one exact representation (RFC
  9110, 8.8.3). A weak ETag (``W/"..."``), none, or an unreadable source gives no key: that job
  goes without dedupe, and its record says why (``dedupe_key: none (no strong validator)``).

Nothing is cached in the process: every job computes its own key (the submitter stores it on the
record, so a job that looks again later keeps the key of what it first saw). The producer loads this
module on first use for quotes (docs/design.md): it imports no flow control.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from config import Settings
from worker.contracts.dedupe import NO_KEY_PREFIX, canonical_params
from worker.contracts.media import decode_data_uri
from worker.contracts.netguard import BlockedURL, GuardedFetcher, ResponseTooLarge

log = logging.getLogger(__name__)

#: Version of the key's recipe: a change of recipe must not match keys of the old one.
KEY_VERSION = "reframe-dedupe-v1"
#: A strong entity tag as RFC 9110 writes it: a quoted opaque string (no ``W/``), not empty.
_STRONG_ETAG = re.compile(r'^"[\x21\x23-\x7e\x80-\xff]{1,200}"$')
#: Hosts of fal's storage and CDN (uploads and outputs live under these).
FAL_STORAGE_SUFFIX = "fal.media"


@dataclass(frozen=True)
class CanonicalKey:
    """A job's canonical key, or why it has none."""

    value: str | None
    """64 hex characters, or None (no dedupe for this job)."""
    reason: str = ""
    basis: str = ""
    """``content`` (bytes hashed) or ``etag`` (URL plus strong ETag); '' without a key."""

    @property
    def stored(self) -> str:
        """The record's ``dedupe_key``: the key, or ``none (<why>)``."""
        return self.value if self.value else f"{NO_KEY_PREFIX} ({self.reason})"


def _key(params: str, video: str) -> str:
    return hashlib.sha256(f"{KEY_VERSION}\n{params}\n{video}".encode()).hexdigest()


def strong_etag(value: str | None) -> str | None:
    """``value`` when it is one strong entity tag, else None (weak, a list, empty, malformed)."""
    if value is None:
        return None
    value = value.strip()
    return value if _STRONG_ETAG.fullmatch(value) else None


def is_fal_storage(url: str, settings: Settings) -> bool:
    """True for a file in fal storage: a ``*.fal.media`` host, or the configured CDN's origin
    (``REFRAME_FAL_CDN_URL``; the emulator's in local clusters) under ``/files/``."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if host == FAL_STORAGE_SUFFIX or host.endswith("." + FAL_STORAGE_SUFFIX):
        return True
    cdn = urlsplit(settings.fal_cdn_url)
    return (
        parts.scheme.lower() == cdn.scheme.lower()
        and parts.netloc.lower() == cdn.netloc.lower()
        and parts.path.startswith("/files/")
    )


def canonical_key(
    fal_input: Mapping[str, Any], *, fetcher: GuardedFetcher, settings: Settings
) -> CanonicalKey:
    """The canonical key of ``fal_input`` (a ``ReframeInput.to_fal()`` dict); never raises."""
    url = str(fal_input.get("video_url") or "")
    params = canonical_params(fal_input)
    limit = settings.max_upload_bytes
    try:
        if url[:5].lower() == "data:":
            data = decode_data_uri(url, max_bytes=limit)
            return CanonicalKey(_key(params, "sha256:" + hashlib.sha256(data).hexdigest()), basis="content")
        if is_fal_storage(url, settings):
            digest = _hash_body(url, fetcher=fetcher, settings=settings)
            if digest is None:
                return CanonicalKey(None, "fal storage file unreadable")
            return CanonicalKey(_key(params, "sha256:" + digest), basis="content")
        etag = _etag_of(url, fetcher=fetcher, settings=settings)
    except ResponseTooLarge:
        return CanonicalKey(None, "input over REFRAME_MAX_UPLOAD_BYTES")
    except ValueError as exc:
        over = "size limit" in str(exc)
        return CanonicalKey(None, "input over REFRAME_MAX_UPLOAD_BYTES" if over else "malformed data: URI")
    except (BlockedURL, httpx.HTTPError, OSError) as exc:
        log.info("dedupe: input unreadable (%s)", type(exc).__name__)
        return CanonicalKey(None, f"input unreadable: {type(exc).__name__}")
    if etag is None:
        return CanonicalKey(None, "no strong validator")
    return CanonicalKey(_key(params, f"etag:{url}\n{etag}"), basis="etag")


def _hash_body(url: str, *, fetcher: GuardedFetcher, settings: Settings) -> str | None:
    """SHA-256 of the whole file at ``url`` (bounded); None unless the server answers 200."""
    digest = hashlib.sha256()
    timeout_s = settings.dedupe_read_timeout_s
    with fetcher.stream(url, timeout_s=timeout_s, max_bytes=settings.max_upload_bytes) as response:
        if response.status_code != 200:
            return None
        for chunk in response.iter_bytes():
            digest.update(chunk)
    return digest.hexdigest()


def _etag_of(url: str, *, fetcher: GuardedFetcher, settings: Settings) -> str | None:
    """The strong ETag of ``url`` from one ranged GET (headers only, the body is not read)."""
    headers = {"Range": "bytes=0-0", "Accept-Encoding": "identity"}
    with fetcher.stream(url, timeout_s=settings.probe_timeout_s, max_bytes=1, headers=headers) as response:
        if response.status_code not in (200, 206):
            return None
        return strong_etag(response.headers.get("etag"))


def result_served(url: str, *, fetcher: GuardedFetcher, settings: Settings) -> bool:
    """True when fal still serves a result file (a one-byte ranged GET answers 200 or 206): a result
    whose URL is gone (fal's CDN retention) is never reused."""
    headers = {"Range": "bytes=0-0", "Accept-Encoding": "identity"}
    try:
        with fetcher.stream(
            url, timeout_s=settings.probe_timeout_s, max_bytes=1, headers=headers
        ) as response:
            return response.status_code in (200, 206)
    except (BlockedURL, httpx.HTTPError, OSError):
        return False
