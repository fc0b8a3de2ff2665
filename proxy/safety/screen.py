r"""The local screen: blocklists of terms and regular expressions, matched on normalised text,
usable with no Content Safety service (SPEC §6 `llm-content-safety`, issue 9).

Text and terms go through the same `normalise`: compatibility forms folded (NFKC: fullwidth
and mathematical letters become ASCII), common Cyrillic/Greek look-alikes mapped to the Latin
letters they imitate, case folded, stray combining marks, zero-width characters, soft
hyphens, bidi controls and variation selectors removed, whitespace runs collapsed to one
space. Unicode tag characters (U+E0020-E007E, invisible "ASCII smuggling") become the ASCII
they encode.

A term matches as whole words: not inside a longer word (letters and digits of any script
count), and the spaces inside a term match any run of other characters (`make a bomb` matches
`make-a_bomb`). A pattern is an RE2 regular expression (google-re2: the syntax of Envoy and
Google Cloud; no lookaround or backreferences, and `\b`, `\w`, `\d` are ASCII: `\pL` is any
letter) searched, case-insensitively, in the normalised text (so it sees lower case and Latin
look-alikes already folded). Each list is one RE2 regex compiled once (terms as a prefix
trie): RE2 runs in time linear in the text whatever the pattern, so no request text can make
a pattern backtrack for seconds, and a list of 60 terms and 3 patterns screens 30 KB in about
0.05 ms (Python's `re` took 2.4 ms). A result names the lists that matched, never the text
that matched them.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence

import re2

# Look-alikes mapped to the Latin letters they pass for, upper and lower case, before case
# folding: Greek capital nu looks like N but its lower case like v. Written as escapes (the
# letters themselves are what ruff's RUF001 flags).
_FROM = (
    # Cyrillic, upper then lower case
    "\u0410\u0412\u0415\u041a\u041c\u041d\u041e\u0420\u0421\u0422\u0425\u0423"
    "\u0406\u0408\u0405\u0500\u04ba\u051a\u051c\u04c0"
    "\u0430\u0435\u043e\u0440\u0441\u0445\u0443\u0456\u0458\u0455\u0501\u04bb"
    "\u051b\u051d\u04cf\u044c"
    # Greek, upper then lower case
    "\u0391\u0392\u0395\u0396\u0397\u0399\u039a\u039c\u039d\u039f\u03a1\u03a4"
    "\u03a5\u03a7"
    "\u03b1\u03bf\u03c1\u03b9\u03ba\u03bd\u03c5\u03c4\u03c7\u03b5\u03bc"
    # Latin and phonetic letters
    "\u0131\u0237\u0261\u0251\u029f\u1d00\u1d04\u1d0f"
)
_TO = "ABEKMHOPCTXYIJSDHQWIaeopcxyijsdhqwlbABEZHIKMNOPTYXaopikvutxeuijgalaco"
_LOOKALIKES = dict(zip(_FROM, _TO, strict=True))
_LOOKALIKE = re.compile(f"[{_FROM}]")
# Removed outright: combining marks left after NFKC (overlays such as U+0332 under each
# letter), zero-width and bidi format characters, soft hyphen, fillers, variation selectors;
# tag characters are kept as the ASCII they encode.
_HIDDEN = re.compile(
    "[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f"
    "\u00ad\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e"
    "\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0"
    "\U0001d173-\U0001d17a\U000e0000-\U000e001f\U000e007f-\U000e0fff]+"
    "|([\U000e0020-\U000e007e]+)"
)


def normalise(text: str) -> str:
    """The form both sides of a match take (see the module docstring)."""
    if text.isascii():  # the common case: NFKC and the maps change nothing
        return " ".join(text.lower().split())
    text = unicodedata.normalize("NFKC", text)
    text = _LOOKALIKE.sub(_lookalike, text)
    # After case folding, which may add a mark (U+0130 becomes i and U+0307).
    text = _HIDDEN.sub(_revealed, text.casefold())
    return " ".join(text.split())


def _lookalike(match: re.Match[str]) -> str:
    return _LOOKALIKES[match.group()]


def _revealed(match: re.Match[str]) -> str:
    tags = match.group(1)
    return "".join(chr(ord(c) - 0xE0000) for c in tags).lower() if tags else ""


class LocalScreen:
    """Named blocklists of terms and of regular expressions.

    `LocalScreen(terms={"banned-terms": ["make a bomb"]}, patterns={"cards": [r"\\d{16}"]})`;
    a name may have both. An invalid pattern raises `ValueError` naming the list."""

    def __init__(
        self,
        terms: Mapping[str, Iterable[str]] | None = None,
        patterns: Mapping[str, Iterable[str]] | None = None,
    ):
        terms, patterns = terms or {}, patterns or {}
        self._lists: list[tuple[str, Callable[[bytes], bool]]] = []
        for name in dict.fromkeys([*terms, *patterns]):
            sources = [_terms_regex(terms.get(name, ()))]
            sources += [_checked(name, p) for p in patterns.get(name, ())]
            sources = [s for s in sources if s]
            if sources:
                self._lists.append((name, _matcher(_combined(name, sources))))

    @property
    def names(self) -> tuple[str, ...]:
        """The lists that can match (a list with no terms and no patterns never does)."""
        return tuple(name for name, _ in self._lists)

    def screen(self, text: str) -> frozenset[str]:
        """The names of the lists that match `text`."""
        return self._search([normalise(text)]) if self._lists else frozenset()

    def screen_all(self, texts: Sequence[str]) -> frozenset[str]:
        """The lists that match any of `texts` (one role class's parts): the parts joined
        with a space (a phrase split across parts; a space is a word boundary, so whatever
        matches in one part matches there too) and joined with nothing (a word split across
        parts). Screen system and user texts with separate calls."""
        if not self._lists:
            return frozenset()
        normal = [normalise(text) for text in texts]  # once each, then joined
        if len(normal) > 1:
            normal = [" ".join(normal), "".join(normal)]
        return self._search(normal)

    def _search(self, texts: list[str]) -> frozenset[str]:
        encoded = [text.encode() for text in texts]
        return frozenset(
            name for name, matches in self._lists if any(matches(text) for text in encoded)
        )


def _options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # a refused pattern is a ValueError, not a line on stderr
    options.max_mem = _MAX_MEM
    return options


_MAX_MEM = 64 << 20  # RE2 memory per list (its DFA); past it a huge list runs slower, still linear
_OPTIONS = _options()


def _compile(pattern: str) -> re2._Regexp[str]:
    return re2.compile(pattern, _OPTIONS)


def _matcher(pattern: str) -> Callable[[bytes], bool]:
    """Does `pattern` occur in a UTF-8 text? Through an RE2 set of one pattern, which takes
    the bytes as they are (a third of the cost of `re2.search` on a short text); a pattern
    too large for a set's automaton goes through the regex API instead."""
    one = re2.Set.SearchSet(_OPTIONS)
    one.Add(pattern)
    try:
        one.Compile()
    except re2.error:
        regex = re2.compile(pattern.encode(), _OPTIONS)
        return lambda text: regex.search(text) is not None
    return lambda text: bool(one.Match(text))


def _combined(name: str, sources: list[str]) -> str:
    """The list's one pattern, checked to compile on its own."""
    combined = "|".join(sources)
    try:
        _compile(combined)
    except re2.error as exc:
        raise ValueError(f"{name}: the patterns cannot be combined: {_why(exc)}") from None
    return combined


def _why(exc: Exception) -> str:
    text = str(exc.args[0] if exc.args else exc)
    return text[2:-1] if text.startswith(("b'", 'b"')) else text


def _checked(name: str, pattern: str) -> str:
    try:
        compiled = _compile(pattern)
    except re2.error as exc:
        raise ValueError(
            f"{name}: invalid pattern {pattern!r}: {_why(exc)} (patterns are RE2 regular "
            "expressions: no lookaround or backreferences)"
        ) from None
    if compiled.groupindex or _BACKREFERENCE.search(pattern):
        # A list's patterns are alternatives of one regex: they share one numbering of
        # groups and one namespace of group names.
        raise ValueError(
            f"{name}: pattern {pattern!r} uses a named group or a backreference, "
            "which cannot be combined with the list's other patterns"
        )
    # The text is case-folded already: a pattern with no upper case in it (none of `\W`, `[A-Z]`)
    # matches it as it is; any other ignores case in its own scope (a regex ignoring case
    # costs about twice as much, and the terms are lower case already).
    # A group of its own either way: a flag such as `(?s)` inside it stays inside it.
    return f"(?:{pattern})" if pattern == pattern.lower() else f"(?i:{pattern})"


_BACKREFERENCE = re.compile(r"\\[1-9]|\(\?P=|\(\?\(")
_Trie = dict[str, "_Trie"]


def _terms_regex(terms: Iterable[str]) -> str:
    """One regex for whole-word terms: a prefix trie, so a position costs the trie's depth,
    not the number of terms."""
    trie: _Trie = {}
    for term in terms:
        words = normalise(term).split()
        if not words:
            continue
        node = trie
        for token in _tokens(" ".join(words)):
            node = node.setdefault(token, {})
        node[""] = {}  # end of a term
    if not trie:
        return ""
    # RE2 has no lookaround: the characters around a term are matched (the text's start or
    # end, or a character that is neither a letter nor a digit nor `_`).
    return rf"(?:^|[^\pL\pN_])(?:{_trie_regex(trie)})(?:$|[^\pL\pN_])"


def _tokens(term: str) -> list[str]:
    return [_SEPARATOR if c == " " else re.escape(c) for c in term]


_SEPARATOR = r"[^\pL\pN]+"  # between the words of a term: anything but letters and digits


def _trie_regex(node: _Trie) -> str:
    """The regex of a trie node; recursive only where terms branch or end (a long term is a
    chain, walked in a loop)."""
    chain = ""
    while len(node) == 1 and "" not in node:
        token, node = next(iter(node.items()))
        chain += token
    ends = "" in node
    branches = [token + _trie_regex(child) for token, child in node.items() if token]
    if not branches:
        return chain
    body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
    return chain + (f"(?:{body})?" if ends else body)
