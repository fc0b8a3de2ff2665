"""Token estimates before the backend answers, and completion counts while it streams.

Pure: a tokenizer is passed in as `count(text) -> int` (proxy/tokens.py makes them), nothing
here does I/O or imports asyncio. Two jobs:

- `prompt_tokens(view, count, model)`: what a request's prompt will cost, for admission.
  Chat follows OpenAI's accounting (openai-cookbook "How to count tokens with tiktoken"):
  3 tokens per message, +1 for a `name`, +3 to prime the reply; tools as the cookbook's
  function-definition formula; images from their `detail` and pixel size (OpenAI's tile
  rule), the size read from a data URL's header or, for a remote URL whose size the gateway
  cannot know, the largest the rule allows for that detail — admission must not under-reserve.
- `CompletionCounter`: the completion tokens of a streamed response, from the deltas
  (content, reasoning, refusal, tool-call names and arguments; completions' `text`; the
  Responses API's `*.delta` events). Text is collected per event and tokenized only when a
  figure is asked for (at the end, or at a disconnect), so the per-event cost is one decode.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import math
import struct
from collections.abc import Callable

import msgspec

from proxy.schemas import (
    JSON_ERRORS,
    ChatRequest,
    CompletionRequest,
    ContentPart,
    EmbeddingsRequest,
    Message,
    RequestView,
    ResponsesRequest,
    delta_texts,
)

Count = Callable[[str], int]

PER_MESSAGE = 3  # <|start|>{role/name}\n{content}<|end|>\n
PER_NAME = 1
REPLY_PRIMING = 3  # <|start|>assistant<|message|>

# Image cost per model family: (base tokens, tokens per 512-px tile), from OpenAI's pricing
# notes; first match wins. Low detail costs the base only.
IMAGE_COSTS: tuple[tuple[str, int, int], ...] = (
    ("gpt-4o-mini*", 2833, 5667),
    ("o1*", 75, 150),
    ("o3*", 75, 150),
    ("*", 85, 170),
)
_UNKNOWN_SIZE = (2048, 768)  # the most tiles the high-detail rule can produce: 4 x 2 = 8


def prompt_tokens(view: RequestView, count: Count, model: str = "") -> int:
    """The estimated prompt tokens of an openai-type request."""
    if isinstance(view, ChatRequest):
        return chat_tokens(view, count)
    if isinstance(view, CompletionRequest):
        return _inputs(view.prompt, count)
    if isinstance(view, EmbeddingsRequest):
        return _inputs(view.input, count)
    return responses_tokens(view, count)


def completion_reserve(view: RequestView, bound: int | None) -> int:
    """The completion tokens a request asks for at most: its `bound` (`max_tokens` and kin,
    as `schemas.max_tokens_of` reads it; the handler already has it), times `n`; 0 when it
    sets no bound (then nothing beyond the prompt can be reserved)."""
    # A negative bound or `n` (a backend refuses them, llama.cpp reads -1 as "no limit")
    # must not shrink the reservation below the prompt estimate.
    if bound is None or bound <= 0:
        return 0
    if isinstance(view, ChatRequest | CompletionRequest) and view.n is not None and view.n > 1:
        return bound * view.n
    return bound


# -- chat ------------------------------------------------------------------------------


def chat_tokens(view: ChatRequest, count: Count) -> int:
    total = REPLY_PRIMING
    for message in view.messages:  # a loop, not sum(genexpr): this runs on every request
        content = message.content
        if content.__class__ is str and not message.name and not message.tool_calls:
            total += PER_MESSAGE + count(message.role) + count(content)  # most messages
        else:
            total += message_tokens(message, count, view.model)
    if view.tools:
        total += tools_tokens(view.tools, count)
    return total


def message_tokens(message: Message, count: Count, model: str) -> int:
    total = PER_MESSAGE + count(message.role)
    if message.name:
        total += PER_NAME + count(message.name)
    content = message.content
    if isinstance(content, str):
        total += count(content)
    elif content:
        total += sum(part_tokens(part, count, model) for part in content)
    for call in message.tool_calls or ():
        total += _tool_call_tokens(call, count)
    return total


def part_tokens(part: ContentPart, count: Count, model: str) -> int:
    if part.text is not None:
        return count(part.text)
    image = part.image_url
    if image is not None:
        url, detail = (image, None) if isinstance(image, str) else (image.url, image.detail)
        return image_tokens(url, detail, model)
    return 0  # audio and file parts are billed by the backend; nothing to estimate from


_NULL = msgspec.Raw(b"null")


class _Function(msgspec.Struct):
    name: str = ""
    arguments: str = ""
    description: str | None = ""
    parameters: msgspec.Raw = _NULL  # msgspec.Raw cannot sit in a union with None


class _ToolCall(msgspec.Struct):
    function: _Function | None = None


class _Property(msgspec.Struct):
    type: str | list[str] = ""
    description: str = ""
    enum: list[str | int | float | bool | None] | None = None


class _Parameters(msgspec.Struct):
    properties: dict[str, _Property] | None = None


class _Tool(msgspec.Struct):
    type: str = "function"
    function: _Function | None = None


_tool_call_decoder = msgspec.json.Decoder(_ToolCall)
_tool_decoder = msgspec.json.Decoder(_Tool)
_parameters_decoder = msgspec.json.Decoder(_Parameters)

# The cookbook's constants for function definitions (gpt-4o and later).
_FUNC_INIT, _PROP_INIT, _PROP_KEY, _ENUM_INIT, _ENUM_ITEM, _FUNC_END = 7, 3, 3, -3, 3, 12


def _tool_call_tokens(raw: msgspec.Raw, count: Count) -> int:
    try:
        function = _tool_call_decoder.decode(raw).function
    except JSON_ERRORS:
        return count(bytes(raw).decode("utf-8", "replace"))
    return count(function.name) + count(function.arguments) if function else 0


def tools_tokens(tools: list[msgspec.Raw], count: Count) -> int:
    """Function definitions as OpenAI renders them into the prompt (cookbook formula);
    anything that is not a function definition counts as its JSON text."""
    total = _FUNC_END
    for raw in tools:
        try:
            tool = _tool_decoder.decode(raw)
        except JSON_ERRORS:
            tool = _Tool(type="?")
        if tool.function is None:
            total += count(bytes(raw).decode("utf-8", "replace"))
            continue
        function = tool.function
        total += _FUNC_INIT + count(f"{function.name}:{(function.description or '').rstrip('.')}")
        total += _parameters_tokens(function.parameters, count)
    return total


def _parameters_tokens(raw: msgspec.Raw, count: Count) -> int:
    if bytes(raw) == b"null":
        return 0
    try:
        properties = _parameters_decoder.decode(raw).properties or {}
    except JSON_ERRORS:
        return count(bytes(raw).decode("utf-8", "replace"))
    total = _PROP_INIT if properties else 0
    for name, prop in properties.items():
        total += _PROP_KEY
        if prop.enum is not None:
            total += _ENUM_INIT + sum(_ENUM_ITEM + count(str(item)) for item in prop.enum)
        kind = prop.type if isinstance(prop.type, str) else "|".join(prop.type)
        total += count(f"{name}:{kind}:{prop.description}")
    return total


# -- images ----------------------------------------------------------------------------


def image_tokens(url: str, detail: str | None, model: str) -> int:
    """OpenAI's rule: low detail costs the base; high (and auto, which may pick high) fits
    the image into 2048x2048, scales its short side down to 768, and adds a per-tile cost
    for each 512-px tile."""
    base, per_tile = next((b, t) for glob, b, t in IMAGE_COSTS if fnmatch.fnmatchcase(model, glob))
    if detail == "low":
        return base
    width, height = image_size(url) or _UNKNOWN_SIZE
    return base + per_tile * tiles(width, height)


def tiles(width: int, height: int) -> int:
    if width <= 0 or height <= 0:
        return 1
    fit = min(1.0, 2048 / max(width, height))
    w, h = width * fit, height * fit
    short = min(1.0, 768 / min(w, h))
    return math.ceil(w * short / 512) * math.ceil(h * short / 512)


def image_size(url: str) -> tuple[int, int] | None:
    """Width and height from a `data:` URL's image header (PNG, JPEG, GIF, WebP); None
    for remote URLs and anything unreadable."""
    if not url.startswith("data:"):
        return None
    _, _, payload = url.partition(",")
    try:
        head = base64.b64decode(payload[:65536] + "=" * (-len(payload[:65536]) % 4))
    except (binascii.Error, ValueError):
        return None
    return _png(head) or _gif(head) or _webp(head) or _jpeg(head)


def _png(head: bytes) -> tuple[int, int] | None:
    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 24:
        width, height = struct.unpack(">II", head[16:24])
        return int(width), int(height)
    return None


def _gif(head: bytes) -> tuple[int, int] | None:
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        width, height = struct.unpack("<HH", head[6:10])
        return int(width), int(height)
    return None


def _webp(head: bytes) -> tuple[int, int] | None:
    if head[:4] != b"RIFF" or head[8:12] != b"WEBP" or len(head) < 30:
        return None
    kind = head[12:16]
    if kind == b"VP8 ":
        width, height = struct.unpack("<HH", head[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if kind == b"VP8L":
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8X":
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    return None


def _jpeg(head: bytes) -> tuple[int, int] | None:
    if head[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 < len(head):
        if head[i] != 0xFF:
            return None
        marker = head[i + 1]
        length = int.from_bytes(head[i + 2 : i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE):
            height, width = struct.unpack(">HH", head[i + 5 : i + 9])
            return int(width), int(height)
        i += 2 + length
    return None


# -- completions, embeddings, responses --------------------------------------------------


def _inputs(value: str | list[str | int | list[int]] | None, count: Count) -> int:
    """A prompt or embeddings input: text, a token array, or a list of either."""
    if value is None:
        return 0
    if isinstance(value, str):
        return count(value)
    if value and all(isinstance(v, int) for v in value):
        return len(value)  # one pre-tokenized prompt
    total = 0
    for item in value:
        if isinstance(item, str):
            total += count(item)
        elif isinstance(item, list):
            total += len(item)
        else:
            total += 1
    return total


class _InputPart(msgspec.Struct):
    type: str = ""
    text: str | None = None
    image_url: str | None = None
    detail: str | None = None


class _InputItem(msgspec.Struct):
    type: str = "message"
    role: str = ""
    content: str | list[_InputPart] | None = None
    name: str = ""
    arguments: str = ""
    output: str | None = None


_input_item_decoder = msgspec.json.Decoder(_InputItem)


def responses_tokens(view: ResponsesRequest, count: Count) -> int:
    """The Responses API: instructions, then input items counted like chat messages."""
    model = view.model or ""
    total = REPLY_PRIMING
    if view.instructions:
        total += PER_MESSAGE + count("system") + count(view.instructions)
    if isinstance(view.input, str):
        return total + PER_MESSAGE + count("user") + count(view.input)
    for raw in view.input or ():
        try:
            item = _input_item_decoder.decode(raw)
        except JSON_ERRORS:
            total += PER_MESSAGE + count(bytes(raw).decode("utf-8", "replace"))
            continue
        total += PER_MESSAGE + _item_tokens(item, count, model)
    return total


def _item_tokens(item: _InputItem, count: Count, model: str) -> int:
    total = count(item.role) if item.role else 0
    total += count(item.name) + count(item.arguments) + count(item.output or "")
    content = item.content
    if isinstance(content, str):
        return total + count(content)
    for part in content or ():
        if part.text is not None:
            total += count(part.text)
        elif part.image_url is not None:
            total += image_tokens(part.image_url, part.detail, model)
    return total


# -- streamed completions --------------------------------------------------------------


class CompletionCounter:
    """Completion tokens of a stream, counted from its deltas with the model's tokenizer.

    `feed(data)` takes one SSE event's data (a JSON chunk); `tokens()` tokenizes what arrived
    since the last call and returns the running total. Text is counted in the pieces that
    `tokens()` is called on, so the figure can differ from the backend's by a token at each
    call boundary; the backend's usage, when sent, is the billed figure (SPEC §5).
    """

    __slots__ = ("_count", "_pending", "_total")

    def __init__(self, count: Count):
        self._count = count
        self._pending: list[str] = []
        self._total = 0

    def feed(self, data: bytes) -> None:
        delta_texts(data, self._pending)

    def tokens(self) -> int:
        if self._pending:
            self._total += self._count("".join(self._pending))
            self._pending.clear()
        return self._total
