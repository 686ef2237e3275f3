"""`{{steps.NAME.response.a.b}}`: typed in a body when whole, text inside, encoded in a path."""

from __future__ import annotations

import pytest

from sidecar.workflows import templating
from sidecar.workflows.model import Request

RESPONSE = {"verification": {"id": "V 1/2", "copay": 25, "ok": True}, "items": [{"id": "I-7"}]}


def test_references_name_step_and_field() -> None:
    request = Request("b", "POST", "/v/{{steps.verify.response.verification.id}}/void",
                      {"copay": "{{ steps.verify.response.verification.copay }}",
                       "first": ["{{steps.claim.response.items.0.id}}"]})
    assert sorted(templating.references(request)) == [
        ("claim", "items.0.id"), ("verify", "verification.copay"), ("verify", "verification.id")]


def test_extract_keeps_only_the_fields_asked_for() -> None:
    assert templating.extract(RESPONSE, ["verification.id", "items.0.id", "nothing.here"]) == {
        "verification.id": "V 1/2", "items.0.id": "I-7"}
    assert templating.extract(RESPONSE, [""]) == {"": RESPONSE}


def test_render_types_whole_values_and_encodes_paths() -> None:
    values = {"verify": templating.extract(RESPONSE, ["verification.id", "verification.copay",
                                                      "verification.ok", "verification"])}
    request = Request("b", "POST", "/v/{{steps.verify.response.verification.id}}/void",
                      {"copay": "{{steps.verify.response.verification.copay}}",
                       "note": "copay {{steps.verify.response.verification.copay}} cents",
                       "ok": "{{steps.verify.response.verification.ok}}",
                       "whole": "{{steps.verify.response.verification}}", "n": 3})
    rendered = templating.render(request, values)
    assert rendered.path == "/v/V%201%2F2/void"
    assert rendered.body == {"copay": 25, "note": "copay 25 cents", "ok": True,
                             "whole": RESPONSE["verification"], "n": 3}


def test_a_missing_value_is_reported() -> None:
    with pytest.raises(templating.MissingValue):
        templating.render(Request("b", "POST", "/v/{{steps.verify.response.id}}"), {})


@pytest.mark.parametrize("text", ["/{{steps.verify.response.id}", "/{{ step.verify.id }}",
                                  "/{{steps.Verify.response.id}}", "/x}}"])
def test_a_malformed_template_is_an_error(text: str) -> None:
    with pytest.raises(templating.TemplateError):
        templating.refs_in_path(text)
