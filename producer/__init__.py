"""The producer library: validate reframe requests and enqueue jobs on Redis.

Only :mod:`config` and :mod:`worker.contracts` are imported; the worker runtime never is.
"""

from producer.client import (
    CancelOutcome,
    EnqueueRequest,
    EnqueueResult,
    IdempotencyConflict,
    Job,
    Producer,
    Quote,
    ReplayOutcome,
)
from producer.results import ResultConsumer, ResultEvent
from worker.contracts.durable import NotReplicated
from worker.contracts.intake import Conflict
from worker.contracts.models import InvalidRequest, JobState, Priority, ReframeInput

__all__ = [
    "CancelOutcome",
    "Conflict",
    "EnqueueRequest",
    "EnqueueResult",
    "IdempotencyConflict",
    "InvalidRequest",
    "Job",
    "JobState",
    "NotReplicated",
    "Priority",
    "Producer",
    "Quote",
    "ReframeInput",
    "ReplayOutcome",
    "ResultConsumer",
    "ResultEvent",
]
