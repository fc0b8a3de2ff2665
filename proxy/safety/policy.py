"""`llm-content-safety` (SPEC §6): screen what a request asks a model to read and, with
`enforce-on-completions`, what the model answers.

A request's body is flattened (proxy/safety/flatten.py) into its system text and its user
text, and each is screened on its own, so a long benign system prompt never dilutes a
harmful user message:

- the local blocklists (top-level `blocklists:`) screen each text whole, on normalised text,
  and also the parts joined (a phrase split across parts); a hit blocks at once;
- the Content Safety backend (`backend-id`) gets each text as windows of `window-size`
  characters overlapping by `window-overlap-size` (a long paste is screened in pieces, never
  refused for its length): `text:analyze` for the categories and the backend's blocklists,
  and with `shield-prompt` `text:shieldPrompt` for user-prompt attacks in each window and
  for indirect attacks in what tools and documents returned (sent as its `documents`,
  within its limits of 5 and 10,000 characters a call). The text is sent
  normalised (look-alike letters folded, invisible characters removed, as the local screen
  sees it). The calls of one request run together, at most `_CONCURRENCY` at a time,
  bounded by `timeout` as a whole.

A backend named with no categories, no shield-prompt and none of its own blocklists screens
the four categories at threshold `DEFAULT_THRESHOLD` (4, medium), rather than nothing.

Block: a category's severity ≥ its threshold, any blocklist hit, or a prompt attack → 403
`ContentBlocked` naming the categories, blocklists or attack and where (system text, user
text, completion), never the text itself. A backend that fails or passes `timeout` is
`on-error`'s call: `block` (503 `ContentSafetyUnavailable`) or `allow`, logged once per
outage and counted either way.

Completions (`enforce-on-completions`): a whole reply is screened before it is returned,
each choice on its own; a stream is screened as it flows (`StreamGuard`): its events are held
back until enough new text has arrived (`FIRST_STEP` characters, then twice as many each
time, up to `stream-window-size`), then that text and the `window-overlap-size` characters
before it are screened and the held events go out. A
violation ends the stream with one `ContentBlocked` error event; nothing after it is sent.
A cache hit is screened as its reply would be.

Several policies in one pipeline all apply, in order; the first refusal wins. Requests are
screened before the semantic cache and the token limits: a blocked request costs no tokens.
A blocked completion is charged what the backend produced.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from functools import partial

from proxy.config import MAX_WINDOW, Api, Categories, Config, ContentSafety, PolicyEntry
from proxy.errors import ContentBlockedError, ContentSafetyUnavailableError, GatewayError
from proxy.exchange import Exchange
from proxy.policies.pipeline import ProductPipelines
from proxy.safety.azure import ContentSafetyClient, SafetyUnavailableError
from proxy.safety.flatten import flatten, windows
from proxy.safety.screen import LocalScreen, normalise
from proxy.telemetry import genai
from proxy.telemetry.metrics import Counter, Registry

log = logging.getLogger("tollway")

_CONCURRENCY = 8  # backend calls in flight for one screening
# Texts longer than this are flattened and screened locally on a worker thread: a regex pass
# over megabytes would otherwise hold the event loop for the whole of it.
INLINE_SCREEN_CHARS = 64 * 1024
_CATEGORIES = ("Hate", "SelfHarm", "Sexual", "Violence")
DEFAULT_THRESHOLD = 4  # medium, in both output types
_FIELDS = ("hate", "self_harm", "sexual", "violence")

TARGET = "tollway.content_safety.target"  # request | completion
RESULT = "tollway.content_safety.result"  # pass | block | error
REQUEST, COMPLETION = "request", "completion"
PASS, BLOCK, ERROR = "pass", "block", "error"

# (label, texts): one class of text screened on its own.
Classes = list[tuple[str, list[str]]]


class SafetyMetrics:
    """The policy's counter (a no-op without telemetry) and its outage log state."""

    __slots__ = ("checks", "down")

    def __init__(self, registry: Registry | None):
        self.checks: Counter | None = None
        if registry is not None:
            self.checks = registry.counter(
                genai.SAFETY_CHECKS, "{check}",
                "Content-safety screenings by API, target and result (error: the backend "
                "failed; on-error decided).",
                (genai.API_ID, TARGET, RESULT),
            )  # fmt: skip
        self.down: set[str] = set()

    def count(self, api_id: str, target: str, result: str) -> None:
        if self.checks is not None:
            self.checks.add(1, (api_id, target, result))

    def failed(self, backend_id: str, why: str, on_error: str) -> None:
        if backend_id not in self.down:
            self.down.add(backend_id)
            log.warning("tollway: content safety backend %s unavailable (%s): on-error: %s "
                        "until it answers again", backend_id, why, on_error)  # fmt: skip

    def answered(self, backend_id: str) -> None:
        if self.down and backend_id in self.down:
            self.down.discard(backend_id)
            log.warning("tollway: content safety backend %s answers again", backend_id)


