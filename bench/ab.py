"""A/B checkouts: the same closed-loop load on gateways built from different commits.

    python -m bench.ab HEAD~3:auth .:auth-notelemetry .:auth [--rounds 6] [--duration 5]

Each argument is `REV:PROFILE` (`.` is the working tree; a profile of bench/stack.py as the
working tree defines it). A REV other than `.` is checked out into a temporary git worktree.
nginx serves the fixed chat reply on the load core (bench/otlpsink.py takes the OTLP
profiles' export there, and a valkey-server keeps the Redis-store profiles' counters); every
variant's gateway runs on the gateway core in turn, the order reversed every other round;
wrk at concurrency 1 and 64.
Prints each run and the medians: req/s, the gateway's CPU per request, p50 and p99.

    python -m bench.ab .:auth .:limit-memory --slices 20 [--duration 3]

With `--slices N` every variant's gateway is started once and they all stay up (pinned to the
gateway core, the idle ones asleep); each slice measures every variant in turn, the order
reversed every other slice. This machine's speed drifts by up to 2x within a minute (other
tenants of the host), which round medians minutes apart cannot cancel; a slice's variants run
seconds apart, so each figure is also printed against the first variant, as the median over
slices of the per-slice ratio (req/s at c=64, CPU per request) or difference (p50 at c=1),
with its interquartile range.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bench import loadgen, procs, stack


@contextlib.contextmanager
def checkout(rev: str) -> Iterator[Path]:
    """The repository at `rev`: the working tree for `.`, else a temporary worktree."""
    if rev == ".":
        yield stack.REPO
        return
    path = Path(tempfile.mkdtemp(prefix="tollway-ab-"))
    git = ["git", "-C", str(stack.REPO)]
    subprocess.run([*git, "worktree", "add", "--detach", str(path), rev], check=True,
                   capture_output=True)  # fmt: skip
    try:
        yield path
    finally:
        subprocess.run([*git, "worktree", "remove", "--force", str(path)], check=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    p.add_argument("variants", nargs="+", help="REV:PROFILE")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--duration", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--slices", type=int, default=0,
                   help="gateways up together, measured in N interleaved slices")  # fmt: skip
    args = p.parse_args(argv)
    variants = [tuple(v.rsplit(":", 1)) for v in args.variants]
    results: dict[tuple[str, int], list[tuple[float, float, float, float]]] = {}
    with contextlib.ExitStack() as stack_, tempfile.TemporaryDirectory() as t:
        repos = {rev: stack_.enter_context(checkout(rev)) for rev, _ in variants}
        tmp = Path(t)
        script = loadgen.write_wrk_script(tmp / "a.lua", "POST", stack.CHAT_BODY,
                                          stack.AUTH_HEADERS)  # fmt: skip
        with contextlib.ExitStack() as services:
            nginx = services.enter_context(stack.nginx_backend(tmp))
            sink = services.enter_context(stack.otlp_sink(tmp))
            store = "memory"  # a Redis only when a profile keeps its counters there
            if any(profile in stack.NEEDS_REDIS for _, profile in variants):
                store = services.enter_context(stack.redis_server(tmp)).url
            if args.slices:
                _slices(variants, repos, tmp, nginx.url, store, sink.url, script, args)
                return 0
            for rnd in range(args.rounds):
                for rev, profile in variants if rnd % 2 == 0 else variants[::-1]:
                    with contextlib.ExitStack() as one:
                        gw = _start(one, repos[rev], tmp, profile, nginx.url, store, sink.url)
                        _measure(f"{rev}:{profile}", gw, script, args, results)
    for (name, c), rows in results.items():
        print(_median_line(name, c, rows))
    return 0


def _start(
    into: contextlib.ExitStack,
    repo: Path,
    tmp: Path,
    profile: str,
    upstream: str,
    store: str,
    otlp: str,
) -> stack.Service:
    """`profile`'s gateway built from `repo`, stopped when `into` closes. The gateway child
    imports from its cwd and PYTHONPATH, so both are the checkout's while it starts."""
    home = stack.REPO
    stack.REPO = repo
    os.chdir(repo)
    try:
        return into.enter_context(stack.gateway(tmp, profile, upstream, store=store, otlp=otlp))
    finally:
        stack.REPO = home
        os.chdir(home)


