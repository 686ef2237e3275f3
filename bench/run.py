"""`make bench`: throughput and latency of one call through two sidecars, against the app alone.

Bounded: a fixed number of requests at a fixed concurrency, on loopback only.
Prints a small table; it asserts nothing (speed is measured here, never in tests).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from bench import upstream
from deploy.process import KeyRing, SidecarProcess


async def load(url: str, *, requests: int, concurrency: int) -> list[float]:
    latencies: list[float] = []
    queue = iter(range(requests))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for _ in queue:
                started = time.perf_counter()
                async with session.get(url) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"unexpected status {response.status}")
                latencies.append(time.perf_counter() - started)

        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))),
                               timeout=300)
    return latencies


def report(name: str, latencies: list[float], elapsed: float) -> None:
    ordered = sorted(latencies)
    p50 = statistics.median(ordered) * 1000
    p99 = ordered[int(len(ordered) * 0.99) - 1] * 1000
    print(f"{name:<28} {len(ordered) / elapsed:>9.0f} req/s   p50 {p50:6.2f} ms   "
          f"p99 {p99:6.2f} ms")


async def main(requests: int, concurrency: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
    keyring = KeyRing(workdir).generate(["a", "b"])
    sidecars: list[SidecarProcess] = []

    async def start(name: str, **config: object) -> SidecarProcess:
        doc = {"service": name, "identity": keyring.identity(name), "drain_timeout": "5s"}
        sidecar = SidecarProcess.in_dir(name, {**doc, **config}, workdir)
        sidecars.append(sidecar)
        return await sidecar.start()

    async with upstream.serving() as app_url:
        try:
            b = await start("b", inbound={"app": app_url})
            a = await start("a", services={"b": {"endpoints": [b.inbound_url]}})
            print(f"{requests} GETs at concurrency {concurrency}, loopback, 2 cores")
            for name, url in [("app alone", app_url + "/claims/1"),
                              ("through sidecar A and B", a.outbound_url + "/b/claims/1")]:
                await load(url, requests=min(200, requests), concurrency=concurrency)  # warm up
                started = time.perf_counter()
                latencies = await load(url, requests=requests, concurrency=concurrency)
                report(name, latencies, time.perf_counter() - started)
        finally:
            for sidecar in reversed(sidecars):
                await sidecar.stop()
    print(f"peak RSS of the largest sidecar process: "
          f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(main(args.requests, args.concurrency))
