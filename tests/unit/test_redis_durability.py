"""The Redis client factory, the replicas' acknowledgement and the judgement of a Redis' promise
(worker/contracts/connect.py, durable.py, redis_promise.py), against real redis-servers."""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.sentinel import SentinelConnectionPool

from config import SettingsError, load_settings
from reframe.localproc import RedisServer, start_redis, wait_until
from worker.app import celery_config
from worker.contracts.connect import broker_transport_options, broker_url, redis_client
from worker.contracts.durable import NotReplicated, Replication
from worker.contracts.redis_promise import RedisPromise, read_promise, risks


# ---------------------------------------------------------------------- settings and the factory
def test_sentinel_addresses_are_parsed_and_bad_ones_named() -> None:
    s = load_settings({"REFRAME_REDIS_SENTINELS": " 10.0.0.1:26379, redis-sentinel:26380 "})
    assert s.sentinel_addresses == [("10.0.0.1", 26379), ("redis-sentinel", 26380)]
    with pytest.raises(SettingsError, match="REFRAME_REDIS_SENTINELS"):
        load_settings({"REFRAME_REDIS_SENTINELS": "host-without-port"})
    with pytest.raises(SettingsError, match="REFRAME_REDIS_SENTINELS"):
        load_settings({"REFRAME_REDIS_SENTINELS": "h:99999"})


def test_broker_url_plain_and_sentinel() -> None:
    plain = load_settings({"REFRAME_REDIS_URL": "redis://:old@db:6379/2"})
    assert broker_url(plain) == "redis://:old@db:6379/2"
    assert broker_transport_options(plain) == {}
    # REFRAME_REDIS_PASSWORD wins over the URL's, quoted for the URL.
    secret = load_settings({"REFRAME_REDIS_URL": "redis://:old@db:6379/2", "REFRAME_REDIS_PASSWORD": "n/w@x"})
    assert broker_url(secret) == "redis://:n%2Fw%40x@db:6379/2"
    sentinel = load_settings(
        {
            "REFRAME_REDIS_URL": "redis://ignored:6379/3",
            "REFRAME_REDIS_SENTINELS": "s1:26379,s2:26379",
            "REFRAME_REDIS_MASTER_NAME": "reframe",
            "REFRAME_REDIS_PASSWORD": "p",
            "REFRAME_REDIS_SENTINEL_PASSWORD": "sp",
        }
    )
    assert broker_url(sentinel) == "sentinel://:p@s1:26379/3;sentinel://:p@s2:26379/3"
    options = celery_config(sentinel)["broker_transport_options"]
    assert options["master_name"] == "reframe" and options["sentinel_kwargs"] == {"password": "sp"}
    assert options["visibility_timeout"] == int(sentinel.visibility_timeout_s)  # ours are kept


def test_clients_take_the_password_setting_and_follow_sentinel() -> None:
    s = load_settings({"REFRAME_REDIS_URL": "redis://:old@db:6379/1", "REFRAME_REDIS_PASSWORD": "new"})
    client = redis_client(s, socket_timeout=1)
    assert client.connection_pool.connection_kwargs["password"] == "new"
    assert client.connection_pool.connection_kwargs["db"] == 1
    client.close()
    s = load_settings(
        {
            "REFRAME_REDIS_URL": "redis://127.0.0.1/4",
            "REFRAME_REDIS_SENTINELS": "127.0.0.1:1",
            "REFRAME_REDIS_PASSWORD": "new",
        }
    )
    client = redis_client(s, socket_timeout=1)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "mymaster"
    assert pool.connection_kwargs["password"] == "new" and pool.connection_kwargs["db"] == 4
    client.close()


def test_the_redacted_settings_and_cli_never_show_the_passwords() -> None:
    s = load_settings({"REFRAME_REDIS_PASSWORD": "hunter2", "REFRAME_REDIS_SENTINEL_PASSWORD": "s3cret"})
    shown = repr(s.redacted())
    assert "hunter2" not in shown and "s3cret" not in shown


# ---------------------------------------------------------------------- what a Redis promises
SAFE = RedisPromise(role="master", aof_enabled=True, appendfsync="everysec", replicas=1)