def _median_line(name: str, c: int, rows: list[tuple[float, float, float, float]]) -> str:
    med = [statistics.median(r[i] for r in rows) for i in range(4)]
    return (f"MEDIAN {name:32} c={c:<3} {med[0]:9.0f} req/s {med[1]:6.1f} us/req "
            f"p50 {med[2]:.3f} ms p99 {med[3]:.3f} ms")  # fmt: skip


def _slices(
    variants: list[tuple[str, ...]],
    repos: dict[str, Path],
    tmp: Path,
    upstream: str,
    store: str,
    otlp: str,
    script: Path,
    args: argparse.Namespace,
) -> None:
    """Every variant's gateway up at once, measured slice by slice (see the docstring)."""
    names = [f"{rev}:{profile}" for rev, profile in variants]
    results: dict[tuple[str, int], list[tuple[float, float, float, float]]] = {}
    with contextlib.ExitStack() as gateways:
        running = {
            name: _start(gateways, repos[rev], tmp, profile, upstream, store, otlp)
            for name, (rev, profile) in zip(names, variants, strict=True)
        }
        for name in names:  # warm every one before the first slice
            loadgen.wrk(running[name].url + "/chat/completions", 64, args.warmup, script,
                        stack.LOAD_CPU)  # fmt: skip
        warm = argparse.Namespace(**{**vars(args), "warmup": 1})
        for i in range(args.slices):
            for name in names if i % 2 == 0 else names[::-1]:
                _measure(name, running[name], script, warm, results)
    base = names[0]
    for name in names:
        for c in (1, 64):
            rows = results[(name, c)]
            line = _median_line(name, c, rows)
            if name != base:
                pairs = list(zip(results[(base, c)], rows, strict=True))
                if c == 64:
                    rate = _spread([b[0] and r[0] / b[0] - 1 for b, r in pairs], 100)
                    cpu = _spread([b[1] and r[1] / b[1] - 1 for b, r in pairs], 100)
                    line += f" | vs {base}: req/s {rate} %, CPU/req {cpu} %"
                else:
                    line += f" | vs {base}: p50 {_spread([r[2] - b[2] for b, r in pairs], 1)} ms"
            print(line)


def _spread(values: list[float], scale: float) -> str:
    """The median and interquartile range of `values` times `scale`, signed (a percentage to
    one decimal, milliseconds to three)."""
    q1, q2, q3 = statistics.quantiles([v * scale for v in values], n=4, method="inclusive")
    f = ".3f" if scale == 1 else ".1f"
    return f"{q2:+{f}} [{q1:+{f}}, {q3:+{f}}]"


def _measure(
    name: str,
    gw: stack.Service,
    script: Path,
    args: argparse.Namespace,
    results: dict[tuple[str, int], list[tuple[float, float, float, float]]],
) -> None:
    url = gw.url + "/chat/completions"
    for c in (1, 64):
        loadgen.wrk(url, c, args.warmup, script, stack.LOAD_CPU)
        cpu = procs.group_cpu_seconds(gw.pgid)
        row = loadgen.wrk(url, c, args.duration, script, stack.LOAD_CPU)
        us = (procs.group_cpu_seconds(gw.pgid) - cpu) / float(row["requests"]) * 1e6
        p50, p99 = float(row["p50_ms"]), float(row["p99_ms"])
        results.setdefault((name, c), []).append((float(row["req_s"]), us, p50, p99))
        print(f"{name:32} c={c:<3} {row['req_s']:9.0f} req/s {us:6.1f} us/req "
              f"p50 {p50:.3f} ms p99 {p99:.3f} ms", flush=True)  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
