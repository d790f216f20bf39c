"""Issue #12: fal webhooks are the completion path. The fal emulator delivers real Ed25519-signed
webhooks to ``reframe serve`` over a real socket; workers finish the jobs through the fenced
lifecycle. Everything is judged by the emulator's ledger (what fal saw and billed) and Redis.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from producer import JobState, Producer
from reframe.localproc import wait_until
from tests.chaos.conftest import KEYS, budget_day, events, explained, new_tag, redis_of, worker_of
from tests.cluster.conftest import upload, wait_terminal
from tests.webhooks.conftest import WebhookCluster

pytestmark = pytest.mark.integration

Factory = Callable[..., WebhookCluster]
#: fal's price per second in micro-dollars (settings default 0.06 USD); the clip is 3 whole seconds.
PRICE_MICRO_PER_S = 60_000
FOLLOW_OPS = {"status", "stream", "result"}


def _inputs(url: str, tag: str, n: int) -> list[dict[str, Any]]:
    return [{"video_url": url, "aspect_ratio": "9:16", "prompt": f"{tag} {i}"} for i in range(n)]


def _request_ids(book: dict[str, Any], fingerprints: set[str] | None = None) -> set[str]:
    return {
        s["request_id"] for s in book["submits"] if fingerprints is None or s["fingerprint"] in fingerprints
    }


def _follow_calls(book: dict[str, Any], request_ids: set[str]) -> list[dict[str, Any]]:
    """Every status, status-stream and result call the emulator saw for these requests."""
    return [r for r in book["requests"] if r["op"] in FOLLOW_OPS and r.get("request_id") in request_ids]


def _job_events(cluster: WebhookCluster, job_ids: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {j: [] for j in job_ids}
    for _sid, ev in events(redis_of(cluster.cluster)):
        if ev.get("job_id") in out:
            out[ev["job_id"]].append(ev["event_id"])
    return out


def test_webhooks_finish_jobs_with_zero_status_requests(webhook_cluster: Factory, whole_clip: Path) -> None:
    wc = webhook_cluster(workers=1)
    url = upload(wc.cluster.settings(), whole_clip)
    ids: list[str] = []
    with Producer(wc.cluster.settings()) as p, explained(wc.cluster, ids):
        ids += p.enqueue_many(_inputs(url, new_tag("webhook-e2e"), 3))
        wait_terminal(p, ids, timeout_s=120)
        jobs = p.get_many(ids)
        assert [j.state for j in jobs if j is not None] == [JobState.SUCCEEDED] * 3
        book = wc.ledger()
        rids = _request_ids(book)
        assert len(rids) == 3 and book["billed_requests"] == 3
        assert _follow_calls(book, rids) == []  # the webhook was the only news from fal
        delivered = [w for w in book["webhooks"] if w["request_id"] in rids]
        assert sorted(w["status"] for w in delivered) == [204, 204, 204]
        assert all("/v1/fal/webhook?t=" in w["url"] for w in delivered)
        assert all(len(e) == 1 for e in _job_events(wc, ids).values())
        r = redis_of(wc.cluster)
        spent, reserved = budget_day(r)
        assert (spent, reserved) == (3 * 3 * PRICE_MICRO_PER_S, 0)
        assert r.zcard(KEYS.slots) == 0 and r.zcard(KEYS.track) == 0
        recs = [r.hgetall(KEYS.job(j)) for j in ids]
        assert {x["fal_request_id"] for x in recs} == rids


def _post(url: str, headers: dict[str, str], body: bytes) -> int:
    return httpx.post(url, content=body, headers=headers, timeout=10).status_code


def test_forged_replayed_and_tampered_webhooks_are_refused_and_change_nothing(
    webhook_cluster: Factory, whole_clip: Path
) -> None:
    """Job A finishes by its genuine webhook (kept by the ledger); job B's webhook is lost, so B
    stays at fal (grace 600 s). Attacks on both change nothing: 401 each time."""
    wc = webhook_cluster(workers=1, env={"REFRAME_WEBHOOK_TOLERANCE_S": "3"})
    control = wc.cluster.emulator_control
    assert control is not None
    url = upload(wc.cluster.settings(), whole_clip)
    r = redis_of(wc.cluster)
    ids: list[str] = []
    tag = new_tag("webhook-attacks")
    with Producer(wc.cluster.settings()) as p, explained(wc.cluster, ids):
        ids.append(p.enqueue(_inputs(url, tag, 1)[0]))
        wait_terminal(p, ids, timeout_s=120)
        book = wc.ledger()
        genuine = next(w for w in book["webhooks"] if w["status"] == 204)
        a_url, a_headers, a_body = genuine["url"], genuine["headers"], genuine["body"].encode()
        control.set_faults([{"op": "webhook", "kind": "drop"}])
        b_id = p.enqueue(_inputs(url, tag + "-b", 1)[0])
        ids.append(b_id)
        wait_until(
            lambda: any(w["attempt"] == 0 for w in wc.ledger()["webhooks"]), timeout_s=120, what="B dropped"
        )
        dropped = next(w for w in wc.ledger()["webhooks"] if w["attempt"] == 0)
        b_url, b_request = dropped["url"], dropped["request_id"]
        b_before = r.hgetall(KEYS.job(b_id))
        assert b_before["state"] in {"IN_QUEUE", "IN_PROGRESS"}

        # forged: a well-formed delivery for B signed with a key that is not in fal's JWKS
        forged_body = json.dumps(
            {
                "request_id": b_request,
                "gateway_request_id": b_request,
                "status": "OK",
                "payload": json.loads(a_body)["payload"],
                "error": None,
            }
        ).encode()
        ts = str(int(time.time()))
        digest = hashlib.sha256(forged_body).hexdigest()
        sig = Ed25519PrivateKey.generate().sign(f"{b_request}\nemulator-user\n{ts}\n{digest}".encode()).hex()
        forged_headers = {
            "Content-Type": "application/json",
            "X-Fal-Webhook-Request-Id": b_request,
            "X-Fal-Webhook-User-Id": "emulator-user",
            "X-Fal-Webhook-Timestamp": ts,
            "X-Fal-Webhook-Signature": sig,
        }
        assert _post(b_url, forged_headers, forged_body) == 401
        # no signature at all
        assert _post(b_url, {"Content-Type": "application/json"}, forged_body) == 401
        # body-tampered: A's genuine signed headers, a different body (B's request, A's video)
        tampered = a_body.replace(b'"status":"OK"', b'"status":"OK" ')
        assert tampered != a_body
        assert _post(b_url, a_headers, tampered) == 401
        # a token that is not ours (the MAC altered) with an otherwise genuine delivery
        token = b_url.split("?t=", 1)[1]
        bad = b_url.replace(token, token[:-2] + ("AA" if not token.endswith("AA") else "BB"))
        assert _post(bad, a_headers, a_body) == 401
        # replayed: A's genuine delivery, byte for byte, once its timestamp is past the tolerance
        wait_until(lambda: time.time() - int(a_headers["X-Fal-Webhook-Timestamp"]) > 4.5, timeout_s=10)
        assert _post(a_url, a_headers, a_body) == 401

        assert r.hgetall(KEYS.job(b_id))["state"] == b_before["state"]
        assert r.hget(KEYS.job(b_id), "fal_request_id") == b_request
        assert not r.exists(f"{KEYS.root}:webhook:seen:{b_request}")
        assert _job_events(wc, ids) == {ids[0]: [f"{ids[0]}.1"], b_id: []}
        assert wc.ledger()["billed_requests"] == 2


def test_lost_webhooks_are_reconciled_by_the_tracker_after_the_grace(
    webhook_cluster: Factory, whole_clip: Path
) -> None:
    grace_s = 4.0
    wc = webhook_cluster(workers=1, env={"REFRAME_WEBHOOK_GRACE_S": str(grace_s)})
    control = wc.cluster.emulator_control
    assert control is not None
    control.set_faults([{"op": "webhook", "kind": "drop", "times": 2}])
    url = upload(wc.cluster.settings(), whole_clip)
    ids: list[str] = []
    with Producer(wc.cluster.settings()) as p, explained(wc.cluster, ids):
        ids += p.enqueue_many(_inputs(url, new_tag("webhook-lost"), 2))
        wait_terminal(p, ids, timeout_s=120)
        assert [j.state for j in p.get_many(ids) if j is not None] == [JobState.SUCCEEDED] * 2
        book = wc.ledger()
        rids = _request_ids(book)
        assert len(rids) == 2 and book["billed_requests"] == 2
        assert sorted(w["error"] for w in book["webhooks"]) == ["dropped", "dropped"]
        submitted_at = {s["request_id"]: s["t"] for s in book["submits"]}
        calls = _follow_calls(book, rids)
        assert {c["request_id"] for c in calls} == rids  # the tracker reconciled both
        # by one status GET each (the request had ended by then) and its result: no stream held
        assert sorted(c["op"] for c in calls) == ["result", "result", "status", "status"]
        # and only after the grace (0.5 s of slack between the emulator's and Redis' clocks)
        assert all(c["t"] >= submitted_at[c["request_id"]] + grace_s - 0.5 for c in calls)
        assert all(len(e) == 1 for e in _job_events(wc, ids).values())
        assert budget_day(redis_of(wc.cluster)) == (2 * 3 * PRICE_MICRO_PER_S, 0)


def test_a_late_webhook_is_rechecked_by_single_status_reads_not_a_held_stream(
    webhook_cluster: Factory, whole_clip: Path
) -> None:
    """The request runs past the grace and its webhook is lost: a tracker reads its status once per
    REFRAME_WEBHOOK_RECHECK_S (no stream held open per job) until it ends, then finishes it."""
    wc = webhook_cluster(
        workers=1,
        env={"REFRAME_WEBHOOK_GRACE_S": "1", "REFRAME_WEBHOOK_RECHECK_S": "2"},
        emulator_processing_time_s=6.0,
    )
    control = wc.cluster.emulator_control
    assert control is not None
    control.set_faults([{"op": "webhook", "kind": "drop"}])
    url = upload(wc.cluster.settings(), whole_clip)
    ids: list[str] = []
    with Producer(wc.cluster.settings()) as p, explained(wc.cluster, ids):
        ids.append(p.enqueue(_inputs(url, new_tag("webhook-recheck"), 1)[0]))
        wait_terminal(p, ids, timeout_s=120)
        assert p.get(ids[0]).state is JobState.SUCCEEDED  # type: ignore[union-attr]
        book = wc.ledger()
        (rid,) = _request_ids(book)
        calls = _follow_calls(book, {rid})
        statuses = [c["t"] for c in calls if c["op"] == "status"]
        assert [c["op"] for c in calls if c["op"] != "status"] == ["result"]  # no stream
        assert len(statuses) >= 2  # still running at the first check
        gaps = [b - a for a, b in itertools.pairwise(statuses)]
        assert all(g >= 2 - 0.5 for g in gaps), gaps  # one read per recheck interval
        assert book["billed_requests"] == 1


def test_duplicated_webhooks_finish_each_job_once(webhook_cluster: Factory, whole_clip: Path) -> None:
    wc = webhook_cluster(workers=2)
    control = wc.cluster.emulator_control
    assert control is not None
    control.set_faults([{"op": "webhook", "kind": "duplicate", "delay_s": 0.5, "times": 2}])
    url = upload(wc.cluster.settings(), whole_clip)
    ids: list[str] = []
    with Producer(wc.cluster.settings()) as p, explained(wc.cluster, ids):
        ids += p.enqueue_many(_inputs(url, new_tag("webhook-dup"), 2))
        wait_terminal(p, ids, timeout_s=120)
        wait_until(lambda: len(wc.ledger()["webhooks"]) == 4, timeout_s=30, what="both copies delivered")
        book = wc.ledger()
        rids = _request_ids(book)
        assert sorted(w["status"] for w in book["webhooks"]) == [204] * 4
        assert {w["request_id"] for w in book["webhooks"]} == rids
        assert _follow_calls(book, rids) == []
        r = redis_of(wc.cluster)
        # both copies answered, the second recognised by its request id: one event per life
        assert _job_events(wc, ids) == {j: [f"{j}.1"] for j in ids}
        assert r.zcard(KEYS.outbox) == 0
        assert budget_day(r) == (2 * 3 * PRICE_MICRO_PER_S, 0)


def _assert_adopted_and_billed_once(wc: WebhookCluster, job_id: str) -> None:
    """The job ended SUCCEEDED through the request its webhook revealed: one submit at fal, one
    bill, the budget charged exactly that, nothing held, one event, no dead letter."""
    r = redis_of(wc.cluster)
    rec = r.hgetall(KEYS.job(job_id))
    book = wc.ledger()
    assert len(book["submits"]) == 1  # never submitted again
    (request_id,) = _request_ids(book)
    assert rec["state"] == "SUCCEEDED", rec
    assert rec["fal_request_id"] == request_id and rec["adopted_by"] == "webhook"
    assert int(rec["cost_actual_micro"]) == 3 * PRICE_MICRO_PER_S
    assert book["billed_requests"] == 1 and book["billed_seconds"] == 3
    assert budget_day(r) == (3 * PRICE_MICRO_PER_S, 0)  # settled from the reservation, once
    assert r.zscore(KEYS.slots, job_id) is None and r.zcard(KEYS.dlq) == 0
    assert _job_events(wc, [job_id]) == {job_id: [f"{job_id}.1"]}
    assert _follow_calls(book, {request_id}) == []
    assert r.zcard("{reframe}:webhook:pending") == 0  # every recorded delivery was handled


@pytest.mark.parametrize("policy", ["dead_letter", "resubmit"])
def test_an_ambiguous_submit_waits_for_its_webhook_and_is_adopted_not_paid_twice(
    webhook_cluster: Factory, whole_clip: Path, policy: str
) -> None:
    """fal takes the submit but the answer is lost. With webhooks on, the job stays SUBMITTING
    (slot and reservation held) instead of being dead-lettered or resubmitted: the webhook names
    the attempt, so the request is adopted and the job succeeds, under either policy."""
    wc = webhook_cluster(workers=1, env={"REFRAME_AMBIGUOUS_SUBMIT_POLICY": policy})
    control = wc.cluster.emulator_control
    assert control is not None
    # the webhook comes 3 s after the lost answer: the job is seen waiting for it first
    control.set_faults(
        [
            {"op": "submit", "kind": "drop", "after_handling": True},
            {"op": "webhook", "kind": "slow", "delay_s": 3},
        ]
    )
    url = upload(wc.cluster.settings(), whole_clip)
    r = redis_of(wc.cluster)
    ids: list[str] = []
    with Producer(wc.cluster.settings()) as p, explained(wc.cluster, ids):
        ids.append(p.enqueue(_inputs(url, new_tag(f"webhook-ambiguous-{policy}"), 1)[0]))
        job_id = ids[0]
        wait_until(
            lambda: r.hget(KEYS.job(job_id), "ambiguous_since_ms") is not None,
            timeout_s=60,
            what="ambiguous submit waiting for its webhook",
        )
        assert r.hget(KEYS.job(job_id), "state") == "SUBMITTING"
        assert r.zscore(KEYS.slots, job_id) is not None  # N still counts the request fal may run
        assert budget_day(r)[1] > 0  # and its money stays reserved
        wait_terminal(p, ids, timeout_s=120)
        _assert_adopted_and_billed_once(wc, job_id)


def test_a_submitter_killed_mid_post_is_adopted_by_the_webhook(
    webhook_cluster: Factory, whole_clip: Path
) -> None:
    """The worker is SIGKILLed while its submit POST waits for fal's answer (fal has the request).
    fal's webhook arrives for an attempt whose submitter is dead: the request is adopted at once,
    by the other worker, nothing is submitted again and fal bills once."""
    wc = webhook_cluster(workers=2)
    control = wc.cluster.emulator_control
    assert control is not None
    control.set_faults([{"op": "submit", "kind": "slow", "delay_s": 25}])
    url = upload(wc.cluster.settings(), whole_clip)
    r = redis_of(wc.cluster)
    ids: list[str] = []
    with Producer(wc.cluster.settings()) as p, explained(wc.cluster, ids):
        ids.append(p.enqueue(_inputs(url, new_tag("webhook-killed-submitter"), 1)[0]))
        job_id = ids[0]
        wait_until(lambda: len(wc.ledger()["submits"]) == 1, timeout_s=60, what="fal took the submit")
        rec = r.hgetall(KEYS.job(job_id))
        assert rec["state"] == "SUBMITTING" and not rec.get("fal_request_id")
        wc.cluster.kill_worker(worker_of(wc.cluster, rec["submit_process"]))
        wait_terminal(p, ids, timeout_s=120)
        _assert_adopted_and_billed_once(wc, job_id)


def test_a_webhook_later_than_the_wait_resolves_the_dead_letter(
    webhook_cluster: Factory, whole_clip: Path
) -> None:
    """The webhook of an ambiguous submit is later than REFRAME_AMBIGUOUS_WEBHOOK_WAIT_S: the policy
    (dead_letter) applies, then the late webhook records the request, corrects the charge to what
    fal billed and frees the held slot, without reopening the job."""
    wc = webhook_cluster(workers=1, env={"REFRAME_AMBIGUOUS_WEBHOOK_WAIT_S": "2"})
    control = wc.cluster.emulator_control
    assert control is not None
    control.set_faults(
        [
            {"op": "submit", "kind": "drop", "after_handling": True},
            {"op": "webhook", "kind": "slow", "delay_s": 12},
        ]
    )
    url = upload(wc.cluster.settings(), whole_clip)
    r = redis_of(wc.cluster)
    ids: list[str] = []
    with Producer(wc.cluster.settings()) as p, explained(wc.cluster, ids):
        ids.append(p.enqueue(_inputs(url, new_tag("webhook-ambiguous-late"), 1)[0]))
        job_id = ids[0]
        wait_until(
            lambda: r.hget(KEYS.job(job_id), "dead_letter_reason") == "ambiguous_submit",
            timeout_s=60,
            what="dead-lettered once the wait ran out",
        )
        assert r.zscore(KEYS.slots, job_id) is not None  # held for the request fal may run
        wait_until(
            lambda: r.hget(KEYS.job(job_id), "ambiguous_resolved") is not None,
            timeout_s=120,
            what="ambiguous submit resolved by its late webhook",
        )
        rec = r.hgetall(KEYS.job(job_id))
        book = wc.ledger()
        assert len(book["submits"]) == 1  # never submitted again
        (request_id,) = _request_ids(book)
        assert rec["state"] == "FAILED" and rec["fal_request_id"] == request_id
        assert rec["ambiguous_resolved"] == "succeeded_at_fal"
        assert int(rec["cost_actual_micro"]) == 3 * PRICE_MICRO_PER_S
        assert json.loads(rec["result"])["video"]["url"]
        assert book["billed_requests"] == 1 and book["billed_seconds"] == 3
        assert budget_day(r) == (3 * PRICE_MICRO_PER_S, 0)  # the estimate (with margin) was corrected
        fair = r.hgetall(f"{KEYS.root}:fc:fair")  # and so was the spend of the job's fal account
        assert int(fair[f"abs:default:d:{fair['abd:default']}"]) == 3 * PRICE_MICRO_PER_S, fair
        assert r.zscore(KEYS.slots, job_id) is None  # the slot held for the unseen request is free
        assert _job_events(wc, ids) == {job_id: [f"{job_id}.1"]}  # the life is not reopened


def test_the_attempt_token_and_signature_scheme_match_fal(webhook_cluster: Factory) -> None:
    """The emulator's JWKS is what the receiver verifies against: its key is Ed25519 (OKP)."""
    wc = webhook_cluster(workers=0)
    jwks = httpx.get(f"{wc.cluster.fal_url}/.well-known/jwks.json", timeout=5).json()
    (key,) = jwks["keys"]
    assert key["kty"] == "OKP" and key["crv"] == "Ed25519"
    assert len(base64.urlsafe_b64decode(key["x"] + "==")) == 32
