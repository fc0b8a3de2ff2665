"""Date, machine and versions, stored with every benchmark JSON line."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import subprocess
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

PACKAGES = ("tollway", "granian", "uvloop", "msgspec", "httptools")
TOOLS = {"nginx": ["nginx", "-v"], "wrk": ["wrk", "-v"]}


def cpu_model() -> str:
    text = Path("/proc/cpuinfo").read_text()
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match[1].strip() if match else platform.processor()


def tool_version(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except OSError:
        return "missing"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "missing"


def environment(packages: Sequence[str] = PACKAGES) -> dict[str, object]:
    """Date (UTC), cores, CPU, kernel, Python, package and tool versions."""
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        **{package.replace("-", "_"): version(package) for package in packages},
        "nginx": tool_version(TOOLS["nginx"]).removeprefix("nginx version: "),
        "wrk": tool_version(TOOLS["wrk"]).split(" [")[0],
        "hey": "hey (Debian) " + version_of_deb("hey"),
    }


def version_of_deb(name: str) -> str:
    out = tool_version(["dpkg-query", "-W", "-f=${Version}", name])
    return out if out and "no packages" not in out else "missing"
