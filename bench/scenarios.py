"""The gateway benchmark's scenarios (bench/README.md explains each and the bar it serves).

Every scenario returns aggregated rows: one per (scenario, target, parameter), medians over
interleaved rounds, the direct-to-backend baseline measured in the same run. Row fields:
`scenario`, `target` ("direct" or "gateway:<profile>"), `key` (unique within a run),
the figures, and `rounds` (each round's figures).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import loadgen, procs, stack
from bench.measure import Guard, Row, added, merge_rounds, with_cpu

_WRK_FIELDS = (
    "req_s", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "server_cpu_us_per_req",
    "server_switches_per_req",
)  # fmt: skip


@dataclass
class Ctx:
    """What every scenario needs: options, a temp dir, the shared nginx, the guard."""

    args: Any
    tmp: Path
    nginx: stack.Service
    guard: Guard
    auth_script: Path
    open_script: Path
    store: str = "memory"  # the token-limit store profiles in stack.NEEDS_REDIS use
    otlp: str = ""  # the OTLP sink the auth-otlp profile exports to
    helpers: tuple[int, ...] = ()  # process groups of the run besides backend and gateway

    def log(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)


def _target(profile: str | None) -> str:
    if profile is None or profile == "floor":
        return profile or "direct"
    return f"gateway:{profile}"


@contextlib.contextmanager
def _serving(ctx: Ctx, profile: str | None, upstream: stack.Service) -> Iterator[stack.Service]:
    """The direct backend (profile None) or a fresh gateway with `profile` in front of it."""
    if profile is None:
        yield upstream
        return
    if profile == "floor":
        with stack.floor_app(ctx.tmp) as floor:
            yield floor
        return
    with stack.gateway(ctx.tmp, profile, upstream.url, store=ctx.store, otlp=ctx.otlp) as gw:
        headers = stack.AUTH_HEADERS if profile != "open" else stack.JSON_HEADERS
        stack.check_chat(gw.url, headers)
        yield gw


def _wrk_once(ctx: Ctx, service: stack.Service, profile: str | None, c: int, s: int) -> Row:
    script = ctx.open_script if profile in (None, "open") else ctx.auth_script
    url = service.url + "/chat/completions"

    def once() -> Row:
        if ctx.args.warmup:
            loadgen.wrk(url, c, ctx.args.warmup, script, stack.LOAD_CPU)
        return with_cpu(
            service.pgid,
            lambda r: int(r["requests"]),
            lambda: loadgen.wrk(url, c, s, script, stack.LOAD_CPU),
        )

    pgids = {ctx.nginx.pgid, service.pgid, *ctx.helpers}
    row = ctx.guard.run(once, tuple(pgids))
    ctx.log(
        f"  {_target(profile):16} c={c:<4} {row['req_s']:>9.1f} req/s  "
        f"p50 {row['p50_ms']:.3f} ms  p99 {row['p99_ms']:.3f} ms  errors {row['errors']}"
    )
    return row


def closed_loop(ctx: Ctx, scenario: str, profiles: list[str | None], conc: list[int]) -> list[Row]:
    """wrk at each concurrency against each target, interleaved rounds (order reversed in
    odd rounds), on nginx's fixed chat.completion."""
    raw: dict[tuple[str | None, int], list[Row]] = {}
    for rnd in range(ctx.args.rounds):
        for profile in profiles if rnd % 2 == 0 else profiles[::-1]:
            with _serving(ctx, profile, ctx.nginx) as service:
                for c in conc:
                    row = _wrk_once(ctx, service, profile, c, ctx.args.duration)
                    raw.setdefault((profile, c), []).append(row)
    rows = []
    for (profile, c), rounds in raw.items():
        row = merge_rounds(rounds, _WRK_FIELDS)
        row.update(scenario=scenario, target=_target(profile), concurrency=c)
        row["key"] = f"{scenario}/{row['target']}/c{c}"
        row["errors"] = sum(r["errors"] for r in rounds)
        if profile is not None and (None, c) in raw:
            base = raw[(None, c)]
            row["added_p50_ms"] = added(rounds, base, "p50_ms")
            row["added_p99_ms"] = added(rounds, base, "p99_ms")
        rows.append(row)
    return rows


def latency(ctx: Ctx) -> list[Row]:
    """Non-streamed chat at concurrency 1, auth on: added p50/p99 over nginx direct."""
    return closed_loop(ctx, "latency", [None, "auth"], [1])


def throughput(ctx: Ctx) -> list[Row]:
    """Non-streamed chat at concurrency 64, one worker, auth on."""
    return closed_loop(ctx, "throughput", [None, "auth"], [64])


