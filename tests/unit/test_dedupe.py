"""Paying once for identical work: the canonical key (hostile sources included), the enqueue-time
resolution of the option, and the claim and release scripts on a real Redis."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator

import httpx
import pytest
import redis
from prometheus_client import CollectorRegistry

from config import Settings
from producer import EnqueueRequest, JobState, Producer
from reframe.localproc import wait_until
from worker import lifecycle
from worker.contracts.canonical import canonical_key, is_fal_storage, result_served, strong_etag
from worker.contracts.dedupe import ClaimKind, DedupeStore, canonical_params, is_canonical
from worker.contracts.keys import Keys, celery_queue_keys
from worker.contracts.netguard import GuardedFetcher
from worker.contracts.record import JobRecord
from worker.contracts.store import Fence
from worker.contracts.tenants import TenantLimits, TenantRegistry
from worker.metrics import Metrics
from worker.runtime import Runtime
from worker.submit import Outcome, Submitter

CLIP = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8
SRC = "https://cdn.example.com/clip.mp4"
KEYS = Keys("reframe")


def fetcher_of(handler: Callable[[httpx.Request], httpx.Response]) -> GuardedFetcher:
    """A guarded fetcher whose every host resolves to a public address and answers ``handler``."""
    return GuardedFetcher(
        resolver=lambda _host, _port: ["93.184.216.34"],
        transport_factory=lambda: httpx.MockTransport(handler),
    )


def etag_server(etag: str | None, *, status: int = 206) -> tuple[GuardedFetcher, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        headers = {"content-range": f"bytes 0-0/{len(CLIP)}"}
        if etag is not None:
            headers["etag"] = etag
        return httpx.Response(status, headers=headers, content=CLIP[:1])

    return fetcher_of(handler), seen


def inp(url: str = SRC, **extra: object) -> dict[str, object]:
    return {"video_url": url, "aspect_ratio": "9:16", **extra}


# ---------------------------------------------------------------------- the canonical key
def test_params_are_normalised_without_the_video() -> None:
    a = canonical_params({"video_url": "x", "aspect_ratio": "9:16", "prompt": "p", "x_start": 1})
    b = canonical_params({"x_start": 1, "prompt": "p", "aspect_ratio": "9:16", "video_url": "y"})
    assert a == b == '{"aspect_ratio":"9:16","prompt":"p","x_start":1}'


@pytest.mark.parametrize(
    ("header", "strong"),
    [
        ('"abc123"', True),
        ('  "v1-xyz"  ', True),
        ('W/"abc123"', False),
        ('w/"abc"', False),
        ('""', False),
        ("abc123", False),
        ('"a", "b"', False),
        ('"a"b"', False),
        ('"' + "x" * 300 + '"', False),
        ('"tab\there"', False),
        (None, False),
    ],
)
def test_only_one_strong_etag_is_a_validator(header: str | None, strong: bool) -> None:
    assert (strong_etag(header) is not None) is strong


def test_url_with_a_strong_etag_keys_on_url_and_etag(make_settings: Callable[..., Settings]) -> None:
    s = make_settings()
    f1, seen = etag_server('"v1"')
    k1 = canonical_key(inp(), fetcher=f1, settings=s)
    assert k1.value is not None and is_canonical(k1.value) and k1.basis == "etag"
    assert seen[0].headers["range"] == "bytes=0-0"  # headers only: one byte asked for
    assert canonical_key(inp(), fetcher=etag_server('"v1"')[0], settings=s).value == k1.value
    assert canonical_key(inp(), fetcher=etag_server('"v2"')[0], settings=s).value != k1.value
    other_param = canonical_key(inp(aspect_ratio="1:1"), fetcher=etag_server('"v1"')[0], settings=s)
    assert other_param.value not in (None, k1.value)
    other_url = canonical_key(inp(SRC + "?b=1"), fetcher=etag_server('"v1"')[0], settings=s)
    assert other_url.value not in (None, k1.value)


@pytest.mark.parametrize(
    ("etag", "status"),
    [('W/"v1"', 206), (None, 206), ('"a", "b"', 200), ('"v1"', 404), ('"v1"', 500), ('"v1"', 302)],
)
def test_no_strong_validator_means_no_dedupe(
    make_settings: Callable[..., Settings], etag: str | None, status: int
) -> None:
    key = canonical_key(inp(), fetcher=etag_server(etag, status=status)[0], settings=make_settings())
    assert key.value is None
    assert key.stored.startswith("none (")
    if status in (200, 206):
        assert key.stored == "none (no strong validator)"


def test_data_uri_and_fal_storage_key_on_content(make_settings: Callable[..., Settings]) -> None:
    s = make_settings(fal_cdn_url="https://v3.fal.media")
    reads: list[str] = []

    def storage(request: httpx.Request) -> httpx.Response:
        reads.append(str(request.url))
        return httpx.Response(200, content=CLIP, headers={"etag": '"per-upload"'})

    f = fetcher_of(storage)
    data = "data:video/mp4;base64," + base64.b64encode(CLIP).decode()
    k_data = canonical_key(inp(data), fetcher=f, settings=s)
    k_a = canonical_key(inp("https://v3.fal.media/files/a/clip.mp4"), fetcher=f, settings=s)
    k_b = canonical_key(inp("https://fal.media/files/b/other-name.mp4"), fetcher=f, settings=s)
    assert k_data.basis == k_a.basis == "content"
    assert k_data.value == k_a.value == k_b.value  # the same bytes, however they arrive
    assert len(reads) == 2 and "range" not in reads  # whole files read, never the data: URI
    changed = canonical_key(
        inp("data:video/mp4;base64," + base64.b64encode(CLIP + b"!").decode()), fetcher=f, settings=s
    )
    assert changed.value not in (None, k_data.value)


def test_fal_storage_is_recognised_by_host_or_the_configured_cdn(
    make_settings: Callable[..., Settings],
) -> None:
    s = make_settings(fal_cdn_url="http://127.0.0.1:9000")
    assert is_fal_storage("https://v3.fal.media/files/k/x.mp4", s)
    assert is_fal_storage("http://127.0.0.1:9000/files/k/x.mp4", s)
    assert not is_fal_storage("http://127.0.0.1:9000/fal-ai/model", s)
    assert not is_fal_storage("http://127.0.0.1:9001/files/k/x.mp4", s)
    assert not is_fal_storage("https://evil.example/files/k/x.mp4?fal.media", s)
    assert not is_fal_storage("https://fal.media.evil.example/files/x.mp4", s)


def test_hostile_sources_give_no_key_and_never_raise(make_settings: Callable[..., Settings]) -> None:
    s = make_settings(fal_cdn_url="https://v3.fal.media", max_upload_bytes=1024)

    def huge(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"x" * 4096)

    def broken(_request: httpx.Request) -> httpx.Response:
        raise httpx.ReadError("connection reset")

    big = canonical_key(inp("https://v3.fal.media/files/k/big.mp4"), fetcher=fetcher_of(huge), settings=s)
    assert big.stored == "none (input over REFRAME_MAX_UPLOAD_BYTES)"
    big_data = "data:video/mp4;base64," + base64.b64encode(b"x" * 4096).decode()
    assert canonical_key(inp(big_data), fetcher=fetcher_of(huge), settings=s).value is None
    bad_data = canonical_key(inp("data:video/mp4;base64,@@@"), fetcher=fetcher_of(huge), settings=s)
    assert bad_data.stored == "none (malformed data: URI)"
    reset = canonical_key(inp(), fetcher=fetcher_of(broken), settings=s)
    assert reset.value is None and "unreadable" in reset.reason
    # an internal address is refused by the guarded fetcher before any connection
    internal = GuardedFetcher(transport_factory=lambda: httpx.MockTransport(huge))
    blocked = canonical_key(inp("http://127.0.0.1/clip.mp4"), fetcher=internal, settings=s)
    assert blocked.value is None and "BlockedURL" in blocked.reason
    assert not result_served("http://169.254.169.254/latest", fetcher=internal, settings=s)


# ---------------------------------------------------------------------- enqueue: request > tenant > cluster
@pytest.fixture
def producer(make_settings: Callable[..., Settings], rclient: redis.Redis) -> Iterator[Producer]:
    p = Producer(make_settings())
    yield p
    p.close()


def test_the_option_is_resolved_at_enqueue(
    make_settings: Callable[..., Settings], producer: Producer, rclient: redis.Redis
) -> None:
    def stored(job_id: str) -> str:
        return str(rclient.hget(KEYS.job(job_id), "dedupe"))

    assert stored(producer.enqueue(inp())) == "0"  # cluster default off
    assert stored(producer.enqueue(inp(), dedupe=True)) == "1"
    TenantRegistry(rclient, KEYS).set("acme", TenantLimits(dedupe=True))
    assert TenantRegistry(rclient, KEYS).get("acme").dedupe is True
    assert stored(producer.enqueue(inp(), tenant="acme")) == "1"
    assert stored(producer.enqueue(inp(), tenant="acme", dedupe=False)) == "0"
    ids = producer.enqueue_many([inp(), EnqueueRequest(inp(), dedupe=False)], tenant="acme")
    assert [stored(i) for i in ids] == ["1", "0"]
    on = Producer(make_settings(dedupe_default=True))
    try:
        assert stored(on.enqueue(inp())) == "1"
        TenantRegistry(rclient, KEYS).set("beta", TenantLimits(dedupe=False))
        assert stored(on.enqueue(inp(), tenant="beta")) == "0"
    finally:
        on.close()
    # the fingerprint (idempotency) does not depend on the option
    a = producer.enqueue(inp(), idempotency_key="k1", dedupe=True)
    assert producer.enqueue(inp(), idempotency_key="k1", dedupe=False) == a


def test_dedupe_is_strictly_a_bool(producer: Producer) -> None:
    from producer import InvalidRequest

    with pytest.raises(InvalidRequest, match="dedupe"):
        producer.enqueue(inp(), dedupe=1)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- claim and release
CANON = "ab" * 32


def gated(producer: Producer, **kwargs: object) -> tuple[str, str]:
    job_id = producer.enqueue(inp(), dedupe=True, **kwargs)  # type: ignore[arg-type]
    gate = producer.store.gate(job_id, gate_ttl_ms=30_000)
    assert gate.owner
    return job_id, gate.attempt


def claim(store: DedupeStore, job_id: str, attempt: str, refuse: str = "") -> object:
    return store.claim(job_id, attempt, CANON, lease_ms=60_000, retention_ms=60_000, refuse_done=refuse)


def succeed(r: redis.Redis, job_id: str, url: str = "https://v3.fal.media/files/o/out.mp4") -> None:
    result = json.dumps({"video": {"url": url, "content_type": "video/mp4"}})
    r.hset(KEYS.job(job_id), mapping={"state": "SUCCEEDED", "result": result, "cost_actual_micro": 180000})


def test_lead_follow_serve_and_take_over(producer: Producer, rclient: redis.Redis) -> None:
    store = DedupeStore(rclient, KEYS)
    leader, la = gated(producer)
    c = claim(store, leader, la)
    assert c.kind is ClaimKind.LEAD  # type: ignore[attr-defined]
    assert claim(store, leader, la).kind is ClaimKind.LEAD  # type: ignore[attr-defined]  # again: still
    f1, a1 = gated(producer)
    c1 = claim(store, f1, a1)
    assert (c1.kind, c1.other) == (ClaimKind.FOLLOW, leader)  # type: ignore[attr-defined]
    assert rclient.zscore(KEYS.dedupe_followers(CANON), f1) is not None
    # the fence: another attempt of the follower may not claim
    assert claim(store, f1, "999").kind is ClaimKind.REFUSED  # type: ignore[attr-defined]
    # a live leader's release changes nothing; a succeeded one is remembered and hands back followers
    assert store.release(leader, CANON, retention_ms=60_000) == []
    succeed(rclient, leader)
    assert store.release(leader, CANON, retention_ms=60_000) == [f1]
    assert rclient.get(KEYS.dedupe_done(CANON)) == leader
    assert rclient.get(KEYS.dedupe_leader(CANON)) is None
    served = claim(store, f1, a1)
    assert served.kind is ClaimKind.SERVED and served.other == leader  # type: ignore[attr-defined]
    assert served.result["video"]["url"].endswith("out.mp4") and served.cost_micro == 180000  # type: ignore[attr-defined]
    # a result whose URL is gone is refused: the done name is dropped and the job leads instead
    f2, a2 = gated(producer)
    assert claim(store, f2, a2, refuse=leader).kind is ClaimKind.LEAD  # type: ignore[attr-defined]
    assert rclient.get(KEYS.dedupe_done(CANON)) is None


def test_a_failed_or_blocked_leader_is_not_waited_for(producer: Producer, rclient: redis.Redis) -> None:
    store = DedupeStore(rclient, KEYS)
    leader, la = gated(producer)
    assert claim(store, leader, la).kind is ClaimKind.LEAD  # type: ignore[attr-defined]
    rclient.hset(KEYS.job(leader), "state", "BLOCKED")
    f1, a1 = gated(producer)
    assert claim(store, f1, a1).kind is ClaimKind.ALONE  # type: ignore[attr-defined]
    rclient.hset(KEYS.job(leader), "state", "IN_PROGRESS")
    assert claim(store, f1, a1).kind is ClaimKind.FOLLOW  # type: ignore[attr-defined]
    # the leader failed and its release never ran: the follower takes over at its next look
    rclient.hset(KEYS.job(leader), "state", "FAILED")
    assert claim(store, f1, a1).kind is ClaimKind.LEAD  # type: ignore[attr-defined]
    assert rclient.get(KEYS.dedupe_leader(CANON)) == f1
    # the old leader's late release does not remove the new leader nor remember a failure
    assert store.release(leader, CANON, retention_ms=60_000) == []
    assert rclient.get(KEYS.dedupe_leader(CANON)) == f1
    assert rclient.get(KEYS.dedupe_done(CANON)) is None


def test_a_leader_dead_lettered_as_ambiguous_is_followed_not_paid_again(
    producer: Producer, rclient: redis.Redis
) -> None:
    """fal may still run (and bill) an ambiguous submit: identical jobs follow it for the ambiguous
    hold instead of submitting again; its webhook then serves them or frees them."""
    store = DedupeStore(rclient, KEYS)
    leader, la = gated(producer)
    assert claim(store, leader, la).kind is ClaimKind.LEAD  # type: ignore[attr-defined]
    now_ms = int(rclient.time()[0]) * 1000
    ambiguous = {"state": "FAILED", "dead_letter_reason": "ambiguous_submit", "finished_at_ms": now_ms}
    rclient.hset(KEYS.job(leader), mapping=ambiguous)

    def look(job_id: str, attempt: str, hold_ms: int) -> object:
        return store.claim(
            job_id, attempt, CANON, lease_ms=60_000, retention_ms=60_000, ambiguous_hold_ms=hold_ms
        )

    f1, a1 = gated(producer)
    assert look(f1, a1, 3_600_000).kind is ClaimKind.FOLLOW  # type: ignore[attr-defined]
    # the late webhook says fal ran it: the follower is served its result, nothing paid again
    result = json.dumps({"video": {"url": "https://v3.fal.media/files/o/late.mp4"}})
    rclient.hset(KEYS.job(leader), mapping={"ambiguous_resolved": "succeeded_at_fal", "result": result})
    served = look(f1, a1, 3_600_000)
    assert served.kind is ClaimKind.SERVED and served.other == leader  # type: ignore[attr-defined]
    # fal did not run it: a follower leads; and past the hold without news, too
    rclient.hset(KEYS.job(leader), mapping={"ambiguous_resolved": "failed_at_fal", "result": ""})
    f2, a2 = gated(producer)
    assert look(f2, a2, 3_600_000).kind is ClaimKind.LEAD  # type: ignore[attr-defined]
    leader2 = f2
    rclient.hset(KEYS.job(leader2), mapping=ambiguous)
    f3, a3 = gated(producer)
    assert look(f3, a3, 0).kind is ClaimKind.LEAD  # type: ignore[attr-defined]


def test_a_succeeded_leader_whose_release_was_lost_still_serves(
    producer: Producer, rclient: redis.Redis
) -> None:
    store = DedupeStore(rclient, KEYS)
    leader, la = gated(producer)
    claim(store, leader, la)
    succeed(rclient, leader)  # ended, but dedupe_release.lua never ran (a crash between the scripts)
    f1, a1 = gated(producer)
    c = claim(store, f1, a1)
    assert c.kind is ClaimKind.SERVED and c.other == leader  # type: ignore[attr-defined]
    assert rclient.get(KEYS.dedupe_done(CANON)) == leader
    assert store.lookup(CANON) is not None and store.lookup(CANON).job_id == leader  # type: ignore[union-attr]
    # the record of the remembered job expired: nothing is served from it
    rclient.delete(KEYS.job(leader))
    f2, a2 = gated(producer)
    assert claim(store, f2, a2).kind is ClaimKind.LEAD  # type: ignore[attr-defined]


# ---------------------------------------------------------------------- the submitter's step
DATA_CLIP = "data:video/mp4;base64," + base64.b64encode(CLIP).decode()
OUT = "https://v3.fal.media/files/o/out.mp4"


@pytest.fixture
def runtime(make_settings: Callable[..., Settings], rclient: redis.Redis) -> Iterator[Runtime]:
    rt = Runtime.build(make_settings(max_concurrency=1), metrics=Metrics(CollectorRegistry()))
    gone: set[str] = set()

    def cdn(request: httpx.Request) -> httpx.Response:
        if str(request.url.path) in gone:
            return httpx.Response(404)
        return httpx.Response(206, headers={"content-range": "bytes 0-0/10"}, content=b"x")

    rt.fetcher = fetcher_of(cdn)
    rt.gone = gone  # type: ignore[attr-defined]
    yield rt
    rt.close()


def enqueue_identical(rt: Runtime, **kw: object) -> str:
    with Producer(rt.settings, client=rt.redis) as p:
        return p.enqueue({"video_url": DATA_CLIP, "aspect_ratio": "9:16"}, dedupe=True, **kw)  # type: ignore[arg-type]


def lead_and_succeed(rt: Runtime, r: redis.Redis) -> tuple[str, str]:
    """A leader that claimed its canonical input through the submitter's step and then succeeded."""
    leader = enqueue_identical(rt)
    gate = lifecycle.begin(rt, leader)
    rec = rt.store.record(leader)
    assert rec is not None
    step = Submitter(rt)._pay_once(rec, gate.attempt)
    assert not isinstance(step, Outcome) and step.get("dedupe_role") == ""
    canonical = str(r.hget(KEYS.job(leader), "dedupe_key"))
    assert is_canonical(canonical) and r.get(KEYS.dedupe_leader(canonical)) == leader
    return leader, canonical


