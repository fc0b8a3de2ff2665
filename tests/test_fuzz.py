"""Property-based fuzzing (hypothesis) of what the gateway reads from outside:

1. SSE framing (proxy/sse.py, as proxy/relay.py drives it): any byte stream, cut anywhere,
   gives the events of the whole stream, which are those a reference WHATWG reader finds;
   a well-formed generated stream gives back exactly the generated events.
2. The request surface (proxy/schemas.py, proxy/estimate.py): any body is a view or a 400
   naming the JSON path; views estimate to non-negative ints; reply readers never raise.
3. The config loader (proxy/config.py `loads`): documents built from the schema's keys with
   wrong types and values load or raise ConfigError with readable lines naming a real path;
   `${ENV}` expansion agrees with a reference expander.
4. The live app in-process, in front of a real mock backend: no request makes a 500 or shows
   the backend's credentials, and every error body is OpenAI-shaped.

The tests at the end reproduce bugs these generators found in the config loader, units and
the mock, since fixed; the generators above still leave out exactly those inputs (and say
so where they do), so each stays pinned by its own test.

Example counts are modest (the file runs in well under a minute); FUZZ_SCALE=10 runs ten
times as many. With CI set, every run draws the same examples (derandomize).
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import copy
import json
import os
import re
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from proxy import errors
from proxy.app import Gateway, create_app
from proxy.config import Config, ConfigError, loads
from proxy.errors import GatewayError, InvalidRequestError
from proxy.estimate import (
    PER_MESSAGE,
    REPLY_PRIMING,
    CompletionCounter,
    completion_reserve,
    prompt_tokens,
)
from proxy.exchange import Exchange
from proxy.relay import ChatStreamFilter, relay_events
from proxy.schemas import (
    ChatRequest,
    CompletionRequest,
    EmbeddingsRequest,
    ResponsesRequest,
    Usage,
    decode_request,
    max_tokens_of,
    read_chunk,
    read_reply,
    read_response_event,
    with_stream_usage,
)
from proxy.sse import EventSplitter, parse_event
from proxy.tokens import load_tokenizer
from tests import strategies as s
from tests.conftest import BACKEND_SECRET, KEY, KEY_B, SUSPENDED_KEY, gateway_config
from tests.mockproc import MockProc

# Hypothesis's pytest plugin imports this module (and libcst, where installed) only when a
# test fails, to suggest a patch; libcst's import warns, and under `filterwarnings = error`
# that warning turns a reported failure into a pytest INTERNALERROR. Import it up front.
with warnings.catch_warnings(), contextlib.suppress(ImportError):
    warnings.simplefilter("ignore", DeprecationWarning)
    import hypothesis.extra._patching  # noqa: F401
# Profiles, used as the parent of each test's settings here rather than loaded globally (other
# suites run hypothesis too): with CI set every run draws the same examples and keeps none;
# locally, failures are saved (in .hypothesis/, which ignores itself) and replayed first.
settings.register_profile(
    "tollway-fuzz-ci", derandomize=True, database=None, deadline=None, print_blob=True
)
settings.register_profile("tollway-fuzz-dev", deadline=None)
PROFILE = settings.get_profile("tollway-fuzz-ci" if os.environ.get("CI") else "tollway-fuzz-dev")
SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
SLOW_DATA = (HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example)


def fuzz(examples: int) -> settings:
    """The profile with `examples` examples (times FUZZ_SCALE)."""
    return settings(
        PROFILE, max_examples=max(1, int(examples * SCALE)), suppress_health_check=SLOW_DATA
    )


# ============================================================================================
# 1. SSE framing
# ============================================================================================


def split(chunks: list[bytes]) -> tuple[list[bytes], bytes]:
    """The events a relay gets from `chunks` fed in order, and what flush() leaves."""
    splitter = EventSplitter()
    events: list[bytes] = []
    for chunk in chunks:
        events += splitter.feed(chunk)
    return events, splitter.flush()


def normalise(stream: bytes) -> bytes:
    return stream.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


def reference_events(stream: bytes) -> list[tuple[bytes, bytes]]:
    """A reading of WHATWG HTML §9.2.6 line by line: each run of non-blank lines is one event
    (the unterminated last one too, as the relay forwards it); `(event name, data)` each."""
    blocks: list[list[bytes]] = [[]]
    for line in normalise(stream).split(b"\n"):
        if line:
            blocks[-1].append(line)
        elif blocks[-1]:
            blocks.append([])
    return [_reference_fields(block) for block in blocks if block]


def _reference_fields(lines: list[bytes]) -> tuple[bytes, bytes]:
    name, data = b"", []
    for line in lines:
        if line.startswith(b":"):
            continue
        field, value = line.split(b":", 1) if b":" in line else (line, b"")
        value = value[1:] if value.startswith(b" ") else value
        if field == b"data":
            data.append(value)
        elif field == b"event":
            name = value
    return name, b"\n".join(data)


def parsed(events: list[bytes], rest: bytes) -> list[tuple[bytes, bytes]]:
    """`parse_event` of every event holding a line (blank-only leftovers are not events)."""
    return [parse_event(e) for e in [*events, rest] if any(e.split(b"\n"))]


@fuzz(300)
@given(stream=s.sse_noise() | s.sse_streams().map(lambda g: g[0]), data=st.data())
def test_sse_any_chunking_gives_the_events_of_the_whole_stream(
    stream: bytes, data: st.DataObject
) -> None:
    events, rest = split(s.chunked(stream, data.draw(s.cuts(stream), label="cuts")))
    # Nothing lost, added or reordered: the relay forwards these bytes as they are.
    assert b"".join(events) + rest == normalise(stream)
    assert all(event.endswith(b"\n\n") for event in events)
    expected = reference_events(stream)
    assert parsed(events, rest) == expected
    assert parsed(*split([stream])) == expected


@fuzz(300)
@given(generated=s.sse_streams(), data=st.data())
def test_sse_wellformed_stream_gives_the_generated_events(
    generated: tuple[bytes, list[tuple[bytes, bytes]]], data: st.DataObject
) -> None:
    stream, expected = generated
    events, rest = split(s.chunked(stream, data.draw(s.cuts(stream), label="cuts")))
    assert parsed(events, rest) == expected


@fuzz(200)
@given(event=s.sse_noise() | st.binary(max_size=100))
def test_parse_event_reads_any_bytes(event: bytes) -> None:
    name, data = parse_event(event)
    assert isinstance(name, bytes) and isinstance(data, bytes)
    assert (name, data) == _reference_fields([line for line in event.split(b"\n") if line])


class _Backend:
    """What relay_events reads of a backend response: its body, in the given chunks."""

    def __init__(self, chunks: list[bytes]):
        self._chunks = chunks

    async def chunks(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            yield chunk


def one_event(event: bytes) -> bool:
    """Does `event` hold a single event (one run of non-blank lines, blank lines around)?"""
    return len([b for b in re.split(rb"\n\n+", event.strip(b"\n")) if b]) <= 1


def relay(chunks: list[bytes], keep: Any) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    exchange = Exchange("POST", "/openai/chat/completions", "fuzz", "127.0.0.1")
    asyncio.run(relay_events(_Backend(chunks), send, keep, exchange))  # type: ignore[arg-type]
    return sent


@fuzz(150)
@given(stream=s.sse_noise() | s.sse_streams().map(lambda g: g[0]), data=st.data())
def test_relay_forwards_whole_events_and_nothing_else(stream: bytes, data: st.DataObject) -> None:
    offered: list[bytes] = []

    def keep(event: bytes) -> bool:
        offered.append(event)
        return True

    sent = relay(s.chunked(stream, data.draw(s.cuts(stream), label="cuts")), keep)
    assert all(one_event(event) for event in offered), "keep() was offered two events as one"
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    bodies = [message["body"] for message in sent[:-1]]
    assert all(body for body in bodies)
    forwarded, whole = b"".join(bodies), normalise(stream)
    # Only a tail of whitespace (no event in it) may stay behind.
    assert whole.startswith(forwarded) and not whole[len(forwarded) :].strip()
    # A client never gets half an event in one write, except the unterminated last one.
    assert all(body.endswith(b"\n\n") for body in bodies[:-1])


@st.composite
def chat_streams(draw: st.DrawFn) -> tuple[bytes, list[bytes], Usage | None, str]:
    """A backend's chat stream: chunks, junk frames, maybe the usage chunk, then [DONE]."""
    model = draw(st.text(max_size=8))
    datas: list[bytes] = []
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["delta", "delta", "junk", "comment"]))
        if kind == "delta":
            delta = {"content": draw(st.text(max_size=10))}
            chunk = {
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
            }
            datas.append(json.dumps(chunk).encode())
        elif kind == "junk":
            datas.append(draw(st.sampled_from([b"not json", b"{", b'"x"', b"\xff"])))
        else:
            datas.append(b"")
    usage = None
    if draw(st.booleans()):
        prompt, completion = draw(st.integers(0, 10**6)), draw(st.integers(0, 10**6))
        usage = Usage(prompt, completion, prompt + completion)
        wire = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        datas.append(json.dumps({"model": model, "choices": [], "usage": wire}).encode())
    datas.append(b"[DONE]")
    ending = draw(st.sampled_from(s.ENDINGS))
    lines = [b": keep-alive" if not d else b"data: " + d for d in datas]
    stream = b"".join(line + ending + ending for line in lines)
    return stream, datas, usage, model


