"""Hostile inputs through the producer library (issue #11).

Every case calls ``Producer.enqueue`` / ``enqueue_many`` / ``cancel`` / ``get`` / ``get_many`` /
``wait`` with something wrong and asserts three things: the exact exception type, that the error
names the bad field by its path, and that Redis is byte-for-byte untouched (DBSIZE, every key with
its type, every list's length).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from types import MappingProxyType
from typing import Any

import pytest
import redis
from pydantic import SecretStr

from config import Settings
from producer import EnqueueRequest, InvalidRequest, Producer

OK: dict[str, Any] = {"video_url": "https://cdn.example.com/clip.mp4", "aspect_ratio": "9:16"}
JOB_ID = "0123456789abcdef0123456789abcdef"

Call = Callable[[Producer], object]


def req(**changes: Any) -> dict[str, Any]:
    return {**OK, **changes}


def nested(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {}
    for _ in range(depth - 1):
        node = {"n": node}
    return node


CASES: list[Any] = []


def case(case_id: str, call: Call, path: str, exc: type[Exception] = InvalidRequest) -> None:
    CASES.append(pytest.param(call, exc, path, id=case_id))


def enqueue_input(case_id: str, data: Any, path: str) -> None:
    case(f"input-{case_id}", lambda p: p.enqueue(data), path)


# ------------------------------------------------------------------ the request itself
for name, bad in [
    ("list", ["https://cdn.example.com/a.mp4", "9:16"]),
    ("tuple", ("https://cdn.example.com/a.mp4", "9:16")),
    ("str", "https://cdn.example.com/a.mp4"),
    ("bytes", b"{}"),
    ("int", 42),
    ("none", None),
    ("set", {"video_url"}),
]:
    enqueue_input(f"not-a-mapping-{name}", bad, "input")

for name, bad in [
    ("int", 42),
    ("bytes", b"https://cdn.example.com/a.mp4"),
    ("list", ["https://cdn.example.com/a.mp4"]),
    ("none", None),
    ("empty", ""),
    ("ftp", "ftp://cdn.example.com/a.mp4"),
    ("file", "file:///etc/passwd"),
    ("path", "/tmp/a.mp4"),
    ("no-host", "https:///a.mp4"),
    ("nul", "https://cdn.example.com/a\x00.mp4"),
    ("crlf", "https://cdn.example.com/a.mp4\r\nX-Evil: 1"),
    ("lf", "https://cdn.example.com/\na.mp4"),
    ("tab", "https://cdn.example.com/\ta.mp4"),
    ("space", "https://cdn.example.com/a b.mp4"),
    ("del", "https://cdn.example.com/a\x7f.mp4"),
    ("1mb", "https://cdn.example.com/" + "a" * 1_000_000),
    ("5kb", "https://cdn.example.com/" + "a" * 5000),
    ("data-no-comma", "data:video/mp4;base64"),
    ("data-bad-base64", "data:video/mp4;base64,@@@@"),
    ("data-too-big", "data:video/mp4;base64," + "A" * 12_000_000),
    ("javascript", "javascript:alert(1)"),
]:
    enqueue_input(f"video-url-{name}", req(video_url=bad), "video_url")

enqueue_input("video-url-missing", {"aspect_ratio": "9:16"}, "video_url")
for name, bad in [
    ("int", 7),
    ("crlf", "https://cdn.example.com/a\r\n.png"),
    ("ftp", "ftp://x.example/a.png"),
]:
    enqueue_input(f"image-url-{name}", req(image_url=bad), "image_url")

for name, bad in [
    ("missing", ...),
    ("2-1", "2:1"),
    ("slash", "9/16"),
    ("int", 916),
    ("float", 0.5625),
    ("none", None),
    ("upper", "9:16 "),
    ("list", ["9:16"]),
    ("bytes", b"9:16"),
]:
    data = {k: v for k, v in req(aspect_ratio=bad).items() if v is not ...}
    if name == "upper":
        data["aspect_ratio"] = "9:16\x00"
    enqueue_input(f"aspect-ratio-{name}", data, "aspect_ratio")

for name, bad in [
    ("int", 5),
    ("list", ["a"]),
    ("too-long", "x" * 2001),
    ("nul", "a calm\x00 beach"),
    ("escape", "a calm \x1b[31m beach"),
    ("huge", "x" * 1_000_000),
]:
    enqueue_input(f"prompt-{name}", req(prompt=bad), "prompt")

for field in ("x_start", "x_end", "y_start", "y_end", "grid_position_x", "grid_position_y"):
    partner = {
        "x_start": "x_end",
        "x_end": "x_start",
        "y_start": "y_end",
        "y_end": "y_start",
        "grid_position_x": "grid_position_y",
        "grid_position_y": "grid_position_x",
    }[field]
    good_partner = 10 if field in ("x_start", "y_start") else 0
    for name, bad in [
        ("bool", True),
        ("str", "5"),
        ("float", 1.0),
        ("frac", 1.5),
        ("neg", -1),
        ("huge", 10**30),
        ("over", 8193),
        ("nan", math.nan),
        ("list", [1]),
    ]:
        enqueue_input(f"{field}-{name}", req(**{field: bad, partner: good_partner}), field)

enqueue_input("x-start-alone", req(x_start=5), "x_end")
enqueue_input("x-end-alone", req(x_end=5), "x_start")
enqueue_input("y-start-alone", req(y_start=5), "y_end")
enqueue_input("grid-x-alone", req(grid_position_x=5), "grid_position_y")
enqueue_input("x-reversed", req(x_start=50, x_end=10), "x_end")
enqueue_input("x-empty", req(x_start=50, x_end=50), "x_end")
enqueue_input("y-reversed", req(y_start=50, y_end=10), "y_end")
enqueue_input("unknown-field", req(resized_width=100), "resized_width")
enqueue_input("unknown-callback-in-input", req(callback_url="https://x.example"), "callback_url")
enqueue_input("wrong-case", req(Aspect_Ratio="9:16"), "Aspect_Ratio")


# ------------------------------------------------------------------ enqueue options
def enqueue_opt(case_id: str, path: str, **kwargs: Any) -> None:
    case(f"option-{case_id}", lambda p: p.enqueue(OK, **kwargs), path)


for name, bad in [
    ("int", 42),
    ("bool", True),
    ("bytes", b"k"),
    ("empty", ""),
    ("space", "order 42"),
    ("slash", "a/b"),
    ("star", "a*"),
    ("newline", "k\n"),
    ("nul", "k\x00"),
    ("unicode", "ordér"),
    ("long", "k" * 201),
    ("huge", "k" * 1_000_000),
    ("list", ["k"]),
]:
    enqueue_opt(f"idempotency-key-{name}", "idempotency_key", idempotency_key=bad)

for name, bad in [
    ("urgent", "urgent"),
    ("upper", "HIGH"),
    ("int", 0),
    ("none-str", "None"),
    ("bytes", b"high"),
]:
    enqueue_opt(f"priority-{name}", "priority", priority=bad)

for name, bad, path in [
    ("list", [1, 2], "metadata"),
    ("str", "{}", "metadata"),
    ("int", 5, "metadata"),
    ("nan", {"k": math.nan}, "metadata.k"),
    ("inf", {"k": math.inf}, "metadata.k"),
    ("neg-inf", {"a": {"b": -math.inf}}, "metadata.a.b"),
    ("nan-in-list", {"k": [1, math.nan]}, "metadata.k[1]"),
    ("set", {"k": {1, 2}}, "metadata.k"),
    ("bytes", {"k": b"x"}, "metadata.k"),
    ("object", {"k": object()}, "metadata.k"),
    ("tuple", {"k": (1, 2)}, "metadata.k"),
    ("int-key", {1: "x"}, "metadata[1]"),
    ("huge-int", {"k": 2**64}, "metadata.k"),
    ("one-mb", {"k": "x" * 1_000_000}, "metadata"),
    ("17-kib", {"k": "x" * 17 * 1024}, "metadata"),
    ("deep", nested(9), "metadata.n.n.n.n.n.n.n.n"),
    ("very-deep", nested(5000), "metadata.n.n.n.n.n.n.n.n"),
    ("many-keys", {f"k{i}": i for i in range(300)}, "metadata"),
]:
    enqueue_opt(f"metadata-{name}", path, metadata=bad)

for name, bad in [
    ("int", 5),
    ("bytes", b"https://cb.example.com"),
    ("not-url", "not a url"),
    ("ftp", "ftp://cb.example.com/h"),
    ("javascript", "javascript:alert(1)"),
    ("no-host", "https:///h"),
    ("crlf", "https://cb.example.com/h\r\nX: 1"),
    ("nul", "https://cb.example.com/\x00"),
    ("100kb", "https://cb.example.com/" + "a" * 100_000),
    ("data", "data:,hello"),
    ("loopback", "http://127.0.0.1/h"),
    ("metadata-ip", "http://169.254.169.254/latest"),
    ("list", ["https://cb.example.com"]),
]:
    enqueue_opt(f"callback-url-{name}", "callback_url", callback_url=bad)

for name, bad in [
    ("zero", 0),
    ("neg", -5),
    ("nan", math.nan),
    ("inf", math.inf),
    ("bool", True),
    ("str", "60"),
    ("over-limit", 10**9),
]:
    enqueue_opt(f"deadline-{name}", "deadline_s", deadline_s=bad)

CASES.append(
    pytest.param(
        lambda p: p.enqueue(req(aspect_ratio="2:1", x_start=True), idempotency_key=42, priority="x"),
        InvalidRequest,
        "aspect_ratio,x_start,idempotency_key,priority",
        id="several-at-once",
    )
)


# ------------------------------------------------------------------ enqueue_many
def batch(case_id: str, items: Any, path: str) -> None:
    case(f"batch-{case_id}", lambda p: p.enqueue_many(items), path)


batch("str", "https://cdn.example.com/a.mp4", "items")
batch("bytes", b"abc", "items")
batch("mapping", OK, "items")
batch("int", 5, "items")
batch("none", None, "items")
batch("too-many", [OK] * 1001, "items")
batch("endless", iter(lambda: OK, None), "items")
batch("item-int", [OK, 5], "items[1]")
batch("item-list", [OK, ["https://cdn.example.com/a.mp4", "9:16"]], "items[1]")
batch("item-none", [None], "items[0]")
batch("item-bad-ratio", [OK, OK, req(aspect_ratio="5:4")], "items[2].aspect_ratio")
batch("item-metadata-nan", [OK, OK, EnqueueRequest(OK, metadata={"k": math.nan})], "items[2].metadata.k")
batch("item-bad-key", [OK, EnqueueRequest(OK, idempotency_key="a b")], "items[1].idempotency_key")
batch("item-bad-priority", [EnqueueRequest(OK, priority="urgent")], "items[0].priority")
batch("item-callback-int", [OK, EnqueueRequest(OK, callback_url=5)], "items[1].callback_url")  # type: ignore[arg-type]
batch("item-input-list", [EnqueueRequest([1, 2])], "items[0].input")  # type: ignore[arg-type]
batch("item-x-alone", [req(x_start=3)], "items[0].x_end")
batch("item-bool-coordinate", [OK, OK, OK, req(y_start=True, y_end=5)], "items[3].y_start")
batch(
    "errors-of-all-items", [req(aspect_ratio="1"), OK, req(prompt=5)], "items[0].aspect_ratio,items[2].prompt"
)
batch("mappingproxy-bad", [MappingProxyType(req(aspect_ratio="x"))], "items[0].aspect_ratio")


# ------------------------------------------------------------------ cancel, get, get_many, wait
for name, bad in [
    ("int", 5),
    ("none", None),
    ("bytes", JOB_ID.encode()),
    ("empty", ""),
    ("glob", "*"),
    ("colon", "a:b"),
    ("crlf", "a\r\nb"),
    ("long", "a" * 65),
    ("huge", "a" * 1_000_000),
    ("list", [JOB_ID]),
]:
    case(f"cancel-{name}", lambda p, bad=bad: p.cancel(bad), "job_id")
    case(f"get-{name}", lambda p, bad=bad: p.get(bad), "job_id")

case("get-many-str", lambda p: p.get_many(JOB_ID), "job_ids")
case("get-many-none", lambda p: p.get_many(None), "job_ids")  # type: ignore[arg-type]
case("get-many-bad-item", lambda p: p.get_many([JOB_ID, "a:b"]), "job_ids[1]")
case("get-many-too-many", lambda p: p.get_many([JOB_ID] * 10_001), "job_ids")
for name, kwargs, path in [
    ("timeout-zero", {"timeout_s": 0}, "timeout_s"),
    ("timeout-neg", {"timeout_s": -1}, "timeout_s"),
    ("timeout-nan", {"timeout_s": math.nan}, "timeout_s"),
    ("timeout-inf", {"timeout_s": math.inf}, "timeout_s"),
    ("timeout-str", {"timeout_s": "5"}, "timeout_s"),
    ("timeout-bool", {"timeout_s": True}, "timeout_s"),
    ("timeout-year", {"timeout_s": 365 * 86400.0}, "timeout_s"),
    ("poll-zero", {"timeout_s": 1.0, "poll_interval_s": 0}, "poll_interval_s"),
    ("poll-hour", {"timeout_s": 1.0, "poll_interval_s": 3600}, "poll_interval_s"),
]:
    case(f"wait-{name}", lambda p, kwargs=kwargs: p.wait(JOB_ID, **kwargs), path)
case("wait-bad-id", lambda p: p.wait("a:b", timeout_s=1.0), "job_id")


# ------------------------------------------------------------------ the harness
def snapshot(r: redis.Redis) -> dict[str, Any]:
    """DBSIZE, every key with its type, and every list's length."""
    keys = sorted(r.keys("*"))
    types = {k: r.type(k) for k in keys}
    lists = {k: r.llen(k) for k, t in types.items() if t == "list"}
    return {"dbsize": r.dbsize(), "types": types, "lists": lists}


