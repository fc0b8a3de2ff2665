"""Subscription keys: sources in SPEC order, scopes, products, open APIs, suspension.

In-process: the ASGI app is driven through httpx's ASGITransport against the real mock."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from proxy import config as config_module
from proxy.app import Gateway
from tests.conftest import KEY, KEY_B, SUSPENDED_KEY, gateway_config
from tests.inprocess import run_app as run_config
from tests.mockproc import MockProc

GOOD = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def run_app(
    mock: MockProc, scenario: Callable[[httpx.AsyncClient, Gateway], Awaitable[Any]]
) -> Any:
    return run_config(config_module.loads(gateway_config(mock.url)), scenario)


def _status(mock: MockProc, method: str, path: str, **kwargs: Any) -> tuple[int, str]:
    async def scenario(client: httpx.AsyncClient, app: Gateway) -> tuple[int, str]:
        response = await client.request(method, path, **kwargs)
        code = (
            response.json().get("error", {}).get("code", "") if response.status_code != 200 else ""
        )
        return response.status_code, code

    result: tuple[int, str] = run_app(mock, scenario)
    return result


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        ({"Ocp-Apim-Subscription-Key": KEY}, ""),
        ({"ocp-apim-subscription-key": KEY}, ""),
        ({"api-key": KEY}, ""),
        ({"Authorization": f"Bearer {KEY}"}, ""),
        ({"Authorization": f"bearer {KEY}"}, ""),
        ({}, f"?subscription-key={KEY}"),
    ],
)
def test_each_key_source_is_accepted(mock: MockProc, headers: dict[str, str], query: str) -> None:
    assert _status(
        mock, "POST", "/openai/chat/completions" + query, json=GOOD, headers=headers
    ) == (200, "")


@pytest.mark.parametrize(
    "headers",
    [
        # The first source in SPEC order decides, even when a later one holds a valid key.
        {"Ocp-Apim-Subscription-Key": "wrong-key-0123456789", "api-key": KEY},
        {"api-key": "wrong-key-0123456789", "Authorization": f"Bearer {KEY}"},
    ],
)
def test_sources_are_read_in_order(mock: MockProc, headers: dict[str, str]) -> None:
    assert _status(mock, "POST", "/openai/chat/completions", json=GOOD, headers=headers) == (
        401,
        "SubscriptionKeyInvalid",
    )


def test_header_beats_query(mock: MockProc) -> None:
    path = "/openai/chat/completions?subscription-key=wrong-key-0123456789"
    assert _status(mock, "POST", path, json=GOOD, headers={"api-key": KEY}) == (200, "")


def test_product_scoped_key_reaches_only_its_products_apis(mock: MockProc) -> None:
    # team-b is scoped to product "starter", which only the "chat" API (/openai) belongs to.
    assert _status(
        mock, "POST", "/openai/chat/completions", json=GOOD, headers={"api-key": KEY_B}
    ) == (200, "")
    assert _status(mock, "GET", "/passthrough/models", headers={"api-key": KEY_B}) == (
        401,
        "SubscriptionKeyInvalid",
    )


def test_suspended_key_is_refused(mock: MockProc) -> None:
    assert _status(mock, "GET", "/openai/models", headers={"api-key": SUSPENDED_KEY}) == (
        401,
        "SubscriptionKeyInvalid",
    )


def test_open_api_serves_anonymous_and_identifies_known_keys(mock: MockProc) -> None:
    async def scenario(client: httpx.AsyncClient, app: Gateway) -> None:
        anonymous = await client.post("/open/chat/completions", json=GOOD)
        assert anonymous.status_code == 200
        bad = await client.post(
            "/open/chat/completions", json=GOOD, headers={"api-key": "nope-0123456789abcdef"}
        )
        assert bad.status_code == 401  # a wrong explicit key is still an error
        own = await client.post(
            "/open/chat/completions", json=GOOD, headers={"Authorization": "Bearer sk-client-own"}
        )
        assert own.status_code == 200  # not ours: the client's own backend credential

    run_app(mock, scenario)


def test_keys_are_stored_hashed() -> None:
    from proxy.auth import KeyRing

    sub = config_module.Subscription(id="s", primary_key=config_module.hash_key(KEY))
    ring = KeyRing((sub,))
    assert ring.find(KEY.encode()) is sub
    assert ring.find(KEY.encode() + b"x") is None
    assert KEY.encode() not in repr(ring.__dict__).encode()