@fuzz(150)
@given(generated=chat_streams(), strip_usage=st.booleans(), data=st.data())
def test_chat_relay_keeps_json_chunks_and_reads_usage_at_any_chunking(
    generated: tuple[bytes, list[bytes], Usage | None, str], strip_usage: bool, data: st.DataObject
) -> None:
    stream, datas, usage, model = generated
    stream_filter = ChatStreamFilter(strip_usage=strip_usage)
    sent = relay(s.chunked(stream, data.draw(s.cuts(stream), label="cuts")), stream_filter.keep)
    events, rest = split([b"".join(m["body"] for m in sent)])
    out = [data for _, data in parsed(events, rest) if data]
    junk = {b"not json", b"{", b'"x"', b"\xff"}
    expected = [d for d in datas if d and d not in junk]
    if usage is not None and strip_usage:
        expected = [d for d in expected if b'"usage"' not in d]
    assert out == expected
    assert stream_filter.usage == usage
    assert stream_filter.dropped == sum(d in junk for d in datas)
    assert stream_filter.model == (
        model if any(b'"choices": [{' in d for d in datas) or usage else ""
    )


# ============================================================================================
# 2. The request surface
# ============================================================================================

VIEWS = {
    "chat-completions": ChatRequest,
    "completions": CompletionRequest,
    "embeddings": EmbeddingsRequest,
    "responses": ResponsesRequest,
}
JSON_TYPES = {str: "str", int: "int", float: "float", bool: "bool", type(None): "null",
              list: "array", dict: "object"}  # fmt: skip
