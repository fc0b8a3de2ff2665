"""The command line: check-config, keys, failed starts, demo, and SIGHUP reload."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from proxy.config import hash_key, new_key
from tests.conftest import KEY, gateway_config
from tests.gatewayproc import start_gateway
from tests.mockproc import ROOT, MockProc, free_port


def tollway(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})  # fmt: skip


def test_check_config_accepts_the_shipped_configs() -> None:
    ok = tollway("check-config", "config/tollway.yaml", env={"OPENAI_API_KEY": "sk-test"})
    assert ok.returncode == 0 and "ok" in ok.stdout
    assert tollway("check-config", "config/demo.yaml").returncode == 0


def test_check_config_names_every_error_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "backends: [{id: b, url: 'http://x'}]\n"
        "apis:\n  - {id: a, path: /a, backend: b, policies: [{llm-token-limit: {tokens-per-minute: lots}}]}\n"
        "  - {id: c, path: /c, backend: nope}\n"
    )
    result = tollway("check-config", str(bad))
    assert result.returncode == 1
    assert "apis[0].policies[0].llm-token-limit.tokens-per-minute: expected int" in result.stderr


def test_keys_new_and_hash() -> None:
    made = tollway("keys", "new")
    key = made.stdout.strip()
    assert made.returncode == 0 and len(key) >= 32
    hashed = tollway("keys", "hash", key)
    assert hashed.stdout.strip() == hash_key(key)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", hashed.stdout.strip())
    assert tollway("keys", "new").stdout.strip() != key


def test_new_keys_never_start_with_a_dash_and_such_a_key_still_hashes() -> None:
    """A key starting with "-" reads as an option on a command line: CI once drew one
    (1 in 64) and `tollway keys hash KEY` printed nothing. Made keys avoid it; a key of the
    operator's own that starts with "-" hashes after "--"."""
    assert not any(new_key().startswith("-") for _ in range(2000))  # 1 - (63/64)^2000 ~ 1
    own = "-" + new_key()
    hashed = tollway("keys", "hash", "--", own)
    assert hashed.returncode == 0 and hashed.stdout.strip() == hash_key(own)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "no such config file"),
        ("apis: [", "line"),
        ("backends: [{id: b, url: 'http://x', credentials: {header: A, value: '${NOT_SET_ANYWHERE}'}}]\napis: []\n",
         "NOT_SET_ANYWHERE"),
    ],
)  # fmt: skip
def test_failed_start_is_one_clear_line(tmp_path: Path, content: str | None, expected: str) -> None:
    path = tmp_path / "tollway.yaml"
    if content is not None:
        path.write_text(content)
    result = tollway("serve", "--config", str(path), "--port", str(free_port()))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tollway: cannot start:") and expected in lines[0]


def test_demo_serves_the_openai_sdk() -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "demo", "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        key = _read_demo_key(proc)
        _wait_http(f"http://127.0.0.1:{port}/readyz")
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/openai", api_key=key, max_retries=0
        )
        reply = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.choices[0].message.content
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
        assert proc.stdout is not None
        proc.stdout.close()


def _read_demo_key(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        match = re.search(r"subscription key: (\S+)", line)
        if match:
            return match.group(1)
    raise AssertionError("the demo never printed its key")


def _wait_http(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} never answered")


def test_sighup_reloads_in_place_and_keeps_the_old_config_when_bad(mock: MockProc) -> None:
    base = gateway_config(mock.url)
    gw = start_gateway(base)
    try:
        new_key = "fresh-key-after-reload-0123"
        url = gw.base + "/openai/models"
        assert httpx.get(url, headers={"api-key": new_key}).status_code == 401
        gw.reload(base + f"  - id: fresh\n    scope: all-apis\n    primary-key: {new_key}\n")
        _until(lambda: httpx.get(url, headers={"api-key": new_key}).status_code == 200)
        gw.reload("apis: [this is not valid")
        _until(lambda: "config reload failed, keeping the old config" in gw.log())
        assert httpx.get(url, headers={"api-key": new_key}).status_code == 200
        assert httpx.get(url, headers={"api-key": KEY}).status_code == 200
        assert "Respawning" not in gw.log()  # reloaded inside the worker, not by restarting it
    finally:
        gw.stop()


def _until(check: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_check_config_refuses_a_missing_tokenizer_file(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "backends: [{id: b, url: 'http://127.0.0.1:9/v1'}]\n"
        "apis: [{id: a, path: /a, backend: b, subscription-required: false}]\n"
        f"tokenizers: {{'llama*': 'hf:{tmp_path}/nope/tokenizer.json'}}\n"
    )
    result = tollway("check-config", str(config))
    assert result.returncode == 1
    assert (
        f"tokenizers['llama*']: {tmp_path}/nope/tokenizer.json: no such tokenizer.json file"
        in result.stderr
    )
