"""config/grafana-dashboard.json: the Grafana dashboard for the gateway's Prometheus metrics.

No Grafana or Prometheus here, so the checks are the ones that catch a dashboard that imports
but shows nothing: a metric or label the gateway does not expose (or a raw histogram name), a
histogram quantile without `le`, a counter plotted without rate(), a variable that filters the
wrong label or no panel, a legend naming a label the query aggregated away, overlapping panels.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.telemetry import genai

DASHBOARD = Path(__file__).resolve().parent.parent / "config" / "grafana-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}

# Prometheus names as the gateway's /metrics exposes them, with each series' labels.
_GENAI = {
    "gen_ai_operation_name",
    "gen_ai_provider_name",
    "gen_ai_request_model",
    "gen_ai_response_model",
    "server_address",
    "server_port",
}
HISTOGRAMS: dict[str, set[str]] = {
    "gen_ai_client_token_usage": _GENAI | {"gen_ai_token_type"},
    "gen_ai_client_operation_duration_seconds": _GENAI | {"error_type"},
    "gen_ai_client_operation_time_to_first_chunk_seconds": _GENAI | {"error_type"},
    "gen_ai_client_operation_time_per_output_chunk_seconds": _GENAI | {"error_type"},
    "tollway_gateway_overhead_seconds": {"tollway_api_id", "tollway_operation_id"},
}
COUNTERS: dict[str, set[str]] = {
    "tollway_requests_total": {
        "tollway_api_id",
        "tollway_operation_id",
        "http_response_status_code",
        "error_type",
    },
    "tollway_tokens_total": {
        "tollway_subscription_id",
        "gen_ai_request_model",
        "tollway_api_id",
        "gen_ai_token_type",
    },
    "tollway_limits_store_failed_admissions_total": set(),
    "tollway_telemetry_spans_dropped_total": set(),
    "tollway_telemetry_metric_folded_total": {"metric"},
}
GAUGES: dict[str, set[str]] = {"tollway_limits_store_unavailable": set()}
SCRAPE_LABELS = {"job", "instance"}  # added by Prometheus

# Every series name a query may select, with its labels.
KNOWN: dict[str, set[str]] = {**COUNTERS, **GAUGES}
for _name, _labels in HISTOGRAMS.items():
    KNOWN[f"{_name}_bucket"] = _labels | {"le"}
    KNOWN[f"{_name}_sum"] = _labels
    KNOWN[f"{_name}_count"] = _labels

# The template variables: the label each one lists, and so filters.
VARIABLES = {
    "api": "tollway_api_id",
    "model": "gen_ai_request_model",
    "subscription": "tollway_subscription_id",
}
ROWS = ["Traffic", "Tokens", "Latency", "Health"]

STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{([^}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*")')
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
RANGE = re.compile(r"\[[^\]]*\]")
METRIC = re.compile(r"\b(?:gen_ai|tollway)_[a-zA-Z0-9_]*")
VARIABLE_USE = re.compile(r"\$\{?([a-zA-Z_][a-zA-Z0-9_]*)")
LEGEND_LABEL = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")
RATE_BEFORE = re.compile(r"\b(?:rate|irate|increase)\(\s*$")


class Query:
    """What the checks need from one PromQL expression, by regex (the dashboard's queries
    are plain selectors, aggregations and functions; no subqueries or label_replace)."""

    def __init__(self, expr: str):
        self.expr = expr
        # (metric or "", label, operator, quoted value) for every matcher inside {...}
        self.matchers = [
            (metric or "", *m.groups())
            for metric, body in SELECTOR.findall(expr)
            for m in MATCHER.finditer(body)
        ]
        self.grouping = {
            label.strip()
            for labels in GROUPING.findall(expr)
            for label in labels.split(",")
            if label.strip()
        }
        bare = GROUPING.sub(" ", RANGE.sub(" ", SELECTOR.sub(r"\1", STRING.sub('""', expr))))
        self.bare = bare
        self.metrics = METRIC.findall(bare)

    def labels_of_metrics(self) -> set[str]:
        return set().union(SCRAPE_LABELS, *(KNOWN.get(m, set()) for m in self.metrics))


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row keeps its panels inside


def data_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in all_panels(dashboard) if p["type"] != "row"]


def targets(dashboard: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for panel in data_panels(dashboard):
        for target in panel.get("targets", []):
            yield panel, target


def queries(dashboard: dict[str, Any]) -> list[tuple[str, Query]]:
    return [(f"{p['title']!r} {t['refId']}", Query(t["expr"])) for p, t in targets(dashboard)]


def test_dashboard_model(dashboard: dict[str, Any]) -> None:
    assert dashboard["title"] == "Tollway"
    assert dashboard["uid"] == "tollway-gateway"
    assert dashboard["refresh"] == "30s"
    assert dashboard["time"] == {"from": "now-1h", "to": "now"}
    assert dashboard["schemaVersion"] >= 36  # panels' datasource as {type, uid}
    assert dashboard.get("id") is None  # an import must not overwrite another dashboard
    (ds_input,) = dashboard["__inputs"]
    assert ds_input["name"] == "DS_PROMETHEUS"
    assert ds_input["type"] == "datasource"
    assert ds_input["pluginId"] == "prometheus"
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ROWS


def test_panels_ids_datasource_and_queries(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
    for panel in data_panels(dashboard):
        title = panel["title"]
        assert panel["datasource"] == DATASOURCE, title
        assert panel.get("targets"), f"{title!r} has no query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), f"{title!r}: duplicate refIds {refs}"
        for target in panel["targets"]:
            assert isinstance(target.get("expr"), str), title
            assert target["expr"].strip(), title
            assert target.get("datasource", DATASOURCE) == DATASOURCE, title
            code = STRING.sub('""', target["expr"])
            assert code.count("(") == code.count(")"), target["expr"]
            assert code.count("{") == code.count("}"), target["expr"]


def test_every_metric_is_one_the_gateway_exposes(dashboard: dict[str, Any]) -> None:
    used = set()
    for where, query in queries(dashboard):
        assert query.metrics, f"{where}: no gen_ai_*/tollway_* metric in {query.expr}"
        for name in query.metrics:
            # A histogram's own name is no Prometheus series: only _bucket, _sum and _count are.
            assert name in KNOWN, f"{where}: unknown series {name}"
        used.update(query.metrics)
    for variable in dashboard["templating"]["list"]:
        used.update(METRIC.findall(variable["definition"]))
    strip = re.compile(r"_(?:bucket|sum|count)$")
    missing = {*COUNTERS, *GAUGES, *HISTOGRAMS} - {strip.sub("", n) for n in used}
    assert not missing, f"metrics on no panel: {sorted(missing)}"


def test_every_label_is_one_the_series_has(dashboard: dict[str, Any]) -> None:
    for where, query in queries(dashboard):
        for metric, label, _op, _value in query.matchers:
            assert metric in KNOWN, f"{where}: matcher on {metric or 'a nameless selector'}"
            assert label in KNOWN[metric] | SCRAPE_LABELS, f"{where}: {metric} has no {label}"
        unknown = query.grouping - query.labels_of_metrics()
        assert not unknown, f"{where}: grouping by {sorted(unknown)}, not labels of {query.metrics}"


def test_legends_name_labels_the_query_keeps(dashboard: dict[str, Any]) -> None:
    for panel, target in targets(dashboard):
        if target.get("format") == "table":
            continue  # the labels are columns; the legend is unused
        named = set(LEGEND_LABEL.findall(target.get("legendFormat", "")))
        kept = Query(target["expr"]).grouping - {"le"}
        assert named <= kept, f"{panel['title']!r}: legend {sorted(named)}, query keeps {kept}"


def test_histograms_and_counters_are_used_as_such(dashboard: dict[str, Any]) -> None:
    for where, query in queries(dashboard):
        for m in METRIC.finditer(query.bare):
            name = m.group()
            cumulative = name in COUNTERS or name.endswith(("_bucket", "_sum", "_count"))
            before = query.bare[: m.start()]
            if cumulative:
                assert RATE_BEFORE.search(before), f"{where}: {name} outside rate()/increase()"
            elif name in GAUGES:
                assert not RATE_BEFORE.search(before), f"{where}: rate() of gauge {name}"
        if "histogram_quantile" in query.expr:
            assert "le" in query.grouping, f"{where}: histogram_quantile without `by (le)`"
            assert all(n.endswith("_bucket") for n in query.metrics), where


def test_template_variables(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) == set(VARIABLES)
    uses: dict[str, int] = dict.fromkeys(VARIABLES, 0)
    for name, label in VARIABLES.items():
        v = variables[name]
        assert v["type"] == "query"
        assert v["datasource"] == DATASOURCE
        assert v["multi"] and v["includeAll"], name
        m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", v["definition"])
        assert m, v["definition"]
        metric, listed = m.groups()
        assert metric in KNOWN and listed == label and label in KNOWN[metric], v["definition"]
        assert v["query"]["query"] == v["definition"]
    for where, query in queries(dashboard):
        for name in VARIABLE_USE.findall(query.expr):
            assert name in variables or name.startswith("__"), f"{where}: undefined ${name}"
        for _metric, label, op, value in query.matchers:
            for name in VARIABLE_USE.findall(value):
                # Multi-select and All interpolate as a regex alternation: only =~ matches it.
                assert op == "=~", f"{where}: {label}{op}{value} needs =~"
                assert label == VARIABLES[name], f"{where}: ${name} filters {label}"
                uses[name] += 1
    unused = [name for name, n in uses.items() if not n]
    assert not unused, f"variables no panel uses: {unused}"


def test_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    boxes = []
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["y"] >= 0, panel["title"]
        assert g["x"] + g["w"] <= 24, f"{panel['title']!r} is wider than the grid"
        boxes.append((panel["title"], g["x"], g["y"], g["x"] + g["w"], g["y"] + g["h"]))
    for i, (a, ax0, ay0, ax1, ay1) in enumerate(boxes):
        for b, bx0, by0, bx1, by1 in boxes[i + 1 :]:
            assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, f"{a!r} overlaps {b!r}"
    # Each panel sits below the row it belongs to (the last row before it in the list).
    row_y = -1
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            assert panel["gridPos"]["y"] > row_y, panel["title"]
            row_y = panel["gridPos"]["y"]
        else:
            assert panel["gridPos"]["y"] > row_y, f"{panel['title']!r} above its row"


def test_names_follow_the_gateways_instruments() -> None:
    """The Prometheus names are the OpenTelemetry names with `.` -> `_` and a unit or
    `_total` suffix: a renamed instrument or attribute in proxy/telemetry/genai.py must
    show up here (and in the dashboard)."""
    instruments = {
        genai.TOKEN_USAGE,
        genai.OPERATION_DURATION,
        genai.TIME_TO_FIRST_CHUNK,
        genai.TIME_PER_OUTPUT_CHUNK,
        genai.OVERHEAD,
        genai.REQUESTS,
        genai.TOKENS,
        genai.STORE_UNAVAILABLE,
        genai.STORE_FAILED_ADMISSIONS,
        genai.SPANS_DROPPED,
        genai.METRIC_FOLDED,
    }
    suffix = re.compile(r"_(?:seconds|total)$")
    assert {suffix.sub("", n) for n in [*HISTOGRAMS, *COUNTERS, *GAUGES]} == {
        n.replace(".", "_") for n in instruments
    }
    attributes = {
        getattr(genai, name).replace(".", "_")
        for name in (
            "OPERATION_NAME",
            "PROVIDER_NAME",
            "REQUEST_MODEL",
            "RESPONSE_MODEL",
            "TOKEN_TYPE",
            "SERVER_ADDRESS",
            "SERVER_PORT",
            "ERROR_TYPE",
            "API_ID",
            "OPERATION_ID",
            "SUBSCRIPTION_ID",
            "STATUS_CODE",
        )
    }
    labels = set().union(*HISTOGRAMS.values(), *COUNTERS.values(), *GAUGES.values())
    assert labels - attributes == {"metric"}  # the folded counter's: which instrument
