"""Printing benchmark results: one table shape (measure, result, floor) for every scenario, and the
runner of a benchmark module made of parts (``python -m bench.<module> [part ...]``)."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

#: (measure, result, floor)
Row = tuple[str, str, str]
#: part name -> (title, the part: a work directory in, rows out)
Parts = Mapping[str, tuple[str, Callable[[Path], list[Row]]]]
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


def load_average() -> str:
    """The 1 and 5 minute load averages, ``"1.23/0.98"``: the cores are shared, so every table says it."""
    one, five, _ = os.getloadavg()
    return f"{one:.2f}/{five:.2f}"


def run_parts(
    work: Path, parts: Parts, names: Sequence[str] | None = None, *, print_parts: bool = False
) -> list[Row]:
    """Run ``names`` (default: every part) in order; every row (each part's table too if asked)."""
    rows: list[Row] = []
    for name in names or list(parts):
        title, fn = parts[name]
        started = time.perf_counter()
        part = fn(work)
        if print_parts:
            table(f"{title} ({time.perf_counter() - started:.0f}s)", part)
        rows += part
    return rows


def parts_main(what: str, title: str, parts: Parts, argv: Sequence[str] | None = None) -> int:
    """``main`` of a benchmark module made of parts: the parts named in ``argv`` (default: all), each
    part's table, then all rows in one table titled ``title``."""
    # SIGTERM (e.g. `timeout`) must unwind like Ctrl-C so every started process is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    names = list(argv if argv is not None else sys.argv[1:]) or None
    console.print(
        f"Reframe Cluster {what} benchmarks on {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
        f"load average {load_average()} (1/5 min)"
    )
    with tempfile.TemporaryDirectory(prefix=f"reframe-{what}-") as tmp:
        rows = run_parts(Path(tmp), parts, names, print_parts=True)
    table(title, rows)
    console.print(f"load average at the end {load_average()} (1/5 min)")
    return 0
