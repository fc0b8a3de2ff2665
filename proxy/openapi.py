"""The gateway's own OpenAPI 3.1 description, served at `GET /openapi.json` (SPEC §4).

`describe(config)` is pure: it reads the APIs of a `Config` and returns the document as plain
data. Every openai-type API contributes its five operations, with request schemas generated
from the very view Structs the gateway validates bodies with (`proxy.schemas`), so the
document cannot drift from what is checked; every passthrough API contributes one `{path}`
wildcard per verb. `OpenAPIEndpoint` serves it, encoded once per config.

What the document never holds: subscriptions or their keys, the admin key, backends (ids,
URLs, credentials), the store URL, telemetry endpoints. Only API ids, paths, display names,
descriptions, the *names* of the key header and query parameter, and which policies apply.

With `gateway.admin-key` set, the admin API's operations (proxy/admin.py, one per entry of
its route table, response schemas generated from its view Structs) are described too, under
an `admin-key` bearer scheme; with `gateway.console`, `GET /console`.

Backend responses pass through unchanged (status, headers, body), so every API operation
documents them too: `default` for any status, and each status the gateway can answer itself
as "the gateway's error, or the backend's own response with this status".
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import msgspec

from proxy import admin, errors
from proxy.asgi import JSON_TYPE, send_response
from proxy.config import (
    Api,
    CacheLookup,
    Config,
    ContentSafety,
    KeyNames,
    PolicyEntry,
    TokenLimit,
)
from proxy.routing import OPENAI_OPERATIONS, PASSTHROUGH_METHODS
from proxy.schemas import ChatRequest, CompletionRequest, EmbeddingsRequest, ResponsesRequest
from proxy.telemetry.prometheus import CONTENT_TYPE as PROMETHEUS_TYPE
from proxy.telemetry.resource import version
from proxy.types import Scope, Send

__all__ = ["ERRORS", "PATH", "VIEWS", "OpenAPIEndpoint", "describe"]

PATH = "/openapi.json"
Doc = dict[str, Any]
Error = type[errors.GatewayError]
Names = dict[str, tuple[str, ...]]  # error code -> the headers it may name its wait in

# The request view each openai operation's body is validated with (proxy.schemas).
VIEWS: dict[str, type[msgspec.Struct]] = {
    "chat-completions": ChatRequest,
    "completions": CompletionRequest,
    "embeddings": EmbeddingsRequest,
    "responses": ResponsesRequest,
}
STREAMING = frozenset({"chat-completions", "completions", "responses"})
SUMMARIES = {
    "chat-completions": "Create a chat completion",
    "completions": "Create a text completion",
    "embeddings": "Create embeddings",
    "responses": "Create a model response (Responses API)",
    "models": "List the backend's models",
}
# Every error the gateway answers itself (proxy/errors.py; 500 InternalError is a bug).
ERRORS: tuple[Error, ...] = (
    errors.InvalidRequestError,
    errors.SubscriptionKeyNotFoundError,
    errors.SubscriptionKeyInvalidError,
    errors.TokenQuotaExceededError,
    errors.ContentBlockedError,
    errors.OperationNotFoundError,
    errors.MethodNotAllowedError,
    errors.RequestTooLargeError,
    errors.TokenLimitExceededError,
    errors.BackendConnectionError,
    errors.BackendUnavailableError,
    errors.TokenStoreUnavailableError,
    errors.ContentSafetyUnavailableError,
    errors.BackendTimeoutError,
)
_encoder = msgspec.json.Encoder()


def describe(config: Config) -> Doc:
    """The OpenAPI 3.1 document of the gateway serving `config` (fresh plain data)."""
    paths: Doc = {}
    schemes: Doc = {}
    for api in config.apis:
        security = _security(api, schemes) if _subscription_required(config, api) else None
        if api.type == "openai":
            paths.update(_openai_paths(config, api, security))
        else:
            paths.update(_passthrough_paths(api, security))
    paths.update(_gateway_paths(config))
    tags = [*(_tag(api) for api in config.apis), {"name": "gateway"}]
    schemas = _schemas()
    if config.gateway.admin_key:
        paths.update(_admin_paths())
        schemes[ADMIN_SCHEME] = _ADMIN_SCHEME
        schemas.update(_admin_schemas())
        tags.append({"name": "admin", "description": _ADMIN_INFO})
    document = {
        "openapi": "3.1.0",
        "info": {"title": "Tollway", "version": version(), "description": _INFO},
        "tags": tags,
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": {
                "OperationNotFound": _error_response([errors.OperationNotFoundError], False),
                "MethodNotAllowed": _error_response([errors.MethodNotAllowedError], False),
            },
            "headers": _HEADERS,
            "securitySchemes": schemes,
        },
    }
    return copy.deepcopy(document)  # parts are shared (module constants, passthrough verbs)


class OpenAPIEndpoint:
    """`GET /openapi.json`: the description of one config, encoded once."""

    def __init__(self, config: Config):
        self.body = _encoder.encode(describe(config))

    async def __call__(self, scope: Scope, send: Send) -> None:
        await send_response(send, 200, [JSON_TYPE], self.body)


# --- APIs ----------------------------------------------------------------------------------


def _subscription_required(config: Config, api: Api) -> bool:
    # As proxy.auth.ApiGuard decides: an API is open when it says so, or through one of its
    # products that does (APIM "open products").
    products = {p.id: p for p in config.products}
    own = [products[p] for p in api.products if p in products]
    return api.subscription_required and all(p.subscription_required for p in own)


def _security(api: Api, schemes: Doc) -> list[Doc]:
    """The key sources of `api`, in the order the gateway reads them (SPEC §4); the schemes
    they name are added to `schemes`."""
    names = api.subscription_key_names
    header = _scheme_id("subscription-key-header", api, names.header == KeyNames().header)
    query = _scheme_id("subscription-key-query", api, names.query == KeyNames().query)
    schemes[header] = _api_key("header", names.header, "in the API's own header")
    schemes["api-key"] = _api_key("header", "api-key", "as Azure OpenAI clients send it")
    schemes["bearer"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "The subscription key as the bearer token (the OpenAI SDK's api_key).",
    }
    schemes[query] = _api_key("query", names.query, "in the API's query parameter")
    return [{header: []}, {"api-key": []}, {"bearer": []}, {query: []}]


def _api_key(where: str, name: str, how: str) -> Doc:
    text = f"The subscription key, {how}."
    return {"type": "apiKey", "in": where, "name": name, "description": text}


def _scheme_id(base: str, api: Api, default: bool) -> str:
    return base if default else f"{api.id}.{base}"


def _tag(api: Api) -> Doc:
    text = " - ".join(t for t in (api.display_name, api.description) if t)
    return {"name": api.id, "description": text} if text else {"name": api.id}


def _pipeline(config: Config, api: Api) -> list[PolicyEntry]:
    """Every policy entry that can apply to a request of `api`: global, its products', its own."""
    products = {p.id: p for p in config.products}
    entries = [*config.policies, *api.policies]
    for product_id in api.products:
        if product_id in products:
            entries.extend(products[product_id].policies)
    return entries


