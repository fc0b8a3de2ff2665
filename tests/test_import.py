"""`tollway import` (SPEC §2), run as the real command against real backends: the mock LLM
(the probe finds its models), a loopback server that checks an access key, a port nobody
listens on, and a running gateway that serves the imported API after SIGHUP.

Every refusal leaves the config byte-identical; every import changes it by inserted lines only.
"""

from __future__ import annotations

import difflib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from proxy.config import (
    CacheLookup,
    CacheStore,
    Categories,
    ContentSafety,
    TokenLimit,
    TokenMetric,
    load,
)
from tests.conftest import KEY
from tests.gatewayproc import start_gateway
from tests.mockproc import ROOT, MockProc, free_port

SECRET = "sk-import-test-secret-0123456789"  # the backend key, only ever in the environment
GOOD_KEY = "keyed-backend-key-0123456789"  # what the keyed server accepts
BASE = """\
# A hand-written config: its comments, quoting and layout must survive an import.
gateway:
  store: ${{IMPORT_TEST_STORE:-memory}}     # a reference with a default
  max-request-body: 64KiB

backends:
  - id: mock
    url: {mock_url}                      # the mock LLM
    credentials: {{header: Authorization, value: "Bearer ${{IMPORT_TEST_MOCK_SECRET}}"}}
    timeout: {{connect: 2s, read: 10s}}

apis:
  - id: chat
    display-name: 'Chat (mock)'
    path: /openai
    type: openai
    backend: mock
    products: [starter]

  # the passthrough twin
  - id: raw
    path: /passthrough
    type: passthrough
    backend: mock

products:
  - id: starter
    display-name: "Starter"

subscriptions:
  - id: team-a
    scope: all-apis
    primary-key: {key}
# end of file
"""
# The config's own ${VAR} without default: unset for the imports (they check with a stand-in),
# set for check-config and the gateway.
SERVE_ENV = {"IMPORT_TEST_MOCK_SECRET": "mock-secret-0123456789"}


def tollway(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("IMPORT_TEST_")}
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=30, env={**clean, **(env or {})})  # fmt: skip


