"""Telemetry (issue 5): metric aggregation, the Prometheus exposition, W3C trace context and
sampling, and what one request records — spans read from an in-memory sink, metrics from the
registry — through the real app in front of a real mock backend process."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy import config as config_module
from proxy.app import Gateway
from proxy.telemetry import genai
from proxy.telemetry.metrics import OVERFLOW, Counter, Gauge, Histogram, Registry
from proxy.telemetry.otlp import SpanRecord
from proxy.telemetry.prometheus import render
from proxy.telemetry.recorder import Telemetry, error_type
from proxy.telemetry.tracecontext import (
    Parent,
    Sampler,
    parse_traceparent,
    traceparent,
)
from tests.gatewayproc import GatewayProc, start_gateway
from tests.inprocess import run_app
from tests.mockproc import MockProc, start_mock

KEY = "telemetry-key-0123456789abcdef"
TOKENS = 8  # completion tokens per mock reply
CLIENT_TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
CLIENT_SPAN = 0x00F067AA0BA902B7


# -- aggregation ------------------------------------------------------------------------------


def test_histogram_buckets_are_upper_inclusive() -> None:
    h = Histogram("h", "s", "", ("a",), (1.0, 2.0))
    for value in (0.5, 1.0, 1.5, 2.0, 7.0):
        h.record(value, ("x",))
    point = h.series[("x",)]
    assert point.counts == [2, 2, 1]
    assert (point.count, point.sum, point.min, point.max) == (5, 12.0, 0.5, 7.0)


def test_counter_sums_per_attribute_set() -> None:
    c = Counter("c", "1", "", ("a", "b"))
    c.add(2, ("x", "y"))
    c.add(3, ("x", "y"))
    c.add(1, ("x", "z"))
    assert c.series == {("x", "y"): 5, ("x", "z"): 1}


def test_cardinality_cap_folds_new_sets_and_counts_them() -> None:
    registry = Registry()
    c = registry.counter("c", "1", "", ("ip",))
    c.limit = 3
    for i in range(10):
        c.add(1, (f"10.0.0.{i}",))
    c.add(1, ("10.0.0.1",))  # a set admitted before the cap still counts as itself
    assert len(c.series) == 4
    assert c.series[OVERFLOW] == 7
    assert c.series[("10.0.0.1",)] == 2
    assert registry.folded() == {"c": 7}


def test_registry_returns_the_same_instrument_and_refuses_a_conflict() -> None:
    registry = Registry()
    a = registry.counter("c", "1", "", ("x",))
    assert registry.counter("c", "1", "", ("x",)) is a
    with pytest.raises(ValueError, match="already defined"):
        registry.counter("c", "1", "", ("y",))


# -- Prometheus ---------------------------------------------------------------------------


def families(text: bytes) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text.decode())}


def test_prometheus_exposition_parses_with_names_labels_and_cumulative_buckets() -> None:
    registry = Registry()
    h = registry.histogram("gen_ai.client.operation.duration", "s", "d", ("gen_ai.request.model",),
                           (0.1, 1.0))  # fmt: skip
    for value in (0.05, 0.5, 0.5, 3.0):
        h.record(value, ('model "x"\n',))
    c = registry.counter("tollway.requests", "{request}", "r", ("Subscription ID", "empty"))
    c.add(3, ("team-a", ""))
    c.limit = 1
    c.add(1, ("team-b", ""))
    gauge = Gauge("tollway.limits.store.unavailable", "", "g", (((), 1),))
    found = families(render(registry, [gauge]))

    duration = found["gen_ai_client_operation_duration_seconds"]
    assert duration.type == "histogram"
    samples = {(s.name, s.labels.get("le")): s for s in duration.samples}
    assert samples[("gen_ai_client_operation_duration_seconds_bucket", "0.1")].value == 1
    assert samples[("gen_ai_client_operation_duration_seconds_bucket", "1.0")].value == 3
    assert samples[("gen_ai_client_operation_duration_seconds_bucket", "+Inf")].value == 4
    assert samples[("gen_ai_client_operation_duration_seconds_count", None)].value == 4
    assert samples[("gen_ai_client_operation_duration_seconds_sum", None)].value == 4.05
    label = samples[("gen_ai_client_operation_duration_seconds_count", None)].labels
    assert label == {"gen_ai_request_model": 'model "x"\n'}  # escaped and read back

    requests = found["tollway_requests"]
    assert requests.type == "counter"
    values = {tuple(sorted(s.labels.items())): s.value for s in requests.samples
              if s.name == "tollway_requests_total"}  # fmt: skip
    # an empty value is left out; the folded set is the overflow series
    assert values == {(("Subscription_ID", "team-a"),): 3, (("otel_metric_overflow", "true"),): 1}
    assert found["tollway_limits_store_unavailable"].samples[0].value == 1


# -- trace context ---------------------------------------------------------------------------

VALID = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (VALID, Parent(CLIENT_TRACE, CLIENT_SPAN, 1)),
        (VALID[:-2] + b"00", Parent(CLIENT_TRACE, CLIENT_SPAN, 0)),
        (b"01" + VALID[2:] + b"-future-fields", Parent(CLIENT_TRACE, CLIENT_SPAN, 1)),
        (VALID + b"-extra", None),  # version 00 has exactly four fields
        (b"ff" + VALID[2:], None),
        (VALID.upper(), None),  # lowercase hex only
        (b"00-" + b"0" * 32 + VALID[35:], None),
        (VALID[:36] + b"0" * 16 + VALID[52:], None),
        (VALID[:-1], None),
        (b"", None),
        (b"00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01", None),
    ],
)
def test_parse_traceparent(header: bytes, expected: Parent | None) -> None:
    assert parse_traceparent(header) == expected


def test_traceparent_round_trips() -> None:
    assert traceparent(CLIENT_TRACE, CLIENT_SPAN, 1) == VALID
    assert parse_traceparent(traceparent(1, 2, 0)) == Parent(1, 2, 0)


def test_samplers() -> None:
    on, off = Sampler("parentbased_always_on"), Sampler("parentbased_always_off")
    unsampled, sampled = Parent(1, 1, 0), Parent(1, 1, 1)
    assert on.sampled(5, None) and not on.sampled(5, unsampled)
    assert not off.sampled(5, None) and off.sampled(5, sampled)
    assert Sampler("always_on").sampled(5, unsampled)
    half = Sampler("traceidratio", "0.5")
    rng = random.Random(7)
    ids = [rng.getrandbits(128) for _ in range(4000)]
    share = sum(half.sampled(i, None) for i in ids) / len(ids)
    assert 0.45 < share < 0.55
    assert Sampler.from_env({}).name == "parentbased_always_on"
    with pytest.raises(ValueError, match="unsupported"):
        Sampler("jaeger_remote")
    with pytest.raises(ValueError, match="within"):
        Sampler("traceidratio", "2")


def test_error_type() -> None:
    assert error_type(200, "") == ""
    assert error_type(502, "") == "502"
    assert error_type(429, "TokenLimitExceeded") == "TokenLimitExceeded"


# -- one request, end to end in-process ----------------------------------------------------


@pytest.fixture(scope="module")
def mock() -> Iterator[MockProc]:
    proc = start_mock(tokens=TOKENS, itl_ms=2)
    yield proc
    proc.stop()


class Sink:
    """Where the app's spans go: the records themselves (the telemetry made with
    `encode=` the identity; tests/test_otlp.py checks their encoding)."""

    def __init__(self) -> None:
        self.spans: list[SpanRecord] = []
        self.telemetry: Telemetry | None = None

    def submit(self, item: SpanRecord) -> None:
        self.spans.append(item)


def make_config(mock_url: str, policies: str = "") -> config_module.Config:
    return config_module.loads(f"""
