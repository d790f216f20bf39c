"""The ``reframe`` command line: enqueue and watch jobs, run workers, the exporter, the emulator, the demo.

Every command reads the settings once (``REFRAME_*`` variables and ``FAL_KEY``). Every error (a bad
flag, a bad setting, a bad request, Redis unreachable or refusing our password, a port in use) is
one line on stderr naming the field or variable, and exit status 2; never a traceback, never a
secret (a Redis URL is shown without its password). Job ids may be given as unique prefixes.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import math
import re
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import redis
import typer
from redis.sentinel import MasterNotFoundError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from config import Settings, SettingsError, load_settings
from config.settings import redact_url, settings_environment
from worker.contracts.connect import redis_client
from worker.contracts.durable import NotReplicated
from worker.contracts.keys import Keys
from worker.contracts.ledger import (
    GroupBy,
    LedgerError,
    cost_report,
    micro_usd,
    parse_when,
    read_entries,
    report_csv_rows,
)
from worker.contracts.redis_promise import read_promise, risks
from worker.contracts.tenants import LIMIT_FIELDS, TenantLimits, TenantRegistry, check_tenant
from worker.contracts.usage import DIFFERENCE_COLUMNS, UsageError, parse_usage, reconcile
from worker.flow import FlowControl, UnknownAccount, micro_to_usd

app = typer.Typer(
    name="reframe",
    help="Reframe Cluster: push videos through Luma Ray 2 Flash Reframe on fal.ai, at scale.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
dlq_app = typer.Typer(help="Inspect and act on dead-lettered jobs.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")
callbacks_app = typer.Typer(help="Inspect and redeliver callbacks that were given up.", no_args_is_help=True)
app.add_typer(callbacks_app, name="callbacks")
keys_app = typer.Typer(help="Create, list and revoke API keys of `reframe serve`.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
tenants_app = typer.Typer(
    help="Per-tenant limits inside the cluster's: budgets, concurrency, fair-share weight, submit rate.",
    no_args_is_help=True,
)
app.add_typer(tenants_app, name="tenants")
accounts_app = typer.Typer(
    help="The pool of fal accounts (REFRAME_FAL_ACCOUNTS): caps, slots held, drained ones.",
    no_args_is_help=True,
)
app.add_typer(accounts_app, name="accounts")
costs_app = typer.Typer(
    help="Report spend from the cost ledger, or reconcile it with fal's usage export.",
    invoke_without_command=True,
)
app.add_typer(costs_app, name="costs")
outputs_app = typer.Typer(
    help="The output store: signed URLs, retrying given-up copies, retention cleanup.", no_args_is_help=True
)
app.add_typer(outputs_app, name="outputs")

console = Console()
err_console = Console(stderr=True)

EXIT_USAGE = 2
#: A write Redis replicas did not acknowledge (REFRAME_REDIS_MIN_REPLICAS): retry (EX_TEMPFAIL).
EXIT_NOT_REPLICATED = 75
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
JOB_ID_HEX_CHARS = 32
#: Candidates listed when a prefix is ambiguous.
MAX_CANDIDATES = 10
#: SCAN calls (COUNT 1000 each) a prefix lookup may make before asking for a longer prefix.
MAX_PREFIX_SCAN_CALLS = 2000
_HEX = re.compile(r"[0-9a-f]+")


@dataclass
class _Invocation:
    """What one CLI run knows, so error messages can name the Redis URL and hide secrets."""

    settings: Settings | None = None
    secrets: list[str] = field(default_factory=list)


_invocation = _Invocation()


def _scrub(message: str) -> str:
    """``message`` on one line, with every known secret replaced by ``***``."""
    for secret in _invocation.secrets:
        if secret:
            message = message.replace(secret, "***")
    return " ".join(message.split())


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    """Print a one-line error (secrets masked) and return the exit to raise."""
    err_console.print(f"[bold red]error:[/] {escape(_scrub(message))}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def note(message: str) -> None:
    """A one-line remark on stderr that is not an error."""
    err_console.print(f"note: {_scrub(message)}", highlight=False, soft_wrap=True, markup=False)


def settings_or_exit(*, require_fal_key: bool = False, **overrides: Any) -> Settings:
    """Load settings, turning a configuration error into a clean exit."""
    try:
        settings = load_settings(require_fal_key=require_fal_key, **overrides)
    except SettingsError as exc:
        lines = str(exc).splitlines()[1:] or [str(exc)]
        raise fail("; ".join(line.strip() for line in lines)) from None
    _invocation.settings = settings
    _invocation.secrets = [
        urlsplit(settings.redis_url).password or "",
        settings.redis_password.get_secret_value() if settings.redis_password else "",
        settings.redis_sentinel_password.get_secret_value() if settings.redis_sentinel_password else "",
        settings.fal_key_value,
        *settings.fal_account_key_map.values(),
        settings.callback_signing_key.get_secret_value() if settings.callback_signing_key else "",
        settings.output_s3_secret_access_key.get_secret_value()
        if settings.output_s3_secret_access_key
        else "",
    ]
    return settings


def _positive_seconds(value: float) -> float:
    if not math.isfinite(value) or value <= 0:
        raise typer.BadParameter(f"{value} is not a positive number of seconds")
    return value


def _redis_client(settings: Settings, *, decode: bool = False) -> redis.Redis:
    return redis_client(settings, socket_timeout=settings.redis_socket_timeout_s, decode_responses=decode)


# --------------------------------------------------------------------------------------------- job ids
def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def resolve_job_ids(settings: Settings, client: redis.Redis, given: Sequence[str]) -> list[str]:
    """Full job ids for ``given`` ids or unique prefixes; exit 2 naming the candidates otherwise."""
    from worker.contracts.keys import Keys

    keys = Keys(settings.key_prefix)
    out: list[str] = []
    for raw in given:
        prefix = raw.strip().lower()
        if not prefix or len(prefix) > JOB_ID_HEX_CHARS or not _HEX.fullmatch(prefix):
            raise fail(
                f"job_id: {raw!r} is not a job id ({JOB_ID_HEX_CHARS} hex characters) or a prefix of one"
            )
        if len(prefix) == JOB_ID_HEX_CHARS:
            if not client.exists(keys.job(prefix)):
                raise fail(f"job_id: no job {prefix}")
            out.append(prefix)
            continue
        head = keys.job("")
        found: list[str] = []
        cursor: int = 0
        for _ in range(MAX_PREFIX_SCAN_CALLS):
            cursor, batch = client.scan(cursor, match=_glob_escape(head) + prefix + "*", count=1000)
            found.extend(k.decode() if isinstance(k, bytes) else str(k) for k in batch)
            if cursor == 0 or len(found) > MAX_CANDIDATES:
                break
        else:
            raise fail(f"job_id: too many keys to search for prefix {raw!r}; give more characters")
        ids = sorted({k[len(head) :] for k in found})
        if not ids:
            raise fail(f"job_id: no job starts with {raw!r}")
        if len(ids) > 1:
            shown = ", ".join(ids[:MAX_CANDIDATES]) + (", ..." if len(ids) > MAX_CANDIDATES else "")
            raise fail(f"job_id: {raw!r} is ambiguous: {shown}")
        out.append(ids[0])
    return out


# --------------------------------------------------------------------------------------------- enqueue
def _metadata(pairs: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise fail(f"metadata: {pair!r} is not KEY=VALUE")
        out[key] = value
    return out


def _is_url(source: str) -> bool:
    return "://" in source or source.startswith("data:")


def check_local_video(settings: Settings, path: Path) -> float:
    """The duration of a local video file, or exit 2 unless it is a readable video within the model's
    limits (worker/contracts/quotes.py ``ModelLimits``: the rule quotes and the submitter use).

    Only the container header is read (PyAV, worker/contracts/media.py ``read_local_video``); nothing leaves
    the machine.
    """
    from worker.contracts.media import UnreadableVideo, read_local_video
    from worker.contracts.quotes import ModelLimits

    shown = repr(str(path))
    if not path.is_file():
        raise fail(f"video_url: {shown} is neither a URL nor an existing file")
    try:
        size_bytes = path.stat().st_size
        with path.open("rb"):
            pass
    except OSError as exc:
        raise fail(f"video_url: {shown} is not readable ({exc.strerror or type(exc).__name__})") from None
    if size_bytes == 0:
        raise fail(f"video_url: {shown} is empty")
    limits = ModelLimits.from_settings(settings)
    too_large = limits.size_problem(size_bytes)
    if too_large:
        raise fail(f"video_url: {shown} {too_large}")
    try:
        duration_s = read_local_video(path).known_duration_s
    except UnreadableVideo as exc:
        raise fail(f"video_url: {shown} {exc}") from None
    except OSError as exc:
        raise fail(f"video_url: {shown} is not readable ({exc.strerror or type(exc).__name__})") from None
    if duration_s is None:
        raise fail(f"video_url: {shown} has no readable duration")
    too_long = limits.duration_problem(duration_s)
    if too_long:
        raise fail(f"video_url: {shown} {too_long}")
    return duration_s


def _upload(settings: Settings, path: Path) -> str:
    """Stream ``path`` to fal storage with a progress bar on stderr (stdout stays the job id).

    Above REFRAME_FAL_MULTIPART_THRESHOLD_BYTES in parts, several at once, each retried on its own
    (worker/fal/client.py ``upload_file``); the file is never read whole into memory.
    """
    import asyncio

    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from worker.fal import FalClient, FalError

    settings = settings_or_exit(require_fal_key=True)
    bar = Progress(
        TextColumn("uploading {task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err_console,
    )
    task = bar.add_task(escape(path.name), total=path.stat().st_size)

    async def upload() -> str:
        client = FalClient.from_settings(settings)
        try:
            return await client.upload_file(
                path, on_progress=lambda sent, total: bar.update(task, completed=sent, total=total)
            )
        finally:
            await client.aclose()

    try:
        with bar:
            return asyncio.run(upload())
    except FalError as exc:
        raise fail(f"upload of {path}: {exc}", code=1) from None


# The request's optional fields, shared by `enqueue` and `quote` (a quote of the whole request can
# say whether dedupe would reuse a job).
ImageUrlOpt = Annotated[str | None, typer.Option(help="Optional first-frame image URL.")]
PromptOpt = Annotated[str | None, typer.Option(help="Optional text guidance.")]
GridXOpt = Annotated[int | None, typer.Option(help="Source x position in the output (px).")]
GridYOpt = Annotated[int | None, typer.Option(help="Source y position in the output (px).")]
XStartOpt = Annotated[int | None, typer.Option(help="Left edge of the source (output px).")]
XEndOpt = Annotated[int | None, typer.Option(help="Right edge of the source (output px).")]
YStartOpt = Annotated[int | None, typer.Option(help="Top edge of the source (output px).")]
YEndOpt = Annotated[int | None, typer.Option(help="Bottom edge of the source (output px).")]
DedupeOpt = Annotated[
    bool | None,
    typer.Option(
        "--dedupe/--no-dedupe",
        help="Pay once for identical work (default: the tenant's, else REFRAME_DEDUPE_DEFAULT).",
    ),
]


def _request_fields(**fields: Any) -> dict[str, Any]:
    """The request from the command's options, without the ones left out."""
    return {k: v for k, v in fields.items() if v is not None}


