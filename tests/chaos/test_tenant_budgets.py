"""Hierarchical budgets (issue #13): every tenant's and the cluster's caps hold at every moment,
reserved and settled in the same scripts, judged by the emulator's ledger and sampled Redis."""

from __future__ import annotations

import collections
import itertools
import threading
from collections.abc import Callable
from pathlib import Path

import redis

from producer import JobState, Producer
from reframe.localcluster import LocalCluster
from reframe.localproc import wait_until
from tests.chaos.conftest import (
    KEYS,
    budget_day,
    distinct_inputs,
    explained,
    ledger,
    new_tag,
    redis_day,
    redis_of,
)
from tests.cluster.conftest import fingerprint_of, upload
from worker.contracts.keys import Keys
from worker.contracts.tenants import TenantLimits, TenantRegistry

ClusterFactory = Callable[..., LocalCluster]
PRICE_MICRO_PER_S = 60_000
#: A 3 s clip is estimated at 4 s (0.5 s margin, whole seconds) and billed 3 s.
ESTIMATE_MICRO, BILLED_MICRO = 4 * PRICE_MICRO_PER_S, 3 * PRICE_MICRO_PER_S


def cap_admitting(k: int) -> int:
    """A cap that admits exactly k such jobs: k-1 settled plus one estimate fit, k settled plus one do not."""
    return k * BILLED_MICRO + (ESTIMATE_MICRO - BILLED_MICRO)


