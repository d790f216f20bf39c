"""FalClient's submit headers (what fal keeps) and its streamed, multipart uploads, against
httpx.MockTransport (pure client logic: part plan, per-part retries, the parallelism bound, refusals)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from config import load_settings
from tests.unit.test_fal_client import KEY, MODEL, QUEUE, Recorder, js, submit_body, token_reply
from worker.fal import FalClient, FalPermanentError, FalTransientError
from worker.fal.client import submit_headers
from worker.fal.upload import MAX_PARTS, Part, UploadProgress, file_body, part_size, plan_parts

CDN = "https://v3.fal.test"
PART = 64 * 1024


def test_plan_parts_covers_the_file_once_in_order() -> None:
    assert plan_parts(0, 10) == []
    assert plan_parts(10, 10) == [Part(1, 0, 10)]
    assert plan_parts(25, 10) == [Part(1, 0, 10), Part(2, 10, 10), Part(3, 20, 5)]
    with pytest.raises(ValueError, match="positive"):
        plan_parts(5, 0)


def test_a_file_too_large_for_max_parts_gets_larger_parts() -> None:
    wanted = 10 * 1024 * 1024
    assert part_size(300 * 1000 * 1000, wanted) == wanted
    huge = 200 * 1024**3  # 200 GiB: 20,480 parts of 10 MiB
    assert len(plan_parts(huge, part_size(huge, wanted))) == MAX_PARTS


def test_file_body_streams_its_range_and_restarts_progress(tmp_path: Path) -> None:
    f = tmp_path / "f.bin"
    data = os.urandom(10_000)
    f.write_bytes(data)
    seen: list[tuple[int, int]] = []
    progress = UploadProgress(len(data), lambda sent, total: seen.append((sent, total)))

    async def read() -> list[bytes]:
        return [
            chunk async for chunk in file_body(f, 1000, 5000, progress=progress, part=2, chunk_bytes=2048)
        ]

    first = asyncio.run(read())
    assert [len(c) for c in first] == [2048, 2048, 904] and b"".join(first) == data[1000:6000]
    assert seen[-1] == (5000, 10_000)
    asyncio.run(read())  # a retry of the same part starts again from 0 instead of counting twice
    assert seen[-1] == (5000, 10_000) and (0, 10_000) in seen


def test_submit_headers_follow_the_settings() -> None:
    assert submit_headers(store_io=True, output_expiration_s=None) == {}
    assert submit_headers(store_io=False, output_expiration_s=86400) == {
        "X-Fal-Store-IO": "0",
        "X-Fal-Object-Lifecycle-Preference": '{"expiration_duration_seconds":86400}',
    }


@pytest.mark.parametrize("store_io", [True, False])
def test_every_submit_carries_what_fal_should_keep(store_io: bool) -> None:
    env = {
        "REFRAME_FAL_QUEUE_URL": QUEUE,
        "FAL_KEY": KEY,
        "REFRAME_FAL_STORE_IO": str(store_io).lower(),
        "REFRAME_FAL_OUTPUT_EXPIRATION_S": "90000",
    }
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return js(200, submit_body())

    async def go() -> None:
        async with FalClient.from_settings(load_settings(env), transport=httpx.MockTransport(handler)) as c:
            await c.submit({"video_url": "https://x.test/v.mp4", "aspect_ratio": "9:16"})

    asyncio.run(go())
    headers = seen[0].headers
    assert json.loads(headers["x-fal-object-lifecycle-preference"]) == {"expiration_duration_seconds": 90000}
    assert headers.get("x-fal-store-io") == (None if store_io else "0")


def test_an_expiration_shorter_than_dedupe_reuse_is_refused() -> None:
    with pytest.raises(ValueError, match="REFRAME_FAL_OUTPUT_EXPIRATION_S must be >= REFRAME_DEDUPE"):
        load_settings({"REFRAME_FAL_OUTPUT_EXPIRATION_S": "3600"})
    both = {"REFRAME_FAL_OUTPUT_EXPIRATION_S": "3600", "REFRAME_DEDUPE_RETENTION_S": "3600"}
    # the output store's copies are retried for REFRAME_OUTPUT_COPY_WINDOW_S: fal's file must outlive that
    with pytest.raises(
        ValueError, match="REFRAME_FAL_OUTPUT_EXPIRATION_S must be > REFRAME_OUTPUT_COPY_WINDOW_S"
    ):
        load_settings(both)
    ok = load_settings({**both, "REFRAME_OUTPUT_COPY_WINDOW_S": "1800"})
    assert ok.fal_output_expiration_s == 3600
    assert load_settings({**both, "REFRAME_OUTPUT_STORE_URL": "off"}).fal_output_expiration_s == 3600


class Storage:
    """A scripted fal storage: multipart initiate, part PUTs (with scripted failures), complete."""

    def __init__(
        self, *, access_url: str = f"{CDN}/files/k/big.mp4", fail: dict[int, list[Any]] | None = None
    ):
        self.access_url = access_url
        self.fail = {n: list(steps) for n, steps in (fail or {}).items()}
        self.parts: dict[int, bytes] = {}
        self.attempts: Counter[int] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.completes: list[dict[str, Any]] = []
        self.requests: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if path == "/storage/auth/token":
            return token_reply()
        if path == "/files/upload/multipart":
            return js(200, {"access_url": self.access_url, "uploadId": "up-1"})
        if path.endswith("/complete"):
            self.completes.append(json.loads(request.content))
            return js(200, {"access_url": self.access_url})
        number = int(path.rsplit("/", 1)[1])
        self.attempts[number] += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.005)  # let the other parts start: the bound is what limits them
            steps = self.fail.get(number)
            if steps:
                step = steps.pop(0)
                if isinstance(step, Exception):
                    raise step
                return js(int(step), {"detail": "scripted"})
            self.parts[number] = request.content
            return httpx.Response(200, headers={"ETag": f'"{hashlib.md5(request.content).hexdigest()}"'})
        finally:
            self.in_flight -= 1


def _client(storage: Storage, rec: Recorder, **kw: Any) -> FalClient:
    params: dict[str, Any] = {
        "key": KEY,
        "queue_url": QUEUE,
        "rest_url": "https://rest.test",
        "cdn_url": CDN,
        "model_id": MODEL,
        "transport": httpx.MockTransport(storage),
        "rng": lambda: 0.5,
        "sleep": rec.sleep,
        "multipart_threshold_bytes": PART,
        "multipart_part_bytes": PART,
        "multipart_concurrency": 3,
        "upload_part_retries": 2,
    }
    params.update(kw)
    return FalClient(**params)


def _upload(client: FalClient, path: Path, seen: list[tuple[int, int]] | None = None) -> str:
    def note(sent: int, total: int) -> None:
        if seen is not None:
            seen.append((sent, total))

    async def go() -> str:
        async with client:
            return await client.upload_file(path, on_progress=note)

    return asyncio.run(go())


def test_a_large_file_goes_in_parts_each_retried_on_its_own(tmp_path: Path) -> None:
    f = tmp_path / "big.mp4"
    data = os.urandom(PART * 9 + 1234)  # 10 parts, the last one short
    f.write_bytes(data)
    storage = Storage(fail={3: [503, 503], 5: [httpx.ConnectError("refused")]})
    rec = Recorder()
    seen: list[tuple[int, int]] = []

    url = _upload(_client(storage, rec), f, seen)

    assert url == storage.access_url
    assert storage.attempts == Counter({n: 1 for n in range(1, 11)} | {3: 3, 5: 2})  # only failed parts again
    assert len(rec.sleeps) == 3  # one backoff per retry
    assert b"".join(storage.parts[n] for n in range(1, 11)) == data
    assert 1 < storage.max_in_flight <= 3
    (complete,) = storage.completes
    assert [p["partNumber"] for p in complete["parts"]] == list(range(1, 11))
    assert all(
        p["etag"] == f'"{hashlib.md5(storage.parts[p["partNumber"]]).hexdigest()}"' for p in complete["parts"]
    )
    assert seen[-1] == (len(data), len(data))
    put = next(r for r in storage.requests if r.method == "PUT" and r.url.path.endswith("/1"))
    assert put.headers["authorization"] == "Bearer cdn-tok-abc" and put.headers["content-length"] == str(PART)
    assert put.url.path == "/files/k/big.mp4/multipart/up-1/1"


def test_a_part_that_keeps_failing_fails_the_upload_without_completing(tmp_path: Path) -> None:
    f = tmp_path / "big.mp4"
    f.write_bytes(os.urandom(PART * 4))
    storage = Storage(fail={2: [503, 503, 503]})  # 1 + upload_part_retries attempts, all failing
    with pytest.raises(FalTransientError):
        _upload(_client(storage, Recorder()), f)
    assert storage.attempts[2] == 3 and storage.completes == []


def test_a_file_at_the_threshold_goes_in_one_request(tmp_path: Path) -> None:
    f = tmp_path / "small.mp4"
    f.write_bytes(os.urandom(PART))

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/storage/auth/token":
            return token_reply()
        assert request.url.path == "/files/upload" and len(request.content) == PART
        return js(200, {"access_url": f"{CDN}/files/one/small.mp4"})

    client = _client(Storage(), Recorder(), transport=httpx.MockTransport(handler))
    assert _upload(client, f) == f"{CDN}/files/one/small.mp4"


@pytest.mark.parametrize(
    ("access_url", "allowed"),
    [
        (f"{CDN}/files/k/big.mp4", True),
        (f"{CDN}:8443/files/k/big.mp4", False),  # another origin of the same host
        ("https://v3b.fal.test/files/k/big.mp4", True),  # a sibling CDN host of the same site
        ("https://evil.test/files/k/big.mp4", False),
        ("http://v3b.fal.test/files/k/big.mp4", False),  # never downgraded to plain http
    ],
)
def test_the_cdn_token_goes_only_to_fal_storage_hosts(tmp_path: Path, access_url: str, allowed: bool) -> None:
    f = tmp_path / "big.mp4"
    f.write_bytes(os.urandom(PART * 2))
    storage = Storage(access_url=access_url)
    if allowed:
        assert _upload(_client(storage, Recorder()), f) == access_url
    else:
        with pytest.raises(FalPermanentError, match="outside fal storage"):
            _upload(_client(storage, Recorder()), f)
        assert not [r for r in storage.requests if r.method == "PUT"]


def test_a_part_stored_without_an_etag_fails_the_upload(tmp_path: Path) -> None:
    f = tmp_path / "big.mp4"
    f.write_bytes(os.urandom(PART * 2))
    storage = Storage()

    async def no_etag(request: httpx.Request) -> httpx.Response:
        answer = await storage(request)
        return httpx.Response(200) if request.method == "PUT" else answer

    with pytest.raises(FalPermanentError, match="without an ETag"):
        _upload(_client(storage, Recorder(), transport=httpx.MockTransport(no_etag)), f)
    assert storage.completes == []


def test_a_part_refused_for_its_token_is_retried_with_a_fresh_token(tmp_path: Path) -> None:
    f = tmp_path / "big.mp4"
    f.write_bytes(os.urandom(PART * 3))
    storage = Storage(fail={2: [401]})
    assert _upload(_client(storage, Recorder()), f) == storage.access_url
    tokens = [r for r in storage.requests if r.url.path == "/storage/auth/token"]
    assert len(tokens) == 2 and storage.attempts[2] == 2 and len(storage.completes) == 1


def test_an_address_cdn_has_no_sibling_hosts(tmp_path: Path) -> None:
    f = tmp_path / "big.mp4"
    f.write_bytes(os.urandom(PART * 2))
    storage = Storage(access_url="http://10.0.0.1/files/k/big.mp4")
    with pytest.raises(FalPermanentError, match="outside fal storage"):
        _upload(_client(storage, Recorder(), cdn_url="http://127.0.0.1:9"), f)


def test_a_file_that_shrinks_during_the_upload_fails_it_instead_of_storing_a_short_file(
    tmp_path: Path,
) -> None:
    f = tmp_path / "clip.mp4"
    f.write_bytes(os.urandom(5000))
    stored: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        stored.append(request)
        return js(200, {"access_url": f"{CDN}/files/x/clip.mp4"})

    def token_then_truncate(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/storage/auth/token":
            f.write_bytes(b"short")  # the file changes after its size was taken
            return token_reply()
        return handler(request)

    client = _client(Storage(), Recorder(), transport=httpx.MockTransport(token_then_truncate))
    with pytest.raises(FalPermanentError, match=r"cannot read clip\.mp4"):
        _upload(client, f)
    assert stored == []