def _policy_errors(config: Config, api: Api) -> list[Error]:
    """The refusals the policies that apply to `api` can answer with."""
    policies = [entry.policy for entry in _pipeline(config, api)]
    limits = [p for p in policies if isinstance(p, TokenLimit)]
    out: list[Error] = []
    if any(p.tokens_per_minute is not None for p in limits):
        out.append(errors.TokenLimitExceededError)
    if any(p.token_quota is not None for p in limits):
        out.append(errors.TokenQuotaExceededError)
    safety = [p for p in policies if isinstance(p, ContentSafety)]
    if safety:
        out.append(errors.ContentBlockedError)
    if any(p.backend_id and p.on_error == "block" for p in safety):
        out.append(errors.ContentSafetyUnavailableError)
    gateway = config.gateway
    if limits and gateway.store != "memory" and gateway.store_failure_mode == "closed":
        out.append(errors.TokenStoreUnavailableError)
    return out


def _retry_after_names(config: Config, api: Api) -> Names:
    """The header each token-limit refusal names its wait in: the refusing policy's own
    `retry-after-header-name`."""
    limits = [e.policy for e in _pipeline(config, api) if isinstance(e.policy, TokenLimit)]
    rate = [p.retry_after_header_name for p in limits if p.tokens_per_minute is not None]
    quota = [p.retry_after_header_name for p in limits if p.token_quota is not None]
    return {
        errors.TokenLimitExceededError.code: tuple(dict.fromkeys(rate)),
        errors.TokenQuotaExceededError.code: tuple(dict.fromkeys(quota)),
    }


