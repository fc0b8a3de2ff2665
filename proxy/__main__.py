"""The `tollway` command line (SPEC §2): serve, demo, mock-llm, check-config, import, keys."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

from proxy import config as config_module
from proxy.telemetry.shared import ENV as SHARED_METRICS_ENV

DEFAULT_CONFIG = "config/tollway.yaml"
# Long LLM streams hold a request each for minutes; one worker carries thousands of them.
MAX_CONCURRENCY = 10_000
LISTEN_BACKLOG = 4096  # the kernel caps it at net.core.somaxconn
DEMO_CONFIG = "config/demo.yaml"
_REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    result: int = args.run(args)
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tollway", description="Tollway LLM API gateway")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", default=DEFAULT_CONFIG)
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument(
        "--max-concurrency", type=int, default=MAX_CONCURRENCY, metavar="N",
        help=f"requests (streams included) one worker serves at once (default {MAX_CONCURRENCY})",
    )  # fmt: skip
    serve.add_argument(
        "--http", choices=("1", "auto"), default="1",
        help="HTTP/1.1 only (default; ~15%% more req/s), or auto to also accept h2c",
    )  # fmt: skip
    serve.set_defaults(run=_serve)

    demo = commands.add_parser("demo", help="run a mock LLM and the gateway in front of it")
    demo.add_argument("--port", type=int, default=8080)
    demo.add_argument("--mock-port", type=int, default=0, help="default: a free port")
    demo.set_defaults(run=_demo)

    mock = commands.add_parser("mock-llm", help="run the OpenAI-compatible mock backend")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=9000)
    mock.add_argument("--ttft", type=float, default=0.0, help="time to first token, ms")
    mock.add_argument("--itl", type=float, default=0.0, help="inter-token latency, ms")
    mock.add_argument("--tokens", type=int, default=16, help="completion tokens per response")
    mock.add_argument("--workers", type=int, default=1)
    mock.add_argument(
        "--content-safety-key",
        default=os.environ.get("TOLLWAY_MOCK_CONTENT_SAFETY_KEY") or None,
        metavar="KEY",
        help="demand this Ocp-Apim-Subscription-Key on /contentsafety/ "
        "(default: $TOLLWAY_MOCK_CONTENT_SAFETY_KEY, else none)",
    )
    mock.set_defaults(run=_mock_llm)

    check = commands.add_parser("check-config", help="validate a config file")
    check.add_argument("file")
    check.set_defaults(run=_check_config)

    _add_import(commands)

    keys = commands.add_parser("keys", help="make or hash subscription keys")
    verbs = keys.add_subparsers(dest="verb", required=True, metavar="VERB")
    verbs.add_parser("new", help="print a new random key").set_defaults(run=_keys_new)
    hash_ = verbs.add_parser("hash", help="print the sha256: form of KEY for the config")
    hash_.add_argument("key", help='the key (after "--" if it starts with "-")')
    hash_.set_defaults(run=_keys_hash)
    return parser


def _add_import(commands: Any) -> None:
    imp = commands.add_parser(
        "import", help="import an LLM API: probe the backend, add it to the config",
        description="The portal's \"Import an LLM API\" flow: probe the backend (GET /models for "
        "the openai type), then add the backend, the API and its policies to the config, "
        "keeping its comments and layout. A running gateway picks the change up on SIGHUP.",
    )  # fmt: skip
    api = imp.add_argument_group("the API")
    api.add_argument("--name", required=True, help="display name")
    api.add_argument("--id", default="", help="API id (default: the name as a slug)")
    api.add_argument("--description", default="")
    api.add_argument("--url", required=True, help="the LLM API's base URL, e.g. http://host/v1")
    api.add_argument("--path", required=True, help="where the gateway serves it, e.g. /llm")
    api.add_argument("--type", choices=("openai", "passthrough"), default="openai")
    api.add_argument(
        "--access-key-header",
        default="",
        metavar="H",
        help="header for the backend's key (default Authorization, as Bearer)",
    )
    key = api.add_mutually_exclusive_group()
    key.add_argument(
        "--access-key",
        default="",
        metavar="K",
        help="the backend's key, written to the config as is",
    )
    key.add_argument(
        "--access-key-env",
        default="",
        metavar="VAR",
        help="read the key from $VAR for the probe; the config gets ${VAR}",
    )
    api.add_argument(
        "--product",
        dest="products",
        action="append",
        default=[],
        metavar="ID",
        help="add the API to this product (repeatable; it must exist)",
    )
    api.add_argument("--backend-id", default="", help="default: the API id")
    api.add_argument(
        "--no-subscription-required", dest="subscription_required", action="store_false"
    )
    tokens = imp.add_argument_group("manage token consumption")
    tokens.add_argument("--tokens-per-minute", type=int, metavar="N")
    tokens.add_argument("--token-quota", type=int, metavar="N")
    tokens.add_argument(
        "--token-quota-period",
        metavar="P",
        choices=("hourly", "daily", "weekly", "monthly", "yearly"),
    )
    tokens.add_argument("--counter-key", metavar="T", help='default "{subscription.id}"')
    tokens.add_argument("--emit-token-metric", action="store_true")
    tokens.add_argument("--token-metric-namespace", default="tollway", metavar="NS")
    cache = imp.add_argument_group("semantic caching")
    cache.add_argument(
        "--semantic-cache-backend-id", default="", metavar="ID", help="the embeddings backend"
    )
    cache.add_argument(
        "--semantic-cache-score-threshold", type=float, metavar="F", help="default 0.05"
    )
    cache.add_argument("--semantic-cache-duration", metavar="D", help="default 1h")
    safety = imp.add_argument_group("AI content safety")
    safety.add_argument(
        "--content-safety-backend-id", default="", metavar="ID", help="the analysis backend"
    )
    safety.add_argument(
        "--content-safety-category",
        dest="content_safety_categories",
        action="append",
        default=[],
        metavar="NAME=THRESHOLD",
        help="block at this severity (0-7) or above; NAME: Hate, SelfHarm, Sexual, Violence "
        "(repeatable)",
    )
    safety.add_argument(
        "--content-safety-output-type",
        metavar="FourSeverityLevels|EightSeverityLevels",
        help="the severity scale (default FourSeverityLevels)",
    )
    safety.add_argument("--content-safety-shield-prompt", action="store_true")
    safety.add_argument(
        "--content-safety-blocklist",
        dest="content_safety_blocklists",
        action="append",
        default=[],
        metavar="NAME",
        help="a list of the config's top-level blocklists, or else the service's (repeatable)",
    )
    safety.add_argument("--content-safety-enforce-on-completions", action="store_true")
    safety.add_argument(
        "--content-safety-on-error",
        metavar="block|allow",
        help="when the analysis backend fails (default block)",
    )
    imp.add_argument(
        "--config", default=DEFAULT_CONFIG, help=f"default {DEFAULT_CONFIG}; created when missing"
    )
    imp.add_argument("--no-probe", dest="probe", action="store_false")
    imp.add_argument("--dry-run", action="store_true", help="show the change, write nothing")
    imp.set_defaults(run=_import)


def _fail(message: str) -> NoReturn:
    print(f"tollway: {message}", file=sys.stderr)
    raise SystemExit(1)


def _load(path: str) -> config_module.Config:
    try:
        return config_module.load(path)
    except config_module.ConfigError as exc:
        more = f" (and {len(exc.errors) - 1} more; run tollway check-config {path})"
        _fail(f"cannot start: {path}: {exc.errors[0]}" + (more if len(exc.errors) > 1 else ""))


def _preflight(config: config_module.Config) -> None:
    """Run the gateway's start-up once here, so a failure is one line before any worker."""
    from proxy.app import create_app

    async def check() -> None:
        app = create_app(config)
        await app.startup(telemetry=False)
        await app.shutdown()

    try:
        asyncio.run(check())
    except Exception as exc:
        _fail(f"cannot start: {exc}")


