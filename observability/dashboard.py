"""Generate the Grafana dashboard of Reframe Cluster (``observability/grafana/reframe-dashboard.json``).

The JSON is generated, never edited by hand: change this file and run

    .venv/bin/python -m observability.dashboard            # rewrite the JSON
    .venv/bin/python -m observability.dashboard --check    # exit 1 if the committed JSON is stale

Built with grafana-foundation-sdk (Grafana 11 dashboard schema). Every query filters on the
``$namespace`` variable; the ``$datasource`` variable picks the Prometheus data source. Metric names
come from :mod:`worker.metrics` (per worker pod, summed here), :mod:`reframe.api.middleware` (per
``reframe serve`` pod) and :mod:`reframe.exporter.collector` (one exporter per namespace, so
``max``/``sum`` over it is the same single value).

tests/observability/test_dashboard.py checks that regenerating is byte-identical, that the JSON
validates against Grafana's own schema, that every expression parses in promtool and that every
metric name exists.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from grafana_foundation_sdk.builders import common as common_b
from grafana_foundation_sdk.builders import prometheus, stat, statetimeline, timeseries
from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    DatasourceVariable,
    QueryVariable,
    Row,
    ThresholdsConfig,
)
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common, dashboard

OUTPUT = Path(__file__).parent / "grafana" / "reframe-dashboard.json"
UID = "reframe-cluster"
TITLE = "Reframe Cluster"

DS = dashboard.DataSourceRef(type_val="prometheus", uid="${datasource}")
NS = 'namespace=~"$namespace"'
RATE = "$__rate_interval"

#: The oldest-waiting SLO shown on the dashboard (the alert uses the same number, rules.yml).
WAIT_SLO_S = 900


def L(name: str, value: str, op: str = "=") -> str:
    """A label matcher ``name<op>"value"``."""
    return f'{name}{op}"{value}"'


def sel(extra: str = "") -> str:
    """A label selector body with the namespace filter (and ``extra`` matchers)."""
    return f"{{{extra}, {NS}}}" if extra else f"{{{NS}}}"


def q(expr: str, legend: str = "__auto") -> prometheus.Dataquery:
    """A range query; ref ids are assigned per panel by :func:`panel_targets`."""
    return prometheus.Dataquery().expr(expr).legend_format(legend).datasource(DS)


def quantiles(metric: str, extra: str = "", by: str = "") -> list[prometheus.Dataquery]:
    """P50/P95/P99 of a histogram, aggregated over pods (and ``by`` labels)."""
    group = f"le, {by}" if by else "le"
    out = []
    for qq in (0.5, 0.95, 0.99):
        expr = f"histogram_quantile({qq}, sum by ({group}) (rate({metric}_bucket{sel(extra)}[{RATE}])))"
        legend = f"p{round(qq * 100)}" + (f" {{{{{by}}}}}" if by else "")
        out.append(q(expr, legend))
    return out


def thresholds(*steps: tuple[float | None, str]) -> ThresholdsConfig:
    """Absolute thresholds: the first step's value must be None (the base colour)."""
    return (
        ThresholdsConfig()
        .mode(dashboard.ThresholdsMode.ABSOLUTE)
        .steps([dashboard.Threshold(value=v, color=c) for v, c in steps])
    )


P = TypeVar("P", timeseries.Panel, stat.Panel, statetimeline.Panel)


def with_targets(panel: P, targets: Sequence[prometheus.Dataquery]) -> P:
    """Attach targets with ref ids A, B, C, … (the SDK leaves them empty otherwise)."""
    for i, target in enumerate(targets):
        panel = panel.with_target(target.ref_id(chr(ord("A") + i)))
    return panel


