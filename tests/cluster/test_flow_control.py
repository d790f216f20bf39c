"""Cluster-wide flow control with three real worker processes; the emulator's ledger is the judge."""

from __future__ import annotations

import random
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from producer import EnqueueRequest, JobState, Producer
from reframe.demo import make_sample_video
from reframe.localcluster import LocalCluster
from reframe.localproc import wait_until
from tests.cluster.conftest import ClusterFactory, fingerprint_of, upload, wait_terminal
from worker.flow import FlowControl

pytestmark = pytest.mark.integration


def ledger(cluster: LocalCluster) -> dict[str, Any]:
    assert cluster.emulator_control is not None
    return cluster.emulator_control.ledger()


def fp(request: dict[str, Any]) -> str:
    return fingerprint_of(request)


#: How long after a breaker opens a submit let through just before it may still reach fal (see the test).
DECIDED_GRACE_S = 0.5


def open_periods(timeline: list[tuple[float, str, float]]) -> list[float]:
    """Distinct OPEN periods seen in a sampled (time, state, open_until_s) timeline, by their end."""
    return sorted({until for _t, state, until in timeline if state == "open"})


def submit_times(cluster: LocalCluster) -> list[float]:
    """Arrival times (emulator clock) of every submit request, whatever its answer."""
    return sorted(r["t"] for r in ledger(cluster)["requests"] if r["op"] == "submit")


def test_never_more_than_n_open_at_fal_even_while_workers_are_killed(
    make_cluster: ClusterFactory, sample_video: Path
) -> None:
    n = 4
    cluster = make_cluster(
        workers=3,
        emulator_concurrency=n,
        emulator_processing_time_s=0.3,
        env={"REFRAME_MAX_CONCURRENCY": str(n)},
    )
    url = upload(cluster.settings(), sample_video)
    request = {"video_url": url, "aspect_ratio": "9:16"}
    with Producer(cluster.settings()) as p:
        ids = p.enqueue_many([request] * 240)
        # Kill a worker at a random point twice while the backlog drains, replacing it each time.
        rng = random.Random(7)
        for round_ in range(2):
            target = 60 * (round_ + 1) + rng.randint(0, 20)
            wait_until(
                lambda t=target: sum(j is not None and j.terminal for j in p.get_many(ids)) >= t,
                timeout_s=120,
                what=f"{target} jobs done",
            )
            victim = cluster.workers[rng.randrange(len(cluster.workers))]
            cluster.kill_worker(victim, signal.SIGKILL)
            cluster.start_worker(name=f"replacement-{round_}")
        wait_terminal(p, ids, timeout_s=240)
        jobs = p.get_many(ids)
    book = ledger(cluster)
    assert book["max_open"] <= n, book["max_open"]
    assert book["max_in_progress"] <= n
    succeeded = [j for j in jobs if j is not None and j.state is JobState.SUCCEEDED]
    # A kill that lands inside a submit's HTTP call leaves its outcome unknown: by the documented
    # policy that job is dead-lettered as an ambiguous submit, never resubmitted.
    ambiguous = [j for j in jobs if j is not None and j.dead_letter_reason == "ambiguous_submit"]
    assert len(succeeded) + len(ambiguous) == len(ids), [
        (j.state, j.error) for j in jobs if j and j not in succeeded
    ]
    assert len(ambiguous) <= 2 * n, (
        "only jobs holding one of the N slots can be mid-submit when a worker dies"
    )
    assert len({j.fal_request_id for j in succeeded}) == len(succeeded)
    # Never a second fal submission for a job: every submission is a succeeded job's or an ambiguous one's.
    assert len(succeeded) <= book["submissions"][fp(request)] <= len(succeeded) + len(ambiguous)


