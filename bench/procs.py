"""Process helpers for the benches: pinned spawn, stop by process group, readiness, CPU time.

Every process is started in its own session (process group = its pid) and is stopped by
that id only: SIGTERM to the group, then SIGKILL if it lingers.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on ``host`` a moment ago."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def spawn(
    cmd: Sequence[str], cpu: str, log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` pinned to ``cpu`` (``taskset -c``) in a new session, output to ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(
            ["taskset", "-c", cpu, *cmd],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """Stop ``proc`` and everything in its process group."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def running(
    cmd: Sequence[str], cpu: str, log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Context manager: :func:`spawn` on entry, :func:`stop` on exit (always)."""
    proc = spawn(cmd, cpu, log, env)
    try:
        yield proc
    finally:
        stop(proc)


def post(
    url: str, body: bytes | None, content_type: str, timeout: float = 5.0
) -> tuple[int, bytes]:
    """One blocking POST, or GET when ``body`` is None (readiness and correctness checks)."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ready(
    proc: subprocess.Popen[bytes],
    url: str,
    body: bytes | None,
    content_type: str,
    log: Path,
    timeout: float = 20.0,
) -> bytes:
    """Poll ``url`` with a POST (a GET if ``body`` is None) until it answers 200; return
    that body."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"process exited ({proc.returncode}); see {log}:\n"
                + log.read_text(errors="replace")[-2000:]
            )
        try:
            status, data = post(url, body, content_type, timeout=2.0)
        except OSError:
            time.sleep(0.1)
            continue
        if status == 200:
            return data
        raise RuntimeError(f"{url} answered {status}: {data[:200]!r}")
    raise TimeoutError(f"{url} not ready after {timeout} s; see {log}")


def group_members(pgid: int) -> Iterator[tuple[Path, list[str]]]:
    """(/proc/<pid>, stat fields after the command name) of each live process in ``pgid``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # state ppid pgrp ... utime(11) stime(12)
        if int(fields[2]) == pgid:
            yield entry, fields


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of the live processes in process group ``pgid``."""
    total = sum(int(f[11]) + int(f[12]) for _, f in group_members(pgid))
    return total / _CLK_TCK


def group_context_switches(pgid: int) -> int:
    """Context switches (voluntary + involuntary) of every thread in process group ``pgid``."""
    total = 0
    for entry, _ in group_members(pgid):
        try:
            tasks = list((entry / "task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                status = (task / "status").read_text()
            except OSError:
                continue
            total += sum(
                int(line.split()[1]) for line in status.splitlines() if "ctxt_switches" in line
            )
    return total


def machine_busy_seconds() -> float:
    """CPU seconds spent busy by the whole machine since boot (all cores, from /proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


def own_cpu_seconds(pgids: Sequence[int]) -> float:
    """CPU seconds of this process, its waited-for children, and the groups ``pgids``."""
    self_ = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = self_.ru_utime + self_.ru_stime + children.ru_utime + children.ru_stime
    return total + sum(group_cpu_seconds(pgid) for pgid in set(pgids))
