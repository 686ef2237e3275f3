"""`/_sidecar/v1/` on the outbound port: sagas, fan-out and dead letters over plain HTTP.

    POST /_sidecar/v1/sagas[?wait=5s]         202 {"id", "state"}; 200 with the end state
    GET  /_sidecar/v1/sagas/{id}              200 {"id", "name", "state", "steps": [...]}
    POST /_sidecar/v1/fanout                  202 {"id"}
    GET  /_sidecar/v1/fanout/{id}             200 {"id", "targets": {NAME: {...}}}
    GET  /_sidecar/v1/dead-letters            200 {"dead_letters": [...]}
    POST /_sidecar/v1/dead-letters/{id}/redrive   202 {"id", "status": "pending"}

A POST with an `Idempotency-Key` returns the instance first made with it
(200). Refusals are problem+json, and nothing is stored for them: a
malformed definition 400 `bad_request` with every field path in `detail`
(and in `errors`), a service this sidecar does not know 404 `no_route`, a
body over `limits.max_request_body` 413 `body_too_large`. `outbound.routing.
sidecar_api` hands this handler the calls addressed to the sidecar itself.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

from multidict import CIMultiDict

from sidecar.config.units import parse_duration
from sidecar.http import problem
from sidecar.http.headers import IDEMPOTENCY_KEY, TRACEPARENT
from sidecar.names import API_PREFIX, RESERVED_SERVICE
from sidecar.paths import RouteTable
from sidecar.stack import BodyTooLarge, Call, Handler, Reply, RequestBodyError
from sidecar.workflows.definitions import DefinitionError, parse_fanout, parse_saga
from sidecar.workflows.engine import Engine, Submitted
from sidecar.workflows.model import PENDING, FanoutDef, SagaDef
from sidecar.workflows.store import KeyReused

ROUTES = RouteTable(tuple(API_PREFIX + route for route in (
    "sagas", "sagas/{id}", "fanout", "fanout/{id}", "dead-letters", "dead-letters/{id}/redrive",
)))
MAX_KEY = 255
MAX_ERRORS = 20  # field errors listed in one answer

Answer = Callable[[Call, list[str]], Awaitable[Reply]]


def handler(*, engine: Engine, services: frozenset[str], max_body: int,
            max_steps: int) -> Handler:
    """The API as a `Handler`, for the services of one config."""

    async def create_saga(call: Call, parts: list[str]) -> Reply:
        wait, bad_wait = _wait(call.query)
        definition, key, refused = await _definition(
            call, lambda doc: parse_saga(doc, services=services, max_steps=max_steps), max_body)
        refused = refused or bad_wait
        if refused is not None:
            return refused
        assert isinstance(definition, SagaDef)
        submitted = await _submit(engine.submit_saga(definition, key=key, trace=_trace(call)))
        if isinstance(submitted, Reply):
            return submitted
        call.workflow = submitted.id
        location = {"Location": f"{API_PREFIX}sagas/{submitted.id}"}
        if wait is None and submitted.created:
            return _json(202, {"id": submitted.id, "state": "running"}, location)
        saga = await engine.wait(submitted.id, wait or 0.0)
        assert saga is not None, "a saga just stored is there"
        if saga.finished or not submitted.created:
            return _json(200, saga.view(), location)
        return _json(202, {"id": saga.id, "state": saga.state}, location)

    async def get_saga(call: Call, parts: list[str]) -> Reply:
        saga = await engine.store.saga(parts[1])
        if saga is None:
            return _not_found("saga")
        call.workflow = saga.id
        return _json(200, saga.view())

    async def create_fanout(call: Call, parts: list[str]) -> Reply:
        definition, key, refused = await _definition(
            call, lambda doc: parse_fanout(doc, services=services, max_targets=max_steps),
            max_body)
        if refused is not None:
            return refused
        assert isinstance(definition, FanoutDef)
        submitted = await _submit(engine.submit_fanout(definition, key=key, trace=_trace(call)))
        if isinstance(submitted, Reply):
            return submitted
        call.workflow = submitted.id
        location = {"Location": f"{API_PREFIX}fanout/{submitted.id}"}
        if submitted.created:
            return _json(202, {"id": submitted.id}, location)
        view = await _fanout_view(engine, submitted.id)
        if view is None:  # purged between the two reads
            return _not_found("fan-out")
        return _json(200, view, location)

    async def get_fanout(call: Call, parts: list[str]) -> Reply:
        view = await _fanout_view(engine, parts[1])
        if view is None:
            return _not_found("fan-out")
        call.workflow = parts[1]
        return _json(200, view)

    async def dead_letters(call: Call, parts: list[str]) -> Reply:
        letters = await engine.store.dead_letters()
        return _json(200, {"dead_letters": [letter.dead_letter() for letter in letters]})

    async def redrive(call: Call, parts: list[str]) -> Reply:
        delivery = await engine.redrive(parts[1])
        if delivery is None:
            return _not_found("dead letter")
        call.workflow = delivery.fanout
        call.step = delivery.target
        return _json(202, {"id": delivery.id, "status": PENDING})

    table: dict[tuple[str, ...], dict[str, Answer]] = {
        ("sagas",): {"POST": create_saga},
        ("sagas", "*"): {"GET": get_saga},
        ("fanout",): {"POST": create_fanout},
        ("fanout", "*"): {"GET": get_fanout},
        ("dead-letters",): {"GET": dead_letters},
        ("dead-letters", "*", "redrive"): {"POST": redrive},
    }

    async def api(call: Call) -> Reply:
        call.target = RESERVED_SERVICE
        call.route = ROUTES.template(call.path)
        parts = call.path[len(API_PREFIX):].split("/") if call.path.startswith(API_PREFIX) else []
        shape = tuple("*" if index % 2 and part else part for index, part in enumerate(parts))
        methods = table.get(shape) if all(parts) else None
        if methods is None:
            return problem.reply("not_found", "No such resource of the sidecar's API. See "
                                 "/_sidecar/v1/sagas, /_sidecar/v1/fanout and "
                                 "/_sidecar/v1/dead-letters.")
        answer = methods.get(call.method)
        if answer is None:
            return problem.reply("method_not_allowed", "This resource of the sidecar's API "
                                 "takes only the methods in Allow.",
                                 headers={"Allow": ", ".join(methods)})
        return await answer(call, parts)

    return api


# ---- reading the request


async def _definition(call: Call, parse: Callable[[Any], SagaDef | FanoutDef], max_body: int
                      ) -> tuple[SagaDef | FanoutDef | None, str | None, Reply | None]:
    """The request's checked definition and Idempotency-Key, or the refusal to answer."""
    doc, refused = await _request_json(call, max_body)
    key, bad_key = _key(call)
    if refused is not None or bad_key is not None:
        return None, None, refused or bad_key
    try:
        return parse(doc), key, None
    except DefinitionError as exc:
        return None, None, _refusal(exc)


