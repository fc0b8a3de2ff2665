"""SSE relay semantics through a real Granian gateway: event by event, usage injection and
stripping, client disconnects cancelling the backend, and failures mid-stream."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import httpx
import pytest

from tests.conftest import KEY
from tests.gatewayproc import GatewayProc
from tests.mockproc import MockProc

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}
AUTH = {"api-key": KEY}


def _data_events(text: str) -> list[str]:
    return [line[6:] for line in text.split("\n") if line.startswith("data: ")]


def _record(mock: MockProc, request_id: str) -> dict[str, Any]:
    for record in reversed(mock.requests()):
        headers = {k.lower(): v for k, v in record["headers"]}
        if headers.get("x-request-id") == request_id:
            return record
    raise AssertionError(f"the backend never saw request {request_id}")


def test_events_are_relayed_as_they_arrive(
    paced_gateway: GatewayProc, paced_mock: MockProc
) -> None:
    rid = "relay-live-1"
    with httpx.stream("POST", paced_gateway.base + "/openai/chat/completions", json=CHAT,
                      headers={**AUTH, "x-request-id": rid}, timeout=10) as response:  # fmt: skip
        assert response.headers["content-type"] == "text/event-stream"
        assert "content-encoding" not in response.headers
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        # The backend is still generating when the first event reaches the client: not buffered.
        in_flight = _record(paced_mock, rid)
        assert in_flight["finished"] is None
        assert in_flight["events_sent"] < 32
        rest = [line for line in lines if line.startswith("data: ")]
    assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
    assert rest[-1] == "data: [DONE]"


@pytest.mark.parametrize("asked", [False, True])
def test_usage_chunk_is_injected_and_stripped(
    gateway: GatewayProc, mock: MockProc, asked: bool
) -> None:
    body = {**CHAT, "stream_options": {"include_usage": True}} if asked else CHAT
    rid = f"usage-{asked}"
    response = httpx.post(gateway.base + "/openai/chat/completions", json=body,
                          headers={**AUTH, "x-request-id": rid}, timeout=10)  # fmt: skip
    events = _data_events(response.text)
    usage_chunks = [e for e in events if e != "[DONE]" and json.loads(e).get("usage")]
    assert len(usage_chunks) == (1 if asked else 0)
    assert json.loads(_record(mock, rid)["body"])["stream_options"] == {"include_usage": True}
    log = next(line for line in gateway.access_log() if line["request_id"] == rid)
    assert log["completion_tokens"] == 16  # billed from the usage chunk either way
    assert 0 < log["ttft_ms"] <= log["duration_ms"]
    assert log["overhead_ms"] < log["duration_ms"]
    assert (log["subscription"], log["api"], log["operation"], log["model"]) == (
        "team-a", "chat", "chat-completions", CHAT["model"],
    )  # fmt: skip
    assert log["trace_id"] is None  # no spans are exported by this config


def test_client_disconnect_mid_stream_cancels_backend_within_100ms(
    paced_gateway: GatewayProc, paced_mock: MockProc
) -> None:
    rid = "leave-stream-1"
    with httpx.stream("POST", paced_gateway.base + "/openai/chat/completions", json=CHAT,
                      headers={**AUTH, "x-request-id": rid}, timeout=10) as response:  # fmt: skip
        lines = response.iter_lines()
        for _ in range(3):
            next(line for line in lines if line.startswith("data: "))
        response.close()
        left = time.monotonic()
    record = _wait_for(paced_mock, rid, "disconnected")
    assert record["finished"] is None
    assert record["disconnected"] - left < 0.100
    log = _wait_log(paced_gateway, rid)
    assert log["status"] == 200 and log["error"] == "ClientDisconnected"


def test_client_disconnect_while_waiting_cancels_non_streaming_request(
    gateway: GatewayProc, mock: MockProc
) -> None:
    rid = "leave-wait-1"
    body = {**CHAT, "stream": False}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gateway.base + "/openai/chat/completions", json=body, timeout=0.3,
                   headers={**AUTH, "x-request-id": rid, "x-mock-delay-ms": "3000"})  # fmt: skip
    left = time.monotonic()
    record = _wait_for(mock, rid, "disconnected")
    assert record["finished"] is None
    assert record["disconnected"] - left < 0.100
    assert _wait_log(gateway, rid)["status"] == 499


def test_backend_failure_mid_stream_ends_with_one_error_event(gateway: GatewayProc) -> None:
    response = httpx.post(gateway.base + "/openai/chat/completions", json=CHAT,
                          headers={**AUTH, "x-mock-close-after": "3"}, timeout=10)  # fmt: skip
    events = _data_events(response.text)
    assert response.status_code == 200
    assert len(events) == 4
    error = json.loads(events[-1])["error"]
    assert error["code"] == "BackendConnectionFailure"
    assert "127.0.0.1" not in response.text.split("data: ")[-1]


def test_garbage_frames_are_dropped_and_the_stream_completes(gateway: GatewayProc) -> None:
    response = httpx.post(gateway.base + "/openai/chat/completions", json=CHAT,
                          headers={**AUTH, "x-mock-garbage": "1"}, timeout=10)  # fmt: skip
    events = _data_events(response.text)
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]  # every frame that reached the client is JSON
    assert "".join(p["choices"][0]["delta"].get("content", "") for p in parsed if p["choices"])


def test_backend_timeout_mid_stream_is_an_error_event(gateway: GatewayProc) -> None:
    # The test config's read timeout is 3 s; a backend silent for longer breaks the stream.
    response = httpx.post(gateway.base + "/openai/chat/completions", json=CHAT,
                          headers={**AUTH, "x-mock-delay-ms": "4000"}, timeout=10)  # fmt: skip
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "BackendTimeout"


def test_raw_socket_close_mid_stream_keeps_gateway_serving(paced_gateway: GatewayProc) -> None:
    body = json.dumps(CHAT).encode()
    request = (b"POST /openai/chat/completions HTTP/1.1\r\nhost: x\r\napi-key: " + KEY.encode()
               + b"\r\ncontent-type: application/json\r\ncontent-length: "
               + str(len(body)).encode() + b"\r\n\r\n" + body)  # fmt: skip
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", paced_gateway.port)) as sock:
            sock.sendall(request)
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    assert httpx.get(paced_gateway.base + "/healthz").status_code == 200


def _wait_for(mock: MockProc, rid: str, field: str, timeout: float = 3.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = _record(mock, rid)
        if record[field] is not None:
            return record
        time.sleep(0.02)
    raise AssertionError(f"{field} never set for {rid}: {record}")


def _wait_log(gateway: GatewayProc, rid: str, timeout: float = 3.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in gateway.access_log():
            if line["request_id"] == rid:
                return line
        time.sleep(0.02)
    raise AssertionError(f"no access log line for {rid}")


def test_a_client_leaving_right_after_the_usage_chunk_is_billed_by_it(tmp_path: Any) -> None:
    """The backend sends the usage chunk and [DONE] but keeps its body open; the client
    reads [DONE] and leaves while the gateway still waits for the body's end. The usage the
    stream told is what the request is logged (and charged) with, not lost to the cancel."""
    import threading

    from tests.gatewayproc import start_gateway

    usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    events = [
        {"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o-mini",
         "choices": [{"index": 0, "delta": {"content": "hey"}, "finish_reason": "stop"}]},
        {"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o-mini",
         "choices": [], "usage": usage},
    ]  # fmt: skip
    sse = b"".join(b"data: %s\n\n" % json.dumps(e).encode() for e in events) + b"data: [DONE]\n\n"
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def backend() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         b"transfer-encoding: chunked\r\n\r\n"
                         + b"%x\r\n%s\r\n" % (len(sse), sse))  # fmt: skip
            done.wait(10)  # the body never ends while the client is there

    threading.Thread(target=backend, daemon=True).start()
    port = listener.getsockname()[1]
    gateway = start_gateway(f"""
backends:
  - {{id: lingering, url: "http://127.0.0.1:{port}/v1"}}
apis:
  - {{id: chat, path: /openai, type: openai, backend: lingering, subscription-required: false}}
""")  # fmt: skip
    try:
        body = json.dumps({**CHAT, "stream_options": {"include_usage": True}}).encode()
        rid = "left-after-usage-0001"
        with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
            sock.sendall(b"POST /openai/chat/completions HTTP/1.1\r\nhost: x\r\n"
                         b"content-type: application/json\r\nx-request-id: " + rid.encode()
                         + b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n"
                         + body)  # fmt: skip
            seen = b""
            while b"[DONE]" not in seen:
                chunk = sock.recv(65536)
                assert chunk, seen
                seen += chunk
        line = _wait_log(gateway, rid)
        assert line["error"] == "ClientDisconnected"
        assert (line["prompt_tokens"], line["completion_tokens"]) == (7, 3)
    finally:
        done.set()
        gateway.stop()
        listener.close()
