"""llm-token-limit through the gateway (SPEC §6): refusals, headers, several policies, and
every exit path settling exactly once. The gateway runs in-process (so the test can read
its counters) in front of a real mock backend process; the store contract itself is
tests/test_limits.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from proxy import config as config_module
from proxy.app import Gateway, create_app
from proxy.limits.base import Limit
from tests.inprocess import run_app
from tests.mockproc import MockProc, free_port, start_mock

KEY = "token-limit-key-0123456789abcdef"
KEY_B = "token-limit-key-b-0123456789abcdef"
HEADERS = {"api-key": KEY}
TOKENS = 16  # completion tokens the mock writes per reply
# chat()'s prompt as the gateway estimates it with o200k_base: 3 per message + "user" (1)
# + "hello there" (2) + 3 to prime the reply
PROMPT = 3 + 1 + 2 + 3


@pytest.fixture(scope="module")
def mock() -> Iterator[MockProc]:
    proc = start_mock(tokens=TOKENS, itl_ms=5)
    yield proc
    proc.stop()


def make_config(mock_url: str, policies: str, read_timeout: str = "3s") -> config_module.Config:
    dead = free_port()
    return config_module.loads(f"""
backends:
  - {{id: mock, url: "{mock_url}", timeout: {{connect: 1s, read: {read_timeout}}}}}
  - {{id: dead, url: "http://127.0.0.1:{dead}/v1"}}
apis:
  - id: chat
    path: /openai
    backend: mock
    policies:
{policies}
  - id: dead
    path: /dead
    backend: dead
    policies:
{policies}
subscriptions:
  - {{id: team-a, display-name: Team A, scope: all-apis, primary-key: {KEY}}}
  - {{id: team-b, scope: all-apis, primary-key: {KEY_B}}}
""")


RATE = """      - llm-token-limit:
          counter-key: "{subscription.id}"
          tokens-per-minute: %d
          remaining-tokens-header-name: x-ratelimit-remaining-tokens
          tokens-consumed-header-name: x-tokens-consumed
"""
QUOTA = """      - llm-token-limit:
          counter-key: "{subscription.id}"
          token-quota: %d
          token-quota-period: daily
          remaining-quota-tokens-header-name: x-quota-remaining-tokens
