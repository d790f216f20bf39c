"""fal's Retry-After is honoured at both edges of the pause, judged by the emulator's ledger.

The emulator answers 429 with ``Retry-After: 2`` to the first submit and to the probe after the
first pause; the ledger's arrival times must show no submit inside any answered Retry-After window,
and the first submit after each window alone (the next one waits for its answer or the probe
spacing, 1 s by default, of which 0.5 s is asserted).
"""

from __future__ import annotations

import base64
import uuid
from pathlib import Path
from typing import Any

import pytest

from producer import Producer
from reframe.localproc import wait_until
from tests.cluster.conftest import ClusterFactory, wait_terminal

pytestmark = pytest.mark.integration

RETRY_AFTER_S = 2.0
ALONE_S = 0.5


def _submits(control: Any) -> list[dict[str, Any]]:
    rows = [r for r in control.ledger()["requests"] if r["op"] == "submit"]
    return sorted(rows, key=lambda r: float(r["t"]))


def test_no_submit_inside_a_retry_after_window_and_the_first_after_it_alone(
    make_cluster: ClusterFactory, sample_video: Path
) -> None:
    cluster = make_cluster(workers=1, env={"REFRAME_MAX_CONCURRENCY": "4"})
    assert cluster.emulator_control is not None
    control = cluster.emulator_control
    pushback = {
        "op": "submit",
        "kind": "http",
        "status": 429,
        "headers": {"Retry-After": f"{RETRY_AFTER_S:g}"},
        "json": {"detail": "Too many requests"},
        "times": 2,
    }
    control.set_faults([pushback])
    url = "data:video/mp4;base64," + base64.b64encode(sample_video.read_bytes()).decode()

    def request() -> dict[str, Any]:
        return {"video_url": url, "aspect_ratio": "1:1", "prompt": f"pushback {uuid.uuid4().hex}"}

    with Producer(cluster.settings()) as p:
        first = p.enqueue(request())  # alone on the wire when the first 429 comes
        wait_until(lambda: any(r["status"] == 429 for r in _submits(control)), timeout_s=30, what="a 429")
        ids = [first, *p.enqueue_many([request() for _ in range(8)])]
        wait_terminal(p, ids, timeout_s=120)
        jobs = p.get_many(ids)
    assert all(j is not None and j.terminal for j in jobs)

    rows = _submits(control)
    pushed = [r for r in rows if r["status"] == 429]
    assert len(pushed) == 2, rows
    for answered in pushed:
        t0 = float(answered["t"])
        inside = [r for r in rows if t0 < float(r["t"]) < t0 + RETRY_AFTER_S]
        assert inside == [], (answered, inside)
        after = [r for r in rows if float(r["t"]) >= t0 + RETRY_AFTER_S]
        assert after, "no submit after the window"
        probe_t = float(after[0]["t"])
        crowd = [r for r in after[1:] if float(r["t"]) < probe_t + ALONE_S]
        assert crowd == [], (after[0], crowd)
    accepted = [r for r in rows if r["status"] == 200]
    assert len(accepted) == len(ids)  # every job submitted once, after the pushback
