"""The one way unit tests build an inbound `Policy`: configured, or not configured at all."""

from __future__ import annotations

from sidecar.config.settings import PolicyRule
from sidecar.inbound.policy import Policy


def configured(*rules: PolicyRule, public: tuple[str, ...] = ()) -> Policy:
    """A configured policy: default deny, each of `rules` allows; `public` paths need no token."""
    return Policy(rules=rules, public_paths=public)


def unconfigured(*, public: tuple[str, ...] = ()) -> Policy:
    """No policy configured: any verified service may call anything."""
    return Policy(rules=None, public_paths=public)
