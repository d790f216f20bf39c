"""Shared fixtures: a real redis-server per test session (flushed per test), settings factories."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from config import Settings, load_settings
from reframe.localproc import RedisServer, start_redis


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak-long",
        action="store_true",
        default=False,
        help="run the long randomized soak (tests marked soak_long; not in CI)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--soak-long"):
        return
    skip = pytest.mark.skip(reason="long soak: pass --soak-long (REFRAME_SOAK_JOBS sets its size)")
    for item in items:
        if "soak_long" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server on a free loopback port for the whole session."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """The session server's URL, flushed before each test (arq's per-test flush)."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    yield redis_server.url


@pytest.fixture
def rclient(redis_url: str) -> Iterator[redis.Redis]:
    """A redis client (decoded responses) on the flushed test server."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def make_settings(redis_url: str) -> Callable[..., Settings]:
    """Build settings from an empty environment plus overrides (never the developer's env)."""

    def factory(**overrides: Any) -> Settings:
        base: dict[str, Any] = {
            "redis_url": redis_url,
            "fal_queue_url": "http://127.0.0.1:9",
            "metrics_port": 0,
        }
        base.update(overrides)
        return load_settings({}, **base)

    return factory


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A scratch directory for process logs and files."""
    return tmp_path