@app.command()
def enqueue(
    source: Annotated[
        str, typer.Argument(help="Video URL (http/https/data:) or a local video file to upload.")
    ],
    aspect_ratio: Annotated[
        str, typer.Option("--aspect-ratio", "-a", help="1:1 16:9 9:16 4:3 3:4 21:9 9:21")
    ],
    image_url: ImageUrlOpt = None,
    prompt: PromptOpt = None,
    grid_position_x: GridXOpt = None,
    grid_position_y: GridYOpt = None,
    x_start: XStartOpt = None,
    x_end: XEndOpt = None,
    y_start: YStartOpt = None,
    y_end: YEndOpt = None,
    priority: Annotated[str, typer.Option(help="high, normal or low.")] = "normal",
    idempotency_key: Annotated[str | None, typer.Option(help="Same key + same input = same job.")] = None,
    metadata: Annotated[
        list[str] | None, typer.Option("--metadata", "-m", help="KEY=VALUE, repeatable.")
    ] = None,
    callback_url: Annotated[str | None, typer.Option(help="POSTed (signed) when the job ends.")] = None,
    tenant: Annotated[
        str | None, typer.Option(help="Who the job belongs to (default: the `default` tenant).")
    ] = None,
    dedupe: DedupeOpt = None,
    wait: Annotated[bool, typer.Option("--wait", help="Show live progress until the job ends.")] = False,
    timeout_s: Annotated[
        float, typer.Option(help="With --wait: give up after this many seconds.", callback=_positive_seconds)
    ] = 900.0,
) -> None:
    """Validate a reframe request and enqueue it; print the job id.

    A local file is checked first (a readable, non-empty video within REFRAME_MAX_UPLOAD_BYTES and
    REFRAME_MAX_VIDEO_DURATION_S) and only then uploaded to fal storage.
    """
    from producer import IdempotencyConflict, InvalidRequest, Producer

    settings = settings_or_exit()
    request = _request_fields(
        video_url=source,
        aspect_ratio=aspect_ratio,
        image_url=image_url,
        prompt=prompt,
        grid_position_x=grid_position_x,
        grid_position_y=grid_position_y,
        x_start=x_start,
        x_end=x_end,
        y_start=y_start,
        y_end=y_end,
    )
    meta = _metadata(metadata)
    if tenant is not None:
        try:
            check_tenant(tenant)
        except ValueError as exc:
            raise fail(str(exc)) from None
    with Producer(settings) as producer:
        if not _is_url(source):
            # Every other field first, so a typo never costs an upload; then the file itself.
            try:
                producer.validate({**request, "video_url": "https://example.com/video.mp4"})
            except InvalidRequest as exc:
                others = [(f, m) for f, m in exc.errors if f != "video_url"]
                if others:
                    raise fail(str(InvalidRequest(others))) from None
            path = Path(source)
            check_local_video(settings, path)
            request["video_url"] = _upload(settings, path)
        try:
            result = producer.enqueue_result(
                request,
                idempotency_key=idempotency_key,
                priority=priority,
                metadata=meta,
                callback_url=callback_url,
                tenant=tenant,
                dedupe=dedupe,
            )
        except (InvalidRequest, IdempotencyConflict) as exc:
            raise fail(str(exc)) from None
        job_id = result.job_id
        console.print(job_id, highlight=False)
        if result.existing:
            state = result.state.value if result.state else "record expired"
            note(
                f"idempotency_key {idempotency_key!r} returned the existing job {job_id} "
                f"(state {state}); nothing was enqueued"
            )
        if wait:
            _follow_jobs(producer, [job_id], timeout_s=timeout_s)
            job = producer.get(job_id)
            _print_outcomes([job_id], [job])
            if job is None or job.state.value != "SUCCEEDED":
                raise typer.Exit(1)


@app.command()
def quote(
    source: Annotated[
        str,
        typer.Argument(help="Video URL (http/https/data:) or a local video file (read here, not uploaded)."),
    ],
    tenant: Annotated[
        str | None, typer.Option(help="Whose budget to check (default: the `default` tenant).")
    ] = None,
    aspect_ratio: Annotated[
        str | None,
        typer.Option(
            "--aspect-ratio",
            "-a",
            help="With a URL: quote the whole request (as `enqueue` takes it), so the quote also says "
            "whether dedupe would reuse a job.",
        ),
    ] = None,
    image_url: ImageUrlOpt = None,
    prompt: PromptOpt = None,
    grid_position_x: GridXOpt = None,
    grid_position_y: GridYOpt = None,
    x_start: XStartOpt = None,
    x_end: XEndOpt = None,
    y_start: YStartOpt = None,
    y_end: YEndOpt = None,
    dedupe: DedupeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the quote as one JSON object.")] = False,
) -> None:
    """What a job would cost and whether it would be accepted now; nothing is enqueued or uploaded.

    Reads the input's duration, size and resolution (a URL through the guarded fetcher with bounded
    Range requests, a local file here), prices it as fal bills it (whole REFRAME_BILLING_UNIT_S at
    REFRAME_PRICE_PER_S_USD) and checks the model's limits (REFRAME_MAX_VIDEO_DURATION_S,
    REFRAME_MAX_UPLOAD_BYTES) and the cluster's and the tenant's budgets now. With --aspect-ratio
    (and the request's other options, as `enqueue` takes them) a URL is quoted as a whole request,
    which also says whether dedupe would reuse a job in flight or a recent success (price 0). Exit 0
    when the job would be accepted, 1 when not (the reasons say why), 2 on errors.
    """
    from producer import InvalidRequest, Producer

    settings = settings_or_exit()
    if tenant is not None:
        try:
            check_tenant(tenant)
        except ValueError as exc:
            raise fail(str(exc)) from None
    target: Any = source if _is_url(source) else Path(source)
    optional = _request_fields(
        image_url=image_url,
        prompt=prompt,
        grid_position_x=grid_position_x,
        grid_position_y=grid_position_y,
        x_start=x_start,
        x_end=x_end,
        y_start=y_start,
        y_end=y_end,
    )
    if aspect_ratio is None and optional:
        raise fail("--aspect-ratio: the request's other options quote a whole request, which needs it")
    if aspect_ratio is not None:
        if not _is_url(source):
            raise fail("--aspect-ratio: a whole request needs a video URL (a local file is quoted alone)")
        target = {"video_url": source, "aspect_ratio": aspect_ratio, **optional}
    with Producer(settings) as producer:
        try:
            found = producer.quote(target, tenant=tenant, dedupe=dedupe)
        except InvalidRequest as exc:
            raise fail(str(exc)) from None
    if as_json:
        sys.stdout.write(json.dumps(found.model_dump(mode="json"), sort_keys=True) + "\n")
    else:
        for line in _quote_lines(found):
            console.print(line, highlight=False, markup=False, soft_wrap=True)
    if not found.would_accept:
        raise typer.Exit(1)


