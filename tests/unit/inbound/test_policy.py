"""The inbound policy: who may call what, and the layer that applies it."""

import pytest

from sidecar.config.settings import PolicyRule
from sidecar.inbound.policy import Policy, authorize
from tests.support.calls import Next, make_call
from tests.support.policy import configured, unconfigured

SPEC_RULE = PolicyRule(
    sources=("healthcare-api",), methods=("POST",), paths=("/claims", "/claims/*")
)


def test_no_policy_allows_any_verified_service() -> None:
    policy = unconfigured()
    assert policy.allows("anyone", "DELETE", "/anything")


def test_empty_policy_denies_everything() -> None:
    policy = configured()
    assert not policy.allows("healthcare-api", "GET", "/claims")


@pytest.mark.parametrize(
    ("source", "method", "path", "allowed"),
    [
        ("healthcare-api", "POST", "/claims", True),
        ("healthcare-api", "POST", "/claims/7/lines", True),
        ("healthcare-api", "post", "/claims/", True),
        ("Healthcare-API", "POST", "/claims", True),
        ("healthcare-api", "GET", "/claims", False),
        ("healthcare-api", "POST", "/claimsx", False),
        ("healthcare-api", "POST", "/admin", False),
        ("billing-engine", "POST", "/claims", False),
    ],
)
def test_spec_rule(source: str, method: str, path: str, allowed: bool) -> None:
    policy = configured(SPEC_RULE)
    assert policy.allows(source, method, path) is allowed


def test_rule_sources_compare_case_insensitively() -> None:
    policy = configured(PolicyRule(sources=("Healthcare-API",)))
    assert policy.allows("healthcare-api", "GET", "/x")


def test_rule_without_methods_or_paths_allows_all_of_them() -> None:
    policy = configured(PolicyRule(sources=("a",)))
    assert policy.allows("a", "PATCH", "/deep/path")
    assert not policy.allows("b", "PATCH", "/deep/path")


def test_rule_methods_are_upper_cased() -> None:
    policy = configured(PolicyRule(sources=("a",), methods=("get",)))
    assert policy.allows("a", "GET", "/")
    assert not policy.allows("a", "POST", "/")


def test_wildcard_source() -> None:
    policy = configured(PolicyRule(sources=("*",), methods=("GET",), paths=("/status",)))
    assert policy.allows("whoever", "GET", "/status")
    assert not policy.allows("whoever", "GET", "/claims")


def test_any_matching_rule_allows() -> None:
    policy = configured(SPEC_RULE, PolicyRule(sources=("billing-engine",), methods=("GET",)))
    assert policy.allows("billing-engine", "GET", "/claims/1")
    assert policy.allows("healthcare-api", "POST", "/claims/1")
    assert not policy.allows("billing-engine", "POST", "/claims/1")


def test_public_paths() -> None:
    policy = configured(public=("/health", "/docs/*"))
    assert policy.is_public("/health")
    assert policy.is_public("/docs")
    assert policy.is_public("/docs/a/b")
    assert not policy.is_public("/health/x")
    assert not policy.is_public("/healthz")
    assert not unconfigured().is_public("/health")


@pytest.mark.parametrize(
    ("rules", "public"),
    [
        ((PolicyRule(sources=()),), ()),
        ((PolicyRule(sources=("a",), paths=("claims",)),), ()),
        (None, ("/claims*",)),
    ],
)
def test_bad_settings_are_rejected(
    rules: tuple[PolicyRule, ...] | None, public: tuple[str, ...]
) -> None:
    with pytest.raises(ValueError):
        Policy(rules=rules, public_paths=public)


@pytest.mark.parametrize(
    ("rules", "public"),
    [((PolicyRule(sources=("a",), paths=("*",)),), ()), (None, ("*",))],
)
def test_a_bare_star_is_not_a_path(
    rules: tuple[PolicyRule, ...] | None, public: tuple[str, ...]
) -> None:
    # `*` as a source means any service; as a path it is refused, `/*` says every path.
    with pytest.raises(ValueError, match="must be a path that begins with '/'"):
        Policy(rules=rules, public_paths=public)


def test_slash_star_covers_every_path() -> None:
    policy = configured(PolicyRule(sources=("*",), paths=("/*",)))
    assert policy.allows("anyone", "GET", "/")
    assert policy.allows("anyone", "GET", "/a/b")


# -- the layer ---------------------------------------------------------------------


async def test_authorize_default_deny_with_policy() -> None:
    policy = configured(PolicyRule(sources=("a",), methods=("POST",), paths=("/claims/*",)),
                        public=("/health",))
    layer = authorize(policy=policy)
    downstream = Next()
    allowed = make_call("/claims/1", method="POST", direction="inbound")
    allowed.source = "a"
    assert (await layer(allowed, downstream)).status == 200
    for source, method, path in [("a", "GET", "/claims/1"), ("c", "POST", "/claims/1"),
                                 ("a", "POST", "/claimsx")]:
        denied = make_call(path, method=method, direction="inbound")
        denied.source = source
        reply = await layer(denied, downstream)
        assert reply.status == 403 and reply.reason == "policy_denied"
    assert len(downstream.calls) == 1
