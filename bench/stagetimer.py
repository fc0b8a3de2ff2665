"""Stage timers for `python -m bench.stages`, installed in the gateway it starts (through
bench/stagehook/sitecustomize.py on PYTHONPATH): wrappers around the semantic cache's stages
and the request handler, so the product's code carries no timers.

Each wrapper adds its call's duration (perf_counter) to a list; so does every collection of
the cyclic garbage collector, by generation (`gc.callbacks`). SIGUSR1 clears the lists
(after the warm-up); SIGUSR2 writes `{stage: [seconds, ...]}` as JSON to
$TOLLWAY_STAGES_OUT. Both are registered on the worker's event loop at its first request.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

TIMES: dict[str, list[float]] = {}
_armed = False


def _record(stage: str, seconds: float) -> None:
    TIMES.setdefault(stage, []).append(seconds)


def _timed_async(stage: str, func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return await func(*args, **kwargs)
        finally:
            _record(stage, time.perf_counter() - t)

    return wrapper


def _timed(stage: str, func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return func(*args, **kwargs)
        finally:
            _record(stage, time.perf_counter() - t)

    return wrapper


def _gc_timer() -> Callable[[str, dict[str, int]], None]:
    started = 0.0

    def timer(phase: str, info: dict[str, int]) -> None:
        nonlocal started
        if phase == "start":
            started = time.perf_counter()
        else:
            _record(f"gc: generation {info['generation']}", time.perf_counter() - started)

    return timer


def _dump() -> None:
    path = os.environ.get("TOLLWAY_STAGES_OUT")
    if path:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(TIMES, f)
        os.replace(tmp, path)


def _arm() -> None:
    global _armed
    if not _armed:
        _armed = True
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, TIMES.clear)
        loop.add_signal_handler(signal.SIGUSR2, _dump)


def install() -> None:
    from proxy.cache import embed, parts, policy, redisindex
    from proxy.handlers import OpenAIHandler

    handle = OpenAIHandler.__call__

    @functools.wraps(handle)
    async def request(self: Any, exchange: Any, *args: Any) -> None:
        _arm()
        try:
            await handle(self, exchange, *args)
        finally:
            total = time.perf_counter() - exchange.t0
            _record("request", total)
            _record("request, own time", total - exchange.backend_seconds)

    OpenAIHandler.__call__ = request  # type: ignore[method-assign]
    cache, embedder = policy.SemanticCache, embed.BackendEmbedder
    cache.lookup = _timed_async("lookup", cache.lookup)  # type: ignore[method-assign]
    cache.text = _timed("lookup: text", cache.text)  # type: ignore[method-assign]
    cache.partition = _timed("lookup: partition", cache.partition)  # type: ignore[method-assign]
    embedder.embed = _timed_async("lookup: embeddings wait", embedder.embed)  # type: ignore[method-assign]
    embedder._embed = _timed_async("embeddings request", embedder._embed)  # type: ignore[method-assign]
    embed._vectors = _timed("embeddings request: decoding", embed._vectors)
    parts.IndexSlot.nearest = _timed_async("lookup: search", parts.IndexSlot.nearest)  # type: ignore[method-assign]
    cache._store = _timed_async("store (after the reply)", cache._store)  # type: ignore[method-assign]
    index = redisindex.RedisIndex  # the wait for the server's answer, not the work around it
    index._transaction = _timed_async("store: Redis transaction", index._transaction)  # type: ignore[method-assign]
    gc.callbacks.append(_gc_timer())
