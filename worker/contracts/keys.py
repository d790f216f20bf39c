"""The Redis key layout (docs/design.md). Every key we own starts with ``settings.key_prefix``."""

from __future__ import annotations

from dataclasses import dataclass

from worker.contracts.models import Priority

KOMBU_PRIORITY_SEP = "\x06\x16"
KOMBU_PRIORITY_STEPS = (0, 3, 6, 9)


@dataclass(frozen=True)
class Keys:
    """Names of the Redis keys under one prefix."""

    prefix: str

    def job(self, job_id: str) -> str:
        """The job record hash."""
        return f"{self.prefix}:job:{job_id}"

    def idem(self, key: str) -> str:
        """An idempotency-key claim."""
        return f"{self.prefix}:idem:{key}"

    def wait(self, priority: Priority | str) -> str:
        """The FIFO of jobs of one priority waiting for a slot."""
        return f"{self.prefix}:wait:{Priority(priority).value}"

    @property
    def slots(self) -> str:
        """ZSET job id -> slot lease deadline (ms)."""
        return f"{self.prefix}:slots"

    @property
    def track(self) -> str:
        """ZSET job id -> next due time of completion tracking (ms)."""
        return f"{self.prefix}:track"

    @property
    def delayed(self) -> str:
        """ZSET job id -> when a deferred job is dispatched again (ms)."""
        return f"{self.prefix}:delayed"

    @property
    def blocked(self) -> str:
        """ZSET of jobs blocked by the budget cap."""
        return f"{self.prefix}:blocked"

    @property
    def dlq(self) -> str:
        """ZSET of dead-lettered job ids."""
        return f"{self.prefix}:dlq"

    @property
    def events(self) -> str:
        """The result stream of terminal events."""
        return f"{self.prefix}:events"

    @property
    def housekeeper_lock(self) -> str:
        """Lock held by the one process running the periodic sweeps."""
        return f"{self.prefix}:housekeeper"


def celery_queue_keys(queue: str) -> list[str]:
    """Every Redis list kombu uses for ``queue`` (one per priority step)."""
    return [queue if step == 0 else f"{queue}{KOMBU_PRIORITY_SEP}{step}" for step in KOMBU_PRIORITY_STEPS]


def celery_queue_key(queue: str, priority: int) -> str:
    """The list a message of ``priority`` goes to (the largest step <= priority, like kombu)."""
    step = max(s for s in KOMBU_PRIORITY_STEPS if s <= max(0, priority))
    return queue if step == 0 else f"{queue}{KOMBU_PRIORITY_SEP}{step}"
