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


# The variables that are fields of the request's `Exchange`, by attribute name.
EXCHANGE_FIELDS = {
    "subscription.id": "subscription_id",
    "product.id": "product_id",
    "api.id": "api_id",
    "operation.id": "operation",
    "backend.id": "backend_id",
    "request.ip": "client_ip",
    "request.model": "model",
}


def exchange_field(template: Template) -> str | None:
    """The `Exchange` attribute a template that is one such variable renders as, else None:
    a caller on a hot path reads it with one `getattr`."""
    if len(template) == 1 and isinstance(template[0], TemplateVar):
        return EXCHANGE_FIELDS.get(template[0].name)
    return None


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
    field = EXCHANGE_FIELDS.get(name)
    if field is not None:
        return getattr(exchange, field)  # type: ignore[no-any-return]
    if name == "subscription.name":
        return subscription_name
    value = header(scope, var.header.encode("latin-1"))  # request.header.<Name>
    return value.decode("latin-1") if value is not None else ""
