"""The semantic cache's shared vector index: a Redis-protocol server with a search module
(RediSearch, Redis 8's query engine, or valkey-search), used when `gateway.store` is Redis.
Made with a `fallback` (the in-process index), it asks the server once, on first use,
whether it offers vector search, and if it does not, says why in one log line and hands
every call to the fallback from then on (`probe()` asks the same question of a URL).

One search index per vector dimension, over hashes under its own key prefix:

    tollway:cache:idx:<dim>             FT index: part TAG, exp NUMERIC, vec VECTOR (HNSW,
                                        FLOAT32, COSINE)
    tollway:cache:<dim>:<id>            hash: part, exp, vec, body; PEXPIRE = the entry's ttl
    tollway:cache:log:<dim>             stream: one entry per store (key, part, exp, origin),
                                        ~10,000 kept, for the copies in process

The id is a digest of the partition and the vector, so the same prompt stored twice (two
misses at once) replaces its entry instead of adding a twin, as the in-process index does.

`part` is the SHA-256 (hex) of the partition, not the partition itself: a TAG value splits on
its separator and folds case, and a query must escape its punctuation, so a raw partition
could match another's entries; a hex digest needs no escaping and cannot collide. The search
is `KNN 1` among the partition's entries and returns the nearest one's distance alone; the
hit counts only within `max_distance`, and only a hit reads the entry (HMGET body, exp,
vec, part: an entry whose `part` is not the lookup's is a miss, whatever found it), so a
miss carries no reply back. An expired hash stays in the index until the server
deletes it: the HMGET finds no key once the server's expiry has passed, and an `exp` (the
expiry in ms) this process's clock has passed makes a miss too (the gateways' clocks must
roughly agree). Filtering on `exp` in the query instead cost ~0.03 ms per search here. The
index's COSINE distance is `1 - cos`: for the unit vectors the embedders make, that is
`proxy.cache.base.distance`.

Hot entries are also kept in process: an entry this process found in Redis goes into a small
in-process index (`MemoryIndex`, at most NEAR_ENTRIES, least recently used out, replies up
to NEAR_MAX_BODY bytes) for NEAR_SECONDS, or until its own expiry if sooner, and a lookup
asks that index first, so a prompt asked again is answered without a round trip. Entries
are never changed in place (a key is its partition and vector), so the near index holds
what Redis holds until Redis loses it (FLUSHALL, a restart): then this process may answer
from it for up to NEAR_SECONDS more. A near hit is within `max_distance` but may not be the
nearest entry Redis holds. Entries this process stores are not put there: a stored miss may
never be asked again, and every lookup in its partition would pay for scanning it.

Partitions this process looks up in are also copied into it (proxy/cache/mirror.py: the
vectors and keys, kept current from a stream every store writes to): a lookup in a copied
partition searches the copy, so a miss sends no command and a hit one HMGET; the copy is
dropped whenever it cannot be trusted, and lookups then ask the server as above.

A single server only (`redis://`, `rediss://`, through proxy/limits/resp.py's client): on
`redis+cluster://` the index is its fallback from the start (with the log line). On a Redis
Cluster, RediSearch's open-source builds search one node's keys only (the coordinator is
not in them); valkey-search coordinates FT.SEARCH across nodes, but entries would have to be
written to their slots' nodes, which this index does not do.

Every failure (connection, timeout, error reply) raises CacheUnavailableError within `timeout`
seconds, and the cache steps aside. A server restarted or flushed without its indexes answers
one lookup as a miss and gets them again on the next call. An entry is written with MULTI/EXEC
(with its stream entry), so it never exists without its expiry. A process with MAX_STORES
stores unanswered drops the next (CacheBusyError: counted, and logged when the drops start
and once they have stopped), so a server slower than the misses is never queued more work
than that.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import numpy as np

from proxy.cache.base import CacheBusyError, CacheUnavailableError, Vector, VectorIndex
from proxy.cache.index import MemoryIndex
from proxy.cache.mirror import MAX_VECTOR_BYTES, Mirror, log_entry
from proxy.limits.base import StoreUnavailableError
from proxy.limits.redis import PREFIX as STORE_PREFIX
from proxy.limits.resp import ReplyError, RespClient, pairs

PREFIX = f"{STORE_PREFIX}:cache"
TIMEOUT = 0.5  # seconds one index call may take, connecting included
# HNSW, M 16 (the modules' default), EF_CONSTRUCTION 100 (theirs is 200): an insert took 0.74
# ms with 200 and 0.50 with 100 among 10,000 entries of 256 dimensions, with the same recall
# (284 of 300 near duplicates found with either; 264 with 40), and a lookup that arrives
# while the server inserts waits for it. A partition filter makes the modules search the
# partition's entries alone (RediSearch's "ad hoc brute force" when the filter is selective),
# so the answer is exact where partitions are small.
HNSW = ("M", 16, "EF_CONSTRUCTION", 100)
PROBE_DIM = 2
# A partition holding this many entries (the server's count at this process's first lookup
# there, plus the process's own stores since) is searched with HYBRID_POLICY BATCHES (HNSW,
# then the filter): left to choose, RediSearch takes "ad hoc brute force" for a partition
# filter even when the partition is most of the index, which measured 1.1-1.9 ms per lookup
# among 10,000 entries of 256 dimensions against 0.28-0.32 ms with batches. Small partitions
# keep the planner's choice (a brute force over few entries is cheap and exact).
BATCHES_FROM = 1_000
# Stores the server has not answered yet, at most, per process: a store past them is dropped
# (CacheBusyError, counted in tollway.cache.errors) rather than queued. Each store is an HNSW
# insert on the server's one thread (~0.5 ms at 256 dimensions), so misses that come faster
# than the server inserts queued without end: at 64 concurrent misses here (the server on
# the load core) a store waited 68-374 ms (p50), some timed out, and each timeout dropped
# the connection with the lookups waiting on it. With 16, a lookup's read waits behind at
# most ~8 ms of this process's inserts (256 dimensions); 8 stored 27% fewer entries there.
MAX_STORES = 16
# Dropped stores are logged twice: at the first, and once none has been dropped this long
# (with the count), not each time the backlog clears: under a steady overload it clears and
# refills hundreds of times a second.
DROP_QUIET = 10.0
MAX_SIZES = 100_000  # partitions whose sizes are remembered (cleared when full)
NEAR_ENTRIES = 1_024  # entries found in Redis kept in process (the module docstring)
NEAR_SECONDS = 30.0  # the longest one is answered from there
NEAR_MAX_BODY = 64 * 1024  # larger replies are not kept (at most 64 MiB of them in all)
# Error replies that say the index is gone (server restarted or flushed): RediSearch's
# FT.SEARCH ("idx: no such index"), its FT.INFO ("Unknown index name"), valkey-search's.
NO_INDEX = ("no such index", "unknown index", "not found")
EXISTS = "index already exists"
CLUSTER = "the Redis vector index needs a single server, not a cluster"

T = TypeVar("T")
log = logging.getLogger("tollway")


def index_name(dim: int) -> str:
    return f"{PREFIX}:idx:{dim}"


def key_prefix(dim: int) -> str:
    return f"{PREFIX}:{dim}:"


def stream_key(dim: int) -> str:
    return f"{PREFIX}:log:{dim}"


def partition_tag(partition: str) -> str:
    """The TAG value of a partition: its SHA-256 in hex (no escaping, no collision)."""
    return hashlib.sha256(partition.encode()).hexdigest()


def create_command(name: str, prefix: str, dim: int) -> tuple[str | int, ...]:
    """FT.CREATE of one dimension's index (hashes only; no stop-words, no text fields)."""
    vector = ("TYPE", "FLOAT32", "DIM", dim, "DISTANCE_METRIC", "COSINE", *HNSW)
    schema = ("part", "TAG", "exp", "NUMERIC", "vec", "VECTOR", "HNSW", len(vector), *vector)
    return ("FT.CREATE", name, "ON", "HASH", "PREFIX", 1, prefix, "SCHEMA", *schema)


