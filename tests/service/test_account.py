"""GET /v1/account and the RateLimit fields of prediction answers."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from toys import ToySoftmax, ToyTabular

from mlinvert.defenses import Predictor, RateLimiter
from mlinvert.defenses.detector import Flag, QueryDetector
from mlinvert.errors import ConfigError
from mlinvert.service import ServiceSettings, Store, build_predictors, create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

X = np.random.default_rng(5).random((4, 6, 5)).astype(np.float32)
RATE_FIELDS = ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset", "RateLimit-Policy")


def predict(client: Any, key: str, n: int = 4) -> Any:
    return client.post(
        "/v1/models/faces/predict", json={"inputs": X[:n].tolist()}, headers={"X-API-Key": key}
    )


def test_account_without_limits_reports_answered_inputs_and_is_not_a_query(
    make_client: Callable[..., Any], store: Store, api_key: str
) -> None:
    client = make_client(store)
    r = client.get("/v1/account", headers={"Authorization": f"Bearer {api_key}"})
    assert r.status_code == 200
    assert r.json() == {
        "account": "alice",
        "status": "active",
        "blocked_models": [],
        "rate_limit": None,
        "inputs_answered": 0,
    }
    answered = predict(client, api_key)
    assert answered.status_code == 200
    assert not any(f in answered.headers for f in RATE_FIELDS)  # no limit, no fields
    assert predict(client, api_key, n=0).status_code == 422  # refused: not answered
    for _ in range(3):
        r = client.get("/v1/account", headers={"X-API-Key": api_key})
        assert r.json()["inputs_answered"] == 4
    assert [q.outcome for q in store.queries()] == ["ok", "QueryRejected"]
    text = client.get("/metrics").text
    assert 'mlinvert_requests_total{model="faces",status="200"} 1' in text
    assert "mlinvert_request_latency_seconds_count 2" in text


def test_account_reads_the_bucket_predict_spends_and_never_spends_it(
    make_client: Callable[..., Any], store: Store, api_key: str
) -> None:
    client = make_client(store, rate_limit="10/hour")  # one input every 360 s
    headers = {"X-API-Key": api_key}
    fresh = client.get("/v1/account", headers=headers).json()["rate_limit"]
    assert fresh == {
        "limit": "10/hour",
        "capacity": 10,
        "remaining": 10,
        "refill_in": 0.0,
        "reset_in": 0.0,
    }
    r = predict(client, api_key)
    assert r.status_code == 200
    assert r.headers["RateLimit-Limit"] == "10"
    assert r.headers["RateLimit-Remaining"] == "6"
    assert int(r.headers["RateLimit-Reset"]) == pytest.approx(4 * 360, abs=2)
    assert r.headers["RateLimit-Policy"] == "10;w=3600"
    for _ in range(20):  # reading the account many times spends nothing
        seen = client.get("/v1/account", headers=headers).json()
    limit = seen["rate_limit"]
    assert limit["remaining"] == 6 and seen["inputs_answered"] == 4
    assert limit["refill_in"] == pytest.approx(360, abs=2)
    assert limit["reset_in"] == pytest.approx(4 * 360, abs=2)
    assert predict(client, api_key).status_code == 200  # 2 left
    refused = predict(client, api_key)
    assert refused.status_code == 429
    assert refused.headers["RateLimit-Remaining"] == "2"
    assert refused.headers["RateLimit-Reset"] == refused.headers["Retry-After"]
    assert int(refused.headers["Retry-After"]) == pytest.approx(2 * 360, abs=2)
    after = client.get("/v1/account", headers=headers).json()
    assert after["rate_limit"]["remaining"] == 2 and after["inputs_answered"] == 8
    assert [q.outcome for q in store.queries("alice")] == ["ok", "ok", "RateLimited"]
    # a refusal that is not the rate limit's carries no fields
    too_many = client.post(
        "/v1/models/faces/predict", json={"inputs": np.zeros((11, 6, 5)).tolist()}, headers=headers
    )
    assert too_many.status_code == 413 and "RateLimit-Remaining" not in too_many.headers


@pytest.mark.parametrize(
    ("headers", "words"),
    [
        ({}, "no API key"),
        ({"Authorization": "Basic abc"}, "malformed Authorization header"),
        ({"X-API-Key": "mli_" + "x" * 43}, "unknown API key"),
        ({"X-API-Key": "REVOKED"}, "was revoked"),
    ],
)
def test_account_refuses_bad_keys_like_predict(
    make_client: Callable[..., Any], store: Store, headers: dict[str, str], words: str
) -> None:
    if headers.get("X-API-Key") == "REVOKED":
        key, _ = store.create_key("mallory")
        store.revoke("mallory")
        headers = {"X-API-Key": key}
    client = make_client(store, rate_limit="10/hour")
    account = client.get("/v1/account", headers=headers)
    answer = client.post("/v1/models/faces/predict", json={"inputs": X.tolist()}, headers=headers)
    assert account.status_code == answer.status_code == 401
    assert account.json() == answer.json()
    assert words in account.json()["error"]["message"]
    assert account.headers["WWW-Authenticate"] == answer.headers["WWW-Authenticate"]
    assert "RateLimit-Limit" not in answer.headers
    # the prediction's refusal only, and only when the key names an account (revoked)
    assert len(store.queries()) == (1 if words == "was revoked" else 0)


def test_blocked_account_says_blocked_without_the_evidence(tmp_path: Path, store: Store) -> None:
    settings = ServiceSettings(db=store.path, detector="detect:block:50", rate_limit="100/hour")
    predictors = build_predictors(
        {"faces": ToySoftmax(), "survey": ToyTabular()}, settings, flags=store
    )
    client = TestClient(create_app(settings, predictors, store=store))
    alice, _ = store.create_key("alice")
    mallory, _ = store.create_key("mallory")
    assert predict(client, mallory).status_code == 200
    detector = next(g for g in predictors["faces"].guards if isinstance(g, QueryDetector))
    before = detector.status("mallory")
    for _ in range(5):
        client.get("/v1/account", headers={"X-API-Key": mallory})
    assert detector.status("mallory") == before  # the detector saw no input of the account call
    secret = "SECRET-EVIDENCE 99 near duplicates"
    store.flag(Flag(account="mallory", at=1.0, near_duplicates=99, inputs=120, detail=secret))
    r = client.get("/v1/account", headers={"X-API-Key": mallory})
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "blocked" and body["blocked_models"] == ["faces"]
    assert body["rate_limit"]["remaining"] == 96 and body["inputs_answered"] == 4
    assert "SECRET" not in r.text and "near" not in r.text
    assert predict(client, mallory).status_code == 403  # what the status announces
    assert client.get("/v1/account", headers={"X-API-Key": alice}).json()["status"] == "active"
    store.unflag("mallory")
    assert client.get("/v1/account", headers={"X-API-Key": mallory}).json()["status"] == "active"


def test_flag_only_detector_does_not_announce_a_flag(tmp_path: Path, store: Store) -> None:
    settings = ServiceSettings(db=store.path, detector="detect:flag:50")
    predictors = build_predictors({"faces": ToySoftmax()}, settings, flags=store)
    client = TestClient(create_app(settings, predictors, store=store))
    key, _ = store.create_key("mallory")
    store.flag(Flag(account="mallory", at=1.0, near_duplicates=99, inputs=120, detail="why"))
    assert client.get("/v1/account", headers={"X-API-Key": key}).json()["status"] == "active"
    assert predict(client, key).status_code == 200  # flagged, still answered


def test_openapi_documents_the_account_and_the_rate_fields(
    make_client: Callable[..., Any], store: Store
) -> None:
    spec = make_client(store).get("/openapi.json").json()
    route = spec["paths"]["/v1/account"]["get"]
    assert route["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/AccountInfo"
    }
    assert route["responses"]["401"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorBody"
    }
    assert "RateLimitStatus" in spec["components"]["schemas"]
    predict_doc = spec["paths"]["/v1/models/{name}/predict"]["post"]["responses"]
    assert set(predict_doc["200"]["headers"]) == set(RATE_FIELDS)
    assert set(predict_doc["429"]["headers"]) == {*RATE_FIELDS, "Retry-After"}


def test_models_must_share_one_rate_limiter(tmp_path: Path, store: Store) -> None:
    settings = ServiceSettings(db=store.path)
    two = [
        Predictor(ToySoftmax(), name=name, guards=[RateLimiter("10/hour")]) for name in ("a", "b")
    ]
    with pytest.raises(ConfigError, match="2 different rate limiters"):
        create_app(settings, two, store=store)
    shared = RateLimiter("10/hour")
    app = create_app(
        settings, [Predictor(ToySoftmax(), name=n, guards=[shared]) for n in "ab"], store=store
    )
    key, _ = store.create_key("alice")
    limit = TestClient(app).get("/v1/account", headers={"X-API-Key": key}).json()["rate_limit"]
    assert limit["limit"] == "10/hour" and limit["remaining"] == 10


@pytest.mark.redis
def test_processes_sharing_redis_report_the_one_budget(store: Store, redis_url: str) -> None:
    settings = ServiceSettings(db=store.path, rate_limit="10/hour", redis_url=redis_url)
    first, second = (
        TestClient(create_app(settings, build_predictors({"faces": ToySoftmax()}, settings)))
        for _ in range(2)
    )
    key, _ = store.create_key("alice")
    assert predict(first, key).headers["RateLimit-Remaining"] == "6"
    seen = second.get("/v1/account", headers={"X-API-Key": key}).json()
    assert seen["rate_limit"]["remaining"] == 6 and seen["inputs_answered"] == 4
    assert predict(second, key).headers["RateLimit-Remaining"] == "2"
    assert predict(first, key).status_code == 429
