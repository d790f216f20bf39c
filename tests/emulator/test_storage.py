"""Storage: CDN token, ``/files/upload``, initiate + PUT, and serving files (§5)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import httpx

from falemu import EmulatorServer
from tests.emulator.helpers import AUTH, submit, valid_input, wait_status


def test_token_then_cdn_upload(emu: EmulatorServer, http: httpx.Client) -> None:
    token = http.post("/storage/auth/token", params={"storage_type": "fal-cdn-v3"}, json={})
    assert token.status_code == 200
    body = token.json()
    assert set(body) == {"token", "token_type", "base_url", "expires_at"}
    assert body["base_url"] == emu.url
    assert datetime.fromisoformat(body["expires_at"]) > datetime.now(
        datetime.fromisoformat(body["expires_at"]).tzinfo
    )
    headers = {"Authorization": f"{body['token_type']} {body['token']}", "Content-Type": "text/plain",
               "X-Fal-File-Name": "hello.txt"}  # fmt: skip
    upload = httpx.post(f"{emu.url}/files/upload", content=b"hello", headers=headers)
    assert upload.status_code == 200
    url = upload.json()["access_url"]
    assert url.startswith(emu.url + "/files/") and url.endswith("/hello.txt")
    served = httpx.get(url)  # public, no auth
    assert (served.status_code, served.content) == (200, b"hello")
    assert served.headers["content-type"].startswith("text/plain")


def test_upload_needs_a_valid_token_or_key(emu: EmulatorServer) -> None:
    assert httpx.post(f"{emu.url}/files/upload", content=b"x").status_code == 401
    assert httpx.post(f"{emu.url}/files/upload", content=b"x", headers={"Authorization": "Bearer forged"}
                      ).status_code == 401  # fmt: skip
    assert httpx.post(f"{emu.url}/storage/auth/token").status_code == 401


def test_initiate_then_put(emu: EmulatorServer, http: httpx.Client) -> None:
    init = http.post("/storage/upload/initiate", params={"storage_type": "gcs"},
                     json={"file_name": "a b.bin", "content_type": "application/x-test"})  # fmt: skip
    assert init.status_code == 200
    body = init.json()
    assert set(body) == {"upload_url", "file_url"}
    assert httpx.get(body["file_url"]).status_code == 404  # nothing uploaded yet
    forged = httpx.put(body["upload_url"].split("?")[0] + "?signature=nope", content=b"x")
    assert forged.status_code == 403
    put = httpx.put(
        body["upload_url"], content=b"\x00\x01", headers={**AUTH, "Content-Type": "application/x-test"}
    )
    assert put.status_code == 200
    served = httpx.get(body["file_url"])
    assert (served.content, served.headers["content-type"]) == (b"\x00\x01", "application/x-test")
    assert httpx.put(body["upload_url"], content=b"again").status_code == 403  # one-shot


def test_range_requests_are_served(http: httpx.Client, clip_url: str, clip: Path) -> None:
    partial = httpx.get(clip_url, headers={"Range": "bytes=0-9"})
    assert partial.status_code == 206
    assert partial.content == clip.read_bytes()[:10]


def test_unknown_file_is_404(emu: EmulatorServer) -> None:
    assert httpx.get(f"{emu.url}/files/0123456789abcdef0123456789abcdef/x.mp4").status_code == 404


def test_reframe_from_data_uri_and_external_style_url(
    emu: EmulatorServer, http: httpx.Client, clip: Path, clip_url: str
) -> None:
    import base64

    data_uri = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
    # the same file via a different host name for the emulator: still served from disk, no loopback
    alias_url = clip_url.replace("127.0.0.1", "localhost")
    for url in (data_uri, alias_url):
        sub = submit(http, valid_input(url, "1:1"))
        wait_status(http, sub, "COMPLETED")
        result = http.get(sub["response_url"])
        assert result.status_code == 200, result.text
        assert (result.json()["video"]["width"], result.json()["video"]["height"]) == (320, 320)