def test_rate_limit_zero_429s_under_10x_overload_and_retry_after_is_a_floor(
    make_cluster: ClusterFactory, sample_video: Path
) -> None:
    rate = 4.0
    cluster = make_cluster(
        workers=3,
        emulator_concurrency=20,
        emulator_processing_time_s=0.0,
        emulator_args=["--submit-rate-per-s", str(rate), "--submit-burst", "4"],
        env={
            "REFRAME_MAX_CONCURRENCY": "20",
            "REFRAME_SUBMIT_RATE_PER_S": str(rate),
            # Same rate as fal; a smaller burst than fal's leaves room for the jitter between taking a
            # token and the request reaching fal (three busy processes share two cores here).
            "REFRAME_SUBMIT_BURST": "1",
        },
    )
    url = upload(cluster.settings(), sample_video)
    with Producer(cluster.settings()) as p:
        # 10x overload: 40 jobs at once against 4 submits per second.
        ids = p.enqueue_many([{"video_url": url, "aspect_ratio": "1:1"}] * 40)
        wait_terminal(p, ids, timeout_s=90)
        assert all(j is not None and j.state is JobState.SUCCEEDED for j in p.get_many(ids))
    book = ledger(cluster)
    assert book["count_429"] == 0
    assert len([r for r in book["requests"] if r["op"] == "submit"]) == 40

    # Now fal pushes back once with Retry-After: 3 -- every worker must hold its submits until then.
    assert cluster.emulator_control is not None
    cluster.emulator_control.reset()
    cluster.emulator_control.set_faults(
        [{"op": "submit", "kind": "http", "status": 429, "headers": {"Retry-After": "3"}, "times": 1}]
    )
    with Producer(cluster.settings()) as p:
        ids = p.enqueue_many([{"video_url": url, "aspect_ratio": "4:3"}] * 12)
        wait_terminal(p, ids, timeout_s=90)
        assert all(j is not None and j.state is JobState.SUCCEEDED for j in p.get_many(ids))
    requests = [r for r in ledger(cluster)["requests"] if r["op"] == "submit"]
    pushed_back = [r["t"] for r in requests if r["status"] == 429]
    assert len(pushed_back) == 1
    t0 = pushed_back[0]
    # Submits already on the wire when the 429 was answered may land within a few ms; none after that
    # may arrive before t0 + 3 s.
    early = [r["t"] - t0 for r in requests if t0 + 0.05 < r["t"] < t0 + 3.0]
    assert early == [], early


