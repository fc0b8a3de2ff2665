"""Request and response views: only the fields the gateway reads, with module-level codecs.

The original request bytes are what goes upstream; these views exist to validate what the
gateway relies on (model, stream, messages, limits) and to read usage from responses. Unknown
fields are ignored so new OpenAI parameters pass through untouched.
"""

from __future__ import annotations

import re

import msgspec

from proxy.errors import InvalidRequestError


class _View(msgspec.Struct, omit_defaults=True):
    pass


class StreamOptions(_View):
    include_usage: bool | None = None


class ImageUrl(_View):
    url: str = ""
    detail: str | None = None


class ContentPart(_View):
    type: str
    text: str | None = None
    image_url: ImageUrl | str | None = None


class Message(_View):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[msgspec.Raw] | None = None


class ChatRequest(_View):
    model: str
    messages: list[Message]
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int | None = None
    tools: list[msgspec.Raw] | None = None


class CompletionRequest(_View):
    model: str
    prompt: str | list[str | int | list[int]] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    n: int | None = None


class EmbeddingsRequest(_View):
    model: str
    input: str | list[str | int | list[int]]
    dimensions: int | None = None


class ResponsesRequest(_View):
    model: str | None = None
    input: str | list[msgspec.Raw] | None = None
    instructions: str | None = None
    stream: bool | None = False
    max_output_tokens: int | None = None


RequestView = ChatRequest | CompletionRequest | EmbeddingsRequest | ResponsesRequest


class Usage(msgspec.Struct):
    """Token usage as billed by the backend, normalised over the chat and Responses shapes."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0


class _TokensDetails(msgspec.Struct):
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None


class _WireUsage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    prompt_tokens_details: _TokensDetails | None = None
    completion_tokens_details: _TokensDetails | None = None
    input_tokens_details: _TokensDetails | None = None
    output_tokens_details: _TokensDetails | None = None

    def normalise(self) -> Usage:
        prompt = self.prompt_tokens if self.prompt_tokens is not None else self.input_tokens
        completion = (
            self.completion_tokens if self.completion_tokens is not None else self.output_tokens
        )
        prompt, completion = prompt or 0, completion or 0
        cached = _detail(self.prompt_tokens_details or self.input_tokens_details, "cached_tokens")
        reasoning = _detail(
            self.completion_tokens_details or self.output_tokens_details, "reasoning_tokens"
        )
        total = self.total_tokens if self.total_tokens is not None else prompt + completion
        return Usage(prompt, completion, total, cached, reasoning)


def _detail(details: _TokensDetails | None, name: str) -> int:
    return (getattr(details, name) or 0) if details is not None else 0


class _Choice(msgspec.Struct):
    finish_reason: str | None = None


class _ReplyView(msgspec.Struct):
    """A whole reply (chat, completions, embeddings, responses) or a stream chunk."""

    model: str | None = None
    choices: list[_Choice] | None = None
    usage: _WireUsage | None = None

    def finish_reasons(self) -> tuple[str, ...]:
        choices = self.choices
        if not choices:
            return ()
        if len(choices) == 1:  # the common case, without a generator (~0.5 us)
            reason = choices[0].finish_reason
            return (reason,) if reason else ()
        return tuple(c.finish_reason for c in choices if c.finish_reason)


class _ResponseEventView(msgspec.Struct):
    type: str = ""
    response: _ReplyView | None = None


# What the telemetry and the token accounting read from a backend's reply: (usage, model,
# finish reasons). Plain tuples, not NamedTuples: one is made per reply and per streamed
# chunk, and a NamedTuple's Python-level __new__ costs ~0.25 us each.
Reply = tuple[Usage | None, str, tuple[str, ...]]
# A streamed chat/completions chunk: (usage, usage_only, model, finish reasons); usage_only
# marks the extra chunk (`"choices": []` plus usage) that the gateway asks for and removes
# again for clients that did not.
Chunk = tuple[Usage | None, bool, str, tuple[str, ...]]


_DECODERS: dict[str, msgspec.json.Decoder[RequestView]] = {
    "chat-completions": msgspec.json.Decoder(ChatRequest),
    "completions": msgspec.json.Decoder(CompletionRequest),
    "embeddings": msgspec.json.Decoder(EmbeddingsRequest),
    "responses": msgspec.json.Decoder(ResponsesRequest),
}
_reply_decoder = msgspec.json.Decoder(_ReplyView)
_response_event_decoder = msgspec.json.Decoder(_ResponseEventView)
_raw_object_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])
_encoder = msgspec.json.Encoder()


# What decoding bytes from outside may raise besides DecodeError (ValidationError is one):
# msgspec checks UTF-8 only in the strings it builds, and raises UnicodeDecodeError there;
# nesting deeper than the interpreter's recursion limit (~1,000 levels, a 2 kB body) raises
# RecursionError. Neither may escape as a 500.
JSON_ERRORS = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)

# The roles whose messages instruct the model rather than ask it (OpenAI's `developer` is the
# newer name of `system`).
SYSTEM_ROLES = frozenset({"system", "developer"})


def decode_request(operation: str, body: bytes) -> RequestView:
    """Validate and view a request body of an openai-type operation, or raise 400."""
    try:
        return _DECODERS[operation].decode(body)
    except JSON_ERRORS as exc:
        raise InvalidRequestError(_describe(exc, body)) from None


_AT = re.compile(r"^(.*) - at `(\$[^`]*)`$", re.DOTALL)


def _describe(exc: Exception, body: bytes) -> str:
    """Turn msgspec's message into `$.path: expected X, got Y` (SPEC §4)."""
    if not body.strip():
        return "The request body is empty; expected a JSON object."
    if isinstance(exc, RecursionError):
        return "$: arrays and objects are nested too deeply."
    if isinstance(exc, UnicodeDecodeError):
        return f"The request body is not valid JSON: {_utf8_error(body)}"
    text = str(exc)
    if not isinstance(exc, msgspec.ValidationError):
        return f"The request body is not valid JSON: {text}"
    match = _AT.match(text)
    message, path = match.groups() if match else (text, "$")
    message = message.replace("`", "")
    message = message[:1].lower() + message[1:]
    return f"{path}: {_or_list(message)}"


