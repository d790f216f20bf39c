"""Lua scripts as files, loaded once and shared by every Redis client of the process.

Each ``.lua`` file opens with a header naming its ``KEYS``, ``ARGV`` and return value. A line
``-- @include NAME`` is replaced by ``NAME.lua`` from the including file's folder or, failing that,
from this folder (for example ``now``, the one Redis-time helper), so helpers exist once instead of
being pasted into every script. Libraries (``*_lib.lua``) define functions over variables that the
including script declares first; their headers say which.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

_INCLUDE = re.compile(r"^--\s*@include\s+([A-Za-z0-9_./]+)\s*$", re.MULTILINE)
INCLUDE_DIR = Path(__file__).resolve().parent


@functools.cache
def load_lua(path: Path | str) -> str:
    """The text of the script at ``path`` with every ``-- @include NAME`` expanded (cached)."""
    here = Path(path).resolve()
    source = here.read_text(encoding="utf-8")

    def expand(match: re.Match[str]) -> str:
        local = here.parent / f"{match.group(1)}.lua"
        return load_lua(local if local.exists() else INCLUDE_DIR / f"{match.group(1)}.lua")

    return _INCLUDE.sub(expand, source)


def script_path(owner_file: str, name: str) -> Path:
    """``name``.lua in the ``lua/`` folder beside the module file ``owner_file`` (pass ``__file__``)."""
    return Path(owner_file).resolve().parent / "lua" / f"{name}.lua"
