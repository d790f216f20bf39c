"""Fixtures for the fal emulator tests: one real emulator per session (reset per test) and a small test clip."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from falemu import EmulatorConfig, EmulatorServer
from tests.emulator.helpers import AUTH, DEFAULTS, make_clip


@pytest.fixture(scope="session")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 320x180 (16:9) 2 s clip with audio."""
    return make_clip(tmp_path_factory.mktemp("clips") / "clip.mp4")


@pytest.fixture(scope="session")
def server() -> Iterator[EmulatorServer]:
    """One emulator for the whole session."""
    with EmulatorServer(EmulatorConfig(**DEFAULTS)) as srv:
        yield srv


@pytest.fixture
def emu(server: EmulatorServer) -> EmulatorServer:
    """The session emulator with default config, no faults and an empty ledger."""
    server.configure(**DEFAULTS)
    server.reset()
    return server


@pytest.fixture
def http(emu: EmulatorServer) -> Iterator[httpx.Client]:
    """An httpx client for the emulator, authenticated with a well-formed key."""
    with httpx.Client(base_url=emu.url, headers=AUTH, timeout=15.0) as client:
        yield client


@pytest.fixture(scope="session")
def clip_url(server: EmulatorServer, clip: Path) -> str:
    """The clip uploaded into the emulator's storage (uploads survive resets)."""
    # A session fixture is set up before the test's own `emu` resets the config, so the keys a
    # previous test locked or revoked would refuse this upload (which test runs first depends on
    # how the files are spread over processes): start from the defaults.
    server.configure(**DEFAULTS)
    response = httpx.post(
        server.url + "/files/upload",
        content=clip.read_bytes(),
        headers={**AUTH, "Content-Type": "video/mp4", "X-Fal-File-Name": "clip.mp4"},
    )
    response.raise_for_status()
    url: str = response.json()["access_url"]
    return url
