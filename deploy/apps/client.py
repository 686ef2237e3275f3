"""The edge client: drives encounters into the mesh from outside it.

It runs beside the `edge` sidecar, whose identity healthcare-api's policy
admits, and calls through that sidecar like any app:

    python -m deploy.apps.client encounter [--patient ID]... [--count N] [--json]
    python -m deploy.apps.client call METHOD SERVICE PATH [--body JSON]
    python -m deploy.apps.client idle      # wait for SIGTERM (keeps a container up for `exec`)

`encounter` prints each encounter's call tree: every hop, its status, and the
caller the callee saw. Exit status: 0 when every call answered 2xx, else 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp

from deploy.apps.common import (
    CLIENT_TIMEOUT,
    DEFAULT_OUTBOUND,
    AppSettings,
    Neighbours,
    Reply,
    upstreams_from,
)

PATIENTS = ("TEST-PATIENT-001", "TEST-PATIENT-002")


async def post_encounter(
    neighbours: Neighbours,
    patient_id: str,
    *,
    amount_cents: int | None = None,
    encounter_id: str | None = None,
    context: Mapping[str, str] | None = None,
) -> Reply:
    """One encounter through healthcare-api; the reply's body holds the call tree.

    The same `encounter_id` again (after a failure to hear the answer) finds the
    same encounter: healthcare-api's saga is keyed by it.
    """
    body: dict[str, Any] = {"patient_id": patient_id}
    if amount_cents is not None:
        body["amount_cents"] = amount_cents
    if encounter_id is not None:
        body["encounter_id"] = encounter_id
    return await neighbours.call(
        "healthcare-api", "POST", "/encounters", context=context or {}, json=body
    )


def render_tree(node: Mapping[str, Any], depth: int = 0) -> list[str]:
    """`service status [reason] (caller seen: X)` lines, indented by call depth."""
    status = node.get("status")
    reason = f" {node['reason']}" if node.get("reason") else ""
    error = f" {node['error']}" if node.get("error") else ""
    seen = (f"(queued by its sidecar: {node['via']})" if node.get("via")
            else f"(caller seen: {node.get('source_service') or '-'})")
    line = (
        f"{'  ' * depth}-> {node.get('service')} {status if status is not None else '---'}"
        f"{reason}{error} {seen}"
    )
    lines = [line]
    for child in node.get("calls") or []:
        if isinstance(child, Mapping):
            lines.extend(render_tree(child, depth + 1))
    return lines


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="client", description=__doc__.splitlines()[0])
    parser.add_argument("--outbound", default=os.environ.get("SIDECAR_OUTBOUND", DEFAULT_OUTBOUND))
    commands = parser.add_subparsers(dest="command", required=True)
    encounter = commands.add_parser("encounter", help="create encounters via healthcare-api")
    encounter.add_argument("--patient", action="append", dest="patients")
    encounter.add_argument("--count", type=int, default=1, help="encounters per patient")
    encounter.add_argument("--amount-cents", type=int)
    encounter.add_argument("--json", action="store_true", help="print the full answers")
    call = commands.add_parser("call", help="one call through the sidecar")
    call.add_argument("method")
    call.add_argument("service")
    call.add_argument("path")
    call.add_argument("--body", help="JSON request body")
    commands.add_parser("idle", help="wait for SIGTERM")
    return parser


async def _encounters(neighbours: Neighbours, args: argparse.Namespace) -> int:
    failures = 0
    for patient_id in args.patients or PATIENTS:
        for _ in range(args.count):
            answer = await post_encounter(neighbours, patient_id, amount_cents=args.amount_cents)
            failures += not answer.ok
            print(f"encounter {answer.field('encounter_id') or '?'} for {patient_id}:")
            print("\n".join(render_tree(answer.summary(), 1)))
            if args.json:
                print(json.dumps(answer.body, indent=2))
    return 1 if failures else 0


async def _call(neighbours: Neighbours, args: argparse.Namespace) -> int:
    body = json.loads(args.body) if args.body else None
    answer = await neighbours.call(
        args.service, args.method.upper(), args.path, context={}, json=body
    )
    print(
        f"{args.method.upper()} {args.service}{args.path} -> {answer.status}"
        f"{' ' + answer.reason if answer.reason else ''}"
    )
    print(json.dumps(answer.body, indent=2) if answer.body is not None else answer.error)
    return 0 if answer.ok else 1


async def _idle() -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    return 0


async def amain(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "idle":
        return await _idle()
    settings = AppSettings(
        outbound=args.outbound, upstreams=upstreams_from(os.environ if environ is None else environ)
    )
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        neighbours = Neighbours(session, settings)
        if args.command == "encounter":
            return await _encounters(neighbours, args)
        return await _call(neighbours, args)


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(asyncio.run(amain(argv)))


if __name__ == "__main__":
    main()
