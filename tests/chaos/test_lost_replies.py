"""A Redis reply lost on the way back: the command ran, its caller never heard so.

A dropped connection can lose the reply of the script that writes the SUBMITTING intent after the
script ran. The submitter must recognise the write as its own (a token only it wrote) and send its
POST once, instead of leaving the job SUBMITTING with nothing sent until the ambiguous policy
dead-letters it and charges its estimate. The proxy loses exactly that reply; the judges are the
emulator's submit log, the record and the dead-letter set.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from producer import JobState, Producer
from reframe.localcluster import LocalCluster
from reframe.localproc import wait_until
from tests.chaos.conftest import KEYS, ledger, new_tag, redis_of
from tests.chaos.tcpcut import reply_cutter
from tests.cluster.conftest import upload
from worker.contracts.record import text

pytestmark = pytest.mark.integration


def test_a_lost_reply_to_the_intent_still_submits_once(
    chaos_cluster: Callable[..., LocalCluster], whole_clip: Path
) -> None:
    cluster = chaos_cluster(workers=0, emulator_processing_time_s=0.5)
    port = int(cluster.redis_url.rsplit(":", 1)[1].split("/")[0])
    r = redis_of(cluster)
    with reply_cutter(port) as proxy, Producer(cluster.settings()) as p:
        # the worker reaches Redis only through the proxy; the test's own clients go direct
        cluster.start_worker(env={"REFRAME_REDIS_URL": proxy.url})
        url = upload(cluster.settings(), whole_clip)
        tag = new_tag("lost-reply")
        # a first job loads the scripts into Redis, so the next intent's EVALSHA really runs (a
        # NOSCRIPT answer lost instead would prove nothing)
        warm = p.wait(p.enqueue({"video_url": url, "aspect_ratio": "1:1", "prompt": tag}), timeout_s=60)
        assert warm.state is JobState.SUCCEEDED, warm.error
        proxy.arm(b"submit_started_at_ms")  # the intent's write is the next command carrying it
        job_id = p.enqueue({"video_url": url, "aspect_ratio": "9:16", "prompt": tag})
        job = p.wait(job_id, timeout_s=60)
        assert proxy.cuts == 1, "the interleaving did not happen: no reply was lost"
    assert job.state is JobState.SUCCEEDED, job.error
    request_id = text(r.hget(KEYS.job(job_id), "fal_request_id") or b"")
    submits = [s for s in ledger(cluster)["submits"] if s.get("request_id") == request_id]
    assert len(submits) == 1 and len(ledger(cluster)["submits"]) == 2, "fal was asked once for it"
    assert int(r.hget(KEYS.job(job_id), "attempts") or 0) == 1, "one intent, the one whose reply was lost"
    assert r.zcard(KEYS.dlq) == 0
    wait_until(lambda: r.zcard(KEYS.slots) == 0, timeout_s=10, what="the slot given back")
