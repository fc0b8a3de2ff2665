"""The test console at `GET /console` (proxy/console.py, proxy/console/*).

Two levels. `ConsoleEndpoint` over ASGI (httpx's ASGITransport): the files it serves, their
security and cache headers, 304, 405, 404, and a page with nothing inline for its CSP to
block. Then the page itself in a real browser, Debian's Chromium driven by Playwright (no
browser download; `.ci/run` installs the package), against a real `tollway serve` in front of
a real, paced `tollway mock-llm` with a token-limit policy: the reference's "Test the LLM
API" flow (pick the operation, fill the key, send, watch the tokens arrive and the usage).
Without the browser these tests fail, they do not skip.
"""

from __future__ import annotations

import asyncio
import json
import re
import struct
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Page,
    Request,
    expect,
)

from proxy import config as config_module
from proxy.console import CSP, FILES, ConsoleEndpoint
from proxy.mock_llm import WORDS
from tests.gatewayproc import GatewayProc, start_gateway
from tests.inprocess import run_app
from tests.mockproc import MockProc, start_mock

KEY = "console-key-0123456789abcdef"
ADMIN_KEY = "console-admin-0123456789abcdef"
TOKENS = 24  # the mock's reply: 24 words, one token each
ITL_MS = 60  # between tokens: the stream takes ~1.5 s, long enough to watch it grow
REPLY = " ".join(WORDS[:TOKENS])
LIMIT_HEADERS = ("x-ratelimit-remaining-tokens", "x-quota-remaining-tokens", "x-tokens-consumed")
TPM, QUOTA = 100_000, 1_000_000
PNG = b"\x89PNG\r\n\x1a\n"


# --- ConsoleEndpoint over ASGI ---------------------------------------------------------------


def request(method: str, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    async def main() -> httpx.Response:
        transport = httpx.ASGITransport(app=ConsoleEndpoint())
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            return await client.request(method, path, headers=headers)

    return asyncio.run(main())


def package_file(name: str) -> bytes:
    return (resources.files("proxy") / "console" / name).read_bytes()


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/console", "text/html; charset=utf-8"),
        ("/console/console.js", "text/javascript; charset=utf-8"),
        ("/console/console.css", "text/css; charset=utf-8"),
        ("/console/icon.svg", "image/svg+xml"),
    ],
)
def test_serves_the_package_files_with_security_and_cache_headers(
    path: str, content_type: str
) -> None:
    response = request("GET", path)
    assert response.status_code == 200
    assert response.content == package_file(FILES[path][0])
    assert response.headers["content-type"] == content_type
    assert response.headers["content-length"] == str(len(response.content))
    csp = response.headers["content-security-policy"]
    assert csp == CSP.decode() and csp.split(";")[0] == "default-src 'self'"
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "frame-ancestors 'none'" in csp
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-cache"
    assert re.fullmatch(r'"[0-9a-f]{32}"', response.headers["etag"])


def test_head_has_the_headers_of_get_and_no_body() -> None:
    get, head = request("GET", "/console"), request("HEAD", "/console")
    assert head.status_code == 200
    assert head.content == b""
    for name in ("content-type", "content-length", "etag", "content-security-policy"):
        assert head.headers[name] == get.headers[name]


def test_etags_differ_per_file_and_validate_to_304() -> None:
    etags = {path: request("GET", path).headers["etag"] for path in FILES}
    assert len(set(etags.values())) == len(FILES)
    etag = etags["/console/console.js"]
    for condition in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        response = request("GET", "/console/console.js", {"if-none-match": condition})
        assert response.status_code == 304, condition
        assert response.content == b""
        assert response.headers["etag"] == etag
        assert response.headers["cache-control"] == "no-cache"
    assert request("HEAD", "/console/console.js", {"if-none-match": etag}).status_code == 304
    stale = request("GET", "/console/console.js", {"if-none-match": etags["/console"]})
    assert stale.status_code == 200
    assert stale.content == package_file("console.js")


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_other_methods_are_405_with_allow(method: str) -> None:
    response = request(method, "/console")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD"
    assert response.json()["error"]["code"] == "MethodNotAllowed"


