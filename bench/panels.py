"""Render the key dashboard panels from a real run: ``python -m bench.panels --out docs/panels.svg``.

Starts a local cluster (Redis, emulator, two workers, the exporter) and a real Prometheus, drives a
workload with a fault phase (fal answers 503 for a while, so the breaker opens and recovers), then
evaluates the dashboard's own panel queries over the run and draws them as an SVG (no Grafana
needed offline). The committed picture in docs/ was made this way.
"""

from __future__ import annotations

import argparse
import html
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from producer import Producer
from reframe.localcluster import start_cluster, upload_file
from reframe.localproc import wait_until
from reframe.prom import PrometheusServer, start_prometheus

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "observability" / "grafana" / "reframe-dashboard.json"
RULES = ROOT / "observability" / "prometheus" / "rules.yml"
NAMESPACE = "demo"
PANELS = [
    "Throughput",
    "Backlog by where / priority",
    "Slots in use",
    "fal requests by status class",
    "Breaker state",
    "Spend vs budget (UTC day)",
]
COLOURS = ["#3274d9", "#56a64b", "#e0b400", "#e02f44", "#8f3bb8", "#fa6400", "#37872d", "#1f60c4"]
W, H, PAD = 470, 250, 42


def panel_queries() -> dict[str, list[tuple[str, str]]]:
    """(expr, legend) of the chosen panels, from the committed dashboard JSON."""
    doc = json.loads(DASHBOARD.read_text())
    out: dict[str, list[tuple[str, str]]] = {}
    for panel in doc["panels"]:
        if panel.get("title") in PANELS and panel.get("targets"):
            out.setdefault(panel["title"], [(t["expr"], t.get("legendFormat", "")) for t in panel["targets"]])
    return out


def expand(expr: str) -> str:
    return expr.replace("$__rate_interval", "20s").replace("$namespace", NAMESPACE)


def legend(fmt: str, labels: dict[str, str]) -> str:
    text = fmt or ",".join(f"{k}={v}" for k, v in labels.items() if k != "__name__")
    for key, value in labels.items():
        text = text.replace("{{" + key + "}}", value).replace("{{ " + key + " }}", value)
    return text or "value"


def run(out: Path) -> None:
    from reframe.demo import make_sample_video

    with tempfile.TemporaryDirectory(prefix="reframe-panels-") as tmp:
        work = Path(tmp)
        env = {
            "REFRAME_MAX_CONCURRENCY": "4",
            "REFRAME_BREAKER_MIN_CALLS": "4",
            "REFRAME_BREAKER_WINDOW_S": "20",
            "REFRAME_BREAKER_OPEN_BASE_S": "4",
            "REFRAME_BREAKER_OPEN_CAP_S": "8",
            "REFRAME_RETRY_BASE_S": "1",
            "REFRAME_RETRY_CAP_S": "4",
            "REFRAME_RETRY_MAX_ATTEMPTS": "20",
            "REFRAME_BUDGET_DAILY_USD": "20",
        }
        cluster = start_cluster(
            work / "cluster", workers=2, emulator_concurrency=4, emulator_processing_time_s=1.5, env=env
        )
        prom = None
        try:
            exporter = cluster.start_exporter()
            targets = [f"127.0.0.1:{w.metrics_port}" for w in cluster.workers]
            prom = start_prometheus(
                work / "prom",
                [*targets, f"127.0.0.1:{exporter.metrics_port}"],
                [RULES],
                scrape_interval_s=1.0,
                labels={"namespace": NAMESPACE},
            )
            prom.wait_targets_up(timeout_s=60)
            url = upload_file(
                cluster.settings(), make_sample_video(work / "clip.mp4", duration_s=2, size="320x180")
            )
            start = time.time()
            assert cluster.emulator_control is not None
            with Producer(cluster.settings()) as p:
                ids = p.enqueue_many([{"video_url": url, "aspect_ratio": "9:16"}] * 60)
                wait_until(
                    lambda: sum(1 for j in p.get_many(ids) if j and j.terminal) >= 25,
                    timeout_s=120,
                    what="first part done",
                )
                # fal fails for a while: the breaker opens, jobs are deferred, then it recovers.
                cluster.emulator_control.set_faults(
                    [
                        {
                            "op": "submit",
                            "kind": "http",
                            "status": 503,
                            "times": -1,
                            "json": {"detail": "no runner", "error_type": "runner_scheduling_failure"},
                        }
                    ]
                )
                time.sleep(20)  # the fault phase of the scenario (a picture, not a test)
                cluster.emulator_control.clear_faults()
                ids += p.enqueue_many([{"video_url": url, "aspect_ratio": "1:1"}] * 40)
                wait_until(
                    lambda: all(j and j.terminal for j in p.get_many(ids)), timeout_s=300, what="all done"
                )
            time.sleep(15)  # let the last scrapes land
            end = time.time()
            render(prom, start, end, out)
        finally:
            if prom is not None:
                prom.stop()
            cluster.stop()


