"""The pool of fal accounts: ids, per-account caps and rates, and where each key comes from.

``REFRAME_FAL_ACCOUNTS`` lists the accounts as ``id:cap[:rate_per_s[:daily_usd[:monthly_usd]]]``
separated by commas (``team-a:3,team-b:5:2.5``, ``team-c:2:-:40:900``: an empty or ``-`` field is
none: the cluster's rate, no budget of its own); ``REFRAME_FAL_ACCOUNT_KEYS`` (a secret) maps ids
to fal keys as ``id=key_id:key_secret; id2=...``. An account missing from the keys uses
``FAL_KEY`` (at most one may: two ids on one key would be one fal account counted twice). Unset,
the pool is one account, ``default``, with ``REFRAME_MAX_CONCURRENCY`` slots and ``FAL_KEY``:
today's single-account setup.

Parsing only: nothing here reads the environment (config/settings.py does) and no message names a key.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

#: The id of the one account of a configuration without ``REFRAME_FAL_ACCOUNTS``.
DEFAULT_ACCOUNT = "default"
#: Account ids label metrics and Redis fields: short, lower case, no separators of the slot scripts.
ACCOUNT_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
#: More accounts than this is a typo, not a pool (and it bounds the metrics' label values).
MAX_ACCOUNTS = 32
#: The largest budget an account may declare (as REFRAME_BUDGET_DAILY_USD's bound).
MAX_ACCOUNT_BUDGET_USD = 1e9
_FORMAT = (
    "must be id:cap[:rate_per_s[:daily_usd[:monthly_usd]]] (id: a-z, 0-9, _ and -, at most 32 characters)"
)


@dataclass(frozen=True, slots=True)
class AccountSpec:
    """One fal account as declared: its id, its cap of requests in flight, its own submit rate and
    its own budget per UTC day and month in dollars (None: none)."""

    id: str
    cap: int
    rate_per_s: float | None = None
    daily_usd: float | None = None
    monthly_usd: float | None = None

    @property
    def has_budget(self) -> bool:
        """True when the account declares a daily or a monthly budget."""
        return self.daily_usd is not None or self.monthly_usd is not None


def _optional_number(text: str) -> float | None:
    text = text.strip()
    if text in ("", "-"):
        return None
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def parse_accounts(text: str) -> list[AccountSpec]:
    """``id:cap[:rate_per_s[:daily_usd[:monthly_usd]]],...`` as specs in the given order (ValueError
    naming the bad entry; an empty or ``-`` optional field is none)."""
    out: list[AccountSpec] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        fields = [f.strip() for f in part.split(":")]
        if not 2 <= len(fields) <= 5 or not ACCOUNT_ID.fullmatch(fields[0]):
            raise ValueError(f"entry {part!r}: {_FORMAT}")
        fields += [""] * (5 - len(fields))
        try:
            cap = int(fields[1])
            rate = _optional_number(fields[2])
        except ValueError:
            raise ValueError(f"entry {part!r}: cap must be an integer and rate a number") from None
        if cap < 1 or (rate is not None and not 0 < rate < 1e6):
            raise ValueError(f"entry {part!r}: cap must be >= 1 and rate > 0")
        try:
            daily, monthly = _optional_number(fields[3]), _optional_number(fields[4])
        except ValueError:
            raise ValueError(
                f"entry {part!r}: daily_usd and monthly_usd must be numbers (or - for none)"
            ) from None
        if any(b is not None and not 0 <= b <= MAX_ACCOUNT_BUDGET_USD for b in (daily, monthly)):
            raise ValueError(
                f"entry {part!r}: daily_usd and monthly_usd must be in [0, {MAX_ACCOUNT_BUDGET_USD:g}]"
            )
        if any(a.id == fields[0] for a in out):
            raise ValueError(f"account {fields[0]!r} is listed twice")
        out.append(AccountSpec(fields[0], cap, rate, daily, monthly))
    if len(out) > MAX_ACCOUNTS:
        raise ValueError(f"at most {MAX_ACCOUNTS} accounts")
    return out


def parse_account_keys(text: str) -> dict[str, str]:
    """``id=key; id2=key2`` as {id: key}; the message of a ValueError names the id, never the key."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        account, sep, key = part.partition("=")
        account, key = account.strip(), key.strip()
        if not sep or not ACCOUNT_ID.fullmatch(account):
            raise ValueError("each entry must be id=key_id:key_secret (id: a-z, 0-9, _ and -)")
        if not key:
            raise ValueError(f"account {account!r} has an empty key")
        out[account] = key
    return out


def pool_specs(accounts_text: str, max_concurrency: int) -> list[AccountSpec]:
    """The declared accounts, or the one ``default`` account with ``max_concurrency`` slots."""
    return parse_accounts(accounts_text) or [AccountSpec(DEFAULT_ACCOUNT, max_concurrency)]


def check_keys(specs: list[AccountSpec], keys: dict[str, str]) -> None:
    """Every key names a declared account."""
    unknown = sorted(set(keys) - {a.id for a in specs})
    if unknown:
        raise ValueError(f"keys for undeclared accounts: {', '.join(unknown)}")


def keyless_problem(specs: list[AccountSpec], keys: dict[str, str]) -> str | None:
    """Why the accounts cannot all call fal with a key of their own, or None: at most one account
    may fall back to ``FAL_KEY`` (two would be one fal account counted twice). Checked where fal is
    called (workers); the exporter and the API need no account key."""
    without = [a.id for a in specs if a.id not in keys]
    if len(without) > 1:
        return f"accounts {', '.join(without)} have no key: at most one may use FAL_KEY"
    return None
