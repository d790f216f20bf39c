"""checkov (its own venv, .venv-checkov) on the deployable overlays and on the Dockerfile.

Skips live in k8s/.checkov.yaml, each with its justification; this test also keeps that list honest.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.deploy.conftest import INSTALL_HINT, ROOT, kubectl, run

CONFIG = ROOT / "k8s" / ".checkov.yaml"
CHECKOV = ROOT / ".venv-checkov" / "bin" / "checkov"


def checkov(*args: str) -> str:
    if not CHECKOV.is_file():
        pytest.fail(f"{CHECKOV.relative_to(ROOT)} is missing; {INSTALL_HINT}", pytrace=False)
    env = dict(os.environ)
    # checkov's kustomize framework shells out to kubectl (or kustomize)
    env["PATH"] = f"{Path(kubectl()).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("VIRTUAL_ENV", None)
    proc = run([str(CHECKOV), "--config-file", str(CONFIG), *args], cwd=ROOT, env=env, timeout=180)
    assert proc.returncode == 0, f"checkov {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_checkov_overlays() -> None:
    out = checkov("-d", "k8s/overlays", "--framework", "kustomize")
    m = re.search(r"Passed checks: (\d+), Failed checks: (\d+)", out)
    assert m and int(m.group(1)) > 100 and m.group(2) == "0", out


def test_checkov_dockerfile() -> None:
    out = checkov("-f", "Dockerfile", "--framework", "dockerfile")
    m = re.search(r"Passed checks: (\d+), Failed checks: (\d+)", out)
    assert m and int(m.group(1)) > 10 and m.group(2) == "0", out


def test_every_skip_is_justified() -> None:
    lines = CONFIG.read_text().splitlines()
    start = lines.index("skip-check:")
    for i, line in enumerate(lines[start + 1 :], start + 1):
        m = re.match(r"\s+- (CKV\S+)", line)
        if m:
            assert lines[i - 1].strip().startswith("#") and m.group(1) in "\n".join(lines[start:i]), (
                f"{m.group(1)}: put a justification comment naming the check right above it"
            )
