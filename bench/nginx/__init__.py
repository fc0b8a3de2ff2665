"""Mock LLM upstream for the benches: an nginx config rendered from ``nginx.conf.template``.

nginx serves, from memory, with ``worker_processes 1`` and ``access_log off``:

* ``POST /v1/chat/completions`` -> a fixed ~900-byte ``chat.completion`` JSON;
* ``GET|POST /v1/sse`` -> a fixed ``text/event-stream`` body: 54 ``data:`` events and
  ``data: [DONE]``, written at once (a static file under the prefix: too long for a
  config token).

Use :func:`prepare` to lay out a prefix dir and get the command line; the caller runs it
in the foreground (``daemon off``) and stops it. Nothing here starts a process.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

TEMPLATE = Path(__file__).with_name("nginx.conf.template")
CHAT_PATH = "/v1/chat/completions"
SSE_PATH = "/v1/sse"
SSE_EVENTS = 54
_CREATED = 1764086400
_MODEL = "gpt-4o-mini-2024-07-18"


def _dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True)


def chat_completion_body() -> bytes:
    """Return the fixed non-streaming ``chat.completion`` response (~900 bytes)."""
    content = (
        "Tollway is a self-hosted LLM API gateway. It checks the subscription key, "
        "applies the token limits, forwards the request to the upstream provider "
        "unchanged, meters the usage from the response, and streams server-sent "
        "events through as they arrive. This reply is a fixed body served by the "
        "nginx mock so that the benchmarks measure the gateway itself, not any model."
    )
    body = {
        "id": "chatcmpl-BENCH0000000000000000000000000",
        "object": "chat.completion",
        "created": _CREATED,
        "model": _MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 42,
            "completion_tokens": 71,
            "total_tokens": 113,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        },
        "service_tier": "default",
        "system_fingerprint": "fp_bench000",
    }
    return _dumps(body).encode()


def _chunk(delta: dict[str, object], finish: str | None) -> str:
    body = {
        "id": "chatcmpl-BENCH0000000000000000000000000",
        "object": "chat.completion.chunk",
        "created": _CREATED,
        "model": _MODEL,
        "system_fingerprint": "fp_bench000",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    return "data: " + _dumps(body) + "\n\n"


def sse_body(events: int = SSE_EVENTS) -> bytes:
    """Return the fixed SSE body: ``events`` ``data:`` events, then ``data: [DONE]``."""
    parts = [_chunk({"role": "assistant", "content": ""}, None)]
    parts += [_chunk({"content": f" tok{i:02d}"}, None) for i in range(events - 2)]
    parts.append(_chunk({}, "stop"))
    parts.append("data: [DONE]\n\n")
    return "".join(parts).encode()


def _nginx_quote(body: bytes) -> str:
    """Escape ``body`` for a single-quoted nginx string (``return 200 '...'``)."""
    text = body.decode()
    if "$" in text:
        raise ValueError("nginx would expand '$' in a return body")
    return text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")


def render_config(prefix: Path, port: int, host: str = "127.0.0.1") -> str:
    """Fill the template for a server on ``host:port`` keeping its files under ``prefix``."""
    values = {
        "USER_DIRECTIVE": "user root;" if os.geteuid() == 0 else "",
        "PREFIX": str(prefix),
        "HOST": host,
        "PORT": str(port),
        "CHAT_BODY": _nginx_quote(chat_completion_body()),
    }
    text = TEMPLATE.read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def prepare(prefix: Path, port: int, host: str = "127.0.0.1") -> list[str]:
    """Write the config and SSE file under ``prefix``; return the foreground nginx command line."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    (prefix / "html").mkdir(exist_ok=True)
    (prefix / "html" / "stream.sse").write_bytes(sse_body())
    conf = prefix / "nginx.conf"
    conf.write_text(render_config(prefix, port, host))
    return [nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
