"""What the semantic cache's parts agree on: vectors, the embedder and vector-index protocols,
and the errors that make the cache step aside (it never fails a request).

A `Vector` is a 1-D float32 numpy array of unit length (embedders normalise), so the cosine
distance of two vectors is `1 - a @ b`, in [0, 2]. A partition is an opaque string (the
rendered `vary-by`, which by default includes the subscription): an index never returns an
entry from another partition. A payload is opaque bytes (proxy/cache/entry.py encodes them).

This module imports nothing from proxy and no Redis.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt

Vector = npt.NDArray[np.float32]


class CacheUnavailableError(Exception):
    """An embedder or index could not answer (down, timed out, refused): the request goes on
    as a miss, and the cache says so (log line, metric)."""


class CacheBusyError(Exception):
    """An index too far behind to take one more store: the store is dropped and counted, and
    the index says so in its log (not an outage: the index answers)."""


class Embedder(Protocol):
    """Text -> unit vectors. One call may embed several texts (one vector each, in order)."""

    @property
    def name(self) -> str:
        """What makes vectors comparable: entries made with another embedder are not."""
        ...

    async def embed(self, texts: list[str]) -> list[Vector]:
        """Raises CacheUnavailableError when it cannot."""
        ...

    async def close(self) -> None: ...


class VectorIndex(Protocol):
    """Nearest-neighbour lookup of cached payloads by vector, per partition, with expiry."""

    async def nearest(
        self, partition: str, vector: Vector, max_distance: float
    ) -> tuple[bytes, float] | None:
        """The payload of the closest live entry within `max_distance` (cosine distance) in
        `partition`, and its distance; None when there is none. Raises CacheUnavailableError."""
        ...

    async def add(self, partition: str, vector: Vector, payload: bytes, ttl: float) -> None:
        """Keep `payload` under `vector` in `partition` for `ttl` seconds. Raises
        CacheUnavailableError."""
        ...

    async def close(self) -> None: ...


def distance(a: Vector, b: Vector) -> float:
    """Cosine distance of two unit vectors."""
    return float(1.0 - np.dot(a, b))
