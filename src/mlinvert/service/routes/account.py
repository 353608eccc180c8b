"""``GET /v1/account``: the calling account's budget, answered inputs and standing."""

from __future__ import annotations

import time

from fastapi import APIRouter

from mlinvert.defenses.ratelimit import redis_deadline
from mlinvert.errors import RateLimited
from mlinvert.service.auth import ApiKey
from mlinvert.service.openapi import ERRORS
from mlinvert.service.predictors import limiter_of, refuses
from mlinvert.service.schemas import AccountInfo, RateLimitStatus
from mlinvert.service.state import Service, ServiceState

router = APIRouter(tags=["account"])


@router.get(
    "/v1/account",
    response_model=AccountInfo,
    responses={code: ERRORS[code] for code in (401, 429, 503)},
)
def account(key: ApiKey, service: Service) -> AccountInfo:
    """The calling account: its rate limit and what it may still send, the inputs
    answered so far, and whether the query detector blocks it.

    Not a query: nothing is spent, logged or shown to the detector. 401 for a
    missing, malformed, unknown or revoked key, as for a prediction; 429 past
    ``--account-rate`` (shared by every process on one Redis) or when the rate
    limiter's store cannot be read; 503 when Redis lost its data under
    ``--redis-loss refuse``.
    """
    account = service.store.authenticate(key.require())
    account_rate = service.account_rate
    # one deadline for the limit's bucket and the budget read (both in Redis, if used)
    with redis_deadline(service.settings.redis_timeout):
        asked = service.account_reads.take(account, 1, account_rate, time.time())
        if not asked.allowed:
            raise RateLimited(
                f"GET /v1/account answers an account at most {account_rate}; retry after "
                f"{asked.retry_after:.1f} s (predictions carry the same fields in their "
                "RateLimit headers)",
                retry_after=asked.retry_after,
            )
        return account_info(service, account)


def account_info(service: ServiceState, account: str) -> AccountInfo:
    """What ``GET /v1/account`` tells ``account`` (read without spending anything)."""
    rate = None
    limited = next(
        ((p, lim) for p in service.predictors.values() if (lim := limiter_of(p)) is not None),
        None,
    )
    if limited is not None:
        predictor, limiter = limited
        allowance = limiter.allowance(account, predictor.clock())
        rate = RateLimitStatus(
            limit=str(limiter.rate),
            capacity=limiter.rate.count,
            remaining=allowance.remaining,
            refill_in=round(allowance.refill_in, 3),
            reset_in=round(allowance.reset_in, 3),
        )
    blocked = sorted(name for name, p in service.predictors.items() if refuses(p, account))
    return AccountInfo(
        account=account,
        status="blocked" if blocked else "active",
        blocked_models=blocked,
        rate_limit=rate,
        inputs_answered=service.store.answered(account),
    )
