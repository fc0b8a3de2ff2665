"""Pools, retries and circuit breakers against a real mock backend with sticky faults.

One mock process plays several backends: each member sends its own `x-member` header (as
its credentials), and the mock's fault rules match on it. A dead loopback port plays a
backend that is down.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from proxy import config as config_module
from proxy.app import Gateway
from tests.inprocess import run_app
from tests.mockproc import MockProc, free_port

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**CHAT, "stream": True}
BREAKER = (
    "{failure-condition: {count: %d, interval: 1m, status-code-ranges: [{min: 500, max: 599}],"
    " error-reasons: [connection, timeout]}, trip-duration: %s}"
)


@pytest.fixture
def backend(faulty: MockProc) -> MockProc:
    return faulty


def member(mock: MockProc, name: str, breaker: str = "", url: str = "") -> str:
    extra = f", circuit-breaker: {breaker}" if breaker else ""
    return (
        f"  - {{id: {name}, url: '{url or mock.url}', credentials: {{header: x-member, value: {name}}},"
        f" timeout: {{connect: 1s, read: 2s}}{extra}}}\n"
    )


def gateway_config(members: str, backend: str, pool: str = "") -> config_module.Config:
    return config_module.loads(
        f"backends:\n{members}{pool}"
        f"apis:\n  - {{id: chat, path: /openai, backend: {backend}, subscription-required: false}}\n"
        f"  - {{id: raw, path: /raw, type: passthrough, backend: {backend}, subscription-required: false}}\n"
    )


def two_members(mock: MockProc, services: str, extra: str = "") -> config_module.Config:
    """Members a and b on `mock` in a pool with `services` (and `extra` pool fields)."""
    pool = f"  - {{id: pool, type: pool, services: [{services}]{extra}}}\n"
    return gateway_config(member(mock, "a") + member(mock, "b"), "pool", pool)


def post_once(config: config_module.Config, body: dict[str, Any] = CHAT) -> httpx.Response:
    """One chat request through an in-process gateway on `config`."""

    async def scenario(client: httpx.AsyncClient, app: Gateway) -> httpx.Response:
        return await client.post("/openai/chat/completions", json=body)

    reply: httpx.Response = run_app(config, scenario)
    return reply


def post_many(config: config_module.Config, count: int) -> list[httpx.Response]:
    async def scenario(client: httpx.AsyncClient, app: Gateway) -> list[httpx.Response]:
        return [await client.post("/openai/chat/completions", json=CHAT) for _ in range(count)]

    replies: list[httpx.Response] = run_app(config, scenario)
    return replies


def served_by(mock: MockProc) -> list[str]:
    """The x-member of each request the mock saw, oldest first."""
    out = []
    for record in mock.requests():
        headers = {k.lower(): v for k, v in record["headers"]}
        out.append(headers.get("x-member", "?"))
    return out


def fail(name: str, status: int, times: int | None = None, **faults: str) -> dict[str, Any]:
    rule: dict[str, Any] = {"faults": {"status": str(status), **faults}, "when": {"x-member": name}}
    if times is not None:
        rule["times"] = times
    return rule


def metric(text: str, name: str, backend: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and f'tollway_backend_id="{backend}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- retries ----------------------------------------------------------------------------------


def test_a_5xx_is_retried_on_the_next_member(backend: MockProc) -> None:
    config = two_members(backend, "{id: a}, {id: b}", ", retry: {count: 2}")
    backend.faults(fail("a", 500))

    async def scenario(client: httpx.AsyncClient, app: Gateway) -> list[int]:
        replies = [await client.post("/openai/chat/completions", json=CHAT) for _ in range(6)]
        metrics = (await client.get("/metrics")).text
        assert metric(metrics, "tollway_backend_retries_total", "a") == 3
        return [r.status_code for r in replies]

    assert run_app(config, scenario) == [200] * 6
    # round robin sends every other request to a first; each of those goes on to b
    assert served_by(backend) == ["a", "b", "b", "a", "b", "b", "a", "b", "b"]


def test_a_pool_moves_a_429_to_the_next_member_without_a_retry_rule(backend: MockProc) -> None:
    config = two_members(backend, "{id: a, priority: 1}, {id: b, priority: 2}")
    backend.faults(fail("a", 429, **{"retry-after": "30"}))

    reply = post_once(config)
    assert reply.status_code == 200 and reply.json()["choices"]
    assert served_by(backend) == ["a", "b"]


def test_without_a_retry_rule_a_5xx_passes_through(backend: MockProc) -> None:
    config = two_members(backend, "{id: a, priority: 1}, {id: b, priority: 2}")
    backend.faults(fail("a", 503))

    reply = post_once(config)
    assert reply.status_code == 503 and reply.json()["error"]["message"] == "mock error 503"
    assert served_by(backend) == ["a"]


def test_the_same_backend_is_retried_after_its_retry_after(backend: MockProc) -> None:
    config = gateway_config(
        member(backend, "solo").replace("}}\n", "}, retry: {count: 2}}\n"), "solo"
    )
    backend.faults(fail("solo", 503, times=1, **{"retry-after": "1"}))

    reply = post_once(config)
    assert reply.status_code == 200
    first, second = backend.requests()
    assert first["status"] == 503 and second["status"] == 200
    assert second["started"] - first["finished"] >= 0.95  # it waited as it was asked


def test_a_retry_after_beyond_max_retry_after_returns_the_backends_reply(
    backend: MockProc,
) -> None:
    config = gateway_config(
        member(backend, "solo").replace("}}\n", "}, retry: {count: 3, max-retry-after: 2s}}\n"),
        "solo",
    )
    backend.faults(fail("solo", 429, **{"retry-after": "60"}))

    reply = post_once(config)
    assert reply.status_code == 429 and reply.headers["retry-after"] == "60"
    assert len(backend.requests()) == 1


def test_retries_stop_at_count_and_the_last_reply_passes_through(backend: MockProc) -> None:
    config = gateway_config(
        member(backend, "solo").replace("}}\n", "}, retry: {count: 2, interval: 10ms}}\n"),
        "solo",
    )
    backend.faults(fail("solo", 502))

    reply = post_once(config)
    assert reply.status_code == 502 and reply.json()["error"]["message"] == "mock error 502"
    assert len(backend.requests()) == 3


def test_a_connection_error_moves_to_a_live_member(backend: MockProc) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    config = gateway_config(
        member(backend, "down", url=dead) + member(backend, "up"),
        "pool",
        "  - {id: pool, type: pool, services: [{id: down, priority: 1}, {id: up, priority: 2}]}\n",
    )

    async def scenario(client: httpx.AsyncClient, app: Gateway) -> list[int]:
        return [(await client.post("/openai/chat/completions", json=CHAT)).status_code
                for _ in range(3)]  # fmt: skip

    assert run_app(config, scenario) == [200, 200, 200]
    assert served_by(backend) == ["up", "up", "up"]


def test_a_stream_is_retried_before_its_first_byte(backend: MockProc) -> None:
    config = two_members(
        backend, "{id: a, priority: 1}, {id: b, priority: 2}", ", retry: {count: 1}"
    )
    backend.faults(fail("a", 500))

    reply = post_once(config, STREAM)
    assert reply.status_code == 200 and reply.text.rstrip().endswith("data: [DONE]")
    assert served_by(backend) == ["a", "b"]


def test_a_stream_is_never_retried_after_its_first_byte(backend: MockProc) -> None:
    config = two_members(
        backend, "{id: a, priority: 1}, {id: b, priority: 2}", ", retry: {count: 1}"
    )
    backend.faults({"faults": {"close-after": "2"}, "when": {"x-member": "a"}})

    reply = post_once(config, STREAM)
    assert reply.status_code == 200
    events = [e for e in reply.text.split("\n\n") if e.strip()]
    assert json.loads(events[-1].removeprefix("data: "))["error"]["code"]
    assert served_by(backend) == ["a"]


def test_a_streamed_passthrough_body_is_not_replayed_a_buffered_one_is(backend: MockProc) -> None:
    config = two_members(
        backend, "{id: a, priority: 1}, {id: b, priority: 2}", ", retry: {count: 1}"
    )
    backend.faults(fail("a", 500))

    async def scenario(client: httpx.AsyncClient, app: Gateway) -> tuple[int, int]:
        got = await client.get("/raw/models")
        posted = await client.post("/raw/embeddings", content=b'{"input": "x"}')
        return got.status_code, posted.status_code

    assert run_app(config, scenario) == (200, 500)
    assert served_by(backend) == ["a", "b", "a"]


# -- circuit breakers -------------------------------------------------------------------------


def test_a_tripped_member_gets_no_requests_and_a_probe_closes_it(backend: MockProc) -> None:
    config = gateway_config(
        member(backend, "a", BREAKER % (2, "300ms")) + member(backend, "b"),
        "pool",
        "  - {id: pool, type: pool, services: [{id: a, priority: 1}, {id: b, priority: 2}]}\n",
    )
    backend.faults(fail("a", 500, times=2))

    async def scenario(client: httpx.AsyncClient, app: Gateway) -> list[int]:
        statuses = [(await client.post("/openai/chat/completions", json=CHAT)).status_code
                    for _ in range(4)]  # fmt: skip
        metrics = (await client.get("/metrics")).text
        assert metric(metrics, "tollway_backend_circuit_breaker_open", "a") == 1
        assert metric(metrics, "tollway_backend_circuit_breaker_trips_total", "a") == 1
        await asyncio.sleep(0.35)
        statuses += [(await client.post("/openai/chat/completions", json=CHAT)).status_code
                     for _ in range(2)]  # fmt: skip
        metrics = (await client.get("/metrics")).text
        assert metric(metrics, "tollway_backend_circuit_breaker_open", "a") == 0
        return statuses

    assert run_app(config, scenario) == [500, 500, 200, 200, 200, 200]
    # two failures trip a; b (priority 2) serves until the trip ends; a's probe succeeds
    assert served_by(backend) == ["a", "a", "b", "b", "a", "a"]


def test_every_member_tripped_is_503_with_the_soonest_retry_after(backend: MockProc) -> None:
    config = gateway_config(
        member(backend, "a", BREAKER % (1, "40s")) + member(backend, "b", BREAKER % (1, "7s")),
        "pool",
        "  - {id: pool, type: pool, services: [{id: a}, {id: b}]}\n",
    )
    backend.faults(fail("a", 500), fail("b", 500))

    first, second, third = post_many(config, 3)
    assert first.status_code == second.status_code == 500
    assert third.status_code == 503
    assert third.json()["error"]["code"] == "BackendUnavailable"
    assert third.headers["retry-after"] == "7"
    assert len(backend.requests()) == 2


def test_accept_retry_after_trips_for_the_backends_wait(backend: MockProc) -> None:
    breaker = (
        "{failure-condition: {count: 1, interval: 1m, status-code-ranges: [{min: 429, max: 429}]},"
        " trip-duration: 1h, accept-retry-after: true}"
    )
    config = gateway_config(member(backend, "solo", breaker), "solo")
    backend.faults(fail("solo", 429, **{"retry-after": "12"}))

    limited, refused = post_many(config, 2)
    assert limited.status_code == 429 and limited.headers["retry-after"] == "12"
    assert refused.status_code == 503 and refused.headers["retry-after"] in ("11", "12")


def test_a_dead_backend_trips_on_connection_errors(backend: MockProc) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    config = gateway_config(member(backend, "down", BREAKER % (2, "30s"), url=dead), "down")

    async def scenario(client: httpx.AsyncClient, app: Gateway) -> list[str]:
        replies = [await client.post("/openai/chat/completions", json=CHAT) for _ in range(3)]
        return [r.json()["error"]["code"] for r in replies]

    assert run_app(config, scenario) == [
        "BackendConnectionFailure", "BackendConnectionFailure", "BackendUnavailable",
    ]  # fmt: skip


def test_breaker_state_survives_a_reload(backend: MockProc, tmp_path: Path) -> None:
    config = gateway_config(member(backend, "solo", BREAKER % (1, "30s")), "solo")
    path = tmp_path / "tollway.yaml"
    path.write_text(msgspec.yaml.encode(config_module.to_builtins(config)).decode())
    backend.faults(fail("solo", 500, times=1))

    async def scenario(client: httpx.AsyncClient, app: Gateway) -> list[int]:
        statuses = [(await client.post("/openai/chat/completions", json=CHAT)).status_code]
        app.config_path = str(path)
        assert await app.reload()
        statuses.append((await client.post("/openai/chat/completions", json=CHAT)).status_code)
        return statuses

    assert run_app(config, scenario) == [500, 503]
