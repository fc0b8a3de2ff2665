"""Orchestration of ``python -m bench.clients`` (see :mod:`bench.clients` for the method)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench import nginx, procs
from bench.clients import report, wrk
from bench.clients.app import SSE_MODES
from bench.clients.upstream import CLIENTS, CONTENT_TYPE, REQUEST_BODY
from bench.measure import Guard

REPO = Path(__file__).resolve().parents[2]
LOAD_CPU, SERVER_CPU = "0", "1"  # nginx + wrk on core 0; gateway / client loop on core 1
WRK_CONCURRENCY = (1, 64)
LOOP_CONCURRENCY = (1, 8, 64)


@dataclass(frozen=True)
class Target:
    """What wrk loads: nginx directly (``client`` None) or the pass-through app."""

    name: str
    client: str | None = None
    sse_mode: str = "iter_any"


@dataclass
class Ctx:
    """Run-wide settings and resources."""

    args: argparse.Namespace
    tmp: Path
    nginx_url: str
    nginx_pgid: int
    script: Path
    guard: Guard


def _granian_cmd(port: int) -> list[str]:
    opts = "--interface asgi --loop uvloop --workers 1 --log-level warning --no-access-log"
    opts += f" --host 127.0.0.1 --port {port} bench.clients.app:app"
    return [sys.executable, "-m", "granian", *opts.split()]


@contextlib.contextmanager
def _serve(target: Target, ctx: Ctx, path: str, expected: bytes) -> Iterator[tuple[str, int]]:
    """Yield (url, pgid of the process whose CPU is charged) for ``target``."""
    if target.client is None:
        yield ctx.nginx_url + path, ctx.nginx_pgid
        return
    port = procs.free_port()
    env = dict(
        os.environ,
        BENCH_CLIENT=target.client,
        BENCH_UPSTREAM=ctx.nginx_url,
        BENCH_SSE_MODE=target.sse_mode,
        PYTHONPATH=str(REPO),
    )
    log = ctx.tmp / f"granian-{target.name.replace('/', '-')}.log"
    url = f"http://127.0.0.1:{port}{path}"
    with procs.running(_granian_cmd(port), SERVER_CPU, log, env) as proc:
        body = procs.wait_ready(proc, url, REQUEST_BODY, CONTENT_TYPE, log)
        if body != expected:
            raise RuntimeError(f"{target.name}: pass-through body differs from upstream")
        yield url, proc.pid


def _measure(url: str, concurrency: int, seconds: int, pgid: int, ctx: Ctx) -> dict:
    """Warm up, then one wrk run; add the server's CPU microseconds per request."""

    def once() -> dict:
        if ctx.args.warmup > 0:
            wrk.run(url, concurrency, ctx.args.warmup, ctx.script, LOAD_CPU)
        cpu0 = procs.group_cpu_seconds(pgid)
        result: dict = dict(wrk.run(url, concurrency, seconds, ctx.script, LOAD_CPU))
        cpu = procs.group_cpu_seconds(pgid) - cpu0
        result["cpu_us_per_req"] = round(cpu / result["requests"] * 1e6, 1)
        return result

    return ctx.guard.run(once, (ctx.nginx_pgid, pgid))


def _wrk_rounds(
    kind: str, targets: list[Target], path: str, expected: bytes, seconds: int, ctx: Ctx
) -> list[dict]:
    """Interleaved rounds: every target at every concurrency, order reversed each round."""
    raw = []
    for rnd in range(ctx.args.rounds):
        for target in targets if rnd % 2 == 0 else targets[::-1]:
            with _serve(target, ctx, path, expected) as (url, pgid):
                for concurrency in WRK_CONCURRENCY:
                    result = _measure(url, concurrency, seconds, pgid, ctx)
                    raw.append(
                        {
                            "kind": kind,
                            "target": target.name,
                            "concurrency": concurrency,
                            "round": rnd,
                            **result,
                        }
                    )
                    print(
                        f"  {kind:12} r{rnd} {target.name:20} c={concurrency:<3} "
                        f"{result['req_s']:>9.1f} req/s  p50 {result['p50_ms']:.3f} ms",
                        file=sys.stderr,
                        flush=True,
                    )
    return raw


