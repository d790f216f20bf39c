"""The task deadline the threads pool does not enforce: a hung task ends its worker (non-zero).

Celery's threads pool ignores ``time_limit``; :class:`worker.watchdog.TaskWatchdog` ends the process
instead, before the visibility timeout, so the message comes back only once the hung task is gone.
"""

from __future__ import annotations

import base64
import uuid
from pathlib import Path

import pytest
import redis

from producer import Producer
from reframe.localproc import wait_until
from tests.cluster.conftest import ClusterFactory, wait_terminal
from worker.contracts.keys import Keys
from worker.watchdog import EXIT_TASK_OVERRUN

pytestmark = pytest.mark.integration

LIMIT_S = 4.0
HANG_S = 20.0  # the submit's answer comes after this; fal timeouts (30 s) are longer still


def test_a_hung_task_ends_its_worker_and_the_job_is_handled_once_elsewhere(
    make_cluster: ClusterFactory, sample_video: Path
) -> None:
    cluster = make_cluster(
        workers=1,
        env={
            "REFRAME_TASK_SOFT_TIME_LIMIT_S": "3",
            "REFRAME_TASK_TIME_LIMIT_S": str(LIMIT_S),
            "REFRAME_VISIBILITY_TIMEOUT_S": "15",
        },
    )
    assert cluster.emulator_control is not None
    control = cluster.emulator_control
    control.set_faults([{"op": "submit", "kind": "slow", "delay_s": HANG_S, "times": 1}])
    url = "data:video/mp4;base64," + base64.b64encode(sample_video.read_bytes()).decode()
    request = {"video_url": url, "aspect_ratio": "9:16", "prompt": f"hang {uuid.uuid4().hex}"}
    hung = cluster.workers[0]
    with Producer(cluster.settings()) as p:
        job_id = p.enqueue(request)
        wait_until(
            lambda: any(r["op"] == "submit" for r in control.ledger()["requests"]),
            timeout_s=30,
            what="the submit held at the emulator",
        )
        # The watchdog ends the worker within the limit plus its check interval and some slack.
        wait_until(lambda: not hung.process.alive(), timeout_s=LIMIT_S + 6, what="the hung worker exits")
        assert hung.process.popen.returncode == EXIT_TASK_OVERRUN, hung.process.log_tail()
        assert "REFRAME_TASK_TIME_LIMIT_S" in hung.process.log_tail(80)
        cluster.workers.remove(hung)

        cluster.start_worker(name="successor")
        wait_terminal(p, [job_id], timeout_s=90)
        job = p.get(job_id)
    assert job is not None and job.terminal
    ledger = control.ledger()
    assert len(ledger["submits"]) == 1  # the cluster is private to this test: one job, one submit
    assert all(n == 1 for n in ledger["submissions"].values())
    r = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    try:
        entries: list[tuple[str, dict[str, str]]] = r.xrange(Keys(cluster.settings().key_prefix).events)  # type: ignore[assignment]
        assert [f["job_id"] for _id, f in entries].count(job_id) == 1
        # The job may end before its message comes back (the dead submitter's submit is resolved
        # once its heartbeat stops); the message is still redelivered after the visibility timeout,
        # found to be a duplicate and acked.
        wait_until(lambda: r.hlen("unacked") == 0, timeout_s=45, what="the redelivered message acked")
    finally:
        r.close()
    assert all(w.process.alive() for w in cluster.workers)
