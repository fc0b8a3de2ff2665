"""Run `tollway serve` (Granian) as a real process for end-to-end tests.

gw = start_gateway(config_text)
try:
    openai.OpenAI(base_url=gw.base + "/openai", api_key=KEY)...
finally:
    gw.stop()
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.mockproc import ROOT, free_port

START_TIMEOUT = 30.0


class GatewayProc:
    """A running gateway process, its config file and its output."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, config: Path, log: Any):
        self.proc = proc
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.config = config
        self._log = log

    def log(self) -> str:
        """Everything the process printed so far (access log and errors)."""
        self._log.seek(0)
        return str(self._log.read().decode(errors="replace"))

    def access_log(self) -> list[dict[str, Any]]:
        """The JSON access-log lines printed so far."""
        import json

        return [json.loads(line) for line in self.log().splitlines() if line.startswith('{"ts"')]

    def reload(self, config_text: str) -> None:
        """Rewrite the config file and send SIGHUP, as an operator would."""
        self.config.write_text(config_text)
        os.kill(self.proc.pid, signal.SIGHUP)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


def start_gateway(
    config_text: str, *, workers: int = 1, env: dict[str, str] | None = None
) -> GatewayProc:
    """Write `config_text` to a temp file and serve it; return once /readyz answers 200."""
    port = free_port()
    config = Path(tempfile.mkdtemp(prefix="tollway-test-")) / "tollway.yaml"
    config.write_text(config_text)
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by GatewayProc.stop()
    cmd = [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--host", "127.0.0.1",
           "--port", str(port), "--workers", str(workers)]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    gw = GatewayProc(proc, port, config, log)
    try:
        _wait_ready(gw)
    except BaseException:
        gw.stop()
        raise
    return gw


def _wait_ready(gw: GatewayProc) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if gw.proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {gw.proc.returncode}:\n{gw.log()}")
        try:
            if httpx.get(gw.base + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"gateway not ready after {START_TIMEOUT} s:\n{gw.log()}")
