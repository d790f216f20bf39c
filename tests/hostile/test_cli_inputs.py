"""Hostile invocations of the ``reframe`` CLI: every one must fail cleanly and touch nothing.

Each case asserts the exact exit status (2), exactly one line on stderr naming the field or
variable, no traceback, no secret (Redis passwords in URLs) and that Redis is unchanged (every key
with its type and length). The Redis-down, wrong-password, settings and port-in-use cases run as
real subprocesses (in parallel threads, against a real redis-server); the rest run in-process
through :func:`reframe.cli.run`, the same entry point the console script calls.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from config import load_settings
from producer import Producer
from reframe import cli
from reframe.demo import make_sample_video
from reframe.localproc import RedisServer, free_port, redis_server_binary, spawn, wait_until

SECRET = "hunter2-not-for-logs"
AMBIGUOUS = "abcdef0"  # two seeded job ids start with it
CLOSED = "http://127.0.0.1:9"  # fal URLs nobody listens on: an upload attempt would fail differently


@dataclass(frozen=True)
class Case:
    """One hostile invocation and what its one stderr line must contain."""

    args: list[str]
    expect: str
    env: dict[str, str] = field(default_factory=dict)
    id: str = ""

    def name(self) -> str:
        return self.id or " ".join(self.args)[:80] or "(none)"


def snapshot(client: redis.Redis) -> dict[str, tuple[str, int]]:
    """Every key with its type and length (strings: byte length)."""
    out: dict[str, tuple[str, int]] = {}
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        size = {
            "list": client.llen,
            "zset": client.zcard,
            "hash": client.hlen,
            "set": client.scard,
            "stream": client.xlen,
            "string": client.strlen,
        }[kind](key)
        out[key.decode() if isinstance(key, bytes) else str(key)] = (kind, int(size))
    return out


def seed(url: str) -> str:
    """Two jobs sharing the prefix AMBIGUOUS, plus one real enqueued job; return the real one's id."""
    client = redis.Redis.from_url(url)
    for suffix in ("1" * 25, "2" * 25):
        job_id = AMBIGUOUS + suffix
        client.hset(f"{{reframe}}:job:{job_id}", mapping={"id": job_id, "state": "FAILED"})
    client.close()
    settings = load_settings({"REFRAME_REDIS_URL": url, "REFRAME_FAL_QUEUE_URL": CLOSED})
    with Producer(settings) as producer:
        return producer.enqueue({"video_url": "https://example.com/a.mp4", "aspect_ratio": "9:16"})


def check(case: Case, code: int, stdout: str, stderr: str) -> None:
    where = f"{case.name()}: rc={code} stdout={stdout!r} stderr={stderr!r}"
    assert code == 2, where
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, where
    assert lines[0].startswith("error: "), where
    assert case.expect in lines[0], where
    assert "Traceback" not in stderr + stdout, where
    assert SECRET not in stderr + stdout, where


# ================================================================================== subprocesses
def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("REFRAME_") and k != "FAL_KEY"}
    return {**env, "COLUMNS": "200", **extra}


