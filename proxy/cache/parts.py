"""What the semantic cache keeps across config reloads, made by the composition root
(proxy/app.py): the vector index (entries survive a SIGHUP), the local embedder (its model
loads once), the metrics and the outage state. Nothing heavy is imported here: numpy and the
cache's modules load on first use, so a gateway without a lookup never loads them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from proxy.config import Config, ConfigError
from proxy.telemetry import genai
from proxy.telemetry.metrics import Gauge, Registry

if TYPE_CHECKING:
    from proxy.cache.base import Embedder, Vector, VectorIndex
    from proxy.cache.policy import CacheMetrics, Outage

log = logging.getLogger("tollway")


class CacheParts:
    """What the semantic cache keeps across reloads: the vector index (entries survive a
    SIGHUP), the local embedder (its model loads once), the metrics and the outage state.

    The index is in-process unless `gateway.store` is Redis and `open()` finds the server
    offers a vector index (proxy/cache/redisindex.py `probe`); otherwise it stays in-process,
    with a log line saying why."""

    def __init__(self, config: Config, registry: Registry | None):
        self.store = config.gateway.store
        self._registry = registry
        self._metrics: CacheMetrics | None = None
        self._outage: Outage | None = None
        self._slots: dict[int, IndexSlot] = {}  # by max-entries
        self._shared: VectorIndex | None = None  # the Redis index, once probed
        self._probed = False
        self._local: Embedder | None = None

    @property
    def metrics(self) -> CacheMetrics:
        if self._metrics is None:
            from proxy.cache.policy import CacheMetrics

            self._metrics = CacheMetrics(self._registry)
        return self._metrics

    @property
    def outage(self) -> Outage:
        if self._outage is None:
            from proxy.cache.policy import Outage

            self._outage = Outage()
        return self._outage

    def index(self, max_entries: int) -> VectorIndex:
        from proxy.cache.index import MemoryIndex

        slot = self._slots.get(max_entries)
        if slot is None:
            slot = self._slots[max_entries] = IndexSlot(self._shared or MemoryIndex(max_entries))
        return slot

    def retain(self, sizes: set[int]) -> None:
        """Forget the in-process indexes no pipeline of the config in force uses (a reload
        changed their max-entries): their entries would otherwise stay in memory for ever."""
        for size in [n for n in self._slots if n not in sizes]:
            del self._slots[size]

    async def open(self) -> None:
        """Probe the Redis store for vector search when a cache is configured: at start, and
        at each reload until a probe succeeds (a server that was down at start)."""
        if self._probed or not self._slots or self.store == "memory":
            return
        from proxy.cache import redisindex

        why = await redisindex.probe(self.store)
        if why is not None:
            log.warning("tollway: the semantic cache uses the in-process index: %s", why)
            return
        self._probed = True
        self._shared = redisindex.RedisIndex.connect(self.store)
        for slot in self._slots.values():
            slot.current = self._shared
        log.info("tollway: the semantic cache uses the Redis vector index")

    def gauges(self) -> list[Gauge]:
        """The in-process indexes' entries, evictions and bytes, or the Redis index's copy in
        process (read from the metrics thread)."""
        slots = list(self._slots.values())  # a reload may add one meanwhile
        if not slots:
            return []
        shared = self._shared
        if shared is not None and all(s.current is shared for s in slots):
            from proxy.cache.redisindex import RedisIndex

            if not isinstance(shared, RedisIndex):
                return []
            copied = sum(len(m.index) for m in shared.mirrors())
            return [
                Gauge(genai.CACHE_COPIED, "{entry}",
                      "Redis vector index entries copied into this process.", (((), copied),)),
            ]  # fmt: skip
        from proxy.cache.index import MemoryIndex

        memory = [s.current for s in slots if isinstance(s.current, MemoryIndex)]
        if not memory:
            return []
        entries = sum(len(m) for m in memory)
        evicted = sum(m.evicted for m in memory)
        held = sum(m.held_bytes() for m in memory)
        return [
            Gauge(genai.CACHE_ENTRIES, "{entry}", "Entries in the in-process semantic cache.",
                  (((), entries),)),
            Gauge(genai.CACHE_EVICTIONS, "{entry}", "Entries evicted for room (LRU).",
                  (((), evicted),), monotonic=True),
            Gauge(genai.CACHE_BYTES, "By", "Bytes the in-process semantic cache's entries "
                  "take: stored replies, vectors and their sketches.", (((), held),)),
        ]  # fmt: skip

    def local_embedder(self) -> Embedder:
        if self._local is None:
            try:
                from proxy.cache.local import LocalEmbedder  # optional extra: imported on use

                self._local = LocalEmbedder()
            except (ImportError, RuntimeError) as exc:  # LocalEmbedderError is a RuntimeError
                problem = (
                    "llm-semantic-cache-lookup.embedder: local needs the extra "
                    f"local-embeddings (pip install 'tollway[local-embeddings]'): {exc}"
                )
                raise ConfigError([problem]) from exc  # fmt: skip
        return self._local

    async def close(self) -> None:
        indexes = {id(s.current): s.current for s in self._slots.values()}
        for index in indexes.values():
            await index.close()
        if self._local is not None:
            await self._local.close()


class IndexSlot:
    """A `VectorIndex` that forwards to the index in force (in-process until the Redis probe
    succeeds)."""

    __slots__ = ("current",)

    def __init__(self, current: VectorIndex):
        self.current = current

    async def nearest(
        self, partition: str, vector: Vector, max_distance: float
    ) -> tuple[bytes, float] | None:
        return await self.current.nearest(partition, vector, max_distance)

    async def add(self, partition: str, vector: Vector, payload: bytes, ttl: float) -> None:
        await self.current.add(partition, vector, payload, ttl)

    async def close(self) -> None:
        await self.current.close()
