"""fal's billed usage, and reconciling the cost ledger (worker/contracts/ledger.py) against it.

**The export format** is fal's per-request billing events (``GET /v1/models/billing-events`` of
fal's Platform API: one record per billed request) written as CSV with a header row, in any column
order (other columns are ignored):

==========================  ==============================================================
``request_id``              fal's request id
``endpoint_id``             the model, e.g. ``fal-ai/luma-dream-machine/ray-2-flash/reframe``
``timestamp``               when fal billed it, ISO 8601 (``2026-11-29T10:30:45.123Z``)
``output_units``            billed units: seconds of video for this model
``unit_price``              dollars per unit
``percent_discount``        empty, or a discount in percent
``cost_estimate_nano_usd``  the charge in nano-dollars (integer); when empty it is computed as
                            ``output_units * unit_price * (1 - percent_discount / 100)``
==========================  ==============================================================

The JSON body of that endpoint (``{"billing_events": [...]}``, pages concatenated as a list, or a
bare list of records) is read too. The fal emulator exports the same CSV
(``GET /_emulator/usage.csv``, ``python -m falemu usage``; falemu/usage.py).

**Reconciling** groups both sides by fal request id: the ledger's charge for a request is the sum
of its entries (settled, estimate, corrections), fal's is the sum of its billing events. A request
fal did not bill (a runner failure, a cancel) may be in the ledger with a charge of 0: that agrees.
Every other mismatch is a :class:`Difference`; ledger charges without a request id (an ambiguous
submit charged at its estimate) always are, since fal's side of them cannot be named.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any

from worker.contracts.ledger import LedgerEntry, micro_usd, seconds_text

USAGE_COLUMNS = (
    "request_id",
    "endpoint_id",
    "timestamp",
    "output_units",
    "unit_price",
    "percent_discount",
    "cost_estimate_nano_usd",
)
_REQUIRED = ("request_id", "timestamp", "output_units")
NANO_PER_MICRO = 1000
#: Dollar differences smaller than this many micro-dollars are rounding (fal reports nano-dollars).
DEFAULT_TOLERANCE_MICRO = 1


class UsageError(ValueError):
    """A usage export that cannot be read (names the row and column)."""


@dataclass(frozen=True, slots=True)
class BillingEvent:
    """One billed request of fal's usage export."""

    request_id: str
    endpoint_id: str
    timestamp_ms: int
    output_units: Decimal
    unit_price: Decimal | None
    cost_nano: int

    @property
    def cost_micro(self) -> Decimal:
        """The charge in micro-dollars (fractional when fal's nano-dollars are)."""
        return Decimal(self.cost_nano) / NANO_PER_MICRO


def _timestamp_ms(raw: str, where: str) -> int:
    try:
        when = datetime.fromisoformat(raw.strip())
    except ValueError:
        raise UsageError(f"{where}: timestamp {raw!r} is not an ISO 8601 time") from None
    when = when.replace(tzinfo=UTC) if when.tzinfo is None else when
    return round(when.timestamp() * 1000)


def _decimal(raw: Any, column: str, where: str) -> Decimal | None:
    if raw is None or str(raw).strip() == "":
        return None
    try:
        value = Decimal(str(raw).strip())
    except InvalidOperation:
        raise UsageError(f"{where}: {column} {raw!r} is not a number") from None
    if not value.is_finite():
        raise UsageError(f"{where}: {column} {raw!r} is not a number")
    return value


def billing_event(record: dict[str, Any], where: str) -> BillingEvent:
    """A :class:`BillingEvent` from one CSV row or JSON record."""
    missing = [c for c in _REQUIRED if str(record.get(c) or "").strip() == ""]
    if missing:
        raise UsageError(f"{where}: {', '.join(missing)} missing")
    timestamp_ms = _timestamp_ms(str(record["timestamp"]), where)
    units = _decimal(record.get("output_units"), "output_units", where) or Decimal(0)
    price = _decimal(record.get("unit_price"), "unit_price", where)
    discount = _decimal(record.get("percent_discount"), "percent_discount", where) or Decimal(0)
    cost = _decimal(record.get("cost_estimate_nano_usd"), "cost_estimate_nano_usd", where)
    if cost is None:
        if price is None:
            raise UsageError(f"{where}: cost_estimate_nano_usd or unit_price needed")
        cost = units * price * (1 - discount / 100) * 1_000_000_000
    return BillingEvent(
        request_id=str(record["request_id"]).strip(),
        endpoint_id=str(record.get("endpoint_id") or "").strip(),
        timestamp_ms=timestamp_ms,
        output_units=units,
        unit_price=price,
        cost_nano=int(cost.to_integral_value()),
    )


