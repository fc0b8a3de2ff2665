"""The admin API (proxy/admin.py) and runtime subscriptions end to end: real `tollway serve`
processes (tests/gatewayproc.py) in front of the real mock backend, the official OpenAI SDK as
the client, real Redis and a real 3-node Redis Cluster (tests/redisproc.py) as the store."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import jsonschema_rs
import msgspec
import openai
import psutil
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)
from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR

from proxy import config as config_module
from proxy.admin import ROUTES
from proxy.config import Subscription, hash_key
from proxy.openapi import describe
from proxy.subscriptions import DIGESTS, RECORDS
from tests.conftest import KEY, gateway_config
from tests.gatewayproc import GatewayProc, start_gateway
from tests.mockproc import MockProc
from tests.redisproc import Cluster, RedisProc

ADMIN_KEY = "admin-key-for-tests-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
MODEL = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "hi"}]
CHAT = {"model": MODEL, "messages": MESSAGES}
LIMITS = """
policies:
  - llm-token-limit:
      counter-key: "{subscription.id}"
      tokens-per-minute: 100000
      token-quota: 1000000
      token-quota-period: daily
      remaining-tokens-header-name: x-remaining-tokens
      remaining-quota-tokens-header-name: x-remaining-quota
      tokens-consumed-header-name: x-tokens-consumed
"""


def admin_config(
    mock_url: str, *, store: str = "memory", all_access: bool = True, limits: bool = False
) -> str:
    """tests/conftest.py's config (three file subscriptions, open, passthrough and dead APIs)
    with the admin API on, a store, and optionally a token limit per subscription."""
    settings = (f"gateway:\n  admin-key: {ADMIN_KEY}\n  store: {store}\n"
                f"  all-access: {str(all_access).lower()}\n")  # fmt: skip
    return gateway_config(mock_url).replace("gateway:\n", settings, 1) + (LIMITS if limits else "")


def admin(gw: GatewayProc, method: str, path: str, **kwargs: Any) -> httpx.Response:
    headers = {**AUTH, **kwargs.pop("headers", {})}
    return httpx.request(method, gw.base + path, headers=headers, timeout=10, **kwargs)


def create(gw: GatewayProc, id: str, scope: str = "all-apis", **fields: str) -> dict[str, Any]:
    response = admin(gw, "POST", "/admin/subscriptions", json={"id": id, "scope": scope, **fields})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def sdk_chat(gw: GatewayProc, key: str) -> int:
    """A chat completion through the OpenAI SDK: 200, or the status it failed with."""
    with openai.OpenAI(base_url=gw.base + "/openai", api_key=key, max_retries=0) as client:
        try:
            reply = client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
        except openai.APIStatusError as exc:
            return exc.status_code
    assert reply.choices[0].message.content
    return 200


def status(gw: GatewayProc, key: str, path: str = "/openai/chat/completions") -> int:
    """One request on a fresh connection (so `--workers N` spreads them)."""
    headers = {"api-key": key}
    if path.endswith("completions"):
        return httpx.post(gw.base + path, json=CHAT, headers=headers, timeout=10).status_code
    return httpx.get(gw.base + path, headers=headers, timeout=10).status_code


def until(condition: Callable[[], bool], limit: float, what: str) -> float:
    """Seconds until `condition()` held; fails past `limit`."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < limit, f"{what}: not within {limit} s"
        time.sleep(0.005)
    return time.monotonic() - start


def routes(id: str = "team-a") -> list[tuple[str, str]]:
    return [(method, path.replace("{id}", id)) for path, methods in ROUTES.items()
            for method in methods]  # fmt: skip


@pytest.fixture(scope="module")
def gw(mock: MockProc) -> Iterator[GatewayProc]:
    """A gateway with the admin API, the memory store and a token limit per subscription."""
    proc = start_gateway(admin_config(mock.url, limits=True))
    yield proc
    proc.stop()


