"""The operator console in a real headless Chromium (Debian's ``chromium``, driven by Playwright
from PyPI; no browser is downloaded) against the real ``reframe serve``, workers and emulator of
``conftest.py``: sign in, a job appearing and succeeding live, the job page's videos playing in
sync, filters, dead-letter replay with the pay-twice refusal, the cluster page, and a read-only
key of another tenant. Every page is screenshotted into ``<pytest tmp>/console-screenshots``
(copies are committed under docs/console/, README "Operator console").
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, Playwright, expect, sync_playwright

from tests.console.conftest import Console
from worker.contracts.keys import Keys
from worker.contracts.tenants import TenantLimits, TenantRegistry

pytestmark = pytest.mark.integration

CHROMIUM = os.environ.get("REFRAME_TEST_CHROMIUM", "/usr/bin/chromium")
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
#: Longest a page waits for something live (a job at the emulator takes about a second).
LIVE_MS = 30_000


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/ensure-chromium (./dev test does)")
    with sync_playwright() as pw:
        yield pw


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    browser = playwright.chromium.launch(
        executable_path=CHROMIUM,
        args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required", "--mute-audio"],
    )
    yield browser
    browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.getbasetemp() / "console-screenshots"
    path.mkdir(exist_ok=True)
    return path


def new_page(browser: Browser) -> Page:
    """A laptop-sized page whose script errors fail the test."""
    page = browser.new_page(viewport={"width": 1366, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors  # type: ignore[attr-defined]
    return page


def sign_in(page: Page, console: Console, token: str) -> None:
    page.goto(f"{console.url}/console/jobs")
    page.wait_for_url(re.compile(r"/console/signin\?next="))  # no key yet: sent to sign in
    page.get_by_label("API key").fill(token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r"/console/jobs$"))


@pytest.fixture(scope="module")
def admin(browser: Browser, console: Console) -> Iterator[Page]:
    page = new_page(browser)
    sign_in(page, console, console.admin)
    yield page
    assert not page.errors  # type: ignore[attr-defined]
    page.close()


def shoot(page: Page, shots: Path, name: str) -> None:
    page.screenshot(path=str(shots / f"{name}.png"), full_page=True)


def row(page: Page, job_id: str) -> Any:
    return page.locator(f'#jobs tbody tr[data-job-id="{job_id}"]')


def test_sign_in_then_a_new_job_appears_and_succeeds_without_reload(
    admin: Page, console: Console, shots: Path
) -> None:
    page = admin
    expect(page.locator("#who")).to_contain_text("admin")
    expect(page.locator("#live")).to_contain_text("live", timeout=LIVE_MS)
    # the key lives in the tab's sessionStorage, not in a cookie
    assert page.evaluate("() => sessionStorage.getItem('reframe.console.key')") == console.admin
    assert page.context.cookies() == []
    page.evaluate("() => { window.__sameDocument = true; }")
    job_id = console.enqueue(console.acme, metadata={"film": "console live"})
    expect(row(page, job_id)).to_be_visible(timeout=LIVE_MS)
    expect(row(page, job_id).locator("td.state")).to_have_text("SUCCEEDED", timeout=LIVE_MS)
    expect(row(page, job_id).locator("td.tenant")).to_have_text("acme")
    expect(row(page, job_id).locator("td.num")).to_have_text(re.compile(r"^\$\d+\.\d\d$"))
    assert page.evaluate("() => window.__sameDocument") is True, "the page was reloaded"
    shoot(page, shots, "jobs")


def test_job_page_plays_input_and_output_in_sync(admin: Page, console: Console, shots: Path) -> None:
    page = admin
    job_id = console.enqueue(console.globex, aspect_ratio="9:16", metadata={"film": "side by side"})
    console.wait_state(job_id, TERMINAL)
    page.goto(f"{console.url}/console/jobs")
    row(page, job_id).get_by_role("link").click()
    page.wait_for_url(re.compile(f"/console/jobs/{job_id}$"))
    expect(page.locator("#job-state")).to_have_text("SUCCEEDED")
    expect(page.locator("#timeline li")).to_have_count(5)  # QUEUED .. SUCCEEDED, each with a time
    expect(page.locator("#facts")).to_contain_text("Cost estimate")
    page.wait_for_function(
        "() => ['input-video', 'output-video'].every(id => document.getElementById(id).readyState >= 2)",
        timeout=LIVE_MS,
    )
    dims = page.evaluate(
        "() => ['input-video', 'output-video'].map(id => { const v = document.getElementById(id);"
        " return [v.videoWidth, v.videoHeight]; })"
    )
    assert dims[0] == [320, 180], dims  # the 16:9 sample
    assert dims[1][0] < dims[1][1] and abs(dims[1][0] / dims[1][1] - 9 / 16) < 0.02, dims
    box = page.locator("#ratio-box")
    expect(box).to_be_visible()
    assert box.get_attribute("data-ratio") == "9:16"
    size = box.bounding_box()
    assert size is not None and abs(size["width"] / size["height"] - 9 / 16) < 0.03, size
    page.get_by_role("button", name="Play both").click()
    page.wait_for_function(
        "() => { const a = document.getElementById('input-video'), b = document.getElementById('output-video');"
        " return !a.paused && !b.paused && a.currentTime > 0.3 && b.currentTime > 0.3"
        " && Math.abs(a.currentTime - b.currentTime) < 0.3; }",
        timeout=LIVE_MS,
    )
    page.get_by_role("button", name="Pause both").click()
    page.wait_for_function(
        "() => document.getElementById('input-video').paused && document.getElementById('output-video').paused"
    )
    shoot(page, shots, "job")


def test_filters_by_state_and_tenant(admin: Page, console: Console) -> None:
    page = admin
    acme_job = console.enqueue(console.acme)
    globex_job = console.enqueue(console.globex)
    for job_id in (acme_job, globex_job):
        console.wait_state(job_id, TERMINAL)
    page.goto(f"{console.url}/console/jobs")
    page.get_by_label("Tenant").fill("globex")
    page.get_by_role("button", name="Apply").click()
    page.wait_for_url(re.compile(r"tenant=globex"))
    expect(row(page, globex_job)).to_be_visible()
    tenants = page.locator("#jobs tbody td.tenant").all_inner_texts()
    assert tenants and set(tenants) == {"globex"}, tenants
    assert row(page, acme_job).count() == 0
    page.get_by_label("State").select_option("SUCCEEDED")
    page.get_by_role("button", name="Apply").click()
    page.wait_for_url(re.compile(r"state=SUCCEEDED"))
    expect(row(page, globex_job)).to_be_visible()
    states = page.locator("#jobs tbody tr").evaluate_all("rows => rows.map(r => r.dataset.state)")
    assert states and set(states) == {"SUCCEEDED"}, states
    page.get_by_label("State").select_option("FAILED")
    page.get_by_role("button", name="Apply").click()
    page.wait_for_url(re.compile(r"state=FAILED"))
    expect(page.locator("#empty")).to_be_visible()
    # search on metadata text
    page.goto(f"{console.url}/console/jobs?q=side+by+side")
    expect(page.locator("#jobs tbody tr")).to_have_count(1)


def _dead_letter(console: Console, fault: dict[str, Any], reason: str) -> str:
    control = console.cluster.emulator_control
    assert control is not None
    control.set_faults([fault])
    job_id = console.enqueue(console.acme, metadata={"dead": reason})
    job = console.wait_state(job_id, {"FAILED", "SUCCEEDED"})
    assert job["state"] == "FAILED" and job["dead_letter_reason"] == reason, job
    return job_id


def test_dead_letters_replay_refuses_an_ambiguous_one_until_confirmed(
    admin: Page, console: Console, shots: Path
) -> None:
    rejected = _dead_letter(
        console,
        {
            "op": "submit",
            "kind": "http",
            "status": 422,
            "json": {"detail": [{"loc": ["body", "video_url"], "msg": "video is unreadable", "type": "value_error"}]},
        },
        "fal_rejected",
    )
    ambiguous = _dead_letter(console, {"op": "submit", "kind": "drop", "after_handling": True}, "ambiguous_submit")
    page = admin
    page.goto(f"{console.url}/console/dead-letters")
    for reason in ("fal_rejected", "ambiguous_submit"):
        expect(page.locator(f'#reasons tr[data-reason="{reason}"] td.num')).to_have_text("1")
    # the rejected job's page shows fal's own message
    page.goto(f"{console.url}/console/jobs/{rejected}")
    expect(page.locator("#errors")).to_contain_text("video is unreadable")
    page.goto(f"{console.url}/console/dead-letters")
    page.get_by_label(f"Select job {rejected}").check()
    page.get_by_label(f"Select job {ambiguous}").check()
    page.get_by_role("button", name="Replay selected (2)").click()
    force = page.locator("#force")
    expect(force).to_be_visible()
    expect(force).to_contain_text("pay twice")
    expect(force.locator(f'li[data-job-id="{ambiguous}"]')).to_be_visible()
    expect(force.locator("li")).to_have_count(1)
    expect(page.locator("#dl-status")).to_contain_text("1 replayed")
    confirm = page.get_by_role("button", name="Replay anyway (may pay twice)")
    expect(confirm).to_be_disabled()
    assert console.job(ambiguous)["state"] == "FAILED"  # refused: still dead-lettered
    shoot(page, shots, "dead-letters")
    page.get_by_label("I accept that replaying these jobs may pay twice for the same work").check()
    confirm.click()
    expect(force).to_be_hidden()
    expect(page.locator("#dl-status")).to_contain_text("1 replayed")
    for job_id in (rejected, ambiguous):
        assert console.wait_state(job_id, {"SUCCEEDED"})["state"] == "SUCCEEDED"
    with console.client(console.admin) as c:
        assert c.get(f"/v1/jobs/{ambiguous}/timeline").json()["replays"] == 1
    expect(page.locator("#empty")).to_be_visible()


def test_cluster_page_shows_the_live_cluster(admin: Page, console: Console, shots: Path) -> None:
    page = admin
    page.goto(f"{console.url}/console/cluster")
    expect(page.locator("#workers")).to_have_text("2", timeout=LIVE_MS)
    expect(page.locator("#slots")).to_contain_text("/ 6")
    expect(page.locator("#flow")).to_contain_text("closed")
    expect(page.locator("#budget")).to_contain_text("headroom")
    link = page.get_by_role("link", name=re.compile("Grafana dashboard"))
    assert link.get_attribute("href") == "http://grafana.invalid/d/reframe-cluster"
    # two tenants get limits and run jobs while the page is open: their rows appear and follow
    registry = TenantRegistry(console.redis, Keys(console.cluster.settings().key_prefix))
    caps = {"acme": (40.0, 900.0), "globex": (25.0, 500.0)}
    limits = TenantLimits(daily_budget_usd=40, monthly_budget_usd=900, weight=3, max_concurrent=5)
    registry.set("acme", limits)
    registry.set("globex", TenantLimits(daily_budget_usd=25, monthly_budget_usd=500))
    try:
        jobs = [console.enqueue(console.acme), console.enqueue(console.globex)]
        for job_id in jobs:
            console.wait_state(job_id, {"SUCCEEDED"})
        with console.client(console.admin) as c:
            rows = {t["tenant"]: t for t in c.get("/v1/cluster").raise_for_status().json()["tenants"]}
        table = page.get_by_role("table", name=re.compile("budget headroom per tenant"))
        expect(table).to_be_visible()
        for tenant, (day_cap, month_cap) in caps.items():
            row = table.locator(f'tbody tr[data-tenant="{tenant}"]')
            api = rows[tenant]
            assert api["day_spent"] > 0 and 0 <= api["day_headroom"] < day_cap, api
            # the page catches up with the API's figures within a refresh (no reload)
            day_left = f"${api['day_headroom']:.2f} left of ${day_cap:.2f}"
            expect(row.locator("td.day-headroom")).to_have_text(day_left, timeout=LIVE_MS)
            month_left = f"${api['month_headroom']:.2f} left of ${month_cap:.2f}"
            expect(row.locator("td.month-headroom")).to_have_text(month_left)
            expect(row.locator("td.day")).to_have_text(f"${api['day_spent']:.2f} + $0.00")
            expect(row.get_by_role("rowheader")).to_have_text(tenant)
            for cell in ("day-headroom", "month-headroom"):
                assert float(row.locator(f"td.{cell}").get_attribute("data-headroom") or "-1") >= 0
        acme = table.locator('tbody tr[data-tenant="acme"]')
        expect(acme.locator("td.weight")).to_have_text("3")
        expect(acme.locator("td.max")).to_have_text("5")
        expect(table.locator('tbody tr[data-tenant="globex"] td.max')).to_have_text("none")
        assert page.evaluate("() => document.querySelector('#tenants caption') !== null")
        shoot(page, shots, "cluster")
    finally:
        for tenant in caps:
            registry.remove(tenant)


def test_a_read_key_sees_its_own_tenant_only_and_cannot_act(
    browser: Browser, console: Console, shots: Path
) -> None:
    acme_job = console.enqueue(console.acme)
    globex_job = console.enqueue(console.globex)
    for job_id in (acme_job, globex_job):
        console.wait_state(job_id, TERMINAL)
    page = new_page(browser)
    sign_in(page, console, console.globex_reader)
    expect(page.locator("#who")).to_contain_text("tenant globex")
    expect(row(page, globex_job)).to_be_visible(timeout=LIVE_MS)
    assert row(page, acme_job).count() == 0
    assert set(page.locator("#jobs tbody td.tenant").all_inner_texts()) == {"globex"}
    expect(page.get_by_label("Tenant")).to_have_value("globex")
    expect(page.get_by_role("link", name="Cluster")).to_be_hidden()
    # naming another tenant in the address bar shows the API's refusal, not its jobs
    page.goto(f"{console.url}/console/jobs?tenant=acme")
    expect(page.locator("#error")).to_contain_text("only admin keys may list another tenant")
    expect(page.locator("#jobs tbody tr")).to_have_count(0)
    page.goto(f"{console.url}/console/jobs/{acme_job}")
    expect(page.locator("#error")).to_contain_text("No job")
    page.goto(f"{console.url}/console/jobs/{globex_job}")
    expect(page.locator("#job-state")).to_have_text("SUCCEEDED")
    expect(page.get_by_role("button", name="Cancel job")).to_be_hidden()
    page.goto(f"{console.url}/console/dead-letters")
    expect(page.locator("#dl-status")).to_contain_text("lacks the enqueue scope")
    expect(page.get_by_role("button", name="Replay selected")).to_be_hidden()
    page.goto(f"{console.url}/console/cluster")
    expect(page.locator("#error")).to_contain_text("needs an admin key")
    # and the API refuses what the page would not offer, with this very key, from the page itself
    statuses = page.evaluate(
        """async (ids) => {
          const h = {Authorization: 'Bearer ' + sessionStorage.getItem('reframe.console.key'),
                     'Content-Type': 'application/json'};
          const post = (p, b) => fetch(p, {method: 'POST', headers: h, body: JSON.stringify(b)}).then(r => r.status);
          return [await post(`/v1/dead-letters/${ids[0]}/replay`, {force: true}),
                  await post(`/v1/jobs/${ids[1]}/cancel`, {}),
                  await post('/v1/dead-letters/purge', {confirm: true}),
                  await fetch('/v1/cluster', {headers: h}).then(r => r.status),
                  await fetch(`/v1/jobs/${ids[2]}`, {headers: h}).then(r => r.status)];
        }""",
        [globex_job, globex_job, acme_job],
    )
    assert statuses == [403, 403, 403, 403, 404], statuses
    page.goto(f"{console.url}/console/jobs")
    shoot(page, shots, "jobs-read-key")
    assert not page.errors  # type: ignore[attr-defined]
    page.close()
    if os.environ.get("REFRAME_CONSOLE_SCREENSHOTS_TO"):  # refresh docs/console/ from this run
        for shot in shots.glob("*.png"):
            shutil.copy(shot, Path(os.environ["REFRAME_CONSOLE_SCREENSHOTS_TO"]) / shot.name)