def test_a_follower_is_parked_then_served_when_its_leader_succeeds(
    runtime: Runtime, rclient: redis.Redis
) -> None:
    leader, canonical = lead_and_succeed(runtime, rclient)
    rclient.hset(KEYS.job(leader), "state", "IN_PROGRESS")
    follower = enqueue_identical(runtime)
    assert Submitter(runtime).handle(follower) is Outcome.ATTACHED
    rec = rclient.hgetall(KEYS.job(follower))
    assert (rec["state"], rec["deferred_reason"], rec["dedupe_leader"]) == (
        "DEFERRED",
        "dedupe_attached",
        leader,
    )
    assert rclient.zscore(KEYS.delayed, follower) is not None
    assert not runtime.flow.slots.holds(follower) and runtime.flow.budget.reservation(follower) is None
    # the leader ends SUCCEEDED through lifecycle.finish: remembered, and its follower dispatched
    done = lifecycle.finish(
        runtime,
        JobRecord.from_hash(rclient.hgetall(KEYS.job(leader))),
        JobState.SUCCEEDED,
        fence=Fence(),
        fields={"result": {"video": {"url": OUT}}, "cost_actual_micro": 180_000},
    )
    assert done and rclient.get(KEYS.dedupe_done(canonical)) == leader
    queued = [m for k in celery_queue_keys("reframe") for m in rclient.lrange(k, 0, -1)]
    assert any(follower in m for m in queued)
    assert Submitter(runtime).handle(follower) is Outcome.SERVED
    served = rclient.hgetall(KEYS.job(follower))
    assert (served["state"], served["deduped_from"], served["cost_actual_micro"]) == (
        "SUCCEEDED",
        leader,
        "0",
    )
    assert json.loads(served["result"])["video"]["url"] == OUT
    entries = [f for _id, f in rclient.xrange(KEYS.ledger)]
    assert [f["job_id"] for f in entries] == []  # the leader's settlement was not part of this test
    # its own copy of the output goes to the store (no copier runs here): the event waits in the copy
    # entry, charged nothing, so the copy has nothing to correct
    assert served["output_copy"] == "pending"
    assert not [f for _id, f in rclient.xrange(KEYS.events) if f["job_id"] == follower]
    entry = rclient.hgetall(KEYS.output_entry(served["event_id"]))
    assert entry["source_url"] == OUT and entry["settled_billed_s"] == "" and entry["settled_micro"] == "0"
    pairs = json.loads(entry["event"])  # the stream entry's field list, published by the copier
    held = dict(zip(pairs[::2], pairs[1::2], strict=True))
    assert held["deduped_from"] == leader and held["cost_usd"] == "0.000000"
    assert runtime.metrics.dedup_saved._value.get() == pytest.approx(0.18)


