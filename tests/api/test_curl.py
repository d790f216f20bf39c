"""A client in another language: the README's curl session, run by bash against a real server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.api.conftest import Api

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).with_name("curl_session.sh")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_enqueue_follow_sse_get(api: Api, tmp_path: Path) -> None:
    env = {
        **api.settings_env(),
        "API_URL": api.url,
        "VIDEO_URL": api.sample_url,
        "REFRAME": f"{sys.executable} -m reframe",
    }
    done = subprocess.run(
        ["bash", str(SCRIPT)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = done.stdout.splitlines()[0].removeprefix("job ")
    events = (tmp_path / "events.txt").read_text().strip().split("\n\n")
    assert events[-1].startswith("event: end")
    assert json.loads(events[-1].split("data: ", 1)[1]) == {"id": job_id, "state": "SUCCEEDED"}
    last_state = json.loads(events[-2].split("data: ", 1)[1])
    assert last_state["state"] == "SUCCEEDED"
    job = json.loads((tmp_path / "job.json").read_text())
    assert job["id"] == job_id and job["state"] == "SUCCEEDED" and job["tenant"] == "curl"
    assert done.stdout.splitlines()[-1] == f"SUCCEEDED {job['video_url']}"
