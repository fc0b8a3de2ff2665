"""Medians, markdown tables and JSON lines for ``python -m bench.clients``."""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from bench import machine

_PACKAGES = ("granian", "aiohttp", "httpx", "httpcore", "httpx-aiohttp", "uvloop", "sniffio")
_MACHINE = ("date", "nproc", "cpu_model", "kernel")
_MEDIANS = ("req_s", "p50_ms", "p99_ms", "cpu_us_per_req")


def environment() -> dict:
    """Date, machine and versions, stored with every JSON line."""
    return machine.environment(_PACKAGES)


def _key(row: dict) -> tuple[str, str, int]:
    return row["kind"], row["target"], row["concurrency"]


def _added_p50(raw: list[dict]) -> dict[tuple[str, str, int], list[float]]:
    """Per round: p50 of a target minus p50 of ``direct`` (same kind, concurrency, round)."""
    direct = {
        (r["kind"], r["concurrency"], r["round"]): r["p50_ms"]
        for r in raw
        if r["target"] == "direct"
    }
    added: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for r in raw:
        base = direct.get((r["kind"], r["concurrency"], r["round"]))
        if r["target"] != "direct" and base is not None:
            added[_key(r)].append(r["p50_ms"] - base)
    return added


def aggregate(raw: list[dict]) -> list[dict]:
    """One row per (kind, target, concurrency): medians over rounds, plus the raw rounds."""
    groups: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
    for r in raw:
        groups[_key(r)].append(r)
    added = _added_p50(raw)
    rows = []
    for key, runs in groups.items():
        row: dict = dict(zip(("kind", "target", "concurrency"), key, strict=True))
        for field in _MEDIANS:
            values = [r[field] for r in runs if r.get(field) is not None]
            row[field] = round(statistics.median(values), 4) if values else None
        if key in added:
            row["added_p50_ms"] = round(statistics.median(added[key]), 4)
        row["errors"] = sum(
            r.get("errors", 0) + r.get("non2xx", 0) + r.get("socket_errors", 0) for r in runs
        )
        row["other_load_max"] = max(r.get("other_load", 0.0) for r in runs)
        row["rounds"] = runs
        rows.append(row)
    return rows


def _fmt(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _loops_table(rows: list[dict]) -> list[str]:
    loops = [r for r in rows if r["kind"] == "client_alone"]
    if not loops:
        return []
    levels = sorted({r["concurrency"] for r in loops})
    by = {(r["target"], r["concurrency"]): r for r in loops}
    lines = [
        "| client | "
        + " | ".join(f"req/s @ {n} in flight" for n in levels)
        + f" | CPU µs/req @ {levels[-1]} | other load |",
        "|---" * (len(levels) + 3) + "|",
    ]
    for client in dict.fromkeys(r["target"] for r in loops):
        cells = [_fmt(by[client, n]["req_s"], 0) for n in levels if (client, n) in by]
        cpu = by.get((client, levels[-1]), {}).get("cpu_us_per_req")
        other = max(r["other_load_max"] for r in loops if r["target"] == client)
        lines.append(
            f"| {client} | " + " | ".join(cells) + f" | {_fmt(cpu, 0)} | {_fmt(other, 2)} |"
        )
    return lines


def _wrk_table(rows: list[dict], kind: str) -> list[str]:
    runs = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["concurrency"])
    if not runs:
        return []
    lines = [
        "| target | c | req/s | p50 ms | p99 ms | added p50 ms | server CPU µs/req | errors "
        "| other load |",
        "|---" * 9 + "|",
    ]
    for r in runs:
        lines.append(
            f"| {r['target']} | {r['concurrency']} | {_fmt(r['req_s'], 0)} | "
            f"{_fmt(r['p50_ms'], 3)} | {_fmt(r['p99_ms'], 3)} | "
            f"{_fmt(r.get('added_p50_ms'), 3)} | {_fmt(r['cpu_us_per_req'], 0)} | "
            f"{r['errors']} | {_fmt(r['other_load_max'], 2)} |"
        )
    return lines


def render(rows: list[dict], env: dict, args: argparse.Namespace) -> str:
    """Markdown: environment line and the three tables (those that were run)."""
    versions = ", ".join(f"{k} {v}" for k, v in env.items() if k not in _MACHINE)
    out = [
        f"{env['date']} · nproc {env['nproc']} · {env['cpu_model']} · {versions}",
        f"rounds {args.rounds} (medians) · wrk {args.duration:g} s pass-through, "
        f"{args.sse_duration:g} s SSE, warm-up {args.warmup:g} s · "
        f"client-alone {args.loop_duration:g} s",
    ]
    sections = (
        ("Client alone (client on core 1, nginx on core 0)", _loops_table(rows)),
        (
            "Pass-through, POST /v1/chat/completions (Granian on core 1; nginx + wrk on core 0)",
            _wrk_table(rows, "pass_through"),
        ),
        (
            "SSE pass-through with aiohttp, /v1/sse (54 events + [DONE], sent at once)",
            _wrk_table(rows, "sse"),
        ),
    )
    out.append(
        "other load: most CPU (cores) used by processes outside the bench during a run "
        f"(runs above {args.max_other_load:g} were retried up to {args.retries}x)"
    )
    for title, table in sections:
        if table:
            out += ["", f"### {title}", "", *table]
    return "\n".join(out)


def append_jsonl(rows: list[dict], env: dict, args: argparse.Namespace, path: Path) -> None:
    """Append one JSON object per row, each carrying the environment and settings."""
    settings = {
        "rounds": args.rounds,
        "duration_s": args.duration,
        "sse_duration_s": args.sse_duration,
        "loop_duration_s": args.loop_duration,
        "warmup_s": args.warmup,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        for row in rows:
            out.write(json.dumps({"bench": "clients", **env, **settings, **row}) + "\n")
