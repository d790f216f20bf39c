"""Tenants of the HTTP API: who owns a job, and the per-tenant index that lists jobs.

A job enqueued over HTTP carries its tenant in its record (field ``tenant``, written by
``lua/tenant_tag.lua`` right after the enqueue script) and is indexed by created time in two
ZSETs: ``P:api:tenant:<tenant>:jobs`` and ``P:api:jobs`` (every tenant, for admins). Ownership is
read from the record itself, so checking it costs nothing beyond reading the job. Index entries
older than the longest a record can live are trimmed on every enqueue; entries whose record
expired sooner are skipped (and removed) when a listing meets them.

Idempotency keys are namespaced by tenant (``<tenant>:<key>``), so two tenants never share one.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from config import Settings
from worker.contracts.keys import Keys
from worker.contracts.lua import load_lua, script_path

#: Most index entries one listing request reads (a state filter may need to skip many).
MAX_SCAN_PER_PAGE = 2000
#: One extra day past the longest record life covers clock skew and slow finishing.
_SLACK_S = 86400.0


def index_horizon_ms(settings: Settings) -> int:
    """How long an index entry may be needed: the longest a job record can live after its creation."""
    life_s = settings.job_deadline_s + max(settings.job_retention_s, settings.dlq_retention_s) + _SLACK_S
    return int(life_s * 1000)


@dataclass(frozen=True)
class Cursor:
    """Where a listing page ended: the created time and id of its last entry."""

    created_at_ms: int
    job_id: str

    def encode(self) -> str:
        """Opaque text for ``next_cursor``."""
        return base64.urlsafe_b64encode(f"{self.created_at_ms}:{self.job_id}".encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        """Parse a cursor; :class:`ValueError` if it is not one of ours."""
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
            ms, job_id = raw.split(":", 1)
            cursor = cls(int(ms), job_id)
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise ValueError("not a cursor returned by this API") from None
        if cursor.created_at_ms < 0 or not job_id or len(job_id) > 64:
            raise ValueError("not a cursor returned by this API")
        return cursor


class TenantIndex:
    """The tenant tag on job records and the listing indexes."""

    def __init__(self, r: redis.Redis, settings: Settings) -> None:
        self.r = r
        self.keys = Keys(settings.key_prefix)
        self.all_jobs = f"{self.keys.root}:api:jobs"
        self.horizon_ms = index_horizon_ms(settings)
        self._tag = r.register_script(load_lua(script_path(__file__, "tenant_tag")))

    def tenant_jobs(self, tenant: str) -> str:
        """The index ZSET of one tenant."""
        return f"{self.keys.root}:api:tenant:{tenant}:jobs"

    @staticmethod
    def idempotency_key(tenant: str, key: str) -> str:
        """The library idempotency key for a tenant's key."""
        return f"{tenant}:{key}"

    def tag(self, tenant: str, job_ids: Sequence[str]) -> int:
        """Bind existing jobs to ``tenant`` and index them; returns how many records exist."""
        if not job_ids:
            return 0
        unique = list(dict.fromkeys(job_ids))
        keys = [self.tenant_jobs(tenant), self.all_jobs, *(self.keys.job(j) for j in unique)]
        return int(self._tag(keys=keys, args=[tenant, self.horizon_ms, *unique]))

    def page(
        self,
        tenant: str | None,
        *,
        after: Cursor | None,
        created_from_ms: int | None,
        created_to_ms: int | None,
        count: int,
    ) -> list[tuple[str, int]]:
        """Up to ``count`` (job id, created ms) entries after ``after``, oldest first, in range."""
        index = self.all_jobs if tenant is None else self.tenant_jobs(tenant)
        low = created_from_ms if created_from_ms is not None else 0
        if after is not None:
            low = max(low, after.created_at_ms)
        high: Any = created_to_ms if created_to_ms is not None else "+inf"
        out: list[tuple[str, int]] = []
        offset = 0
        while len(out) < count:
            chunk: Any = self.r.zrangebyscore(index, low, high, start=offset, num=count + 1, withscores=True)
            if not chunk:
                break
            offset += len(chunk)
            for member, score in chunk:
                job_id, ms = _text(member), int(score)
                # ties in created time are ordered by id (ZSET order), so the cursor is exact
                if after is not None and (ms, job_id) <= (after.created_at_ms, after.job_id):
                    continue
                out.append((job_id, ms))
                if len(out) == count:
                    break
        return out

    def forget(self, tenant: str | None, job_ids: Sequence[str]) -> None:
        """Drop index entries whose records expired."""
        if not job_ids:
            return
        pipe = self.r.pipeline(transaction=False)
        pipe.zrem(self.all_jobs, *job_ids)
        if tenant is not None:
            pipe.zrem(self.tenant_jobs(tenant), *job_ids)
        pipe.execute()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
