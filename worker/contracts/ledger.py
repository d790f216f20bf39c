"""The cost ledger: what the cluster charged, one Redis Stream entry per settlement or correction.

``P:ledger`` (:attr:`Keys.ledger <worker.contracts.keys.Keys.ledger>`) is appended to by the
scripts that settle a job's budget (``worker/contracts/lua/``), in the same atomic step, so the
ledger and the budget can never disagree. It outlives job records: it is never trimmed by length,
only by age (``REFRAME_LEDGER_RETENTION_DAYS``, the housekeeper's ``XTRIM MINID``). Fields, all
strings:

=============  ==================================================================================
``job_id``     the job
``attempt``    the attempt whose request was charged
``tenant``     the job's tenant
``request_id`` fal's request id (empty when fal never named one, e.g. an ambiguous submit)
``billed_s``   seconds fal billed, a decimal string (empty when charged at an estimate)
``micro``      micro-dollars this entry charges (an integer; negative for a correction downwards)
``kind``       ``settled`` (from the output), ``estimate`` (outcome unknown: charged at the
               estimate), ``correction`` (an estimate corrected later to what fal billed)
``at_ms``      Redis time of the entry (ms)
=============  ==================================================================================

A job's charge is the sum of its entries' ``micro``. This module only reads: it is pure apart from
:func:`read_entries`, and imports nothing but the standard library and ``redis``, so the producer,
the CLI and the exporter share it.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any

import redis

MICRO_PER_USD = 1_000_000
#: Entries read per ``XRANGE`` call.
READ_BATCH = 5_000
#: Stream ids and ``at_ms`` both come from Redis time in the writing script; this much slack on the
#: id range keeps an entry whose id and ``at_ms`` straddle a bound.
ID_SLACK_MS = 60_000


class EntryKind(StrEnum):
    """Why a ledger entry charges what it does."""

    SETTLED = "settled"
    ESTIMATE = "estimate"
    CORRECTION = "correction"


class GroupBy(StrEnum):
    """How :func:`aggregate` groups entries."""

    TENANT = "tenant"
    DAY = "day"
    MONTH = "month"


class LedgerError(ValueError):
    """A ledger entry that does not follow the format above (names the stream id and field)."""


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One parsed ledger entry."""

    stream_id: str
    job_id: str
    attempt: str
    tenant: str
    request_id: str
    billed_s: Decimal | None
    micro: int
    kind: str
    at_ms: int


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _stream_ms(stream_id: str) -> int:
    head, _, _ = stream_id.partition("-")
    return int(head)


def parse_entry(stream_id: Any, fields: Mapping[Any, Any]) -> LedgerEntry:
    """A :class:`LedgerEntry` from a stream entry; :class:`LedgerError` naming what is wrong."""
    sid = _text(stream_id)
    f = {_text(k): _text(v) for k, v in fields.items()}
    try:
        micro = int(f.get("micro", ""))
    except ValueError:
        raise LedgerError(f"ledger entry {sid}: micro {f.get('micro')!r} is not an integer") from None
    raw_billed = f.get("billed_s", "")
    billed: Decimal | None = None
    if raw_billed:
        try:
            billed = Decimal(raw_billed)
        except InvalidOperation:
            raise LedgerError(f"ledger entry {sid}: billed_s {raw_billed!r} is not a number") from None
        if not billed.is_finite():
            raise LedgerError(f"ledger entry {sid}: billed_s {raw_billed!r} is not a number")
    raw_at = f.get("at_ms", "")
    try:
        at_ms = int(raw_at) if raw_at else _stream_ms(sid)
    except ValueError:
        raise LedgerError(f"ledger entry {sid}: at_ms {raw_at!r} is not an integer") from None
    return LedgerEntry(
        stream_id=sid,
        job_id=f.get("job_id", ""),
        attempt=f.get("attempt", ""),
        tenant=f.get("tenant", "") or "default",
        request_id=f.get("request_id", ""),
        billed_s=billed,
        micro=micro,
        kind=f.get("kind", ""),
        at_ms=at_ms,
    )


def read_entries(
    client: redis.Redis,
    key: str,
    *,
    since_ms: int | None = None,
    until_ms: int | None = None,
    batch: int = READ_BATCH,
) -> Iterator[LedgerEntry]:
    """Entries of the ledger at ``key`` with ``since_ms <= at_ms < until_ms``, oldest first.

    Read in pages of ``batch`` (``XRANGE`` with exclusive continuation ids), never all at once.
    """
    start = "-" if since_ms is None else str(max(0, since_ms - ID_SLACK_MS))
    end = "+" if until_ms is None else str(until_ms + ID_SLACK_MS)
    while True:
        page: list[Any] = list(client.xrange(key, start, end, count=batch) or [])
        for stream_id, fields in page:
            entry = parse_entry(stream_id, fields or {})
            if (since_ms is None or entry.at_ms >= since_ms) and (until_ms is None or entry.at_ms < until_ms):
                yield entry
        if len(page) < batch:
            return
        start = "(" + _text(page[-1][0])