class RedisIndex:
    """A `VectorIndex` on one Redis-protocol server with vector search; see the module
    docstring.

    `server` is a `redis://` or `rediss://` URL (or a client). With a `fallback`, a server
    without vector search, or a cluster URL, makes this index the fallback's front (one log
    line); without one, a cluster URL is a ValueError and a server without vector search
    fails every call. Nothing is connected until the first call.

    `clock` is a test seam (wall-clock seconds, for the entries' `exp`); leave it None.
    `near_entries`: how many hot entries are kept in process (0: none, every lookup asks the
    server).
    """

    def __init__(
        self,
        server: str | RespClient,
        *,
        fallback: VectorIndex | None = None,
        timeout: float = TIMEOUT,
        clock: Callable[[], float] | None = None,
        near_entries: int = NEAR_ENTRIES,
        mirror_bytes: int = MAX_VECTOR_BYTES,
        max_stores: int = MAX_STORES,
    ) -> None:
        self._fallback = fallback
        self._timeout = timeout
        self._clock = clock or time.time
        self._client: RespClient | None = None
        self._reason: str | None = None  # why the server cannot be used, known up front
        if isinstance(server, RespClient):
            self._client = server
        elif server.partition("://")[0].endswith("+cluster"):
            if fallback is None:
                raise ValueError(CLUSTER)
            self._reason = CLUSTER
        else:
            self._client = RespClient(server, timeout=timeout)
        self._asked: asyncio.Future[str | None] | None = None  # the server's answer
        self._ready: dict[int, asyncio.Future[None]] = {}  # dimension -> its FT.CREATE
        # partition -> entries the server held at this process's first lookup there (or 0),
        # plus those the process stored since
        self._sizes: dict[str, int] = {}
        # hot entries, in process (the module docstring); None: every lookup asks the server
        self._near = MemoryIndex(near_entries, clock=self._clock) if near_entries > 0 else None
        self._mirror_bytes = mirror_bytes  # 0: no copy, every lookup asks the server
        self._mirrors: dict[int, Mirror] = {}  # dimension -> its partitions' copy
        self._origin = os.urandom(8).hex().encode()  # in the stream: "stored by this process"
        # the server is known to hold the vectors (no fallback, or the server said yes):
        # `nearest` need not ask (`_first`), so what this process holds answers at once
        self._direct = fallback is None
        self._max_stores = max_stores
        self._storing = 0  # stores sent and not yet answered (or failed)
        self._dropped = 0  # stores dropped since the last DROP_QUIET seconds without one
        self._last_drop = 0.0  # the event loop's time of the latest
        self._drops_timer: asyncio.TimerHandle | None = None

    @classmethod
    def connect(cls, url: str, *, timeout: float = TIMEOUT) -> RedisIndex:
        """An index on the server at `url`, without a fallback (see the class docstring)."""
        return cls(url, timeout=timeout)

    async def nearest(
        self, partition: str, vector: Vector, max_distance: float
    ) -> tuple[bytes, float] | None:
        if self._direct and self._made(len(vector)):  # the server asked, the index made
            return await self._lookup(partition, vector, max_distance)
        return await self._bounded(self._first(partition, vector, max_distance))

    async def add(self, partition: str, vector: Vector, payload: bytes, ttl: float) -> None:
        await self._bounded(self._add(partition, vector, payload, ttl))

    async def close(self) -> None:
        if self._drops_timer is not None:
            self._drops_timer.cancel()
        for mirror in self._mirrors.values():
            await mirror.close()
        if self._near is not None:
            await self._near.close()
        if self._client is not None:
            await self._client.close()
        if self._fallback is not None:
            await self._fallback.close()

    @property
    def client(self) -> RespClient:
        assert self._client is not None, "a cluster URL: the fallback serves"
        return self._client

    async def _fallback_in_use(self) -> VectorIndex | None:
        """The fallback, when the server cannot hold the vectors (asked once), else None."""
        if self._fallback is None:
            return None
        if self._asked is None:
            self._asked = asyncio.ensure_future(self._ask())
            self._asked.add_done_callback(self._forget_failed_ask)
        reason = await asyncio.shield(self._asked)
        if reason is None:
            self._direct = True
            return None
        return self._fallback

    async def _ask(self) -> str | None:
        reason = self._reason if self._client is None else await _unusable(self._client)
        if reason is not None:
            log.warning("tollway: the semantic cache keeps its vectors in process: %s", reason)
        return reason

    def _forget_failed_ask(self, done: asyncio.Future[str | None]) -> None:
        """A server that did not answer is asked again by the next call."""
        if (done.cancelled() or done.exception() is not None) and self._asked is done:
            self._asked = None

    async def _first(
        self, partition: str, vector: Vector, max_distance: float
    ) -> tuple[bytes, float] | None:
        """`nearest` before the server was asked (the fallback may answer) or the vector's
        index made."""
        if (fallback := await self._fallback_in_use()) is not None:  # not `if`: it has len()
            return await fallback.nearest(partition, vector, max_distance)
        await self._ensure(len(vector))
        return await self._lookup(partition, vector, max_distance)

    async def _lookup(
        self, partition: str, vector: Vector, max_distance: float
    ) -> tuple[bytes, float] | None:
        """`nearest` on the server in use. What this process holds answers before any
        await: a near entry, or a miss in a copied partition (no round trip, no timer). The
        rest (a hit's read, a search on the server) is bounded by the timeout."""
        if self._near is not None:
            near = self._near.search(partition, vector, max_distance)
            if near is not None:
                return near
        dim = len(vector)
        tag = partition_tag(partition)
        mirror = self._copy(dim)
        if mirror is not None and tag in mirror.copied:
            found = mirror.index.search(tag, vector, max_distance)
            if found is None:
                return None
            return await self._bounded(self._read(dim, tag, partition, found))
        if mirror is not None:
            mirror.want(tag)
        return await self._bounded(self._searched(dim, tag, partition, vector, max_distance))

    async def _searched(
        self, dim: int, tag: str, partition: str, vector: Vector, max_distance: float
    ) -> tuple[bytes, float] | None:
        """The server's nearest entry in the partition, read (see `_read`), or None."""
        found = await self._search(dim, tag, partition, vector, max_distance)
        return None if found is None else await self._read(dim, tag, partition, found)

    async def _read(
        self, dim: int, tag: str, partition: str, found: tuple[bytes, float]
    ) -> tuple[bytes, float] | None:
        """The reply of the entry the search `found` (its key, distance), when it is still
        there and this partition's; else None (and the copy told)."""
        key, distance = found
        body, exp, vec, part = await self.client.execute("HMGET", key, "body", "exp", "vec", "part")
        mirror = self._mirrors.get(dim)
        if body is None or exp is None or vec is None or len(vec) != 4 * dim:
            if mirror is not None:
                mirror.gone(tag, key)
            return None  # the server's expiry has passed (or the hash is not ours)
        if part != tag.encode():
            if mirror is not None:
                mirror.foreign(tag)
            return None  # not this partition's entry, whatever found it
        left = int(exp) / 1000 - self._clock()
        if left <= 0:
            return None  # expired by this process's clock; the server deletes it soon
        if self._near is not None and len(body) <= NEAR_MAX_BODY:
            near_ttl = min(left, NEAR_SECONDS)
            self._near.put(partition, np.frombuffer(vec, dtype="<f4"), body, near_ttl)
        return body, distance

    async def _search(
        self, dim: int, tag: str, partition: str, vector: Vector, max_distance: float
    ) -> tuple[bytes, float] | None:
        """The server's nearest entry in the partition: (its key, distance), or None."""
        size = self._sizes.get(partition)
        if size is None:  # this process's first look at the partition: what the server holds
            size = await self._count(dim, tag, partition)
        policy = " HYBRID_POLICY BATCHES" if size >= BATCHES_FROM else ""
        query = f"(@part:{{{tag}}})=>[KNN 1 @vec $vec{policy} AS dist]"
        try:
            reply = await self.client.execute(
                *("FT.SEARCH", index_name(dim), query, "PARAMS", 2, "vec", _blob(vector)),
                *("RETURN", 1, "dist", "DIALECT", 2),
            )
        except ReplyError as exc:
            if not _no_index(exc):
                raise
            self._ready.pop(dim, None)  # made again on the next call
            return None
        return _nearest_key(reply, max_distance)

    def mirror(self, dim: int) -> Mirror | None:
        """`dim`'s copy in process, if this index has made one (tests, benchmarks)."""
        return self._mirrors.get(dim)

    def mirrors(self) -> list[Mirror]:
        """The copies in process, one per dimension (safe from another thread)."""
        return list(self._mirrors.values())

    def _copy(self, dim: int) -> Mirror | None:
        """`dim`'s copy in process, made on first use (None: no copies)."""
        mirror = self._mirrors.get(dim)
        if mirror is None and self._mirror_bytes > 0:
            mirror = self._mirrors[dim] = Mirror(
                self.client.url, index_name(dim), stream_key(dim), dim, clock=self._clock,
                origin=self._origin, timeout=self._timeout, max_vector_bytes=self._mirror_bytes,
            )  # fmt: skip
        return mirror

    async def _add(self, partition: str, vector: Vector, payload: bytes, ttl: float) -> None:
        if (fallback := await self._fallback_in_use()) is not None:
            return await fallback.add(partition, vector, payload, ttl)
        dim = len(vector)
        await self._ensure(dim)
        if self._storing >= self._max_stores:
            self._drop_store()
            raise CacheBusyError(f"the Redis index has {self._storing} stores unanswered")
        ttl_ms = max(1, round(ttl * 1000))
        tag, blob, expiry = partition_tag(partition), _blob(vector), self._now_ms() + ttl_ms
        key = key_prefix(dim) + hashlib.sha256(tag.encode() + blob).hexdigest()[:32]
        fields = ("part", tag, "exp", expiry, "vec", blob, "body", payload)
        await self._transaction(
            ("HSET", key, *fields),
            ("PEXPIRE", key, ttl_ms),
            log_entry(stream_key(dim), key, tag, expiry, self._origin),  # for copies
        )
        if (mirror := self._copy(dim)) is not None:
            mirror.stored(tag, vector, key.encode(), ttl)
        sizes = self._sizes_with_room(partition)
        sizes[partition] = sizes.get(partition, 0) + 1

    async def _count(self, dim: int, tag: str, partition: str) -> int:
        """How many entries the server holds in a partition, asked once per partition and
        process: a restarted gateway must not leave a big partition to the planner's brute
        force (2.4 ms a lookup at 3,000 entries of 256 dimensions, against 0.23 ms in
        batches). 0 when the module cannot count them (then the process's stores decide)."""
        try:
            reply = await self.client.execute(
                "FT.SEARCH", index_name(dim), f"@part:{{{tag}}}", "LIMIT", 0, 0, "DIALECT", 2
            )
            held = int(reply[0]) if isinstance(reply, list) and reply else 0
        except (ReplyError, ValueError, TypeError):
            held = 0
        sizes = self._sizes_with_room(partition)
        sizes[partition] = size = max(held, sizes.get(partition, 0))  # stores meanwhile count
        return size

    def _sizes_with_room(self, partition: str) -> dict[str, int]:
        """The partition sizes, emptied first when full and `partition` is not among them
        (partitions come from clients' `vary-by` values)."""
        sizes = self._sizes
        if len(sizes) >= MAX_SIZES and partition not in sizes:
            sizes.clear()
        return sizes

    async def _ensure(self, dim: int) -> None:
        """Create `dim`'s index once per process (and again after it vanished); concurrent
        first calls share one FT.CREATE."""
        ready = self._ready.get(dim)
        if ready is None:
            ready = self._ready[dim] = asyncio.ensure_future(self._create(dim))
            ready.add_done_callback(functools.partial(self._forget_failed, dim))
        await asyncio.shield(ready)  # a caller timing out leaves it running for the others

    def _made(self, dim: int) -> bool:
        """Whether `dim`'s index is known to exist (its FT.CREATE answered)."""
        ready = self._ready.get(dim)
        if ready is None or not ready.done() or ready.cancelled():
            return False
        return ready.exception() is None

    def _forget_failed(self, dim: int, done: asyncio.Future[None]) -> None:
        if (done.cancelled() or done.exception() is not None) and self._ready.get(dim) is done:
            del self._ready[dim]

    async def _create(self, dim: int) -> None:
        try:
            await self.client.execute(*create_command(index_name(dim), key_prefix(dim), dim))
        except ReplyError as exc:
            if EXISTS not in str(exc).lower():
                raise

    def _drop_store(self) -> None:
        loop = asyncio.get_running_loop()
        self._last_drop = loop.time()
        if not self._dropped:
            log.warning("tollway: the semantic cache's Redis index has %d stores unanswered: "
                        "stores past that are dropped until it catches up",
                        self._storing)  # fmt: skip
            self._drops_timer = loop.call_later(DROP_QUIET, self._drops_ended)
        self._dropped += 1

    def _drops_ended(self) -> None:
        """Due DROP_QUIET after the first drop: say how many, once none is that recent."""
        loop = asyncio.get_running_loop()
        left = self._last_drop + DROP_QUIET - loop.time()
        if left > 0:
            self._drops_timer = loop.call_later(left, self._drops_ended)
            return
        self._drops_timer = None
        log.warning("tollway: the semantic cache's Redis index caught up: %d stores were "
                    "dropped, none in the last %g s", self._dropped, DROP_QUIET)  # fmt: skip
        self._dropped = 0

    async def _transaction(self, *commands: tuple[Any, ...]) -> None:
        """MULTI, `commands`, EXEC, written back to back in one write (so that no other
        caller's command lands inside): the entry never exists without its expiry. Counted
        in `_storing` until the server has answered it all (or the connection failed),
        whether or not the caller still waits: one that timed out is still in its queue."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        count = len(commands) + 2
        replies: list[Any] = []

        def answered(reply: Any) -> None:
            replies.append(reply)
            if len(replies) < count:
                return
            self._storing -= 1
            if not done.done():
                # EXEC's reply holds each command's, error replies included
                last = replies[-1] if isinstance(replies[-1], list) else []
                errors = [r for r in (*replies, *last) if isinstance(r, Exception)]
                if errors:
                    done.set_exception(errors[0])
                else:
                    done.set_result(None)

        self.client.send_all((("MULTI",), *commands, ("EXEC",)), answered)
        self._storing += 1
        await done

    async def _bounded(self, call: Coroutine[Any, Any, T]) -> T:
        """`call` within the timeout, every failure as CacheUnavailableError."""
        try:
            async with asyncio.timeout(self._timeout):
                return await call
        except TimeoutError as exc:
            raise CacheUnavailableError(f"the Redis index took over {self._timeout}s") from exc
        except (StoreUnavailableError, ReplyError, OSError) as exc:
            raise CacheUnavailableError(f"Redis index: {exc}") from exc

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)


def _blob(vector: Vector) -> bytes:
    """A vector as the index stores it: little-endian float32."""
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def _nearest_key(reply: list[Any], max_distance: float) -> tuple[bytes, float] | None:
    """FT.SEARCH's RESP2 reply `[total, key, [field, value, ...]]` as (key, distance) of the
    nearest entry, or None when there is none or it is too far."""
    if len(reply) < 3 or not reply[2]:
        return None
    fields = pairs(reply[2])
    dist = fields.get(b"dist")
    if dist is None:
        return None
    distance = float(dist)
    return (reply[1], distance) if distance <= max_distance else None


def _no_index(exc: ReplyError) -> bool:
    message = str(exc).lower()
    return any(words in message for words in NO_INDEX)


async def probe(url: str, *, timeout: float = TIMEOUT) -> str | None:
    """Why the server at `url` cannot hold the semantic cache's vectors, or None when it can:
    it must be a single server (not a cluster) that answers and creates an index with a
    VECTOR field (a throwaway one, dropped at once). Never raises."""
    if url.partition("://")[0].endswith("+cluster"):
        return CLUSTER
    try:
        client = RespClient(url, timeout=timeout)
    except ValueError as exc:
        return str(exc)
    try:
        async with asyncio.timeout(timeout):
            return await _unusable(client)
    except TimeoutError:
        return f"the server did not answer within {timeout}s"
    except (StoreUnavailableError, OSError) as exc:
        return f"the server is unavailable: {exc}"
    except ReplyError as exc:
        return f"the server cannot answer now: {exc}"
    finally:
        await client.close()


async def _unusable(client: RespClient) -> str | None:
    """Why the server has no vector search for us (None: it has). Raises when it cannot say
    now (StoreUnavailableError, or the ReplyError of FT._LIST while it loads, say)."""
    try:
        await client.execute("FT._LIST")
    except ReplyError as exc:
        if "unknown command" not in str(exc).lower():
            raise
        return f"no search module (FT._LIST: {exc})"
    name = f"{PREFIX}:probe:{os.urandom(6).hex()}"
    try:
        await client.execute(*create_command(name, name + ":", PROBE_DIM))
    except ReplyError as exc:
        return f"the search module has no vector index (FT.CREATE … VECTOR: {exc})"
    with contextlib.suppress(ReplyError):  # gone already: nothing to tidy
        await client.execute("FT.DROPINDEX", name)
    return None


async def detect(url: str, *, timeout: float = TIMEOUT) -> bool:
    """Whether the server at `url` offers vector search (see `probe`, which says why not)."""
    return await probe(url, timeout=timeout) is None
