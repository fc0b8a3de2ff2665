"""Instructions per request under callgrind: a cost figure the host's speed does not move.

    python -m bench.instructions [--profiles auth,limit-memory] [--requests 2560]

This machine's speed drifts by up to 2x within a minute (bench/ab.py), so a cost of a few per
cent of a request is hard to see in req/s. Valgrind's callgrind counts what the gateway's
worker executes instead, the same on every run to a fraction of a per cent. Per profile
(bench/stack.py's configs, nginx's fixed reply as the upstream): the gateway runs under
callgrind with one worker, pinned to the gateway core; after 640 warm-up requests its
counters are zeroed (`callgrind_control -z`), `--requests` non-streamed chat requests are sent
by `hey` at concurrency 64 (every one must answer 200), and the counters are dumped. The
figure is the dump's total over the requests: every thread of the worker (the event loop and
Granian's), the GC and the allocator included. Each profile is printed against the first.

Instructions are not time (cache misses, lock hand-offs and the kernel are not in them), but
a policy's added instructions track the CPU per request it adds (bench/RESULTS.md compares
the two); use bench.ab's slices for the req/s figure. Work paced by wall time weighs up to
50x more per request under valgrind, which runs the worker that much slower: limit-redis's
leases last one second of wall time, so its figure counts ~50x their real share of round
trips. For a profile on Redis the store's script calls per counted request are printed too
(INFO commandstats); `--native` runs the same sequence without valgrind and prints only
those, the rate at full speed. `--clock-speed 0.02` runs the worker's clocks (every clock
the process reads: libfaketime, bench/setup.sh installs it) at 1/50 of real time, to match
valgrind's slowdown: then what is paced by wall time comes at its full-speed share per
request again, which the printed round trips show (the leases are then drawn on past their
Redis second, harmless under a limit no request reaches).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import redis

from bench import procs, stack

WARMUP = 640  # ten per connection: every code path taken and specialized before counting
HEY_OK = re.compile(r"\[200\]\s+(\d+) responses")
FAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    p.add_argument("--profiles", default="auth,limit-memory")
    p.add_argument("--requests", type=int, default=2560, help="counted requests per profile")
    p.add_argument("--native", action="store_true", help="no valgrind: round trips only")
    p.add_argument("--clock-speed", type=float, default=0.0, help="e.g. 0.02: a slowed clock")
    args = p.parse_args(argv)
    if args.requests % 64:
        p.error("--requests must be a multiple of 64 (hey sends the same number per connection)")
    profiles = args.profiles.split(",")
    with tempfile.TemporaryDirectory() as name, contextlib.ExitStack() as services:
        tmp = Path(name)
        upstream = services.enter_context(stack.nginx_backend(tmp)).url
        store = "memory"
        if any(profile in stack.NEEDS_REDIS for profile in profiles):
            store = services.enter_context(stack.redis_server(tmp)).url
        first = 0.0
        for profile in profiles:
            per_request, calls = measure(
                tmp, profile, upstream, store, args.requests, args.native, args.clock_speed
            )
            if args.native:
                print(f"{profile:16} {calls:.4f} store round trips per request, at full speed")
                continue
            line = f"{profile:16} {per_request / 1e3:9.1f} k instructions per request"
            if first:
                line += f"   {per_request / first - 1:+7.1%} vs {profiles[0]}"
            else:
                first = per_request
            if profile in stack.NEEDS_REDIS:
                line += f"   ({calls:.4f} store round trips per request)"
            print(line, flush=True)
    return 0


def measure(
    tmp: Path,
    profile: str,
    upstream: str,
    store: str,
    requests: int,
    native: bool = False,
    clock_speed: float = 0.0,
) -> tuple[float, float]:
    """Instructions the worker of `profile`'s gateway executes per counted request (0 when
    `native`: no valgrind), and the Redis script calls per counted request (0 for a profile
    that does not use Redis)."""
    shared = store if profile in stack.NEEDS_REDIS else ""
    port = procs.free_port()
    config = tmp / f"gateway-{profile}-{port}.yaml"
    config.write_text(stack.gateway_config(profile, upstream, store))
    log = tmp / f"gateway-{profile}-{port}.log"
    out = tmp / f"callgrind-{profile}"
    cmd = ["valgrind", "--tool=callgrind", "--trace-children=yes",
           f"--callgrind-out-file={out}.%p"] if not native else []  # fmt: skip
    cmd += [sys.executable, "-m", "proxy", "serve", "--config", str(config),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    env = stack.child_env()
    if clock_speed:
        env |= {"LD_PRELOAD": FAKETIME, "FAKETIME": f"+0 x{clock_speed}"}
    with procs.running(cmd, stack.GATEWAY_CPU, log, env) as proc:
        base = f"http://127.0.0.1:{port}"
        procs.wait_ready(proc, base + "/readyz", None, "", log, timeout=600)
        workers = psutil.Process(proc.pid).children()
        if len(workers) != 1:
            raise RuntimeError(f"expected one worker process, found {len(workers)}; see {log}")
        worker = str(workers[0].pid)
        url = base + stack.API_PATH + "/chat/completions"
        _send(url, WARMUP)
        if not native:
            subprocess.run(["callgrind_control", "-z", worker], check=True, capture_output=True)
        calls = _script_calls(shared)
        _send(url, requests)
        calls = _script_calls(shared) - calls
        if native:
            return 0.0, calls / requests
        subprocess.run(["callgrind_control", "-d", worker], check=True, capture_output=True)
        dumps = sorted(tmp.glob(f"callgrind-{profile}.{worker}.*"))
        if not dumps:
            raise RuntimeError(f"callgrind wrote no dump for worker {worker}; see {log}")
        totals = re.search(r"^(?:totals|summary): (\d+)", dumps[-1].read_text(), re.M)
        if totals is None:
            raise RuntimeError(f"no totals in {dumps[-1]}")
        return int(totals.group(1)) / requests, calls / requests


def _script_calls(url: str) -> int:
    """The Redis server's script calls so far (EVALSHA and EVAL, INFO commandstats); 0
    without a server."""
    if not url:
        return 0
    with redis.Redis.from_url(url) as client:
        stats = client.info("commandstats")
    return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("evalsha", "eval"))


def _send(url: str, requests: int) -> None:
    """`requests` chat requests from `hey` at c=64 on the load core; all must answer 200."""
    cmd = ["taskset", "-c", stack.LOAD_CPU, "hey", "-n", str(requests), "-c", "64",
           "-m", "POST", "-T", "application/json", "-H", f"api-key: {stack.KEYS[0]}",
           "-d", stack.CHAT_BODY.decode(), url]  # fmt: skip
    report = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    ok = HEY_OK.search(report)
    if ok is None or int(ok.group(1)) != requests:
        raise RuntimeError(f"not every request answered 200:\n{report}")


if __name__ == "__main__":
    raise SystemExit(main())
