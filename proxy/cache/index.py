"""The in-process vector index (the default): nearest neighbour per partition, bounded by
entry count with LRU eviction, entries expiring after their TTL.

Each partition keeps its vectors as the rows of one float32 matrix. A small partition is
searched exactly: one matrix-vector product (numpy, BLAS) and an argmax. A large one (from
SKETCH_FROM floats: 1,024 rows of 256 dimensions, 171 of 1,536) would be read whole on every
lookup (a 10,000 x 1,536 partition is 61 MB: ~3.5 ms here), so it also keeps a *sketch* of
every row, its random projection to SKETCH_DIM dimensions: a lookup scores the sketch (2.5 MB
for 10,000 rows), takes candidates that include the SKETCH_CANDIDATES best rows (`best_rows`),
and scores those exactly. The answer is exact for the candidates, so a hit is always within
the threshold; a neighbour the sketch misses makes a miss (random projection keeps a near
duplicate's similarity to within a few hundredths at 64 dimensions, far inside the 32 best of
10,000 rows; proven in tests/test_cache.py). Rows are kept contiguous (a removed row is
replaced by the last one). The matrices double while small; past GROW_BYTES a partition's
matrix is made once for every row it may hold (`_capacity`), and the memory past its rows
stays untouched, so not resident. One LRU order spans every partition: a hit refreshes its
entry, and adding past `max_entries` evicts the least recently used. Expired rows are dropped
from a partition when a lookup there meets one. Storing compares only the last RECENT rows.
Nothing here awaits: the coroutine methods exist to fit the `VectorIndex` protocol
(proxy/cache/base.py).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from proxy.cache.base import Vector

# A vector this close to a stored one replaces it instead of adding a twin (two misses for
# one prompt at once both store their reply). Only the most recent rows are compared: a prompt
# already in the index is a hit, not stored again, so a twin can only come from misses stored
# moments apart, whose rows are the last ones (a removal may move one earlier: a harmless twin).
SAME = 1e-6
RECENT = 256
SKETCH_DIM = 64  # dimensions of a row's sketch (vectors of at most twice that keep none)
SKETCH_CANDIDATES = 32  # rows the sketch picks for the exact score
# Floats in a partition (rows x dimensions) from which lookups use the sketch. Between
# requests the gateway finds a partition's rows in neither cache level: timed inside it (c=1
# misses, 0 to ~4,500 rows of 256), a lookup took 263-286 us with 1 << 20, 188-231 with 1 << 18.
SKETCH_FROM = 1 << 18
# The candidates are the rows scoring at least the SAMPLE_RANK-th best of every SAMPLE_STRIDE-th
# row (~96 rows): a superset of the best SKETCH_CANDIDATES whenever it holds that many, found
# in ~15 us where np.argpartition takes ~90 us for 10,000 rows (measured here).
SAMPLE_STRIDE = 16
SAMPLE_RANK = 6
MAX_CANDIDATES = 8 * SKETCH_CANDIDATES
# Below SELECT_BELOW rows np.argpartition costs the same (10-30 us) and picks exactly the
# SKETCH_CANDIDATES best instead of ~96: fewer rows fetched for the exact scores. Timed
# inside the gateway (bench.stages, c=1 misses, 0 to ~4,500 rows, three alternations), a
# search took 241/246/222 us against 259/265/244 with the sample.
SELECT_BELOW = 8192
# A full partition's matrices double while the rows copied are at most GROW_BYTES; past that
# a partition gets room for every row it may hold, up to RESERVE_BYTES of vectors, made
# once. A put runs on the event loop, and doubling a large matrix stalled it: filling one
# partition with 10,000 vectors, the longest put took 26 ms at 256 dimensions and 145 ms at
# 1,536 (python -m bench.fill), for copying the rows and faulting in the doubled matrix.
GROW_BYTES = 1 << 20
RESERVE_BYTES = 256 << 20
_projections: dict[int, npt.NDArray[np.float32]] = {}


def projection(dim: int) -> npt.NDArray[np.float32] | None:
    """The fixed random projection of `dim`-dimension vectors to their sketch (None when
    the vectors are small enough to score whole): Gaussian, scaled to keep lengths."""
    if dim <= 2 * SKETCH_DIM:
        return None
    found = _projections.get(dim)
    if found is None:
        rng = np.random.default_rng(dim)  # the same for every process and run
        matrix = rng.standard_normal((dim, SKETCH_DIM)) / np.sqrt(SKETCH_DIM)
        found = _projections[dim] = matrix.astype(np.float32)
    return found


def best_rows(scores: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.intp]:
    """Rows that include the SKETCH_CANDIDATES best `scores` (see SAMPLE_STRIDE)."""
    if len(scores) < SELECT_BELOW:
        return np.argpartition(scores, -SKETCH_CANDIDATES)[-SKETCH_CANDIDATES:]
    sample = scores[::SAMPLE_STRIDE]
    if len(sample) > SAMPLE_RANK:
        cutoff = np.partition(sample, -SAMPLE_RANK)[-SAMPLE_RANK]
        rows = np.flatnonzero(scores >= cutoff)
        if SKETCH_CANDIDATES <= len(rows) <= MAX_CANDIDATES:
            return rows
    return np.argpartition(scores, -SKETCH_CANDIDATES)[-SKETCH_CANDIDATES:]


class _Partition:
    """The rows of one partition."""

    __slots__ = ("expires", "ids", "limit", "payloads", "projection", "row_bytes", "size",
                 "sketch", "soonest", "vectors")  # fmt: skip

    def __init__(self, dim: int, limit: int):
        self.limit = limit  # rows the partition may hold (its index's bound)
        self.vectors: npt.NDArray[np.float32] = np.empty((4, dim), dtype=np.float32)
        self.expires: npt.NDArray[np.float64] = np.empty(4, dtype=np.float64)
        self.projection = projection(dim)
        self.sketch: npt.NDArray[np.float32] | None = None
        if self.projection is not None:
            self.sketch = np.empty((4, SKETCH_DIM), dtype=np.float32)
        self.ids: list[int] = []
        self.payloads: list[bytes] = []
        # a row's vector, sketch and expiry
        self.row_bytes = 4 * dim + (0 if self.sketch is None else 4 * SKETCH_DIM) + 8
        self.size = 0
        # the earliest expiry among the rows, None when a removal or a renewal may have
        # changed it: a lookup reads a float instead of a numpy pass over every row
        self.soonest: float | None = float("inf")

    def append(self, entry_id: int, vector: Vector, payload: bytes, expires: float) -> None:
        n = self.size
        if n == len(self.vectors):
            self._make_room(n + 1)
        self.vectors[n] = vector
        if self.sketch is not None and self.projection is not None:
            self.sketch[n] = vector @ self.projection
        self.expires[n] = expires
        if self.soonest is not None and expires < self.soonest:
            self.soonest = expires
        self.ids.append(entry_id)
        self.payloads.append(payload)
        self.size = n + 1

    def extend(self, first_id: int, vectors: Vector, payloads: list[bytes],
               expires: npt.NDArray[np.float64]) -> int:  # fmt: skip
        """`append` for many rows at once (ids from `first_id` on): one numpy pass each.
        Returns the bytes the rows take (`held_bytes`)."""
        n, k = self.size, len(vectors)
        self._make_room(n + k)
        self.vectors[n : n + k] = vectors
        if self.sketch is not None and self.projection is not None:
            self.sketch[n : n + k] = vectors @ self.projection
        self.expires[n : n + k] = expires
        if self.soonest is not None:
            self.soonest = min(self.soonest, float(expires.min()))
        self.ids.extend(range(first_id, first_id + k))
        self.payloads.extend(payloads)
        self.size = n + k
        return sum(map(len, payloads)) + k * self.row_bytes

    def replace(self, row: int, payload: bytes, expires: float) -> int:
        """A new payload and expiry for `row` (the same vector stored again); returns the
        change in bytes held."""
        change = len(payload) - len(self.payloads[row])
        self.payloads[row] = payload
        self.expires[row] = expires
        self.soonest = None  # the renewed row may have been the earliest
        return change

    def held_bytes(self) -> int:
        """The payloads, and the rows of the vectors and sketches, this partition holds (a
        walk over its payloads: for dropping it, which walks its rows anyway)."""
        return sum(map(len, self.payloads)) + self.size * self.row_bytes

    def _make_room(self, rows: int) -> None:
        """Matrices of at least `rows` rows, grown as `_capacity` says, moved once."""
        capacity = len(self.vectors)
        if rows <= capacity:
            return
        while capacity < rows:
            capacity = self._capacity(capacity)
        n = self.size
        self.vectors = _grown(self.vectors, n, capacity)
        self.expires = _grown(self.expires, n, capacity)
        if self.sketch is not None:
            self.sketch = _grown(self.sketch, n, capacity)

    def _capacity(self, rows: int) -> int:
        """The rows after `rows`: twice as many while that copies at most GROW_BYTES, else
        room for every row the partition may hold (up to RESERVE_BYTES; past that, doubling)."""
        width = int(self.vectors.shape[1])
        if rows * width * 4 <= GROW_BYTES:
            wanted = 2 * rows
        else:
            wanted = max(2 * rows, RESERVE_BYTES // (width * 4))
        return max(rows + 1, min(wanted, self.limit))

    def nearest(self, vector: Vector) -> tuple[int, float]:
        """The row most similar to `vector` and its cosine similarity: exact for a small
        partition, else the best of the sketch's candidates (see the module docstring)."""
        n, sketch, project = self.size, self.sketch, self.projection
        if (
            sketch is None
            or project is None
            or n <= SKETCH_CANDIDATES
            or n * len(vector) < SKETCH_FROM
        ):
            similarity = self.vectors[:n] @ vector
            row = int(similarity.argmax())
            return row, float(similarity[row])
        rows = best_rows(sketch[:n] @ (vector @ project))
        similarity = self.vectors[rows] @ vector
        best = int(similarity.argmax())
        return int(rows[best]), float(similarity[best])

    def remove(self, row: int) -> int | None:
        """Drop `row`; return the id of the entry that moved into it (None if none did)."""
        last = self.size - 1
        moved = None
        if self.soonest is not None and self.expires[row] <= self.soonest:
            self.soonest = None
        if row != last:
            self.vectors[row] = self.vectors[last]
            if self.sketch is not None:
                self.sketch[row] = self.sketch[last]
            self.expires[row] = self.expires[last]
            self.ids[row] = moved = self.ids[last]
            self.payloads[row] = self.payloads[last]
        self.ids.pop()
        self.payloads.pop()
        self.size = last
        return moved


