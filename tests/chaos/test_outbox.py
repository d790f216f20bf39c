"""Issue #9: callbacks from the outbox, judged by a real HTTP receiver that records every request.

A replayed job's two lives must reach the receiver as two events (``<id>.1`` FAILED, ``<id>.2``
SUCCEEDED), each body the snapshot of its own life; and a worker SIGKILLed while delivering must
not lose the callback (another process delivers it after the delivery lease).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from producer import JobState, Priority, Producer
from reframe.localcluster import LocalCluster
from reframe.localproc import wait_until
from tests.chaos.conftest import (
    KEYS,
    Delivery,
    Receiver,
    explained,
    new_tag,
    redis_of,
)
from tests.cluster.conftest import upload
from worker.callbacks import verify

pytestmark = pytest.mark.integration

ClusterFactory = Callable[..., LocalCluster]
SIGNING_KEY = "chaos-callback-key"
CALLBACK_ENV = {"REFRAME_CALLBACK_SIGNING_KEY": SIGNING_KEY}


def _signed(d: Delivery) -> bool:
    return verify(SIGNING_KEY.encode(), d.headers.get("x-reframe-signature", ""), d.body)


def _outbox_empty(r: object, event_ids: list[str]) -> bool:
    return (
        r.zcard(KEYS.outbox) == 0  # type: ignore[attr-defined]
        and not any(r.exists(KEYS.outbox_entry(e)) for e in event_ids)  # type: ignore[attr-defined]
    )


def test_a_replayed_job_calls_back_once_per_life_with_each_lifes_snapshot(
    chaos_cluster: ClusterFactory, whole_clip: Path
) -> None:
    """Life 1 dead-letters (fal refuses the submit with 422), life 2 succeeds after a replay. The
    receiver refuses life 1's callback until life 2's has arrived, so life 1 is delivered after the
    record already says SUCCEEDED: its body must still be life 1's snapshot."""
    cluster = chaos_cluster(
        workers=2, emulator_concurrency=4, emulator_processing_time_s=0.5, env=CALLBACK_ENV
    )
    r = redis_of(cluster)
    control = cluster.emulator_control
    assert control is not None
    url = upload(cluster.settings(), whole_clip)
    tag = new_tag("replay-callbacks")
    second_life_seen = threading.Event()

    def answer(_index: int, d: Delivery) -> int:
        if d.event_id.endswith(".2"):
            second_life_seen.set()
            return 200
        return 200 if second_life_seen.is_set() else 503

    ids: list[str] = []
    control.set_faults(
        [{"op": "submit", "kind": "http", "status": 422, "json": {"detail": "rejected by chaos"}, "times": 1}]
    )
    with Receiver(answer) as receiver, Producer(cluster.settings()) as p, explained(cluster, ids):
        job_id = p.enqueue(
            {"video_url": url, "aspect_ratio": "9:16", "prompt": tag}, callback_url=receiver.url
        )
        ids.append(job_id)
        print("job id:", job_id)
        wait_until(
            lambda: (j := p.get(job_id)) is not None and j.state is JobState.FAILED,
            timeout_s=30,
            what="life 1 dead-lettered",
        )
        job = p.get(job_id)
        assert job is not None and job.dead_letter_reason == "fal_rejected", job
        wait_until(lambda: len(receiver.seen()) >= 1, timeout_s=30, what="life 1's first callback try")
        replayed = p.store.replay(job_id, Priority.NORMAL)
        assert replayed.ok, replayed
        wait_until(
            lambda: (j := p.get(job_id)) is not None and j.state is JobState.SUCCEEDED,
            timeout_s=30,
            what="life 2 succeeded",
        )
        event_ids = [f"{job_id}.1", f"{job_id}.2"]
        wait_until(
            # delivered (the outbox entry goes only when the receiver accepted it), not given up
            lambda: second_life_seen.is_set() and _outbox_empty(r, event_ids),
            timeout_s=45,
            what="both lives delivered and the outbox drained",
        )
        seen = receiver.seen()
    print("deliveries:", [(d.event_id, d.json().get("state")) for d in seen])
    assert {d.event_id for d in seen} == set(event_ids)
    by_event = {d.event_id: d for d in seen}  # what a receiver de-duplicating by event id keeps
    assert len(by_event) == 2
    life1, life2 = by_event[event_ids[0]].json(), by_event[event_ids[1]].json()
    assert (life1["state"], life1["life"], life1["event_id"]) == ("FAILED", 1, event_ids[0])
    assert life1["error"]["type"] == "fal_rejected" and life1["video"] is None
    assert (life2["state"], life2["life"], life2["event_id"]) == ("SUCCEEDED", 2, event_ids[1])
    assert life2["error"] is None and life2["video"]["url"]
    # Life 1 was refused until life 2 had arrived: it was redelivered later, the same snapshot.
    firsts = [d for d in seen if d.event_id == event_ids[0]]
    assert len(firsts) >= 2 and len({d.body for d in firsts}) == 1
    assert seen.index(firsts[-1]) > seen.index(by_event[event_ids[1]])
    assert all(_signed(d) for d in seen)
    assert r.zcard(KEYS.callbacks_failed) == 0