class SafetyPolicy:
    """One compiled `llm-content-safety`."""

    def __init__(
        self,
        spec: ContentSafety,
        local: LocalScreen | None,
        client: ContentSafetyClient | None,
        metrics: SafetyMetrics,
    ):
        self.spec = spec
        self.local = local
        self.client = client
        self.metrics = metrics
        self.on_completions = spec.enforce_on_completions
        self._remote_lists = [n for n in spec.blocklists if local is None or n not in local.names]
        self._thresholds = _thresholds(spec.categories)
        if client is not None and not (
            self._thresholds or spec.shield_prompt or self._remote_lists
        ):
            # a backend with nothing named to ask it: the four categories at medium
            self._thresholds = dict.fromkeys(_CATEGORIES, DEFAULT_THRESHOLD)
        self._output_type = spec.categories.output_type if spec.categories else "FourSeverityLevels"
        self._timeout = float(spec.timeout)
        self._analyze = client is not None and bool(self._thresholds or self._remote_lists)

    async def screen(self, classes: Classes, documents: list[str] | None = None) -> list[str]:
        """The reasons to block `classes` (empty: nothing found). `documents` (a request's
        tool outputs and documents, already among `classes`) are also checked for indirect
        attacks; None: no Prompt Shields at all (a completion). Raises
        `ContentSafetyUnavailableError` when the backend fails and on-error is block."""
        large = sum(len(t) for _, texts in classes for t in texts) > INLINE_SCREEN_CHARS
        reasons = []
        if self.local is not None:
            if large:
                reasons = await asyncio.to_thread(self._screen_locally, classes)
            else:
                reasons = self._screen_locally(classes)
        if reasons or self.client is None:
            return reasons
        shield = documents is not None and self.spec.shield_prompt
        if not (self._analyze or shield):
            return reasons
        client = self.client
        try:
            async with asyncio.timeout(self._timeout):
                docs = documents if shield and documents else []
                if large:
                    pieces, batches = await asyncio.to_thread(self._pieces, classes, docs)
                else:
                    pieces, batches = self._pieces(classes, docs)
                reasons = await self._screen_remotely(client, pieces, shield, batches)
        except (SafetyUnavailableError, TimeoutError) as exc:
            why = str(exc) or f"no answer within {self._timeout:g} s"
            self.metrics.failed(client.backend_id, why, self.spec.on_error)
            if self.spec.on_error == "block":
                raise ContentSafetyUnavailableError from None
            raise _Unscreened from None
        self.metrics.answered(client.backend_id)
        return reasons

    def _screen_locally(self, classes: Classes) -> list[str]:
        assert self.local is not None
        reasons = []
        for label, texts in classes:
            for name in sorted(self.local.screen_all(texts)):
                reasons.append(f"blocklist {name} in the {label}")
        return reasons

    def _pieces(
        self, classes: Classes, documents: list[str]
    ) -> tuple[list[tuple[str, str]], list[list[str]]]:
        """The windows of `classes` and the `text:shieldPrompt` batches of `documents`."""
        return self._windows(classes), _batches(self._windows([("", [d]) for d in documents]))

    def _windows(self, classes: Classes) -> list[tuple[str, str]]:
        """`(label, window)` for each window of each class's text, normalised as the local
        screen sees it: look-alike letters, invisible and combining characters cannot hide
        a word from the service either."""
        size, overlap = self.spec.window_size, self.spec.window_overlap_size
        return [
            (label, window)
            for label, texts in classes
            for window in windows(normalise("\n".join(texts)), size, overlap)
        ]

    async def _screen_remotely(
        self,
        client: ContentSafetyClient,
        pieces: list[tuple[str, str]],
        shield: bool,
        documents: list[list[str]],
    ) -> list[str]:
        """Ask the service about each window (and each batch of documents: empty unless
        `shield`), at most `_CONCURRENCY` calls at a time."""
        calls: list[Callable[[], Awaitable[list[str]]]] = []
        for label, window in pieces:
            if self._analyze:
                calls.append(partial(self._analysis, client, window, label))
            if shield:
                calls.append(partial(_attack, client, window, label))
        calls += [partial(_indirect_attack, client, batch) for batch in documents]
        gate = asyncio.Semaphore(_CONCURRENCY)

        async def call(make: Callable[[], Awaitable[list[str]]]) -> list[str]:
            async with gate:
                return await make()

        tasks = [asyncio.ensure_future(call(make)) for make in calls]
        try:
            found = await asyncio.gather(*tasks)
        finally:  # one failed: the others' answers no longer matter
            for task in tasks:
                task.cancel()
        return list(dict.fromkeys(reason for reasons in found for reason in reasons))

    async def _analysis(self, client: ContentSafetyClient, text: str, label: str) -> list[str]:
        analysis = await client.analyze(
            text, list(self._thresholds), self._output_type, self._remote_lists
        )
        reasons = []
        for category, threshold in self._thresholds.items():
            severity = analysis.severities.get(category, 0)
            if severity >= threshold:
                reasons.append(
                    f"{category} (severity {severity}, threshold {threshold}) in the {label}"
                )
        reasons += [f"blocklist {name} in the {label}" for name in analysis.blocklists]
        return reasons


