import re

import pytest

from sidecar.paths import (
    BadPath,
    RouteTable,
    check_pattern,
    check_template,
    matches,
    normalise,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/", "/"),
        ("/claims", "/claims"),
        ("/claims/", "/claims/"),
        ("/a/../b", "/b"),
        ("/a/b/..", "/a/"),
        ("/a/./b", "/a/b"),
        ("/a/.", "/a/"),
        ("/..a/b", "/..a/b"),
        ("//claims//7///lines", "/claims/7/lines"),
        ("//", "/"),
        ("/%61%62c", "/abc"),
        ("/%7e%2D%5f%2E", "/~-_."),
        ("/a/%2e%2e/b", "/b"),
        ("/a/%2E./b", "/b"),
        ("/a/%2e/b", "/a/b"),
        ("/x%20y", "/x%20y"),
        ("/x%3a%c3%a9", "/x%3A%C3%A9"),
        ("/x y", "/x%20y"),
        ("/café", "/caf%C3%A9"),
        ("/a:b@c;d=e,f", "/a:b@c;d=e,f"),
        ("/..", None),
        ("/../x", None),
        ("/a/../../x", None),
        ("/%2e%2e/x", None),
        ("/a/%2F/b", None),
        ("/a%2fb", None),
        ("/a%5Cb", None),
        ("/a%5cb", None),
        ("/a\\b", None),
        ("/a%00b", None),
        ("/a%1fb", None),
        ("/a%7Fb", None),
        ("/a\x00b", None),
        ("/a\tb", None),
        ("/a\x7fb", None),
        ("claims", None),
        ("", None),
        ("/a%zz", None),
        ("/a%4", None),
    ],
)
def test_normalise(raw: str, expected: str | None) -> None:
    if expected is None:
        with pytest.raises(BadPath):
            normalise(raw)
    else:
        assert normalise(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "/claims/..;/admin",
        "/claims/..;jsessionid=1/admin",
        "/claims/.;/admin",
        "/claims/..;",
        "/.;/admin",
        "/claims/%2e%2e;/admin",
        "/claims/%2E.;x/admin",
        "/claims/..%3b/admin",
        "/claims/..%3B/admin",
        "/claims/.%3b/admin",
        "/claims/%2e%2e%3B/admin",
    ],
)
def test_dot_segments_with_path_parameters_are_refused(raw: str) -> None:
    # Tomcat and Spring strip `;...` before resolving dots: `/claims/..;/admin` is `/admin`.
    with pytest.raises(BadPath, match="dot segment with path parameters"):
        normalise(raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/claims;v=1/7", "/claims;v=1/7"),
        ("/claims/...;x", "/claims/...;x"),
        ("/claims/;x/7", "/claims/;x/7"),
        ("/claims/.x;/7", "/claims/.x;/7"),
        ("/claims/x%3B..", "/claims/x%3B.."),
    ],
)
def test_parameters_on_other_segments_pass(raw: str, expected: str) -> None:
    assert normalise(raw) == expected


def test_normalise_is_idempotent() -> None:
    for raw in ["/a/%2e%2e/b/", "/x%20y//z", "/%61/./c", "/café/"]:
        once = normalise(raw)
        assert normalise(once) == once


def test_bad_path_message_never_holds_the_path() -> None:
    with pytest.raises(BadPath) as caught:
        normalise("/MRN12345678/%2F")
    assert "MRN12345678" not in str(caught.value)
    assert str(caught.value)


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("/claims", "/claims", True),
        ("/claims", "/claims/", False),
        ("/claims", "/claims/7", False),
        ("/claims/*", "/claims", True),
        ("/claims/*", "/claims/", True),
        ("/claims/*", "/claims/7/lines", True),
        ("/claims/*", "/claimsx", False),
        ("/claims/*", "/claimsx/1", False),
        ("/claims/*", "/", False),
        ("/*", "/", True),
        ("/*", "/anything/at/all", True),
    ],
)
def test_matches(pattern: str, path: str, expected: bool) -> None:
    assert matches(pattern, path) is expected


# A bare `*` is neither exact nor `/*`-ended (SPEC "Paths and policy"): the
# loader always refused it, and now the one rule does too; `/*` covers all.
@pytest.mark.parametrize("pattern", ["*", "claims", "/claims*", "/c*/x", "/claims/**", ""])
def test_check_pattern_rejects(pattern: str) -> None:
    with pytest.raises(ValueError):
        check_pattern(pattern)


