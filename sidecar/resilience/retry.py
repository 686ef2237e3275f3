"""Retries: only what is safe, only what helps, only within the time and budget left.

The rules (SPEC "Resilience rules"): `attempts` counts the first try; only a
result `classify` calls RETRYABLE is retried; idempotent methods always,
others only with an `Idempotency-Key` or when no byte was sent; each delay is
full jitter in `[0, min(max, base * 2^n))` for the n-th retry (n from 0);
an upstream `Retry-After` replaces the delay when it fits in the time left
and forbids the retry when it does not; a 429 that carries one is retried
as a 503 would be (SPEC "Rate limits"), though it is no failure; a body over
`max_body` streams once and is never retried; past the service's budget the
last answer goes back.
"""

from __future__ import annotations

import math
import random
from email.utils import parsedate_to_datetime

from sidecar.clock import Clock
from sidecar.config.settings import Backoff, RetryPolicy
from sidecar.http.headers import IDEMPOTENCY_KEY, RETRY_AFTER
from sidecar.resilience.budget import RetryBudgets
from sidecar.resilience.classify import Outcome, classify, is_refusal
from sidecar.resilience.deadline import remaining
from sidecar.stack import Call, Handler, Layer, Reply, UpstreamError

MAX_DELAY_DIGITS = 15
"""A delay-seconds of more digits (over 31 million years) is read as infinite."""
TOO_MANY_REQUESTS = 429


def backoff_delay(backoff: Backoff, retry: int, rng: random.Random) -> float:
    """Full jitter: uniform in `[0, min(max, base * 2^retry))`, `retry` counting from 0."""
    ceiling = min(backoff.max, backoff.base * 2.0 ** min(retry, 62))
    return rng.random() * ceiling


def retry_after(reply: Reply, wall_now: float) -> float | None:
    """Seconds an upstream asked us to wait (`Retry-After`), or None if it asked nothing valid.

    A wait of more than `MAX_DELAY_DIGITS` digits is infinite: longer than any time left,
    so it forbids the retry, as a long `Retry-After` should.
    """
    value = reply.headers.get(RETRY_AFTER)
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        # Judged by its length first: int() refuses 5000 digits, float() overflows at 309.
        return float(int(value)) if len(value) <= MAX_DELAY_DIGITS else math.inf
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP-date is always GMT
        return None
    return max(0.0, when.timestamp() - wall_now)


def may_resend(call: Call, result: Reply | BaseException, policy: RetryPolicy) -> bool:
    """Whether sending this request again cannot do harm twice."""
    if call.method.upper() in policy.idempotent_methods or IDEMPOTENCY_KEY in call.headers:
        return True
    # Nothing left: the upstream cannot have acted on it.
    return isinstance(result, UpstreamError) and not result.sent


def plan_delay(
    call: Call,
    result: Reply | BaseException,
    policy: RetryPolicy,
    *,
    retries: int,
    replayable: bool,
    time_left: float | None,
    wall_now: float,
    rng: random.Random,
) -> float | None:
    """The delay before the next attempt, or None when this result is final.

    Everything but the budget: that is spent only once a retry is certain.
    """
    if call.attempts >= policy.attempts or not replayable:
        return None
    asked = retry_after(result, wall_now) if isinstance(result, Reply) else None
    throttled = _throttled(result, asked, policy)
    if not throttled and classify(result, policy.retry_on) is not Outcome.RETRYABLE:
        return None
    if not may_resend(call, result, policy):
        return None
    delay = asked if asked is not None else backoff_delay(policy.backoff, retries, rng)
    if not math.isfinite(delay) or (time_left is not None and delay >= time_left):
        return None  # a wait that uses up the deadline leaves no attempt
    return delay


def _throttled(result: Reply | BaseException, asked: float | None,
               policy: RetryPolicy) -> bool:
    """A 429 saying when to come back is retried then, as a 503 would be (when 503 is in
    `retry_on`). Without a `Retry-After` it is not: at once would only be refused again.
    It is never a failure: breaker and outlier detection do not count it."""
    return (isinstance(result, Reply) and result.status == TOO_MANY_REQUESTS
            and asked is not None and "503" in policy.retry_on)


def retry(
    *,
    budgets: RetryBudgets,
    clock: Clock,
    rng: random.Random | None = None,
) -> Layer:
    """Sends the call again while SPEC's retry rules allow, within deadline and budget.

    Sits inside the deadline and the bulkhead (a retry keeps its slot and its
    time) and outside the breaker (every attempt counts there). Sets
    `call.attempts` (attempts made; a breaker refusal is none) and
    `call.retries`; the rules are the routed target's `retry` settings. It
    refuses nothing itself: when no retry is allowed the last reply goes back
    as it came, or the last exception is raised again for an outer layer to
    turn into a problem reply. Every reply it drops is discarded so its
    connection goes back to the pool.
    """
    random_source = rng or random.Random()

    async def retry_layer(call: Call, next: Handler) -> Reply:
        assert call.upstream is not None, "retry sits inside routing"
        policy = call.upstream.policy.retry
        budget = budgets.for_service(call.target)
        budget.record_request()
        call.retries = 0
        replayable = policy.attempts > 1 and await call.body.buffer(policy.max_body)
        retries = 0
        while True:
            call.attempts += 1
            result: Reply | Exception
            try:
                result = await next(call)
            except Exception as exc:
                result = exc
            if is_refusal(result):
                call.attempts -= 1  # the breaker said no: nothing went out
            delay = plan_delay(
                call,
                result,
                policy,
                retries=retries,
                replayable=replayable,
                time_left=remaining(call, clock),
                wall_now=clock.time(),
                rng=random_source,
            )
            if delay is None or not budget.can_retry():
                if isinstance(result, Exception):
                    raise result
                return result
            budget.record_retry()
            retries += 1
            call.retries = retries
            if isinstance(result, Reply):
                result.discard()
            await clock.sleep(delay)

    return retry_layer
