"""Lifespan: pools opened at start-up and closed at shutdown; a failed start is reported."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy import config as config_module
from proxy.app import create_app
from proxy.dispatch import Backends
from tests.conftest import gateway_config

CONFIG = config_module.loads(gateway_config("http://127.0.0.1:9/v1"))


async def _lifespan(app: Any, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for message in messages:
        inbox.put_nowait(message)
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "lifespan"}, inbox.get, send)
    return sent


def test_startup_and_shutdown_open_and_close_the_pools() -> None:
    app = create_app(CONFIG)
    sessions: list[Any] = []

    async def run() -> list[dict[str, Any]]:
        sent = await _lifespan(app, [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
        return sent

    original = Backends.open

    async def spy(self: Backends) -> None:
        await original(self)
        sessions.extend(u._pool for u in self._singles.values())

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Backends, "open", spy)
        sent = asyncio.run(run())
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert sessions and all(s is not None and s.closed for s in sessions)


def test_failed_startup_is_reported_not_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(self: Backends) -> None:
        raise RuntimeError("tokenizer file missing: /models/x/tokenizer.json")

    monkeypatch.setattr(Backends, "open", broken)
    app = create_app(CONFIG)
    sent = asyncio.run(_lifespan(app, [{"type": "lifespan.startup"}]))
    assert sent == [
        {
            "type": "lifespan.startup.failed",
            "message": "tollway: tokenizer file missing: /models/x/tokenizer.json",
        }
    ]
    assert app.ready is False
