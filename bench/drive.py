"""A bounded client load for the small benches (`sagas.py`, `mtls.py`): a count of
calls at a fixed concurrency, their latencies, and one line of figures."""

from __future__ import annotations

import asyncio
import resource
import statistics
import time
from collections.abc import Awaitable, Callable, Iterable

import aiohttp

from bench import procstat
from deploy.process import SidecarProcess

Call = Callable[[aiohttp.ClientSession], Awaitable[None]]


async def load(call: Call, *, requests: int, concurrency: int) -> list[float]:
    """`requests` calls, `concurrency` at a time (300 s at most); their latencies."""
    latencies: list[float] = []
    queue = iter(range(requests))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for _ in queue:
                started = time.perf_counter()
                await call(session)
                latencies.append(time.perf_counter() - started)

        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))),
                               timeout=300)
    return latencies


def get(url: str) -> Call:
    """A GET of `url` that must answer 200."""

    async def one(session: aiohttp.ClientSession) -> None:
        async with session.get(url) as response:
            await response.read()
            if response.status != 200:
                raise RuntimeError(f"unexpected status {response.status}")

    return one


def cpu_seconds(processes: Iterable[SidecarProcess]) -> float:
    """User and system CPU the sidecar processes have used so far."""
    total = 0.0
    for process in processes:
        assert process.proc is not None
        total += procstat.cpu_seconds(process.proc.pid)
    return total


def report(name: str, latencies: list[float], elapsed: float, cpu: float | None = None) -> None:
    ordered = sorted(latencies)
    p50 = statistics.median(ordered) * 1000
    p99 = ordered[max(0, int(len(ordered) * 0.99) - 1)] * 1000
    per = f"   {cpu / len(ordered) * 1e6:5.0f} µs CPU/req" if cpu is not None else ""
    print(f"{name:<36} {len(ordered) / elapsed:>8.0f} /s   p50 {p50:7.2f} ms   "
          f"p99 {p99:7.2f} ms{per}")


def report_peak_rss() -> None:
    """The peak RSS of the largest child process so far (the sidecars this run started)."""
    print(f"peak RSS of the largest sidecar process: "
          f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MiB")