@pytest.fixture
def producer(make_settings: Callable[..., Settings], rclient: redis.Redis) -> Iterator[Producer]:
    # A signing key is set so that callback cases test the URL, not the unsigned-callback refusal.
    p = Producer(make_settings(callback_signing_key=SecretStr("k")))
    # Existing state, so "nothing written" is checked against a non-empty database too.
    p.enqueue(OK, idempotency_key="existing")
    yield p
    p.close()


def test_table_has_at_least_150_cases() -> None:
    assert len(CASES) >= 150, len(CASES)


@pytest.mark.parametrize(("call", "exc_type", "paths"), CASES)
def test_hostile_input_is_refused_by_field_and_writes_nothing(
    producer: Producer, rclient: redis.Redis, call: Call, exc_type: type[Exception], paths: str
) -> None:
    before = snapshot(rclient)
    with pytest.raises(Exception) as info:  # the exact type is asserted below
        call(producer)
    assert type(info.value) is exc_type, f"{type(info.value).__name__}: {info.value}"
    assert isinstance(info.value, InvalidRequest)
    named = [field for field, _msg in info.value.errors]
    for path in paths.split(","):
        assert path in named, f"{path!r} not named in {named}"
        assert f"{path}: " in str(info.value)
    assert snapshot(rclient) == before


def test_unsigned_callbacks_are_refused_unless_allowed(
    make_settings: Callable[..., Settings], rclient: redis.Redis
) -> None:
    with Producer(make_settings()) as p:
        before = snapshot(rclient)
        with pytest.raises(InvalidRequest) as info:
            p.enqueue(OK, callback_url="https://cb.example.com/hook")
        assert [f for f, _ in info.value.errors] == ["callback_url"]
        assert "REFRAME_CALLBACK_SIGNING_KEY" in str(info.value)
        assert snapshot(rclient) == before
    with Producer(make_settings(callback_allow_unsigned=True)) as p:
        job = p.get(p.enqueue(OK, callback_url="https://cb.example.com/hook"))
        assert job is not None
        assert rclient.hget(p.store.keys.job(job.id), "callback_url") == "https://cb.example.com/hook"