TOKENIZER = load_tokenizer("tiktoken:o200k_base")


class _NotJson(Exception):
    """The body is not standard JSON (or its value cannot be compared with the view's)."""


def standard_json(body: bytes) -> Any:
    """`body` as RFC 8259 JSON; _NotJson when it is not, or is too deep or ambiguous to
    compare (duplicate keys: decoders may keep either one)."""

    def refuse(_: str) -> Any:
        raise _NotJson("NaN and Infinity are not JSON")

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        if len({key for key, _ in items}) != len(items):
            raise _NotJson("duplicate keys")
        return dict(items)

    try:
        value = json.loads(body.decode("utf-8"), parse_constant=refuse, object_pairs_hook=pairs)
        json.dumps(value).encode("utf-8", "strict")  # lone surrogates ("\ud800") are not text
        json.dumps(value, ensure_ascii=False).encode("utf-8", "strict")
    except (UnicodeError, ValueError, RecursionError) as exc:
        raise _NotJson(str(exc)) from None
    return value


_JSON_PATH = re.compile(r"\$(?:\.[A-Za-z_]\w*|\[\d+\])*")


def resolve(document: Any, path: str) -> Any:
    """The value at a JSON path like `$.messages[0].content`; AssertionError if absent."""
    assert _JSON_PATH.fullmatch(path), f"not a JSON path: {path!r}"
    for name, index in re.findall(r"\.([A-Za-z_]\w*)|\[(\d+)\]", path):
        if name:
            assert isinstance(document, dict) and name in document, f"{path}: no {name!r}"
            document = document[name]
        else:
            assert isinstance(document, list) and int(index) < len(document), (
                f"{path}: no [{index}]"
            )
            document = document[int(index)]
    return document


def check_decode(operation: str, body: bytes) -> Any:
    """decode_request gives a view that agrees with the body, or a 400 that names where."""
    try:
        view = decode_request(operation, body)
    except InvalidRequestError as error:
        check_refusal(body, error.message)
        return None
    assert isinstance(view, VIEWS[operation])
    try:
        document = standard_json(body)
    except _NotJson:
        return view
    assert isinstance(document, dict)
    assert view.model == document.get("model"), "the view's model is not the body's"
    if not isinstance(view, EmbeddingsRequest):
        assert view.stream == document.get("stream", False)
    limit = {"chat-completions": document.get("max_completion_tokens") or document.get("max_tokens"),
             "completions": document.get("max_tokens"), "embeddings": None,
             "responses": document.get("max_output_tokens")}[operation]  # fmt: skip
    assert max_tokens_of(view) == limit
    return view


def check_refusal(body: bytes, message: str) -> None:
    try:
        document = standard_json(body)
    except _NotJson:
        # Not JSON at all, or too deep / ambiguous for the reference reader to say where.
        assert message.startswith(("The request body ", "$")), message
        return
    match = re.fullmatch(r"(\$\S*): (\S.*)", message, re.DOTALL)
    assert match, f"the message names no JSON path: {message!r}"
    target = resolve(document, match[1])
    if got := re.search(r", got (\w+)$", match[2]):
        kinds = {JSON_TYPES[type(target)]}
        if type(target) is int and not -(2**63) <= target < 2**64:
            kinds.add("float")  # msgspec's word for an integer beyond 64 bits
        assert got[1] in kinds, f"{message!r} but the value is {target!r}"


def check_estimate(view: Any) -> None:
    for count in (TOKENIZER.count, len):
        tokens = prompt_tokens(view, count, view.model or "")
        assert type(tokens) is int and tokens >= 0
        if isinstance(view, ChatRequest):  # every message costs its overhead at least
            assert tokens >= REPLY_PRIMING + PER_MESSAGE * len(view.messages)
    reserve = completion_reserve(view, max_tokens_of(view))
    assert type(reserve) is int and reserve >= 0


@pytest.mark.parametrize("operation", s.OPERATIONS)
@fuzz(250)
@given(data=st.data())
def test_any_body_is_a_view_or_a_400_naming_the_path(operation: str, data: st.DataObject) -> None:
    body = data.draw(s.request_bodies(operation), label="body")
    view = check_decode(operation, body)
    event("a view" if view is not None else "refused")
    if view is not None:
        check_estimate(view)


@fuzz(150)
@given(body=st.binary(max_size=200))
def test_any_bytes_decode_or_refuse(body: bytes) -> None:
    for operation in s.OPERATIONS:
        view = check_decode(operation, body)
        if view is not None:
            check_estimate(view)


@fuzz(300)
@given(body=s.reply_bodies())
def test_reply_readers_never_raise(body: bytes) -> None:
    reply, chunk, response_event = read_reply(body), read_chunk(body), read_response_event(body)
    assert reply is None or (isinstance(reply, tuple) and len(reply) == 3)
    assert chunk is None or (isinstance(chunk, tuple) and len(chunk) == 4)
    assert response_event is None or (
        isinstance(response_event, tuple) and len(response_event) == 2
    )
    assert (reply is None) == (chunk is None)  # one view of one body
    counter = CompletionCounter(TOKENIZER.count)
    counter.feed(body)
    assert counter.tokens() >= 0
    try:
        document = standard_json(body)
    except _NotJson:
        return
    if reply is not None:
        assert reply[1] == (document.get("model") or "")
        usage, usage_only = chunk[0], chunk[1]  # type: ignore[index]
        assert (usage is not None) == isinstance(document.get("usage"), dict)
        assert usage_only == (usage is not None and not document.get("choices"))


