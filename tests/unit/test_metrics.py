"""worker.metrics and worker.signals: names, labels, helpers, bounded cardinality, Celery signals."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from celery import signals
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from worker import metrics as metrics_mod
from worker.fal.policy import status_class
from worker.metrics import Metrics, get_metrics
from worker.signals import install_celery_signal_handlers, uninstall_celery_signal_handlers

NAME_RE = re.compile(r"^reframe_[a-z0-9_]+$")
FORBIDDEN_LABELS = {"job_id", "pod", "pod_name", "hostname", "request_id", "instance", "id"}


@pytest.fixture
def reg() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def m(reg: CollectorRegistry) -> Metrics:
    return Metrics(reg)


def value(reg: CollectorRegistry, name: str, **labels: str) -> float:
    got = reg.get_sample_value(name, labels)
    assert got is not None, f"no sample {name}{labels}"
    return got


def test_nothing_registered_or_connected_at_import() -> None:
    # A fresh interpreter: importing our modules must leave the default registry and Celery's
    # signals untouched (get_metrics() and install_celery_signal_handlers() do that on demand).
    code = (
        "from prometheus_client import REGISTRY\n"
        "from celery import signals\n"
        "before = set(REGISTRY._names_to_collectors)\n"
        "import worker.metrics, worker.signals, worker.health, reframe.exporter.collector\n"
        "assert set(REGISTRY._names_to_collectors) == before, 'registered at import'\n"
        "assert not signals.task_prerun.receivers and not signals.task_postrun.receivers\n"
        "print('clean')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and "clean" in out.stdout, out.stderr


def test_names_units_help_and_labels(reg: CollectorRegistry, m: Metrics) -> None:
    families = list(text_string_to_metric_families(generate_latest(reg).decode()))
    assert len(families) >= 30
    for fam in families:
        assert NAME_RE.match(fam.name), fam.name
        assert fam.documentation and len(fam.documentation) > 20, fam.name
        for sample in fam.samples:
            assert not FORBIDDEN_LABELS & set(sample.labels), (fam.name, sample.labels)
        if fam.type == "histogram":
            assert fam.name.endswith("_seconds"), fam.name
    names = {f.name for f in families}
    for expected in (
        "reframe_jobs_enqueued",
        "reframe_jobs_finished",
        "reframe_job_end_to_end_seconds",
        "reframe_job_queue_wait_seconds",
        "reframe_fal_queue_seconds",
        "reframe_fal_inference_seconds",
        "reframe_fal_requests",
        "reframe_fal_request_duration_seconds",
        "reframe_retries",
        "reframe_ambiguous_submits",
        "reframe_rate_limit_wait_seconds",
        "reframe_rate_limit_pauses",
        "reframe_rate_limit_pause_seconds",
        "reframe_breaker_transitions",
        "reframe_budget_rejections",
        "reframe_dead_letters",
        "reframe_results_published",
        "reframe_callback_deliveries",
        "reframe_tracker_jobs",
        "reframe_tracker_status_stream_reconnects",
        "reframe_tracker_status_polls",
        "reframe_celery_tasks",
        "reframe_celery_task_runtime_seconds",
        "reframe_worker_info",
    ):
        assert expected in names, expected


def test_series_are_preinitialised_at_zero(reg: CollectorRegistry, m: Metrics) -> None:
    for outcome in metrics_mod.JOB_OUTCOMES:
        for prio in metrics_mod.PRIORITIES:
            assert value(reg, "reframe_jobs_finished_total", outcome=outcome, priority=prio) == 0
    assert value(reg, "reframe_fal_requests_total", op="submit", status_class="429") == 0
    assert value(reg, "reframe_results_published_total", sink="stream", outcome="ok") == 0
    assert value(reg, "reframe_worker_info", version=metrics_mod._version()) == 1


def test_job_helpers(reg: CollectorRegistry, m: Metrics) -> None:
    m.job_enqueued("high")
    m.job_finished("succeeded", "high", 42.0)
    m.job_finished("dead_lettered", "low", None)
    m.job_queue_wait("normal", 3.0)
    m.job_deferred("breaker_open")
    assert value(reg, "reframe_jobs_enqueued_total", priority="high") == 1
    assert value(reg, "reframe_jobs_finished_total", outcome="succeeded", priority="high") == 1
    assert value(reg, "reframe_jobs_finished_total", outcome="dead_lettered", priority="low") == 1
    assert value(reg, "reframe_job_end_to_end_seconds_sum", outcome="succeeded", priority="high") == 42.0
    assert (
        value(reg, "reframe_job_end_to_end_seconds_bucket", outcome="succeeded", priority="high", le="30.0")
        == 0
    )
    assert (
        value(reg, "reframe_job_end_to_end_seconds_bucket", outcome="succeeded", priority="high", le="45.0")
        == 1
    )
    # e2e unknown: counted, not observed
    assert reg.get_sample_value(
        "reframe_job_end_to_end_seconds_count", {"outcome": "dead_lettered", "priority": "low"}
    ) in (None, 0)
    assert value(reg, "reframe_job_queue_wait_seconds_count", priority="normal") == 1
    assert value(reg, "reframe_jobs_deferred_total", reason="breaker_open") == 1


def test_fal_and_flow_helpers(reg: CollectorRegistry, m: Metrics) -> None:
    m.fal_request("submit", status_class(429), 0.2)
    m.fal_request("status", status_class(200), 0.01)
    m.fal_request("result", status_class(None, timeout=True), 30.0)
    m.fal_queued(12.0)
    m.fal_inference(40.0)
    m.retry("http_429")
    m.ambiguous_submit("dead_letter")
    m.rate_limit_waited(0.3)
    m.rate_limit_paused(15.0)
    m.rate_limit_paused(5.0)
    m.breaker_transition("CLOSED", "OPEN")
    m.budget_rejection("day")
    m.dead_letter("ambiguous_submit")
    m.dead_letter("Retries Exhausted!")
    m.spent(1.8)
    m.spent(-1.0)
    assert value(reg, "reframe_fal_requests_total", op="submit", status_class="429") == 1
    assert value(reg, "reframe_fal_requests_total", op="status", status_class="2xx") == 1
    assert value(reg, "reframe_fal_requests_total", op="result", status_class="timeout") == 1
    assert value(reg, "reframe_fal_request_duration_seconds_count", op="submit") == 1
    assert value(reg, "reframe_fal_queue_seconds_sum") == 12.0
    assert value(reg, "reframe_fal_inference_seconds_sum") == 40.0
    assert value(reg, "reframe_retries_total", reason="http_429") == 1
    assert value(reg, "reframe_ambiguous_submits_total", action="dead_letter") == 1
    assert value(reg, "reframe_rate_limit_wait_seconds_count") == 1
    assert value(reg, "reframe_rate_limit_pauses_total") == 2
    assert value(reg, "reframe_rate_limit_pause_seconds_total") == 20.0
    assert value(reg, "reframe_breaker_transitions_total", from_state="closed", to_state="open") == 1
    assert value(reg, "reframe_budget_rejections_total", period="day") == 1
    assert value(reg, "reframe_dead_letters_total", reason="ambiguous_submit") == 1
    assert value(reg, "reframe_dead_letters_total", reason="retries_exhausted") == 1  # normalised
    assert value(reg, "reframe_spend_usd_total") == pytest.approx(1.8)


def test_results_tracker_helpers(reg: CollectorRegistry, m: Metrics) -> None:
    m.result_published()
    m.callback_delivery("delivered", 0.05)
    m.callback_delivery("failed", 0.2)
    m.callback_delivery("gave_up")
    m.tracker_load(7, capacity=2000)
    m.tracker_stream_reconnect()
    m.tracker_poll("ok")
    assert value(reg, "reframe_results_published_total", sink="stream", outcome="ok") == 1
    assert value(reg, "reframe_callback_deliveries_total", outcome="delivered") == 1
    assert value(reg, "reframe_callback_deliveries_total", outcome="gave_up") == 1
    assert value(reg, "reframe_callback_deliveries_total", outcome="failed") == 1
    assert value(reg, "reframe_callback_duration_seconds_count") == 2
    assert value(reg, "reframe_tracker_jobs") == 7
    assert value(reg, "reframe_tracker_capacity_jobs") == 2000
    assert value(reg, "reframe_tracker_status_stream_reconnects_total") == 1
    assert value(reg, "reframe_tracker_status_polls_total", outcome="ok") == 1


@pytest.mark.parametrize(
    ("code", "timeout", "expected"),
    [
        (200, False, "2xx"),
        (204, False, "2xx"),
        (302, False, "3xx"),
        (404, False, "4xx"),
        (429, False, "429"),
        (503, False, "5xx"),
        (None, True, "timeout"),
        (None, False, "network"),
        (101, False, "network"),
    ],
)
def test_status_class(code: int | None, timeout: bool, expected: str) -> None:
    assert status_class(code, timeout=timeout) == expected


def test_unknown_label_values_become_other(
    reg: CollectorRegistry, m: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    for i in range(50):
        m.fal_request(f"op-{i}", "2xx", 0.1)
    m.job_finished("exploded", "urgent", 1.0)
    assert value(reg, "reframe_fal_requests_total", op="other", status_class="2xx") == 50
    assert value(reg, "reframe_jobs_finished_total", outcome="other", priority="other") == 1
    assert "not in its closed set" in caplog.text
    text = generate_latest(reg).decode()  # no per-value series was created
    assert "op-1" not in text


def test_reason_labels_are_normalised_and_capped(reg: CollectorRegistry, m: Metrics) -> None:
    for i in range(metrics_mod.MAX_REASONS + 20):
        m.dead_letter(f"weird reason #{i}")
        m.retry(f"http_{400 + i}")
    m.job_deferred("")
    text = generate_latest(reg).decode()
    dl = set(re.findall(r'reframe_dead_letters_total\{reason="([^"]+)"', text))
    assert len(dl) == metrics_mod.MAX_REASONS + 1 and "other" in dl
    assert "weird_reason_0" in dl
    assert all(re.fullmatch(r"[a-z0-9_]{1,40}", r) for r in dl)
    assert value(reg, "reframe_dead_letters_total", reason="other") == 20
    assert value(reg, "reframe_retries_total", reason="http_400") == 1
    assert value(reg, "reframe_jobs_deferred_total", reason="unknown") == 1


def test_open_labels_are_capped(reg: CollectorRegistry, m: Metrics) -> None:
    for i in range(metrics_mod.MAX_EXCEPTION_CLASSES + 10):
        m.celery_task_exception("reframe.submit", f"Error{i}")
    text = generate_latest(reg).decode()
    exceptions = set(re.findall(r'exception="([^"]+)"', text))
    assert len(exceptions) == metrics_mod.MAX_EXCEPTION_CLASSES + 1
    assert "other" in exceptions


def test_negative_durations_are_clamped(reg: CollectorRegistry, m: Metrics) -> None:
    m.fal_inference(-5.0)
    assert value(reg, "reframe_fal_inference_seconds_sum") == 0.0
    assert value(reg, "reframe_fal_inference_seconds_count") == 1


def test_get_metrics_is_a_lazy_singleton(monkeypatch: pytest.MonkeyPatch) -> None:

    fresh = CollectorRegistry()
    monkeypatch.setattr(metrics_mod, "REGISTRY", fresh)
    monkeypatch.setattr(metrics_mod, "_instance", None)
    first = get_metrics()
    assert first is get_metrics()
    assert first.registry is fresh


# --- Celery signals ------------------------------------------------------------------------------


@pytest.fixture
def installed(m: Metrics):  # type: ignore[no-untyped-def]
    install_celery_signal_handlers(m)
    yield m
    uninstall_celery_signal_handlers()


class _FakeTask:
    """Stands in for a Celery task as a signal sender (hashable, has ``name``)."""

    def __init__(self, name: str) -> None:
        self.name = name


def _task(name: str) -> _FakeTask:
    return _FakeTask(name)


def test_signals_not_connected_before_install(reg: CollectorRegistry, m: Metrics) -> None:
    uninstall_celery_signal_handlers()
    signals.task_prerun.send(sender=_task("reframe.submit"), task_id="t0", task=None, args=(), kwargs={})
    assert reg.get_sample_value("reframe_celery_tasks_started_total", {"task": "reframe.submit"}) is None


def test_signal_handlers_record_task_metrics(reg: CollectorRegistry, installed: Metrics) -> None:
    task = _task("reframe.submit")
    signals.task_prerun.send(sender=task, task_id="t1", task=task, args=(), kwargs={})
    assert value(reg, "reframe_celery_tasks_active", task="reframe.submit") == 1
    signals.task_postrun.send(
        sender=task, task_id="t1", task=task, args=(), kwargs={}, retval=None, state="SUCCESS"
    )
    signals.task_prerun.send(sender=task, task_id="t2", task=task, args=(), kwargs={})
    signals.task_failure.send(
        sender=task,
        task_id="t2",
        exception=ValueError("boom"),
        args=(),
        kwargs={},
        traceback=None,
        einfo=None,
    )
    signals.task_postrun.send(
        sender=task, task_id="t2", task=task, args=(), kwargs={}, retval=None, state="FAILURE"
    )
    signals.task_prerun.send(sender=task, task_id="t3", task=task, args=(), kwargs={})
    signals.task_retry.send(sender=task, request=None, reason=TimeoutError("slow"), einfo=None)
    signals.task_postrun.send(
        sender=task, task_id="t3", task=task, args=(), kwargs={}, retval=None, state="RETRY"
    )

    assert value(reg, "reframe_celery_tasks_started_total", task="reframe.submit") == 3
    assert value(reg, "reframe_celery_tasks_total", task="reframe.submit", outcome="succeeded") == 1
    assert value(reg, "reframe_celery_tasks_total", task="reframe.submit", outcome="failed") == 1
    assert value(reg, "reframe_celery_tasks_total", task="reframe.submit", outcome="retried") == 1
    assert (
        value(reg, "reframe_celery_task_runtime_seconds_count", task="reframe.submit", outcome="failed") == 1
    )
    assert (
        value(reg, "reframe_celery_task_exceptions_total", task="reframe.submit", exception="ValueError") == 1
    )
    assert (
        value(reg, "reframe_celery_task_exceptions_total", task="reframe.submit", exception="TimeoutError")
        == 1
    )
    assert value(reg, "reframe_celery_tasks_active", task="reframe.submit") == 0


def test_install_is_idempotent_and_rebinds(reg: CollectorRegistry, installed: Metrics) -> None:
    install_celery_signal_handlers(installed)
    task = _task("reframe.callback")
    signals.task_prerun.send(sender=task, task_id="x", task=task, args=(), kwargs={})
    assert value(reg, "reframe_celery_tasks_started_total", task="reframe.callback") == 1  # once, not twice
    other_reg = CollectorRegistry()
    install_celery_signal_handlers(Metrics(other_reg))
    signals.task_prerun.send(sender=task, task_id="y", task=task, args=(), kwargs={})
    assert value(other_reg, "reframe_celery_tasks_started_total", task="reframe.callback") == 1
    assert value(reg, "reframe_celery_tasks_started_total", task="reframe.callback") == 1


def test_postrun_without_prerun_does_not_drive_active_negative(
    reg: CollectorRegistry, installed: Metrics
) -> None:
    task = _task("reframe.submit")
    signals.task_postrun.send(
        sender=task, task_id="ghost", task=task, args=(), kwargs={}, retval=None, state="REVOKED"
    )
    assert value(reg, "reframe_celery_tasks_total", task="reframe.submit", outcome="revoked") == 1
    assert reg.get_sample_value("reframe_celery_tasks_active", {"task": "reframe.submit"}) in (None, 0)


def test_handler_errors_never_reach_the_task(installed: Metrics, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_a: object, **_k: object) -> None:
        raise RuntimeError("metrics broke")

    monkeypatch.setattr(installed, "celery_task_started", boom)
    task = _task("reframe.submit")
    # Celery's dispatcher would log and swallow anyway; our handler must not even raise.
    responses = signals.task_prerun.send(sender=task, task_id="z", task=task, args=(), kwargs={})
    assert all(not isinstance(r, Exception) for _, r in responses)


def test_real_celery_app_runs_signals(reg: CollectorRegistry, installed: Metrics) -> None:
    from celery import Celery

    app = Celery("metrics-test", broker="memory://", backend="cache+memory://")
    app.conf.task_always_eager = True

    @app.task(name="reframe.test_ok")
    def ok() -> int:
        return 1

    @app.task(name="reframe.test_bad")
    def bad() -> int:
        raise KeyError("nope")

    ok.delay()
    bad.apply()
    assert value(reg, "reframe_celery_tasks_total", task="reframe.test_ok", outcome="succeeded") == 1
    assert value(reg, "reframe_celery_tasks_total", task="reframe.test_bad", outcome="failed") == 1
    assert (
        value(reg, "reframe_celery_task_exceptions_total", task="reframe.test_bad", exception="KeyError") == 1
    )
