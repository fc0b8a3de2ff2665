"""The soak: mixed load with faults for a long time; the gateway's memory, sockets and tasks
must stay flat.

    python -m bench.soak                    # 30 minutes (the RESULTS.md figures)
    python -m bench.soak --duration 120     # a short look

One `tollway serve` worker on the gateway core, in front of a pool of two `tollway mock-llm`
members (one mock process, told apart by the `x-member` credential its fault rules match)
and a dead third member, with circuit breakers, retries, an `llm-token-limit` on a real
Redis and the default metrics. The load (asyncio + httpx, on the load core with the mock
and Redis) keeps `--concurrency` clients busy: half the requests stream, 5 % of the streams
leave after their first event. Every minute the faults change, in turn:

    calm · member a answers 500 (200 times) · member b answers 429 Retry-After: 1 (100) ·
    member a hangs past the read timeout (40) · a fifth of the streams leave early

and halfway through Redis is killed and restarted. Every 10 s it samples the worker's RSS,
its sockets not held by a backend connection pool, its asyncio tasks (`/metrics`), the
backend connections and the answers so far. The baseline is taken idle after 5 s of calm
load (so the connections to Redis and the mock exist); at the end the load stops and it
checks that tasks and sockets are back at that baseline. Results: printed, and one JSON line in
bench/results/soak.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench import machine, procs, stack

KEY = "soak-key-0123456789abcdef"
PHASES = ("calm", "a-500", "b-429", "a-hang", "leave")
PHASE_SECONDS = 60.0
SAMPLE_SECONDS = 10.0


def config(mock: str, redis: str) -> str:
    breaker = (
        "{failure-condition: {count: 5, interval: 10s, status-code-ranges: [{min: 500, max: 599}],"
        " error-reasons: [connection, timeout]}, trip-duration: 2s}"
    )
    dead = f"http://127.0.0.1:{procs.free_port()}/v1"

    def member(name: str, url: str) -> str:
        return (f"  - {{id: {name}, url: '{url}', credentials: {{header: x-member, value: {name}}},"
                f" timeout: {{connect: 1s, read: 1s}}, circuit-breaker: {breaker}}}\n")  # fmt: skip

    return (
        f'gateway: {{store: "{redis}"}}\ntelemetry: {{access-log: "off"}}\nbackends:\n'
        + member("a", mock) + member("b", mock) + member("c", dead)
        + "  - {id: pool, type: pool, services: [{id: a}, {id: b}, {id: c, priority: 2}],"
        " retry: {count: 2, max-retry-after: 2s}}\n"
        "apis:\n  - id: chat\n    path: /openai\n    backend: pool\n    policies:\n"
        "      - llm-token-limit: {counter-key: soak, tokens-per-minute: 1000000000}\n"
        f"subscriptions:\n  - {{id: soak, scope: all-apis, primary-key: {KEY}}}\n"
    )  # fmt: skip


class Load:
    """`concurrency` clients in a loop until stopped; counts every answer."""

    def __init__(self, base: str, concurrency: int):
        self.base, self.concurrency = base, concurrency
        self.leave_share = 0.05
        self.answers: collections.Counter[str] = collections.Counter()
        self.no_answer: collections.Counter[str] = collections.Counter()
        self.running = True

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=self.concurrency * 2)
        async with httpx.AsyncClient(
            base_url=self.base, headers={"api-key": KEY}, timeout=30, limits=limits
        ) as client:
            await asyncio.gather(*(self._client(client, i) for i in range(self.concurrency)))

    async def _client(self, client: httpx.AsyncClient, n: int) -> None:
        rng = random.Random(n)
        i = 0
        while self.running:
            i += 1
            stream = rng.random() < 0.5
            body = {"model": "gpt-4o-mini", "max_tokens": 64, "stream": stream,
                    "messages": [{"role": "user", "content": f"soak {n} {i}"}]}  # fmt: skip
            try:
                if stream:
                    await self._stream(client, body, rng.random() < self.leave_share)
                else:
                    reply = await client.post("/openai/chat/completions", json=body)
                    self.answers[str(reply.status_code)] += 1
            except httpx.HTTPError as exc:
                self.no_answer[type(exc).__name__] += 1

    async def _stream(self, client: httpx.AsyncClient, body: dict[str, Any], leave: bool) -> None:
        async with client.stream("POST", "/openai/chat/completions", json=body) as reply:
            async for chunk in reply.aiter_raw():
                if leave:
                    self.answers["left"] += 1
                    return  # closing the response drops the connection mid-stream
                del chunk
            self.answers[str(reply.status_code)] += 1


def worker_sample(gateway: Any, metrics_url: str) -> dict[str, float]:
    """RSS of the gateway's processes, their sockets outside the backend pools, the worker's
    tasks and backend connections."""
    text = httpx.get(metrics_url, timeout=10).text
    gauges: dict[str, float] = collections.defaultdict(float)
    for line in text.splitlines():
        for name in ("tollway_process_tasks", "tollway_backend_connections"):
            if line.startswith((name + " ", name + "{")):
                gauges[name] += float(line.rsplit(" ", 1)[1])
    sockets = 0
    for entry, _ in procs.group_members(gateway.pid):
        with contextlib.suppress(psutil.Error, ValueError):  # gone meanwhile
            sockets += len(psutil.Process(int(entry.name)).net_connections(kind="tcp"))
    return {
        "rss_mib": round(sum(stack.rss_mib(gateway.pid)), 2),  # the worker and its supervisor
        "tasks": gauges["tollway_process_tasks"],
        "backend_connections": gauges["tollway_backend_connections"],
        "sockets_untracked": sockets - gauges["tollway_backend_connections"],
    }


def set_phase(mock_base: str, phase: str, load: Load) -> None:
    rules: list[dict[str, Any]] = []
    if phase == "a-500":
        rules = [{"faults": {"status": "500"}, "when": {"x-member": "a"}, "times": 200}]
    elif phase == "b-429":
        rules = [{"faults": {"status": "429", "retry-after": "1"}, "when": {"x-member": "b"},
                  "times": 100}]  # fmt: skip
    elif phase == "a-hang":
        rules = [{"faults": {"delay-ms": "3000"}, "when": {"x-member": "a"}, "times": 40}]
    load.leave_share = 0.2 if phase == "leave" else 0.05
    httpx.put(mock_base + "/_mock/faults", json=rules, timeout=10).raise_for_status()


async def soak(args: argparse.Namespace, gateway: Any, gw_base: str, mock_base: str,
               redis: RedisControl) -> dict[str, Any]:  # fmt: skip
    metrics_url = gw_base + "/metrics"
    warm = Load(gw_base, args.concurrency)  # connections to the mock and Redis made
    warming = asyncio.create_task(warm.run())
    await asyncio.sleep(5)
    warm.running = False
    await warming
    await asyncio.sleep(5)
    baseline = await asyncio.to_thread(worker_sample, gateway, metrics_url)
    load = Load(gw_base, args.concurrency)
    runner = asyncio.create_task(load.run())
    samples: list[dict[str, Any]] = []
    started = time.monotonic()
    restarted = False
    phase_index = -1
    while (elapsed := time.monotonic() - started) < args.duration:
        if int(elapsed // PHASE_SECONDS) != phase_index:
            phase_index = int(elapsed // PHASE_SECONDS)
            await asyncio.to_thread(set_phase, mock_base, PHASES[phase_index % len(PHASES)], load)
        if not restarted and elapsed >= args.duration / 2:
            await asyncio.to_thread(redis.restart)
            restarted = True
        await asyncio.sleep(SAMPLE_SECONDS)
        sample: dict[str, Any] = await asyncio.to_thread(worker_sample, gateway, metrics_url)
        sample["t"] = round(time.monotonic() - started)
        sample["phase"] = PHASES[phase_index % len(PHASES)]
        sample["answers"] = sum(load.answers.values())
        sample["no_answer"] = sum(load.no_answer.values())
        samples.append(sample)
        print(json.dumps(sample), flush=True)
    load.running = False
    await runner
    await asyncio.to_thread(set_phase, mock_base, "calm", load)
    await asyncio.sleep(5)  # keep-alive connections of the load close; breakers cool down
    after = await asyncio.to_thread(worker_sample, gateway, metrics_url)
    return summarise(baseline, samples, after, load, args)


def summarise(baseline: dict[str, float], samples: list[dict[str, Any]], after: dict[str, float],
              load: Load, args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    window = max(1, len(samples) // 6)  # the first and last sixth (5 min of 30)
    early = samples[window : 2 * window] or samples[:1]  # after the warm-up sixth
    late = samples[-window:]
    rss_early = statistics.mean(s["rss_mib"] for s in early)
    rss_late = statistics.mean(s["rss_mib"] for s in late)
    hours = max((late[-1]["t"] - early[0]["t"]) / 3600, 1e-9)
    return {
        "duration_s": args.duration,
        "concurrency": args.concurrency,
        "answers": dict(load.answers),
        "no_answer": dict(load.no_answer),
        "requests_per_s": round(sum(load.answers.values()) / args.duration, 1),
        "rss_mib": {
            "idle": baseline["rss_mib"],
            "early": round(rss_early, 2),
            "late": round(rss_late, 2),
            "max": max(s["rss_mib"] for s in samples),
            "growth_per_hour": round((rss_late - rss_early) / hours, 2),
        },
        "tasks": {
            "idle": baseline["tasks"],
            "max": max(s["tasks"] for s in samples),
            "after": after["tasks"],
        },
        "sockets_untracked": {
            "idle": baseline["sockets_untracked"],
            "max": max(s["sockets_untracked"] for s in samples),
            "after": after["sockets_untracked"],
        },
        "backend_connections": {
            "max": max(s["backend_connections"] for s in samples),
            "after": after["backend_connections"],
        },
        "flat": after["tasks"] <= baseline["tasks"]
        and after["sockets_untracked"] <= baseline["sockets_untracked"]
        and not load.no_answer,
        "samples": samples,
    }


class RedisControl:
    """A Redis server on a fixed port that can be killed and started again."""

    def __init__(self, tmp: Path):
        self.tmp, self.port = tmp, procs.free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = self._start()

    def _start(self) -> Any:
        cmd = [stack._redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
               "--save", "", "--appendonly", "no", "--dir", str(self.tmp)]  # fmt: skip
        proc = procs.spawn(cmd, stack.LOAD_CPU, self.tmp / "redis.log")
        time.sleep(0.3)
        return proc

    def restart(self) -> None:
        self.proc.kill()
        self.proc.wait()
        time.sleep(2)  # the gateway serves on per-process counters meanwhile
        self.proc = self._start()

    def stop(self) -> None:
        procs.stop(self.proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=1800.0, help="seconds (default 1800)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--out", default="bench/results/soak.jsonl")
    args = parser.parse_args()
    os.sched_setaffinity(0, {int(stack.LOAD_CPU)})
    with tempfile.TemporaryDirectory(prefix="tollway-soak-") as name:
        tmp = Path(name)
        redis = RedisControl(tmp)
        try:
            with stack.mock_backend(tmp, ttft_ms=20, itl_ms=5, tokens=32) as mock:
                mock_base = mock.url.removesuffix("/v1")
                path = tmp / "soak.yaml"
                path.write_text(config(mock.url, redis.url))
                port = procs.free_port()
                cmd = [sys.executable, "-m", "proxy", "serve", "--config", str(path),
                       "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
                base = f"http://127.0.0.1:{port}"
                log = tmp / "gateway.log"
                with procs.running(cmd, stack.GATEWAY_CPU, log, stack.child_env()) as gateway:
                    procs.wait_ready(gateway, base + "/readyz", None, "", log, timeout=30)
                    result = asyncio.run(soak(args, gateway, base, mock_base, redis))
        finally:
            redis.stop()
    result.update(date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  machine=machine.environment())  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as out:
        out.write(json.dumps(result) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))


if __name__ == "__main__":
    main()
