"""Small helpers shared by the flow-control primitives (not public).

Every primitive keeps its state in Redis and makes each decision in one Lua script, so all workers
see the same state and no decision can interleave with another. Scripts read the clock with Redis
``TIME``: worker clocks may be skewed, the Redis clock is the one clock the cluster shares.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.commands.core import Script

#: Lua helper prepended to scripts that need the time: Redis ``TIME`` as integer milliseconds and
#: microseconds. Doubles hold integers exactly up to 2^53 (about year 2255 in microseconds).
LUA_NOW = """
local __t = redis.call('TIME')
local now_us = tonumber(__t[1]) * 1000000 + tonumber(__t[2])
local now_ms = math.floor(now_us / 1000)
"""


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
