"""The housekeeper trims the cost ledger by age only (REFRAME_LEDGER_RETENTION_DAYS), never by length."""

from __future__ import annotations

from collections.abc import Callable

import redis
from prometheus_client import CollectorRegistry

from config import Settings
from worker.contracts.keys import Keys
from worker.housekeeper import Housekeeper
from worker.metrics import Metrics
from worker.runtime import Runtime

DAY_MS = 86_400_000


def test_ledger_entries_older_than_the_retention_are_trimmed(
    make_settings: Callable[..., Settings], rclient: redis.Redis
) -> None:
    rt = Runtime.build(make_settings(ledger_retention_days=30), metrics=Metrics(CollectorRegistry()))
    try:
        key = Keys("reframe").ledger
        now_ms = rt.now_ms()
        ages_days = [400, 31, 30.01, 29.99, 1, 0]
        for age in ages_days:
            at = int(now_ms - age * DAY_MS)
            rclient.xadd(key, {"job_id": f"j{age}", "micro": "1", "at_ms": str(at)}, id=f"{at}-1")
        assert Housekeeper(rt).trim_ledger() == 3
        assert [f["job_id"] for _i, f in rclient.xrange(key)] == ["j29.99", "j1", "j0"]
        assert Housekeeper(rt).trim_ledger() == 0
        for n in range(2000):  # never trimmed by length
            rclient.xadd(key, {"job_id": f"n{n}", "micro": "1"})
        assert Housekeeper(rt).trim_ledger() == 0 and rclient.xlen(key) == 2003
    finally:
        rt.close()
