"""Scenario load for Tollway with locust: a mix of OpenAI calls from several subscriptions.

Run it headless against a gateway (or, for a baseline, straight against a backend):

    TOLLWAY_KEYS=key-a-0123456789abcdef,key-b-0123456789abcdef \\
        locust -f bench/locustfile.py --headless -u 50 -r 10 -t 30s --host http://127.0.0.1:8080

Without `--headless` locust serves its web UI on :8089. Add `--csv PREFIX` for CSV stats and
`--processes N` to run more than one load-generating process (one process saturates a core
long before a gateway worker does at high user counts; pin it with `taskset` when the
gateway's cores must stay free).

Each simulated user loops without waiting over weighted tasks against the openai-type API:

    weight  stats name         request
    4       chat               POST {path}/chat/completions                 checks `choices`
    4       chat stream        POST {path}/chat/completions, stream: true   reads to `data: [DONE]`
    2       embeddings         POST {path}/embeddings                       checks `data`
    1       models             GET  {path}/models                           checks `data`

"chat stream" is timed from sending the request to the end of the stream (locust's own
`stream=True` timing would stop at the response headers); a stream that does not end with
`data: [DONE]`, or breaks off, is a failure. Its time to first token (first chunk with
non-empty `delta.content`) is recorded as a separate entry, "chat stream TTFT".

Environment:
    TOLLWAY_KEYS             subscription keys, comma-separated (required); users take them
                             round-robin (per locust process) and send them as `api-key`
    TOLLWAY_API_PATH         where the openai-type API is mounted (default /openai); use /v1
                             to load tollway mock-llm directly
    TOLLWAY_MODEL            chat model (default gpt-4o-mini)
    TOLLWAY_EMBEDDING_MODEL  embeddings model (default text-embedding-3-small)
    TOLLWAY_MAX_TOKENS       max_tokens of chat requests (default: not sent)
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
import time
from typing import Any

from locust import FastHttpUser, constant, events, task
from locust.contrib.fasthttp import ResponseContextManager

API_PATH = "/" + os.environ.get("TOLLWAY_API_PATH", "/openai").strip("/")
MODEL = os.environ.get("TOLLWAY_MODEL", "gpt-4o-mini")
EMBEDDING_MODEL = os.environ.get("TOLLWAY_EMBEDDING_MODEL", "text-embedding-3-small")
MAX_TOKENS = os.environ.get("TOLLWAY_MAX_TOKENS", "")
KEYS = [key.strip() for key in os.environ.get("TOLLWAY_KEYS", "").split(",") if key.strip()]

_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Say hello to the benchmark in one short sentence."},
]
_CHAT: dict[str, Any] = {"model": MODEL, "messages": _MESSAGES}
if MAX_TOKENS:
    _CHAT["max_tokens"] = int(MAX_TOKENS)
CHAT_BODY = json.dumps(_CHAT)
STREAM_BODY = json.dumps({**_CHAT, "stream": True})
EMBEDDINGS_BODY = json.dumps(
    {
        "model": EMBEDDING_MODEL,
        "input": ["The gateway counts tokens.", "Each team has its own subscription key."],
    }
)
_JSON = {"content-type": "application/json", "accept": "application/json"}
# The SSE body is read raw, so ask for it uncompressed (the gateway never compresses it anyway).
_SSE = {
    "content-type": "application/json",
    "accept": "text/event-stream",
    "accept-encoding": "identity",
}
_DONE = b"data: [DONE]"

_key_index = itertools.count()


@events.init.add_listener
def _require_keys(environment: Any, **_kwargs: Any) -> None:
    if not KEYS:
        logging.error("TOLLWAY_KEYS is not set: give the subscription keys, comma-separated")
        sys.exit(2)


def _fail_status(response: ResponseContextManager) -> None:
    if response.status_code == 0:  # no response at all: refused, reset, timed out
        response.failure(f"no response: {getattr(response, 'error', None)!r}")
        return
    try:
        body = (response.content or b"")[:200].decode("utf-8", "replace")
    except Exception as exc:  # the connection broke while reading the error body
        body = repr(exc)
    response.failure(f"status {response.status_code}: {body}")


def _excerpt(response: ResponseContextManager) -> str:
    return (response.content or b"")[:200].decode("utf-8", "replace")


def _json_object(response: ResponseContextManager, field: str) -> dict[str, Any] | None:
    """The response's JSON object if the status is 200 and `field` is a non-empty list in it;
    otherwise mark the request failed and return None."""
    if response.status_code != 200:
        _fail_status(response)
        return None
    try:
        data = json.loads(response.content or b"")
    except ValueError:
        response.failure(f"not JSON: {_excerpt(response)}")
        return None
    if not isinstance(data, dict) or not isinstance(data.get(field), list) or not data[field]:
        response.failure(f"no {field!r} list in the response: {_excerpt(response)}")
        return None
    return data


class TollwayUser(FastHttpUser):
    """One client application: one subscription key, requests back to back."""

    host = "http://127.0.0.1:8080"
    wait_time = constant(0)

    def on_start(self) -> None:
        key = KEYS[next(_key_index) % len(KEYS)]
        self.json_headers = {**_JSON, "api-key": key}
        self.sse_headers = {**_SSE, "api-key": key}

    def _post_json(self, op: str, body: bytes, name: str, field: str, item: str) -> None:
        """POST `body` to the API's `op`; the reply must hold a `field` list whose first
        element has `item`."""
        with self.client.post(
            f"{API_PATH}/{op}",
            data=body,
            headers=self.json_headers,
            name=name,
            catch_response=True,
        ) as response:
            data = _json_object(response, field)
            if data is not None and item not in data[field][0]:
                response.failure(f"{field}[0] has no {item}")

    @task(4)
    def chat(self) -> None:
        self._post_json("chat/completions", CHAT_BODY, "chat", "choices", "message")

    @task(4)
    def chat_stream(self) -> None:
        started = time.perf_counter()
        with self.client.post(
            f"{API_PATH}/chat/completions",
            data=STREAM_BODY,
            headers=self.sse_headers,
            name="chat stream",
            stream=True,
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                _fail_status(response)
                return
            try:
                first_token, size, problem = _read_stream(response)
            except Exception as exc:  # connection reset, parse error, timeout mid-stream
                response.failure(f"stream broke off: {exc!r}")
                return
            response.request_meta["response_time"] = (time.perf_counter() - started) * 1000
            response.request_meta["response_length"] = size
            if first_token is not None:
                self.environment.events.request.fire(
                    request_type="SSE",
                    name="chat stream TTFT",
                    response_time=(first_token - started) * 1000,
                    response_length=0,
                    exception=None,
                    context={},
                )
            if problem:
                response.failure(problem)

    @task(2)
    def embeddings(self) -> None:
        self._post_json("embeddings", EMBEDDINGS_BODY, "embeddings", "data", "embedding")

    @task(1)
    def models(self) -> None:
        with self.client.get(
            f"{API_PATH}/models", headers=self.json_headers, name="models", catch_response=True
        ) as response:
            _json_object(response, "data")


def _read_stream(response: ResponseContextManager) -> tuple[float | None, int, str]:
    """Read an SSE chat stream to its end: (time of the first token, bytes, problem or "").

    Lines are read one at a time until the first token, so its time is when it arrived:
    locust's `read(n)` and `iter_content` wait for n bytes. The rest is read in one go.
    """
    raw = response._response  # geventhttpclient's response: readline() with an LF separator
    size, last = 0, b""
    while line := raw.readline(b"\n"):
        size += len(line)
        line = line.strip()
        if not line.startswith(b"data:"):
            continue  # blank separator, comment, event: line
        last = line
        data = line[5:].strip()
        if data == b"[DONE]":
            return None, size, "the stream ended before the first token"
        try:
            chunk = json.loads(data)
        except ValueError:
            return None, size, f"a data line is not JSON: {data[:200]!r}"
        if not isinstance(chunk, dict) or "choices" not in chunk:
            return None, size, f"not a chat chunk: {data[:200].decode('utf-8', 'replace')}"
        choices = chunk["choices"]
        if choices and (choices[0].get("delta") or {}).get("content"):
            break
    else:
        return None, size, f"the stream ended before the first token (last: {last[:200]!r})"
    first_token = time.perf_counter()
    rest = raw.read()  # to the end of the body (an empty bytes when it has ended)
    size += len(rest)
    tail = (rest or last).rstrip()
    if not tail.endswith(_DONE):
        return first_token, size, f"the stream did not end with [DONE]: {tail[-200:]!r}"
    return first_token, size, ""
