"""The Dockerfile: hadolint clean, pinned base, non-root, exec-form entrypoint, venv-only runtime."""

from __future__ import annotations

import json
import re
import tomllib

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


def test_base_image_pinned_and_shared() -> None:
    froms = [s[0].split()[1] for s in stages().values()]
    assert list(stages()) == ["builder", "runtime"]
    assert len(set(froms)) == 1, f"builder and runtime must share one base: {froms}"
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", froms[0]), froms[0]


def test_runtime_stage() -> None:
    rt = stages()["runtime"]
    text = "\n".join(rt)
    copies = [i for i in rt if i.upper().startswith(("COPY", "ADD"))]
    assert copies == ["COPY --from=builder /opt/venv /opt/venv"], f"runtime copies only the venv: {copies}"
    assert re.search(r"^USER 10001:10001$", text, re.M)
    env = " ".join(i for i in rt if i.startswith("ENV "))
    for item in ("PYTHONUNBUFFERED=1", "HOME=/tmp", "PATH=/opt/venv/bin:$PATH"):
        assert item in env, f"runtime ENV lacks {item}"
    entry = [i for i in rt if i.startswith("ENTRYPOINT")]
    cmd = [i for i in rt if i.startswith("CMD")]
    assert json.loads(entry[-1].split(None, 1)[1]) == ["reframe"], 'exec-form ENTRYPOINT ["reframe"]'
    assert json.loads(cmd[-1].split(None, 1)[1]) == ["worker"]
    assert "EXPOSE 17300" in rt
    assert "EXPOSE 8080" in rt, "reframe serve listens on REFRAME_API_PORT (8080)"
    # the smoke test runs as the final user, after the venv is in place
    runs = [i for i in rt if i.startswith("RUN")]
    assert any("reframe --help" in r and "import" in r for r in runs), (
        "import smoke test in the runtime stage"
    )
    assert text.index("USER 10001") < text.index("reframe --help")


def test_header_documents_every_command_the_manifests_run() -> None:
    """The header comment lists each `reframe` command of the image, with its port."""
    header = DOCKERFILE.read_text().split("FROM", 1)[0]
    for command in ("worker", "exporter", "serve", "emulator"):
        assert re.search(rf"^#\s+reframe {command}\b", header, re.M), (
            f"header does not list reframe {command}"
        )
    assert re.search(r"^#\s+reframe serve\b.*:8080", header, re.M), "the API's port"


def test_builder_installs_the_wheel_with_the_emulator_extra() -> None:
    builder = "\n".join(stages()["builder"])
    assert "pip wheel" in builder or "python -m build" in builder
    assert "[emulator]" in builder and "/opt/venv" in builder


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