class TenantSampler:
    """Samples (spent, reserved) of the cluster's and each tenant's day HASH while a test runs."""

    def __init__(self, r: redis.Redis, tenants: list[str]) -> None:
        self.r, self.tenants = r, tenants
        self.samples: list[dict[str, tuple[int, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            day = redis_day(self.r)
            pipe = self.r.pipeline(transaction=True)  # one consistent moment
            pipe.hmget(f"{KEYS.root}:fc:budget:day:{day}", "spent", "reserved")
            for t in self.tenants:
                pipe.hmget(f"{KEYS.root}:fc:budget:tenant:{t}:day:{day}", "spent", "reserved")
            rows = pipe.execute()
            names = ["", *self.tenants]
            self.samples.append(
                {n: (int(a or 0), int(b or 0)) for n, (a, b) in zip(names, rows, strict=True)}
            )
            self._stop.wait(0.02)

    def __enter__(self) -> TenantSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def test_tenant_caps_admit_exactly_their_jobs_and_never_block_other_tenants(
    chaos_cluster: ClusterFactory, whole_clip: Path
) -> None:
    """60 jobs of three capped tenants (caps admitting exactly 2, 3 and 5) and 10 of an uncapped
    one, all at once: exactly 2, 3 and 5 run, the rest wait BLOCKED by their tenant's cap, the
    uncapped tenant's jobs all run meanwhile, no sample ever shows spent + reserved over any cap,
    and each tenant's spend is what fal billed for its jobs."""
    admits = {"alpha": 2, "beta": 3, "gamma": 5}
    global_cap = 100_000_000  # not binding here (the cluster's cap alone: tests/chaos/test_fencing.py)
    cluster = chaos_cluster(
        workers=2,
        env={
            "REFRAME_MAX_CONCURRENCY": "6",
            "REFRAME_BUDGET_DAILY_USD": f"{global_cap / 1e6:.6f}",
            "REFRAME_ESTIMATE_MARGIN_S": "0.5",
            "REFRAME_BILLING_UNIT_S": "1",
        },
    )
    r = redis_of(cluster)
    registry = TenantRegistry(r, Keys("reframe"))
    for tenant, k in admits.items():
        registry.set(tenant, TenantLimits(daily_budget_usd=cap_admitting(k) / 1e6))
    url = upload(cluster.settings(), whole_clip)
    tag = new_tag("tenant-budgets")
    ids: dict[str, list[str]] = {}
    tenants = [*admits, "free"]
    with (
        TenantSampler(r, tenants) as sampler,
        Producer(cluster.settings()) as p,
        explained(cluster, [j for js in ids.values() for j in js]),
    ):
        for tenant in tenants:
            n = 10 if tenant == "free" else 20
            ids[tenant] = p.enqueue_many(distinct_inputs(url, n, f"{tag}-{tenant}"), tenant=tenant)
        everyone = [j for js in ids.values() for j in js]

        def settled() -> bool:
            states = collections.Counter(j.state for j in p.get_many(everyone) if j is not None)
            done = states[JobState.SUCCEEDED] == sum(admits.values()) + 10
            return (
                done
                and states[JobState.BLOCKED] == 60 - sum(admits.values())
                and not r.hlen(KEYS.reservations)
            )

        wait_until(settled, timeout_s=180, what="every admitted job done, the rest blocked")
    book = ledger(cluster)
    by_state = {t: collections.Counter(j.state for j in p.get_many(js) if j) for t, js in ids.items()}
    for tenant, k in admits.items():
        assert by_state[tenant][JobState.SUCCEEDED] == k, by_state
        blocked = [
            r.hget(KEYS.job(j), "blocked_scope")
            for j in ids[tenant]
            if r.hget(KEYS.job(j), "state") == "BLOCKED"
        ]
        assert blocked == ["tenant_day"] * (20 - k)
    assert by_state["free"][JobState.SUCCEEDED] == 10
    # no moment over any cap: the cluster's and each tenant's
    caps = {"": global_cap, **{t: cap_admitting(k) for t, k in admits.items()}}
    assert len(sampler.samples) > 10
    over = [(n, s) for s in sampler.samples for n, cap in caps.items() if s[n][0] + s[n][1] > cap]
    assert over == [], over[:5]
    # each tenant's spend is what fal billed for its jobs; the cluster's is the sum
    day = redis_day(r)
    assert book["billed_seconds"] == 3 * (sum(admits.values()) + 10)
    for tenant in tenants:
        spent = int(r.hget(f"{KEYS.root}:fc:budget:tenant:{tenant}:day:{day}", "spent") or 0)
        succeeded = 10 if tenant == "free" else admits[tenant]
        assert spent == succeeded * BILLED_MICRO, (tenant, spent)
    assert budget_day(r) == (book["billed_seconds"] * PRICE_MICRO_PER_S, 0)
    # the ledger has one settled entry per paid job, by tenant
    entries = [fields for _id, fields in r.xrange(KEYS.ledger)]
    per_tenant = collections.Counter(e["tenant"] for e in entries)
    assert per_tenant == {**admits, "free": 10}
    assert {e["kind"] for e in entries} == {"settled"}
    assert sum(int(e["micro"]) for e in entries) == book["billed_seconds"] * PRICE_MICRO_PER_S


def test_a_late_tenant_gets_its_fair_share_of_the_slots_at_once(
    chaos_cluster: ClusterFactory, whole_clip: Path
) -> None:
    """Tenant A fills the queue with 40 jobs and holds all 4 slots; tenant B then enqueues 6. Each
    slot freed goes to the tenant furthest below its share: B's first two jobs take the next two
    slots, then the two alternate while both wait, so B's 6 are all at fal within the next ~10
    submits instead of behind A's 36 (judged by the order of fal's own submit log)."""
    cluster = chaos_cluster(
        workers=2,
        env={"REFRAME_MAX_CONCURRENCY": "4", "REFRAME_BUDGET_DAILY_USD": "100"},
        emulator_concurrency=4,
    )
    r = redis_of(cluster)
    url = upload(cluster.settings(), whole_clip)
    tag = new_tag("fair")
    a_in, b_in = distinct_inputs(url, 40, f"{tag}-a"), distinct_inputs(url, 6, f"{tag}-b")
    with Producer(cluster.settings()) as p, explained(cluster, []):
        a = p.enqueue_many(a_in, tenant="flood")
        wait_until(lambda: len(ledger(cluster)["submits"]) >= 4, timeout_s=60, what="A holds every slot")
        b = p.enqueue_many(b_in, tenant="late")
        wait_until(
            lambda: all(j and j.terminal for j in p.get_many(a + b)), timeout_s=180, what="all jobs done"
        )
        states = collections.Counter(j.state for j in p.get_many(a + b) if j)
    assert states == {JobState.SUCCEEDED: 46}
    book = ledger(cluster)
    late = {fingerprint_of(x) for x in b_in}
    order = ["late" if s["fingerprint"] in late else "flood" for s in book["submits"]]
    first_late = order.index("late")
    assert first_late <= 5, order  # the first slot freed after B arrived (A had 4 in flight)
    window = order[first_late : first_late + 12]
    assert window.count("late") == 6, order  # B's 6 within the next 12 submits: half the slots
    assert book["max_open"] <= 4
    assert r.hgetall(KEYS.fair).get("use:late") is None  # bookkeeping back to zero


def test_a_tenant_submit_rate_paces_only_that_tenant(chaos_cluster: ClusterFactory, whole_clip: Path) -> None:
    """--submit-rate-per-s 2: fal sees that tenant's submits about one per 0.5 s, while another
    tenant's jobs go at the cluster's rate (judged by the emulator's submit log)."""
    cluster = chaos_cluster(
        workers=2,
        env={"REFRAME_MAX_CONCURRENCY": "12", "REFRAME_BUDGET_DAILY_USD": "100"},
        emulator_concurrency=12,
    )
    TenantRegistry(redis_of(cluster), Keys("reframe")).set("paced", TenantLimits(submit_rate_per_s=2.0))
    url = upload(cluster.settings(), whole_clip)
    tag = new_tag("tenant-rate")
    paced_in, free_in = distinct_inputs(url, 5, f"{tag}-p"), distinct_inputs(url, 5, f"{tag}-f")
    with Producer(cluster.settings()) as p, explained(cluster, []):
        ids = p.enqueue_many(paced_in, tenant="paced") + p.enqueue_many(free_in, tenant="free")
        wait_until(lambda: all(j and j.terminal for j in p.get_many(ids)), timeout_s=120, what="all done")
        assert {j.state for j in p.get_many(ids) if j} == {JobState.SUCCEEDED}
    book = ledger(cluster)
    paced = {fingerprint_of(x) for x in paced_in}
    t_paced = sorted(s["t"] for s in book["submits"] if s["fingerprint"] in paced)
    t_free = sorted(s["t"] for s in book["submits"] if s["fingerprint"] not in paced)
    gaps = [b - a for a, b in itertools.pairwise(t_paced)]
    # tokens are spaced 0.5 s on Redis time; a POST reaches fal a few tens of ms after its token
    assert len(t_paced) == 5 and t_paced[-1] - t_paced[0] >= 2.0 - 0.25, t_paced
    assert all(g >= 0.5 - 0.2 for g in gaps), gaps
    assert t_free[-1] - t_free[0] < t_paced[-1] - t_paced[0], (t_free, t_paced)  # the other is not paced
