"""Client-alone load loop: keep N requests in flight against the mock for a fixed time.

Run by ``python -m bench.clients`` as
``taskset -c 1 python -m bench.clients.loop --client aiohttp --concurrency 64 --url URL``;
prints one JSON object (req/s and CPU microseconds per request of this process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass

import uvloop

from bench.clients.upstream import CLIENTS, CONTENT_TYPE, REQUEST_BODY, Upstream, open_upstream


@dataclass
class _State:
    ok: int = 0
    errors: int = 0
    stop: bool = False


async def _worker(upstream: Upstream, url: str, state: _State) -> None:
    while not state.stop:
        try:
            status, body, _ = await upstream.post(url, REQUEST_BODY, CONTENT_TYPE)
        except Exception:
            state.errors += 1
            await asyncio.sleep(0.01)
            continue
        if status == 200 and body:
            state.ok += 1
        else:
            state.errors += 1


async def run(client: str, url: str, concurrency: int, duration: float, warmup: float) -> dict:
    """Load ``url`` with ``concurrency`` requests in flight; measure after ``warmup``."""
    upstream = open_upstream(client)
    state = _State()
    tasks = [asyncio.create_task(_worker(upstream, url, state)) for _ in range(concurrency)]
    try:
        await asyncio.sleep(warmup)
        ok0, err0, cpu0, t0 = state.ok, state.errors, time.process_time(), time.perf_counter()
        await asyncio.sleep(duration)
        ok, errors = state.ok - ok0, state.errors - err0
        cpu, elapsed = time.process_time() - cpu0, time.perf_counter() - t0
    finally:
        state.stop = True
        await asyncio.wait(tasks, timeout=10)
        for task in tasks:
            task.cancel()
        await upstream.aclose()
    return {
        "client": client,
        "concurrency": concurrency,
        "requests": ok,
        "errors": errors,
        "seconds": round(elapsed, 3),
        "req_s": round(ok / elapsed, 1),
        "cpu_us_per_req": round(cpu / ok * 1e6, 1) if ok else None,
    }


def main() -> None:
    """Parse the command line, run one loop under uvloop, print the JSON result."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--client", choices=CLIENTS, required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args()
    result = uvloop.run(run(args.client, args.url, args.concurrency, args.duration, args.warmup))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