def _utf8_error(body: bytes) -> str:
    try:
        body.decode()
    except UnicodeDecodeError as exc:  # where in the body, not in the string msgspec built
        return f"invalid UTF-8 (byte {exc.start})"
    return "invalid UTF-8"


def _or_list(message: str) -> str:
    # "expected str | array | null" reads better as "expected str, array or null".
    head, sep, kinds = message.partition("expected ")
    if not sep or " | " not in kinds:
        return message
    kinds, comma, rest = kinds.partition(",")
    names = kinds.split(" | ")
    return f"{head}expected {', '.join(names[:-1])} or {names[-1]}{comma}{rest}"


def wants_usage(view: ChatRequest | CompletionRequest) -> bool:
    """Did the client itself ask for the streamed usage chunk?"""
    return bool(view.stream_options is not None and view.stream_options.include_usage)


def with_stream_usage(body: bytes) -> bytes:
    """Return a copy of a request body with `stream_options.include_usage: true` set
    (raises 400 for what decode_request let through: invalid UTF-8 in a key it skipped)."""
    try:
        fields = _raw_object_decoder.decode(body)
    except JSON_ERRORS as exc:
        raise InvalidRequestError(_describe(exc, body)) from None
    options: dict[str, object] = {}
    if "stream_options" in fields:
        current = msgspec.json.decode(fields["stream_options"])
        if isinstance(current, dict):
            options = current
    options["include_usage"] = True
    fields["stream_options"] = msgspec.Raw(_encoder.encode(options))
    return _encoder.encode(fields)


