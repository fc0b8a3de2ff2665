"""Run the mock LLM backend (`proxy.mock_llm`) as a real Granian process for tests.

mock = start_mock(tokens=16)
try:
    client = openai.OpenAI(base_url=mock.url, api_key="x")
    ...
    assert mock.requests()[-1]["path"] == "/v1/chat/completions"
finally:
    mock.stop()
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class MockProc:
    """A running mock backend process and handles on its `/_mock` endpoints."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Any) -> None:
        self.proc = proc
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.url = self.base + "/v1"
        self._log = log

    def requests(self) -> list[dict[str, Any]]:
        """The requests the mock recorded, oldest first."""
        records: list[dict[str, Any]] = httpx.get(self.base + "/_mock/requests").json()
        return records

    def clear(self) -> None:
        """Forget the recorded requests."""
        httpx.delete(self.base + "/_mock/requests").raise_for_status()

    def faults(self, *rules: dict[str, Any]) -> None:
        """Set the mock's sticky fault rules (see proxy/mock_llm.py); none clears them."""
        httpx.put(self.base + "/_mock/faults", json=list(rules)).raise_for_status()

    @contextlib.contextmanager
    def fresh(self) -> Iterator[MockProc]:
        """The mock with no fault rules and no recorded requests, and no rules left after."""
        self.faults()
        self.clear()
        try:
            yield self
        finally:
            self.faults()

    def log(self) -> str:
        """What the process printed so far."""
        self._log.seek(0)
        return str(self._log.read().decode(errors="replace"))

    def stop(self) -> None:
        """Stop the process (and Granian's workers with it)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                # It runs in its own session, so this reaches only its workers.
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


def start_mock(
    port: int | None = None,
    ttft_ms: float = 0,
    itl_ms: float = 0,
    tokens: int = 16,
    content_safety_key: str | None = None,
) -> MockProc:
    """Start `proxy.mock_llm.run` in a subprocess; return once `GET /v1/models` answers."""
    port = port or free_port()
    code = (
        "from proxy.mock_llm import run; "
        f"run(port={port}, ttft_ms={ttft_ms!r}, itl_ms={itl_ms!r}, tokens={tokens!r}, "
        f"content_safety_key={content_safety_key!r})"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by MockProc.stop()
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    mock = MockProc(proc, port, log)
    try:
        _wait_ready(mock)
    except BaseException:
        mock.stop()
        raise
    return mock


def _wait_ready(mock: MockProc) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if mock.proc.poll() is not None:
            raise RuntimeError(f"mock LLM exited with {mock.proc.returncode}:\n{mock.log()}")
        try:
            if httpx.get(mock.url + "/models", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"mock LLM not ready after {START_TIMEOUT} s:\n{mock.log()}")