def _money(usd: float | None) -> str:
    if usd is None:
        return "unknown"
    return f"${usd:,.2f}" if round(usd, 2) == usd else f"${usd:,.6f}".rstrip("0")


def _quote_lines(q: Any) -> list[str]:
    """A quote for people, one fact per line."""
    size = "unknown size" if q.size_bytes is None else f"{q.size_bytes:,} bytes"
    resolution = f"{q.width}x{q.height}" if q.width and q.height else "unknown resolution"
    duration = "unreadable" if q.duration_s is None else f"{q.duration_s:.2f} s"
    unit = f"whole {q.billing_unit_s:g} s units" if q.billing_unit_s > 0 else "exact seconds"
    price = (
        "unknown (duration unreadable)"
        if q.price_usd is None
        else f"{_money(q.price_usd)}  ({q.billed_s:g} s billed at {_money(q.price_per_s_usd)}/s, {unit})"
    )
    reserve = "none" if q.estimate_usd is None else f"{_money(q.estimate_usd)}  ({q.billable_s:g} s)"
    fits = {True: "yes", False: "no", None: "unknown"}
    b = q.budget
    tenant_room = (
        "no cap"
        if b.tenant_day_headroom_usd is None and b.tenant_month_headroom_usd is None
        else f"{_money(b.tenant_day_headroom_usd)} today, {_money(b.tenant_month_headroom_usd)} this month"
    )
    lines = [
        f"source        {q.source}",
        f"duration      {duration}",
        f"size          {size}",
        f"resolution    {resolution}",
        f"price         {price}",
        f"reserved      {reserve} while it runs",
        f"model limits  {fits[q.fits_model_limits]}  (at most {q.max_video_duration_s:g} s "
        f"and {q.max_upload_bytes:,} bytes)",
        f"budget now    {fits[q.fits_budget_now]}  (cluster: {_money(b.day_headroom_usd)} today, "
        f"{_money(b.month_headroom_usd)} this month; tenant {b.tenant}: {tenant_room})",
        f"would accept  {fits[q.would_accept]}",
    ]
    return lines + [f"  - {reason}" for reason in q.reasons]


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
                raise fail(f"timed out after {timeout_s:g}s", code=1)
            time.sleep(0.3)


def _print_outcomes(job_ids: Sequence[str], jobs: Sequence[Any]) -> None:
    """One line per job: state, output URL and cost, or the failure's type and message."""
    for job_id, job in zip(job_ids, jobs, strict=True):
        if job is None:
            line = f"{job_id} MISSING (record expired or never existed)"
        elif job.state.value == "SUCCEEDED":
            cost = f" cost=${job.cost_usd:.4f}" if job.cost_usd is not None else ""
            reused = f" deduped_from={job.deduped_from}" if job.deduped_from else ""
            line = f"{job_id} SUCCEEDED video_url={job.video_url}{cost}{reused}"
        else:
            error = job.error or {}
            reason = f" ({job.dead_letter_reason})" if job.dead_letter_reason else ""
            line = (
                f"{job_id} {job.state.value}{reason} error={error.get('type', '?')}: "
                f"{' '.join(str(error.get('message', '')).split())}"
            )
        console.print(line, highlight=False, soft_wrap=True, markup=False)


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
        **(
            {
                "output_copy": job.output_copy,
                "output_copy_error": job.output_copy_error,
                "output_key": job.output_key,
                "output_verify": job.output_verify,
                "output_verification": job.output_verification,
            }
            if job.output_copy
            else {}
        ),
    }


# --------------------------------------------------------------------------------------------- status
@app.command()
def status(
    job_id: Annotated[
        str | None, typer.Argument(help="A job id or unique prefix (omit with --cluster).")
    ] = None,
    cluster: Annotated[bool, typer.Option("--cluster", help="Show cluster-wide flow-control state.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --cluster: print JSON.")] = False,
) -> None:
    """Show a job's record as JSON, or the cluster's workers, limits, slots, breaker, budget and queues.

    With --cluster, the limits are those the live workers publish (not this shell's environment).
    """
    settings = settings_or_exit()
    if cluster:
        _cluster_status(settings, as_json=as_json)
        return
    if not job_id:
        raise fail("job_id: give a job id or --cluster")
    from producer import Producer

    with Producer(settings) as producer:
        (full_id,) = resolve_job_ids(settings, producer.r, [job_id])
        job = producer.get(full_id)
    if job is None:
        raise fail(f"job_id: no job {full_id}")
    console.print_json(json.dumps(_job_json(job)))


def _agreement(procs: Sequence[Any], name: str) -> tuple[Any, list[str]]:
    """The value every live worker publishes for ``name`` (None if they differ), and who says what."""
    by_value: dict[str, list[str]] = {}
    for proc in procs:
        by_value.setdefault(json.dumps(proc.info.get(name)), []).append(proc.process_id)
    if len(by_value) == 1:
        return json.loads(next(iter(by_value))), []
    return None, [f"{json.loads(v)} ({', '.join(ids)})" for v, ids in sorted(by_value.items())]


def cluster_snapshot(settings: Settings, client: redis.Redis) -> dict[str, Any]:
    """The cluster's state as the live workers and Redis report it (``status --cluster --json``)."""
    from reframe.tenant_usage import tenant_usage
    from worker.contracts.keys import Keys, celery_queue_keys
    from worker.flow import FlowControl
    from worker.presence import LIMIT_FIELDS, Presence

    keys = Keys(settings.key_prefix)
    procs = Presence.from_settings(client, settings).alive()
    limits: dict[str, Any] = {}
    disagreements: dict[str, list[str]] = {}
    for name in LIMIT_FIELDS:
        value, who = _agreement(procs, name) if procs else (None, [])
        limits[name] = value
        if who:
            disagreements[name] = who
    flow = FlowControl.from_settings(client, settings)
    budget = flow.budget.snapshot()
    tenants, tenants_not_shown = tenant_usage(client, keys)
    return {
        "workers": {
            "alive": len(procs),
            "window_ms": settings.heartbeat_ttl_ms,
            "processes": [
                {"process_id": p.process_id, "last_beat_ms": p.last_beat_ms, **p.info} for p in procs
            ],
        },
        "limits": limits,
        "disagreements": disagreements,
        "slots_in_use": flow.slots.in_use(),
        "fal_accounts": [
            {"account": a.id, "cap": a.cap, "in_use": a.in_use, "up": a.usable}
            for a in flow.accounts.status()
        ],
        "expired_leases": len(flow.slots.expired(limit=1000)),
        "waiting": flow.slots.waiting_depths(),
        "celery_queue": sum(int(client.llen(k)) for k in celery_queue_keys(settings.queue_name)),
        "deferred": int(client.zcard(keys.delayed)),
        "blocked": int(client.zcard(keys.blocked)),
        "tracked": int(client.zcard(keys.track)),
        "dead_letters": int(client.zcard(keys.dlq)),
        "paused_until_ms": flow.rate.paused_until_ms() or None,
        "breaker": {"state": (b := flow.breaker.state()).state.value, "trips": b.trips},
        "budget_usd": {
            "day_spent": budget.day_spent / 1e6,
            "day_reserved": budget.day_reserved / 1e6,
            "month_spent": budget.month_spent / 1e6,
            "month_reserved": budget.month_reserved / 1e6,
        },
        "tenants": tenants,
        "tenants_not_shown": tenants_not_shown,
    }


