"""CPU per token-limit decision, store by store, with nothing else in the process.

    taskset -c 1 python -m bench.limiter [--concurrency 64] [--ops 20000]

Starts a valkey-server on the load core and measures, in this process (uvloop), the CPU
time per `admit` and per `admit` + `settle` for the memory store and the Redis store
(proxy/limits/resp.py underneath), with `--concurrency` decisions in flight; redis-py's
PING is printed beside them for scale. Last, the whole `llm-token-limit` path of one
non-streamed request on the memory store, as the handler runs it (estimate, admit, reply
headers, settle), one request after another.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
import redis.asyncio as aredis
import uvloop

from bench import stack
from proxy.config import TokenLimit
from proxy.exchange import Exchange
from proxy.limits.base import Admitted, Limit, Limiter
from proxy.limits.memory import MemoryLimiter
from proxy.limits.redis import RedisLimiter
from proxy.policies.token_limit import Metering, TokenLimitPolicy, TokenLimits
from proxy.schemas import Usage, decode_request
from proxy.tokens import TokenizerRegistry


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(name: str, op: Callable[[], Awaitable[object]], conc: int, ops: int) -> None:
    gate = asyncio.Semaphore(conc)

    async def one() -> None:
        async with gate:
            await op()

    cpu, wall = _cpu(), time.perf_counter()
    await asyncio.gather(*(one() for _ in range(ops)))
    cpu, wall = _cpu() - cpu, time.perf_counter() - wall
    print(f"{name:34} {ops / wall:9.0f}/s   CPU {cpu / ops * 1e6:6.1f} us per op")


async def run(url: str, conc: int, ops: int) -> None:
    limit = Limit("bench", 10**12, 10**15, "monthly")
    pinger = aredis.Redis.from_url(url)
    await measure("redis-py PING (for scale)", pinger.ping, conc, ops)
    await pinger.aclose()
    stores: list[tuple[str, Limiter]] = [
        ("memory", MemoryLimiter()),
        ("redis", RedisLimiter.connect(url)),
    ]
    for name, limiter in stores:

        async def admit(limiter: Limiter = limiter) -> None:
            await limiter.admit(limit, 10)

        async def both(limiter: Limiter = limiter) -> None:
            decision = await limiter.admit(limit, 10)
            assert isinstance(decision, Admitted)
            await limiter.settle(decision.reservation, 5)

        await measure(f"{name}: admit", admit, conc, ops)
        await measure(f"{name}: admit + settle", both, conc, ops)
        await limiter.close()
    await policy_path(ops)


async def policy_path(ops: int) -> None:
    """The handler's metering calls for the bench's chat body (the stack's limit profile)."""
    spec = msgspec.convert(
        {"counter-key": "{subscription.id}", "tokens-per-minute": 10**12, "token-quota": 10**15,
         "remaining-tokens-header-name": "x-ratelimit-remaining-tokens"},
        TokenLimit,
    )  # fmt: skip
    tokenizers = TokenizerRegistry({"gpt-4o*": "tiktoken:o200k_base"})
    limits = TokenLimits([], {}, [TokenLimitPolicy(spec, MemoryLimiter())], tokenizers)
    view = decode_request("chat-completions", stack.CHAT_BODY)
    usage = Usage(prompt_tokens=20, completion_tokens=10, total_tokens=30)

    async def one() -> None:
        exchange = Exchange("POST", "/openai/chat/completions", "id", "127.0.0.1")
        exchange.model, exchange.subscription_id = "gpt-4o-mini", "s0"
        metering = Metering()
        policies = limits.for_product("")
        await metering.admit(
            limits, policies, view, len(stack.CHAT_BODY), exchange, {"headers": []}, ""
        )
        exchange.status, exchange.usage = 200, usage
        metering.reply_headers(exchange)
        metering.settle(exchange, None)

    await measure("memory: whole policy per request", one, 1, ops)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.limiter", description=__doc__)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--ops", type=int, default=20_000)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as name, stack.redis_server(Path(name)) as server:
        uvloop.run(run(server.url, args.concurrency, args.ops))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
