"""Who may call what: the inbound authorization policy and the layer that applies it.

`Policy` is a pure decision, asked two questions of an already normalised
path: `is_public` (may this be reached without a token?) and `allows` (may
this verified service call this method on this path?). `authorize` is the
inbound layer that refuses what the policy does not allow.
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.config.settings import PolicyRule
from sidecar.http import problem
from sidecar.names import ANY_SERVICE
from sidecar.paths import check_pattern, matches
from sidecar.stack import Call, Handler, Layer, Reply, safe_method


@dataclass(frozen=True, slots=True)
class _Rule:
    sources: frozenset[str]  # lowercase; contains "*" for every service
    methods: frozenset[str] | None  # uppercase; None for every method
    paths: tuple[str, ...] | None  # None for every path

    def covers(self, source: str, method: str, path: str) -> bool:
        if ANY_SERVICE not in self.sources and source not in self.sources:
            return False
        if self.methods is not None and method not in self.methods:
            return False
        return self.paths is None or any(matches(pattern, path) for pattern in self.paths)


class Policy:
    """The inbound policy: absent, any verified mesh service may call; present, default deny."""

    def __init__(
        self, *, rules: tuple[PolicyRule, ...] | None, public_paths: tuple[str, ...]
    ) -> None:
        for pattern in public_paths:
            check_pattern(pattern)
        self._public = tuple(public_paths)
        self._rules = None if rules is None else tuple(_compile(rule) for rule in rules)

    def is_public(self, path: str) -> bool:
        """True if `path` is reachable without a token."""
        return any(matches(pattern, path) for pattern in self._public)

    def allows(self, source: str, method: str, path: str) -> bool:
        """True if the verified service `source` may call `method` on `path`."""
        if self._rules is None:
            return True
        source, method = source.lower(), method.upper()
        return any(rule.covers(source, method, path) for rule in self._rules)


def _compile(rule: PolicyRule) -> _Rule:
    if not rule.sources:
        raise ValueError("a policy rule needs at least one source")
    for pattern in rule.paths or ():
        check_pattern(pattern)
    return _Rule(
        sources=frozenset(source.lower() for source in rule.sources),
        methods=None if rule.methods is None else frozenset(m.upper() for m in rule.methods),
        paths=None if rule.paths is None else tuple(rule.paths),
    )


def authorize(*, policy: Policy) -> Layer:
    """Inbound, after the token: the policy decides on caller, method and path.

    Public paths pass, whoever calls. Refuses with 403 `policy_denied`.
    """

    async def authorize_layer(call: Call, next: Handler) -> Reply:
        # A public path is public to every caller, verified or not.
        if policy.is_public(call.path):
            return await next(call)
        if not policy.allows(call.source, call.method, call.path):
            return problem.reply(
                "policy_denied",
                f"The policy of this service does not allow {call.source} to call "
                f"{safe_method(call.method)} {call.route}. "
                "Add a rule under inbound.policy if it should.",
            )
        return await next(call)

    return authorize_layer
