"""Resilience for outbound calls: classify, deadline, retry, breaker, bulkhead, endpoints.

Settings come from the call's routed target (`call.upstream.policy`); state
lives in per-service registries so a config reload can rebuild one service
without touching the others. This module holds the registry they share.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

P = TypeVar("P")
S = TypeVar("S")


class Registry(Generic[P, S]):
    """Per-service state built lazily from per-service policies.

    `reload` keeps the state of every service whose policy is unchanged (an
    open breaker stays open across a reload that did not touch it) and drops
    the rest; calls already holding the old state finish on it.
    """

    def __init__(self, policies: Mapping[str, P], *, default: P) -> None:
        self._policies = dict(policies)
        self._default = default
        self._states: dict[str, tuple[P, S]] = {}

    def _build(self, name: str, policy: P) -> S:
        raise NotImplementedError

    def policy(self, name: str) -> P:
        return self._policies.get(name, self._default)

    def for_service(self, name: str) -> S:
        held = self._states.get(name)
        if held is None:
            policy = self.policy(name)
            held = (policy, self._build(name, policy))
            self._states[name] = held
        return held[1]

    def reload(self, policies: Mapping[str, P]) -> None:
        self._policies = dict(policies)
        self._states = {
            name: held
            for name, held in self._states.items()
            if name in self._policies and self._policies[name] == held[0]
        }

    def items(self) -> Iterator[tuple[str, S]]:
        """Every configured service with its state (built on first look)."""
        for name in self._policies:
            yield name, self.for_service(name)