def _api_errors(security: list[Doc] | None, *, body: bool) -> list[Error]:
    """What the gateway itself can answer on any API operation."""
    out: list[Error] = [errors.InvalidRequestError] if body else []
    if security is not None:
        out.append(errors.SubscriptionKeyNotFoundError)
    # A key that is presented is checked even on an open API (a bearer token excepted).
    out += [errors.SubscriptionKeyInvalidError, errors.RequestTooLargeError]
    out += [errors.BackendConnectionError, errors.BackendUnavailableError]
    return [*out, errors.BackendTimeoutError]


def _openai_paths(config: Config, api: Api, security: list[Doc] | None) -> Doc:
    paths: Doc = {}
    retry_after = _retry_after_names(config, api)
    for subpath, (operation, method) in OPENAI_OPERATIONS.items():
        view = VIEWS.get(operation)
        errs = _api_errors(security, body=view is not None) + _policy_errors(config, api)
        responses = _responses(errs, retry_after=retry_after)
        headers = _limit_headers(config, api)
        if operation in CACHED and _cached(config, api):
            headers |= _CACHE_HEADERS
        responses["200"] = _success(operation, headers)
        op: Doc = {
            "operationId": f"{api.id}.{operation}",
            "summary": SUMMARIES[operation],
            "tags": [api.id],
            "responses": dict(sorted(responses.items())),
        }
        if view is not None:
            content = {"application/json": {"schema": _ref("schemas", view.__name__)}}
            op["requestBody"] = {"required": True, "content": content}
        if security is not None:
            op["security"] = security
        paths[f"{api.path}/{subpath}"] = {method.lower(): op}
    return paths


_SUBPATH = {
    "name": "path",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "Any subpath under the API's path (slashes included), forwarded with the "
    "query to the backend; dot segments, literal or percent-encoded, are refused with 400.",
}


def _passthrough_paths(api: Api, security: list[Doc] | None) -> Doc:
    item: Doc = {"parameters": [_SUBPATH]}
    responses = _responses(_api_errors(security, body=True), any_type=True)
    for method in PASSTHROUGH_METHODS:
        op: Doc = {
            "operationId": f"{api.id}.passthrough-{method.lower()}",
            "summary": f"{method} any subpath, relayed to the backend",
            "tags": [api.id],
            "responses": responses,
        }
        if method in ("POST", "PUT", "PATCH"):
            op["requestBody"] = {"required": False, "content": {"*/*": {}}}
        if security is not None:
            op["security"] = security
        item[method.lower()] = op
    return {f"{api.path}/{{path}}": item}


# --- responses -----------------------------------------------------------------------------


def _ref(kind: str, name: str) -> Doc:
    return {"$ref": f"#/components/{kind}/{name}"}


_STAMP = {name: _ref("headers", name) for name in ("X-Request-Id", "x-tollway-overhead-ms")}


def _responses(
    errs: Sequence[Error], *, any_type: bool = False, retry_after: Names | None = None
) -> Doc:
    """One response per status the gateway answers itself (codes sharing a status merged),
    plus `default`: whatever else the backend answers."""
    by_status: dict[int, list[Error]] = {}
    for error in errs:
        by_status.setdefault(error.status, []).append(error)
    out = {
        str(status): _error_response(group, True, any_type=any_type, retry_after=retry_after)
        for status, group in sorted(by_status.items())
    }
    content: Doc = {"application/json": {"schema": _ref("schemas", "BackendReply")}}
    if any_type:
        content["*/*"] = {}
    text = "The backend's own response (any status), passed through unchanged."
    out["default"] = {"description": text, "headers": dict(_STAMP), "content": content}
    return out