def _cluster_status(settings: Settings, *, as_json: bool) -> None:
    client = _redis_client(settings)
    try:
        snap = cluster_snapshot(settings, client)
    finally:
        client.close()
    if as_json:
        sys.stdout.write(json.dumps(snap, sort_keys=True) + "\n")
        return
    workers, limits = snap["workers"], snap["limits"]
    procs = workers["processes"]

    def shown(name: str, fmt: str = "{}") -> str:
        if name in snap["disagreements"]:
            return "DISAGREE: " + "; ".join(snap["disagreements"][name])
        return "?" if limits[name] is None else fmt.format(limits[name])

    table = Table(title="Reframe Cluster", show_header=True)
    table.add_column("what")
    table.add_column("value", justify="right")
    draining = sum(p.get("state") == "draining" for p in procs)
    table.add_row(
        "live workers",
        f"{workers['alive']}" + (f" ({draining} draining)" if draining else "")
        if procs
        else f"0 (no heartbeat in the last {workers['window_ms'] / 1000:g}s)",
    )
    table.add_row("slots in use / capacity", f"{snap['slots_in_use']} / {shown('max_concurrency')}")
    accounts = snap["fal_accounts"]
    if len(accounts) > 1:
        table.add_row(
            "fal accounts (in use / cap)",
            ", ".join(
                f"{a['account']} {a['in_use']}/{a['cap']}{'' if a['up'] else ' drained'}" for a in accounts
            ),
        )
    table.add_row("reserved high slots", shown("reserved_high_slots"))
    table.add_row("submit rate / burst", f"{shown('submit_rate_per_s', '{:g}/s')} / {shown('submit_burst')}")
    table.add_row("expired leases (checking fal)", str(snap["expired_leases"]))
    for prio, depth in snap["waiting"].items():
        table.add_row(f"waiting for a slot ({prio})", str(depth))
    table.add_row("celery queue (all priorities)", str(snap["celery_queue"]))
    table.add_row("deferred", str(snap["deferred"]))
    table.add_row("blocked by budget", str(snap["blocked"]))
    table.add_row("tracked at fal", str(snap["tracked"]))
    table.add_row("dead letters", str(snap["dead_letters"]))
    pause = snap["paused_until_ms"]
    table.add_row(
        "submit pause until", time.strftime("%H:%M:%S", time.gmtime(pause / 1000)) if pause else "-"
    )
    table.add_row("breaker", f"{snap['breaker']['state']} (trips {snap['breaker']['trips']})")
    b = snap["budget_usd"]
    table.add_row(
        "budget today (spent + reserved / cap)",
        f"${b['day_spent']:.2f} + ${b['day_reserved']:.2f} / {shown('budget_daily_usd', '${:.2f}')}",
    )
    table.add_row(
        "budget month (spent + reserved / cap)",
        f"${b['month_spent']:.2f} + ${b['month_reserved']:.2f} / {shown('budget_monthly_usd', '${:.2f}')}",
    )
    console.print(table)
    if not procs:
        console.print("no live workers: limits unknown (start some with `reframe worker` or `reframe up`)")
    for name, who in sorted(snap["disagreements"].items()):
        line = f"workers disagree on {name}: {'; '.join(who)}"
        console.print(line, highlight=False, soft_wrap=True, markup=False)


# --------------------------------------------------------------------------------------------- wait, cancel
@app.command("wait")
def wait_cmd(
    job_ids: Annotated[list[str], typer.Argument(help="One or more job ids (or unique prefixes).")],
    timeout_s: Annotated[
        float, typer.Option(help="Give up after this many seconds.", callback=_positive_seconds)
    ] = 900.0,
) -> None:
    """Wait for jobs to finish with live progress; then print each one's output URL and cost, or its error.

    Exit 1 unless all SUCCEEDED.
    """
    from producer import Producer

    settings = settings_or_exit()
    with Producer(settings) as producer:
        ids = resolve_job_ids(settings, producer.r, job_ids)
        _follow_jobs(producer, ids, timeout_s=timeout_s)
        jobs = producer.get_many(ids)
    _print_outcomes(ids, jobs)
    if not all(j is not None and j.state.value == "SUCCEEDED" for j in jobs):
        raise typer.Exit(1)


@app.command()
def cancel(job_id: Annotated[str, typer.Argument(help="The job to cancel (id or unique prefix).")]) -> None:
    """Cancel a job (also at fal once it was submitted)."""
    from producer import Producer

    settings = settings_or_exit()
    with Producer(settings) as producer:
        (full_id,) = resolve_job_ids(settings, producer.r, [job_id])
        outcome = producer.cancel(full_id)
    console.print(outcome.value)
    if outcome.value == "not_found":
        raise typer.Exit(1)


@app.command()
def results(
    group: Annotated[str, typer.Option(help="Consumer group name.")] = "reframe-cli",
    consumer: Annotated[str | None, typer.Option(help="Consumer name (default: hostname).")] = None,
    count: Annotated[int, typer.Option(min=0, help="Stop after this many events (0 = follow forever).")] = 0,
    block_ms: Annotated[int, typer.Option(min=1, max=3_600_000, help="How long one read blocks.")] = 1000,
) -> None:
    """Follow the result stream (consumer group), printing one JSON event per line."""
    from producer import ResultConsumer

    if not group.strip():
        raise fail("group: must not be empty")
    if consumer is not None and not consumer.strip():
        raise fail("consumer: must not be empty")
    reader = ResultConsumer(settings_or_exit(), group, consumer)
    for seen, event in enumerate(reader.follow(block_ms=block_ms), start=1):
        sys.stdout.write(json.dumps({"stream_id": event.stream_id, **event.fields}) + "\n")
        sys.stdout.flush()
        if count and seen >= count:
            return


# --------------------------------------------------------------------------------------------- dlq
@dlq_app.command("list")
def dlq_list(limit: Annotated[int, typer.Option(min=1, help="Show at most this many.")] = 100) -> None:
    """List dead-lettered jobs with their reason."""
    from producer import Producer

    settings = settings_or_exit()
    table = Table("job", "reason", "attempts", "error")
    with Producer(settings) as producer:
        for job in producer.dead_letters(limit):
            message = str((job.error or {}).get("message", ""))[:80]
            table.add_row(job.id, job.dead_letter_reason or "", str(job.attempts), message)
    console.print(table)


@dlq_app.command("show")
def dlq_show(
    job_id: Annotated[str, typer.Argument(help="A dead-lettered job (id or unique prefix).")],
) -> None:
    """Show a dead-lettered job's full record."""
    status(job_id=job_id, cluster=False, as_json=False)


@dlq_app.command("replay")
def dlq_replay(
    job_ids: Annotated[
        list[str] | None, typer.Argument(help="Jobs to replay (ids or unique prefixes).")
    ] = None,
    all_jobs: Annotated[bool, typer.Option("--all", help="Replay every dead-lettered job.")] = False,
    force_pay_twice: Annotated[
        bool,
        typer.Option(
            "--force-pay-twice",
            help="Also replay jobs whose death may have been paid for at fal (an ambiguous submit, "
            "a result that could not be read): fal may bill the same work twice.",
        ),
    ] = False,
) -> None:
    """Send dead-lettered jobs back to QUEUED (a new life); exit 1 if one was not replayed.

    A job that fal may already have run and billed is refused unless --force-pay-twice is given.
    """
    from producer import Producer, ReplayOutcome

    settings = settings_or_exit()
    if not job_ids and not all_jobs:
        raise fail("job_ids: name jobs or pass --all")
    with Producer(settings) as producer:
        if job_ids:
            ids = resolve_job_ids(settings, producer.r, job_ids)
        else:
            ids = [job.id for job in producer.dead_letters(100_000)]
        missed = 0
        for job_id in ids:
            outcome = producer.replay(job_id, force=force_pay_twice)
            missed += outcome is not ReplayOutcome.REPLAYED
            if outcome is ReplayOutcome.NEEDS_FORCE:
                console.print(
                    f"{job_id} not replayed: fal may already hold and bill its request "
                    "(replaying may pay twice); pass --force-pay-twice to accept that"
                )
            else:
                console.print(
                    f"{job_id} {'replayed' if outcome is ReplayOutcome.REPLAYED else outcome.value}"
                )
    if missed:
        raise typer.Exit(1)


