"""Small helpers shared by the flow-control primitives (not public).

Every primitive keeps its state in Redis and makes each decision in one Lua script (``lua/``), so
all workers see the same state and no decision can interleave with another. Scripts read the clock
with Redis ``TIME`` (``-- @include now``): worker clocks may be skewed, the Redis clock is the one
clock the cluster shares.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.commands.core import Script


def text(value: Any) -> str:
    """A Redis reply as ``str``, whether the client decodes responses or not."""
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


def as_int(value: Any) -> int:
    """A Redis integer (or numeric string) reply as ``int``."""
    if isinstance(value, bytes):
        value = value.decode()
    return int(value)


def as_texts(values: Any) -> list[str]:
    """A Redis array reply as a list of ``str``."""
    return [text(v) for v in values or ()]


def run(script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
    """Run ``script`` with string keys and arguments; returns the raw reply."""
    return script(keys=list(keys), args=list(args))
