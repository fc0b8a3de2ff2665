"""The local embedder, on the real packaged model: meaning-preserving unit vectors, batches equal
to single calls, truncation, off the event loop, offline, pinned files."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from proxy.cache import local
from proxy.cache.base import CacheUnavailableError, Embedder, Vector, distance
from proxy.cache.local import LocalEmbedder, LocalEmbedderError

pytest.importorskip("onnxruntime", reason="the local-embeddings extra is not installed")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def embedder() -> Iterator[LocalEmbedder]:
    made = LocalEmbedder()
    yield made
    asyncio.run(made.close())


def embed(embedder: LocalEmbedder, texts: list[str]) -> list[Vector]:
    return asyncio.run(embedder.embed(texts))


@pytest.mark.parametrize(
    ("anchor", "similar", "unrelated"),
    [
        (
            "How do I reset my password?",
            "I forgot my password, how can I change it?",
            "What is the capital of France?",
        ),
        (
            "Write a haiku about the sea.",
            "Compose a short poem about the ocean.",
            "Explain how TCP congestion control works.",
        ),
        (
            "What's the weather like in Paris today?",
            "Tell me today's forecast for Paris.",
            "Give me a recipe for banana bread.",
        ),
        (
            "Translate 'good morning' into German.",
            "How do you say good morning in German?",
            "List the prime numbers below 20.",
        ),
    ],
)
def test_similar_texts_are_closer_than_unrelated(
    embedder: LocalEmbedder, anchor: str, similar: str, unrelated: str
) -> None:
    a, s, u = embed(embedder, [anchor, similar, unrelated])
    assert distance(a, s) < 0.35 < 0.6 < distance(a, u)


@pytest.mark.parametrize(
    "text", ["", "hello", "How do I reset my password?", "你好 世界 👋🏽 [SEP] [PAD]"]
)
def test_unit_float32_vectors_and_identical_text_at_distance_zero(
    embedder: LocalEmbedder, text: str
) -> None:
    first, again = embed(embedder, [text, text])
    assert first.dtype == np.float32
    assert first.shape == (local.DIMENSIONS,)
    assert float(np.linalg.norm(first)) == pytest.approx(1.0, abs=1e-5)
    assert distance(first, again) == pytest.approx(0.0, abs=1e-6)
    assert distance(first, embed(embedder, [text])[0]) == pytest.approx(0.0, abs=1e-6)


def test_batch_equals_one_by_one(embedder: LocalEmbedder) -> None:
    # Lengths vary (padding), and there are more tokens than one run takes (several runs).
    texts = [f"question {i}: " + "why is the sky blue? " * (i % 7) for i in range(60)]
    texts += ["word " * 400, "", "short"]
    batch = embed(embedder, texts)
    assert len(batch) == len(texts)
    for text, vector in zip(texts, batch, strict=True):
        np.testing.assert_allclose(vector, embed(embedder, [text])[0], atol=1e-5)


@pytest.mark.parametrize(
    ("lengths", "runs"),
    [
        ([5], [[0]]),
        ([256] * 5, [[0, 1], [2, 3], [4]]),  # 2 x 256 = TOKENS_PER_RUN
        ([2, 2, 1000, 3000], [[0, 1], [2], [3]]),  # a text alone may exceed the bound
        ([10] * 60, [list(range(51)), list(range(51, 60))]),
    ],
)
def test_runs_are_bounded_in_padded_tokens(lengths: list[int], runs: list[list[int]]) -> None:
    assert list(local._runs(list(range(len(lengths))), lengths)) == runs


def test_empty_list_embeds_nothing(embedder: LocalEmbedder) -> None:
    assert embed(embedder, []) == []


def test_long_text_is_truncated_keeping_its_end(embedder: LocalEmbedder) -> None:
    tail = " ".join(f"item{i}" for i in range(300))  # more tokens than the window alone
    one, other, changed_end = embed(
        embedder,
        [
            "You are a pirate. " * 200 + tail,
            "You are a helpful assistant for a bank. " * 300 + tail,
            "You are a pirate. " * 200 + tail + " What is the capital of France?",
        ],
    )
    assert float(np.linalg.norm(one)) == pytest.approx(1.0, abs=1e-5)
    assert distance(one, other) == pytest.approx(0.0, abs=1e-6)  # only the end is seen
    assert distance(one, changed_end) > 0.01


def test_mean_pool_ignores_padding() -> None:
    hidden = np.array([[[3.0, 4.0], [100.0, -7.0]], [[1.0, 0.0], [0.0, 1.0]]], dtype=np.float32)
    mask = np.array([[1, 0], [1, 1]], dtype=np.int64)
    np.testing.assert_allclose(
        local.mean_pool(hidden, mask), [[0.6, 0.8], [2**-0.5, 2**-0.5]], rtol=1e-6
    )


def test_embedding_does_not_block_the_event_loop(embedder: LocalEmbedder) -> None:
    texts = [f"{i} " + "a fairly long prompt about many things " * 40 for i in range(8)]

    async def main() -> tuple[float, float]:
        gaps: list[float] = []
        done = asyncio.Event()

        async def tick() -> None:
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        ticker = asyncio.create_task(tick())
        start = time.perf_counter()
        await embedder.embed(texts)
        took = time.perf_counter() - start
        done.set()
        await ticker
        return took, max(gaps)

    took, longest_gap = asyncio.run(main())
    assert took > 0.1  # enough work that a blocked loop would show
    assert longest_gap < took / 4


def test_callers_that_give_up_cancel_their_queued_work(embedder: LocalEmbedder) -> None:
    text = ["x " * 200]

    async def main() -> tuple[float, float]:
        start = time.perf_counter()
        await embedder.embed(text)
        one = time.perf_counter() - start
        with pytest.raises(TimeoutError):  # the cache lookup's timeout, on a burst
            async with asyncio.timeout(0.001):
                await asyncio.gather(*(embedder.embed(text) for _ in range(20)))
        start = time.perf_counter()
        assert len(await embedder.embed(["still here"])) == 1
        return one, time.perf_counter() - start

    one, after = asyncio.run(main())
    assert after < 5 * one  # waited for the one run in progress at most, not for 19 more


def test_closed_embedder_is_unavailable() -> None:
    closed = LocalEmbedder()
    asyncio.run(closed.close())
    with pytest.raises(CacheUnavailableError, match="local:all-MiniLM-L6-v2-int8"):
        embed(closed, ["hello"])


def test_name_identifies_the_model(embedder: LocalEmbedder) -> None:
    as_protocol: Embedder = embedder  # mypy checks that it fits the protocol
    assert as_protocol.name == "local:all-MiniLM-L6-v2-int8"


def test_a_model_that_cannot_run_fails_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken:
        def run(self, *args: object) -> None:
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : bad input")

    monkeypatch.setattr(local, "_load_session", lambda path: Broken())
    with pytest.raises(LocalEmbedderError, match=r"the model does not run: .*bad input"):
        LocalEmbedder()


# --- files: pinned, packaged, offline ----------------------------------------------------------


def test_a_file_with_another_hash_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not the model")
    with pytest.raises(LocalEmbedderError, match="has sha256"):
        local.verified(path, local._MODEL[2])
    with pytest.raises(LocalEmbedderError, match="cannot read"):
        local.verified(tmp_path / "missing.onnx", local._MODEL[2])


def test_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "_MODEL", ("tollway_no_such_package", "model.onnx", "0"))
    with pytest.raises(LocalEmbedderError, match=r"pip install 'tollway\[local-embeddings\]'"):
        LocalEmbedder()


def test_missing_onnxruntime_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    with pytest.raises(LocalEmbedderError, match=r"onnxruntime is not installed: pip install"):
        LocalEmbedder()


OFFLINE = """
import asyncio, socket