# --- the admin key ----------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), routes())
def test_every_endpoint_needs_the_admin_key(gw: GatewayProc, method: str, path: str) -> None:
    for headers, code in (
        ({}, "AdminKeyNotFound"),
        ({"Authorization": "Bearer wrong-admin-key-0123456789"}, "AdminKeyInvalid"),
        ({"Authorization": f"Basic {ADMIN_KEY}"}, "AdminKeyNotFound"),
        ({"api-key": ADMIN_KEY}, "AdminKeyNotFound"),  # only as a bearer token
        ({"Authorization": f"Bearer {KEY}"}, "AdminKeyInvalid"),  # a subscription key
    ):
        response = httpx.request(method, gw.base + path, headers=headers, json={"id": "x"})
        assert response.status_code == 401, (headers, response.text)
        assert response.json()["error"] == {"message": response.json()["error"]["message"],
                                             "type": "authentication_error", "code": code}  # fmt: skip
        assert response.headers["cache-control"] == "no-store"
    # nothing was done: team-a is neither suspended nor re-keyed
    assert status(gw, KEY) == 200


@pytest.mark.parametrize(("method", "path"), routes())
def test_without_an_admin_key_there_is_no_admin_api(
    gateway: GatewayProc, method: str, path: str
) -> None:
    response = httpx.request(method, gateway.base + path, headers=AUTH)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "OperationNotFound"


# --- subscriptions ----------------------------------------------------------------------------


def test_a_subscription_made_suspended_resumed_and_rekeyed_through_the_sdk(
    gw: GatewayProc,
) -> None:
    made = create(gw, "sdk-life", "product:starter", **{"display-name": "SDK life"})
    primary, secondary = made["primary-key"], made["secondary-key"]
    assert made["source"] == "store" and made["state"] == "active" and len(primary) >= 43
    assert sdk_chat(gw, primary) == 200 and sdk_chat(gw, secondary) == 200
    assert status(gw, primary, "/passthrough/models") == 401  # out of its product's scope

    assert admin(gw, "POST", "/admin/subscriptions/sdk-life/suspend").json()["state"] == "suspended"
    assert sdk_chat(gw, primary) == 401 and sdk_chat(gw, secondary) == 401
    assert admin(gw, "POST", "/admin/subscriptions/sdk-life/resume").json()["state"] == "active"
    assert sdk_chat(gw, primary) == 200

    regenerated = admin(gw, "POST", "/admin/subscriptions/sdk-life/regenerate-primary-key")
    assert regenerated.status_code == 200
    new = regenerated.json()["primary-key"]
    assert "secondary-key" not in regenerated.json() and new != primary
    assert sdk_chat(gw, primary) == 401 and sdk_chat(gw, new) == 200
    assert sdk_chat(gw, secondary) == 200  # untouched
    newer = admin(gw, "POST", "/admin/subscriptions/sdk-life/regenerate-secondary-key").json()
    assert sdk_chat(gw, secondary) == 401 and sdk_chat(gw, newer["secondary-key"]) == 200

    shown = admin(gw, "GET", "/admin/subscriptions/sdk-life").json()
    assert shown == {"id": "sdk-life", "display-name": "SDK life", "scope": "product:starter",
                     "state": "active", "source": "store"}  # fmt: skip
    listed = admin(gw, "GET", "/admin/subscriptions").json()["data"]
    sources = {s["id"]: s["source"] for s in listed}
    assert (sources["team-a"], sources["master"], sources["sdk-life"]) == (
        "config", "built-in", "store")  # fmt: skip
    for text in (json.dumps(listed), json.dumps(shown)):
        assert primary not in text and "sha256" not in text  # no keys, no digests
    assert admin(gw, "POST", "/admin/subscriptions/sdk-life/list-secrets").status_code == 409

    assert admin(gw, "DELETE", "/admin/subscriptions/sdk-life").status_code == 204
    assert sdk_chat(gw, new) == 401
    assert admin(gw, "GET", "/admin/subscriptions/sdk-life").status_code == 404
    # Keys are never logged, nor the admin key.
    log = gw.log()
    for secret in (primary, secondary, new, newer["secondary-key"], ADMIN_KEY, KEY):
        assert secret not in log


