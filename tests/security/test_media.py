"""The duration probe reads through the guarded fetcher: real MP4 over Range, refusals send nothing."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from reframe.demo import make_sample_video
from worker.contracts.media import RangeFile, _duration_of, video_duration_s
from worker.contracts.netguard import GuardedFetcher
from worker.contracts.urlpolicy import Allowlist

from .conftest import RecordingServer

DURATION_S = 2.5


@pytest.fixture(scope="module")
def sample_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A 2.5 s fast-start H.264 MP4 made by the project's clip generator."""
    path = make_sample_video(
        tmp_path_factory.mktemp("media") / "s.mp4", duration_s=DURATION_S, size="320x180"
    )
    return Path(path).read_bytes()


@pytest.fixture
def fetcher() -> Iterator[GuardedFetcher]:
    """Allowed to reach 127.0.0.2 only (the stand-in for a public CDN)."""
    with GuardedFetcher(allow=Allowlist.parse("127.0.0.2/32")) as f:
        yield f


@pytest.fixture
def cdn(make_server: Callable[..., RecordingServer], sample_bytes: bytes) -> RecordingServer:
    server = make_server("127.0.0.2")
    server.serve_bytes("/clip.mp4", sample_bytes)
    return server


def test_reads_the_duration_of_a_real_mp4_through_range_requests(
    cdn: RecordingServer, fetcher: GuardedFetcher
) -> None:
    duration = video_duration_s(f"{cdn.base}/clip.mp4", fetcher=fetcher, timeout_s=10)
    assert duration == pytest.approx(DURATION_S, abs=0.1)
    assert cdn.seen, "the probe read through the server"
    assert all(s.method == "GET" and s.headers.get("Range", "").startswith("bytes=") for s in cdn.seen)


def test_small_blocks_read_only_part_of_the_file(
    make_server: Callable[..., RecordingServer], sample_bytes: bytes, fetcher: GuardedFetcher
) -> None:
    big = sample_bytes + b"\0" * (4 * 1024 * 1024)  # trailing padding a header-only probe never reads
    server = make_server("127.0.0.2")
    server.serve_bytes("/clip.mp4", big)
    with RangeFile(
        fetcher, f"{server.base}/clip.mp4", max_total_bytes=10**8, deadline=time.monotonic() + 30
    ) as f:
        assert f.size == len(big)
        f.seek(-10, 2)
        assert f.read(10) == b"\0" * 10
        f.seek(0)
        assert f.read(8)[4:] == b"ftyp"
        assert f.bytes_fetched < len(big) // 2
    assert video_duration_s(f"{server.base}/clip.mp4", fetcher=fetcher, timeout_s=10) == pytest.approx(
        DURATION_S, abs=0.1
    )


def test_server_without_range_support_works_under_the_byte_cap(
    make_server: Callable[..., RecordingServer], sample_bytes: bytes, fetcher: GuardedFetcher
) -> None:
    server = make_server("127.0.0.2")
    server.serve_bytes("/clip.mp4", sample_bytes, ranges=False)
    url = f"{server.base}/clip.mp4"
    assert video_duration_s(url, fetcher=fetcher, timeout_s=10) == pytest.approx(DURATION_S, abs=0.1)
    assert video_duration_s(url, fetcher=fetcher, timeout_s=10, max_bytes=len(sample_bytes) - 1) is None


def test_total_bytes_are_capped(cdn: RecordingServer, fetcher: GuardedFetcher) -> None:
    assert video_duration_s(f"{cdn.base}/clip.mp4", fetcher=fetcher, timeout_s=10, max_bytes=1000) is None
    assert len(cdn.seen) == 1, "stopped after the first (capped) read"


@pytest.mark.parametrize(
    "path", ["/clip.mp4", "/redirect"], ids=["direct-loopback", "redirect-from-allowed-server-to-loopback"]
)
def test_refuses_blocked_urls_without_any_request_reaching_the_server(
    path: str,
    target: RecordingServer,
    make_server: Callable[..., RecordingServer],
    sample_bytes: bytes,
    fetcher: GuardedFetcher,
) -> None:
    target.serve_bytes("/clip.mp4", sample_bytes)
    public = make_server("127.0.0.2")
    public.redirect("/redirect", f"{target.base}/clip.mp4")
    url = f"{target.base}/clip.mp4" if path == "/clip.mp4" else f"{public.base}/redirect"
    assert video_duration_s(url, fetcher=fetcher, timeout_s=10) is None
    assert target.seen == []
    with GuardedFetcher(allow=Allowlist.parse("127.0.0.0/8")) as control:  # control: the same URL works
        assert video_duration_s(url, fetcher=control, timeout_s=10) == pytest.approx(DURATION_S, abs=0.1)
    assert target.seen


def test_playlists_cannot_make_ffmpeg_open_other_urls(
    make_server: Callable[..., RecordingServer], target: RecordingServer, fetcher: GuardedFetcher
) -> None:
    playlist = f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{target.base}/seg0.ts\n#EXT-X-ENDLIST\n"
    public = make_server("127.0.0.2")
    public.serve_bytes("/list.m3u8", playlist.encode())
    concat = f"ffconcat version 1.0\nfile '{target.base}/seg0.mp4'\n"
    public.serve_bytes("/list.ffconcat", concat.encode())
    for name in ("list.m3u8", "list.ffconcat"):
        assert video_duration_s(f"{public.base}/{name}", fetcher=fetcher, timeout_s=10) is None
    assert public.seen, "the playlists themselves were read"
    assert target.seen == []


def test_time_limit(make_server: Callable[..., RecordingServer], fetcher: GuardedFetcher) -> None:
    release = threading.Event()
    server = make_server("127.0.0.2")
    server.route("/slow.mp4", lambda h: (release.wait(10), h.reply(200, b"late")))
    try:
        assert video_duration_s(f"{server.base}/slow.mp4", fetcher=fetcher, timeout_s=0.3) is None
        assert len(server.seen) == 1
    finally:
        release.set()


def test_data_uri_is_read_locally(sample_bytes: bytes) -> None:
    uri = "data:video/mp4;base64," + base64.b64encode(sample_bytes).decode()
    with GuardedFetcher(resolver=lambda h, p: pytest.fail("no network for data: URIs")) as f:
        assert video_duration_s(uri, fetcher=f, timeout_s=10) == pytest.approx(DURATION_S, abs=0.1)
        assert video_duration_s(uri, fetcher=f, timeout_s=10, max_bytes=100) is None
        assert video_duration_s("data:video/mp4;base64,!!!", fetcher=f, timeout_s=10) is None


def test_a_forced_playlist_demuxer_still_opens_nothing(
    make_server: Callable[..., RecordingServer], target: RecordingServer, fetcher: GuardedFetcher
) -> None:
    import av

    playlist = f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{target.base}/seg0.ts\n#EXT-X-ENDLIST\n"
    public = make_server("127.0.0.2")
    public.serve_bytes("/list.m3u8", playlist.encode())

    def source() -> RangeFile:
        return RangeFile(
            fetcher, f"{public.base}/list.m3u8", max_total_bytes=10**6, deadline=time.monotonic() + 10
        )

    with pytest.raises(av.FFmpegError):
        _duration_of(source(), format="hls")
    assert target.seen == []
    # Control: plain PyAV with the HLS demuxer would have fetched the segment from the target itself.
    with pytest.raises(av.FFmpegError):
        av.open(source(), format="hls", timeout=5).close()
    assert [s.path for s in target.seen] == ["/seg0.ts"]
