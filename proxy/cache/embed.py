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
import base64
import logging

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
    """The texts of one event-loop turn's lookups, and the one answer they share."""

    __slots__ = ("future", "index", "texts")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.texts: list[str] = []
        self.index: dict[str, int] = {}  # text -> its place in `texts` (asked once)
        self.future: asyncio.Future[list[Vector]] = loop.create_future()
        # A lookup that timed out no longer awaits it: its failure is nobody's to report.
        self.future.add_done_callback(_retrieved)


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
        if batch is None or len(batch.texts) + len(texts) > MAX_BATCH:
            loop = asyncio.get_running_loop()
            batch = self._batch = _Batch(loop)
            loop.call_soon(self._send, batch)  # after the other lookups of this turn
        places = []
        for text in texts:  # a text asked twice in one turn (a popular prompt) goes once
            place = batch.index.get(text)
            if place is None:
                place = batch.index[text] = len(batch.texts)
                batch.texts.append(text)
            places.append(place)
        # shielded: a lookup that times out must not cancel its batch-mates' request
        vectors = await asyncio.shield(batch.future)
        return [vectors[place] for place in places]

    def _send(self, batch: _Batch) -> None:
        if self._batch is batch:
            self._batch = None
        task = asyncio.get_running_loop().create_task(self._answer(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, batch: _Batch) -> None:
        try:
            vectors = await self._embed_all(batch.texts)
        except Exception as exc:  # CacheUnavailableError, or a bug: each lookup hears of it
            if not batch.future.done():
                batch.future.set_exception(exc)
            return
        if not batch.future.done():
            batch.future.set_result(vectors)

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
    out: list[Vector] = []
    for item in sorted(reply.data, key=lambda i: i.index):
        raw = item.embedding
        if isinstance(raw, str):
            vector = np.frombuffer(base64.b64decode(raw), dtype="<f4").astype(np.float32)
        else:
            vector = np.asarray(raw, dtype=np.float32)
        norm = float(np.linalg.norm(vector))
        if not vector.size or not np.isfinite(norm) or norm == 0.0:
            raise CacheUnavailableError("embeddings backend: an empty or zero vector")
        out.append(vector / norm)
    return out
