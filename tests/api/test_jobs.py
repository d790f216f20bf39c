"""Jobs over HTTP against a real ``reframe serve``, Redis, a worker and the fal emulator."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.api.conftest import Api, wait_for

pytestmark = pytest.mark.integration

PROBLEM = "application/problem+json"


def sse_events(client: httpx.Client, path: str, timeout_s: float = 60) -> list[tuple[str, dict]]:
    """Read a whole SSE stream (it ends at the job's terminal state)."""
    events: list[tuple[str, dict]] = []
    with client.stream("GET", path, timeout=httpx.Timeout(timeout_s)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: "):
                events.append((event or "message", json.loads(line[len("data: ") :])))
    return events


def test_job_enqueued_over_http_succeeds_and_its_stream_ends_with_the_terminal_event(api: Api) -> None:
    token = api.key("acme")
    with api.client(token) as c:
        r = c.post("/v1/jobs", json=api.body(priority="high", metadata={"order": 7}))
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        assert r.headers["location"] == f"/v1/jobs/{job_id}"
        assert r.json() == {"id": job_id, "state": "QUEUED", "created": True}
        events = sse_events(c, f"/v1/jobs/{job_id}/events")
        states = [data["state"] for name, data in events if name == "state"]
        assert states[-1] == "SUCCEEDED"
        assert events[-1] == ("end", {"id": job_id, "state": "SUCCEEDED"})
        job = c.get(f"/v1/jobs/{job_id}").json()
        assert job["state"] == "SUCCEEDED" and job["tenant"] == "acme" and job["video_url"]
        assert job["metadata"] == {"order": 7} and job["priority"] == "high"


def test_idempotency_key_same_body_returns_the_first_job_other_body_conflicts(api: Api) -> None:
    token = api.key("idem")
    key = f"order-{uuid.uuid4().hex}"
    with api.client(token) as c:
        first = c.post("/v1/jobs", json=api.body(), headers={"Idempotency-Key": key})
        assert first.status_code == 201
        again = c.post("/v1/jobs", json=api.body(), headers={"Idempotency-Key": key})
        assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
        assert again.json()["created"] is False
        other = c.post("/v1/jobs", json=api.body(aspect_ratio="1:1"), headers={"Idempotency-Key": key})
        assert other.status_code == 409
        assert other.headers["content-type"] == PROBLEM
        assert other.json()["errors"] == [
            {"field": "Idempotency-Key", "message": "already used with a different request"}
        ]
    # another tenant's identical key is another job (keys are namespaced by tenant)
    with api.client(api.key("idem-other")) as c:
        theirs = c.post("/v1/jobs", json=api.body(), headers={"Idempotency-Key": key})
        assert theirs.status_code == 201 and theirs.json()["id"] != first.json()["id"]


def test_ten_concurrent_identical_requests_make_one_job(api: Api) -> None:
    token = api.key("crowd", rate_per_s=1000, burst=100)
    key = f"crowd-{uuid.uuid4().hex}"

    def post(_: int) -> httpx.Response:
        with api.client(token) as c:
            return c.post("/v1/jobs", json=api.body(), headers={"Idempotency-Key": key})

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(post, range(10)))
    assert sorted(a.status_code for a in answers) == [200] * 9 + [201]
    assert len({a.json()["id"] for a in answers}) == 1
    listed = api.redis.zrange("{reframe}:tenant:crowd:jobs", 0, -1)
    assert len(listed) == 1


def test_validation_errors_are_problems_naming_every_field(api: Api) -> None:
    with api.client(api.key("valid")) as c:
        r = c.post(
            "/v1/jobs", json={"video_url": api.sample_url, "aspect_ratio": "2:1", "x_start": "5", "bogus": 1}
        )
        assert r.status_code == 422 and r.headers["content-type"] == PROBLEM
        doc = r.json()
        assert doc["type"] == "urn:reframe:problem:validation" and doc["status"] == 422
        fields = {e["field"] for e in doc["errors"]}
        assert {"aspect_ratio", "x_start", "bogus"} <= fields
        bad_json = c.post("/v1/jobs", content=b"{nope", headers={"content-type": "application/json"})
        assert bad_json.status_code == 400 and bad_json.headers["content-type"] == PROBLEM


def test_batch_is_atomic_and_names_conflicting_items(api: Api) -> None:
    with api.client(api.key("batch")) as c:
        k = uuid.uuid4().hex
        items = [api.body(idempotency_key=f"{k}-{i}") for i in range(3)]
        r = c.post("/v1/jobs/batch", json={"items": items})
        assert r.status_code == 201, r.text
        ids = [i["id"] for i in r.json()["items"]]
        assert len(set(ids)) == 3
        again = c.post("/v1/jobs/batch", json={"items": items})
        assert again.status_code == 200 and [i["id"] for i in again.json()["items"]] == ids
        before = api.redis.zcard("{reframe}:tenant:batch:jobs")
        clash = [api.body(), api.body(idempotency_key=f"{k}-1", aspect_ratio="1:1")]
        r = c.post("/v1/jobs/batch", json={"items": clash})
        assert r.status_code == 409
        assert [e["field"] for e in r.json()["errors"]] == ["items[1].idempotency_key"]
        invalid = c.post("/v1/jobs/batch", json={"items": [api.body(), {"video_url": api.sample_url}]})
        assert invalid.status_code == 422
        assert invalid.json()["errors"][0]["field"].startswith("items[1]")
        assert api.redis.zcard("{reframe}:tenant:batch:jobs") == before


def test_list_is_per_tenant_with_cursor_pagination_and_filters(api: Api) -> None:
    token = api.key("lister", rate_per_s=1000, burst=100)
    with api.client(token) as c:
        ids = [c.post("/v1/jobs", json=api.body()).json()["id"] for _ in range(5)]
        seen: list[str] = []
        cursor = None
        while True:
            params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            page = c.get("/v1/jobs", params=params).json()
            seen += [j["id"] for j in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == ids
        assert all(j["tenant"] == "lister" for j in c.get("/v1/jobs").json()["items"])
        wait_for(
            lambda: len(c.get("/v1/jobs", params={"state": "SUCCEEDED"}).json()["items"]) == 5,
            timeout_s=60,
            what="5 jobs listed as SUCCEEDED",
        )
        assert c.get("/v1/jobs", params={"state": "QUEUED"}).json()["items"] == []
        assert c.get("/v1/jobs", params={"cursor": "garbage!"}).status_code == 422
        assert c.get("/v1/jobs", params={"tenant": "acme"}).status_code == 403
    with api.client(api.key("ops", "admin")) as admin:
        theirs = admin.get("/v1/jobs", params={"tenant": "lister", "limit": 200}).json()["items"]
        assert [j["id"] for j in theirs] == ids


def test_cancel_and_dead_letters(api: Api) -> None:
    token = api.key("canceller")
    with api.client(token) as c:
        job_id = c.post("/v1/jobs", json=api.body(deadline_s=3600.0)).json()["id"]
        r = c.post(f"/v1/jobs/{job_id}/cancel")
        assert r.status_code == 200
        assert r.json()["outcome"] in {"cancelled", "cancel_requested", "already_finished"}
        assert c.get("/v1/dead-letters").status_code == 200
        assert c.get(f"/v1/dead-letters/{job_id}").status_code == 404
        replay = c.post(f"/v1/dead-letters/{job_id}/replay", json={"force": False})
        assert replay.status_code == 409
        assert replay.json()["type"] == "urn:reframe:problem:not-dead-lettered"
