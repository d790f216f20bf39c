"""The emulator's usage export (falemu/usage.py): fal's billing events as CSV, read back by the
reconciler's parser (worker/contracts/usage.py), over HTTP and through ``python -m falemu usage``."""

from __future__ import annotations

import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import httpx

from falemu import EmulatorServer
from tests.emulator.helpers import APP, submit, valid_input, wait_status
from worker.contracts.usage import USAGE_COLUMNS, parse_usage


def test_usage_csv_lists_billed_requests_only(
    emu: EmulatorServer, http: httpx.Client, clip_url: str, tmp_path: Path
) -> None:
    before = time.time()
    ok = [submit(http, valid_input(clip_url)) for _ in range(2)]
    failed = submit(http, {"aspect_ratio": "1:1"})  # no video_url: a validation failure, not billed
    for sub in [*ok, failed]:
        wait_status(http, sub, "COMPLETED")
    text = emu.usage_csv()
    assert text.splitlines()[0] == ",".join(USAGE_COLUMNS)
    events = parse_usage(text)
    assert sorted(e.request_id for e in events) == sorted(s["request_id"] for s in ok)
    ledger = emu.ledger()
    assert sum(e.output_units for e in events) == Decimal(str(ledger["billed_seconds"]))
    for event in events:
        assert event.endpoint_id == APP
        assert event.unit_price == Decimal("0.06")
        assert event.output_units == 2  # the 2 s clip, whole seconds
        assert event.cost_nano == 120_000_000
        assert before * 1000 - 1 <= event.timestamp_ms <= time.time() * 1000 + 1

    # a window (end exclusive) and another price
    emu.configure(unit_price_usd=0.05)
    assert parse_usage(emu.usage_csv(end="2000-01-01T00:00:00Z")) == []
    assert {e.cost_nano for e in parse_usage(emu.usage_csv(start="2000-01-01"))} == {100_000_000}
    assert httpx.get(f"{emu.url}/_emulator/usage.csv", params={"start": "soon"}).status_code == 400

    out = tmp_path / "usage.csv"
    done = subprocess.run([sys.executable, "-m", "falemu", "usage", "--url", emu.url, "--out", str(out)],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert out.read_text() == emu.usage_csv()
    down = subprocess.run([sys.executable, "-m", "falemu", "usage", "--url", "http://127.0.0.1:9"],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert down.returncode == 2 and down.stderr.startswith("falemu usage: http://127.0.0.1:9")
