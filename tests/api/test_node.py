"""A client in another language: ``clients/node/session.mjs`` (Node 18+, npm ``standardwebhooks`` and
``eventsource-parser``) against a real ``reframe serve``, Redis, a worker and the fal emulator.

The Node client enqueues with an ``Idempotency-Key`` and a ``callback_url`` on a server of its own
on 127.0.0.1 (the cluster's ``REFRAME_FETCH_ALLOW`` lets the guarded fetcher reach loopback, see
``reframe/localcluster.py``), follows the job's Server-Sent Events to the end, verifies the
callback's Standard Webhooks signature with the npm library and checks that a tampered body,
another secret and a moved timestamp are rejected. The same delivery is verified again here with
the PyPI library, and Redis and the emulator's ledger are asked what really happened.

The callbacks need ``REFRAME_CALLBACK_SECRETS`` in the workers, which the package's shared ``api``
cluster does not set (it would also let Schemathesis enqueue callbacks), so this module starts its
own cluster the same way. ``node`` and ``npm`` must be installed (``./dev test`` runs
``scripts/ensure-node``); ``npm ci`` installs the locked packages when ``node_modules`` is missing.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from standardwebhooks.webhooks import Webhook

from reframe.api.keys import KeyStore
from reframe.demo import make_sample_video
from reframe.localcluster import start_cluster, upload_file
from tests.api.conftest import Api, wait_for
from worker.contracts.keys import Keys

pytestmark = pytest.mark.integration

CLIENT = Path(__file__).resolve().parents[2] / "clients" / "node"
SECRET = "whsec_" + base64.b64encode(b"the node client's callback key!!").decode()
OTHER = "whsec_" + base64.b64encode(b"a secret the cluster never signs").decode()
KEYS = Keys("reframe")
#: The happy path's order (README "Job states"); SSE samples the record, so it may skip some.
ORDER = ["QUEUED", "WAITING", "BLOCKED", "DEFERRED", "SUBMITTING", "IN_QUEUE", "IN_PROGRESS", "SUCCEEDED"]


@pytest.fixture(scope="module")
def node_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """The package's ``api`` cluster, plus a Standard Webhooks secret for callbacks."""
    workdir = tmp_path_factory.mktemp("api-node")
    cluster = start_cluster(
        workdir,
        workers=1,
        emulator_processing_time_s=0.5,
        env={
            "REFRAME_SUBMIT_RATE_PER_S": "100",
            "REFRAME_SUBMIT_BURST": "50",
            "REFRAME_MAX_CONCURRENCY": "4",
            "REFRAME_API_SSE_POLL_INTERVAL_S": "0.1",
            "REFRAME_CALLBACK_SECRETS": SECRET,
        },
    )
    try:
        sample = make_sample_video(workdir / "sample.mp4", duration_s=2.5, size="320x180")
        sample_url = upload_file(cluster.settings(), sample)
        url, proc = cluster.start_api()
        r = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
        yield Api(url, cluster, proc, r, KeyStore(r, prefix="reframe"), sample_url)
        r.close()
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def node() -> str:
    """``node``, with the client's locked packages installed (``npm ci`` when they are missing)."""
    node_bin, npm_bin = shutil.which("node"), shutil.which("npm")
    if node_bin is None or npm_bin is None:
        pytest.fail("node/npm are not installed: run scripts/ensure-node (./dev test does)")
    version = subprocess.run([node_bin, "--version"], capture_output=True, text=True, check=True).stdout
    assert int(version.strip().lstrip("v").split(".")[0]) >= 18, f"the client needs Node 18+, got {version}"
    installed = CLIENT / "node_modules" / ".package-lock.json"
    lock = CLIENT / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        done = subprocess.run(
            [npm_bin, "ci", "--no-audit", "--no-fund"],
            cwd=CLIENT,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    return node_bin


def run_session(
    node: str, api: Api, *, secret: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run the Node session with a fresh key of tenant ``node``; returns it and its JSON summary."""
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/tmp"),
        "API_URL": api.url,
        "API_TOKEN": api.key("node", "enqueue", "read"),
        "CALLBACK_SECRET": secret,
        "VIDEO_URL": api.sample_url,
        "TIMEOUT_S": "120",
    }
    done = subprocess.run(
        [node, "session.mjs"], cwd=CLIENT, env=env, capture_output=True, text=True, timeout=180, check=False
    )
    lines = done.stdout.strip().splitlines()
    assert lines, f"no summary; stderr:\n{done.stderr}"
    summary: dict[str, Any] = json.loads(lines[-1])
    return done, summary


def test_node_client_enqueues_follows_sse_and_verifies_the_callback(node: str, node_api: Api) -> None:
    done, summary = run_session(node, node_api, secret=SECRET)
    assert done.returncode == 0 and summary["ok"], json.dumps(summary, indent=1) + done.stderr
    job_id = summary["job_id"]
    assert summary["location"].endswith(f"/v1/jobs/{job_id}")
    assert summary["checks"] == {
        "idempotent_repeat": True,
        "sse_states_in_order": True,
        "sse_end_succeeded": True,
        "sse_last_state_terminal": True,
        "callback_verified": True,
        "callback_is_this_job": True,
        "tamper_rejected": True,
        "job_succeeded": True,
    }

    # SSE: state events in the lifecycle's order, numbered 1.., then `end` with the terminal state
    states = summary["sse"]["states"]
    assert states[-1] == "SUCCEEDED" and len(states) >= 2
    assert [ORDER.index(s) for s in states] == sorted(ORDER.index(s) for s in states)
    assert summary["sse"]["event_ids"] == [str(i) for i in range(1, len(states) + 1)]
    assert summary["sse"]["end"] == {"id": job_id, "state": "SUCCEEDED"}

    # the callback: one signature (one secret), this job's first life, and every forgery refused
    callback = summary["callback"]
    assert callback["verified"] and callback["signatures"] == 1
    assert callback["webhook_id"] == f"{job_id}.1"
    assert callback["payload"]["job_id"] == job_id and callback["payload"]["state"] == "SUCCEEDED"
    assert callback["payload"]["metadata"] == {"client": "node"}
    assert summary["tamper"] == {
        "body_rejected": True,
        "other_secret_rejected": True,
        "timestamp_rejected": True,
    }
    assert summary["callbacks_received"] == 1

    # the same bytes verify with the PyPI reference library too
    raw = callback["raw"]
    Webhook(SECRET).verify(raw["body"], raw["headers"])
    assert json.loads(raw["body"]) == callback["payload"]

    # what Redis and the emulator say: one job of tenant "node", callback delivered, billed once
    r = node_api.redis
    wait_for(lambda: r.hget(KEYS.job(job_id), "callback_status") == "delivered", 30, "callback settled")
    record = r.hgetall(KEYS.job(job_id))
    assert record["state"] == "SUCCEEDED" and record["tenant"] == "node"
    assert (
        not r.exists(KEYS.outbox_entry(f"{job_id}.1"))
        and r.zscore(KEYS.callbacks_failed, f"{job_id}.1") is None
    )
    control = node_api.cluster.emulator_control
    assert control is not None
    submits = [s for s in control.ledger()["submits"] if s["request_id"] == record["fal_request_id"]]
    assert len(submits) == 1


def test_node_client_fails_when_the_callback_does_not_verify(node: str, node_api: Api) -> None:
    # the receiver holds a secret the cluster does not sign with: the session must say so and fail
    done, summary = run_session(node, node_api, secret=OTHER)
    assert done.returncode == 1 and not summary["ok"], summary
    checks = summary["checks"]
    assert checks.get("callback_verified") is False, summary
    assert checks.get("sse_end_succeeded") is True and checks.get("job_succeeded") is True, summary
    assert any(f.startswith("callback_verified") for f in summary["failures"])
