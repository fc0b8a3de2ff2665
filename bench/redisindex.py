"""`python -m bench.redisindex`: what one miss costs the Redis vector index, with and without
the copy in process (proxy/cache/mirror.py), by partition size.

    python -m bench.redisindex [--sizes 100,1000,3000] [--lookups 1500] [--dim 256]

A valkey-server with RediSearch on the load core (bench/cache.py's), this process on the
gateway core. Per size and mode: a partition of that many random unit vectors, then
`--lookups` rounds of a miss (`RedisIndex.nearest` with a new vector; its p50 and p90 are
the figures), the same vector stored (as the gateway's store does after a miss, so the
partition grows by `--lookups` during the run) and a 0.5 ms pause (the rest of a request).
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100,1000,3000")
    p.add_argument("--lookups", type=int, default=1500)
    p.add_argument("--dim", type=int, default=256)
    args = p.parse_args()
    os.sched_setaffinity(0, {int(stack.GATEWAY_CPU)})
    print("| partition (entries) | miss searched by | p50 ms | p90 ms | CPU µs per round |")
    print("|---|---|--:|--:|--:|")
    with tempfile.TemporaryDirectory() as tmp, cache.search_redis(Path(tmp)) as server:
        for size in (int(s) for s in args.sizes.split(",")):
            for copy in (False, True):
                print(asyncio.run(run(server.url, args.dim, size, args.lookups, copy)), flush=True)


if __name__ == "__main__":
    main()