@pytest.mark.parametrize("pattern", ["/*", "/claims", "/claims/*", "/claims/"])
def test_check_pattern_accepts(pattern: str) -> None:
    check_pattern(pattern)


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("**", "must be a path that begins with '/'"),
        (None, "must be a path that begins with '/'"),
        ("/**", "a '*' may only end a path, as '/*'"),
        ("/a*/*", "a '*' may only end a path, as '/*'"),
    ],
)
def test_check_pattern_names_the_rule(pattern: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        check_pattern(pattern)


@pytest.mark.parametrize(
    "segment",
    ["123", "MRN12345678", "078-05-1120", "3f2b8c1e-9d4a-4b6f-8e2a-1c5d7e9f0a3b", "Smith"],
)
def test_identifiers_become_id(segment: str) -> None:
    assert RouteTable().template(f"/patients/{segment}/coverage") == "/patients/{id}/coverage"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/patients/coverage/v1", "/patients/coverage/v1"),
        ("/", "/"),
        ("/claims/", "/claims/"),
        ("/a_b-c9", "/a_b-c9"),
        ("/v12", "/{id}"),
        ("/" + "a" * 31 + "9", "/" + "a" * 31 + "9"),
        ("/" + "a" * 32, "/{id}"),
        ("/claims/7?ssn=078-05-1120", "/claims/{id}"),
        ("/x%20y/claims", "/{id}/claims"),
        ("/smith.john", "/{id}"),
        ("/-a", "/{id}"),
    ],
)
def test_template_without_routes(path: str, expected: str) -> None:
    assert RouteTable().template(path) == expected


def test_matching_template_wins() -> None:
    table = RouteTable(["/patients/{id}/coverage", "/claims/{claim}/lines/{line}"])
    assert table.template("/patients/MRN12345678/coverage") == "/patients/{id}/coverage"
    assert table.template("/claims/abc/lines/3") == "/claims/{claim}/lines/{line}"
    # A template covers one whole non-empty segment, no more and no less.
    assert table.template("/patients/A/B/coverage") == "/patients/{id}/{id}/coverage"
    assert table.template("/patients//coverage") == "/patients//coverage"


def test_template_literal_is_kept_outside_a_match() -> None:
    table = RouteTable(["/api/V2/{id}"])
    assert table.template("/api/V2/X/Y") == "/api/V2/{id}/{id}"
    assert RouteTable().template("/api/V2") == "/api/{id}"


def test_more_literal_template_wins_over_order() -> None:
    table = RouteTable(["/patients/{id}", "/patients/search"])
    assert table.template("/patients/search") == "/patients/search"
    assert table.template("/patients/Smith") == "/patients/{id}"


@pytest.mark.parametrize("template", ["patients/{id}", "/patients/x{id}", "/p/{id}x"])
def test_bad_templates_are_rejected(template: str) -> None:
    with pytest.raises(ValueError):
        RouteTable([template])


@pytest.mark.parametrize("template", ["/p/{my-id}", "/p/{1}", "/p/{}", 7])
def test_a_template_name_is_an_identifier(template: object) -> None:
    with pytest.raises(ValueError):
        check_template(template)


def test_template_never_leaks_a_failing_segment() -> None:
    # Every character of each unsafe segment must be absent from the result.
    safe = re.compile(r"[a-z][a-z_-]{0,30}[0-9]?")
    table = RouteTable(["/patients/{id}/coverage"])
    for path in ["/Q9Z/patients/XYZ", "/patients/ÆØÅ/coverage/7", "/%41%42/Ω/W1W"]:
        result = table.template(path)
        for segment in path.split("/"):
            if segment and not safe.fullmatch(segment):
                assert segment not in result
        assert not re.search(r"[A-Z0-9%ÆØÅΩ]", result.replace("{id}", ""))


def test_template_is_cached_but_same_answer() -> None:
    # Each path gets its own answer whether it comes from the cache or not, an
    # evicted path is worked out again, and a repeat really is a cache hit.
    table = RouteTable(["/patients/{id}"], cache_size=2)
    paths = ["/patients/1", "/patients/1", "/patients/1/coverage", "/claims",
             "/patients/1", "/claims", "/claims"]
    answers = [table.template(path) for path in paths]
    assert answers == ["/patients/{id}", "/patients/{id}", "/patients/{id}/coverage", "/claims",
                       "/patients/{id}", "/claims", "/claims"]
    assert answers == [RouteTable(["/patients/{id}"], cache_size=0).template(p) for p in paths]
    info = table._cached.cache_info()
    # Hits: the second /patients/1 and the last two /claims. The third
    # /patients/1 misses: two other paths came since, and the cache holds two.
    assert (info.hits, info.misses, info.currsize) == (3, 4, 2)
