"""The one error tree of mlinvert.

Every message says what was expected, what came, and how to fix it. The HTTP
service maps these classes to status codes in one table (``service.errors``).
"""

from __future__ import annotations


class MlinvertError(Exception):
    """Base class of every error mlinvert raises on purpose."""


class ConfigError(MlinvertError, ValueError):
    """A configuration value is invalid (raised when a config is created)."""


class DataError(MlinvertError):
    """A data set is missing, has the wrong layout, or cannot be read."""


class ModelError(MlinvertError):
    """A model folder is missing, incomplete, tampered with, or incompatible."""


class NotFittedError(ModelError):
    """A model was used before ``fit``."""


class OracleError(MlinvertError):
    """A prediction query failed."""


class QueryRejected(OracleError):
    """The input was refused as malformed (wrong shape, NaN, out of range, ...)."""


class BadRequest(QueryRejected):
    """The request itself is malformed (undecodable JSON, bad base64, wrong fields)."""


class UnsupportedMediaType(BadRequest):
    """The request body's Content-Type is not one the service reads."""


class RequestTimeout(BadRequest):
    """The request body did not arrive in time (sent too slowly, or stalled)."""


class ClientDisconnected(BadRequest):
    """The client closed the connection before its request body arrived."""


class InputTooLarge(QueryRejected):
    """A batch or request body exceeds the configured limit."""


class UnknownModel(OracleError):
    """The requested model name is not served."""


class Unauthorized(OracleError):
    """No valid API key came with the request."""


class _RetryLater(OracleError):
    """An answer that says when to ask again (``retry_after`` seconds)."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[object, ...]:
        # pickled with its keyword (a cluster worker returns errors to the driver)
        return (_retry_later, (type(self), str(self), self.retry_after))


def _retry_later(cls: type[_RetryLater], message: str, retry_after: float) -> _RetryLater:
    return cls(message, retry_after=retry_after)


class RateLimited(_RetryLater):
    """The account's query budget is spent for now; retry after ``retry_after`` seconds."""


class Unavailable(_RetryLater):
    """The service cannot answer now (too many request bodies in flight, or its rate-limit
    store lost the budgets); retry after ``retry_after`` seconds."""


class Blocked(OracleError):
    """The account was blocked (for example flagged by the query detector)."""


class BudgetExhausted(OracleError):
    """An attacker-side query budget (``Budgeted`` oracle) is spent."""


class GradientUnavailable(MlinvertError):
    """A white-box attack needs ``class_gradient`` and the oracle does not provide it."""


class AttackError(MlinvertError):
    """An attack cannot run with the given target or configuration."""
