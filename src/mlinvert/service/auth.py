"""The API key a request presents: one dependency every authenticated route takes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from mlinvert.errors import Unauthorized

bearer_scheme = HTTPBearer(auto_error=False, description="Authorization: Bearer <key>")
key_scheme = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: <key>")


@dataclass(frozen=True)
class PresentedKey:
    """The key a request presents (None when it presents none), or why its credentials
    are malformed (``problem``). Not yet looked up: the store authenticates ``key``."""

    key: str | None
    problem: str | None = None

    def require(self) -> str | None:
        """The presented key; Unauthorized when the credentials are malformed."""
        if self.problem is not None:
            raise Unauthorized(self.problem)
        return self.key


def presented_key(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    api_key: Annotated[str | None, Depends(key_scheme)],
) -> PresentedKey:
    """``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` (Bearer first)."""
    header = request.headers.get("authorization")
    if header is not None and bearer is None:
        return PresentedKey(
            None, "malformed Authorization header: expected 'Authorization: Bearer <key>'"
        )
    if bearer is not None:
        return PresentedKey(bearer.credentials.strip())
    return PresentedKey(api_key.strip() if api_key else None)


#: The key dependency of every authenticated route.
ApiKey = Annotated[PresentedKey, Depends(presented_key)]
