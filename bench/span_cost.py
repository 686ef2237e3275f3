"""`python -m bench.span_cost`: what one span costs in CPU, sampled and exported, or not.

Drives calls through the real tracing layers (`trace_context` and
`client_span` outbound, `server_span` inbound) with a terminal that answers
at once, under the real `Tracing` exporting over OTLP/HTTP to `bench/sink.py`
(a process of its own, so its CPU is not counted). CPU is
`time.process_time()` of this process, every thread: the layers on the loop
and the export thread's encoding and HTTP alike; "on the loop" is the main
thread's share (`time.thread_time()`), the rest is the export thread.

Each figure is µs per call (one span per call), median over the rounds, for:

    none       the same stack without tracing layers: the floor to subtract
    unsampled  tracing on at ratio 0 (the caller's flag, when sent, is 00)
    sampled    tracing at ratio 1.0, every span exported

Calls are built before the clock starts; the queue is flushed after every
batch of `max_batch` calls, so no span is dropped (the run says so if one
was). The sink's byte count per span shows the wire size stays put.
`--spans N` calls per measurement, `--rounds R`; a run is bounded by both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from multidict import CIMultiDict

from deploy.process import Process, free_ports, loopback_url
from sidecar.config import settings
from sidecar.stack import Body, Call, Handler, Layer, Reply, compose
from sidecar.telemetry.tracing import (
    Tracing,
    client_span,
    server_span,
    setup_tracing,
    trace_context,
)

APP_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
APP_SPAN = "00f067aa0ba902b7"
RATIOS = {"unsampled": 0.0, "sampled": 1.0}
READY_WITHIN = 20.0  # seconds for the sink to answer
MAX_SPANS, MAX_ROUNDS = 100_000, 20


@dataclass(frozen=True)
class Figures:
    total_us: float  # CPU per call, every thread
    loop_us: float  # CPU per call on the main thread (the layers)
    bytes_per_span: float  # what reached the sink, per span
    dropped: int


async def answer(call: Call) -> Reply:
    return Reply(status=200, headers=CIMultiDict(), reason=None)


def make_call(index: int, *, inbound: bool, flags: str) -> Call:
    """A routed call as the edge and routing leave it; every other one with the app's context."""
    headers: CIMultiDict[str] = CIMultiDict({"Host": "up", "Accept": "application/json"})
    if index % 2:
        headers["traceparent"] = f"00-{APP_TRACE}-{APP_SPAN}-{flags}"
    call = Call(
        direction="inbound" if inbound else "outbound",
        method="GET",
        path=f"/claims/{index}",
        query="",
        headers=headers,
        body=Body.empty(),
        source="bench-a",
        target="bench-b" if inbound else "up",
        route="/claims/{id}",
    )
    call.server_port = 15006 if inbound else 8080
    return call


def stack(variant: str, tracing: Tracing, *, inbound: bool) -> Handler:
    layers: list[Layer] = []
    if variant != "none":
        layers = (
            [server_span(tracing=tracing)]
            if inbound
            else [trace_context(tracing=tracing), client_span(tracing=tracing)]
        )
    return compose(*layers, terminal=answer)


def sink_bytes(url: str) -> int:
    with urllib.request.urlopen(url + "/stats", timeout=5) as response:
        return int(json.load(response)["bytes"])


def measure(variant: str, *, inbound: bool, spans: int, sink_url: str) -> Figures:
    ratio = RATIOS.get(variant, 0.0)
    cfg = settings.Tracing(exporter="otlp", endpoint=sink_url, sample_ratio=ratio)
    tracing = setup_tracing(cfg, service_name="bench-b" if inbound else "bench-a", env={})
    handler = stack(variant, tracing, inbound=inbound)
    flags = "01" if ratio > 0 else "00"
    calls = [make_call(i, inbound=inbound, flags=flags) for i in range(spans)]
    batch = tracing.plan.max_batch
    before = sink_bytes(sink_url)

    async def drive() -> None:
        for start in range(0, spans, batch):
            for call in calls[start : start + batch]:
                await handler(call)
            tracing.force_flush()

    cpu, loop = time.process_time(), time.thread_time()
    asyncio.run(drive())
    cpu, loop = time.process_time() - cpu, time.thread_time() - loop
    dropped = tracing.dropped
    tracing.shutdown()
    sent = sink_bytes(sink_url) - before
    return Figures(cpu * 1e6 / spans, loop * 1e6 / spans, sent / spans, dropped)


def median_of(rounds: list[Figures], pick: Callable[[Figures], float]) -> float:
    return statistics.median(pick(figures) for figures in rounds)


def run(spans: int, rounds: int, sink_url: str) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    for inbound in (False, True):
        for variant in ("none", "unsampled", "sampled"):
            measure(variant, inbound=inbound, spans=min(spans, 512), sink_url=sink_url)  # warm
            taken = [
                measure(variant, inbound=inbound, spans=spans, sink_url=sink_url)
                for _ in range(rounds)
            ]
            key = f"{'inbound SERVER' if inbound else 'outbound CLIENT'} {variant}"
            results[key] = {
                "cpu_us": median_of(taken, lambda f: f.total_us),
                "loop_us": median_of(taken, lambda f: f.loop_us),
                "bytes": median_of(taken, lambda f: f.bytes_per_span),
                "dropped": sum(f.dropped for f in taken),
            }
    return results


def report(results: dict[str, dict[str, float]], spans: int, rounds: int) -> None:
    print(f"span_cost: {spans} calls per measurement, median of {rounds} rounds; µs CPU per call")
    print(f"{'stack':<28} {'all threads':>12} {'on the loop':>12} {'export':>8} "
          f"{'added':>8} {'bytes/span':>11}")
    for key, row in results.items():
        floor = results[key.rsplit(" ", 1)[0] + " none"]["cpu_us"]
        dropped = f"  DROPPED {row['dropped']:.0f}" if row["dropped"] else ""
        print(f"{key:<28} {row['cpu_us']:12.1f} {row['loop_us']:12.1f} "
              f"{row['cpu_us'] - row['loop_us']:8.1f} {row['cpu_us'] - floor:8.1f} "
              f"{row['bytes']:11.1f}{dropped}")


async def start_sink(workdir: Path) -> tuple[Process, str]:
    """`bench/sink.py` on a free port, answering; the process and its URL."""
    port = free_ports(1)[0]
    sink = Process("otlp-sink", [sys.executable, "-m", "bench.sink", "--port", str(port)],
                   stdout_path=workdir / "sink.out")
    sink.spawn()
    url = loopback_url(port)
    ends = time.monotonic() + READY_WITHIN
    while time.monotonic() < ends:
        sink.check()
        try:
            sink_bytes(url)
            return sink, url
        except OSError:
            await asyncio.sleep(0.05)
    sink.kill()
    raise RuntimeError(f"the sink did not answer within {READY_WITHIN:.0f}s; {sink.logs()}")


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.span_cost",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--spans", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if not 1 <= args.spans <= MAX_SPANS or not 1 <= args.rounds <= MAX_ROUNDS:
        parser.error(f"--spans must be 1 to {MAX_SPANS} and --rounds 1 to {MAX_ROUNDS}")
    with tempfile.TemporaryDirectory(prefix="sidecar-span-cost-") as workdir:
        sink, url = asyncio.run(start_sink(Path(workdir)))
        try:
            results = run(args.spans, args.rounds, url)
        finally:
            sink.kill()
    report(results, args.spans, args.rounds)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if any(row["dropped"] for row in results.values()) else 0


if __name__ == "__main__":
    sys.exit(cli())
