"""Token-limit accuracy under concurrency: do several gateway processes sharing one Redis ever
let more than `tokens-per-minute` through for a key in any 60-second interval?

    python -m bench.accuracy [--seconds 150] [--clients 200] [--keys 10] [--tpm 3000]
                             [--no-max-tokens] [--out bench/results/accuracy.jsonl]

Starts a valkey-server, `tollway mock-llm` (16 completion tokens per reply, 5 ms apart when
streamed) and `tollway serve --workers 4` with an `llm-token-limit` of `--tpm` per
subscription on a Redis store; then `--clients` concurrent clients over `--keys`
subscriptions send chat completions for `--seconds`, half of them streamed, each with
`max_tokens` (unless `--no-max-tokens`).

What is checked comes from the store itself, not the clients: an auditor reads every key's
window buckets (`tollway:{key}:rate`, one field per second) four times a second and keeps
each bucket's last value, i.e. what was finally charged in that second after every
settlement. A bucket counts in the window for 61 seconds (proxy/limits/base.py), so "any
60-second interval" is "any 61 consecutive buckets": the figure is, per key, the largest sum
of 61 consecutive final buckets against the limit. With `max_tokens` the overshoot must be 0.
Without it, admission reserves only the prompt and completions are charged when they end, so
the overshoot is bounded by the completions in flight per key (clients / keys x 16).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from bench import procs, stack
from bench.machine import environment
from proxy.http1 import ConnectionPool

COMPLETION = 16  # tokens the mock writes per reply
BUCKETS = 61  # consecutive 1-s buckets any 60-s interval can touch


def _config(mock_url: str, store: str, tpm: int, keys: list[str]) -> str:
    subs = "".join(
        f"  - {{id: k{i}, scope: all-apis, primary-key: {k}}}\n" for i, k in enumerate(keys)
    )
    return f"""
gateway: {{store: "{store}", store-failure-mode: closed}}
telemetry: {{access-log: "off"}}
backends: [{{id: mock, url: "{mock_url}", max-connections: 4096}}]
apis:
  - id: chat
    path: /openai
    backend: mock
    policies:
      - llm-token-limit: {{counter-key: "{{subscription.id}}", tokens-per-minute: {tpm}}}
subscriptions:
{subs}"""


async def _client(pool: ConnectionPool, key: str, i: int, stop: float, max_tokens: bool,
                  tally: dict[str, int]) -> None:  # fmt: skip
    n = 0
    while time.monotonic() < stop:
        n += 1
        body: dict[str, Any] = {
            "model": "gpt-4o",
            "messages": [{"role": "user", "content": f"client {i} request {n}: say hello"}],
            "stream": (i + n) % 2 == 0,
        }
        if max_tokens:
            body["max_tokens"] = 32
        payload = json.dumps(body).encode()
        headers = b"content-type: application/json\r\napi-key: %s\r\n" % key.encode()
        try:
            response = await pool.request(
                b"POST", b"/openai/chat/completions", headers, payload, len(payload)
            )
            await response.read()
            response.close()
            tally[str(response.status)] = tally.get(str(response.status), 0) + 1
            if response.status == 429:
                await asyncio.sleep(0.05)  # a refused client backs off briefly
        except Exception as exc:  # counted, never fatal: the run is about the store
            tally[type(exc).__name__] = tally.get(type(exc).__name__, 0) + 1
            await asyncio.sleep(0.05)


async def _audit(client: redis.Redis, keys: list[str], stop: float,
                 seen: dict[int, dict[int, int]]) -> None:  # fmt: skip
    while time.monotonic() < stop + 2:
        for k in range(len(keys)):
            buckets = await asyncio.to_thread(client.hgetall, f"tollway:{{k{k}}}:rate")
            for second, tokens in buckets.items():
                seen[k][int(second)] = int(tokens)
        await asyncio.sleep(0.25)


def worst_windows(seen: dict[int, dict[int, int]]) -> dict[int, int]:
    """Per key, the largest sum over any BUCKETS consecutive seconds of final charges."""
    worst = {}
    for k, buckets in seen.items():
        if not buckets:
            worst[k] = 0
            continue
        lo, hi = min(buckets), max(buckets)
        best = 0
        for start in range(lo - BUCKETS + 1, hi + 1):
            best = max(best, sum(buckets.get(s, 0) for s in range(start, start + BUCKETS)))
        worst[k] = best
    return worst


async def _load(
    args: argparse.Namespace, url: str, keys: list[str], redis_url: str
) -> dict[str, Any]:
    pool = ConnectionPool(url, limit=args.clients, connect_timeout=5, read_timeout=30)
    audit_client = redis.Redis.from_url(redis_url)
    seen: dict[int, dict[int, int]] = {k: {} for k in range(len(keys))}
    tally: dict[str, int] = {}
    stop = time.monotonic() + args.seconds
    auditor = asyncio.ensure_future(_audit(audit_client, keys, stop, seen))
    await asyncio.gather(*(
        _client(pool, keys[i % len(keys)], i, stop, not args.no_max_tokens, tally)
        for i in range(args.clients)
    ))  # fmt: skip
    await auditor
    await pool.close()
    audit_client.close()
    worst = worst_windows(seen)
    bound = (args.clients // len(keys)) * COMPLETION
    return {
        "tpm": args.tpm,
        "max_tokens": not args.no_max_tokens,
        "responses": tally,
        "worst_window": worst,
        "overshoot": {k: max(0, w - args.tpm) for k, w in worst.items()},
        "max_overshoot": max(max(0, w - args.tpm) for w in worst.values()),
        "in_flight_bound": 0 if not args.no_max_tokens else bound,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__)
    p.add_argument("--seconds", type=float, default=150)
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--keys", type=int, default=10)
    p.add_argument("--tpm", type=int, default=3000)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--no-max-tokens", action="store_true")
    p.add_argument("--out", type=Path, default=stack.REPO / "bench/results/accuracy.jsonl")
    args = p.parse_args(argv)
    keys = [f"accuracy-key-{i:02d}-0123456789abcdef" for i in range(args.keys)]
    with tempfile.TemporaryDirectory(prefix="tollway-accuracy-") as name:
        tmp = Path(name)
        with (
            stack.redis_server(tmp) as store,
            stack.mock_backend(tmp, ttft_ms=0, itl_ms=5, tokens=COMPLETION) as mock,
        ):
            config = tmp / "gateway.yaml"
            config.write_text(_config(mock.url, store.url, args.tpm, keys))
            port = procs.free_port()
            cmd = [sys.executable, "-m", "proxy", "serve", "--config", str(config)]
            cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(args.workers)]
            log = tmp / "gateway.log"
            with procs.running(cmd, "0-1", log, stack.child_env()) as proc:
                base = f"http://127.0.0.1:{port}"
                procs.wait_ready(proc, base + "/readyz", None, "", log, timeout=60)
                result = asyncio.run(_load(args, base, keys, store.url))
    result.update(date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), env=environment(),
                  options=vars(args) | {"out": str(args.out)})  # fmt: skip
    print(json.dumps({k: v for k, v in result.items() if k != "env"}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as out:
        out.write(json.dumps(result, default=str) + "\n")
    return 0 if (args.no_max_tokens or result["max_overshoot"] == 0) else 1


if __name__ == "__main__":
    raise SystemExit(main())