def test_breaker_opens_on_5xx_lets_only_p_probes_through_and_recovers(
    make_cluster: ClusterFactory, sample_video: Path
) -> None:
    probes = 1
    cluster = make_cluster(
        workers=3,
        emulator_concurrency=10,
        emulator_processing_time_s=0.0,
        env={
            "REFRAME_MAX_CONCURRENCY": "10",
            "REFRAME_BREAKER_WINDOW_S": "20",
            "REFRAME_BREAKER_MIN_CALLS": "4",
            "REFRAME_BREAKER_FAILURE_RATIO": "0.5",
            "REFRAME_BREAKER_OPEN_BASE_S": "1.5",
            "REFRAME_BREAKER_OPEN_CAP_S": "3",
            "REFRAME_BREAKER_HALF_OPEN_PROBES": str(probes),
            "REFRAME_RETRY_MAX_ATTEMPTS": "20",
            "REFRAME_RETRY_BASE_S": "0.2",
            "REFRAME_RETRY_CAP_S": "1",
        },
    )
    url = upload(cluster.settings(), sample_video)
    assert cluster.emulator_control is not None
    cluster.emulator_control.set_faults(
        [
            {
                "op": "submit",
                "kind": "http",
                "status": 503,
                "json": {"detail": "Runner unavailable", "error_type": "runner_scheduling_failure"},
                "times": -1,
            }
        ]
    )
    r = redis.Redis.from_url(cluster.redis_url)
    flow = FlowControl.from_settings(r, cluster.settings())
    timeline: list[tuple[float, str, float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            snap = flow.breaker.state()
            timeline.append((time.time(), snap.state.value, snap.open_until_ms / 1000))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with Producer(cluster.settings()) as p:
        ids = p.enqueue_many([{"video_url": url, "aspect_ratio": "9:16"}] * 12)
        wait_until(
            lambda: len([u for u in open_periods(list(timeline)) if u < time.time()]) >= 3,
            timeout_s=60,
            what="three OPEN periods ended while fal kept failing",
        )
        fault_end = time.time()
        cluster.emulator_control.clear_faults()
        wait_terminal(p, ids, timeout_s=90)
        jobs = p.get_many(ids)
    stop.set()
    sampler.join()
    assert all(j is not None and j.state is JobState.SUCCEEDED for j in jobs), [j.state for j in jobs if j]
    first_open = next(t for t, s, _u in timeline if s == "open")
    arrivals = [t for t in submit_times(cluster) if first_open + 0.1 < t < fault_end]
    # While OPEN no submit is let through: none arrives during an OPEN period (Redis time; the
    # emulator stamps arrivals with the same clock) once DECIDED_GRACE_S of it has passed. The
    # grace is for submits let through just before the breaker opened: across processes the check
    # and the POST are two steps, and on loaded cores a worker can be descheduled between them (a
    # CI run saw six such arrivals within 16 ms, right at an opening); a breaker stops new
    # decisions, it does not recall those already taken. The rest of each period is checked.
    began: dict[float, float] = {}
    for ts, state, until in timeline:
        if state == "open":
            began[until] = min(began.get(until, ts), ts)
    during_open = [
        t
        for t in arrivals
        if any(start + DECIDED_GRACE_S <= t < until - 0.02 for until, start in began.items())
    ]
    assert during_open == []
    # and the check had something to check: at least one OPEN period seen for longer than the grace
    assert any(until - start > 2 * DECIDED_GRACE_S for until, start in began.items()), began
    # Each HALF_OPEN phase (one after every OPEN period) lets at most P probes through.
    phases = len([u for u in open_periods(timeline) if u < fault_end])
    assert len(arrivals) <= probes * (phases + 1), (len(arrivals), phases)


def test_budget_cap_admits_exactly_k_of_200_and_spend_matches_fal_billing(
    make_cluster: ClusterFactory, tmp_path: Path
) -> None:
    # A whole-second clip without audio, billed 3 s. Its reservation is one second more (the
    # estimate margin, REFRAME_ESTIMATE_MARGIN_S, rounded up to the billing unit): a cap of
    # (k-1) bills + one reservation admits exactly k jobs, however they interleave.
    clip = make_sample_video(tmp_path / "three-seconds.mp4", duration_s=3, size="320x180", audio=False)
    k, per_job, reserved = 7, 3 * 0.06, 4 * 0.06
    cluster = make_cluster(
        workers=3,
        emulator_concurrency=4,
        emulator_processing_time_s=0.2,
        env={
            "REFRAME_MAX_CONCURRENCY": "4",
            "REFRAME_BUDGET_DAILY_USD": f"{(k - 1) * per_job + reserved:.2f}",
        },
    )
    url = upload(cluster.settings(), clip)
    with Producer(cluster.settings()) as p:
        ids = p.enqueue_many([{"video_url": url, "aspect_ratio": "9:16"}] * 200)
        wait_until(
            lambda: sum(j is not None and j.state is JobState.SUCCEEDED for j in p.get_many(ids)) >= k,
            timeout_s=120,
            what=f"{k} jobs succeeded",
        )
        wait_until(
            lambda: sum(j is not None and j.state is JobState.BLOCKED for j in p.get_many(ids)) == 200 - k,
            timeout_s=60,
            what="the rest blocked",
        )
        r = redis.Redis.from_url(cluster.redis_url)
        budget = FlowControl.from_settings(r, cluster.settings()).budget
        wait_until(
            lambda: budget.snapshot().day_reserved == 0, timeout_s=30, what="every reservation settled"
        )
        # Send every blocked job through the gate again (what the housekeeper does when a cap is
        # raised or a period rolls over): with the cap spent, each must come back BLOCKED.
        blocked = [j for j in p.get_many(ids) if j is not None and j.state is JobState.BLOCKED]
        regate_from = max(j.timestamps_ms["ts_BLOCKED"] for j in blocked)
        for job in blocked:
            key, message = p.store.submit_message(job.id, job.priority)
            r.lpush(key, message)
        wait_until(
            lambda: all(
                j is not None and j.state is JobState.BLOCKED and j.timestamps_ms["ts_BLOCKED"] > regate_from
                for j in p.get_many([b.id for b in blocked])
            ),
            timeout_s=60,
            what="every blocked job re-gated",
        )
        snapshot = budget.snapshot()
    book = ledger(cluster)
    assert len([x for x in book["requests"] if x["op"] == "submit"]) == k
    assert snapshot.day_reserved == 0
    assert snapshot.day_spent + snapshot.day_reserved <= snapshot.day_cap
    assert snapshot.day_spent / 1e6 == pytest.approx(book["billed_seconds"] * 0.06, abs=1e-6)


def test_high_priority_job_overtakes_500_low_priority_ones(
    make_cluster: ClusterFactory, sample_video: Path
) -> None:
    # Two slots held by long-running jobs, 500 low-priority jobs waiting behind them.
    cluster = make_cluster(
        workers=3,
        emulator_concurrency=2,
        emulator_processing_time_s=60.0,
        env={"REFRAME_MAX_CONCURRENCY": "2"},
    )
    url = upload(cluster.settings(), sample_video)
    with Producer(cluster.settings()) as p:
        low = p.enqueue_many(
            EnqueueRequest({"video_url": url, "aspect_ratio": "1:1"}, priority="low") for _ in range(500)
        )
        wait_until(
            lambda: sum(j is not None and j.state is JobState.WAITING for j in p.get_many(low)) == 498,
            timeout_s=60,
            what="two low jobs at fal, 498 waiting for a slot",
        )
        running = [j.id for j in p.get_many(low) if j is not None and j.state.at_fal]
        urgent = {"video_url": url, "aspect_ratio": "9:16", "prompt": f"urgent {uuid.uuid4().hex}"}
        high = p.enqueue(urgent, priority="high")
        wait_until(lambda: p.get(high).state is JobState.WAITING, timeout_s=30, what="high job waiting")  # type: ignore[union-attr]
        # Free exactly one slot: the next job to reach fal must be the high-priority one.
        freed_at = time.time()
        p.cancel(running[0])
        wait_until(
            lambda: p.get(high).state.at_fal or p.get(high).terminal,  # type: ignore[union-attr]
            timeout_s=30,
            what="the high-priority job submitted",
        )
        for job_id in [*low, high]:
            p.cancel(job_id)
    submits = [s for s in ledger(cluster)["submits"] if s["t"] >= freed_at]
    assert submits and submits[0]["fingerprint"] == fp(urgent), "the freed slot went to the high-priority job"


def test_dead_letter_replay_brings_a_job_back_to_succeeded(
    make_cluster: ClusterFactory, sample_video: Path
) -> None:
    cluster = make_cluster(workers=3, emulator_concurrency=2, emulator_processing_time_s=0.0)
    url = upload(cluster.settings(), sample_video)
    assert cluster.emulator_control is not None
    # fal rejects the submit for good (a locked account, say): one call, then the dead-letter set.
    cluster.emulator_control.set_faults(
        [
            {
                "op": "submit",
                "kind": "http",
                "status": 403,
                "times": 1,
                "json": {"detail": "User is locked. Reason: Exhausted balance."},
            }
        ]
    )
    with Producer(cluster.settings()) as p:
        job_id = p.enqueue({"video_url": url, "aspect_ratio": "3:4"})
        job = p.wait(job_id, timeout_s=60)
        assert job.state is JobState.FAILED and job.dead_letter_reason == "fal_rejected"
        assert "locked" in str(job.error)
        assert len([x for x in ledger(cluster)["requests"] if x["op"] == "submit"]) == 1
        r = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
        assert r.zscore("{reframe}:dlq", job_id) is not None
        assert p.store.replay(job_id, job.priority).ok
        replayed = p.wait(job_id, timeout_s=60)
    assert replayed.state is JobState.SUCCEEDED
    assert r.zscore("{reframe}:dlq", job_id) is None
    assert len([x for x in r.xrange("{reframe}:events") if x[1]["job_id"] == job_id]) == 2  # one per life
