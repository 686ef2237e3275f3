"""Local rate limits, inbound: token buckets that keep callers from swamping the app.

`inbound.rate_limits` is a list of rules (SPEC "Rate limits (inbound)"): each
holds one bucket for all the calls it matches (`total`) or one per verified
caller (`per_caller`), and may be scoped by `from`, `methods` and `paths`.
Every rule that matches a call must admit it; a token is taken from each
only when all of them can give one, so a refused call costs no rule a token.
Buckets refill on the injected clock and keep their level across a reload
that leaves their rule as it was (as Linkerd's HTTPLocalRateLimitPolicy and
Envoy's local rate limit, per proxy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sidecar.clock import Clock
from sidecar.config.settings import Bucket, RateLimit
from sidecar.http import problem
from sidecar.http.headers import RETRY_AFTER
from sidecar.paths import matches
from sidecar.stack import Call, Handler, Layer, Reply


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up; it starts full."""

    __slots__ = ("_clock", "_tokens", "_updated", "burst", "rate")

    def __init__(self, bucket: Bucket, clock: Clock) -> None:
        self.rate = bucket.rate
        self.burst = bucket.burst
        self._clock = clock
        self._tokens = float(bucket.burst)
        self._updated = clock.monotonic()

    def _refill(self) -> None:
        now = self._clock.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now

    def wait(self) -> float:
        """Seconds until a token is free: 0 when one is there now."""
        self._refill()
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) / self.rate

    def take(self) -> None:
        """Take a token `wait()` just said is there."""
        self._tokens -= 1


@dataclass(slots=True)
class _Rule:
    rule: RateLimit
    index: int  # its place in inbound.rate_limits, for the answer's detail
    clock: Clock
    total: TokenBucket | None = None
    callers: dict[str, TokenBucket] = field(default_factory=dict)  # verified callers only

    def covers(self, call: Call) -> bool:
        rule = self.rule
        return ((rule.sources is None or call.source in rule.sources)
                and (rule.methods is None or call.method in rule.methods)
                and (rule.paths is None or any(matches(p, call.path) for p in rule.paths)))

    def bucket(self, caller: str) -> TokenBucket:
        if self.rule.total is not None:
            if self.total is None:
                self.total = TokenBucket(self.rule.total, self.clock)
            return self.total
        assert self.rule.per_caller is not None
        bucket = self.callers.get(caller)
        if bucket is None:
            # One per verified service (or `anonymous`): as many as the JWKS has keys.
            bucket = self.callers[caller] = TokenBucket(self.rule.per_caller, self.clock)
        return bucket


class RateLimits:
    """The buckets of every rule, kept across reloads for rules that stay the same."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._rules: list[_Rule] = []

    def reload(self, rules: tuple[RateLimit, ...]) -> None:
        kept = {(held.index, held.rule): held for held in self._rules}
        self._rules = [kept.get((index, rule)) or _Rule(rule, index, self._clock)
                       for index, rule in enumerate(rules)]

    def admit(self, call: Call) -> tuple[_Rule, float] | None:
        """None when every rule that matches `call` gave it a token; else the rule that
        holds it back longest and the seconds until it would not."""
        buckets = [(rule, rule.bucket(call.source)) for rule in self._rules if rule.covers(call)]
        worst: tuple[_Rule, float] | None = None
        for rule, bucket in buckets:
            wait = bucket.wait()
            if wait > 0 and (worst is None or wait > worst[1]):
                worst = (rule, wait)
        if worst is None:
            for _, bucket in buckets:
                bucket.take()
        return worst


def limit_rate(*, limits: RateLimits) -> Layer:
    """Inbound, once the caller is verified and allowed: the rate limits admit the call
    or answer 429 `rate_limited` with `Retry-After` (whole seconds until a token is free,
    at least 1). The app never sees a refused call."""

    async def limit_rate_layer(call: Call, next: Handler) -> Reply:
        refused = limits.admit(call)
        if refused is None:
            return await next(call)
        rule, wait = refused
        seconds = max(1, math.ceil(wait))
        kind = "all callers together" if rule.rule.total is not None else call.source
        return problem.reply(
            "rate_limited",
            f"Over this service's rate limit for {kind} (inbound.rate_limits[{rule.index}]). "
            f"Retry after {seconds} s.",
            headers={RETRY_AFTER: str(seconds)},
        )

    return limit_rate_layer
