"""A `type: pool` backend spreads requests by weight within its most preferred priority."""

from __future__ import annotations

from collections import Counter

import httpx

from proxy import config as config_module
from tests.inprocess import run_app
from tests.mockproc import MockProc


def test_weighted_round_robin_within_the_best_priority(mock: MockProc) -> None:
    config = config_module.loads(f"""
backends:
  - {{id: a, url: {mock.url}, credentials: {{header: x-member, value: a}}}}
  - {{id: b, url: {mock.url}, credentials: {{header: x-member, value: b}}}}
  - {{id: spare, url: {mock.url}, credentials: {{header: x-member, value: spare}}}}
  - id: pool
    type: pool
    services: [{{id: a, priority: 1, weight: 3}}, {{id: b, priority: 1, weight: 1}}, {{id: spare, priority: 2}}]
apis:
  - {{id: chat, path: /openai, backend: pool, subscription-required: false}}
""")

    async def scenario(client: httpx.AsyncClient, app: object) -> None:
        for _ in range(40):
            assert (await client.get("/openai/models")).status_code == 200

    mock.clear()
    run_app(config, scenario)
    members = Counter(
        dict((k.lower(), v) for k, v in r["headers"])["x-member"] for r in mock.requests()
    )
    assert members == {"a": 30, "b": 10}
