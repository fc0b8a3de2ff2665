"""`tollway import` (SPEC §2): the portal's "Import an LLM API" flow, from a terminal.

Given an LLM endpoint and a few settings, ``import_api`` probes the backend (``GET
{url}/models`` for the openai type), adds a backend and an API - with the optional token,
caching and safety policies of the portal's tabs - to the YAML config, and replaces the file
atomically. Nothing is written unless every step succeeds.

The edit is ``proxy.yamledit``'s: the user's comments, key order, quoting and layout stay,
checked line by line (only an empty or flow-style ``backends``/``apis`` list may turn into a
block list); the new text must also load with the gateway's own loader
(``proxy.config.loads``). The probe is ``proxy.probe``'s.

The access key is never printed. ``--access-key-env VAR`` writes the reference ``${VAR}``
and reads the variable only for the probe, so the secret stays out of the file as well.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import stat
import tempfile
import typing
import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError
from ruamel.yaml.scalarstring import DoubleQuotedScalarString

from proxy import config as config_module
from proxy import yamledit
from proxy.config import (
    CacheLookup,
    CacheStore,
    Categories,
    Config,
    ConfigError,
    ContentSafety,
    Credentials,
    PolicyEntry,
    TokenLimit,
    TokenMetric,
)
from proxy.probe import ProbeError, probe_models
from proxy.units import Duration

__all__ = [
    "ImportRefusedError", "ImportSpec", "Outcome", "import_api", "slug", "summary",
]  # fmt: skip

_PERIOD = Literal["hourly", "daily", "weekly", "monthly", "yearly"]
_REFERENCE_RE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SKELETON = """\
# Tollway gateway config, started by `tollway import`. Check it with
#   tollway check-config {path}
# Keys are kebab-case and strict. ${VAR} is replaced by an environment variable (unset or
# empty is an error); ${VAR:-default} falls back to the default. Every key is described in
# config/tollway.yaml of the Tollway repository. A running gateway reloads this file on SIGHUP.

gateway:
  store: memory                          # memory | redis://host:6379/0
  console: true                          # the test console at /console
  admin-key: ${TOLLWAY_ADMIN_KEY:-}      # enables /admin/* when set

backends: []

apis: []

products: []

subscriptions: []                        # make a key with `tollway keys new`
"""


class ImportRefusedError(Exception):
    """The import cannot go ahead; the message says why in one line. Nothing was written."""


@dataclass(frozen=True, kw_only=True)
class ImportSpec:
    """What to import: the portal's fields and tabs, as the command line gives them."""

    name: str
    url: str
    path: str
    type: Literal["openai", "passthrough"] = "openai"
    id: str = ""  # default: slug(name)
    description: str = ""
    backend_id: str = ""  # default: the API id
    access_key_header: str = ""  # default Authorization when a key is given
    access_key: str = ""  # a literal key, written to the config as it is
    access_key_env: str = ""  # a variable name: ${VAR} in the config, its value for the probe
    products: tuple[str, ...] = ()
    subscription_required: bool = True
    tokens_per_minute: int | None = None
    token_quota: int | None = None
    token_quota_period: str | None = None  # default monthly
    counter_key: str | None = None  # default "{subscription.id}"
    emit_token_metric: bool = False
    token_metric_namespace: str = "tollway"
    semantic_cache_backend_id: str = ""
    semantic_cache_score_threshold: float | None = None  # default 0.05
    semantic_cache_duration: str | None = None  # default 1h
    content_safety_backend_id: str = ""
    content_safety_shield_prompt: bool = False
    content_safety_enforce_on_completions: bool = False
    content_safety_categories: tuple[str, ...] = ()  # NAME=THRESHOLD, e.g. "Hate=4"
    content_safety_output_type: str | None = None  # default FourSeverityLevels
    content_safety_blocklists: tuple[str, ...] = ()
    content_safety_on_error: str | None = None  # default block
    probe: bool = True

    def scrub(self, text: str) -> str:
        """``text`` with the literal access key (as given and as written) masked."""
        for secret in (self.access_key, self.access_key.replace("${", "$${")):
            if secret:
                text = text.replace(secret, "<access key>")
        return text


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """What ``import_api`` did (or, for a dry run, would do)."""

    api: config_module.Api
    backend: config_module.Backend
    config: Path
    models: tuple[str, ...] | None  # what the probe found; None: not probed
    created: bool  # the config file did not exist
    written: bool  # False for a dry run
    diff: str  # the change as a unified diff, the access key masked
    notes: tuple[str, ...] = ()