def test_a_worker_killed_mid_delivery_loses_no_callback(
    chaos_cluster: ClusterFactory, whole_clip: Path
) -> None:
    """The only worker is SIGKILLed while its POST of the callback is held open by the receiver; a
    new worker delivers it once the delivery lease (REFRAME_CALLBACK_LEASE_S) has passed."""
    lease_s = 5
    cluster = chaos_cluster(
        workers=1,
        emulator_concurrency=4,
        emulator_processing_time_s=0.2,
        env={**CALLBACK_ENV, "REFRAME_CALLBACK_LEASE_S": str(lease_s)},
    )
    r = redis_of(cluster)
    url = upload(cluster.settings(), whole_clip)
    tag = new_tag("killed-delivery")
    release = threading.Event()

    def answer(index: int, _d: Delivery) -> int:
        if index == 0:
            release.wait(lease_s + 60)  # hold the first try open: the sender dies
        return 200

    ids: list[str] = []
    with Receiver(answer) as receiver, Producer(cluster.settings()) as p, explained(cluster, ids):
        try:
            job_id = p.enqueue(
                {"video_url": url, "aspect_ratio": "1:1", "prompt": tag}, callback_url=receiver.url
            )
            ids.append(job_id)
            event_id = f"{job_id}.1"
            print("job id:", job_id)
            wait_until(lambda: len(receiver.seen()) >= 1, timeout_s=30, what="the first callback try arrived")
            assert r.hget(KEYS.job(job_id), "state") == "SUCCEEDED"
            # The entry is claimed (leased into the future) by the worker whose POST is held open.
            assert r.exists(KEYS.outbox_entry(event_id))
            leased_until = r.zscore(KEYS.outbox, event_id)
            seconds, micro = r.time()
            assert leased_until is not None and leased_until > seconds * 1000 + micro // 1000
            victim = cluster.workers[0]
            print(f"SIGKILL {victim.process.name} (pid {victim.process.pid}) mid-delivery of {event_id}")
            cluster.kill_worker(victim)
            cluster.start_worker(name="successor")
            wait_until(
                lambda: len(receiver.seen()) >= 2,
                timeout_s=lease_s + 30,
                interval_s=0.5,
                what="the successor delivered the callback after the lease",
            )
            wait_until(lambda: _outbox_empty(r, [event_id]), timeout_s=15, what="the outbox entry settled")
        finally:
            release.set()
        seen = receiver.seen()
    assert {d.event_id for d in seen} == {event_id}  # exactly once per life after de-duplication
    assert len({d.body for d in seen}) == 1  # the same snapshot, whoever delivers it
    body = seen[-1].json()
    assert (body["state"], body["life"], body["job_id"]) == ("SUCCEEDED", 1, job_id)
    assert all(_signed(d) for d in seen)
    assert r.zcard(KEYS.callbacks_failed) == 0
    assert r.hget(KEYS.job(job_id), "callback_status") == "delivered"