def test_a_file_subscription_can_be_suspended_and_reverts_when_the_override_goes(
    gw: GatewayProc,
) -> None:
    suspended = admin(gw, "POST", "/admin/subscriptions/team-b/suspend").json()
    assert suspended["overrides-config"] is True and suspended["source"] == "store"
    assert sdk_chat(gw, "team-b-key-0123456789abcdef") == 401
    assert admin(gw, "DELETE", "/admin/subscriptions/team-b").status_code == 204
    assert sdk_chat(gw, "team-b-key-0123456789abcdef") == 200
    assert admin(gw, "GET", "/admin/subscriptions/team-b").json()["source"] == "config"
    refused = admin(gw, "DELETE", "/admin/subscriptions/team-b")  # the file's own
    assert refused.status_code == 409 and "config file" in refused.json()["error"]["message"]


def test_the_all_access_keys_open_every_api(gw: GatewayProc) -> None:
    secrets = admin(gw, "POST", "/admin/subscriptions/master/list-secrets").json()
    primary, secondary = secrets["primary-key"], secrets["secondary-key"]
    for key in (primary, secondary):
        assert sdk_chat(gw, key) == 200
        assert status(gw, key, "/passthrough/models") == 200
        assert status(gw, key, "/open/chat/completions") == 200
        assert status(gw, key, "/dead/chat/completions") == 502  # let in; its backend is dead
    entry = gw.access_log()[-2]  # the open API's: the key identified its subscription
    assert entry["path"] == "/open/chat/completions" and entry["subscription"] == "master"
    shown = admin(gw, "GET", "/admin/subscriptions/master").json()
    assert shown == {"id": "master", "display-name": "Built-in all-access subscription",
                     "scope": "all-apis", "state": "active", "source": "built-in"}  # fmt: skip
    refused = admin(gw, "DELETE", "/admin/subscriptions/master")
    assert refused.status_code == 409
    # Its keys can be regenerated like any other; list-secrets follows.
    new = admin(gw, "POST", "/admin/subscriptions/master/regenerate-secondary-key").json()
    assert admin(gw, "POST", "/admin/subscriptions/master/list-secrets").json() == {
        "primary-key": primary, "secondary-key": new["secondary-key"]
    }  # fmt: skip
    assert sdk_chat(gw, secondary) == 401 and sdk_chat(gw, new["secondary-key"]) == 200


BAD = [
    (b"{", "The request body is not valid JSON"),
    (b"", "The request body is empty"),
    (b"[]", "$: expected object, got array"),
    (b'{"id": "x1", "scope": "all-apis", "tier": "gold"}', "$.tier: unknown field"),
    (b'{"scope": "all-apis"}', "$.id: required field is missing"),
    (b'{"id": "x1"}', "$.scope: required field is missing"),
    (b'{"id": 7, "scope": "all-apis"}', "$.id: expected str, got int"),
    (b'{"id": "x 1", "scope": "all-apis"}', "$.id: 'x 1' is not an id"),
    (b'{"id": "x1", "scope": "team"}', "$.scope: 'team' is not all-apis, api:<id> or product:<id>"),
    (b'{"id": "x1", "scope": "api:chatt"}', "$.scope: unknown API 'chatt' (did you mean 'chat'?)"),
    (b'{"id": "x1", "scope": "product:gold"}', "$.scope: unknown product 'gold'"),
    (b'{"id": "x1", "scope": "all-apis", "state": "paused"}', "$.state: invalid enum value 'paused' (expected one of: active, suspended)"),
    (b'{"id": "x1", "scope": "all-apis", "primary-key": "short"}', "$.primary-key: a literal key must be at least 16 characters"),
    (b'{"id": "x1", "scope": "all-apis", "secondary-key": "sha256:00"}', "$.secondary-key: a hashed key must be sha256:"),
    (b'{"id": "x1", "scope": "all-apis", "primary-key": "same-key-0123456789", "secondary-key": "same-key-0123456789"}', "$.secondary-key: the same key as primary-key"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "message"), BAD)