def _error_response(
    group: Sequence[Error],
    backend: bool,
    *,
    any_type: bool = False,
    retry_after: Names | None = None,
) -> Doc:
    """A status the gateway answers with the errors of `group` (and their headers); with
    `backend`, the backend's own response with that status passes through too."""
    options = [_ref("schemas", error.code) for error in group]
    lines = [f"`{error.code}`: {_WHEN[error.code]}" for error in group]
    if backend:
        options.append(_ref("schemas", "BackendReply"))
        lines.append("Or the backend's own response with this status, passed through unchanged.")
    headers: Doc = dict(_STAMP)
    for error in group:
        if error.code not in _ERROR_HEADERS:
            continue
        default, text = _ERROR_HEADERS[error.code]
        # A token-limit policy names its own retry header (retry-after-header-name).
        names = (retry_after or {}).get(error.code) or (default,)
        for name in names:
            # Required only where nothing but this one error answers with this status.
            required = not backend and len(group) == 1
            headers[name] = {
                "description": text,
                "required": required,
                "schema": {"type": "string"},
            }
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    content: Doc = {"application/json": {"schema": schema}}
    if backend and any_type:
        content["*/*"] = {}
    return {"description": "\n\n".join(lines), "headers": headers, "content": content}


def _success(operation: str, limit_headers: Doc) -> Doc:
    text = "The backend's reply, passed through."
    content: Doc = {"application/json": {"schema": _ref("schemas", "BackendReply")}}
    if operation in STREAMING:
        text += " With `stream: true`, relayed event by event as server-sent events."
        content["text/event-stream"] = {"schema": _ref("schemas", "StreamEvent")}
    return {"description": text, "headers": {**_STAMP, **limit_headers}, "content": content}


CACHED = ("chat-completions", "completions", "responses")  # what the semantic cache serves
_CACHE_HEADERS: Doc = {
    "x-cache": {
        "description": "The semantic cache's verdict (llm-semantic-cache-lookup): `HIT` (the "
        "reply of an earlier, similar request, replayed; no backend call, no tokens charged), "
        "`MISS` (from the backend; also when the cache could not answer in time), or `SKIP` "
        "(the request is not looked up: more than max-message-count messages, images, a "
        "prompt list).",
        "schema": {"enum": ["HIT", "MISS", "SKIP"]},
    },
    "x-cache-distance": {
        "description": "On a hit: the cosine distance between this request and the cached "
        "one (0 = the same; at most the policy's score-threshold).",
        "schema": {"type": "string", "pattern": "^[0-9]+\\.[0-9]{4}$"},
    },
}


def _cached(config: Config, api: Api) -> bool:
    return any(isinstance(e.policy, CacheLookup) for e in _pipeline(config, api))


def _limit_headers(config: Config, api: Api) -> Doc:
    """The remaining/consumed token headers the API's llm-token-limit policies name."""
    out: Doc = {}
    for entry in _pipeline(config, api):
        policy = entry.policy
        if not isinstance(policy, TokenLimit):
            continue
        for name, text in (
            (policy.remaining_tokens_header_name, "Tokens left in the rate window."),
            (policy.remaining_quota_tokens_header_name, "Tokens left in the quota period."),
            (policy.tokens_consumed_header_name, "Tokens this request was charged."),
        ):
            if name:
                out[name] = {"description": text, "schema": {"type": "string"}}
    return out


