"""End to end (issue 5): a real `tollway serve` exports its spans and metrics over OTLP/HTTP
to a real receiver process (tests/otlpreceiver.py, parsing with opentelemetry-proto), for a
streamed and a non-streamed chat sent with the official openai SDK; /metrics is read with
prometheus_client's parser."""

from __future__ import annotations

import base64
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.gatewayproc import GatewayProc, start_gateway
from tests.mockproc import ROOT, MockProc, free_port, start_mock

KEY = "otel-e2e-key-0123456789abcdef"
BACKEND_SECRET = "Bearer otel-backend-secret-0123456789"
TOKENS = 12
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


class Receiver:
    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.otlpreceiver", "--port", str(self.port)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 15
        while True:
            try:
                httpx.get(self.url + "/received", timeout=1)
                return
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def received(self, path: str) -> list[dict[str, Any]]:
        entries = httpx.get(self.url + "/received", timeout=5).json()
        return [e for e in entries if e["path"] == path]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[Receiver, MockProc, GatewayProc]]:
    receiver = Receiver()
    mock = start_mock(tokens=TOKENS, itl_ms=3)
    config = f"""
telemetry: {{service-name: tollway-e2e, otlp-endpoint: "{receiver.url}"}}
backends:
  - {{id: mock, url: "{mock.url}", credentials: {{header: Authorization, value: "{BACKEND_SECRET}"}}}}
apis:
  - id: chat
    path: /openai
    backend: mock
    policies:
      - llm-emit-token-metric: {{namespace: e2e, dimensions: [{{name: Subscription ID}}]}}
subscriptions:
  - {{id: team-a, scope: all-apis, primary-key: {KEY}}}
"""
    env = {
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_METRIC_EXPORT_INTERVAL": "300",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test",
        "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=team%20a",
    }
    gateway = start_gateway(config, env=env)
    try:
        yield receiver, mock, gateway
    finally:
        gateway.stop()
        mock.stop()
        receiver.stop()


def wait_for(probe: Any, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError("nothing arrived in time")
        time.sleep(0.1)


def values(attributes: list[dict[str, Any]]) -> dict[str, Any]:
    """OTLP JSON KeyValues -> plain values (int64s arrive as strings)."""
    out: dict[str, Any] = {}
    for kv in attributes:
        value = kv["value"]
        if "arrayValue" in value:
            out[kv["key"]] = [next(iter(v.values())) for v in value["arrayValue"]["values"]]
        else:
            kind, raw = next(iter(value.items()))
            out[kv["key"]] = int(raw) if kind == "intValue" else raw
    return out


def spans(receiver: Receiver) -> list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """(resource attributes, span, span attributes) of every span received."""
    out = []
    for entry in receiver.received("/v1/traces"):
        for rs in entry["body"]["resourceSpans"]:
            resource = values(rs["resource"]["attributes"])
            for ss in rs["scopeSpans"]:
                out += [(resource, s, values(s.get("attributes", []))) for s in ss["spans"]]
    return out


def hex_id(value: str) -> str:
    return base64.b64decode(value).hex()


def test_streamed_and_whole_chat_arrive_as_spans_with_genai_attributes(
    stack: tuple[Receiver, MockProc, GatewayProc],
) -> None:
    receiver, mock, gateway = stack
    client = openai.OpenAI(base_url=gateway.base + "/openai", api_key=KEY, max_retries=0)
    parent = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
    whole = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}], max_tokens=40,
        extra_headers=parent,
    )  # fmt: skip
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "stream please"}],
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    streamed_usage = chunks[-1].usage
    assert whole.usage is not None and streamed_usage is not None

    found = wait_for(lambda: len(spans(receiver)) >= 2 and spans(receiver))
    by_stream = {a["gen_ai.request.stream"]: (r, s, a) for r, s, a in found}
    resource, span, a = by_stream[False]
    assert resource["service.name"] == "tollway-e2e"
    assert resource["deployment.environment"] == "test"
    assert resource["service.instance.id"]
    assert span["name"] == "chat gpt-4o-mini"
    assert span["kind"] == "SPAN_KIND_CLIENT"
    assert hex_id(span["traceId"]) == CLIENT_TRACE
    assert hex_id(span["parentSpanId"]) == CLIENT_SPAN
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "gpt-4o-mini"
    assert a["gen_ai.response.model"] == whole.model
    assert a["gen_ai.request.max_tokens"] == 40
    assert a["gen_ai.response.finish_reasons"] == [whole.choices[0].finish_reason]
    assert a["gen_ai.usage.input_tokens"] == whole.usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == whole.usage.completion_tokens == TOKENS
    assert a["server.address"] == "127.0.0.1" and a["server.port"] == mock.port
    assert "error.type" not in a
    # the backend saw the gateway's span as its parent, in the client's trace
    seen = [r for r in mock.requests() if "hello" in r["body"]][-1]
    sent = dict((k.lower(), v) for k, v in seen["headers"])["traceparent"]
    assert sent == f"00-{CLIENT_TRACE}-{hex_id(span['spanId'])}-01"

    _, span, a = by_stream[True]
    assert "parentSpanId" not in span or not span["parentSpanId"]  # a new trace
    assert a["gen_ai.usage.output_tokens"] == streamed_usage.completion_tokens == TOKENS
    assert a["gen_ai.usage.input_tokens"] == streamed_usage.prompt_tokens
    assert a["gen_ai.response.finish_reasons"] == ["stop"]
    duration = (int(span["endTimeUnixNano"]) - int(span["startTimeUnixNano"])) / 1e9
    assert 0 < a["gen_ai.response.time_to_first_chunk"] < duration

    (logged,) = [line for line in gateway.access_log() if line["trace_id"] == CLIENT_TRACE]
    assert logged["prompt_tokens"] == whole.usage.prompt_tokens
    assert KEY not in gateway.log()

    entry = receiver.received("/v1/traces")[0]
    assert entry["content_type"] == "application/x-protobuf"
    assert entry["headers"]["x-tenant"] == "team a"


