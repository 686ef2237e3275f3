"""A request body -> a checked saga or fan-out definition (pure).

Every problem is collected with its field path (`steps[1].compensation.path:
must begin with /`), as the config loader does with key paths; an unknown key
is an error too, so a misspelt `compensation` can never silently drop one.
A service this sidecar does not know is kept apart (`unknown`): the API
answers that with 404 `no_route`. Messages never quote the request's values.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from sidecar import names, paths
from sidecar.workflows import templating
from sidecar.workflows.model import FanoutDef, Request, SagaDef, StepDef

DEFAULT_METHOD = "POST"
# Methods a workflow call may use: no tunnels, no loops back (CONNECT, TRACE).
METHODS = frozenset(names.HTTP_METHODS - {"CONNECT", "TRACE"})
MAX_PATH = 2048
# What a request target may hold as written (RFC 3986 wants the rest percent-encoded).
_VISIBLE_ASCII = re.compile(r"[!-~]*")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_KEY = re.compile(r"[a-z_][a-z0-9_]{0,31}")
NAME_RULE = "lowercase letters, '_' and '-', at most 32 characters, one digit at the end allowed"


@dataclass
class Problems:
    """Field errors (400 `bad_request`) and fields naming unknown services (404 `no_route`)."""

    errors: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)

    def add(self, where: str, message: str) -> None:
        self.errors.append(f"{where}: {message}")

    def __bool__(self) -> bool:
        return bool(self.errors or self.unknown)


class DefinitionError(ValueError):
    def __init__(self, problems: Problems) -> None:
        super().__init__("; ".join(problems.errors or problems.unknown))
        self.problems = problems


def parse_saga(doc: Any, *, services: Collection[str], max_steps: int) -> SagaDef:
    """The saga `doc` describes; DefinitionError with every problem found."""
    problems = Problems()
    doc = _object(doc, "(body)", {"name", "steps"}, problems)
    name = _name(doc.get("name"), "name", problems)
    raw_steps = _list(doc.get("steps"), "steps", "steps", max_steps, problems)
    steps: list[StepDef] = []
    seen: list[str] = []
    for index, raw in enumerate(raw_steps):
        where = f"steps[{index}]"
        raw = _object(raw, where, {"name", "action", "compensation"}, problems)
        step_name = _name(raw.get("name"), f"{where}.name", problems)
        if step_name and step_name in seen:
            problems.add(f"{where}.name", "is used by an earlier step")
        if "action" not in raw:
            problems.add(f"{where}.action", "is required")
        action = _request(raw.get("action"), f"{where}.action", services, problems,
                          earlier=seen)
        compensation = None
        if raw.get("compensation") is not None:
            compensation = _request(raw["compensation"], f"{where}.compensation", services,
                                    problems, earlier=[*seen, step_name])
        seen.append(step_name)
        steps.append(StepDef(step_name, action, compensation))
    if problems:
        raise DefinitionError(problems)
    return SagaDef(name=name, steps=tuple(steps))


def parse_fanout(doc: Any, *, services: Collection[str], max_targets: int) -> FanoutDef:
    """The fan-out `doc` describes; DefinitionError with every problem found."""
    problems = Problems()
    doc = _object(doc, "(body)", {"targets", "method", "path", "body"}, problems)
    targets: list[str] = []
    raw_targets = _list(doc.get("targets"), "targets", "service names", max_targets, problems)
    for index, raw in enumerate(raw_targets):
        target = _service(raw, f"targets[{index}]", services, problems)
        if target in targets:
            problems.add(f"targets[{index}]", "is listed twice")
        targets.append(target)
    method = _method(doc.get("method", DEFAULT_METHOD), "method", problems)
    path = _path(doc.get("path"), "path", problems, earlier=None)
    if problems:
        raise DefinitionError(problems)
    return FanoutDef(targets=tuple(targets), method=method, path=path, body=doc.get("body"))


# ---- parts


def _list(raw: Any, where: str, of: str, most: int, problems: Problems) -> list[Any]:
    """A non-empty list of at most `most` items (workflows.max_steps), else none."""
    if not isinstance(raw, list) or not raw:
        problems.add(where, f"must be a non-empty list of {of}")
        return []
    if len(raw) > most:
        problems.add(where, f"at most {most} {where} (workflows.max_steps)")
        return []
    return raw


def _object(raw: Any, where: str, allowed: set[str], problems: Problems) -> dict[str, Any]:
    if not isinstance(raw, dict):
        problems.add(where, "must be a JSON object")
        return {}
    for key in raw:
        if key not in allowed:
            # A key is named only if it looks like a field name: the request's
            # own words are not echoed otherwise.
            shown = key if isinstance(key, str) and _KEY.fullmatch(key) else "(a key)"
            problems.add(_join(where, shown), "unknown key")
    return raw


def _join(where: str, key: str) -> str:
    return key if where == "(body)" else f"{where}.{key}"


def _name(raw: Any, where: str, problems: Problems) -> str:
    if raw is None:
        problems.add(where, "is required")
        return ""
    if not isinstance(raw, str) or not templating.NAME.fullmatch(raw):
        problems.add(where, f"must be a name: {NAME_RULE}")
        return ""
    return raw


def _request(raw: Any, where: str, services: Collection[str], problems: Problems, *,
             earlier: list[str]) -> Request:
    if raw is None:
        return Request("", DEFAULT_METHOD, "/")  # "is required" was said already
    raw = _object(raw, where, {"service", "method", "path", "body"}, problems)
    if not raw:
        return Request("", DEFAULT_METHOD, "/")
    service = _service(raw.get("service"), f"{where}.service", services, problems)
    method = _method(raw.get("method", DEFAULT_METHOD), f"{where}.method", problems)
    path = _path(raw.get("path"), f"{where}.path", problems, earlier=earlier)
    body = raw.get("body")
    try:
        refs = templating.refs_in_body(body)
    except templating.TemplateError as exc:
        problems.add(f"{where}.body", str(exc))
        refs = []
    _check_refs(refs, f"{where}.body", earlier, problems)
    return Request(service, method, path, body)


def _service(raw: Any, where: str, services: Collection[str], problems: Problems) -> str:
    if raw is None:
        problems.add(where, "is required")
        return ""
    if not names.is_service_name(raw):
        problems.add(where, f"must be a service name: {names.SERVICE_NAME_RULE}")
        return ""
    name = str(raw).lower()
    if name not in services:
        problems.unknown.append(f"{where} names no service this sidecar knows")
    return name


def _method(raw: Any, where: str, problems: Problems) -> str:
    if not isinstance(raw, str) or raw.upper() not in METHODS:
        problems.add(where, "must be an HTTP method such as POST or PUT")
        return DEFAULT_METHOD
    return raw.upper()


def _path(raw: Any, where: str, problems: Problems, *, earlier: list[str] | None) -> str:
    if raw is None:
        problems.add(where, "is required")
        return "/"
    if not isinstance(raw, str) or not raw.startswith("/") or len(raw) > MAX_PATH:
        problems.add(where, f"must be a path that begins with / (at most {MAX_PATH} characters)")
        return "/"
    try:
        refs = templating.refs_in_path(raw)
    except templating.TemplateError as exc:
        problems.add(where, str(exc))
        return "/"
    if earlier is None and refs:
        problems.add(where, "a fan-out has no earlier steps to take values from")
    _check_refs(refs, where, earlier or [], problems)
    # The path as it will be sent, with a stand-in for each value.
    sample = templating.render(Request("", "GET", raw), _stand_ins(refs)).path
    if not _VISIBLE_ASCII.fullmatch(sample):
        # It goes on the request line as written (values are percent-encoded).
        problems.add(where, "must be visible ASCII (percent-encode spaces, control and "
                            "non-ASCII characters)")
        return raw
    try:
        paths.normalise(sample.split("?", 1)[0])
    except paths.BadPath as exc:
        problems.add(where, f"must be a valid path ({exc})")
    if "#" in sample:
        problems.add(where, "must not hold a fragment ('#')")
    elif _BAD_ESCAPE.search(sample.partition("?")[2]):
        # The path's own escapes are `normalise`'s to judge; the query's are here.
        problems.add(where, "must be a valid path (malformed percent-escape in the query)")
    return raw


def _check_refs(refs: list[templating.Ref], where: str, earlier: list[str],
                problems: Problems) -> None:
    for step, _ in refs:
        if step not in earlier:
            problems.add(where, "a template names a step that does not come before it")
            return


def _stand_ins(refs: list[templating.Ref]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for step, path in refs:
        out.setdefault(step, {})[path] = "x"
    return out