@dlq_app.command("purge")
def dlq_purge(yes: Annotated[bool, typer.Option("--yes", help="Confirm.")] = False) -> None:
    """Remove every job from the dead-letter set (records expire on their own)."""
    from producer import Producer

    if not yes:
        raise fail("purge: pass --yes to confirm")
    settings = settings_or_exit()
    with Producer(settings) as producer:
        console.print(f"purged {producer.purge_dead_letters()}")


# --------------------------------------------------------------------------------------------- callbacks
@callbacks_app.command("list")
def callbacks_list(limit: Annotated[int, typer.Option(min=1, help="Show at most this many.")] = 100) -> None:
    """List callbacks given up after their retry window (REFRAME_CALLBACK_RETRY_WINDOW_S)."""
    from producer import Producer

    settings = settings_or_exit()
    table = Table("event", "job", "url", "tries", "last error")
    with Producer(settings) as producer:
        for entry in producer.failed_callbacks(limit):
            table.add_row(
                entry["event_id"],
                entry.get("job_id", ""),
                entry.get("url", "")[:60],
                entry.get("attempts", ""),
                entry.get("last_error", ""),
            )
    console.print(table)


@callbacks_app.command("redeliver")
def callbacks_redeliver(
    event_ids: Annotated[list[str] | None, typer.Argument(help="Event ids (<job id>.<life>).")] = None,
    all_events: Annotated[bool, typer.Option("--all", help="Redeliver every given-up callback.")] = False,
) -> None:
    """Put given-up callbacks back in the outbox (delivered again, with a fresh retry window)."""
    from producer import Producer

    settings = settings_or_exit()
    if not event_ids and not all_events:
        raise fail("event_ids: name events or pass --all")
    with Producer(settings) as producer:
        ids = event_ids or [e["event_id"] for e in producer.failed_callbacks(100_000)]
        missed = 0
        for event_id in ids:
            ok = producer.redeliver_callback(event_id)
            missed += not ok
            console.print(f"{event_id} {'queued for delivery' if ok else 'unknown or expired'}")
    if missed:
        raise typer.Exit(1)


# --------------------------------------------------------------------------------------------- outputs
def _output_store(settings: Settings) -> Any:
    from worker.output_store import OutputStoreError, from_settings

    try:
        store = from_settings(settings)
    except (ValueError, OutputStoreError, OSError) as exc:
        raise fail(f"REFRAME_OUTPUT_STORE_URL: {exc}") from None
    if store is None:
        raise fail("REFRAME_OUTPUT_STORE_URL: the output store is off")
    return store


@outputs_app.command("url")
def outputs_url(
    job_id: Annotated[str, typer.Argument(help="Job id (or a unique prefix).")],
    expires_s: Annotated[
        int | None,
        typer.Option("--expires-s", min=1, help="Life of the URL (REFRAME_OUTPUT_PRESIGN_EXPIRY_S)."),
    ] = None,
) -> None:
    """Print a URL of a job's stored output: presigned (S3) or file:// (local store)."""
    from worker.output_ops import OutputOps
    from worker.output_store import OutputStoreError

    settings = settings_or_exit()
    store = _output_store(settings)
    client = _redis_client(settings)
    try:
        (full,) = resolve_job_ids(settings, client, [job_id])
        key = OutputOps(client, Keys(settings.key_prefix)).stored_key(full)
    finally:
        client.close()
    if not key:
        raise fail(f"job_id: the output of {full} is not in the store (see `reframe status {full}`)")
    try:
        url = store.url(key, expires_s=expires_s or settings.output_presign_expiry_s)
    except OutputStoreError as exc:
        raise fail(f"output store: {exc}") from None
    print(url)


@outputs_app.command("retry")
def outputs_retry(
    job_ids: Annotated[list[str] | None, typer.Argument(help="Job ids (or unique prefixes).")] = None,
    failed: Annotated[bool, typer.Option("--failed", help="Retry every given-up copy.")] = False,
) -> None:
    """Copy given-up outputs again (from fal's URL, while fal keeps the file); never submits to fal."""
    from worker.output_ops import OutputOps

    settings = settings_or_exit()
    if not job_ids and not failed:
        raise fail("job_ids: name jobs or pass --failed")
    client = _redis_client(settings)
    try:
        ops = OutputOps(client, Keys(settings.key_prefix))
        if failed:
            event_ids = [c.event_id for c in ops.failed(100_000)]
        else:
            event_ids = [ops.event_id_of(j) for j in resolve_job_ids(settings, client, job_ids or [])]
        missed = 0
        for event_id in event_ids:
            ok = bool(event_id) and ops.retry(event_id)
            missed += not ok
            console.print(f"{event_id or '?'} {'queued for copy' if ok else 'not a given-up copy'}")
    finally:
        client.close()
    if missed:
        raise typer.Exit(1)


@outputs_app.command("failed")
def outputs_failed(limit: Annotated[int, typer.Option(min=1, help="Show at most this many.")] = 100) -> None:
    """List output copies given up after REFRAME_OUTPUT_COPY_WINDOW_S (or fal's file gone)."""
    from worker.output_ops import OutputOps

    settings = settings_or_exit()
    client = _redis_client(settings)
    try:
        rows = OutputOps(client, Keys(settings.key_prefix)).failed(limit)
    finally:
        client.close()
    table = Table("event", "job", "given up", "last error")
    for row in rows:
        given_up = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row.failed_at_ms / 1000))
        table.add_row(row.event_id, row.job_id, given_up, row.error)
    console.print(table)


@outputs_app.command("cleanup")
def outputs_cleanup(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what would be deleted; delete nothing.")
    ] = False,
) -> None:
    """Delete stored outputs older than REFRAME_OUTPUT_RETENTION_DAYS."""
    from worker.output_ops import cleanup
    from worker.output_store import OutputStoreError, utcnow

    settings = settings_or_exit()
    store = _output_store(settings)
    try:
        gone = cleanup(
            store, now=utcnow(), retention_s=settings.output_retention_days * 86400, dry_run=dry_run
        )
    except OutputStoreError as exc:
        raise fail(f"output store: {exc}") from None
    for obj in gone:
        verb = "would delete" if dry_run else "deleted"
        print(f"{verb} {obj.key} ({obj.size} bytes, {obj.last_modified:%Y-%m-%dT%H:%M:%SZ})")
    done = "past" if dry_run else "deleted past"
    console.print(f"{len(gone)} output(s) {done} {settings.output_retention_days:g} days")


# --------------------------------------------------------------------------------------------- costs
def _window(since: str | None, until: str | None) -> tuple[int | None, int | None]:
    """``--since``/``--until`` as epoch ms (since inclusive, until exclusive); exit 2 when bad."""
    try:
        since_ms = parse_when(since, "--since") if since is not None else None
        until_ms = parse_when(until, "--until") if until is not None else None
    except ValueError as exc:
        raise fail(str(exc)) from None
    if since_ms is not None and until_ms is not None and since_ms >= until_ms:
        raise fail(f"--until: {until!r} is not after --since {since!r}")
    return since_ms, until_ms


def _write_csv(rows: Sequence[Sequence[Any]]) -> None:
    import csv

    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerows(rows)
    sys.stdout.flush()


SINCE_HELP = "From this UTC time on (inclusive): YYYY-MM-DD, YYYY-MM or ISO 8601."
UNTIL_HELP = "Before this UTC time (exclusive): YYYY-MM-DD, YYYY-MM or ISO 8601."


@costs_app.callback()
def costs(
    ctx: typer.Context,
    by: Annotated[GroupBy, typer.Option(help="Group by tenant, UTC day or UTC month.")] = GroupBy.TENANT,
    since: Annotated[str | None, typer.Option(help=SINCE_HELP)] = None,
    until: Annotated[str | None, typer.Option(help=UNTIL_HELP)] = None,
    as_csv: Annotated[
        bool, typer.Option("--csv", help="Print CSV (exact dollars) instead of a table.")
    ] = False,
) -> None:
    """Spend from the cost ledger: dollars charged, seconds fal billed and jobs, per group."""
    if ctx.invoked_subcommand is not None:
        return
    since_ms, until_ms = _window(since, until)
    settings = settings_or_exit()
    client = _redis_client(settings)
    try:
        report = cost_report(
            client, Keys(settings.key_prefix).ledger, by.value, since_ms=since_ms, until_ms=until_ms
        )
    except LedgerError as exc:
        raise fail(str(exc), code=1) from None
    finally:
        client.close()
    rows = report_csv_rows(report)
    if as_csv:
        _write_csv(rows)
        return
    table = Table(*("dollars" if c == "usd" else c for c in rows[0]))
    for row in rows[1:]:
        table.add_row(*row, style="bold" if row[0] == "total" else None)
    console.print(table)


