"""What writes that survive a failover cost, and how long a Sentinel failover leaves us without Redis.

    python -m bench.durable               # every part (~1 minute on 2 cores)
    python -m bench.durable enqueue       # enqueue rate with and without a replica's acknowledgement
    python -m bench durable               # the same through the bench runner

Real redis-servers on loopback: a primary with AOF (``appendfsync everysec``) and one replica, and
for the failover part three Sentinels (``down-after-milliseconds`` 1000, as in
tests/chaos/test_sentinel_failover.py). Nothing is asserted; the tables print the figures.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import redis

from bench.report import Parts, Row, parts_main, pct, run_parts
from config import load_settings
from producer import Producer
from reframe.localproc import RedisServer, start_redis, start_sentinel, wait_until
from worker.contracts.connect import redis_client


def _pair(work: Path) -> tuple[RedisServer, RedisServer]:
    primary = start_redis(work / "primary", appendonly=True)
    replica = start_redis(work / "replica", appendonly=True, replica_of=primary.port)
    client = redis.Redis(port=primary.port)
    wait_until(
        lambda: int(client.info("replication")["connected_slaves"]) == 1, timeout_s=30, what="replica in sync"
    )
    client.close()
    return primary, replica


def bench_enqueue(work: Path, n: int = 1000) -> list[Row]:
    """``Producer.enqueue`` one at a time (one Lua script each), then + ``WAIT 1``."""
    primary, replica = _pair(work / "enqueue")
    rows: list[Row] = []
    try:
        for wanted in (0, 1):
            settings = load_settings(
                {"REFRAME_REDIS_URL": primary.url, "REFRAME_REDIS_MIN_REPLICAS": str(wanted)}
            )
            with Producer(settings) as p:
                took: list[float] = []
                for i in range(n):
                    started = time.perf_counter()
                    p.enqueue(
                        {"video_url": f"https://cdn.example.com/{wanted}-{i}.mp4", "aspect_ratio": "9:16"}
                    )
                    took.append(time.perf_counter() - started)
            rate = n / sum(took)
            label = "acknowledged by 1 replica (WAIT)" if wanted else "no wait"
            rows.append(
                (
                    f"enqueue(), {label}",
                    f"{rate:,.0f} jobs/s, p50 {pct(took, 0.5) * 1e3:.2f} ms, p99 {pct(took, 0.99) * 1e3:.2f} ms",
                    "",
                )
            )
    finally:
        replica.stop()
        primary.stop()
    return rows


def bench_failover(work: Path, rounds: int = 3) -> list[Row]:
    """SIGKILL the primary while a Sentinel-backed client writes every 10 ms: the longest gap
    between two acknowledged writes, per round (the old primary returns as a replica each time)."""
    primary, replica = _pair(work / "failover")
    nodes = {primary.port: primary, replica.port: replica}
    dirs = {primary.port: work / "failover" / "primary", replica.port: work / "failover" / "replica"}
    sentinels = [start_sentinel(work / "failover" / f"s{i}", master_port=primary.port) for i in range(3)]
    addresses = ",".join(f"127.0.0.1:{s.port}" for s in sentinels)
    settings = load_settings({"REFRAME_REDIS_SENTINELS": addresses, "REFRAME_REDIS_MIN_REPLICAS": "1"})
    client = redis_client(settings, socket_timeout=1, socket_connect_timeout=1)
    gaps: list[float] = []
    try:
        for _ in range(rounds):
            port = int(client.connection_pool.get_master_address()[1])  # type: ignore[attr-defined]
            acked: list[float] = []
            stop = threading.Event()

            def writer(stop: threading.Event = stop, acked: list[float] = acked) -> None:
                while not stop.is_set():
                    try:
                        client.incr("bench:failover")
                        acked.append(time.monotonic())
                    except redis.RedisError:
                        pass
                    stop.wait(0.01)

            thread = threading.Thread(target=writer, daemon=True)
            thread.start()
            wait_until(lambda acked=acked: len(acked) > 50, timeout_s=10, what="writes before the kill")
            killed_at = time.monotonic()
            nodes[port].process.kill(signal.SIGKILL)
            nodes[port].process.popen.wait(timeout=10)
            wait_until(
                lambda acked=acked, at=killed_at: bool(acked) and acked[-1] > at + 0.2,
                timeout_s=60,
                what="writes again",
            )
            stop.set()
            thread.join(5)
            before = max(t for t in acked if t <= killed_at)
            after = min(t for t in acked if t > killed_at)
            gaps.append(after - before)
            new = int(client.connection_pool.get_master_address()[1])  # type: ignore[attr-defined]
            nodes[port] = start_redis(dirs[port], port=port, appendonly=True, replica_of=new)
            check = redis.Redis(port=new)
            wait_until(
                lambda check=check: int(check.info("replication")["connected_slaves"]) == 1,
                timeout_s=30,
                what="old primary back as a replica",
            )
            check.close()
    finally:
        client.close()
        for s in sentinels:
            s.stop()
        for node in nodes.values():
            node.process.kill()
            node.stop()
    return [
        (
            "no Redis for writes across a Sentinel failover (down-after 1000 ms)",
            ", ".join(f"{g:.2f} s" for g in gaps),
            "",
        )
    ]


SCENARIOS: Parts = {
    "enqueue": ("Enqueue with and without a replica's acknowledgement", bench_enqueue),
    "failover": ("Sentinel failover as a client sees it", bench_failover),
}


def bench_durable(work: Path) -> list[Row]:
    """The ``durable`` scenario of ``python -m bench``: every part."""
    return run_parts(work, SCENARIOS)


def main(argv: list[str] | None = None) -> int:
    return parts_main("durable", "Writes that survive a failover (issue #15)", SCENARIOS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
