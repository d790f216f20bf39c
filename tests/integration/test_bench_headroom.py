"""bench/headroom.py cannot rot: its three windows run on a real local cluster with a tiny M, and
what it reads from Redis and /proc adds up (~15 s). The figures themselves live in the README."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.headroom import derive, measure_mode, rows_for

pytestmark = pytest.mark.integration


def test_headroom_bench_runs_and_its_counts_add_up(tmp_path: Path) -> None:
    run = measure_mode(tmp_path, "status stream", jobs=8, inflight=4, window_s=1.0, rate_per_s=20.0)
    assert run["ok"] == 8, run
    e2e, idle, held = run["e2e"], run["idle"], run["held"]
    # every job went through the flow-control scripts and left bytes and CPU behind
    assert e2e.calls.get("evalsha", 0) >= 8, e2e.calls
    assert e2e.commands > idle.commands, (e2e.commands, idle.commands)
    assert e2e.net_in > 0 and e2e.net_out > 0
    assert e2e.cpu_s["worker"] > 0 and e2e.redis_cpu_s > 0
    # the benchmark's own reads are out: INFO never appears, its XLEN polls are subtracted
    for delta in (e2e, idle, held):
        assert "info" not in delta.calls
        assert delta.calls.get("xlen", 0) >= 0, delta.calls
    assert 0.9 <= idle.seconds and 0.9 <= held.seconds
    d = derive(run)
    assert d["job60"]["redis_cpu_ms"] > 0 and d["redis_jobs_s"] > 0 and d["accounts"] > 0
    rows = rows_for(run)
    assert any("fal accounts" in r[1] for r in rows), rows