@pytest.mark.parametrize(
    "path",
    ["/console/nope", "/console/console.js/x", "/console/index.html", "/console/console.jsx",
     "/console//console.js", "/console/%2e%2e/openapi.json"],
)  # fmt: skip
def test_other_console_paths_are_404(path: str) -> None:
    response = request("GET", path)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "OperationNotFound"
    assert response.headers["x-content-type-options"] == "nosniff"


def test_a_trailing_slash_redirects_to_the_page() -> None:
    # The page's links are relative to /console, so /console/ would break them.
    response = request("GET", "/console/")
    assert response.status_code == 308
    assert response.headers["location"] == "../console"
    assert str(httpx.URL("http://gw/console/").join(response.headers["location"])) == (
        "http://gw/console"
    )


class _Markup(HTMLParser):
    """The page's inline code and the URLs it loads."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        if tag == "style":
            self.inline.append("<style>")
        if tag == "script":
            self._in_script = True
            if not named.get("src"):
                self.inline.append("<script> without src")
        for name, value in attrs:
            if name == "style" or name.startswith("on"):
                self.inline.append(f"{tag} {name}={value!r}")
            if name in ("src", "href") and value is not None and tag in ("script", "link", "img"):
                self.urls.append(value)

    def handle_endtag(self, tag: str) -> None:
        self._in_script = self._in_script and tag != "script"

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline.append(f"script text {data.strip()[:40]!r}")


def test_the_page_has_nothing_inline_and_loads_only_its_own_relative_files() -> None:
    markup = _Markup()
    markup.feed(package_file("index.html").decode())
    assert markup.inline == []  # CSP default-src 'self' would block them
    assert markup.urls, "the page loads its script and style sheet"
    for url in markup.urls:
        assert "//" not in url and ":" not in url, url  # same origin, works under a prefix
        assert "/console/" + url.removeprefix("console/") in FILES, url
    script = package_file("console.js").decode()
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script
    assert "eval(" not in script and "new Function" not in script
    assert "console.log" not in script  # nothing, keys included, goes to the browser's console


def _with_console(console: bool) -> config_module.Config:
    return config_module.loads(f"""
gateway:
  console: {str(console).lower()}
backends:
  - id: mock
    url: http://127.0.0.1:9/v1
apis:
  - id: chat
    path: /openai
    type: openai
    backend: mock
""")


@pytest.mark.parametrize("console", [True, False])
def test_the_gateway_serves_the_console_when_gateway_console_is_on(console: bool) -> None:
    async def scenario(client: httpx.AsyncClient, app: Any) -> list[int]:
        paths = ["/console", "/console/console.js", "/console/console.css"]
        return [(await client.get(path)).status_code for path in paths]

    statuses = run_app(_with_console(console), scenario)
    assert statuses == ([200, 200, 200] if console else [404, 404, 404])


# --- the page in Chromium, against a real gateway ---------------------------------------------


def console_config(mock_url: str) -> str:
    return f"""
gateway:
  admin-key: {ADMIN_KEY}
backends:
  - id: mock
    url: {mock_url}
apis:
  - id: chat
    display-name: Chat
    description: OpenAI-compatible chat on the mock
    path: /openai
    type: openai
    backend: mock
    policies:
      - llm-token-limit:
          tokens-per-minute: {TPM}
          token-quota: {QUOTA}
          token-quota-period: daily
          remaining-tokens-header-name: x-ratelimit-remaining-tokens
          remaining-quota-tokens-header-name: x-quota-remaining-tokens
          tokens-consumed-header-name: x-tokens-consumed
  - id: raw
    path: /passthrough
    type: passthrough
    backend: mock
  - id: team
    path: /team
    type: openai
    backend: mock
    subscription-key-names: {{header: X-Team-Key}}
