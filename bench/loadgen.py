"""The compiled load generators: `wrk` closed-loop and `hey` at a constant rate.

wrk (one thread, pinned) keeps N connections busy back to back; its Lua `done()` hook prints
the latency distribution at fixed percentiles (microsecond resolution, for the CDF plots).
hey sends at a fixed total rate spread over many workers, so a slow response does not slow
the offered load much (coordinated omission is bounded by the worker count: with more
workers than rate x latency, each worker's ticker keeps its own schedule); every response
time is kept (`-o csv`) and the percentiles are computed here.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
from pathlib import Path
from typing import Any

# The percentiles wrk reports (the CDF's points); 50 and 99 are the headline ones.
PERCENTILES = (
    *range(1, 100),
    99.5,
    99.9,
    99.99,
    100,
)

_DONE_HOOK = """
done = function(summary, latency, requests)
  local points = {}
  for _, p in ipairs({%s}) do
    points[#points + 1] = string.format('"%%g":%%d', p, latency:percentile(p))
  end
  local e = summary.errors
  io.write(string.format(
    'TOLLWAY {"requests":%%d,"duration_us":%%d,"status_errors":%%d,"socket_errors":%%d,' ..
    '"bytes":%%d,"pct_us":{%%s}}\\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    summary.bytes, table.concat(points, ",")))
%s
end
"""


def done_hook(then: str = "") -> str:
    """wrk's `done` function printing the TOLLWAY summary line `wrk()` reads, then the Lua
    statements `then` (a script printing more lines of its own)."""
    return _DONE_HOOK % (", ".join(f"{p:g}" for p in PERCENTILES), then)


def lua_string(data: bytes) -> str:
    """`data` as a Lua string literal (every byte escaped)."""
    return '"' + "".join(f"\\{b:03d}" for b in data) + '"'


def write_wrk_script(path: Path, method: str, body: bytes, headers: dict[str, str]) -> Path:
    """A wrk Lua script sending `method` with `body` and `headers`, reporting percentiles."""
    lines = [f'wrk.method = "{method}"', f"wrk.body = {lua_string(body)}"]
    lines += [
        f"wrk.headers[{lua_string(k.encode())}] = {lua_string(v.encode())}"
        for k, v in headers.items()
    ]
    lines.append(done_hook())
    path.write_text("\n".join(lines))
    return path


def wrk(url: str, connections: int, seconds: int, script: Path, cpu: str) -> dict[str, object]:
    """Closed loop: wrk, one thread pinned to `cpu`, `connections` busy for `seconds`."""
    raw = run_wrk(url, connections, seconds, script, cpu)["TOLLWAY"]
    cdf = sorted((float(p), us / 1000.0) for p, us in raw["pct_us"].items())
    return {**wrk_summary(raw), "cdf_ms": [[p, v] for p, v in cdf]}


def run_wrk(url: str, connections: int, seconds: int, script: Path, cpu: str) -> dict[str, Any]:
    """Run wrk (one thread pinned to `cpu`) and return what its script printed: each
    `TOLLWAY... <json>` line of stdout by its tag; `TOLLWAY` (done_hook's summary) is always
    there, or this raises."""
    opts = f"-t1 -c{connections} -d{seconds}s --timeout 10s -s {script} {url}"
    done = subprocess.run(
        ["taskset", "-c", cpu, "wrk", *opts.split()],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    )
    found: dict[str, Any] = {}
    for line in done.stdout.splitlines():
        tag, _, payload = line.partition(" ")
        if tag.startswith("TOLLWAY"):
            found[tag] = json.loads(payload)
    if "TOLLWAY" not in found:
        raise RuntimeError(f"wrk printed no summary:\n{done.stdout}\n{done.stderr}")
    return found


def wrk_summary(raw: dict[str, Any]) -> dict[str, object]:
    """Throughput, errors and latency percentiles (ms) of done_hook's `TOLLWAY` summary."""
    pct = {float(k): v / 1000.0 for k, v in raw["pct_us"].items()}
    return {
        "req_s": round(raw["requests"] / (raw["duration_us"] / 1e6), 1),
        "requests": raw["requests"],
        "errors": raw["status_errors"] + raw["socket_errors"],
        "p50_ms": pct[50.0],
        "p90_ms": pct[90.0],
        "p99_ms": pct[99.0],
        "p999_ms": pct[99.9],
        "max_ms": pct[100.0],
    }


def hey(
    url: str,
    rate: int,
    seconds: int,
    body: bytes,
    headers: dict[str, str],
    cpu: str,
    workers: int = 16,
    tmp: Path | None = None,
) -> dict[str, object]:
    """Open-ish loop: `rate` requests per second in total from `workers` hey workers.

    hey's workers tick in lockstep, so the load arrives as bursts of `workers` requests every
    `workers / rate` seconds; 16 keeps the bursts small while leaving headroom for a slow
    response (each worker has one request in flight)."""
    per_worker = max(rate / workers, 0.01)
    body_file = (tmp or Path("/tmp")) / f"hey-body-{id(body)}.json"
    body_file.write_bytes(body)
    cmd = ["taskset", "-c", cpu, "hey", "-z", f"{seconds}s", "-c", str(workers)]
    cmd += ["-q", f"{per_worker:g}", "-m", "POST", "-D", str(body_file), "-o", "csv", "-t", "10"]
    for name, value in headers.items():
        if name.lower() == "content-type":
            cmd += ["-T", value]
        else:
            cmd += ["-H", f"{name}: {value}"]
    done = subprocess.run(
        [*cmd, url], capture_output=True, text=True, timeout=seconds + 60, check=True
    )
    times: list[float] = []
    errors = 0
    for row in csv.DictReader(io.StringIO(done.stdout)):
        if row.get("status-code") != "200":
            errors += 1
            continue
        times.append(float(row["response-time"]) * 1000.0)
    if not times:
        raise RuntimeError(f"hey recorded no successful request:\n{done.stderr[-2000:]}")
    times.sort()
    return {
        "offered_req_s": rate,
        "req_s": round(len(times) / seconds, 1),
        "requests": len(times),
        "errors": errors,
        "p50_ms": _pick(times, 50),
        "p90_ms": _pick(times, 90),
        "p99_ms": _pick(times, 99),
        "p999_ms": _pick(times, 99.9),
        "max_ms": times[-1],
        "cdf_ms": [[p, _pick(times, p)] for p in PERCENTILES],
    }


def _pick(sorted_values: list[float], percentile: float) -> float:
    index = min(len(sorted_values) - 1, int(len(sorted_values) * percentile / 100.0))
    return round(sorted_values[index], 4)
