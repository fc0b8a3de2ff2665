"""The composition root: `create_app(config)` builds every concrete thing and wires it up.

`Gateway` is the ASGI callable Granian serves. Its lifespan opens the backends' connection
pools and closes them on shutdown; a failed start is reported with `lifespan.startup.failed`
(Granian otherwise keeps serving without lifespan). SIGHUP reloads the config file: the new
`Runtime` is built and opened beside the old one and swapped in whole, or the old one stays
and the log says why; the old one is closed once its in-flight requests are done.

The subscriptions in force are the config file's overlaid by the subscription store's
(proxy/subscriptions.py), which outlives reloads like the token-limit store; when the store's
records change, the current runtime's key index and grant tables are rebuilt whole. The
console (`/console`) and the admin API (`/admin`) are sections of their own, rebuilt on
reload since `gateway.console` and `gateway.admin-key` may change.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any

import msgspec

from proxy import config as config_module
from proxy.accesslog import AccessLog
from proxy.admin import AdminApi
from proxy.asgi import JSON_TYPE, ClientDisconnected, error_body, error_headers, send_response
from proxy.auth import ApiGuard, KeyRing
from proxy.cache.parts import CacheParts
from proxy.clients import ClientAddress
from proxy.config import CacheLookup, CacheStore, Config, ContentSafety, Subscription
from proxy.console import ConsoleEndpoint
from proxy.dispatch import BackendHealth, Backends, per_backend
from proxy.errors import GatewayError, InvalidRequestError, MethodNotAllowedError
from proxy.exchange import Exchange
from proxy.handlers import ApiHandler, OpenAIHandler, PassthroughHandler
from proxy.limits.base import Limiter
from proxy.limits.failover import FailoverLimiter
from proxy.limits.lease import LeasingLimiter
from proxy.limits.memory import MemoryLimiter
from proxy.limits.redis import RedisLimiter
from proxy.openapi import PATH as OPENAPI_PATH
from proxy.openapi import OpenAPIEndpoint
from proxy.policies.token_limit import token_limits, uses_token_limits
from proxy.policies.token_metric import token_metrics
from proxy.relay import Truncated, error_event
from proxy.routing import Router
from proxy.safety.azure import ContentSafetyClient
from proxy.safety.policy import SafetyMetrics, SafetyPolicy, local_screen, safety_policies
from proxy.sharedbreakers import SharedBreakers
from proxy.subscriptions import Signature, Subscriptions, file_signature, open_store
from proxy.telemetry import export, genai, otlp, otlpenv
from proxy.telemetry.metrics import Gauge, Registry
from proxy.telemetry.prometheus import CONTENT_TYPE as PROMETHEUS_TYPE
from proxy.telemetry.recorder import NoTelemetry, Telemetry, gateway_id
from proxy.telemetry.resource import resource_attributes, version
from proxy.telemetry.shared import ENV as SHARED_ENV
from proxy.telemetry.shared import Snapshots
from proxy.telemetry.tracecontext import Sampler
from proxy.tokens import TokenizerRegistry
from proxy.types import Message, Receive, Scope, Send

if TYPE_CHECKING:  # proxy.cache (numpy) is imported only when a config has a lookup
    from proxy.cache.base import Embedder
    from proxy.cache.policy import SemanticCache, SemanticCaches

log = logging.getLogger("tollway")
_ENDPOINT_METHODS = ("GET", "HEAD")  # of /healthz, /readyz, /metrics, /openapi.json
_SECTIONS = ("/console", "/admin")  # whole path trees served by their own modules
Section = Callable[[Scope, Receive, Send], Awaitable[None]]
Endpoint = Callable[[Scope, Send], Awaitable[None]]
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
_BODY_BROKEN = "The request body is malformed or ended early."
# `tollway serve` puts its own pid here: the Granian parent that forwards SIGHUP to every worker.
SERVER_ENV = "TOLLWAY_SERVER_PID"
_encoder = msgspec.json.Encoder()


class Runtime:
    """Everything built from one config; replaced whole on reload."""

    def __init__(
        self,
        config: Config,
        limiter: Limiter,
        registry: Registry | None = None,
        health: BackendHealth | None = None,
        subscriptions: Subscriptions | None = None,
        cache_parts: CacheParts | None = None,
    ):
        self.config = config
        self.backends = Backends(config, health)
        self.caches: list[SemanticCaches] = []
        self.cache_sizes: set[int] = set()  # the in-process indexes its caches use
        self._embedders: dict[tuple[str, str], Embedder] = {}
        self._registry = registry
        self._safety_clients: dict[str, ContentSafetyClient] = {}
        self._safety_metrics: SafetyMetrics | None = None
        self._cache_parts = cache_parts or CacheParts(config, registry)
        cached = _cache_policies(config)
        if CacheStore in cached and CacheLookup not in cached:
            log.warning("tollway: llm-semantic-cache-store without any llm-semantic-cache-lookup "
                        "stores nothing")  # fmt: skip
        if CacheLookup in cached:
            from proxy.cache.policy import semantic_caches
        tokenizers = TokenizerRegistry(config.tokenizers) if uses_token_limits(config) else None
        self.router: Router[ApiHandler] = Router()
        self.client_address = ClientAddress(config.gateway.trusted_proxies)
        self.active = 0
        in_force, resolve = config.subscriptions, None
        if subscriptions is not None:
            in_force = subscriptions.effective(config)
            if subscriptions.shared:  # a key not known here is looked up in the store first
                resolve = subscriptions.resolve
        self.ring = KeyRing(in_force, resolve)
        self.guards: list[ApiGuard] = []
        max_body = int(config.gateway.max_request_body)
        for api in config.apis:
            guard = ApiGuard(config, api, self.ring)
            self.guards.append(guard)
            if api.type == "openai":
                limits = token_limits(config, api, limiter, tokenizers)
                metrics = token_metrics(config, api, registry, gateway_id())
                caches = None
                if CacheLookup in cached:
                    caches = semantic_caches(config, api, self._semantic_cache)
                if caches is not None:
                    self.caches.append(caches)
                safety = safety_policies(config, api, self._safety_policy)
                openai = OpenAIHandler(api, guard, self.backends, max_body, limits, metrics, caches,
                                       safety)  # fmt: skip
                self.router.add_openai(api.path, openai)
            else:
                handler = PassthroughHandler(api, guard, self.backends, max_body)
                self.router.add_passthrough(api.path, handler)

    def _semantic_cache(self, lookup: CacheLookup, store: CacheStore | None) -> SemanticCache:
        from proxy.cache.embed import BackendEmbedder
        from proxy.cache.policy import SemanticCache

        parts = self._cache_parts
        if lookup.embedder == "local":
            embedder = parts.local_embedder()
        else:
            key = (lookup.embeddings_backend_id, lookup.embeddings_model)
            if key not in self._embedders:
                route = self.backends.route(lookup.embeddings_backend_id)
                self._embedders[key] = BackendEmbedder(route, *key)
            embedder = self._embedders[key]
        index = parts.index(lookup.max_entries)
        self.cache_sizes.add(lookup.max_entries)
        return SemanticCache(lookup, store, embedder, index, parts.metrics, parts.outage)

    def _safety_policy(self, spec: ContentSafety) -> SafetyPolicy:
        if self._safety_metrics is None:
            self._safety_metrics = SafetyMetrics(self._registry)
        client = None
        if spec.backend_id:
            if spec.backend_id not in self._safety_clients:
                route = self.backends.route(spec.backend_id)
                self._safety_clients[spec.backend_id] = ContentSafetyClient(route, spec.backend_id)
            client = self._safety_clients[spec.backend_id]
        local = local_screen(spec, self.config)
        return SafetyPolicy(spec, local, client, self._safety_metrics)

    def use_subscriptions(self, subscriptions: tuple[Subscription, ...]) -> None:
        """Put another set of subscriptions in force (index and grants rebuilt whole)."""
        self.ring.replace(subscriptions)
        for guard in self.guards:
            guard.refresh()

    async def open(self) -> None:
        await self.backends.open()

    async def close(self) -> None:
        for caches in self.caches:  # the replies being stored go out on these connections
            await caches.drain()
        for embedder in self._embedders.values():  # and the embeddings being asked for
            await embedder.close()
        await self.backends.close()


class Gateway:
    """The gateway's ASGI application."""

    def __init__(
        self, config: Config, *, config_path: str | None = None, log_stream: IO[bytes] | None = None
    ):
        self.limiter = make_limiter(config)
        self.failover = failover_of(self.limiter)
        self.health = BackendHealth(make_shared_breakers(self.failover))
        self._loop: asyncio.AbstractEventLoop | None = None
        self.telemetry, self.exporter = make_telemetry(config, self.failover, self._gauges)
        self.subscriptions = Subscriptions(open_store(config), self._subscriptions_changed)
        self.cache_parts = CacheParts(config, self.telemetry.registry)
        self.runtime = self._runtime(config)
        self.telemetry.use_backends(backend_urls(config))
        self.config_path = config_path
        self.access_log = AccessLog(config.telemetry.access_log, log_stream)
        self.ready = False
        self._retired: set[asyncio.Task[Any]] = set()
        self._echo: Signature | None = None  # see admin_reload
        self._endpoints: dict[str, Endpoint] = {"/healthz": self._healthz, "/readyz": self._readyz}
        if config.telemetry.prometheus:
            self._endpoints["/metrics"] = self._metrics
        self._endpoints[OPENAPI_PATH] = OpenAPIEndpoint(config)
        # (prefix, handler) for the path trees under _SECTIONS that are switched on
        self._sections: list[tuple[str, Section]] = self._make_sections(config)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        endpoint = self._endpoints.get(path)
        if endpoint is not None:
            await _endpoint(endpoint, scope, _stamped(scope, send))
            return
        if path.startswith(_SECTIONS) and (section := self._section(path)) is not None:
            await section(scope, receive, _stamped(scope, send))
            return
        runtime, telemetry = self.runtime, self.telemetry
        runtime.active += 1
        exchange = Exchange(
            scope["method"], path, _request_id(scope), runtime.client_address.of(scope)
        )
        telemetry.begin(exchange, scope)
        try:
            await self._serve(runtime, exchange, scope, receive, send)
        finally:
            runtime.active -= 1
            self.access_log.write(exchange)
            telemetry.finish(exchange)

    async def _serve(
        self, runtime: Runtime, ex: Exchange, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """Route and handle one request; the one place that renders errors (STYLE §8)."""
        try:
            match = runtime.router.match(ex.method, ex.path, scope.get("raw_path") or b"")
            handler = match.target
            ex.api_id, ex.operation = handler.api.id, match.operation
            await handler(ex, match, scope, receive, send)
        except GatewayError as error:
            ex.error_code = error.code
            await _render(ex, error, send)
        except ClientDisconnected:
            if ex.started:  # the backend answered before the request body was all read
                ex.error_code = "ClientDisconnected"
            else:
                # Only a request body read raises it, and Granian reports a malformed body
                # (a bad chunk-size line, a chunk that does not match its size) as `http.disconnect`
                # too, with the client still waiting: answer it. A client that really left
                # gets nothing either way (ASGI 2.3: a send to a dead client goes nowhere).
                ex.error_code = "InvalidRequest"
                await _render(ex, InvalidRequestError(_BODY_BROKEN), send)
        except Truncated as exc:
            ex.error_code = type(exc).__name__
            ex.status = ex.status or 499
        except asyncio.CancelledError:
            if not ex.disconnected:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            # nginx's 499 when nothing was sent; otherwise the status the client got.
            ex.error_code, ex.status = "ClientDisconnected", ex.status or 499
        except Exception:
            log.exception("unhandled error serving request %s", ex.request_id)
            ex.error_code = "InternalError"
            await _render(ex, GatewayError(), send)

    def _section(self, path: str) -> Section | None:
        """The console or the admin API when `path` is one of theirs and they are on (the
        config refuses API paths under either, so nothing else can be shadowed)."""
        for prefix, section in self._sections:
            if path == prefix or path.startswith(prefix + "/"):
                return section
        return None

    def _use_prometheus(self, config: Config) -> None:
        """Serve `/metrics` or not, as a reloaded `telemetry.prometheus` says (off: it is 404
        like any unknown path). The telemetry is made once per process, so a process that
        started with none has no metrics to show until it restarts."""
        if not config.telemetry.prometheus:
            self._endpoints.pop("/metrics", None)
        elif isinstance(self.telemetry, NoTelemetry):
            log.warning("tollway: telemetry.prometheus takes effect on restart (this process "
                        "started with telemetry off); /metrics stays off")  # fmt: skip
        else:
            self._endpoints["/metrics"] = self._metrics

    def _make_sections(self, config: Config) -> list[tuple[str, Section]]:
        sections: list[tuple[str, Section]] = []
        if config.gateway.console:
            sections.append(("/console", ConsoleEndpoint()))
        if config.gateway.admin_key:
            admin = AdminApi(config.gateway.admin_key, self.subscriptions, self._config,
                             self.limiter, self.admin_reload, self._token_store_down)  # fmt: skip
            sections.append(("/admin", admin))
        return sections

    def _config(self) -> Config:
        return self.runtime.config

    def _token_store_down(self) -> bool:
        return self.failover is not None and self.failover.degraded

    def _subscriptions_changed(self) -> None:
        runtime = self.runtime
        runtime.use_subscriptions(self.subscriptions.effective(runtime.config))

    async def _healthz(self, scope: Scope, send: Send) -> None:
        await send_response(send, 200, [JSON_TYPE], b'{"status":"ok"}')

    async def _readyz(self, scope: Scope, send: Send) -> None:
        """200 ready; 200 degraded while a shared store is down in `open` mode (limits count
        per process); 503 while starting or while it is down in `closed` mode."""
        failover, status, state = self.failover, 200, "ready"
        store = "memory" if failover is None else "redis"
        if failover is not None and failover.degraded:
            store += " (unavailable)"
            state, status = ("degraded", 200) if failover.mode == "open" else ("unavailable", 503)
        if not self.ready:
            state, status = "starting", 503
        body = {"status": state, "store": store}
        await send_response(send, status, [JSON_TYPE], _encoder.encode(body))

    async def _metrics(self, scope: Scope, send: Send) -> None:
        body = await asyncio.to_thread(self.telemetry.metrics_text)
        await send_response(send, 200, [(b"content-type", PROMETHEUS_TYPE)], body)

    def _gauges(self) -> list[Gauge]:
        """The backends' breakers, retries and open connections, and the event loop's tasks
        (read from the metrics thread: a leak shows as a number that only grows)."""
        out = self.health.gauges() + self.cache_parts.gauges()
        connections = per_backend(self.runtime.backends.connections())
        if connections:
            out.append(Gauge(genai.BACKEND_CONNECTIONS, "", "Open connections to the backend.",
                             connections))  # fmt: skip
        if self._loop is not None:
            tasks = len(asyncio.all_tasks(self._loop))
            out.append(Gauge(genai.TASKS, "", "asyncio tasks in the worker's event loop.",
                             (((), tasks),)))  # fmt: skip
        return out

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        try:
            await self.startup()
        except Exception as exc:
            # Granian logs the message and stops the worker; the CLI has already run the same
            # start-up once (preflight) so this is only reached by what changed since.
            await send({"type": "lifespan.startup.failed", "message": f"tollway: {exc}"})
            return
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        await self.shutdown()
        await send({"type": "lifespan.shutdown.complete"})

    async def startup(self, *, telemetry: bool = True) -> None:
        """Open the backends and start the telemetry's threads (not for the CLI's preflight
        run, which would otherwise export an empty process's metrics)."""
        await self.runtime.open()
        await self.cache_parts.open()
        self._loop = asyncio.get_running_loop()
        if self.health.shared is not None:
            self.health.shared.start()
        if not telemetry:
            self.exporter = None
            self.telemetry = NoTelemetry()
        if self.exporter is not None:
            self.exporter.start()
        if (shared := self.telemetry.shared) is not None:
            shared.start()
        await self.subscriptions.start(self.runtime.config)
        self.ready = True
        if self.config_path is not None:
            loop = asyncio.get_running_loop()
            try:
                loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
            except (NotImplementedError, RuntimeError, ValueError):
                log.warning("SIGHUP reload unavailable on this platform/thread")

    async def shutdown(self) -> None:
        self.ready = False
        for task in list(self._retired):
            task.cancel()
        await self.runtime.close()
        await self.cache_parts.close()
        await self.subscriptions.close()
        if self.health.shared is not None:
            await self.health.shared.close()
        await self.limiter.close()
        if self.exporter is not None:  # a last export of what is queued, off the loop
            await asyncio.to_thread(self.exporter.shutdown, EXPORT_SHUTDOWN_SECONDS)
        if (shared := self.telemetry.shared) is not None:
            await asyncio.to_thread(shared.stop)

    def _on_sighup(self) -> None:
        echo, self._echo = self._echo, None
        if echo is not None and echo == _file_state(self.config_path):
            return  # the server forwarding our own /admin/reload back: done here already
        self._background(self.reload())

    def _background(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(work)
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    async def reload(self) -> bool:
        """Swap in the config file's current content, or keep the old one and log why."""
        try:
            old = await self._reload()
        except Exception as exc:
            log.error("tollway: config reload failed, keeping the old config: %s", exc)
            return False
        await _drain(old)
        return True

    async def admin_reload(self) -> None:
        """`POST /admin/reload`: reload here, raising why not (ConfigError, or what failed),
        then SIGHUP the server, which forwards it to every worker (proxy/__main__.py). The
        forwarded signal comes back here too; it is skipped while the file is unchanged."""
        if self.config_path is None:
            raise RuntimeError("this gateway was not started from a config file")
        self._background(_drain(await self._reload()))
        server = os.environ.get(SERVER_ENV, "")
        if server.isdigit() and int(server) == os.getppid():
            self._echo = _file_state(self.config_path)
            os.kill(int(server), signal.SIGHUP)

    def _runtime(self, config: Config) -> Runtime:
        """Everything built from `config`, on the parts that outlive reloads."""
        registry = self.telemetry.registry
        return Runtime(config, self.limiter, registry, self.health, self.subscriptions,
                       self.cache_parts)  # fmt: skip

    async def _reload(self) -> Runtime:
        """Build and open the config file's runtime and swap it in; return the old one."""
        assert self.config_path is not None
        config = config_module.load(self.config_path)
        runtime = self._runtime(config)
        await runtime.open()
        await self.cache_parts.open()
        old, self.runtime = self.runtime, runtime
        self.cache_parts.retain(runtime.cache_sizes)
        runtime.use_subscriptions(self.subscriptions.effective(config))  # changed meanwhile?
        self._endpoints[OPENAPI_PATH] = OpenAPIEndpoint(config)
        self._use_prometheus(config)
        self._sections = self._make_sections(config)
        self.telemetry.use_backends(backend_urls(config))
        self.access_log = AccessLog(config.telemetry.access_log, self.access_log.stream)
        log.warning("tollway: config reloaded from %s", self.config_path)
        await self.subscriptions.ensure_all_access(config)
        return old


def _cache_policies(config: Config) -> set[type]:
    """Which of the semantic-cache policies `config` holds anywhere."""
    return {type(e.policy) for _, e in config.policy_entries()} & {CacheLookup, CacheStore}


def _file_state(path: str | None) -> Signature | None:
    """The config file's signature (None when there is none to read)."""
    try:
        return None if path is None else file_signature(path)
    except OSError:
        return None


async def _drain(runtime: Runtime) -> None:
    """Close a retired runtime once its requests are done (or its longest read timeout)."""
    limit = max((float(b.timeout.read) for b in runtime.config.backends), default=0.0)
    waited = 0.0
    while runtime.active and waited < limit:
        await asyncio.sleep(0.5)
        waited += 0.5
    await runtime.close()


async def _render(ex: Exchange, error: GatewayError, send: Send) -> None:
    if not ex.started:
        await ex.start(send, error.status, error_headers(error))
        await send({"type": "http.response.body", "body": error_body(error)})
    elif ex.stream:
        await send({"type": "http.response.body", "body": error_event(error), "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    # else: a whole-body response already started; nothing honest can be added.


async def _endpoint(endpoint: Endpoint, scope: Scope, send: Send) -> None:
    """One of the gateway's own endpoints (GET or HEAD only)."""
    if scope["method"] not in _ENDPOINT_METHODS:
        error = MethodNotAllowedError(_ENDPOINT_METHODS)
        await send_response(send, 405, error_headers(error), error_body(error))
        return
    await endpoint(scope, send)


def _stamped(scope: Scope, send: Send) -> Send:
    """`send` adding the request id and the overhead to the response start, as an API
    response gets them (`Exchange.stamp`), for what is served without going through `_serve`
    (the endpoints, the console, the admin API): SPEC §4's "always"."""
    exchange = Exchange(scope["method"], scope["path"], _request_id(scope), "")

    async def stamped(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = exchange.stamp([*message.get("headers", ())])
            message = {**message, "headers": headers}
        await send(message)

    return stamped


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            if _REQUEST_ID.fullmatch(value):
                return str(value.decode("ascii"))
            break
    return os.urandom(16).hex()


def make_shared_breakers(failover: FailoverLimiter | None) -> SharedBreakers | None:
    """Circuit-breaker trips shared through the Redis store, when the store is Redis."""
    if failover is not None and isinstance(failover.store, RedisLimiter):
        return SharedBreakers(failover.store)
    return None


def make_limiter(config: Config) -> LeasingLimiter | MemoryLimiter:
    """The token-limit store: per process (`memory`), or a shared Redis with the configured
    failure mode, drawn on through per-process leases (proxy/limits/lease.py). Kept across
    reloads, so counters survive a SIGHUP (a changed `store` takes effect on restart)."""
    gateway = config.gateway
    if gateway.store == "memory":
        return MemoryLimiter()
    shared = FailoverLimiter(RedisLimiter.connect(gateway.store), gateway.store_failure_mode)
    return LeasingLimiter(shared)


def failover_of(limiter: Limiter) -> FailoverLimiter | None:
    """The shared store's failure-mode layer under `limiter` (make_limiter's), if shared."""
    if isinstance(limiter, LeasingLimiter) and isinstance(limiter.store, FailoverLimiter):
        return limiter.store
    return None


EXPORT_SHUTDOWN_SECONDS = 5.0
SCOPE = "tollway"


def make_telemetry(
    config: Config,
    failover: FailoverLimiter | None,
    extra: Callable[[], list[Gauge]] | None = None,
    environ: Mapping[str, str] = os.environ,
) -> tuple[Telemetry | NoTelemetry, export.Exporter[bytes] | None]:
    """The telemetry for `config`: metrics when `/metrics` or OTLP export is on, spans when
    OTLP traces are exported (the `otlp-endpoint` and the standard OTEL_* variables), and
    NoTelemetry when neither. Made once per process and kept across reloads, so counters
    stay cumulative; a changed endpoint takes effect on restart."""
    settings = otlpenv.settings(config.telemetry.otlp_endpoint, environ)
    if settings is None and not config.telemetry.prometheus:
        return NoTelemetry(), None
    registry = Registry()
    exporter: export.Exporter[bytes] | None = None
    telemetry: Telemetry

    def gauges() -> list[Gauge]:
        return observed(registry, failover, exporter, extra() if extra is not None else [])

    shared = None
    if directory := environ.get(SHARED_ENV, ""):  # tollway serve --workers N sets it

        def read() -> tuple[Registry, Sequence[Gauge]]:
            return telemetry.snapshot()

        shared = Snapshots(directory, read, log)
    if settings is None:
        telemetry = Telemetry(registry, gauges=gauges, shared=shared)
        return telemetry, None
    resource = resource_attributes(config.telemetry.service_name, environ)
    scope_version = version()

    def spans(encoded: list[bytes]) -> bytes:
        return otlp.encode_span_request(encoded, resource, SCOPE, scope_version)

    def metrics() -> bytes:
        collected, extra = telemetry.snapshot()
        return otlp.encode_metrics(collected, resource, SCOPE, scope_version, time.time_ns(), extra)

    exporter = export.Exporter(settings, spans, metrics if settings.metrics.url else None, log)
    traced = exporter if settings.traces.url else None
    sampler = Sampler.from_env(environ)
    telemetry = Telemetry(registry, spans=traced, sampler=sampler, gauges=gauges, shared=shared)
    return telemetry, exporter


def observed(
    registry: Registry,
    failover: FailoverLimiter | None,
    exporter: export.Exporter[bytes] | None,
    extra: Sequence[Gauge] = (),
) -> list[Gauge]:
    """Values read when metrics are exported or scraped: the shared store's health (its
    failure-mode layer, when the store is shared), spans the export queue dropped,
    measurements folded into overflow series, and `extra`."""
    out = list(extra)
    if failover is not None:
        out.append(Gauge(genai.STORE_UNAVAILABLE, "", "1 while the shared token store is down.",
                         (((), int(failover.degraded)),)))  # fmt: skip
        out.append(Gauge(genai.STORE_FAILED_ADMISSIONS, "", "Admissions the store could not take.",
                         (((), failover.failed_admissions),), monotonic=True))  # fmt: skip
    if exporter is not None:
        out.append(Gauge(genai.SPANS_DROPPED, "", "Spans dropped: the export queue was full.",
                         (((), exporter.dropped_spans),), monotonic=True))  # fmt: skip
    folded = tuple(((("metric", name),), n) for name, n in registry.folded().items())
    if folded:
        out.append(Gauge(genai.METRIC_FOLDED, "", "Measurements folded into overflow series.",
                         folded, monotonic=True))  # fmt: skip
    return out


def backend_urls(config: Config) -> dict[str, str]:
    return {b.id: b.url for b in config.backends if b.type == "single"}


def create_app(config: Config, *, config_path: str | None = None) -> Gateway:
    """Build the gateway for `config` (the only place concrete parts are made)."""
    return Gateway(config, config_path=config_path)


def app_factory() -> Gateway:
    """Granian's factory target: the config path comes from TOLLWAY_CONFIG."""
    path = os.environ.get("TOLLWAY_CONFIG", "config/tollway.yaml")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    app = create_app(config_module.load(path), config_path=path)
    tune_gc()
    return app


def tune_gc() -> None:
    """Move everything alive at start-up out of the collector's view and collect the young
    generation every 50,000 net allocations instead of 700. A request allocates a few hundred
    objects; at the default, a worker carrying hundreds of streams runs a young collection
    every few ms and a full one (walking every live stream's objects) often enough to show
    as stalls. Measured (bench.paced, 500 paced streams, 2 rounds): max stall 49.7/53.4 ms
    -> 32.2/36.3 ms, gap p99 35.2/39.7 -> 25.0/25.5 ms; c=64 p99 13.2/15.0 -> 7.8/11.4 ms."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
