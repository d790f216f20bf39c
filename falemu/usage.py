"""The emulator's billed usage as fal's usage export: one CSV row per billed request.

The layout is fal's per-request billing events (``GET /v1/models/billing-events`` of fal's Platform
API) as CSV with a header row; ``worker/contracts/usage.py`` reads it (``reframe costs reconcile``):

    request_id,endpoint_id,timestamp,output_units,unit_price,percent_discount,cost_estimate_nano_usd
    1f0c…,fal-ai/luma-dream-machine/ray-2-flash/reframe,2026-11-29T10:30:45.123Z,3,0.06,,180000000

``output_units`` are the seconds billed (whole billing units), ``unit_price`` the dollars per second
(``EmulatorConfig.unit_price_usd``), ``percent_discount`` is empty (the emulator gives none) and
``cost_estimate_nano_usd`` = units x price in nano-dollars. Only successes are billed, as at fal.
Served at ``GET /_emulator/usage.csv[?start=ISO&end=ISO]`` (end exclusive, like fal's) and written
by ``python -m falemu usage --url URL --out FILE``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

COLUMNS = (
    "request_id",
    "endpoint_id",
    "timestamp",
    "output_units",
    "unit_price",
    "percent_discount",
    "cost_estimate_nano_usd",
)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(raw: str) -> float:
    """An ISO 8601 time (a date means its start; no offset means UTC) as unix seconds."""
    when = datetime.fromisoformat(raw.strip())
    return (when.replace(tzinfo=UTC) if when.tzinfo is None else when).timestamp()


def usage_csv(
    billed: Iterable[dict[str, Any]],
    unit_price_usd: float,
    *,
    start: float | None = None,
    end: float | None = None,
) -> str:
    """The CSV export of the ledger's ``billed`` rows with ``start <= t < end``."""
    price = Decimal(str(unit_price_usd))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in billed:
        t = float(row["t"])
        if (start is not None and t < start) or (end is not None and t >= end):
            continue
        units = Decimal(str(row["billed_s"]))
        nano = int((units * price * 1_000_000_000).to_integral_value())
        units_text = format(units.normalize(), "f") if units else "0"
        writer.writerow(
            [row["request_id"], row["endpoint_id"], _iso(t), units_text, format(price, "f"), "", nano]
        )
    return out.getvalue()