def parse_usage(text: str) -> list[BillingEvent]:
    """Billing events from an export: CSV with a header row, or fal's JSON (see the module doc)."""
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        try:
            data = json.loads(stripped)
        except ValueError as exc:
            raise UsageError(f"usage export: not valid JSON ({exc})") from None
        records = data.get("billing_events") if isinstance(data, dict) else data
        if isinstance(records, list) and all(isinstance(r, dict) and "billing_events" in r for r in records):
            records = [e for page in records for e in page["billing_events"]]  # pages concatenated
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise UsageError('usage export: JSON must be {"billing_events": [...]} or a list of records')
        return [billing_event(r, f"record {i + 1}") for i, r in enumerate(records)]
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in _REQUIRED if c not in header]
    if missing:
        raise UsageError(
            f"usage export: header lacks {', '.join(missing)} (columns: {', '.join(USAGE_COLUMNS)})"
        )
    reader.fieldnames = header
    return [billing_event(row, f"row {i + 2}") for i, row in enumerate(reader)]


def usage_csv(events: Iterable[BillingEvent]) -> str:
    """Billing events as the CSV export (the header, then one row per event)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(USAGE_COLUMNS)
    for e in events:
        stamp = datetime.fromtimestamp(e.timestamp_ms / 1000, tz=UTC).isoformat(timespec="milliseconds")
        writer.writerow([e.request_id, e.endpoint_id, stamp.replace("+00:00", "Z"),
                         seconds_text(e.output_units), "" if e.unit_price is None else str(e.unit_price),
                         "", e.cost_nano])  # fmt: skip
    return out.getvalue()


# ------------------------------------------------------------------------------------ reconcile
class DifferenceKind(StrEnum):
    """What disagrees about one request."""

    NOT_AT_FAL = "not_billed_by_fal"  # the ledger charges a request fal's export does not bill
    NOT_IN_LEDGER = "not_in_ledger"  # fal billed a request the ledger has no entry for
    NO_REQUEST_ID = "no_request_id"  # a charge without a fal request id (charged at an estimate)
    BILLED_SECONDS = "billed_seconds"
    DOLLARS = "dollars"


@dataclass(frozen=True, slots=True)
class Difference:
    """One disagreement between the ledger and fal's export."""

    kind: DifferenceKind
    request_id: str
    job_id: str
    tenant: str
    ledger_usd: Decimal
    fal_usd: Decimal
    ledger_billed_s: Decimal | None
    fal_billed_s: Decimal | None

    def as_dict(self) -> dict[str, str]:
        """Printable fields (exact numbers as strings; empty when unknown)."""

        def secs(v: Decimal | None) -> str:
            return "" if v is None else seconds_text(v)

        return {
            "kind": self.kind.value,
            "request_id": self.request_id,
            "job_id": self.job_id,
            "tenant": self.tenant,
            "ledger_usd": format(self.ledger_usd, "f"),
            "fal_usd": format(self.fal_usd, "f"),
            "ledger_billed_s": secs(self.ledger_billed_s),
            "fal_billed_s": secs(self.fal_billed_s),
        }


DIFFERENCE_COLUMNS = (
    "kind", "request_id", "job_id", "tenant", "ledger_usd", "fal_usd", "ledger_billed_s", "fal_billed_s",
)  # fmt: skip


@dataclass
class Reconciliation:
    """The outcome: every difference, and the totals compared."""

    differences: list[Difference]
    requests: int
    ledger_micro: int
    fal_micro: Decimal
    ignored_events: int = 0  # billing events of other endpoints, or outside the window

    @property
    def ok(self) -> bool:
        """True when nothing differs."""
        return not self.differences


@dataclass
class _Side:
    micro: Decimal = field(default_factory=Decimal)
    billed_s: Decimal | None = None
    job_id: str = ""
    tenant: str = ""
    seen: bool = False  # has an entry or event inside the window


@dataclass
class _Window:
    since_ms: int | None
    until_ms: int | None

    def __contains__(self, ms: int) -> bool:
        return (self.since_ms is None or ms >= self.since_ms) and (
            self.until_ms is None or ms < self.until_ms
        )