def test_a_bad_body_is_400_naming_the_field(gw: GatewayProc, body: bytes, message: str) -> None:
    response = admin(gw, "POST", "/admin/subscriptions", content=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "InvalidRequest" and error["type"] == "invalid_request_error"
    assert message in error["message"], error["message"]
    assert admin(gw, "GET", "/admin/subscriptions/x1").status_code == 404  # nothing made


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"id": "team-a", "scope": "all-apis"}, "id: a subscription 'team-a' already exists"),
        ({"id": "master", "scope": "all-apis"}, "id: 'master' is the built-in all-access subscription's"),
        ({"id": "x2", "scope": "all-apis", "primary-key": KEY}, "primary-key: the key is already in use"),
        ({"id": "x2", "scope": "all-apis", "secondary-key": ADMIN_KEY}, "secondary-key: the key is already in use"),
    ],
)  # fmt: skip
def test_a_taken_id_or_key_is_409(gw: GatewayProc, body: dict[str, str], message: str) -> None:
    response = admin(gw, "POST", "/admin/subscriptions", json=body)
    assert response.status_code == 409
    assert response.json()["error"] == {"message": message, "type": "invalid_request_error",
                                        "code": "Conflict"}  # fmt: skip


def test_unknown_paths_ids_and_methods(gw: GatewayProc) -> None:
    for path in ("/admin", "/admin/", "/admin/keys", "/admin/subscriptions/", "/admin/apis/x",
                 "/admin/subscriptions/team-a/explode"):  # fmt: skip
        response = admin(gw, "GET", path)
        assert (response.status_code, response.json()["error"]["code"]) == (
            404,
            "OperationNotFound",
        )
    for method, path in (("POST", "/admin/subscriptions/nobody/suspend"),
                         ("GET", "/admin/subscriptions/no%2Fbody")):  # fmt: skip
        response = admin(gw, method, path)
        assert (response.status_code, response.json()["error"]["code"]) == (404, "NotFound")
    response = admin(gw, "PUT", "/admin/subscriptions/team-a")
    assert response.status_code == 405 and response.headers["allow"] == "GET, DELETE"


def test_apis_and_products_are_listed_without_backend_secrets(gw: GatewayProc) -> None:
    from tests.conftest import BACKEND_SECRET

    apis = admin(gw, "GET", "/admin/apis")
    assert apis.status_code == 200
    by_id = {api["id"]: api for api in apis.json()["data"]}
    assert set(by_id) == {"chat", "raw", "open", "dead"}
    chat = by_id["chat"]
    assert (
        chat["path"] == "/openai" and chat["products"] == ["starter"] and chat["backend"] == "mock"
    )
    assert {(op["method"], op["path"]) for op in chat["operations"]} == {
        ("POST", "/openai/chat/completions"), ("POST", "/openai/completions"),
        ("POST", "/openai/embeddings"), ("POST", "/openai/responses"), ("GET", "/openai/models"),
    }  # fmt: skip
    assert len(by_id["raw"]["operations"]) == 7 and by_id["open"]["subscription-required"] is False
    assert BACKEND_SECRET not in apis.text and "127.0.0.1" not in apis.text
    products = admin(gw, "GET", "/admin/products").json()["data"]
    assert products == [{"id": "starter", "display-name": "Starter", "description": "",
                         "subscription-required": True, "apis": ["chat"], "policies": []}]  # fmt: skip


def test_usage_is_what_the_limit_headers_said(gw: GatewayProc) -> None:
    key = create(gw, "metered")["primary-key"]
    with openai.OpenAI(base_url=gw.base + "/openai", api_key=key, max_retries=0) as client:
        for stream in (False, True, False):
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL,
                messages=MESSAGES,
                stream=stream,  # type: ignore[arg-type]
            )
            headers = raw.headers
            if stream:
                list(raw.parse())  # read it to the end: the usage is settled then
    usage = admin(gw, "GET", "/admin/usage", params={"counter-key": "metered"})
    assert usage.status_code == 200
    [limit] = usage.json()["limits"]
    assert usage.json()["counter-key"] == "metered"
    assert limit["where"] == "policies[0]" and limit["counter-key"] == "{subscription.id}"
    assert limit["remaining-tokens"] == int(headers["x-remaining-tokens"])
    assert limit["remaining-quota-tokens"] == int(headers["x-remaining-quota"])
    used = 3 * 20  # the mock: 4 prompt + 16 completion tokens each
    assert limit["tokens-in-window"] == used and limit["tokens-in-period"] == used
    assert (limit["tokens-per-minute"], limit["token-quota"], limit["token-quota-period"]) == (
        100000, 1000000, "daily")  # fmt: skip
    fresh = admin(gw, "GET", "/admin/usage", params={"counter-key": "nobody"}).json()
    assert fresh["limits"][0]["remaining-tokens"] == 100000
    missing = admin(gw, "GET", "/admin/usage")
    assert missing.status_code == 400 and "counter-key" in missing.json()["error"]["message"]
    unknown = admin(gw, "GET", "/admin/usage", params={"counter-key": "a", "key": "b"})
    assert unknown.status_code == 400 and "key: unknown query parameter" in unknown.text


