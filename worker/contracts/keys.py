"""The Redis key layout (docs/design.md).

Every key we own starts with ``{prefix}`` in braces, a Redis Cluster hash tag: all of them hash to
one slot, so any script may touch any of them (Redis Cluster, Dragonfly) and every key a script
touches is passed in ``KEYS``.
"""

from __future__ import annotations

from dataclasses import dataclass

KOMBU_PRIORITY_SEP = "\x06\x16"
KOMBU_PRIORITY_STEPS = (0, 3, 6, 9)
#: kombu's Redis transport keeps delivered, unacknowledged messages in this HASH (delivery tag ->
#: ``[message, exchange, routing_key]``) until they are acked or restored after the visibility timeout.
KOMBU_UNACKED = "unacked"


def parse_budget_refusal(reply: str) -> tuple[str, str, str]:
    """The (day, month, tenant) a ``BUDGET_KEYS:<day>|<month>|<tenant>`` refusal of a budget
    script names (worker/contracts/lua/budget_lib.lua); tenant ``''`` when it has none."""
    day, month, tenant = [*reply.removeprefix("BUDGET_KEYS:").split("|"), "", ""][:3]
    return day, month, tenant


@dataclass(frozen=True)
class Keys:
    """Names of the Redis keys under one prefix."""

    prefix: str

    @property
    def root(self) -> str:
        """``{prefix}``: the hash-tagged start of every key (flow control builds on it too)."""
        return "{" + self.prefix + "}"

    def job(self, job_id: str) -> str:
        """The job record hash."""
        return f"{self.root}:job:{job_id}"

    def idem(self, key: str) -> str:
        """An idempotency-key claim."""
        return f"{self.root}:idem:{key}"

    @property
    def jobs_index(self) -> str:
        """ZSET job id -> created ms of every job (listings across tenants; trimmed past a horizon)."""
        return f"{self.root}:jobs:index"

    def tenant_jobs(self, tenant: str) -> str:
        """ZSET job id -> created ms of one tenant's jobs (its listings)."""
        return f"{self.root}:tenant:{tenant}:jobs"

    def tenant_limits(self, tenant: str) -> str:
        """HASH of one tenant's limits (``reframe tenants set``; worker/contracts/tenants.py)."""
        return f"{self.root}:tenant:{tenant}:limits"

    @property
    def tenants(self) -> str:
        """SET of the tenants that have limits."""
        return f"{self.root}:tenants"

    def budget_periods(self, day: str, month: str, tenant: str = "") -> list[str]:
        """The budget period HASHes of a UTC day and month: the cluster's, then ``tenant``'s (none
        for ``''``); a reservation or settlement changes all of them at once (budget_lib.lua)."""
        keys = [f"{self.root}:fc:budget:day:{day}", f"{self.root}:fc:budget:month:{month}"]
        if tenant:
            keys += [
                f"{self.root}:fc:budget:tenant:{tenant}:day:{day}",
                f"{self.root}:fc:budget:tenant:{tenant}:month:{month}",
            ]
        return keys

    @property
    def wait_queue(self) -> str:
        """ZSET (all scores 0) of the jobs waiting for a slot, ``<tenant>|<priority>|<seq>|<job>``:
        per tenant, by priority, then FIFO (worker/contracts/lua/slots_lib.lua)."""
        return f"{self.root}:wait:q"

    @property
    def ready_index(self) -> str:
        """ZSET (all scores 0) with one member per tenant that may take a slot, in the fair-share
        rule's order; derived inside the slot scripts from :attr:`wait_queue` (slots_lib.lua)."""
        return f"{self.wait_queue}:ready"

    @property
    def ready_high_index(self) -> str:
        """The members of :attr:`ready_index` whose best entry is high priority (reserved-high slots)."""
        return f"{self.wait_queue}:ready:high"

    @property
    def fair(self) -> str:
        """HASH of the slot pool's fair-share bookkeeping (slots per tenant, queue positions)."""
        return f"{self.root}:fc:fair"

    @property
    def tenant_params(self) -> str:
        """HASH ``w:<tenant>`` weight and ``max:<tenant>`` most concurrent slots, for the slot scripts."""
        return f"{self.root}:tenant:params"

    @property
    def waiting(self) -> str:
        """SET of the ids queued in the wait lists (flow control's slot pool)."""
        return f"{self.root}:fc:waiting"

    @property
    def reservations(self) -> str:
        """HASH job id -> budget reservation (flow control's budget)."""
        return f"{self.root}:fc:budget:res"

    @property
    def queued(self) -> str:
        """ZSET job id -> enqueue ms, of jobs whose first submit run has not started (lost-message sweep)."""
        return f"{self.root}:queued"

    @property
    def slots(self) -> str:
        """ZSET job id -> slot lease deadline (ms)."""
        return f"{self.root}:slots"

    @property
    def track(self) -> str:
        """ZSET job id -> next due time of completion tracking (ms); a claim is a due time ahead."""
        return f"{self.root}:track"

    @property
    def track_owner(self) -> str:
        """HASH job id -> ``process_id`` of the tracker whose claim it is."""
        return f"{self.root}:track:owner"

    @property
    def delayed(self) -> str:
        """ZSET job id -> when a deferred job is dispatched again (ms)."""
        return f"{self.root}:delayed"

    @property
    def blocked(self) -> str:
        """ZSET of jobs blocked by the budget cap."""
        return f"{self.root}:blocked"

    @property
    def dlq(self) -> str:
        """ZSET of dead-lettered job ids."""
        return f"{self.root}:dlq"

    @property
    def events(self) -> str:
        """The result stream of terminal events."""
        return f"{self.root}:events"

    @property
    def outbox(self) -> str:
        """ZSET event id -> when its callback is due (ms); a claim is a due time ahead."""
        return f"{self.root}:outbox"

    def outbox_entry(self, event_id: str) -> str:
        """HASH of one callback delivery: url, body snapshot, attempts, first_at_ms, last_error."""
        return f"{self.root}:outbox:{event_id}"

    @property
    def callbacks_failed(self) -> str:
        """ZSET event id -> when its callback was given up (ms); ``reframe callbacks redeliver``."""
        return f"{self.root}:callbacks:failed"

    @property
    def outputs_pending(self) -> str:
        """ZSET event id -> when its output copy is due (ms); a copier leases it by moving the time ahead."""
        return f"{self.root}:outputs:pending"

    @property
    def outputs_since(self) -> str:
        """ZSET event id -> when its job finished (ms) of every pending copy (given-up ones are in
        ``outputs_failed``): the oldest pending copy's age, against fal's media retention."""
        return f"{self.root}:outputs:since"

    def output_entry(self, event_id: str) -> str:
        """HASH of one output copy: fal's URL, the held event and callback, claims, tries, last error."""
        return f"{self.root}:output:{event_id}"

    @property
    def outputs_failed(self) -> str:
        """ZSET event id -> when its copy was given up (ms); ``reframe outputs retry`` takes them back."""
        return f"{self.root}:outputs:failed"

    @property
    def housekeeper_lock(self) -> str:
        """Lock held by the one process running the periodic sweeps."""
        return f"{self.root}:housekeeper"

    @property
    def ledger(self) -> str:
        """STREAM of the cost ledger: one entry per settlement or correction (worker/contracts/ledger.py)."""
        return f"{self.root}:ledger"

    def dedupe_leader(self, canonical: str) -> str:
        """STRING: the job in flight that does the work of canonical input ``canonical`` (its leader)."""
        return f"{self.root}:dedupe:{canonical}"

    def dedupe_done(self, canonical: str) -> str:
        """STRING: the job that succeeded with ``canonical`` (expires after ``dedupe_retention_s``)."""
        return f"{self.root}:dedupe:done:{canonical}"

    def dedupe_followers(self, canonical: str) -> str:
        """ZSET job id -> attached ms: jobs waiting for the leader of ``canonical``."""
        return f"{self.root}:dedupe:followers:{canonical}"

    @property
    def late_receipts(self) -> str:
        """STREAM of fal requests accepted for an attempt that had already lost (audited, cancelled)."""
        return f"{self.root}:late_receipts"


def celery_queue_keys(queue: str) -> list[str]:
    """Every Redis list kombu uses for ``queue`` (one per priority step)."""
    return [queue if step == 0 else f"{queue}{KOMBU_PRIORITY_SEP}{step}" for step in KOMBU_PRIORITY_STEPS]


def celery_queue_key(queue: str, priority: int) -> str:
    """The list a message of ``priority`` goes to (the largest step <= priority, like kombu)."""
    step = max(s for s in KOMBU_PRIORITY_STEPS if s <= max(0, priority))
    return queue if step == 0 else f"{queue}{KOMBU_PRIORITY_SEP}{step}"
