"""The contract between producers and workers: request models, job states, Redis layout, wire format.

The producer imports only this subpackage and :mod:`config`; nothing here imports the worker's
runtime (Celery worker machinery, the fal client, flow control).
"""

from worker.contracts.models import (
    ASPECT_RATIOS,
    InvalidRequest,
    JobState,
    Priority,
    ReframeInput,
    parse_input,
)

__all__ = ["ASPECT_RATIOS", "InvalidRequest", "JobState", "Priority", "ReframeInput", "parse_input"]
