"""Hostile invocations of ``reframe costs`` and ``reframe costs reconcile``: each exits 2 with one
line on stderr naming the option or file, no traceback, and leaves Redis as it was (the
conventions of tests/hostile/test_cli_inputs.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis

from reframe import cli
from tests.hostile.test_cli_inputs import snapshot

LEDGER = "{reframe}:ledger"
GOOD_CSV = "request_id,timestamp,output_units,unit_price\nr1,2026-11-29T10:00:00Z,3,0.06\n"


def cases(tmp: Path) -> list[tuple[list[str], str]]:
    files = {
        "empty.csv": "",
        "noheader.csv": "r1,2026-11-29T10:00:00Z,3\n",
        "badtime.csv": "request_id,timestamp,output_units,unit_price\nr1,noon,3,0.06\n",
        "badunits.csv": "request_id,timestamp,output_units,unit_price\nr1,2026-11-29T10:00:00Z,lots,0.06\n",
        "noprice.csv": "request_id,timestamp,output_units\nr1,2026-11-29T10:00:00Z,3\n",
        "bad.json": '{"billing_events": [{"request_id": "r1"}]}',
        "broken.json": "[{",
    }
    for name, text in files.items():
        (tmp / name).write_text(text)
    (tmp / "binary.csv").write_bytes(b"\xff\xfe\x00garbage")
    (tmp / "dir.csv").mkdir(exist_ok=True)
    out: list[tuple[list[str], str]] = []
    for value in ("2026-13-01", "2026-02-30", "yesterday", "", "1764412800", "2026/11/01", "11-2026"):
        out.append((["costs", "--since", value], "--since:"))
        out.append((["costs", "--until", value], "--until:"))
        out.append((["costs", "reconcile", str(tmp / "empty.csv"), "--since", value], "--since:"))
    out += [
        (["costs", "--by", "week"], "--by"),
        (["costs", "--by", ""], "--by"),
        (["costs", "--by", "TENANT"], "--by"),
        (["costs", "--since", "2026-12-01", "--until", "2026-11-01"], "--until: '2026-11-01' is not after"),
        (["costs", "--since", "2026-11", "--until", "2026-11"], "is not after"),
        (["costs", "--bogus"], "No such option: --bogus"),
        (["costs", "reconcile"], "Missing argument 'FILE'"),
        (["costs", "reconcile", "/no/such/usage.csv"], "FILE: cannot read '/no/such/usage.csv'"),
        (["costs", "reconcile", str(tmp / "dir.csv")], "FILE: cannot read"),
        (["costs", "reconcile", str(tmp / "binary.csv")], "FILE: cannot read"),
        (["costs", "reconcile", str(tmp / "empty.csv")], "FILE: usage export: header lacks request_id"),
        (["costs", "reconcile", str(tmp / "noheader.csv")], "FILE: usage export: header lacks"),
        (["costs", "reconcile", str(tmp / "badtime.csv")], "FILE: row 2: timestamp 'noon'"),
        (["costs", "reconcile", str(tmp / "badunits.csv")], "FILE: row 2: output_units 'lots'"),
        (["costs", "reconcile", str(tmp / "noprice.csv")], "cost_estimate_nano_usd or unit_price needed"),
        (["costs", "reconcile", str(tmp / "bad.json")], "FILE: record 1: timestamp, output_units missing"),
        (["costs", "reconcile", str(tmp / "broken.json")], "FILE: usage export: not valid JSON"),
    ]
    return out


CASE_COUNT = 3 * 7 + 17


@pytest.mark.parametrize("index", range(CASE_COUNT))
def test_hostile_costs_invocation(
    index: int,
    tmp_path: Path,
    redis_url: str,
    rclient: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    table = cases(tmp_path)
    assert len(table) == CASE_COUNT
    args, expect = table[index]
    for key in list(os.environ):
        if key.startswith("REFRAME_") or key == "FAL_KEY":
            monkeypatch.delenv(key)
    monkeypatch.setenv("REFRAME_REDIS_URL", redis_url)
    rclient.xadd(
        LEDGER, {"job_id": "j", "tenant": "acme", "micro": "180000", "billed_s": "3", "kind": "settled"}
    )
    before = snapshot(rclient)
    code = cli.run(args)
    out = capsys.readouterr()
    where = f"{args}: rc={code} out={out.out!r} err={out.err!r}"
    assert code == 2, where
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], where
    assert "Traceback" not in out.err + out.out, where
    assert snapshot(rclient) == before


def test_a_corrupt_ledger_entry_is_one_line_and_exit_1(
    redis_url: str, rclient: redis.Redis, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:  # fmt: skip
    for key in list(os.environ):
        if key.startswith("REFRAME_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("REFRAME_REDIS_URL", redis_url)
    sid = rclient.xadd(LEDGER, {"job_id": "j", "micro": "lots"})
    (tmp_path / "u.csv").write_text(GOOD_CSV)
    for args in (["costs"], ["costs", "reconcile", str(tmp_path / "u.csv")]):
        assert cli.run(args) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: ledger entry {sid}: micro 'lots' is not an integer"], err
