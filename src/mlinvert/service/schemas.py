"""Request and response documents of the prediction API (pydantic, for validation + OpenAPI)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

NestedNumbers = Annotated[
    list[Any],
    WithJsonSchema(
        {
            "type": "array",
            "description": "A batch of inputs as nested lists of numbers in [0, 1], "
            "shaped (n, *input_shape); encoded survey rows for tabular models.",
            "items": {
                "description": "One input: numbers nested as the model's input_shape",
                "anyOf": [
                    {"type": "array", "items": {"type": "number"}},
                    {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
                    {
                        "type": "array",
                        "items": {
                            "type": "array",
                            "items": {"type": "array", "items": {"type": "number"}},
                        },
                    },
                ],
            },
        }
    ),
]

Scalar = str | float | int | bool | None


class BinaryArray(BaseModel):
    """A batch as base64 of a C-ordered little-endian float32 or uint8 array."""

    model_config = ConfigDict(extra="forbid")

    dtype: Literal["float32", "uint8"] = Field(
        description="float32 values in [0, 1], or uint8 pixels (divided by 255)"
    )
    shape: list[Annotated[int, Field(ge=0)]] = Field(
        min_length=1, max_length=8, description="(n, *input_shape)"
    )
    data: str = Field(description="base64 of the raw array bytes")


class PredictRequest(BaseModel):
    """Exactly one of `inputs`, `binary` or `records`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"inputs": [[[0.0, 0.5, 1.0], [0.25, 0.75, 0.5]]]},
                {"binary": {"dtype": "uint8", "shape": [1, 2, 3], "data": "AIAA/0C/"}},
                {"records": [{"age": 41, "sex": "female"}]},
            ]
        },
    )

    inputs: NestedNumbers | None = None
    binary: BinaryArray | None = None
    records: list[dict[str, Scalar]] | None = Field(
        default=None, description="survey records {feature: value} for tabular models"
    )


class Prediction(BaseModel):
    """The answer for one input, as the output policy allows."""

    label: int
    label_name: str
    scores: list[float] | None = Field(
        default=None, description="per-class scores (null when the policy answers labels only)"
    )
    confidence: float | None = Field(
        default=None, description="confidence of the label (tree models, BigML-style)"
    )


class PredictResponse(BaseModel):
    """Answers for a batch, in input order."""

    model: str
    policy: str
    carries: str
    predictions: list[Prediction]


class ModelInfo(BaseModel):
    """What the API tells its callers about a served model."""

    name: str
    kind: str
    input_shape: list[int]
    class_names: list[str]
    policy: str
    carries: str
    max_batch: int
    rate_limit: str | None
    detector: str | None = None
    feature_names: list[str] | None = None


class ModelList(BaseModel):
    """All served models."""

    models: list[ModelInfo]


class RateLimitStatus(BaseModel):
    """An account's rate limit now, read without spending anything."""

    limit: str = Field(description="the limit, e.g. 2000/hour (inputs, not requests)")
    capacity: int = Field(description="the most inputs the account may ever send at once")
    remaining: int = Field(description="inputs the account may send now")
    refill_in: float = Field(description="seconds until one more input is allowed (0 when full)")
    reset_in: float = Field(description="seconds until the full capacity is back (0 when full)")


class AccountInfo(BaseModel):
    """The calling account: its limit, what it may still send, what it was answered."""

    account: str
    status: Literal["active", "blocked"] = Field(
        description="blocked: the query detector refuses this account (403) until an "
        "operator clears it"
    )
    blocked_models: list[str] = Field(
        description="the models that refuse the account (empty when active)"
    )
    rate_limit: RateLimitStatus | None = Field(description="null when no rate limit applies")
    inputs_answered: int = Field(description="inputs the service has answered this account")


class Health(BaseModel):
    """Liveness answer."""

    status: str
    models: list[str]


class Readiness(BaseModel):
    """Readiness answer: each store a prediction needs, "ok" or what is wrong with it."""

    status: Literal["ready", "unready"]
    checks: dict[str, str] = Field(
        description="database (the account database), redis (when configured): 'ok' or the problem"
    )


class ErrorDetail(BaseModel):
    """What went wrong, and how to fix it."""

    type: str
    status: int
    message: str
    retry_after: float | None = None


class ErrorBody(BaseModel):
    """Every error answer."""

    error: ErrorDetail
