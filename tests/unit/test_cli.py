"""The `reframe` CLI as a user runs it: one-line errors naming the field, exit codes, help everywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import redis

from config import load_settings
from worker.flow import FlowControl

COMMANDS = [
    [],
    ["enqueue"],
    ["status"],
    ["wait"],
    ["cancel"],
    ["results"],
    ["worker"],
    ["exporter"],
    ["demo"],
    ["dlq"],
    ["dlq", "list"],
    ["dlq", "show"],
    ["dlq", "replay"],
    ["dlq", "purge"],
    ["accounts"],
    ["accounts", "list"],
    ["accounts", "undrain"],
]


def reframe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("REFRAME_") and k != "FAL_KEY"}
    clean["COLUMNS"] = "200"
    return subprocess.run(
        [sys.executable, "-m", "reframe", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **(env or {})},
    )


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "top")
def test_every_command_documents_itself(command: list[str]) -> None:
    out = reframe(*command, "--help")
    assert out.returncode == 0, out.stderr
    assert "Usage" in out.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["enqueue", "https://x.test/a.mp4", "-a", "2:1"], "error: aspect_ratio: Input should be"),
        (["enqueue", "ftp://x.test/a.mp4", "-a", "1:1"], "video_url"),
        (["enqueue", "/no/such/file.mp4", "-a", "1:1"], "error: video_url: '/no/such/file.mp4' is neither"),
        (
            ["enqueue", "https://x.test/a.mp4", "-a", "1:1", "--x-start", "9", "--x-end", "3"],
            "x_end must be greater than x_start",
        ),
        (
            ["enqueue", "https://x.test/a.mp4", "-a", "1:1", "--priority", "urgent"],
            "error: priority:",
        ),
        (
            ["enqueue", "https://x.test/a.mp4", "-a", "1:1", "-m", "nokey"],
            "error: metadata: 'nokey' is not KEY=VALUE",
        ),
        (["status"], "error: job_id: give a job id or --cluster"),
        (["dlq", "purge"], "error: purge: pass --yes to confirm"),
    ],
)
def test_bad_input_is_one_line_naming_the_field(args: list[str], expected: str) -> None:
    out = reframe(*args, env={"REFRAME_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert expected in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr


def test_bad_settings_name_the_variable_and_exit_2() -> None:
    out = reframe("status", "abc", env={"REFRAME_MAX_CONCURRENCY": "-1", "REFRAME_TYPO": "x"})
    assert out.returncode == 2
    assert "REFRAME_MAX_CONCURRENCY" in out.stderr and "REFRAME_TYPO: unknown setting" in out.stderr


def test_worker_refuses_to_start_against_real_fal_without_a_key() -> None:
    out = reframe("worker")
    assert out.returncode == 2
    assert "FAL_KEY: required" in out.stderr


def test_accounts_list_and_undrain_name_accounts_never_keys(redis_url: str) -> None:
    env = {
        "REFRAME_REDIS_URL": redis_url,
        "REFRAME_FAL_ACCOUNTS": "a:3,b:5",
        "REFRAME_FAL_ACCOUNT_KEYS": "a=ida:very-secret-a; b=idb:very-secret-b",
    }
    client = redis.Redis.from_url(redis_url)
    FlowControl.from_settings(client, load_settings(env)).accounts.drain("a")
    out = reframe("accounts", "list", "--json", env=env)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["account"], r["cap"], r["up"], r["drain_reason"]) for r in rows] == [
        ("a", 3, False, "key_rejected"),
        ("b", 5, True, None),
    ]
    assert "very-secret" not in out.stdout + out.stderr
    snap = json.loads(reframe("status", "--cluster", "--json", env=env).stdout)
    assert [(a["account"], a["up"]) for a in snap["fal_accounts"]] == [("a", False), ("b", True)]
    assert "a 0/3 drained, b 0/5" in reframe("status", "--cluster", env=env).stdout
    assert "undrained" in reframe("accounts", "undrain", "a", env=env).stdout
    assert "was not drained" in reframe("accounts", "undrain", "a", env=env).stdout
    unknown = reframe("accounts", "undrain", "zz", env=env)
    assert unknown.returncode != 0 and "not in REFRAME_FAL_ACCOUNTS" in unknown.stderr
    client.close()


def test_accounts_list_shows_each_accounts_budget(redis_url: str) -> None:
    env = {
        "REFRAME_REDIS_URL": redis_url,
        "REFRAME_FAL_ACCOUNTS": "a:5:-:1.5:20,b:3",
        "REFRAME_PRICE_PER_S_USD": "0.1",
        "REFRAME_MAX_VIDEO_DURATION_S": "10",
        "REFRAME_ESTIMATE_MARGIN_S": "0",
    }
    client = redis.Redis.from_url(redis_url)
    flow = FlowControl.from_settings(client, load_settings(env))
    for job in ("j1", "j2"):
        assert flow.budget.reserve(job, 600_000, tenant="t").ok
    assert flow.slots.acquire("j1", "normal", tenant="t").account == "a"  # the most free slots
    # a: 0.60 reserved + one largest job (1.00) would pass its 1.50: j2 goes to b
    assert flow.slots.acquire("j2", "normal", tenant="t").account == "b"
    assert flow.budget.settle("j1", 600_000)
    rows = {
        r["account"]: r
        for r in map(json.loads, reframe("accounts", "list", "--json", env=env).stdout.splitlines())
    }
    a, b = rows["a"], rows["b"]
    assert (a["daily_cap_usd"], a["monthly_cap_usd"], a["day_spent_usd"], a["reserved_usd"]) == (
        1.5,
        20.0,
        0.6,
        0,
    )
    assert a["budget_full"] and not a["up"]  # 0.60 spent + 1.00 would still pass 1.50
    assert (b["daily_cap_usd"], b["reserved_usd"], b["budget_full"], b["up"]) == (None, 0.6, False, True)
    table = reframe("accounts", "list", env=env).stdout
    assert "budget" in table and "0.60 / 1.50" in table
    client.close()
