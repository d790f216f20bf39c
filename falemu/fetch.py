"""Fetching a request's ``video_url``: http(s), ``data:`` URIs, or our own storage (read from disk)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote_to_bytes

import httpx

from falemu.storage import Storage


class FetchError(Exception):
    """The URL could not be turned into bytes; the message becomes the 422 ``msg``."""


@dataclass(frozen=True)
class Fetched:
    """An input on local disk, named by its content hash."""

    path: Path
    sha256: str
    size_bytes: int


async def fetch_input(
    url: str,
    *,
    storage: Storage,
    client: httpx.AsyncClient,
    inputs_dir: Path,
    max_bytes: int,
    timeout_s: float,
) -> Fetched:
    """Resolve ``url`` to a local file (content-addressed, so identical inputs share one file)."""
    own = storage.lookup_url(url) if url.lower().startswith(("http://", "https://")) else None
    if own is not None:
        # Uploads may be hundreds of MB: hash and link the stored file, never read it whole into memory.
        return await asyncio.to_thread(_store_own, own.path, inputs_dir, max_bytes)
    if url.lower().startswith("data:"):
        data = _decode_data_uri(url)
    else:
        data = await _download(url, client=client, max_bytes=max_bytes, timeout_s=timeout_s)
    if len(data) > max_bytes:
        raise FetchError(f"file is larger than the {max_bytes} byte limit")
    if not data:
        raise FetchError("the downloaded file is empty")
    return await asyncio.to_thread(_store, data, inputs_dir)


def _store_own(source: Path, inputs_dir: Path, max_bytes: int) -> Fetched:
    """One of our stored files as an input: size checked, hashed in chunks, hard-linked (blocking)."""
    try:
        size = source.stat().st_size
    except FileNotFoundError:
        raise FetchError("Failed to download file from URL: HTTP 404") from None
    if size > max_bytes:
        raise FetchError(f"file is larger than the {max_bytes} byte limit")
    if size == 0:
        raise FetchError("the downloaded file is empty")
    digest = hashlib.sha256()
    with source.open("rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
    sha = digest.hexdigest()
    path = inputs_dir / sha
    if not path.exists():
        tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        tmp.replace(path)
    return Fetched(path=path, sha256=sha, size_bytes=size)


def _store(data: bytes, inputs_dir: Path) -> Fetched:
    """Hash and write the input (blocking: run in a thread)."""
    sha = hashlib.sha256(data).hexdigest()
    path = inputs_dir / sha
    if not path.exists():
        tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")  # unique: two runners may store the same input
        tmp.write_bytes(data)
        tmp.replace(path)
    return Fetched(path=path, sha256=sha, size_bytes=len(data))


def _decode_data_uri(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise FetchError("malformed data URI (no comma)")
    try:
        if header.lower().endswith(";base64"):
            return base64.b64decode(payload, validate=False)
        return unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as exc:
        raise FetchError(f"malformed data URI: {exc}") from exc


async def _download(url: str, *, client: httpx.AsyncClient, max_bytes: int, timeout_s: float) -> bytes:
    try:
        async with client.stream("GET", url, timeout=timeout_s, follow_redirects=True) as response:
            if response.status_code != 200:
                raise FetchError(f"Failed to download file from URL: HTTP {response.status_code}")
            chunks: list[bytes] = []
            total = 0
            async for chunk in response.aiter_bytes():
                total += len(chunk)
                if total > max_bytes:
                    raise FetchError(f"file is larger than the {max_bytes} byte limit")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as exc:
        raise FetchError(f"Failed to download file from URL: {exc.__class__.__name__}") from exc
