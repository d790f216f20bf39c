"""The one settings object of Reframe Cluster.

Every field is also an environment variable: ``REFRAME_<FIELD_NAME>`` (upper case), except the
fal key, which is read from ``FAL_KEY`` exactly as fal's own tools read it. Durations and sizes
carry their unit in the name (``_s``, ``_ms``, ``_bytes``, ``_usd``).

Nothing is read at import time: call :func:`load_settings` once at start-up (the CLI and the worker
do), and pass the object down. This module is the only place that reads the process environment.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from config.accounts import (
    AccountSpec,
    check_keys,
    keyless_problem,
    parse_account_keys,
    parse_accounts,
    pool_specs,
)

ENV_PREFIX = "REFRAME_"
FAL_KEY_ENV = "FAL_KEY"

NonNegFloat = Annotated[float, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]


class SettingsError(ValueError):
    """Raised when the environment does not describe a valid configuration.

    The message names every offending environment variable, one per line.
    """


class AmbiguousSubmitPolicy(StrEnum):
    """What to do with a submit whose outcome is unknown (fal may or may not have the request)."""

    DEAD_LETTER = "dead_letter"
    """Never risk a second charge: park the job in the dead-letter set for an operator."""
    RESUBMIT = "resubmit"
    """Accept a bounded risk of paying twice: submit again (counted, budget reserved again)."""


#: Outside Prometheus' exporter range 9100-9999 (fully allocated; 9100 is node_exporter), Kubernetes'
#: 10250-10259 and Istio's 15000s, so a worker never collides with a node's usual exporters.
DEFAULT_METRICS_PORT = 17300
#: Largest spend cap: 1e9 USD = 1e15 micro-dollars, exact in a double.
MAX_BUDGET_USD = 1e9
#: Least gap between the task time limit (worker/watchdog.py ends the process then) and the
#: visibility timeout, so a hung task's process is gone before Redis redelivers its message.
TASK_DEADLINE_MARGIN_S = 5.0

_ALLOW_HOST = re.compile(r"(\*\.)?[a-z0-9_-]{1,63}(\.[a-z0-9_-]{1,63})*")

REAL_FAL_HOST_SUFFIXES = ("fal.run", "fal.ai", "fal.media", "falrun.com")


class UnknownDurationPolicy(StrEnum):
    """What to do with an input whose duration cannot be read before the submit."""

    REFUSE = "refuse"
    """Fail the job before any fal call: without a duration no reservation is an upper bound."""
    RESERVE_MAX = "reserve_max"
    """Reserve ``REFRAME_MAX_VIDEO_DURATION_S`` (an upper bound only if the model refuses longer inputs)."""


def _check_whsec(secrets: list[str]) -> None:
    """Every secret is ``whsec_`` followed by base64 (Standard Webhooks); the message names no secret."""
    for secret in secrets:
        body = secret.removeprefix("whsec_")
        try:
            if secret == body or not base64.b64decode(body, validate=True):
                raise ValueError
        except ValueError:
            raise ValueError("every secret must be whsec_ followed by base64 (Standard Webhooks)") from None


_TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")


def _parse_tenant_secrets(text: str) -> dict[str, list[str]]:
    """``tenant=whsec_a whsec_b; other=whsec_c`` as {tenant: [secrets]} (ValueError naming the tenant)."""
    out: dict[str, list[str]] = {}
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        tenant, sep, secrets = part.partition("=")
        tenant = tenant.strip()
        if not sep or not _TENANT_NAME.fullmatch(tenant):
            raise ValueError("each entry must be tenant=whsec_... (tenant: a-z, 0-9, _ and -)")
        listed = [x for x in re.split(r"[\s,]+", secrets.strip()) if x]
        if not listed:
            raise ValueError(f"tenant {tenant!r} has no secret")
        _check_whsec(listed)
        out[tenant] = listed
    return out


class Settings(BaseSettings):
    """Validated configuration. Build it with :func:`load_settings`, not directly from the env."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        frozen=True,
        case_sensitive=False,
        populate_by_name=True,
        allow_inf_nan=False,  # "inf"/"nan" in a float variable is a typo, never a limit
    )

    # --- Redis -------------------------------------------------------------------------------
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="Redis for the Celery broker, job records, flow control and the result stream.",
    )
    key_prefix: str = Field(default="reframe", min_length=1, description="Prefix of every Redis key we own.")
    redis_socket_timeout_s: PosFloat = Field(default=10.0, description="Socket timeout of Redis calls.")
    redis_password: SecretStr | None = Field(
        default=None,
        description="Password of the Redis data nodes (wins over one in REFRAME_REDIS_URL); a Secret in k8s.",
    )
    redis_sentinels: str = Field(
        default="",
        description=(
            "Redis Sentinel addresses, `host:port` separated by commas; set: every client and the broker "
            "follow the primary named REFRAME_REDIS_MASTER_NAME through failovers (REFRAME_REDIS_URL "
            "then only gives the database number, user and TLS)."
        ),
    )
    redis_master_name: str = Field(
        default="mymaster",
        min_length=1,
        description="The primary's name in Sentinel (`sentinel monitor <name>`).",
    )
    redis_sentinel_password: SecretStr | None = Field(
        default=None, description="Password of the Sentinels themselves (`requirepass` in sentinel.conf)."
    )
    redis_min_replicas: NonNegInt = Field(
        default=0,
        description=(
            "Replicas that must acknowledge (WAIT, or WAITAOF on Redis >= 7.2) the SUBMITTING intent "
            "before the POST to fal, the receipt before the job counts as submitted, and an enqueue "
            "before the caller hears of it. 0: no wait (a single Redis)."
        ),
    )
    redis_replica_wait_ms: PosInt = Field(
        default=2000, description="Longest wait for REFRAME_REDIS_MIN_REPLICAS acknowledgements of one write."
    )
    production: bool = Field(
        default=False,
        description=(
            "Production mode: a worker or API refuses to start on a Redis that cannot keep the "
            "no-double-pay promise (AOF off, appendfsync no, fewer replicas than "
            "REFRAME_REDIS_MIN_REPLICAS); "
            "off: it starts and logs the risk."
        ),
    )

    # --- fal ---------------------------------------------------------------------------------
    fal_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("FAL_KEY", "fal_key"),
        description="fal API key (`key_id:key_secret`), read from FAL_KEY. Required against real fal.",
    )
    fal_queue_url: str = Field(default="https://queue.fal.run", description="fal queue API base URL.")
    fal_rest_url: str = Field(default="https://rest.fal.ai", description="fal REST (storage token) base URL.")
    fal_cdn_url: str = Field(default="https://v3.fal.media", description="fal CDN upload base URL.")
    fal_model_id: str = Field(
        default="fal-ai/luma-dream-machine/ray-2-flash/reframe", description="Full model id submitted to."
    )
    fal_connect_timeout_s: PosFloat = Field(default=5.0, description="TCP/TLS connect timeout per fal call.")
    fal_read_timeout_s: PosFloat = Field(default=30.0, description="Read timeout per fal call.")
    fal_write_timeout_s: PosFloat = Field(default=30.0, description="Write timeout per fal call.")
    fal_pool_timeout_s: PosFloat = Field(default=10.0, description="Wait for a free pooled connection.")
    fal_http_retries: NonNegInt = Field(
        default=2, description="In-call retries of idempotent fal calls (status, result, cancel, upload)."
    )
    fal_http_backoff_base_s: PosFloat = Field(default=0.5, description="Backoff base of in-call retries.")
    fal_http_backoff_cap_s: PosFloat = Field(default=10.0, description="Backoff cap of in-call retries.")
    fal_store_io: bool = Field(
        default=True,
        description="Let fal store each request's input and output payloads (its default, 30 days); false "
        "sends X-Fal-Store-IO: 0 on every submit, so fal keeps them only as long as the result needs.",
    )
    fal_output_expiration_s: PosInt | None = Field(
        default=None,
        description="Ask fal to delete each request's output media this many seconds after it is made "
        "(X-Fal-Object-Lifecycle-Preference on submit); unset: fal's default retention. Must cover "
        "REFRAME_DEDUPE_RETENTION_S, which hands the same output URL to identical jobs, and exceed "
        "REFRAME_OUTPUT_COPY_WINDOW_S while the output store is on.",
    )
    fal_multipart_threshold_bytes: Annotated[int, Field(ge=1024 * 1024)] = Field(
        default=100 * 1024 * 1024,
        description="Files larger than this are uploaded to fal storage in parts (fal-client's threshold).",
    )
    fal_multipart_part_bytes: Annotated[int, Field(ge=1024 * 1024, le=1024 * 1024 * 1024)] = Field(
        default=10 * 1024 * 1024, description="Size of one part of a multipart upload (fal-client's)."
    )
    fal_multipart_concurrency: Annotated[int, Field(ge=1, le=64)] = Field(
        default=4, description="Parts of one multipart upload sent at once."
    )
    fal_upload_part_retries: Annotated[int, Field(ge=0, le=20)] = Field(
        default=4, description="Retries of one failed part (with backoff) before the upload fails."
    )

    # --- Celery / worker ---------------------------------------------------------------------
    queue_name: str = Field(default="reframe", min_length=1, description="Celery queue (a Redis list).")
    worker_concurrency: PosInt = Field(default=8, description="Threads per worker process.")
    task_soft_time_limit_s: PosFloat = Field(default=60.0, description="Soft time limit of a Celery task.")
    task_time_limit_s: PosFloat = Field(default=90.0, description="Hard time limit of a Celery task.")
    visibility_timeout_s: PosFloat = Field(
        default=150.0, description="Redis redelivery of unacked messages; above every time limit."
    )
    worker_soft_shutdown_timeout_s: NonNegFloat = Field(
        default=20.0, description="Celery soft shutdown; below the pod's terminationGracePeriodSeconds."
    )
    job_retention_s: PosFloat = Field(default=7 * 86400.0, description="How long job records are kept.")

    # --- completion tracking -----------------------------------------------------------------
    tracker_max_jobs: PosInt = Field(default=2000, description="Most in-flight jobs one process tracks.")
    tracker_claim_ttl_s: PosFloat = Field(
        default=30.0, description="A tracker's claim on a job; another process takes over after it."
    )
    tracker_tick_s: PosFloat = Field(default=0.25, description="How often a tracker looks for due work.")
    status_poll_interval_s: PosFloat = Field(
        default=5.0, description="Status poll interval when the status stream is unavailable."
    )
    use_status_stream: bool = Field(default=True, description="Follow fal's SSE status stream.")

    # --- fal webhooks (issue #12): the completion path when a public URL is set ------------------
    public_url: str | None = Field(
        default=None,
        description="Public base URL of `reframe serve` (e.g. https://reframe.example.com). When set, every "
        "submit asks fal to POST its completion webhook to <public url>/v1/fal/webhook?t=<attempt token>.",
    )
    webhook_secret: SecretStr | None = Field(
        default=None,
        description="HMAC key of the attempt tokens in webhook URLs (required with REFRAME_PUBLIC_URL).",
    )
    fal_jwks_url: str = Field(
        default="https://rest.alpha.fal.ai/.well-known/jwks.json",
        description="Where fal publishes the Ed25519 keys that sign its webhooks.",
    )
    webhook_jwks_cache_s: Annotated[float, Field(gt=0, le=86400)] = Field(
        default=3600.0, description="How long fal's JWKS is cached (fal: at most 24 h; keys rotate)."
    )
    webhook_tolerance_s: PosFloat = Field(
        default=300.0, description="Webhooks whose X-Fal-Webhook-Timestamp is further from now are refused."
    )
    webhook_dedup_ttl_s: PosFloat = Field(
        default=86400.0,
        description="How long a received fal request id is remembered (fal retries deliveries for ~2 h).",
    )
    webhook_grace_s: PosFloat = Field(
        default=300.0,
        description="With webhooks on, a job at fal is first checked by a tracker only after this long: "
        "a lost webhook costs this much latency, never the job.",
    )
    webhook_recheck_s: PosFloat = Field(
        default=60.0,
        description="With webhooks on, after the grace a tracker checks a job's status once (one GET) "
        "every this many seconds until it ends or its webhook arrives; no stream is held per job.",
    )

    # --- flow control ------------------------------------------------------------------------
    max_concurrency: PosInt = Field(
        default=2,
        description="Cluster-wide cap of fal requests in flight (the one account's cap when "
        "REFRAME_FAL_ACCOUNTS is unset; ignored when it is set: the caps of the accounts add up).",
    )
    fal_accounts: str = Field(
        default="",
        description="A pool of fal accounts, `id:cap[:rate_per_s[:daily_usd[:monthly_usd]]],...` (e.g. "
        "`a:3,b:5:2.5,c:2:-:40:900`; empty or `-` = none): each its own cap of requests in flight, submit "
        "rate (default REFRAME_SUBMIT_RATE_PER_S), breaker, key (REFRAME_FAL_ACCOUNT_KEYS) and optional "
        "budget per UTC day and month in dollars (spent + reserved <= cap, as the cluster's). Unset: one "
        "account, `default`, with REFRAME_MAX_CONCURRENCY and FAL_KEY.",
    )
    fal_account_keys: SecretStr | None = Field(
        default=None,
        description="The fal key of each account of REFRAME_FAL_ACCOUNTS, `id=key_id:key_secret; id2=...`; "
        "an account not listed uses FAL_KEY (at most one may).",
    )
    reserved_high_slots: NonNegInt = Field(default=0, description="Slots only high-priority jobs may take.")
    slot_lease_ttl_s: PosFloat = Field(
        default=60.0, description="A slot lease; renewed while fal reports the request alive."
    )
    # fal documents no submit rate limit for model APIs, only the concurrency cap: the rate only
    # smooths bursts (50/s refills 40 slots in under a second); the burst is small because the
    # first pushback finds at most `burst` submits on the wire (the bucket restarts empty after it).
    submit_rate_per_s: PosFloat = Field(default=50.0, description="Cluster-wide submit rate (GCRA).")
    submit_burst: PosInt = Field(default=10, description="Submits allowed back to back (GCRA burst).")
    max_rate_wait_s: NonNegFloat = Field(
        default=2.0, description="Wait in-task for a rate token up to this; longer waits are deferred."
    )
    retry_max_attempts: PosInt = Field(default=5, description="fal submits per job at most.")
    retry_base_s: PosFloat = Field(default=2.0, description="Job-level backoff base (full jitter).")
    retry_cap_s: PosFloat = Field(default=300.0, description="Job-level backoff cap.")
    retry_after_max_s: PosFloat = Field(
        default=900.0, description="Largest Retry-After honoured; larger values are clamped to it."
    )
    job_deadline_s: PosFloat = Field(
        default=6 * 3600.0, description="A job not submitted by this long after enqueue fails."
    )
    retry_budget_ratio: NonNegFloat = Field(
        default=0.2, description="Retries allowed per first attempt, cluster-wide (token bucket)."
    )
    retry_budget_min_tokens: NonNegFloat = Field(
        default=10.0, description="Retry tokens always available (a floor for quiet periods)."
    )
    breaker_window_s: PosFloat = Field(default=60.0, description="Failure-rate window of the breaker.")
    breaker_min_calls: PosInt = Field(default=10, description="Calls in the window before it can trip.")
    breaker_failure_ratio: Annotated[float, Field(gt=0, le=1)] = Field(
        default=0.5, description="Failure ratio in the window that opens the breaker."
    )
    breaker_open_base_s: PosFloat = Field(default=30.0, description="First OPEN period.")
    breaker_open_cap_s: PosFloat = Field(default=600.0, description="Longest OPEN period.")
    breaker_half_open_probes: PosInt = Field(
        default=1, description="Probe submits allowed cluster-wide while HALF_OPEN."
    )
    breaker_close_after_successes: PosInt = Field(
        default=1, description="Probe successes that close the breaker."
    )
    # Bounded so micro-dollar sums stay exact in Lua doubles (< 2**53) and a typo cannot lift a cap.
    budget_daily_usd: Annotated[float, Field(ge=0, le=MAX_BUDGET_USD)] = Field(
        default=100.0, description="Spend cap per UTC day (at most 1e9)."
    )
    budget_monthly_usd: Annotated[float, Field(ge=0, le=MAX_BUDGET_USD)] = Field(
        default=1000.0, description="Spend cap per UTC month (at most 1e9)."
    )
    price_per_s_usd: Annotated[float, Field(ge=0, le=1000)] = Field(
        default=0.06, description="fal price per second of video."
    )
    max_video_duration_s: PosFloat = Field(
        default=30.0,
        description="The model's limit: longest input accepted (refused before any fal call); also the "
        "estimate when the duration cannot be read.",
    )
    max_upload_bytes: PosInt = Field(
        default=100 * 1024 * 1024,
        description="The model's limit: largest input accepted (refused before any fal call), and the "
        "largest local file `reframe enqueue` uploads to fal storage.",
    )
    enqueue_probe_input: bool = Field(
        default=False,
        description="Read each video_url at enqueue (guarded fetcher) and refuse inputs over the model's "
        "limits there; the submitter always checks before any fal call.",
    )
    probe_timeout_s: PosFloat = Field(default=10.0, description="Timeout to read a video's duration.")
    dedupe_default: bool = Field(
        default=False,
        description="Pay once for identical work when neither the request nor its tenant says: a job "
        "whose canonical input matches a job in flight attaches to it, one that matches a success "
        "within REFRAME_DEDUPE_RETENTION_S gets its result without a fal call.",
    )
    dedupe_retention_s: Annotated[float, Field(gt=0, le=7 * 86400.0)] = Field(
        default=86400.0,
        description="How long a succeeded job's result is reused for identical requests (at most 7 days, "
        "fal's default CDN retention; never longer than REFRAME_JOB_RETENTION_S, which keeps the result).",
    )
    dedupe_read_timeout_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        default=60.0,
        description="Longest read of an input to hash it for dedupe (a data: URI or a fal storage file, "
        "at most REFRAME_MAX_UPLOAD_BYTES); past it the job goes without dedupe.",
    )
    dedupe_recheck_s: Annotated[float, Field(ge=1, le=3600)] = Field(
        default=30.0,
        description="A job attached to an identical job in flight looks again this often (its leader's "
        "end dispatches it at once; this is the safety net when that dispatch is lost).",
    )
    ambiguous_submit_policy: AmbiguousSubmitPolicy = Field(
        default=AmbiguousSubmitPolicy.DEAD_LETTER,
        description="`dead_letter` (never pay twice) or `resubmit` (accept the risk, counted).",
    )
    unknown_duration_policy: UnknownDurationPolicy = Field(
        default=UnknownDurationPolicy.REFUSE,
        description="`refuse` an input whose duration cannot be read (never under-reserve), or "
        "`reserve_max` to reserve the maximum duration instead.",
    )
    estimate_margin_s: Annotated[float, Field(ge=0, le=60)] = Field(
        default=0.5,
        description="Seconds added to the input's duration when reserving: an output slightly longer "
        "than its input must still fit its reservation.",
    )

    # --- results -----------------------------------------------------------------------------
    results_stream_maxlen: PosInt = Field(
        default=1_000_000,
        description="Hard ceiling of the result stream's length: the stream is trimmed only below the "
        "slowest consumer group, unless it grows past this (counted and alerted when it bites).",
    )
    dlq_retention_s: PosFloat = Field(
        default=30 * 86400.0, description="How long dead-lettered job records (and their dlq entries) live."
    )
    ledger_retention_days: Annotated[int, Field(ge=1, le=36_600)] = Field(
        default=400,
        description="How long cost-ledger entries (P:ledger, one per settlement or correction) are "
        "kept: the housekeeper trims older ones (XTRIM MINID).",
    )
    billing_unit_s: Annotated[float, Field(ge=0, le=60)] = Field(
        default=1.0,
        description="fal's billing unit: output seconds are rounded up to whole units when a job is "
        "estimated and settled (0 = exact fractional seconds).",
    )
    gate_ttl_s: PosFloat = Field(
        default=30.0,
        description="How long one submit run owns a job's gate before a duplicate may start a new attempt.",
    )
    ambiguous_slot_hold_s: PosFloat = Field(
        default=3600.0,
        description="How long an ambiguous submit keeps its slot: fal may still run a request we cannot see.",
    )
    ambiguous_webhook_wait_s: PosFloat = Field(
        default=900.0,
        description="With fal webhooks on: how long an ambiguous submit waits (SUBMITTING, slot and "
        "reservation held) for its attempt's webhook, which adopts the request, before "
        "REFRAME_AMBIGUOUS_SUBMIT_POLICY applies.",
    )
    result_read_deadline_s: PosFloat = Field(
        default=3600.0,
        description="How long to keep retrying a result read fal answers with errors before calling it "
        "unavailable (fal keeps results at least 6 minutes, up to its storage period).",
    )
    lost_confirm_s: PosFloat = Field(
        default=30.0,
        description="A 404 from fal is re-checked for this long before a request is called lost.",
    )
    callback_retry_window_s: PosFloat = Field(
        default=86400.0,
        description="How long a callback is retried (with backoff) before it is given up.",
    )
    callback_backoff_cap_s: PosFloat = Field(
        default=600.0, description="Longest wait between callback tries."
    )
    callback_lease_s: PosFloat = Field(
        default=60.0,
        description="How long one claimed callback delivery may take before another worker tries it "
        "(a worker that died mid-delivery hands it back after this).",
    )
    callback_signing_key: SecretStr | None = Field(
        default=None, description="HMAC-SHA256 key for per-job callbacks; callbacks are unsigned without."
    )
    callback_secrets: SecretStr | None = Field(
        default=None,
        description="Standard Webhooks signing secrets (`whsec_<base64>`), space or comma separated: the "
        "current one first, then previous ones during a rotation; every callback carries one `v1,` "
        "signature per secret.",
    )
    callback_tenant_secrets: SecretStr | None = Field(
        default=None,
        description="Standard Webhooks secrets per tenant, `tenant=whsec_a whsec_b; other=whsec_c` (current "
        "first): a tenant listed here gets callbacks signed with its own secrets instead of "
        "REFRAME_CALLBACK_SECRETS, so no tenant can verify (or forge) another's.",
    )
    callback_timeout_s: PosFloat = Field(default=10.0, description="Timeout of one callback POST.")
    callback_allow_unsigned: bool = Field(
        default=False,
        description="Accept a callback_url without REFRAME_CALLBACK_SIGNING_KEY (unsigned POSTs).",
    )

    # --- output store (worker/output_store.py, worker/output_copy.py) ---------------------------
    output_store_url: str = Field(
        default="file://./.reframe/outputs",
        description="Where finished outputs are copied: `file://DIR` (a local directory, the embedded "
        "default; relative to the working directory), `s3://BUCKET[/PREFIX]` (any S3-compatible store, "
        "see REFRAME_OUTPUT_S3_*), or `off` (events carry fal's URL only).",
    )
    output_s3_endpoint: str = Field(
        default="",
        description="S3 endpoint URL for a non-AWS store (GCS interop, R2, MinIO, ...); empty = AWS.",
    )
    output_s3_region: str = Field(default="us-east-1", description="S3 region (signing).")
    output_s3_access_key_id: str = Field(default="", description="S3 access key id (empty: none).")
    output_s3_secret_access_key: SecretStr | None = Field(
        default=None, description="S3 secret access key (a secret: k8s Secret `reframe-secrets`)."
    )
    output_s3_allow_http: bool = Field(
        default=False, description="Allow a plain-http S3 endpoint (a local MinIO or test server)."
    )
    output_presign_expiry_s: Annotated[int, Field(gt=0, le=7 * 86400)] = Field(
        default=3600, description="Life of a presigned output URL (S3 allows at most 7 days)."
    )
    output_retention_days: PosFloat = Field(
        default=30.0,
        description="How long stored outputs are kept: `reframe outputs cleanup` deletes older ones.",
    )
    output_copy_window_s: PosFloat = Field(
        default=6 * 3600.0,
        description="How long a failing copy is retried before it is given up (`output_copy=failed`, "
        "alerted, `reframe outputs retry`); keep it well under fal's media retention.",
    )
    output_copy_backoff_cap_s: PosFloat = Field(default=300.0, description="Longest wait between copy tries.")
    output_copy_lease_s: PosFloat = Field(
        default=30.0,
        description="Lease of a claimed copy, renewed every third of it while the copy runs: a worker "
        "that died or stopped mid-copy hands its copies back this long after its last renewal.",
    )
    output_copy_workers: PosInt = Field(default=4, description="Copies in parallel per worker process.")
    output_max_bytes: PosInt = Field(
        default=2 * 1024**3, description="Largest output copied; a larger one fails the copy."
    )
    output_copy_timeout_s: PosFloat = Field(
        default=600.0, description="Deadline of one download of an output from fal's CDN."
    )
    output_ratio_tolerance: NonNegFloat = Field(
        default=0.02,
        description="Largest relative difference between the output's width/height and the requested "
        "aspect ratio that still verifies.",
    )
    output_duration_tolerance_s: NonNegFloat = Field(
        default=0.5,
        description="Largest difference between the output's and the input's duration that still verifies.",
    )

    # --- input limits ------------------------------------------------------------------------
    max_data_uri_bytes: PosInt = Field(default=8 * 1024 * 1024, description="Largest `data:` video_url.")
    max_prompt_chars: PosInt = Field(default=2000, description="Longest prompt accepted.")

    # --- outbound fetches (issue #11: SSRF guard, worker/contracts/netguard.py) ----------------------------
    fetch_allow: str = Field(
        default="",
        description=(
            "CIDRs and host names (`*.cdn.example` for sub-domains) that job URLs may reach although "
            "they are internal, e.g. an internal CDN; comma or space separated; empty allows nothing "
            "extra. Cloud metadata addresses stay blocked."
        ),
    )
    max_url_length: Annotated[int, Field(ge=64, le=65536)] = Field(
        default=2048, description="Longest http(s) URL a job may name (video_url, image_url, callback_url)."
    )
    fetch_max_redirects: Annotated[int, Field(ge=0, le=10)] = Field(
        default=3, description="Redirects followed per fetch (each hop is checked again); POSTs follow none."
    )
    fetch_connect_timeout_s: PosFloat = Field(default=5.0, description="TCP/TLS connect timeout of a fetch.")
    probe_max_bytes: PosInt = Field(
        default=32 * 1024 * 1024, description="Most bytes the duration probe reads from one video."
    )
    callback_max_response_bytes: PosInt = Field(
        default=64 * 1024, description="Most bytes of a callback receiver's response that are read."
    )
    max_metadata_bytes: PosInt = Field(
        default=16 * 1024, description="Largest job metadata, as compact JSON (it is stored and published)."
    )
    max_metadata_depth: PosInt = Field(default=8, description="Deepest nesting of job metadata.")
    max_metadata_keys: PosInt = Field(default=256, description="Most keys in job metadata, all levels.")
    enqueue_max_batch: Annotated[int, Field(gt=0, le=10_000)] = Field(
        default=1000, description="Most jobs per enqueue_many call (one atomic Redis script)."
    )

    # --- metrics, health, logging ------------------------------------------------------------
    metrics_host: str = Field(default="0.0.0.0", description="Bind address of /metrics and health.")
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = Field(
        default=DEFAULT_METRICS_PORT, description="Port of /metrics, /livez, /readyz (0 disables)."
    )
    metrics_top_tenants: Annotated[int, Field(ge=0, le=1000)] = Field(
        default=10,
        description="Tenants the exporter names in per-tenant spend and budget metrics (the most "
        'spent this month); the rest are summed as tenant="other".',
    )
    heartbeat_interval_ms: Annotated[int, Field(ge=100, le=60_000)] = Field(
        default=500, description="How often a worker process publishes its presence (limits + beat)."
    )
    heartbeat_ttl_ms: Annotated[int, Field(ge=300, le=600_000)] = Field(
        default=2500,
        description="A process with no beat for this long counts as dead: its tracker claims and "
        "in-flight submits are taken over (still checked against fal before any slot is freed).",
    )
    log_level: str = Field(default="INFO", description="Python log level.")
    log_json: bool = Field(default=False, description="Log one JSON object per line.")

    # --- HTTP API (issue #12: `reframe serve`, reframe/api/) -------------------------------------
    api_host: str = Field(default="0.0.0.0", description="Bind address of `reframe serve`.")
    api_port: Annotated[int, Field(ge=1, le=65535)] = Field(
        default=8080, description="Port of `reframe serve`."
    )
    api_workers: Annotated[int, Field(ge=1, le=64)] = Field(
        default=1, description="uvicorn processes of `reframe serve` (each has its own /metrics)."
    )
    api_max_body_bytes: Annotated[int, Field(ge=1024, le=256 * 1024 * 1024)] = Field(
        default=10 * 1024 * 1024,
        description="Largest JSON request body (413 past it); uploads use REFRAME_MAX_UPLOAD_BYTES.",
    )
    api_rate_per_s: PosFloat = Field(
        default=20.0,
        description="Requests per second per API key (GCRA in Redis) unless the key sets its own.",
    )
    api_rate_burst: PosInt = Field(
        default=40, description="Requests an API key may make back to back unless the key sets its own."
    )
    api_sse_poll_interval_s: Annotated[float, Field(ge=0.05, le=30)] = Field(
        default=0.5, description="How often a job's event stream (SSE) re-reads the job record."
    )
    api_sse_heartbeat_s: Annotated[float, Field(ge=1, le=300)] = Field(
        default=15.0, description="Idle seconds before an SSE stream sends a keep-alive comment."
    )
    api_sse_max_s: Annotated[float, Field(ge=1, le=86400)] = Field(
        default=3600.0, description="Longest one SSE stream stays open (the client reconnects after)."
    )
    grafana_url: str | None = Field(
        default=None,
        description="Link to the Grafana dashboard shown by the operator console (/console); unset: no link.",
    )

    @field_validator("output_store_url")
    @classmethod
    def _check_output_store_url(cls, value: str) -> str:
        text = value.strip()
        if text.lower() in {"off", "none", ""}:
            return "off"
        if text.startswith("file://") and len(text) > len("file://"):
            return text
        if text.startswith("s3://") and text.removeprefix("s3://").split("/", 1)[0]:
            return text
        raise ValueError("must be file://DIR, s3://BUCKET[/PREFIX] or off")

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in {"redis", "rediss", "unix", "redis+socket"}:
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        if parts.scheme in {"redis", "rediss"} and not parts.hostname:
            raise ValueError("has no host")
        return value

    @field_validator("redis_sentinels")
    @classmethod
    def _check_redis_sentinels(cls, value: str) -> str:
        parse_sentinels(value)
        return value.strip()

    @field_validator("fal_queue_url", "fal_rest_url", "fal_cdn_url")
    @classmethod
    def _check_http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError("must be an http(s):// URL with a host")
        return value.rstrip("/")

    @field_validator("public_url", "fal_jwks_url", "grafana_url")
    @classmethod
    def _check_optional_http_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        parts = urlsplit(value)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError("must be an http(s):// URL with a host")
        return value.rstrip("/")

    @field_validator("callback_secrets")
    @classmethod
    def _check_callback_secrets(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        _check_whsec(re.split(r"[\s,]+", value.get_secret_value().strip()))
        return value

    @field_validator("callback_tenant_secrets")
    @classmethod
    def _check_callback_tenant_secrets(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        _parse_tenant_secrets(value.get_secret_value())
        return value

    @field_validator("fetch_allow")
    @classmethod
    def _check_fetch_allow(cls, value: str) -> str:
        # Syntax only; worker/contracts/urlpolicy.py (Allowlist.parse) gives the entries meaning.
        for entry in re.split(r"[\s,]+", value.strip()):
            if not entry:
                continue
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                if not _ALLOW_HOST.fullmatch(entry.lower().rstrip(".")):
                    raise ValueError(f"entry {entry!r} is neither a CIDR nor a host name") from None
        return value.strip()

    @field_validator("fal_accounts")
    @classmethod
    def _check_fal_accounts(cls, value: str) -> str:
        parse_accounts(value)
        return value.strip()

    @field_validator("fal_account_keys")
    @classmethod
    def _check_fal_account_keys(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        parse_account_keys(value.get_secret_value())
        return value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        upper = value.upper()
        if upper not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return upper

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        if self.task_time_limit_s < self.task_soft_time_limit_s:
            raise ValueError("REFRAME_TASK_TIME_LIMIT_S must be >= REFRAME_TASK_SOFT_TIME_LIMIT_S")
        if self.visibility_timeout_s <= self.task_time_limit_s + self.tracker_claim_ttl_s:
            raise ValueError(
                "REFRAME_VISIBILITY_TIMEOUT_S must exceed "
                "REFRAME_TASK_TIME_LIMIT_S + REFRAME_TRACKER_CLAIM_TTL_S"
            )
        if self.visibility_timeout_s <= self.task_time_limit_s + TASK_DEADLINE_MARGIN_S:
            raise ValueError(
                "REFRAME_VISIBILITY_TIMEOUT_S must exceed REFRAME_TASK_TIME_LIMIT_S + "
                f"{TASK_DEADLINE_MARGIN_S:g} s (the task watchdog ends a hung worker at the limit; "
                "its message must not return before)"
            )
        if self.reserved_high_slots >= self.slot_capacity:
            raise ValueError(
                "REFRAME_RESERVED_HIGH_SLOTS must be below REFRAME_MAX_CONCURRENCY "
                "(with REFRAME_FAL_ACCOUNTS: below the sum of the accounts' caps)"
            )
        try:
            check_keys(self.fal_account_specs, self.fal_account_key_map)
        except ValueError as err:
            raise ValueError(f"REFRAME_FAL_ACCOUNT_KEYS: {err}") from None
        if self.breaker_open_cap_s < self.breaker_open_base_s:
            raise ValueError("REFRAME_BREAKER_OPEN_CAP_S must be >= REFRAME_BREAKER_OPEN_BASE_S")
        if self.retry_cap_s < self.retry_base_s:
            raise ValueError("REFRAME_RETRY_CAP_S must be >= REFRAME_RETRY_BASE_S")
        if self.public_url and self.webhook_secret is None:
            raise ValueError(
                "REFRAME_WEBHOOK_SECRET is required with REFRAME_PUBLIC_URL (webhook URL tokens)"
            )
        expiration_s = self.fal_output_expiration_s
        if expiration_s is not None and expiration_s < self.dedupe_retention_s:
            raise ValueError(
                "REFRAME_FAL_OUTPUT_EXPIRATION_S must be >= REFRAME_DEDUPE_RETENTION_S (a deduplicated job "
                "is handed the same fal output URL for that long)"
            )
        if (
            expiration_s is not None
            and self.output_store_url.strip().lower() != "off"
            and expiration_s <= self.output_copy_window_s
        ):
            raise ValueError(
                "REFRAME_FAL_OUTPUT_EXPIRATION_S must be > REFRAME_OUTPUT_COPY_WINDOW_S (a copy still being "
                "retried must find fal's file)"
            )
        if self.heartbeat_ttl_ms < 2 * self.heartbeat_interval_ms:
            raise ValueError("REFRAME_HEARTBEAT_TTL_MS must be at least 2 x REFRAME_HEARTBEAT_INTERVAL_MS")
        return self

    @property
    def talks_to_real_fal(self) -> bool:
        """True when the queue URL is one of fal's own hosts (a key is then mandatory)."""
        host = urlsplit(self.fal_queue_url).hostname or ""
        return any(host == s or host.endswith("." + s) for s in REAL_FAL_HOST_SUFFIXES)

    @property
    def webhooks_on(self) -> bool:
        """True when submits ask fal for completion webhooks (``REFRAME_PUBLIC_URL`` is set)."""
        return bool(self.public_url)

    @property
    def callback_secret_list(self) -> list[str]:
        """The Standard Webhooks secrets, current first ('' entries dropped)."""
        if self.callback_secrets is None:
            return []
        return [x for x in re.split(r"[\s,]+", self.callback_secrets.get_secret_value().strip()) if x]

    def callback_secrets_for(self, tenant: str) -> list[str]:
        """The Standard Webhooks secrets of ``tenant``'s callbacks: its own when
        ``REFRAME_CALLBACK_TENANT_SECRETS`` lists it, else the cluster's."""
        if self.callback_tenant_secrets is not None and tenant:
            own = _parse_tenant_secrets(self.callback_tenant_secrets.get_secret_value()).get(tenant)
            if own:
                return own
        return self.callback_secret_list

    @property
    def fal_account_specs(self) -> list[AccountSpec]:
        """The pool of fal accounts (one ``default`` account unless REFRAME_FAL_ACCOUNTS is set)."""
        return pool_specs(self.fal_accounts, self.max_concurrency)

    @property
    def slot_capacity(self) -> int:
        """The most fal requests in flight: the sum of the accounts' caps."""
        return sum(a.cap for a in self.fal_account_specs)

    @property
    def fal_account_key_map(self) -> dict[str, str]:
        """{account id: key} of REFRAME_FAL_ACCOUNT_KEYS. Only the HTTP clients should read it."""
        if self.fal_account_keys is None:
            return {}
        return parse_account_keys(self.fal_account_keys.get_secret_value())

    def fal_key_of(self, account: str) -> str:
        """The fal key of ``account`` (its own, else FAL_KEY). Only the HTTP clients should call this."""
        return self.fal_account_key_map.get(account) or self.fal_key_value

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """The Sentinels as ``(host, port)`` pairs; empty: a plain Redis at ``redis_url``."""
        return parse_sentinels(self.redis_sentinels)

    @property
    def redis_password_value(self) -> str | None:
        """The data nodes' password: ``REFRAME_REDIS_PASSWORD``, else the URL's (None when neither)."""
        if self.redis_password is not None and self.redis_password.get_secret_value():
            return self.redis_password.get_secret_value()
        return urlsplit(self.redis_url).password

    @property
    def fal_key_value(self) -> str:
        """The fal key as a string ('' when unset). Only the HTTP client should call this."""
        return self.fal_key.get_secret_value() if self.fal_key is not None else ""

    def redacted(self) -> dict[str, Any]:
        """Every setting with secrets masked and the Redis password removed, for logs."""
        out: dict[str, Any] = {}
        for name, value in self.model_dump().items():
            if isinstance(value, SecretStr):
                out[name] = "***" if value.get_secret_value() else None
            elif name == "redis_url":
                out[name] = redact_url(value)
            else:
                out[name] = value
        return out


def parse_sentinels(text: str) -> list[tuple[str, int]]:
    """``h1:26379, h2:26379`` as ``[(host, port), ...]`` (ValueError naming the bad entry)."""
    out: list[tuple[str, int]] = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        host, sep, port = entry.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"entry {entry!r} is not host:port")
        out.append((host, int(port)))
    return out


def redact_url(url: str) -> str:
    """Return ``url`` without its password (``redis://:***@host``)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{netloc}").geturl()


def env_name(field: str) -> str:
    """The environment variable that sets ``field``."""
    return FAL_KEY_ENV if field == "fal_key" else ENV_PREFIX + field.upper()


def _unknown_env(environ: Mapping[str, str]) -> list[str]:
    known = {env_name(name) for name in Settings.model_fields}
    return sorted(k for k in environ if k.upper().startswith(ENV_PREFIX) and k.upper() not in known)


def load_settings(
    environ: Mapping[str, str] | None = None, *, require_fal_key: bool = False, **overrides: Any
) -> Settings:
    """Read and validate the settings once.

    ``environ`` defaults to ``os.environ``; ``overrides`` win over the environment (the CLI uses
    them for flags). Components that call fal (workers, uploads) pass ``require_fal_key=True``:
    then a missing ``FAL_KEY`` is an error when the queue URL is fal's own. Raises
    :class:`SettingsError` naming every bad or unknown variable.
    """
    env = dict(os.environ if environ is None else environ)
    problems = [f"{name}: unknown setting (check the spelling)" for name in _unknown_env(env)]
    values: dict[str, Any] = {}
    for name in Settings.model_fields:
        var = env_name(name)
        for key in (var, var.lower()):
            if key in env:
                values[name] = env[key]
                break
    values.update(overrides)
    try:
        settings = Settings.model_validate(values)
    except ValidationError as exc:
        problems.extend(_describe(exc))
    else:
        keyless = [a.id for a in settings.fal_account_specs if not settings.fal_key_of(a.id)]
        shared = keyless_problem(settings.fal_account_specs, settings.fal_account_key_map)
        if require_fal_key and shared:
            problems.append(f"REFRAME_FAL_ACCOUNT_KEYS: {shared}")
        elif require_fal_key and settings.talks_to_real_fal and keyless:
            problems.append(
                f"{FAL_KEY_ENV}: required when REFRAME_FAL_QUEUE_URL points at fal ({settings.fal_queue_url})"
            )
    if problems:
        raise SettingsError("invalid configuration:\n  " + "\n  ".join(problems))
    return settings


def _describe(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = err.get("loc") or ()
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if loc:
            lines.append(f"{env_name(str(loc[0]))}: {msg}")
        else:
            lines.append(msg)
    return lines


def _is_setting_var(name: str) -> bool:
    return name.upper().startswith(ENV_PREFIX) or name == FAL_KEY_ENV


def settings_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``REFRAME_*`` and ``FAL_KEY`` variables that are set (e.g. to tell which were given)."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in env.items() if _is_setting_var(k)}


def child_environment(
    settings_env: Mapping[str, str], environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """An environment for a child process: ours minus every setting variable, plus ``settings_env``.

    Child processes get exactly the configuration the parent chose, never a stray ``REFRAME_*``
    variable of the caller's shell.
    """
    env = os.environ if environ is None else environ
    return {**{k: v for k, v in env.items() if not _is_setting_var(k)}, **settings_env}