# ============================================================================================
# 3. The config loader
# ============================================================================================

BASE_YAML = """
gateway:
  store: memory
  store-failure-mode: open
  max-request-body: 1MiB
  trusted-proxies: [10.0.0.0/8]
  admin-key: admin-key-0123456789abcdef
telemetry:
  service-name: tollway
  otlp-endpoint: ""
  prometheus: true
  access-log: json
tokenizers:
  "gpt-4o*": tiktoken:o200k_base
  "*": tiktoken:cl100k_base
backends:
  - id: openai
    url: https://api.openai.com/v1
    credentials: {header: Authorization, value: "Bearer sk-fuzz"}
    timeout: {connect: 5s, read: 300s}
    max-connections: 100
    circuit-breaker:
      failure-condition:
        count: 5
        interval: 1m
        status-code-ranges: [{min: 500, max: 599}]
        error-reasons: [timeout, connection]
      trip-duration: 30s
      accept-retry-after: true
  - id: azure
    url: http://127.0.0.1:1/v1
  - id: pool
    type: pool
    services: [{id: openai, priority: 1, weight: 3}, {id: azure, priority: 2}]
    retry: {count: 2, on-status: [429, 503], interval: 100ms, max-retry-after: 10s}
apis:
  - id: chat
    display-name: Chat
    description: the chat API
    path: /openai
    type: openai
    backend: pool
    subscription-required: true
    subscription-key-names: {header: X-Key, query: key}
    products: [starter]
    policies:
      - llm-token-limit:
          counter-key: "{subscription.id}"
          tokens-per-minute: 5000
          token-quota: 100000
          token-quota-period: daily
          remaining-tokens-header-name: x-remaining
  - id: raw
    path: /raw
    type: passthrough
    backend: azure
products:
  - id: starter
    display-name: Starter
    policies:
      - llm-emit-token-metric:
          namespace: fuzz
          dimensions: [{name: API ID}, {name: Team, value: "{request.header.X-Team}"}]
subscriptions:
  - id: team-a
    scope: product:starter
    primary-key: team-a-key-0123456789abcdef
    secondary-key: sha256:0000000000000000000000000000000000000000000000000000000000000000
  - id: team-b
    scope: api:chat
    state: suspended
    primary-key: team-b-key-0123456789abcdef
policies:
  - llm-content-safety: {blocklists: [forbidden]}
  - llm-semantic-cache-lookup: {score-threshold: 0.1, embeddings-backend-id: openai}
  - llm-semantic-cache-store: {duration: 5m}
blocklists:
  forbidden: {terms: [make a bomb], patterns: ['\\d{16}']}
"""
BASE = yaml.safe_load(BASE_YAML)
SCHEMA_KEYS = s.schema_keys()


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True  # a shared object is written twice, not as an anchor and an alias


def dump(document: Any) -> str:
    # Not allow_unicode: written raw, "\x85" would read back as a line break.
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False)


def test_base_config_loads() -> None:
    assert isinstance(loads(BASE_YAML, env={}), Config)
    assert "${" not in BASE_YAML  # test_env_expansion relies on one template only


@st.composite
def mutated_documents(draw: st.DrawFn) -> Any:
    """BASE with one to four nodes replaced, removed, added, wrapped or duplicated."""
    document = copy.deepcopy(BASE)
    values = s.config_values(SCHEMA_KEYS)
    keys = st.sampled_from(SCHEMA_KEYS) | s.config_keys_like
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(s.paths_in(document)))
        action = draw(st.sampled_from(["set", "set", "delete", "add", "wrap", "duplicate"]))
        node = s.at(document, path)
        if action == "set" or (not path and action in ("delete", "wrap", "duplicate")):
            new = draw(values)
        elif action == "add" and isinstance(node, dict):
            new = {**node, draw(keys): draw(values)}
        elif action == "add" and isinstance(node, list):
            new = [*node, draw(values)]
        elif action == "wrap":
            new = [node] if draw(st.booleans()) else {draw(keys): node}
        elif action == "duplicate" and isinstance(node, list | dict):
            new = [*node, *node] if isinstance(node, list) else {**node, **node}
        elif action == "delete":
            parent = s.at(document, path[:-1])
            del parent[path[-1]]
            continue
        else:
            new = draw(values)
        if path:
            s.at(document, path[:-1])[path[-1]] = new
        else:
            document = new
    return document


_PATH_STEP = re.compile(
    r"\.?(?:(?P<name>[\w-]+)|\[(?P<index>\d+)\]|\[(?P<key>'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")\]|(?P<any>\[\.\.\.\]))"
)


def check_config_error(error: ConfigError, document: Any | None) -> None:
    """Every line says where (a YAML path that exists, up to its last step) and what."""
    assert error.errors, "a ConfigError without a message"
    for line in error.errors:
        assert isinstance(line, str) and "Traceback" not in line
        if line.startswith(("(top level): ", "invalid YAML: ")) or re.match(
            r"line \d+, column \d+: ", line
        ):
            continue
        # msgspec's own location suffix left in means the path was not translated
        assert not re.search(r" - at `?(key`? in `?)?\$\S*$", line), line
        if document is None:  # typed text: an unknown key is named as typed, whatever it is
            head, sep, tail = line.partition(": ")
            assert head.strip() and sep and tail.strip(), f"no path: {line!r}"
            continue
        steps, end = [], 0
        while match := _PATH_STEP.match(line, end):
            steps.append(match)
            end = match.end()
        assert steps and line[end : end + 2] == ": " and line[end + 2 :].strip(), (
            f"no path: {line!r}"
        )
        check_path_exists(document, steps, line)


