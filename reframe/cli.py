"""The ``reframe`` command line: enqueue and watch jobs, run workers, the exporter, the emulator, the demo.

Every command reads the settings once (``REFRAME_*`` variables and ``FAL_KEY``); a bad setting or a bad
request prints one line naming the variable or field and exits with status 2.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from config import Settings, SettingsError, load_settings

app = typer.Typer(
    name="reframe",
    help="Reframe Cluster: push videos through Luma Ray 2 Flash Reframe on fal.ai, at scale.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
dlq_app = typer.Typer(help="Inspect and act on dead-lettered jobs.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")

console = Console()
err_console = Console(stderr=True)

EXIT_USAGE = 2
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    """Print a one-line error and return the exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def settings_or_exit(*, require_fal_key: bool = False, **overrides: Any) -> Settings:
    """Load settings, turning a configuration error into a clean exit."""
    try:
        return load_settings(require_fal_key=require_fal_key, **overrides)
    except SettingsError as exc:
        lines = str(exc).splitlines()[1:] or [str(exc)]
        raise fail("; ".join(line.strip() for line in lines)) from None


# --------------------------------------------------------------------------------------------- jobs
def _metadata(pairs: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise fail(f"metadata: {pair!r} is not KEY=VALUE")
        out[key] = value
    return out


def _upload_if_local(settings: Settings, source: str) -> str:
    if "://" in source or source.startswith("data:"):
        return source
    path = Path(source)
    if not path.is_file():
        raise fail(f"video_url: {source!r} is neither a URL nor an existing file")
    import asyncio

    from worker.fal import FalClient, FalError

    settings = settings_or_exit(require_fal_key=True)

    async def upload() -> str:
        client = FalClient.from_settings(settings)
        try:
            return await client.upload_file(path)
        finally:
            await client.aclose()

    try:
        with console.status(f"uploading {path.name} to fal storage"):
            return asyncio.run(upload())
    except FalError as exc:
        raise fail(f"upload of {path}: {exc}", code=1) from None


@app.command()
def enqueue(
    source: Annotated[str, typer.Argument(help="Video URL (http/https/data:) or a local file to upload.")],
    aspect_ratio: Annotated[
        str, typer.Option("--aspect-ratio", "-a", help="1:1 16:9 9:16 4:3 3:4 21:9 9:21")
    ],
    image_url: Annotated[str | None, typer.Option(help="Optional first-frame image URL.")] = None,
    prompt: Annotated[str | None, typer.Option(help="Optional text guidance.")] = None,
    grid_position_x: Annotated[int | None, typer.Option(help="Source x position in the output (px).")] = None,
    grid_position_y: Annotated[int | None, typer.Option(help="Source y position in the output (px).")] = None,
    x_start: Annotated[int | None, typer.Option(help="Left edge of the source (output px).")] = None,
    x_end: Annotated[int | None, typer.Option(help="Right edge of the source (output px).")] = None,
    y_start: Annotated[int | None, typer.Option(help="Top edge of the source (output px).")] = None,
    y_end: Annotated[int | None, typer.Option(help="Bottom edge of the source (output px).")] = None,
    priority: Annotated[str, typer.Option(help="high, normal or low.")] = "normal",
    idempotency_key: Annotated[str | None, typer.Option(help="Same key + same input = same job.")] = None,
    metadata: Annotated[
        list[str] | None, typer.Option("--metadata", "-m", help="KEY=VALUE, repeatable.")
    ] = None,
    callback_url: Annotated[str | None, typer.Option(help="POSTed (signed) when the job ends.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Show live progress until the job ends.")] = False,
    timeout_s: Annotated[float, typer.Option(help="With --wait: give up after this many seconds.")] = 900.0,
) -> None:
    """Validate a reframe request and enqueue it; print the job id."""
    from producer import IdempotencyConflict, InvalidRequest, Producer

    settings = settings_or_exit()
    video_url = _upload_if_local(settings, source)
    request = {
        "video_url": video_url,
        "aspect_ratio": aspect_ratio,
        "image_url": image_url,
        "prompt": prompt,
        "grid_position_x": grid_position_x,
        "grid_position_y": grid_position_y,
        "x_start": x_start,
        "x_end": x_end,
        "y_start": y_start,
        "y_end": y_end,
    }
    request = {k: v for k, v in request.items() if v is not None}
    with Producer(settings) as producer:
        try:
            job_id = producer.enqueue(
                request,
                idempotency_key=idempotency_key,
                priority=priority,
                metadata=_metadata(metadata),
                callback_url=callback_url,
            )
        except (InvalidRequest, IdempotencyConflict) as exc:
            raise fail(str(exc)) from None
        console.print(job_id, highlight=False)
        if wait:
            _follow_jobs(producer, [job_id], timeout_s=timeout_s)
            job = producer.get(job_id)
            if job is None or job.state.value != "SUCCEEDED":
                raise typer.Exit(1)


def _follow_jobs(producer: Any, job_ids: list[str], *, timeout_s: float) -> None:
    """Live progress of jobs until all are terminal (rich progress bar + states)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    deadline = time.monotonic() + timeout_s
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[state]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        tasks = {j: progress.add_task(j[:12], total=4, state="QUEUED") for j in job_ids}
        steps = {
            "QUEUED": 0,
            "WAITING": 0,
            "BLOCKED": 0,
            "DEFERRED": 0,
            "SUBMITTING": 1,
            "IN_QUEUE": 2,
            "IN_PROGRESS": 3,
        }
        while True:
            jobs = producer.get_many(job_ids)
            done = 0
            for job_id, job in zip(job_ids, jobs, strict=True):
                state = job.state.value if job else "MISSING"
                extra = (
                    f" (#{job.queue_position} in fal queue)"
                    if job and job.queue_position not in (None, "")
                    else ""
                )
                progress.update(
                    tasks[job_id],
                    completed=4 if state in TERMINAL else steps.get(state, 0),
                    state=state + extra,
                )
                done += state in TERMINAL or state == "MISSING"
            if done == len(job_ids):
                return
            if time.monotonic() > deadline:
                raise fail(f"timed out after {timeout_s:.0f}s", code=1)
            time.sleep(0.3)


def _job_json(job: Any) -> dict[str, Any]:
    return {
        "id": job.id,
        "state": job.state.value,
        "priority": job.priority.value,
        "attempts": job.attempts,
        "input": job.input,
        "metadata": job.metadata,
        "fal_request_id": job.fal_request_id,
        "queue_position": job.queue_position,
        "video_url": job.video_url,
        "cost_usd": job.cost_usd,
        "error": job.error,
        "dead_letter_reason": job.dead_letter_reason,
        "timestamps_ms": job.timestamps_ms,
    }


@app.command()
def status(
    job_id: Annotated[str | None, typer.Argument(help="A job id (omit with --cluster).")] = None,
    cluster: Annotated[bool, typer.Option("--cluster", help="Show cluster-wide flow-control state.")] = False,
) -> None:
    """Show a job's record as JSON, or the cluster's slots, pause, breaker, budget and queues."""
    settings = settings_or_exit()
    if cluster:
        _cluster_status(settings)
        return
    if not job_id:
        raise fail("job_id: give a job id or --cluster")
    from producer import Producer

    with Producer(settings) as producer:
        job = producer.get(job_id)
    if job is None:
        raise fail(f"job_id: no job {job_id}", code=1)
    console.print_json(json.dumps(_job_json(job)))


def _cluster_status(settings: Settings) -> None:
    import redis

    from worker.contracts.keys import Keys, celery_queue_keys
    from worker.flow import FlowControl

    r = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
    keys = Keys(settings.key_prefix)
    flow = FlowControl.from_settings(r, settings)
    pause = flow.rate.paused_until_ms()
    breaker = flow.breaker.state()
    budget = flow.budget.snapshot()
    table = Table(title="Reframe Cluster", show_header=True)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("slots in use / capacity", f"{flow.slots.in_use()} / {settings.max_concurrency}")
    table.add_row("expired leases (checking fal)", str(len(flow.slots.expired(limit=1000))))
    for prio, depth in flow.slots.waiting_depths().items():
        table.add_row(f"waiting for a slot ({prio})", str(depth))
    table.add_row(
        "celery queue (all priorities)", str(sum(r.llen(k) for k in celery_queue_keys(settings.queue_name)))
    )
    table.add_row("deferred", str(r.zcard(keys.delayed)))
    table.add_row("blocked by budget", str(r.zcard(keys.blocked)))
    table.add_row("tracked at fal", str(r.zcard(keys.track)))
    table.add_row("dead letters", str(r.zcard(keys.dlq)))
    table.add_row(
        "submit pause until", time.strftime("%H:%M:%S", time.gmtime(pause / 1000)) if pause else "-"
    )
    table.add_row("breaker", f"{breaker.state.value} (trips {breaker.trips})")
    table.add_row(
        "budget today (spent + reserved / cap)",
        f"${budget.day_spent / 1e6:.2f} + ${budget.day_reserved / 1e6:.2f} / ${budget.day_cap / 1e6:.2f}",
    )
    table.add_row(
        "budget month (spent + reserved / cap)",
        f"${budget.month_spent / 1e6:.2f} + ${budget.month_reserved / 1e6:.2f}"
        f" / ${budget.month_cap / 1e6:.2f}",
    )
    console.print(table)


@app.command("wait")
def wait_cmd(
    job_ids: Annotated[list[str], typer.Argument(help="One or more job ids.")],
    timeout_s: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 900.0,
) -> None:
    """Wait for jobs to finish, showing live progress; exit 1 unless all SUCCEEDED."""
    from producer import Producer

    with Producer(settings_or_exit()) as producer:
        _follow_jobs(producer, job_ids, timeout_s=timeout_s)
        jobs = producer.get_many(job_ids)
    if not all(j is not None and j.state.value == "SUCCEEDED" for j in jobs):
        raise typer.Exit(1)


@app.command()
def cancel(job_id: Annotated[str, typer.Argument(help="The job to cancel.")]) -> None:
    """Cancel a job (also at fal once it was submitted)."""
    from producer import Producer

    with Producer(settings_or_exit()) as producer:
        outcome = producer.cancel(job_id)
    console.print(outcome.value)
    if outcome.value == "not_found":
        raise typer.Exit(1)


@app.command()
def results(
    group: Annotated[str, typer.Option(help="Consumer group name.")] = "reframe-cli",
    consumer: Annotated[str | None, typer.Option(help="Consumer name (default: hostname).")] = None,
    count: Annotated[int, typer.Option(help="Stop after this many events (0 = follow forever).")] = 0,
    block_ms: Annotated[int, typer.Option(help="How long one read blocks.")] = 1000,
) -> None:
    """Follow the result stream (consumer group), printing one JSON event per line."""
    from producer import ResultConsumer

    reader = ResultConsumer(settings_or_exit(), group, consumer)
    for seen, event in enumerate(reader.follow(block_ms=block_ms), start=1):
        sys.stdout.write(json.dumps({"stream_id": event.stream_id, **event.fields}) + "\n")
        sys.stdout.flush()
        if count and seen >= count:
            return


# --------------------------------------------------------------------------------------------- dlq
def _dlq_ids(settings: Settings, limit: int) -> list[str]:
    import redis

    from worker.contracts.keys import Keys

    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    return [str(x) for x in r.zrange(Keys(settings.key_prefix).dlq, 0, limit - 1)]


@dlq_app.command("list")
def dlq_list(limit: Annotated[int, typer.Option(help="Show at most this many.")] = 100) -> None:
    """List dead-lettered jobs with their reason."""
    from producer import Producer

    settings = settings_or_exit()
    table = Table("job", "reason", "attempts", "error")
    with Producer(settings) as producer:
        for job in producer.get_many(_dlq_ids(settings, limit)):
            if job is not None:
                message = str((job.error or {}).get("message", ""))[:80]
                table.add_row(job.id, job.dead_letter_reason or "", str(job.attempts), message)
    console.print(table)


@dlq_app.command("show")
def dlq_show(job_id: Annotated[str, typer.Argument(help="A dead-lettered job.")]) -> None:
    """Show a dead-lettered job's full record."""
    status(job_id=job_id, cluster=False)


@dlq_app.command("replay")
def dlq_replay(
    job_ids: Annotated[list[str] | None, typer.Argument(help="Jobs to replay (default: --all).")] = None,
    all_jobs: Annotated[bool, typer.Option("--all", help="Replay every dead-lettered job.")] = False,
) -> None:
    """Send dead-lettered jobs back to QUEUED (a new series of attempts)."""
    from producer import Producer

    settings = settings_or_exit()
    ids = list(job_ids or []) or (_dlq_ids(settings, 100_000) if all_jobs else [])
    if not ids:
        raise fail("job_ids: name jobs or pass --all")
    with Producer(settings) as producer:
        for job_id in ids:
            job = producer.get(job_id)
            outcome = producer.store.replay(job_id, job.priority) if job else None
            console.print(f"{job_id} {'replayed' if outcome and outcome.ok else 'not replayed'}")


@dlq_app.command("purge")
def dlq_purge(yes: Annotated[bool, typer.Option("--yes", help="Confirm.")] = False) -> None:
    """Remove every job from the dead-letter set (records expire on their own)."""
    import redis

    from worker.contracts.keys import Keys

    if not yes:
        raise fail("purge: pass --yes to confirm")
    settings = settings_or_exit()
    r = redis.Redis.from_url(settings.redis_url)
    n = r.zcard(Keys(settings.key_prefix).dlq)
    r.delete(Keys(settings.key_prefix).dlq)
    console.print(f"purged {n}")


# --------------------------------------------------------------------------------------------- processes
@app.command()
def worker(
    concurrency: Annotated[
        int | None, typer.Option(help="Threads (default REFRAME_WORKER_CONCURRENCY).")
    ] = None,
    hostname: Annotated[str | None, typer.Option(help="Celery node name.")] = None,
) -> None:
    """Run a Celery worker (threads pool) with the completion tracker, housekeeper and /metrics."""
    from reframe.logs import setup_logging
    from worker.app import run_worker

    settings = settings_or_exit(require_fal_key=True)
    setup_logging(settings)
    run_worker(settings, concurrency=concurrency, hostname=hostname)


@app.command()
def exporter(
    port: Annotated[int | None, typer.Option(help="Port (default REFRAME_METRICS_PORT).")] = None,
) -> None:
    """Serve cluster-wide gauges (queues, slots, budget, breaker) on /metrics; run exactly one."""
    from reframe.exporter import run_exporter
    from reframe.logs import setup_logging

    overrides: dict[str, Any] = {"metrics_port": port} if port is not None else {}
    settings = settings_or_exit(**overrides)
    setup_logging(settings)
    run_exporter(settings)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,  # `--help` goes to the emulator's own parser, which lists every option
)
def emulator(ctx: typer.Context) -> None:
    """Run the fal emulator (`reframe emulator --help` lists its options: --host, --port, ...)."""
    try:
        from falemu import cli_main
    except ImportError:
        raise fail("emulator: install the extra: pip install 'reframe-cluster[emulator]'") from None
    raise typer.Exit(cli_main(list(ctx.args)) or 0)


@app.command()
def demo(
    output_dir: Annotated[Path, typer.Option(help="Where the reframed videos go.")] = Path("reframe-output"),
    aspect_ratios: Annotated[str, typer.Option(help="Comma-separated targets.")] = "9:16,1:1,4:3",
    timeout_s: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 300.0,
) -> None:
    """Start Redis, the fal emulator and a worker; reframe a sample video; download; shut down."""
    from reframe.demo import run_demo

    code = run_demo(
        output_dir=output_dir,
        aspect_ratios=[a.strip() for a in aspect_ratios.split(",") if a.strip()],
        timeout_s=timeout_s,
        console=console,
    )
    raise typer.Exit(code)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