@pytest.fixture(scope="module")
def auth_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second redis-server that requires a password; yields its host:port."""
    port = free_port()
    workdir = tmp_path_factory.mktemp("auth-redis")
    argv = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--requirepass", "the-right-one", "--dir", str(workdir)]  # fmt: skip
    proc = spawn(f"redis-auth-{port}", argv, log_dir=workdir)
    probe = redis.Redis(port=port, password="the-right-one", socket_timeout=1)
    wait_until(lambda: bool(probe.ping()), timeout_s=15, what="password-protected redis-server")
    probe.close()
    yield f"127.0.0.1:{port}"
    proc.stop()


def subprocess_cases(good_url: str, auth_hostport: str, held_port: int) -> list[Case]:
    down = f"redis://127.0.0.1:{free_port()}/0"
    down_secret = f"redis://:{SECRET}@127.0.0.1:{free_port()}/0"
    wrong = f"redis://:{SECRET}@{auth_hostport}/0"
    wrong_user = f"redis://default:{SECRET}@{auth_hostport}/0"
    none = f"redis://{auth_hostport}/0"
    url_cmds = [
        ["status", "0" * 32],
        ["status", "--cluster"],
        ["wait", "abc123"],
        ["cancel", "abc123"],
        ["enqueue", "https://example.com/a.mp4", "-a", "9:16"],
        ["enqueue", "https://example.com/a.mp4", "-a", "9:16", "--idempotency-key", "k"],
        ["results", "--count", "1"],
        ["dlq", "list"],
        ["dlq", "show", "abc"],
        ["dlq", "replay", "abc"],
        ["dlq", "purge", "--yes"],
        ["worker"],
    ]
    cases: list[Case] = []
    for args in url_cmds:
        cases.append(
            Case(args, "REFRAME_REDIS_URL: cannot reach", {"REFRAME_REDIS_URL": down}, f"down {args}")
        )
    for args in (url_cmds[1], url_cmds[4], url_cmds[11], url_cmds[0]):
        cases.append(
            Case(
                args,
                "REFRAME_REDIS_URL: cannot reach redis://:***@",
                {"REFRAME_REDIS_URL": down_secret},
                f"down+password {args}",
            )
        )
    # Sentinel: the message names the Sentinels and the primary's name, never the URL's unused host
    no_sentinel = {"REFRAME_REDIS_URL": good_url, "REFRAME_REDIS_SENTINELS": f"127.0.0.1:{free_port()}"}
    for args in (url_cmds[1], url_cmds[4], url_cmds[11]):
        cases.append(
            Case(
                args,
                "REFRAME_REDIS_SENTINELS: cannot reach the primary 'mymaster' of the Sentinels 127.0.0.1:",
                no_sentinel,
                f"sentinel down {args}",
            )
        )
    for url, tag in ((wrong, "wrong password"), (wrong_user, "wrong user:password"), (none, "no password")):
        for args in (url_cmds[0], url_cmds[1], url_cmds[4], url_cmds[6], url_cmds[7], url_cmds[11]):
            cases.append(Case(args, "REFRAME_REDIS_URL: authentication failed", {"REFRAME_REDIS_URL": url},
                              f"{tag} {args}"))  # fmt: skip
    bad_settings = [
        ("REFRAME_BUDGET_DAILY_USD", "inf"),
        ("REFRAME_BUDGET_DAILY_USD", "nan"),
        ("REFRAME_BUDGET_DAILY_USD", "-1"),
        ("REFRAME_BUDGET_DAILY_USD", "1e400"),
        ("REFRAME_BUDGET_DAILY_USD", "5e9"),
        ("REFRAME_BUDGET_MONTHLY_USD", "-inf"),
        ("REFRAME_PRICE_PER_S_USD", "NaN"),
        ("REFRAME_MAX_CONCURRENCY", "0"),
        ("REFRAME_SUBMIT_RATE_PER_S", "Infinity"),
        ("REFRAME_REDIS_URL", "http://127.0.0.1:6379/0"),
        ("REFRAME_METRICS_PORT", "70000"),
        ("REFRAME_HEARTBEAT_TTL_MS", "100"),
        ("REFRAME_MAX_VIDEO_DURATION_S", "inf"),
        ("REFRAME_TYPO", "1"),
        ("REFRAME_MAX_CONCURENCY", "4"),
    ]
    commands = [["status", "--cluster"], ["enqueue", "https://example.com/a.mp4", "-a", "9:16"], ["worker"],
                ["exporter"], ["up"]]  # fmt: skip
    for i, (var, value) in enumerate(bad_settings):
        args = commands[i % len(commands)]
        env = {"REFRAME_REDIS_URL": good_url, var: value}
        cases.append(Case(args, var, env, f"setting {var}={value} {args[0]}"))
    held = {"REFRAME_REDIS_URL": good_url, "REFRAME_METRICS_HOST": "127.0.0.1"}
    cases += [
        Case(["exporter"], f"REFRAME_METRICS_PORT: 127.0.0.1:{held_port} is in use",
             {**held, "REFRAME_METRICS_PORT": str(held_port)}, "port in use: exporter"),
        Case(["exporter", "--port", str(held_port)], "REFRAME_METRICS_PORT", held, "port in use: exporter --port"),
        Case(["worker"], f"REFRAME_METRICS_PORT: 127.0.0.1:{held_port} is in use",
             {**held, "REFRAME_METRICS_PORT": str(held_port)}, "port in use: worker"),
    ]  # fmt: skip
    for case in cases:  # never real fal: no FAL_KEY needed, nothing leaves the machine
        case.env.setdefault("REFRAME_FAL_QUEUE_URL", CLOSED)
        case.env.setdefault("REFRAME_METRICS_PORT", "0")  # the default port may be taken on this machine
    return cases


@pytest.fixture(scope="module")
def subprocess_results(
    redis_server: RedisServer, auth_redis: str
) -> Iterator[tuple[list[Case], list[tuple[int, str, str]], dict[str, Any], dict[str, Any]]]:
    """Run every subprocess case in parallel once; yield cases, results and Redis before/after."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    seed(redis_server.url)
    held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    cases = subprocess_cases(redis_server.url, auth_redis, held.getsockname()[1])
    before = snapshot(client)

    def run(case: Case) -> tuple[int, str, str]:
        out = subprocess.run([sys.executable, "-m", "reframe", *case.args], capture_output=True, text=True,
                             timeout=60, env=_clean_env(**case.env), stdin=subprocess.DEVNULL, check=False)  # fmt: skip
        return out.returncode, out.stdout, out.stderr

    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(run, cases))
        after = snapshot(client)
    finally:
        held.close()
        client.close()
    yield cases, results, before, after