def floor(ctx: Ctx) -> list[Row]:
    """Granian's own cost (bench/floor.py: a fixed reply or a paced stream, no upstream)
    beside the gateway's: at c=1 and c=64, and per streamed event at `--floor-streams`
    paced streams (the gateway in front of bench/paced.py)."""
    rows = closed_loop(ctx, "floor", [None, "floor", "auth"], [1, 64])
    n = ctx.args.floor_streams
    with stack.paced_backend(ctx.tmp, ttft_ms=20, itl_ms=20, tokens=64) as backend:
        for profile in ("floor", "auth"):
            with _serving(ctx, profile, backend) as service:
                row = ctx.guard.run(
                    lambda s=service, p=profile: _flatten(_stream_once(ctx, s, p, n)),
                    (backend.pgid, service.pgid),
                )
            ctx.log(_stream_line(profile, n, row))
            row.update(scenario="floor", target=_target(profile), streams=n)
            row["key"] = f"floor/{row['target']}/n{n}"
            rows.append(row)
    return rows


def sweep(ctx: Ctx) -> list[Row]:
    """Throughput by concurrency (the plot), one round."""
    saved, ctx.args.rounds = ctx.args.rounds, 1
    try:
        return closed_loop(ctx, "sweep", [None, "auth"], [1, 4, 16, 64, 256])
    finally:
        ctx.args.rounds = saved


def policy(ctx: Ctx) -> list[Row]:
    """Policy cost: each policy profile at concurrency 1 and 64 (stack.PROFILES); the Redis
    store for the profiles that need one runs on the load core."""
    with stack.redis_server(ctx.tmp) as redis:
        ctx.store, ctx.helpers = redis.url, (redis.pgid,)
        try:
            return closed_loop(ctx, "policy", [None, *stack.POLICY_PROFILES], [1, 64])
        finally:
            ctx.store, ctx.helpers = "memory", ()


def telemetry(ctx: Ctx) -> list[Row]:
    """Telemetry cost: none at all, the default (GenAI metrics for /metrics), and OTLP export
    of every span and the metrics (to bench/otlpsink.py on the load core), at c=1 and 64."""
    with stack.otlp_sink(ctx.tmp) as sink:
        ctx.otlp, ctx.helpers = sink.url, (sink.pgid,)
        try:
            return closed_loop(ctx, "telemetry", [None, *stack.TELEMETRY_PROFILES], [1, 64])
        finally:
            ctx.otlp, ctx.helpers = "", ()


def rate(ctx: Ctx) -> list[Row]:
    """Constant offered rate (hey), so a stall shows in the tail instead of slowing the load."""
    rows = []
    for offered in ctx.args.rates:
        raw: dict[str | None, list[Row]] = {}
        for rnd in range(ctx.args.rounds):
            for profile in (None, "auth") if rnd % 2 == 0 else ("auth", None):
                with _serving(ctx, profile, ctx.nginx) as service:
                    headers = stack.AUTH_HEADERS if profile else stack.JSON_HEADERS
                    url = service.url + "/chat/completions"

                    def once(
                        url: str = url, headers: dict[str, str] = headers, offered: int = offered
                    ) -> Row:
                        if ctx.args.warmup:  # connections, pools and caches warm
                            loadgen.hey(
                                url, offered, ctx.args.warmup, stack.CHAT_BODY, headers,
                                stack.LOAD_CPU, tmp=ctx.tmp,
                            )  # fmt: skip
                        return loadgen.hey(
                            url, offered, ctx.args.duration, stack.CHAT_BODY, headers,
                            stack.LOAD_CPU, tmp=ctx.tmp,
                        )  # fmt: skip

                    row = ctx.guard.run(once, (ctx.nginx.pgid, service.pgid))
                    ctx.log(
                        f"  {_target(profile):16} rate {offered:<6} {row['req_s']:>9.1f} req/s"
                        f"  p50 {row['p50_ms']:.3f} ms  p99 {row['p99_ms']:.3f} ms"
                    )
                    raw.setdefault(profile, []).append(row)
        for profile, rounds in raw.items():
            row = merge_rounds(rounds, ("req_s", "p50_ms", "p90_ms", "p99_ms", "p999_ms"))
            row.update(scenario="rate", target=_target(profile), offered_req_s=offered)
            row["key"] = f"rate/{row['target']}/r{offered}"
            row["errors"] = sum(r["errors"] for r in rounds)
            if profile is not None:
                row["added_p50_ms"] = added(rounds, raw[None], "p50_ms")
                row["added_p99_ms"] = added(rounds, raw[None], "p99_ms")
            rows.append(row)
    return rows


