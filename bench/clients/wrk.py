"""Run ``wrk`` (one thread, pinned) with a POST body and parse its ``--latency`` report."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_LATENCY = re.compile(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.MULTILINE)
_REQS = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h)", re.MULTILINE)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_NON2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def write_post_script(path: Path, body: bytes, content_type: str) -> Path:
    """Write a wrk Lua script that POSTs ``body`` with ``content_type``."""
    lua_body = "".join(f"\\{b:03d}" for b in body)
    path.write_text(
        'wrk.method = "POST"\n'
        f'wrk.body = "{lua_body}"\n'
        f'wrk.headers["Content-Type"] = "{content_type}"\n'
    )
    return path


def parse(text: str) -> dict[str, float | int]:
    """Extract req/s, p50/p99 (ms), request count and error counts from wrk's output."""
    latency = {m[1]: float(m[2]) * _UNITS[m[3]] for m in _LATENCY.finditer(text)}
    reqs, rps = _REQS.search(text), _RPS.search(text)
    if not (reqs and rps and "50" in latency and "99" in latency):
        raise ValueError(f"unparsable wrk output:\n{text}")
    socket_errors = _SOCKET.search(text)
    non2xx = _NON2XX.search(text)
    return {
        "req_s": float(rps[1]),
        "p50_ms": round(latency["50"], 4),
        "p99_ms": round(latency["99"], 4),
        "requests": int(reqs[1]),
        "non2xx": int(non2xx[1]) if non2xx else 0,
        "socket_errors": sum(map(int, socket_errors.groups())) if socket_errors else 0,
    }


def run(
    url: str, connections: int, seconds: int, script: Path, cpu: str = "0"
) -> dict[str, float | int]:
    """Run wrk, one thread pinned to ``cpu``, for ``seconds`` (whole: wrk takes no fractions)."""
    opts = f"-t1 -c{connections} -d{seconds}s --timeout 5s --latency -s {script} {url}"
    cmd = ["taskset", "-c", cpu, "wrk", *opts.split()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=True)
    return parse(done.stdout)