async def _attack(client: ContentSafetyClient, text: str, label: str) -> list[str]:
    user, _ = await client.shield(text)
    return [f"a prompt attack in the {label}"] if user else []


async def _indirect_attack(client: ContentSafetyClient, documents: list[str]) -> list[str]:
    _, found = await client.shield(None, documents)
    return ["a prompt attack in a tool output or document"] if found else []


_DOCUMENTS_PER_CALL = 5  # Prompt Shields' limits: 5 documents, 10,000 characters in all


def _batches(pieces: list[tuple[str, str]]) -> list[list[str]]:
    """Document windows grouped into `text:shieldPrompt` calls within the service's limits."""
    batches: list[list[str]] = []
    size = MAX_WINDOW + 1
    for _, window in pieces:
        if size + len(window) > MAX_WINDOW or len(batches[-1]) == _DOCUMENTS_PER_CALL:
            batches.append([])
            size = 0
        batches[-1].append(window)
        size += len(window)
    return batches


class _Unscreened(Exception):
    """The backend failed and on-error is allow: the text goes on unscreened."""


def _thresholds(categories: Categories | None) -> dict[str, int]:
    if categories is None:
        return {}
    pairs = zip(_CATEGORIES, (getattr(categories, f) for f in _FIELDS), strict=True)
    return {name: threshold for name, threshold in pairs if threshold is not None}


async def check(
    policies: Sequence[SafetyPolicy],
    classes: Classes,
    exchange: Exchange,
    target: str,
    documents: list[str] | None = None,
) -> None:
    """Screen `classes` with each policy in order; raise `ContentBlockedError` at the first
    that finds a reason (or `ContentSafetyUnavailableError`)."""
    for policy in policies:
        try:
            reasons = await policy.screen(classes, documents)
        except _Unscreened:
            policy.metrics.count(exchange.api_id, target, ERROR)
            exchange.event("tollway.content_safety.unscreened", ((TARGET, target),))
            continue
        except GatewayError:
            policy.metrics.count(exchange.api_id, target, ERROR)
            raise
        if reasons:
            policy.metrics.count(exchange.api_id, target, BLOCK)
            exchange.event("tollway.content_safety.block", ((TARGET, target),))
            what = "request" if target == REQUEST else "completion"
            raise ContentBlockedError(
                f"The {what} was blocked by the content safety policy: {'; '.join(reasons)}."
            )
        policy.metrics.count(exchange.api_id, target, PASS)


async def check_request(policies: Sequence[SafetyPolicy], body: bytes, exchange: Exchange) -> None:
    """Screen a request body (its system and user texts apart)."""
    if len(body) > INLINE_SCREEN_CHARS:
        texts = await asyncio.to_thread(flatten, body)
    else:
        texts = flatten(body)
    classes = [(label, parts) for label, parts in
               (("system text", texts.system), ("user text", texts.user)) if parts]  # fmt: skip
    if classes:
        await check(policies, classes, exchange, REQUEST, texts.documents)


async def check_reply(
    policies: Sequence[SafetyPolicy], choices: list[list[str]], exchange: Exchange
) -> None:
    """Screen a whole completion, each choice on its own."""
    classes = [(choice_label(i, len(choices)), parts) for i, parts in enumerate(choices) if parts]
    if classes:
        await check(policies, classes, exchange, COMPLETION)


def choice_label(index: int, count: int) -> str:
    return "completion" if count == 1 else f"completion (choice {index})"


class SafetyPolicies(ProductPipelines[SafetyPolicy]):
    """An API's content-safety policies: global, then the caller's product's, then the
    API's (SPEC §3 pipeline order)."""

    __slots__ = ()


def completion_policies(policies: Sequence[SafetyPolicy]) -> tuple[SafetyPolicy, ...]:
    return tuple(p for p in policies if p.on_completions)


Build = Callable[[ContentSafety], SafetyPolicy]


def safety_policies(config: Config, api: Api, build: Build) -> SafetyPolicies | None:
    """The compiled content-safety policies of `api`'s pipelines, or None when none apply.
    `build` compiles one (the composition root's clients); an entry used by several
    pipelines is compiled once."""
    made: dict[int, SafetyPolicy] = {}

    def compile_(entries: Sequence[PolicyEntry]) -> list[SafetyPolicy]:
        out = []
        for entry in entries:
            if isinstance(spec := entry.policy, ContentSafety):
                if id(spec) not in made:
                    made[id(spec)] = build(spec)
                out.append(made[id(spec)])
        return out

    products = {p.id: compile_(p.policies) for p in config.products}
    policies = SafetyPolicies(compile_(config.policies), products, compile_(api.policies))
    return policies if policies else None


def local_screen(spec: ContentSafety, config: Config) -> LocalScreen | None:
    """The local lists `spec` names (None when it names none)."""
    names = [n for n in spec.blocklists if n in config.blocklists]
    if not names:
        return None
    lists = {n: config.blocklists[n] for n in names}
    return LocalScreen({n: b.terms for n, b in lists.items()},
                       {n: b.patterns for n, b in lists.items()})  # fmt: skip