def _ledger_sides(
    entries: Iterable[LedgerEntry], window: _Window
) -> tuple[dict[str, _Side], dict[tuple[str, str], _Side]]:
    """The ledger per request id, and its charges without one per (job, attempt)."""
    named: dict[str, _Side] = {}
    unnamed: dict[tuple[str, str], _Side] = {}
    for e in entries:
        side = named.setdefault(e.request_id, _Side()) if e.request_id else unnamed.setdefault(
            (e.job_id, e.attempt), _Side()
        )  # fmt: skip
        side.micro += e.micro
        side.billed_s = e.billed_s if e.billed_s is not None else side.billed_s
        side.job_id, side.tenant = e.job_id, e.tenant
        side.seen = side.seen or e.at_ms in window
    return named, unnamed


def _compare(
    request_id: str, ours: _Side | None, theirs: _Side | None, tolerance_micro: int
) -> Difference | None:
    ours_micro = ours.micro if ours else Decimal(0)
    theirs_micro = theirs.micro if theirs else Decimal(0)
    kind: DifferenceKind | None = None
    if theirs is None:
        kind = DifferenceKind.NOT_AT_FAL if ours_micro != 0 else None  # fal bills no failure
    elif ours is None:
        kind = DifferenceKind.NOT_IN_LEDGER
    elif ours.billed_s is not None and ours.billed_s != theirs.billed_s:
        kind = DifferenceKind.BILLED_SECONDS
    elif abs(ours_micro - theirs_micro) > tolerance_micro:
        kind = DifferenceKind.DOLLARS
    if kind is None:
        return None
    return Difference(
        kind=kind,
        request_id=request_id,
        job_id=ours.job_id if ours else "",
        tenant=ours.tenant if ours else "",
        ledger_usd=micro_usd(ours_micro),
        fal_usd=micro_usd(theirs_micro),
        ledger_billed_s=ours.billed_s if ours else None,
        fal_billed_s=theirs.billed_s if theirs else None,
    )


def reconcile(
    entries: Sequence[LedgerEntry],
    events: Sequence[BillingEvent],
    *,
    endpoint_id: str | None = None,
    since_ms: int | None = None,
    until_ms: int | None = None,
    tolerance_micro: int = DEFAULT_TOLERANCE_MICRO,
) -> Reconciliation:
    """Compare ledger ``entries`` with fal's billing ``events`` request by request.

    Only events of ``endpoint_id`` count (all when ``None``). With a window, the requests compared
    are those with a ledger entry or a billing event inside ``[since_ms, until_ms)``, each compared
    over all of its entries and events given (so a request billed just before midnight and settled
    just after is one request, not two differences): pass the ledger read with some slack around the
    window. Dollar differences up to ``tolerance_micro`` micro-dollars are rounding.
    """
    window = _Window(since_ms, until_ms)
    ledger, unnamed = _ledger_sides(entries, window)
    fal: dict[str, _Side] = {}
    ignored = 0
    for ev in events:
        if endpoint_id is not None and ev.endpoint_id and ev.endpoint_id != endpoint_id:
            ignored += 1
            continue
        side = fal.setdefault(ev.request_id, _Side())
        side.micro += ev.cost_micro
        side.billed_s = (side.billed_s or Decimal(0)) + ev.output_units
        side.seen = side.seen or ev.timestamp_ms in window
    chosen = sorted({r for r, s in ledger.items() if s.seen} | {r for r, s in fal.items() if s.seen})
    ignored += sum(1 for r, s in fal.items() if not s.seen and r not in chosen)

    diffs: list[Difference] = []
    ledger_total, fal_total = 0, Decimal(0)
    for request_id in chosen:
        ours, theirs = ledger.get(request_id), fal.get(request_id)
        ledger_total += int(ours.micro) if ours else 0
        fal_total += theirs.micro if theirs else 0
        diff = _compare(request_id, ours, theirs, tolerance_micro)
        if diff is not None:
            diffs.append(diff)
    for (job_id, _attempt), side in sorted(unnamed.items()):
        if side.seen:
            ledger_total += int(side.micro)
            if side.micro != 0:
                diffs.append(
                    Difference(
                        DifferenceKind.NO_REQUEST_ID,
                        "",
                        job_id,
                        side.tenant,
                        micro_usd(side.micro),
                        micro_usd(0),
                        side.billed_s,
                        None,
                    )
                )
    return Reconciliation(
        differences=diffs,
        requests=len(chosen),
        ledger_micro=ledger_total,
        fal_micro=fal_total,
        ignored_events=ignored,
    )