"""


def chat(content: str = "hello there", **fields: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": content}], **fields}


async def used(
    app: Gateway, key: str, tpm: int | None = None, quota: int | None = None
) -> tuple[int, int]:
    """(tokens in the window, tokens this period) of counter `key`."""
    return await app.limiter.usage(Limit(key, tpm, quota, "daily"))


# -- refusals and headers ------------------------------------------------------------------


def test_success_charges_the_backends_usage_and_says_so(mock: MockProc) -> None:
    async def scenario(client: httpx.AsyncClient, app: Gateway) -> None:
        reply = await client.post(
            "/openai/chat/completions", json=chat(max_tokens=50), headers=HEADERS
        )
        assert reply.status_code == 200
        total = reply.json()["usage"]["total_tokens"]
        assert reply.headers["x-tokens-consumed"] == str(total)
        assert reply.headers["x-ratelimit-remaining-tokens"] == str(10_000 - total)
        assert await used(app, "team-a", 10_000) == (total, 0)

    run_app(make_config(mock.url, RATE % 10_000), scenario)


def test_rate_refusal_is_429_with_exact_retry_after_and_no_charge(mock: MockProc) -> None:
    async def scenario(client: httpx.AsyncClient, app: Gateway) -> None:
        first = await client.post("/openai/chat/completions", json=chat(), headers=HEADERS)
        assert first.status_code == 200
        charged = first.json()["usage"]["total_tokens"]
        # 1000 - charged tokens are left; this request reserves its prompt plus 990
        refused = await client.post(
            "/openai/chat/completions", json=chat(max_tokens=990), headers=HEADERS
        )
        assert refused.status_code == 429
        body = refused.json()["error"]
        assert body["code"] == "TokenLimitExceeded"
        seconds = int(refused.headers["retry-after"])
        assert 60 <= seconds <= 61  # the first charge leaves the window 60-61 s after it was made
        assert body["message"] == f"Token limit is exceeded. Try again in {seconds} seconds."
        assert refused.headers["x-ratelimit-remaining-tokens"] == str(1000 - charged)
        assert await used(app, "team-a", 1000) == (charged, 0)  # the refusal took nothing
        other = await client.post(
            "/openai/chat/completions", json=chat(), headers={"api-key": KEY_B}
        )
        assert other.status_code == 200  # a separate counter per subscription

    run_app(make_config(mock.url, RATE % 1000), scenario)


def test_a_request_larger_than_the_whole_limit_says_so(mock: MockProc) -> None:
    async def scenario(client: httpx.AsyncClient, app: Gateway) -> None:
        refused = await client.post(
            "/openai/chat/completions", json=chat(max_tokens=5000), headers=HEADERS
        )
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "60"
        assert "more than the limit of 1000 tokens per minute" in refused.json()["error"]["message"]

    run_app(make_config(mock.url, RATE % 1000), scenario)


def test_quota_refusal_is_403_until_the_period_ends(mock: MockProc) -> None:
    async def scenario(client: httpx.AsyncClient, app: Gateway) -> None:
        ok = await client.post("/openai/chat/completions", json=chat(), headers=HEADERS)
        assert ok.status_code == 200
        left = int(ok.headers["x-quota-remaining-tokens"])
        refused = await client.post(
            "/openai/chat/completions", json=chat(max_tokens=left), headers=HEADERS
        )
        assert refused.status_code == 403
        error = refused.json()["error"]
        assert error["code"] == "TokenQuotaExceeded"
        seconds = int(refused.headers["retry-after"])
        assert 0 < seconds <= 86_400  # until the UTC day ends
        assert error["message"] == f"Token quota is exceeded. Try again in {seconds} seconds."

    run_app(make_config(mock.url, QUOTA % 200), scenario)


def test_several_policies_all_enforced_first_refusal_leaves_nothing(mock: MockProc) -> None:
    policies = (
        (RATE % 10_000)
        + """      - llm-token-limit:
          counter-key: "org"
          tokens-per-minute: 300