def _stream_once(ctx: Ctx, service: stack.Service, profile: str | None, n: int) -> Row:
    url = service.url + "/chat/completions"
    seconds = ctx.args.stream_duration
    cmd = ["taskset", "-c", stack.LOAD_CPU, sys.executable, "-m", "bench.streams", "--url", url]
    cmd += ["--streams", str(n), "--duration", f"{seconds:g}"]
    cmd += ["--warmup", f"{ctx.args.stream_warmup:g}", "--ramp", f"{ctx.args.stream_ramp:g}"]
    if profile not in (None, "open"):
        cmd += ["--header", f"api-key: {stack.KEYS[0]}"]

    cpu0, wall0 = procs.group_cpu_seconds(service.pgid), time.monotonic()
    done = subprocess.run(
        cmd, capture_output=True, text=True, check=True, timeout=seconds * 3 + 120
    )
    cpu, wall = procs.group_cpu_seconds(service.pgid) - cpu0, time.monotonic() - wall0
    row: Row = json.loads(done.stdout)
    # The server's busy share of a core, and its CPU per relayed event (events/s is steady
    # after the ramp, so events_per_s x wall slightly over-counts the ramp: a lower bound).
    row["server_cores"] = round(cpu / wall, 3)
    events = (row.get("events_per_s") or 0) * wall
    row["server_cpu_us_per_event"] = round(cpu / events * 1e6, 1) if events else None
    return row


_STREAM_FIELDS = ("ttft_p50_ms", "ttft_p99_ms", "gap_p50_ms", "gap_p99_ms", "max_stall_ms")


def _flatten(row: Row) -> Row:
    ttft, gap = row.get("ttft_ms") or {}, row.get("gap_ms") or {}
    row.update(
        ttft_p50_ms=ttft.get("p50"),
        ttft_p99_ms=ttft.get("p99"),
        gap_p50_ms=gap.get("p50"),
        gap_p99_ms=gap.get("p99"),
    )
    return row


@contextlib.contextmanager
def _paced_mock(ctx: Ctx) -> Iterator[stack.Service]:
    with stack.mock_backend(ctx.tmp, ttft_ms=20, itl_ms=20, tokens=64) as mock:
        yield mock


def streaming(ctx: Ctx) -> list[Row]:
    """Role chunk, 64 deltas paced 20 ms, [DONE] (mock-llm): added TTFT and inter-chunk gap
    at a light load (`--streams-light` concurrent streams)."""
    n = ctx.args.streams_light
    raw: dict[str | None, list[Row]] = {}
    with _paced_mock(ctx) as mock:
        for rnd in range(ctx.args.rounds):
            for profile in (None, "auth") if rnd % 2 == 0 else ("auth", None):
                with _serving(ctx, profile, mock) as service:
                    row = ctx.guard.run(
                        lambda s=service, p=profile: _flatten(_stream_once(ctx, s, p, n)),
                        (mock.pgid, service.pgid),
                    )
                    ctx.log(_stream_line(profile, n, row))
                    raw.setdefault(profile, []).append(row)
    rows = []
    for profile, rounds in raw.items():
        row = merge_rounds(rounds, (*_STREAM_FIELDS, "events_per_s"))
        row.update(scenario="streaming", target=_target(profile), streams=n)
        row["key"] = f"streaming/{row['target']}/n{n}"
        row["errors"] = sum(r.get("errors", 0) for r in rounds)
        if profile is not None:
            for field in ("ttft_p50_ms", "ttft_p99_ms", "gap_p99_ms"):
                row[f"added_{field}"] = added(rounds, raw[None], field)
        rows.append(row)
    return rows


def _stream_line(profile: str | None, n: int, row: Row) -> str:
    return (
        f"  {_target(profile):16} streams {n:<5} ttft p99 {row.get('ttft_p99_ms')} ms  "
        f"gap p99 {row.get('gap_p99_ms')} ms  max stall {row.get('max_stall_ms')} ms  "
        f"errors {row.get('errors')}  completed {row.get('completed')}"
        + ("  LOAD GENERATOR SATURATED" if row.get("saturated") else "")
    )


