"""Issue #12 observability: fal webhook deliveries counted by outcome in the API's registry
(``reframe_api_fal_webhooks_total``), and ends of fal requests counted by the path that learned
them in the worker's (``reframe_job_completions_total{via}``), only when the fenced step applied.

No processes: the receiver gets a stub verifier and inbox; the outcome rules get stub lifecycle
steps (tests/webhooks runs the real thing end to end).
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry
from starlette.requests import Request

from config.settings import load_settings
from reframe.api.fal_webhook import FalWebhookReceiver
from reframe.api.middleware import FAL_WEBHOOK_OUTCOMES, ApiMetrics
from worker import outcomes
from worker.fal import FalModelError, QueueStatus
from worker.fal.webhooks import WEBHOOK_PATH, FalWebhook, WebhookRejected, attempt_token
from worker.metrics import COMPLETION_PATHS, Metrics

SETTINGS = load_settings(
    {"REFRAME_PUBLIC_URL": "https://reframe.example.com", "REFRAME_WEBHOOK_SECRET": "unit-test-secret"}
)


# --------------------------------------------------------------------- the API's webhook counter
class StubVerifier:
    def __init__(self, fails: Exception | None = None) -> None:
        self.fails = fails

    async def verify(self, _headers: Any, _body: bytes) -> FalWebhook:
        if self.fails is not None:
            raise self.fails
        return FalWebhook("req-1", {"status": "OK", "payload": {}})


class StubInbox:
    def __init__(self, *answers: bool | Exception) -> None:
        self.answers = list(answers)

    def accept(self, *_args: Any, **_kwargs: Any) -> bool:
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def _request(token: str | None) -> Request:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b'{"status": "OK"}', "more_body": False}

    query = f"t={token}" if token is not None else ""
    scope = {
        "type": "http",
        "method": "POST",
        "path": WEBHOOK_PATH,
        "query_string": query.encode(),
        "headers": [],
    }
    return Request(scope, receive)


def _counts(metrics: ApiMetrics) -> dict[str, float]:
    return {
        o: metrics.registry.get_sample_value("reframe_api_fal_webhooks_total", {"outcome": o}) or 0.0
        for o in FAL_WEBHOOK_OUTCOMES
    }


def test_every_webhook_outcome_is_preinitialised_at_zero() -> None:
    metrics = ApiMetrics(CollectorRegistry())
    assert _counts(metrics) == dict.fromkeys(FAL_WEBHOOK_OUTCOMES, 0.0)
    assert set(FAL_WEBHOOK_OUTCOMES) == {
        "accepted",
        "duplicate",
        "rejected_token",
        "rejected_signature",
        "unavailable",
        "disabled",
    }
    with pytest.raises(ValueError, match="unknown fal webhook outcome"):
        metrics.fal_webhook("job-123")  # type: ignore[arg-type]


def test_each_answer_of_the_receiver_is_counted_once_by_outcome() -> None:
    metrics = ApiMetrics(CollectorRegistry())
    token = attempt_token(SETTINGS, "job-1", "3")

    def receive(verifier: StubVerifier, inbox: StubInbox, tok: str | None, settings: Any = SETTINGS) -> int:
        receiver = FalWebhookReceiver(settings, verifier, inbox, metrics)  # type: ignore[arg-type]
        return asyncio.run(receiver.receive(_request(tok))).status_code

    assert receive(StubVerifier(), StubInbox(True), token) == 204
    assert receive(StubVerifier(), StubInbox(False), token) == 204
    assert receive(StubVerifier(), StubInbox(), None) == 401
    assert receive(StubVerifier(), StubInbox(), token[:-2] + "xx") == 401
    assert receive(StubVerifier(WebhookRejected("stale timestamp")), StubInbox(), token) == 401
    assert receive(StubVerifier(OSError("jwks down")), StubInbox(), token) == 503
    assert receive(StubVerifier(), StubInbox(redis.ConnectionError("down")), token) == 503
    assert receive(StubVerifier(), StubInbox(), token, load_settings({})) == 404
    assert _counts(metrics) == {
        "accepted": 1,
        "duplicate": 1,
        "rejected_token": 2,
        "rejected_signature": 1,
        "unavailable": 2,
        "disabled": 1,
    }


def test_the_enabled_gauge_says_whether_webhooks_are_expected() -> None:
    for on in (True, False):
        metrics = ApiMetrics(CollectorRegistry(), webhooks_on=on)
        assert metrics.registry.get_sample_value("reframe_api_fal_webhooks_enabled") == (1 if on else 0)


def test_a_receiver_without_metrics_still_answers() -> None:
    receiver = FalWebhookReceiver(SETTINGS, StubVerifier(), StubInbox(True))  # type: ignore[arg-type]
    token = attempt_token(SETTINGS, "job-1", "1")
    assert asyncio.run(receiver.receive(_request(token))).status_code == 204


# --------------------------------------------------------------------- the worker's completions
@pytest.fixture
def rt() -> SimpleNamespace:
    return SimpleNamespace(metrics=Metrics(CollectorRegistry()), outputs=None)  # no output store


@pytest.fixture
def rec() -> SimpleNamespace:
    return SimpleNamespace(id="job-1", attempt="1", fal_request_id="req-1", get=lambda _name: "")


def _completions(rt: SimpleNamespace) -> dict[str, float]:
    reg = rt.metrics.registry
    return {v: reg.get_sample_value("reframe_job_completions_total", {"via": v}) for v in COMPLETION_PATHS}


def test_completions_are_preinitialised_per_path(rt: SimpleNamespace) -> None:
    assert _completions(rt) == {"webhook": 0.0, "status": 0.0}
    rt.metrics.job_completion("carrier-pigeon")  # outside the closed set: counted as other
    assert rt.metrics.registry.get_sample_value("reframe_job_completions_total", {"via": "other"}) == 1


@pytest.mark.parametrize("applied", [True, False], ids=["applied", "fenced-out"])
def test_each_rule_counts_its_path_only_when_its_step_applied(
    rt: SimpleNamespace, rec: SimpleNamespace, applied: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outcomes, "record_breaker", lambda *_a, **_k: None)
    monkeypatch.setattr(outcomes.lifecycle, "cancel", lambda *_a, **_k: applied)
    monkeypatch.setattr(outcomes.lifecycle, "fail", lambda *_a, **_k: applied)
    monkeypatch.setattr(outcomes.lifecycle, "finish", lambda *_a, **_k: applied)
    monkeypatch.setattr(outcomes.lifecycle, "reserved_micro", lambda *_a, **_k: 0)
    monkeypatch.setattr(
        outcomes.lifecycle, "retry_later", lambda *_a, **_k: "retrying" if applied else "stale"
    )
    monkeypatch.setattr(outcomes, "output_duration_s", lambda *_a, **_k: 3.0)
    rt.flow = SimpleNamespace(
        budget=SimpleNamespace(estimate_micro=lambda s: int(s * 60_000), billing_unit_s=1.0)
    )
    output = SimpleNamespace(
        video=SimpleNamespace(
            url="https://v3.fal.media/out.mp4",
            content_type="video/mp4",
            file_size=1,
            model_dump=lambda **_k: {},
        ),
        model_dump=lambda **_k: {},
    )
    failed = QueueStatus(status="COMPLETED", error="runner died", error_type="runner_error")

    outcomes.succeeded(rt, rec, output, QueueStatus(status="COMPLETED"), via="webhook")  # type: ignore[arg-type]
    outcomes.cancelled(rt, rec, via="webhook")  # type: ignore[arg-type]
    outcomes.model_error(rt, rec, FalModelError("bad input", op="result", status_code=422), via="status")  # type: ignore[arg-type]
    outcomes.runner_failed(rt, rec, failed, None, via="status")  # type: ignore[arg-type]
    outcomes.lost(rt, rec, "gone", via="status")  # type: ignore[arg-type]

    expected = {"webhook": 2.0, "status": 3.0} if applied else {"webhook": 0.0, "status": 0.0}
    assert _completions(rt) == expected
