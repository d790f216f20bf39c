"""File storage standing in for fal's CDN (``v3.fal.media``) and REST storage: files live on local disk.

URLs have the shape ``{base}/files/{key}/{file_name}``; ``key`` is a uuid4 hex, so a URL of ours can be
recognised and read straight from disk (no HTTP loopback when a request's ``video_url`` points here).
"""

from __future__ import annotations

import re
import secrets
import time
import uuid
from dataclasses import dataclass
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

    @property
    def size_bytes(self) -> int:
        """Size on disk."""
        return self.path.stat().st_size


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

    def put_bytes(self, data: bytes, file_name: str | None, content_type: str | None) -> StoredFile:
        """Store uploaded bytes under a new key."""
        key = uuid.uuid4().hex
        name = safe_name(file_name)
        path = self._root / key
        path.write_bytes(data)
        stored = StoredFile(key, name, content_type or "application/octet-stream", path)
        self._files[key] = stored
        return stored

    def alias(self, path: Path, file_name: str, content_type: str) -> StoredFile:
        """Expose an existing file (a cached render) under a new key without copying it."""
        key = uuid.uuid4().hex
        stored = StoredFile(key, safe_name(file_name), content_type, path)
        self._files[key] = stored
        return stored

    def get(self, key: str) -> StoredFile | None:
        """The file stored under ``key``, if any."""
        return self._files.get(key)

    def initiate(self, file_name: str | None, content_type: str | None) -> tuple[str, str, str]:
        """Reserve a key for a signed-URL upload; returns (key, file_name, signature)."""
        key = uuid.uuid4().hex
        name = safe_name(file_name)
        signature = secrets.token_hex(16)
        self._pending[key] = (name, content_type or "application/octet-stream", signature)
        return key, name, signature

    def complete(
        self, key: str, signature: str | None, data: bytes, content_type: str | None
    ) -> StoredFile | None:
        """Finish a signed-URL upload; None if the key or signature is unknown."""
        pending = self._pending.get(key)
        if pending is None or pending[2] != signature:
            return None
        del self._pending[key]
        name, reserved_type, _ = pending
        path = self._root / key
        path.write_bytes(data)
        stored = StoredFile(key, name, content_type or reserved_type, path)
        self._files[key] = stored
        return stored

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
        return self._files.get(match.group(1)) if match else None


def file_url(base: str, stored: StoredFile) -> str:
    """The public URL of a stored file."""
    return f"{base}/files/{stored.key}/{quote(stored.file_name)}"
