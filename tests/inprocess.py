"""Drive the gateway's ASGI app in-process through httpx's ASGITransport (buffers responses)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from proxy.app import Gateway, create_app
from proxy.config import Config


def run_app(
    config: Config, scenario: Callable[[httpx.AsyncClient, Gateway], Awaitable[Any]]
) -> Any:
    """Start the app (its lifespan work), run `scenario` with a client on it, shut it down."""

    async def main() -> Any:
        app = create_app(config)
        await app.startup()
        try:
            transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
                return await scenario(client, app)
        finally:
            await app.shutdown()

    return asyncio.run(main())