# --- the plan: flags checked with the config schema's own rules -----------------------------


def slug(name: str) -> str:
    """An API id from a display name: ``"My LLM (prod)"`` -> ``"my-llm-prod"``."""
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:64].rstrip("-")


@dataclass(frozen=True, kw_only=True)
class _Plan:
    api: config_module.Api
    backend: config_module.Backend
    header: str  # the access-key header, "" for none
    env_name: str  # the variable of --access-key-env, "" for none
    written_value: str  # its value in the config (a ${VAR} reference or the escaped key)
    probe_value: str  # its value for the probe


def _plan(spec: ImportSpec, env: Mapping[str, str]) -> _Plan:
    """The new backend, API and policies, each checked by the config schema's own rules."""
    api_id = spec.id or slug(spec.name)
    if not api_id:
        raise ImportRefusedError(f"cannot make an API id from --name {spec.name!r}; give --id")
    backend_id = spec.backend_id or api_id
    env_name = spec.access_key_env.removeprefix("${").removesuffix("}")
    header, written, probe = _credential(spec, env_name, env)
    path = spec.path if spec.path.startswith("/") else "/" + spec.path
    policies = _policies(spec)
    try:
        api = config_module.Api(
            id=api_id,
            display_name=spec.name,
            description=spec.description,
            path=path,
            type=spec.type,
            backend=backend_id,
            subscription_required=spec.subscription_required,
            products=spec.products,
            policies=policies,
        )
    except ValueError as exc:
        raise ImportRefusedError(_flag_error(str(exc), backend=False)) from None
    try:
        backend = config_module.Backend(
            id=backend_id,
            url=spec.url,
            credentials=Credentials(header=header, value=written) if header else None,
        )
    except ValueError as exc:
        raise ImportRefusedError(_flag_error(str(exc), backend=True)) from None
    return _Plan(api=api, backend=backend, header=header, env_name=env_name,
                 written_value=written, probe_value=probe)  # fmt: skip


def _flag_error(message: str, *, backend: bool) -> str:
    """The schema's "field: problem" said in terms of the command's flags."""
    field_, _, problem = message.partition(": ")
    flags = {
        "id": "--backend-id" if backend else "--id",
        "url": "--url",
        "path": "--path",
        "header": "--access-key-header",
        "value": "--access-key",
    }
    flag = flags.get(field_.split(".")[-1])
    return f"{flag}: {problem}" if flag else message


def _credential(spec: ImportSpec, name: str, env: Mapping[str, str]) -> tuple[str, str, str]:
    """(header, value written to the config, value sent by the probe); all "" without a key."""
    if spec.access_key and spec.access_key_env:
        raise ImportRefusedError("give --access-key or --access-key-env, not both")
    if not (spec.access_key or spec.access_key_env):
        if spec.access_key_header:
            raise ImportRefusedError("--access-key-header needs --access-key or --access-key-env")
        return "", "", ""
    header = spec.access_key_header or "Authorization"
    if name:
        if not _ENV_NAME_RE.fullmatch(name):
            raise ImportRefusedError(f"--access-key-env: {name!r} is not a variable name")
        key, written = env.get(name, ""), "${" + name + "}"
    else:
        key, written = spec.access_key, spec.access_key.replace("${", "$${")  # not a reference
    if header.lower() == "authorization" and " " not in (key or "x"):
        # `Authorization: <key>` is what nobody means; OpenAI-compatible servers want Bearer.
        key, written = "Bearer " + key if key else key, "Bearer " + written
    return header, written, key