# ------------------------------------------------------------------------------------ periods
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_MONTH = re.compile(r"^\d{4}-\d{2}$")
WHEN_FORMATS = "YYYY-MM-DD, YYYY-MM or an ISO 8601 time such as 2026-11-01T12:00:00Z"


def parse_when(text: str, name: str) -> int:
    """``text`` as epoch ms (UTC): a day (its start), a month (its first day) or an ISO 8601 time
    (a time without an offset is UTC). :class:`ValueError` naming ``name`` otherwise."""
    value = text.strip()
    try:
        if _MONTH.fullmatch(value):
            when = datetime.strptime(value + "-01", "%Y-%m-%d").replace(tzinfo=UTC)
        elif _DAY.fullmatch(value):
            when = datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
        elif "T" in value or " " in value:
            when = datetime.fromisoformat(value)
            when = when.replace(tzinfo=UTC) if when.tzinfo is None else when
        else:
            raise ValueError(value)
    except ValueError:
        raise ValueError(f"{name}: {text!r} is not a date ({WHEN_FORMATS})") from None
    return calendar.timegm(when.utctimetuple()) * 1000 + when.microsecond // 1000


def utc_day(at_ms: int) -> str:
    """``YYYY-MM-DD`` of ``at_ms`` in UTC."""
    return datetime.fromtimestamp(at_ms / 1000, tz=UTC).strftime("%Y-%m-%d")


def utc_month(at_ms: int) -> str:
    """``YYYY-MM`` of ``at_ms`` in UTC."""
    return datetime.fromtimestamp(at_ms / 1000, tz=UTC).strftime("%Y-%m")


# ------------------------------------------------------------------------------------ aggregation
@dataclass
class CostRow:
    """Totals of one group: dollars charged (micro), seconds fal billed, jobs, entries by kind."""

    key: str
    micro: int = 0
    billed_s: Decimal = field(default_factory=Decimal)
    job_ids: set[str] = field(default_factory=set)
    entries: int = 0
    estimates: int = 0
    corrections: int = 0

    @property
    def jobs(self) -> int:
        """Distinct jobs charged in the group."""
        return len(self.job_ids)

    @property
    def usd(self) -> Decimal:
        """Dollars, exact (6 decimals)."""
        return micro_usd(self.micro)

    def add(self, entry: LedgerEntry) -> None:
        """Count one entry."""
        self.micro += entry.micro
        self.billed_s += entry.billed_s or 0
        self.job_ids.add(entry.job_id)
        self.entries += 1
        self.estimates += entry.kind == EntryKind.ESTIMATE
        self.corrections += entry.kind == EntryKind.CORRECTION

    def as_dict(self) -> dict[str, Any]:
        """The row as printed (strings for the exact numbers)."""
        return {
            "group": self.key,
            "usd": format(self.usd, "f"),
            "billed_s": seconds_text(self.billed_s),
            "jobs": self.jobs,
            "entries": self.entries,
            "estimates": self.estimates,
            "corrections": self.corrections,
        }


def micro_usd(micro: int | Decimal) -> Decimal:
    """Micro-dollars as exact dollars with 6 decimals."""
    return (Decimal(micro) / MICRO_PER_USD).quantize(Decimal("0.000001"))


def seconds_text(seconds: Decimal) -> str:
    """Seconds without trailing zeros (``3``, ``2.5``)."""
    text = format(seconds.normalize(), "f") if seconds else "0"
    return text


def group_key(entry: LedgerEntry, by: GroupBy) -> str:
    """The group ``entry`` falls in."""
    if by is GroupBy.TENANT:
        return entry.tenant
    return utc_day(entry.at_ms) if by is GroupBy.DAY else utc_month(entry.at_ms)


@dataclass
class CostReport:
    """Rows per group (sorted by group) and the total over every entry read."""

    by: GroupBy
    rows: list[CostRow]
    total: CostRow


def aggregate(entries: Iterable[LedgerEntry], by: GroupBy | str) -> CostReport:
    """Sum ``entries`` per tenant, UTC day or UTC month."""
    by = GroupBy(by)
    rows: dict[str, CostRow] = {}
    total = CostRow("total")
    for entry in entries:
        key = group_key(entry, by)
        row = rows.get(key)
        if row is None:
            row = rows[key] = CostRow(key)
        row.add(entry)
        total.add(entry)
    return CostReport(by=by, rows=[rows[k] for k in sorted(rows)], total=total)


def cost_report(
    client: redis.Redis,
    key: str,
    by: GroupBy | str,
    *,
    since_ms: int | None = None,
    until_ms: int | None = None,
) -> CostReport:
    """The ledger at ``key`` summed per ``by`` over ``since_ms <= at_ms < until_ms``."""
    return aggregate(read_entries(client, key, since_ms=since_ms, until_ms=until_ms), by)


REPORT_COLUMNS = ("group", "usd", "billed_s", "jobs", "entries", "estimates", "corrections")


def report_csv_rows(report: CostReport) -> list[list[str]]:
    """The report as CSV rows: the header, one row per group, then the ``total`` row."""
    out = [[report.by.value, *REPORT_COLUMNS[1:]]]
    for row in [*report.rows, report.total]:
        values = row.as_dict()
        out.append([str(values[c]) for c in REPORT_COLUMNS])
    return out