def _grown(rows: npt.NDArray[Any], n: int, capacity: int) -> npt.NDArray[Any]:
    """`rows` with room for `capacity` rows: a new matrix holding its first `n`, the rest
    left unwritten (memory the kernel only provides once a row is stored there)."""
    grown = np.empty((capacity, *rows.shape[1:]), dtype=rows.dtype)
    grown[:n] = rows[:n]
    return grown


class MemoryIndex:
    """A bounded in-process `VectorIndex`."""

    name = "memory"

    def __init__(
        self,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        on_evict: Callable[[str], None] | None = None,
        max_rows: int | None = None,
    ):
        self.max_entries = max_entries
        # rows one partition may reach (a bound a caller keeps itself, as the Redis index's
        # copy does): the room a large partition is given at once
        self.max_rows = min(max_entries, max_rows or max_entries)
        self._clock = clock
        self._on_evict = on_evict  # told the partition of every entry evicted for room
        self._partitions: dict[str, _Partition] = {}
        # entry id -> (partition, row), least recently used first
        self._lru: OrderedDict[int, tuple[str, int]] = OrderedDict()
        self._next_id = 0
        self._held = 0  # bytes: see held_bytes
        self.evicted = 0  # entries dropped for room (not for age)

    def __len__(self) -> int:
        return len(self._lru)

    def held_bytes(self) -> int:
        """The stored payloads and the vector rows (and sketches) of every partition: the
        memory the entries take, not the room reserved for more. A running total: the
        metrics thread reads it without walking the partitions (which holds the GIL)."""
        return self._held

    async def nearest(
        self, partition: str, vector: Vector, max_distance: float
    ) -> tuple[bytes, float] | None:
        return self.search(partition, vector, max_distance)

    def search(
        self, partition: str, vector: Vector, max_distance: float
    ) -> tuple[bytes, float] | None:
        """`nearest` without the coroutine (the Redis index's copies, which answer in the
        same call)."""
        part = self._partitions.get(partition)
        if part is None or part.size == 0 or part.vectors.shape[1] != vector.shape[0]:
            return None
        now = self._now()
        soonest = part.soonest
        if soonest is None:
            soonest = part.soonest = float(part.expires[: part.size].min())
        if soonest <= now:
            self._expire(partition, part, now)
            if part.size == 0:
                return None
        row, similarity = part.nearest(vector)
        distance = max(0.0, 1.0 - similarity)
        if distance > max_distance:
            return None
        self._lru.move_to_end(part.ids[row])
        return part.payloads[row], distance

    async def add(self, partition: str, vector: Vector, payload: bytes, ttl: float) -> None:
        self.put(partition, vector, payload, ttl)

    def put(self, partition: str, vector: Vector, payload: bytes, ttl: float) -> None:
        """`add` without the coroutine (tests, benchmarks)."""
        expires = self._now() + ttl
        part = self._partitions.get(partition)
        if part is not None and part.vectors.shape[1] != vector.shape[0]:
            self._drop_partition(partition, part)  # another embedder's dimension
        elif part is not None:
            first = max(0, part.size - RECENT)
            similarity = part.vectors[first : part.size] @ vector
            row = first + int(similarity.argmax())
            if similarity[row - first] >= 1.0 - SAME:
                self._held += part.replace(row, payload, expires)
                self._lru.move_to_end(part.ids[row])
                return
        while len(self._lru) >= self.max_entries:
            self._evict_oldest()
        part = self._partition(partition, vector.shape[0])
        entry_id = self._next_id
        self._next_id += 1
        self._lru[entry_id] = (partition, part.size)
        part.append(entry_id, vector, payload, expires)
        self._held += len(payload) + part.row_bytes

    def put_many(self, partition: str, vectors: Vector, payloads: list[bytes],
                 ttls: npt.NDArray[np.float64]) -> None:  # fmt: skip
        """Add rows at once (a partition read whole): one numpy pass each instead of a `put`
        per row, which took ~30-75 µs a row. The rows are added as given, compared with
        nothing (the caller leaves out what the partition holds already); the last
        `max_entries` of them at most."""
        part = self._partitions.get(partition)
        if part is not None and part.vectors.shape[1] != vectors.shape[1]:
            self._drop_partition(partition, part)  # another embedder's dimension
        if len(payloads) > self.max_entries:
            vectors, payloads = vectors[-self.max_entries :], payloads[-self.max_entries :]
            ttls = ttls[-self.max_entries :]
        if not payloads:
            return
        while len(self._lru) + len(payloads) > self.max_entries:
            self._evict_oldest()
        part = self._partition(partition, vectors.shape[1])
        first, row = self._next_id, part.size
        self._next_id += len(payloads)
        for entry_id in range(first, self._next_id):
            self._lru[entry_id] = (partition, row)
            row += 1
        self._held += part.extend(first, vectors, payloads, self._now() + ttls)

    def _partition(self, partition: str, dim: int) -> _Partition:
        """`partition`'s rows, made empty when it has none (after the evictions for room,
        which may have emptied it)."""
        part = self._partitions.get(partition)
        if part is None:
            part = self._partitions[partition] = _Partition(dim, self.max_rows)
        return part

    def count(self, partition: str) -> int:
        """How many entries `partition` holds (expired ones not yet dropped included)."""
        part = self._partitions.get(partition)
        return 0 if part is None else part.size

    def discard(self, partition: str, payload: bytes) -> None:
        """Forget the entry of `partition` whose payload is `payload` (a linear scan: for
        rare paths, such as an entry found gone elsewhere)."""
        part = self._partitions.get(partition)
        if part is None:
            return
        try:
            row = part.payloads.index(payload)
        except ValueError:  # not (or no longer) in the partition
            return
        self._lru.pop(part.ids[row], None)
        self._remove(partition, part, row)

    def drop(self, partition: str) -> None:
        """Forget every entry of `partition`."""
        part = self._partitions.get(partition)
        if part is not None:
            self._drop_partition(partition, part)

    def clear(self) -> None:
        self._partitions.clear()
        self._lru.clear()
        self._held = 0

    async def close(self) -> None:
        self.clear()

    def _now(self) -> float:
        return self._clock()

    def _evict_oldest(self) -> None:
        _, (partition, row) = self._lru.popitem(last=False)
        self.evicted += 1
        self._remove(partition, self._partitions[partition], row)
        if self._on_evict is not None:
            self._on_evict(partition)

    def _expire(self, partition: str, part: _Partition, now: float) -> None:
        """Drop the expired rows: found in one numpy pass (a row-by-row loop took ~2 ms a
        lookup among 8,000 rows whose entries expire in turn), removed from the last: a
        removal moves the last row, which by then is one kept."""
        expired = np.flatnonzero(part.expires[: part.size] <= now)
        for row in expired[::-1].tolist():
            self._lru.pop(part.ids[row], None)
            self._remove(partition, part, row)

    def _remove(self, partition: str, part: _Partition, row: int) -> None:
        """Drop a row whose LRU entry is already gone."""
        self._held -= len(part.payloads[row]) + part.row_bytes
        moved = part.remove(row)
        if moved is not None:
            self._lru[moved] = (partition, row)  # an existing key keeps its LRU position
        if part.size == 0:
            del self._partitions[partition]

    def _drop_partition(self, partition: str, part: _Partition) -> None:
        self._held -= part.held_bytes()
        for entry_id in part.ids:
            self._lru.pop(entry_id, None)
        del self._partitions[partition]
