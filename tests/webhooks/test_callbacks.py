"""Issue #12: outbound callbacks follow Standard Webhooks, checked with the reference library from
PyPI (``standardwebhooks``) by a real HTTP receiver; a rotation sends one signature per secret and
each verifies alone; an endpoint answering 410 is disabled (no further POSTs) and listed.
"""

from __future__ import annotations

import base64
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from config.settings import child_environment
from producer import Producer
from reframe.localcluster import LocalCluster
from reframe.localproc import wait_until
from tests.chaos.conftest import KEYS, Delivery, Receiver, explained, new_tag, redis_of
from tests.cluster.conftest import upload
from worker.callbacks import verify

pytestmark = pytest.mark.integration

CURRENT = "whsec_" + base64.b64encode(b"the current callback secret 0001").decode()
PREVIOUS = "whsec_" + base64.b64encode(b"the previous callback secret 002").decode()
OTHER = "whsec_" + base64.b64encode(b"a secret nobody was ever given 3").decode()
ACME = "whsec_" + base64.b64encode(b"acme's very own callback secret4").decode()
LEGACY_KEY = "legacy-signing-key"


def _verifies(secret: str, d: Delivery) -> bool:
    try:
        Webhook(secret).verify(d.body, d.headers)
    except WebhookVerificationError:
        return False
    return True


def test_callbacks_are_standard_webhooks_rotated_and_a_410_disables_the_endpoint(
    chaos_cluster: Callable[..., LocalCluster], whole_clip: Path
) -> None:
    cluster = chaos_cluster(
        workers=1,
        env={
            "REFRAME_CALLBACK_SECRETS": f"{CURRENT} {PREVIOUS}",
            "REFRAME_CALLBACK_SIGNING_KEY": LEGACY_KEY,
            "REFRAME_CALLBACK_TENANT_SECRETS": f"acme={ACME}",
        },
    )
    url = upload(cluster.settings(), whole_clip)
    r = redis_of(cluster)
    tag = new_tag("std-webhooks")
    ids: list[str] = []
    with (
        Receiver() as good,
        Receiver(lambda _i, _d: 410) as gone,
        Producer(cluster.settings()) as p,
        explained(cluster, ids),
    ):
        ids.append(
            p.enqueue({"video_url": url, "aspect_ratio": "9:16", "prompt": tag}, callback_url=good.url)
        )
        wait_until(lambda: len(good.seen()) == 1, timeout_s=120, what="callback delivered")
        (d,) = good.seen()
        assert d.headers["webhook-id"] == f"{ids[0]}.1" == d.headers["x-reframe-event-id"]
        signatures = d.headers["webhook-signature"].split(" ")
        assert len(signatures) == 2 and all(s.startswith("v1,") for s in signatures)
        assert _verifies(CURRENT, d) and _verifies(PREVIOUS, d)  # each receiver's secret alone
        assert not _verifies(OTHER, d)
        assert not _verifies(CURRENT, Delivery(d.t, d.headers, d.body.replace(b"SUCCEEDED", b"FAILED")))
        assert verify(LEGACY_KEY.encode(), d.headers["x-reframe-signature"], d.body)  # kept for old receivers

        # a tenant with its own secret: signed with that one only, the cluster's secrets do not verify
        ids.append(
            p.enqueue(
                {"video_url": url, "aspect_ratio": "4:3", "prompt": tag}, callback_url=good.url, tenant="acme"
            )
        )
        wait_until(lambda: len(good.seen()) == 2, timeout_s=120, what="acme's callback delivered")
        acme = good.seen()[1]
        assert acme.headers["webhook-id"] == f"{ids[-1]}.1"
        assert len(acme.headers["webhook-signature"].split(" ")) == 1
        assert _verifies(ACME, acme)
        assert not _verifies(CURRENT, acme) and not _verifies(PREVIOUS, acme)
        ids.pop()  # the 410 part below counts its own jobs

        # 410: the endpoint is disabled; the next job's callback to it is not even POSTed
        ids.append(p.enqueue({"video_url": url, "aspect_ratio": "1:1", "prompt": tag}, callback_url=gone.url))
        wait_until(
            lambda: r.sismember(f"{KEYS.root}:callbacks:disabled", gone.url), timeout_s=120, what="disabled"
        )
        ids.append(
            p.enqueue({"video_url": url, "aspect_ratio": "16:9", "prompt": tag}, callback_url=gone.url)
        )
        wait_until(lambda: r.zcard(KEYS.callbacks_failed) == 2, timeout_s=120, what="both given up")
        assert len(gone.seen()) == 1
        failed = {e["event_id"]: e for e in p.failed_callbacks(10)}
        assert set(failed) == {f"{ids[1]}.1", f"{ids[2]}.1"}
        assert all(e["last_error"].startswith("endpoint_disabled") for e in failed.values())
        listed = subprocess.run(
            [sys.executable, "-m", "reframe", "callbacks", "list"],
            env={**child_environment(cluster.env), "COLUMNS": "200"},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert "endpoint_disabled" in listed and ids[2] in listed
