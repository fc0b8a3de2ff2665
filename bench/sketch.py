"""`python -m bench.sketch`: the in-process index's search, exact against the sketch, by
partition size and by how cold the CPU caches are (where `SKETCH_FROM` should sit).

    python -m bench.sketch [--sizes 1000,2000,3000,4000,6000,10000] [--dim 256] [--reps 300]

Pinned to the gateway core. Per size, a partition (proxy/cache/index.py's `_Partition`) of
random unit vectors and queries near one of its rows; `_Partition.nearest` timed (p50, µs)
with `SKETCH_FROM` forced each way, after each of: nothing (warm), a sweep of 1 MB (the
core's L2 gone) and of 8 MB (much of the L3 too, as between a gateway's requests). Also
`5 at once`: one matrix product scoring five queries exactly, against five searches.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

from bench import stack
from proxy.cache import index  # before numpy: one BLAS thread (proxy/cache/__init__.py)

COLD = {"warm": 0, "L2-cold": 1 << 20, "DRAM-cold": 8 << 20}


def timed(fn: Callable[[], Any], reps: int, sweep: Any) -> float:
    out = []
    for _ in range(reps):
        if sweep is not None:
            sweep[::64] += 1  # one write per cache line
        t = time.perf_counter_ns()
        fn()
        out.append(time.perf_counter_ns() - t)
    out.sort()
    return out[len(out) // 2] / 1000


def row(n: int, dim: int, reps: int, sweeps: dict[str, Any]) -> list[str]:
    """One partition of `n` rows: its table cells."""
    import numpy as np

    rng = np.random.default_rng(n)
    part = index._Partition(dim, n)
    rows = rng.standard_normal((n, dim)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    for i in range(n):
        part.append(i, rows[i], b"", float("inf"))
    near = rows[rng.integers(0, n, 5)]
    near += 0.03 * rng.standard_normal(near.shape).astype(np.float32)
    queries = (near / np.linalg.norm(near, axis=1, keepdims=True)).astype(np.float32)
    query = queries[0]
    cells = []
    saved = index.SKETCH_FROM
    try:
        for sweep in sweeps.values():
            index.SKETCH_FROM = 1 << 62
            exact = timed(lambda: part.nearest(query), reps, sweep)
            index.SKETCH_FROM = 0
            sketch = timed(lambda: part.nearest(query), reps, sweep)
            cells.append(f"{exact:.0f} / {sketch:.0f}")
    finally:
        index.SKETCH_FROM = saved
    cold = sweeps["DRAM-cold"]
    at_once = timed(lambda: (part.vectors[:n] @ queries.T).argmax(axis=0), reps, cold)
    one_by_one = timed(lambda: [part.nearest(v) for v in queries], reps, cold)
    cells.append(f"{at_once:.0f} / {one_by_one:.0f}")
    return cells


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sketch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--sizes", default="1000,2000,3000,4000,6000,10000")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--reps", type=int, default=300)
    args = p.parse_args(argv)
    os.sched_setaffinity(0, {int(stack.GATEWAY_CPU)})
    import numpy as np

    sweeps = {name: np.ones(size, dtype=np.uint8) if size else None
              for name, size in COLD.items()}  # fmt: skip
    print(f"dim {args.dim}, SKETCH_FROM now {index.SKETCH_FROM} floats "
          f"({index.SKETCH_FROM // args.dim} rows); p50 µs, exact / sketch")  # fmt: skip
    print(
        "| rows | " + " | ".join(COLD) + " | 5 at once (DRAM-cold): one product / five searches |"
    )
    print("|--:|" + "--:|" * (len(COLD) + 1))
    for n in (int(x) for x in args.sizes.split(",")):
        print(f"| {n:,} | " + " | ".join(row(n, args.dim, args.reps, sweeps)) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
