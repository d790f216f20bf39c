"""Emulator configuration: one dataclass, set from constructor args or CLI flags (never the environment)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

#: Fields that ``POST /_emulator/config`` and ``EmulatorServer.configure`` may change at run time.
RUNTIME_FIELDS = frozenset(
    {
        "concurrency",
        "processing_time_s",
        "submit_rate_per_s",
        "submit_burst",
        "valid_keys",
        "locked_keys",
        "result_ttl_s",
        "webhook_retry_delays_s",
        "max_queue_length",
        "unit_price_usd",
        "isolate_accounts",
    }
)


def _default_webhook_delays() -> list[float]:
    # fal retries a failed delivery 10 times over about 2 hours; this is the same shape compressed to ~1 min
    # so tests and demos see retries without waiting hours.
    return [0.5, 1.0, 2.0, 3.0, 5.0, 5.0, 8.0, 10.0, 12.0, 15.0]


@dataclass
class EmulatorConfig:
    """Everything the emulator can be told. Durations are seconds (``_s``), sizes bytes (``_bytes``)."""

    #: Account concurrency: at most this many requests are IN_PROGRESS; the rest wait IN_QUEUE (FIFO).
    concurrency: int = 2
    #: Extra seconds a request stays IN_PROGRESS on top of the real render time.
    processing_time_s: float = 0.0
    #: Submit rate limit (token bucket); ``None`` turns it off. Over-rate submits get 429 + Retry-After.
    submit_rate_per_s: float | None = None
    #: Bucket size of the submit rate limit.
    submit_burst: int = 10
    #: Accepted ``Key`` values (``id:secret``); ``None`` accepts any well-formed key.
    valid_keys: list[str] | None = None
    #: Keys (full ``id:secret`` or just the id) whose account is locked: 403 on every authenticated call.
    locked_keys: list[str] = field(default_factory=list)
    #: Seconds a result stays retrievable after completion (fal: 1 h); ``None`` keeps results forever.
    result_ttl_s: float | None = 3600.0
    #: Delays between webhook delivery attempts; attempts = 1 + len(delays).
    webhook_retry_delays_s: list[float] = field(default_factory=_default_webhook_delays)
    #: Server-wide cap on IN_QUEUE requests (429 when reached); ``None`` = unbounded like fal.
    #: The per-request ``?fal_max_queue_length=`` query parameter applies as well.
    max_queue_length: int | None = None
    #: Base URL written into response/status/cancel and file URLs. ``None`` = derived from the request's Host.
    public_url: str | None = None
    #: Directory for uploads, fetched inputs and the render cache. ``None`` = a temp dir removed at shutdown.
    data_dir: Path | None = None
    #: Upper bound on the output's long side in pixels (the output keeps the source's long side up to this).
    max_long_side: int = 1280
    #: ffmpeg processes allowed at once (renders are CPU bound; queued renders simply wait).
    render_workers: int = 2
    #: x264 preset for renders; speed matters more than size here.
    x264_preset: str = "veryfast"
    #: Hard limit on one ffmpeg run.
    render_timeout_s: float = 300.0
    #: Largest input video accepted (422 beyond it).
    max_input_bytes: int = 100 * 1024 * 1024
    #: Longest input video accepted; ``None`` = no limit (fal documents none).
    max_input_duration_s: float | None = None
    #: Timeout of one input download.
    fetch_timeout_s: float = 60.0
    #: Timeout of one webhook delivery attempt.
    webhook_timeout_s: float = 10.0
    #: User id put into webhook signatures (``X-Fal-Webhook-User-Id``).
    webhook_user_id: str = "emulator-user"
    #: Raw 32-byte Ed25519 private key seed for webhook signing; ``None`` = a fresh key per app.
    webhook_private_key: bytes | None = None
    #: Longest gap between two status-stream events (keepalive).
    stream_keepalive_s: float = 2.0
    #: HTTP rows the ledger keeps (oldest dropped first; counters stay exact); ``None`` = unbounded.
    ledger_max_requests: int | None = 500_000
    #: Lifetime of CDN upload tokens.
    cdn_token_ttl_s: float = 3600.0
    #: Billing unit: a success is billed its output's seconds rounded up to a whole number of units
    #: (``0`` bills the exact fractional seconds).
    billing_unit_s: float = 1.0
    #: Dollars per billed second in the usage export (Luma Ray 2 Flash Reframe: $0.06 per second).
    unit_price_usd: float = 0.06
    #: Each key id is its own fal account: a request is seen (status, result, cancel) only with a key
    #: of the account that submitted it; another account's key gets fal's 404. Off: one account.
    isolate_accounts: bool = False

    def update(self, changes: dict[str, Any]) -> None:
        """Apply a partial update of run-time fields; raises ``ValueError`` on unknown or invalid ones."""
        unknown = set(changes) - RUNTIME_FIELDS
        if unknown:
            raise ValueError(f"unknown or read-only config fields: {sorted(unknown)}")
        for name, value in changes.items():
            setattr(self, name, _coerce(name, value))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` if a value is out of range."""
        if self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.processing_time_s < 0:
            raise ValueError("processing_time_s must be >= 0")
        if self.submit_rate_per_s is not None and self.submit_rate_per_s <= 0:
            raise ValueError("submit_rate_per_s must be > 0 or null")
        if self.submit_burst < 1:
            raise ValueError("submit_burst must be >= 1")
        if self.max_queue_length is not None and self.max_queue_length < 0:
            raise ValueError("max_queue_length must be >= 0 or null")
        if not 0 <= self.unit_price_usd < 1e6:
            raise ValueError("unit_price_usd must be >= 0")
        if any(d < 0 for d in self.webhook_retry_delays_s):
            raise ValueError("webhook_retry_delays_s must be non-negative")

    def as_dict(self) -> dict[str, Any]:
        """The JSON-safe run-time view of the config."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in RUNTIME_FIELDS}


def _coerce(name: str, value: Any) -> Any:
    """Turn JSON values into the field's type (ints may arrive as floats, lists as tuples)."""
    if value is None:
        if name in {"submit_rate_per_s", "valid_keys", "result_ttl_s", "max_queue_length"}:
            return None
        raise ValueError(f"{name} cannot be null")
    if name in {"concurrency", "submit_burst", "max_queue_length"}:
        return int(value)
    if name in {"processing_time_s", "submit_rate_per_s", "result_ttl_s", "unit_price_usd"}:
        return float(value)
    if name == "isolate_accounts":
        return bool(value)
    if name in {"valid_keys", "locked_keys"}:
        return [str(v) for v in value]
    if name == "webhook_retry_delays_s":
        return [float(v) for v in value]
    return value
