"""The admin API under `/admin` (SPEC §4), on when `gateway.admin-key` is set.

    GET    /admin/subscriptions                   the subscriptions in force (never their keys)
    POST   /admin/subscriptions                   make one: 201 with its keys (made if not given)
    GET    /admin/subscriptions/{id}
    DELETE /admin/subscriptions/{id}              remove a stored one (a file's reverts to the file)
    POST   /admin/subscriptions/{id}/suspend      (and /resume)
    POST   /admin/subscriptions/{id}/regenerate-primary-key   (and -secondary-key): the new key
    POST   /admin/subscriptions/{id}/list-secrets the keys, where kept (the all-access one's)
    GET    /admin/apis                            APIs with operations, products and policies
    GET    /admin/products
    GET    /admin/usage?counter-key=K             tokens used and left, per llm-token-limit
    POST   /admin/reload                          reload the config file, in every worker

The admin key comes as `Authorization: Bearer <key>` and is compared as a SHA-256 digest in
constant time. Bodies are kebab-case JSON like the config; unknown fields are refused. Errors
are the gateway's OpenAI-shaped ones, with the admin API's own codes below; a subscription
key appears only in the answer that made it (creation, regeneration) or in `list-secrets`,
and every answer says `Cache-Control: no-store`.
"""

from __future__ import annotations

import difflib
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Literal, NamedTuple, TypeVar
from urllib.parse import parse_qsl, unquote

import msgspec

from proxy import subscriptions as subs
from proxy.asgi import JSON_TYPE, error_body, error_headers, read_body, send_response
from proxy.config import (
    ALL_ACCESS_ID,
    Api,
    Config,
    ConfigError,
    KeyNames,
    PolicyEntry,
    Product,
    Subscription,
    TokenLimit,
    key_digest,
    new_key,
)
from proxy.errors import (
    AdminKeyInvalidError,
    AdminKeyNotFoundError,
    ConflictError,
    GatewayError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    OperationNotFoundError,
    StoreUnavailableAdminError,
)
from proxy.limits.base import Limit, Limiter, StoreUnavailableError, remaining
from proxy.routing import OPENAI_OPERATIONS, PASSTHROUGH_METHODS
from proxy.types import Headers, Receive, Scope, Send

log = logging.getLogger("tollway")

PREFIX = "/admin"
MAX_BODY = 64 * 1024
# path -> method -> operation id (also the operation ids of /openapi.json, with "admin.")
ROUTES: dict[str, dict[str, str]] = {
    "/admin/subscriptions": {"GET": "list-subscriptions", "POST": "create-subscription"},
    "/admin/subscriptions/{id}": {"GET": "get-subscription", "DELETE": "delete-subscription"},
    "/admin/subscriptions/{id}/suspend": {"POST": "suspend-subscription"},
    "/admin/subscriptions/{id}/resume": {"POST": "resume-subscription"},
    "/admin/subscriptions/{id}/regenerate-primary-key": {"POST": "regenerate-primary-key"},
    "/admin/subscriptions/{id}/regenerate-secondary-key": {"POST": "regenerate-secondary-key"},
    "/admin/subscriptions/{id}/list-secrets": {"POST": "list-secrets"},
    "/admin/apis": {"GET": "list-apis"},
    "/admin/products": {"GET": "list-products"},
    "/admin/usage": {"GET": "get-usage"},
    "/admin/reload": {"POST": "reload"},
}
_NO_STORE = (b"cache-control", b"no-store")
T = TypeVar("T")


ERRORS: tuple[type[GatewayError], ...] = (
    AdminKeyNotFoundError, AdminKeyInvalidError, NotFoundError, ConflictError,
    StoreUnavailableAdminError,
)  # fmt: skip


# --- bodies --------------------------------------------------------------------------------


