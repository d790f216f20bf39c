"""Pure-function tests of the fal emulator: geometry, validation, fault specs, routing, config, signatures."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from falemu.config import EmulatorConfig
from falemu.faults import Fault, FaultBook, nginx_page
from falemu.gateway import classify, split_app_path
from falemu.ledger import fingerprint
from falemu.render import VideoInfo, compute_layout, filter_graph, output_size
from falemu.validation import ReframeInput, validate_input
from falemu.webhooks import WebhookSigner, signed_message, webhook_body


@pytest.mark.parametrize(
    ("src", "ratio", "expected"),
    [
        ((320, 180), "9:16", (180, 320)),
        ((320, 180), "16:9", (320, 180)),
        ((1920, 1080), "9:16", (720, 1280)),
        ((1920, 1080), "1:1", (1280, 1280)),
        ((1080, 1920), "21:9", (1280, 548)),
        ((101, 57), "4:3", (100, 76)),
    ],
)
def test_output_size_rule(src: tuple[int, int], ratio: str, expected: tuple[int, int]) -> None:
    assert output_size(*src, ratio, 1280) == expected


def test_layout_centres_and_fits_by_default() -> None:
    layout = compute_layout(VideoInfo(320, 180, 2.0), ReframeInput("u", "9:16"), 1280)
    assert (layout.out_w, layout.out_h, layout.fg_w, layout.fg_h) == (180, 320, 180, 102)
    assert (layout.fg_x, layout.fg_y) == (0, 109)


def test_layout_honours_bounds_and_grid_position() -> None:
    info = VideoInfo(320, 180, 2.0)
    bounds = compute_layout(
        info, ReframeInput("u", "9:16", x_start=10, x_end=170, y_start=20, y_end=110), 1280
    )
    assert (bounds.fg_x, bounds.fg_y, bounds.fg_w, bounds.fg_h) == (10, 20, 160, 90)
    only_x = compute_layout(info, ReframeInput("u", "9:16", x_start=0, x_end=100), 1280)
    assert (only_x.fg_w, only_x.fg_h, only_x.fg_x) == (100, 56, 0)
    grid = compute_layout(info, ReframeInput("u", "9:16", grid_position_x=5, grid_position_y=7), 1280)
    assert (grid.fg_x, grid.fg_y) == (5, 7)
    assert "overlay=5:7" in filter_graph(grid) and "boxblur" in filter_graph(grid)


def test_validation_accepts_the_full_schema() -> None:
    payload = {"video_url": "data:video/mp4;base64,AA==", "aspect_ratio": "21:9", "image_url": "https://x/y.png",
               "prompt": "p", "grid_position_x": 1, "grid_position_y": 2.0, "x_start": 0, "x_end": 5,
               "y_start": 1, "y_end": 2, "extra": "ignored"}  # fmt: skip
    params, errors = validate_input(payload)
    assert errors == []
    assert params is not None and params.grid_position_y == 2 and params.aspect_ratio == "21:9"


def test_validation_errors_are_pydantic_v2_shaped() -> None:
    _, errors = validate_input({"aspect_ratio": "9:16"})
    assert errors[0]["type"] == "missing" and errors[0]["loc"] == ["body", "video_url"]
    assert errors[0]["msg"] == "Field required" and "url" in errors[0]


def test_fault_parsing_and_fifo_consumption() -> None:
    book = FaultBook()
    book.add([Fault.from_dict({"op": "status", "kind": "http", "status": 429, "times": 2}),
              Fault.from_dict({"op": "any", "kind": "drop"})])  # fmt: skip
    assert book.take("submit", frozenset({"http", "drop"})).kind == "drop"  # type: ignore[union-attr]
    assert book.take("status", frozenset({"http"})).status == 429  # type: ignore[union-attr]
    assert book.take("status", frozenset({"http"})) is not None
    assert book.take("status", frozenset({"http"})) is None
    forever = Fault.from_dict({"op": "upload", "kind": "slow", "times": -1})
    book.add([forever])
    assert all(book.take("file", frozenset({"slow"})) is forever for _ in range(5))
    assert not Fault.from_dict({"kind": "drop"}).matches("other")  # never the control API
    assert Fault.from_dict({"kind": "runner_error"}).runner_failure() == (503, "runner_disconnected",
                                                                          "Runner disconnected")  # fmt: skip
    assert "nginx" in nginx_page(502)


@pytest.mark.parametrize(
    ("method", "path", "op", "rid"),
    [
        ("POST", "/fal-ai/luma-dream-machine/ray-2-flash/reframe", "submit", None),
        ("GET", "/fal-ai/luma-dream-machine/requests/abc/status", "status", "abc"),
        ("GET", "/fal-ai/luma-dream-machine/requests/abc/status/stream", "stream", "abc"),
        ("GET", "/fal-ai/luma-dream-machine/requests/abc", "result", "abc"),
        ("PUT", "/fal-ai/luma-dream-machine/requests/abc/cancel", "cancel", "abc"),
        ("GET", "/workflows/o/a/requests/abc", "result", "abc"),
        ("POST", "/storage/auth/token", "token", None),
        ("POST", "/files/upload", "upload", None),
        ("POST", "/storage/upload/initiate", "upload", None),
        ("PUT", "/files/k/n.mp4", "upload", None),
        ("GET", "/files/k/n.mp4", "file", None),
        ("GET", "/.well-known/jwks.json", "jwks", None),
        ("GET", "/_emulator/ledger", "other", None),
        ("GET", "/nothing", "other", None),
    ],
)
def test_classify(method: str, path: str, op: str, rid: str | None) -> None:
    assert classify(method, path) == (op, rid)


def test_split_app_path() -> None:
    assert split_app_path("/fal-ai/luma-dream-machine/ray-2-flash/reframe") == ("fal-ai/luma-dream-machine",
                                                                                "ray-2-flash/reframe")  # fmt: skip
    assert split_app_path("/comfy/o/a") == ("comfy/o/a", "")
    assert split_app_path("/x") is None


def test_config_update_is_partial_and_checked() -> None:
    config = EmulatorConfig()
    config.update({"concurrency": 5.0, "submit_rate_per_s": None, "locked_keys": ("a",)})
    assert (config.concurrency, config.submit_rate_per_s, config.locked_keys) == (5, None, ["a"])
    with pytest.raises(ValueError, match="read-only"):
        config.update({"public_url": "http://x"})
    with pytest.raises(ValueError):
        config.update({"concurrency": 0})


def test_fingerprint_is_canonical_json_sha256() -> None:
    assert fingerprint({"b": 1, "a": "é"}) == fingerprint({"a": "é", "b": 1})
    canonical = json.dumps({"a": "é", "b": 1}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert fingerprint({"a": "é", "b": 1}) == hashlib.sha256(canonical.encode()).hexdigest()


def test_signature_scheme() -> None:
    signer = WebhookSigner(bytes(range(32)), user_id="u1")
    body = webhook_body("rid", 200, {"video": {}})
    headers = signer.headers("rid", body, timestamp=1700000000)
    key = Ed25519PublicKey.from_public_bytes(
        __import__("base64").urlsafe_b64decode(signer.jwks()["keys"][0]["x"] + "=")
    )
    key.verify(
        bytes.fromhex(headers["X-Fal-Webhook-Signature"]), signed_message("rid", "u1", "1700000000", body)
    )
    assert json.loads(body)["status"] == "OK"
    assert json.loads(webhook_body("rid", 422, {"detail": []}))["error"] == "Invalid status code: 422"


def test_import_is_lazy() -> None:
    code = (
        "import sys, falemu; assert 'falemu.server' not in sys.modules and 'uvicorn' not in sys.modules; "
        "assert falemu.EmulatorConfig().concurrency == 2; assert 'falemu.app' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def test_ledger_keeps_a_bounded_tail_but_exact_counters() -> None:
    from falemu.ledger import Ledger

    ledger = Ledger.bounded(3)
    for i in range(5):
        ledger.record_http(t=float(i), method="GET", path="/", op="status", status=429, request_id=None)
    snapshot = ledger.snapshot()
    assert [r["t"] for r in snapshot["requests"]] == [2.0, 3.0, 4.0]
    assert snapshot["count_429"] == 5
