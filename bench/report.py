"""From a run's raw figures to medians, the table and issue 10's targets.

Pure: takes the records `bench.run` collected, returns plain data and text.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from typing import Any

from bench.contenders import LABELS

TIMES = "\N{MULTIPLICATION SIGN}"
HELD = 0.95  # a fixed-rate run "holds" its rate when it reaches this share of it


def _median(values: Iterable[float]) -> float | None:
    found = list(values)
    return statistics.median(found) if found else None


def summarise(runs: list[dict[str, Any]], memory: dict[str, dict[str, Any]],
              rates: tuple[int, ...], cpu_rate: int) -> dict[str, dict[str, Any]]:
    """Per contender: medians over the rounds of every figure, and its memory readings."""
    summary: dict[str, dict[str, Any]] = {}
    for key in dict.fromkeys(run["contender"] for run in runs):
        mine = [run for run in runs if run["contender"] == key]
        closed = [run["wrk"] for run in mine if run["kind"] == "max"]
        entry: dict[str, Any] = {
            "label": LABELS[key],
            "max_rps": _median(w["rate"] for w in closed),
            "errors": sum(run["wrk"]["errors"] for run in mine),
            "rates": {},
            "core_taken_by_others": _median(run["system_core"]["others"] for run in mine
                                            if run.get("system_core")),
        }
        for rate in rates:
            paced = [run for run in mine if run["wrk"]["target_rate"] == rate]
            achieved = _median(run["wrk"]["rate"] for run in paced)
            entry["rates"][str(rate)] = {
                "p50_ms": _median(run["wrk"]["p50_ms"] for run in paced),
                "p99_ms": _median(run["wrk"]["p99_ms"] for run in paced),
                "achieved": achieved,
                "held": achieved is not None and achieved >= HELD * rate,
            }
            if rate == cpu_rate and paced and paced[0].get("cpu_us_per_request"):
                roles = paced[0]["cpu_us_per_request"]
                entry["cpu_us"] = {role: _median(run["cpu_us_per_request"][role]
                                                 for run in paced) for role in roles}
                entry["cpu_us_total"] = _median(sum(run["cpu_us_per_request"].values())
                                                for run in paced)
        readings = memory.get(key)
        if readings:
            entry["memory"] = {
                "start_rss": {r: m.get("VmRSS") for r, m in readings.get("at_start", {}).items()},
                "peak_rss": {r: m.get("VmHWM") for r, m in readings["after_load"].items()},
                "idle_rss": {r: m.get("VmRSS") for r, m in readings.get("idle", {}).items()},
                "idle_connections": readings.get("idle_connections"),
            }
        summary[key] = entry
    return summary


# ---- the table


def _num(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "—"
    return f"{value / base:.2f}{TIMES}"


def _latency(cell: dict[str, Any] | None) -> str:
    if not cell or cell["p50_ms"] is None:
        return "—"
    text = f"{cell['p50_ms']:.2f} / {cell['p99_ms']:.2f}"
    return text if cell["held"] else f"{text} (only {cell['achieved']:,.0f}/s)"


def _cpu(entry: dict[str, Any]) -> str:
    roles = entry.get("cpu_us")
    if not roles:
        return "—"
    if len(roles) == 1:
        return _num(entry["cpu_us_total"])
    parts = " + ".join(f"{role} {value:,.0f}" for role, value in roles.items())
    return f"{entry['cpu_us_total']:,.0f} ({parts})"


def _rss(entry: dict[str, Any], which: str) -> str:
    values = entry.get("memory", {}).get(which) or {}
    if not values:
        return "—"
    if len(values) == 1:
        return _num(next(iter(values.values())))
    return " / ".join(f"{role} {value:.0f}" for role, value in values.items())


def table(summary: dict[str, dict[str, Any]], rates: tuple[int, ...], cpu_rate: int) -> str:
    """A Markdown table: medians, ratios of max req/s and CPU to the bare proxy and nginx."""
    bare, ngx = summary.get("bare", {}), summary.get("nginx", {})
    head = ["contender", "max req/s", f"{TIMES} bare", f"{TIMES} nginx",
            *(f"p50 / p99 ms at {rate:,}/s" for rate in rates),
            f"CPU µs/req at {cpu_rate:,}/s", f"CPU {TIMES} bare", "peak RSS MiB",
            "RSS MiB, 1k idle conns", "core 0 taken by others"]
    rows = [head, ["---"] * len(head)]
    for entry in summary.values():
        rows.append([
            entry["label"],
            _num(entry["max_rps"]),
            _ratio(entry["max_rps"], bare.get("max_rps")),
            _ratio(entry["max_rps"], ngx.get("max_rps")),
            *(_latency(entry["rates"].get(str(rate))) for rate in rates),
            _cpu(entry),
            _ratio(entry.get("cpu_us_total"), bare.get("cpu_us_total")),
            _rss(entry, "peak_rss"),
            _rss(entry, "idle_rss"),
            "—" if entry["core_taken_by_others"] is None
            else f"{entry['core_taken_by_others']:.0%}",
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    for row in rows:
        if row[0] == "---":
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        else:
            lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
                         + " |")
    others = _median(e["core_taken_by_others"] for e in summary.values()
                     if e.get("core_taken_by_others") is not None)
    errors = {key: e["errors"] for key, e in summary.items() if e["errors"]}
    notes = [
        "Medians over the rounds. Latency is wrk's, from each request's send; a fixed rate "
        f"that reached less than {HELD:.0%} of its target says what it reached.",
        "CPU is utime + stime of the proxy processes (every thread) over the fixed-rate run, "
        "divided by the requests answered; RSS is per process (A / B for the mesh).",
    ]
    if others is not None:
        notes.append(f"Other work on the machine took {others:.0%} of core 0, the contenders' "
                     "core, during the fixed-rate runs (median; /proc/stat less the bench's own "
                     "processes); the last column says it per contender.")
    if errors:
        notes.append("Requests that failed (non-2xx, timeouts, resets): "
                     + ", ".join(f"{key} {count}" for key, count in errors.items()))
    return "\n".join(lines) + "\n\n" + "\n".join(notes)


# ---- issue 10's targets


def targets(summary: dict[str, dict[str, Any]], cpu_rate: int) -> list[dict[str, Any]]:
    """Each target of issue 10 that this run's contenders can judge: met or not, by what."""
    found: list[dict[str, Any]] = []

    def add(name: str, needs: tuple[str, ...], value: Callable[[], float | None],
            limit: float, higher_is_better: bool, unit: str) -> None:
        if not all(key in summary for key in needs):
            return
        got = value()
        if got is None:
            return
        met = got >= limit if higher_is_better else got <= limit
        found.append({"target": name, "value": round(got, 3), "unit": unit,
                      "at_least" if higher_is_better else "at_most": limit, "met": met})

    def ratio(key: str) -> float | None:
        base = summary["bare"]["max_rps"]
        return summary[key]["max_rps"] / base if base else None

    def added(key: str, rate: int, figure: str) -> float | None:
        mine = summary[key]["rates"].get(str(rate), {}).get(figure)
        base = summary["direct"]["rates"].get(str(rate), {}).get(figure)
        return None if mine is None or base is None else mine - base

    def cpu_ratio() -> float | None:
        mine, base = summary["hop"].get("cpu_us_total"), summary["bare"].get("cpu_us_total")
        return mine / base if mine and base else None

    def sidecars(figure: str) -> float | None:
        values = [value for entry in summary.values()
                  if entry["label"].startswith(("sidecar", "mesh"))
                  for value in entry.get("memory", {}).get(figure, {}).values()
                  if value is not None]
        return max(values) if values else None

    add("one hop, max req/s vs bare proxy", ("hop", "bare"), lambda: ratio("hop"),
        1.0, True, TIMES)
    add(f"one hop, CPU per request vs bare proxy (at {cpu_rate}/s)", ("hop", "bare"),
        cpu_ratio, 1.0, False, TIMES)
    add("one hop at tracing 1.0, max req/s vs bare proxy", ("hop-t1", "bare"),
        lambda: ratio("hop-t1"), 0.7, True, TIMES)
    add("mesh, max req/s vs bare proxy", ("mesh", "bare"), lambda: ratio("mesh"),
        0.5, True, TIMES)
    add("mesh, rate reached at 2,000/s", ("mesh",),
        lambda: summary["mesh"]["rates"].get("2000", {}).get("achieved"), 2000 * HELD, True,
        "req/s")
    add(f"mesh, CPU per request of the busier sidecar (at {cpu_rate}/s)", ("mesh",),
        lambda: max((summary["mesh"].get("cpu_us") or {"-": None}).values(), default=None),
        150, False, "µs")
    for rate in (500, 1000):
        add(f"mesh, p50 added at {rate}/s", ("mesh", "direct"),
            lambda rate=rate: added("mesh", rate, "p50_ms"), 0.8, False, "ms")
        add(f"mesh, p99 added at {rate}/s", ("mesh", "direct"),
            lambda rate=rate: added("mesh", rate, "p99_ms"), 2.5, False, "ms")
    add("largest sidecar peak RSS under load", (), lambda: sidecars("peak_rss"), 50, False, "MiB")
    add("largest sidecar RSS with 1,000 idle connections", (), lambda: sidecars("idle_rss"),
        80, False, "MiB")
    return found


def format_targets(found: list[dict[str, Any]]) -> str:
    if not found:
        return "Targets: none of issue 10's can be judged from these contenders."
    lines = ["Targets (issue 10):"]
    for target in found:
        bound = (f"≥ {target['at_least']:g}" if "at_least" in target
                 else f"≤ {target['at_most']:g}")
        lines.append(f"  {'met   ' if target['met'] else 'MISSED'} {target['target']}: "
                     f"{target['value']:g} {target['unit']} (target {bound})")
    return "\n".join(lines)