class NewSubscription(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True,
                      rename="kebab"):  # fmt: skip
    """The body of `POST /admin/subscriptions`; keys left out are made (43 random chars)."""

    id: str
    display_name: str = ""
    scope: str  # all-apis | api:<id> | product:<id>
    state: Literal["active", "suspended"] = "active"
    primary_key: str = ""  # a literal key (>= 16 chars) or its sha256:<hex> form
    secondary_key: str = ""


class _View(msgspec.Struct, kw_only=True, rename="kebab", omit_defaults=True):
    pass


class SubscriptionView(_View):
    """A subscription in force. `source`: config (the file), store (made or changed at run
    time; `overrides-config` when it replaces the file's), built-in (all-access)."""

    id: str
    display_name: str
    scope: str
    state: Literal["active", "suspended"]
    source: Literal["config", "store", "built-in"]
    overrides_config: bool = False


class SubscriptionKeys(SubscriptionView):
    """A subscription with the keys just made (or given), shown this once."""

    primary_key: str | None = None
    secondary_key: str | None = None


class SubscriptionList(_View):
    data: list[SubscriptionView]


class Secrets(_View):
    primary_key: str
    secondary_key: str


class Operation(_View):
    id: str  # as in /openapi.json
    method: str
    path: str


class ApiView(_View):
    id: str
    display_name: str
    description: str
    path: str
    type: Literal["openai", "passthrough"]
    backend: str  # the id; never its URL or credentials
    subscription_required: bool
    subscription_key_names: KeyNames
    products: list[str]
    operations: list[Operation]
    policies: list[dict[str, Any]]


class ApiList(_View):
    data: list[ApiView]


class ProductView(_View):
    id: str
    display_name: str
    description: str
    subscription_required: bool
    apis: list[str]
    policies: list[dict[str, Any]]


class ProductList(_View):
    data: list[ProductView]


class LimitUsage(_View):
    """One configured llm-token-limit, read for the counter key asked about."""

    where: str  # e.g. policies[0], products[starter].policies[1], apis[chat].policies[0]
    counter_key: str  # the policy's template
    tokens_per_minute: int | None
    token_quota: int | None
    token_quota_period: str | None
    tokens_in_window: int  # in the current 60-s window
    tokens_in_period: int | None  # in the current quota period
    remaining_tokens: int | None
    remaining_quota_tokens: int | None


class Usage(_View):
    counter_key: str
    limits: list[LimitUsage]


class Reloaded(_View):
    reloaded: bool


VIEWS: tuple[type[msgspec.Struct], ...] = (
    NewSubscription, SubscriptionView, SubscriptionKeys, SubscriptionList, Secrets, ApiList,
    ProductList, Usage, Reloaded,
)  # fmt: skip
_encoder = msgspec.json.Encoder()
_new_decoder = msgspec.json.Decoder(NewSubscription)


class _Call(NamedTuple):
    scope: Scope
    receive: Receive
    id: str  # the {id} of the path, else ""


Answer = tuple[int, bytes]


