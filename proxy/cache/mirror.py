"""This process's copy of the Redis index's vectors, for the partitions it looks up in, so
that a miss there is answered without a round trip (proxy/cache/redisindex.py uses it).

A search module answers a lookup in 0.1-0.2 ms of its own time on top of the round trip
(~0.13 ms to a local server here); most lookups are misses, and a miss needs no entry from
the server, only the knowledge that none is near. So a process keeps, per partition it
serves, the partition's vectors and keys in a `MemoryIndex` (the payload of a row is its
entry's Redis key): a miss is a local search; a hit reads its entry from the server by key.

How the copy keeps up with the server:

- every store writes, in the same MULTI as the entry's hash, one entry to the dimension's
  stream `tollway:cache:log:<dim>` (XADD, MAXLEN ~ STREAM_ENTRIES): the key, the partition's
  tag, the expiry and the storing process's origin, not the vector;
- one task per process and dimension follows that stream (XREAD BLOCK, on a connection of its
  own) and reads the vectors of other processes' entries in the partitions it copies (HGET);
- a partition is copied on its first lookup, once the follower knows its position in the
  stream: the partition is marked, then read whole with one FT.SEARCH (`@part:{tag}`,
  RETURN vec exp) on a connection of its own (a large reply must not hold up lookups),
  unless FT.INFO, sent just before it, says the index is still taking in older hashes. An
  entry written before the mark is in that reply; one written after it reaches the
  follower, which reads after the mark (a key in both is held once). The reply goes into
  the copy LOAD_CHUNK_BYTES of vectors at a time, requests running between. Until the copy
  is complete, lookups there ask the server as before.

When the copy cannot be trusted it is dropped and built again on later lookups, which ask
the server meanwhile: the follower lost its connection or fell behind the stream's trimming
(XINFO STREAM: more entries were added after its position than the stream holds), or a
hit's entry belonged to another partition (that partition only). A partition larger than
MAX_PARTITION (when read, or grown past it since), or one whose rows the copy had to evict
for room, stays with the server for RETRY_SECONDS (one whose read failed,
FAILED_LOAD_SECONDS). The copy holds at most MAX_VECTOR_BYTES of vectors.

Entries are never changed in place and expire at the `exp` written with them, so a copied
row is right until its expiry unless the server lost it first: a FLUSHALL, a restart, or
its expiry by the server's clock when the storing gateway's clock ran ahead. Then the hit's
read finds nothing: a miss, and that row alone leaves the copy (dropping the partition would
read it again for every such entry). A copied partition sees another process's new entry
once the follower has read it (a stream read away, within FOLLOW_PAUSE and a round trip):
until then a prompt that process just stored is a miss here, as it is for any process that
asked a moment earlier.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from proxy.cache.base import Vector
from proxy.cache.index import MemoryIndex
from proxy.limits.base import StoreUnavailableError
from proxy.limits.resp import ReplyError, RespClient, pairs

STREAM_ENTRIES = 10_000  # the stream's approximate length (XADD MAXLEN ~)
# Stream entries per XREAD: at most STREAM_ENTRIES, so that a follower that fell behind the
# trimming gets a full read (and only a full read needs the check for that).
READ_COUNT = 1_000
BLOCK_MS = 1_000  # how long one XREAD waits for new entries
# The follower's pause after a read that returned entries, so that it reads at most ~200
# times a second however often this process stores (each store's XADD would wake it).
FOLLOW_PAUSE = 0.005
MAX_PARTITION = 10_000  # entries: a larger partition is searched on the server
MAX_VECTOR_BYTES = 64 << 20  # the copy's vectors, all partitions
RETRY_SECONDS = 60.0  # a partition that could not be copied stays with the server this long
FAILED_LOAD_SECONDS = 1.0  # ... and one whose read failed (no index after a restart, say)
LOAD_TIMEOUT = 10.0  # seconds one partition's read may take
MAX_LOADS = 4  # partitions read at once
# A partition's reply goes into the copy this many bytes of vectors at a time, the event
# loop free between: put row by row, reading 10,000 rows held it 311 ms (256 dimensions)
# and 768 ms (1,536) (python -m bench.fill --mirror).
LOAD_CHUNK_BYTES = 256 << 10
MAX_PARTITIONS = 100_000  # partitions copied or held back, remembered (the copy is dropped
# when more are copied: most are then empty ones, one lookup each, from clients' vary-by)
BACKOFF = (0.1, 5.0)  # the follower's wait after a failure: first, longest

NO_COUNT = "the server's streams do not count their entries (XINFO STREAM entries-added, Redis 7)"

log = logging.getLogger("tollway")
# what a server that is down, refuses, or answers unexpectedly (another program's stream
# under our key) raises here
_FAILURES = (
    StoreUnavailableError, ReplyError, OSError, TimeoutError, ValueError, IndexError,
    KeyError, TypeError,
)  # fmt: skip


def log_entry(stream: str, key: str, tag: str, expiry: int, origin: bytes) -> tuple[Any, ...]:
    """The XADD of one stored entry (`origin`: the storing process's) to `stream`."""
    return ("XADD", stream, "MAXLEN", "~", STREAM_ENTRIES, "*", "k", key, "p", tag,
            "e", expiry, "o", origin)  # fmt: skip


class Mirror:
    """The copy of one dimension's partitions; see the module docstring.

    `url` is the server's (the follower and the loads open connections of their own);
    `index_name` the dimension's FT index and `stream` its stream (proxy/cache/redisindex.py
    names both); `origin` what this process's stores write to the stream (`log_entry`);
    `clock` wall-clock seconds (the entries' `exp`).
    """

    def __init__(
        self,
        url: str,
        index_name: str,
        stream: str,
        dim: int,
        *,
        origin: bytes,
        clock: Callable[[], float],
        timeout: float,
        max_vector_bytes: int = MAX_VECTOR_BYTES,
    ) -> None:
        self.dim = dim
        self.origin = origin  # the stores of this process, which the follower skips
        self.stream = stream
        self.copied: set[str] = set()  # tags whose copy is complete
        max_entries = max(1, max_vector_bytes // (4 * dim))
        self.max_partition = min(MAX_PARTITION, max_entries)
        self.index = MemoryIndex(max_entries, clock=clock, on_evict=self._evicted,
                                 max_rows=self.max_partition + 1)  # fmt: skip
        self._url = url
        self._index_name = index_name
        self._clock = clock
        self._timeout = timeout
        self._loading: dict[str, int] = {}  # tag -> the generation its read started in
        # tag -> keys put into a partition while it is read (the read's reply may hold them)
        self._arrived: dict[str, set[bytes]] = {}
        self._remote_until: dict[str, float] = {}  # tag -> when a copy may be tried again
        self._generation = 0  # counts the times the whole copy was dropped
        self._position: bytes | None = None  # the stream id read through; None: not following
        self._follower: asyncio.Task[None] | None = None
        self._failing = False  # the follower's last attempt failed (and said so)
        self._loader: RespClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def want(self, tag: str) -> None:
        """A lookup in `tag` asked the server: start copying it (in the background)."""
        if self._closed:
            return
        if self._follower is None:
            self._follower = asyncio.get_running_loop().create_task(self._follow())
        if (
            self._position is None
            or tag in self.copied
            or tag in self._loading
            or len(self._loading) >= MAX_LOADS
        ):
            return
        until = self._remote_until.get(tag)
        if until is not None:
            if self._clock() < until:
                return
            del self._remote_until[tag]
        if len(self.copied) >= MAX_PARTITIONS:
            self._forget_all()
        if len(self._remote_until) >= MAX_PARTITIONS:
            self._remote_until.clear()
        self._loading[tag] = self._generation
        task = asyncio.get_running_loop().create_task(self._load(tag))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def stored(self, tag: str, vector: Vector, key: bytes, ttl: float) -> None:
        """This process stored an entry (the follower skips its own)."""
        if self._copying(tag):
            self._put(tag, vector, key, ttl)

    def gone(self, tag: str, key: bytes) -> None:
        """A copied row's entry is gone from the server (its expiry by the server's clock,
        a FLUSHALL, a restart): forget that row. Dropping the partition instead would read
        it again for every entry whose storing gateway's clock runs ahead of the server's."""
        self.index.discard(tag, key)

    def foreign(self, tag: str) -> None:
        """A copied row's entry belongs to another partition: the copy cannot be trusted."""
        self._forget(tag)

    async def close(self) -> None:
        self._closed = True
        tasks = [*self._tasks, *([self._follower] if self._follower else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._loader is not None:
            await self._loader.close()
        await self.index.close()

    # -- the partitions

    def _copying(self, tag: str) -> bool:
        """Whether `tag`'s rows belong in the copy: copied, or being read."""
        return tag in self.copied or tag in self._loading

    def _put(self, tag: str, vector: Vector, key: bytes, ttl: float) -> None:
        if ttl > 0:
            if tag in self._loading:
                self._arrived.setdefault(tag, set()).add(key)
            self.index.put(tag, vector, key, ttl)
            self._checked(tag)

    def _checked(self, tag: str) -> None:
        """After rows went into `tag`: drop it again if it lost rows to the bound meanwhile
        (it is no longer being copied) or grew too large to copy."""
        if not self._copying(tag):  # evicted in the put
            self.index.drop(tag)
        elif self.index.count(tag) > self.max_partition:
            self._forget(tag)
            self._remote_until[tag] = self._clock() + RETRY_SECONDS

    def _evicted(self, tag: str) -> None:
        """The index dropped one of `tag`'s rows for room: its copy is no longer whole."""
        self._forget(tag)
        self._remote_until[tag] = self._clock() + RETRY_SECONDS

    def _forget(self, tag: str) -> None:
        self.copied.discard(tag)
        self._loading.pop(tag, None)
        self._arrived.pop(tag, None)
        self.index.drop(tag)

    def _forget_all(self) -> None:
        self._generation += 1
        self.copied.clear()
        self._loading.clear()
        self._arrived.clear()
        self.index.clear()

    async def _load(self, tag: str) -> None:
        generation = self._generation
        try:
            held = await self._read_partition(tag, generation)
        except _FAILURES:
            held = -1
        if self._loading.get(tag) != generation or generation != self._generation:
            return  # dropped meanwhile (the follower failed, an eviction, a foreign entry)
        del self._loading[tag]
        self._arrived.pop(tag, None)
        if 0 <= held <= self.max_partition:
            self.copied.add(tag)
            return
        self.index.drop(tag)
        hold = RETRY_SECONDS if held > 0 else FAILED_LOAD_SECONDS
        self._remote_until[tag] = self._clock() + hold

    async def _read_partition(self, tag: str, generation: int) -> int:
        """Put the partition's entries into the copy; how many the server holds (-1: the
        index is still taking in older hashes, so the reply may lack some)."""
        if self._loader is None:
            self._loader = RespClient(self._url, timeout=LOAD_TIMEOUT)
        info, reply = await asyncio.gather(  # back to back on one connection
            self._loader.execute("FT.INFO", self._index_name),
            self._loader.execute(
                *("FT.SEARCH", self._index_name, f"@part:{{{tag}}}"),
                *("RETURN", 2, "vec", "exp", "LIMIT", 0, self.max_partition + 1),
                *("DIALECT", 2),
            ),
        )
        held = int(reply[0])
        if _indexing(pairs(info)):
            return -1
        chunk = max(1, LOAD_CHUNK_BYTES // (4 * self.dim))  # rows
        for start in range(1, len(reply) - 1, 2 * chunk):
            if start > 1:
                await asyncio.sleep(0)  # the requests waiting run between chunks
            if held > self.max_partition or self._loading.get(tag) != generation:
                return held
            keys, vectors, expires = [], [], []
            arrived = self._arrived.get(tag, ())  # in the copy already: not added twice
            for i in range(start, min(start + 2 * chunk, len(reply) - 1), 2):
                found = pairs(reply[i + 1])
                vec, exp = found.get(b"vec"), found.get(b"exp")
                if (vec is not None and exp is not None and len(vec) == 4 * self.dim
                        and reply[i] not in arrived):  # fmt: skip
                    keys.append(reply[i])
                    vectors.append(vec)
                    expires.append(int(exp) / 1000)
            ttls = np.array(expires) - self._clock()
            live = ttls > 0
            if live.any():
                rows = np.frombuffer(b"".join(vectors), dtype="<f4").reshape(-1, self.dim)
                keys = [key for key, kept in zip(keys, live.tolist(), strict=True) if kept]
                self.index.put_many(tag, rows[live], keys, ttls[live])
                self._checked(tag)
        return held

    # -- the stream

    async def _follow(self) -> None:
        """Follow the stream until closed; every failure drops the copy, then retries (one
        log line when the copy stops, one when it follows again)."""
        wait = BACKOFF[0]
        while not self._closed:
            client = RespClient(self._url, timeout=BLOCK_MS / 1000 + self._timeout)
            try:
                await self._read(client)
            except _FAILURES as exc:
                if self._position is not None:  # it was following: retry soon
                    wait = BACKOFF[0]
                if not self._failing:
                    self._failing = True
                    log.warning("tollway: the semantic cache's copy of the Redis index "
                                "stopped (%s): lookups ask the server until it is back",
                                exc or type(exc).__name__)  # fmt: skip
            finally:
                self._position = None
                self._forget_all()
                await client.close()
            await asyncio.sleep(wait)
            wait = min(wait * 2, BACKOFF[1])

    async def _read(self, client: RespClient) -> None:
        position, consumed = await self._head(client)
        self._position = position
        if self._failing:
            self._failing = False
            log.warning("tollway: the semantic cache's copy of the Redis index follows the "
                        "server again")  # fmt: skip
        while True:
            reply = await client.execute(
                *("XREAD", "COUNT", READ_COUNT, "BLOCK", BLOCK_MS, "STREAMS", self.stream),
                position,
            )
            if not reply:
                continue
            entries = reply[0][1]
            if len(entries) == READ_COUNT and await self._trimmed(client, consumed):
                self._forget_all()  # entries after `position` were lost
            consumed += len(entries)
            wanted = []
            for _, flat in entries:
                fields = pairs(flat)
                key, tag, exp = fields.get(b"k"), fields.get(b"p"), fields.get(b"e")
                if key is None or tag is None or exp is None or fields.get(b"o") == self.origin:
                    continue  # this process's own store (or not a store)
                name = tag.decode()
                if self._copying(name) and exp.isdigit():
                    wanted.append((key, name, int(exp)))
            position = self._position = entries[-1][0]
            if wanted:
                await self._read_vectors(client, wanted)
            await asyncio.sleep(FOLLOW_PAUSE)

    async def _head(self, client: RespClient) -> tuple[bytes, int]:
        """The stream's last id and how many entries it was ever given (none yet: 0-0, 0)."""
        info = await self._info(client)
        if info is None:
            return b"0-0", 0
        return info[b"last-generated-id"], int(info[b"entries-added"])

    async def _trimmed(self, client: RespClient, consumed: int) -> bool:
        """Whether the stream lost entries this follower, having read `consumed` of all it
        was ever given, has not read: it holds its newest entries, so some were lost when
        more were added since than it holds (or it is gone)."""
        info = await self._info(client)
        return info is None or int(info[b"entries-added"]) - consumed > int(info[b"length"])

    async def _info(self, client: RespClient) -> dict[Any, Any] | None:
        """XINFO STREAM's fields (None: no stream yet); raises when the server's streams do
        not count their entries."""
        try:
            info = await client.execute("XINFO", "STREAM", self.stream)
        except ReplyError as exc:
            if "no such key" not in str(exc).lower():
                raise
            return None
        fields = pairs(info)
        if b"entries-added" not in fields:
            raise ValueError(NO_COUNT)
        return fields

    async def _read_vectors(self, client: RespClient, wanted: list[tuple[bytes, str, int]]) -> None:
        reads = [client.execute("HGET", key, "vec") for key, _, _ in wanted]
        vectors = await asyncio.gather(*reads)
        now = self._clock()
        for (key, tag, exp), vec in zip(wanted, vectors, strict=True):
            if vec is not None and len(vec) == 4 * self.dim and self._copying(tag):
                self._put(tag, np.frombuffer(vec, dtype="<f4"), key, exp / 1000 - now)


def _indexing(info: dict[Any, Any]) -> bool:
    """Whether FT.INFO says the index is still taking in hashes that existed before it (after
    FT.CREATE, or a restart that loaded them): a search would miss some (RediSearch's
    `indexing`, valkey-search's `backfill_in_progress`)."""
    flags = (info.get(b"indexing"), info.get(b"backfill_in_progress"))
    return any(flag not in (None, 0, b"0") for flag in flags)
