"""Schemathesis against the service's own OpenAPI document: no generated request gets a 5xx."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from requests.structures import CaseInsensitiveDict
from schemathesis.checks import positive_data_acceptance
from schemathesis.core.result import Ok

from mlinvert.service import Store

EXAMPLES = {"GET": 20, "POST": 520}


def test_generated_requests_never_get_a_server_error(
    make_client: Callable[..., Any], store: Store, api_key: str
) -> None:
    client = make_client(store, policy="top:2+round:2", rate_limit="100000/hour", max_batch=8)
    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    statuses: Counter[int] = Counter()
    posts = Counter[str]()
    media = Counter[str | None]()
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result.err()  # an operation the schema could not read
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES[operation.method.upper()],
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case: schemathesis.Case) -> None:
            i = sum(statuses.values())
            if case.path_parameters and i % 5:  # mostly real model names
                case.path_parameters["name"] = "faces" if i % 2 else "survey"
            explicit = None
            if i % 7:  # mostly authenticated; every 7th keeps the generated credentials
                case.headers = CaseInsensitiveDict(
                    {k: v for k, v in case.headers.items() if k.lower() != "authorization"}
                )
                # passed explicitly, so schemathesis knows the key is valid and probes the
                # operation without it and with a wrong one (it must answer 401 then)
                explicit = {"X-API-Key": api_key}
            # schema-valid bodies may still be refused (a wrong shape is valid JSON)
            response = case.call_and_validate(
                headers=explicit, excluded_checks=[positive_data_acceptance]
            )
            statuses[response.status_code] += 1
            if response.status_code != 401:  # requests without a valid key are not logged
                posts[case.method.upper()] += 1
            media[case.media_type] += 1
            assert response.status_code < 500, response.text

        run()
    assert sum(statuses.values()) >= 500, statuses
    assert not [s for s in statuses if s >= 500]
    assert {401, 404, 422} <= set(statuses), statuses  # the fuzzer reached the error paths
    assert {"application/json", "application/octet-stream"} <= set(media), media  # both forms
    assert len(store.queries()) == posts["POST"]  # every keyed prediction request is logged


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
