"""Passthrough APIs: every verb, subpath and query forwarded, bodies streamed both ways."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import BACKEND_SECRET, KEY
from tests.gatewayproc import GatewayProc
from tests.mockproc import MockProc


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"])
def test_every_verb_reaches_the_backend(gateway: GatewayProc, mock: MockProc, method: str) -> None:
    mock.clear()
    response = httpx.request(method, gateway.base + "/passthrough/some/sub/path?a=1&b=two%20words",
                             headers={"api-key": KEY}, content=b"payload" if method in ("POST", "PUT", "PATCH") else None)  # fmt: skip
    (seen,) = mock.requests()
    assert seen["method"] == method
    assert seen["path"] == "/v1/some/sub/path"
    assert seen["query"] == "a=1&b=two%20words"
    if method in ("POST", "PUT", "PATCH"):
        assert seen["body"] == "payload"
    assert response.status_code == 404  # the mock's own answer for an unknown path, unchanged
    if method != "HEAD":
        assert response.json()["error"]["type"] == "invalid_request_error"


def test_openai_operation_through_passthrough_is_byte_identical(
    gateway: GatewayProc, mock: MockProc
) -> None:
    body = (
        b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "extra": [1, 2]}'
    )
    through = httpx.post(
        gateway.base + "/passthrough/chat/completions", content=body, headers={"api-key": KEY}
    )
    direct = httpx.post(mock.url + "/chat/completions", content=body)
    assert through.status_code == 200
    assert json.loads(through.content)["choices"] == json.loads(direct.content)["choices"]
    assert mock.requests()[-2]["body"] == body.decode()  # forwarded untouched


def test_streaming_request_body_and_streaming_response(
    gateway: GatewayProc, mock: MockProc
) -> None:
    def upload() -> Iterator[bytes]:
        yield b'{"model": "gpt-4o-mini", "stream": true, '
        yield b'"messages": [{"role": "user", "content": "streamed upload"}]}'

    mock.clear()
    with httpx.stream("POST", gateway.base + "/passthrough/chat/completions", content=upload(),
                      headers={"api-key": KEY}) as response:  # fmt: skip
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    (seen,) = mock.requests()
    assert json.loads(seen["body"])["messages"][0]["content"] == "streamed upload"
    # passthrough means passthrough: no usage injection
    assert "stream_options" not in seen["body"]


def test_key_from_query_is_removed_other_params_kept(gateway: GatewayProc, mock: MockProc) -> None:
    mock.clear()
    response = httpx.get(
        gateway.base + f"/passthrough/models?api-version=2024-10-21&subscription-key={KEY}&x=1"
    )
    assert response.status_code == 200
    (seen,) = mock.requests()
    assert seen["query"] == "api-version=2024-10-21&x=1"


def test_client_credentials_are_not_forwarded(gateway: GatewayProc, mock: MockProc) -> None:
    mock.clear()
    httpx.get(gateway.base + "/passthrough/models",
              headers={"Ocp-Apim-Subscription-Key": KEY, "api-key": "other", "x-keep": "yes"})  # fmt: skip
    (seen,) = mock.requests()
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert KEY not in json.dumps(seen)
    assert "ocp-apim-subscription-key" not in headers
    assert headers["authorization"] == BACKEND_SECRET
    assert headers["x-keep"] == "yes"


def test_hop_by_hop_headers_are_stripped(gateway: GatewayProc, mock: MockProc) -> None:
    mock.clear()
    httpx.get(gateway.base + "/passthrough/models",
              headers={"api-key": KEY, "connection": "keep-alive, x-secret", "te": "trailers",
                       "proxy-authorization": "Basic eA==", "upgrade": "h2c"})  # fmt: skip
    (seen,) = mock.requests()
    names = {k.lower() for k, _ in seen["headers"]}
    assert not names & {"te", "proxy-authorization", "upgrade"}


def test_backend_credentials_never_reach_the_client(gateway: GatewayProc) -> None:
    response = httpx.get(gateway.base + "/passthrough/models", headers={"api-key": KEY})
    assert BACKEND_SECRET not in response.text
    assert BACKEND_SECRET not in str(response.headers)


def test_access_log_holds_no_secrets(gateway: GatewayProc) -> None:
    httpx.get(gateway.base + f"/passthrough/models?subscription-key={KEY}")
    httpx.get(gateway.base + "/openai/models", headers={"Authorization": f"Bearer {KEY}"})
    httpx.get(gateway.base + "/openai/models", headers={"api-key": "wrong-but-secret-0123456789"})
    log = gateway.log()
    assert gateway.access_log(), "no access log lines"
    for secret in (KEY, BACKEND_SECRET, "wrong-but-secret-0123456789", "backend-secret"):
        assert secret not in log
    lines = gateway.access_log()
    assert {"request_id", "status", "duration_ms", "overhead_ms", "subscription"} <= set(lines[-1])