def test_a_job_past_its_deadline_is_still_served_but_a_gone_result_is_not_reused(
    runtime: Runtime, rclient: redis.Redis
) -> None:
    leader, canonical = lead_and_succeed(runtime, rclient)
    lifecycle.finish(
        runtime,
        JobRecord.from_hash(rclient.hgetall(KEYS.job(leader))),
        JobState.SUCCEEDED,
        fence=Fence(),
        fields={"result": {"video": {"url": OUT}}, "cost_actual_micro": 180_000},
    )
    late = enqueue_identical(runtime, deadline_s=0.01)
    wait_until(lambda: lifecycle.past_deadline(runtime, runtime.store.record(late)), timeout_s=2, what="late")  # type: ignore[arg-type]
    assert Submitter(runtime).handle(late) is Outcome.SERVED
    assert rclient.hget(KEYS.job(late), "deduped_from") == leader
    # fal's CDN no longer serves the output: the success is forgotten and nothing is served from it
    runtime.gone.add("/files/o/out.mp4")  # type: ignore[attr-defined]
    later = enqueue_identical(runtime, deadline_s=0.01)
    wait_until(
        lambda: lifecycle.past_deadline(runtime, runtime.store.record(later)), timeout_s=2, what="late"
    )  # type: ignore[arg-type]
    assert Submitter(runtime).handle(later) is Outcome.FAILED  # past its deadline, and nothing to reuse
    assert rclient.hget(KEYS.job(later), "deduped_from") is None
    assert rclient.get(KEYS.dedupe_done(canonical)) is None