def refuse(*args, **kwargs):
    raise OSError("network disabled in this test")

socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse

from proxy.cache.local import LocalEmbedder

async def main():
    embedder = LocalEmbedder()
    vectors = await embedder.embed(["How do I reset my password?", "Forgot my password"])
    await embedder.close()
    print(round(float(vectors[0] @ vectors[1]), 4))

asyncio.run(main())
"""


def run_offline(home: Path, *wrapper: str) -> subprocess.CompletedProcess[str]:
    """OFFLINE in a fresh interpreter with an empty HOME and TMPDIR and unreachable proxies."""
    home.mkdir()
    unreachable = "http://127.0.0.1:9"
    proxies = dict.fromkeys(("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"), unreachable)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XDG_", "ORT_"))}
    env |= proxies | {
        "HOME": str(home),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "TMPDIR": str(home),
    }
    return subprocess.run(
        [*wrapper, sys.executable, "-c", OFFLINE],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )


def test_loads_and_embeds_offline_in_a_fresh_process(tmp_path: Path) -> None:
    done = run_offline(tmp_path / "home")
    assert done.returncode == 0, done.stderr
    assert 0.7 < float(done.stdout) < 1.0
    assert done.stderr == ""
    # Nothing cached or fetched to disk either (onnxruntime's telemetry would leave a device id
    # and an event cache under ~/.cache/Microsoft).
    assert list((tmp_path / "home").iterdir()) == []


def test_opens_no_network_socket_even_natively(tmp_path: Path) -> None:
    # The socket patch above only sees Python; onnxruntime's native code would bypass it.
    strace = shutil.which("strace")
    if strace is None or subprocess.run([strace, "-o", os.devnull, "true"]).returncode != 0:
        pytest.skip("strace is not installed or may not trace here")
    trace = tmp_path / "trace"
    done = run_offline(
        tmp_path / "home", strace, "-f", "-e", "trace=socket,connect", "-o", str(trace)
    )
    assert done.returncode == 0, done.stderr
    calls = trace.read_text().splitlines()
    assert [c for c in calls if "AF_INET" in c or "AF_NETLINK" in c] == []
