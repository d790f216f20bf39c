"""reframe.exporter.collector against a real redis-server: populate every key, scrape, check values."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import pytest
import redis
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from config import Settings
from reframe.exporter.collector import (
    ClusterCollector,
    exporter_redis_client,
    metric_names,
    parse_celery_message,
)
from reframe.localproc import free_port
from worker.contracts.keys import Keys
from worker.contracts.wire import CALLBACK_TASK, SUBMIT_TASK, task_message
from worker.flow import FlowControl

pytestmark = pytest.mark.integration

Q = "reframe"
SEP = "\x06\x16"


def wait(r: redis.Redis, k: Keys, priority: str, *job_ids: str, tenant: str = "default") -> None:
    """Queue jobs for a slot as worker/contracts/lua/slots_lib.lua does (entry, depth)."""
    p = {"high": 1, "normal": 2, "low": 3}[priority]
    for job_id in job_ids:
        seq = int(r.hincrby(k.fair, "seq", 1))
        r.zadd(k.wait_queue, {f"{tenant}|{p}|{seq:016d}|{job_id}": 0})
        r.hincrby(k.fair, f"depth:{p}", 1)


def redis_now_ms(r: redis.Redis) -> int:
    secs, usecs = r.time()
    return int(secs) * 1000 + int(usecs) // 1000


def scrape(collector: ClusterCollector) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(collector)
    return reg


def val(reg: CollectorRegistry, name: str, **labels: str) -> float:
    got = reg.get_sample_value(name, labels)
    assert got is not None, f"missing {name}{labels}"
    return got


def job(r: redis.Redis, keys: Keys, job_id: str, state: str, **fields: int) -> None:
    r.hset(keys.job(job_id), mapping={"id": job_id, "state": state, **{k: str(v) for k, v in fields.items()}})


def submit_msg(job_id: str, priority: int, eta: str | None = None) -> str:
    msg = task_message(SUBMIT_TASK, [job_id], queue=Q, priority=priority)
    if eta is None:
        return msg
    env = json.loads(msg)
    env["headers"]["eta"] = eta
    return json.dumps(env)


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(
        max_concurrency=4,
        reserved_high_slots=1,
        budget_daily_usd=100.0,
        budget_monthly_usd=1000.0,
        visibility_timeout_s=600.0,
    )


def test_empty_redis(rclient: redis.Redis, settings: Settings) -> None:
    reg = scrape(ClusterCollector(rclient, settings))
    assert val(reg, "reframe_cluster_scrape_success") == 1
    for where in ("celery", "wait"):
        for prio in ("high", "normal", "low"):
            assert val(reg, "reframe_queue_depth", where=where, priority=prio) == 0
            assert val(reg, "reframe_queue_oldest_age_seconds", where=where, priority=prio) == 0
    assert val(reg, "reframe_queue_depth", where="blocked", priority="any") == 0
    assert val(reg, "reframe_slots_in_use") == 0
    assert val(reg, "reframe_slots_capacity") == 4
    assert val(reg, "reframe_slots_reserved_high") == 1
    assert val(reg, "reframe_breaker_state", state="closed") == 1
    assert val(reg, "reframe_breaker_state", state="open") == 0
    assert val(reg, "reframe_budget_cap_usd", period="day") == 100
    assert val(reg, "reframe_budget_cap_usd", period="month") == 1000
    assert val(reg, "reframe_budget_spent_usd", period="day") == 0
    assert val(reg, "reframe_celery_visibility_timeout_seconds") == 600
    assert val(reg, "reframe_cluster_scrape_errors_total") == 0
    assert val(reg, "reframe_retry_budget_tokens") >= 0
    # every documented name is exported
    text = generate_latest(reg).decode()
    for name in metric_names():
        assert f"\n{name}" in text or text.startswith(name), name


def test_populated_cluster(rclient: redis.Redis, settings: Settings) -> None:
    r, k = rclient, Keys(settings.key_prefix)
    now = redis_now_ms(r)

    # Celery lists: LPUSH like kombu, so the first pushed is the tail (oldest).
    job(r, k, "c-old", "QUEUED", ts_QUEUED=now - 120_000, created_at_ms=now - 120_000)
    job(r, k, "c-new", "QUEUED", ts_QUEUED=now - 1_000, created_at_ms=now - 1_000)
    r.lpush(Q, submit_msg("c-old", 0))
    r.lpush(Q, submit_msg("c-new", 0))
    job(r, k, "c-eta", "DEFERRED", ts_QUEUED=now - 900_000)
    r.lpush(f"{Q}{SEP}3", submit_msg("c-eta", 3, eta="2999-01-01T00:00:00+00:00"))  # not due: age 0
    job(r, k, "c-low", "QUEUED", created_at_ms=now - 30_000)  # no ts_QUEUED: falls back to created_at_ms
    r.lpush(f"{Q}{SEP}6", submit_msg("c-low", 6))
    job(r, k, "c-cb", "SUCCEEDED", ts_QUEUED=now - 9_000_000)
    r.lpush(f"{Q}{SEP}9", task_message(CALLBACK_TASK, ["c-cb"], queue=Q, priority=9))  # callbacks: no age

    # The wait queue (per tenant, by priority, FIFO); a stale head (already admitted) is skipped.
    job(r, k, "w-stale", "IN_PROGRESS", ts_QUEUED=now - 10_000_000)
    job(r, k, "w1", "WAITING", ts_QUEUED=now - 300_000)
    job(r, k, "w2", "WAITING", ts_QUEUED=now - 5_000)
    wait(r, k, "high", "w-stale", "w1", "w2")
    job(r, k, "w3", "WAITING", ts_QUEUED=now - 60_000)
    wait(r, k, "low", "w3")

    r.zadd(k.blocked, {"b1": now - 50_000, "b2": now - 1_000})
    r.zadd(k.delayed, {"d1": now - 10_000, "d2": now + 60_000})

    # Slots: one expired lease; in-flight ages from the holders' records.
    r.zadd(k.slots, {"s1": now - 5_000, "s2": now + 60_000})
    job(r, k, "s1", "IN_PROGRESS", ts_SUBMITTING=now - 400_000, ts_IN_QUEUE=now - 399_000)
    job(r, k, "s2", "IN_QUEUE", submitted_at_ms=now - 100_000)

    r.zadd(k.track, {"s1": now - 7_000, "s2": now + 1_000})
    r.hset("unacked", mapping={"tag1": "[]", "tag2": "[]"})
    r.zadd("unacked_index", {"tag1": now / 1000 - 500, "tag2": now / 1000 - 20})
    r.zadd(k.dlq, {"x1": now, "x2": now, "x3": now})
    for i in range(4):
        r.xadd(k.events, {"job_id": f"e{i}"})

    flow = FlowControl.from_settings(r, settings)
    flow.breaker.force_open_until(now + 30_000)
    flow.rate.pause(20)
    assert flow.budget.reserve("in-flight", 2_000_000).ok
    assert flow.budget.reserve("done", 1_500_000).ok
    assert flow.budget.settle("done", 1_500_000)

    reg = scrape(ClusterCollector(r, settings))
    approx = lambda x: pytest.approx(x, abs=3)  # noqa: E731 - seconds between setup and scrape

    assert val(reg, "reframe_cluster_scrape_success") == 1
    assert val(reg, "reframe_queue_depth", where="celery", priority="high") == 2
    assert val(reg, "reframe_queue_depth", where="celery", priority="normal") == 1
    assert val(reg, "reframe_queue_depth", where="celery", priority="low") == 2  # lists 6 and 9
    assert val(reg, "reframe_queue_oldest_age_seconds", where="celery", priority="high") == approx(120)
    assert val(reg, "reframe_queue_oldest_age_seconds", where="celery", priority="normal") == 0
    assert val(reg, "reframe_queue_oldest_age_seconds", where="celery", priority="low") == approx(30)
    assert val(reg, "reframe_queue_depth", where="wait", priority="high") == 3
    assert val(reg, "reframe_queue_depth", where="wait", priority="normal") == 0
    assert val(reg, "reframe_queue_depth", where="wait", priority="low") == 1
    assert val(reg, "reframe_queue_oldest_age_seconds", where="wait", priority="high") == approx(300)
    assert val(reg, "reframe_queue_oldest_age_seconds", where="wait", priority="low") == approx(60)
    assert val(reg, "reframe_queue_depth", where="blocked", priority="any") == 2
    assert val(reg, "reframe_queue_oldest_age_seconds", where="blocked", priority="any") == approx(50)
    assert val(reg, "reframe_queue_depth", where="delayed", priority="any") == 2
    assert val(reg, "reframe_delayed_overdue_seconds") == approx(10)

    assert val(reg, "reframe_slots_in_use") == 2
    assert val(reg, "reframe_slot_leases_expired") == 1
    assert val(reg, "reframe_inflight_oldest_age_seconds") == approx(400)
    assert val(reg, "reframe_tracking_jobs") == 2
    assert val(reg, "reframe_tracking_overdue_jobs") == 1
    assert val(reg, "reframe_tracking_overdue_seconds") == approx(7)
    assert val(reg, "reframe_celery_unacked_messages") == 2
    assert val(reg, "reframe_celery_unacked_oldest_age_seconds") == approx(500)
    assert val(reg, "reframe_dead_letter_jobs") == 3
    assert val(reg, "reframe_result_stream_length") == 4

    assert val(reg, "reframe_breaker_state", state="open") == 1
    assert val(reg, "reframe_breaker_state", state="closed") == 0
    assert val(reg, "reframe_breaker_state", state="half_open") == 0
    assert val(reg, "reframe_breaker_open_remaining_seconds") == approx(30)
    assert val(reg, "reframe_rate_pause_remaining_seconds") == approx(20)
    assert val(reg, "reframe_budget_spent_usd", period="day") == pytest.approx(1.5)
    assert val(reg, "reframe_budget_spent_usd", period="month") == pytest.approx(1.5)
    assert val(reg, "reframe_budget_reserved_usd", period="day") == pytest.approx(2.0)
    assert val(reg, "reframe_budget_reserved_usd", period="month") == pytest.approx(2.0)


def test_breaker_past_deadline_shows_half_open(rclient: redis.Redis, settings: Settings) -> None:
    # The hash as the breaker leaves it when its OPEN period ran out with no caller since.
    rclient.hset(
        f"{Keys(settings.key_prefix).root}:fc:breaker",
        mapping={"state": "open", "open_until": redis_now_ms(rclient) - 1},
    )
    reg = scrape(ClusterCollector(rclient, settings))
    assert val(reg, "reframe_breaker_state", state="half_open") == 1
    assert val(reg, "reframe_breaker_open_remaining_seconds") == 0


def test_bytes_client_and_key_prefix(redis_url: str, make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(key_prefix="acme", queue_name="jobs")
    r = redis.Redis.from_url(redis_url)  # decode_responses=False: replies are bytes
    try:
        k = Keys("acme")
        now = redis_now_ms(r)
        r.hset(k.job("j"), mapping={"state": "WAITING", "ts_QUEUED": str(now - 42_000)})
        wait(r, k, "normal", "j")
        r.lpush("jobs", task_message(SUBMIT_TASK, ["j"], queue="jobs", priority=0))
        reg = scrape(ClusterCollector(r, settings, kombu_keyprefix=""))
        assert val(reg, "reframe_queue_depth", where="wait", priority="normal") == 1
        assert val(reg, "reframe_queue_oldest_age_seconds", where="wait", priority="normal") == pytest.approx(
            42, abs=3
        )
        assert val(reg, "reframe_queue_depth", where="celery", priority="high") == 1
        # the default prefix's keys are not read
        assert val(reg, "reframe_queue_depth", where="wait", priority="high") == 0
    finally:
        r.close()


def test_kombu_global_keyprefix(rclient: redis.Redis, settings: Settings) -> None:
    rclient.lpush("pfx_reframe", submit_msg("nobody", 0))
    rclient.hset("pfx_unacked", "t", "[]")
    reg = scrape(ClusterCollector(rclient, settings, kombu_keyprefix="pfx_"))
    assert val(reg, "reframe_queue_depth", where="celery", priority="high") == 1
    assert val(reg, "reframe_celery_unacked_messages") == 1


def test_redis_down_exports_scrape_success_zero(make_settings: Callable[..., Settings]) -> None:
    port = free_port()
    settings = make_settings(redis_url=f"redis://127.0.0.1:{port}/0")
    down = exporter_redis_client(settings)
    collector = ClusterCollector(down, settings)
    reg = CollectorRegistry()
    reg.register(collector)  # describe() only: registering never touches Redis
    text = generate_latest(reg).decode()  # must not raise
    assert val(reg, "reframe_cluster_scrape_success") == 0
    assert val(reg, "reframe_slots_capacity") == settings.max_concurrency  # static gauges stay
    assert reg.get_sample_value("reframe_queue_depth", {"where": "celery", "priority": "high"}) is None
    assert val(reg, "reframe_cluster_scrape_errors_total") >= 1
    assert "reframe_cluster_scrape_success 0.0" in text


def test_exporter_client_scrapes_fast(rclient: redis.Redis, settings: Settings) -> None:
    client = exporter_redis_client(settings)
    try:
        reg = scrape(ClusterCollector(client, settings))
        assert val(reg, "reframe_cluster_scrape_success") == 1
        assert val(reg, "reframe_cluster_scrape_duration_seconds") < 1.0
    finally:
        client.close()


def test_parse_celery_message() -> None:
    head = parse_celery_message(task_message(SUBMIT_TASK, ["abc"], queue=Q, priority=0))
    assert head is not None and head.job_id == "abc" and head.eta_ms is None
    assert parse_celery_message(task_message(CALLBACK_TASK, ["abc"], queue=Q, priority=0)) is None
    assert parse_celery_message("not json") is None
    assert parse_celery_message(json.dumps({"headers": {"task": SUBMIT_TASK}, "body": "!!"})) is None
    env = json.loads(task_message(SUBMIT_TASK, ["abc"], queue=Q, priority=0))
    env["headers"]["eta"] = "2026-01-01T00:00:10"  # naive: taken as UTC
    parsed = parse_celery_message(json.dumps(env))
    assert parsed is not None and parsed.eta_ms == 1767225610000


def test_fal_accounts_are_exported_one_series_each(
    make_settings: Callable[..., Settings], rclient: redis.Redis
) -> None:
    settings = make_settings(fal_accounts="a:3,b:5", fal_account_keys="a=ida:seca; b=idb:secb")
    flow = FlowControl.from_settings(rclient, settings)
    for i in range(4):
        assert flow.slots.acquire(f"j{i}", "normal", tenant="t").acquired
    flow.accounts.drain("a")
    reg = scrape(ClusterCollector(rclient, settings))
    assert val(reg, "reframe_slots_capacity") == 8
    assert (
        val(reg, "reframe_fal_account_up", account="a"),
        val(reg, "reframe_fal_account_up", account="b"),
    ) == (
        0,
        1,
    )
    assert val(reg, "reframe_fal_account_capacity", account="a") == 3
    used = {a: val(reg, "reframe_fal_account_slots_in_use", account=a) for a in ("a", "b")}
    assert sum(used.values()) == 4 and used["a"] <= 3
    assert b"seca" not in generate_latest(reg) and b"ida" not in generate_latest(reg)


def test_fal_account_budgets_are_exported_per_account_and_period(
    make_settings: Callable[..., Settings], rclient: redis.Redis
) -> None:
    settings = make_settings(
        fal_accounts="a:3:-:40:900,b:3",
        fal_account_keys="a=ida:seca; b=idb:secb",
        price_per_s_usd=0.1,
        max_video_duration_s=10,
        estimate_margin_s=0,
    )
    flow = FlowControl.from_settings(rclient, settings)
    assert flow.budget.reserve("j1", 700_000, tenant="t").ok
    assert flow.slots.acquire("j1", "normal", tenant="t").account == "a"
    assert flow.budget.reserve("j2", 400_000, tenant="t").ok
    assert flow.slots.acquire("j2", "normal", tenant="t").account == "b"
    assert flow.budget.settle("j2", 250_000)
    reg = scrape(ClusterCollector(rclient, settings))
    assert val(reg, "reframe_fal_account_budget_cap_usd", account="a", period="day") == 40
    assert val(reg, "reframe_fal_account_budget_cap_usd", account="a", period="month") == 900
    assert val(reg, "reframe_fal_account_budget_cap_usd", account="b", period="day") == math.inf  # none
    assert val(reg, "reframe_fal_account_budget_reserved_usd", account="a") == 0.7
    assert val(reg, "reframe_fal_account_budget_reserved_usd", account="b") == 0
    assert val(reg, "reframe_fal_account_budget_spent_usd", account="b", period="day") == 0.25
    assert val(reg, "reframe_fal_account_budget_spent_usd", account="b", period="month") == 0.25
