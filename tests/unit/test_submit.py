"""Gate decisions of the submit task on a real Redis (no fal call is made in these tests)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import redis

from config import Settings
from producer import JobState, Producer
from worker.contracts.models import PRE_SUBMIT_STATES
from worker.fal import FalAmbiguousError, FalAuthError, FalTransientError
from worker.metrics import Metrics
from worker.runtime import Runtime
from worker.submit import Submitter, counts_against_breaker

REQ = {"video_url": "https://x.test/v.mp4", "aspect_ratio": "9:16"}


@pytest.fixture
def runtime(make_settings: Callable[..., Settings], rclient: redis.Redis) -> Iterator[Runtime]:
    from prometheus_client import CollectorRegistry

    rt = Runtime.build(make_settings(), metrics=Metrics(CollectorRegistry()))
    yield rt
    rt.close()


def test_a_pause_after_the_token_sends_nothing_and_defers_until_it_ends(
    runtime: Runtime, rclient: redis.Redis
) -> None:
    with Producer(runtime.settings, client=runtime.redis) as p:
        job_id = p.enqueue(REQ)
    assert runtime.flow.slots.acquire(job_id, "normal").acquired
    intent = runtime.store.transition(job_id, PRE_SUBMIT_STATES, JobState.SUBMITTING, incr_attempts=1)
    pause_until = runtime.flow.rate.pause(30)  # another worker's 429 lands now
    assert Submitter(runtime)._paused_since_token(job_id, now_ms=intent.at_ms)
    rec = runtime.store.get(job_id)
    assert rec is not None and rec["state"] == "DEFERRED" and rec["attempts"] == 0
    assert rclient.zscore("reframe:delayed", job_id) >= pause_until
    assert rclient.zscore("reframe:slots", job_id) > pause_until, "the slot is kept across the pause"


def test_no_pause_lets_the_submit_go(runtime: Runtime) -> None:
    with Producer(runtime.settings, client=runtime.redis) as p:
        job_id = p.enqueue(REQ)
    intent = runtime.store.transition(job_id, PRE_SUBMIT_STATES, JobState.SUBMITTING, incr_attempts=1)
    assert not Submitter(runtime)._paused_since_token(job_id, now_ms=intent.at_ms)
    assert runtime.store.state(job_id) is JobState.SUBMITTING


@pytest.mark.parametrize(
    ("error", "counts"),
    [
        (FalTransientError("refused", op="submit"), True),  # connection error: provider health
        (FalTransientError("busy", op="submit", status_code=503), True),
        (FalTransientError("slow down", op="submit", status_code=429), False),  # the rate limiter's job
        (FalTransientError("conflict", op="submit", status_code=409), False),
        (FalAmbiguousError("timeout after send", op="submit"), True),
        (FalAuthError("locked", op="submit", status_code=403), False),
    ],
)
def test_only_provider_health_failures_count_against_the_breaker(error: Exception, counts: bool) -> None:
    assert counts_against_breaker(error) is counts  # type: ignore[arg-type]
