"""fal's multipart storage upload as the emulator serves it (docs/fal-wire-protocol.md §5): initiate, part
PUTs (each on disk, ETag = MD5), complete (assembled in part order); retried parts, bad completes, auth."""

from __future__ import annotations

import hashlib
import os

import httpx
import pytest

from falemu import EmulatorServer
from tests.emulator.helpers import AUTH


def _initiate(emu: EmulatorServer, name: str = "big.bin", auth: dict[str, str] = AUTH) -> dict[str, str]:
    headers = {**auth, "Content-Type": "application/x-test", "X-Fal-File-Name": name}
    response = httpx.post(f"{emu.url}/files/upload/multipart", headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, str] = response.json()
    assert set(body) == {"access_url", "uploadId"}
    return body


def _put(target: dict[str, str], n: int, data: bytes) -> httpx.Response:
    return httpx.put(f"{target['access_url']}/multipart/{target['uploadId']}/{n}", content=data, headers=AUTH)


def _complete(target: dict[str, str], parts: list[dict[str, object]]) -> httpx.Response:
    url = f"{target['access_url']}/multipart/{target['uploadId']}/complete"
    return httpx.post(url, json={"parts": parts}, headers=AUTH)


def test_parts_in_any_order_become_the_file_in_part_order(emu: EmulatorServer) -> None:
    chunks = [os.urandom(300_000), os.urandom(300_000), os.urandom(123)]
    target = _initiate(emu)
    assert httpx.get(target["access_url"]).status_code == 404  # nothing until complete
    etags = {}
    for n in (3, 1, 2):
        answer = _put(target, n, chunks[n - 1])
        assert answer.status_code == 200
        etags[n] = answer.headers["etag"]
        assert etags[n] == f'"{hashlib.md5(chunks[n - 1]).hexdigest()}"'
    done = _complete(target, [{"partNumber": n, "etag": etags[n]} for n in (2, 3, 1)])
    assert done.status_code == 200
    assert done.json()["access_url"] == target["access_url"]
    served = httpx.get(target["access_url"])
    assert served.content == b"".join(chunks)
    assert served.headers["content-type"] == "application/x-test"
    # complete is idempotent: a retried complete answers the same URL
    assert _complete(target, [{"partNumber": n, "etag": etags[n]} for n in (1, 2, 3)]).json() == done.json()
    assert _put(target, 4, b"late").status_code == 404  # the upload is closed


def test_a_part_sent_again_replaces_itself(emu: EmulatorServer) -> None:
    target = _initiate(emu)
    first = _put(target, 1, b"A" * 1000).headers["etag"]
    again = _put(target, 1, b"B" * 1000).headers["etag"]
    assert first != again
    assert _complete(target, [{"partNumber": 1, "etag": first}]).status_code == 400  # stale ETag
    assert _complete(target, [{"partNumber": 1, "etag": again}]).status_code == 200
    assert httpx.get(target["access_url"]).content == b"B" * 1000


@pytest.mark.parametrize(
    ("parts", "detail"),
    [
        ([], "no parts"),
        ([{"partNumber": 2, "etag": "x"}], "part 2 was not uploaded"),
        ([{"partNumber": 1, "etag": "x"}, {"partNumber": 1, "etag": "x"}], "listed twice"),
    ],
)
def test_bad_completes_are_refused(emu: EmulatorServer, parts: list[dict[str, object]], detail: str) -> None:
    target = _initiate(emu)
    _put(target, 1, b"data")
    answer = _complete(target, parts)
    assert answer.status_code == 400 and detail in answer.json()["detail"]
    assert httpx.get(target["access_url"]).status_code == 404


def test_multipart_needs_auth_and_a_known_upload(emu: EmulatorServer) -> None:
    assert httpx.post(f"{emu.url}/files/upload/multipart").status_code == 401
    target = _initiate(emu)
    anonymous = httpx.put(f"{target['access_url']}/multipart/{target['uploadId']}/1", content=b"x")
    assert anonymous.status_code == 401
    forged = {**target, "uploadId": "0" * 32}
    assert _put(forged, 1, b"x").status_code == 404
    assert _put(target, 0, b"x").status_code == 400


def test_a_cdn_token_works_like_fal_clients_use_it(emu: EmulatorServer, http: httpx.Client) -> None:
    token = http.post("/storage/auth/token", params={"storage_type": "fal-cdn-v3"}, json={}).json()
    bearer = {"Authorization": f"{token['token_type']} {token['token']}"}
    target = _initiate(emu, auth=bearer)
    part = httpx.put(f"{target['access_url']}/multipart/{target['uploadId']}/1", content=b"x", headers=bearer)
    assert part.status_code == 200
    ops = [row["op"] for row in emu.ledger()["requests"]]
    assert "upload_part" in ops  # the ledger tells part PUTs apart (and faults can target them)
