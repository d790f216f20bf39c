"""Paying once for identical work (issue #13): real workers, Redis, and the emulator's ledger as the
judge of how many fal requests were made."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from config.settings import child_environment
from producer import JobState, Producer
from reframe.localcluster import LocalCluster
from reframe.localproc import wait_until
from tests.chaos.conftest import KEYS, events, explained, ledger, new_tag, redis_of, scrape_counter
from tests.cluster.conftest import fingerprint_of, upload
from worker.contracts.dedupe import is_canonical
from worker.contracts.tenants import TenantLimits, TenantRegistry

ClusterFactory = Callable[..., LocalCluster]
#: A 3 s clip is billed 3 s at $0.06.
BILLED_MICRO = 180_000


def submits_of(cluster: LocalCluster, request: dict[str, Any]) -> int:
    """How many times fal was asked to run exactly ``request`` (the emulator's submit log)."""
    fp = fingerprint_of(request)
    return sum(1 for s in ledger(cluster)["submits"] if s["fingerprint"] == fp)


def test_identical_requests_pay_once(chaos_cluster: ClusterFactory, whole_clip: Path) -> None:
    """20 identical requests from two tenants while the first is in flight cost one fal request and
    all succeed with its output, each with its own event; a later identical one costs none (the quote
    says so first); a different parameter costs one more; a leader that fails lets a follower submit."""
    cluster = chaos_cluster(
        workers=2,
        env={
            "REFRAME_MAX_CONCURRENCY": "4",
            "REFRAME_BUDGET_DAILY_USD": "100",
            "REFRAME_RETRY_MAX_ATTEMPTS": "1",  # a runner failure ends the leader FAILED
        },
        emulator_processing_time_s=3.0,
    )
    r = redis_of(cluster)
    registry = TenantRegistry(r, KEYS)
    registry.set("acme", TenantLimits(dedupe=True))  # acme's default; globex asks per request
    url = upload(cluster.settings(), whole_clip)
    tag = new_tag("dedupe")
    request = {"video_url": url, "aspect_ratio": "9:16", "prompt": tag}
    ids: list[str] = []
    with Producer(cluster.settings()) as p, explained(cluster, ids):
        # --- 20 identical requests while the first is in flight: one fal request
        first = p.enqueue(request, tenant="acme")
        ids.append(first)
        wait_until(lambda: submits_of(cluster, request) == 1, timeout_s=30, what="the first at fal")
        for i in range(19):
            tenant = "acme" if i % 2 else "globex"
            ids.append(p.enqueue(request, tenant=tenant, dedupe=True if tenant == "globex" else None))
        wait_until(lambda: all(j and j.terminal for j in p.get_many(ids)), timeout_s=60, what="20 jobs end")
        jobs = [j for j in p.get_many(ids) if j is not None]
        assert [j.state for j in jobs] == [JobState.SUCCEEDED] * 20
        assert submits_of(cluster, request) == 1
        assert len({j.video_url for j in jobs}) == 1 and jobs[0].video_url
        # every job, served ones too, has its own copy in the output store under its own tenant:
        # one object per tenant for the same bytes
        wait_until(
            lambda: all(r.hget(KEYS.job(j), "output_copy") == "copied" for j in ids),
            timeout_s=60,
            what="every output copied",
        )
        stored = {j: (r.hget(KEYS.job(j), "tenant"), r.hget(KEYS.job(j), "output_key")) for j in ids}
        assert all((key or "").startswith(f"t/{tenant}/") for tenant, key in stored.values()), stored
        assert len({key for _t, key in stored.values()}) == 2, stored
        assert jobs[0].deduped_from is None and jobs[0].cost_usd == BILLED_MICRO / 1e6
        assert {j.deduped_from for j in jobs[1:]} == {first}
        assert {j.cost_usd for j in jobs[1:]} == {0.0}
        keys = {r.hget(KEYS.job(j), "dedupe_key") for j in ids}
        assert len(keys) == 1 and is_canonical(keys.pop() or "")
        by_job = collections.defaultdict(list)
        for _sid, fields in events(r):
            by_job[fields["job_id"]].append(fields)
        assert all(len(by_job[j]) == 1 for j in ids)  # each its own event
        assert {by_job[j][0]["deduped_from"] for j in ids[1:]} == {first}
        assert {by_job[j][0]["video_url"] for j in ids} == {jobs[0].video_url}
        # one charge in the cost ledger, and 19 x its cost counted as saved
        charged = [f for _id, f in r.xrange(KEYS.ledger) if f["job_id"] in ids]
        assert [(f["job_id"], int(f["micro"])) for f in charged] == [(first, BILLED_MICRO)]
        saved = sum(scrape_counter(w, "reframe_dedup_saved_usd_total") for w in cluster.workers)
        assert abs(saved - 19 * BILLED_MICRO / 1e6) < 1e-6

        # --- later, within the window: the quote names the hit at price 0, and the job costs none
        quote = p.quote(request, tenant="globex", dedupe=True)
        assert quote.dedupe_hit == first and quote.price_micro == 0 and quote.would_accept
        assert p.quote(request, tenant="globex").dedupe_hit is None  # globex's default is off
        # the CLI quotes the whole request the same way
        args = [url, "-a", "9:16", "--prompt", tag, "--tenant", "globex", "--json"]
        for extra, hit in ((["--dedupe"], first), ([], None)):
            cli = subprocess.run(
                [sys.executable, "-m", "reframe", "quote", *args, *extra],
                check=False,
                env=child_environment(cluster.env),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert cli.returncode == 0, cli.stderr
            answer = json.loads(cli.stdout)
            assert answer["dedupe_hit"] == hit and (answer["price_micro"] == 0) == (hit is not None)
        later = p.enqueue(request, tenant="globex", dedupe=True)
        ids.append(later)
        job = p.wait(later, timeout_s=30)
        assert job.state is JobState.SUCCEEDED and job.deduped_from == first
        assert submits_of(cluster, request) == 1

        # --- a different parameter is different work: one more request
        other = {**request, "aspect_ratio": "1:1"}
        assert p.quote(other, tenant="acme").dedupe_hit is None
        ids.append(p.enqueue(other, tenant="acme"))
        job = p.wait(ids[-1], timeout_s=30)
        assert job.state is JobState.SUCCEEDED and job.deduped_from is None
        assert submits_of(cluster, other) == 1 and submits_of(cluster, request) == 1

        # --- a leader that fails (a runner failure, no retries left): a follower does the work
        assert cluster.emulator_control is not None
        cluster.emulator_control.set_faults([{"op": "submit", "kind": "runner_error", "times": 1}])
        failing = {**request, "prompt": f"{tag} failing leader"}
        leader = p.enqueue(failing, tenant="acme")
        ids.append(leader)
        wait_until(lambda: submits_of(cluster, failing) == 1, timeout_s=30, what="the leader at fal")
        followers = [p.enqueue(failing, tenant="globex", dedupe=True) for _ in range(3)]
        ids.extend(followers)
        wait_until(
            lambda: all(j and j.terminal for j in p.get_many([leader, *followers])),
            timeout_s=60,
            what="the leader and its followers end",
        )
        ended = {j.id: j for j in p.get_many([leader, *followers]) if j is not None}
        assert ended[leader].state is JobState.FAILED
        assert [ended[f].state for f in followers] == [JobState.SUCCEEDED] * 3
        paid = [f for f in followers if ended[f].deduped_from is None]
        assert len(paid) == 1, {f: ended[f].deduped_from for f in followers}
        assert {ended[f].deduped_from for f in followers if f not in paid} == {paid[0]}
        assert submits_of(cluster, failing) == 2  # the failed one (fal bills none) and the new leader