def ts(
    title: str,
    description: str,
    targets: Sequence[prometheus.Dataquery],
    *,
    unit: str = "short",
    span: int = 8,
    stack: bool = False,
    min_zero: bool = True,
) -> timeseries.Panel:
    """A time-series panel."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .unit(unit)
        .height(8)
        .span(span)
        .fill_opacity(20 if stack else 5)
        .line_width(1)
        .legend(
            common_b.VizLegendOptions()
            .show_legend(True)
            .display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM)
        )
        .tooltip(
            common_b.VizTooltipOptions()
            .mode(common.TooltipDisplayMode.MULTI)
            .sort(common.SortOrder.DESCENDING)
        )
    )
    if min_zero:
        panel = panel.min(0)
    if stack:
        panel = panel.stacking(common_b.StackingConfig().mode(common.StackingMode.NORMAL))
    return with_targets(panel, targets)


def single(
    title: str,
    description: str,
    expr: str,
    *,
    unit: str = "short",
    steps: Sequence[tuple[float | None, str]] = ((None, "green"),),
    mappings: Sequence[dashboard.ValueMapping] = (),
    span: int = 3,
    decimals: int | None = None,
) -> stat.Panel:
    """A stat panel showing the last value of one expression."""
    panel = (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .unit(unit)
        .height(4)
        .span(span)
        .thresholds(thresholds(*steps))
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .graph_mode(common.BigValueGraphMode.AREA)
        .reduce_options(common_b.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )
    if mappings:
        panel = panel.mappings(list(mappings))
    if decimals is not None:
        panel = panel.decimals(decimals)
    return with_targets(panel, [q(expr, title)])


# Breaker state as one number: 0 closed, 1 half-open, 2 open (for stat and state-timeline panels).
BREAKER_EXPR = (
    f"max(reframe_breaker_state{sel(L('state', 'open'))}) * 2 "
    f"+ max(reframe_breaker_state{sel(L('state', 'half_open'))})"
)
BREAKER_MAPPINGS: list[dashboard.ValueMapping] = [
    dashboard.ValueMap(
        options={
            "0": dashboard.ValueMappingResult(text="closed", color="green", index=0),
            "1": dashboard.ValueMappingResult(text="half-open", color="yellow", index=1),
            "2": dashboard.ValueMappingResult(text="OPEN", color="red", index=2),
        }
    )
]


def overview(d: Dashboard) -> Dashboard:
    """Headline numbers (docs/celery-operations.md §10.2 item 1)."""
    d = d.with_row(Row("Overview"))
    finished = "reframe_jobs_finished_total"
    stats = [
        single(
            "Throughput",
            "Jobs succeeded per second, all workers.",
            f"sum(rate({finished}{sel(L('outcome', 'succeeded'))}[{RATE}]))",
            unit="ops",
            decimals=2,
        ),
        single(
            "Success ratio (1h)",
            "Succeeded / (succeeded + failed + dead-lettered) over the last hour; cancellations excluded.",
            f"sum(increase({finished}{sel(L('outcome', 'succeeded'))}[1h])) / "
            f"clamp_min(sum(increase({finished}"
            f"{sel(L('outcome', 'succeeded|failed|dead_lettered', '=~'))}[1h])), 1)",
            unit="percentunit",
            steps=((None, "red"), (0.95, "yellow"), (0.99, "green")),
        ),
        single(
            "Backlog",
            "Jobs not yet at fal: Celery messages + waiting for a slot + budget-blocked + deferred.",
            f"sum(reframe_queue_depth{sel()})",
            steps=((None, "green"), (100, "yellow"), (1000, "red")),
        ),
        single(
            "Oldest waiting",
            f"Age of the oldest job still waiting for a worker or a slot (SLO {WAIT_SLO_S // 60} min).",
            f"max(reframe_queue_oldest_age_seconds{sel(L('where', 'celery|wait', '=~'))})",
            unit="s",
            steps=((None, "green"), (WAIT_SLO_S / 3, "yellow"), (WAIT_SLO_S, "red")),
        ),
        single(
            "Slots in use",
            "fal requests in flight / max_concurrency (expired leases still count).",
            f"sum(reframe_slots_in_use{sel()}) / clamp_min(sum(reframe_slots_capacity{sel()}), 1)",
            unit="percentunit",
            steps=((None, "green"), (0.9, "yellow"), (1.0, "orange")),
        ),
        single(
            "Breaker",
            "Cluster-wide circuit breaker in front of fal submits.",
            BREAKER_EXPR,
            mappings=BREAKER_MAPPINGS,
            steps=((None, "green"), (1, "yellow"), (2, "red")),
        ),
        single(
            "Workers",
            "Worker processes being scraped (reframe_worker_info).",
            f"count(reframe_worker_info{sel()}) or vector(0)",
            steps=((None, "red"), (1, "green")),
        ),
        single(
            "Budget used today",
            "Spent + reserved of today's cap (UTC day).",
            f"sum(reframe_budget_spent_usd{sel(L('period', 'day'))} "
            f"+ reframe_budget_reserved_usd{sel(L('period', 'day'))}) / "
            f"clamp_min(sum(reframe_budget_cap_usd{sel(L('period', 'day'))}), 0.000001)",
            unit="percentunit",
            steps=((None, "green"), (0.8, "yellow"), (1.0, "red")),
        ),
    ]
    for panel in stats:
        d = d.with_panel(panel)
    return d


def queues(d: Dashboard) -> Dashboard:
    """Backlog by where and priority, ages, Celery in-flight vs the visibility timeout."""
    d = d.with_row(Row("Queues and backlog"))
    d = d.with_panel(
        ts(
            "Backlog by where / priority",
            "celery: task messages on every kombu priority list; wait: FIFOs waiting for a slot; blocked: "
            "budget cap; delayed: deliberately deferred (backoff, breaker, pause).",
            [q(f"sum by (where, priority) (reframe_queue_depth{sel()})", "{{where}} / {{priority}}")],
            stack=True,
        )
    )
    d = d.with_panel(
        ts(
            "Oldest waiting job",
            f"Age since queueing of the oldest job not yet at fal, per queue; the SLO is {WAIT_SLO_S}s. "
            "Delayed overdue: how late the most overdue deferred job is (should stay near 0).",
            [
                q(
                    f"max by (where, priority) (reframe_queue_oldest_age_seconds{sel()})",
                    "{{where}} / {{priority}}",
                ),
                q(f"max(reframe_delayed_overdue_seconds{sel()})", "delayed overdue"),
            ],
            unit="s",
        )
    )
    d = d.with_panel(
        ts(
            "Enqueued vs finished",
            "Jobs accepted per second by priority, and terminal outcomes per second.",
            [
                q(
                    f"sum by (priority) (rate(reframe_jobs_enqueued_total{sel()}[{RATE}]))",
                    "enqueued {{priority}}",
                ),
                q(f"sum by (outcome) (rate(reframe_jobs_finished_total{sel()}[{RATE}]))", "{{outcome}}"),
            ],
            unit="ops",
        )
    )
    d = d.with_panel(
        ts(
            "In-flight age vs visibility timeout",
            "Oldest unacknowledged Celery message and oldest job holding a slot. kombu redelivers an "
            "unacked message at the visibility timeout: the first line must stay well below it.",
            [
                q(f"max(reframe_celery_unacked_oldest_age_seconds{sel()})", "oldest unacked message"),
                q(f"max(reframe_inflight_oldest_age_seconds{sel()})", "oldest job at fal"),
                q(f"max(reframe_celery_visibility_timeout_seconds{sel()})", "visibility timeout"),
            ],
            unit="s",
            span=12,
        )
    )
    return d.with_panel(
        ts(
            "Unacked messages",
            "Celery messages delivered to a worker and not yet acknowledged (acks late: until the task "
            "ends).",
            [q(f"sum(reframe_celery_unacked_messages{sel()})", "unacked")],
            span=12,
        )
    )


def latency(d: Dashboard) -> Dashboard:
    """Percentiles of the four job phases."""
    d = d.with_row(Row("Latency"))
    d = d.with_panel(
        ts(
            "End-to-end (succeeded)",
            "Enqueue to SUCCEEDED, including queueing, deliberate delays, fal queueing and inference.",
            quantiles("reframe_job_end_to_end_seconds", L("outcome", "succeeded")),
            unit="s",
            span=12,
        )
    )
    d = d.with_panel(
        ts(
            "Queue wait",
            "Enqueue to first submit, excluding deliberate delays (backoff, breaker, pause, budget).",
            quantiles("reframe_job_queue_wait_seconds"),
            unit="s",
            span=12,
        )
    )
    d = d.with_panel(
        ts(
            "fal queue time",
            "Accepted submit to IN_PROGRESS at fal.",
            quantiles("reframe_fal_queue_seconds"),
            unit="s",
            span=12,
        )
    )
    return d.with_panel(
        ts(
            "fal inference time",
            "IN_PROGRESS to COMPLETED at fal.",
            quantiles("reframe_fal_inference_seconds"),
            unit="s",
            span=12,
        )
    )


def fal_api(d: Dashboard) -> Dashboard:
    """The paid API: status classes, 429s and pauses, latency, retries."""
    d = d.with_row(Row("fal API"))
    d = d.with_panel(
        ts(
            "fal requests by status class",
            "HTTP calls to fal per second (all operations, in-call retries included).",
            [
                q(
                    f"sum by (status_class) (rate(reframe_fal_requests_total{sel()}[{RATE}]))",
                    "{{status_class}}",
                )
            ],
            unit="reqps",
            stack=True,
        )
    )
    d = d.with_panel(
        ts(
            "429s and pauses",
            "Throttled calls per second, cluster-wide pauses started per second, and the pause left now.",
            [
                q(f"sum(rate(reframe_fal_requests_total{sel(L('status_class', '429'))}[{RATE}]))", "429/s"),
                q(f"sum(rate(reframe_rate_limit_pauses_total{sel()}[{RATE}]))", "pauses/s"),
                q(f"max(reframe_rate_pause_remaining_seconds{sel()})", "pause remaining (s)"),
            ],
        )
    )
    d = d.with_panel(
        ts(
            "fal request latency p95 by op",
            "95th percentile duration of one HTTP call to fal, per operation.",
            [
                q(
                    "histogram_quantile(0.95, sum by (le, op) "
                    f"(rate(reframe_fal_request_duration_seconds_bucket{sel()}[{RATE}])))",
                    "{{op}}",
                )
            ],
            unit="s",
        )
    )
    d = d.with_panel(
        ts(
            "Retries and deferrals by reason",
            "Job-level retries (a later resubmit) and deliberate deferrals per second.",
            [
                q(f"sum by (reason) (rate(reframe_retries_total{sel()}[{RATE}]))", "retry {{reason}}"),
                q(f"sum by (reason) (rate(reframe_jobs_deferred_total{sel()}[{RATE}]))", "defer {{reason}}"),
            ],
            unit="ops",
        )
    )
    d = d.with_panel(
        ts(
            "Ambiguous submits",
            "Submits whose outcome was unknown, by policy applied. 'resubmit' risks paying twice.",
            [q(f"sum by (action) (increase(reframe_ambiguous_submits_total{sel()}[{RATE}]))", "{{action}}")],
        )
    )
    return d.with_panel(
        ts(
            "Rate-limit wait",
            "In-task waits for a cluster-wide submit token (GCRA), p50/p95/p99.",
            quantiles("reframe_rate_limit_wait_seconds"),
            unit="s",
        )
    )


def capacity(d: Dashboard) -> Dashboard:
    """Slots, breaker, retry budget."""
    d = d.with_row(Row("Capacity and flow control"))
    d = d.with_panel(
        ts(
            "Slot utilisation",
            "fal requests in flight vs max_concurrency (the sum of the fal accounts' caps), and per fal "
            "account. Expired leases still hold their slot until the housekeeper checked fal.",
            [
                q(f"sum(reframe_slots_in_use{sel()})", "in use"),
                q(f"sum(reframe_slots_capacity{sel()})", "capacity"),
                q(f"sum(reframe_slot_leases_expired{sel()})", "expired leases"),
                q(f"max by (account) (reframe_fal_account_slots_in_use{sel()})", "account {{account}}"),
            ],
        )
    )
    breaker = (
        statetimeline.Panel()
        .title("Breaker state")
        .description("closed / half-open / OPEN over time.")
        .datasource(DS)
        .height(8)
        .span(8)
        .mappings(BREAKER_MAPPINGS)
        .thresholds(thresholds((None, "green"), (1, "yellow"), (2, "red")))
    )
    d = d.with_panel(with_targets(breaker, [q(BREAKER_EXPR, "breaker")]))
    d = d.with_panel(
        ts(
            "Breaker window and retry budget",
            "Failure ratio in the breaker's window, transitions per second, and retry tokens left.",
            [
                q(
                    f"sum(reframe_breaker_window_failures{sel()}) "
                    f"/ clamp_min(sum(reframe_breaker_window_calls{sel()}), 1)",
                    "window failure ratio",
                ),
                q(
                    f"sum by (to_state) (rate(reframe_breaker_transitions_total{sel()}[{RATE}]))",
                    "to {{to_state}}/s",
                ),
                q(f"max(reframe_retry_budget_tokens{sel()})", "retry tokens"),
            ],
        )
    )
    return d.with_panel(
        ts(
            "fal account budgets",
            "Per fal account with an optional budget (REFRAME_FAL_ACCOUNTS id:cap:rate:daily:monthly): "
            "dollars spent this UTC day and month and held by jobs in flight (the caps: "
            "reframe_fal_account_budget_cap_usd, `reframe accounts list`). An account takes no new job "
            "once the largest possible job no longer fits under a cap.",
            [
                q(
                    f"max by (account, period) (reframe_fal_account_budget_spent_usd{sel()})",
                    "{{account}} spent ({{period}})",
                ),
                q(
                    f"max by (account) (reframe_fal_account_budget_reserved_usd{sel()})",
                    "{{account}} reserved",
                ),
            ],
            unit="currencyUSD",
            span=24,
        )
    )


def spend(d: Dashboard) -> Dashboard:
    """Money: spend vs caps per day and month, burn rate, rejections."""
    d = d.with_row(Row("Spend and budget"))
    for period, title in (("day", "Spend vs budget (UTC day)"), ("month", "Spend vs budget (UTC month)")):
        p = L("period", period)
        d = d.with_panel(
            ts(
                title,
                "Settled spend, reservations of jobs in flight, and the cap. Submits are refused when "
                "spent + reserved + estimate would exceed the cap.",
                [
                    q(f"sum(reframe_budget_spent_usd{sel(p)})", "spent"),
                    q(f"sum(reframe_budget_reserved_usd{sel(p)})", "reserved"),
                    q(f"sum(reframe_budget_cap_usd{sel(p)})", "cap"),
                ],
                unit="currencyUSD",
            )
        )
    return d.with_panel(
        ts(
            "Burn rate and budget rejections",
            "Dollars settled per hour, and submits refused by a cap per second.",
            [
                q(f"sum(rate(reframe_spend_usd_total{sel()}[{RATE}])) * 3600", "$/hour"),
                q(
                    f"sum by (period) (rate(reframe_budget_rejections_total{sel()}[{RATE}]))",
                    "rejected ({{period}})/s",
                ),
            ],
        )
    )


def spend_by_tenant(d: Dashboard) -> Dashboard:
    """Money per tenant: the exporter names the REFRAME_METRICS_TOP_TENANTS tenants that spent most
    this month and sums the rest as tenant="other" (reframe/exporter/collector.py TenantSpend)."""
    d = d.with_row(Row("Spend by tenant"))
    for period, title in (("day", "Spend by tenant (UTC day)"), ("month", "Spend by tenant (UTC month)")):
        d = d.with_panel(
            ts(
                title,
                "Dollars settled per tenant in the current period, from each tenant's budget hash (the "
                'same script that settles writes the cost ledger). Tenants outside the top are "other".',
                [q(f"sum by (tenant) (reframe_tenant_spent_usd{sel(L('period', period))})", "{{tenant}}")],
                unit="currencyUSD",
                span=8,
                stack=True,
            )
        )
    d = d.with_panel(
        ts(
            "Tenant budget headroom",
            "Each named tenant's cap minus spent minus reserved, per period (only tenants with a cap). "
            "At or below zero the tenant's jobs wait BLOCKED while other tenants go on.",
            [
                q(
                    "min by (tenant, period) "
                    f"(reframe_tenant_budget_headroom_usd{sel(L('tenant', 'other', '!='))})",
                    "{{tenant}} {{period}}",
                )
            ],
            unit="currencyUSD",
            span=5,
            min_zero=False,
        )
    )
    return d.with_panel(
        single(
            "Tenants at their cap",
            "Tenants (all of them, named or not) whose spent + reserved reached their own daily or "
            "monthly cap: their jobs wait BLOCKED.",
            f"max(sum by (period) (reframe_tenants_at_budget_cap{sel()}))",
            steps=((None, "green"), (1, "orange")),
            decimals=0,
        )
    )


def dedupe(d: Dashboard) -> Dashboard:
    """Paying once for identical work: how jobs with dedupe on were decided, and the money kept."""
    d = d.with_row(Row("Paying once (dedupe)"))
    d = d.with_panel(
        ts(
            "Dedupe decisions",
            "Jobs with dedupe on, per second: led (made the fal request), attached (followed a job in "
            "flight), served (a recent success, no fal call), alone (no identical work) or no_key "
            "(no strong validator to key on) (worker/contracts/canonical.py).",
            [q(f"sum by (outcome) (rate(reframe_dedup_jobs_total{sel()}[{RATE}]))", "{{outcome}}/s")],
            span=12,
        )
    )
    return d.with_panel(
        ts(
            "Saved by dedupe",
            "Dollars not paid to fal because a job reused identical work: per hour, and over the last "
            "day (the price its leader was charged, counted when the follower finishes).",
            [
                q(f"sum(rate(reframe_dedup_saved_usd_total{sel()}[{RATE}])) * 3600", "$/hour"),
                q(f"sum(increase(reframe_dedup_saved_usd_total{sel()}[1d]))", "last 24 h"),
            ],
            unit="currencyUSD",
            span=12,
        )
    )


def failures(d: Dashboard) -> Dashboard:
    """Outcomes and dead letters."""
    d = d.with_row(Row("Failures and dead letters"))
    d = d.with_panel(
        ts(
            "Terminal outcomes",
            "Jobs finished per second by outcome.",
            [q(f"sum by (outcome) (rate(reframe_jobs_finished_total{sel()}[{RATE}]))", "{{outcome}}")],
            unit="ops",
            stack=True,
        )
    )
    d = d.with_panel(
        ts(
            "Dead letters by reason",
            "Jobs moved to the dead-letter set per interval, by reason.",
            [q(f"sum by (reason) (increase(reframe_dead_letters_total{sel()}[{RATE}]))", "{{reason}}")],
        )
    )
    return d.with_panel(
        ts(
            "Dead-letter set size",
            "Jobs parked for an operator (reframe dlq list / replay).",
            [q(f"max(reframe_dead_letter_jobs{sel()})", "dead-letter set")],
        )
    )


def results(d: Dashboard) -> Dashboard:
    """Result publication and callbacks."""
    d = d.with_row(Row("Results and callbacks"))
    d = d.with_panel(
        ts(
            "Result publications",
            "Terminal results written per second, by sink and outcome.",
            [
                q(
                    f"sum by (sink, outcome) (rate(reframe_results_published_total{sel()}[{RATE}]))",
                    "{{sink}} {{outcome}}",
                )
            ],
            unit="ops",
        )
    )
    d = d.with_panel(
        ts(
            "Callback deliveries",
            "Callback POST attempts per second by outcome, and p95 duration.",
            [
                q(
                    f"sum by (outcome) (rate(reframe_callback_deliveries_total{sel()}[{RATE}]))",
                    "{{outcome}}",
                ),
                q(
                    "histogram_quantile(0.95, sum by (le) "
                    f"(rate(reframe_callback_duration_seconds_bucket{sel()}[{RATE}])))",
                    "p95 duration (s)",
                ),
            ],
        )
    )
    return d.with_panel(
        ts(
            "Result stream length",
            "Entries in the result stream (capped at results_stream_maxlen).",
            [q(f"max(reframe_result_stream_length{sel()})", "stream entries")],
        )
    )


def outputs(d: Dashboard) -> Dashboard:
    """The output store: copies of successes off fal's CDN, their backlog and verification."""
    d = d.with_row(Row("Output store"))
    d = d.with_panel(
        ts(
            "Output copies",
            "Copy tries per second by outcome (copied; failed: retried with backoff; gave_up: the copy "
            "window ended or fal's file is gone, output_copy=failed) and the p95 of a copy (download, "
            "hash, verify, upload).",
            [
                q(f"sum by (outcome) (rate(reframe_output_copies_total{sel()}[{RATE}]))", "{{outcome}}/s"),
                q(
                    "histogram_quantile(0.95, sum by (le) "
                    f"(rate(reframe_output_copy_duration_seconds_bucket{sel()}[{RATE}])))",
                    "p95 copy (s)",
                ),
            ],
        )
    )
    d = d.with_panel(
        ts(
            "Copies pending and given up",
            "Copies not done yet (their results wait to be published) and copies given up "
            "(`reframe outputs retry`; alert ReframeOutputCopiesFailed).",
            [
                q(f"max(reframe_output_copies_pending{sel()})", "pending"),
                q(f"max(reframe_output_copies_failed{sel()})", "given up"),
            ],
            span=6,
        )
    )
    d = d.with_panel(
        single(
            "Oldest pending copy",
            "Age of the oldest copy not done yet; it must end well before fal deletes the output "
            "(alert ReframeOutputCopyNearRetention).",
            f"max(reframe_output_copy_oldest_pending_age_seconds{sel()})",
            unit="s",
            steps=((None, "green"), (3600, "orange"), (10800, "red")),
            span=4,
        )
    )
    return d.with_panel(
        ts(
            "Output verification",
            "Copied outputs checked against the request per second: ok, or mismatch (aspect ratio or "
            "duration off: the evidence is on the job for a refund request at fal).",
            [q(f"sum by (result) (rate(reframe_output_verify_total{sel()}[{RATE}]))", "{{result}}/s")],
            span=6,
        )
    )