@pytest.mark.parametrize(
    ("promise", "min_replicas", "expected"),
    [
        (SAFE, 1, []),
        (RedisPromise("master", True, "always", 0), 0, []),
        (RedisPromise("master", False, "everysec", 1), 1, ["AOF is off"]),
        (RedisPromise("master", True, "no", 1), 1, ["appendfsync no"]),
        (
            RedisPromise("master", True, "everysec", 0),
            0,
            ["appendfsync everysec and REFRAME_REDIS_MIN_REPLICAS=0"],
        ),
        (RedisPromise("master", True, None, 0), 0, ["appendfsync cannot be read"]),
        (RedisPromise("master", True, None, 2), 2, []),  # managed: CONFIG refused, replicas acknowledge
        (
            RedisPromise("master", True, "everysec", 0),
            1,
            ["0 replica(s) in sync, REFRAME_REDIS_MIN_REPLICAS=1"],
        ),
        (RedisPromise("slave", True, "always", 0), 0, ["is a slave, not the primary"]),
    ],
)
def test_risks(promise: RedisPromise, min_replicas: int, expected: list[str]) -> None:
    found = risks(promise, min_replicas=min_replicas)
    assert len(found) == len(expected), found
    for line, text in zip(found, expected, strict=True):
        assert text in line and "\n" not in line


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    primary = start_redis(tmp_path / "primary", appendonly=True)
    replica = start_redis(tmp_path / "replica", appendonly=True, replica_of=primary.port)
    try:
        client = redis.Redis(port=primary.port)
        wait_until(lambda: read_promise(client).replicas == 1, timeout_s=20, what="replica in sync")
        client.close()
        # and done writing its first AOF (a replica refuses SIGTERM until then)
        rep = redis.Redis(port=replica.port)
        wait_until(
            lambda: not int(rep.info("persistence")["aof_rewrite_in_progress"]),
            timeout_s=20,
            what="replica AOF",
        )
        rep.close()
        yield primary, replica
    finally:
        replica.stop()
        primary.stop()


def test_read_promise_of_real_servers(pair: tuple[RedisServer, RedisServer], redis_url: str) -> None:
    primary, _replica = pair
    client = redis.Redis(port=primary.port)
    assert read_promise(client) == RedisPromise("master", True, "always", 1)
    client.close()
    session = redis.Redis.from_url(redis_url)  # no AOF, no replica
    assert read_promise(session) == RedisPromise("master", False, "everysec", 0)
    session.close()


# ---------------------------------------------------------------------- the acknowledgement
def test_confirm_waits_for_the_replica(pair: tuple[RedisServer, RedisServer]) -> None:
    primary, replica = pair
    client = redis.Redis(port=primary.port)
    wait = Replication(1, 1000)
    with wait.pinned(client) as one:
        one.set("k", "v")
        wait.confirm(one, "k")  # acknowledged: returns
    assert redis.Redis(port=replica.port).get("k") == b"v"
    replica.process.kill(signal.SIGSTOP)
    try:
        with wait.pinned(client) as one:
            one.set("k", "w")
            with pytest.raises(
                NotReplicated, match=r"k: 0 of 1 Redis replicas acknowledged it within 1000 ms"
            ):
                wait.confirm(one, "k")
    finally:
        replica.process.kill(signal.SIGCONT)
    client.close()


def test_a_connection_remade_between_write_and_wait_is_not_an_acknowledgement(
    pair: tuple[RedisServer, RedisServer],
) -> None:
    """``WAIT`` on a fresh connection covers no write and answers at once: counting that as an
    acknowledgement would let an unreplicated intent through."""
    primary, _replica = pair
    client = redis.Redis(port=primary.port)
    other = redis.Redis(port=primary.port)
    wait = Replication(1, 1000)
    with wait.pinned(client) as one:
        pinned_id = one.client_id()
        one.set("k", "v")
        other.client_kill_filter(_id=pinned_id)  # the server drops the pinned connection
        with pytest.raises(NotReplicated, match="re-made after the write"):
            wait.confirm(one, "k")
    client.close()
    other.close()


def test_no_replicas_wanted_means_no_wait(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    wait = Replication(0, 1)
    with wait.pinned(client) as one:
        assert one is client
        one.set("k", "v")
        wait.confirm(one, "k")
    client.close()


def test_every_product_client_comes_from_the_factory() -> None:
    """A client made elsewhere would not follow Sentinel (nor take REFRAME_REDIS_PASSWORD)."""
    root = Path(__file__).resolve().parents[2]
    allowed = {
        "worker/contracts/connect.py",  # the factory
        "worker/contracts/durable.py",  # a pinned client on the factory's pool
        "reframe/localproc.py",  # local test servers on loopback ports
        "reframe/localcluster.py",  # the local cluster's own plain Redis
    }
    found = []
    for package in ("config", "producer", "worker", "reframe"):
        for path in (root / package).rglob("*.py"):
            rel = path.relative_to(root).as_posix()
            text = path.read_text()
            if rel not in allowed and re.search(r"\bfrom_url\(|\bRedis\(|\bStrictRedis\(|\bSentinel\(", text):
                found.append(rel)
    assert found == [], f"make Redis clients with worker.contracts.connect: {found}"
