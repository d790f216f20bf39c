"""Account concurrency: at most N IN_PROGRESS, the rest IN_QUEUE with FIFO queue positions (§7)."""

from __future__ import annotations

import httpx

from falemu import EmulatorServer
from tests.emulator.helpers import status, submit, valid_input, wait_status, wait_until


def test_only_n_in_progress_and_queue_positions_count_from_zero(
    emu: EmulatorServer, http: httpx.Client, clip_url: str
) -> None:
    emu.configure(concurrency=2, processing_time_s=1.0)
    subs = [submit(http, valid_input(clip_url)) for _ in range(5)]
    assert [s["queue_position"] for s in subs[2:]] == [0, 1, 2]
    wait_until(lambda: status(http, subs[1]).json()["status"] == "IN_PROGRESS", what="two running")
    states = [status(http, s).json() for s in subs]
    assert [s["status"] for s in states] == ["IN_PROGRESS"] * 2 + ["IN_QUEUE"] * 3
    assert [s["queue_position"] for s in states[2:]] == [0, 1, 2]
    ledger = emu.ledger()
    assert ledger["in_progress"] == 2 and ledger["open"] == 5
    # FIFO: when the first two finish, requests 3 and 4 start and 5 moves to the front
    wait_status(http, subs[0], "COMPLETED")
    wait_until(lambda: status(http, subs[4]).json().get("queue_position") == 0, what="#5 at the front")
    assert status(http, subs[2]).json()["status"] == "IN_PROGRESS"
    for sub in subs:
        wait_status(http, sub, "COMPLETED")
    ledger = emu.ledger()
    assert ledger["max_in_progress"] == 2
    assert ledger["max_open"] == 5
    assert ledger["in_progress"] == 0 and ledger["open"] == 0
    assert ledger["completed"] == 5


def test_start_order_is_fifo(emu: EmulatorServer, http: httpx.Client, clip_url: str) -> None:
    emu.configure(concurrency=1, processing_time_s=0.2)
    subs = [submit(http, valid_input(clip_url)) for _ in range(4)]
    done_at = {}
    for sub in subs:
        wait_status(http, sub, "COMPLETED")
        done_at[sub["request_id"]] = True
    logs = [status(http, s, logs="1").json()["logs"] for s in subs]
    picked = [next(e["timestamp"] for e in log if "picked up" in e["message"]) for log in logs]
    assert picked == sorted(picked)


def test_raising_concurrency_starts_queued_requests(
    emu: EmulatorServer, http: httpx.Client, clip_url: str
) -> None:
    emu.configure(concurrency=1, processing_time_s=2.0)
    subs = [submit(http, valid_input(clip_url)) for _ in range(3)]
    wait_status(http, subs[0], "IN_PROGRESS")
    assert status(http, subs[2]).json()["status"] == "IN_QUEUE"
    emu.configure(concurrency=3)
    wait_until(
        lambda: all(status(http, s).json()["status"] == "IN_PROGRESS" for s in subs), what="all running"
    )
    assert emu.ledger()["max_in_progress"] == 3
    for sub in subs:
        http.put(sub["cancel_url"])