async def _request_json(call: Call, max_body: int) -> tuple[Any, Reply | None]:
    too_large = problem.reply(
        "body_too_large", f"The definition is larger than this sidecar's limit of {max_body} "
                          "bytes (limits.max_request_body). Nothing was stored.")
    if call.body.length is not None and call.body.length > max_body:
        return None, too_large
    try:
        whole = await call.body.buffer(max_body)
    except BodyTooLarge:
        return None, too_large
    except RequestBodyError:
        return None, _bad(["(body): the request body is not well-formed"])
    if not whole:
        return None, too_large
    data = call.body.payload()
    assert isinstance(data, bytes)
    try:
        return json.loads(data), None
    except (ValueError, UnicodeDecodeError):
        return None, _bad(["(body): must be JSON"])


def _key(call: Call) -> tuple[str | None, Reply | None]:
    values = call.headers.getall(IDEMPOTENCY_KEY, [])
    if not values:
        return None, None
    key = values[0]
    if len(values) > 1 or not 0 < len(key) <= MAX_KEY or not key.isascii() \
            or not key.isprintable():
        return None, _bad([f"{IDEMPOTENCY_KEY}: must be one header of 1 to {MAX_KEY} "
                           "printable ASCII characters"])
    return key, None


def _wait(query: str) -> tuple[float | None, Reply | None]:
    asked = parse_qs(query).get("wait")
    if not asked:
        return None, None
    try:
        return parse_duration(asked[0]), None
    except ValueError:
        return None, _bad(["wait: must be a duration such as 5s or 500ms"])


def _trace(call: Call) -> str | None:
    """What the workflow's spans join: the app's traceparent, else this call's trace id."""
    if call.trace is None:
        return None
    sent = call.headers.get(TRACEPARENT)
    if sent and call.trace.trace_id_hex in sent:
        return sent
    return call.trace.trace_id_hex


async def _submit(submitting: Awaitable[Submitted]) -> Submitted | Reply:
    try:
        return await submitting
    except KeyReused:
        return _bad([f"{IDEMPOTENCY_KEY}: was first used with a different definition; "
                     "use a new key for a new instance"])


async def _fanout_view(engine: Engine, id: str) -> dict[str, Any] | None:
    found = await engine.store.fanout(id)
    if found is None:
        return None
    _, deliveries = found
    return {"id": id, "targets": {d.target: d.view() for d in deliveries}}


# ---- answers


def _json(status: int, doc: dict[str, Any], headers: dict[str, str] | None = None) -> Reply:
    out: CIMultiDict[str] = CIMultiDict({"Content-Type": "application/json"})
    out.update(headers or {})
    return Reply(status=status, headers=out, body=json.dumps(doc).encode())


def _bad(errors: list[str]) -> Reply:
    shown = errors[:MAX_ERRORS]
    more = f" (and {len(errors) - len(shown)} more)" if len(errors) > len(shown) else ""
    reply = problem.reply("bad_request", "Nothing was stored. " + "; ".join(shown) + more)
    doc = json.loads(reply.body)  # type: ignore[arg-type]
    doc["errors"] = shown
    reply.body = json.dumps(doc).encode()
    return reply


def _refusal(exc: DefinitionError) -> Reply:
    if exc.problems.errors:
        return _bad(exc.problems.errors)
    return problem.reply("no_route", "Nothing was stored. " + "; ".join(exc.problems.unknown)
                         + ": name a service listed under `services` in the sidecar config.")


def _not_found(what: str) -> Reply:
    return problem.reply("not_found", f"No {what} has this id here (it may have been purged "
                                      "after workflows.retention).")