def _serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    _preflight(config)
    os.environ["TOLLWAY_CONFIG"] = str(Path(args.config).resolve())
    print(
        f"tollway: serving {len(config.apis)} API(s) on http://{args.host}:{args.port} "
        f"with {args.workers} worker(s), config {args.config}",
        file=sys.stderr,
        flush=True,
    )
    from proxy.app import SERVER_ENV
    from proxy.subscriptions import ENV as SUBSCRIPTIONS_ENV

    os.environ[SERVER_ENV] = str(os.getpid())  # POST /admin/reload signals it (proxy/app.py)
    shared: list[str] = []
    if args.workers > 1:  # one /metrics (proxy/telemetry/shared.py) and one set of runtime
        # subscriptions with the memory store (proxy/subscriptions.py) for all workers
        shared = [tempfile.mkdtemp(prefix="tollway-metrics-"),
                  tempfile.mkdtemp(prefix="tollway-subscriptions-")]  # fmt: skip
        os.environ[SHARED_METRICS_ENV], os.environ[SUBSCRIPTIONS_ENV] = shared
    try:
        _granian(
            "proxy.app:app_factory",
            args.host,
            args.port,
            args.workers,
            args.max_concurrency,
            args.http,
        ).serve()
    finally:
        for directory in shared:
            shutil.rmtree(directory, ignore_errors=True)
    return 0