def series(
    prom: PrometheusServer, expr: str, start: float, end: float
) -> list[tuple[dict[str, str], list[tuple[float, float]]]]:
    data: Any = prom.query_range(expand(expr), start_s=start, end_s=end, step_s=2)
    return [
        (r["metric"], [(float(t), float(v)) for t, v in r["values"] if v not in ("NaN", "+Inf", "-Inf")])
        for r in data["result"]
    ]


def render(prom: PrometheusServer, start: float, end: float, out: Path) -> None:
    queries = panel_queries()
    cols = 2
    rows = (len(PANELS) + cols - 1) // cols
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{cols * W}" height="{rows * H + 30}" '
        'font-family="Helvetica,Arial,sans-serif" font-size="11">',
        '<rect width="100%" height="100%" fill="#111217"/>',
        f'<text x="10" y="20" fill="#ccccdc" font-size="14">Reframe Cluster, a real local run '
        f"({(end - start) / 60:.1f} min; fal failing with 503 in the middle)</text>",
    ]
    for i, title in enumerate(PANELS):
        x0, y0 = (i % cols) * W, 30 + (i // cols) * H
        lines = [
            (legend(fmt, labels), pts)
            for expr, fmt in queries.get(title, [])
            for labels, pts in series(prom, expr, start, end)
            if pts
        ]
        parts.append(draw_panel(title, lines, x0, y0, start, end))
    parts.append("</svg>")
    out.write_text("\n".join(parts))


def draw_panel(
    title: str,
    lines: list[tuple[str, list[tuple[float, float]]]],
    x0: float,
    y0: float,
    start: float,
    end: float,
) -> str:
    ymax = max([v for _n, pts in lines for _t, v in pts] + [1e-9]) * 1.1
    pw, ph = W - PAD - 12, H - 92
    sx = lambda t: x0 + PAD + (t - start) / (end - start) * pw  # noqa: E731
    sy = lambda v: y0 + 28 + ph - v / ymax * ph  # noqa: E731
    out = [
        f'<rect x="{x0 + 4}" y="{y0 + 4}" width="{W - 8}" height="{H - 8}" fill="#181b1f" stroke="#2c3235"/>',
        f'<text x="{x0 + 12}" y="{y0 + 20}" fill="#ccccdc" font-size="12" font-weight="bold">{html.escape(title)}</text>',
    ]
    for frac in (0, 0.5, 1):
        y = y0 + 28 + ph - frac * ph
        out.append(f'<line x1="{x0 + PAD}" x2="{x0 + PAD + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#2c3235"/>')
        out.append(
            f'<text x="{x0 + PAD - 4}" y="{y + 4:.1f}" fill="#8e8e8e" text-anchor="end">{frac * ymax / 1.1:.3g}</text>'
        )
    for minute in range(int((end - start) // 60) + 1):
        x = sx(start + minute * 60)
        out.append(
            f'<text x="{x:.1f}" y="{y0 + 28 + ph + 12:.1f}" fill="#8e8e8e" text-anchor="middle">{minute}m</text>'
        )
    for k, (name, pts) in enumerate(lines[:8]):
        colour = COLOURS[k % len(COLOURS)]
        path = " ".join(f"{sx(t):.1f},{sy(v):.1f}" for t, v in pts)
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.6" points="{path}"/>')
        lx, ly = x0 + PAD + (k % 3) * 140, y0 + H - 30 + (k // 3) * 12
        out.append(
            f'<rect x="{lx}" y="{ly - 7}" width="10" height="3" fill="{colour}"/>'
            f'<text x="{lx + 14}" y="{ly - 3}" fill="#ccccdc">{html.escape(name[:22])}</text>'
        )
    if not lines:
        out.append(
            f'<text x="{x0 + W / 2}" y="{y0 + H / 2}" fill="#8e8e8e" text-anchor="middle">no data</text>'
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "panels.svg")
    run(parser.parse_args().out)


if __name__ == "__main__":
    main()