telemetry: {{access-log: "off"}}
backends:
  - {{id: mock, url: "{mock_url}"}}
apis:
  - id: chat
    path: /openai
    backend: mock
    policies: [{policies}]
subscriptions:
  - {{id: team-a, display-name: Team A, scope: all-apis, primary-key: {KEY}}}
""")


def traced(app: Gateway) -> Sink:
    """Swap in a Telemetry whose spans go to a list, keeping the app's registry."""
    sink = Sink()
    assert isinstance(app.telemetry, Telemetry)
    app.telemetry = sink.telemetry = Telemetry(
        Registry(), spans=sink, sampler=Sampler(), encode=lambda record: record
    )
    app.telemetry.use_backends({"mock": app.runtime.config.backends[0].url})
    return sink


def chat(stream: bool = False, **extra: Any) -> dict[str, Any]:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], **extra}
    return {**body, "stream": True} if stream else body


def series(app: Gateway, name: str) -> dict[tuple[object, ...], Any]:
    assert isinstance(app.telemetry, Telemetry)
    app.telemetry.collect()
    instrument = app.telemetry.registry.get(name)
    assert instrument is not None
    return instrument.series


def attrs(span: SpanRecord) -> dict[str, object]:
    return dict(span.constant) | dict(span.attributes)


def test_non_streamed_chat_records_span_and_metrics(mock: MockProc) -> None:
    async def scenario(client: httpx.AsyncClient, app: Gateway) -> None:
        sink = traced(app)
        mock.clear()
        headers = {"api-key": KEY, "traceparent": VALID.decode()}
        r = await client.post("/openai/chat/completions", json=chat(max_tokens=50), headers=headers)
        assert r.status_code == 200
        usage = r.json()["usage"]
        (span,) = sink.spans
        a = attrs(span)
        assert span.name == "chat gpt-4o-mini"
        assert (span.trace_id, span.parent_id) == (CLIENT_TRACE, CLIENT_SPAN)
        assert span.kind == 3 and span.error == "" and span.flags & 1
        assert span.end_ns > span.start_ns
        assert a["gen_ai.operation.name"] == "chat"
        assert a["gen_ai.provider.name"] == "openai"
        assert a["gen_ai.request.model"] == "gpt-4o-mini"
        assert a["gen_ai.response.model"] == r.json()["model"]
        assert a["gen_ai.request.max_tokens"] == 50
        assert a["gen_ai.request.stream"] is False
        assert a["gen_ai.response.finish_reasons"] == (r.json()["choices"][0]["finish_reason"],)
        assert a["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
        assert a["gen_ai.usage.output_tokens"] == usage["completion_tokens"] == TOKENS
        assert a["server.address"] == "127.0.0.1" and a["server.port"] == mock.port
        assert a["tollway.subscription.id"] == "team-a"
        assert "gen_ai.response.time_to_first_chunk" not in a
        # the backend's parent is the gateway's span, in the client's trace
        (seen,) = mock.requests()
        sent = dict((k.lower(), v) for k, v in seen["headers"])["traceparent"]
        assert parse_traceparent(sent.encode()) == Parent(CLIENT_TRACE, span.span_id, 1)

        (key,) = series(app, genai.OPERATION_DURATION)
        assert key == ("chat", "openai", "gpt-4o-mini", r.json()["model"], "127.0.0.1",
                       mock.port, "")  # fmt: skip
        usage_series = series(app, genai.TOKEN_USAGE)
        by_type = {k[4]: p for k, p in usage_series.items()}
        assert by_type["input"].sum == usage["prompt_tokens"]
        assert by_type["output"].sum == TOKENS
        assert not series(app, genai.TIME_TO_FIRST_CHUNK)  # streams only
        assert series(app, genai.REQUESTS) == {("chat", "chat-completions", 200, ""): 1}
        tokens = series(app, genai.TOKENS)
        assert tokens[("team-a", "gpt-4o-mini", "chat", "output")] == TOKENS
        (overhead,) = series(app, genai.OVERHEAD).values()
        assert overhead.count == 1 and 0 < overhead.sum < 1

    run_app(make_config(mock.url), scenario)


def test_streamed_chat_records_first_chunk_and_chunk_gaps(mock: MockProc) -> None:
    async def scenario(client: httpx.AsyncClient, app: Gateway) -> None:
        sink = traced(app)
        headers = {"api-key": KEY}
        r = await client.post("/openai/chat/completions", json=chat(True), headers=headers)
        assert r.status_code == 200 and "data: [DONE]" in r.text
        (span,) = sink.spans
        a = attrs(span)
        assert span.parent_id == 0 and span.trace_id
        assert a["gen_ai.request.stream"] is True
        assert a["gen_ai.usage.output_tokens"] == TOKENS
        assert a["gen_ai.response.finish_reasons"] == ("stop",)
        assert a["gen_ai.response.model"]
        ttfc = a["gen_ai.response.time_to_first_chunk"]
        assert isinstance(ttfc, float) and 0 < ttfc < (span.end_ns - span.start_ns) / 1e9
        (first,) = series(app, genai.TIME_TO_FIRST_CHUNK).values()
        assert first.count == 1 and first.sum == pytest.approx(ttfc)
        (gaps,) = series(app, genai.TIME_PER_OUTPUT_CHUNK).values()
        # the mock paces tokens 2 ms apart: one gap per chunk after the first
        assert gaps.count >= TOKENS - 1
        assert gaps.sum > 0

    run_app(make_config(mock.url), scenario)


def test_token_limit_refusal_is_a_span_event_and_an_error(mock: MockProc) -> None:
    policy = "{llm-token-limit: {counter-key: '{subscription.id}', tokens-per-minute: 5}}"

    async def scenario(client: httpx.AsyncClient, app: Gateway) -> None:
        sink = traced(app)
        r = await client.post("/openai/chat/completions", json=chat(max_tokens=50),
                              headers={"api-key": KEY})  # fmt: skip
        assert r.status_code == 429
        (span,) = sink.spans
        assert span.error == "TokenLimitExceeded"
        assert attrs(span)["error.type"] == "TokenLimitExceeded"
        ((name, _, event_attrs),) = span.events
        assert name == "tollway.token_limit.refused"
        assert dict(event_attrs)["tollway.token_limit.code"] == "TokenLimitExceeded"
        requests = series(app, genai.REQUESTS)
        assert requests == {("chat", "chat-completions", 429, "TokenLimitExceeded"): 1}

    run_app(make_config(mock.url, policy), scenario)


def test_unsampled_parent_gets_no_span_but_the_trace_continues(mock: MockProc) -> None:
    async def scenario(client: httpx.AsyncClient, app: Gateway) -> None:
        sink = traced(app)
        mock.clear()
        unsampled = VALID[:-2].decode() + "00"
        headers = {"api-key": KEY, "traceparent": unsampled}
        r = await client.post("/openai/chat/completions", json=chat(), headers=headers)
        assert r.status_code == 200
        assert sink.spans == []
        (seen,) = mock.requests()
        sent = dict((k.lower(), v) for k, v in seen["headers"])["traceparent"]
        parent = parse_traceparent(sent.encode())
        assert parent is not None and parent.trace_id == CLIENT_TRACE and parent.flags == 0
        assert parent.span_id != CLIENT_SPAN
        assert series(app, genai.OPERATION_DURATION)  # metrics do not depend on sampling

    run_app(make_config(mock.url), scenario)


def test_emit_token_metric_dimensions(mock: MockProc) -> None:
    policy = (
        "{llm-emit-token-metric: {namespace: team, dimensions: [{name: API ID}, "
        "{name: Subscription ID}, {name: Gateway ID}, {name: Model, value: '{request.model}'}, "
        "{name: Client IP, value: '{request.ip}'}]}}"
    )

    async def scenario(client: httpx.AsyncClient, app: Gateway) -> None:
        for _ in range(2):
            r = await client.post("/openai/chat/completions", json=chat(), headers={"api-key": KEY})
            assert r.status_code == 200
        usage = r.json()["usage"]
        prompt = series(app, "team.Prompt_Tokens")
        ((key, value),) = prompt.items()
        assert key[0] == "chat" and key[1] == "team-a" and key[2]  # the host's name
        assert key[3] == "gpt-4o-mini" and key[4] == "127.0.0.1"
        assert value == 2 * usage["prompt_tokens"]
        assert series(app, "team.Completion_Tokens")[key] == 2 * TOKENS
        assert series(app, "team.Total_Tokens")[key] == 2 * usage["total_tokens"]
        assert not series(app, "team.Cached_Tokens")  # the mock reports none
        text = (await client.get("/metrics")).content
        found = families(text)
        (sample,) = [s for s in found["team_Prompt_Tokens"].samples if s.name.endswith("_total")]
        assert sample.labels["Subscription_ID"] == "team-a"
        assert sample.labels["Client_IP"] == "127.0.0.1"
        assert sample.value == 2 * usage["prompt_tokens"]

    run_app(make_config(mock.url, policy), scenario)


def test_metrics_endpoint_serves_the_genai_metrics(mock: MockProc) -> None:
    async def scenario(client: httpx.AsyncClient, app: Gateway) -> None:
        await client.post("/openai/chat/completions", json=chat(), headers={"api-key": KEY})
        r = await client.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        found = families(r.content)
        for name in (
            "gen_ai_client_token_usage",
            "gen_ai_client_operation_duration_seconds",
            "tollway_gateway_overhead_seconds",
            "tollway_requests",
            "tollway_tokens",
        ):
            assert name in found, name  # fmt: skip
        assert KEY not in r.text

    run_app(make_config(mock.url), scenario)


def test_metrics_endpoint_is_off_when_prometheus_is_off(mock: MockProc) -> None:
    config = config_module.loads(f"""
telemetry: {{prometheus: false}}
backends: [{{id: mock, url: "{mock.url}"}}]
apis: [{{id: chat, path: /openai, backend: mock, subscription-required: false}}]
""")

    async def scenario(client: httpx.AsyncClient, app: Gateway) -> None:
        assert (await client.get("/metrics")).status_code == 404
        assert app.telemetry.registry is None  # nothing to record into: NoTelemetry

    run_app(config, scenario)


def test_concurrent_requests_all_recorded(mock: MockProc) -> None:
    async def scenario(client: httpx.AsyncClient, app: Gateway) -> None:
        sink = traced(app)
        headers = {"api-key": KEY}
        replies = await asyncio.gather(*(
            client.post("/openai/chat/completions", json=chat(i % 2 == 0), headers=headers)
            for i in range(20)
        ))  # fmt: skip
        assert all(r.status_code == 200 for r in replies)
        assert len(sink.spans) == 20 and len({s.span_id for s in sink.spans}) == 20
        assert sum(series(app, genai.REQUESTS).values()) == 20
        (first,) = series(app, genai.TIME_TO_FIRST_CHUNK).values()
        assert first.count == 10

    run_app(make_config(mock.url), scenario)


@pytest.fixture
def two_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cap the attribute sets at two, so a third model folds."""
    import proxy.telemetry.recorder as recorder

    monkeypatch.setattr(recorder, "ACCUMULATORS", 2)


async def post_four_models(client: httpx.AsyncClient) -> None:
    for model in ("m-1", "m-2", "m-3", "m-4"):
        r = await client.post("/openai/chat/completions", json=chat(model=model),
                              headers={"api-key": KEY})  # fmt: skip
        assert r.status_code == 200


@pytest.mark.usefixtures("two_sets")
def test_attribute_sets_beyond_the_cap_fold_into_overflow(mock: MockProc) -> None:
    async def scenario(client: httpx.AsyncClient, app: Gateway) -> None:
        await post_four_models(client)
        assert isinstance(app.telemetry, Telemetry)
        assert app.telemetry.folded == 2
        duration = series(app, genai.OPERATION_DURATION)
        assert {k[2] for k in duration if k != OVERFLOW} == {"m-1", "m-2"}
        assert duration[OVERFLOW].count == 2
        assert series(app, genai.REQUESTS)[OVERFLOW] == 2
        found = families((await client.get("/metrics")).content)
        folded = found["tollway_telemetry_metric_folded"].samples[0]
        assert folded.labels == {"metric": genai.REQUESTS} and folded.value == 2

    run_app(make_config(mock.url), scenario)


def test_a_root_the_sampler_drops_starts_no_trace(mock: MockProc) -> None:
    async def scenario(client: httpx.AsyncClient, app: Gateway) -> None:
        sink = Sink()
        assert isinstance(app.telemetry, Telemetry)
        app.telemetry = sink.telemetry = Telemetry(
            Registry(), spans=sink, sampler=Sampler("parentbased_traceidratio", "0"),
            encode=lambda record: record,
        )  # fmt: skip
        mock.clear()
        r = await client.post("/openai/chat/completions", json=chat(), headers={"api-key": KEY})
        assert r.status_code == 200
        assert sink.spans == []
        (seen,) = mock.requests()
        assert "traceparent" not in {k.lower() for k, _ in seen["headers"]}
        # a sampled parent is still followed under the same sampler
        r = await client.post("/openai/chat/completions", json=chat(),
                              headers={"api-key": KEY, "traceparent": VALID.decode()})  # fmt: skip
        assert r.status_code == 200
        (span,) = sink.spans
        assert span.trace_id == CLIENT_TRACE

    run_app(make_config(mock.url), scenario)


def test_without_span_export_a_clients_traceparent_passes_unchanged(mock: MockProc) -> None:
    async def scenario(client: httpx.AsyncClient, app: Gateway) -> None:
        mock.clear()
        headers = {"api-key": KEY, "traceparent": VALID.decode()}
        r = await client.post("/openai/chat/completions", json=chat(), headers=headers)
        assert r.status_code == 200
        (seen,) = mock.requests()
        sent = [v for k, v in seen["headers"] if k.lower() == "traceparent"]
        assert sent == [VALID.decode()]

    run_app(make_config(mock.url), scenario)


@pytest.mark.usefixtures("two_sets")
def test_spans_keep_their_attributes_when_metrics_fold(mock: MockProc) -> None:
    async def scenario(client: httpx.AsyncClient, app: Gateway) -> None:
        sink = traced(app)
        await post_four_models(client)
        assert [s.name for s in sink.spans] == [f"chat m-{i}" for i in range(1, 5)]
        folded = attrs(sink.spans[3])
        assert folded["gen_ai.request.model"] == "m-4"
        assert folded["tollway.subscription.id"] == "team-a"

    run_app(make_config(mock.url), scenario)


# -- /metrics follows a reloaded `telemetry.prometheus` -----------------------------------------


def _served_config(mock_url: str, prometheus: bool) -> str:
    return f"""
telemetry: {{prometheus: {str(prometheus).lower()}, access-log: "off"}}
backends: [{{id: mock, url: "{mock_url}"}}]
apis: [{{id: chat, path: /openai, backend: mock, subscription-required: false}}]
"""


def _reloaded(gw: GatewayProc, text: str, times: int) -> None:
    """SIGHUP with `text` as the config; back once the worker logged its `times`th reload."""
    gw.reload(text)
    deadline = time.monotonic() + 10
    while gw.log().count("config reloaded from") < times:
        assert time.monotonic() < deadline, gw.log()
        time.sleep(0.02)


def test_metrics_endpoint_follows_a_reload(mock: MockProc) -> None:
    gw = start_gateway(_served_config(mock.url, prometheus=True))
    try:
        assert httpx.get(gw.base + "/metrics").status_code == 200
        _reloaded(gw, _served_config(mock.url, prometheus=False), 1)
        off = httpx.get(gw.base + "/metrics")
        assert off.status_code == 404 and off.json()["error"]["code"] == "OperationNotFound"
        _reloaded(gw, _served_config(mock.url, prometheus=True), 2)
        back = httpx.get(gw.base + "/metrics")
        assert back.status_code == 200 and "tollway_requests" in families(back.content)
    finally:
        gw.stop()


def test_metrics_switched_on_without_telemetry_waits_for_a_restart(mock: MockProc) -> None:
    gw = start_gateway(_served_config(mock.url, prometheus=False))
    try:
        _reloaded(gw, _served_config(mock.url, prometheus=True), 1)
        assert httpx.get(gw.base + "/metrics").status_code == 404
        assert gw.log().count("telemetry.prometheus takes effect on restart") == 1
    finally:
        gw.stop()