def max_tokens_of(view: RequestView) -> int | None:
    """The completion bound the request sets (`gen_ai.request.max_tokens`), if any."""
    if isinstance(view, ChatRequest):
        return view.max_completion_tokens or view.max_tokens
    if isinstance(view, CompletionRequest):
        return view.max_tokens
    if isinstance(view, ResponsesRequest):
        return view.max_output_tokens
    return None


def read_reply(body: bytes) -> Reply | None:
    """Usage, model and finish reasons of a complete JSON reply (chat, completions,
    embeddings, responses); None when it is not a JSON object."""
    try:
        reply = _reply_decoder.decode(body)
    except JSON_ERRORS:
        return None
    usage = reply.usage.normalise() if reply.usage is not None else None
    return usage, reply.model or "", reply.finish_reasons()


def read_chunk(data: bytes) -> Chunk | None:
    """Read a streamed chat/completions chunk (an event's data); None if not JSON."""
    try:
        chunk = _reply_decoder.decode(data)
    except JSON_ERRORS:
        return None
    if chunk.usage is None:
        return None, False, chunk.model or "", chunk.finish_reasons()
    return chunk.usage.normalise(), not chunk.choices, chunk.model or "", ()


def read_response_event(data: bytes) -> tuple[str, Reply | None] | None:
    """Read a Responses API event: `(type, reply)`, None if not JSON. The reply (usage and
    model) comes with `response.completed` (and `response.incomplete` / `.failed`)."""
    try:
        event = _response_event_decoder.decode(data)
    except JSON_ERRORS:
        return None
    response = event.response
    if response is None or response.usage is None:
        return event.type, None
    return event.type, (response.usage.normalise(), response.model or "", ())


# -- the text of streamed output ----------------------------------------------------------


class _CallFunction(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _Call(msgspec.Struct):
    function: _CallFunction | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None  # vLLM, DeepSeek
    reasoning: str | None = None  # OpenRouter, Ollama
    refusal: str | None = None
    tool_calls: list[_Call] | None = None


class _DeltaChoice(msgspec.Struct):
    index: int = 0
    delta: _Delta | None = None
    text: str | None = None  # completions


class _DeltaChunk(msgspec.Struct):
    choices: list[_DeltaChoice] | None = None
    type: str = ""  # Responses API events
    delta: str | None = None


_chunk_decoder = msgspec.json.Decoder(_DeltaChunk)
_DELTA_EVENTS = frozenset(
    (
        "response.output_text.delta",
        "response.refusal.delta",
        "response.function_call_arguments.delta",
        "response.reasoning_text.delta",
        "response.reasoning_summary_text.delta",
    )
)


def delta_texts(data: bytes, out: list[str], choices: list[int] | None = None) -> None:
    """Append the output text one streamed event's data carries to `out` (and, given
    `choices`, each text's choice index to it): chat deltas (content, reasoning, refusal,
    tool-call names and arguments), completions text, Responses API text and argument deltas
    (choice 0). Nothing when it is not JSON. Appends rather than returns: the token counter
    calls it on every event of every stream."""
    try:
        chunk = _chunk_decoder.decode(data)
    except JSON_ERRORS:
        return
    if chunk.delta is not None and chunk.type in _DELTA_EVENTS:
        out.append(chunk.delta)
        if choices is not None:
            choices.append(0)
    for choice in chunk.choices or ():
        before = len(out)
        if choice.text:
            out.append(choice.text)
        delta = choice.delta
        if delta is not None:
            for text in (delta.content, delta.reasoning_content, delta.reasoning, delta.refusal):
                if text:
                    out.append(text)
            for call in delta.tool_calls or ():
                function = call.function
                if function is not None:
                    out += [t for t in (function.name, function.arguments) if t]
        if choices is not None and len(out) > before:
            choices += [choice.index] * (len(out) - before)