def _gateway_paths(config: Config) -> Doc:
    """The gateway's own endpoints: probes, metrics, this document."""

    def get(operation: str, summary: str, responses: Doc) -> Doc:
        op = {"operationId": operation, "summary": summary, "tags": ["gateway"]}
        return {"get": {**op, "responses": responses}}

    def reply(text: str, media_type: str, schema: Doc) -> Doc:
        return {"description": text, "content": {media_type: {"schema": schema}}}

    def json(text: str, name: str) -> Doc:
        return reply(text, "application/json", _ref("schemas", name))

    ready = "Ready, or degraded: a shared store is down in `open` mode (limits count per process)."
    paths = {
        "/healthz": get("healthz", "Liveness", {"200": json("Alive.", "Health")}),
        "/readyz": get("readyz", "Readiness", {
            "200": json(ready, "Readiness"),
            "503": json("Starting, or a shared store is down in `closed` mode.", "Readiness"),
        }),
    }  # fmt: skip
    if config.telemetry.prometheus:
        text_type = PROMETHEUS_TYPE.decode("ascii").partition(";")[0]
        metrics = reply("Prometheus text exposition.", text_type, {"type": "string"})
        paths["/metrics"] = get("metrics", "Prometheus metrics", {"200": metrics})
    document = json("This OpenAPI 3.1 document.", "Document")
    paths[PATH] = get("openapi", "The gateway's OpenAPI description", {"200": document})
    if config.gateway.console:
        page = reply("The console page (its script and style sheet are under /console/).",
                     "text/html", {"type": "string"})  # fmt: skip
        unchanged = {"description": "Not modified: If-None-Match named the page's ETag."}
        paths["/console"] = get("console", "The test console", {"200": page, "304": unchanged})
    return paths


# --- the admin API -------------------------------------------------------------------------

ADMIN_SCHEME = "admin-key"
_ADMIN_SCHEME: Doc = {
    "type": "http",
    "scheme": "bearer",
    "description": "The admin key (gateway.admin-key) as the bearer token.",
}
_ADMIN_INFO = (
    "The admin API: subscriptions made and changed at run time (kept in the subscription "
    "store, in effect in every gateway process at once), the APIs and products, token usage, "
    "config reload."
)
_ADMIN_REF = "#/components/schemas/admin.{name}"
_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"},
       "description": "The subscription's id."}  # fmt: skip
_COUNTER_KEY = {
    "name": "counter-key", "in": "query", "required": True,
    "schema": {"type": "string", "minLength": 1},
    "description": "A resolved counter key, e.g. a subscription id for the default "
    "counter-key {subscription.id}.",
}  # fmt: skip
Reply = tuple[str, str, str | None]  # status, description, admin view (None: no body)
# operation id -> (summary, the success reply, the admin errors it can answer besides 401)
_ADMIN_OPS: dict[str, tuple[str, Reply, tuple[str, ...]]] = {
    "list-subscriptions": ("List the subscriptions in force (no keys)",
                           ("200", "Every subscription.", "SubscriptionList"), ()),
    "create-subscription": ("Make a subscription", ("201", "Made; its keys, shown this once.",
                            "SubscriptionKeys"), ("InvalidRequest", "RequestTooLarge",
                            "Conflict", "StoreUnavailable")),
    "get-subscription": ("Read a subscription (no keys)",
                         ("200", "The subscription.", "SubscriptionView"), ("NotFound",)),
    "delete-subscription": ("Remove a stored subscription (a config-file one reverts to the "
                            "file)", ("204", "Removed.", None),
                            ("NotFound", "Conflict", "StoreUnavailable")),
    "suspend-subscription": ("Suspend a subscription: its keys are refused",
                             ("200", "Suspended.", "SubscriptionView"),
                             ("NotFound", "Conflict", "StoreUnavailable")),
    "resume-subscription": ("Resume a suspended subscription",
                            ("200", "Active.", "SubscriptionView"),
                            ("NotFound", "Conflict", "StoreUnavailable")),
    "regenerate-primary-key": ("Make a new primary key (the old one is refused at once)",
                               ("200", "The new key, shown this once.", "SubscriptionKeys"),
                               ("NotFound", "Conflict", "StoreUnavailable")),
    "regenerate-secondary-key": ("Make a new secondary key (the old one is refused at once)",
                                 ("200", "The new key, shown this once.", "SubscriptionKeys"),
                                 ("NotFound", "Conflict", "StoreUnavailable")),
    "list-secrets": ("Read the keys of the built-in all-access subscription",
                     ("200", "Its keys.", "Secrets"), ("NotFound", "Conflict")),
    "list-apis": ("List the APIs, their operations, products and policies",
                  ("200", "Every API (never a backend's URL or credentials).", "ApiList"), ()),
    "list-products": ("List the products", ("200", "Every product.", "ProductList"), ()),
    "get-usage": ("Read the token usage and what is left, per llm-token-limit policy",
                  ("200", "One entry per configured llm-token-limit.", "Usage"),
                  ("InvalidRequest", "StoreUnavailable")),
    "reload": ("Reload the config file in every worker of this server, like SIGHUP",
               ("200", "Reloaded.", "Reloaded"), ("InvalidRequest", "InternalError")),
}  # fmt: skip
_ADMIN_WHEN = {
    "AdminKeyNotFound": "no admin key (Authorization: Bearer <admin key>).",
    "AdminKeyInvalid": "a wrong admin key.",
    "InvalidRequest": "a malformed body or query: the message names the field (unknown "
    "fields, a bad scope, an unknown API or product); for reload, the config file's errors "
    "(the old config stays).",
    "RequestTooLarge": "the body is over 64 KiB.",
    "NotFound": "no subscription with this id.",
    "OperationNotFound": "the path, once its id is decoded, is no admin endpoint.",
    "Conflict": "the id or a key is taken; a config-file subscription cannot be removed "
    "here, nor the built-in one; only the built-in subscription's keys are kept to list.",
    "StoreUnavailable": "the subscription store (or, for usage, the token-limit store) is "
    "down: the subscriptions known stay in effect, changes are refused until it is back.",
    "InternalError": "the new config could not be put in force (the old config stays).",
}
_ADMIN_ERROR_TYPES: tuple[Error, ...] = (
    *admin.ERRORS, errors.InvalidRequestError, errors.RequestTooLargeError, errors.GatewayError,
    errors.OperationNotFoundError,
)  # fmt: skip
_ADMIN_ERRORS = {error.code: error for error in _ADMIN_ERROR_TYPES}