def _granian(target: str, host: str, port: int, workers: int, concurrency: int, http: str) -> Any:
    from granian.constants import HTTPModes, Interfaces, Loops
    from granian.server import MPServer

    class Server(MPServer):
        """Granian, but SIGHUP reloads the config inside each worker instead of respawning
        it, so in-process counters survive and a bad config keeps the old one running."""

        def signal_handler_reload(self, *args: object, **kwargs: object) -> None:
            for worker in self.wrks:
                pid = worker.inner.pid
                if pid:
                    os.kill(pid, signal.SIGHUP)

    return Server(
        target,
        address=host,
        port=port,
        interface=Interfaces.ASGI,
        http=HTTPModes(http),
        workers=workers,
        loop=Loops.uvloop,
        factory=True,
        websockets=False,
        backlog=LISTEN_BACKLOG,
        backpressure=concurrency,  # Granian's default (backlog / workers) caps streams at ~1k
        log_access=False,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for_port(port: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


def _demo(args: argparse.Namespace) -> int:
    config_path = DEMO_CONFIG if Path(DEMO_CONFIG).exists() else str(_REPO / DEMO_CONFIG)
    mock_port = args.mock_port or _free_port()
    key = os.environ.setdefault("TOLLWAY_DEMO_KEY", "tw-demo-" + config_module.new_key())
    admin_key = os.environ.setdefault("TOLLWAY_ADMIN_KEY", config_module.new_key())
    os.environ["TOLLWAY_DEMO_MOCK_URL"] = f"http://127.0.0.1:{mock_port}/v1"
    mock = subprocess.Popen(
        [sys.executable, "-m", "proxy", "mock-llm", "--port", str(mock_port), "--itl", "20"]
    )
    try:
        if not _wait_for_port(mock_port):
            _fail(f"cannot start: the mock backend did not open port {mock_port}")
        _print_demo_help(args.port, key, admin_key)
        return _serve(
            argparse.Namespace(
                config=config_path,
                host="127.0.0.1",
                port=args.port,
                workers=1,
                max_concurrency=MAX_CONCURRENCY,
                http="1",
            )
        )
    finally:
        mock.terminate()
        mock.wait(timeout=10)


def _print_demo_help(port: int, key: str, admin_key: str) -> None:
    base = f"http://127.0.0.1:{port}"
    print(
        f"""
Tollway demo: a mock LLM behind the gateway (memory store, no network needed).
  subscription key: {key}
  test console:     {base}/console   (admin key, to fill in the all-access key: {admin_key})

  curl {base}/openai/chat/completions -H "api-key: {key}" \\
       -H "content-type: application/json" \\
       -d '{{"model": "gpt-4o-mini", "messages": [{{"role": "user", "content": "Hello"}}]}}'

  from openai import OpenAI
  client = OpenAI(base_url="{base}/openai", api_key="{key}")
  client.chat.completions.create(
      model="gpt-4o-mini", messages=[{{"role": "user", "content": "Hi"}}])

Ctrl-C stops both.
""",
        file=sys.stderr,
        flush=True,
    )


def _mock_llm(args: argparse.Namespace) -> int:
    from proxy.mock_llm import run

    run(
        host=args.host,
        port=args.port,
        ttft_ms=args.ttft,
        itl_ms=args.itl,
        tokens=args.tokens,
        workers=args.workers,
        content_safety_key=args.content_safety_key,
    )
    return 0


def _check_config(args: argparse.Namespace) -> int:
    try:
        config = config_module.load(args.file)
    except config_module.ConfigError as exc:
        for error in exc.errors:
            print(f"{args.file}: {error}", file=sys.stderr)
        return 1
    missing = [
        f"{args.file}: tokenizers[{glob!r}]: {spec[3:]}: no such tokenizer.json file"
        for glob, spec in config.tokenizers.items()
        if spec.startswith("hf:") and not os.path.isfile(spec[3:])
    ]
    if missing:  # a file the config names, checked here: config itself reads no files
        print("\n".join(missing), file=sys.stderr)
        return 1
    print(
        f"{args.file}: ok ({len(config.apis)} APIs, {len(config.backends)} backends, "
        f"{len(config.products)} products, {len(config.subscriptions)} subscriptions)"
    )
    return 0


def _import(args: argparse.Namespace) -> int:
    """Exit 0 when imported (or, with --dry-run, importable), 2 when refused: like argparse's
    usage errors, nothing was changed."""
    from proxy import importer

    fields = {f.name for f in dataclasses.fields(importer.ImportSpec)}
    # the repeatable flags (--product, --content-safety-category, ...) as tuples
    values: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()
    }
    spec = importer.ImportSpec(**{k: v for k, v in values.items() if k in fields})
    try:
        outcome = importer.import_api(spec, args.config, dry_run=args.dry_run)
    except importer.ImportRefusedError as exc:
        print(f"tollway: import refused: {spec.scrub(str(exc))}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(outcome.diff)
    print(importer.summary(outcome))
    return 0


def _keys_new(args: argparse.Namespace) -> int:
    key = config_module.new_key()
    print(key)
    print(f"# store it in the config as: {config_module.hash_key(key)}", file=sys.stderr)
    return 0


def _keys_hash(args: argparse.Namespace) -> int:
    print(config_module.hash_key(args.key))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
