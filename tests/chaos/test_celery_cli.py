"""``celery -A worker.app ...`` (inspect, flower) finds the app without building it at import time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from config.settings import child_environment
from tests.cluster.conftest import ClusterFactory

pytestmark = pytest.mark.integration


def test_importing_worker_app_builds_nothing() -> None:
    code = "import worker.app as m; assert m._lazy_app is None; print('ok')"
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_celery_inspect_ping_reaches_a_real_worker(make_cluster: ClusterFactory, tmp_path: Path) -> None:
    cluster = make_cluster(workers=1)
    env = child_environment(cluster.env)
    argv = [sys.executable, "-m", "celery", "-A", "worker.app", "inspect", "ping", "--timeout", "10"]
    out = subprocess.run(
        argv, check=False, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "pong" in out.stdout and "worker-1@" in out.stdout, out.stdout
