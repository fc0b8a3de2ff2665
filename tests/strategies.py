"""Hypothesis strategies for tests/test_fuzz.py: SSE byte streams, JSON bodies shaped like the
four openai operations (and backends' replies), and config documents built from the schema.

"Shaped" strategies put the right keys in the right places with values that are sometimes
well typed and sometimes anything at all, so the fuzzing reaches past the first type check.
"""

from __future__ import annotations

import base64
import itertools
import json
import struct
import typing
from typing import Any

import msgspec
from hypothesis import strategies as st


def one_in(n: int) -> st.SearchStrategy[bool]:
    """True about once in `n` draws (a bare `integers(0, n - 1) == 0` is True far more often:
    hypothesis favours the bounds)."""
    return st.integers(0, n - 1).map(lambda i: i == n // 2)


# --- JSON ------------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def json_bytes(draw: st.DrawFn, value: st.SearchStrategy[Any] = json_values) -> bytes:
    """`value` encoded as JSON text the way different clients write it."""
    separators = draw(st.sampled_from([(",", ":"), (", ", ": "), (" ,", " :\n")]))
    ascii_only = draw(st.booleans())
    text = json.dumps(draw(value), ensure_ascii=ascii_only, separators=separators)
    return text.encode()


# Bytes that break JSON in the ways a decoder must survive: invalid UTF-8 (a bad start byte,
# a truncated sequence, an encoded surrogate, an overlong form), controls, stray syntax.
_BAD_BYTES = [b"\xff", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xc0\xaf", b"\x00", b"\\",
              b'"', b"{", b"[", b"]", b"}", b",", b":", b"\\u", b"\\ud800", b"NaN", b"1e999"]  # fmt: skip


@st.composite
def mutated(draw: st.DrawFn, body: bytes) -> bytes:
    """`body` with a few bytes inserted, replaced or cut off."""
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(body)))
        piece = draw(st.sampled_from(_BAD_BYTES) | st.binary(min_size=1, max_size=4))
        action = draw(st.sampled_from(["insert", "replace", "truncate"]))
        if action == "insert":
            body = body[:at] + piece + body[at:]
        elif action == "replace":
            body = body[:at] + piece + body[at + len(piece) :]
        else:
            body = body[:at]
    return body


@st.composite
def deeply_nested(draw: st.DrawFn, fields: list[bytes]) -> bytes:
    """A JSON object whose field (a known one or not) holds arrays or objects nested up to
    a few thousand levels: deeper than any recursion limit a decoder may hit."""
    depth = draw(st.integers(1, 40) | st.integers(900, 4000))
    if draw(st.booleans()):
        inner = b"[" * depth + b"]" * depth
    else:
        inner = b'{"a":' * depth + b"1" + b"}" * depth
    field = draw(st.sampled_from([*fields, b"unknown_field"]))
    prefix = draw(st.sampled_from([b'"model":"m","messages":[],', b'"model":"m",', b""]))
    return b"{" + prefix + b'"' + field + b'":' + inner + b"}"


# --- images in data URLs (the estimate reads their headers) -----------------------------------

_sizes = st.integers(0, 2**16 - 1)


@st.composite
def image_headers(draw: st.DrawFn) -> bytes:
    w, h = draw(_sizes), draw(_sizes)
    kind = draw(st.sampled_from(["png", "gif", "vp8", "vp8l", "vp8x", "jpeg", "noise"]))
    if kind == "png":
        w32, h32 = draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1))
        head = b"\x89PNG\r\n\x1a\n" + b"\0\0\0\rIHDR" + struct.pack(">II", w32, h32)
    elif kind == "gif":
        head = b"GIF89a" + struct.pack("<HH", w, h)
    elif kind == "vp8":
        head = b"RIFF\0\0\0\0WEBPVP8 " + b"\0" * 10 + struct.pack("<HH", w, h)
    elif kind == "vp8l":
        head = b"RIFF\0\0\0\0WEBPVP8L" + b"\0" * 5 + draw(st.binary(min_size=4, max_size=4))
        head += b"\0" * 5
    elif kind == "vp8x":
        head = b"RIFF\0\0\0\0WEBPVP8X" + b"\0" * 8 + draw(st.binary(min_size=6, max_size=6))
    elif kind == "jpeg":
        segments = draw(st.lists(st.binary(min_size=0, max_size=12), max_size=3))
        head = b"\xff\xd8" + b"".join(
            b"\xff\xe0" + struct.pack(">H", len(s) + 2) + s for s in segments
        )
        head += b"\xff\xc0\x00\x11\x08" + struct.pack(">HH", h, w)
    else:
        head = draw(st.binary(max_size=40))
    return head[: draw(st.integers(0, len(head)))] if draw(st.booleans()) else head


