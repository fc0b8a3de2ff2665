"""`python -m bench.redisindex`: what one miss costs the Redis vector index, with and without
the copy in process (proxy/cache/mirror.py), by partition size; with `--stores`, what one
store costs this process.

    python -m bench.redisindex [--sizes 100,1000,3000] [--lookups 1500] [--dim 256]
    python -m bench.redisindex --stores [--rounds 5] [--count 1500] [--dim 256]

A valkey-server with RediSearch on the load core (bench/cache.py's), this process on the
gateway core. Per size and mode: a partition of that many random unit vectors, then
`--lookups` rounds of a miss (`RedisIndex.nearest` with a new vector; its p50 and p90 are
the figures), the same vector stored (as the gateway's store does after a miss, so the
partition grows by `--lookups` during the run) and a 0.5 ms pause (the rest of a request).

`--stores`: per round and concurrency (1 and 8 stores at a time, under the index's bound),
`--count` stores of new vectors into a partition this process copies (as the gateway's
stores after its misses), on uvloop; the figures are this process's CPU per store (its
event loop, the packing and writing, the put into the copy) and the wall time per store,
medians over rounds. The server is emptied before every round.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import cache, stack
from bench.measure import median
from proxy.cache.redisindex import RedisIndex  # before numpy: its BLAS threads (proxy/cache)

PAUSE = 0.0005
PAYLOAD = b"x" * 600


async def run(url: str, dim: int, size: int, lookups: int, copy: bool) -> str:
    import numpy as np

    index = RedisIndex(url, near_entries=0, mirror_bytes=(64 << 20) if copy else 0)
    rng = np.random.default_rng(1)

    def unit() -> Any:
        vector = rng.standard_normal(dim).astype(np.float32)
        return vector / np.linalg.norm(vector)

    partition = "p" * 32
    try:
        for _ in range(size):
            await index.add(partition, unit(), PAYLOAD, 3600)
        for _ in range(100):  # the first lookups start the copy
            await index.nearest(partition, unit(), 0.05)
            await asyncio.sleep(0.005)
        mirror = index.mirror(dim)
        copied = mirror is not None and len(mirror.copied) == 1
        if copy and not copied:
            raise RuntimeError("the partition was not copied")
        times = []
        cpu = time.process_time()
        for _ in range(lookups):
            vector = unit()
            start = time.perf_counter()
            if await index.nearest(partition, vector, 0.05) is not None:
                raise RuntimeError("a random vector was a hit")
            times.append(time.perf_counter() - start)
            await index.add(partition, vector, PAYLOAD, 3600)
            pause = time.perf_counter()
            while time.perf_counter() - pause < PAUSE:
                await asyncio.sleep(0)
        cpu_us = (time.process_time() - cpu) / lookups * 1e6
        times.sort()
        p50, p90 = times[len(times) // 2] * 1e3, times[int(len(times) * 0.9)] * 1e3
        mode = "copy in process" if copy else "server search"
        return f"| {size:,}-{size + lookups:,} | {mode} | {p50:.3f} | {p90:.3f} | {cpu_us:.0f} |"
    finally:
        await index.client.execute("FLUSHALL")
        await index.close()


async def stores(url: str, dim: int, count: int, concurrency: int) -> tuple[float, float]:
    """CPU and wall µs per store (see the module docstring)."""
    import numpy as np

    index = RedisIndex(url, near_entries=0)
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((count + 1, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    partition = "p" * 32
    try:
        await index.add(partition, vectors[0], PAYLOAD, 3600)
        for _ in range(20):  # the first lookups start the copy
            await index.nearest(partition, vectors[0], 0.05)
            await asyncio.sleep(0.005)
        mirror = index.mirror(dim)
        if mirror is None or len(mirror.copied) != 1:
            raise RuntimeError("the partition was not copied")
        slots = asyncio.Semaphore(concurrency)

        async def store(vector: Any) -> None:
            async with slots:
                await index.add(partition, vector, PAYLOAD, 3600)

        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(store(vector) for vector in vectors[1:]))
        return (time.process_time() - cpu) / count * 1e6, (time.perf_counter() - wall) / count * 1e6
    finally:
        await index.client.execute("FLUSHALL")
        await index.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100,1000,3000")
    p.add_argument("--lookups", type=int, default=1500)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--stores", action="store_true", help="the cost of a store instead")
    p.add_argument("--rounds", type=int, default=5, help="with --stores")
    p.add_argument("--count", type=int, default=1500, help="stores per round, with --stores")
    args = p.parse_args()
    os.sched_setaffinity(0, {int(stack.GATEWAY_CPU)})
    if args.stores:
        import uvloop

        with tempfile.TemporaryDirectory() as tmp, cache.search_redis(Path(tmp)) as server:
            print("| stores at a time | CPU µs per store | wall µs per store |")
            print("|--:|--:|--:|")
            for concurrency in (1, 8):
                found = [uvloop.run(stores(server.url, args.dim, args.count, concurrency))
                         for _ in range(args.rounds)]  # fmt: skip
                cpu, wall = median([f[0] for f in found]), median([f[1] for f in found])
                print(f"| {concurrency} | {cpu:.0f} | {wall:.0f} |", flush=True)
        return
    print("| partition (entries) | miss searched by | p50 ms | p90 ms | CPU µs per round |")
    print("|---|---|--:|--:|--:|")
    with tempfile.TemporaryDirectory() as tmp, cache.search_redis(Path(tmp)) as server:
        for size in (int(s) for s in args.sizes.split(",")):
            for copy in (False, True):
                print(asyncio.run(run(server.url, args.dim, size, args.lookups, copy)), flush=True)


if __name__ == "__main__":
    main()
