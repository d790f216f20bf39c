"""Property tests of the live OpenAPI document of a real ``reframe serve`` (Schemathesis).

Every operation gets generated requests (valid and invalid) with an admin key; every answer must
be no 5xx, a documented status, a documented content type, and match its schema. Bounded:
a few examples per operation, no deadline per example (the machine is shared).
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.api.conftest import Api

pytestmark = pytest.mark.integration

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]

#: Streams that stay open while their jobs live (a valid request never ends within an example's
#: timeout); tests/console/test_api_views.py checks them.
OPEN_ENDED = {"/v1/job-events"}


def _requests_served(api: Api) -> float:
    text = httpx.get(f"{api.url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("reframe_api_requests_total{")
    )


def test_every_operation_answers_within_its_schema(api: Api) -> None:
    # schemathesis.pytest's plugin does not run under this pytest (9.x), so each operation gets a
    # plain Hypothesis test built from the operation's strategy (valid and invalid requests).
    token = api.key("fuzz", "admin", rate_per_s=10_000, burst=10_000)
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json")
    failures: dict[str, str] = {}
    tried = 0
    before = _requests_served(api)
    operations = [
        (result.ok(), mode)
        for result in schema.get_all_operations()
        for mode in GenerationMode
        if result.ok().path not in OPEN_ENDED
    ]
    for operation, mode in operations:
        tried += 1

        @given(case=operation.as_strategy(mode))
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case: schemathesis.Case) -> None:
            case.call_and_validate(
                base_url=api.url, headers={"Authorization": f"Bearer {token}"}, checks=CHECKS, timeout=30
            )

        try:
            run()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE  # an operation without inputs has no invalid request
        except Exception as exc:  # noqa: BLE001 - one failing operation must not hide the others
            failures[f"{operation.label} ({mode.value})"] = f"{type(exc).__name__}: {exc}"[:3000]
    assert tried >= 13 * 2
    assert _requests_served(api) - before >= tried * 5  # the examples really reached the server
    assert not failures, "\n\n".join(f"{k}\n{v}" for k, v in failures.items())
