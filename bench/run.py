"""`python -m bench run`: start the processes, run the scenarios, print tables, keep JSON lines.

The harness itself runs on the load core; the gateway alone on the other (bench/stack.py).
Every row is appended to `--out` (default bench/results/gateway.jsonl) with the run's id,
machine and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from bench import loadgen, stack
from bench.machine import environment
from bench.measure import Guard, Row
from bench.scenarios import SCENARIOS, Ctx

DEFAULT_OUT = stack.REPO / "bench/results/gateway.jsonl"
DEFAULT = ("latency", "throughput", "streaming", "max_streams", "soak", "policy", "rate", "sweep")

# The bar of issue 3: (row key, field, comparison, target, what it is).
BAR: tuple[tuple[str, str, str, float, str], ...] = (
    ("latency/gateway:auth/c1", "added_p50_ms", "<=", 0.30, "added p50 at c=1, ms"),
    ("latency/gateway:auth/c1", "added_p99_ms", "<=", 0.90, "added p99 at c=1, ms"),
    ("throughput/gateway:auth/c64", "req_s", ">=", 8000, "req/s at c=64, auth"),
    ("streaming/gateway:auth", "added_ttft_p99_ms", "<=", 1.0, "added TTFT p99, ms"),
    ("streaming/gateway:auth", "added_gap_p99_ms", "<=", 0.2, "added inter-chunk gap p99, ms"),
    ("max_streams", "carried", ">=", 2000, "paced streams, no stall > 50 ms"),
    ("soak/gateway:auth", "idle_rss_mib", "<=", 80, "idle RSS (worker), MiB"),
    ("soak/gateway:auth", "growth_mib_per_100k", "<", 1.0, "RSS growth per 100k req, MiB"),
    ("workers/w2", "scaling", ">=", 1.8, "--workers 2 scaling"),
)


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench run", description=__doc__)
    p.add_argument("--scenarios", default=",".join(DEFAULT), help=f"of {','.join(SCENARIOS)}")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (medians)")
    p.add_argument("--duration", type=int, default=10, help="s per measured wrk/hey run")
    p.add_argument("--warmup", type=int, default=2, help="s of wrk warm-up before each run")
    p.add_argument("--rates", type=lambda s: [int(x) for x in s.split(",")], default=[1000, 4000])
    p.add_argument("--streams-light", type=int, default=20, help="streams for added TTFT/gap")
    p.add_argument(
        "--stream-levels", type=lambda s: [int(x) for x in s.split(",")],
        default=[250, 500, 750, 1000, 1500, 2000],
    )  # fmt: skip
    p.add_argument("--floor-streams", type=int, default=500, help="paced streams in floor")
    p.add_argument("--stream-duration", type=float, default=10.0)
    p.add_argument("--stream-warmup", type=float, default=3.0)
    p.add_argument("--stream-ramp", type=float, default=2.0)
    p.add_argument("--soak", type=int, default=1_000_000, help="requests in the memory soak")
    p.add_argument("--soak-step", type=int, default=100_000, help="requests between samples")
    p.add_argument("--soak-rate-guess", type=int, default=8000, help="req/s, sizes the steps")
    p.add_argument("--max-other-load", type=float, default=0.15, help="cores: repeat above")
    p.add_argument("--retries", type=int, default=2)
    p.add_argument("--wait-budget", type=float, default=600, help="s waiting for quiet, total")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 round, short runs")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 2, 1
        args.rates, args.stream_levels, args.floor_streams = [1000], [100, 200], 100
        args.stream_duration, args.stream_warmup, args.stream_ramp = 3.0, 1.0, 0.5
        args.soak, args.soak_step, args.wait_budget = 40_000, 20_000, 30
    return args


def main(argv: list[str]) -> int:
    args = _args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.sched_setaffinity(0, {int(stack.LOAD_CPU)})  # the harness stays off the gateway's core
    env = environment()
    run_id = uuid.uuid4().hex[:12]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="tollway-bench-") as name:
        tmp = Path(name)
        auth = loadgen.write_wrk_script(
            tmp / "auth.lua", "POST", stack.CHAT_BODY, stack.AUTH_HEADERS
        )
        open_ = loadgen.write_wrk_script(
            tmp / "open.lua", "POST", stack.CHAT_BODY, stack.JSON_HEADERS
        )
        guard = Guard(args.max_other_load, args.retries, args.wait_budget)
        with stack.nginx_backend(tmp) as nginx:
            ctx = Ctx(args, tmp, nginx, guard, auth, open_)
            for name in args.scenarios:
                ctx.log(f"== {name}")
                rows += SCENARIOS[name](ctx)
    options = {k: v for k, v in vars(args).items() if k not in ("out",)}
    for row in rows:
        row.update(run=run_id, env=env, options=options)
    print(render(rows, env))
    if not args.no_save:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as out:
            for row in rows:
                out.write(json.dumps(row, default=str) + "\n")
        print(f"\nrun {run_id}: appended {len(rows)} rows to {args.out}", file=sys.stderr)
    return 0


_COLUMNS: dict[str, tuple[str, ...]] = {
    "floor": ("concurrency", "streams", "req_s", "p50_ms", "p99_ms", "added_p50_ms",
              "server_cpu_us_per_req", "server_switches_per_req", "gap_p99_ms",
              "max_stall_ms", "server_cores", "server_cpu_us_per_event"),
    "wrk": ("concurrency", "req_s", "p50_ms", "p99_ms", "p999_ms", "added_p50_ms",
            "added_p99_ms", "server_cpu_us_per_req", "server_switches_per_req", "errors"),
    "rate": ("offered_req_s", "req_s", "p50_ms", "p99_ms", "p999_ms", "added_p50_ms",
             "added_p99_ms", "errors"),
    "streaming": ("streams", "ttft_p50_ms", "ttft_p99_ms", "gap_p50_ms", "gap_p99_ms",
                  "max_stall_ms", "added_ttft_p50_ms", "added_ttft_p99_ms", "added_gap_p99_ms",
                  "errors"),
    "max_streams": ("streams", "completed", "events_per_s", "ttft_p99_ms", "gap_p99_ms",
                    "max_stall_ms", "server_cores", "server_cpu_us_per_event", "errors",
                    "saturated", "no_stall"),
    "soak": ("requests", "idle_rss_mib", "supervisor_rss_mib", "end_rss_mib",
             "growth_mib_per_100k"),
    "workers": ("workers", "req_s", "p50_ms", "p99_ms", "scaling"),
}  # fmt: skip


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3f}"
    return str(value)


def render(rows: list[Row], env: dict[str, Any]) -> str:
    """Markdown: the machine, one table per scenario, then the bar."""
    versions = ", ".join(f"{k} {v}" for k, v in env.items() if k not in ("date", "cpu_model"))
    out = [f"Run {env['date']} on {env['cpu_model']} ({versions})", ""]
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        kind = scenario if scenario in _COLUMNS else "wrk"
        cols = _COLUMNS[kind]
        out += [f"### {scenario}", "", "| target | " + " | ".join(cols) + " |"]
        out.append("|---" * (len(cols) + 1) + "|")
        for r in rows:
            if r["scenario"] == scenario:
                cells = " | ".join(_cell(r.get(c)) for c in cols)
                out.append(f"| {r['target']} | {cells} |")
        out.append("")
    out += ["### the bar (issue 3)", "", "| target | measured | bar | |", "|---|---|---|---|"]
    for label, value, op, target, verdict in bar(rows):
        out.append(f"| {label} | {_cell(value)} | {op} {target:g} | {verdict} |")
    return "\n".join(out)


def bar(rows: list[Row]) -> list[tuple[str, Any, str, float, str]]:
    """Each bar target with the measured value and met / missed by how much / not measured."""
    by_key = {r["key"]: r for r in rows}
    carried = 0  # the highest level with every level up to it stall-free
    for r in sorted((r for r in rows if r["scenario"] == "max_streams"
                     and r["target"] != "direct"), key=lambda r: r["streams"]):  # fmt: skip
        if not r["no_stall"]:
            break
        carried = r["streams"]
    out = []
    for key, field, op, target, label in BAR:
        if key == "max_streams":
            measured = any(r["scenario"] == "max_streams" for r in rows)
            value: Any = carried if measured else None
        else:
            row = next((r for k, r in by_key.items() if k.startswith(key)), None)
            value = row.get(field) if row else None
        if value is None:
            verdict = "not measured in this run"
        elif (
            (op == "<=" and value <= target)
            or (op == "<" and value < target)
            or (op == ">=" and value >= target)
        ):
            verdict = "met"
        else:
            verdict = f"missed by {abs(value - target):.3g} ({value / target:.2f}x the bar)"
        out.append((label, value, op, target, verdict))
    return out