def check_path_exists(document: Any, steps: list[re.Match[str]], line: str) -> None:
    node = document
    for i, step in enumerate(steps):
        if step["any"]:
            return
        if step["name"] is not None:
            key: Any = step["name"]
        elif step["key"] is not None:
            key = ast.literal_eval(step["key"])
        else:
            key = int(step["index"])
        if isinstance(node, dict) and key not in node and isinstance(key, int):
            key = str(key)  # `[0]` is also how a mapping's key "0" may be written
        in_dict = isinstance(node, dict) and key in node
        in_list = isinstance(node, list) and isinstance(key, int) and key < len(node)
        if in_dict or in_list:
            node = node[key]
        else:  # a missing field is named by where it should be
            last = i == len(steps) - 1
            assert last and isinstance(node, dict | list), f"{line!r} names no part of the document"


def check_loads(text: str, env: dict[str, str], document: Any | None) -> Config | None:
    try:
        config = loads(text, env=env)
    except ConfigError as error:
        check_config_error(error, document)
        return None
    assert isinstance(config, Config)
    return config


@fuzz(300)
@given(document=mutated_documents())
def test_config_with_wrong_types_and_values_loads_or_says_where(document: Any) -> None:
    check_loads(dump(document), {}, document)


_YAML_PIECES = ["\t", ": ", "- ", "{", "}", "[", "]", ",", "&a ", "*undefined", "!!binary ", "!!str ",
                "!!python/object:os.system ", "!!omap ", "<<: ", "? ", "\"", "'", "#", "|", ">", "\x00",
                "\ufeff", "%YAML 1.2\n", "---\n", "...\n", "${", "${HOME}", "\n", "\n  ", "@", "`"]  # fmt: skip


@st.composite
def mutated_texts(draw: st.DrawFn) -> str:
    # No alias of an anchor ("*a"): a self-referencing one is test_config_recursive_alias;
    # no !!set or !!map tag: on the wrong node it is test_config_mapping_tag_on_a_list.
    text = BASE_YAML
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        piece = draw(
            st.sampled_from(_YAML_PIECES) | st.text(max_size=3).filter(lambda t: "*" not in t)
        )
        cut = draw(st.integers(0, 3))
        text = text[:at] + piece + text[at + cut :]
    return text


@fuzz(200)
@given(text=mutated_texts())
def test_config_text_mutations_load_or_say_where(text: str) -> None:
    check_loads(text, {"HOME": "/home/fuzz"}, None)


def reference_expand(text: str, env: dict[str, str]) -> str | None:
    """SPEC §3 expansion, read left to right: `$${` is a literal `${`; `${NAME}` needs NAME
    set and non-empty; `${NAME:-default}` falls back to default. None: the text is refused."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$${", i):
            out.append("${")
            i += 3
        elif text.startswith("${", i):
            end = text.find("}", i + 2)
            if end < 0:
                return None
            name, given_default, default = text[i + 2 : end].partition(":-")
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or "${" in default:
                return None
            if env.get(name):
                out.append(env[name])
            elif given_default:
                out.append(default)
            else:
                return None
            i = end + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


_ENV_NAMES = st.sampled_from(["A", "B_1", "EMPTY", "_x"]) | st.text(max_size=3)
_ENV_PIECES = st.sampled_from(
    ["${", "}", "$${", ":-", "$", "{", "A", "B_1", "EMPTY", "_x", "-", " ", "1"]
)
env_templates = st.lists(_ENV_PIECES | st.text(max_size=3), max_size=8).map("".join)
envs = st.dictionaries(_ENV_NAMES, st.text(max_size=5) | st.just(""), max_size=4)


@fuzz(300)
@given(template=env_templates, env=envs)
def test_env_expansion_matches_the_reference(template: str, env: dict[str, str]) -> None:
    document = copy.deepcopy(BASE)
    document["apis"][0]["description"] = template
    expected = reference_expand(template, env)
    config = check_loads(dump(document), env, document)
    if config is None:
        assert expected is None, f"refused, but it expands to {expected!r}"
    else:
        assert config.apis[0].description == expected


# Not "null" in any case: refused, see test_config_env_null_is_not_a_number.
_env_numbers = (
    st.text(max_size=8) | st.integers().map(str) | st.sampled_from(["1e3", "5.0", "0"])
).filter(lambda value: value.lower() != "null")


@fuzz(100)
@given(value=_env_numbers, env_name=st.sampled_from(["TPM", "MISSING"]))
def test_env_expansion_into_numbers(value: str, env_name: str) -> None:
    document = copy.deepcopy(BASE)
    document["apis"][0]["policies"][0]["llm-token-limit"]["tokens-per-minute"] = "${TPM}"
    config = check_loads(dump(document), {env_name: value}, document)
    if config is not None:
        limit = config.apis[0].policies[0].llm_token_limit
        assert env_name == "TPM" and limit is not None and limit.tokens_per_minute is not None
        assert limit.tokens_per_minute >= 1 and limit.tokens_per_minute == float(value)


# ============================================================================================
# 4. The live app, in-process, in front of the real mock backend
# ============================================================================================

E2E_CONFIG_HEAD = "telemetry:\n  access-log: off\n"
E2E_CONFIG_TAIL = """policies:
  - llm-token-limit: {counter-key: "{subscription.id}", tokens-per-minute: 1000000000000}
  - llm-emit-token-metric: {namespace: fuzz}
