"""`llm-emit-token-metric` (SPEC §6): token counters in the policy's namespace, by its
dimensions.

Each policy in a request's pipeline adds the reply's usage to the counters `Prompt Tokens`,
`Completion Tokens` and `Total Tokens` (and `Cached Tokens`, `Reasoning Tokens` when the
backend reports them) named `<namespace>.Prompt_Tokens` and so on — OpenTelemetry instrument
names cannot hold spaces; Prometheus shows `<namespace>_Prompt_Tokens_total`. The attribute
keys are the dimension names as configured. A default dimension named without a value takes
the request's own (`API ID` is the API's id, `Gateway ID` this host's name, ...). Distinct
attribute sets are capped per counter (`proxy.telemetry.metrics`): beyond the cap they fold
into one overflow series and the fold is counted, so a dimension such as the client IP cannot
grow memory without bound.
"""

from __future__ import annotations

from collections.abc import Sequence

from proxy.config import Api, Config, PolicyEntry, TokenMetric, parse_template
from proxy.exchange import Exchange
from proxy.policies.pipeline import ProductPipelines
from proxy.policies.templates import render
from proxy.schemas import Usage
from proxy.telemetry.metrics import Counter, Registry
from proxy.types import Scope

COUNTERS = ("Prompt Tokens", "Completion Tokens", "Total Tokens", "Cached Tokens",
            "Reasoning Tokens")  # fmt: skip
# The default dimensions' values, as templates (Gateway ID is filled in separately).
_DEFAULT_VALUES = {
    "API ID": "{api.id}",
    "Operation ID": "{operation.id}",
    "Product ID": "{product.id}",
    "Subscription ID": "{subscription.id}",
    "Backend ID": "{backend.id}",
}
_GATEWAY_ID = "Gateway ID"


def counter_name(namespace: str, counter: str) -> str:
    return f"{namespace}.{counter.replace(' ', '_')}"


class TokenMetricPolicy:
    """One configured `llm-emit-token-metric`: its counters and dimension templates."""

    __slots__ = ("_counters", "_templates")

    def __init__(self, spec: TokenMetric, registry: Registry, gateway_id: str):
        names = [d.name for d in spec.dimensions]
        self._counters: tuple[Counter, ...] = tuple(
            registry.counter(counter_name(spec.namespace, c), "{token}", c, names) for c in COUNTERS
        )
        templates = []
        for d in spec.dimensions:
            if d.value:
                templates.append(parse_template(d.value))
            elif d.name == _GATEWAY_ID:
                templates.append((gateway_id,))
            else:
                templates.append(parse_template(_DEFAULT_VALUES[d.name]))
        self._templates = tuple(templates)

    def record(self, usage: Usage, exchange: Exchange, scope: Scope, subscription: str) -> None:
        key = tuple(render(t, exchange, scope, subscription) for t in self._templates)
        prompt, completion, total, cached, reasoning = self._counters
        prompt.add(usage.prompt_tokens, key)
        completion.add(usage.completion_tokens, key)
        total.add(usage.total_tokens or usage.prompt_tokens + usage.completion_tokens, key)
        if usage.cached_tokens:
            cached.add(usage.cached_tokens, key)
        if usage.reasoning_tokens:
            reasoning.add(usage.reasoning_tokens, key)


class TokenMetrics(ProductPipelines[TokenMetricPolicy]):
    """An API's token-metric policies per product (global, the product's, the API's)."""

    __slots__ = ()

    def record(
        self, usage: Usage | None, exchange: Exchange, scope: Scope, subscription: str
    ) -> None:
        if usage is None:
            return
        for policy in self.for_product(exchange.product_id):
            policy.record(usage, exchange, scope, subscription)


def token_metrics(
    config: Config, api: Api, registry: Registry | None, gateway_id: str
) -> TokenMetrics | None:
    """The compiled token-metric policies that apply to `api`, or None when none do (or
    telemetry is off: no registry)."""
    if registry is None:
        return None

    def compile_(entries: Sequence[PolicyEntry]) -> list[TokenMetricPolicy]:
        return [
            TokenMetricPolicy(e.policy, registry, gateway_id)
            for e in entries
            if isinstance(e.policy, TokenMetric)
        ]

    global_, api_ = compile_(config.policies), compile_(api.policies)
    products = {p.id: compile_(p.policies) for p in config.products}
    if not (global_ or api_ or any(products.values())):
        return None
    return TokenMetrics(global_, products, api_)
