"""Auth, scopes, tenants, the per-key rate limit and body limits of a real ``reframe serve``."""

from __future__ import annotations

import pytest

from tests.api.conftest import Api, created_key_token, reframe_cli

pytestmark = pytest.mark.integration

PROBLEM = "application/problem+json"


def _job_count(api: Api) -> int:
    """Job records in Redis (every job of every test)."""
    return sum(1 for _ in api.redis.scan_iter(match="{reframe}:job:*", count=1000))


def test_no_key_wrong_key_revoked_key_are_401_problems(api: Api) -> None:
    with api.client() as c:
        r = c.get("/v1/jobs")
        assert r.status_code == 401 and r.headers["content-type"] == PROBLEM
        assert r.headers["www-authenticate"].startswith("Bearer")
    made = created_key_token(api, "--tenant", "revokee", "--scope", "read")
    token = made["token"]
    assert made["tenant"] == "revokee" and made["scopes"] == ["read"]
    with api.client(token[:-4] + "AAAA") as c:
        r = c.get("/v1/jobs")
        assert r.status_code == 401 and token not in r.text
    with api.client(token) as c:
        assert c.get("/v1/jobs").status_code == 200
        done = reframe_cli(api, "keys", "revoke", made["key_id"])
        assert done.returncode == 0, done.stderr
        assert c.get("/v1/jobs").status_code == 401
    listed = reframe_cli(api, "keys", "list", "--json")
    assert listed.returncode == 0 and token not in listed.stdout
    assert made["key_id"] in listed.stdout
    # Redis holds only the hash of the token
    stored = api.redis.hgetall(f"{{reframe}}:api:key:{made['key_id']}")
    assert all(token.encode() not in v for v in stored.values())


def test_wrong_scope_is_403_and_another_tenants_job_is_404(api: Api) -> None:
    with api.client(api.key("owner")) as c:
        job_id = c.post("/v1/jobs", json=api.body()).json()["id"]
    with api.client(api.key("owner", "read")) as reader:
        assert reader.get(f"/v1/jobs/{job_id}").status_code == 200
        r = reader.post("/v1/jobs", json=api.body())
        assert r.status_code == 403 and r.json()["type"] == "urn:reframe:problem:forbidden"
        assert reader.post(f"/v1/jobs/{job_id}/cancel").status_code == 403
    with api.client(api.key("intruder")) as other:
        for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/events", f"/v1/dead-letters/{job_id}"):
            r = other.get(path)
            assert r.status_code == 404 and r.headers["content-type"] == PROBLEM
        assert other.post(f"/v1/jobs/{job_id}/cancel").status_code == 404
        assert job_id not in other.get("/v1/jobs").text
    with api.client(api.key("ops", "admin")) as admin:
        assert admin.get(f"/v1/jobs/{job_id}").json()["tenant"] == "owner"


def test_rate_limit_answers_429_with_retry_after_and_enqueues_nothing(api: Api) -> None:
    token = api.key("limited", rate_per_s=0.2, burst=2)
    with api.client(token) as c:
        assert c.post("/v1/jobs", json=api.body()).status_code == 201
        assert c.post("/v1/jobs", json=api.body()).status_code == 201
        before = _job_count(api), api.redis.zcard("{reframe}:tenant:limited:jobs")
        refused = [c.post("/v1/jobs", json=api.body()) for _ in range(5)]
        after = _job_count(api), api.redis.zcard("{reframe}:tenant:limited:jobs")
    for r in refused:
        assert r.status_code == 429 and r.headers["content-type"] == PROBLEM
        assert int(r.headers["retry-after"]) >= 1
    assert after == before


def test_oversized_bodies_are_413(api: Api) -> None:
    with api.client(api.key("big")) as c:
        huge = api.body(metadata={"blob": "x" * 70_000})  # REFRAME_API_MAX_BODY_BYTES=65536 here
        r = c.post("/v1/jobs", json=huge)
        assert r.status_code == 413 and r.headers["content-type"] == PROBLEM

        def chunks():  # no Content-Length: the limit applies while streaming
            for _ in range(20):
                yield b" " * 4096

        r = c.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        r = c.post(
            "/v1/uploads", content=b"\0" * 2_000_001, headers={"content-type": "application/octet-stream"}
        )
        assert r.status_code == 413


def test_upload_and_quote(api: Api) -> None:
    data = httpx_get_bytes(api.sample_url)
    with api.client(api.key("uploader")) as c:
        r = c.post("/v1/uploads", params={"filename": "clip.mp4"}, content=data)
        assert r.status_code == 201, r.text
        assert r.json()["size_bytes"] == len(data)
        url = r.json()["url"]
        q = c.post("/v1/quotes", json=api.body(video_url=url))
        assert q.status_code == 200, q.text
        quote = q.json()
        assert quote["duration_s"] == pytest.approx(2.5, abs=0.1)
        assert quote["size_bytes"] == len(data)
        assert quote["billable_s"] == 3.0  # 2.5 s + 0.5 s margin, whole seconds
        assert quote["estimate_micro"] == 180_000  # 3 s at $0.06/s
        assert quote["fits_model_limits"] is True and quote["would_accept"] is True
        blocked = c.post("/v1/quotes", json=api.body(video_url="http://169.254.169.254/latest/meta-data"))
        assert blocked.status_code == 422


def httpx_get_bytes(url: str) -> bytes:
    import httpx

    return httpx.get(url, timeout=30).raise_for_status().content


def test_health_ready_metrics_openapi(api: Api) -> None:
    token = api.key("logged")
    with api.client(token) as c:  # one enqueue of this test's own, for the access log below
        assert c.post("/v1/jobs", json=api.body()).status_code == 201
    with api.client() as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/readyz").json() == {"status": "ok"}
        doc = c.get("/openapi.json").json()
        assert "/v1/jobs" in doc["paths"] and "JobCreate" in doc["components"]["schemas"]
        text = c.get("/metrics").text
        assert 'reframe_api_requests_total{method="GET",route="/readyz",status_class="2xx"}' in text
        assert "rfk_" not in text
        for line in text.splitlines():
            if line.startswith("reframe_api_requests_total{"):
                assert not any(len(part) == 32 for part in line.replace('"', "/").split("/"))
    log = api.process.log_tail(100_000)
    assert '"route":"/v1/jobs"' in log  # one access line per request
    assert "rfk_" not in log and token not in log  # tokens never reach the log
