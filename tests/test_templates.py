"""Policy templates render each placeholder from the request (proxy/policies/templates.py)."""

from __future__ import annotations

import pytest

from proxy.config import parse_template
from proxy.exchange import Exchange
from proxy.policies.templates import render


def exchange() -> Exchange:
    ex = Exchange("POST", "/openai/chat/completions", "req-1", "10.0.0.7")
    ex.subscription_id, ex.product_id, ex.api_id = "team-a", "starter", "chat"
    ex.operation, ex.backend_id, ex.model = "chat-completions", "openai", "gpt-4o"
    return ex


SCOPE = {"headers": [(b"x-team", b"blue"), (b"content-type", b"application/json")]}


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{subscription.id}", "team-a"),
        ("{subscription.name}", "Team A"),
        ("{product.id}", "starter"),
        ("{api.id}", "chat"),
        ("{operation.id}", "chat-completions"),
        ("{backend.id}", "openai"),
        ("{request.ip}", "10.0.0.7"),
        ("{request.model}", "gpt-4o"),
        ("{request.header.X-Team}", "blue"),
        ("{request.header.X-Missing}", ""),
        ("org", "org"),
        ("team-{subscription.id}/{request.model}", "team-team-a/gpt-4o"),
    ],
)
def test_each_placeholder(template: str, expected: str) -> None:
    assert render(parse_template(template), exchange(), SCOPE, "Team A") == expected