def _policies(spec: ImportSpec) -> tuple[PolicyEntry, ...]:
    """The portal's optional tabs as policy entries, in the order they should run: screen
    first, then answer from the cache (a hit costs no tokens), then limit, count and store."""
    _check_policy_flags(spec)
    chosen: dict[str, Any] = {}  # PolicyEntry field -> policy, in order
    try:
        if spec.content_safety_backend_id or spec.content_safety_blocklists:
            chosen["llm_content_safety"] = _content_safety(spec)
        if spec.semantic_cache_backend_id:
            threshold = spec.semantic_cache_score_threshold
            chosen["llm_semantic_cache_lookup"] = CacheLookup(
                score_threshold=0.05 if threshold is None else threshold,
                embeddings_backend_id=spec.semantic_cache_backend_id,
            )
        if spec.tokens_per_minute is not None or spec.token_quota is not None:
            chosen["llm_token_limit"] = TokenLimit(
                counter_key="{subscription.id}" if spec.counter_key is None else spec.counter_key,
                tokens_per_minute=spec.tokens_per_minute,
                token_quota=spec.token_quota,
                token_quota_period=spec.token_quota_period or "monthly",  # type: ignore[arg-type]
            )
        if spec.emit_token_metric:
            chosen["llm_emit_token_metric"] = TokenMetric(namespace=spec.token_metric_namespace)
        if spec.semantic_cache_backend_id:
            duration = Duration(spec.semantic_cache_duration or "1h")
            chosen["llm_semantic_cache_store"] = CacheStore(duration=duration)
    except ValueError as exc:
        raise ImportRefusedError(_policy_error(str(exc))) from None
    return tuple(PolicyEntry(**{name: policy}) for name, policy in chosen.items())


def _check_policy_flags(spec: ImportSpec) -> None:
    """What the schema's constructors do not check (types and ranges are checked on decoding
    only) and flags that mean nothing without another."""
    for flag, number in (
        ("--tokens-per-minute", spec.tokens_per_minute),
        ("--token-quota", spec.token_quota),
    ):
        if number is not None and number < 1:
            raise ImportRefusedError(f"{flag}: must be at least 1, got {number}")
    if spec.token_quota_period is not None:
        if spec.token_quota is None:
            raise ImportRefusedError("--token-quota-period: needs --token-quota")
        if spec.token_quota_period not in typing.get_args(_PERIOD):
            periods = ", ".join(typing.get_args(_PERIOD))
            raise ImportRefusedError(
                f"--token-quota-period: {spec.token_quota_period!r} is not one of {periods}"
            )
    limited = spec.tokens_per_minute is not None or spec.token_quota is not None
    if spec.counter_key is not None and not limited:
        raise ImportRefusedError("--counter-key: needs --tokens-per-minute or --token-quota")
    cache = (spec.semantic_cache_score_threshold, spec.semantic_cache_duration)
    if cache != (None, None) and not spec.semantic_cache_backend_id:
        raise ImportRefusedError(
            "--semantic-cache-score-threshold and --semantic-cache-duration need "
            "--semantic-cache-backend-id (the embeddings backend)"
        )
    _check_safety_flags(spec)


# The schema's own choices and category names (``Hate``, ``SelfHarm``, ...: Categories'
# fields but output-type), so the flags cannot drift from what the loader accepts.
_OUTPUT_TYPES: tuple[str, ...] = typing.get_args(
    next(f.type for f in msgspec.structs.fields(Categories) if f.name == "output_type")
)
_ON_ERROR: tuple[str, ...] = typing.get_args(
    next(f.type for f in msgspec.structs.fields(ContentSafety) if f.name == "on_error")
)
_CATEGORY_FIELDS = {
    f.encode_name: f.name for f in msgspec.structs.fields(Categories) if f.name != "output_type"
}


def _check_safety_flags(spec: ImportSpec) -> None:
    """The content-safety tab: severities, prompt shields and the service's failures belong
    to the analysis backend (the local screen has only blocklists)."""
    for flag, value, choices in (
        ("--content-safety-output-type", spec.content_safety_output_type, _OUTPUT_TYPES),
        ("--content-safety-on-error", spec.content_safety_on_error, _ON_ERROR),
    ):
        if value is not None and _choice(value, choices) is None:
            raise ImportRefusedError(f"{flag}: {value!r} is not one of {', '.join(choices)}")
    if spec.content_safety_output_type is not None and not spec.content_safety_categories:
        raise ImportRefusedError("--content-safety-output-type: needs --content-safety-category")
    if not spec.content_safety_backend_id:
        for flag, given in (
            ("--content-safety-category", bool(spec.content_safety_categories)),
            ("--content-safety-output-type", spec.content_safety_output_type is not None),
            ("--content-safety-shield-prompt", spec.content_safety_shield_prompt),
            ("--content-safety-on-error", spec.content_safety_on_error is not None),
        ):
            if given:
                raise ImportRefusedError(
                    f"{flag}: needs --content-safety-backend-id (the analysis backend; the "
                    "local screen has only blocklists)"
                )
    if spec.content_safety_enforce_on_completions and not (
        spec.content_safety_backend_id or spec.content_safety_blocklists
    ):
        raise ImportRefusedError(
            "--content-safety-enforce-on-completions: needs --content-safety-backend-id or "
            "--content-safety-blocklist (nothing would screen the completions)"
        )
    for i, name in enumerate(spec.content_safety_blocklists):
        if not name.strip():
            raise ImportRefusedError("--content-safety-blocklist: a name must not be blank")
        if name in spec.content_safety_blocklists[:i]:
            raise ImportRefusedError(f"--content-safety-blocklist: {name!r} is given twice")


