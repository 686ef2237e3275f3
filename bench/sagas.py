"""`make bench`, part two: the proxy path through two sidecars with workflows off and on, and sagas.

Bounded: a fixed number of requests at a fixed concurrency, on loopback only.
Prints a small table; it asserts nothing (speed is measured here, never in tests).

- GETs: the app alone; through sidecar A and B; through A and B with A's
  workflows on (SQLite store), whose plain proxy path should cost the same
  (one prefix check per call). `cpu/req` is sidecar A's CPU time per request.
  Two interleaved rounds; the faster of each is shown.
- Sagas: three steps each (POST to B's app), submitted to A's `/_sidecar/v1/sagas`
  with `?wait=`, several at once; every step is written ahead to SQLite before
  it is sent.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import aiohttp

from bench import upstream
from bench.drive import Call, cpu_seconds, get, load, report, report_peak_rss
from deploy.process import KeyRing, SidecarProcess

SAGA = {"name": "bench", "steps": [
    {"name": name, "action": {"service": "b", "method": "POST", "path": f"/{name}",
                              "body": {"n": 1}},
     "compensation": {"service": "b", "method": "POST", "path": f"/{name}/undo"}}
    for name in ("verify", "claim", "notify")
]}


def saga(url: str) -> Call:
    async def one(session: aiohttp.ClientSession) -> None:
        async with session.post(url + "/_sidecar/v1/sagas?wait=30s", json=SAGA) as response:
            doc = await response.json()
            if response.status != 200 or doc.get("state") != "completed":
                raise RuntimeError(f"saga ended {response.status} {doc.get('state')}")

    return one


async def main(requests: int, concurrency: int, sagas: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
    keyring = KeyRing(workdir).generate(["a", "b"])
    sidecars: list[SidecarProcess] = []

    async def start(name: str, service: str, **config: object) -> SidecarProcess:
        doc = {"service": service, "identity": keyring.identity(service), "drain_timeout": "5s"}
        sidecar = SidecarProcess.in_dir(name, {**doc, **config}, workdir)
        sidecars.append(sidecar)
        return await sidecar.start()

    async with upstream.serving() as app_url:
        try:
            b = await start("b", "b", inbound={"app": app_url})
            services = {"b": {"endpoints": [b.inbound_url]}}
            a = await start("a", "a", services=services)
            a_wf = await start("a-workflows", "a", services=services,
                               workflows={"store": f"sqlite://{workdir}/workflows.db"})
            print(f"{requests} GETs at concurrency {concurrency}, loopback, "
                  f"{os.cpu_count()} cores")
            runs: list[tuple[str, str, SidecarProcess | None]] = [
                ("app alone", app_url + "/claims/1", None),
                ("through sidecar A and B", a.outbound_url + "/b/claims/1", a),
                ("  the same, A's workflows on", a_wf.outbound_url + "/b/claims/1", a_wf),
            ]
            for _, url, _ in runs:
                await load(get(url), requests=min(200, requests), concurrency=concurrency)
            # Two rounds, interleaved, the better of each kept: a shared machine is noisy.
            best: dict[str, tuple[list[float], float, float | None]] = {}
            for _ in range(2):
                for name, url, measured in runs:
                    before = cpu_seconds([measured]) if measured else 0.0
                    started = time.perf_counter()
                    latencies = await load(get(url), requests=requests,
                                           concurrency=concurrency)
                    elapsed = time.perf_counter() - started
                    cpu = cpu_seconds([measured]) - before if measured else None
                    if name not in best or elapsed < best[name][1]:
                        best[name] = (latencies, elapsed, cpu)
            for name, _, _ in runs:
                report(name, *best[name])
            print(f"\n{sagas} sagas of three steps (A -> B -> app), 10 at once, SQLite store")
            await load(saga(a_wf.outbound_url), requests=min(20, sagas), concurrency=10)
            started = time.perf_counter()
            latencies = await load(saga(a_wf.outbound_url), requests=sagas, concurrency=10)
            report("sagas, submitted to the end", latencies, time.perf_counter() - started)
        finally:
            for sidecar in reversed(sidecars):
                await sidecar.stop()
    report_peak_rss()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--sagas", type=int, default=300)
    args = parser.parse_args()
    asyncio.run(main(args.requests, args.concurrency, args.sagas))