@costs_app.command("reconcile")
def costs_reconcile(
    usage_file: Annotated[
        Path, typer.Argument(metavar="FILE", help="fal's usage export: CSV of billing events, or its JSON.")
    ],
    since: Annotated[str | None, typer.Option(help=SINCE_HELP)] = None,
    until: Annotated[str | None, typer.Option(help=UNTIL_HELP)] = None,
    endpoint: Annotated[
        str | None, typer.Option(help="Only billing events of this endpoint (default REFRAME_FAL_MODEL_ID).")
    ] = None,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print the differences as CSV.")] = False,
) -> None:
    """Compare the ledger with fal's billed usage request by request; exit 1 when anything differs.

    Lists every request charged in one and not the other, or with other billed seconds or dollars,
    and every charge without a fal request id. Give the window the export covers.
    """
    since_ms, until_ms = _window(since, until)
    try:
        text = sys.stdin.read() if str(usage_file) == "-" else usage_file.read_text(encoding="utf-8")
        events = parse_usage(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise fail(
            f"FILE: cannot read {str(usage_file)!r} ({getattr(exc, 'strerror', None) or exc})"
        ) from None
    except UsageError as exc:
        raise fail(f"FILE: {exc}") from None
    settings = settings_or_exit()
    slack_ms = 86_400_000  # a request billed near a bound may be settled on the other side of it
    client = _redis_client(settings)
    try:
        entries = list(
            read_entries(
                client,
                Keys(settings.key_prefix).ledger,
                since_ms=None if since_ms is None else since_ms - slack_ms,
                until_ms=None if until_ms is None else until_ms + slack_ms,
            )
        )
    except LedgerError as exc:
        raise fail(str(exc), code=1) from None
    finally:
        client.close()
    result = reconcile(
        entries, events, endpoint_id=endpoint or settings.fal_model_id, since_ms=since_ms, until_ms=until_ms
    )
    rows = [[d.as_dict()[c] for c in DIFFERENCE_COLUMNS] for d in result.differences]
    summary = (
        f"{result.requests} requests compared: ledger ${micro_usd_text(result.ledger_micro)}, "
        f"fal ${micro_usd_text(result.fal_micro)}; {len(result.differences)} differences"
        + (f"; {result.ignored_events} billing events of other endpoints or outside the window ignored"
           if result.ignored_events else "")
    )  # fmt: skip
    if as_csv:
        _write_csv([list(DIFFERENCE_COLUMNS), *rows])
        note(summary)
    else:
        if rows:
            table = Table()
            for column in DIFFERENCE_COLUMNS:  # ids and amounts are shown whole, folded if need be
                table.add_column(column.replace("_usd", " $").replace("_billed_s", " s"), overflow="fold")
            for row in rows:
                table.add_row(*row)
            console.print(table)
        console.print(summary, highlight=False)
    if result.differences:
        raise typer.Exit(1)


def micro_usd_text(micro: Any) -> str:
    """Micro-dollars as exact dollars (6 decimals)."""
    return format(micro_usd(micro), "f")


# --------------------------------------------------------------------------------------------- processes
def check_port_free(host: str, port: int) -> None:
    """Exit 2 naming REFRAME_METRICS_PORT if ``host:port`` cannot be bound (in use, or not ours)."""
    if not port:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the metrics server binds
        try:
            sock.bind((host, port))
        except OSError as exc:
            why = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
            raise fail(f"REFRAME_METRICS_PORT: {host}:{port} {why}") from None


def check_redis(settings: Settings) -> None:
    """PING Redis once (auth included) and judge what it promises about keeping writes
    (worker/contracts/redis_promise.py): with ``REFRAME_PRODUCTION`` a risk ends the command with a
    one-line reason, otherwise each risk is noted once. Errors end the command through :func:`run`."""
    client = redis_client(settings, socket_timeout=5, socket_connect_timeout=5)
    try:
        client.ping()
        found = risks(read_promise(client), min_replicas=settings.redis_min_replicas)
    finally:
        client.close()
    if found and settings.production:
        raise fail(
            "REFRAME_PRODUCTION: this Redis cannot keep the no-double-pay promise: " + "; ".join(found)
        )
    for risk in found:
        note(f"Redis durability risk (refused with REFRAME_PRODUCTION=true): {risk}")


@app.command()
def worker(
    concurrency: Annotated[
        int | None, typer.Option(min=1, max=1024, help="Threads (default REFRAME_WORKER_CONCURRENCY).")
    ] = None,
    hostname: Annotated[str | None, typer.Option(help="Celery node name.")] = None,
) -> None:
    """Run a Celery worker (threads pool) with the completion tracker, housekeeper and /metrics."""
    from reframe.logs import setup_logging
    from worker.app import run_worker

    overrides: dict[str, Any] = {"worker_concurrency": concurrency} if concurrency is not None else {}
    settings = settings_or_exit(require_fal_key=True, **overrides)
    check_port_free(settings.metrics_host, settings.metrics_port)
    check_redis(settings)
    setup_logging(settings)
    run_worker(settings, hostname=hostname)


@app.command()
def exporter(
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="Port (default REFRAME_METRICS_PORT).")
    ] = None,
) -> None:
    """Serve cluster-wide gauges (queues, slots, budget, breaker) on /metrics; run exactly one.

    Starts even while Redis is down: reporting the outage is part of its job.
    """
    from reframe.exporter import run_exporter
    from reframe.logs import setup_logging

    overrides: dict[str, Any] = {"metrics_port": port} if port is not None else {}
    settings = settings_or_exit(**overrides)
    check_port_free(settings.metrics_host, settings.metrics_port)
    setup_logging(settings)
    run_exporter(settings)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default REFRAME_API_HOST).")] = None,
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="Port (default REFRAME_API_PORT).")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, max=64, help="uvicorn processes (default REFRAME_API_WORKERS).")
    ] = None,
) -> None:
    """Serve the HTTP API (FastAPI on uvicorn): jobs, dead letters, quotes, uploads, /metrics."""
    from reframe.api.server import serve as serve_api
    from reframe.logs import setup_logging

    settings = settings_or_exit()
    bind_host = host or settings.api_host
    bind_port = port or settings.api_port
    family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((bind_host, bind_port))
        except OSError as exc:
            why = exc.strerror or type(exc).__name__
            raise fail(f"REFRAME_API_PORT: {bind_host}:{bind_port} cannot be bound ({why})") from None
    check_redis(settings)
    setup_logging(settings)
    serve_api(settings, host=bind_host, port=bind_port, workers=workers or settings.api_workers)


def _key_store(settings: Settings) -> Any:
    from reframe.api.keys import KeyStore

    return KeyStore(_redis_client(settings), prefix=settings.key_prefix)


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="The tenant the key acts for (a-z, 0-9, _ and -).")],
    scope: Annotated[list[str], typer.Option("--scope", help="enqueue, read or admin; repeatable.")],
    label: Annotated[str, typer.Option(help="A note shown by `reframe keys list`.")] = "",
    rate_per_s: Annotated[
        float | None, typer.Option(help="Requests per second (default REFRAME_API_RATE_PER_S).")
    ] = None,
    burst: Annotated[
        int | None, typer.Option(min=1, help="Back-to-back requests (default REFRAME_API_RATE_BURST).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (id, token, tenant, scopes).")] = False,
) -> None:
    """Create an API key; its token is printed once and cannot be shown again."""
    settings = settings_or_exit()
    try:
        token, info = _key_store(settings).create(
            tenant, scope, label=label, rate_per_s=rate_per_s, burst=burst
        )
    except ValueError as exc:
        message = str(exc).replace("is not a valid Scope", "is not a scope (enqueue, read, admin)")
        raise fail(message) from None
    if as_json:
        print(json.dumps({**info.as_dict(), "token": token}))
        return
    console.print(f"key {info.key_id} for tenant {info.tenant} ({', '.join(info.scopes)})", highlight=False)
    console.print("token (shown once, store it now):", highlight=False)
    print(token)


@keys_app.command("list")
def keys_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False) -> None:
    """Every API key (never the tokens): id, tenant, scopes, created, revoked."""
    settings = settings_or_exit()
    infos = _key_store(settings).list()
    if as_json:
        for info in infos:
            print(json.dumps(info.as_dict()))
        return
    table = Table("id", "tenant", "scopes", "created", "revoked", "label")
    for info in infos:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(info.created_at_ms / 1000))
        revoked = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(info.revoked_at_ms / 1000))
            if info.revoked_at_ms
            else ""
        )
        table.add_row(info.key_id, info.tenant, ",".join(info.scopes), created, revoked, escape(info.label))
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key id (from `reframe keys list`).")],
) -> None:
    """Revoke an API key: it is refused from the next request on."""
    settings = settings_or_exit()
    if not _key_store(settings).revoke(key_id.strip()):
        raise fail(f"key_id: no key {key_id}")
    console.print(f"revoked key {key_id.strip()}", highlight=False)