def _choice(value: str, choices: tuple[str, ...]) -> str | None:
    """The one of ``choices`` that ``value`` names, in any case; None for none."""
    return next((c for c in choices if c.lower() == value.lower()), None)


def _content_safety(spec: ImportSpec) -> ContentSafety:
    """The ``llm-content-safety`` policy of the flags (checked by _check_safety_flags)."""
    thresholds = _thresholds(spec.content_safety_categories)
    output_type = _choice(spec.content_safety_output_type or _OUTPUT_TYPES[0], _OUTPUT_TYPES)
    categories = Categories(output_type=output_type, **thresholds) if thresholds else None  # type: ignore[arg-type]
    return ContentSafety(
        backend_id=spec.content_safety_backend_id,
        shield_prompt=spec.content_safety_shield_prompt,
        enforce_on_completions=spec.content_safety_enforce_on_completions,
        categories=categories,
        blocklists=spec.content_safety_blocklists,
        on_error=_choice(spec.content_safety_on_error or "block", _ON_ERROR),  # type: ignore[arg-type]
    )


def _thresholds(items: tuple[str, ...]) -> dict[str, int]:
    """``("hate=4", "Violence=2")`` as Categories' keyword arguments ``{"hate": 4, ...}``."""
    thresholds: dict[str, int] = {}
    for item in items:
        name, equals, threshold = (part.strip() for part in item.partition("="))
        canonical = _choice(name, tuple(_CATEGORY_FIELDS))
        if not equals:
            problem = "is not NAME=THRESHOLD, e.g. Hate=4"
        elif canonical is None:
            problem = f"NAME is one of {', '.join(_CATEGORY_FIELDS)}"
        elif not re.fullmatch(r"[0-7]", threshold):
            problem = "THRESHOLD is a severity from 0 to 7"
        elif _CATEGORY_FIELDS[canonical] in thresholds:
            problem = f"{canonical} is given twice"
        else:
            thresholds[_CATEGORY_FIELDS[canonical]] = int(threshold)
            continue
        raise ImportRefusedError(f"--content-safety-category: {item!r}: {problem}")
    return thresholds


_POLICY_FLAGS = {
    "counter-key": "--counter-key",
    "score-threshold": "--semantic-cache-score-threshold",
    "namespace": "--token-metric-namespace",
    "duration": "--semantic-cache-duration",
}


def _policy_error(message: str) -> str:
    """The schema's "field: problem" (or a duration's problem) in terms of the flags."""
    field_, _, problem = message.partition(": ")
    if field_ in _POLICY_FLAGS:
        return f"{_POLICY_FLAGS[field_]}: {problem}"
    if message.startswith(("invalid duration", "duration must")):
        return f"--semantic-cache-duration: {message}"
    return message


def _conflicts(plan: _Plan, config: Config) -> Iterator[str]:
    """Why the plan cannot go into ``config``: ids and paths taken, references unknown."""
    api, backend = plan.api, plan.backend
    if any(a.id == api.id for a in config.apis):
        yield f"an API with id {api.id!r} exists already; choose another with --id"
    if any(b.id == backend.id for b in config.backends):
        yield f"a backend with id {backend.id!r} exists already; choose another with --backend-id"
    for other in config.apis:
        if other.path == api.path:
            yield f"path {api.path} is taken by API {other.id!r}; choose another --path"
        elif f"{api.path}/".startswith(f"{other.path}/") or f"{other.path}/".startswith(api.path):
            yield f"path {api.path} nests with {other.path} of API {other.id!r}; choose another"
    products = [p.id for p in config.products]
    for product in api.products:
        if product not in products:
            known = ", ".join(products) or "none"
            yield f"--product: no product {product!r} in the config (products: {known})"
    backends = {b.id for b in config.backends} | {backend.id}
    for entry in plan.api.policies:
        policy = entry.policy
        ref, flag = "", ""
        if isinstance(policy, CacheLookup):
            ref, flag = policy.embeddings_backend_id, "--semantic-cache-backend-id"
        elif isinstance(policy, ContentSafety):
            ref, flag = policy.backend_id, "--content-safety-backend-id"
            yield from _unheld_blocklists(policy, config)
        if ref and ref not in backends:
            yield f"{flag}: no backend {ref!r} in the config (nor the one being imported)"
        if isinstance(policy, TokenMetric) and _metric_namespaces(config) & {policy.namespace}:
            yield (
                f"--emit-token-metric: an llm-emit-token-metric with namespace "
                f"{policy.namespace!r} is configured already (it would count tokens twice); "
                "leave the flag out or give --token-metric-namespace"
            )


