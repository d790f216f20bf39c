"""Packaging guards: our top-level names belong to our distribution; imports flow one way."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path


def test_the_wheel_declares_our_packages_explicitly() -> None:
    # packages_distributions() of an *installed wheel* is checked in tests/deploy/test_wheel.py
    # (an editable install has no RECORD of packages); here: the build config lists them explicitly.
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    packages = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    assert {"worker", "producer", "config"} <= set(packages)
    assert importlib.metadata.distribution("reframe-cluster").metadata["Name"] == "reframe-cluster"


def _modules_after_import(module: str) -> set[str]:
    code = f"import sys, json, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out))


def test_producer_never_loads_the_worker_runtime() -> None:
    loaded = _modules_after_import("producer")
    forbidden = {
        "httpx",
        "worker.fal",
        "worker.app",
        "worker.submit",
        "worker.tracker",
        "worker.flow",
        "worker.runtime",
        "celery.worker",
        "falemu",
    }
    assert not (loaded & forbidden), loaded & forbidden


def test_the_enqueue_side_imports_only_the_contracts_of_the_worker() -> None:
    """Every import in producer/ of a worker module, at any depth of the code (a function-level
    import counts too), is of worker.contracts."""
    root = Path(__file__).resolve().parents[2]
    bad = []
    for path in sorted((root / "producer").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [
                    f"{node.module}.{a.name}" for a in node.names if node.module == "worker"
                ]
            for name in names:
                if name.split(".")[0] == "worker" and not name.startswith("worker.contracts"):
                    bad.append(f"{path.relative_to(root)}:{node.lineno} {name}")
    assert bad == []


def test_producer_loads_no_httpx_or_pyav_until_it_fetches() -> None:
    loaded = _modules_after_import("producer")
    assert not (loaded & {"httpx", "av", "worker.contracts.netguard", "worker.contracts.media"})


def test_config_imports_nothing_of_ours() -> None:
    loaded = _modules_after_import("config")
    assert not {m for m in loaded if m.split(".")[0] in {"worker", "producer", "falemu", "reframe"}}


def test_importing_packages_does_no_work() -> None:
    # No settings read, no connections, no threads at import time.
    code = (
        "import threading, config, producer, worker, worker.app, worker.submit, worker.tracker;"
        "print(threading.active_count())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", "REFRAME_REDIS_URL": "not a url"},
    )
    assert out.stdout.strip() == "1"
