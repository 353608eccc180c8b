"""``mlinvert serve --log-synchronous`` (same as MLINVERT_LOG_SYNCHRONOUS) and the 415
answer to a request body type the service does not read."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import typer
from toys import ToySoftmax, ToyTabular
from typer.testing import CliRunner

from mlinvert.cli import serve as serve_cli
from mlinvert.errors import ConfigError, UnsupportedMediaType
from mlinvert.oracle import HttpOracle
from mlinvert.service import ServiceSettings, Store, build_predictors, create_app

X = np.random.default_rng(3).random((2, 6, 5)).astype(np.float32)


def _settings_from_cli(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, args: list[str], env: dict[str, str]
) -> ServiceSettings:
    """Run the real serve command with ``args`` and ``env``; capture its settings."""
    import mlinvert.service.server as server

    seen: list[ServiceSettings] = []
    monkeypatch.setattr(server, "serve", lambda settings, log_level: seen.append(settings))
    monkeypatch.delenv("MLINVERT_LOG_SYNCHRONOUS", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    app = typer.Typer()
    serve_cli.register(app)

    @app.callback()
    def _root() -> None:
        """Test root."""

    result = CliRunner().invoke(app, ["serve", "--db", str(tmp_path / "s.db"), *args])
    assert result.exit_code == 0, result.output
    (settings,) = seen
    return settings


@pytest.mark.parametrize(
    ("args", "env", "mode"),
    [
        ([], {}, "NORMAL"),
        (["--log-synchronous"], {}, "FULL"),
        (["--no-log-synchronous"], {}, "NORMAL"),
        ([], {"MLINVERT_LOG_SYNCHRONOUS": "FULL"}, "FULL"),
        ([], {"MLINVERT_LOG_SYNCHRONOUS": "true"}, "FULL"),
        ([], {"MLINVERT_LOG_SYNCHRONOUS": "normal"}, "NORMAL"),
        (["--no-log-synchronous"], {"MLINVERT_LOG_SYNCHRONOUS": "FULL"}, "NORMAL"),  # flag wins
        (["--log-synchronous"], {"MLINVERT_LOG_SYNCHRONOUS": "0"}, "FULL"),
    ],
)
def test_log_synchronous_flag_and_variable(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    args: list[str],
    env: dict[str, str],
    mode: str,
) -> None:
    settings = _settings_from_cli(monkeypatch, tmp_path, args, env)
    assert settings.log_synchronous == mode
    # the query log's SQLite connection really runs in that mode (FULL = 2, NORMAL = 1)
    models: dict[str, Any] = {"faces": ToySoftmax()}
    app = create_app(settings, build_predictors(models, settings))
    try:
        pragma = app.state.store._conn.execute("PRAGMA synchronous").fetchone()[0]
    finally:
        app.state.store.close()
    assert pragma == {"FULL": 2, "NORMAL": 1}[mode]


@pytest.mark.parametrize(
    ("args", "env", "spec"),
    [
        ([], {}, None),
        (["--detect", "detect:block:50"], {}, "detect:block:50"),
        ([], {"MLINVERT_DETECTOR": "detect"}, "detect"),
        (["--detect", "detect:7"], {"MLINVERT_DETECTOR": "detect:block"}, "detect:7"),
    ],
)
def test_detect_flag_and_variable(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    args: list[str],
    env: dict[str, str],
    spec: str | None,
) -> None:
    monkeypatch.delenv("MLINVERT_DETECTOR", raising=False)
    settings = _settings_from_cli(monkeypatch, tmp_path, args, env)
    assert settings.detector == spec
    models: dict[str, Any] = {"faces": ToySoftmax(), "survey": ToyTabular()}
    predictors = build_predictors(models, settings)
    assert [g.name for g in predictors["faces"].guards] == ([] if spec is None else ["detector"])
    assert predictors["survey"].guards == ()  # no pixel windows in a survey row


def test_bad_log_synchronous_value_is_a_config_error(tmp_path: Path) -> None:
    env = {"MLINVERT_DB": str(tmp_path / "s.db"), "MLINVERT_LOG_SYNCHRONOUS": "sometimes"}
    with pytest.raises(ConfigError, match=r"FULL .* or NORMAL"):
        ServiceSettings.from_env(env)


@pytest.mark.parametrize(
    ("overrides", "log_level", "message"),
    [
        ({"port": "busy"}, "warning", "another service listens there"),
        ({"host": "no-such-host.invalid"}, "warning", "pass --host an address of this machine"),
        ({"host": "192.0.2.1"}, "warning", "is not an address of this machine"),
        ({"model_policies": ("faces=round:2",)}, "warning", "names no served model"),
        ({}, "loud", "--log-level must be one of"),
    ],
)
def test_serve_refuses_what_it_cannot_do_before_it_says_serving(
    overrides: dict[str, Any],
    log_level: str,
    message: str,
    model_dir: tuple[Path, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A port in use, a host not of this machine, a --model-policy for a model not served
    (its defence would silently not apply) or an unknown log level: one ConfigError, and
    uvicorn is never started."""
    import socket

    import uvicorn

    from mlinvert.service.server import serve

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("uvicorn started"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        if overrides.get("port") == "busy":
            overrides = {**overrides, "port": busy.getsockname()[1]}
        settings = ServiceSettings(db=tmp_path / "s.db", models=(str(model_dir[0]),), **overrides)
        with pytest.raises(ConfigError, match=message):
            serve(settings, log_level=log_level)


def _post(client: Any, key: str, content_type: str | None, body: bytes) -> Any:
    headers = {"X-API-Key": key}
    if content_type is not None:
        headers["Content-Type"] = content_type
    return client.post("/v1/models/faces/predict", content=body, headers=headers)


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "image/png", "application/x-www-form-urlencoded", "multipart/form-data"],
)
def test_unsupported_content_type_gets_415_naming_the_accepted_ones(
    make_client: Callable[..., Any], store: Store, api_key: str, content_type: str
) -> None:
    client = make_client(store)
    body = json.dumps({"inputs": X.tolist()}).encode()  # valid JSON, wrong declared type
    r = _post(client, api_key, content_type, body)
    assert r.status_code == 415, r.text
    error = r.json()["error"]
    assert error["type"] == "UnsupportedMediaType" and error["status"] == 415
    assert content_type in error["message"]
    assert "application/json" in error["message"]
    assert "application/octet-stream" in error["message"]
    (logged,) = store.queries()
    assert (logged.status, logged.outcome) == (415, "UnsupportedMediaType")