def _unheld_blocklists(policy: ContentSafety, config: Config) -> Iterator[str]:
    """Blocklists nothing would hold: not defined locally, and no service to ask."""
    if policy.backend_id:
        return  # a name the config does not define is the service's own list
    local = ", ".join(config.blocklists) or "none"
    for name in policy.blocklists:
        if name not in config.blocklists:
            yield (
                f"--content-safety-blocklist: {name!r} is not in the config's top-level "
                f"blocklists (local lists: {local}), and without --content-safety-backend-id "
                "no service holds it"
            )


def _metric_namespaces(config: Config) -> set[str]:
    entries = [e for _, e in config.policy_entries()]
    return {e.policy.namespace for e in entries if isinstance(e.policy, TokenMetric)}


# --- the edit: the plan as YAML nodes, appended by proxy.yamledit ----------------------------


def _edit(text: str, plan: _Plan, spec: ImportSpec) -> str:
    """``text`` with the plan's backend and API appended, layout kept, or ImportRefusedError."""
    additions = [("backends", _backend_entry(plan)), ("apis", _api_entry(plan, spec))]
    try:
        return yamledit.append_to_lists(text, additions)
    except yamledit.ParseError as exc:
        raise ImportRefusedError(f"cannot parse the config: {exc}") from None
    except yamledit.LineChangedError as exc:
        raise ImportRefusedError(
            f"cannot add to the config without changing its line {exc.number} "
            f"({exc.line.strip()[:60]!r}): ruamel.yaml would rewrite it (mixed indentation?); "
            "add the entries by hand"
        ) from None
    except yamledit.YamlEditError as exc:  # `backends: ...` not a list: the loader checks it
        raise ImportRefusedError(str(exc)) from None


def _backend_entry(plan: _Plan) -> CommentedMap:
    entry = CommentedMap([("id", plan.backend.id), ("url", plan.backend.url)])
    if plan.header:
        value = DoubleQuotedScalarString(plan.written_value)
        entry["credentials"] = _flow(CommentedMap([("header", plan.header), ("value", value)]))
    return entry


def _api_entry(plan: _Plan, spec: ImportSpec) -> CommentedMap:
    api = plan.api
    entry = CommentedMap([("id", api.id), ("display-name", api.display_name)])
    if api.description:
        entry["description"] = api.description
    entry.update([("path", api.path), ("type", api.type), ("backend", api.backend)])
    if not api.subscription_required:
        entry["subscription-required"] = False
    if api.products:
        entry["products"] = _flow(CommentedSeq(api.products))
    if api.policies:
        entry["policies"] = CommentedSeq(_policy_entry(p, spec) for p in api.policies)
    return entry


def _policy_entry(entry: PolicyEntry, spec: ImportSpec) -> CommentedMap:
    """``entry`` as a block mapping with the settings the flags gave (defaults unsaid)."""
    policy = entry.policy
    given = {
        TokenLimit: ("counter-key", "tokens-per-minute", "token-quota", "token-quota-period"),
        TokenMetric: ("namespace",),
        CacheLookup: ("score-threshold", "embeddings-backend-id"),
        CacheStore: ("duration",),
        ContentSafety: (
            "backend-id",
            "shield-prompt",
            "enforce-on-completions",
            "categories",
            "blocklists",
            "on-error",
        ),
    }[type(policy)]
    data: dict[str, Any] = msgspec.to_builtins(policy, enc_hook=str)
    settings = CommentedMap((k, data[k]) for k in given if data[k] not in (None, "", False, ()))
    if isinstance(policy, TokenLimit):
        settings["counter-key"] = DoubleQuotedScalarString(policy.counter_key)  # "{...}"
        if policy.token_quota is None:
            del settings["token-quota-period"]
    if isinstance(policy, ContentSafety):
        _safety_settings(settings, spec)
    if len(settings) == 1:  # {duration: 1h}, {namespace: tollway}
        _flow(settings)
    return CommentedMap([(entry.name, settings)])


