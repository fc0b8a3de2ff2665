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


class BackendEmbedder:
    """An `Embedder` calling the embeddings API of backend `backend_id` with `model`."""

    def __init__(self, route: Route, backend_id: str, model: str):
        self._route = route
        self._model = model
        self.name = f"backend:{backend_id}:{model}"
        # base64 (as the OpenAI SDK asks): the vector's bytes straight into numpy, not a JSON
        # list of floats to parse; "float" once a backend refuses it with a 400
        self._format = "base64"

    async def embed(self, texts: list[str]) -> list[Vector]:
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
        pass  # the backend's connections belong to the runtime


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