def test_json_types_and_a_missing_content_type_are_read_as_json(
    make_client: Callable[..., Any], store: Store, api_key: str
) -> None:
    client = make_client(store)
    body = json.dumps({"inputs": X.tolist()}).encode()
    answers = [
        _post(client, api_key, ct, body)
        for ct in (None, "application/json", "Application/JSON; charset=utf-8")
    ]
    assert [a.status_code for a in answers] == [200, 200, 200], answers[0].text
    assert answers[0].json() == answers[1].json() == answers[2].json()
    # the key is checked first: an anonymous text/plain request is a 401, not a 415
    assert _post(client, "", "text/plain", body).status_code == 401


def test_http_oracle_raises_unsupported_media_type_on_415() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            model = {
                "name": "faces",
                "kind": "toy",
                "input_shape": [6, 5],
                "class_names": ["a", "b"],
                "carries": "probs",
                "policy": "full",
                "max_batch": 8,
            }
            return httpx.Response(200, json={"models": [model]})
        body = {"error": {"type": "UnsupportedMediaType", "status": 415, "message": "send JSON"}}
        return httpx.Response(415, json=body)

    client = httpx.Client(transport=httpx.MockTransport(handler))
    oracle = HttpOracle("http://svc/v1/models/faces", "k", client=client)
    with pytest.raises(UnsupportedMediaType, match="send JSON"):
        oracle.query(X)
    assert oracle.n_queries == 0


def test_body_limits_flags_variables_and_validation(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = _settings_from_cli(
        monkeypatch,
        tmp_path,
        ["--body-timeout", "2.5", "--body-budget", str(2**25)],
        {"MLINVERT_IDLE_TIMEOUT": "0.5", "MLINVERT_MAX_BODY_BYTES": str(2**20)},
    )
    assert (settings.body_timeout, settings.idle_timeout) == (2.5, 0.5)
    assert (settings.max_body_bytes, settings.body_budget_bytes) == (2**20, 2**25)
    with pytest.raises(ConfigError, match="at least max_body_bytes"):
        ServiceSettings(db=tmp_path / "s.db", max_body_bytes=2**20, body_budget_bytes=2**19)
    with pytest.raises(ConfigError, match="idle_timeout must be a number of seconds > 0"):
        ServiceSettings(db=tmp_path / "s.db", idle_timeout=float("nan"))
    with pytest.raises(ConfigError, match="MLINVERT_BODY_TIMEOUT='soon' is not a number"):
        ServiceSettings.from_env({"MLINVERT_DB": "x.db", "MLINVERT_BODY_TIMEOUT": "soon"})
