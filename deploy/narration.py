"""How `make demo` puts what happened into words: call trees and audit records as text.

Pure functions over the apps' call trees (`deploy.apps.common.Reply.summary()`:
nested `{"service", "status", "reason", "source_service", "calls"}`; a node
with `"via": "fan-out"` is an event the caller's sidecar took for delivery),
over saga views (`GET /_sidecar/v1/sagas/{id}`) and over audit records, so the
demo's wording is tested without running anything.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from deploy.apps.common import Reply

Node = Mapping[str, Any]


def children(node: Node) -> Iterator[Node]:
    for child in node.get("calls") or []:
        if isinstance(child, Mapping):
            yield child


def call_lines(caller: str, node: Node, depth: int = 0) -> list[str]:
    """`caller -> service  status [reason]  app saw x-source-service: X`, by call depth."""
    status = node.get("status")
    answer = f"{status if status is not None else '---'}"
    if node.get("reason"):
        answer += f" {node['reason']}"
    if node.get("error"):
        answer += f" ({node['error']})"
    hop = f"{'  ' * depth}{caller} -> {node.get('service')}"
    seen = node.get("source_service")
    if node.get("via"):
        note = f"queued by {caller}'s sidecar ({node['via']})"
    else:
        note = f"app saw x-source-service: {seen}" if seen else "the app was not reached"
    lines = [f"{hop:<54} {answer:<5}  {note}"]
    for child in children(node):
        lines += call_lines(str(node.get("service")), child, depth + 1)
    return lines


def callers_verified(caller: str, node: Node) -> bool:
    """Every app that answered 2xx saw exactly its real caller as x-source-service
    (a fan-out node was answered by the caller's own sidecar, not by an app)."""
    status = node.get("status")
    answered = isinstance(status, int) and 200 <= status < 300
    if answered and not node.get("via") and node.get("source_service") != caller:
        return False
    return all(callers_verified(str(node.get("service")), child) for child in children(node))


def services_in(caller: str, node: Node) -> set[str]:
    """Every sidecar a call tree passed through: the callers' and the callees'."""
    found = {caller, str(node.get("service"))}
    for child in children(node):
        found |= services_in(str(node.get("service")), child)
    return found


def fanouts(node: Node) -> int:
    """The events a call tree handed to fan-outs."""
    own = 1 if node.get("via") == "fan-out" and node.get("status") == 202 else 0
    return own + sum(fanouts(child) for child in children(node))


def spans_expected(tree: Node, saga: Mapping[str, Any] | None) -> int:
    """Spans of one encounter's trace: the edge's client span and healthcare-api's
    server span; per saga step sent, an internal, a client and a server span; the
    same per fan-out delivery."""
    sent = [step for step in (saga or {}).get("steps", []) if step.get("attempts")]
    return 2 + 3 * len(sent) + 3 * fanouts(tree)
def hops(node: Node) -> int:
    """The calls in a call tree, this one included."""
    return 1 + sum(hops(child) for child in children(node))


def failed_calls(node: Node) -> int:
    """The calls in a call tree that did not answer 2xx, this one included."""
    status = node.get("status")
    failed = 0 if isinstance(status, int) and 200 <= status < 300 else 1
    return failed + sum(failed_calls(child) for child in children(node))


def calls_to(tree: Node, target: str) -> dict[str, Node]:
    """caller -> its call to `target`, for each call to `target` below the tree's root."""
    found: dict[str, Node] = {}
    for child in children(tree):
        for call in children(child):
            if call.get("service") == target:
                found[str(child.get("service"))] = call
    return found


def saga_text(saga: Mapping[str, Any] | None) -> str:
    """`completed (verify done, claim done, notify done)`."""
    if not saga:
        return "none"
    steps = ", ".join(f"{step['name']} {step['status']}" for step in saga.get("steps") or [])
    return f"{saga.get('state')} ({steps})"


def status_text(reply: Reply) -> str:
    if reply.status is None:
        return f"no answer ({reply.error})"
    encounter = reply.field("encounter_id")
    return f"{reply.status}" + (f" (encounter {encounter})" if encounter else "")


def audit_line(record: Mapping[str, Any], service: str) -> str:
    """One record of `service`'s audit log in a line: time, who, what, answer, the peer's
    SPIFFE ID over mTLS (or plain), trace, hash."""
    reason = f" {record['reason']}" if record.get("reason") else ""
    transport = (f"mtls={record['peer_id']}" if record.get("tls") and record.get("peer_id")
                 else "tls" if record.get("tls") else "plain")
    # An inbound record's target is the log's own service.
    target = record.get("target") or service
    return (
        f"{str(record.get('ts', ''))[11:23]} {record.get('direction', ''):<8} "
        f"{record.get('source')} -> {target} "
        f"{record.get('method')} {record.get('route')} {record.get('status')}{reason} "
        f"{record.get('decision')} {transport} trace={str(record.get('trace_id', ''))[:8]} "
        f"hash={str(record.get('hash', ''))[:8]}"
    )


def audit_records(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def sample(records: list[dict[str, Any]], first: int = 2, more: int = 2) -> list[dict[str, Any]]:
    """The first few records, then a few with a reason (refusals, failures) if there are any."""
    return records[:first] + [r for r in records[first:] if r.get("reason")][:more]


def breaker_text(settings: Mapping[str, Any]) -> str:
    return (
        f"open after {settings.get('failure_threshold')} failures in a row, "
        f"probe after {settings.get('recovery_timeout')}"
    )


def indented(text: str, prefix: str = "  ") -> list[str]:
    return [prefix + line for line in text.splitlines()]


def pretty(text: str) -> str:
    """JSON text indented for reading; anything else as it is."""
    try:
        return json.dumps(json.loads(text), indent=2)
    except ValueError:
        return text