def _tenant_registry(settings: Settings) -> TenantRegistry:
    return TenantRegistry(_redis_client(settings), Keys(settings.key_prefix))


def _tenant_name(tenant: str) -> str:
    try:
        return check_tenant(tenant)
    except ValueError as exc:
        raise fail(str(exc)) from None


_UNSET = "none"


def _limit(name: str, raw: str | None, old: float | None, kind: type) -> Any:
    """A limit option: absent keeps the old value, ``none`` clears it, else a number."""
    if raw is None:
        return old
    if raw.strip().lower() == _UNSET:
        return None
    try:
        return kind(raw)
    except ValueError:
        raise fail(f"{name}: {raw!r} is not a number (or 'none' to clear it)") from None


@tenants_app.command("set")
def tenants_set(
    tenant: Annotated[str, typer.Argument(help="The tenant (a-z, 0-9, _ and -).")],
    daily_budget_usd: Annotated[str | None, typer.Option(help="Dollars per UTC day; 'none' clears.")] = None,
    monthly_budget_usd: Annotated[
        str | None, typer.Option(help="Dollars per UTC month; 'none' clears.")
    ] = None,
    max_concurrent: Annotated[
        str | None, typer.Option(help="Most concurrent fal requests; 'none' clears.")
    ] = None,
    weight: Annotated[str | None, typer.Option(help="Fair-share weight of the slots (default 1).")] = None,
    submit_rate_per_s: Annotated[
        str | None, typer.Option(help="Most submits per second; 'none' clears.")
    ] = None,
    dedupe: Annotated[
        str | None,
        typer.Option(help="on | off: pay once for identical work unless a request says; 'none' clears."),
    ] = None,
) -> None:
    """Set a tenant's limits (options not given keep their value); workers apply them at once."""
    settings = settings_or_exit()
    name = _tenant_name(tenant)
    registry = _tenant_registry(settings)
    old = registry.get(name)
    try:
        limits = TenantLimits(
            daily_budget_usd=_limit("daily_budget_usd", daily_budget_usd, old.daily_budget_usd, float),
            monthly_budget_usd=_limit(
                "monthly_budget_usd", monthly_budget_usd, old.monthly_budget_usd, float
            ),
            max_concurrent=_limit("max_concurrent", max_concurrent, old.max_concurrent, int),
            weight=_weight(_limit("weight", weight, old.weight, float)),
            submit_rate_per_s=_limit("submit_rate_per_s", submit_rate_per_s, old.submit_rate_per_s, float),
            dedupe=_switch("dedupe", dedupe, old.dedupe),
        )
        registry.set(name, limits)
    except ValueError as exc:
        raise fail(str(exc)) from None
    console.print(f"tenant {name}: {_describe_limits(limits)}", highlight=False)


def _switch(name: str, raw: str | None, old: bool | None) -> bool | None:
    """An on/off option: absent keeps the old value, ``none`` clears it."""
    if raw is None:
        return old
    choice = {"on": True, "off": False, _UNSET: None}
    value = raw.strip().lower()
    if value not in choice:
        raise fail(f"{name}: {raw!r} must be on, off or none")
    return choice[value]


def _shown_limit(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}"


def _weight(value: float | None) -> float:
    return 1.0 if value is None else value  # 'none' restores the default weight


def _describe_limits(limits: TenantLimits) -> str:
    parts = []
    for field_name in LIMIT_FIELDS:
        value = getattr(limits, field_name)
        parts.append(f"{field_name}={_shown_limit(value)}")
    return " ".join(parts)


def _tenant_row(settings: Settings, name: str) -> dict[str, Any]:
    limits = _tenant_registry(settings).get(name)
    spend = FlowControl.from_settings(_redis_client(settings), settings).budget.tenant_spend(name)
    return {"tenant": name, **{f: getattr(limits, f) for f in LIMIT_FIELDS}, **spend}


@tenants_app.command("show")
def tenants_show(
    tenant: Annotated[str, typer.Argument(help="The tenant.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """A tenant's limits and today's and this month's spend and reservations (dollars)."""
    settings = settings_or_exit()
    row = _tenant_row(settings, _tenant_name(tenant))
    if as_json:
        print(json.dumps(row))
        return
    for key, value in row.items():
        console.print(f"{key}: {'-' if value is None else value}", highlight=False)


@tenants_app.command("list")
def tenants_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False) -> None:
    """Every tenant with limits, with today's spend."""
    settings = settings_or_exit()
    rows = [_tenant_row(settings, name) for name in _tenant_registry(settings).names()]
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return
    table = Table("tenant", *LIMIT_FIELDS, "day_spent_usd", "day_reserved_usd")
    for row in rows:
        cells = [_shown_limit(row[f]) for f in LIMIT_FIELDS]
        table.add_row(row["tenant"], *cells, f"{row['day_spent_usd']:.2f}", f"{row['day_reserved_usd']:.2f}")
    console.print(table)


@accounts_app.command("list")
def accounts_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False) -> None:
    """Every fal account: its cap, slots held now, whether it takes new work, and its budget (spent
    today / this month, reserved, caps; dollars); never its key."""
    settings = settings_or_exit()
    rows = [
        {
            "account": a.id,
            "cap": a.cap,
            "in_use": a.in_use,
            "up": a.usable,
            "drain_reason": a.drain_reason or None,
            "drained_until_ms": a.drained_until_ms or None,
            "budget_full": a.budget_full,
            "day_spent_usd": micro_to_usd(a.day_spent_micro),
            "month_spent_usd": micro_to_usd(a.month_spent_micro),
            "reserved_usd": micro_to_usd(a.reserved_micro),
            "daily_cap_usd": None if a.day_cap_micro is None else micro_to_usd(a.day_cap_micro),
            "monthly_cap_usd": None if a.month_cap_micro is None else micro_to_usd(a.month_cap_micro),
        }
        for a in FlowControl.from_settings(_redis_client(settings), settings).accounts.status()
    ]
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return

    def spent(row: dict[str, Any], period: str, cap: str) -> str:
        limit = row[cap]
        return f"{row[period]:.2f}" + ("" if limit is None else f" / {limit:.2f}")

    table = Table("account", "cap", "in use", "up", "drained", "day $ / cap", "month $ / cap", "reserved $")
    for row in rows:
        why = [str(row["drain_reason"])] if row["drain_reason"] else []
        if row["budget_full"]:
            why.append("budget")
        if not row["up"] and not why:
            why.append("breaker")
        table.add_row(
            str(row["account"]),
            str(row["cap"]),
            str(row["in_use"]),
            "yes" if row["up"] else "no",
            ",".join(why) or "-",
            spent(row, "day_spent_usd", "daily_cap_usd"),
            spent(row, "month_spent_usd", "monthly_cap_usd"),
            f"{row['reserved_usd']:.2f}",
        )
    console.print(table)


@accounts_app.command("undrain")
def accounts_undrain(account: Annotated[str, typer.Argument(help="The account id.")]) -> None:
    """Let a drained account take new work again (after fixing its key in REFRAME_FAL_ACCOUNT_KEYS)."""
    settings = settings_or_exit()
    pool = FlowControl.from_settings(_redis_client(settings), settings).accounts
    try:
        was = pool.undrain(account)
    except UnknownAccount:
        raise fail(f"account {account!r} is not in REFRAME_FAL_ACCOUNTS") from None
    console.print(f"account {account}: {'undrained' if was else 'was not drained'}", highlight=False)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,  # `--help` goes to the emulator's own parser, which lists every option
)
def emulator(ctx: typer.Context) -> None:
    """Run the fal emulator (`reframe emulator --help` lists its options: --host, --port, ...)."""
    # The production image carries falemu's code (one wheel) but not the extra's dependencies
    # (Dockerfile, target `emulator`): say so up front, not at the first reframed video.
    if importlib.util.find_spec("imageio_ffmpeg") is None:
        raise fail("emulator: install the extra: pip install 'reframe-cluster[emulator]'")
    try:
        from falemu import cli_main
    except ImportError:
        raise fail("emulator: install the extra: pip install 'reframe-cluster[emulator]'") from None
    raise typer.Exit(cli_main(list(ctx.args)) or 0)


