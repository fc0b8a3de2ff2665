"""Append items to the top-level lists of a hand-written YAML file, and keep everything else.

``append_to_lists(text, [("backends", node), ...])`` is a ruamel.yaml round trip with the
file's own indentation, so comments, key order, quoting and layout stay. That is checked, not
hoped for: every line of the old text must still be there, in order; only an empty or
flow-style list may turn into a block list. Pure: text in, text out; nothing here knows what
the lists mean.

Errors (nothing is returned)::

    YamlEditError           the edit cannot be made (a key has no list)
     ├── ParseError         the text is not YAML; the message is ruamel.yaml's (many lines)
     └── LineChangedError   the dump would rewrite an old line (.number, 1-based; .line)
"""

from __future__ import annotations

import io
import itertools
import re
from collections.abc import Iterable
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import CommentMark, YAMLError
from ruamel.yaml.tokens import CommentToken

__all__ = ["LineChangedError", "ParseError", "YamlEditError", "append_to_lists"]

_KEY_ONLY_RE = re.compile(r"( *)[^\s#-][^#]*:\s*(#.*)?")  # `key:` with its value below
_PROLOGUE_RE = re.compile(r"(?:[ \t]*(?:#[^\n]*)?\n|%[^\n]*\n)*---[ \t]*(?:#[^\n]*)?\n")


class YamlEditError(Exception):
    """The edit cannot be made; the message says why."""


class ParseError(YamlEditError):
    """The text does not parse as YAML."""


class LineChangedError(YamlEditError):
    """Dumping the edited document would rewrite line ``number`` (1-based), ``line``."""

    def __init__(self, number: int, line: str) -> None:
        super().__init__(
            f"line {number} ({line.strip()[:60]!r}) would be rewritten by ruamel.yaml "
            "(mixed indentation?)"
        )
        self.number = number
        self.line = line


def append_to_lists(text: str, additions: Iterable[tuple[str, Any]]) -> str:
    """``text`` with each ``(key, node)`` appended to the list under the top-level ``key``, as
    a block item right after its last item (before the comments and blank lines that follow
    it; after a blank line when the list spaces its items). ``node`` is plain data or
    ruamel.yaml nodes (for flow style or quoting); it becomes part of the document, so pass
    a fresh one. Line endings (LF or CRLF) and a prologue up to ``---`` are kept."""
    newline = "\r\n" if "\r\n" in text else "\n"
    old = text.replace("\r\n", "\n")
    old += "" if old.endswith("\n") or not old else "\n"
    prologue, body = _split_prologue(old)
    yaml = _yaml(body)
    try:
        data = yaml.load(body)
    except YAMLError as exc:
        raise ParseError(str(exc)) from None
    replaceable: list[range] = []
    for key, node in additions:
        replaceable += _append(data, key, node, body)
    out = io.StringIO()
    yaml.dump(data, out)
    new = prologue + out.getvalue()
    offset = prologue.count("\n")
    _check_kept(old, new, [range(r.start + offset, r.stop + offset) for r in replaceable])
    return new.replace("\n", newline)