"""
    )

    async def scenario(client: httpx.AsyncClient, app: Gateway) -> None:
        ok = await client.post(
            "/openai/chat/completions", json=chat(max_tokens=20), headers=HEADERS
        )
        assert ok.status_code == 200
        charged = ok.json()["usage"]["total_tokens"]
        assert await used(app, "team-a", 10_000) == (charged, 0)
        assert await used(app, "org", 300) == (charged, 0)
        # the org-wide policy refuses; the per-subscription reservation is released again
        refused = await client.post(
            "/openai/chat/completions", json=chat(max_tokens=290), headers={"api-key": KEY_B}
        )
        assert refused.status_code == 429
        assert await used(app, "team-b", 10_000) == (0, 0)
        assert await used(app, "org", 300) == (charged, 0)

    run_app(make_config(mock.url, policies), scenario)


# -- every exit path settles exactly once ----------------------------------------------------


def test_backend_error_charges_nothing(mock: MockProc) -> None:
    async def scenario(client: httpx.AsyncClient, app: Gateway) -> None:
        for status in (400, 500):
            reply = await client.post("/openai/chat/completions", json=chat(max_tokens=100),
                                      headers={**HEADERS, "x-mock-status": str(status)})  # fmt: skip
            assert reply.status_code == status
            assert reply.headers["x-tokens-consumed"] == "0"
        assert await used(app, "team-a", 10_000) == (0, 0)

    run_app(make_config(mock.url, RATE % 10_000), scenario)


def test_unreachable_backend_charges_nothing(mock: MockProc) -> None:
    async def scenario(client: httpx.AsyncClient, app: Gateway) -> None:
        reply = await client.post(
            "/dead/chat/completions", json=chat(max_tokens=100), headers=HEADERS
        )
        assert reply.status_code == 502
        assert await used(app, "team-a", 10_000) == (0, 0)

    run_app(make_config(mock.url, RATE % 10_000), scenario)


def test_timeout_charges_the_prompt_only(mock: MockProc) -> None:
    async def scenario(client: httpx.AsyncClient, app: Gateway) -> None:
        reply = await client.post("/openai/chat/completions", json=chat(max_tokens=100),
                                  headers={**HEADERS, "x-mock-delay-ms": "1500"})  # fmt: skip
        assert reply.status_code == 504
        assert await used(app, "team-a", 10_000) == (PROMPT, 0)

    run_app(make_config(mock.url, RATE % 10_000, read_timeout="500ms"), scenario)


def test_streamed_success_charges_the_reported_usage(mock: MockProc) -> None:
    async def scenario(client: httpx.AsyncClient, app: Gateway) -> None:
        body = chat(stream=True, max_tokens=100, stream_options={"include_usage": True})
        reply = await client.post("/openai/chat/completions", json=body, headers=HEADERS)
        assert reply.status_code == 200
        # the headers went out before any usage was known: they carry the reservation
        assert int(reply.headers["x-tokens-consumed"]) == PROMPT + 100
        events = [
            json.loads(line[6:]) for line in reply.text.splitlines() if line.startswith("data: {")
        ]
        usage = next(e["usage"] for e in events if e.get("usage"))
        assert await used(app, "team-a", 10_000) == (usage["total_tokens"], 0)

    run_app(make_config(mock.url, RATE % 10_000), scenario)


async def _disconnect_after(app: Gateway, events: int) -> list[bytes]:
    """Call the app directly with a streamed request; the client leaves after `events`
    body messages. Returns the body messages that were sent."""
    body = json.dumps(chat(stream=True, max_tokens=100)).encode()
    sent: list[bytes] = []
    gone = asyncio.Event()
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            sent.append(message["body"])
            if len(sent) >= events:
                gone.set()

    scope = {
        "type": "http", "method": "POST", "path": "/openai/chat/completions",
        "raw_path": b"/openai/chat/completions", "query_string": b"", "scheme": "http",
        "headers": [(b"api-key", KEY.encode()), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80), "http_version": "1.1",
    }  # fmt: skip
    await asyncio.wait_for(app(scope, receive, send), 10)
    return sent


def test_client_disconnect_mid_stream_charges_prompt_plus_tokens_produced(mock: MockProc) -> None:
    async def main() -> None:
        app = create_app(make_config(mock.url, RATE % 10_000))
        await app.startup()
        try:
            sent = await _disconnect_after(app, 4)
            window, _ = await used(app, "team-a", 10_000)
        finally:
            await app.shutdown()
        assert 1 <= len(sent) < TOKENS  # the stream was cut short
        # the prompt plus the tokens produced (counted from the deltas that went through,
        # one or two more may have been read before the cancel), not the 100 reserved
        assert PROMPT + len(sent) - 1 <= window <= PROMPT + len(sent) + 2

    asyncio.run(main())


def test_backend_reset_mid_stream_charges_prompt_plus_tokens_produced(mock: MockProc) -> None:
    async def scenario(client: httpx.AsyncClient, app: Gateway) -> None:
        reply = await client.post("/openai/chat/completions", json=chat(stream=True, max_tokens=100),
                                  headers={**HEADERS, "x-mock-close-after": "5"})  # fmt: skip
        assert reply.status_code == 200
        assert '"error"' in reply.text  # the stream ended with an error event
        window, _ = await used(app, "team-a", 10_000)
        # role chunk + 4 deltas of one token each arrived before the reset
        assert PROMPT + 3 <= window <= PROMPT + 5

    run_app(make_config(mock.url, RATE % 10_000), scenario)


def test_large_prompts_are_estimated_off_the_event_loop(
    mock: MockProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from proxy.policies import token_limit

    threads: list[str] = []
    real = token_limit.prompt_tokens

    def spy(*args: Any) -> int:
        threads.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(token_limit, "prompt_tokens", spy)

    async def scenario(client: httpx.AsyncClient, app: Gateway) -> None:
        loop_thread = threading.current_thread().name
        small = await client.post("/openai/chat/completions", json=chat(), headers=HEADERS)
        large = await client.post(
            "/openai/chat/completions", json=chat("word " * 8000), headers=HEADERS
        )
        assert (small.status_code, large.status_code) == (200, 200)
        assert threads[0] == loop_thread  # a small prompt is counted inline
        assert threads[1] != loop_thread  # a 40 KB one on a worker thread

    run_app(make_config(mock.url, RATE % 1_000_000), scenario)