# --- several processes -----------------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.parametrize("kind", ["redis", "cluster"])
def test_two_gateways_on_one_store_share_subscriptions_at_once(
    kind: str, mock: MockProc, request: pytest.FixtureRequest
) -> None:
    """Made on A, it works on B on the very next request; suspended or re-keyed on A, B refuses
    the key within milliseconds (pub/sub); only digests reach the store."""
    store: RedisProc | Cluster = request.getfixturevalue("server" if kind == "redis" else "cluster")
    text = admin_config(mock.url, store=store.url)
    a, b = start_gateway(text), start_gateway(text)
    try:
        for n in range(3):  # made on A: at once on B (a digest lookup, or pub/sub if sooner)
            key = create(a, f"{kind}-shared-{n}")["primary-key"]
            assert status(b, key) == 200
        assert sdk_chat(b, key) == 200
        # Written behind both gateways' backs (no announcement): found by its key's digest.
        quiet = "quiet-key-0123456789abcdef"
        record = Subscription(id=f"{kind}-quiet", primary_key=hash_key(quiet))
        node = store.node_for(RECORDS) if isinstance(store, Cluster) else store
        with node.client() as client:
            client.hset(RECORDS, record.id, msgspec.json.encode(record))
            client.hset(DIGESTS, hashlib.sha256(quiet.encode()).hexdigest(), record.id)
        assert status(b, quiet) == 200 and status(a, quiet) == 200
        admin(a, "POST", f"/admin/subscriptions/{kind}-shared-2/suspend")
        took = until(lambda: status(b, key) == 401, 1.0, "suspension on B")
        assert took < 0.5
        admin(a, "POST", f"/admin/subscriptions/{kind}-shared-2/resume")
        until(lambda: status(b, key) == 200, 1.0, "resumption on B")
        new = admin(a, "POST", f"/admin/subscriptions/{kind}-shared-2/regenerate-primary-key")
        assert status(b, new.json()["primary-key"]) == 200
        until(lambda: status(b, key) == 401, 1.0, "the old key refused on B")
        # A file subscription suspended on B is refused on A; the built-in one is shared.
        admin(b, "POST", "/admin/subscriptions/team-a/suspend")
        until(lambda: status(a, KEY) == 401, 1.0, "team-a suspended on A")
        admin(b, "DELETE", "/admin/subscriptions/team-a")
        until(lambda: status(a, KEY) == 200, 1.0, "team-a back on A")
        master = admin(a, "POST", "/admin/subscriptions/master/list-secrets").json()
        assert admin(b, "POST", "/admin/subscriptions/master/list-secrets").json() == master
        assert sdk_chat(b, master["primary-key"]) == 200
        stored = _dump(store)
        assert key not in stored and new.json()["primary-key"] not in stored
        assert "sha256:" in stored and master["primary-key"] in stored  # kept for the console
    finally:
        a.stop()
        b.stop()


def _dump(store: RedisProc | Cluster) -> str:
    """Every key and value in the store, as text."""
    out = []
    for node in store.nodes if isinstance(store, Cluster) else [store]:
        with node.client() as client:
            for name in client.keys("*"):
                if client.type(name) == b"hash":
                    out.append(repr(client.hgetall(name)))
    return "\n".join(out)


@pytest.mark.redis
def test_all_access_false_refuses_the_built_in_keys(mock: MockProc, server: RedisProc) -> None:
    on = start_gateway(admin_config(mock.url, store=server.url))
    off = start_gateway(admin_config(mock.url, store=server.url, all_access=False))
    try:
        key = admin(on, "POST", "/admin/subscriptions/master/list-secrets").json()["primary-key"]
        assert status(on, key) == 200
        assert status(off, key) == 401
        assert "master" not in {
            s["id"] for s in admin(off, "GET", "/admin/subscriptions").json()["data"]
        }
        for method, suffix in (("GET", ""), ("POST", "/list-secrets"), ("POST", "/suspend")):
            response = admin(off, method, "/admin/subscriptions/master" + suffix)
            assert response.status_code == 404, response.text
    finally:
        on.stop()
        off.stop()


