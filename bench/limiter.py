"""CPU per token-limit decision, store by store, with nothing else in the process.

    taskset -c 1 python -m bench.limiter [--concurrency 64] [--ops 20000]

Starts a valkey-server on the load core and measures, in this process (uvloop), the CPU
time per `admit` and per `admit` + `settle` for the memory store, the Redis store
(proxy/limits/resp.py underneath) and the Redis store behind per-process leases (what the
gateway runs, proxy/limits/lease.py), with `--concurrency` decisions in flight, and the Redis
server's own CPU per decision (what bounds how many gateways one Redis carries); redis-py's
PING is printed beside them for scale. The Redis rows spread their keys over 10 counters.
Last, the whole `llm-token-limit` path of one non-streamed request on the memory store, as the
handler runs it (estimate, admit, reply headers, settle), one request after another.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import psutil
import redis.asyncio as aredis
import uvloop

from bench import stack
from bench.policypath import MeteredRequests, new_exchange
from proxy.limits.base import Limit, Limiter, Reservation
from proxy.limits.lease import LeasingLimiter
from proxy.limits.memory import MemoryLimiter
from proxy.limits.redis import RedisLimiter


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(
    name: str,
    op: Callable[[int], Awaitable[object]],
    conc: int,
    ops: int,
    server: psutil.Process | None = None,
) -> None:
    gate = asyncio.Semaphore(conc)

    async def one(i: int) -> None:
        async with gate:
            await op(i)

    served = _served(server)
    cpu, wall = _cpu(), time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(ops)))
    cpu, wall = _cpu() - cpu, time.perf_counter() - wall
    line = f"{name:34} {ops / wall:9.0f}/s   CPU {cpu / ops * 1e6:6.1f} us per op"
    if server is not None:
        line += f"   Redis CPU {(_served(server) - served) / ops * 1e6:6.1f} us per op"
    print(line)


def _served(server: psutil.Process | None) -> float:
    if server is None:
        return 0.0
    times = server.cpu_times()
    return float(times.user + times.system)


async def run(url: str, conc: int, ops: int, server: psutil.Process) -> None:
    limits = [Limit(f"bench-{i}", 10**12, 10**15, "monthly") for i in range(10)]
    pinger = aredis.Redis.from_url(url)

    async def ping(i: int) -> None:
        await pinger.ping()

    await measure("redis-py PING (for scale)", ping, conc, ops, server)
    await pinger.aclose()
    stores: list[tuple[str, Limiter]] = [
        ("memory", MemoryLimiter()),
        ("redis", RedisLimiter.connect(url)),
        ("redis+lease", LeasingLimiter(RedisLimiter.connect(url))),  # what the gateway runs
    ]
    for name, limiter in stores:

        async def admit(i: int, limiter: Limiter = limiter) -> None:
            await limiter.admit(limits[i % 10], 10)

        async def both(i: int, limiter: Limiter = limiter) -> None:
            decision = await limiter.admit(limits[i % 10], 10)
            assert isinstance(decision, Reservation)
            if hasattr(limiter, "settle_soon"):
                limiter.settle_soon(decision, 5)  # as the handler does
            else:  # a checkout from before settle_soon (A/B against an older commit)
                await limiter.settle(decision, 5)

        on = server if name.startswith("redis") else None
        await measure(f"{name}: admit", admit, conc, ops, on)
        await measure(f"{name}: admit + settle", both, conc, ops, on)
        await limiter.close()
    await policy_path(ops)


async def policy_path(ops: int) -> None:
    """The handler's metering calls for the bench's chat body (the stack's limit profile)."""
    metered = MeteredRequests(MemoryLimiter())

    async def timed(i: int) -> None:
        await metered.run(new_exchange(), 1)

    await measure("memory: whole policy per request", timed, 1, ops)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.limiter", description=__doc__)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--ops", type=int, default=20_000)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as name, stack.redis_server(Path(name)) as server:
        redis_process = psutil.Process(server.pgid)
        uvloop.run(run(server.url, args.concurrency, args.ops, redis_process))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
