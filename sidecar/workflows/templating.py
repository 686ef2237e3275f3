"""`{{steps.NAME.response.a.b}}`: a value from an earlier step's JSON response.

Pure functions. `references` lists what a request takes from which step, so
the engine keeps only those values of a response (never the whole body);
`extract` picks them out; `render` puts them in. In a body, a string that is
only the template takes the value with its type, and inside a longer string
the value is inserted as text; in a path it is always text, percent-encoded.
A field that is a whole number indexes a list (`items.0.id`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import quote

from sidecar.workflows.model import Request

# A step's name: kept in the audit log and span names, so it follows SPEC's
# rule for path segments that telemetry may show.
NAME = re.compile(r"[a-z][a-z_-]{0,30}[0-9]?")
# `[^.{}\s]+` keeps a field name to one segment: `a.b` is two.
_TEMPLATE = re.compile(
    r"\{\{\s*steps\.(" + NAME.pattern + r")\.response((?:\.[^.{}\s]+)*)\s*\}\}"
)

Ref = tuple[str, str]  # (step name, field path such as "claim.id"; "" is the whole response)
Values = Mapping[str, Mapping[str, Any]]  # step name -> field path -> value


class TemplateError(ValueError):
    """A string holds `{{` or `}}` that is not a well-formed template."""


class MissingValue(LookupError):
    """A template's value is not in the earlier step's response."""


def _matches(text: str) -> Iterator[re.Match[str]]:
    rest = _TEMPLATE.sub("", text)
    if "{{" in rest or "}}" in rest:
        raise TemplateError("a '{{' must open a template: {{steps.NAME.response.FIELD}}")
    return _TEMPLATE.finditer(text)


def _refs(value: Any) -> Iterator[Ref]:
    if isinstance(value, str):
        for match in _matches(value):
            yield match.group(1), match.group(2).lstrip(".")
    elif isinstance(value, dict):
        for item in value.values():
            yield from _refs(item)
    elif isinstance(value, list):
        for item in value:
            yield from _refs(item)


def refs_in_path(path: str) -> list[Ref]:
    """The templates of a path; TemplateError if one is malformed."""
    return list(_refs(path))


def refs_in_body(body: Any) -> list[Ref]:
    """The templates in a JSON body's strings (keys are never templates)."""
    return list(_refs(body))


def references(request: Request) -> list[Ref]:
    return [*refs_in_path(request.path), *refs_in_body(request.body)]


def extract(response: Any, fields: Iterable[str]) -> dict[str, Any]:
    """The values at `fields` of a parsed JSON response; a field it lacks is left out."""
    found: dict[str, Any] = {}
    for path in fields:
        value = response
        try:
            for part in path.split(".") if path else ():
                value = _field(value, part)
        except LookupError:
            continue
        found[path] = value
    return found


def _field(value: Any, part: str) -> Any:
    if isinstance(value, dict):
        return value[part]
    if isinstance(value, list) and part.isdigit():
        return value[int(part)]
    raise KeyError(part)


def render(request: Request, values: Values) -> Request:
    """`request` with every template replaced; MissingValue if a value is not there."""
    path = _TEMPLATE.sub(lambda m: quote(_text(_value(m, values)), safe=""), request.path)
    return Request(request.service, request.method, path, _render_body(request.body, values))


def _render_body(body: Any, values: Values) -> Any:
    if isinstance(body, str):
        whole = _TEMPLATE.fullmatch(body)
        if whole is not None:
            return _value(whole, values)
        return _TEMPLATE.sub(lambda m: _text(_value(m, values)), body)
    if isinstance(body, dict):
        return {key: _render_body(item, values) for key, item in body.items()}
    if isinstance(body, list):
        return [_render_body(item, values) for item in body]
    return body


def _value(match: re.Match[str], values: Values) -> Any:
    step, path = match.group(1), match.group(2).lstrip(".")
    taken = values.get(step, {})
    if path not in taken:
        raise MissingValue(f"steps.{step}.response{match.group(2)}")
    return taken[path]


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
