"""Render the `{placeholder}` templates of policies (counter keys, dimensions, vary-by).

A template is parsed once at start-up (`proxy.config.parse_template`); rendering joins looked-up
values, nothing is evaluated. Values come from the request's `Exchange` (filled in as the
request is identified and routed), the caller's subscription and the request headers.
"""

from __future__ import annotations

from proxy.asgi import header
from proxy.config import TemplateVar
from proxy.exchange import Exchange
from proxy.types import Scope

Template = tuple[str | TemplateVar, ...]


def render(template: Template, exchange: Exchange, scope: Scope, subscription_name: str) -> str:
    """The template's text for this request; a value the request does not have is ""."""
    if len(template) == 1 and isinstance(template[0], TemplateVar):
        return _value(template[0], exchange, scope, subscription_name)
    return "".join(
        part if isinstance(part, str) else _value(part, exchange, scope, subscription_name)
        for part in template
    )


def _value(var: TemplateVar, exchange: Exchange, scope: Scope, subscription_name: str) -> str:
    name = var.name
    if name == "subscription.id":
        return exchange.subscription_id
    if name == "subscription.name":
        return subscription_name
    if name == "product.id":
        return exchange.product_id
    if name == "api.id":
        return exchange.api_id
    if name == "operation.id":
        return exchange.operation
    if name == "backend.id":
        return exchange.backend_id
    if name == "request.ip":
        return exchange.client_ip
    if name == "request.model":
        return exchange.model
    value = header(scope, var.header.encode("latin-1"))  # request.header.<Name>
    return value.decode("latin-1") if value is not None else ""