@app.command()
def demo(
    output_dir: Annotated[Path, typer.Option(help="Where the reframed videos go.")] = Path("reframe-output"),
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep the cluster and its console up after the jobs (Ctrl-C).")
    ] = False,
    aspect_ratios: Annotated[str, typer.Option(help="Comma-separated targets.")] = "9:16,1:1,4:3",
    timeout_s: Annotated[
        float, typer.Option(help="Give up after this many seconds.", callback=_positive_seconds)
    ] = 300.0,
) -> None:
    """Start Redis, the fal emulator and a worker; reframe a sample video; download; shut down."""
    from reframe.demo import run_demo
    from reframe.localproc import NoRedisServerError

    try:
        code = run_demo(
            output_dir=output_dir,
            aspect_ratios=[a.strip() for a in aspect_ratios.split(",") if a.strip()],
            timeout_s=timeout_s,
            console=console,
            keep=keep,
        )
    except NoRedisServerError as exc:  # the production image has no embedded Redis
        raise fail(f"demo: {exc}") from None
    raise typer.Exit(code)


class _StopSignal(BaseException):
    """Raised by the SIGINT/SIGTERM handler of ``reframe up``."""


#: Variables ``reframe up`` sets itself; the caller's values would point the cluster elsewhere.
_UP_OWNED_VARS = {
    "REFRAME_REDIS_URL",
    "REFRAME_FAL_QUEUE_URL",
    "REFRAME_FAL_REST_URL",
    "REFRAME_FAL_CDN_URL",
    "REFRAME_METRICS_PORT",
    "FAL_KEY",
}


@app.command()
def up(
    workers: Annotated[int, typer.Option(min=1, max=32, help="Worker processes.")] = 2,
    workdir: Annotated[
        Path | None, typer.Option(help="Logs and Redis files (default: a new temporary directory).")
    ] = None,
    processing_time_s: Annotated[
        float, typer.Option(help="Emulated fal processing time per job.", callback=_positive_seconds)
    ] = 2.0,
    fal_concurrency: Annotated[int, typer.Option(min=1, max=1000, help="Emulated fal account limit.")] = 4,
) -> None:
    """Run a local cluster in the foreground: Redis, the fal emulator, N workers, the exporter and
    `reframe serve` with the operator console.

    Prints the console link (an admin key made for this cluster rides in its #fragment), the URLs
    and the variables to export in another shell (then `reframe enqueue ...` works there); Ctrl-C
    or SIGTERM stops every process and exits 0. Other REFRAME_* variables of this shell (e.g.
    REFRAME_MAX_CONCURRENCY) are passed to the workers.
    """
    from reframe.localcluster import LocalCluster, start_cluster
    from reframe.localproc import NoRedisServerError

    settings_or_exit()  # the caller's own settings must be valid before anything starts
    passed = {k: v for k, v in settings_environment().items() if k.upper() not in _UP_OWNED_VARS}
    root = workdir or Path(tempfile.mkdtemp(prefix="reframe-up-"))

    def on_signal(signum: int, _frame: Any) -> None:
        raise _StopSignal(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    cluster: LocalCluster | None = None
    try:
        try:
            err_console.print(f"starting Redis, the fal emulator, {workers} workers and the exporter ...")
            cluster = start_cluster(
                root,
                workers=workers,
                emulator_concurrency=fal_concurrency,
                emulator_processing_time_s=processing_time_s,
                env=passed,
            )
            exporter_proc = cluster.start_exporter()
            console_link = cluster.open_console()
            sys.stdout.write(_up_summary(cluster, exporter_proc.metrics_url, root, console_link))
            sys.stdout.flush()
            reported: set[str] = set()
            while True:
                time.sleep(1.0)
                for proc in [*(w.process for w in cluster.workers), *cluster.extra]:
                    if not proc.alive() and proc.name not in reported:
                        reported.add(proc.name)
                        note(f"{proc.name} exited with {proc.popen.returncode}; log: {proc.log_path}")
        except _StopSignal:
            pass
        except NoRedisServerError as exc:  # the production image has no embedded Redis
            raise fail(f"up: {exc}") from None
    finally:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the clean-up
        if cluster is not None:
            err_console.print("stopping ...")
            cluster.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    err_console.print("stopped")


def _up_summary(cluster: Any, exporter_url: str, root: Path, console_link: str) -> str:
    env = dict(cluster.env)
    lines = [
        "Reframe Cluster is up (Ctrl-C stops everything)",
        f"  console       {console_link}",
        f"  http api      {cluster.api_url}/v1 (OpenAPI at {cluster.api_url}/openapi.json)",
        f"  redis         {cluster.redis_url}",
        f"  fal emulator  {cluster.fal_url}",
        *(f"  {w.process.name:<13} {w.metrics_url}/metrics" for w in cluster.workers),
        f"  exporter      {exporter_url}/metrics",
        f"  logs          {root}",
        "  pids          "
        + " ".join(
            str(p.pid)
            for p in [
                *([cluster.redis.process] if cluster.redis else []),
                *([cluster.emulator] if cluster.emulator else []),
                *(w.process for w in cluster.workers),
                *cluster.extra,
            ]
        ),
        "In another shell:",
        *(f"  export {k}={v}" for k, v in sorted(env.items())),
        "  reframe enqueue ./clip.mp4 -a 9:16 --wait",
        "  reframe status --cluster",
        '  celery --broker "$REFRAME_REDIS_URL" -A worker.app flower   # Flower (pip install flower)',
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- entry
def _redis_error_message(exc: redis.RedisError) -> str:
    settings = _invocation.settings
    where = redact_url(settings.redis_url) if settings else "Redis"
    url_var, auth_var = "REFRAME_REDIS_URL", "REFRAME_REDIS_URL"
    if settings and settings.sentinel_addresses:
        # with Sentinel the URL's host is not used: name what is
        where = f"the primary {settings.redis_master_name!r} of the Sentinels {settings.redis_sentinels}"
        url_var, auth_var = "REFRAME_REDIS_SENTINELS", "REFRAME_REDIS_PASSWORD"
    detail = _scrub(str(exc)) or type(exc).__name__
    if isinstance(exc, MasterNotFoundError):  # its text is the repr of every Sentinel client tried
        detail = "no Sentinel answered with a primary of that name"
    text = str(exc).upper()
    if isinstance(exc, redis.AuthenticationError) or "NOAUTH" in text or "WRONGPASS" in text:
        return f"{auth_var}: authentication failed at {where} ({detail})"
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        return f"{url_var}: cannot reach {where} ({detail})"
    return f"redis: {type(exc).__name__} at {where} ({detail})"


def run(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``) and return the exit status.

    Every failure ends here as one line on stderr: usage errors, settings, Redis, ports: 2;
    anything unexpected: 1 (type and message, no traceback).
    """
    global _invocation  # noqa: PLW0603 - per-run state, reset on every call (tests run in-process)
    _invocation = _Invocation()
    command = typer.main.get_command(app)
    try:
        rv = command.main(
            args=list(sys.argv[1:] if argv is None else argv), prog_name="reframe", standalone_mode=False
        )
    except typer.Exit as exc:
        return int(exc.exit_code)
    except typer.Abort:
        fail("aborted")
        return EXIT_USAGE
    except typer.TyperException as exc:  # typer's (vendored) click usage errors
        if type(exc).__name__ == "NoArgsIsHelpError":  # `reframe` or `reframe dlq` alone: the help
            ctx = getattr(exc, "ctx", None)
            err_console.print(ctx.get_help() if ctx else "", highlight=False, markup=False)
            return EXIT_USAGE
        format_message = getattr(exc, "format_message", None)
        fail(format_message() if callable(format_message) else str(exc))
        return EXIT_USAGE
    except NotReplicated as exc:
        fail(str(exc), code=EXIT_NOT_REPLICATED)
        return EXIT_NOT_REPLICATED
    except redis.RedisError as exc:
        fail(_redis_error_message(exc))
        return EXIT_USAGE
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            fail(f"REFRAME_METRICS_PORT: address in use ({exc.strerror})")
            return EXIT_USAGE
        fail(f"{type(exc).__name__}: {exc}", code=1)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - the promise is one line, never a traceback
        fail(f"{type(exc).__name__}: {exc}", code=1)
        return 1
    return rv if isinstance(rv, int) else 0


def main() -> None:
    """Console-script entry point."""
    sys.exit(run())


if __name__ == "__main__":
    main()
