"""Subscription keys: where a request's key is read from, and whom it identifies.

Keys are held only as SHA-256 digests. A presented key is hashed and looked up by digest;
the match is then confirmed with `hmac.compare_digest`, so neither the lookup nor the
comparison depends on how much of a secret an attacker guessed right.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import NamedTuple
from urllib.parse import parse_qsl

from proxy.config import Api, Config, Product, Subscription, key_digest
from proxy.errors import SubscriptionKeyInvalidError, SubscriptionKeyNotFoundError
from proxy.types import Scope

_API_KEY = b"api-key"
_AUTHORIZATION = b"authorization"
_API_KEY_ONLY = (_API_KEY,)


class Identity(NamedTuple):
    """Who is calling: the subscription (None when anonymous) and the product it came through."""

    subscription: Subscription | None
    product: Product | None
    # The headers and the query parameter that carry the key (the one it was read from, and
    # any other key source the client put the same key in): never forwarded.
    consumed_headers: tuple[bytes, ...]
    consumed_query: str | None


class KeyRing:
    """Every active or suspended subscription by key digest; shared by all APIs."""

    def __init__(self, subscriptions: tuple[Subscription, ...]):
        self._by_digest: dict[bytes, tuple[bytes, Subscription]] = {}
        for sub in subscriptions:
            for key in (sub.primary_key, sub.secondary_key):
                if key:
                    digest = key_digest(key)
                    self._by_digest[digest] = (digest, sub)

    def find(self, key: bytes) -> Subscription | None:
        digest = hashlib.sha256(key).digest()
        known, sub = self._by_digest.get(digest, (b"", None))
        return sub if hmac.compare_digest(known, digest) else None


class ApiGuard:
    """The subscription check of one API, precomputed from the config."""

    def __init__(self, config: Config, api: Api, ring: KeyRing):
        self._ring = ring
        self._header = api.subscription_key_names.header.lower().encode("latin-1")
        self._query = api.subscription_key_names.query
        self._query_bytes = self._query.encode("latin-1")
        self._own_header = (self._header,)
        products = {p.id: p for p in config.products}
        own = [products[pid] for pid in api.products if pid in products]
        # An API is open when it says so, or through an open product (APIM "open products").
        self._open_product = next((p for p in own if not p.subscription_required), None)
        self._required = api.subscription_required and self._open_product is None
        self._grants = _grants(config, api, own)

    def identify(self, scope: Scope) -> Identity:
        """Return the caller's identity or raise 401 (SPEC §4 key sources, in order)."""
        own, api_key, bearer = self._key_headers(scope)
        key = own or api_key or bearer
        query: bytes = scope.get("query_string", b"")
        in_query = self._query_key(query) if query and self._query_bytes in query else None
        if not key:
            key = in_query
            if not key:
                if self._required:
                    raise SubscriptionKeyNotFoundError
                return Identity(None, self._open_product, (), None)
        sub = self._ring.find(key)
        if sub is None or sub.state != "active" or sub.id not in self._grants:
            if key is bearer and not self._required:
                # Not one of ours: on an open API it is the client's own backend credential.
                return Identity(None, self._open_product, (), None)
            raise SubscriptionKeyInvalidError
        consumed: tuple[bytes, ...]
        if key is own and api_key is None and bearer is None:  # the usual: one source
            consumed = self._own_header
        elif key is api_key and own is None and bearer is None:
            consumed = _API_KEY_ONLY
        else:
            sources = ((self._header, own), (_API_KEY, api_key), (_AUTHORIZATION, bearer))
            consumed = tuple(name for name, value in sources if value == key)
        return Identity(
            sub, self._grants[sub.id], consumed, self._query if in_query == key else None
        )

    def _key_headers(self, scope: Scope) -> tuple[bytes | None, bytes | None, bytes | None]:
        """The key in the API's header, in `api-key`, and as a Bearer token (stripped)."""
        bearer = api_key = own = None
        for name, value in scope["headers"]:
            if name == self._header:
                own = value.strip()
            elif name == _API_KEY:
                api_key = value.strip()
            elif name == _AUTHORIZATION and value[:7].lower() == b"bearer ":
                bearer = value[7:].strip()
        return own, api_key, bearer

    def _query_key(self, query: bytes) -> bytes | None:
        # latin-1 both ways: percent-escapes become the very bytes they stand for
        for name, value in parse_qsl(query.decode("latin-1"), encoding="latin-1"):
            if name == self._query and value:
                return value.encode("latin-1")
        return None


def _grants(config: Config, api: Api, own: list[Product]) -> dict[str, Product | None]:
    """Subscription id -> the product through which it may call `api`."""
    grants: dict[str, Product | None] = {}
    own_ids = {p.id: p for p in own}
    for sub in config.subscriptions:
        kind, _, target = sub.scope.partition(":")
        if kind == "all-apis" or (kind == "api" and target == api.id):
            grants[sub.id] = None
        elif kind == "product" and target in own_ids:
            grants[sub.id] = own_ids[target]
    return grants
