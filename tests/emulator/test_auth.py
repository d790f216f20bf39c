"""Auth: fal's 401 and 403 bodies (docs/fal-wire-protocol.md §3.1)."""

from __future__ import annotations

import httpx
import pytest

from falemu import EmulatorServer
from tests.emulator.helpers import APP, KEY

NO_USER = {"detail": "No user found for Key ID and Secret"}
LOCKED = {
    "detail": "User is locked. Reason: Exhausted balance. Top up your balance at fal.ai/dashboard/billing"
}


@pytest.mark.parametrize("header", [None, "", "Key", "Bearer abc", "Basic dXNlcjpwYXNz"])
def test_missing_key_is_401(emu: EmulatorServer, header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    response = httpx.post(f"{emu.url}/{APP}", json={}, headers=headers)
    assert response.status_code == 401
    assert response.json() == NO_USER


def test_malformed_key_is_401_with_format_message(emu: EmulatorServer) -> None:
    response = httpx.post(f"{emu.url}/{APP}", json={}, headers={"Authorization": "Key no-colon"})
    assert response.status_code == 401
    assert "Invalid Key Authorization header format" in response.json()["detail"]


def test_unknown_key_is_401_when_keys_are_listed(emu: EmulatorServer) -> None:
    emu.configure(valid_keys=[KEY])
    assert httpx.post(f"{emu.url}/{APP}", json={}, headers={"Authorization": f"Key {KEY}"}).status_code == 200
    response = httpx.post(f"{emu.url}/{APP}", json={}, headers={"Authorization": "Key other:secret"})
    assert response.status_code == 401
    assert response.json() == NO_USER


def test_locked_key_is_403_on_every_queue_call(emu: EmulatorServer, http: httpx.Client) -> None:
    sub = http.post(f"/{APP}", json={}).json()
    emu.configure(locked_keys=[KEY])
    for response in (
        http.post(f"/{APP}", json={}),
        http.get(sub["status_url"]),
        http.get(sub["response_url"]),
        http.put(sub["cancel_url"]),
        http.post("/storage/auth/token"),
    ):
        assert response.status_code == 403
        assert response.json() == LOCKED
    emu.configure(locked_keys=[KEY.split(":")[0]])  # the key id alone locks too
    assert http.post(f"/{APP}", json={}).status_code == 403


def test_auth_failures_are_in_the_ledger_and_create_nothing(emu: EmulatorServer) -> None:
    httpx.post(f"{emu.url}/{APP}", json={})
    ledger = emu.ledger()
    assert ledger["submits"] == []
    assert [(r["op"], r["status"]) for r in ledger["requests"] if r["op"] == "submit"] == [("submit", 401)]


def test_isolated_accounts_see_only_their_own_requests(emu: EmulatorServer, http: httpx.Client) -> None:
    """With ``isolate_accounts`` each key id is its own fal account: another key's status, result and
    cancel get fal's 404, the owner's go through; the ledger names the account of every call."""
    emu.configure(isolate_accounts=True)
    sub = http.post(f"/{APP}", json={}).json()
    other = {"Authorization": "Key other-account:secret"}
    assert httpx.get(sub["status_url"], headers=other).status_code == 404
    assert httpx.get(sub["response_url"], headers=other).status_code == 404
    assert httpx.put(sub["cancel_url"], headers=other).status_code == 404
    assert http.get(sub["status_url"]).status_code in (200, 202)
    assert http.put(sub["cancel_url"]).status_code in (202, 400)  # the owner may cancel it
    ledger = emu.ledger()
    assert [s["account"] for s in ledger["submits"]] == [KEY.split(":")[0]]
    assert {r["account"] for r in ledger["requests"] if r["status"] == 404} == {"other-account"}
    assert all("secret" not in r["account"] for r in ledger["requests"])
