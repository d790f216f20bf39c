"""File storage standing in for fal's CDN (``v3.fal.media``) and REST storage: files live on local disk.

URLs have the shape ``{base}/files/{key}/{file_name}``; ``key`` is a uuid4 hex, so a URL of ours can be
recognised and read straight from disk (no HTTP loopback when a request's ``video_url`` points here).

A file may carry an expiry (fal's ``X-Fal-Object-Lifecycle-Preference``): past it the file is gone, for
good, as fal deletes expired media. Multipart uploads (``POST /files/upload/multipart``) keep every part
in its own file on disk and assemble them on ``complete``; nothing is held in memory.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

_FILE_PATH = re.compile(r"^/files/([0-9a-f]{32})/(.+)$")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class StoredFile:
    """A file we can serve."""

    key: str
    file_name: str
    content_type: str
    path: Path
    #: Unix seconds after which the file is gone (``None``: kept).
    expires_at: float | None = None

    def expired(self, now: float) -> bool:
        """True once the file's lifetime has passed."""
        return self.expires_at is not None and now >= self.expires_at

    @property
    def size_bytes(self) -> int:
        """Size on disk."""
        return self.path.stat().st_size


@dataclass
class MultipartUpload:
    """A multipart upload in progress: its parts are files in ``directory``; ``etags`` by part number."""

    key: str
    upload_id: str
    file_name: str
    content_type: str
    directory: Path
    expires_at: float | None = None
    etags: dict[int, str] = field(default_factory=dict)
    completed: StoredFile | None = None
    #: Held while the parts are assembled: a second ``complete`` waits for the first, then answers the same.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class MultipartError(Exception):
    """A ``complete`` the emulator refuses; the message is the 400 ``detail``."""


def safe_name(name: str | None, default: str = "upload.bin") -> str:
    """A file name safe to put in a URL path and on disk."""
    cleaned = _SAFE_NAME.sub("_", (name or "").rsplit("/", 1)[-1]).strip("._")
    return cleaned or default


