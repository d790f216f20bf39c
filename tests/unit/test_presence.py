"""Worker presence (worker/presence.py) against a real redis-server: beats, liveness, sweeping."""

from __future__ import annotations

from collections.abc import Callable

import redis

from config import Settings
from reframe.localproc import wait_until
from worker.presence import STATE_DRAINING, Presence, PresenceBeat, effective_limits


def test_beat_publishes_limits_and_liveness(
    make_settings: Callable[..., Settings], rclient: redis.Redis
) -> None:
    settings = make_settings(max_concurrency=7, heartbeat_ttl_ms=60_000)
    presence = Presence.from_settings(rclient, settings)
    presence.beat("a", effective_limits(settings, hostname="h1"))
    presence.beat("b", effective_limits(settings, hostname="h2"))
    assert presence.alive_ids() == ["a", "b"]
    assert presence.is_alive("a") and not presence.is_alive("nobody")
    infos = presence.alive()
    assert [(p.process_id, p.info["max_concurrency"], p.info["hostname"]) for p in infos] == [
        ("a", 7, "h1"),
        ("b", 7, "h2"),
    ]
    assert 0 < rclient.pttl("{reframe}:proc:a") <= 60_000
    presence.remove("a")
    assert presence.alive_ids() == ["b"] and rclient.exists("{reframe}:proc:a") == 0


def test_dead_processes_drop_out_and_are_swept(
    make_settings: Callable[..., Settings], rclient: redis.Redis
) -> None:
    settings = make_settings(heartbeat_interval_ms=100, heartbeat_ttl_ms=300)
    presence = Presence.from_settings(rclient, settings)
    presence.beat("dead", {})
    # A beat far in the past (Redis time is the clock): dead at once, and removed by the next sweep.
    rclient.zadd(presence.procs_key, {"ancient": 1})
    assert presence.alive_ids() == ["dead"]
    assert presence.is_alive("ancient") is False
    wait_until(lambda: not presence.is_alive("dead"), timeout_s=10, what="'dead' to miss its TTL")
    presence.beat("live", {})  # a beat sweeps every dead entry, so the ZSET never grows
    assert rclient.zrange(presence.procs_key, 0, -1) == ["live"]
    rclient.zadd(presence.procs_key, {"ancient": 1})
    assert presence.sweep() == 1


def test_beat_thread_beats_drains_and_removes(
    make_settings: Callable[..., Settings], rclient: redis.Redis
) -> None:
    settings = make_settings(heartbeat_interval_ms=100, heartbeat_ttl_ms=1000)
    presence = Presence.from_settings(rclient, settings)
    beat = PresenceBeat(presence, "p1", effective_limits(settings), interval_ms=100)
    beat.start()
    try:
        first = presence.alive()[0].last_beat_ms
        wait_until(lambda: presence.alive()[0].last_beat_ms > first, timeout_s=10, what="a second beat")
        beat.set_state(STATE_DRAINING)
        assert presence.alive()[0].state == STATE_DRAINING
    finally:
        beat.stop()
    assert presence.alive_ids() == []
