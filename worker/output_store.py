"""Durable storage of finished outputs: one interface, a local-directory and an S3-compatible backend.

Both backends are `obstore <https://developmental-seed.github.io/obstore>`_ stores (Rust's
``object_store`` crate): uploads stream from a file in multipart chunks (never the whole output in
memory), the S3 backend talks to any S3-compatible endpoint (AWS, GCS interop, R2, MinIO) and
signs GET URLs offline, and the local backend writes each object atomically (a temporary file
renamed into place). bench/outputs.py compares it with boto3 (README, "Output store").

Keys are content-addressed under the tenant: ``t/<tenant>/<sha256>.mp4``. The same bytes of one
tenant are one object, so a copy retried after a crash writes the same key again and nothing
is duplicated; two tenants never share an object.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import obstore
from obstore.exceptions import NotFoundError
from obstore.store import LocalStore, S3Store

from config import Settings

#: Multipart upload part size (S3's minimum) and parts uploaded at once per output.
PART_BYTES = 5 * 1024 * 1024
PARTS_IN_FLIGHT = 2
#: The tenant prefix of a job without a tenant.
NO_TENANT = "_"
_SAFE = re.compile(r"[^A-Za-z0-9._-]")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class OutputStoreError(Exception):
    """The store could not be reached or refused a call (the copy is retried later)."""


def output_key(tenant: str, sha256: str) -> str:
    """The content-addressed key of an output: ``t/<tenant>/<sha256>.mp4``."""
    if not _SHA256.fullmatch(sha256):
        raise ValueError("sha256 must be 64 lowercase hex digits")
    return f"t/{_SAFE.sub('_', tenant) or NO_TENANT}/{sha256}.mp4"


@dataclass(frozen=True)
class StoredObject:
    """One stored output: its key, size and when it was written."""

    key: str
    size: int
    last_modified: datetime


class OutputStore:
    """The output store of one backend (see :func:`from_settings`)."""

    def __init__(self, store: Any, *, kind: str, location: str, local_root: Path | None = None) -> None:
        self._store = store
        self.kind = kind
        """``local`` or ``s3``."""
        self.location = location
        """Where the store is, without credentials (``file:///…`` or ``s3://bucket/prefix``)."""
        self._root = local_root

    # ------------------------------------------------------------------ writing and reading
    def put_file(self, key: str, path: Path, *, content_type: str = "video/mp4") -> None:
        """Upload ``path`` under ``key`` (multipart, streamed from the file; atomic for readers)."""
        try:
            if self.kind == "s3":
                # S3's smallest part, two in flight: at most ~10 MiB of one output in memory per copy
                obstore.put(
                    self._store,
                    key,
                    path,
                    attributes={"Content-Type": content_type},
                    chunk_size=PART_BYTES,
                    max_concurrency=PARTS_IN_FLIGHT,
                )
            else:
                obstore.put(self._store, key, path)
        except Exception as exc:
            raise OutputStoreError(_reason(exc)) from exc

    def head(self, key: str) -> StoredObject | None:
        """The stored object under ``key``, or None when there is none."""
        try:
            meta = obstore.head(self._store, key)
        except NotFoundError:
            return None
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise OutputStoreError(_reason(exc)) from exc
        return StoredObject(
            key=str(meta["path"]), size=int(meta["size"]), last_modified=meta["last_modified"]
        )

    def url(self, key: str, *, expires_s: int) -> str:
        """A URL a consumer can GET: presigned for ``expires_s`` (S3), a ``file://`` URL (local)."""
        if self._root is not None:
            return (self._root / key).resolve().as_uri()
        try:
            return str(obstore.sign(self._store, "GET", key, timedelta(seconds=expires_s)))
        except Exception as exc:
            raise OutputStoreError(_reason(exc)) from exc

    # ------------------------------------------------------------------ retention
    def objects(self, prefix: str = "t/") -> list[StoredObject]:
        """Every stored output under ``prefix``."""
        out: list[StoredObject] = []
        try:
            for batch in obstore.list(self._store, prefix=prefix):
                for meta in batch:
                    out.append(
                        StoredObject(
                            key=str(meta["path"]), size=int(meta["size"]), last_modified=meta["last_modified"]
                        )
                    )
        except FileNotFoundError:
            return []
        except Exception as exc:
            raise OutputStoreError(_reason(exc)) from exc
        return out

    def expired(self, *, now: datetime, retention_s: float) -> list[StoredObject]:
        """The outputs written more than ``retention_s`` before ``now``."""
        cutoff = now - timedelta(seconds=retention_s)
        return [o for o in self.objects() if o.last_modified < cutoff]

    def delete(self, keys: list[str]) -> None:
        """Delete ``keys`` (a missing key is not an error)."""
        for key in keys:
            try:
                obstore.delete(self._store, key)
            except (NotFoundError, FileNotFoundError):
                continue
            except Exception as exc:
                raise OutputStoreError(_reason(exc)) from exc


def from_settings(settings: Settings) -> OutputStore | None:
    """The store ``REFRAME_OUTPUT_STORE_URL`` names; None when it is ``off``."""
    url = settings.output_store_url.strip()
    if url.lower() in {"", "off", "none"}:
        return None
    if url.startswith("file://"):
        root = Path(url.removeprefix("file://")).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        return OutputStore(
            LocalStore(root, mkdir=True), kind="local", location=root.as_uri(), local_root=root
        )
    if url.startswith("s3://"):
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        config: dict[str, Any] = {"region": settings.output_s3_region}
        if settings.output_s3_endpoint:
            config["endpoint"] = settings.output_s3_endpoint
        if settings.output_s3_access_key_id:
            config["access_key_id"] = settings.output_s3_access_key_id
        if settings.output_s3_secret_access_key is not None:
            config["secret_access_key"] = settings.output_s3_secret_access_key.get_secret_value()
        client = {
            "allow_http": settings.output_s3_allow_http,
            "connect_timeout": timedelta(seconds=5),
            "timeout": timedelta(seconds=settings.output_copy_timeout_s),
        }
        # obstore's own retries stay short: the copy outbox retries with backoff (worker/output_copy.py)
        retry = {"max_retries": 2, "retry_timeout": timedelta(seconds=20)}
        store = S3Store(
            bucket,
            prefix=prefix.strip("/") or None,
            config=config,  # type: ignore[arg-type]
            client_options=client,  # type: ignore[arg-type]
            retry_config=retry,  # type: ignore[arg-type]
        )
        return OutputStore(store, kind="s3", location=f"s3://{bucket}/{prefix.strip('/')}".rstrip("/"))
    raise ValueError("REFRAME_OUTPUT_STORE_URL must be file://DIR, s3://BUCKET[/PREFIX] or off")


def utcnow() -> datetime:
    """Now, timezone-aware (retention compares with the store's own timestamps)."""
    return datetime.now(UTC)


def _reason(exc: BaseException) -> str:
    # obstore's messages name the bucket and path, never credentials; keep the first line short
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:300]}"