def _loop_once(client: str, concurrency: int, ctx: Ctx) -> dict:
    opts = f"--client {client} --concurrency {concurrency} --warmup 1"
    opts += f" --duration {ctx.args.loop_duration:g} --url {ctx.nginx_url}{nginx.CHAT_PATH}"
    cmd = ["taskset", "-c", SERVER_CPU, sys.executable, "-m", "bench.clients.loop", *opts.split()]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=ctx.args.loop_duration + 30,
    )
    return dict(json.loads(done.stdout))


def _loop_rounds(ctx: Ctx) -> list[dict]:
    """Client-alone loops, every client at every concurrency, interleaved rounds."""
    raw = []
    for rnd in range(ctx.args.rounds):
        for client in CLIENTS if rnd % 2 == 0 else CLIENTS[::-1]:
            for concurrency in LOOP_CONCURRENCY:
                result = ctx.guard.run(
                    lambda c=client, n=concurrency: _loop_once(c, n, ctx), (ctx.nginx_pgid,)
                )
                raw.append({"kind": "client_alone", "target": client, "round": rnd, **result})
                print(
                    f"  client_alone r{rnd} {client:20} N={concurrency:<3} "
                    f"{result['req_s']:>9.1f} req/s",
                    file=sys.stderr,
                    flush=True,
                )
    return raw


def _pass_through(ctx: Ctx) -> list[dict]:
    targets = [Target("direct")] + [Target(c, c) for c in CLIENTS]
    return _wrk_rounds(
        "pass_through",
        targets,
        nginx.CHAT_PATH,
        nginx.chat_completion_body(),
        ctx.args.duration,
        ctx,
    )


def _sse(ctx: Ctx) -> list[dict]:
    targets = [Target("direct")] + [Target(f"aiohttp/{m}", "aiohttp", m) for m in SSE_MODES]
    return _wrk_rounds("sse", targets, nginx.SSE_PATH, nginx.sse_body(), ctx.args.sse_duration, ctx)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.clients", description="Compare upstream HTTP clients."
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=int, default=10, help="wrk s, pass-through")
    parser.add_argument("--sse-duration", type=int, default=5, help="wrk s, SSE modes")
    parser.add_argument("--loop-duration", type=float, default=5.0, help="client-alone s")
    parser.add_argument("--warmup", type=int, default=2, help="wrk warm-up s per run (0: none)")
    parser.add_argument(
        "--only", nargs="+", choices=("loops", "pass", "sse"), default=["loops", "pass", "sse"]
    )
    parser.add_argument(
        "--max-other-load", type=float, default=0.15, help="cores used by others: retry above"
    )
    parser.add_argument("--retries", type=int, default=2, help="retries of a disturbed run")
    parser.add_argument("--wait-budget", type=float, default=600, help="s, waiting for quiet")
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s (smoke test)")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/clients.jsonl")
    parser.add_argument("--no-save", action="store_true", help="do not append JSON lines")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup = 1, 1
        args.duration = args.sse_duration = args.loop_duration = 2
    return args


def _collect(ctx: Ctx) -> list[dict]:
    raw: list[dict] = []
    if "loops" in ctx.args.only:
        raw += _loop_rounds(ctx)
    if "pass" in ctx.args.only:
        raw += _pass_through(ctx)
    if "sse" in ctx.args.only:
        raw += _sse(ctx)
    return raw


def main(argv: list[str] | None = None) -> None:
    """Run the comparison, print the tables, append the JSON lines."""
    args = _parse_args(argv)
    # SIGTERM -> SystemExit, so the finally blocks stop nginx and Granian.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    env = report.environment()
    with tempfile.TemporaryDirectory(prefix="tollway-bench-clients-") as tmp_name:
        tmp = Path(tmp_name)
        port = procs.free_port()
        cmd = nginx.prepare(tmp / "nginx", port)
        url = f"http://127.0.0.1:{port}"
        log = tmp / "nginx.log"
        with procs.running(cmd, LOAD_CPU, log) as proc:
            procs.wait_ready(proc, url + nginx.CHAT_PATH, REQUEST_BODY, CONTENT_TYPE, log)
            script = wrk.write_post_script(tmp / "post.lua", REQUEST_BODY, CONTENT_TYPE)
            guard = Guard(args.max_other_load, args.retries, args.wait_budget)
            ctx = Ctx(args, tmp, url, proc.pid, script, guard)
            raw = _collect(ctx)
    rows = report.aggregate(raw)
    print(report.render(rows, env, args))
    if not args.no_save:
        report.append_jsonl(rows, env, args, args.out)
        print(f"\nappended {len(rows)} JSON lines to {args.out}", file=sys.stderr)