def _workers(gw: GatewayProc, mock: MockProc) -> set[int]:
    """The worker processes holding a connection to the mock (so: that served a request)."""
    out = set()
    for child in psutil.Process(gw.proc.pid).children(recursive=True):
        try:
            conns = child.net_connections(kind="tcp")
        except psutil.Error:
            continue
        if any(c.raddr and c.raddr.port == mock.port for c in conns):
            out.add(child.pid)
    return out


def test_workers_of_one_server_share_memory_subscriptions(mock: MockProc) -> None:
    """`--workers 2` with the memory store: made through one worker, every request with the
    key succeeds, whichever worker takes it; a suspension reaches both."""
    gw = start_gateway(admin_config(mock.url), workers=2)
    try:
        key = create(gw, "two-workers")["primary-key"]
        codes = [status(gw, key) for _ in range(40)]
        assert codes == [200] * 40
        assert len(_workers(gw, mock)) == 2  # both served some
        admin(gw, "POST", "/admin/subscriptions/two-workers/suspend")
        time.sleep(0.6)  # the file is looked at every 0.25 s
        assert [status(gw, key) for _ in range(20)] == [401] * 20
    finally:
        gw.stop()


def test_admin_reload_reloads_every_worker(mock: MockProc) -> None:
    text = admin_config(mock.url)
    gw = start_gateway(text, workers=2)
    try:
        extra = "  - id: extra\n    path: /extra\n    type: openai\n    backend: mock\n"
        gw.config.write_text(text.replace("apis:\n", "apis:\n" + extra, 1))
        before = {p.pid for p in psutil.Process(gw.proc.pid).children(recursive=True)}
        response = admin(gw, "POST", "/admin/reload")
        assert response.status_code == 200 and response.json() == {"reloaded": True}

        # The worker that answered reloaded; the other on the SIGHUP the server forwarded.
        until(lambda: gw.log().count("config reloaded from") == 2, 5.0, "both workers")
        assert [status(gw, KEY, "/extra/models") for _ in range(30)] == [200] * 30
        assert len(_workers(gw, mock)) == 2  # both served the new API
        assert {p.pid for p in psutil.Process(gw.proc.pid).children(recursive=True)} == before
        time.sleep(0.5)  # and only once each: the one that answered skipped the echo
        assert gw.log().count("config reloaded from") == 2
        gw.config.write_text(text.replace("type: openai", "type: soap", 1))
        refused = admin(gw, "POST", "/admin/reload")
        assert refused.status_code == 400
        assert "apis[0].type" in refused.json()["error"]["message"]
        assert status(gw, KEY, "/extra/models") == 200  # the old config stays
    finally:
        gw.stop()


def test_runtime_subscriptions_survive_sighup(mock: MockProc) -> None:
    text = admin_config(mock.url)
    gw = start_gateway(text)
    try:
        key = create(gw, "survivor")["primary-key"]
        admin(gw, "POST", "/admin/subscriptions/team-a/suspend")
        gw.reload(text.replace("  - id: dead\n    path: /dead", "  - id: gone\n    path: /gone"))
        until(lambda: status(gw, key, "/gone/models") == 502, 10.0, "the reload")
        assert sdk_chat(gw, key) == 200
        assert sdk_chat(gw, KEY) == 401  # the stored override still overrides the file
        assert admin(gw, "GET", "/admin/subscriptions/team-a").json()["state"] == "suspended"
    finally:
        gw.stop()