subscriptions:
  - id: console-user
    scope: all-apis
    primary-key: {KEY}
"""


@pytest.fixture(scope="module")
def paced() -> Iterator[MockProc]:
    proc = start_mock(ttft_ms=100, itl_ms=ITL_MS, tokens=TOKENS)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def live(paced: MockProc) -> Iterator[GatewayProc]:
    proc = start_gateway(console_config(paced.url))
    yield proc
    proc.stop()


class Session:
    """One browser tab on the console, with everything it requested and logged."""

    def __init__(self, page: Page, gateway: GatewayProc, shots: Path):
        self.page = page
        self.gateway = gateway
        self.shots = shots
        self.requests: list[Request] = []
        self.messages: list[ConsoleMessage] = []
        self.errors: list[str] = []
        page.on("request", lambda sent: self.requests.append(sent))
        page.on("console", lambda message: self.messages.append(message))
        page.on("pageerror", lambda error: self.errors.append(str(error)))

    def open(self) -> Page:
        self.page.goto(self.gateway.base + "/console")
        expect(self.page.locator("body")).to_have_attribute("data-ready", "true")
        return self.page

    def pick(self, operation_id: str) -> None:
        self.page.locator(f'[data-operation="{operation_id}"]').click()
        expect(self.page.locator(f'[data-operation="{operation_id}"]')).to_have_attribute(
            "aria-current", "true"
        )

    def send(self) -> None:
        self.page.get_by_role("button", name="Send").click()

    def wait_done(self) -> None:
        expect(self.page.get_by_role("button", name="Send")).to_be_enabled(timeout=20_000)

    def usage(self) -> dict[str, str]:
        rows = self.page.locator("#usage-list .usage-row")
        names = rows.locator("dt").all_text_contents()
        values = rows.locator("dd").all_text_contents()
        return dict(zip(names, values, strict=True))

    def screenshot(self, name: str, **options: Any) -> Path:
        path = self.shots / name
        self.page.screenshot(path=str(path), **options)
        return path


@pytest.fixture
def session(browser: Browser, live: GatewayProc, tmp_path: Path) -> Iterator[Session]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    session = Session(context.new_page(), live, tmp_path)
    yield session
    context.close()
    # Whatever the test did: only the gateway was asked for anything, no script failed, and
    # no key reached a URL or the browser's console.
    origin = urlsplit(live.base)
    for sent in session.requests:
        url = urlsplit(sent.url)
        assert (url.scheme, url.netloc) == (origin.scheme, origin.netloc), sent.url
        assert KEY not in sent.url and ADMIN_KEY not in sent.url
    assert session.errors == []
    for message in session.messages:
        assert KEY not in message.text and ADMIN_KEY not in message.text
        assert "Content Security Policy" not in message.text, message.text


def assert_png(path: Path, width: int) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG) and len(data) > 1000, path
    (png_width,) = struct.unpack(">I", data[16:20])  # IHDR
    assert png_width == width, path


def numbers(usage: dict[str, str], *names: str) -> list[int]:
    return [int(usage[name]) for name in names]


def test_lists_the_apis_and_operations_of_openapi_json(session: Session) -> None:
    page = session.open()
    document = httpx.get(session.gateway.base + "/openapi.json").json()
    expected = {
        op["operationId"]
        for path, item in document["paths"].items()
        if path.startswith("/openai/")
        for op in item.values()
        if isinstance(op, dict) and "operationId" in op
    }
    assert expected == {
        f"chat.{op}"
        for op in ("chat-completions", "completions", "embeddings", "responses", "models")
    }
    listed = page.locator("#api-list [data-operation]")
    ids = [listed.nth(i).get_attribute("data-operation") for i in range(listed.count())]
    team = {name.replace("chat.", "team.") for name in expected}
    assert set(ids) == expected | team | {"raw.passthrough"}  # the wildcard: one entry
    assert page.locator("#api-list h3").all_text_contents() == ["chat", "raw", "team"]
    assert "OpenAI-compatible chat on the mock" in (page.locator("#api-list").text_content() or "")
    chat = page.locator('[data-operation="chat.chat-completions"]')
    assert chat.locator(".verb").text_content() == "POST"
    assert chat.locator(".op-summary").text_content() == "Create a chat completion"
    assert chat.locator(".op-path").text_content() == "/openai/chat/completions"
    # The chat operation is picked first, with the reference's sample body.
    expect(chat).to_have_attribute("aria-current", "true")
    body = json.loads(page.get_by_label("Request body").input_value())
    assert body["messages"] == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "How are you?"},
    ]
    assert body["max_tokens"] == 50
    assert page.locator("#url").text_content() == session.gateway.base + "/openai/chat/completions"
    assert page.locator("#key-header").text_content() == "Ocp-Apim-Subscription-Key"


def test_streams_tokens_as_they_arrive_with_usage_and_limit_headers(session: Session) -> None:
    page = session.open()
    session.pick("chat.chat-completions")
    page.get_by_label("Key, sent in").fill(KEY)
    page.get_by_label("Stream").check()
    body = json.loads(page.get_by_label("Request body").input_value())
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    session.send()

    # What the user sees, sampled while the reply streams in.
    samples: list[tuple[float, int]] = []
    send = page.get_by_role("button", name="Send")
    output = page.locator("#output")
    middle = None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done = send.is_enabled()
        samples.append((time.monotonic(), len(output.text_content() or "")))
        if done:
            break
        if middle is None and 0 < samples[-1][1] < len(REPLY) // 2:
            middle = session.screenshot("stream-middle.png")
        time.sleep(0.02)
    session.wait_done()
    assert output.text_content() == REPLY
    lengths = [n for _, n in samples]
    assert lengths == sorted(lengths), "the output only ever grows"
    growing = sorted({n for n in lengths if 0 < n < len(REPLY)})
    assert len(growing) >= 8, f"the reply appeared at once, not token by token: {lengths}"
    first = next(t for t, n in samples if n > 0)
    last = next(t for t, n in samples if n == len(REPLY))
    assert last - first > 0.5 * (TOKENS - 1) * ITL_MS / 1000
    assert middle is not None
    assert_png(middle, 1280)

    status = page.locator("#status").text_content() or ""
    assert status.startswith("200 OK") and "events" in status
    # 1 role chunk + 24 tokens + finish + usage + [DONE]
    assert page.locator("#event-count").text_content() == f"{TOKENS + 4} events"
    raw = page.locator("#raw").text_content() or ""
    assert raw.startswith("data: {") and raw.endswith("data: [DONE]\n\n")
    # The usage of the last chunk and the gateway's limit headers, in the Token usage panel.
    usage = session.usage()
    prompt, completion, total = numbers(usage, "prompt_tokens", "completion_tokens", "total_tokens")
    assert completion == TOKENS and total == prompt + completion
    remaining, quota, reserved = numbers(usage, *LIMIT_HEADERS)
    # A stream's headers leave first: they count the reservation (prompt estimate + 50).
    assert reserved > 50 and remaining <= TPM - reserved and quota <= QUOTA - reserved
    assert re.fullmatch(r"[0-9a-f]{32}", usage["x-request-id"])
    assert re.fullmatch(r"\d+\.\d{3}", usage["x-tollway-overhead-ms"])
    panel = page.get_by_role("region", name="Token usage")
    expect(panel).to_contain_text("completion_tokens")
    expect(panel).to_contain_text("x-ratelimit-remaining-tokens")
    highlighted = page.locator("#response-headers tr.limit th").all_text_contents()
    assert set(highlighted) >= {*LIMIT_HEADERS, "x-request-id", "x-tollway-overhead-ms"}
    assert_png(session.screenshot("stream-done.png", full_page=True), 1280)

    # The key went in the header /openapi.json names, not in the URL.
    sent = next(r for r in session.requests if r.url.endswith("/openai/chat/completions"))
    assert sent.method == "POST"
    assert sent.all_headers()["ocp-apim-subscription-key"] == KEY
    assert json.loads(sent.post_data or "")["stream"] is True


def test_stop_ends_a_stream_midway(session: Session) -> None:
    page = session.open()
    page.get_by_label("Key, sent in").fill(KEY)
    page.get_by_label("Stream").check()
    session.send()
    output = page.locator("#output")
    expect(output).to_contain_text(" ".join(WORDS[:3]))
    page.get_by_role("button", name="Stop").click()
    session.wait_done()
    expect(page.locator("#status")).to_contain_text("stopped after")
    shown = output.text_content() or ""
    assert 0 < len(shown) < len(REPLY) and REPLY.startswith(shown)
    expect(page.get_by_role("button", name="Stop")).to_be_disabled()
    # The gateway saw the client leave (and so cancelled the backend call).
    request_id = session.usage()["x-request-id"]
    deadline = time.monotonic() + 10
    while not (ended := [r for r in session.gateway.access_log() if r["request_id"] == request_id]):
        assert time.monotonic() < deadline, "the stopped request never ended at the gateway"
        time.sleep(0.05)
    assert ended[0]["error"] == "ClientDisconnected"


def test_a_whole_reply_shows_the_message_and_the_charged_usage(session: Session) -> None:
    page = session.open()
    page.get_by_label("Key, sent in").fill(KEY)
    assert not page.get_by_label("Stream").is_checked()
    session.send()
    session.wait_done()
    assert page.locator("#output").text_content() == REPLY
    expect(page.locator("#status")).to_contain_text("200 OK")
    expect(page.locator("#error")).to_be_hidden()
    usage = session.usage()
    prompt, completion, total = numbers(usage, "prompt_tokens", "completion_tokens", "total_tokens")
    assert completion == TOKENS and total == prompt + completion
    remaining, quota, consumed = numbers(usage, *LIMIT_HEADERS)
    assert consumed == total  # a whole reply's headers say what it is charged
    assert 0 < remaining <= TPM - total and 0 < quota <= QUOTA - total
    assert json.loads(page.locator("#raw").text_content() or "")["usage"]["total_tokens"] == total
    assert_png(session.screenshot("whole.png"), 1280)


def test_a_wrong_or_missing_key_shows_the_401(session: Session) -> None:
    page = session.open()
    page.get_by_label("Key, sent in").fill("not-a-key-0123456789")
    session.send()
    session.wait_done()
    expect(page.locator("#status")).to_contain_text("401 Unauthorized")
    alert = page.get_by_role("alert").filter(has_text="401")
    expect(alert).to_be_visible()
    expect(alert).to_contain_text("SubscriptionKeyInvalid")
    expect(alert).to_contain_text("Access denied due to invalid subscription key.")
    usage = session.usage()  # the limit headers are named, and what a refusal lacks is said
    assert {usage[name] for name in LIMIT_HEADERS} == {"not in this response"}
    assert_png(session.screenshot("wrong-key.png"), 1280)

    page.get_by_label("Key, sent in").fill("")
    session.send()
    session.wait_done()
    expect(page.get_by_role("alert").filter(has_text="401")).to_contain_text(
        "SubscriptionKeyNotFound"
    )
    sent = [r for r in session.requests if r.url.endswith("/chat/completions")]
    assert "ocp-apim-subscription-key" not in sent[-1].all_headers()


def test_a_refusal_shows_its_retry_after(session: Session) -> None:
    page = session.open()
    page.get_by_label("Key, sent in").fill(KEY)
    body = json.loads(page.get_by_label("Request body").input_value())
    page.get_by_label("Request body").fill(json.dumps({**body, "max_tokens": 2 * TPM}))
    session.send()
    session.wait_done()
    expect(page.locator("#status")).to_contain_text("429 Too Many Requests")
    alert = page.get_by_role("alert").filter(has_text="429")
    expect(alert).to_contain_text("TokenLimitExceeded")
    expect(alert).to_contain_text(re.compile(r"Retry after \d+ s \(Retry-After\)"))
    assert int(session.usage()["retry-after"]) > 0
    assert_png(session.screenshot("refused.png"), 1280)


def test_the_key_is_hidden_behind_the_eye_toggle(session: Session) -> None:
    page = session.open()
    key = page.get_by_label("Key, sent in")
    key.fill(KEY)
    assert key.get_attribute("type") == "password"
    page.get_by_text("HTTP request").click()
    preview = page.locator("#preview")
    expect(preview).to_contain_text("Ocp-Apim-Subscription-Key: ••••••••")
    assert KEY not in (preview.text_content() or "")
    toggle = page.get_by_role("button", name="Show the key")
    expect(toggle).to_have_attribute("aria-pressed", "false")
    toggle.click()
    assert key.get_attribute("type") == "text"
    expect(page.get_by_role("button", name="Hide the key")).to_have_attribute(
        "aria-pressed", "true"
    )
    expect(preview).to_contain_text(f"Ocp-Apim-Subscription-Key: {KEY}")
    page.get_by_role("button", name="Hide the key").click()
    assert key.get_attribute("type") == "password"


def test_the_key_goes_in_the_header_the_api_names(session: Session) -> None:
    page = session.open()
    session.pick("team.chat-completions")
    expect(page.locator("#key-header")).to_have_text("X-Team-Key")
    page.get_by_label("Key, sent in X-Team-Key").fill(KEY)
    session.send()
    session.wait_done()
    expect(page.locator("#status")).to_contain_text("200 OK")
    headers = session.requests[-1].all_headers()
    assert headers["x-team-key"] == KEY and "ocp-apim-subscription-key" not in headers
    assert session.requests[-1].url == session.gateway.base + "/team/chat/completions"


def test_headers_rows_can_be_added_and_removed(session: Session) -> None:
    page = session.open()
    page.get_by_label("Key, sent in").fill(KEY)
    page.get_by_role("button", name="Add header").click()
    page.get_by_label("Header 2 name").fill("X-Request-Id")
    page.get_by_label("Header 2 value").fill("console-test-123")
    page.get_by_role("button", name="Add header").click()
    page.get_by_label("Header 3 name").fill("X-Dropped")
    page.get_by_role("button", name="Remove header 3").click()
    expect(page.get_by_label("Header 3 name")).to_have_count(0)
    session.send()
    session.wait_done()
    assert session.usage()["x-request-id"] == "console-test-123"
    sent = next(r for r in session.requests if r.url.endswith("/chat/completions"))
    headers = sent.all_headers()
    assert headers["x-request-id"] == "console-test-123" and "x-dropped" not in headers
    assert headers["content-type"] == "application/json"


def test_a_passthrough_api_takes_a_typed_subpath_and_any_verb(session: Session) -> None:
    page = session.open()
    session.pick("raw.passthrough")
    page.get_by_label("Key, sent in").fill(KEY)
    assert page.get_by_label("Method").is_enabled()
    assert page.get_by_label("Request body").is_disabled()  # GET
    page.get_by_label("Subpath").fill("models")
    session.send()
    session.wait_done()
    expect(page.locator("#status")).to_contain_text("200 OK")
    expect(page.locator("#output")).to_contain_text("gpt-4o-mini")

    page.get_by_label("Method").select_option("POST")
    page.get_by_label("Subpath").fill("chat/completions")
    page.get_by_label("Request body").fill(
        json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True})
    )
    session.send()
    session.wait_done()
    assert page.locator("#output").text_content() == REPLY
    assert session.requests[-1].url == session.gateway.base + "/passthrough/chat/completions"


def test_keyboard_only_pick_fill_and_send(session: Session) -> None:
    page = session.open()
    page.locator('[data-operation="chat.completions"]').focus()
    page.keyboard.press("Enter")  # a real button: Enter picks it and moves to the request
    expect(page.locator("#request")).to_be_focused()
    expect(page.locator('[data-operation="chat.completions"]')).to_have_attribute(
        "aria-current", "true"
    )
    assert json.loads(page.get_by_label("Request body").input_value())["prompt"]
    for _ in range(6):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "key":
            break
    expect(page.get_by_label("Key, sent in")).to_be_focused()
    page.keyboard.type(KEY)
    page.get_by_label("Request body").focus()
    page.keyboard.press("Control+Enter")
    session.wait_done()
    assert page.locator("#output").text_content() == REPLY
    assert session.usage()["completion_tokens"] == str(TOKENS)


def test_fits_a_narrow_screen(session: Session) -> None:
    session.page.set_viewport_size({"width": 390, "height": 844})
    page = session.open()
    page.get_by_label("Key, sent in").fill(KEY)
    session.send()
    session.wait_done()
    assert page.evaluate("document.scrollingElement.scrollWidth") <= 390
    for control in ("#key", "#body", "#send", '[data-operation="chat.chat-completions"]'):
        box = page.locator(control).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, control
    assert_png(session.screenshot("narrow.png", full_page=True), 390)


def test_only_the_gateway_is_asked_for_anything(session: Session) -> None:
    # Every request of a whole visit, recorded (the fixture checks their origin too): the
    # page's own files, the description, the API call. No CDN, no font, nothing else.
    page = session.open()
    page.get_by_label("Key, sent in").fill(KEY)
    page.get_by_label("Stream").check()
    session.send()
    session.wait_done()
    paths = [urlsplit(r.url).path for r in session.requests]
    assert set(paths) == {
        "/console", "/console/console.css", "/console/console.js", "/console/icon.svg",
        "/openapi.json", "/openai/chat/completions",
    }  # fmt: skip
    assert page.locator("#output").text_content() == REPLY


def list_secrets(gateway: GatewayProc) -> httpx.Response:
    return httpx.post(
        gateway.base + "/admin/subscriptions/master/list-secrets",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )


def test_the_admin_key_fills_in_the_all_access_key(session: Session) -> None:
    # Needs the admin API (proxy/admin.py): POST /admin/subscriptions/master/list-secrets.
    secrets = list_secrets(session.gateway)
    assert secrets.status_code == 200, secrets.text
    master = secrets.json()["primary-key"]
    page = session.open()
    key = page.get_by_label("Key, sent in")
    assert key.input_value() == ""

    page.get_by_text("Use the built-in all-access subscription").click()
    page.get_by_label("Admin key").fill("not-the-admin-key-0123456789")
    page.get_by_role("button", name="Fill in the key").click()
    expect(page.locator("#admin-status")).to_contain_text("refused the admin key")
    assert key.input_value() == ""

    page.get_by_label("Admin key").fill(ADMIN_KEY)
    page.get_by_role("button", name="Fill in the key").click()
    expect(page.locator("#admin-status")).to_contain_text("Filled in the key")
    assert key.input_value() == master
    assert key.get_attribute("type") == "password"
    session.send()
    session.wait_done()
    expect(page.locator("#status")).to_contain_text("200 OK")
    call = [r for r in session.requests if r.url.endswith("/list-secrets")][-1]
    assert call.method == "POST" and call.all_headers()["authorization"] == f"Bearer {ADMIN_KEY}"

    # Given once: the tab remembers the admin key, a reload fills the key in by itself.
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    expect(key).to_have_value(master)
    page.get_by_text("Use the built-in all-access subscription").click()
    page.get_by_role("button", name="Forget").click()
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    assert key.input_value() == ""
