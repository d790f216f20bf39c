"""Issue #13 item 6: after a chaos run the cost ledger reconciles with fal's billed usage exactly.

Real redis-server, three real ``reframe worker`` processes (one SIGKILLed every few seconds and
replaced), ``reframe serve`` taking fal's webhooks (so a submit whose worker died mid-POST is
adopted by its webhook instead of being charged at an estimate), runner failures scripted in the
emulator (fal bills none of them), jobs of three tenants. The judge is the emulator's usage export
(``GET /_emulator/usage.csv``, falemu/usage.py): ``reframe costs reconcile`` must find no
difference, ``reframe costs --by tenant`` must sum to what fal billed per tenant, and an entry
removed from or added to the ledger must show up as exactly that difference.
"""

from __future__ import annotations

import csv
import io
import os
import random
import signal
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
import redis

from producer import Producer
from reframe import cli
from reframe.localcluster import LocalCluster, upload_file
from reframe.localproc import wait_until
from tests.chaos.conftest import KEYS, distinct_inputs, new_tag
from worker.contracts.usage import parse_usage

pytestmark = pytest.mark.integration

JOBS = 36
TENANTS = ("acme", "beta", "gamma")
RUNNER_FAILURES = 4
KILLS = 3


def cli_env(cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cluster's REFRAME_* variables (and nothing of this shell's) for in-process CLI runs."""
    for key in list(os.environ):
        if key.startswith("REFRAME_") or key == "FAL_KEY":
            monkeypatch.delenv(key)
    for key, value in cluster.env.items():
        if key.startswith("REFRAME_"):
            monkeypatch.setenv(key, value)


def test_ledger_reconciles_with_fal_after_kills_and_runner_failures(
    chaos_cluster: Callable[..., LocalCluster],
    whole_clip: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tag = new_tag("ledger")
    rng = random.Random(tag)
    cluster = chaos_cluster(
        workers=3,
        emulator_concurrency=4,
        emulator_processing_time_s=1.0,
        fal_webhook_secret="ledger-chaos-secret",
        env={"REFRAME_MAX_CONCURRENCY": "4", "REFRAME_RETRY_BASE_S": "0.2", "REFRAME_RETRY_CAP_S": "1"},
    )
    assert cluster.emulator_control is not None
    settings = cluster.settings()
    url = upload_file(settings, whole_clip)
    cluster.emulator_control.set_faults([{"op": "submit", "kind": "runner_error", "times": RUNNER_FAILURES}])
    r = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    ids: list[str] = []
    with Producer(settings) as producer:
        for i, request in enumerate(distinct_inputs(url, JOBS, tag)):
            ids.append(producer.enqueue(request, tenant=TENANTS[i % len(TENANTS)]))
        deadline = time.monotonic() + 240
        kills = 0
        while time.monotonic() < deadline:
            jobs = producer.get_many(ids)
            if all(j is not None and j.terminal for j in jobs):
                break
            if kills < KILLS and sum(j is not None and j.terminal for j in jobs) >= (kills + 1) * JOBS // 5:
                victim = rng.choice([w for w in cluster.workers if w.process.alive()])
                cluster.kill_worker(victim, signal.SIGKILL)
                cluster.start_worker(wait=False)
                kills += 1
            time.sleep(0.2)
        jobs = producer.get_many(ids)
    states = {j.id: j.state.value for j in jobs if j is not None}
    assert len(states) == JOBS and all(s in {"SUCCEEDED", "FAILED"} for s in states.values()), states
    assert kills == KILLS

    def usage_text() -> str:
        return httpx.get(f"{cluster.fal_url}/_emulator/usage.csv", timeout=10).raise_for_status().text

    # every billed request is settled (a webhook adoption may finish just after the job's record)
    billed_ids = {e.request_id for e in parse_usage(usage_text())}
    wait_until(
        lambda: billed_ids <= {f["request_id"] for _i, f in r.xrange(KEYS.ledger)},
        timeout_s=60,
        what="a ledger entry for every request fal billed",
    )
    export = tmp_path / "usage.csv"
    export.write_text(usage_text())
    events = parse_usage(export.read_text())
    book = cluster.emulator_control.ledger()
    assert len(events) == book["billed_requests"] >= JOBS - RUNNER_FAILURES - 2

    cli_env(cluster, monkeypatch)
    code = cli.run(["costs", "reconcile", str(export)])
    out = capsys.readouterr().out
    assert code == 0, out
    fal_usd = sum((e.cost_micro for e in events), Decimal(0)) / 1_000_000
    assert f"ledger ${fal_usd:.6f}, fal ${fal_usd:.6f}; 0 differences" in out, out

    # per tenant, the ledger's dollars are fal's billed seconds times the price
    job_tenant = {jid: TENANTS[i % len(TENANTS)] for i, jid in enumerate(ids)}
    request_job = {f["request_id"]: f["job_id"] for _i, f in r.xrange(KEYS.ledger) if f["request_id"]}
    fal_by_tenant: dict[str, Decimal] = dict.fromkeys(TENANTS, Decimal(0))
    for e in events:
        fal_by_tenant[job_tenant[request_job[e.request_id]]] += e.cost_micro / 1_000_000
    assert cli.run(["costs", "--by", "tenant", "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    got = {row["tenant"]: Decimal(row["usd"]) for row in rows if row["tenant"] != "total"}
    assert {t: got.get(t, Decimal(0)) for t in TENANTS} == fal_by_tenant, (got, fal_by_tenant)

    # an entry lost from the ledger: exactly that request, not in the ledger
    sid, lost = next((i, f) for i, f in r.xrange(KEYS.ledger) if f["request_id"] and f["kind"] == "settled")
    r.xdel(KEYS.ledger, sid)
    assert cli.run(["costs", "reconcile", str(export), "--csv"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[1:] == [f"not_in_ledger,{lost['request_id']},,,0.000000,{Decimal(lost['micro']) / 1_000_000:.6f},,"
                       f"{lost['billed_s']}"], out  # fmt: skip
    # put it back, altered by one cent: exactly that request, other dollars
    r.xadd(KEYS.ledger, {**lost, "micro": str(int(lost["micro"]) + 10_000)})
    assert cli.run(["costs", "reconcile", str(export), "--csv"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[1].startswith(f"dollars,{lost['request_id']},{lost['job_id']},"), out
