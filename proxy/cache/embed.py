"""Embeddings from an OpenAI-compatible embeddings API (`POST {backend url}/embeddings`),
through a configured backend id: its pool members, retries, breakers and credentials apply
as to any request (proxy/dispatch.py).

Anything but a 200 with one vector per text is `CacheUnavailableError`: the cache steps
aside and the request goes on as a miss. Vectors are normalised to unit length here (the
index compares them by dot product). They are asked for as base64 (`encoding_format`, as the
OpenAI SDK does: the bytes go straight into numpy, no JSON list of floats to parse), and as
floats from a backend that answers that with a 400 (some OpenAI-compatible servers do).
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import math

import msgspec
import numpy as np

from proxy.cache.base import CacheUnavailableError, Vector
from proxy.dispatch import Route
from proxy.errors import GatewayError

log = logging.getLogger("tollway")

_HEADERS = b"content-type: application/json\r\naccept-encoding: identity\r\n"


class _Item(msgspec.Struct):
    embedding: list[float] | str
    index: int = 0


class _Reply(msgspec.Struct):
    data: list[_Item]


_decoder = msgspec.json.Decoder(_Reply)
_encoder = msgspec.json.Encoder()


MAX_BATCH = 256  # texts in one embeddings request (OpenAI takes up to 2,048)


class _Batch:
    """The texts of one event-loop turn's lookups, and each lookup's wait for the answer."""

    __slots__ = ("index", "texts", "waiters")

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.index: dict[str, int] = {}  # text -> its place in `texts` (asked once)
        # One future per lookup (not one shared and shielded: a lookup that times out cancels
        # only its own, and the answer wakes each waiter in one loop turn, not two).
        self.waiters: list[asyncio.Future[list[Vector]]] = []

    def answer(self, vectors: list[Vector]) -> None:
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(vectors)

    def fail(self, exc: BaseException) -> None:
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_exception(exc)
                waiter.add_done_callback(_retrieved)  # its lookup may be gone by now


def _retrieved(future: asyncio.Future[list[Vector]]) -> None:
    if not future.cancelled():
        future.exception()


class BackendEmbedder:
    """An `Embedder` calling the embeddings API of backend `backend_id` with `model`.

    The texts every lookup asks for in one event-loop turn go out in one request (up to
    `MAX_BATCH` different texts; one asked twice goes once): under load a lookup pays a
    share of an HTTP round trip, not a whole one. A batch that fails fails each of its
    lookups alike (each then goes on as a miss)."""

    def __init__(self, route: Route, backend_id: str, model: str):
        self._route = route
        self._model = model
        self.name = f"backend:{backend_id}:{model}"
        # base64 (as the OpenAI SDK asks): the vector's bytes straight into numpy, not a JSON
        # list of floats to parse; "float" once a backend refuses it with a 400
        self._format = "base64"
        self._batch: _Batch | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def embed(self, texts: list[str]) -> list[Vector]:
        batch = self._batch
        loop = asyncio.get_running_loop()
        if batch is None or len(batch.texts) + len(texts) > MAX_BATCH:
            batch = self._batch = _Batch()
            # its first step runs after the other lookups of this turn have joined
            task = loop.create_task(self._answer(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        places = []
        for text in texts:  # a text asked twice in one turn (a popular prompt) goes once
            place = batch.index.get(text)
            if place is None:
                place = batch.index[text] = len(batch.texts)
                batch.texts.append(text)
            places.append(place)
        waiter: asyncio.Future[list[Vector]] = loop.create_future()
        batch.waiters.append(waiter)
        vectors = await waiter
        return [vectors[place] for place in places]

    async def _answer(self, batch: _Batch) -> None:
        if self._batch is batch:
            self._batch = None  # closed: later lookups start the next one
        try:
            vectors = await self._embed_all(batch.texts)
        except Exception as exc:  # CacheUnavailableError, or a bug: each lookup hears of it
            batch.fail(exc)
        except BaseException:  # cancelled (shutting down): the lookups go on as misses
            batch.fail(CacheUnavailableError("embeddings request cancelled"))
            raise
        else:
            batch.answer(vectors)

    async def _embed_all(self, texts: list[str]) -> list[Vector]:
        asked = self._format
        try:
            return await self._embed(texts, asked)
        except _FormatRefusedError:
            self._format = "float"
            log.warning("tollway: %s refuses encoding_format base64; asking for floats",
                        self.name)  # fmt: skip
            return await self._embed(texts, "float")

    async def _embed(self, texts: list[str], encoding: str) -> list[Vector]:
        body = _encoder.encode({"model": self._model, "input": texts, "encoding_format": encoding})
        try:
            status, payload = await self._route.fetch("embeddings", "", _HEADERS, body)
        except GatewayError as exc:
            raise CacheUnavailableError(f"embeddings backend: {exc.code}") from exc
        if status == 400 and encoding == "base64":
            raise _FormatRefusedError
        if status != 200:
            raise CacheUnavailableError(f"embeddings backend answered {status}")
        return _vectors(payload, len(texts))

    async def close(self) -> None:
        """Let the requests under way finish (the backend's connections are the runtime's)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


class _FormatRefusedError(Exception):
    """The backend answered 400 to `encoding_format: base64`."""


def _vectors(payload: bytes, count: int) -> list[Vector]:
    try:
        reply = _decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise CacheUnavailableError("embeddings backend: not an embeddings reply") from exc
    if len(reply.data) != count:
        raise CacheUnavailableError(f"embeddings backend: {len(reply.data)} vectors for {count}")
    items = reply.data if count == 1 else sorted(reply.data, key=lambda i: i.index)
    return [_unit(item.embedding) for item in items]


def _unit(raw: list[float] | str) -> Vector:
    """One embedding (base64 of little-endian float32s, or a list) as a unit float32 vector.
    (binascii and `v @ v` rather than base64.b64decode, a copy and np.linalg.norm: a reply's
    decoding went ~50 -> ~15 µs with cold caches out of the gateway, ~53 -> ~46 µs in it.)"""
    try:
        if isinstance(raw, str):
            vector = np.frombuffer(binascii.a2b_base64(raw), dtype="<f4")
        else:
            vector = np.asarray(raw, dtype=np.float32)
    except (binascii.Error, ValueError) as exc:  # bad padding; a length not 4 bytes a float
        raise CacheUnavailableError("embeddings backend: a malformed vector") from exc
    norm = math.sqrt(float(vector @ vector))  # 0.0 for an empty vector
    if not math.isfinite(norm) or norm == 0.0:
        raise CacheUnavailableError("embeddings backend: an empty, zero or non-finite vector")
    return (vector / norm).astype(np.float32, copy=False)