def _safety_settings(settings: CommentedMap, spec: ImportSpec) -> None:
    """Content safety's settings as the flags gave them: on-error and output-type only when
    given (their defaults are always there), categories and blocklists on one line each."""
    if spec.content_safety_on_error is None:
        del settings["on-error"]
    if "categories" in settings:  # {output-type: ..., Hate: 4, SelfHarm: None, ...}
        given = {k: v for k, v in settings["categories"].items() if v is not None}
        if spec.content_safety_output_type is None:
            del given["output-type"]
        settings["categories"] = _flow(CommentedMap(given))
    if "blocklists" in settings:
        settings["blocklists"] = _flow(CommentedSeq(settings["blocklists"]))


def _flow(node: CommentedMap | CommentedSeq) -> Any:
    node.fa.set_flow_style()
    return node


# --- validation and writing -----------------------------------------------------------------


def _stand_ins(text: str, env: Mapping[str, str], also: str = "") -> dict[str, str]:
    """Values for the ``${VAR}`` references without default (and ``also``) that ``env``
    leaves unset, so the config can be checked here although its secrets may live only where
    the gateway runs. Each passes for a key, a credential or a URL."""
    names = {also} if also and not env.get(also) else set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str):
            for match in _REFERENCE_RE.finditer(node):
                if match[1] and match[2] is None and not env.get(match[1]):
                    names.add(match[1])

    with contextlib.suppress(YAMLError, ValueError):  # the loader will say what is wrong
        walk(YAML(typ="safe", pure=True).load(text))
    return {name: f"http://stand-in.invalid/{name}" for name in sorted(names)}


def _load(text: str, env: Mapping[str, str], stand_ins: Mapping[str, str]) -> Config:
    """``proxy.config.loads(text)``, with the stand-ins when ``env`` alone fails. Of two
    failures, the one with the stand-ins is reported unless a stand-in caused it."""
    try:
        return config_module.loads(text, env)
    except ConfigError as exc:
        if not stand_ins:
            raise
        error = exc
    try:
        return config_module.loads(text, {**env, **stand_ins})
    except ConfigError as exc:
        raise (error if "stand-in.invalid" in str(exc) else exc) from None


def _write(path: Path, text: str, before: bytes | None) -> None:
    """Replace ``path`` by ``text`` atomically (temp file + rename), keeping its mode (and
    owner, where allowed); a symlink's target is replaced. Refused if the file changed since
    it was read."""
    target = path.resolve() if path.is_symlink() else path
    if before is None:
        target.parent.mkdir(parents=True, exist_ok=True)
        mode, owner = 0o666 & ~_umask(), None
    else:
        info = target.stat()
        mode, owner = stat.S_IMODE(info.st_mode), (info.st_uid, info.st_gid)
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp, mode)
        if owner is not None:
            with contextlib.suppress(PermissionError):  # as root: keep the file's owner
                os.chown(temp, *owner)
        now = target.read_bytes() if target.exists() else None
        if now != before:
            raise ImportRefusedError(f"{path} changed while importing; run the import again")
        os.replace(temp, target)
    except BaseException:
        os.unlink(temp)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# --- the flow -------------------------------------------------------------------------------