class AdminApi:
    """The `/admin` section (see the module docstring): `config` reads the config in force,
    `reload` reloads the file (raising ConfigError, or what else failed), `token_store_down`
    says whether the token counters are per process for now."""

    def __init__(
        self,
        admin_key: str,
        subscriptions: subs.Subscriptions,
        config: Callable[[], Config],
        limiter: Limiter,
        reload: Callable[[], Awaitable[None]],
        token_store_down: Callable[[], bool] = lambda: False,
    ):
        self._digest = key_digest(admin_key)
        self._subs = subscriptions
        self._config = config
        self._limiter = limiter
        self._reload_config = reload
        self._token_store_down = token_store_down
        self._handlers: dict[str, Callable[[_Call], Awaitable[Answer]]] = {
            "list-subscriptions": self._list,
            "create-subscription": self._create,
            "get-subscription": self._get,
            "delete-subscription": self._delete,
            "suspend-subscription": self._suspend,
            "resume-subscription": self._resume,
            "regenerate-primary-key": self._regenerate_primary,
            "regenerate-secondary-key": self._regenerate_secondary,
            "list-secrets": self._list_secrets,
            "list-apis": self._apis,
            "list-products": self._products,
            "get-usage": self._usage,
            "reload": self._reload,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            self._authorize(scope)
            operation, id = _route(scope)
            status, body = await self._handlers[operation](_Call(scope, receive, id))
        except GatewayError as error:
            await _send_error(send, error)
            return
        except Exception:
            log.exception("tollway: admin API request failed")
            await _send_error(send, GatewayError())
            return
        headers: Headers = [_NO_STORE] if status == 204 else [JSON_TYPE, _NO_STORE]
        await send_response(send, status, headers, body)

    def _authorize(self, scope: Scope) -> None:
        presented = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                if value[:7].lower() == b"bearer ":
                    presented = value[7:].strip()
                break
        if not presented:
            raise AdminKeyNotFoundError
        if not hmac.compare_digest(hashlib.sha256(presented).digest(), self._digest):
            raise AdminKeyInvalidError

    # --- subscriptions ---

    async def _list(self, call: _Call) -> Answer:
        config = self._config()
        views = [self._view(config, sub) for sub in self._subs.effective(config)]
        return 200, _encoder.encode(SubscriptionList(data=views))

    async def _get(self, call: _Call) -> Answer:
        config = self._config()
        return 200, _encoder.encode(self._view(config, self._find(config, call.id)))

    async def _create(self, call: _Call) -> Answer:
        new = _decode_new(await read_body(call.scope, call.receive, MAX_BODY))
        config = self._config()
        primary, secondary = new.primary_key or new_key(), new.secondary_key or new_key()
        try:
            sub = Subscription(id=new.id, display_name=new.display_name, scope=new.scope,
                               state=new.state, primary_key=primary,
                               secondary_key=secondary)  # fmt: skip
        except ValueError as exc:  # "field: problem" from Subscription.__post_init__
            raise InvalidRequestError(f"$.{exc}") from None
        if key_digest(primary) == key_digest(secondary):
            raise InvalidRequestError("$.secondary-key: the same key as primary-key")
        _check_scope(config, sub)
        stored = await _store(self._subs.create(config, sub))
        log.info("tollway: admin: subscription %r created", sub.id)  # (never a key)
        view = self._view(config, stored)
        keys = SubscriptionKeys(**msgspec.structs.asdict(view), primary_key=primary,
                                secondary_key=secondary)  # fmt: skip
        return 201, _encoder.encode(keys)

    async def _delete(self, call: _Call) -> Answer:
        await _store(self._subs.delete(self._config(), call.id))
        log.info("tollway: admin: subscription %r removed", call.id)
        return 204, b""

    async def _suspend(self, call: _Call) -> Answer:
        return await self._change(call.id, state="suspended")

    async def _resume(self, call: _Call) -> Answer:
        return await self._change(call.id, state="active")

    async def _regenerate_primary(self, call: _Call) -> Answer:
        return await self._change(call.id, primary_key=new_key())

    async def _regenerate_secondary(self, call: _Call) -> Answer:
        return await self._change(call.id, secondary_key=new_key())

    async def _change(self, id: str, **fields: str) -> Answer:
        """Store the subscription with `fields` changed; answer with it (and a new key)."""
        config = self._config()
        changed = await _store(
            self._subs.update(config, id, lambda sub: msgspec.structs.replace(sub, **fields))
        )
        log.info("tollway: admin: subscription %r: %s changed", id, ", ".join(fields))
        view = msgspec.structs.asdict(self._view(config, changed))
        keys = SubscriptionKeys(**view, primary_key=fields.get("primary_key"),
                                secondary_key=fields.get("secondary_key"))  # fmt: skip
        return 200, _encoder.encode(keys)

    async def _list_secrets(self, call: _Call) -> Answer:
        config = self._config()
        sub = self._find(config, call.id)
        if sub.id != ALL_ACCESS_ID or not config.gateway.all_access:
            raise ConflictError(
                f"The keys of subscription {sub.id!r} are kept as digests only; regenerate one "
                "to get a new key."
            )
        secrets = Secrets(primary_key=sub.primary_key, secondary_key=sub.secondary_key)
        return 200, _encoder.encode(secrets)

    def _find(self, config: Config, id: str) -> Subscription:
        sub = self._subs.find(config, id)
        if sub is None:
            raise NotFoundError(f"No subscription {id!r}.")
        return sub

    def _view(self, config: Config, sub: Subscription) -> SubscriptionView:
        source = self._subs.source(config, sub.id)
        overrides = source == "store" and any(s.id == sub.id for s in config.subscriptions)
        return SubscriptionView(id=sub.id, display_name=sub.display_name, scope=sub.scope,
                                state=sub.state, source=source,
                                overrides_config=overrides)  # fmt: skip

    # --- apis, products, usage, reload ---

    async def _apis(self, call: _Call) -> Answer:
        config = self._config()
        return 200, _encoder.encode(ApiList(data=[_api_view(api) for api in config.apis]))

    async def _products(self, call: _Call) -> Answer:
        config = self._config()
        views = [_product_view(config, product) for product in config.products]
        return 200, _encoder.encode(ProductList(data=views))

    async def _usage(self, call: _Call) -> Answer:
        key = _counter_key(call.scope)
        out = []
        for where, spec in _configured_limits(self._config()):
            limit = Limit(key, spec.tokens_per_minute, spec.token_quota, spec.token_quota_period)
            in_window, in_period = await self._limiter.usage(limit)
            left, left_quota = remaining(limit, in_window, in_period)
            quota = spec.token_quota is not None
            out.append(LimitUsage(
                where=where, counter_key=spec.counter_key,
                tokens_per_minute=spec.tokens_per_minute, token_quota=spec.token_quota,
                token_quota_period=spec.token_quota_period if quota else None,
                tokens_in_window=in_window, tokens_in_period=in_period if quota else None,
                remaining_tokens=left, remaining_quota_tokens=left_quota,
            ))  # fmt: skip
        if self._token_store_down():  # what was read is this process's fallback count
            raise StoreUnavailableAdminError(
                "The token-limit store is unavailable; shared usage cannot be read now."
            )
        return 200, _encoder.encode(Usage(counter_key=key, limits=out))

    async def _reload(self, call: _Call) -> Answer:
        try:
            await self._reload_config()
        except ConfigError as exc:
            raise InvalidRequestError(
                "The config file was not reloaded (the old config stays): " + "; ".join(exc.errors)
            ) from None
        except Exception as exc:
            log.error("tollway: config reload failed, keeping the old config: %s", exc)
            message = f"The config was not reloaded (the old config stays): {exc}"
            raise GatewayError(message) from None
        return 200, _encoder.encode(Reloaded(reloaded=True))


async def _send_error(send: Send, error: GatewayError) -> None:
    await send_response(send, error.status, [*error_headers(error), _NO_STORE], error_body(error))


def _route(scope: Scope) -> tuple[str, str]:
    """The operation id for the request's path and method, and the path's {id} if any."""
    raw: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
    parts = [unquote(p.decode("latin-1"), errors="replace") for p in raw.split(b"/")[2:]]
    id = ""
    if len(parts) >= 2 and parts[0] == "subscriptions":
        id, parts[1] = parts[1], "{id}"
    methods = ROUTES.get("/".join((PREFIX, *parts)))
    if methods is None or (not id and "{id}" in parts):
        raise OperationNotFoundError
    operation = methods.get(scope["method"])
    if operation is None:
        raise MethodNotAllowedError(tuple(methods))
    return operation, id


async def _store(work: Awaitable[T]) -> T:
    """A registry write, its refusals as the admin API's errors."""
    try:
        return await work
    except subs.NotFoundError as exc:
        raise NotFoundError(str(exc)) from None
    except subs.ConflictError as exc:
        raise ConflictError(str(exc)) from None
    except StoreUnavailableError:
        raise StoreUnavailableAdminError from None


def _decode_new(body: bytes) -> NewSubscription:
    if not body.strip():
        raise InvalidRequestError("The request body is empty; expected a JSON object.")
    try:
        return _new_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise InvalidRequestError(_describe(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequestError(f"The request body is not valid JSON: {exc}") from None


_UNKNOWN, _MISSING = "Object contains unknown field `", "Object missing required field `"


def _describe(message: str) -> str:
    """msgspec's "Object contains unknown field `x` - at `$`" as "$.x: unknown field ..."."""
    text, found, at = message.rpartition(" - at `")
    path = at.rstrip("`") if found else "$"
    text = text if found else message
    if text.startswith(_UNKNOWN):
        names = ", ".join(f.encode_name for f in msgspec.structs.fields(NewSubscription))
        return f"{path}.{text[len(_UNKNOWN) : -1]}: unknown field (expected one of: {names})"
    if text.startswith(_MISSING):
        return f"{path}.{text[len(_MISSING) : -1]}: required field is missing"
    text = text.replace("`", "")
    if text.startswith("Invalid enum value"):  # `state`, the one Literal
        text += " (expected one of: active, suspended)"
    return f"{path}: {text[:1].lower() + text[1:]}"


def _check_scope(config: Config, sub: Subscription) -> None:
    kind, target = sub.scope_kind, sub.scope_id
    if kind == "all-apis":
        return
    known = [a.id for a in config.apis] if kind == "api" else [p.id for p in config.products]
    if target not in known:
        close = difflib.get_close_matches(target, known, 1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        name = "API" if kind == "api" else "product"
        raise InvalidRequestError(f"$.scope: unknown {name} {target!r}{hint}")


def _counter_key(scope: Scope) -> str:
    query = scope.get("query_string", b"").decode("latin-1")
    key = ""
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name != "counter-key":
            raise InvalidRequestError(f"{name}: unknown query parameter (expected counter-key)")
        key = value
    if not key:
        raise InvalidRequestError("counter-key: required query parameter, the resolved counter "
                                  "key (e.g. a subscription id)")  # fmt: skip
    return key


def _configured_limits(config: Config) -> Iterator[tuple[str, TokenLimit]]:
    """Every configured llm-token-limit and where it is: global, then products', then APIs'."""
    for k, entry in enumerate(config.policies):
        if isinstance(entry.policy, TokenLimit):
            yield f"policies[{k}]", entry.policy
    for kind, items in (("products", config.products), ("apis", config.apis)):
        for item in items:
            for k, entry in enumerate(item.policies):
                if isinstance(entry.policy, TokenLimit):
                    yield f"{kind}[{item.id}].policies[{k}]", entry.policy


def _api_view(api: Api) -> ApiView:
    if api.type == "openai":
        operations = [Operation(id=f"{api.id}.{op}", method=method, path=f"{api.path}/{sub}")
                      for sub, (op, method) in OPENAI_OPERATIONS.items()]  # fmt: skip
    else:
        path = f"{api.path}/{{path}}"
        operations = [Operation(id=f"{api.id}.passthrough-{m.lower()}", method=m, path=path)
                      for m in PASSTHROUGH_METHODS]  # fmt: skip
    return ApiView(
        id=api.id, display_name=api.display_name, description=api.description, path=api.path,
        type=api.type, backend=api.backend, subscription_required=api.subscription_required,
        subscription_key_names=api.subscription_key_names, products=list(api.products),
        operations=operations, policies=_policies(api.policies),
    )  # fmt: skip


def _product_view(config: Config, product: Product) -> ProductView:
    return ProductView(
        id=product.id, display_name=product.display_name, description=product.description,
        subscription_required=product.subscription_required,
        apis=[api.id for api in config.apis if product.id in api.products],
        policies=_policies(product.policies),
    )  # fmt: skip


def _policies(entries: tuple[PolicyEntry, ...]) -> list[dict[str, Any]]:
    return [msgspec.to_builtins(entry, enc_hook=str) for entry in entries]
