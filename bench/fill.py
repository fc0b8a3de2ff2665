"""`python -m bench.fill`: the in-process index's upkeep, by vector dimension: what storing
costs while one partition fills up (each `MemoryIndex.put` timed: p50, p99, largest), and
what a lookup costs once that partition's entries expire in turn; with `--mirror`, what
reading a partition whole into the Redis index's copy costs the event loop.

    python -m bench.fill [--rows 10000] [--dims 256,1536] [--runs 3] [--mirror]

A put runs on the event loop, so its longest is a stall of every request the worker holds.
Each run is a fresh process pinned to the gateway core (new memory costs page faults, as in
a gateway), storing `--rows` random unit vectors into one partition of a `MemoryIndex`
bounded at `--rows` entries. Also its resident memory after the fill. Then, on a clock the
bench moves (1 ms a store), a partition whose entries live `--rows` ms, so it holds ~`--rows`
of them, one expiring at every step as one is stored: after a TTL of warm-up, each of
`--rows` lookups timed (`MemoryIndex.nearest`, new vectors: misses).

`--mirror`: proxy/cache/mirror.py's `_read_partition` given a server's reply of `--rows`
entries (made here, no server: the gateway's side only), the whole read timed, and the
longest the event loop was held meanwhile (a task waking at every loop turn measures it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

from bench import stack


def fill(rows: int, dim: int) -> dict[str, float]:
    """One fill, in this process: put times in µs, and the resident memory it added."""
    import numpy as np

    from proxy.cache.index import MemoryIndex

    rng = np.random.default_rng(dim)
    index = MemoryIndex(rows)
    before = _rss_kib()
    times = []
    for start in range(0, rows, 100):  # made 100 at a time: little memory besides the index
        vectors = rng.standard_normal((min(100, rows - start), dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        for vector in vectors:
            t = time.perf_counter_ns()
            index.put("p", vector, b"x", 3600.0)
            times.append((time.perf_counter_ns() - t) / 1000)
    assert index.count("p") == rows
    rss = (_rss_kib() - before) / 1024
    times.sort()
    return {"p50": times[len(times) // 2], "p99": times[len(times) * 99 // 100],
            "max": times[-1], "total_ms": sum(times) / 1000, "rss_mib": rss}  # fmt: skip


def expiring(rows: int, dim: int) -> dict[str, float]:
    """Lookups (µs) in a partition whose entries expire one by one as others are stored."""
    import numpy as np

    from proxy.cache.index import MemoryIndex

    rng = np.random.default_rng(dim)
    now = 0.0
    index = MemoryIndex(2 * rows, clock=lambda: now)
    ttl = rows / 1000
    times = []

    async def main() -> None:
        nonlocal now
        for step in range(2 * rows):
            vector = rng.standard_normal(dim).astype(np.float32)
            vector /= np.linalg.norm(vector)
            now += 0.001
            t = time.perf_counter_ns()
            await index.nearest("p", vector, 0.05)
            if step >= rows:  # after one TTL: every step expires an entry
                times.append((time.perf_counter_ns() - t) / 1000)
            index.put("p", vector, b"x", ttl)

    asyncio.run(main())
    assert abs(index.count("p") - rows) <= 2
    times.sort()
    return {"lookup_p50": times[len(times) // 2], "lookup_max": times[-1]}


def mirror_load(rows: int, dim: int) -> dict[str, float]:
    """A partition of `rows` entries read into the copy: the whole read and the longest
    stall of the loop, in ms."""
    import numpy as np

    from proxy.cache.mirror import Mirror

    rng = np.random.default_rng(dim)
    expires = str(int((time.time() + 3600) * 1000)).encode()
    reply: list[Any] = [rows]
    for i in range(rows):
        vector = rng.standard_normal(dim).astype(np.float32)
        vector /= np.linalg.norm(vector)
        reply += [b"tollway:cache:%d" % i, [b"vec", vector.tobytes(), b"exp", expires]]

    class Server:  # what the read asks: FT.INFO (not indexing), then the FT.SEARCH
        async def execute(self, *args: Any) -> Any:
            return [b"indexing", 0] if args[0] == "FT.INFO" else reply

    async def main() -> dict[str, float]:
        mirror = Mirror("redis://127.0.0.1:1", "index", "stream", dim, origin=b"bench",
                        clock=time.time, timeout=1.0)  # fmt: skip
        mirror._loader = Server()  # type: ignore[assignment]
        mirror._loading["p"] = mirror._generation
        gaps = []

        async def ticker() -> None:
            last = time.perf_counter()
            while True:
                await asyncio.sleep(0)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        running = asyncio.get_running_loop().create_task(ticker())
        await asyncio.sleep(0)
        t = time.perf_counter()
        await mirror._read_partition("p", mirror._generation)
        took = time.perf_counter() - t
        await asyncio.sleep(0)  # the ticker wakes once more: the read's last stretch counted
        running.cancel()
        assert mirror.index.count("p") == rows
        return {"load_ms": took * 1e3, "stall_ms": max(gaps) * 1e3}

    return asyncio.run(main())


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--rows", type=int, default=10_000)
    p.add_argument("--dims", default="256,1536")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--mirror", action="store_true", help="a partition read into the copy")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child: this dimension
    args = p.parse_args(argv)
    if args.one:
        if args.mirror:
            print(json.dumps(mirror_load(args.rows, args.one)))
        else:
            print(json.dumps(fill(args.rows, args.one) | expiring(args.rows, args.one)))
        return 0
    if args.mirror:
        print(f"a partition of {args.rows:,} rows read into the Redis index's copy; medians "
              f"of {args.runs} runs")  # fmt: skip
        print("| dim | whole read, ms | longest stall, ms |")
        print("|--:|--:|--:|")
        for dim in (int(x) for x in args.dims.split(",")):
            runs = [_child(args, dim) for _ in range(args.runs)]
            mid = {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in runs[0]}
            print(f"| {dim} | {mid['load_ms']:.1f} | {mid['stall_ms']:.1f} |", flush=True)
        return 0
    print(f"{args.rows:,} rows into one partition; per put µs (largest of {args.runs} runs "
          "for max, medians otherwise)")  # fmt: skip
    print("| dim | put p50 | p99 | max | all puts, ms | resident MiB | lookup among expiring "
          "entries: p50 / max |")  # fmt: skip
    print("|--:|--:|--:|--:|--:|--:|--:|")
    for dim in (int(x) for x in args.dims.split(",")):
        runs = [_child(args, dim) for _ in range(args.runs)]
        mid = {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in runs[0]}
        top = max(r["max"] for r in runs)
        print(f"| {dim} | {mid['p50']:.1f} | {mid['p99']:.1f} | {top:,.0f} | "
              f"{mid['total_ms']:.0f} | {mid['rss_mib']:.1f} | {mid['lookup_p50']:.1f} / "
              f"{mid['lookup_max']:,.0f} |", flush=True)  # fmt: skip
    return 0


def _child(args: argparse.Namespace, dim: int) -> dict[str, float]:
    """One run in a fresh process on the gateway core."""
    out = subprocess.run(
        ["taskset", "-c", stack.GATEWAY_CPU, sys.executable, "-m", "bench.fill",
         "--rows", str(args.rows), "--one", str(dim), *(["--mirror"] if args.mirror else [])],
        check=True, capture_output=True, text=True, cwd=stack.REPO,
        env=dict(os.environ, PYTHONPATH=str(stack.REPO)),
    )  # fmt: skip
    result: dict[str, float] = json.loads(out.stdout)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
