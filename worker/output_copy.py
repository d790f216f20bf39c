"""Copying finished outputs from fal's CDN into the output store: durable, leased, fenced work.

Finishing a job SUCCEEDED writes its copy entry in the same script as the terminal state
(``worker/contracts/lua/finish.lua``), with the job's result event and callback held in it; so a
crash between success and copy loses nothing. Every worker process runs one :class:`OutputCopier`
thread: it claims due entries with a lease (``output_claim.lua``), takes each with a claim number
(``output_take.lua``), and then:

1. streams the output from fal's URL through the guarded fetcher to a temporary file (bounded by
   ``output_max_bytes`` and ``output_copy_timeout_s``; never whole in memory), hashing it;
2. reads the file's container (:func:`worker.contracts.media.read_container`) and checks it against the
   request (:mod:`worker.output_verify`);
3. uploads it under its content-addressed key (:mod:`worker.output_store`), unless that key
   already holds it (a copy retried after a crash);
4. settles the try in one script fenced by the claim number (``output_settle.lua``): the held
   event and callback go out with both locations and the verification, the record learns them,
   and the settled charge is corrected to the verified duration (a ``correction`` ledger entry).

A failed try is retried with full-jitter backoff until ``output_copy_window_s`` has passed since the
job finished; then (or at once when fal answers 404/410: its file is gone) the copy is given up:
the event and callback go out with fal's URL and ``output_copy=failed``, and the entry waits in
``outputs:failed`` for ``reframe outputs retry``. Nothing here submits to fal: the copy only reads
the output fal already returned, so no retry can pay twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from worker.contracts.lua import load_lua, script_path
from worker.contracts.media import UnreadableVideo, read_container
from worker.contracts.netguard import BlockedURL, ResponseTooLarge
from worker.contracts.record import text
from worker.fal import backoff_s
from worker.flow.budget import billable_s
from worker.output_store import OutputStore, OutputStoreError, output_key
from worker.output_verify import Verdict, verify
from worker.runtime import Runtime

log = logging.getLogger(__name__)

#: fal's answers that mean its file is gone for good (retention over): no retry can help.
GONE_STATUSES = frozenset({404, 410})


class CopyFailed(Exception):
    """One copy try failed; ``permanent`` when retrying cannot help (fal's file is gone)."""

    def __init__(self, reason: str, *, permanent: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


@dataclass(frozen=True)
class Copied:
    """A stored and verified output."""

    key: str
    sha256: str
    size_bytes: int
    verdict: Verdict
    duration_s: float | None


def utc_day_month(at_ms: int) -> tuple[str, str]:
    """The UTC budget periods (``YYYY-MM-DD``, ``YYYY-MM``) of a Redis-time instant."""
    at = datetime.fromtimestamp(at_ms / 1000, UTC)
    return at.strftime("%Y-%m-%d"), at.strftime("%Y-%m")


class OutputCopier:
    """Copies due outputs of the whole cluster (any process may copy any entry)."""

    def __init__(self, rt: Runtime, store: OutputStore, *, interval_s: float = 0.2) -> None:
        self.rt = rt
        self.store = store
        self.interval_s = interval_s
        self.keys = rt.store.keys
        self._claim = rt.redis.register_script(load_lua(script_path(__file__, "output_claim")))
        self._take = rt.redis.register_script(load_lua(script_path(__file__, "output_take")))
        self._settle = rt.redis.register_script(load_lua(script_path(__file__, "output_settle")))
        self._renew = rt.redis.register_script(load_lua(script_path(__file__, "output_renew")))
        self._working: set[str] = set()  # event ids this process is copying (their claims are renewed)
        self._working_lock = threading.Lock()
        self._renewed_at = 0.0
        workers = rt.settings.output_copy_workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reframe-copy")
        self._slots = threading.Semaphore(workers * 2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="reframe-output-copy", daemon=True)

    def start(self) -> None:
        """Start the claiming thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop claiming; copies under way are not waited for (a download may take minutes): one
        that cannot settle before the process ends is handed back by its lease."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.renew_claims()
                self.run_once()
            except Exception:
                log.warning("output copy claim failed", exc_info=True)
            self._stop.wait(self.interval_s)

    def renew_claims(self, *, force: bool = False) -> int:
        """Keep the claims of the copies under way in this process (every third of the lease), so a
        long download keeps its copy while a copier that died or stopped hands its copies back one
        lease later; returns how many were renewed."""
        lease_ms = int(self.rt.settings.output_copy_lease_s * 1000)
        now = time.monotonic()
        if not force and now - self._renewed_at < lease_ms / 3000:
            return 0
        self._renewed_at = now
        with self._working_lock:
            working = sorted(self._working)
        if not working:
            return 0
        return int(self._renew(keys=[self.keys.outputs_pending], args=[lease_ms, *working]))

    def run_once(self, limit: int = 16) -> list[str]:
        """Claim due copies (as many as there are free copy slots) and start them; the claimed ids."""
        free = 0
        while free < limit and self._slots.acquire(blocking=False):
            free += 1
        if free == 0:
            return []
        lease_ms = int(self.rt.settings.output_copy_lease_s * 1000)
        try:
            ids = [text(x) for x in self._claim(keys=[self.keys.outputs_pending], args=[free, lease_ms])]
        except Exception:
            for _ in range(free):
                self._slots.release()
            raise
        for _ in range(free - len(ids)):
            self._slots.release()
        for event_id in ids:
            self._pool.submit(self._copy_released, event_id)
        return ids

    def _copy_released(self, event_id: str) -> None:
        with self._working_lock:
            self._working.add(event_id)
        try:
            self.copy_one(event_id)
        except Exception:
            log.exception("output copy %s crashed; its lease returns it", event_id)
        finally:
            with self._working_lock:
                self._working.discard(event_id)
            self._slots.release()

    # ------------------------------------------------------------------ one copy
    def copy_one(self, event_id: str) -> str:
        """Take, copy, verify and settle one entry.

        Returns ``copied``, ``retry``, ``failed``, ``lost`` (another copier owns it) or ``gone``."""
        k = self.keys
        raw = self._take(keys=[k.outputs_pending, k.output_entry(event_id)], args=[event_id])
        claim = int(raw[0])
        if claim == 0:
            return "gone"
        entry = {text(raw[i]): text(raw[i + 1]) for i in range(1, len(raw) - 1, 2)}
        started = time.monotonic()
        try:
            copied = self._copy(entry)
        except CopyFailed as failure:
            return self._failed_try(event_id, entry, claim, failure)
        seconds = time.monotonic() - started
        outcome = self._settle_copied(event_id, entry, claim, copied)
        if outcome == "copied":
            self.rt.metrics.output_copy("copied", seconds, copied.size_bytes)
            self.rt.metrics.output_verified(copied.verdict.result)
            if not copied.verdict.ok:
                log.warning("output of %s does not match its request: %s", event_id, copied.verdict.reasons)
        return outcome

    def _copy(self, entry: dict[str, str]) -> Copied:
        s = self.rt.settings
        with tempfile.TemporaryDirectory(prefix="reframe-copy-") as tmp:
            path = Path(tmp) / "output.mp4"
            sha, size = self._download(entry.get("source_url", ""), path)
            try:
                info = read_container(path)
            except (UnreadableVideo, OSError) as exc:
                raise CopyFailed(f"unreadable output: {exc}", permanent=True) from None
            measured_input = entry.get("input_duration_s") or ""
            verdict = verify(
                info,
                aspect_ratio=entry.get("aspect_ratio", ""),
                input_duration_s=float(measured_input) if measured_input else None,
                ratio_tolerance=s.output_ratio_tolerance,
                duration_tolerance_s=s.output_duration_tolerance_s,
            )
            key = output_key(entry.get("tenant", ""), sha)
            try:
                present = self.store.head(key)
                if present is None or present.size != size:
                    self.store.put_file(key, path)
            except OutputStoreError as exc:
                raise CopyFailed(f"store: {exc}") from None
        return Copied(key=key, sha256=sha, size_bytes=size, verdict=verdict, duration_s=info.duration_s)

    def _download(self, url: str, path: Path) -> tuple[str, int]:
        s = self.rt.settings
        digest = hashlib.sha256()
        size = 0
        try:
            with (
                self.rt.fetcher.stream(
                    url, timeout_s=s.output_copy_timeout_s, max_bytes=s.output_max_bytes
                ) as response,
                path.open("wb") as out,
            ):
                if response.status_code in GONE_STATUSES:
                    raise CopyFailed(f"fal's file is gone (http_{response.status_code})", permanent=True)
                if response.status_code != 200:
                    raise CopyFailed(f"fal answered http_{response.status_code}")
                for chunk in response.iter_bytes():
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
        except ResponseTooLarge:
            raise CopyFailed(f"output is over {s.output_max_bytes} bytes", permanent=True) from None
        except BlockedURL as exc:
            raise CopyFailed(f"blocked: {getattr(exc, 'reason', 'url')}", permanent=True) from None
        except httpx.HTTPError as exc:
            raise CopyFailed(f"download: {type(exc).__name__}") from None
        if size == 0:
            raise CopyFailed("empty output")
        return digest.hexdigest(), size

    # ------------------------------------------------------------------ settling
    def _failed_try(self, event_id: str, entry: dict[str, str], claim: int, failure: CopyFailed) -> str:
        s = self.rt.settings
        now = self.rt.now_ms()
        attempts = int(entry.get("attempts") or 0) + 1
        age_ms = now - int(entry.get("window_start_ms") or entry.get("created_at_ms") or now)
        if failure.permanent or age_ms >= s.output_copy_window_s * 1000:
            done = self._run_settle(
                event_id,
                entry,
                claim,
                "failed",
                error=failure.reason,
                record={"output_copy": "failed", "output_copy_error": failure.reason},
                event={"output_copy": "failed", "output_copy_error": failure.reason},
                cb_tail={"output": {"copy": "failed", "error": failure.reason}},
            )
            if done:
                self.rt.metrics.output_copy("gave_up")
                log.warning("output copy %s given up after %d tries (%s)", event_id, attempts, failure.reason)
            return "failed" if done else "lost"
        delay_s = backoff_s(attempts, base_s=1.0, cap_s=s.output_copy_backoff_cap_s, rng=self.rt.rng)
        done = self._run_settle(
            event_id,
            entry,
            claim,
            "retry",
            error=failure.reason,
            due_ms=now + int(delay_s * 1000),
            record={"output_copy": "retrying", "output_copy_error": failure.reason},
        )
        self.rt.metrics.output_copy("failed")
        log.info(
            "output copy %s try %d failed (%s); again in %.1f s", event_id, attempts, failure.reason, delay_s
        )
        return "retry" if done else "lost"

    def _settle_copied(self, event_id: str, entry: dict[str, str], claim: int, copied: Copied) -> str:
        s = self.rt.settings
        try:
            url = self.store.url(copied.key, expires_s=s.output_presign_expiry_s)
        except OutputStoreError:
            url = ""  # signing is offline for S3; a local store always has a URL
        expires_ms = self.rt.now_ms() + s.output_presign_expiry_s * 1000 if self.store.kind == "s3" else 0
        verification = copied.verdict.as_record()
        verified_s = "" if copied.duration_s is None else f"{copied.duration_s:.3f}"
        output = {
            "copy": "copied",
            "store": self.store.location,
            "key": copied.key,
            "url": url,
            "url_expires_at_ms": expires_ms or None,
            "sha256": copied.sha256,
            "bytes": copied.size_bytes,
            "verification": verification,
        }
        correction = self._correction(entry, copied.duration_s)
        record: dict[str, Any] = {
            "output_copy": "copied",
            "output_copy_error": "",
            "output_store": self.store.location,
            "output_key": copied.key,
            "output_sha256": copied.sha256,
            "output_bytes": copied.size_bytes,
            "output_verify": copied.verdict.result,
            "output_verification": json.dumps(verification, sort_keys=True),
            "output_verified_duration_s": verified_s,
            "output_copied_at_ms": self.rt.now_ms(),
        }
        if correction is not None:
            record["cost_actual_micro"] = int(entry.get("settled_micro") or 0) + correction[0]
        event = {
            "output_copy": "copied",
            "output_store": self.store.location,
            "output_key": copied.key,
            "output_url": url,
            "output_sha256": copied.sha256,
            "output_verify": copied.verdict.result,
            "output_verification": json.dumps(verification, sort_keys=True),
        }
        done = self._run_settle(
            event_id,
            entry,
            claim,
            "copied",
            record=record,
            event=event,
            cb_tail={"output": output},
            correction=correction,
        )
        return "copied" if done else "lost"

    def _correction(self, entry: dict[str, str], verified_s: float | None) -> tuple[int, str] | None:
        """(micro delta, billed seconds) moving the settled charge to the verified duration's, or None.

        fal bills whole units of the *output's* duration (worker/outcomes.py), so the verified
        duration of the stored file is what fal billed; the charge at success came from fal's word
        (the File's ``duration``) or a header read, and is corrected here when they differ."""
        settled = entry.get("settled_billed_s") or ""
        if verified_s is None or not settled:
            return None
        budget = self.rt.flow.budget
        billed = billable_s(verified_s, budget.billing_unit_s)
        if abs(billed - float(settled)) < 1e-3:
            return None
        delta = budget.estimate_micro(verified_s) - int(entry.get("settled_micro") or 0)
        return (delta, f"{billed:g}") if delta != 0 else None

    def _run_settle(
        self,
        event_id: str,
        entry: dict[str, str],
        claim: int,
        outcome: str,
        *,
        error: str = "",
        due_ms: int = 0,
        record: dict[str, Any] | None = None,
        event: dict[str, Any] | None = None,
        cb_tail: dict[str, Any] | None = None,
        correction: tuple[int, str] | None = None,
    ) -> bool:
        k = self.keys
        job_id = entry.get("job_id", "")
        tenant = entry.get("tenant", "")
        day, month = entry.get("res_day", ""), entry.get("res_month", "")
        if not day:
            day, month = utc_day_month(int(entry.get("created_at_ms") or 0))
        periods = self.rt.flow.budget.period_keys(day, month, tenant, padded=True)
        tail = json.dumps(cb_tail or {}, separators=(",", ":"), sort_keys=True, allow_nan=False)[1:-1]
        opt = {
            "claim": claim,
            "outcome": outcome,
            "due_ms": due_ms,
            "error": error,
            "failed_ttl_ms": int(self.rt.settings.dlq_retention_s * 1000),
            "set": {name: _field(v) for name, v in (record or {}).items()} or None,
            "event": {name: _field(v) for name, v in (event or {}).items()} or None,
            "cb_tail": tail,
            "correction": {"micro": correction[0], "billed_s": correction[1]} if correction else None,
        }
        raw = self._settle(
            keys=[
                k.outputs_pending,
                k.output_entry(event_id),
                k.outputs_failed,
                k.job(job_id),
                k.events,
                k.outbox,
                k.outbox_entry(event_id),
                *periods[:4],
                k.ledger,
                k.outputs_since,
            ],
            # None values are left out (cjson would make them userdata), as worker/contracts/store.py does
            args=[
                event_id,
                json.dumps({k: v for k, v in opt.items() if v is not None}, separators=(",", ":")),
            ],
        )
        if int(raw[0]) == 0:
            log.info("output copy %s: settle refused (%s): another copier owns it", event_id, text(raw[1]))
            return False
        if text(raw[1]):
            self.rt.metrics.result_published()
        return True


def _field(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return str(value)
