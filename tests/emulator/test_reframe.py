"""The real work: output geometry, duration and codec of rendered videos, probed with PyAV."""

from __future__ import annotations

from pathlib import Path

import av
import httpx
import pytest

from falemu import EmulatorServer
from tests.emulator.helpers import AUTH, make_clip, submit, valid_input, wait_status


def probe(data: bytes, tmp_path: Path) -> tuple[int, int, float, str, str]:
    path = tmp_path / "probe.mp4"
    path.write_bytes(data)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        ctx = stream.codec_context
        return ctx.width, ctx.height, container.duration / 1_000_000, ctx.name, ctx.format.name


def reframe(http: httpx.Client, payload: dict[str, object]) -> dict[str, object]:
    sub = submit(http, payload)
    done = wait_status(http, sub, "COMPLETED", timeout_s=60)
    assert "error" not in done, done
    video: dict[str, object] = http.get(sub["response_url"]).json()["video"]
    return video


def test_16_9_clip_to_9_16(http: httpx.Client, clip_url: str, tmp_path: Path) -> None:
    video = reframe(http, valid_input(clip_url, "9:16"))
    data = httpx.get(str(video["url"])).content
    width, height, duration, codec, pix_fmt = probe(data, tmp_path)
    assert (width, height) == (180, 320)  # long side kept (320), short side 320 * 9/16 = 180
    assert abs(duration - 2.0) < 0.1
    assert (codec, pix_fmt) == ("h264", "yuv420p")
    assert data[4:8] == b"ftyp" and data.find(b"moov") < data.find(b"mdat")  # +faststart


@pytest.mark.parametrize(
    ("ratio", "size"),
    [
        ("1:1", (320, 320)),
        ("4:3", (320, 240)),
        ("3:4", (240, 320)),
        ("21:9", (320, 138)),
        ("9:21", (138, 320)),
        ("16:9", (320, 180)),
    ],
)
def test_every_aspect_ratio(http: httpx.Client, clip_url: str, tmp_path: Path, ratio: str,
                            size: tuple[int, int]) -> None:  # fmt: skip
    video = reframe(http, valid_input(clip_url, ratio))
    assert (video["width"], video["height"]) == size
    assert probe(httpx.get(str(video["url"])).content, tmp_path)[:2] == size


def test_placement_parameters_render(http: httpx.Client, clip_url: str, tmp_path: Path) -> None:
    for extra in (
        {"x_start": 10, "x_end": 170, "y_start": 20, "y_end": 110},
        {"grid_position_x": 0, "grid_position_y": 0},
        {"y_start": 0, "y_end": 100, "prompt": "a cat", "image_url": "https://example.invalid/f.png"},
    ):
        video = reframe(http, valid_input(clip_url, "9:16", **extra))
        assert probe(httpx.get(str(video["url"])).content, tmp_path)[:2] == (180, 320)


def test_long_side_is_capped_and_odd_sources_round_to_even(
    emu: EmulatorServer, http: httpx.Client, tmp_path: Path
) -> None:
    clip = make_clip(tmp_path / "big.mp4", size="1442x810", duration_s=0.6, audio=False)
    upload = httpx.post(f"{emu.url}/files/upload", content=clip.read_bytes(), headers={**AUTH,
                        "Content-Type": "video/mp4"}).json()  # fmt: skip
    video = reframe(http, valid_input(upload["access_url"], "9:16"))
    assert (video["width"], video["height"]) == (720, 1280)
    duration = probe(httpx.get(str(video["url"])).content, tmp_path)[2]
    assert abs(duration - 0.6) < 0.1


def test_identical_inputs_hit_the_render_cache(http: httpx.Client, clip_url: str) -> None:
    payload = valid_input(clip_url, "3:4", x_start=5, x_end=200)
    first = reframe(http, payload)
    second = reframe(http, payload)
    assert first["url"] != second["url"]  # each request gets its own file URL...
    assert first["file_size"] == second["file_size"]
    assert httpx.get(str(first["url"])).content == httpx.get(str(second["url"])).content  # ...of one render
