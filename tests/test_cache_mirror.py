"""The Redis index's copy in process (proxy/cache/mirror.py) on a real server with vector
search: a copied partition answers misses without a command, hits with one read, learns of
other processes' entries from the stream, and is dropped (lookups ask the server) whenever
it cannot be trusted."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

import numpy as np
import pytest

from proxy.cache import mirror as mirrors
from proxy.cache.base import CacheUnavailableError, Vector
from proxy.cache.mirror import Mirror
from proxy.cache.redisindex import RedisIndex, key_prefix, partition_tag
from tests.redisproc import RedisProc, run
from tests.test_cache_redis import DIM, open_index, random_unit, unit

pytestmark = pytest.mark.redis


def copy_of(index: RedisIndex, dim: int = DIM) -> Mirror:
    mirror = index.mirror(dim)
    assert mirror is not None
    return mirror


async def until(condition: object, seconds: float = 5.0) -> None:
    """Wait for `condition()` (the copy works in the background)."""
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "not within the time allowed"
        await asyncio.sleep(0.01)


async def copied(index: RedisIndex, partition: str, seconds: float = 5.0) -> None:
    """Look `partition` up until it is copied (a lookup there that asks the server starts
    its copy, once the follower knows its position in the stream)."""
    tag = partition_tag(partition)
    deadline = time.monotonic() + seconds
    while True:
        await index.nearest(partition, unit(0, 0, 0, 0, 0, 0, 0, 1), 0.0)
        if tag in copy_of(index).copied:
            return
        assert time.monotonic() < deadline, "not copied within the time allowed"
        await asyncio.sleep(0.01)


def record_commands(index: RedisIndex, seen: list[str]) -> None:
    """Append the name of every command `index` sends on its connection to `seen`."""
    execute = index.client.execute

    async def spy(*args: object) -> object:
        seen.append(str(args[0]))
        return await execute(*args)

    index.client.execute = spy  # type: ignore[method-assign]


async def stored_by_another_process(url: str, stored: list[Vector]) -> None:
    """Store `stored` in partition "p" (payloads "0", "1", ...) from another index."""
    async with open_index(url) as before:
        for i, vector in enumerate(stored):
            await before.add("p", vector, b"%d" % i, 60)


async def answered_from_the_copy(index: RedisIndex, stored: list[Vector]) -> None:
    """Each of `stored` is a hit in "p" read with one HMGET: the copy found it."""
    seen: list[str] = []
    record_commands(index, seen)
    for i, vector in enumerate(stored):
        assert (await index.nearest("p", vector, 0.01) or (b"",))[0] == b"%d" % i
    assert seen == ["HMGET"] * len(stored)


def vectors(seed: int, count: int) -> list[Vector]:
    rng = np.random.default_rng(seed)
    return [random_unit(rng) for _ in range(count)]


def test_a_copied_partition_answers_misses_without_a_command(clean: RedisProc) -> None:
    stored = vectors(1, 30)

    async def main() -> None:
        async with open_index(clean.url, near_entries=0) as index:
            for i, vector in enumerate(stored):
                await index.add("p", vector, b"%d" % i, 60)
            await copied(index, "p")
            mirror = copy_of(index)
            mirror.want(partition_tag("p"))  # copied already: not read again
            assert not mirror._loading and len(mirror.index) == 30
            seen: list[str] = []
            record_commands(index, seen)
            far = vectors(2, 20)
            assert [await index.nearest("p", v, 0.01) for v in far] == [None] * 20
            assert seen == []  # twenty misses, no command
            for i in (0, 29):
                found = await index.nearest("p", stored[i], 0.01)
                assert found == (b"%d" % i, pytest.approx(0, abs=1e-5))
            assert seen == ["HMGET", "HMGET"]  # a hit reads its entry only
            assert await index.nearest("q", stored[0], 0.01) is None  # partitions stay apart
            assert "FT.SEARCH" in seen  # "q" is not copied: asked the server

    run(main())


def timers_of(lookup: Any) -> tuple[Any, int]:
    """Run coroutine `lookup`, which must return without suspending: its result, and how
    many timers it set on the loop (asyncio's, whose `call_at` can be wrapped)."""
    loop = asyncio.get_running_loop()
    call_at, set_ = loop.call_at, []

    def counted(when: float, callback: Any, *args: Any, **kwargs: Any) -> Any:
        set_.append(callback)
        return call_at(when, callback, *args, **kwargs)

    loop.call_at = counted  # type: ignore[method-assign]
    try:
        lookup.send(None)
    except StopIteration as done:
        return done.value, len(set_)
    finally:
        del loop.call_at
    lookup.close()
    raise AssertionError("the lookup waited")


def test_what_the_process_holds_answers_without_a_timer(clean: RedisProc) -> None:
    """A miss in a copied partition, and a hit among the near entries, are answered in the
    call, with no timeout set: nothing in them waits. A hit found in the copy reads its
    entry, within the timeout."""
    stored = vectors(3, 5)

    async def main() -> None:
        async with open_index(clean.url) as index:
            for i, vector in enumerate(stored):
                await index.add("p", vector, b"%d" % i, 60)
            await copied(index, "p")
            assert timers_of(index.nearest("p", vectors(4, 1)[0], 0.01)) == (None, 0)
            assert (await index.nearest("p", stored[0], 0.01) or (b"",))[0] == b"0"  # read
            near, timers = timers_of(index.nearest("p", stored[0], 0.01))  # now held near
            assert near is not None and near[0] == b"0" and timers == 0
            with pytest.raises(AssertionError, match="waited"):
                timers_of(index.nearest("p", stored[1], 0.01))

    run(main())


def test_a_restarted_process_copies_what_the_server_holds(clean: RedisProc) -> None:
    """The copy of a partition another process filled is read from the server whole."""
    stored = vectors(3, 40)

    async def main() -> None:
        await stored_by_another_process(clean.url, stored)
        async with open_index(clean.url, near_entries=0) as after:
            await copied(after, "p")
            assert len(copy_of(after).index) == 40
            await answered_from_the_copy(after, stored)

    run(main())


def test_a_partition_is_read_in_chunks_with_the_loop_free_between(
    clean: RedisProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reply goes into the copy LOAD_CHUNK_BYTES of vectors at a time, with other tasks
    running between chunks (put row by row, 10,000 rows held the loop 311-768 ms), and every
    row arrives."""
    monkeypatch.setattr(mirrors, "LOAD_CHUNK_BYTES", 16 * 4 * DIM)  # 16 rows
    stored = vectors(12, 100)

    async def main() -> None:
        await stored_by_another_process(clean.url, stored)
        async with open_index(clean.url, near_entries=0) as after:
            await after.nearest("p", stored[0], 0.0)  # the copy starts following
            mirror = copy_of(after)
            ticks, chunks = 0, []
            put_many = mirror.index.put_many

            def counted(*args: Any) -> None:
                chunks.append(ticks)
                put_many(*args)

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0)

            mirror.index.put_many = counted  # type: ignore[method-assign]
            running = asyncio.get_running_loop().create_task(ticker())
            await copied(after, "p")
            running.cancel()
            assert len(chunks) == 7  # 100 rows, 16 at a time
            assert all(b > a for a, b in itertools.pairwise(chunks))  # the ticker ran between
            assert len(mirror.index) == 100
            await answered_from_the_copy(after, stored)

    run(main())


def test_another_process_entries_reach_the_copy(clean: RedisProc) -> None:
    stored = vectors(4, 10)

    async def main() -> None:
        async with open_index(clean.url) as one, open_index(clean.url, near_entries=0) as two:
            await one.add("p", stored[0], b"0", 60)
            await copied(two, "p")
            seen: list[str] = []
            record_commands(two, seen)
            for i, vector in enumerate(stored[1:], 1):
                await one.add("p", vector, b"%d" % i, 60)
            mirror = copy_of(two)
            await until(lambda: len(mirror.index) == 10)
            for i, vector in enumerate(stored):
                assert (await two.nearest("p", vector, 0.01) or (b"",))[0] == b"%d" % i
            assert "FT.SEARCH" not in seen
            assert await two.nearest("p", vectors(5, 1)[0], 0.01) is None
            # entries of a partition `two` does not copy are not read
            await one.add("other", stored[0], b"x", 60)
            await asyncio.sleep(0.05)
            assert len(mirror.index) == 10

    run(main())


def test_expired_entries_leave_the_copy(clean: RedisProc) -> None:
    now = [1_000_000.0]
    brief, lasting = unit(1), unit(1, 0.5)

    async def main() -> None:
        async with open_index(clean.url, clock=lambda: now[0], near_entries=0) as index:
            await index.add("p", brief, b"brief", 5)
            await index.add("p", lasting, b"lasting", 60)
            await copied(index, "p")
            assert (await index.nearest("p", brief, 0.5) or (b"",))[0] == b"brief"
            now[0] += 6
            assert (await index.nearest("p", brief, 0.5) or (b"",))[0] == b"lasting"
            assert len(copy_of(index).index) == 1

    run(main())


def test_an_entry_the_server_lost_leaves_the_copy_alone(clean: RedisProc) -> None:
    """A hit whose entry is gone from the server (a FLUSHALL, or its expiry by the server's
    clock) is a miss, and that row leaves the copy; the rest stays copied."""
    kept, lost = unit(1), unit(0, 1)

    async def main() -> None:
        async with open_index(clean.url, near_entries=0) as index:
            await index.add("p", kept, b"kept", 60)
            await index.add("p", lost, b"lost", 60)
            await copied(index, "p")
            mirror = copy_of(index)
            with clean.client() as client:
                for key in client.keys(f"{key_prefix(DIM)}*"):
                    if client.hget(key, "body") == b"lost":
                        client.delete(key)
            assert await index.nearest("p", lost, 0.1) is None
            assert partition_tag("p") in mirror.copied and len(mirror.index) == 1
            seen: list[str] = []
            record_commands(index, seen)
            assert await index.nearest("p", lost, 0.1) is None
            assert seen == []  # the row is gone: a miss without a command
            assert (await index.nearest("p", kept, 0.1) or (b"",))[0] == b"kept"

    run(main())


def test_a_partition_too_large_to_copy_stays_with_the_server(
    clean: RedisProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mirrors, "MAX_PARTITION", 10)
    stored = vectors(6, 11)

    async def main() -> None:
        async with open_index(clean.url) as index:
            for i, vector in enumerate(stored):
                await index.add("p", vector, b"%d" % i, 60)
            await index.add("small", stored[0], b"s", 60)
            await copied(index, "small")  # the follower runs, and small partitions are copied
            mirror = copy_of(index)
            tag = partition_tag("p")
            mirror.want(tag)
            await until(lambda: tag in mirror._remote_until)
            assert tag not in mirror.copied
            seen: list[str] = []
            record_commands(index, seen)
            assert await index.nearest("p", vectors(7, 1)[0], 0.01) is None
            assert "FT.SEARCH" in seen
            small = partition_tag("small")  # a copied partition that grows past it leaves
            for i, vector in enumerate(vectors(11, 10)):
                assert small in mirror.copied
                await index.add("small", vector, b"%d" % i, 60)
            assert small not in mirror.copied and small in mirror._remote_until

    run(main())


def test_evicting_a_partition_row_returns_it_to_the_server(clean: RedisProc) -> None:
    """The copy is bounded: a partition that loses a row for room is no longer copied."""
    first, second = vectors(8, 6), vectors(9, 6)

    async def main() -> None:
        async with open_index(clean.url, mirror_bytes=10 * 4 * DIM) as index:  # 10 rows
            for i in range(6):
                await index.add("a", first[i], b"a", 60)
                await index.add("b", second[i], b"b", 60)
            await copied(index, "a")
            mirror = copy_of(index)
            await copied(index, "b")  # 12 rows do not fit: "a" loses its oldest
            assert mirror.copied == {partition_tag("b")}
            assert partition_tag("a") in mirror._remote_until
            seen: list[str] = []
            record_commands(index, seen)
            found = await index.nearest("a", first[3], 0.01)
            assert found is not None and found[0] == b"a"
            assert "FT.SEARCH" in seen

    run(main())


def test_a_follower_behind_the_trimming_drops_the_copy(
    clean: RedisProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entries trimmed from the stream before the follower read them are lost to the copy:
    it is dropped (and built again by later lookups); a follower that keeps up keeps it.
    Foreign entries under the stream's key are skipped."""
    monkeypatch.setattr(mirrors, "READ_COUNT", 3)
    stored = vectors(10, 6)

    async def main() -> None:
        async with open_index(clean.url) as one, open_index(clean.url) as two:
            await one.add("p", stored[0], b"0", 60)
            await copied(two, "p")
            mirror = copy_of(two)
            await one.client.execute("XADD", mirror.stream, "*", "not", "ours")
            for i in (1, 2, 3):  # three entries: a full read, none lost
                await one.add("p", stored[i], b"%d" % i, 60)
            await until(lambda: len(mirror.index) == 4)
            assert partition_tag("p") in mirror.copied
            follower = mirror._follower
            assert follower is not None and not follower.done()
            with clean.client() as client:  # trimmed before the follower can read
                pipe = client.pipeline(transaction=True)
                for _ in range(5):
                    pipe.xadd(mirror.stream, {"k": "x", "p": partition_tag("p"), "e": 1})
                pipe.xtrim(mirror.stream, maxlen=3, approximate=False)
                pipe.execute()
            await until(lambda: partition_tag("p") not in mirror.copied)
            await copied(two, "p")  # built again from the server
            assert len(mirror.index) == 4

    run(main())


def test_a_server_outage_drops_the_copy_and_it_is_built_again(
    own_search_server: RedisProc, caplog: pytest.LogCaptureFixture
) -> None:
    vector = unit(1)

    async def main() -> None:
        async with open_index(own_search_server.url) as index:
            await index.add("p", vector, b"x", 60)
            await copied(index, "p")
            mirror = copy_of(index)
            own_search_server.kill()
            await until(lambda: not mirror.copied)  # the follower lost its connection
            with pytest.raises(CacheUnavailableError):
                await index.nearest("p", unit(0, 1), 0.1)  # asks the server: down
            await asyncio.sleep(0.5)  # the follower's retries fail meanwhile
            own_search_server.start()  # empty
            await index.add("p", vector, b"y", 60)
            await copied(index, "p", seconds=15)  # the follower's backoff grew meanwhile
            assert (await index.nearest("p", vector, 0.1) or (b"",))[0] == b"y"

    with caplog.at_level(logging.WARNING, logger="tollway"):
        run(main())
    lines = [r.getMessage() for r in caplog.records if "copy of the Redis index" in r.getMessage()]
    assert len(lines) == 2, lines  # one when it stopped, however many retries failed
    assert "stopped" in lines[0] and "follows the server again" in lines[1]


@pytest.mark.parametrize(
    ("info", "indexing"),
    [
        ({b"indexing": 0, b"percent_indexed": b"1"}, False),  # RediSearch, done
        ({b"indexing": 1, b"percent_indexed": b"0.4"}, True),  # RediSearch, scanning
        ({b"backfill_in_progress": b"0", b"state": b"ready"}, False),  # valkey-search
        ({b"backfill_in_progress": b"1", b"state": b"backfill_in_progress"}, True),
        ({}, False),  # a module that says neither
    ],
)
def test_a_partition_is_not_copied_while_the_index_takes_in_older_hashes(
    info: dict[bytes, object], indexing: bool
) -> None:
    assert mirrors._indexing(info) is indexing


def test_an_entry_of_another_partition_is_never_a_hit(clean: RedisProc) -> None:
    """Whatever put a key into a partition's copy (here: a stream entry naming the wrong
    partition), a hit reads the entry's own partition and refuses another's."""
    vector = unit(1)

    async def main() -> None:
        async with open_index(clean.url) as one, open_index(clean.url, near_entries=0) as two:
            await one.add("tenant-a", vector, b"a's answer", 60)
            await two.add("tenant-b", unit(0, 1), b"b's answer", 60)
            await copied(two, "tenant-b")
            with clean.client() as client:
                key = client.keys(f"{key_prefix(DIM)}*")
                a_key = next(k for k in key if client.hget(k, "body") == b"a's answer")
                client.xadd(
                    copy_of(two).stream,
                    {
                        "k": a_key,
                        "p": partition_tag("tenant-b"),
                        "e": int(time.time() * 1000) + 60_000,
                    },
                )
            mirror = copy_of(two)
            await until(lambda: len(mirror.index) == 2)  # the forged row reached the copy
            assert await two.nearest("tenant-b", vector, 0.1) is None
            assert partition_tag("tenant-b") not in mirror.copied  # and it was dropped

    run(main())


def test_the_partitions_remembered_are_bounded(
    clean: RedisProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each partition looked up is remembered as copied, empty ones too (clients' `vary-by`
    makes them): past MAX_PARTITIONS the copy starts again."""
    monkeypatch.setattr(mirrors, "MAX_PARTITIONS", 3)

    async def main() -> None:
        async with open_index(clean.url) as index:
            for name in ("a", "b", "c"):
                await copied(index, name)
            mirror = copy_of(index)
            assert len(mirror.copied) == 3
            await copied(index, "d")
            assert mirror.copied == {partition_tag("d")}

    run(main())


def test_a_key_put_while_its_partition_is_read_is_held_once() -> None:
    """An entry a store (or the follower) puts into a partition while the partition's read
    is under way may be in the read's reply too: the copy holds it once. (The reply comes
    from a stand-in for the server: what matters is the order of the two.)"""
    stored = vectors(13, 5)
    keys = [b"k%d" % i for i in range(5)]
    expires = str(int((time.time() + 60) * 1000)).encode()
    reply: list[Any] = [5]
    for key, vector in zip(keys, stored, strict=True):
        reply += [key, [b"vec", vector.astype("<f4").tobytes(), b"exp", expires]]

    class Server:
        async def execute(self, *args: Any) -> Any:
            return [b"indexing", 0] if args[0] == "FT.INFO" else reply

        async def close(self) -> None:
            pass

    async def main() -> None:
        mirror = Mirror("redis://127.0.0.1:1", "index", "stream", DIM, origin=b"t",
                        clock=time.time, timeout=1.0)  # fmt: skip
        mirror._loader = Server()  # type: ignore[assignment]
        mirror._loading["t"] = mirror._generation
        mirror.stored("t", stored[2], keys[2], 60)  # in the copy before the reply is
        assert await mirror._read_partition("t", mirror._generation) == 5
        assert sorted(mirror.index._partitions["t"].payloads) == keys
        await mirror.close()

    run(main())