class Storage:
    """Uploaded files, rendered outputs (aliases of cache files) and pending signed-URL uploads."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._root.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, StoredFile] = {}
        self._pending: dict[str, tuple[str, str, str]] = {}  # key -> (file_name, content_type, signature)
        self._tokens: dict[str, float] = {}  # CDN token -> expiry (unix s)
        self._multipart: dict[str, MultipartUpload] = {}  # upload id -> upload

    def new_path(self) -> tuple[str, Path]:
        """A fresh key and the path its bytes go to (the caller writes, then :meth:`register`)."""
        key = uuid.uuid4().hex
        return key, self._root / key

    def register(
        self, key: str, path: Path, file_name: str | None, content_type: str | None, expires_at: float | None
    ) -> StoredFile:
        """Serve the file written at ``path`` under ``key``."""
        stored = StoredFile(
            key, safe_name(file_name), content_type or "application/octet-stream", path, expires_at
        )
        self._files[key] = stored
        return stored

    def alias(
        self, path: Path, file_name: str, content_type: str, expires_at: float | None = None
    ) -> StoredFile:
        """Expose an existing file (a cached render) under a new key without copying it.

        Expiry removes the alias only: the cached render may back other requests' aliases.
        """
        key = uuid.uuid4().hex
        stored = StoredFile(key, safe_name(file_name), content_type, path, expires_at)
        self._files[key] = stored
        return stored

    def get(self, key: str) -> StoredFile | None:
        """The file stored under ``key``, if any and not expired (an expired one is forgotten)."""
        stored = self._files.get(key)
        if stored is not None and stored.expired(time.time()):
            del self._files[key]
            if stored.path.parent == self._root:  # our own copy (not a render alias): delete the bytes
                stored.path.unlink(missing_ok=True)
            return None
        return stored

    def initiate(self, file_name: str | None, content_type: str | None) -> tuple[str, str, str]:
        """Reserve a key for a signed-URL upload; returns (key, file_name, signature)."""
        key = uuid.uuid4().hex
        name = safe_name(file_name)
        signature = secrets.token_hex(16)
        self._pending[key] = (name, content_type or "application/octet-stream", signature)
        return key, name, signature

    def claim_pending(self, key: str, signature: str | None) -> tuple[str, str] | None:
        """Spend a signed upload URL: its (file_name, content_type), or None if unknown or forged."""
        pending = self._pending.get(key)
        if pending is None or signature is None or not secrets.compare_digest(pending[2], signature):
            return None
        del self._pending[key]
        return pending[0], pending[1]

    def path_for(self, key: str) -> Path:
        """Where the bytes of ``key`` go."""
        return self._root / key

    def issue_token(self, ttl_s: float) -> tuple[str, float]:
        """A CDN upload token and its expiry (unix seconds)."""
        token = secrets.token_urlsafe(24)
        expires = time.time() + ttl_s
        self._tokens[token] = expires
        return token, expires

    def token_valid(self, token: str) -> bool:
        """True for a token we issued that has not expired."""
        expiry = self._tokens.get(token)
        return expiry is not None and expiry > time.time()

    def lookup_url(self, url: str) -> StoredFile | None:
        """The stored file a URL of ours points at (any host: we may be reached by several names)."""
        match = _FILE_PATH.match(unquote(urlsplit(url).path))
        return self.get(match.group(1)) if match else None

    # ---- multipart ------------------------------------------------------------------------------------

    def start_multipart(
        self, file_name: str | None, content_type: str | None, expires_at: float | None
    ) -> MultipartUpload:
        """Open a multipart upload: a key for the final file and a directory for its parts."""
        key = uuid.uuid4().hex
        upload_id = secrets.token_hex(16)
        directory = self._root / f"{key}.parts"
        directory.mkdir()
        upload = MultipartUpload(
            key,
            upload_id,
            safe_name(file_name),
            content_type or "application/octet-stream",
            directory,
            expires_at,
        )
        self._multipart[upload_id] = upload
        return upload

    def multipart(self, key: str, upload_id: str) -> MultipartUpload | None:
        """The multipart upload ``upload_id`` of file ``key``, if any."""
        upload = self._multipart.get(upload_id)
        return upload if upload is not None and upload.key == key else None

    @staticmethod
    def part_path(upload: MultipartUpload, number: int) -> Path:
        """Where part ``number`` lives (written to a temporary name first, then renamed here)."""
        return upload.directory / f"{number:05d}"


def assemble(upload: MultipartUpload, parts: list[tuple[int, str]], target: Path) -> None:
    """Concatenate the listed parts (number, etag) into ``target`` (blocking: run in a thread).

    Raises :class:`MultipartError` unless every listed part was uploaded with that ETag, each number once.
    """
    if not parts:
        raise MultipartError("no parts listed")
    numbers = [n for n, _ in parts]
    if len(set(numbers)) != len(numbers):
        raise MultipartError("a part number is listed twice")
    for number, etag in parts:
        stored = upload.etags.get(number)
        if stored is None:
            raise MultipartError(f"part {number} was not uploaded")
        if stored.strip('"') != etag.strip('"'):
            raise MultipartError(f"part {number}: the ETag does not match the uploaded part")
    tmp = target.with_name(f"{target.name}.{uuid.uuid4().hex}.tmp")
    with tmp.open("wb") as out:
        for number in sorted(numbers):
            with Storage.part_path(upload, number).open("rb") as part:
                shutil.copyfileobj(part, out, 1024 * 1024)
    tmp.replace(target)
    shutil.rmtree(upload.directory, ignore_errors=True)


def file_url(base: str, stored: StoredFile) -> str:
    """The public URL of a stored file."""
    return f"{base}/files/{stored.key}/{quote(stored.file_name)}"
