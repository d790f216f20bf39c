"""The output store against a real S3-compatible HTTP server (moto_server on a free port) and the
local-directory backend: byte-identical outputs, content-addressed keys, URLs that fetch, and a
retention cleanup that removes exactly what expired."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from config import load_settings
from reframe.localproc import wait_until
from tests.s3server import S3Server
from worker.output_ops import cleanup
from worker.output_store import OutputStore, from_settings, output_key, utcnow


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("moto")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> OutputStore:
    if request.param == "local":
        settings = load_settings({}, output_store_url=f"file://{tmp_path / 'outputs'}")
    else:
        server: S3Server = request.getfixturevalue("s3")
        env = server.env(prefix=f"run-{tmp_path.name}")
        settings = load_settings(env)
    built = from_settings(settings)
    assert built is not None
    return built


def fetch(url: str) -> bytes:
    if url.startswith("file://"):
        return Path(url.removeprefix("file://")).read_bytes()
    return httpx.get(url, timeout=30).raise_for_status().content


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_outputs_arrive_byte_identical_under_content_addressed_keys(
    store: OutputStore, tmp_path: Path
) -> None:
    # 7 MiB is past obstore's 5 MiB multipart chunk: the upload streams in parts from the file
    blobs = {"small": os.urandom(1000), "large": os.urandom(7 * 1024 * 1024)}
    for name, data in blobs.items():
        path = tmp_path / f"{name}.mp4"
        path.write_bytes(data)
        key = output_key("acme", sha(data))
        store.put_file(key, path)
        assert key == f"t/acme/{sha(data)}.mp4"
        head = store.head(key)
        assert head is not None and head.size == len(data)
        got = fetch(store.url(key, expires_s=60))
        assert sha(got) == sha(data)
    # the same bytes again are the same object; another tenant's are its own
    (tmp_path / "again.mp4").write_bytes(blobs["small"])
    store.put_file(output_key("acme", sha(blobs["small"])), tmp_path / "again.mp4")
    store.put_file(output_key("other", sha(blobs["small"])), tmp_path / "again.mp4")
    keys = sorted(o.key for o in store.objects())
    assert keys == sorted(
        [
            f"t/acme/{sha(blobs['small'])}.mp4",
            f"t/acme/{sha(blobs['large'])}.mp4",
            f"t/other/{sha(blobs['small'])}.mp4",
        ]
    )
    assert store.head(output_key("acme", "0" * 64)) is None


def test_presigned_url_is_signed_with_its_expiry(s3: S3Server, tmp_path: Path) -> None:
    built = from_settings(load_settings(s3.env(prefix="presign")))
    assert built is not None
    data = os.urandom(4096)
    path = tmp_path / "o.mp4"
    path.write_bytes(data)
    key = output_key("acme", sha(data))
    built.put_file(key, path)
    url = built.url(key, expires_s=120)
    assert "X-Amz-Signature=" in url and "X-Amz-Expires=120" in url
    assert sha(httpx.get(url, timeout=30).raise_for_status().content) == sha(data)
    # the expiry is the setting's (moto does not enforce expiries, so the URL's own fields are checked)
    assert "X-Amz-Expires=3600" in built.url(key, expires_s=3600)


def test_retention_cleanup_removes_exactly_what_expired(store: OutputStore, tmp_path: Path) -> None:
    old, new = os.urandom(2048), os.urandom(2048)
    (tmp_path / "old.mp4").write_bytes(old)
    (tmp_path / "new.mp4").write_bytes(new)
    old_key, new_key = output_key("t1", sha(old)), output_key("t1", sha(new))
    store.put_file(old_key, tmp_path / "old.mp4")
    first = store.head(old_key)
    assert first is not None
    # S3 stamps whole seconds: write the second object only once the clock is past the first's second
    wait_until(
        lambda: utcnow() >= first.last_modified + timedelta(seconds=1.1), timeout_s=5, what="a new second"
    )
    store.put_file(new_key, tmp_path / "new.mp4")
    second = store.head(new_key)
    assert second is not None and second.last_modified > first.last_modified
    retention_s = 3600.0
    # "now" is one retention after a moment between the two writes: only the first has expired
    between = first.last_modified + (second.last_modified - first.last_modified) / 2
    now = between + timedelta(seconds=retention_s)
    listed = cleanup(store, now=now, retention_s=retention_s, dry_run=True)
    assert [o.key for o in listed] == [old_key]
    assert {o.key for o in store.objects()} == {old_key, new_key}  # a dry run deletes nothing
    deleted = cleanup(store, now=now, retention_s=retention_s, dry_run=False)
    assert [o.key for o in deleted] == [old_key]
    assert {o.key for o in store.objects()} == {new_key}
    assert fetch(store.url(new_key, expires_s=60)) == new