@st.composite
def image_urls(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["data", "data-garbage", "remote", "text"]))
    if kind == "data":
        payload = base64.b64encode(draw(image_headers())).decode()
        return "data:image/png;base64," + payload[: draw(st.integers(0, len(payload)))]
    if kind == "data-garbage":
        return "data:image/png;base64," + draw(st.text(max_size=30))
    if kind == "remote":
        return "https://example.com/" + draw(st.text(max_size=10))
    return draw(st.text(max_size=20))


# --- openai request bodies ---------------------------------------------------------------------


def _either(typed: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the right type, sometimes any JSON value."""
    return st.one_of(typed, typed, json_values)


_texts = st.text(max_size=40)
_ints = st.integers(-10, 10_000) | st.integers()
_opt_bool = _either(st.none() | st.booleans())
_opt_int = _either(st.none() | _ints)
_details = st.sampled_from(["low", "high", "auto"]) | st.none() | st.text(max_size=5)
_image = st.fixed_dictionaries({}, optional={"url": _either(image_urls()), "detail": _details})
_part = st.fixed_dictionaries(
    {"type": _either(st.sampled_from(["text", "image_url", "input_audio"]))},
    optional={"text": _either(_texts), "image_url": _either(_image | image_urls())},
)
_tool_call = _either(
    st.fixed_dictionaries(
        {},
        optional={
            "id": _texts,
            "type": st.just("function"),
            "function": _either(
                st.fixed_dictionaries(
                    {}, optional={"name": _either(_texts), "arguments": _either(_texts)}
                )
            ),
        },
    )
)
_message = st.fixed_dictionaries(
    {"role": _either(st.sampled_from(["system", "user", "assistant", "tool"]))},
    optional={
        "content": _either(st.none() | _texts | st.lists(_either(_part), max_size=3)),
        "name": _either(st.none() | _texts),
        "tool_calls": _either(st.none() | st.lists(_tool_call, max_size=2)),
    },
)
_property = st.fixed_dictionaries(
    {},
    optional={
        "type": _either(_texts | st.lists(_texts, max_size=2)),
        "description": _either(_texts),
        "enum": _either(
            st.lists(
                st.none()
                | st.booleans()
                | st.integers()
                | st.floats(allow_nan=False, allow_infinity=False)
                | _texts,
                max_size=3,
            )
        ),
    },
)
_tool = _either(
    st.fixed_dictionaries(
        {"type": _either(st.just("function"))},
        optional={
            "function": _either(
                st.fixed_dictionaries(
                    {"name": _either(_texts)},
                    optional={
                        "description": _either(st.none() | _texts),
                        "parameters": _either(
                            st.fixed_dictionaries(
                                {"type": st.just("object")},
                                optional={
                                    "properties": _either(
                                        st.dictionaries(_texts, _either(_property), max_size=3)
                                    )
                                },
                            )
                        ),
                    },
                )
            )
        },
    )
)
_stream_options = _either(
    st.none() | st.fixed_dictionaries({}, optional={"include_usage": _opt_bool})
)
_token_arrays = st.lists(_ints, max_size=5)
_prompt = _either(
    st.none() | _texts | st.lists(_either(_texts | _ints | _token_arrays), max_size=4)
)
_input_part = st.fixed_dictionaries(
    {"type": _either(st.sampled_from(["input_text", "input_image", "output_text"]))},
    optional={"text": _either(_texts), "image_url": _either(image_urls()), "detail": _details},
)
_input_item = _either(
    st.fixed_dictionaries(
        {},
        optional={
            "type": _either(st.sampled_from(["message", "function_call", "function_call_output"])),
            "role": _either(_texts),
            "content": _either(st.none() | _texts | st.lists(_either(_input_part), max_size=3)),
            "name": _either(_texts),
            "arguments": _either(_texts),
            "output": _either(st.none() | _texts),
        },
    )
)
_models = _either(st.sampled_from(["gpt-4o", "gpt-4o-mini", "o1-mini", "o3", "llama-3"]) | _texts)

FIELDS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "chat-completions": {
        "model": _models,
        "messages": _either(st.lists(_either(_message), max_size=4)),
        "stream": _opt_bool,
        "stream_options": _stream_options,
        "max_tokens": _opt_int,
        "max_completion_tokens": _opt_int,
        "n": _opt_int,
        "tools": _either(st.none() | st.lists(_tool, max_size=3)),
    },
    "completions": {
        "model": _models,
        "prompt": _prompt,
        "stream": _opt_bool,
        "stream_options": _stream_options,
        "max_tokens": _opt_int,
        "n": _opt_int,
    },
    "embeddings": {"model": _models, "input": _prompt, "dimensions": _opt_int},
    "responses": {
        "model": _either(st.none() | _models),
        "input": _either(st.none() | _texts | st.lists(_input_item, max_size=4)),
        "instructions": _either(st.none() | _texts),
        "stream": _opt_bool,
        "max_output_tokens": _opt_int,
    },
}
REQUIRED = {
    "chat-completions": ("model", "messages"),
    "completions": ("model",),
    "embeddings": ("model", "input"),
    "responses": (),
}
OPERATIONS = tuple(FIELDS)


@st.composite
def request_values(draw: st.DrawFn, operation: str) -> Any:
    """A JSON value for `operation`: usually an object with its fields, sometimes anything."""
    fields = FIELDS[operation]
    if draw(one_in(10)):
        return draw(json_values)
    required = {k: v for k, v in fields.items() if k in REQUIRED[operation]}
    optional = {k: v for k, v in fields.items() if k not in required}
    if draw(one_in(5)):  # now and then a required field goes missing
        required, optional = {}, fields
    value = draw(st.fixed_dictionaries(required, optional=optional))
    extra = draw(st.dictionaries(st.text(max_size=8), json_values, max_size=2))
    return {**extra, **value} if draw(st.booleans()) else {**value, **extra}


_small_text = st.text(st.characters(codec="utf-8"), max_size=12)
_small_bound = st.none() | st.integers(-3, 32)


@st.composite
def valid_values(draw: st.DrawFn, operation: str) -> dict[str, Any]:
    """A request the backend serves: well typed throughout, streamed or not."""
    model = draw(st.sampled_from(["gpt-4o-mini", "gpt-4o", "llama-3"]))
    stream = {"stream": draw(st.booleans())}
    if draw(st.booleans()):
        stream["stream_options"] = {"include_usage": draw(st.booleans())}
    if operation == "chat-completions":
        messages = [{"role": "user", "content": draw(_small_text)}]
        return {"model": model, "messages": messages, "max_tokens": draw(_small_bound), **stream}
    if operation == "completions":
        return {
            "model": model,
            "prompt": draw(_small_text),
            "max_tokens": draw(_small_bound),
            **stream,
        }
    if operation == "embeddings":
        return {"model": model, "input": draw(_small_text | st.lists(_small_text, max_size=3))}
    return {"model": model, "input": draw(_small_text), "stream": stream["stream"],
            "max_output_tokens": draw(_small_bound)}  # fmt: skip


@st.composite
def request_bodies(draw: st.DrawFn, operation: str) -> bytes:
    """Bytes a client may send for `operation`: JSON, valid, broken or deep, or noise."""
    kind = draw(st.sampled_from(["json", "json", "valid", "mutated", "deep", "noise"]))
    if kind == "valid":
        return draw(json_bytes(valid_values(operation)))
    if kind == "json":
        return draw(json_bytes(request_values(operation)))
    if kind == "mutated":
        return draw(mutated(draw(json_bytes(request_values(operation)))))
    if kind == "deep":
        return draw(deeply_nested([f.encode() for f in FIELDS[operation]]))
    return draw(st.binary(max_size=64))


# --- backend replies -----------------------------------------------------------------------

_usage = st.fixed_dictionaries(
    {},
    optional={
        name: _either(_ints | st.none())
        for name in (
            "prompt_tokens",
            "completion_tokens",
            "input_tokens",
            "output_tokens",
            "total_tokens",
        )
    }
    | {
        name: _either(
            st.none()
            | st.fixed_dictionaries(
                {}, optional={"cached_tokens": _opt_int, "reasoning_tokens": _opt_int}
            )
        )
        for name in (
            "prompt_tokens_details",
            "completion_tokens_details",
            "input_tokens_details",
            "output_tokens_details",
        )
    },
)
_delta = st.fixed_dictionaries(
    {},
    optional={
        "content": _either(st.none() | _texts),
        "reasoning_content": _either(st.none() | _texts),
        "refusal": _either(st.none() | _texts),
        "tool_calls": _either(
            st.lists(
                _either(
                    st.fixed_dictionaries(
                        {},
                        optional={
                            "function": _either(
                                st.fixed_dictionaries(
                                    {},
                                    optional={
                                        "name": _either(st.none() | _texts),
                                        "arguments": _either(st.none() | _texts),
                                    },
                                )
                            )
                        },
                    )
                ),
                max_size=2,
            )
        ),
    },
)
_choice = st.fixed_dictionaries(
    {},
    optional={
        "finish_reason": _either(st.none() | st.sampled_from(["stop", "length"])),
        "delta": _either(_delta),
        "text": _either(st.none() | _texts),
        "index": _ints,
    },
)
_reply_value = st.fixed_dictionaries(
    {},
    optional={
        "model": _either(_texts),
        "choices": _either(st.none() | st.lists(_either(_choice), max_size=3)),
        "usage": _either(st.none() | _usage),
        "type": _either(st.sampled_from(["response.completed", "response.output_text.delta"])),
        "delta": _either(st.none() | _texts),
    },
)
reply_values = _reply_value.flatmap(
    lambda reply: st.one_of(
        st.just(reply), st.just({"type": "response.completed", "response": reply})
    )
)


@st.composite
def reply_bodies(draw: st.DrawFn) -> bytes:
    """What a backend may answer: a reply or chunk, broken or deep JSON, or noise."""
    kind = draw(st.sampled_from(["json", "json", "mutated", "deep", "noise", "any"]))
    if kind == "json":
        return draw(json_bytes(reply_values))
    if kind == "mutated":
        return draw(mutated(draw(json_bytes(reply_values))))
    if kind == "deep":
        return draw(deeply_nested([b"model", b"choices", b"usage", b"response", b"delta"]))
    if kind == "any":
        return draw(json_bytes())
    return draw(st.binary(max_size=64))


# --- SSE -------------------------------------------------------------------------------------

ENDINGS = (b"\n", b"\r\n", b"\r")
_SSE_PIECES = [b"\n", b"\r", b"\r\n", b"\n\n", b"\r\r", b"\r\n\r\n", b"\n\r", b"data:", b"data: ",
               b"event:", b"event: x", b":", b": comment", b"id: 7", b"retry: 10", b" ", b"\xff\xfe",
               b"\x00", b'{"a": 1}', b"[DONE]"]  # fmt: skip
_field_value = st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@st.composite
def sse_noise(draw: st.DrawFn) -> bytes:
    """Any bytes, weighted towards SSE syntax; now and then one line of a few hundred kB."""
    pieces = draw(st.lists(st.sampled_from(_SSE_PIECES) | st.binary(max_size=16), max_size=40))
    if draw(one_in(10)):
        huge = draw(st.binary(min_size=1, max_size=3)) * draw(st.integers(50_000, 150_000))
        pieces.insert(draw(st.integers(0, len(pieces))), b"data: " + huge)
    return b"".join(pieces)


@st.composite
def sse_event(draw: st.DrawFn) -> tuple[list[bytes], tuple[bytes, bytes]]:
    """One well-formed event: its lines (without endings) and its `(event name, data)`."""
    name = b""
    data: list[bytes] = []
    lines: list[bytes] = []
    kinds = st.sampled_from(["data", "data", "data", "event", "comment", "other"])
    for kind in draw(st.lists(kinds, min_size=1, max_size=5)):
        value = draw(_field_value)
        if kind == "data":
            data.append(value)
            spaced = draw(st.booleans()) or value[:1] == b" "  # "data:␠x" and "data:x" are both x
            lines.append(b"data: " + value if spaced else b"data:" + value)
        elif kind == "event":
            name = value  # the last event: field wins
            lines.append(b"event: " + value)
        elif kind == "comment":
            lines.append(b":" + value)
        else:
            field = draw(st.sampled_from([b"id", b"retry", b"x-unknown", b"dat", b"Data"]))
            lines.append(field + b": " + value)
    if draw(one_in(10)):
        huge = b"y" * draw(st.integers(10_000, 100_000))
        data.append(huge)
        lines.append(b"data: " + huge)
    return lines, (name, b"\n".join(data))


@st.composite
def sse_streams(draw: st.DrawFn) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """A well-formed event stream in LF, CRLF, CR or mixed line endings, with stray blank
    lines, its last terminator sometimes missing; and the events it holds."""
    events = draw(st.lists(sse_event(), max_size=6))
    mode = draw(st.sampled_from([*ENDINGS, b"mixed"]))
    lines: list[bytes] = []
    for event_lines, _ in events:
        lines += [b""] * draw(st.integers(0, 2)) + event_lines + [b""]
    if lines and draw(one_in(4)):
        lines.pop()  # the stream ends without the last blank line: flush() returns the event
    out: list[bytes] = []
    previous = b""
    for line in lines:
        ending = draw(st.sampled_from(ENDINGS)) if mode == b"mixed" else mode
        if previous == b"\r" and not line and ending[:1] == b"\n":
            ending = b"\r"  # "\r" + "\n" would be one CRLF, not a line and a blank line
        out.append(line + ending)
        previous = ending
    return b"".join(out), [expected for _, expected in events]


@st.composite
def cuts(draw: st.DrawFn, stream: bytes) -> list[int]:
    """Chunk boundaries in `stream`: anywhere, and especially around CR and LF."""
    if len(stream) < 400 and draw(one_in(5)):
        return list(range(1, len(stream)))  # byte by byte
    near = sorted({i + d for i, b in enumerate(stream[:5000]) if b in (10, 13) for d in (0, 1)})
    anywhere = st.integers(0, len(stream))
    where = st.one_of(anywhere, st.sampled_from(near)) if near else anywhere
    return sorted(set(draw(st.lists(where, max_size=30))))


def chunked(stream: bytes, boundaries: list[int]) -> list[bytes]:
    edges = [0, *boundaries, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(edges) if b > a]


# --- config documents ----------------------------------------------------------------------

# Strings a config field may hold, valid and not. No backticks: see the strict xfail
# test_config_error_paths_survive_backticks in test_fuzz.py for what they do today.
_config_text = st.text(st.characters(blacklist_characters="`"), max_size=12)
_config_strings = st.sampled_from([
    "", "memory", "redis://localhost:6379/0", "redis://", "mysql://x", "open", "closed", "sideways",
    "10MiB", "0B", "1.5KiB", "-1", "7 parsecs", "500ms", "30s", "0s", "-5m", "1h", "2d", "1e3",
    "http://127.0.0.1:1/v1", "https://api.openai.com/v1/", "http://u:p@h/", "ftp://x", "http://h:99999",
    "openai", "passthrough", "single", "pool", "all-apis", "api:chat", "product:starter", "product:",
    "active", "suspended", "sha256:" + "0" * 64, "sha256:xyz", "short", "k" * 20, "key with spaces!",
    "{subscription.id}", "{request.header.X-Team}", "{nope}", "}{", "tiktoken:o200k_base",
    "tiktoken:p50k", "hf:", "hf:/nope.json", "/openai", "/", "/a/../b", "/healthz", "json", "off",
    "Authorization", "bad header", "10.0.0.0/8", "not-a-cidr", "hourly", "fortnightly",
    "${HOME}", "${UNSET_VAR_FOR_FUZZ}", "${X:-}", "$${literal}", "${bad-name}", "${",
    "FourSeverityLevels", "timeout", "connection", "true", "null", "1", "0.5",
])  # fmt: skip
# Bounded: a number too large for a float is the strict xfail test_config_huge_numbers.
_config_numbers = st.integers(-(10**18), 10**18) | st.sampled_from([0, 1, -1, 100, 599, 600, 10**6])
config_scalars = (
    st.none()
    | st.booleans()
    | _config_numbers
    | st.floats(allow_nan=True, allow_infinity=True)
    | _config_strings
    | _config_text
)


def schema_keys() -> list[str]:
    """Every kebab-case key the config schema knows, for documents built from it."""
    from proxy import config

    keys: set[str] = set()
    pending: list[Any] = [config.Config]
    seen: set[Any] = set()
    while pending:
        tp = pending.pop()
        if tp in seen:
            continue
        seen.add(tp)
        if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
            for field in msgspec.structs.fields(tp):
                keys.add(field.encode_name)
                pending.append(field.type)
        else:
            pending.extend(typing.get_args(tp))
    return sorted(keys)


# Mistyped keys look like keys: ConfigError names an unknown one as it is, so a key holding
# ". [ ] :" would make any path ambiguous.
config_keys_like = st.from_regex(r"[A-Za-z0-9_-]{1,10}", fullmatch=True)


def config_values(keys: list[str]) -> st.SearchStrategy[Any]:
    key = st.sampled_from(keys) | config_keys_like
    return st.recursive(
        config_scalars,
        lambda children: (
            st.lists(children, max_size=3) | st.dictionaries(key, children, max_size=3)
        ),
        max_leaves=8,
    )


def paths_in(doc: Any, here: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every container and leaf position in a YAML document, root first."""
    found = [here]
    if isinstance(doc, dict):
        for k, v in doc.items():
            found += paths_in(v, (*here, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            found += paths_in(v, (*here, i))
    return found


def at(doc: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        doc = doc[step]
    return doc
