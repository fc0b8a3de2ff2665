"""One measurement, guarded against other work on the machine, and the arithmetic on rounds.

Each measurement first waits for the machine to be quiet, then records "other load" (CPU
used by processes outside the bench, in cores) while it runs; a disturbed one is repeated
and the least disturbed attempt is kept (bench/quiet.py).
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

from bench import procs, quiet

Row = dict[str, Any]


class Guard:
    """Runs measurements after waiting for quiet; repeats disturbed ones."""

    def __init__(self, max_other_load: float, retries: int, wait_budget_s: float):
        self.max_other_load = max_other_load
        self.retries = retries
        self.quiet = quiet.Quiet(max_other_load, wait_budget_s)

    def run(self, once: Callable[[], Row], pgids: Sequence[int]) -> Row:
        best: Row | None = None
        for attempt in range(1, self.retries + 2):
            self.quiet.wait(pgids)
            meter = quiet.Meter(pgids)
            meter.start()
            result = once()
            result.update(other_load=round(meter.stop(), 3), attempts=attempt)
            if best is None or result["other_load"] < best["other_load"]:
                best = result
            if result["other_load"] <= self.max_other_load:
                break
            print(f"  other load {result['other_load']:.2f} cores: again", file=sys.stderr)
        assert best is not None
        return best


def with_cpu(pgid: int, requests_of: Callable[[Row], int], once: Callable[[], Row]) -> Row:
    """Run `once` and add the CPU microseconds and the context switches (all threads) per
    request that process group `pgid` used."""
    cpu0, switches0 = procs.group_cpu_seconds(pgid), procs.group_context_switches(pgid)
    row = once()
    cpu = procs.group_cpu_seconds(pgid) - cpu0
    switches = procs.group_context_switches(pgid) - switches0
    count = requests_of(row)
    row["server_cpu_us_per_req"] = round(cpu / count * 1e6, 1) if count else None
    row["server_switches_per_req"] = round(switches / count, 2) if count else None
    return row


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 4) if present else None


def merge_rounds(rounds: list[Row], fields: Sequence[str]) -> Row:
    """One row from several rounds of the same measurement: medians of `fields`, the first
    round's other keys, and every round kept under "rounds"."""
    merged = {k: v for k, v in rounds[0].items() if k not in fields and k != "round"}
    for name in fields:
        merged[name] = median([r.get(name) for r in rounds])
    merged["other_load"] = max(r.get("other_load", 0.0) for r in rounds)
    merged["rounds"] = [{k: r.get(k) for k in (*fields, "other_load")} for r in rounds]
    return merged


def added(gateway: list[Row], direct: list[Row], field: str) -> float | None:
    """Median over rounds of (gateway - direct) for `field`, pairing rounds by index."""
    diffs = [
        g[field] - d[field]
        for g, d in zip(gateway, direct, strict=False)
        if g.get(field) is not None and d.get(field) is not None
    ]
    return median(diffs)