def import_(config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return tollway("import", "--config", str(config), *args, env=env)


def inserted(old: str, new: str) -> list[str]:
    """The blocks of lines ``new`` adds to ``old``; fails if anything else changed."""
    a, b = old.splitlines(keepends=True), new.splitlines(keepends=True)
    blocks = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        assert tag in ("equal", "insert"), f"{tag}: {a[i1:i2]} -> {b[j1:j2]}"
        if tag == "insert":
            blocks.append("".join(b[j1:j2]))
    return blocks


@pytest.fixture
def config(tmp_path: Path, mock: MockProc) -> Path:
    path = tmp_path / "tollway.yaml"
    path.write_text(BASE.format(mock_url=mock.url, key=KEY))
    return path


class KeyedBackend(BaseHTTPRequestHandler):
    """An OpenAI-compatible model list that wants `Authorization: Bearer GOOD_KEY`, and a few
    ways of not being one: /html (a web page), /error (500), /moved (302)."""

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            if self.headers.get("Authorization") == f"Bearer {GOOD_KEY}":
                self._send(200, "application/json",
                           {"object": "list", "data": [{"id": "keyed-model", "object": "model"}]})  # fmt: skip
            else:
                self._send(401, "application/json", {"error": {"message": "Incorrect API key"}})
        elif self.path == "/html/models":
            self._send(200, "text/html", "<html><body>Welcome to nginx!</body></html>")
        elif self.path == "/error/models":
            self._send(500, "application/json", {"error": {"message": "boom"}})
        elif self.path == "/moved/models":
            self.send_response(302)
            self.send_header("Location", "/v1/models")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send(404, "application/json", {"error": {"message": "not found"}})

    def _send(self, status: int, kind: str, body: object) -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def keyed() -> Iterator[str]:
    """The base URL of a loopback server running KeyedBackend."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), KeyedBackend)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# --- the probe ------------------------------------------------------------------------------


def test_probe_reports_the_mock_models_and_the_import_is_only_insertions(
    config: Path, mock: MockProc
) -> None:
    old = config.read_text()
    config.chmod(0o640)
    result = import_(config, "--name", "Local LLM", "--url", mock.url + "/", "--path", "local",
                     "--access-key-env", "IMPORT_TEST_KEY", "--product", "starter",
                     "--tokens-per-minute", "5000", env={"IMPORT_TEST_KEY": SECRET})  # fmt: skip
    assert result.returncode == 0, result.stderr
    models = [m["id"] for m in httpx.get(mock.url + "/models").json()["data"]]
    assert f"found {len(models)} model(s): {', '.join(models)}" in result.stdout
    assert "kill -HUP" in result.stdout and "/admin/reload" in result.stdout
    assert "/console" in result.stdout
    # the probe sent the key from the environment, as the gateway will
    probe = [r for r in mock.requests() if ["authorization", f"Bearer {SECRET}"] in r["headers"]]
    assert probe and probe[-1]["method"] == "GET" and probe[-1]["path"] == "/v1/models"

    new = config.read_text()
    backend = (
        "  - id: local-llm\n"
        f"    url: {mock.url}\n"
        '    credentials: {header: Authorization, value: "Bearer ${IMPORT_TEST_KEY}"}\n'
    )
    api = (
        "\n"
        "  - id: local-llm\n"
        "    display-name: Local LLM\n"
        "    path: /local\n"
        "    type: openai\n"
        "    backend: local-llm\n"
        "    products: [starter]\n"
        "    policies:\n"
        "      - llm-token-limit:\n"
        '          counter-key: "{subscription.id}"\n'
        "          tokens-per-minute: 5000\n"
    )
    # byte for byte: the old text with the two blocks inserted (the API list is spaced by
    # blank lines, so the new API is too)
    expected = old.replace("read: 10s}\n", "read: 10s}\n" + backend, 1)
    expected = expected.replace("    backend: mock\n\nproducts:", "    backend: mock\n" + api + "\nproducts:")  # fmt: skip
    assert new == expected
    assert SECRET not in new and SECRET not in result.stdout + result.stderr
    assert stat.S_IMODE(config.stat().st_mode) == 0o640
    # the config's own unset ${IMPORT_TEST_MOCK_SECRET} was checked with a stand-in, and said so
    assert "stand-ins for IMPORT_TEST_MOCK_SECRET" in result.stdout
    checked = tollway("check-config", str(config), env={**SERVE_ENV, "IMPORT_TEST_KEY": "x"})
    assert checked.returncode == 0 and "ok (3 APIs, 2 backends" in checked.stdout, checked.stderr


def test_refused_when_the_backend_is_unreachable(config: Path) -> None:
    before = config.read_bytes()
    dead = f"http://127.0.0.1:{free_port()}/v1"
    result = import_(config, "--name", "Dead", "--url", dead, "--path", "/dead")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert f"cannot reach the backend: GET {dead}/models: connection refused" in result.stderr
    assert "--no-probe" in result.stderr
    assert config.read_bytes() == before
    # with --no-probe it is written, even with the key's variable unset here (it is checked
    # with a stand-in and written as the reference)
    result = import_(config, "--name", "Dead", "--url", dead, "--path", "/dead", "--no-probe",
                     "--access-key-env", "IMPORT_TEST_UNSET")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "probe: none (--no-probe)" in result.stdout
    assert "stand-ins for IMPORT_TEST_MOCK_SECRET, IMPORT_TEST_UNSET" in result.stdout
    assert 'value: "Bearer ${IMPORT_TEST_UNSET}"' in config.read_text()


def test_refused_when_the_backend_refuses_the_access_key(config: Path, keyed: str) -> None:
    before = config.read_bytes()
    wrong = "wrong-key-but-secret-0123456789"
    for extra in (["--access-key-env", "IMPORT_TEST_KEY"], []):
        result = import_(config, "--name", "Keyed", "--url", keyed + "/v1", "--path", "/keyed",
                         *extra, env={"IMPORT_TEST_KEY": wrong})  # fmt: skip
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "the backend refused the access key" in result.stderr
        assert "401 Unauthorized" in result.stderr
        assert wrong not in result.stdout + result.stderr
        assert config.read_bytes() == before
    # the server's check is real: the right key passes, and the literal one is never printed
    result = import_(config, "--name", "Keyed", "--url", keyed + "/v1", "--path", "/keyed",
                     "--access-key", GOOD_KEY, "--dry-run")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "found 1 model(s): keyed-model" in result.stdout
    assert GOOD_KEY not in result.stdout + result.stderr
    assert (
        '+    credentials: {header: Authorization, value: "Bearer <access key>"}' in result.stdout
    )
    assert config.read_bytes() == before


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("/html", "did not answer an OpenAI model list"),
        ("/error", "answered 500 Internal Server Error"),
        ("/nothing", "answered 404 Not Found (is --url the API's base URL"),
        ("/moved", "answered 302 Found (redirects are not followed"),
    ],
)  # fmt: skip
def test_refused_when_the_backend_is_not_an_openai_api(
    config: Path, keyed: str, where: str, expected: str
) -> None:
    before = config.read_bytes()
    result = import_(config, "--name", "Odd", "--url", keyed + where, "--path", "/odd",
                     "--access-key", GOOD_KEY)  # fmt: skip
    assert result.returncode == 2 and expected in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and GOOD_KEY not in result.stderr
    assert config.read_bytes() == before


# --- what is written ------------------------------------------------------------------------


def test_the_portal_tabs_become_policies(config: Path, mock: MockProc) -> None:
    result = import_(config, "--name", "Tabs", "--id", "tabs", "--url", mock.url, "--path", "/tabs",
                     "--description", "Every tab", "--no-subscription-required",
                     "--tokens-per-minute", "1000", "--token-quota", "50000",
                     "--token-quota-period", "daily", "--counter-key", "{request.header.X-Team}",
                     "--emit-token-metric", "--semantic-cache-backend-id", "mock",
                     "--semantic-cache-score-threshold", "0.1", "--semantic-cache-duration", "10m",
                     "--content-safety-backend-id", "tabs", "--content-safety-shield-prompt")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert inserted(BASE.format(mock_url=mock.url, key=KEY), config.read_text())
    api = load(config, env=SERVE_ENV).api("tabs")
    assert (api.display_name, api.description, api.subscription_required) == ("Tabs", "Every tab", False)  # fmt: skip
    assert [entry.policy for entry in api.policies] == [
        ContentSafety(backend_id="tabs", shield_prompt=True),
        CacheLookup(score_threshold=0.1, embeddings_backend_id="mock"),
        TokenLimit(counter_key="{request.header.X-Team}", tokens_per_minute=1000,
                   token_quota=50000, token_quota_period="daily"),
        TokenMetric(),
        CacheStore(duration=600),
    ]  # fmt: skip
    assert "llm-semantic-cache-store: {duration: 10m}" in config.read_text()


# A local list for the content-safety tab; any other blocklist name is the service's.
LOCAL_BLOCKLIST = "blocklists:\n  banned:\n    terms: [make a bomb]\n"
SAFETY = "--content-safety-"


@pytest.mark.parametrize(
    ("flags", "written", "policy"),
    [
        (  # the whole tab; names and choices in any case, written as the schema spells them
            [SAFETY + "backend-id", "mock", SAFETY + "category", "hate=4",
             SAFETY + "category", "VIOLENCE=2", SAFETY + "output-type", "eightseveritylevels",
             SAFETY + "shield-prompt", SAFETY + "blocklist", "banned",
             SAFETY + "blocklist", "service-list", SAFETY + "enforce-on-completions",
             SAFETY + "on-error", "allow"],
            "      - llm-content-safety:\n"
            "          backend-id: mock\n"
            "          shield-prompt: true\n"
            "          enforce-on-completions: true\n"
            "          categories: {output-type: EightSeverityLevels, Hate: 4, Violence: 2}\n"
            "          blocklists: [banned, service-list]\n"
            "          on-error: allow\n",
            ContentSafety(backend_id="mock", shield_prompt=True, enforce_on_completions=True,
                          categories=Categories(output_type="EightSeverityLevels", hate=4, violence=2),
                          blocklists=("banned", "service-list"), on_error="allow"),
        ),
        (  # only what is given: no output-type, no on-error; a threshold of 0 is kept
            [SAFETY + "backend-id", "mock", SAFETY + "category", "Sexual=0",
             SAFETY + "category", "selfharm=6"],
            "      - llm-content-safety:\n"
            "          backend-id: mock\n"
            "          categories: {SelfHarm: 6, Sexual: 0}\n",
            ContentSafety(backend_id="mock", categories=Categories(self_harm=6, sexual=0)),
        ),
        (  # defaults given explicitly are written
            [SAFETY + "backend-id", "mock", SAFETY + "category", "Hate=2",
             SAFETY + "output-type", "FourSeverityLevels", SAFETY + "on-error", "block"],
            "      - llm-content-safety:\n"
            "          backend-id: mock\n"
            "          categories: {output-type: FourSeverityLevels, Hate: 2}\n"
            "          on-error: block\n",
            ContentSafety(backend_id="mock", categories=Categories(hate=2)),
        ),
        (  # a list of the config's own: no backend needed
            [SAFETY + "blocklist", "banned", SAFETY + "enforce-on-completions"],
            "      - llm-content-safety:\n"
            "          enforce-on-completions: true\n"
            "          blocklists: [banned]\n",
            ContentSafety(blocklists=("banned",), enforce_on_completions=True),
        ),
        (
            [SAFETY + "blocklist", "banned"],
            "      - llm-content-safety: {blocklists: [banned]}\n",
            ContentSafety(blocklists=("banned",)),
        ),
    ],
    ids=["whole-tab", "only-what-is-given", "defaults-given", "local-list", "local-list-alone"],
)  # fmt: skip
def test_the_content_safety_tab(
    config: Path, flags: list[str], written: str, policy: ContentSafety
) -> None:
    config.write_text(config.read_text() + LOCAL_BLOCKLIST)
    old = config.read_text()
    result = import_(config, "--name", "Safe", "--url", "http://127.0.0.1:9/v1", "--path",
                     "/safe", "--no-probe", *flags)  # fmt: skip
    assert result.returncode == 0, result.stderr
    (_, api_block) = inserted(old, config.read_text())
    assert api_block.strip("\n") == (
        "  - id: safe\n    display-name: Safe\n    path: /safe\n    type: openai\n"
        "    backend: safe\n    policies:\n" + written.rstrip("\n")
    )
    (entry,) = load(config, env=SERVE_ENV).api("safe").policies
    assert entry.policy == policy
    checked = tollway("check-config", str(config), env=SERVE_ENV)
    assert checked.returncode == 0, checked.stderr


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([SAFETY + "category", "Hate=4"], "--content-safety-category: needs --content-safety-backend-id"),
        ([SAFETY + "blocklist", "banned", SAFETY + "category", "Hate=4"], "--content-safety-category: needs --content-safety-backend-id"),
        ([SAFETY + "output-type", "EightSeverityLevels"], "--content-safety-output-type: needs --content-safety-category"),
        ([SAFETY + "shield-prompt"], "--content-safety-shield-prompt: needs --content-safety-backend-id"),
        ([SAFETY + "blocklist", "banned", SAFETY + "on-error", "allow"], "--content-safety-on-error: needs --content-safety-backend-id"),
        ([SAFETY + "enforce-on-completions"], "--content-safety-enforce-on-completions: needs --content-safety-backend-id or --content-safety-blocklist"),
        ([SAFETY + "blocklist", "banned-terms"], "--content-safety-blocklist: 'banned-terms' is not in the config's top-level blocklists (local lists: banned), and without --content-safety-backend-id no service holds it"),
        ([SAFETY + "blocklist", "banned", SAFETY + "blocklist", "banned"], "--content-safety-blocklist: 'banned' is given twice"),
        ([SAFETY + "blocklist", " "], "--content-safety-blocklist: a name must not be blank"),
        ([SAFETY + "backend-id", "nope"], "--content-safety-backend-id: no backend 'nope' in the config"),
        ([SAFETY + "backend-id", "mock", SAFETY + "category", "Hate"], "--content-safety-category: 'Hate': is not NAME=THRESHOLD, e.g. Hate=4"),
        ([SAFETY + "backend-id", "mock", SAFETY + "category", "Rage=4"], "--content-safety-category: 'Rage=4': NAME is one of Hate, SelfHarm, Sexual, Violence"),
        ([SAFETY + "backend-id", "mock", SAFETY + "category", "Hate=8"], "--content-safety-category: 'Hate=8': THRESHOLD is a severity from 0 to 7"),
        ([SAFETY + "backend-id", "mock", SAFETY + "category", "Hate=-1"], "--content-safety-category: 'Hate=-1': THRESHOLD is a severity from 0 to 7"),
        ([SAFETY + "backend-id", "mock", SAFETY + "category", "Hate=4", SAFETY + "category", "hate=2"], "--content-safety-category: 'hate=2': Hate is given twice"),
        ([SAFETY + "backend-id", "mock", SAFETY + "category", "Hate=4", SAFETY + "output-type", "Six"], "--content-safety-output-type: 'Six' is not one of FourSeverityLevels, EightSeverityLevels"),
        ([SAFETY + "backend-id", "mock", SAFETY + "on-error", "ignore"], "--content-safety-on-error: 'ignore' is not one of block, allow"),
    ],
)  # fmt: skip
def test_bad_content_safety_flags_are_refused(
    config: Path, flags: list[str], expected: str
) -> None:
    config.write_text(config.read_text() + LOCAL_BLOCKLIST)
    before = config.read_bytes()
    result = import_(config, "--name", "New", "--url", "http://127.0.0.1:9/v1", "--path", "/new",
                     "--no-probe", *flags)  # fmt: skip
    assert result.returncode == 2, result.stdout
    assert result.stderr.startswith(f"tollway: import refused: {expected}"), result.stderr
    assert result.stderr.count("\n") == 1
    assert config.read_bytes() == before


def test_an_import_into_the_shipped_config_keeps_every_line(tmp_path: Path, mock: MockProc) -> None:
    config = tmp_path / "tollway.yaml"
    config.write_bytes((ROOT / "config" / "tollway.yaml").read_bytes())
    old = config.read_text()
    result = import_(config, "--name", "Mock", "--url", mock.url, "--path", "/mock",
                     "--product", "starter", "--token-quota", "100000")  # fmt: skip
    assert result.returncode == 0, result.stderr
    blocks = inserted(old, config.read_text())
    assert [block.split("\n", 2)[:2] for block in blocks] == [
        ["  - id: mock", f"    url: {mock.url}"], ["", "  - id: mock"],
    ]  # fmt: skip
    env = {"OPENAI_API_KEY": "sk-test"}
    assert tollway("check-config", str(config), env=env).returncode == 0


def test_a_missing_config_is_made_from_a_commented_skeleton(tmp_path: Path, mock: MockProc) -> None:
    config = tmp_path / "new" / "tollway.yaml"
    result = import_(config, "--name", "Mock", "--url", mock.url, "--path", "/mock")
    assert result.returncode == 0, result.stderr
    text = config.read_text()
    assert text.startswith("# Tollway gateway config") and "- id: mock" in text
    assert "backends: []" not in text and "subscriptions: []" in text
    checked = tollway("check-config", str(config))
    assert checked.returncode == 0 and "ok (1 APIs, 1 backends" in checked.stdout


def test_dry_run_shows_the_change_and_writes_nothing(config: Path, mock: MockProc) -> None:
    before, mtime = config.read_bytes(), config.stat().st_mtime_ns
    result = import_(config, "--name", "Dry", "--url", mock.url, "--path", "/dry", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "+  - id: dry\n+    url: " in result.stdout and "+    path: /dry\n" in result.stdout
    assert (
        "model(s): gpt-4o-mini" in result.stdout
        and f"Dry run: {config} not updated" in result.stdout
    )
    assert config.read_bytes() == before and config.stat().st_mtime_ns == mtime
    assert not list(config.parent.glob(".*.tmp"))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--name", "Chat"], "an API with id 'chat' exists already; choose another with --id"),
        (["--name", "New", "--backend-id", "mock"], "a backend with id 'mock' exists already"),
        (["--name", "New", "--path", "/openai/"], "path /openai is taken by API 'chat'"),
        (["--name", "New", "--path", "/openai/v2"], "path /openai/v2 nests with /openai of API 'chat'"),
        (["--name", "New", "--path", "/console"], "--path: /console is the gateway's own /console endpoint"),
        (["--name", "New", "--path", "/admin/llm"], "--path: /admin/llm is the gateway's own /admin endpoint"),
        (["--name", "New", "--path", "/metrics"], "--path: /metrics is the gateway's own /metrics endpoint"),
        (["--name", "New", "--product", "gold"], "--product: no product 'gold' in the config (products: starter)"),
        (["--name", "New", "--semantic-cache-backend-id", "nope"], "--semantic-cache-backend-id: no backend 'nope'"),
        (["--name", "New", "--counter-key", "{nope}", "--tokens-per-minute", "5"], "--counter-key: unknown placeholder {nope}"),
        (["--name", "New", "--token-quota-period", "daily"], "--token-quota-period: needs --token-quota"),
        (["--name", "New", "--tokens-per-minute", "0"], "--tokens-per-minute: must be at least 1"),
        (["--name", "New", "--url", "ftp://example.com"], "--url: 'ftp://example.com' is not an http(s) URL"),
        (["--name", "???"], "cannot make an API id from --name '???'; give --id"),
        (["--name", "New", "--access-key-env", "NOT-A-NAME"], "--access-key-env: 'NOT-A-NAME' is not a variable name"),
    ],
)  # fmt: skip
def test_conflicts_and_bad_flags_are_refused(config: Path, args: list[str], expected: str) -> None:
    before = config.read_bytes()
    defaults = {"--url": "http://127.0.0.1:9/v1", "--path": "/new"}
    for flag, value in defaults.items():
        if flag not in args:
            args = [*args, flag, value]
    result = import_(config, *args, "--no-probe")
    assert result.returncode == 2, result.stdout
    assert result.stderr.startswith("tollway: import refused: ") and expected in result.stderr
    assert config.read_bytes() == before


def test_a_second_token_metric_in_the_same_namespace_is_refused(config: Path) -> None:
    config.write_text(config.read_text() + "policies:\n  - llm-emit-token-metric: {}\n")
    before = config.read_bytes()
    args = ["--name", "New", "--url", "http://127.0.0.1:9/v1", "--path", "/new", "--no-probe"]
    result = import_(config, *args, "--emit-token-metric")
    assert result.returncode == 2 and "namespace 'tollway' is configured already" in result.stderr
    assert config.read_bytes() == before
    result = import_(config, *args, "--emit-token-metric", "--token-metric-namespace", "new")
    assert result.returncode == 0, result.stderr


def test_a_config_that_does_not_load_is_left_alone(config: Path) -> None:
    config.write_text(config.read_text().replace("type: passthrough", "type: grpc"))
    before = config.read_bytes()
    result = import_(config, "--name", "New", "--url", "http://127.0.0.1:9/v1", "--path", "/new")
    assert result.returncode == 2 and "does not load as it is: apis[1].type" in result.stderr
    assert config.read_bytes() == before


def test_usage_errors_exit_2(config: Path) -> None:
    assert import_(config, "--name", "New", "--path", "/new").returncode == 2  # no --url
    result = import_(config, "--name", "New", "--url", "http://h/v1", "--path", "/new",
                     "--access-key", "k" * 20, "--access-key-env", "K")  # fmt: skip
    assert result.returncode == 2 and "not allowed with argument" in result.stderr


# --- end to end: a running gateway ----------------------------------------------------------


def until(check: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_a_running_gateway_serves_the_import_after_sighup(mock: MockProc) -> None:
    gw = start_gateway(BASE.format(mock_url=mock.url, key=KEY),
                       env={**SERVE_ENV, "IMPORT_TEST_KEY": SECRET})  # fmt: skip
    try:
        client = openai.OpenAI(base_url=gw.base + "/local", api_key=KEY, max_retries=0)
        ask: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(**ask)
        result = import_(gw.config, "--name", "Local", "--url", mock.url, "--path", "/local",
                         "--access-key-env", "IMPORT_TEST_KEY", env={"IMPORT_TEST_KEY": SECRET})  # fmt: skip
        assert result.returncode == 0, result.stderr

        os.kill(gw.proc.pid, signal.SIGHUP)
        until(lambda: httpx.get(gw.base + "/local/models", headers={"api-key": KEY}).status_code == 200)  # fmt: skip
        mock.clear()
        reply = client.chat.completions.create(**ask)
        assert reply.choices[0].message.content and reply.usage.total_tokens > 0
        # the gateway resolved ${IMPORT_TEST_KEY} from its own environment
        (seen,) = [r for r in mock.requests() if r["path"] == "/v1/chat/completions"]
        assert ["authorization", f"Bearer {SECRET}"] in seen["headers"]
        stream = client.chat.completions.create(**ask, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

        # a config broken by hand is kept out; the imported API is still served
        gw.config.write_text(gw.config.read_text() + "apis: [this is not valid\n")
        os.kill(gw.proc.pid, signal.SIGHUP)
        until(lambda: "config reload failed, keeping the old config" in gw.log())
        assert client.chat.completions.create(**ask).choices[0].message.content
    finally:
        gw.stop()
