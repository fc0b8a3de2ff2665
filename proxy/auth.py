"""Subscription keys: where a request's key is read from, and whom it identifies.

Keys are held only as SHA-256 digests. A presented key is hashed and looked up by digest;
the match is then confirmed with `hmac.compare_digest`, so neither the lookup nor the
comparison depends on how much of a secret an attacker guessed right.

The subscriptions are the config file's overlaid by the ones kept in the subscription store
(proxy/subscriptions.py). When that set changes, `KeyRing.replace` swaps in a new index and
every `ApiGuard.refresh` a new grant table, each built whole: a request only ever does dict
lookups. A key the ring does not know is `UnknownKeyError`; with a shared store the handler
then asks the store once (`ApiGuard.recheck`) before refusing, so a subscription another
gateway process made a moment ago works on the very next request here.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Iterable
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


class UnknownKeyError(SubscriptionKeyInvalidError):
    """A key no subscription known to this process has (a 401 unless the store knows it).
    Carries the key's digest, never the key."""

    def __init__(self, digest: bytes):
        super().__init__()
        self.digest = digest


# Asked with the digest of an unknown key: True when the store knew it and the ring now has it.
Resolve = Callable[[bytes], Awaitable[bool]]


class KeyRing:
    """Every active or suspended subscription by key digest; shared by all APIs.

    `resolve`, when set, is how a key this ring does not know is looked up in a shared
    subscription store (see the module docstring)."""

    def __init__(self, subscriptions: tuple[Subscription, ...], resolve: Resolve | None = None):
        self.subscriptions = subscriptions
        self.resolve = resolve
        self._by_digest = _index(subscriptions)

    def find(self, key: bytes) -> Subscription | None:
        digest = hashlib.sha256(key).digest()
        known, sub = self._by_digest.get(digest, (b"", None))
        return sub if hmac.compare_digest(known, digest) else None

    def replace(self, subscriptions: tuple[Subscription, ...]) -> None:
        """Swap in another set of subscriptions (a new index, built whole)."""
        self._by_digest = _index(subscriptions)
        self.subscriptions = subscriptions


def _index(subscriptions: Iterable[Subscription]) -> dict[bytes, tuple[bytes, Subscription]]:
    by_digest: dict[bytes, tuple[bytes, Subscription]] = {}
    for sub in subscriptions:
        for key in (sub.primary_key, sub.secondary_key):
            if key:
                digest = key_digest(key)
                by_digest[digest] = (digest, sub)
    return by_digest


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
        self._api_id, self._own = api.id, own
        self._grants = _grants(ring.subscriptions, api.id, own)

    def refresh(self) -> None:
        """Rebuild the grant table from the ring's subscriptions (after `KeyRing.replace`)."""
        self._grants = _grants(self._ring.subscriptions, self._api_id, self._own)

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
            if sub is None and self._ring.resolve is not None:
                raise UnknownKeyError(hashlib.sha256(key).digest())
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

    async def recheck(self, scope: Scope, miss: UnknownKeyError) -> Identity:
        """`identify` once more after asking the store about the key `identify` did not know;
        401 if the store does not know it either (or is down)."""
        resolve = self._ring.resolve
        if resolve is None or not await resolve(miss.digest):
            raise SubscriptionKeyInvalidError
        try:
            return self.identify(scope)
        except UnknownKeyError:
            raise SubscriptionKeyInvalidError from None

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


def _grants(
    subscriptions: Iterable[Subscription], api_id: str, own: list[Product]
) -> dict[str, Product | None]:
    """Subscription id -> the product through which it may call the API `api_id`."""
    grants: dict[str, Product | None] = {}
    own_ids = {p.id: p for p in own}
    for sub in subscriptions:
        kind, _, target = sub.scope.partition(":")
        if kind == "all-apis" or (kind == "api" and target == api_id):
            grants[sub.id] = None
        elif kind == "product" and target in own_ids:
            grants[sub.id] = own_ids[target]
    return grants
