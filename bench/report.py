"""Printing benchmark results: one table shape (measure, result, floor) for every scenario."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

#: (measure, result, floor)
Row = tuple[str, str, str]
console = Console()


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of values, nearest-rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def table(title: str, rows: list[Row]) -> None:
    """Print one result table."""
    t = Table(title=title)
    t.add_column("measure")
    t.add_column("result", justify="right")
    t.add_column("floor")
    for row in rows:
        t.add_row(*row)
    console.print(t)


def mean_open(timeline: list[list[float]], start: float, end: float) -> float:
    """Time-average of the 'open' count over [start, end] from the emulator ledger's step timeline
    of (t, open, in_progress) rows."""
    area, prev_t, prev_v = 0.0, start, 0.0
    for t, open_, _ip in timeline:
        if t <= start:
            prev_v = open_
            continue
        if t >= end:
            break
        area += prev_v * (t - prev_t)
        prev_t, prev_v = t, open_
    area += prev_v * (end - prev_t)
    return area / max(1e-9, end - start)
