"""Hostile invocations of ``reframe quote``, in the style of tests/hostile/test_cli_inputs.py: each
fails with exit 2 and exactly one line on stderr naming the field or variable, no traceback, no
secret, and Redis unchanged (a quote never writes). Then what works: a generated clip quoted as a
local file (read here; the fal URLs are closed, so an upload would fail), text and JSON, and exit 1
when the quote says the job would not be accepted."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from reframe import cli
from reframe.demo import make_sample_video
from reframe.localproc import free_port
from tests.hostile.test_cli_inputs import CLOSED, SECRET, Case, check, cli_env, seed, snapshot

__all__ = ["cli_env"]


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Files that are not acceptable videos, and a 2 s 160x90 clip that is."""
    root = tmp_path_factory.mktemp("quote-hostile")
    (root / "empty.mp4").write_bytes(b"")
    (root / "text.mp4").write_text("this is not a video\n" * 50)
    (root / "noise.mp4").write_bytes(os.urandom(64 * 1024))
    (root / "playlist.m3u8").write_text(
        "#EXTM3U\n#EXTINF:10,\nhttp://169.254.169.254/seg.ts\n#EXT-X-ENDLIST\n"
    )
    (root / "passwd.mp4").symlink_to("/etc/passwd")
    (root / "folder.mp4").mkdir()
    unreadable = root / "unreadable.mp4"
    unreadable.write_bytes(b"\x00" * 100)
    unreadable.chmod(0)
    sample = make_sample_video(root / "sample.mp4", duration_s=2.0, size="160x90", audio=False)
    return {p.stem: p for p in root.iterdir()} | {"sample": sample}


def cases(media: dict[str, Path]) -> list[Case]:
    url = "https://example.com/a.mp4"
    out = [
        Case(["quote"], "Missing argument 'source'"),
        Case(["quote", "--json"], "Missing argument 'source'"),
        Case(["quote", url, "--bogus"], "No such option: --bogus"),
        Case(["quote", url, "--prompt", "x"], "--aspect-ratio"),
        Case(["quote", url, "-a", "7:3"], "aspect_ratio"),
        Case(["quote", url, "-a", "9:16", "--x-start", "-5"], "x_start"),
        Case(["quote", "clip.mp4", "-a", "9:16"], "--aspect-ratio"),
        Case(["quote", url, "--tenant"], "--tenant"),
        Case(["quote", url, "--tenant", "Bad Tenant"], "tenant"),
        Case(["quote", url, "--tenant", "a" * 41], "tenant"),
        Case(["quote", url, "--tenant", "../x"], "tenant"),
        Case(["quote", "ftp://x.test/a.mp4"], "video_url"),
        Case(["quote", "javascript:alert(1)"], "video_url"),
        Case(["quote", "https://"], "video_url"),
        Case(["quote", "http://169.254.169.254/latest/meta-data"], "video_url"),
        Case(["quote", "http://127.0.0.1:6379/"], "video_url"),
        Case(["quote", "http://[::1]:6379/"], "video_url"),
        Case(["quote", "http://2130706433/a.mp4"], "video_url"),
        Case(["quote", "http://user:pass@example.com/a.mp4"], "video_url"),
        Case(["quote", "https://example.com/a b.mp4"], "video_url"),
        Case(["quote", "https://example.com/" + "a" * 3000], "video_url"),
        Case(["quote", "data:video/mp4;base64,!!!"], "video_url"),
        Case(["quote", "/etc/passwd"], "video_url: '/etc/passwd' is not a readable video"),
        Case(["quote", "/etc"], "is neither a URL nor an existing file"),
        Case(["quote", "/dev/null"], "is neither a URL nor an existing file"),
        Case(["quote", "/no/such/file.mp4"], "is neither a URL nor an existing file"),
        Case(["quote", "relative/missing.mp4"], "is neither a URL nor an existing file"),
        Case(["quote", url], "REFRAME_PRICE_PER_S_USD", {"REFRAME_PRICE_PER_S_USD": "inf"}, "price inf"),
        Case(["quote", url], "REFRAME_ENQUEUE_PROBE_INPUT", {"REFRAME_ENQUEUE_PROBE_INPUT": "maybe"}, "probe"),
        Case(["quote", url], "REFRAME_MAX_UPLOAD_BYTES", {"REFRAME_MAX_UPLOAD_BYTES": "0"}, "upload 0"),
        Case(["quote", url], "REFRAME_MAX_VIDEO_DURATION_S", {"REFRAME_MAX_VIDEO_DURATION_S": "-1"}, "dur -1"),
        Case(["quote", str(media.get("sample", "x"))], "REFRAME_REDIS_URL: cannot reach",
             {"REFRAME_REDIS_URL": f"redis://:{SECRET}@127.0.0.1:{free_port()}/0"}, "redis down"),
    ]  # fmt: skip
    for name, expect in [
        ("empty", "is empty"),
        ("text", "is not a readable video"),
        ("noise", "is not a readable video"),
        ("playlist", "is not a readable video"),
        ("passwd", "is not a readable video"),
        ("folder", "is neither a URL nor an existing file"),
    ]:
        out.append(Case(["quote", str(media[name])], expect, id=f"file {name}"))
    if os.geteuid() != 0:  # root reads anything
        out.append(Case(["quote", str(media["unreadable"])], "is not readable", id="unreadable"))
    return out


