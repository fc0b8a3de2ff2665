"""`python -m bench plot [FILE.jsonl[:RUN]]`: the PNGs next to bench/RESULTS.md.

- `latency-cdf.png`: the latency distribution at concurrency 1, direct to nginx vs through
  the gateway (the `latency` scenario's wrk percentiles, first round);
- `throughput.png`: req/s and p99 by concurrency, direct vs gateway (the `sweep` scenario).
Each comes from the newest run in the file that measured its scenario, or from `:RUN`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.compare import load_run
from bench.run import DEFAULT_OUT

OUT_DIR = Path(__file__).resolve().parent


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def latency_cdf(rows: list[dict[str, Any]], path: Path) -> bool:
    curves = [r for r in rows if r["scenario"] == "latency" and r.get("cdf_ms")]
    if not curves:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in curves:
        pct = [p for p, _ in r["cdf_ms"]]
        ms = [v for _, v in r["cdf_ms"]]
        ax.plot(ms, pct, marker=".", label=f"{r['target']} (p50 {r['p50_ms']:.3f} ms)")
    ax.set_xscale("log")
    ax.set_xlabel("latency, ms (log)")
    ax.set_ylabel("percentile")
    ax.set_title("Non-streamed chat at concurrency 1: direct to nginx vs through Tollway")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def throughput(rows: list[dict[str, Any]], path: Path) -> bool:
    sweep = [r for r in rows if r["scenario"] == "sweep"]
    if not sweep:
        return False
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for target in dict.fromkeys(r["target"] for r in sweep):
        points = sorted((r["concurrency"], r) for r in sweep if r["target"] == target)
        conc = [c for c, _ in points]
        top.plot(conc, [r["req_s"] for _, r in points], marker="o", label=target)
        bottom.plot(conc, [r["p99_ms"] for _, r in points], marker="o", label=target)
    top.set_ylabel("req/s")
    top.set_yscale("log")
    top.set_title("Throughput and p99 by concurrency (one gateway worker, one core)")
    bottom.set_ylabel("p99, ms")
    bottom.set_yscale("log")
    bottom.set_xscale("log", base=2)
    bottom.set_xlabel("concurrent connections (wrk)")
    for ax in (top, bottom):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench plot", description=__doc__)
    p.add_argument("source", nargs="?", default=str(DEFAULT_OUT), help="FILE.jsonl[:RUN]")
    p.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = p.parse_args(argv)
    if Path(args.source).exists():  # no :RUN given: the newest run with each scenario
        lines = Path(args.source).read_text().splitlines()
        every = [json.loads(line) for line in lines if line.strip()]
    else:
        every = load_run(args.source)[1]
    made = []
    for name, scenario, draw in (
        ("latency-cdf.png", "latency", latency_cdf),
        ("throughput.png", "sweep", throughput),
    ):
        runs = [r["run"] for r in every if r["scenario"] == scenario]
        if runs and draw([r for r in every if r["run"] == runs[-1]], args.out_dir / name):
            made.append(f"{name} (run {runs[-1]})")
    print(f"wrote {', '.join(made) or 'nothing (no latency/sweep rows)'} in {args.out_dir}")
    return 0 if made else 1