SUBPROCESS_CASE_COUNT = 12 + 4 + 3 + 18 + 15 + 3


@pytest.mark.parametrize("index", range(SUBPROCESS_CASE_COUNT))
def test_subprocess_case(index: int, subprocess_results: Any) -> None:
    cases, results, _before, _after = subprocess_results
    assert len(cases) == SUBPROCESS_CASE_COUNT
    check(cases[index], *results[index])


def test_subprocess_cases_wrote_nothing_to_redis(subprocess_results: Any) -> None:
    _cases, _results, before, after = subprocess_results
    assert before and after == before


# ================================================================================== in-process
@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Files that are not acceptable videos (and one that is, for the size and duration limits)."""
    root = tmp_path_factory.mktemp("hostile-media")
    (root / "empty.mp4").write_bytes(b"")
    (root / "text.mp4").write_text("this is not a video\n" * 50)
    (root / "noise.mp4").write_bytes(os.urandom(64 * 1024))
    (root / "passwd.mp4").symlink_to("/etc/passwd")
    (root / "folder.mp4").mkdir()
    unreadable = root / "unreadable.mp4"
    unreadable.write_bytes(b"\x00" * 100)
    unreadable.chmod(0)
    sample = make_sample_video(root / "sample.mp4", duration_s=2.0, size="160x90", audio=False)
    return {p.stem: p for p in root.iterdir()} | {"sample": sample}


def inprocess_cases(media: dict[str, Path]) -> list[Case]:
    url = ["https://example.com/a.mp4"]
    enq = ["enqueue", *url, "-a", "9:16"]
    cases = [
        # usage: one line naming the parameter, before anything is enqueued
        Case(["enqueue"], "Missing argument 'source'"),
        Case(["enqueue", *url], "Missing option '--aspect-ratio'"),
        Case(["nosuch"], "No such command 'nosuch'"),
        Case([*enq, "--bogus"], "No such option: --bogus"),
        Case([*enq, "--grid-position-x", "abc"], "--grid-position-x"),
        Case(["results", "--count", "-1"], "--count"),
        Case(["results", "--block-ms", "0"], "--block-ms"),
        Case(["results", "--count", "x"], "--count"),
        Case(["results", "--group", " "], "group: must not be empty"),
        Case(["dlq", "list", "--limit", "0"], "--limit"),
        Case(["dlq", "purge"], "purge: pass --yes"),
        Case(["dlq", "replay"], "job_ids: name jobs or pass --all"),
        Case(["status"], "job_id: give a job id or --cluster"),
        Case(["worker", "--concurrency", "0"], "--concurrency"),
        Case(["exporter", "--port", "0"], "--port"),
        Case(["exporter", "--port", "70000"], "--port"),
        Case(["up", "--workers", "0"], "--workers"),
        Case(["up", "--workers", "-3"], "--workers"),
        Case(["up", "--workers", "many"], "--workers"),
        Case(["up", "--processing-time-s", "-1"], "--processing-time-s"),
        Case(["up", "--fal-concurrency", "0"], "--fal-concurrency"),
    ]
    for value in ("-5", "0", "nan", "inf", "-inf", "abc", "-0.0"):
        cases.append(
            Case([*enq, "--wait", "--timeout-s", value], "--timeout-s", id=f"enqueue --timeout-s {value}")
        )
        cases.append(
            Case(["wait", "abc", "--timeout-s", value], "--timeout-s", id=f"wait --timeout-s {value}")
        )
    cases.append(Case(["demo", "--timeout-s", "-1"], "--timeout-s"))
    # invalid requests: the field is named, nothing is enqueued
    cases += [
        Case(["enqueue", *url, "-a", "2:1"], "aspect_ratio"),
        Case(["enqueue", *url, "-a", ""], "aspect_ratio"),
        Case(["enqueue", "ftp://x.test/a.mp4", "-a", "1:1"], "video_url"),
        Case(["enqueue", *url, "-a", "1:1", "--tenant", "Bad Tenant"], "tenant"),
        Case(["enqueue", *url, "-a", "1:1", "--tenant", "a" * 41], "tenant"),
        Case(["enqueue", "javascript:alert(1)", "-a", "1:1"], "video_url"),
        Case(["enqueue", "https://", "-a", "1:1"], "video_url"),
        Case([*enq, "--priority", "urgent"], "priority:"),
        Case([*enq, "-m", "nokey"], "metadata: 'nokey' is not KEY=VALUE"),
        Case([*enq, "-m", "=v"], "metadata"),
        Case([*enq, "--callback-url", "ftp://x.test/cb"], "callback_url"),
        Case([*enq, "--callback-url", "not a url"], "callback_url"),
        Case([*enq, "--prompt", "p" * 5000], "prompt"),
        Case([*enq, "--x-start", "9", "--x-end", "3"], "x_end"),
        Case([*enq, "--idempotency-key", "k" * 300], "idempotency_key"),
        Case([*enq, "--idempotency-key", ""], "idempotency_key"),
        Case([*enq, "--image-url", "ftp://x.test/i.png"], "image_url"),
    ]
    # local files: refused before any upload (the fal URLs are closed: an upload would fail with 1)
    for name, expect in [
        ("empty", "is empty"),
        ("text", "is not a readable video"),
        ("noise", "is not a readable video"),
        ("passwd", "is not a readable video"),
        ("folder", "is neither a URL nor an existing file"),
    ]:
        cases.append(Case(["enqueue", str(media[name]), "-a", "9:16"], expect, id=f"file {name}"))
    cases += [
        Case(["enqueue", "/etc/passwd", "-a", "9:16"], "video_url: '/etc/passwd' is not a readable video"),
        Case(["enqueue", "/etc", "-a", "9:16"], "is neither a URL nor an existing file"),
        Case(["enqueue", "/dev/null", "-a", "9:16"], "is neither a URL nor an existing file"),
        Case(["enqueue", "/no/such/file.mp4", "-a", "9:16"], "is neither a URL nor an existing file"),
        Case(["enqueue", "relative/missing.mp4", "-a", "9:16"], "is neither a URL nor an existing file"),
        Case(["enqueue", str(media["sample"]), "-a", "9:16"], "REFRAME_MAX_VIDEO_DURATION_S allows 1s",
             {"REFRAME_MAX_VIDEO_DURATION_S": "1"}, "file too long"),
        Case(["enqueue", str(media["sample"]), "-a", "9:16"], "REFRAME_MAX_UPLOAD_BYTES allows 1000",
             {"REFRAME_MAX_UPLOAD_BYTES": "1000"}, "file too large"),
        Case(["enqueue", str(media["sample"]), "-a", "2:1"], "aspect_ratio", id="valid file, bad ratio"),
        Case(["enqueue", str(media["empty"]), "-a", "9:16", "--wait", "--timeout-s", "-5"], "--timeout-s",
             id="empty file and negative timeout"),
    ]  # fmt: skip
    if os.geteuid() != 0:  # root reads anything
        cases.append(
            Case(["enqueue", str(media["unreadable"]), "-a", "9:16"], "is not readable", id="unreadable")
        )
    # job ids: unknown, ambiguous, not hex, globs; for every command that takes one
    id_inputs = [
        ("zz", "job_id: 'zz' is not a job id"),
        ("", "job_id: "),
        ("abc-def", "job_id: 'abc-def' is not a job id"),
        ("*", "job_id: '*' is not a job id"),
        ("abc*", "job_id: 'abc*' is not a job id"),
        ("[a]", "job_id: '[a]' is not a job id"),
        ("a" * 33, "is not a job id"),
        ("ffff0000", "job_id: no job starts with 'ffff0000'"),
        ("f" * 32, "job_id: no job ffffffff"),
        (AMBIGUOUS, f"job_id: '{AMBIGUOUS}' is ambiguous: {AMBIGUOUS}1"),
        (AMBIGUOUS.upper(), "is ambiguous"),
    ]
    for command in (["status"], ["wait"], ["cancel"], ["dlq", "show"], ["dlq", "replay"]):
        for value, expect in id_inputs:
            cases.append(Case([*command, value], expect, id=f"{' '.join(command)} {value!r}"))
    # settings, in-process too (the subprocess table covers them end to end)
    for var, value in [
        ("REFRAME_BUDGET_DAILY_USD", "-inf"),
        ("REFRAME_BUDGET_MONTHLY_USD", "inf"),
        ("REFRAME_BUDGET_MONTHLY_USD", "nan"),
        ("REFRAME_PRICE_PER_S_USD", "inf"),
        ("REFRAME_PRICE_PER_S_USD", "-0.5"),
        ("REFRAME_MAX_CONCURRENCY", "-1"),
        ("REFRAME_MAX_CONCURRENCY", "1.5"),
        ("REFRAME_RESERVED_HIGH_SLOTS", "99"),
        ("REFRAME_HEARTBEAT_INTERVAL_MS", "0"),
        ("REFRAME_MAX_UPLOAD_BYTES", "0"),
        ("REFRAME_LOG_LEVEL", "LOUD"),
        ("REFRAME_REDIS_URL", "not a url"),
        ("REFRAME_UNKNOWN_THING", "x"),
    ]:
        cases.append(Case(["status", "--cluster"], var, {var: value}, f"setting {var}={value}"))
    return cases


_MEDIA_PLACEHOLDER: dict[str, Path] = {
    k: Path(f"/nonexistent/{k}")
    for k in ("empty", "text", "noise", "passwd", "folder", "unreadable", "sample")
}
INPROCESS_IDS = [c.name() for c in inprocess_cases(_MEDIA_PLACEHOLDER)]


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> Callable[[dict[str, str]], None]:
    """A clean environment pointing at the flushed test Redis and closed fal URLs."""
    for key in list(os.environ):
        if key.upper().startswith("REFRAME_") or key == "FAL_KEY":
            monkeypatch.delenv(key)
    base = {
        "REFRAME_REDIS_URL": redis_url,
        "REFRAME_FAL_QUEUE_URL": CLOSED,
        "REFRAME_FAL_REST_URL": CLOSED,
        "REFRAME_FAL_CDN_URL": CLOSED,
    }

    def apply(extra: dict[str, str]) -> None:
        for key, value in {**base, **extra}.items():
            monkeypatch.setenv(key, value)

    return apply


@pytest.mark.parametrize("index", range(len(INPROCESS_IDS)), ids=INPROCESS_IDS)
def test_inprocess_case(
    index: int,
    media: dict[str, Path],
    redis_url: str,
    rclient: redis.Redis,
    cli_env: Callable[[dict[str, str]], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    case = inprocess_cases(media)[index]
    seed(redis_url)
    cli_env(case.env)
    before = snapshot(rclient)
    code = cli.run(case.args)
    out = capsys.readouterr()
    check(case, code, out.out, out.err)
    assert snapshot(rclient) == before, f"{case.name()} changed Redis"


def test_table_is_large_enough() -> None:
    assert SUBPROCESS_CASE_COUNT + len(INPROCESS_IDS) >= 150


# ================================================================================== what works
def test_unique_prefix_works_and_idempotent_reenqueue_says_so(
    redis_url: str, cli_env: Callable[[dict[str, str]], None], capsys: pytest.CaptureFixture[str]
) -> None:
    cli_env({})
    job_id = seed(redis_url)
    assert cli.run(["status", job_id[:12]]) == 0
    assert f'"id": "{job_id}"' in capsys.readouterr().out
    args = ["enqueue", "https://example.com/b.mp4", "-a", "1:1", "--idempotency-key", "order-7"]
    assert cli.run(args) == 0
    first = capsys.readouterr()
    assert "existing job" not in first.err
    assert cli.run(args) == 0
    second = capsys.readouterr()
    assert second.out == first.out  # the same job id
    assert f"returned the existing job {first.out.strip()} (state QUEUED)" in second.err
