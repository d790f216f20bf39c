"""Callbacks go through the guarded fetcher: internal targets are refused, redirects not followed."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from config import load_settings
from worker.callbacks import BlockedURL, callback_body, deliver, verify
from worker.contracts.urlpolicy import check_callback_url

from .conftest import RecordingServer

BODY = callback_body({"id": "j1", "state": "SUCCEEDED"})


def test_callback_to_loopback_or_metadata_is_blocked_and_never_sent(target: RecordingServer) -> None:
    settings = load_settings({}, callback_signing_key="sekret")
    for url in (
        f"{target.base}/hook",
        f"http://localhost:{target.port}/hook",
        f"http://2130706433:{target.port}/hook",
        "http://127.0.0.1:6379/",
        "http://169.254.169.254/latest/meta-data/iam/",
    ):
        with pytest.raises(BlockedURL) as info:
            deliver(settings, url, BODY, event_id="j1")
        assert "sekret" not in str(info.value)
    assert target.seen == []


def test_callback_is_delivered_signed_and_redirects_are_not_followed(
    make_server: Callable[..., RecordingServer], target: RecordingServer
) -> None:
    settings = load_settings({}, callback_signing_key="sekret", fetch_allow="127.0.0.2")
    receiver = make_server("127.0.0.2")
    receiver.route("/hook", lambda h: h.reply(204, b""))
    receiver.redirect("/moved", f"{target.base}/hook", status=307)
    assert deliver(settings, f"{receiver.base}/hook", BODY, event_id="j1") == 204
    assert deliver(settings, f"{receiver.base}/moved", BODY, event_id="j1") == 307
    first = receiver.seen[0]
    assert first.method == "POST" and first.body == BODY
    assert verify(b"sekret", first.headers["X-Reframe-Signature"], first.body)
    assert [s.path for s in receiver.seen] == ["/hook", "/moved"]
    assert target.seen == []


def test_producer_side_check_refuses_data_and_internal_callback_urls() -> None:
    for url in ("data:text/plain,x", "http://127.0.0.1:6379/", "http://[::1]/", "http://hooks.localhost/"):
        with pytest.raises(ValueError, match=r"^callback_url: "):
            check_callback_url(url)
    assert (
        check_callback_url("https://api.example.com/hooks/reframe") == "https://api.example.com/hooks/reframe"
    )