def tracker(d: Dashboard) -> Dashboard:
    """Completion tracking load."""
    d = d.with_row(Row("Completion tracker"))
    d = d.with_panel(
        ts(
            "Tracked jobs per worker",
            "Jobs each worker process's tracker follows, against its capacity.",
            [
                q(f"sum by (instance) (reframe_tracker_jobs{sel()})", "{{instance}}"),
                q(f"sum(reframe_tracker_capacity_jobs{sel()})", "total capacity"),
            ],
        )
    )
    d = d.with_panel(
        ts(
            "Tracking schedule",
            "Jobs scheduled for tracking, entries overdue (due but unclaimed) and how late the worst is.",
            [
                q(f"max(reframe_tracking_jobs{sel()})", "scheduled"),
                q(f"max(reframe_tracking_overdue_jobs{sel()})", "overdue"),
                q(f"max(reframe_tracking_overdue_seconds{sel()})", "most overdue (s)"),
            ],
        )
    )
    return d.with_panel(
        ts(
            "Status stream and polls",
            "Status-stream reconnects and fallback polls per second.",
            [
                q(f"sum(rate(reframe_tracker_status_stream_reconnects_total{sel()}[{RATE}]))", "reconnects"),
                q(
                    f"sum by (outcome) (rate(reframe_tracker_status_polls_total{sel()}[{RATE}]))",
                    "poll {{outcome}}",
                ),
            ],
            unit="ops",
        )
    )


