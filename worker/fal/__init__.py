"""fal.ai queue API client: typed errors, pure retry policy, response models, the async client."""

from worker.fal.client import FalClient, SseDecoder, parse_status_event
from worker.fal.errors import (
    FalAmbiguousError,
    FalAuthError,
    FalError,
    FalModelError,
    FalNotFoundError,
    FalPermanentError,
    FalRunnerError,
    FalTransientError,
)
from worker.fal.models import (
    FalCancelAnswer,
    FalFile,
    QueueStatus,
    ReframeOutput,
    SubmitReceipt,
    app_path,
    request_urls,
)
from worker.fal.policy import (
    backoff_s,
    cancel_outcome,
    classify_exception,
    classify_response,
    parse_retry_after,
    should_retry,
    status_class,
)

__all__ = [
    "FalAmbiguousError",
    "FalAuthError",
    "FalCancelAnswer",
    "FalClient",
    "FalError",
    "FalFile",
    "FalModelError",
    "FalNotFoundError",
    "FalPermanentError",
    "FalRunnerError",
    "FalTransientError",
    "QueueStatus",
    "ReframeOutput",
    "SseDecoder",
    "SubmitReceipt",
    "app_path",
    "backoff_s",
    "cancel_outcome",
    "classify_exception",
    "classify_response",
    "parse_retry_after",
    "parse_status_event",
    "request_urls",
    "should_retry",
    "status_class",
]
