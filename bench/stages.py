"""`python -m bench.stages`: where a cached request's time goes inside the gateway, stage by
stage (issue 8's miss and hit paths).

    python -m bench.stages [--profiles nocache,memory] [--path miss] [-c 1] [--duration 8]
                           [--warmup 3] [--rounds 2]

bench/cache.py's set-up (nginx's fixed chat reply and `tollway mock-llm`'s embeddings on the
load core, one gateway worker on the gateway core, wrk with the same Lua scripts), with
bench/stagetimer.py's wrappers loaded into the gateway: nothing in `proxy/` is changed or
timed in production. Per profile and round, a fresh gateway: the warm-up run (prompts of
its own), the timers cleared, the measured run, the timers read. The table gives each
stage's p50 and mean in µs (medians over rounds) and its largest; the profiles run in turn
each round. Also every collection of the garbage collector, by generation.

Stages: `request` (the handler, from the request's start) and its `own time` (less every
backend wait, as in x-tollway-overhead-ms); `lookup` and within it `text`, `partition`, the
`embeddings wait` (as the lookup sees it) and `search`; the `embeddings request` (the batch's
HTTP call, with `decoding` its reply); `store`, which runs after the reply has gone out, and
within it, with the Redis index, the `Redis transaction` (from its write to the server's
last reply: a queue on the server shows here; dropped stores have none).
Also the gateway's CPU per request (every thread, Granian's included, user and system), which
the stages do not all explain.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, cast

from bench import cache, stack
from bench.measure import median, with_cpu

HOOK = stack.REPO / "bench" / "stagehook"
ORDER = ("request", "request, own time", "lookup", "lookup: text", "lookup: partition",
         "lookup: embeddings wait", "lookup: search", "embeddings request",
         "embeddings request: decoding", "store (after the reply)", "store: Redis transaction",
         "gc: generation 0", "gc: generation 1", "gc: generation 2")  # fmt: skip


def worker(pid: int) -> int:
    """The gateway's one worker process (Granian's child)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    if len(children) != 1:
        raise RuntimeError(f"gateway {pid}: {len(children)} worker processes, expected 1")
    return int(children[0])


def read_times(pid: int, out: Path) -> dict[str, list[float]]:
    """Ask the worker for its timers (SIGUSR2) and wait for the file."""
    out.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + 10
    while not out.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("the gateway wrote no stage times")
        time.sleep(0.05)
    times: dict[str, list[float]] = json.loads(out.read_text())
    return times


def run_once(args: argparse.Namespace, tmp: Path, rnd: int, profile: str,
             services: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    """One fresh gateway: warm-up, clear, measure, read; per stage (calls, p50, mean, max) µs."""
    out = tmp / f"stages-{profile}-{rnd}.json"
    if profile == "redis":
        cache.reset_redis(services["store"])
    # the gateway loads the timers (bench/stagetimer.py) and writes them to `out`
    env = dict(os.environ, PYTHONPATH=f"{HOOK}{os.pathsep}{stack.REPO}",
               TOLLWAY_STAGES_OUT=str(out))  # fmt: skip
    with cache.gateway(tmp, profile, services["chat"], services["mock"], services["store"],
                       env) as gw:  # fmt: skip
        url = gw.url + "/chat/completions"
        if args.path == "hit":
            cache.warm_hit(gw.url, profile)
            script = warm = cache.write_script(tmp / f"hit-{rnd}.lua", cache.HIT_HEADERS,
                                               cache.HIT_BODY)  # fmt: skip
        else:
            script, warm = cache.miss_scripts(tmp / f"miss-{rnd}", 1000 * rnd + args.c)
        pid = worker(gw.pgid)
        if args.warmup:
            cache.wrk(url, args.c, args.warmup, warm)
        os.kill(pid, signal.SIGUSR1)
        row = with_cpu(gw.pgid, lambda r: int(r["requests"]),
                       lambda: cache.wrk(url, args.c, args.duration, script))  # fmt: skip
        times = read_times(pid, out)
    summary: dict[str, Any] = {"req_s": row["req_s"], "p50_ms": row["p50_ms"],
                               "cpu_us": row["server_cpu_us_per_req"],
                               "x_cache": row["x_cache"]}  # fmt: skip
    for stage, values in times.items():
        values.sort()
        summary[stage] = (len(values), values[len(values) // 2] * 1e6,
                          sum(values) / len(values) * 1e6, values[-1] * 1e6)  # fmt: skip
    return summary


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    profiles = list(results)
    lines = ["| stage | " + " | ".join(f"{p}: p50 / mean / max µs" for p in profiles) + " |",
             "|---|" + "--:|" * len(profiles)]  # fmt: skip
    for stage in ORDER:
        cells = []
        for p in profiles:
            rounds = [r[stage] for r in results[p] if stage in r]
            if not rounds:
                cells.append("-")
                continue
            p50 = median([x[1] for x in rounds])
            mean = median([x[2] for x in rounds])
            top = max(x[3] for x in rounds)
            calls = median([float(x[0]) for x in rounds])
            cells.append(f"{p50:.0f} / {mean:.0f} / {top:.0f} ({calls:.0f} calls)")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    totals = (("cpu_us", "gateway CPU per request, µs (all threads)", ".0f"),
              ("req_s", "wrk req/s", ".0f"), ("p50_ms", "wrk p50 ms", ".3f"))  # fmt: skip
    for key, name, spec in totals:
        cells = [format(median([r[key] for r in results[p]]), spec) for p in profiles]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| x-cache | " + " | ".join(
        str([r["x_cache"] for r in results[p]]) for p in profiles) + " |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stages", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--profiles", default="nocache,memory", help="of nocache,memory,redis")
    p.add_argument("--path", choices=("hit", "miss"), default="miss")
    p.add_argument("-c", type=int, default=1, help="wrk connections")
    p.add_argument("--duration", type=int, default=8, help="s of the measured run")
    p.add_argument("--warmup", type=int, default=3, help="s of warm-up (not timed)")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    profiles = [x for x in args.profiles.split(",") if x]
    results: dict[str, list[dict[str, Any]]] = {profile: [] for profile in profiles}
    with tempfile.TemporaryDirectory(prefix="tollway-stages-") as t, contextlib.ExitStack() as es:
        tmp = Path(t)
        nginx = es.enter_context(stack.nginx_backend(tmp))
        mock = es.enter_context(cast(contextlib.AbstractContextManager[stack.Service],
                                     stack.mock_backend(tmp, 0, 0, 16)))  # fmt: skip
        services = {"chat": nginx.url, "mock": mock.url, "store": "memory"}
        if "redis" in profiles:
            services["store"] = es.enter_context(cache.search_redis(tmp)).url
        for rnd in range(args.rounds):
            for profile in profiles if rnd % 2 == 0 else profiles[::-1]:
                found = run_once(args, tmp, rnd, profile, services)
                results[profile].append(found)
                print(f"round {rnd + 1} {profile}: {found['req_s']:.0f} req/s, "
                      f"p50 {found['p50_ms']:.3f} ms, x-cache {found['x_cache']}",
                      flush=True)  # fmt: skip
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
