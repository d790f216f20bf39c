"""The API endpoints the console is built on, over HTTP against the real cluster: ``/v1/me``,
``/v1/cluster`` (admin; what ``reframe status --cluster --json`` reads), the job-change stream
``/v1/job-events`` (tenant-scoped SSE), ``/v1/jobs/{id}/timeline``, the listing's ``q`` and
``order``, ``/v1/dead-letters/purge``, and their place in the OpenAPI document."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from typing import Any

import httpx
import pytest

from config.settings import child_environment
from tests.console.conftest import Console, wait_for
from worker.contracts.keys import Keys
from worker.contracts.tenants import TenantLimits, TenantRegistry

pytestmark = pytest.mark.integration

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}


def test_me_names_the_key_without_its_token(console: Console) -> None:
    with console.client(console.globex_reader) as c:
        me = c.get("/v1/me").json()
    assert me["tenant"] == "globex" and me["scopes"] == ["read"] and me["admin"] is False
    assert console.globex_reader not in json.dumps(me) and me["key_id"] in console.globex_reader


def test_cluster_is_admin_only_and_agrees_with_the_cli(console: Console) -> None:
    with console.client(console.acme) as c:
        refused = c.get("/v1/cluster")
    assert refused.status_code == 403 and refused.headers["content-type"].startswith("application/problem+json")
    with console.client(console.admin) as c:
        snap = c.get("/v1/cluster").raise_for_status().json()
    cli = subprocess.run(
        [sys.executable, "-m", "reframe", "status", "--cluster", "--json"],
        env=child_environment(console.cluster.env),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    status = json.loads(cli.stdout)
    assert snap["workers"]["alive"] == status["workers"]["alive"] == 2
    assert snap["limits"]["max_concurrency"] == status["limits"]["max_concurrency"] == 6
    assert snap["breaker"] == status["breaker"]
    assert set(snap["waiting"]) == {"high", "normal", "low"}
    assert snap["budget_usd"]["daily_cap"] == status["limits"]["budget_daily_usd"]
    assert snap["tenants"] == status["tenants"] and snap["tenants_not_shown"] == status["tenants_not_shown"]


def test_cluster_shows_slots_and_budget_headroom_per_tenant(console: Console) -> None:
    registry = TenantRegistry(console.redis, Keys(console.cluster.settings().key_prefix))
    limits = TenantLimits(daily_budget_usd=30, monthly_budget_usd=700, weight=2, max_concurrent=5)
    registry.set("acme", limits)
    with console.client(console.globex_reader) as c:
        assert c.get("/v1/cluster").status_code == 403  # a read key: admins only
    try:
        jobs = [console.enqueue(console.acme), console.enqueue(console.acme), console.enqueue(console.globex)]
        most: dict[str, int] = {}
        together: list[dict[str, int]] = []
        holding: dict[str, dict[str, Any]] = {}
        snap: dict[str, Any] = {}
        with console.client(console.admin) as c:

            def sample() -> bool:
                snap.update(c.get("/v1/cluster").raise_for_status().json())
                held = {t["tenant"]: t for t in snap["tenants"] if t["slots_in_use"]}
                holding.update(held)
                for tenant, row in held.items():
                    most[tenant] = max(most.get(tenant, 0), row["slots_in_use"])
                if {"acme", "globex"} <= set(held):
                    together.append({t: row["slots_in_use"] for t, row in held.items()})
                return all(console.job(j)["state"] in TERMINAL for j in jobs)

            wait_for(sample, timeout_s=60, what="the jobs of acme and globex end")

            def released() -> bool:
                snap.update(c.get("/v1/cluster").raise_for_status().json())
                return not any(t["slots_in_use"] for t in snap["tenants"])

            wait_for(released, timeout_s=10, what="every tenant's slots freed")
        assert together, most  # both tenants' slots seen at once while their jobs ran
        assert most == {"acme": 2, "globex": 1}, most
        # globex has no limits: listed only while it held a slot, with no caps
        globex = holding["globex"]
        assert not globex["has_limits"] and globex["weight"] == 1 and globex["max_concurrent"] is None
        assert globex["day_cap"] is None and globex["month_cap"] is None
        assert globex["day_headroom"] is None and globex["month_headroom"] is None
        rows = {t["tenant"]: t for t in snap["tenants"]}
        assert "globex" not in rows and snap["tenants_not_shown"] == 0
        acme = rows["acme"]
        assert acme["has_limits"] and acme["weight"] == 2 and acme["max_concurrent"] == 5
        assert acme["day_cap"] == 30 and acme["month_cap"] == 700
        assert acme["day_spent"] > 0 and acme["day_reserved"] == 0
        assert acme["day_headroom"] == pytest.approx(30 - acme["day_spent"])
        assert acme["month_headroom"] == pytest.approx(700 - acme["month_spent"])
    finally:
        registry.remove("acme")


def _follow(console: Console, token: str, path: str, into: list[dict[str, Any]], stop: threading.Event) -> None:
    """Read the SSE stream at ``path`` into ``into`` (a ``{"connected": True}`` marker first)."""
    try:
        _read(console, token, path, into, stop)
    except httpx.HTTPError:
        if not stop.is_set():
            raise


def _read(console: Console, token: str, path: str, into: list[dict[str, Any]], stop: threading.Event) -> None:
    with httpx.stream(
        "GET", f"{console.url}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=60
    ) as answer:
        assert answer.status_code == 200
        for line in answer.iter_lines():
            if line.startswith(": following"):
                into.append({"connected": True})
            if line.startswith("data:"):
                into.append(json.loads(line[5:]))
            if stop.is_set():
                return


def test_job_events_follow_new_jobs_of_the_tenant_only(console: Console) -> None:
    acme_events: list[dict[str, Any]] = []
    admin_events: list[dict[str, Any]] = []
    stop = threading.Event()
    readers = [
        threading.Thread(target=_follow, args=(console, console.acme, "/v1/job-events", acme_events, stop)),
        threading.Thread(
            target=_follow,
            args=(console, console.admin, "/v1/job-events?tenant=globex", admin_events, stop),
        ),
    ]
    for t in readers:
        t.daemon = True
        t.start()
    wait_for(lambda: bool(acme_events and admin_events), 30, "both streams connected")
    ours = console.enqueue(console.acme, metadata={"case": "events"})
    theirs = console.enqueue(console.globex)
    try:
        wait_for(
            lambda: any(e.get("id") == ours and e["state"] == "SUCCEEDED" for e in acme_events),
            60,
            "acme's job SUCCEEDED on acme's stream",
        )
        wait_for(
            lambda: any(e.get("id") == theirs and e["state"] in TERMINAL for e in admin_events),
            60,
            "globex's job on the admin's globex stream",
        )
    finally:
        stop.set()
    acme_events, admin_events = acme_events[1:], admin_events[1:]
    assert {e["id"] for e in acme_events} == {ours}, "a tenant's stream shows only its own jobs"
    assert {e["id"] for e in admin_events} == {theirs}, "tenant=globex shows only globex"
    states = [e["state"] for e in acme_events]
    assert states[-1] == "SUCCEEDED" and len(states) == len(set(states)), states
    assert acme_events[-1]["cost_usd"] is not None and acme_events[-1]["tenant"] == "acme"


def test_job_events_watch_and_refusals(console: Console) -> None:
    done = console.enqueue(console.globex)
    console.wait_state(done, TERMINAL)
    # watching a finished job sends it once; watching another tenant's job sends nothing
    other = console.enqueue(console.acme)
    console.wait_state(other, TERMINAL)
    events: list[dict[str, Any]] = []
    stop = threading.Event()
    path = f"/v1/job-events?watch={done}&watch={other}"
    t = threading.Thread(target=_follow, args=(console, console.globex, path, events, stop), daemon=True)
    t.start()
    try:
        wait_for(lambda: len(events) >= 2, 30, "the watched job's event")
    finally:
        stop.set()
    assert [e.get("id") for e in events[1:]] == [done]
    with console.client(console.globex) as c:
        assert c.get("/v1/job-events", params={"tenant": "acme"}).status_code == 403
        assert c.get("/v1/job-events", params={"watch": "not/an id"}).status_code in (404, 422)
    with httpx.Client(base_url=console.url) as anonymous:
        assert anonymous.get("/v1/job-events").status_code == 401


def test_timeline_orders_states_with_durations_and_costs(console: Console) -> None:
    job_id = console.enqueue(console.acme)
    console.wait_state(job_id, TERMINAL)
    with console.client(console.acme) as c:
        t = c.get(f"/v1/jobs/{job_id}/timeline").raise_for_status().json()
    with console.client(console.globex) as c:
        assert c.get(f"/v1/jobs/{job_id}/timeline").status_code == 404
    states = [s["state"] for s in t["steps"]]
    assert states[0] == "QUEUED" and states[-1] == "SUCCEEDED" and "IN_PROGRESS" in states
    ats = [s["at_ms"] for s in t["steps"]]
    assert ats == sorted(ats)
    for step, nxt in zip(t["steps"], t["steps"][1:], strict=False):
        assert step["duration_ms"] == nxt["at_ms"] - step["at_ms"]
    assert t["steps"][-1]["duration_ms"] == 0
    assert t["fal_request_ids"] == [t["job"]["fal_request_id"]]
    # fal bills whole seconds of output; the estimate (reserved) covers at least what was settled
    assert t["settled_usd"] == pytest.approx(t["job"]["cost_usd"]) and t["settled_usd"] >= 0.12
    assert t["estimate_usd"] >= t["settled_usd"]
    assert t["attempts"] == 1 and t["replays"] == 0


def test_listing_searches_and_orders_newest_first(console: Console) -> None:
    keyed = console.enqueue(console.acme, metadata={"customer": "Zebra Films"})
    with console.client(console.acme) as c:
        idem = c.post(
            "/v1/jobs",
            json={"video_url": console.sample_url, "aspect_ratio": "1:1"},
            headers={"Idempotency-Key": "order-4711"},
        ).json()["id"]
        assert [j["id"] for j in c.get("/v1/jobs", params={"q": "zebra"}).json()["items"]] == [keyed]
        assert [j["id"] for j in c.get("/v1/jobs", params={"q": "ORDER-47"}).json()["items"]] == [idem]
        assert [j["id"] for j in c.get("/v1/jobs", params={"q": keyed[:10]}).json()["items"]] == [keyed]
        newest = c.get("/v1/jobs", params={"order": "newest", "limit": 1}).json()
        assert newest["items"][0]["id"] == idem
        # the cursor walks newest -> oldest over every job of the tenant, each once
        seen: list[str] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"order": "newest", "limit": 2, **({"cursor": cursor} if cursor else {})}
            page = c.get("/v1/jobs", params=params).json()
            seen += [j["id"] for j in page["items"]]
            cursor = page["next_cursor"]
            if not cursor:
                break
        oldest_first = [j["id"] for j in c.get("/v1/jobs", params={"limit": 200}).json()["items"]]
    assert seen == list(reversed(oldest_first)) and len(set(seen)) == len(seen)


def test_purge_needs_admin_and_confirmation(console: Console) -> None:
    with console.client(console.acme) as c:
        assert c.post("/v1/dead-letters/purge", json={"confirm": True}).status_code == 403
    with console.client(console.admin) as c:
        refused = c.post("/v1/dead-letters/purge", json={"confirm": False})
        assert refused.status_code == 422 and refused.json()["errors"][0]["field"] == "confirm"
        assert c.post("/v1/dead-letters/purge", json={}).status_code == 422
        console.redis.zadd("{reframe}:dlq", {"0123456789abcdef0123456789abcdef": 1})
        assert c.post("/v1/dead-letters/purge", json={"confirm": True}).json() == {"purged": 1}
    assert console.redis.zcard("{reframe}:dlq") == 0


def test_openapi_documents_the_new_operations_and_not_the_console(console: Console) -> None:
    doc = httpx.get(f"{console.url}/openapi.json", timeout=30).json()
    paths = doc["paths"]
    for path, method in [
        ("/v1/me", "get"),
        ("/v1/cluster", "get"),
        ("/v1/job-events", "get"),
        ("/v1/jobs/{job_id}/timeline", "get"),
        ("/v1/dead-letters/purge", "post"),
    ]:
        assert method in paths[path], path
    assert "text/event-stream" in paths["/v1/job-events"]["get"]["responses"]["200"]["content"]
    params = {p["name"] for p in paths["/v1/jobs"]["get"]["parameters"]}
    assert {"q", "order"} <= params
    assert not [p for p in paths if p.startswith("/console")]
