"""The floor under any Granian-served gateway: a raw ASGI app that reads the request body and
answers nginx's fixed chat.completion, on Granian with the gateway's own server settings
(`proxy.__main__._granian`: HTTP/1, uvloop, one worker). A body with `"stream":true` gets
bench/paced.py's stream instead (role chunk, 64 deltas 20 ms apart, finish, usage, [DONE]),
one `send` per event. The `floor` scenario puts it beside the gateway so the report can say
which part of the cost is the server's and which is Tollway's.

    python -m bench.floor --port 9200        # what stack.floor_app() runs
"""

from __future__ import annotations

import argparse
import asyncio

from bench.nginx import chat_completion_body
from bench.paced import stream_payloads
from proxy.types import Receive, Scope, Send

_BODY = chat_completion_body()
_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(_BODY))],
}
_REPLY = {"type": "http.response.body", "body": _BODY, "more_body": False}
_SSE_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/event-stream")],
}
_EVENTS = stream_payloads(64)
_ITL = 0.020


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if b'"stream":true' not in body.replace(b" ", b""):
        await send(_START)
        await send(_REPLY)
        return
    await send(_SSE_START)
    await asyncio.sleep(_ITL)  # time to first token
    for event in _EVENTS[:-3]:
        await send({"type": "http.response.body", "body": event, "more_body": True})
        await asyncio.sleep(_ITL)
    await send({"type": "http.response.body", "body": b"".join(_EVENTS[-3:]), "more_body": False})


def factory() -> object:
    return app


def main(argv: list[str] | None = None) -> int:
    from proxy.__main__ import MAX_CONCURRENCY, _granian

    p = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    _granian("bench.floor:factory", "127.0.0.1", args.port, 1, MAX_CONCURRENCY, "1").serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
