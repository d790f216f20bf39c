"""``python -m falemu`` and ``reframe up``: start, print where they serve, serve, stop cleanly; presence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from falemu.server import build_parser, config_from_args
from reframe.demo import make_sample_video
from reframe.localcluster import local_cluster
from reframe.localproc import wait_until


def test_python_m_falemu_prints_url_and_serves() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "falemu", "--port", "0", "--concurrency", "3", "--processing-time-s", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()  # blocks until the ready line (or EOF if it died)
        assert line.startswith("fal emulator listening on http://127.0.0.1:"), (
            proc.stderr.read() if not line else line
        )
        url = line.rsplit(" ", 1)[1]
        config = httpx.get(url + "/_emulator/config").json()
        assert (config["concurrency"], config["processing_time_s"]) == (3, 0.5)
        assert httpx.get(url + "/.well-known/jwks.json").status_code == 200
    finally:
        proc.terminate()
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled


def test_flags_map_to_config() -> None:
    args = build_parser().parse_args(["--port", "1", "--valid-key", "a:b", "--valid-key", "c:d", "--locked-key", "x",
                                      "--submit-rate-per-s", "4", "--max-queue-length", "7"])  # fmt: skip
    config = config_from_args(args)
    assert config.valid_keys == ["a:b", "c:d"] and config.locked_keys == ["x"]
    assert (config.submit_rate_per_s, config.max_queue_length) == (4.0, 7)


def test_cli_main_rejects_bad_config(capsys: object) -> None:
    from falemu import cli_main

    assert cli_main(["--concurrency", "0", "--port", "0"]) == 2


# --------------------------------------------------------------------------- reframe up, presence
def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("REFRAME_") and k != "FAL_KEY"}
    return {**env, "COLUMNS": "200", **extra}


def _reframe(*args: str, env: dict[str, str], timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reframe", *args], capture_output=True, text=True,
                          timeout=timeout_s, env=env, check=False)  # fmt: skip


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_reframe_up_serves_a_job_and_stops_everything_on_sigint(tmp_path: Path) -> None:
    clip = make_sample_video(tmp_path / "clip.mp4", duration_s=1.0, size="160x90", audio=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "reframe", "up", "--workers", "2", "--workdir", str(tmp_path / "up"),
         "--processing-time-s", "0.3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_clean_env(), start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []
    assert proc.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        wait_until(lambda: any("reframe status --cluster" in ln for ln in lines) or proc.poll() is not None,
                   timeout_s=120, what="the summary of reframe up")  # fmt: skip
        assert proc.poll() is None, (lines, proc.stderr.read() if proc.stderr else "")
        summary = "".join(lines)
        assert summary.startswith("Reframe Cluster is up")
        assert summary.count("/metrics") == 3  # two workers and the exporter
        exports = dict(ln.split("export ", 1)[1].strip().split("=", 1) for ln in lines if "export " in ln)
        assert set(exports) >= {"REFRAME_REDIS_URL", "REFRAME_FAL_QUEUE_URL", "FAL_KEY"}
        pids = [int(p) for ln in lines if ln.strip().startswith("pids") for p in ln.split()[1:]]
        assert len(pids) == 6  # redis, emulator, 2 workers, exporter, reframe serve
        # one console link, carrying an admin key of this cluster in its fragment
        (link,) = [ln.split()[1] for ln in lines if ln.strip().startswith("console ")]
        page, token = link.split("#key=")
        assert page.endswith("/console/jobs") and httpx.get(page, timeout=10).status_code == 200
        me = httpx.get(page.replace("/console/jobs", "/v1/me"), headers={"Authorization": f"Bearer {token}"})
        assert me.json()["admin"] is True
        done = _reframe("enqueue", str(clip), "-a", "9:16", "--wait", "--timeout-s", "120",
                        env=_clean_env(**exports), timeout_s=180)  # fmt: skip
        assert done.returncode == 0, (done.stdout, done.stderr)
        assert "SUCCEEDED video_url=http" in done.stdout
        status = _reframe("status", "--cluster", "--json", env=_clean_env(**exports))
        assert json.loads(status.stdout)["workers"]["alive"] == 2
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    wait_until(lambda: all(_gone(pid) for pid in pids), timeout_s=30, what="every process of reframe up gone")


def test_status_cluster_shows_live_workers_and_their_disagreement(tmp_path: Path) -> None:
    beat = {"REFRAME_HEARTBEAT_INTERVAL_MS": "200", "REFRAME_HEARTBEAT_TTL_MS": "1500"}
    with local_cluster(tmp_path, workers=0, env=beat) as cluster:
        caller = _clean_env(**cluster.env, REFRAME_MAX_CONCURRENCY="40")  # the caller's env must not show

        def snapshot() -> dict[str, Any]:
            out = _reframe("status", "--cluster", "--json", env=caller)
            assert out.returncode == 0, out.stderr
            data: dict[str, Any] = json.loads(out.stdout)
            return data

        first = snapshot()
        assert first["workers"]["alive"] == 0 and first["limits"]["max_concurrency"] is None
        text = _reframe("status", "--cluster", env=caller).stdout
        assert "no live workers" in text and "/ 40" not in text
        a = cluster.start_worker(name="wa", env={"REFRAME_MAX_CONCURRENCY": "2"})
        cluster.start_worker(name="wb", env={"REFRAME_MAX_CONCURRENCY": "3"})
        wait_until(lambda: snapshot()["workers"]["alive"] == 2, timeout_s=30, what="two live workers")
        snap = snapshot()
        assert snap["limits"]["max_concurrency"] is None
        assert [v.split(" ")[0] for v in snap["disagreements"]["max_concurrency"]] == ["2", "3"]
        text = _reframe("status", "--cluster", env=caller).stdout
        assert "workers disagree on max_concurrency: 2 (" in text and "/ 40" not in text
        cluster.kill_worker(a)  # SIGKILL: no goodbye; it drops out after the TTL
        wait_until(
            lambda: snapshot()["workers"]["alive"] == 1, timeout_s=30, what="the killed worker to expire"
        )
        snap = snapshot()
        assert snap["limits"]["max_concurrency"] == 3 and snap["disagreements"] == {}
        assert "slots in use / capacity" in (text := _reframe("status", "--cluster", env=caller).stdout)
        assert "/ 3" in text
