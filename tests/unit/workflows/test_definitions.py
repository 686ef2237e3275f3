"""Checked definitions: every field error named by its path, unknown services apart."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.workflows.definitions import DefinitionError, parse_fanout, parse_saga
from sidecar.workflows.model import Request, SagaDef, StepDef

SERVICES = frozenset({"insurance-verification", "billing-engine"})
SPEC_EXAMPLE: dict[str, Any] = {
    "name": "encounter",
    "steps": [
        {"name": "verify",
         "action": {"service": "insurance-verification", "method": "POST",
                    "path": "/verifications", "body": {"patient": "P-1"}},
         "compensation": {"service": "insurance-verification", "method": "POST",
                          "path": "/verifications/{{steps.verify.response.id}}/void",
                          "body": None}},
        {"name": "claim",
         "action": {"service": "billing-engine", "method": "POST", "path": "/claims",
                    "body": {}}},
    ],
}


def problems(doc: Any, **kwargs: Any) -> tuple[list[str], list[str]]:
    with pytest.raises(DefinitionError) as caught:
        parse_saga(doc, services=SERVICES, max_steps=kwargs.get("max_steps", 20))
    return caught.value.problems.errors, caught.value.problems.unknown


def test_the_spec_example_parses() -> None:
    saga = parse_saga(SPEC_EXAMPLE, services=SERVICES, max_steps=20)
    assert saga == SagaDef("encounter", (
        StepDef("verify", Request("insurance-verification", "POST", "/verifications",
                                  {"patient": "P-1"}),
                Request("insurance-verification", "POST",
                        "/verifications/{{steps.verify.response.id}}/void")),
        StepDef("claim", Request("billing-engine", "POST", "/claims", {})),
    ))
    assert SagaDef.from_json(saga.to_json()) == saga


def test_each_field_error_is_named() -> None:
    doc: dict[str, Any] = {
        "name": "Encounter 7", "colour": 1,
        "steps": [
            {"name": "verify", "action": {"service": "insurance-verification", "path": "v"}},
            {"name": "claim", "action": {"service": "billing-engine", "path": "/claims",
                                         "method": "FETCH"},
             "compensation": {"service": "billing-engine",
                              "path": "/claims/{{steps.notify.response.id}}/cancel",
                              "compensaton": {}}},
            {"name": "verify", "action": {"path": "/x/{{steps.claim.response.id"}},
            "no",
        ],
    }
    errors, unknown = problems(doc)
    assert errors == [
        "colour: unknown key",
        "name: must be a name: lowercase letters, '_' and '-', at most 32 characters, "
        "one digit at the end allowed",
        "steps[0].action.path: must be a path that begins with / (at most 2048 characters)",
        "steps[1].action.method: must be an HTTP method such as POST or PUT",
        "steps[1].compensation.compensaton: unknown key",
        "steps[1].compensation.path: a template names a step that does not come before it",
        "steps[2].name: is used by an earlier step",
        "steps[2].action.service: is required",
        "steps[2].action.path: a '{{' must open a template: {{steps.NAME.response.FIELD}}",
        "steps[3]: must be a JSON object",
        "steps[3].name: is required",
        "steps[3].action: is required",
    ]  # in the order of the document
    assert unknown == []


def test_limits_and_unknown_services() -> None:
    errors, _ = problems({"name": "a", "steps": [SPEC_EXAMPLE["steps"][1]] * 3}, max_steps=2)
    assert errors == ["steps: at most 2 steps (workflows.max_steps)"]
    errors, unknown = problems({"name": "a", "steps": [
        {"name": "x", "action": {"service": "payer", "path": "/p"}}]})
    assert errors == [] and unknown == ["steps[0].action.service names no service this sidecar "
                                        "knows"]
    errors, _ = problems(["not", "an", "object"])
    assert errors[0] == "(body): must be a JSON object"


def test_values_from_the_request_are_never_echoed() -> None:
    errors, _ = problems({"name": "a", "steps": [], "MRN12345678": "x"})
    assert errors == ["(a key): unknown key", "steps: must be a non-empty list of steps"]


def test_fanout_definitions() -> None:
    parsed = parse_fanout({"targets": ["billing-engine", "insurance-verification"],
                           "method": "PUT", "path": "/events", "body": {"k": 1}},
                          services=SERVICES, max_targets=20)
    assert parsed.targets == ("billing-engine", "insurance-verification")
    assert parsed.method == "PUT"
    with pytest.raises(DefinitionError) as caught:
        parse_fanout({"targets": ["billing-engine", "billing-engine"],
                      "path": "/e/{{steps.a.response.id}}"}, services=SERVICES, max_targets=20)
    assert caught.value.problems.errors == [
        "targets[1]: is listed twice",
        "path: a fan-out has no earlier steps to take values from",
        "path: a template names a step that does not come before it",
    ]


@pytest.mark.parametrize("path", [
    "/claims?note=a b", "/claims?x=\x01", "/claims?x=\x7f", "/claims/a b", "/claims?who=é",
    "/claims/\u00e9", "/claims?x=1\r\nX-Injected: 1",
])
def test_a_path_must_be_sendable_as_written(path: str) -> None:
    """A step's path goes on the request line as written: a space, a control
    character or a non-ASCII one there would break the line (or smuggle a
    header), so it is refused when the saga is defined, not when the step runs."""
    errors, _ = problems({"name": "a", "steps": [
        {"name": "x", "action": {"service": "billing-engine", "path": path}}]})
    assert errors == ["steps[0].action.path: must be visible ASCII (percent-encode spaces, "
                      "control and non-ASCII characters)"]


def test_a_percent_encoded_path_and_query_are_kept() -> None:
    path = "/claims/%C3%A9?note=a%20b&x=%01&k=v|w"
    saga = parse_saga({"name": "a", "steps": [
        {"name": "x", "action": {"service": "billing-engine", "path": path}}]},
        services=SERVICES, max_steps=20)
    assert saga.steps[0].action.path == path


@pytest.mark.parametrize("path", ["/claims?x=%zz", "/claims?x=%4", "/claims?x=%"])
def test_a_query_with_a_malformed_escape_is_refused(path: str) -> None:
    errors, _ = problems({"name": "a", "steps": [
        {"name": "x", "action": {"service": "billing-engine", "path": path}}]})
    assert errors == ["steps[0].action.path: must be a valid path (malformed percent-escape "
                      "in the query)"]
