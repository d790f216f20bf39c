"""Listing jobs by tenant over HTTP: the cursor and the pages of the listing indexes.

Every job carries its tenant in its record (field ``tenant``) and is indexed by created time in
two ZSETs, both written by the enqueue script itself (worker/contracts/lua/enqueue.lua), so a job
is never without its tenant or its index entry: ``Keys.tenant_jobs(tenant)`` and
``Keys.jobs_index`` (every tenant, for admins). Ownership is read from the record, so checking it
costs nothing beyond reading the job. The enqueue script trims index entries older than the
longest a record can live; entries whose record expired sooner are skipped (and removed) when a
listing meets them.
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

#: Most index entries one listing request reads (a state filter may need to skip many).
MAX_SCAN_PER_PAGE = 2000


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
    """Pages of the listing indexes."""

    def __init__(self, r: redis.Redis, settings: Settings) -> None:
        self.r = r
        self.keys = Keys(settings.key_prefix)

    def page(
        self,
        tenant: str | None,
        *,
        after: Cursor | None,
        created_from_ms: int | None,
        created_to_ms: int | None,
        count: int,
        newest_first: bool = False,
    ) -> list[tuple[str, int]]:
        """Up to ``count`` (job id, created ms) entries after ``after``, oldest first (newest first
        with ``newest_first``), in range."""
        index = self.keys.jobs_index if tenant is None else self.keys.tenant_jobs(tenant)
        low: Any = created_from_ms if created_from_ms is not None else 0
        high: Any = created_to_ms if created_to_ms is not None else "+inf"
        if after is not None and newest_first:
            high = after.created_at_ms if high == "+inf" else min(high, after.created_at_ms)
        elif after is not None:
            low = max(low, after.created_at_ms)
        out: list[tuple[str, int]] = []
        offset = 0
        while len(out) < count:
            if newest_first:
                chunk: Any = self.r.zrevrangebyscore(
                    index, high, low, start=offset, num=count + 1, withscores=True
                )
            else:
                chunk = self.r.zrangebyscore(index, low, high, start=offset, num=count + 1, withscores=True)
            if not chunk:
                break
            offset += len(chunk)
            for member, score in chunk:
                job_id, ms = _text(member), int(score)
                # ties in created time are ordered by id (ZSET order), so the cursor is exact
                if after is not None and _passed((ms, job_id), after, newest_first=newest_first):
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
        pipe.zrem(self.keys.jobs_index, *job_ids)
        if tenant is not None:
            pipe.zrem(self.keys.tenant_jobs(tenant), *job_ids)
        pipe.execute()


def _passed(entry: tuple[int, str], after: Cursor, *, newest_first: bool) -> bool:
    """True when ``entry`` is at or before the cursor in the listing's order."""
    mark = (after.created_at_ms, after.job_id)
    return entry >= mark if newest_first else entry <= mark


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
