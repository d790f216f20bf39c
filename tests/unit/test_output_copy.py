"""The output copy's pure check and its fenced scripts (real redis-server, no worker)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import redis

from falemu.faults import Fault
from reframe import cli
from worker.contracts.keys import Keys
from worker.contracts.lua import load_lua
from worker.contracts.media import ContainerInfo
from worker.output_store import output_key
from worker.output_verify import ratio_of, verify

LUA = Path(__file__).resolve().parents[2] / "worker" / "lua"
K = Keys("reframe")


def info(width: int, height: int, duration_s: float | None) -> ContainerInfo:
    return ContainerInfo(duration_s=duration_s, width=width, height=height, codec="h264", size_bytes=1000)


def check(i: ContainerInfo, ratio: str = "9:16", input_s: float | None = 3.0) -> tuple[bool, list[str]]:
    v = verify(
        i, aspect_ratio=ratio, input_duration_s=input_s, ratio_tolerance=0.02, duration_tolerance_s=0.5
    )
    return v.ok, list(v.reasons)


def test_verify_checks_ratio_and_duration_within_tolerances() -> None:
    assert check(info(720, 1280, 3.02)) == (True, [])
    assert check(info(404, 720, 3.4))[0]  # 0.561 vs 0.5625: inside 2 %
    ok, reasons = check(info(1280, 720, 3.0))
    assert not ok and reasons == ["aspect ratio 1280x720 (1.7778) is not 9:16"]
    ok, reasons = check(info(720, 1280, 1.5))
    assert not ok and reasons == ["duration 1.500 s is not the input's 3.000 s"]
    assert check(info(720, 1280, 1.5), input_s=None) == (True, [])  # no measured input: ratio only
    ok, reasons = check(info(720, 1280, None))
    assert not ok and reasons == ["no duration"]
    v = verify(
        info(1280, 720, 1.0),
        aspect_ratio="9:16",
        input_duration_s=3.0,
        ratio_tolerance=0.02,
        duration_tolerance_s=0.5,
    )
    record = v.as_record()
    assert record["result"] == "mismatch" and record["width"] == 1280 and record["duration_s"] == 1.0
    assert record["aspect_ratio"] == pytest.approx(1.7778) and len(record["reasons"]) == 2
    assert ratio_of("21:9") == pytest.approx(21 / 9) and ratio_of("x") is None and ratio_of("0:1") is None


def test_output_keys_are_content_addressed_under_a_safe_tenant_prefix() -> None:
    sha = "ab" * 32
    assert output_key("acme", sha) == f"t/acme/{sha}.mp4"
    assert output_key("", sha) == f"t/_/{sha}.mp4"
    assert output_key("../x y", sha) == f"t/.._x_y/{sha}.mp4"  # one path segment, never a traversal
    with pytest.raises(ValueError):
        output_key("acme", "not-a-digest")


def test_bad_output_fault_needs_submit_and_a_known_output() -> None:
    assert (
        Fault.from_dict({"op": "submit", "kind": "bad_output", "output": "truncate", "keep": 0.25}).keep
        == 0.25
    )
    for raw in (
        {"op": "submit", "kind": "bad_output"},
        {"op": "result", "kind": "bad_output", "output": "ratio"},
        {"op": "submit", "kind": "bad_output", "output": "ratio", "keep": 1.5},
    ):
        with pytest.raises(ValueError):
            Fault.from_dict(raw)


def _scripts(r: redis.Redis) -> tuple[object, object, object]:
    return (
        r.register_script(load_lua(LUA / "output_claim.lua")),
        r.register_script(load_lua(LUA / "output_take.lua")),
        r.register_script(load_lua(LUA / "output_settle.lua")),
    )


def _settle(script: object, event_id: str, job_id: str, opt: dict[str, object]) -> list[object]:
    keys = [
        K.outputs_pending, K.output_entry(event_id), K.outputs_failed, K.job(job_id), K.events, K.outbox,
        K.outbox_entry(event_id), "d", "m", "td", "tm", K.ledger, K.outputs_since,
    ]  # fmt: skip
    return script(keys=keys, args=[event_id, json.dumps(opt)])  # type: ignore[operator, no-any-return]


def test_a_copier_whose_claim_was_taken_over_can_only_discover_it_lost(rclient: redis.Redis) -> None:
    r = rclient
    claim, take, settle = _scripts(r)
    job_id, event_id = "j1", "j1.1"
    r.hset(K.job(job_id), mapping={"state": "SUCCEEDED", "event_id": event_id, "output_copy": "pending"})
    event = json.dumps(["v", "2", "event_id", event_id, "job_id", job_id, "state", "SUCCEEDED"])
    r.hset(
        K.output_entry(event_id),
        mapping={"event_id": event_id, "job_id": job_id, "event": event, "cb_url": "https://cb.example/x",
                 "cb_body": '{"v":2,"job_id":"j1"}', "claims": 0, "attempts": 0, "created_at_ms": 1},
    )  # fmt: skip
    r.zadd(K.outputs_pending, {event_id: 0})
    r.zadd(K.outputs_since, {event_id: 1})
    assert claim(keys=[K.outputs_pending], args=[10, 0]) == [event_id]  # type: ignore[operator]
    first = int(take(keys=[K.outputs_pending, K.output_entry(event_id)], args=[event_id])[0])  # type: ignore[operator]
    # the lease ran out (0 ms here): another copier claims and takes it
    assert claim(keys=[K.outputs_pending], args=[10, 60_000]) == [event_id]  # type: ignore[operator]
    second = int(take(keys=[K.outputs_pending, K.output_entry(event_id)], args=[event_id])[0])  # type: ignore[operator]
    assert second == first + 1
    copied = {"outcome": "copied", "set": {"output_copy": "copied"}, "event": {"output_key": "k"},
              "cb_tail": '"output":{"key":"k"}'}  # fmt: skip
    assert _settle(settle, event_id, job_id, {"claim": first, **copied}) == [0, "LOST"]
    assert r.xlen(K.events) == 0 and r.hget(K.job(job_id), "output_copy") == "pending"
    assert _settle(settle, event_id, job_id, {"claim": second, **copied})[0] == 1
    assert _settle(settle, event_id, job_id, {"claim": second, **copied}) == [0, "GONE"]
    (only,) = r.xrange(K.events)
    assert only[1]["output_key"] == "k" and only[1]["event_id"] == event_id
    assert json.loads(r.hget(K.outbox_entry(event_id), "body") or "{}") == {
        "v": 2,
        "job_id": "j1",
        "output": {"key": "k"},
    }
    assert r.hget(K.job(job_id), "output_copy") == "copied"
    assert r.zcard(K.outputs_pending) == r.zcard(K.outputs_since) == 0 and not r.exists(
        K.output_entry(event_id)
    )


def test_a_given_up_copy_publishes_once_and_a_later_copy_only_updates_the_record(
    rclient: redis.Redis,
) -> None:
    r = rclient
    claim, take, settle = _scripts(r)
    retry = r.register_script(load_lua(LUA / "output_retry.lua"))
    job_id, event_id = "j2", "j2.1"
    r.hset(K.job(job_id), mapping={"state": "SUCCEEDED", "event_id": event_id, "output_copy": "pending"})
    r.hset(K.output_entry(event_id), mapping={"event_id": event_id, "job_id": job_id, "claims": 0,
           "event": json.dumps(["job_id", job_id]), "cb_url": "", "cb_body": "", "created_at_ms": 5})  # fmt: skip
    r.zadd(K.outputs_pending, {event_id: 0})
    claim(keys=[K.outputs_pending], args=[10, 1000])  # type: ignore[operator]
    c = int(take(keys=[K.outputs_pending, K.output_entry(event_id)], args=[event_id])[0])  # type: ignore[operator]
    failed = {"claim": c, "outcome": "failed", "error": "store down", "failed_ttl_ms": 60_000,
              "set": {"output_copy": "failed"}, "event": {"output_copy": "failed"}}  # fmt: skip
    assert _settle(settle, event_id, job_id, failed)[0] == 1
    assert r.zscore(K.outputs_failed, event_id) is not None and r.xlen(K.events) == 1
    assert r.xrange(K.events)[0][1]["output_copy"] == "failed"
    assert r.pttl(K.output_entry(event_id)) > 0
    keys = [K.outputs_failed, K.outputs_pending, K.output_entry(event_id), K.job(job_id), K.outputs_since]
    assert retry(keys=keys, args=[event_id]) == 1  # type: ignore[operator]
    assert retry(keys=keys, args=[event_id]) == 0  # type: ignore[operator]  # not given up any more
    assert r.pttl(K.output_entry(event_id)) == -1 and r.zscore(K.outputs_since, event_id) == 5
    assert r.hget(K.job(job_id), "output_copy") == "retrying"
    claim(keys=[K.outputs_pending], args=[10, 1000])  # type: ignore[operator]
    c = int(take(keys=[K.outputs_pending, K.output_entry(event_id)], args=[event_id])[0])  # type: ignore[operator]
    copied = {
        "claim": c,
        "outcome": "copied",
        "set": {"output_copy": "copied"},
        "event": {"output_copy": "copied"},
    }
    assert _settle(settle, event_id, job_id, copied) == [1, ""]  # no second event
    assert r.xlen(K.events) == 1 and r.hget(K.job(job_id), "output_copy") == "copied"


def test_outputs_cli_lists_retries_signs_and_cleans_up(
    redis_url: str,
    rclient: redis.Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for key in list(os.environ):
        if key.startswith("REFRAME_") or key == "FAL_KEY":
            monkeypatch.delenv(key)
    store_dir = tmp_path / "outputs"
    monkeypatch.setenv("REFRAME_REDIS_URL", redis_url)
    monkeypatch.setenv("REFRAME_OUTPUT_STORE_URL", f"file://{store_dir}")
    r = rclient
    job_id = "ab" * 16
    event_id = f"{job_id}.1"
    r.hset(
        K.job(job_id),
        mapping={"id": job_id, "state": "SUCCEEDED", "event_id": event_id, "output_copy": "failed"},
    )
    r.hset(
        K.output_entry(event_id),
        mapping={"event_id": event_id, "job_id": job_id, "last_error": "store: down"},
    )
    r.zadd(K.outputs_failed, {event_id: 1_700_000_000_000})
    assert cli.run(["outputs", "failed"]) == 0
    out = capsys.readouterr().out
    assert job_id[:12] in out and "store: down" in out  # (rich wraps long cells)
    assert cli.run(["outputs", "retry", job_id[:8]]) == 0  # a unique prefix
    assert r.zscore(K.outputs_pending, event_id) is not None and r.zcard(K.outputs_failed) == 0
    assert r.hget(K.job(job_id), "output_copy") == "retrying"
    assert cli.run(["outputs", "retry", "--failed"]) == 0  # nothing left to retry
    assert cli.run(["outputs", "retry", job_id]) == 1  # not a given-up copy any more
    capsys.readouterr()
    # a stored output: a URL that reads it; cleanup past the retention removes exactly it
    sha = hashlib.sha256(b"video").hexdigest()
    key = output_key("acme", sha)
    (store_dir / "t" / "acme").mkdir(parents=True)
    (store_dir / key).write_bytes(b"video")
    r.hset(K.job(job_id), "output_key", key)
    assert cli.run(["outputs", "url", job_id]) == 0
    url = capsys.readouterr().out.strip()
    assert url.startswith("file://") and Path(url.removeprefix("file://")).read_bytes() == b"video"
    assert cli.run(["outputs", "cleanup", "--dry-run"]) == 0  # 30 days: nothing is that old
    assert "0 output(s)" in capsys.readouterr().out and (store_dir / key).exists()
    old = time.time() - 31 * 86400
    os.utime(store_dir / key, (old, old))
    assert cli.run(["outputs", "cleanup", "--dry-run"]) == 0
    assert f"would delete {key}" in capsys.readouterr().out and (store_dir / key).exists()
    assert cli.run(["outputs", "cleanup"]) == 0
    assert f"deleted {key}" in capsys.readouterr().out and not (store_dir / key).exists()
    r.hdel(K.job(job_id), "output_key")
    assert cli.run(["outputs", "url", job_id]) == 2
    assert "is not in the store" in capsys.readouterr().err


def test_a_copy_under_way_keeps_its_claim_and_a_settled_one_is_not_brought_back(rclient: redis.Redis) -> None:
    """The copier renews the lease of the copies it is working on (a long download keeps its copy);
    the renewal only moves entries still pending, so a settled copy never reappears."""
    r = redis.Redis(connection_pool=rclient.connection_pool, decode_responses=True)
    claim = r.register_script(load_lua(LUA / "output_claim.lua"))
    renew = r.register_script(load_lua(LUA / "output_renew.lua"))
    r.zadd(K.outputs_pending, {"e1": 0, "e2": 0})
    assert sorted(claim(keys=[K.outputs_pending], args=[10, 1_000])) == ["e1", "e2"]  # type: ignore[operator]
    leased = r.zscore(K.outputs_pending, "e1")
    assert renew(keys=[K.outputs_pending], args=[60_000, "e1", "gone"]) == 1  # type: ignore[operator]
    assert r.zscore(K.outputs_pending, "e1") >= leased + 59_000  # held for another lease
    assert r.zscore(K.outputs_pending, "e2") == leased  # not renewed: it comes back after its lease
    assert r.zscore(K.outputs_pending, "gone") is None  # XX: nothing is added back