def metric_points(receiver: Receiver, name: str) -> list[dict[str, Any]]:
    """The data points of `name` in the latest metrics export that has it."""
    for entry in reversed(receiver.received("/v1/metrics")):
        for rm in entry["body"]["resourceMetrics"]:
            for sm in rm["scopeMetrics"]:
                for metric in sm["metrics"]:
                    if metric["name"] == name:
                        kind = next(k for k in ("histogram", "sum", "gauge") if k in metric)
                        return list(metric[kind]["dataPoints"])
    return []


def test_metrics_agree_with_the_backends_usage(
    stack: tuple[Receiver, MockProc, GatewayProc],
) -> None:
    receiver, _, gateway = stack
    client = openai.OpenAI(base_url=gateway.base + "/openai", api_key=KEY, max_retries=0)
    prompt = completion = 0
    for stream in (False, True, False):
        if stream:
            chunks = list(client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "count me"}],
                stream=True, stream_options={"include_usage": True},
            ))  # fmt: skip
            usage = chunks[-1].usage
        else:
            usage = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "count me"}]
            ).usage
        assert usage is not None
        prompt += usage.prompt_tokens
        completion += usage.completion_tokens
    text = httpx.get(gateway.base + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    totals = {s.labels["gen_ai_token_type"]: s.value for s in families["tollway_tokens"].samples
              if s.name == "tollway_tokens_total"}  # fmt: skip
    expected_prompt = totals["input"]  # everything this gateway has counted so far

    def exported_matches() -> bool:
        points = metric_points(receiver, "gen_ai.client.token.usage")
        sums = {values(p["attributes"])["gen_ai.token.type"]: p.get("sum", 0) for p in points}
        return sums.get("input") == expected_prompt and sums.get("output") == totals["output"]

    wait_for(exported_matches)
    assert totals["input"] >= prompt and totals["output"] >= completion
    (policy,) = metric_points(receiver, "e2e.Prompt_Tokens")
    assert values(policy["attributes"]) == {"Subscription ID": "team-a"}
    assert int(policy["asInt"]) == expected_prompt
    duration = metric_points(receiver, "gen_ai.client.operation.duration")
    assert sum(int(p["count"]) for p in duration) >= 3
    assert metric_points(receiver, "gen_ai.client.operation.time_to_first_chunk")


def test_no_key_or_backend_secret_leaves_in_telemetry(
    stack: tuple[Receiver, MockProc, GatewayProc],
) -> None:
    receiver, _, gateway = stack
    client = openai.OpenAI(base_url=gateway.base + "/openai", api_key=KEY, max_retries=0)
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):  # a wrong key is not exported either
        openai.OpenAI(base_url=gateway.base + "/openai", api_key=KEY[::-1], max_retries=0
                      ).chat.completions.create(model="m", messages=[])  # fmt: skip
    wait_for(lambda: receiver.received("/v1/metrics") and len(spans(receiver)) >= 1)
    exported = httpx.get(receiver.url + "/received", timeout=5).text
    scraped = httpx.get(gateway.base + "/metrics").text
    for text in (exported, scraped, gateway.log()):
        for secret in (KEY, KEY[::-1], BACKEND_SECRET, BACKEND_SECRET.split()[1]):
            assert secret not in text
