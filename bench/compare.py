"""`python -m bench compare A.jsonl B.jsonl`: the deltas between two runs, row by row.

Each file may hold many runs (the harness appends); the newest run in each is compared unless
a run id is given as `FILE:RUN`. Rows pair by their `key` (scenario/target/parameter); only
the figures both rows carry are printed, with the change B - A and the ratio B / A.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# The figures worth a delta, in print order; anything else in a row is context.
FIELDS = (
    "req_s", "p50_ms", "p99_ms", "p999_ms", "added_p50_ms", "added_p99_ms",
    "server_cpu_us_per_req", "ttft_p50_ms", "ttft_p99_ms", "gap_p99_ms", "max_stall_ms",
    "added_ttft_p99_ms", "added_gap_p99_ms", "events_per_s", "idle_rss_mib", "end_rss_mib",
    "growth_mib_per_100k", "scaling", "errors",
)  # fmt: skip


def load_run(spec: str) -> tuple[str, list[dict[str, Any]]]:
    """The rows of one run from `FILE` (its newest run) or `FILE:RUN`."""
    path, _, run = spec.rpartition(":") if not Path(spec).exists() else (spec, "", "")
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"{path}: no rows")
    run = run or rows[-1]["run"]
    chosen = [r for r in rows if r.get("run") == run]
    if not chosen:
        raise SystemExit(f"{path}: no run {run!r}")
    return run, chosen


def deltas(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[tuple[str, str, Any, Any]]:
    """(key, field, a, b) for every figure both runs measured, in B's row order."""
    by_key = {r["key"]: r for r in a}
    out = []
    for rb in b:
        ra = by_key.get(rb["key"])
        if ra is None:
            continue
        for field in FIELDS:
            va, vb = ra.get(field), rb.get(field)
            if isinstance(va, int | float) and isinstance(vb, int | float):
                out.append((rb["key"], field, va, vb))
    return out


def _num(value: float) -> str:
    return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3f}"


def render(run_a: str, run_b: str, rows: list[tuple[str, str, Any, Any]]) -> str:
    out = [f"A = run {run_a}, B = run {run_b}", "",
           "| row | figure | A | B | B - A | B / A |", "|---|---|---|---|---|---|"]  # fmt: skip
    for key, field, va, vb in rows:
        ratio = f"{vb / va:.2f}x" if va else "—"
        out.append(f"| {key} | {field} | {_num(va)} | {_num(vb)} | {vb - va:+.3f} | {ratio} |")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench compare", description=__doc__)
    p.add_argument("a", help="baseline: FILE.jsonl or FILE.jsonl:RUN")
    p.add_argument("b", help="candidate: FILE.jsonl or FILE.jsonl:RUN")
    args = p.parse_args(argv)
    run_a, rows_a = load_run(args.a)
    run_b, rows_b = load_run(args.b)
    rows = deltas(rows_a, rows_b)
    if not rows:
        print("no rows in common (different scenarios?)", file=sys.stderr)
        return 1
    print(render(run_a, run_b, rows))
    return 0