@pytest.mark.redis
def test_a_store_outage_keeps_what_is_known_and_recovers(
    mock: MockProc, own_server: RedisProc
) -> None:
    gw = start_gateway(admin_config(mock.url, store=own_server.url))
    try:
        key = create(gw, "before-outage")["primary-key"]
        for outage, back in ((own_server.pause, own_server.resume),
                             (own_server.kill, own_server.start)):  # fmt: skip
            outage()
            assert status(gw, key) == 200 and status(gw, KEY) == 200
            made = admin(
                gw, "POST", "/admin/subscriptions", json={"id": "during", "scope": "all-apis"}
            )
            assert made.status_code == 503 and made.json()["error"]["code"] == "StoreUnavailable"
            assert (
                admin(gw, "POST", "/admin/subscriptions/before-outage/suspend").status_code == 503
            )
            t = time.monotonic()
            assert status(gw, "unknown-key-0123456789abcdef") == 401
            assert time.monotonic() - t < 1.0
            assert status(gw, key) == 200  # still known
            back()
            # Writes work again without a restart (the next write finds the store back).
            body = {"id": f"after-{outage.__name__}", "scope": "all-apis"}

            def written(body: dict[str, str] = body) -> bool:
                return admin(gw, "POST", "/admin/subscriptions", json=body).status_code == 201

            until(written, 10.0, "a write after the outage")
        assert "subscription store unavailable" in gw.log()
        assert "subscription store is back" in gw.log()
    finally:
        gw.stop()


# --- the document ------------------------------------------------------------------------------


def test_openapi_documents_every_admin_endpoint(gw: GatewayProc, gateway: GatewayProc) -> None:
    document = httpx.get(gw.base + "/openapi.json").json()
    OPENAPI_31_VALIDATOR.validate(document)
    for name, schema in document["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), name
    for path, methods in ROUTES.items():
        for method, operation in methods.items():
            op = document["paths"][path][method.lower()]
            assert op["operationId"] == f"admin.{operation}" and op["tags"] == ["admin"]
            assert op["security"] == [{"admin-key": []}]
            assert {"401"} < set(op["responses"])
    assert document["components"]["securitySchemes"]["admin-key"]["scheme"] == "bearer"
    assert "/console" in document["paths"]
    assert ADMIN_KEY not in json.dumps(document)
    plain = httpx.get(gateway.base + "/openapi.json").json()  # no admin key set there
    assert not any(p.startswith("/admin") for p in plain["paths"])
    assert "admin-key" not in plain["components"]["securitySchemes"]
    console_off = config_module.loads(
        gateway_config("http://127.0.0.1:9/v1").replace(
            "gateway:\n", "gateway:\n  console: false\n"
        )
    )
    assert "/console" not in describe(console_off)["paths"]


@pytest.fixture(scope="module")
def fuzzed(mock: MockProc) -> Iterator[GatewayProc]:
    """A gateway of its own for the fuzzing below (it makes and changes subscriptions)."""
    proc = start_gateway(admin_config(mock.url, limits=True))
    yield proc
    proc.stop()


DOCUMENT = describe(config_module.loads(admin_config("http://127.0.0.1:9/v1", limits=True)))
SETTINGS = {
    "generation": {"max-examples": 8, "deterministic": bool(os.environ.get("CI")),
                   "database": "none"},
    "auth": {"openapi": {"admin-key": {"bearer": ADMIN_KEY}}},
}  # fmt: skip
SCHEMA = schemathesis.openapi.from_dict(DOCUMENT, config=schemathesis.Config.from_dict(SETTINGS))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance, ignored_auth,
          unsupported_method]  # fmt: skip


@SCHEMA.include(path_regex="^/admin/").parametrize()
def test_the_admin_api_conforms_to_its_document(
    case: schemathesis.Case, fuzzed: GatewayProc
) -> None:
    case.call_and_validate(base_url=fuzzed.base, checks=CHECKS, timeout=10)


def test_admin_reload_neither_respawns_workers_nor_reloads_twice(mock: MockProc) -> None:
    """The SIGHUP sent to `tollway serve` comes back to the worker that sent it: skipped, the
    file being unchanged; and Granian reloads in place, no worker is respawned."""
    gw = start_gateway(admin_config(mock.url))
    try:
        before = {p.pid for p in psutil.Process(gw.proc.pid).children(recursive=True)}
        assert admin(gw, "POST", "/admin/reload").status_code == 200
        time.sleep(1.0)
        assert gw.log().count("config reloaded from") == 1
        after = {p.pid for p in psutil.Process(gw.proc.pid).children(recursive=True)}
        assert after == before
        os.kill(gw.proc.pid, signal.SIGHUP)  # an operator's SIGHUP still reloads
        until(lambda: gw.log().count("config reloaded from") == 2, 5.0, "the operator's reload")
    finally:
        gw.stop()
