"""Normalising, matching and templating paths, on arbitrary hostile paths."""

from __future__ import annotations

import re

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from sidecar.config.settings import PolicyRule
from sidecar.inbound.normalise import normalise_path
from sidecar.inbound.policy import Policy, authorize
from sidecar.paths import BadPath, RouteTable, check_pattern, check_template, matches, normalise
from sidecar.stack import Reply, compose
from tests.support.calls import Next, make_call
from tests.unit.properties.strategies import path_piece, raw_paths, slash_paths

# What a normalised path may hold: RFC 3986 path characters, `%XX` escapes of the rest.
_NORMAL = re.compile(r"/(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/]|%[0-9A-F]{2})*")
_SAFE_SEGMENT = re.compile(r"[a-z][a-z_-]{0,30}[0-9]?")


def normalised_or_none(raw: str) -> str | None:
    try:
        return normalise(raw)
    except BadPath:
        return None


@given(raw_paths)
def test_normalise_answers_a_path_or_bad_path_and_nothing_else(raw: str) -> None:
    try:
        normalise(raw)
    except BadPath as exc:
        # The message names the rule, never the path.
        assert raw not in str(exc) or len(raw) < 4


@given(slash_paths)
def test_normalise_is_idempotent(raw: str) -> None:
    once = normalised_or_none(raw)
    assume(once is not None)
    assert normalise(once) == once


@given(slash_paths)
def test_a_normalised_path_has_one_spelling(raw: str) -> None:
    path = normalised_or_none(raw)
    assume(path is not None)
    assert _NORMAL.fullmatch(path), path
    assert "//" not in path
    segments = path.split("/")[1:]
    for segment in segments:
        assert segment not in (".", "..")
        head = re.split(r";|%3B", segment, maxsplit=1)[0]
        assert head not in (".", "..") or head == segment
    for escape in re.findall(r"%([0-9A-F]{2})", path):
        code = int(escape, 16)
        assert code not in (0x2F, 0x5C) and code >= 0x20 and code != 0x7F
        assert chr(code) not in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"


patterns = st.lists(path_piece, max_size=4).map(lambda p: "/" + "".join(p)).filter(
    lambda p: _is_pattern(p))


def _is_pattern(text: str) -> bool:
    try:
        check_pattern(text)
    except ValueError:
        return False
    return True


@given(st.one_of(patterns, st.text(max_size=12), st.none(), st.integers()), slash_paths)
def test_check_pattern_and_matches_raise_nothing_unexpected(pattern: object, raw: str) -> None:
    path = normalised_or_none(raw) or "/"
    try:
        check_pattern(pattern)
    except ValueError:
        return
    assert isinstance(pattern, str)
    covered = matches(pattern, path)
    if pattern.endswith("/*"):
        prefix = pattern[:-2]
        assert covered == (path == prefix or path.startswith(prefix + "/"))
    else:
        assert covered == (path == pattern)


templates = st.lists(
    st.one_of(st.sampled_from(["{id}", "{name}", "{x1}", "{", "}", "{}", "{1}", "{a}b"]),
              path_piece),
    min_size=1, max_size=5,
).map(lambda parts: "/" + "/".join(parts))


@given(st.lists(st.one_of(templates, st.text(max_size=8)), max_size=4), slash_paths)
def test_templating_never_leaks_a_segment_that_may_be_an_identifier(
    given_templates: list[str], raw: str
) -> None:
    try:
        for template in given_templates:
            check_template(template)
    except ValueError:
        with pytest.raises(ValueError):
            RouteTable(given_templates)
        return
    table = RouteTable(given_templates)
    path = normalised_or_none(raw) or raw
    route = table.template(path)
    if route in given_templates:
        return
    literals = {s for t in given_templates for s in t.split("/")}
    for segment in route.split("/"):
        assert segment in ("", "{id}") or segment in literals or _SAFE_SEGMENT.fullmatch(segment)


@given(slash_paths, st.sampled_from(["/claims/*", "/*", "/claims", "/admin/*"]),
       st.sampled_from(["GET", "POST", "DELETE"]))
async def test_the_path_the_policy_allows_is_exactly_the_path_the_app_gets(
    raw: str, pattern: str, method: str
) -> None:
    policy = Policy(rules=(PolicyRule(sources=("a",), methods=("GET",), paths=(pattern,)),),
                    public_paths=("/health",))
    app = Next()
    stack = compose(normalise_path(routes=RouteTable(())), authorize(policy=policy),
                    terminal=app)
    call = make_call(raw, method=method, direction="inbound", source="a")

    reply: Reply = await stack(call)

    expected = normalised_or_none(raw)
    if expected is None:
        assert reply.status == 400 and app.calls == []
        return
    allowed = policy.is_public(expected) or policy.allows("a", method, expected)
    assert (app.calls != []) == allowed
    if allowed:
        assert app.calls[0].path == expected
        assert app.calls[0].target_path == expected  # what the transport sends
    else:
        assert reply.status == 403