def _indents(text: str) -> tuple[int, int, int]:
    """The file's (mapping indent, sequence indent, dash offset), as ruamel.yaml counts them,
    from the first nested mapping and the first block sequence under a key; (2, 4, 2) where
    the file shows none."""
    mapping = sequence = offset = None
    lines = [
        line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    for line, below in itertools.pairwise(lines):
        if not (key := _KEY_ONLY_RE.fullmatch(line)):
            continue
        column, inner = len(key[1]), _indent(below)
        dash = below.lstrip().startswith("- ")
        if inner <= column and not dash:
            continue
        if dash and offset is None:
            content = len(below) - len(below.lstrip(" ")[1:].lstrip(" "))  # after "-   "
            offset, sequence = inner - column, content - column
        elif not dash and mapping is None:
            mapping = inner - column
    return mapping or 2, sequence or 4, 2 if offset is None else offset


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _yaml(text: str) -> YAML:
    yaml = YAML()  # round trip
    yaml.preserve_quotes = True
    yaml.width = 4096  # never fold a long line
    yaml.brace_single_entry_mapping_in_flow_sequence = True  # [{name: x}] stays so
    mapping, sequence, offset = _indents(text)
    yaml.indent(mapping=mapping, sequence=sequence, offset=offset)
    return yaml


def _split_prologue(text: str) -> tuple[str, str]:
    """(everything up to and including a leading ``---`` line, the rest): ruamel.yaml would
    drop the comments before ``---``."""
    match = _PROLOGUE_RE.match(text)
    return (text[: match.end()], text[match.end() :]) if match else ("", text)


def _append(data: Any, key: str, node: Any, body: str) -> list[range]:
    """Append ``node`` to the ``key`` list as a block item, right after the last item (before
    the comments that follow it); returns the line ranges it rewrites (a flow list turned
    block)."""
    items = data.get(key) if isinstance(data, CommentedMap) else None  # None: an empty text
    if not isinstance(items, CommentedSeq):
        raise YamlEditError(f"{key}: not a list")
    rewritten: list[range] = []
    if items.fa.flow_style() or not items:  # ruamel.yaml leaves `[]` unmarked
        rewritten.append(_key_lines(data, key, body))
        items.fa.set_block_style()  # `[]` -> a block list; `[{...}]` -> `- {...}` items
    lines = body.splitlines()
    spaced = len(items) >= 2 and _blank_before(lines[: _last_line(items)])  # spaced items
    tail = ""
    if items:
        end, tail = _split_end(items, lines[_last_line(items)].find("-"))
        _set_end(items, end + "\n" if spaced else end)
    items.append(_commented(node))
    if tail:
        _set_end(items, "\n" + tail)
    return rewritten


def _commented(node: Any) -> Any:
    """``node`` with its plain dicts and lists made ruamel.yaml's own: only those carry the
    comments and blank lines that move from the old last item to the new one."""
    if isinstance(node, dict):
        node = node if isinstance(node, CommentedMap) else CommentedMap(node)
        keys: Iterable[Any] = list(node)
    elif isinstance(node, list):
        node = node if isinstance(node, CommentedSeq) else CommentedSeq(node)
        keys = range(len(node))
    else:
        return node
    for key in keys:
        if (value := _commented(node[key])) is not node[key]:
            node[key] = value
    return node


def _key_lines(data: CommentedMap, key: str, body: str) -> range:
    """The 0-based lines from ``key`` to the next top-level key."""
    first = data.lc.key(key)[0]
    following = [data.lc.key(k)[0] for k in data if data.lc.key(k)[0] > first]
    return range(first, min(following, default=body.count("\n") + 1))


def _last_line(items: CommentedSeq) -> int:
    """The 0-based line where the last item of ``items`` starts."""
    line: int = items.lc.item(len(items) - 1)[0]
    return line


def _blank_before(lines: list[str]) -> bool:
    """Whether ``lines`` end in a blank line, maybe followed by comments."""
    while lines and lines[-1].lstrip().startswith("#"):
        lines.pop()
    return bool(lines) and not lines[-1].strip()


# ruamel.yaml keeps the end of an item's last line - its comment, and every comment and blank
# line up to the next item or key - in one token on the last scalar or flow collection (a
# flow collection's token is also its own `ca.comment[0]`, the same object). A mapping's
# `ca.items[key]` is [?, comments before, comment after, ?]; a sequence's [comment after,
# comments before].


def _last(items: CommentedSeq) -> tuple[CommentedMap | CommentedSeq, Any]:
    """(collection, key) of the last scalar or flow collection of ``items``' last item."""
    node: CommentedMap | CommentedSeq = items
    key: Any = len(items) - 1
    while isinstance(value := node[key], CommentedMap | CommentedSeq) and value:
        if value.fa.flow_style():
            break
        node = value
        key = next(reversed(value)) if isinstance(value, CommentedMap) else len(value) - 1
    return node, key


def _after_slot(node: CommentedMap | CommentedSeq) -> tuple[int, int]:
    """(length, index) of the comment after an item in ``node.ca.items`` entries."""
    return (4, 2) if isinstance(node, CommentedMap) else (2, 0)


def _end_token(items: CommentedSeq) -> CommentToken | None:
    node, key = _last(items)
    entry = node.ca.items.get(key)
    token = entry[_after_slot(node)[1]] if entry else None
    value = node[key]
    if token is None and isinstance(value, CommentedMap | CommentedSeq) and value.ca.comment:
        token = value.ca.comment[0]
    return token


def _set_end(items: CommentedSeq, text: str) -> None:
    """Make ``text`` the end of the last item's last line (a comment, then newlines)."""
    if (token := _end_token(items)) is not None:
        token.value = text
    elif text != "\n":
        token = CommentToken(text, CommentMark(0), None)
        node, key = _last(items)
        if isinstance(value := node[key], CommentedMap | CommentedSeq):  # a flow collection
            value.ca.comment = [token, None]
        else:
            length, index = _after_slot(node)
            node.ca.items.setdefault(key, [None] * length)[index] = token


def _split_end(items: CommentedSeq, dash: int) -> tuple[str, str]:
    """(the end of the last item's last line with the comment lines indented into the item
    right below it, the rest): the rest - a blank line, a comment at the list's level - goes
    after a new item."""
    token = _end_token(items)
    lines = (token.value if token is not None else "\n").splitlines(keepends=True)
    keep = 1
    while keep < len(lines) and lines[keep].lstrip(" ").startswith("#"):
        if _indent(lines[keep]) <= dash:
            break
        keep += 1
    return "".join(lines[:keep]), "".join(lines[keep:])


def _check_kept(old: str, new: str, replaceable: list[range]) -> None:
    """Every line of ``old`` outside ``replaceable`` is in ``new``, unchanged and in order."""
    lines = iter(new.splitlines(keepends=True))
    for number, line in enumerate(old.splitlines(keepends=True)):
        if any(number in r for r in replaceable):
            continue
        if not any(line == candidate for candidate in lines):
            raise LineChangedError(number + 1, line)
