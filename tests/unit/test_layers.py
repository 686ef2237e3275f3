"""The lead's layers, each driven with a scripted fake `next` (no sockets)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from multidict import CIMultiDict

from sidecar.audit.layer import record_decision, trace_id
from sidecar.audit.log import AuditLog
from sidecar.clock import FakeClock
from sidecar.config.settings import PolicyRule, Service
from sidecar.http import guards
from sidecar.http.headers import forwardable
from sidecar.identity import keys
from sidecar.identity.layers import attach_token, verify_token
from sidecar.identity.tokens import Minter, Verifier
from sidecar.inbound.normalise import normalise_path
from sidecar.inbound.policy import Policy, authorize
from sidecar.outbound.routing import resolve, route
from sidecar.paths import RouteTable
from sidecar.stack import (
    Body,
    BodyStalled,
    BodyTooLarge,
    Call,
    Direction,
    MalformedBody,
    Reply,
    Target,
    UpstreamError,
)
from tests.support.calls import Next, make_call, target

LOCAL = frozenset({"localhost", "127.0.0.1"})


def call(path: str = "/", *, host: str = "localhost", method: str = "GET",
         direction: Direction = "outbound", absolute_host: str | None = None) -> Call:
    c = make_call(path, host=host, method=method, direction=direction)
    c.absolute_host = absolute_host
    return c


def targets(*names: str, routes: tuple[str, ...] = ()) -> dict[str, Target]:
    return {n: Target(service=Service(name=n, endpoints=(f"http://{n}:15006",), routes=routes),
                      routes=RouteTable(routes)) for n in names}


# -- routing -----------------------------------------------------------------------


def test_absolute_form_wins_and_never_falls_through() -> None:
    table = targets("billing", "other")
    found, path = resolve(call("/claims", host="other", absolute_host="billing"),
                          table, LOCAL)
    assert found is not None and found.service.name == "billing" and path == "/claims"
    found, _ = resolve(call("/claims", host="other", absolute_host="nowhere"), table, LOCAL)
    assert found is None


def test_host_header_then_first_segment() -> None:
    table = targets("billing")
    found, path = resolve(call("/claims/1", host="Billing:8080"), table, LOCAL)
    assert found is not None and path == "/claims/1"
    found, path = resolve(call("/billing/claims/1", host="localhost:15001"), table, LOCAL)
    assert found is not None and path == "/claims/1"
    found, path = resolve(call("/billing", host="127.0.0.1"), table, LOCAL)
    assert found is not None and path == "/"
    found, _ = resolve(call("/billing/claims", host="example.com"), table, LOCAL)
    assert found is None


async def test_route_layer_answers_no_route_without_calling_next() -> None:
    downstream = Next()
    layer = route(targets=targets("billing"), local_hosts=LOCAL)
    reply = await layer(call("/unknown/x"), downstream)
    assert reply.status == 404 and reply.reason == "no_route"
    assert downstream.calls == []
    reply = await layer(call("/billing/patients/MRN12345678", host="localhost"), downstream)
    assert reply.status == 200
    assert downstream.calls[0].target == "billing"
    assert downstream.calls[0].route == "/patients/{id}"


# -- headers -----------------------------------------------------------------------


def test_forwardable_removes_hop_by_hop_and_connection_named() -> None:
    headers: CIMultiDict[str] = CIMultiDict([
        ("Connection", "keep-alive, X-Secret"), ("X-Secret", "1"), ("Keep-Alive", "5"),
        ("Transfer-Encoding", "chunked"), ("Upgrade", "h2c"), ("x-sidecar-debug", "1"),
        ("x-sidecar-timeout-ms", "100"), ("Authorization", "Bearer t"),
    ])
    out = forwardable(headers, keep=("x-sidecar-timeout-ms",))
    assert list(out.keys()) == ["x-sidecar-timeout-ms", "Authorization"]


# -- identity layers ---------------------------------------------------------------


@pytest.fixture
def identity(tmp_path: Path) -> tuple[Minter, Verifier]:
    clock = FakeClock()
    for name in ("a", "b"):
        keys.generate(service=name, out_dir=tmp_path)
    (tmp_path / "jwks.json").write_text(json.dumps(keys.merge_jwks([tmp_path])))
    keyset = keys.load_keyset(tmp_path / "jwks.json")
    minter = Minter(service="a", algorithm="EdDSA",
                    key=keys.load_private_key(tmp_path / "a.pem", "EdDSA"), ttl=60, clock=clock)
    verifier = Verifier(service="b", keys=keyset, max_ttl=300, skew=30, clock=clock)
    return minter, verifier


async def test_token_attached_for_mesh_services_only(identity: tuple[Minter, Verifier]) -> None:
    minter, verifier = identity
    downstream = Next()
    layer = attach_token(minter=minter)
    mesh_call = make_call("/x", to=target("b"))
    mesh_call.headers["x-service-token"] = "from-the-app"
    await layer(mesh_call, downstream)
    assert verifier.verify(downstream.calls[0].headers["x-service-token"]) == "a"
    outside = make_call("/x", to=target("payer", endpoints=("https://p",), mesh=False))
    await layer(outside, downstream)
    assert "x-service-token" not in downstream.calls[1].headers


async def test_verify_token_sets_source_and_hides_token(identity: tuple[Minter, Verifier]) -> None:
    minter, verifier = identity
    policy = Policy(rules=None, public_paths=("/health",))
    layer = verify_token(service="b", verifier=verifier, is_public=policy.is_public)
    downstream = Next()
    inbound = call("/claims", direction="inbound")
    inbound.headers["x-service-token"] = minter.token_for("b")
    inbound.headers["x-source-service"] = "forged"
    await layer(inbound, downstream)
    seen = downstream.calls[0]
    assert seen.source == "a" and seen.headers["x-source-service"] == "a"
    assert "x-service-token" not in seen.headers
    missing = await layer(call("/claims", direction="inbound"), downstream)
    assert missing.status == 401 and missing.reason == "token_missing"
    wrong_audience = call("/claims", direction="inbound")
    wrong_audience.headers["x-service-token"] = minter.token_for("c")
    bad = await layer(wrong_audience, downstream)
    assert bad.reason == "token_invalid"
    assert isinstance(bad.body, bytes) and b"audience" in bad.body
    public = await layer(call("/health", direction="inbound"), downstream)
    assert public.status == 200 and downstream.calls[-1].source == "anonymous"


async def test_authorize_default_deny_with_policy() -> None:
    policy = Policy(rules=(PolicyRule(sources=("a",), methods=("POST",), paths=("/claims/*",)),),
                    public_paths=("/health",))
    layer = authorize(policy=policy)
    downstream = Next()
    allowed = call("/claims/1", method="POST", direction="inbound")
    allowed.source = "a"
    assert (await layer(allowed, downstream)).status == 200
    for source, method, path in [("a", "GET", "/claims/1"), ("c", "POST", "/claims/1"),
                                 ("a", "POST", "/claimsx")]:
        denied = call(path, method=method, direction="inbound")
        denied.source = source
        reply = await layer(denied, downstream)
        assert reply.status == 403 and reply.reason == "policy_denied"
    assert len(downstream.calls) == 1


# -- inbound path ------------------------------------------------------------------


async def test_normalise_path_gives_the_app_the_path_the_policy_saw() -> None:
    layer = normalise_path(routes=RouteTable(()))
    downstream = Next()
    await layer(call("/claims//7/./%61", direction="inbound"), downstream)
    assert downstream.calls[0].path == "/claims/7/a"
    bad = await layer(call("/claims/..%2F..%2Fetc", direction="inbound"), downstream)
    assert bad.status == 400 and bad.reason == "bad_request"
    assert len(downstream.calls) == 1


# -- failures and limits -------------------------------------------------------------


@pytest.mark.parametrize(("kind", "status", "reason"), [
    ("connect-failure", 503, "upstream_connect_failure"),
    ("reset", 502, "upstream_reset"),
    ("timeout", 504, "upstream_timeout"),
])
async def test_answer_failures_maps_upstream_errors(kind: str, status: int, reason: str) -> None:
    layer = guards.answer_failures(who="the app")
    reply = await layer(call("/x"), Next(UpstreamError(kind, sent=False)))
    assert (reply.status, reply.reason) == (status, reason)
    assert reply.headers["x-sidecar-reason"] == reason


async def test_check_body_refuses_by_length_and_while_streaming() -> None:
    layer = guards.check_body(max_request_body=10)
    downstream = Next()
    big = call("/x", method="POST")
    big.body = Body(data=b"x" * 11)
    assert (await layer(big, downstream)).status == 413
    assert downstream.calls == []
    streaming = call("/x", method="POST")
    reply = await layer(streaming, Next(BodyTooLarge()))
    assert reply.status == 413 and reply.reason == "body_too_large"
    broken = await layer(call("/x", method="POST"), Next(MalformedBody()))
    assert broken.status == 400 and broken.reason == "bad_request"
    stalled = await layer(call("/x", method="POST"), Next(BodyStalled(60)))
    assert stalled.status == 408 and stalled.reason == "body_stalled"
    assert b"60000 ms" in stalled.body  # type: ignore[operator]


# -- audit layer -------------------------------------------------------------------


async def test_audit_records_decision_with_templated_route(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", clock=FakeClock())
    await log.start()
    layer = record_decision(log=log, clock=FakeClock())
    c = call("/patients/078-05-1120")
    c.target, c.route, c.source = "b", "/patients/{id}", "a"
    c.headers["traceparent"] = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    denied = Reply(status=403, headers=CIMultiDict(), reason="policy_denied", made_here=True)
    await layer(c, Next(denied))
    await log.close()
    record = json.loads((tmp_path / "audit.jsonl").read_text())
    assert record["decision"] == "denied" and record["reason"] == "policy_denied"
    assert record["route"] == "/patients/{id}" and record["trace_id"] == "ab" * 16
    assert "078-05-1120" not in (tmp_path / "audit.jsonl").read_text()


def test_trace_id_is_always_set() -> None:
    assert len(trace_id(call("/x"))) == 32


async def test_audit_records_a_call_whose_caller_went_away(tmp_path: Path) -> None:
    import asyncio

    log = AuditLog(tmp_path / "audit.jsonl", clock=FakeClock())
    await log.start()
    layer = record_decision(log=log, clock=FakeClock())

    async def never(c: Call) -> Reply:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    task = asyncio.ensure_future(layer(call("/x", direction="inbound"), never))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await log.close()
    record = json.loads((tmp_path / "audit.jsonl").read_text())
    assert record["status"] == 499 and record["direction"] == "inbound"


async def test_body_watchers_see_reading_begin_and_end() -> None:
    async def stream():
        yield b"a"
        yield b"b"

    events: list[str] = []
    body = Body(stream=stream())
    body.watch(lambda: events.append("start"), lambda: events.append("end"))
    assert events == []
    assert b"".join([chunk async for chunk in body.payload()]) == b"ab"  # type: ignore[union-attr]
    assert events == ["start", "end"]
    done = Body(data=b"x")
    done.watch(lambda: events.append("never"), lambda: events.append("never"))
    assert events == ["start", "end"]
