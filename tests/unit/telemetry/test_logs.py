"""JSON-lines logs that carry only what they are explicitly given."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from sidecar.telemetry.logs import event, setup_logging


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    setup_logging("DEBUG", stream=out)
    try:
        yield out
    finally:
        for added in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(added)
        root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_event_writes_one_json_line_with_its_fields(stream: io.StringIO) -> None:
    event(
        "listeners up",
        listeners={"outbound": "127.0.0.1:15001"},
        services=["a", "b"],
        policy_rules=3,
    )
    [line] = lines(stream)
    assert set(line) == {"ts", "level", "logger", "msg", "listeners", "services", "policy_rules"}
    assert line["msg"] == "listeners up"
    assert line["level"] == "INFO"
    assert line["logger"] == "sidecar"
    assert line["listeners"] == {"outbound": "127.0.0.1:15001"}
    assert line["services"] == ["a", "b"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(line["ts"]))


def test_fields_outside_the_whitelist_are_left_out_but_named(stream: io.StringIO) -> None:
    event(
        "breaker opened",
        peer="billing-engine",
        headers={"authorization": "Bearer abc"},
        name="clash",
    )
    [line] = lines(stream)
    assert line["peer"] == "billing-engine"
    assert "headers" not in line and "Bearer abc" not in json.dumps(line)
    assert line["unlogged_fields"] == ["headers", "name"]


def test_arguments_are_never_interpolated(stream: io.StringIO) -> None:
    logging.getLogger("aiohttp.server").warning("bad request line %r", "GET /p?ssn=078-05-1120")
    logging.getLogger("sidecar.x").info("called %s", "/patients/MRN12345678")
    logged = lines(stream)
    assert [line["msg"] for line in logged] == ["bad request line %r", "called %s"]
    assert "078-05-1120" not in stream.getvalue() and "MRN12345678" not in stream.getvalue()


def test_exceptions_are_written_as_their_type_only(stream: io.StringIO) -> None:
    try:
        raise ValueError("token eyJhbGciOi.secret for patient Smith")
    except ValueError as exc:
        logging.getLogger("sidecar").exception("handling failed")
        event("reload failed", level=logging.ERROR, error=exc)
    first, second = lines(stream)
    assert first["exc_type"] == "ValueError"
    assert second["error"] == "ValueError"
    assert second["level"] == "ERROR"
    assert "Smith" not in stream.getvalue() and "secret" not in stream.getvalue()


def test_objects_are_written_as_their_type_name(stream: io.StringIO) -> None:
    class Request:
        def __str__(self) -> str:
            return "GET /patients/MRN12345678"

    event("odd value", detail=Request())
    [line] = lines(stream)
    assert line["detail"] == "Request"


def test_access_log_is_off_and_level_applies(stream: io.StringIO) -> None:
    logging.getLogger("aiohttp.access").info("127.0.0.1 GET /p?q=1")
    setup_logging("WARNING", stream=stream)
    event("quiet")
    event("loud", level=logging.WARNING)
    assert [line["msg"] for line in lines(stream)] == ["loud"]


def test_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError):
        setup_logging("CHATTY")
