"""wrk runs: closed loop for the most a contender can answer, or paced to a fixed rate.

wrk2 (constant throughput) is not packaged, so pacing is a Lua `delay()`:
the thread hands out send slots `1/rate` apart and each connection, when it
is free, waits for the next slot. A connection that is late takes the next
slot from now (no catch-up bursts), so a contender that cannot keep up shows
a lower achieved rate rather than a queue; the achieved rate is reported
beside the target. wrk times each request from its send, as wrk2 would
without its coordinated-omission correction. A `done()` hook prints the
summary and percentiles as one JSON line.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

MARK = "WRK_JSON "
TIMEOUT_S = 2  # wrk's per-request timeout; a slower answer counts as an error
GRACE_S = 15  # seconds a wrk run may take beyond its duration before it is killed

REPORT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"p999":%d,"max":%d,"mean":%.1f}}\\n',
    "MARK", summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
""".replace("MARK", MARK)

PACED = """
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local interval_ms = nil
local next_slot = nil

init = function(args)
  interval_ms = 1000 / tonumber(args[1])  -- one thread: its rate is the whole rate
end

delay = function()
  local now = now_ms()
  if next_slot == nil or next_slot < now then next_slot = now end
  local wait = next_slot - now
  next_slot = next_slot + interval_ms
  return math.floor(wait + 0.5)  -- wrk's timers count whole milliseconds
end
"""


@dataclass(frozen=True, slots=True)
class Run:
    """One wrk run's outcome; latencies in milliseconds."""

    target_rate: int | None  # None: closed loop
    connections: int
    requests: int
    duration_s: float
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float

    @property
    def rate(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    def held(self, share: float = 0.95) -> bool:
        """Whether the run reached `share` of its target rate (closed loops always do)."""
        return self.target_rate is None or self.rate >= share * self.target_rate

    def as_json(self) -> dict[str, object]:
        return {**asdict(self), "rate": round(self.rate, 1)}


def scripts(workdir: Path) -> tuple[Path, Path]:
    """The closed-loop and paced Lua scripts, written into `workdir`."""
    closed, paced = workdir / "closed.lua", workdir / "paced.lua"
    closed.write_text(REPORT)
    paced.write_text(PACED + REPORT)
    return closed, paced


def run(url: str, *, wrk: str, script: Path, seconds: int, connections: int,
        rate: int | None = None, prefix: Sequence[str] = ()) -> Run:
    """One wrk run of `seconds` against `url` (loopback only), one thread."""
    assert url.startswith("http://127."), url  # the bench's traffic stays on this machine
    argv = [*prefix, wrk, "-t1", f"-c{connections}", f"-d{seconds}s", f"--timeout={TIMEOUT_S}s",
            "-s", str(script), url]
    if rate is not None:
        argv += ["--", str(rate)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + GRACE_S,
                          check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout[-1500:]}"
                           f"{done.stderr[-1500:]}")
    doc = json.loads(lines[-1][len(MARK):])
    latency = doc["latency_us"]
    return Run(
        target_rate=rate,
        connections=connections,
        requests=doc["requests"],
        duration_s=doc["duration_us"] / 1e6,
        errors=sum(doc["errors"].values()),
        p50_ms=latency["p50"] / 1000,
        p90_ms=latency["p90"] / 1000,
        p99_ms=latency["p99"] / 1000,
        p999_ms=latency["p999"] / 1000,
        max_ms=latency["max"] / 1000,
    )
