"""Request paths: normalising them, matching policy patterns, and templating them for telemetry.

All three are pure. `normalise` runs before any policy check and its result is
what the app receives; `RouteTable.template` is the only form of a path that
spans, metrics, logs and the audit log ever see.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

_HEX = "0123456789ABCDEFabcdef"
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Characters RFC 3986 allows raw in a path besides the unreserved ones; anything
# else that arrives raw is percent-encoded so one path has one spelling.
_RAW_ALLOWED = _UNRESERVED | frozenset("!$&'()*+,;=:@/")
_SLASHES = frozenset((0x2F, 0x5C))
# Where a segment's path parameters begin, raw or (after `_decode`) as `%3B`.
_PARAMETERS = re.compile(r";|%3B")

# SPEC: a segment that may be an identifier becomes `{id}`; only these are kept.
_SAFE_SEGMENT = re.compile(r"[a-z][a-z_-]{0,30}[0-9]?")
_ID = "{id}"
_PARAM = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")


class BadPath(ValueError):
    """A path the sidecar refuses (400 `bad_request`).

    The message names the broken rule, never the path: paths may hold identifiers.
    """


def _is_control(code: int) -> bool:
    return code < 0x20 or code == 0x7F


def _decode(raw_path: str) -> str:
    """Decode unreserved escapes, upper-case the rest, encode stray raw characters."""
    out: list[str] = []
    i, n = 0, len(raw_path)
    while i < n:
        ch = raw_path[i]
        if ch == "%":
            pair = raw_path[i + 1 : i + 3]
            if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
                raise BadPath("malformed percent-escape")
            code = int(pair, 16)
            if code in _SLASHES:
                raise BadPath("encoded slash or backslash")
            if _is_control(code):
                raise BadPath("control character")
            decoded = chr(code)
            out.append(decoded if decoded in _UNRESERVED else "%" + pair.upper())
            i += 3
            continue
        if ch == "\\":
            raise BadPath("backslash")
        if _is_control(ord(ch)):
            raise BadPath("control character")
        if ch in _RAW_ALLOWED:
            out.append(ch)
        else:
            try:
                encoded = ch.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:
                raise BadPath("invalid character") from None
            out.append("".join(f"%{b:02X}" for b in encoded))
        i += 1
    return "".join(out)


def normalise(raw_path: str) -> str:
    """Return the one spelling of `raw_path` (no query) that policy and app both see.

    Raises BadPath for a path that does not start with `/`, a `..` above the
    root, a dot segment with path parameters (`..;x`, `.;`, `.%3B`), an
    encoded slash or backslash, a raw backslash, a control character (raw or
    encoded) or a malformed percent-escape.
    """
    if not raw_path.startswith("/"):
        raise BadPath("path must start with /")
    # Decoding first means `%2e%2e` is judged as the `..` it is.
    segments = _decode(raw_path).split("/")[1:]
    kept: list[str] = []
    trailing = False
    for segment in segments:
        if _is_dot_with_parameters(segment):
            raise BadPath("dot segment with path parameters")
        # A dot segment at the end leaves a directory behind it (RFC 3986 5.2.4).
        trailing = segment in ("", ".", "..")
        if segment == "..":
            if not kept:
                raise BadPath("'..' above the root")
            kept.pop()
        elif segment not in ("", "."):
            kept.append(segment)
    if not kept:
        return "/"
    return "/" + "/".join(kept) + ("/" if trailing else "")


def _is_dot_with_parameters(segment: str) -> bool:
    """`..;x`, `.;`, `..%3B`: a dot segment once a server strips its parameters.

    Tomcat and Spring cut `;...` off each segment before resolving dots, so
    `/claims/..;/admin` is `/admin` to them but not to RFC 3986: one path,
    two meanings, refused. `segment` is decoded already, so `%2e` is `.` and
    `;` may still stand as `%3B`.
    """
    head = _PARAMETERS.split(segment, 1)[0]
    return head in (".", "..") and head != segment


def matches(pattern: str, path: str) -> bool:
    """True if a policy or public-path `pattern` covers the normalised `path`.

    A pattern is exact, or ends in `/*` and then covers that path and everything
    below it, so `/*` covers every path. `check_pattern` says which are patterns.
    """
    if pattern.endswith("/*"):
        prefix = pattern[:-2]
        return path == prefix or path.startswith(prefix + "/")
    return path == pattern


def check_pattern(pattern: object) -> None:
    """Raise ValueError unless `pattern` is a policy or public path (SPEC "Paths and policy").

    One begins with `/` and is exact, or ends in `/*`; a `*` anywhere else, or
    a bare `*`, is refused: `/*` is how to say every path.
    """
    if not isinstance(pattern, str) or not pattern.startswith("/"):
        raise ValueError("must be a path that begins with '/'")
    if "*" in pattern[:-1] or (pattern.endswith("*") and not pattern.endswith("/*")):
        raise ValueError("a '*' may only end a path, as '/*'")


def check_template(template: object) -> None:
    """Raise ValueError unless `template` is a route template `RouteTable` understands.

    It begins with `/`, and a `{name}` is a whole segment whose name is an identifier.
    """
    if not isinstance(template, str) or not template.startswith("/"):
        raise ValueError("must be a path template that begins with '/'")
    for segment in template.split("/")[1:]:
        if ("{" in segment or "}" in segment) and not _PARAM.fullmatch(segment):
            raise ValueError("a '{name}' must be a whole path segment, the name an identifier")


class RouteTable:
    """Turns a path into its route template, so no identifier ever reaches telemetry.

    Built once from templates like `/patients/{id}/coverage`: `{name}` stands
    for exactly one non-empty segment, every other segment is literal. A path
    that fits no template keeps only the segments that are template literals or
    match SPEC's identifier rule; every other segment becomes `{id}`.
    """

    def __init__(self, templates: Iterable[str] = (), *, cache_size: int = 4096) -> None:
        compiled: list[tuple[int, re.Pattern[str], str]] = []
        literals: set[str] = set()
        for template in templates:
            check_template(template)
            parts: list[str] = []
            for segment in template.split("/")[1:]:
                if _PARAM.fullmatch(segment):
                    parts.append("[^/]+")
                else:
                    literals.add(segment)
                    parts.append(re.escape(segment))
            specificity = sum(1 for segment in template.split("/") if not _PARAM.fullmatch(segment))
            compiled.append((specificity, re.compile("/" + "/".join(parts)), template))
        # More literal segments win, so `/patients/search` beats `/patients/{id}`;
        # among equals the order given decides (sort is stable).
        compiled.sort(key=lambda entry: -entry[0])
        self._templates = tuple((regex, template) for _, regex, template in compiled)
        self._literals = frozenset(literals)
        self._cached = lru_cache(maxsize=cache_size)(self._compute)

    def template(self, path: str) -> str:
        """The matching template, or `path` with every possibly identifying segment as `{id}`."""
        return self._cached(path)

    def _compute(self, path: str) -> str:
        # A query never belongs in telemetry, even if a caller forgot to cut it.
        path = path.split("?", 1)[0].split("#", 1)[0]
        for regex, template in self._templates:
            if regex.fullmatch(path):
                return template
        return "/".join(self._keep(segment) for segment in path.split("/"))

    def _keep(self, segment: str) -> str:
        if not segment or segment in self._literals or _SAFE_SEGMENT.fullmatch(segment):
            return segment
        return _ID
