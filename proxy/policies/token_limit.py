"""`llm-token-limit` (SPEC §6): reserve before forwarding, settle exactly once at the end.

Each policy in a request's pipeline names a counter (its rendered `counter-key`) with a rate
window and/or a quota. Admission reserves the estimated prompt (and, with
`reserve-completion-tokens`, the completion bound the request sets) against every policy in
turn; the first refusal wins and the reservations already made are released, so a refused
request leaves nothing behind. When the request ends — however it ends — `Metering.settle`
replaces every reservation with the tokens actually used. Handlers know this module and the
`Limiter` protocol, never a concrete store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence

from proxy.config import Api, Config, PolicyEntry, TokenLimit, parse_template
from proxy.errors import (
    BackendConnectionError,
    BackendConnectTimeoutError,
    BackendUnavailableError,
    TokenLimitExceededError,
    TokenQuotaExceededError,
)
from proxy.estimate import CompletionCounter, completion_reserve, prompt_tokens
from proxy.exchange import Exchange
from proxy.limits.base import Limit, Limiter, Refused, Reservation
from proxy.policies.pipeline import ProductPipelines
from proxy.policies.templates import exchange_field, render
from proxy.schemas import RequestView
from proxy.tokens import TokenizerRegistry
from proxy.types import Headers, Scope

# Errors before any backend answered: nothing to bill (a reset connection may have been
# read by the backend, but backends bill no request they did not answer).
NEVER_SENT = (BackendConnectionError, BackendConnectTimeoutError, BackendUnavailableError)
log = logging.getLogger("tollway")
MAX_LIMITS = 4096  # resolved counter keys remembered per policy


# What a header a policy names reports (TokenLimitPolicy.reported)
REMAINING_TOKENS, REMAINING_QUOTA, CONSUMED = range(3)


class TokenLimitPolicy:
    """One configured `llm-token-limit`, its counter-key template parsed once."""

    __slots__ = (
        "_field", "_key", "_limits", "counts_completion", "counts_prompt", "limiter",
        "reported", "spec",
    )  # fmt: skip

    def __init__(self, spec: TokenLimit, limiter: Limiter):
        self.spec = spec
        self.limiter = limiter
        self._key = parse_template(spec.counter_key)
        self._field = exchange_field(self._key)  # e.g. "subscription_id" for that one variable
        # what an admission reserves: the prompt estimate, the completion bound, or both
        self.counts_prompt = spec.estimate_prompt_tokens
        self.counts_completion = spec.reserve_completion_tokens
        self._limits: dict[str, Limit] = {}  # by rendered key: one Limit per counter
        # the headers it names, as sent, with what each reports
        self.reported = tuple(
            (name.lower().encode("latin-1"), kind)
            for name, kind in (
                (spec.remaining_tokens_header_name, REMAINING_TOKENS),
                (spec.remaining_quota_tokens_header_name, REMAINING_QUOTA),
                (spec.tokens_consumed_header_name, CONSUMED),
            )
            if name
        )

    def limit(self, exchange: Exchange, scope: Scope, subscription_name: str) -> Limit:
        field = self._field
        if field is not None:
            key = getattr(exchange, field)
        else:
            key = render(self._key, exchange, scope, subscription_name)
        found = self._limits.get(key)
        if found is None:
            if len(self._limits) >= MAX_LIMITS:  # keys can come from clients (headers)
                self._limits.clear()
            spec = self.spec
            found = Limit(key, spec.tokens_per_minute, spec.token_quota, spec.token_quota_period)
            self._limits[key] = found
        return found


def _refusal(
    policy: TokenLimitPolicy, limit: Limit, refused: Refused, tokens: int
) -> TokenLimitExceededError | TokenQuotaExceededError:
    spec = policy.spec
    headers = tuple(
        (name, str(value))
        for name, value in (
            (spec.remaining_tokens_header_name, refused.remaining_tokens),
            (spec.remaining_quota_tokens_header_name, refused.remaining_quota),
        )
        if name and value is not None
    )
    if refused.reason == "quota":
        return TokenQuotaExceededError(
            refused.retry_after, spec.retry_after_header_name, headers=headers
        )
    detail = ""
    if limit.tokens_per_minute is not None and tokens > limit.tokens_per_minute:
        detail = (
            f"This request needs {tokens} tokens, more than the limit of "
            f"{limit.tokens_per_minute} tokens per minute allows at once."
        )
    return TokenLimitExceededError(
        refused.retry_after, spec.retry_after_header_name, detail=detail, headers=headers
    )


class TokenLimits(ProductPipelines[TokenLimitPolicy]):
    """An API's token-limit policies: global, then the caller's product's, then the API's
    (SPEC §3 pipeline order), with the tokenizers that estimate for them."""

    __slots__ = ("tokenizers",)

    def __init__(
        self,
        global_: Sequence[TokenLimitPolicy],
        products: Mapping[str, Sequence[TokenLimitPolicy]],
        api: Sequence[TokenLimitPolicy],
        tokenizers: TokenizerRegistry | None,
    ):
        super().__init__(global_, products, api)
        self.tokenizers = tokenizers


# Prompts up to this size are estimated inline; larger ones on a worker thread (tiktoken and
# HF tokenizers release the GIL while they encode).
INLINE_ESTIMATE_BYTES = 32 * 1024


class Metering:
    """One request's token accounting: the prompt estimate, the reservations across its
    token-limit policies (all admitted or none), the streamed completion count, and what to
    charge however the request ends, settled exactly once."""

    __slots__ = ("consumed", "counter", "held", "prompt", "reserve", "settled")

    def __init__(self) -> None:
        self.held: list[tuple[TokenLimitPolicy, Reservation]] = []
        self.prompt = self.reserve = 0
        self.consumed = 0  # the tokens charged: reserved until settled, then used
        self.counter: CompletionCounter | None = None
        self.settled = False

    async def admit(
        self,
        limits: TokenLimits,
        policies: Sequence[TokenLimitPolicy],
        view: RequestView,
        body_size: int,
        exchange: Exchange,
        scope: Scope,
        subscription_name: str,
    ) -> None:
        """Estimate, then reserve against every policy in pipeline order; the first refusal
        raises 429/403 having released what the policies before it took."""
        assert limits.tokenizers is not None  # made whenever a token limit is configured
        count = limits.tokenizers.for_model(exchange.model).count
        if body_size <= INLINE_ESTIMATE_BYTES:
            prompt = prompt_tokens(view, count, exchange.model)
        else:
            prompt = await asyncio.to_thread(prompt_tokens, view, count, exchange.model)
        bound = exchange.max_tokens  # the handler read it
        reserve = 0 if bound is None else completion_reserve(view, bound)
        self.prompt, self.reserve = prompt, reserve
        if exchange.stream:  # only streams are counted from their deltas
            self.counter = CompletionCounter(count)
        held = self.held
        for policy in policies:
            limit = policy.limit(exchange, scope, subscription_name)
            # What this policy reserves: at least 1, so a counter already at its limit
            # refuses even a request whose size is not estimated.
            tokens = (prompt if policy.counts_prompt else 0) + (
                reserve if policy.counts_completion else 0
            ) or 1
            limiter = policy.limiter
            result = limiter.admit_now(limit, tokens)
            if result is None:
                result = await limiter.admit(limit, tokens)
            if isinstance(result, Refused):
                await self._release()
                refusal = _refusal(policy, limit, result, tokens)
                exchange.event(
                    "tollway.token_limit.refused",
                    (
                        ("tollway.token_limit.code", refusal.code),
                        ("tollway.token_limit.retry_after", refusal.retry_after),
                        ("tollway.token_limit.requested", prompt + reserve),
                    ),
                )
                raise refusal
            held.append((policy, result))
            if tokens > self.consumed:
                self.consumed = tokens

    def charge(self, exchange: Exchange, error: BaseException | None) -> int:
        """The tokens this request cost, however it ended (README "Token limits")."""
        usage = exchange.usage
        if usage is not None:
            return usage.total_tokens or usage.prompt_tokens + usage.completion_tokens
        if exchange.status >= 400:
            return 0  # the backend refused it (backends bill no failed request)
        if isinstance(error, NEVER_SENT) and not exchange.started:
            return 0  # it never reached a backend
        produced = self.counter.tokens() if self.counter is not None else 0
        if exchange.status == 200 and not exchange.stream and error is None:
            return self.prompt + self.reserve  # a whole reply without usage: the reservation
        return self.prompt + produced  # timeouts, disconnects, a stream cut short

    def headers(self) -> Headers:
        """The headers the policies name: remaining tokens and quota (the smallest where two
        policies use one name) and the tokens consumed. Before the settlement (a stream's
        start) they report the admission and what it reserved; after it (a whole reply), the
        admission corrected by what the settlement gave back or charged beyond, and what
        was charged (the stores' own counts are not read again: that would be a round trip)."""
        consumed = self.consumed
        settled = self.settled
        held = self.held
        # One policy names each header once (config.TokenLimit): no smallest to find.
        smallest: dict[bytes, int] | None = {} if len(held) > 1 else None
        out: Headers = []
        for policy, reservation in held:
            back = reservation.tokens - consumed if settled else 0  # < 0: used beyond it
            # (comparisons rather than min()/max(): this runs on every reply)
            for name, kind in policy.reported:
                if kind == CONSUMED:
                    value = consumed
                else:
                    left = (
                        reservation.remaining_tokens
                        if kind == REMAINING_TOKENS
                        else reservation.remaining_quota
                    )
                    if left is None:
                        continue  # the policy does not limit it
                    value = left + back if left + back > 0 else 0
                if smallest is None:
                    out.append((name, b"%d" % value))
                elif name not in smallest or value < smallest[name]:
                    smallest[name] = value
        if smallest is not None:
            for name, value in smallest.items():  # a loop: cheaper than a comprehension
                out.append((name, b"%d" % value))
        return out

    def settle(self, exchange: Exchange, error: BaseException | None) -> None:
        """Replace every reservation with what the request cost; later calls do nothing.
        Nothing is awaited (so a cancelled request settles too): the stores apply it at once
        or send it with the loop turn's others, and a store that cannot take it keeps it for
        replay (proxy/limits/failover.py)."""
        if self.settled:
            return
        self.settled = True
        used = self.consumed = self.charge(exchange, error)
        for policy, reservation in self.held:
            try:
                policy.limiter.settle_soon(reservation, used)
            except Exception:  # a bug: the request itself must still end cleanly
                log.exception("token-limit settle failed for %r", reservation.limit.key)

    async def _release(self) -> None:
        held, self.held = self.held, []
        for policy, reservation in held:
            try:
                await policy.limiter.release(reservation)
            except Exception:
                log.exception("token-limit release failed for %r", reservation.limit.key)


def token_limits(
    config: Config, api: Api, limiter: Limiter, tokenizers: TokenizerRegistry | None
) -> TokenLimits | None:
    """The compiled token-limit policies that apply to `api`, or None when none do."""

    def compile_(entries: Sequence[PolicyEntry]) -> list[TokenLimitPolicy]:
        return [
            TokenLimitPolicy(e.policy, limiter) for e in entries if isinstance(e.policy, TokenLimit)
        ]

    products = {p.id: compile_(p.policies) for p in config.products}
    limits_ = TokenLimits(compile_(config.policies), products, compile_(api.policies), tokenizers)
    return limits_ if limits_ else None


def uses_token_limits(config: Config) -> bool:
    """Does any pipeline in `config` hold an llm-token-limit (so tokenizers must load)?"""
    return any(isinstance(e.policy, TokenLimit) for _, e in config.policy_entries())