def import_api(
    spec: ImportSpec,
    config_path: str | os.PathLike[str],
    *,
    dry_run: bool = False,
    env: Mapping[str, str] | None = None,
) -> Outcome:
    """Import ``spec`` into the config at ``config_path`` (made from a short skeleton when
    missing); raises ``ImportRefusedError`` with nothing written when any step fails."""
    env = os.environ if env is None else env
    path = Path(config_path)
    try:
        before = path.read_bytes() if path.exists() else None
        old = before.decode("utf-8") if before is not None else ""
    except (OSError, UnicodeDecodeError) as exc:
        raise ImportRefusedError(f"cannot read {path}: {exc}") from None
    if not old.strip():
        old = SKELETON.replace("{path}", str(path))
    plan = _plan(spec, env)
    stand_ins = _stand_ins(old, env, also=plan.env_name)
    try:
        current = _load(old, env, stand_ins)
    except ConfigError as exc:
        raise ImportRefusedError(
            f"{path} does not load as it is: {exc.errors[0]} (see tollway check-config {path})"
        ) from None
    if problems := list(_conflicts(plan, current)):
        raise ImportRefusedError("; ".join(problems))
    new = _edit(old, plan, spec)
    models = _probe(spec, plan, env)
    try:
        _load(new, env, stand_ins)
    except ConfigError as exc:  # a gap in the checks above; the file is left alone
        raise ImportRefusedError(f"the result would not load: {exc.errors[0]}") from None
    if not dry_run:
        try:
            _write(path, new, before)
        except OSError as exc:
            raise ImportRefusedError(f"cannot write {path}: {exc}") from None
    diff = difflib.unified_diff(
        old.splitlines(keepends=True) if before else [], new.splitlines(keepends=True),
        str(path) if before else "/dev/null", str(path),
    )  # fmt: skip
    return Outcome(
        api=plan.api, backend=plan.backend, config=path, models=models, created=before is None,
        written=not dry_run, diff=spec.scrub("".join(diff)), notes=_notes(spec, plan, stand_ins),
    )  # fmt: skip


def _probe(spec: ImportSpec, plan: _Plan, env: Mapping[str, str]) -> tuple[str, ...] | None:
    if not spec.probe or spec.type != "openai":
        return None
    if plan.env_name and not env.get(plan.env_name):
        raise ImportRefusedError(
            f"--access-key-env: {plan.env_name} is not set here, so the backend cannot "
            "be probed; set it, or skip the probe with --no-probe"
        )
    try:
        return tuple(probe_models(plan.backend.url, plan.header, plan.probe_value))
    except ProbeError as exc:
        raise ImportRefusedError(str(exc)) from None


def _notes(spec: ImportSpec, plan: _Plan, stand_ins: Mapping[str, str]) -> tuple[str, ...]:
    notes = []
    if stand_ins:
        names = ", ".join(stand_ins)
        notes.append(f"checked with stand-ins for {names}: not set here; the gateway needs them")
    if spec.access_key:
        notes.append("the access key is in the file in the clear (--access-key-env keeps it out)")
    return tuple(notes)


def summary(outcome: Outcome) -> str:
    """What was imported and what to do next, for the terminal."""
    api, backend, models = outcome.api, outcome.backend, outcome.models
    verb = "Imported" if outcome.written else "Dry run: would import"
    lines = [f"{verb} API {api.id!r} ({api.type}) at {api.path} -> {backend.url}"]
    if models:
        more = f" and {len(models) - 8} more" if len(models) > 8 else ""
        found = f"{len(models)} model(s): {', '.join(models[:8])}{more}"
        lines.append(f"  probe: GET {backend.url}/models found {found}")
    elif models is not None:
        lines.append(f"  probe: GET {backend.url}/models found no models")
    else:
        why = "a passthrough API has no model list" if api.type == "passthrough" else "--no-probe"
        lines.append(f"  probe: none ({why})")
    lines.append(f"  policies: {', '.join(p.name for p in api.policies) or 'none'}")
    lines += [f"  note: {note}" for note in outcome.notes]
    state = "created" if outcome.created else "updated"
    if outcome.written:
        lines.append(f"Config {state}: {outcome.config}")
    else:
        lines.append(f"Dry run: {outcome.config} not {state}")
    model = models[0] if models else "gpt-4o-mini"
    lines += [
        "",
        "Next:",
        "  a running gateway picks it up on   kill -HUP <gateway pid>",
        "    or with the admin API:           curl -X POST http://localhost:8080/admin/reload "
        '-H "Authorization: Bearer $TOLLWAY_ADMIN_KEY"',
        f"  not running yet:                   tollway serve --config {outcome.config}",
        "  try it in the console:             http://localhost:8080/console",
    ]
    if api.type == "openai":
        body = f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}]}}'
        lines.append(
            f"  or: curl http://localhost:8080{api.path}/chat/completions "
            f"-H \"api-key: <subscription key>\" -H content-type:application/json -d '{body}'"
        )
    return "\n".join(lines)
