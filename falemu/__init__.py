"""A protocol-faithful emulator of fal's queue API for Luma Ray 2 Flash Reframe.

Public surface: :class:`EmulatorConfig`, :func:`create_app`, :class:`EmulatorServer`, :func:`cli_main`.
Imports are lazy so that ``import falemu`` does no work and pulls in neither uvicorn nor ffmpeg.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from falemu.app import create_app
    from falemu.config import EmulatorConfig
    from falemu.server import EmulatorServer, cli_main

__all__ = ["EmulatorConfig", "EmulatorServer", "cli_main", "create_app"]

_WHERE = {
    "EmulatorConfig": "falemu.config",
    "create_app": "falemu.app",
    "EmulatorServer": "falemu.server",
    "cli_main": "falemu.server",
}


def __getattr__(name: str) -> Any:
    module_name = _WHERE.get(name)
    if module_name is None:
        raise AttributeError(f"module 'falemu' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module_name), name)
