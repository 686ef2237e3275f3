"""Config loading on arbitrary documents: every problem is a ConfigError, nothing else.

The documents have the config's shape (its sections and keys) with hostile
values at every leaf, so the checks of every section are reached; the YAML
text and the environment are hostile too.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.config.loader import ConfigError, load, parse
from tests.unit.properties.strategies import edge_text, json_values

ANY = st.one_of(json_values, edge_text)


def section(keys: list[str], **nested: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A mapping holding some of `keys` (hostile values, or `nested` shapes), or anything."""
    members = {key: nested.get(key, ANY) for key in keys}
    shaped = st.fixed_dictionaries({}, optional=members)
    return st.one_of(shaped, shaped, ANY)


RETRY = section(["attempts", "per_try_timeout", "retry_on", "idempotent_methods", "max_body"],
                backoff=section(["base", "max"]),
                budget=section(["ratio", "min_per_second", "window"]))
POLICY = section(["timeout", "connect_timeout", "health_check"], retry=RETRY,
                 circuit_breaker=section(["failure_threshold", "recovery_timeout",
                                          "half_open_max_calls"]),
                 bulkhead=section(["max_concurrent", "max_pending"]),
                 outlier_detection=section(["consecutive_failures", "base_ejection",
                                            "max_ejected_percent"]))
SERVICE = section(["timeout", "endpoints", "routes", "mesh", "retry"], retry=RETRY)
RULE = section(["from", "methods", "paths"])
DOCUMENTS = section(
    ["service", "trust_domain", "drain_timeout", "tracing", "audit"],
    listen=section(["outbound", "inbound", "admin"]),
    identity=section(["algorithm", "private_key_file", "secret_file", "jwks_file", "token_ttl",
                      "max_token_ttl", "clock_skew"]),
    inbound=section(["app", "app_health_path", "public_paths"],
                    policy=st.one_of(st.lists(RULE, max_size=3), ANY)),
    limits=section(["max_header_line", "max_headers", "max_request_body", "header_timeout",
                    "idle_timeout"]),
    defaults=POLICY,
    services=st.one_of(st.dictionaries(ANY, SERVICE, max_size=3), ANY),
)
ENVIRONMENTS = st.dictionaries(
    st.sampled_from(["X", "N", "PATH_VAR"]),
    st.one_of(edge_text, st.sampled_from(["2001-02-30", "!!timestamp x", "[" * 1200, "&a [*a]",
                                          ".nan", "1e400", "{a: 1}", "? [1]\n: 2"])),
    max_size=3,
)


def numbers(value: Any) -> Iterator[float]:
    """Every number in a parsed config tree."""
    if is_dataclass(value) and not isinstance(value, type):
        for f in fields(value):
            yield from numbers(getattr(value, f.name))
    elif isinstance(value, dict):
        for item in value.values():
            yield from numbers(item)
    elif isinstance(value, tuple | list | frozenset):
        for item in value:
            yield from numbers(item)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield value


@given(DOCUMENTS, ENVIRONMENTS)
def test_parse_answers_a_config_or_a_config_error(doc: Any, environ: dict[str, str]) -> None:
    try:
        config = parse(doc, base_dir=Path("/nonexistent"), environ=environ)
    except ConfigError as exc:
        assert exc.errors and all(": " in line for line in exc.errors)
        return
    # Whatever was accepted can be computed with: no NaN, no infinity.
    assert all(math.isfinite(number) for number in numbers(config))


YAML_TEXT = st.one_of(
    st.text(max_size=200),
    st.sampled_from(["service: a\nidentity: 2001-02-30\n", "a: !!timestamp x", "a: " + "[" * 1200,
                     "&a [*a]", "a: &a [*a]", "service: &s [*s]\nidentity: {}", "? [1]\n: 2",
                     "a: !!python/object:os.system x", "\ufeffservice: a", "\x00", "---\n---\n"]),
)


@given(YAML_TEXT)
def test_load_answers_a_config_or_a_config_error(
    tmp_path_factory: pytest.TempPathFactory, text: str
) -> None:
    path = tmp_path_factory.getbasetemp() / "property-config.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load(path, environ={})
    except ConfigError as exc:
        assert exc.errors