def http_api(d: Dashboard) -> Dashboard:
    """``reframe serve`` (reframe/api/middleware.py): requests, latency, errors, fal webhooks, and how
    workers learned each end of a fal request (worker/outcomes.py)."""
    d = d.with_row(Row("HTTP API"))
    requests = "reframe_api_requests_total"
    d = d.with_panel(
        ts(
            "API request rate by route / status class",
            "Requests answered per second by every reframe serve process, by route template (never an "
            "id or key) and status class.",
            [
                q(
                    f"sum by (route, status_class) (rate({requests}{sel()}[{RATE}]))",
                    "{{route}} {{status_class}}",
                )
            ],
            unit="reqps",
            span=12,
            stack=True,
        )
    )
    d = d.with_panel(
        ts(
            "API latency p50 / p99 by route",
            "Request latency to the end of the response body, per route template (SSE streams last "
            "until the job ends or REFRAME_API_SSE_MAX_S).",
            [
                q(
                    "histogram_quantile(0.5, sum by (le, route) "
                    f"(rate(reframe_api_request_duration_seconds_bucket{sel()}[{RATE}])))",
                    "p50 {{route}}",
                ),
                q(
                    "histogram_quantile(0.99, sum by (le, route) "
                    f"(rate(reframe_api_request_duration_seconds_bucket{sel()}[{RATE}])))",
                    "p99 {{route}}",
                ),
            ],
            unit="s",
            span=12,
        )
    )
    api_routes = L("route", "/v1/.*", "=~")
    d = d.with_panel(
        ts(
            "API error ratio (5xx / all)",
            "Share of /v1 requests answered 5xx (health, readiness and metrics routes excluded); the "
            "alert ReframeApiErrorRatio fires above 5 %.",
            [
                q(
                    f"(sum(rate({requests}{sel(api_routes + ', ' + L('status_class', '5xx'))}[{RATE}])) "
                    f"or vector(0)) / sum(rate({requests}{sel(api_routes)}[{RATE}]))",
                    "5xx ratio",
                )
            ],
            unit="percentunit",
        )
    )
    d = d.with_panel(
        ts(
            "fal webhooks by outcome",
            "fal completion webhooks per second: accepted, duplicate (fal's retries), rejected_token and "
            "rejected_signature (verification failures: forged, stale or misrouted deliveries), "
            "unavailable (JWKS or Redis down: 503, fal retries), disabled (no REFRAME_PUBLIC_URL here).",
            [
                q(
                    f"sum by (outcome) (rate(reframe_api_fal_webhooks_total{sel()}[{RATE}]))",
                    "{{outcome}}",
                )
            ],
            unit="reqps",
        )
    )
    return d.with_panel(
        ts(
            "Completions via webhook vs status",
            "Ends of fal requests applied per second, by the path that learned them: fal's webhook, or "
            "the tracker's status reads. With REFRAME_PUBLIC_URL set, status should only reconcile lost "
            "webhooks (after REFRAME_WEBHOOK_GRACE_S); alert ReframeFalWebhooksNotArriving.",
            [
                q(
                    f"sum by (via) (rate(reframe_job_completions_total{sel()}[{RATE}]))",
                    "via {{via}}",
                )
            ],
            unit="ops",
        )
    )


