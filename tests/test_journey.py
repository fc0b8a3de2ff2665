"""The newcomer's journey of issue 7, end to end with nothing prepared: `tollway import` makes
a config from scratch in front of a live `tollway mock-llm`, `tollway serve` runs it, and the
test console in Debian's Chromium fills in the all-access key with the admin key and streams a
chat completion, showing its usage. Then a subscription made through the admin API on that
gateway works on a second gateway sharing the same Redis, on the very next request.

Each step is the command or page a user would use; the time the whole journey took is
printed (a user-facing figure, not asserted: timing belongs to bench/).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from playwright.sync_api import Browser, expect

from tests.gatewayproc import GatewayProc, start_gateway
from tests.mockproc import ROOT, MockProc, start_mock
from tests.redisproc import RedisProc
from tests.test_console import Session

ADMIN_KEY = "journey-admin-0123456789abcdef"
TOKENS = 12


@pytest.fixture(scope="module")
def llm() -> Iterator[MockProc]:
    proc = start_mock(ttft_ms=50, itl_ms=40, tokens=TOKENS)
    yield proc
    proc.stop()


def tollway(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def imported_config(llm: MockProc, tmp_path: Path, store: str = "memory") -> str:
    """`tollway import` into a config file that does not exist yet; its text."""
    config = tmp_path / "tollway.yaml"
    done = tollway("import", "--name", "My LLM", "--url", llm.url, "--path", "/llm",
                   "--type", "openai", "--config", str(config))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "gpt-4o-mini" in done.stdout + done.stderr  # the probe reported the mock's models
    text = config.read_text()
    assert "apis:" in text and "/llm" in text
    return text.replace("store: memory", f"store: {store}")


def test_from_import_to_a_streamed_request_in_the_console(
    llm: MockProc,
    browser: Browser,
    tmp_path: Path,
) -> None:
    start = time.monotonic()
    text = imported_config(llm, tmp_path)
    gateway = start_gateway(text, env={"TOLLWAY_ADMIN_KEY": ADMIN_KEY})
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        session = Session(context.new_page(), gateway, tmp_path)
        page = session.open()
        session.pick("my-llm.chat-completions")
        page.get_by_text("Use the built-in all-access subscription").click()
        page.get_by_label("Admin key").fill(ADMIN_KEY)
        page.get_by_role("button", name="Fill in the key").click()
        expect(page.locator("#admin-status")).to_contain_text("Filled in the key")
        page.get_by_label("Stream").check()
        session.send()
        session.wait_done()
        took = time.monotonic() - start
        expect(page.locator("#status")).to_contain_text("200 OK")
        assert len((page.locator("#output").text_content() or "").split()) == TOKENS
        usage = session.usage()
        assert int(usage["completion_tokens"]) == TOKENS
        session.screenshot("journey.png", full_page=True)
        assert session.errors == []
        print(f"\nimport -> streamed reply in the console: {took:.1f} s")
    finally:
        context.close()
        gateway.stop()


def test_a_subscription_made_on_one_gateway_works_on_another_at_once(
    llm: MockProc, server: RedisProc, tmp_path: Path
) -> None:
    with server.client() as client:
        client.flushall()
    text = imported_config(llm, tmp_path, store=server.url)
    env = {"TOLLWAY_ADMIN_KEY": ADMIN_KEY}
    one: GatewayProc = start_gateway(text, env=env)
    try:
        two: GatewayProc = start_gateway(text, env=env)
        try:
            made = httpx.post(one.base + "/admin/subscriptions",
                              headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                              json={"id": "newcomer", "scope": "api:my-llm"})  # fmt: skip
            assert made.status_code == 201, made.text
            key = made.json()["primary-key"]
            client = openai.OpenAI(base_url=two.base + "/llm", api_key=key, max_retries=0)
            reply = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
            assert reply.usage is not None and reply.usage.completion_tokens == TOKENS
        finally:
            two.stop()
    finally:
        one.stop()
