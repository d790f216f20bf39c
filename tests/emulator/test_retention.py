"""What fal keeps, as the emulator honours it over HTTP: ``X-Fal-Store-IO: 0`` (no stored payloads) and
``X-Fal-Object-Lifecycle-Preference`` (output media deleted after its expiration) (docs/fal-wire-protocol.md §2.1, §7)."""

from __future__ import annotations

import json

import httpx

from falemu import EmulatorServer
from tests.emulator.helpers import APP, AUTH, valid_input, wait_status, wait_until


def _submit(http: httpx.Client, clip_url: str, headers: dict[str, str]) -> dict[str, object]:
    response = http.post(f"/{APP}", json=valid_input(clip_url), headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def _payloads(emu: EmulatorServer, request_id: object) -> httpx.Response:
    return httpx.get(f"{emu.url}/_emulator/requests/{request_id}/payloads")


def test_store_io_0_keeps_no_payloads_while_the_default_does(
    emu: EmulatorServer, http: httpx.Client, clip_url: str
) -> None:
    kept = _submit(http, clip_url, {})
    private = _submit(http, clip_url, {"X-Fal-Store-IO": "0"})
    for sub in (kept, private):
        wait_status(http, sub, "COMPLETED", timeout_s=60)

    stored = _payloads(emu, kept["request_id"])
    assert stored.status_code == 200
    assert stored.json()["input"] == valid_input(clip_url)
    assert stored.json()["output"]["video"]["url"].startswith(emu.url + "/files/")

    gone = _payloads(emu, private["request_id"])
    assert gone.status_code == 404 and gone.json()["store_io"] is False
    # The result itself stays readable for fal's result retention: only the stored payloads are gone.
    result = http.get(str(private["response_url"]))
    assert result.status_code == 200 and "video" in result.json()

    submits = {s["request_id"]: s for s in emu.ledger()["submits"]}
    assert submits[kept["request_id"]]["store_io"] is True
    assert submits[private["request_id"]]["store_io"] is False


def test_output_media_is_gone_after_the_requested_expiration(
    emu: EmulatorServer, http: httpx.Client, clip_url: str
) -> None:
    lifecycle = {"X-Fal-Object-Lifecycle-Preference": json.dumps({"expiration_duration_seconds": 5})}
    short = _submit(http, clip_url, lifecycle)
    default = _submit(http, clip_url, {})
    urls = {}
    for name, sub in (("short", short), ("default", default)):
        wait_status(http, sub, "COMPLETED", timeout_s=60)
        urls[name] = http.get(str(sub["response_url"])).json()["video"]["url"]
    assert httpx.get(urls["short"]).status_code == 200  # served until it expires

    wait_until(lambda: httpx.get(urls["short"]).status_code == 404, timeout_s=20, what="expired media 404")
    assert httpx.get(urls["short"]).status_code == 404  # for good
    assert httpx.get(urls["default"]).status_code == 200  # same render, no expiration: still served
    recorded = {s["request_id"]: s["output_expiration_s"] for s in emu.ledger()["submits"]}
    assert recorded[short["request_id"]] == 5.0 and recorded[default["request_id"]] is None


def test_an_unreadable_lifecycle_header_means_the_default_retention(
    emu: EmulatorServer, http: httpx.Client, clip_url: str
) -> None:
    for raw in ("not json", json.dumps({"expiration_duration_seconds": None}), "[1]"):
        sub = _submit(http, clip_url, {"X-Fal-Object-Lifecycle-Preference": raw})
        recorded = {s["request_id"]: s["output_expiration_s"] for s in emu.ledger()["submits"]}
        assert recorded[sub["request_id"]] is None, raw


def test_uploads_honour_the_lifecycle_header_too(emu: EmulatorServer) -> None:
    headers = {
        **AUTH,
        "Content-Type": "text/plain",
        "X-Fal-File-Name": "brief.txt",
        "X-Fal-Object-Lifecycle": json.dumps({"expiration_duration_seconds": 3}),
    }
    url = httpx.post(f"{emu.url}/files/upload", content=b"short-lived", headers=headers).json()["access_url"]
    assert httpx.get(url).content == b"short-lived"
    wait_until(lambda: httpx.get(url).status_code == 404, timeout_s=15, what="expired upload 404")
