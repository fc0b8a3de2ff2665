"""The token-limit policy's own path in instructions: the handler's metering calls, in process.

    python -m bench.policypath [--store memory|redis]

`bench.instructions` counts the whole gateway worker; this counts only what the handler calls
for a limited request, so a change to the policy shows without the server around it. For the
bench's chat body, one `llm-token-limit` policy as in the stack's limit profiles (a limit no
request reaches) and a whole reply whose usage is above the estimate (as nginx's fixed reply
is): `Metering.admit`, `settle`, then `headers`, one request after another. The loop runs
under valgrind's cachegrind for 1,000 and for 11,000 requests, and the difference per
request is printed, so start-up and imports cancel out (both runs with one hash seed: with a
random one the figure moved by up to ~1 k between runs). `--store redis` runs the store the
gateway runs on Redis (leases over the failover store over a valkey-server this starts);
its round trips come at the rate this loop reaches under valgrind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import msgspec

from bench import stack
from proxy.config import TokenLimit
from proxy.exchange import Exchange
from proxy.limits.base import Limiter
from proxy.limits.failover import FailoverLimiter
from proxy.limits.lease import LeasingLimiter
from proxy.limits.memory import MemoryLimiter
from proxy.limits.redis import RedisLimiter
from proxy.policies.token_limit import Metering, TokenLimitPolicy, TokenLimits
from proxy.schemas import Usage, decode_request
from proxy.tokens import TokenizerRegistry

RUNS = (1_000, 11_000)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.policypath", description=__doc__)
    p.add_argument("--store", choices=("memory", "redis"), default="memory")
    p.add_argument("--loop", type=int, default=0, help=argparse.SUPPRESS)  # the child's run
    p.add_argument("--url", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.loop:
        asyncio.run(_loop(args.loop, args.url))
        return 0
    with tempfile.TemporaryDirectory() as name, contextlib.ExitStack() as services:
        tmp = Path(name)
        url = ""
        if args.store == "redis":
            url = services.enter_context(stack.redis_server(tmp)).url
        counts = [_count(tmp, n, url) for n in RUNS]
    per_request = (counts[1] - counts[0]) / (RUNS[1] - RUNS[0])
    print(f"policy path, {args.store} store: {per_request:,.0f} instructions per request")
    return 0


def _count(tmp: Path, requests: int, url: str) -> int:
    """Instructions of one child process that runs the loop `requests` times."""
    out = tmp / f"cachegrind-{requests}"
    cmd = ["taskset", "-c", stack.GATEWAY_CPU, "valgrind", "--tool=cachegrind", "--cache-sim=no",
           f"--cachegrind-out-file={out}", sys.executable, "-m", "bench.policypath",
           "--loop", str(requests), "--url", url]  # fmt: skip
    # one hash seed for every run: dict layouts (and so probe counts) then repeat
    env = {**stack.child_env(), "PYTHONHASHSEED": "0"}
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    totals = re.search(r"^summary: (\d+)", out.read_text(), re.M)
    if totals is None:
        raise RuntimeError(f"no summary in {out}")
    return int(totals.group(1))


class MeteredRequests:
    """Limited requests' metering calls, as the handler makes them, on one store: one policy
    as in the stack's limit profiles, the bench's chat body, a whole reply whose usage is
    above the estimate. bench.limiter times them; this module counts them."""

    def __init__(self, store: Limiter) -> None:
        spec = msgspec.convert(
            {"counter-key": "{subscription.id}", "tokens-per-minute": 10**12,
             "token-quota": 10**15, "remaining-tokens-header-name": "x-ratelimit-remaining-tokens"},
            TokenLimit,
        )  # fmt: skip
        tokenizers = TokenizerRegistry({"gpt-4o*": "tiktoken:o200k_base"})
        self.limits = TokenLimits([], {}, [TokenLimitPolicy(spec, store)], tokenizers)
        self.view = decode_request("chat-completions", stack.CHAT_BODY)
        self.usage = Usage(prompt_tokens=20, completion_tokens=10, total_tokens=30)

    async def run(self, exchange: Exchange, requests: int) -> None:
        """`requests` requests on `exchange`, one after another, in one coroutine (so the
        loop adds nothing per request but itself)."""
        limits, view, usage = self.limits, self.view, self.usage
        scope: dict[str, list[tuple[bytes, bytes]]] = {"headers": []}
        size = len(stack.CHAT_BODY)
        for _ in range(requests):
            exchange.usage, exchange.status = None, 0
            metering = Metering()
            policies = limits.for_product("")
            await metering.admit(limits, policies, view, size, exchange, scope, "")
            exchange.status, exchange.usage = 200, usage
            metering.settle(exchange, None)  # a whole reply: settled, then its headers
            metering.headers()


def new_exchange() -> Exchange:
    """The request's exchange as the handler has it when the policy runs."""
    exchange = Exchange("POST", "/openai/chat/completions", "id", "127.0.0.1")
    exchange.model, exchange.subscription_id = "gpt-4o-mini", "s0"
    return exchange


async def _loop(requests: int, url: str) -> None:
    store: Limiter = MemoryLimiter()
    if url:
        store = LeasingLimiter(FailoverLimiter(RedisLimiter.connect(url)))
    # one exchange for all: the handler's own cost is not counted here
    await MeteredRequests(store).run(new_exchange(), requests)
    await store.close()


if __name__ == "__main__":
    raise SystemExit(main())
