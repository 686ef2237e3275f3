"""Resilience for outbound calls: classify, deadline, retry, breaker, bulkhead, endpoints.

Settings come from `sidecar.config.settings`; state lives in per-service registries
so a config reload can rebuild one service without touching the others; the
layers read both. This module holds the two helpers every piece shares.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeAlias, TypeVar, cast

T = TypeVar("T")
P = TypeVar("P")
S = TypeVar("S")

# One setting for every service, a mapping by service name, or a lookup function.
PerService: TypeAlias = T | Mapping[str, T] | Callable[[str], T]


def per_service(setting: PerService[T]) -> Callable[[str], T]:
    """A lookup `service name -> setting` from any of the three forms.

    A mapping without the name raises KeyError: routing only lets configured
    services through, so a miss is a wiring bug, not a request to default.
    """
    if isinstance(setting, Mapping):
        table = cast(Mapping[str, T], setting)
        return table.__getitem__
    if callable(setting):
        return cast(Callable[[str], T], setting)
    value = cast(T, setting)
    return lambda _name: value


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