def _admin_paths() -> Doc:
    paths: Doc = {}
    for path, methods in admin.ROUTES.items():
        item: Doc = {"parameters": [_ID]} if "{id}" in path else {}
        for method, operation in methods.items():
            summary, (status, text, view), codes = _ADMIN_OPS[operation]
            success: Doc = {"description": text}
            if view is not None:
                success["content"] = {"application/json": {"schema": _admin_ref(view)}}
            responses = {status: success}
            by_status: dict[int, list[str]] = {401: ["AdminKeyNotFound", "AdminKeyInvalid"]}
            if "{id}" in path:  # an id with a slash or dot segment can land on no route
                codes = (*codes, "OperationNotFound")
            for code in codes:
                by_status.setdefault(_ADMIN_ERRORS[code].status, []).append(code)
            for code_status, group in by_status.items():
                responses[str(code_status)] = _admin_error(group)
            op: Doc = {
                "operationId": f"admin.{operation}",
                "summary": summary,
                "tags": ["admin"],
                "security": [{ADMIN_SCHEME: []}],
                "responses": dict(sorted(responses.items())),
            }
            if operation == "get-usage":
                op["parameters"] = [_COUNTER_KEY]
            if operation == "create-subscription":
                content = {"application/json": {"schema": _admin_ref("NewSubscription")}}
                op["requestBody"] = {"required": True, "content": content}
            item[method.lower()] = op
        paths[path] = item
    return paths


def _admin_ref(name: str) -> Doc:
    return {"$ref": _ADMIN_REF.format(name=name)}


def _admin_error(codes: Sequence[str]) -> Doc:
    options = [_ref("schemas", code) for code in codes]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {
        "description": "\n\n".join(f"`{code}`: {_ADMIN_WHEN[code]}" for code in codes),
        "content": {"application/json": {"schema": schema}},
    }


def _admin_schemas() -> Doc:
    _, views = msgspec.json.schema_components(admin.VIEWS, ref_template=_ADMIN_REF)
    out = {f"admin.{name}": schema for name, schema in views.items()}
    out.update((code, _error_schema(error)) for code, error in _ADMIN_ERRORS.items())
    return out


# --- components ----------------------------------------------------------------------------


def _schemas() -> Doc:
    _, views = msgspec.json.schema_components(
        VIEWS.values(), ref_template="#/components/schemas/{name}"
    )
    for schema in views.values():
        # The views name only what the gateway checks; every other field passes through.
        schema["additionalProperties"] = True
    own = {error.code: _error_schema(error) for error in ERRORS}
    return {**views, **own, **_SCHEMAS}