def celery(d: Dashboard) -> Dashboard:
    """Celery tasks and the metrics pipeline itself."""
    d = d.with_row(Row("Celery tasks and exporter"))
    d = d.with_panel(
        ts(
            "Task outcomes",
            "Celery tasks finished per second by task and outcome (from worker signals, not events).",
            [
                q(
                    f"sum by (task, outcome) (rate(reframe_celery_tasks_total{sel()}[{RATE}]))",
                    "{{task}} {{outcome}}",
                )
            ],
            unit="ops",
        )
    )
    d = d.with_panel(
        ts(
            "Task runtime p95",
            "95th percentile task run time by task (failures included).",
            [
                q(
                    "histogram_quantile(0.95, sum by (le, task) "
                    f"(rate(reframe_celery_task_runtime_seconds_bucket{sel()}[{RATE}])))",
                    "{{task}}",
                )
            ],
            unit="s",
        )
    )
    d = d.with_panel(
        ts(
            "Active tasks and exceptions",
            "Tasks running now per worker, and exceptions per interval by class.",
            [
                q(f"sum by (instance) (reframe_celery_tasks_active{sel()})", "active {{instance}}"),
                q(
                    f"sum by (exception) (increase(reframe_celery_task_exceptions_total{sel()}[{RATE}]))",
                    "{{exception}}",
                ),
            ],
        )
    )
    return d.with_panel(
        ts(
            "Cluster exporter",
            "Whether the exporter could read Redis (1 = yes), and how long a read takes.",
            [
                q(f"min(reframe_cluster_scrape_success{sel()})", "scrape success"),
                q(f"max(reframe_cluster_scrape_duration_seconds{sel()})", "read duration (s)"),
            ],
            span=24,
        )
    )


