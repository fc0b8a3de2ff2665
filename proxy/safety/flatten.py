"""The texts a request body asks a model to read, by role class, for content screening.

APIM's content-safety policy skipped a `system` sent as an array and screened system and user
text concatenated, so a long benign system prompt diluted a harmful user message
(../shared/reference/apim-ai-gateway.md §4 item 13). Here every shape is walked and the two
classes never mix:

- `system`: `system`/`developer` messages (string or part array), a top-level `system`
  (Anthropic: string or block array) and the Responses API `instructions`;
- `user`: every other message (user, assistant, tool, function, unknown roles), tool-call
  arguments (decoded: JSON escapes such as `\\u0062omb` cannot hide a word), tool results,
  the completions `prompt` and `suffix`, and `input` (embeddings, or Responses items).

A part of any type is collected when it carries a `text` string; binary payloads (image URLs,
audio, base64 files) are not text and are left out. The body is decoded into plain objects:
a shape the gateway would refuse still yields what text it holds, and a body that is not JSON
is returned whole as user text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from proxy.schemas import JSON_ERRORS, SYSTEM_ROLES

# The keys of a message, part or item whose values are text (or hold text) the model reads.
_TEXT_KEYS = ("text", "content", "refusal", "summary", "thinking", "output", "tool_calls",
              "reasoning_content", "reasoning")  # fmt: skip
# The keys whose values are tool arguments: every string in them is collected, keys included.
_ARGUMENT_KEYS = ("arguments", "input")
_FUNCTION_KEYS = ("function", "function_call")


@dataclass(slots=True)
class Texts:
    """The texts to screen, messages and parts in body order; one string per part, never
    joined here."""

    system: list[str] = field(default_factory=list)
    user: list[str] = field(default_factory=list)
    # What tools and documents returned (tool and function messages, Responses
    # function_call_output items, Anthropic tool_result and document blocks): in `user` too,
    # and here again for Prompt Shields' document-attack check.
    documents: list[str] = field(default_factory=list)


def flatten(body: bytes) -> Texts:
    """The texts of a request body of any operation (chat, completions, embeddings,
    responses, or an Anthropic-style messages body), by role class."""
    texts = Texts()
    try:
        doc = msgspec.json.decode(body)
    except JSON_ERRORS:
        text = body.decode("utf-8", "replace")
        if text.strip():
            texts.user.append(text)
        return texts
    if not isinstance(doc, dict):
        _collect(doc, texts.user)
        return texts
    _collect(doc.get("system"), texts.system)
    _collect(doc.get("instructions"), texts.system)
    for key in ("messages", "input"):
        _items(doc.get(key), texts)
    for key in ("prompt", "suffix"):
        _collect(doc.get(key), texts.user)
    return texts


def reply_texts(payload: bytes) -> list[list[str]]:
    """The output texts of a whole reply, one list per choice: chat messages (content,
    refusal, reasoning, tool-call arguments), completions text, or a Responses API `output`
    (one list). Empty when the payload is not a JSON object."""
    try:
        doc = msgspec.json.decode(payload)
    except JSON_ERRORS:
        return []
    if not isinstance(doc, dict):
        return []
    out: list[list[str]] = []
    choices = doc.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if isinstance(choice, dict):
            texts: list[str] = []
            _collect([choice.get("message"), choice.get("text")], texts)
            out.append(texts)
    if "output" in doc:
        texts = []
        _collect(doc["output"], texts)
        out.append(texts)
    return out


def _items(value: Any, texts: Texts) -> None:
    """Messages or Responses input items: each goes to its role's class."""
    if not isinstance(value, list):
        _collect(value, texts.user)
        return
    for item in value:
        role = item.get("role") if isinstance(item, dict) else None
        system = isinstance(role, str) and role in SYSTEM_ROLES  # a role may be any JSON
        out = texts.system if system else texts.user
        if role is not None and len(item) == 2 and type(content := item.get("content")) is str:
            if content:  # the usual message, {"role": ..., "content": "..."}: no walk
                out.append(content)
        else:
            _collect(item, out)
        if not system and isinstance(item, dict):
            _documents(item, role, texts.documents)


_TOOL_ROLES = frozenset({"tool", "function"})
_DOCUMENT_BLOCKS = frozenset({"tool_result", "document"})


def _documents(item: dict[str, Any], role: object, out: list[str]) -> None:
    """The texts of `item` that a tool or a document supplied."""
    tool = isinstance(role, str) and role in _TOOL_ROLES
    if tool or item.get("type") == "function_call_output":
        _collect(item, out)
        return
    content = item.get("content")
    if isinstance(content, list):
        for block in content:
            kind = block.get("type") if isinstance(block, dict) else None
            if isinstance(kind, str) and kind in _DOCUMENT_BLOCKS:  # a type may be any JSON
                _collect(block, out)


def _collect(value: Any, out: list[str]) -> None:
    """Append the text in `value` (a string, a part, an item, or lists of them) to `out`.

    Iterative: a hostile body nests as deep as the JSON decoder allows."""
    _walk(value, out, lambda node: _children(node, out))


def _walk(value: Any, out: list[str], children: Callable[[dict[str, Any]], list[Any]]) -> None:
    """Every non-empty string in `value`, in order, into `out`; an object contributes the
    values `children` picks from it. Iterative (a stack), so no nesting depth overflows it."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if node:
                out.append(node)
        elif isinstance(node, list):
            stack.extend(reversed(node))
        elif isinstance(node, dict):
            stack.extend(reversed(children(node)))


def _children(node: dict[str, Any], out: list[str]) -> list[Any]:
    """The text-bearing values of one object; tool arguments are collected into `out` now."""
    children = [node[key] for key in _TEXT_KEYS if key in node]
    children += [node[key] for key in _FUNCTION_KEYS if isinstance(node.get(key), dict)]
    for key in _ARGUMENT_KEYS:
        if key in node:
            _arguments(node[key], out)
    source = node.get("source")  # an Anthropic document with plain-text data
    if isinstance(source, dict) and source.get("type") == "text":
        children.append(source.get("data"))
    return children


def _arguments(value: Any, out: list[str]) -> None:
    """Every string in tool arguments, keys included; a JSON-encoded string is decoded first
    (an argument string that is not JSON is collected as it is)."""
    if isinstance(value, str):
        try:
            value = msgspec.json.decode(value)
        except JSON_ERRORS:
            if value:
                out.append(value)
            return
    _walk(value, out, _keys_and_values)


def _keys_and_values(node: dict[str, Any]) -> list[Any]:
    """An argument object's keys and values, each key before its value."""
    return [x for key, item in node.items() for x in (key, item)]


def windows(text: str, size: int, overlap: int) -> list[str]:
    """Split `text` into windows of `size` characters, each starting `size - overlap` after
    the previous one; the last window ends at the end of the text (and is full-size too).

    Any passage of at most `overlap` characters lies whole in some window, wherever it is:
    long text is screened in pieces, never refused for its length. An empty text has no
    windows."""
    if not 0 <= overlap < size:
        raise ValueError(f"need 0 <= overlap < size, got size={size}, overlap={overlap}")
    if len(text) <= size:
        return [text] if text else []
    step = size - overlap
    out = [text[start : start + size] for start in range(0, len(text) - size, step)]
    out.append(text[-size:])
    return out
