"""``python -m falemu``: starts, prints its URL, serves, stops on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx

from falemu.server import build_parser, config_from_args


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