def _error_schema(error: Error) -> Doc:
    fields = {"message": {"type": "string"}, "type": {"const": error.type},
              "code": {"const": error.code}}  # fmt: skip
    body = {"type": "object", "required": list(fields), "properties": fields,
            "additionalProperties": False}  # fmt: skip
    return {
        "description": f"{error.status} {error.code}",
        "type": "object",
        "required": ["error"],
        "properties": {"error": body},
        "additionalProperties": False,
    }


_JSON_DATA = {"type": "string", "contentMediaType": "application/json",
              "contentSchema": {"type": "object"}}  # fmt: skip
_SCHEMAS: Doc = {
    "BackendReply": {"description": "A backend's response body (any JSON), passed through."},
    "StreamEvent": {
        "description": "One server-sent event: a JSON chunk, the closing `[DONE]`, or, for a "
        'failure after the stream started, `{"error": {...}}`.',
        "type": "object",
        "properties": {
            "event": {"type": "string"},
            "data": {"anyOf": [{"const": "[DONE]"}, _JSON_DATA]},
        },
    },
    "Health": {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}},
    "Readiness": {
        "type": "object",
        "required": ["status", "store"],
        "properties": {
            "status": {"enum": ["ready", "degraded", "starting", "unavailable"]},
            "store": {"type": "string", "description": "memory, redis or redis (unavailable)."},
        },
    },
    "Document": {"type": "object", "required": ["openapi", "info", "paths"]},
}
_HEADERS: Doc = {
    "X-Request-Id": {
        "description": "The client's own request id if it sent a safe one, else a new one; the "
        "backend sees the same.",
        "required": True,
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:\\-]{1,128}$"},
    },
    "x-tollway-overhead-ms": {
        "description": "Time spent in the gateway, waiting on the backend excluded.",
        "required": True,
        "schema": {"type": "string", "pattern": "^-?[0-9]+\\.[0-9]{3}$"},
    },
}
_ERROR_HEADERS = {
    "MethodNotAllowed": ("Allow", "The methods the path serves."),
    "TokenLimitExceeded": ("Retry-After", "Seconds until enough tokens are free."),
    "TokenQuotaExceeded": ("Retry-After", "Seconds until the quota period frees enough tokens."),
    "BackendUnavailable": ("Retry-After", "Seconds until a backend is expected back."),
}
_WHEN = {
    "InvalidRequest": "malformed JSON, a wrong field type (the message names the field), or "
    "a passthrough path that would leave the backend's base path.",
    "SubscriptionKeyNotFound": "no subscription key.",
    "SubscriptionKeyInvalid": "an unknown or suspended key, or one whose scope excludes this API.",
    "TokenQuotaExceeded": "the token quota of the period is used up.",
    "ContentBlocked": "the content-safety policy blocked the request or, with "
    "enforce-on-completions, the completion (a stream ends with this error event); the "
    "message names the categories, blocklists or prompt attack, never the text.",
    "OperationNotFound": "no API or operation at this path.",
    "MethodNotAllowed": "the path exists, the method does not.",
    "RequestTooLarge": "the body is over gateway.max-request-body (refused before it is read).",
    "TokenLimitExceeded": "the tokens-per-minute limit would be exceeded.",
    "BackendConnectionFailure": "the backend is unreachable or reset the connection.",
    "BackendUnavailable": "no backend is available (circuit open, pool exhausted).",
    "StoreUnavailable": "the shared token store is down (store-failure-mode: closed).",
    "ContentSafetyUnavailable": "the content-safety backend failed or passed its timeout "
    "(on-error: block).",
    "BackendTimeout": "the backend was silent past its read timeout.",
}
_INFO = (
    "The client-facing surface of this Tollway gateway. Errors the gateway makes itself are "
    'JSON in the OpenAI shape, `{"error": {"message", "type", "code"}}`; a path not listed '
    "here is 404 `OperationNotFound`, a listed path with another method 405 "
    "`MethodNotAllowed` with `Allow` (see components/responses). Backend responses, errors "
    "included, pass through unchanged, so every API operation documents them too. Every API "
    "response carries `X-Request-Id` and `x-tollway-overhead-ms`."
)