def build() -> dict[str, Any]:
    """The dashboard as a JSON-ready dict."""
    d = (
        Dashboard(TITLE)
        .uid(UID)
        .description(
            "Reframe Cluster: jobs through Luma Ray 2 Flash Reframe on fal. Generated by "
            "observability/dashboard.py; do not edit in Grafana."
        )
        .tags(["reframe", "celery", "fal"])
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("utc")
        .tooltip(dashboard.DashboardCursorSync.CROSSHAIR)
        .with_variable(DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(
            QueryVariable("namespace")
            .label("Namespace")
            .datasource(DS)
            .query("label_values(reframe_cluster_scrape_success, namespace)")
            .refresh(dashboard.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dashboard.VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
        )
    )
    sections = (
        overview,
        queues,
        latency,
        fal_api,
        capacity,
        spend,
        spend_by_tenant,
        dedupe,
        failures,
        results,
        outputs,
        tracker,
        http_api,
        celery,
    )
    for section in sections:
        d = section(d)
    built = json.loads(json.dumps(d.build(), cls=JSONEncoder))
    # The SDK serialises the interval-variable fields (auto, auto_count, auto_min) on every
    # variable; Grafana's dashboard schema allows them only on interval variables.
    for variable in built["templating"]["list"]:
        if variable.get("type") != "interval":
            for key in ("auto", "auto_count", "auto_min"):
                variable.pop(key, None)
    # Stable panel ids in layout order (Grafana needs unique ids; the SDK leaves them unset).
    for i, panel in enumerate(built["panels"], start=1):
        panel["id"] = i
    return built  # type: ignore[no-any-return]


def render() -> str:
    """The dashboard JSON text exactly as committed (sorted keys, 2-space indent, final newline)."""
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write the JSON, or with ``--check`` fail if the committed file differs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed JSON is stale")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale: run python -m observability.dashboard", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