_PLACEHOLDER = {
    k: Path(f"/nonexistent/{k}") for k in ("empty", "text", "noise", "playlist", "passwd", "folder")
}
IDS = [c.name() for c in cases(_PLACEHOLDER)]


@pytest.mark.parametrize("index", range(len(IDS)), ids=IDS)
def test_hostile_quote(
    index: int,
    media: dict[str, Path],
    redis_url: str,
    rclient: redis.Redis,
    cli_env: Callable[[dict[str, str]], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    case = cases(media)[index]
    seed(redis_url)
    cli_env(case.env)
    before = snapshot(rclient)
    code = cli.run(case.args)
    out = capsys.readouterr()
    check(case, code, out.out, out.err)
    assert snapshot(rclient) == before, f"{case.name()} changed Redis"


def test_quote_of_a_local_file_reads_it_here_and_writes_nothing(
    media: dict[str, Path],
    rclient: redis.Redis,
    cli_env: Callable[[dict[str, str]], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    cli_env({})
    sample = media["sample"]
    assert cli.run(["quote", str(sample), "--json", "--tenant", "acme"]) == 0
    out = capsys.readouterr()
    q = json.loads(out.out)
    assert q["source"] == "file" and q["size_bytes"] == sample.stat().st_size
    assert (q["width"], q["height"]) == (160, 90) and q["duration_s"] == pytest.approx(2.0, abs=0.05)
    assert (q["billed_s"], q["price_micro"], q["estimate_micro"]) == (2.0, 120_000, 180_000)
    assert q["budget"]["tenant"] == "acme" and q["would_accept"] is True and out.err == ""
    assert cli.run(["quote", str(sample)]) == 0
    text = capsys.readouterr().out
    assert "price         $0.12  (2 s billed at $0.06/s, whole 1 s units)" in text
    assert "resolution    160x90" in text and "would accept  yes" in text
    assert rclient.dbsize() == 0
    assert CLOSED  # every fal URL is closed: nothing was uploaded (an upload would have failed)


def test_quote_over_the_limits_exits_1_with_the_reasons(
    media: dict[str, Path],
    rclient: redis.Redis,
    cli_env: Callable[[dict[str, str]], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    cli_env({"REFRAME_MAX_VIDEO_DURATION_S": "1", "REFRAME_MAX_UPLOAD_BYTES": "1000"})
    assert cli.run(["quote", str(media["sample"])]) == 1
    text = capsys.readouterr().out
    assert "would accept  no" in text and "model limits  no" in text
    assert "REFRAME_MAX_VIDEO_DURATION_S allows 1s" in text and "REFRAME_MAX_UPLOAD_BYTES allows 1000" in text
    assert cli.run(["quote", str(media["sample"]), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["fits_model_limits"] is False
    assert rclient.dbsize() == 0