def max_streams(ctx: Ctx) -> list[Row]:
    """The most concurrent paced streams one worker carries without a stall over 50 ms.

    Each level runs against the direct backend (can the load core still feed it?) and then
    the gateway. Levels past the first failure still run, so the rows show where the worker
    saturates (`server_cores`, `server_cpu_us_per_event`); the scenario stops at the first
    level the load core cannot feed directly. The backend is bench/paced.py (~10 µs per
    event), since mock-llm's ~20 µs would saturate the load core first."""
    rows = []
    with stack.paced_backend(ctx.tmp, ttft_ms=20, itl_ms=20, tokens=64) as backend:
        for n in ctx.args.stream_levels:
            fed = True
            for profile in (None, "auth"):
                with _serving(ctx, profile, backend) as service:
                    row = ctx.guard.run(
                        lambda s=service, p=profile, n=n: _flatten(_stream_once(ctx, s, p, n)),
                        (backend.pgid, service.pgid),
                    )
                ctx.log(_stream_line(profile, n, row))
                ok = (row.get("max_stall_ms") or 1e9) <= 50.0 and not row.get("errors")
                row.update(
                    scenario="max_streams",
                    target=_target(profile),
                    streams=n,
                    key=f"max_streams/{_target(profile)}/n{n}",
                    no_stall=ok and not row.get("saturated"),
                )
                rows.append(row)
                if profile is None and (not ok or row.get("saturated")):
                    fed = False
                    break
            if not fed:
                break
    return rows


def soak(ctx: Ctx) -> list[Row]:
    """Memory: the worker's RSS idle, then every `--soak-step` requests up to `--soak`
    requests at concurrency 64; growth per 100k requests from a least-squares line over the
    second half (after pools and caches have filled)."""
    total, step = ctx.args.soak, ctx.args.soak_step
    with _serving(ctx, "auth", ctx.nginx) as gw:
        time.sleep(1.0)
        idle = stack.rss_mib(gw.pgid)
        samples: list[tuple[int, float]] = [(0, idle[0])]
        done, url = 0, gw.url + "/chat/completions"
        while done < total:
            seconds = max(1, round(step / max(ctx.args.soak_rate_guess, 1)))
            result = loadgen.wrk(url, 64, seconds, ctx.auth_script, stack.LOAD_CPU)
            done += int(result["requests"])
            samples.append((done, stack.rss_mib(gw.pgid)[0]))
            ctx.log(f"  soak {done:>9,} requests  worker RSS {samples[-1][1]:.1f} MiB")
    half = [s for s in samples if s[0] >= done / 2] or samples[-2:]
    growth = _slope(half) * 100_000
    row: Row = {
        "scenario": "soak",
        "target": "gateway:auth",
        "key": "soak/gateway:auth",
        "requests": done,
        "idle_rss_mib": round(idle[0], 1),
        "supervisor_rss_mib": round(idle[1], 1) if len(idle) > 1 else None,
        "end_rss_mib": round(samples[-1][1], 1),
        "growth_mib_per_100k": round(growth, 3),
        "samples": [[n, round(r, 2)] for n, r in samples],
    }
    return [row]


def _slope(points: list[tuple[int, float]]) -> float:
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    return sum((p[0] - mx) * (p[1] - my) for p in points) / sxx if sxx else 0.0


def workers(ctx: Ctx) -> list[Row]:
    """`--workers 2` against `--workers 1`, both allowed on both cores (nginx and wrk stay
    on core 0, so on a 2-core machine the second worker competes with the load)."""
    rows = []
    by_count: dict[int, list[Row]] = {}
    for rnd in range(ctx.args.rounds):
        for count in (1, 2) if rnd % 2 == 0 else (2, 1):
            with stack.gateway(ctx.tmp, "auth", ctx.nginx.url, workers=count, cpu="0-1") as gw:
                stack.check_chat(gw.url, stack.AUTH_HEADERS)
                row = _wrk_once(ctx, gw, "auth", 64, ctx.args.duration)
                by_count.setdefault(count, []).append(row)
    for count, rounds in by_count.items():
        row = merge_rounds(rounds, _WRK_FIELDS)
        row.update(scenario="workers", target=f"gateway:auth:w{count}", workers=count)
        row["key"] = f"workers/w{count}"
        rows.append(row)
    one, two = (next(r for r in rows if r["workers"] == w) for w in (1, 2))
    two["scaling"] = round(two["req_s"] / one["req_s"], 3) if one["req_s"] else None
    return rows


SCENARIOS: dict[str, Callable[[Ctx], list[Row]]] = {
    "latency": latency,
    "throughput": throughput,
    "streaming": streaming,
    "max_streams": max_streams,
    "soak": soak,
    "policy": policy,
    "telemetry": telemetry,
    "rate": rate,
    "sweep": sweep,
    "floor": floor,
    "workers": workers,
}