"""
GATEWAY_CODES = {cls.code: cls.status for cls in [GatewayError, *errors.__dict__.values()]
                 if isinstance(cls, type) and issubclass(cls, GatewayError) and "status" in cls.__dict__}  # fmt: skip
PROBES = ("/healthz", "/readyz", "/metrics")
OVERSIZE = b'{"model": "m", "messages": [], "pad": "' + b"x" * 70_000 + b'"}'


@dataclass
class Live:
    loop: asyncio.AbstractEventLoop
    client: httpx.AsyncClient
    app: Gateway

    def request(
        self, method: str, raw_path: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> httpx.Response:
        url = httpx.URL("http://gw").copy_with(raw_path=raw_path)
        request = self.client.build_request(method, url, headers=headers, content=body)
        return self.loop.run_until_complete(self.client.send(request))


@pytest.fixture(scope="module")
def live(mock: MockProc) -> Iterator[Live]:
    config = loads(E2E_CONFIG_HEAD + gateway_config(mock.url) + E2E_CONFIG_TAIL)
    loop = asyncio.new_event_loop()
    app = create_app(config)
    loop.run_until_complete(app.startup())
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))  # type: ignore[arg-type]
    try:
        yield Live(loop, client, app)
    finally:
        loop.run_until_complete(client.aclose())
        loop.run_until_complete(app.shutdown())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


_OPERATIONS = {"/chat/completions": "chat-completions", "/completions": "completions",
               "/embeddings": "embeddings", "/responses": "responses"}  # fmt: skip
_SUBPATHS = [*_OPERATIONS, "/models", "", "/", "/chat", "/models/gpt-4o", "/../healthz", "/%2e%2e/x",
             "/..%2fx", "/%252e%252e/x", "//evil.example/x", "/chat/completions/", "/CHAT/completions"]  # fmt: skip
_token = st.text(
    st.sampled_from("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789-_.!#$%&'*+^`|~"),
    min_size=1,
    max_size=12,
)
_header_value = (
    st.binary(max_size=20)
    .map(lambda v: bytes(b for b in v if b in (9,) or 32 <= b != 127))
    .map(bytes.strip)
)
_keys = st.sampled_from([KEY, KEY_B, SUSPENDED_KEY, "wrong-key-0123456789abcdef", ""])


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, bytes, list[tuple[bytes, bytes]], bytes]:
    """A request anyone may send: method, raw path with query, headers, body."""
    route = draw(st.sampled_from(["operation"] * 6 + ["models", "subpath", "probe", "anything"]))
    prefix = draw(
        st.sampled_from(["/openai", "/open", "/open", "/passthrough", "/dead", "", "/nope"])
    )
    method = "POST"
    if route == "operation":
        prefix = draw(st.sampled_from(["/openai", "/open", "/open", "/passthrough", "/dead"]))
        path = prefix + draw(st.sampled_from(list(_OPERATIONS)))
    elif route == "models":
        path, method = prefix + "/models", "GET"
    elif route == "subpath":
        path = prefix + draw(st.sampled_from(_SUBPATHS))
    elif route == "probe":
        path = draw(st.sampled_from(PROBES))
    else:
        path = prefix + "/" + draw(st.text(max_size=12))
    if draw(s.one_in(6)):
        method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]))
    operation = _OPERATIONS.get(path[len(prefix) :]) if path.startswith(prefix) else None
    headers: list[tuple[bytes, bytes]] = []
    auth = draw(
        st.sampled_from(["api-key", "ocp-apim-subscription-key", "authorization", "query", "none"])
    )
    key = KEY if draw(st.integers(0, 3)) else draw(_keys)
    query = ""
    if auth == "authorization":
        headers.append((b"authorization", b"Bearer " + key.encode()))
    elif auth == "query":
        query = "subscription-key=" + quote(key)
    elif auth != "none":
        headers.append((auth.encode(), key.encode()))
    # Any other header but the mock's fault injection (x-mock-*, a backend asking for a
    # 500) and those httpx itself must own to frame the request.
    names = _token.filter(lambda n: not n.lower().startswith("x-mock") and n.lower() not in
                          ("host", "content-length", "transfer-encoding"))  # fmt: skip
    extra = st.sampled_from(["content-type", "x-request-id", "traceparent", "accept-encoding",
                             "connection", "te", "x-forwarded-for", "expect"]) | names  # fmt: skip
    for name in draw(st.lists(extra, max_size=4)):
        headers.append((name.encode(), draw(_header_value)))
    if draw(st.booleans()):
        query = "&".join(filter(None, [query, quote(draw(st.text(max_size=10)), safe="=&")]))
    body = (
        draw(s.request_bodies(operation))
        if operation
        else draw(s.json_bytes() | st.binary(max_size=40))
    )
    if draw(s.one_in(31)):
        body = b"<OVERSIZE>"  # stands for OVERSIZE, too long for hypothesis to print
    raw_path = quote(path, safe="/%:@!$&'()*+,;=") + ("?" + query if query else "")
    return method, raw_path.encode(), headers, body


def check_response(method: str, path: bytes, response: httpx.Response) -> None:
    status, body = response.status_code, response.content
    event(f"{status} {response.headers.get('content-type', '')[:20]}")
    if status == 500 and response.headers.get("content-type", "").startswith("text/plain"):
        # Not the gateway's (its errors are JSON, and an exception in the app would raise
        # here): the mock crashed on a body it was forwarded, and backend errors pass
        # through unchanged (SPEC §4). See test_mock_llm_refuses_bad_json_with_400.
        event("the mock's own 500, passed through")
        return
    assert status != 500, f"500 for {method} {path!r}: {body[:300]!r}"
    assert BACKEND_SECRET.encode() not in body
    assert all(BACKEND_SECRET.encode() not in v for _, v in response.headers.raw)
    if response.request.url.path not in PROBES:  # probes answer bare
        assert "x-request-id" in response.headers and "x-tollway-overhead-ms" in response.headers
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        events, rest = split([body])
        for _, data in parsed(events, rest):
            if data.startswith(b'{"error"'):
                check_error_body(json.loads(data), 200)
        return
    if status >= 400 and method != "HEAD":
        check_error_body(json.loads(body), status)


def check_error_body(document: Any, status: int) -> None:
    """OpenAI's error shape; a gateway-made one (a string code; backends pass through with
    theirs, the mock's is null) carries one of the gateway's codes with its status."""
    assert isinstance(document, dict) and set(document) == {"error"}, document
    error = document["error"]
    assert isinstance(error, dict) and {"message", "type", "code"} <= set(error), error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    if error["code"] is not None:
        assert error["code"] in GATEWAY_CODES and error["code"] != "InternalError", error
        assert status in (200, GATEWAY_CODES[error["code"]]), (status, error)


CHAT = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]'
DEEP = b"[" * 5000 + b"]" * 5000


@fuzz(200)
@given(request=requests())
@example(
    request=(
        "POST",
        b"/openai/chat/completions",
        [(b"api-key", KEY.encode())],
        CHAT + b', "stream": true}',
    )
)
@example(request=("POST", b"/open/responses", [], b'{"model": "m", "input": "hi", "stream": true}'))
@example(request=("POST", b"/dead/chat/completions", [(b"api-key", KEY.encode())], CHAT + b"}"))
@example(request=("POST", b"/openai/chat/completions", [(b"api-key", KEY.encode())], b"<OVERSIZE>"))
@example(request=("POST", b"/open/chat/completions", [], CHAT + b', "tools": [' + DEEP + b"]}"))
@example(request=("POST", b"/open/chat/completions", [], CHAT + b', "stream": true, "\xff": 1}'))
@example(request=("POST", b"/open/embeddings", [], b'{"model": "m", "input": "\xff"}'))
@example(request=("GET", b"/passthrough/%2e%2e/%2e%2e/_mock/requests", [], b""))
def test_live_gateway_never_answers_500_and_errors_are_openai_shaped(
    live: Live, request: tuple[str, bytes, list[tuple[bytes, bytes]], bytes]
) -> None:
    method, path, headers, body = request
    body = OVERSIZE if body == b"<OVERSIZE>" else body
    check_response(method, path, live.request(method, path, headers, body))


def test_live_gateway_still_serves(live: Live) -> None:
    body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'
    response = live.request("POST", b"/openai/chat/completions", [(b"api-key", KEY.encode())], body)
    assert response.status_code == 200, response.text


# ============================================================================================
# Bugs found by the fuzzing above
# ============================================================================================
# Fixed alongside this file (proxy/schemas.py, proxy/estimate.py); each was a 500 or a
# token-limit hole before. msgspec validates UTF-8 only in strings it builds (raising
# UnicodeDecodeError, not DecodeError) and recurses for nesting (RecursionError past the
# interpreter's limit, ~1,000 levels: a 2 kB body).

DEEP_ARRAY = b"[" * 5000 + b"]" * 5000


@pytest.mark.parametrize(
    ("operation", "body", "message"),
    [
        (
            "chat-completions",
            b'{"model": "m\xff", "messages": []}',
            "The request body is not valid JSON: invalid UTF-8 (byte 12)",
        ),
        (
            "embeddings",
            b'{"model": "m", "input": ["ok", "\xc3"]}',
            "The request body is not valid JSON: invalid UTF-8 (byte 32)",
        ),
        (
            "chat-completions",
            b'{"model": "m", "messages": [], "tools": [' + DEEP_ARRAY + b"]}",
            "$: arrays and objects are nested too deeply.",
        ),
        (
            "responses",
            b'{"unknown": ' + DEEP_ARRAY + b"}",
            "$: arrays and objects are nested too deeply.",
        ),
    ],
    ids=["utf8-in-model", "utf8-in-input", "deep-in-tools", "deep-in-unknown-field"],
)
def test_bad_utf8_and_deep_nesting_are_400_not_500(
    operation: str, body: bytes, message: str
) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        decode_request(operation, body)
    assert caught.value.message == message


def test_stream_usage_patch_refuses_a_key_decode_request_skipped() -> None:
    body = b'{"model": "m", "messages": [], "stream": true, "\xff": 1}'
    assert isinstance(decode_request("chat-completions", body), ChatRequest)  # an unknown key
    with pytest.raises(InvalidRequestError, match=r"invalid UTF-8 \(byte 48\)"):
        with_stream_usage(body)


@pytest.mark.parametrize(
    ("operation", "body"),
    [
        (
            "chat-completions",
            b'{"model": "m", "messages": [], "tools": [{"function": {"name": "\xff"}}]}',
        ),
        (
            "chat-completions",
            b'{"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"function": {"arguments": "\xff"}}]}]}',
        ),
        ("responses", b'{"model": "m", "input": [{"role": "user", "content": "\xff"}]}'),
    ],
    ids=["tool", "tool-call", "input-item"],
)
def test_estimate_survives_bad_utf8_inside_raw_fields(operation: str, body: bytes) -> None:
    view = decode_request(operation, body)  # Raw fields are not validated when decoded
    assert prompt_tokens(view, len) > 0


@pytest.mark.parametrize(
    ("reader", "body"),
    [
        (read_reply, b'{"model": "\xff"}'),
        (read_reply, b'{"usage": {"prompt_tokens": 1}, "x": ' + DEEP_ARRAY + b"}"),
        (read_chunk, b'{"choices": [{"finish_reason": "\xff"}]}'),
        (read_chunk, b'{"x": ' + DEEP_ARRAY + b"}"),
        (read_response_event, b'{"type": "\xff"}'),
        (read_response_event, b'{"type": "response.completed", "x": ' + DEEP_ARRAY + b"}"),
    ],
    ids=["reply-utf8", "reply-deep", "chunk-utf8", "chunk-deep", "event-utf8", "event-deep"],
)
def test_reply_readers_return_none_for_what_they_cannot_decode(reader: Any, body: bytes) -> None:
    assert reader(body) is None


@pytest.mark.parametrize(
    "data",
    [b'{"type": "response.output_text.delta", "delta": "\xff"}', b'{"x": ' + DEEP_ARRAY + b"}"],
    ids=["utf8", "deep"],
)
def test_completion_counter_skips_what_it_cannot_decode(data: bytes) -> None:
    counter = CompletionCounter(len)
    counter.feed(data)
    assert counter.tokens() == 0


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"max_tokens": -1000000}, 0),  # was -1000000: the prompt was admitted unreserved
        ({"max_tokens": 10, "n": -3}, 10),  # was -30
        ({"max_completion_tokens": -5, "max_tokens": 10}, 0),
    ],
)
def test_completion_reserve_is_never_negative(fields: dict[str, int], expected: int) -> None:
    body = json.dumps({"model": "m", "messages": [], **fields}).encode()
    view = decode_request("chat-completions", body)
    assert completion_reserve(view, max_tokens_of(view)) == expected


def test_live_bad_utf8_and_deep_json_are_400(live: Live) -> None:
    headers = [(b"api-key", KEY.encode())]
    for body in (b'{"model": "\xff", "messages": []}', CHAT + b', "tools": [' + DEEP + b"]}",
                 CHAT + b', "stream": true, "\xff": 1}'):  # fmt: skip
        response = live.request("POST", b"/openai/chat/completions", headers, body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "InvalidRequest"


# Bugs the generators found in the config loader, units and the mock, fixed; each kept as a
# reproducer (the generators above still leave these inputs out of their random runs).


def test_config_deep_nesting() -> None:
    with pytest.raises(ConfigError):
        loads("gateway: " + "[" * 3000 + "]" * 3000 + "\n", env={})


def test_config_recursive_alias() -> None:
    with pytest.raises(ConfigError):
        loads("gateway: &loop [*loop]\n", env={})


@pytest.mark.parametrize("field", ["size", "duration"])
def test_config_huge_numbers(field: str) -> None:
    document = copy.deepcopy(BASE)
    if field == "size":
        document["gateway"]["max-request-body"] = 10**400
    else:
        document["backends"][0]["timeout"]["connect"] = 10**400
    with pytest.raises(ConfigError):
        loads(dump(document), env={})


@pytest.mark.parametrize("where", ["enum value", "key"])
def test_config_error_paths_survive_backticks(where: str) -> None:
    document = copy.deepcopy(BASE)
    if where == "key":
        document["gateway"]["zz` - at `$nosuch[0]"] = 1
    else:
        document["telemetry"]["access-log"] = "x - at `$nosuch[0]"
    with pytest.raises(ConfigError):
        loads(dump(document), env={})


@pytest.mark.parametrize(
    "text", ["gateway: !!set [a]\n", "gateway: !!set a\n", "gateway: !!map [a]\n"]
)
def test_config_mapping_tag_on_a_list(text: str) -> None:
    with pytest.raises(ConfigError):
        loads(text, env={})


def test_config_non_string_key_is_named_by_its_path() -> None:
    document = copy.deepcopy(BASE)
    document["tokenizers"][1] = "tiktoken:o200k_base"
    with pytest.raises(ConfigError) as caught:
        loads(dump(document), env={})
    # today: "(top level): expected str, got int - at key in $.tokenizers"
    assert caught.value.errors[0].startswith("tokenizers"), caught.value.errors


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "\xff", "messages": []}',
        b'{"model": "m", "messages": [], "x": ' + DEEP_ARRAY + b"}",
    ],
    ids=["utf8", "deep"],
)
def test_mock_llm_refuses_bad_json_with_400(mock: MockProc, body: bytes) -> None:
    response = httpx.post(mock.url + "/chat/completions", content=body)
    assert response.status_code == 400, response.status_code


def test_config_env_null_is_not_a_number() -> None:
    document = copy.deepcopy(BASE)
    document["apis"][0]["policies"][0]["llm-token-limit"]["tokens-per-minute"] = "${TPM}"
    try:
        config = loads(dump(document), env={"TPM": "null"})
    except ConfigError:
        return  # refused, as "TPM=abc" is
    limit = config.apis[0].policies[0].llm_token_limit
    assert limit is not None and limit.tokens_per_minute is not None, "the rate limit is gone"
