"""The fake Azure AI Content Safety service of `tollway mock-llm`, driven as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from proxy.mock_safety import PROMPT_ATTACKS, SEVERITIES
from tests.mockproc import ROOT, MockProc, free_port, start_mock

VERSION = "2024-09-01"
KEY = "cs-key-0123456789"
ANALYZE = "/contentsafety/text:analyze"
SHIELD = "/contentsafety/text:shieldPrompt"
BLOCKLISTS = "/contentsafety/text/blocklists/"
ALL = ["Hate", "SelfHarm", "Sexual", "Violence"]
NOT_FOUND = {"error": {"code": "404", "message": "Resource not found"}}


@pytest.fixture(scope="module")
def backend() -> Iterator[MockProc]:
    proc = start_mock()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def keyed() -> Iterator[MockProc]:
    proc = start_mock(content_safety_key=KEY)
    yield proc
    proc.stop()


def call(
    mock: MockProc,
    path: str,
    body: Any = None,
    *,
    method: str = "POST",
    version: str | None = VERSION,
    headers: dict[str, str] | None = None,
    content: bytes | None = None,
) -> httpx.Response:
    params = {"api-version": version} if version else {}
    return httpx.request(
        method, mock.base + path, params=params, json=body, content=content, headers=headers
    )


def analyze(mock: MockProc, **body: Any) -> dict[str, Any]:
    reply = call(mock, ANALYZE, body)
    assert reply.status_code == 200, reply.text
    result: dict[str, Any] = reply.json()
    return result


def severities(mock: MockProc, text: str, output: str) -> dict[str, int]:
    result = analyze(mock, text=text, outputType=output)
    return {entry["category"]: entry["severity"] for entry in result["categoriesAnalysis"]}


def new_list(mock: MockProc, *items: str) -> str:
    name = "list" + uuid.uuid4().hex[:8]
    assert call(mock, BLOCKLISTS + name, {}, method="PATCH").status_code == 201
    if items:
        body = {"blocklistItems": [{"text": item} for item in items]}
        assert call(mock, f"{BLOCKLISTS}{name}:addOrUpdateBlocklistItems", body).status_code == 200
    return name


def assert_error(reply: httpx.Response, status: int, code: str) -> None:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["code"] == code and error["message"]


# -- text:analyze -------------------------------------------------------------------------------

TABLE = [
    (c, phrase, level) for c, phrases in SEVERITIES.items() for phrase, level in phrases.items()
]


@pytest.mark.parametrize(("category", "phrase", "level"), TABLE)
def test_each_phrase_has_its_severity_in_both_output_types(
    backend: MockProc, category: str, phrase: str, level: int
) -> None:
    text = f"Well. {phrase.upper()}, they said"
    eight = severities(backend, text, "EightSeverityLevels")
    four = severities(backend, text, "FourSeverityLevels")
    assert eight == {c: level if c == category else 0 for c in ALL}
    assert four == {c: level // 2 * 2 if c == category else 0 for c in ALL}


@pytest.mark.parametrize(
    ("text", "category", "eight", "four"),
    [
        ("the MASSACRE", "Violence", 7, 6),
        ("how to  build\n\ta   BOMB", "Violence", 5, 4),  # whitespace collapsed
        ("a fight and a massacre", "Violence", 7, 6),  # the highest phrase counts
        ("those people are vermin", "Hate", 4, 4),
        ("just vermin", "Hate", 3, 2),
        ("they are subhuman vermin", "Hate", 6, 6),
        ("a firefighter", "Violence", 0, 0),  # whole words only
        ("fighting", "Violence", 0, 0),
        ("verminous", "Hate", 0, 0),
        ("(fight)", "Violence", 2, 2),  # punctuation is a word boundary
        ("I will end my life", "SelfHarm", 6, 6),
        ("i might hurt myself", "SelfHarm", 4, 4),
        ("explicit sexual content", "Sexual", 5, 4),
        ("a suggestive remark", "Sexual", 2, 2),
        ("a pleasant day", "Hate", 0, 0),
    ],
)
def test_matching_and_levels(
    backend: MockProc, text: str, category: str, eight: int, four: int
) -> None:
    assert severities(backend, text, "EightSeverityLevels")[category] == eight
    assert severities(backend, text, "FourSeverityLevels")[category] == four


def test_default_is_all_four_categories_in_four_levels(backend: MockProc) -> None:
    result = analyze(backend, text="plans to build a bomb")
    assert result == {
        "blocklistsMatch": [],
        "categoriesAnalysis": [
            {"category": "Hate", "severity": 0},
            {"category": "SelfHarm", "severity": 0},
            {"category": "Sexual", "severity": 0},
            {"category": "Violence", "severity": 4},
        ],
    }


def test_categories_are_reported_in_the_order_asked(backend: MockProc) -> None:
    result = analyze(backend, text="massacre of the subhuman", categories=["Violence", "Hate"])
    assert result["categoriesAnalysis"] == [
        {"category": "Violence", "severity": 6},
        {"category": "Hate", "severity": 6},
    ]


@pytest.mark.parametrize("size", [10_000, 10_001])
def test_analyze_text_limit(backend: MockProc, size: int) -> None:
    text = ("fight " * size)[:size]
    reply = call(backend, ANALYZE, {"text": text})
    if size == 10_000:
        assert reply.status_code == 200 and reply.json()["categoriesAnalysis"][3]["severity"] == 2
    else:
        assert_error(reply, 400, "InvalidRequestBody")


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[]",
        b"{}",  # text is required
        b'{"text": 5}',
        b'{"text": "x", "categories": ["Violence", "Gore"]}',
        b'{"text": "x", "outputType": "TenSeverityLevels"}',
        b'{"text": "x", "haltOnBlocklistHit": "yes"}',
    ],
)
def test_analyze_refuses_bad_bodies(backend: MockProc, content: bytes) -> None:
    assert_error(call(backend, ANALYZE, content=content), 400, "InvalidRequestBody")


# -- blocklists ---------------------------------------------------------------------------------


def test_blocklist_create_update_and_items(backend: MockProc) -> None:
    name = "list" + uuid.uuid4().hex[:8]
    created = call(backend, BLOCKLISTS + name, {"description": "first"}, method="PATCH")
    assert created.status_code == 201
    assert created.json() == {"blocklistName": name, "description": "first"}
    updated = call(backend, BLOCKLISTS + name, {"description": "second"}, method="PATCH")
    assert updated.status_code == 200
    assert updated.json() == {"blocklistName": name, "description": "second"}
    items = {"blocklistItems": [{"text": "Zorp", "description": "a word"}, {"text": "grue"}]}
    added = call(backend, f"{BLOCKLISTS}{name}:addOrUpdateBlocklistItems", items)
    assert added.status_code == 200
    first, second = added.json()["blocklistItems"]
    assert (first["text"], first["description"]) == ("Zorp", "a word")
    assert (second["text"], second["description"]) == ("grue", "")
    assert first["blocklistItemId"] != second["blocklistItemId"]
    again = call(
        backend,
        f"{BLOCKLISTS}{name}:addOrUpdateBlocklistItems",
        {"blocklistItems": [{"text": "Zorp", "description": "new"}]},
    )
    (same,) = again.json()["blocklistItems"]
    assert same == {
        "blocklistItemId": first["blocklistItemId"],
        "text": "Zorp",
        "description": "new",
    }


def test_blocklist_items_match_as_case_insensitive_substrings(backend: MockProc) -> None:
    name = new_list(backend, "Zorp", "grue")
    other = new_list(backend, "nothing here")
    result = analyze(backend, text="The ZORPification of a fight", blocklistNames=[name, other])
    assert [(m["blocklistName"], m["blocklistItemText"]) for m in result["blocklistsMatch"]] == [
        (name, "Zorp")
    ]
    assert result["blocklistsMatch"][0]["blocklistItemId"]
    assert result["categoriesAnalysis"][3] == {"category": "Violence", "severity": 2}
    clean = analyze(backend, text="nothing to see", blocklistNames=[name])
    assert clean["blocklistsMatch"] == []


@pytest.mark.parametrize("hit", [True, False])
def test_halt_on_blocklist_hit_empties_categories(backend: MockProc, hit: bool) -> None:
    name = new_list(backend, "grue")
    text = "a grue and a massacre" if hit else "a massacre"
    result = analyze(backend, text=text, blocklistNames=[name], haltOnBlocklistHit=True)
    assert bool(result["blocklistsMatch"]) is hit
    assert result["categoriesAnalysis"] == ([] if hit else [
        {"category": c, "severity": 6 if c == "Violence" else 0} for c in ALL
    ])  # fmt: skip


def test_unknown_blocklist_is_404(backend: MockProc) -> None:
    missing = "missing" + uuid.uuid4().hex[:8]
    reply = call(backend, ANALYZE, {"text": "x", "blocklistNames": [missing]})
    assert_error(reply, 404, "NotFound")
    assert missing in reply.json()["error"]["message"]
    items = {"blocklistItems": [{"text": "x"}]}
    add = call(backend, f"{BLOCKLISTS}{missing}:addOrUpdateBlocklistItems", items)
    assert_error(add, 404, "NotFound")


def test_deleted_blocklist_is_gone(backend: MockProc) -> None:
    name = new_list(backend, "grue")
    deleted = call(backend, BLOCKLISTS + name, method="DELETE")
    assert deleted.status_code == 204 and deleted.content == b""
    assert_error(
        call(backend, ANALYZE, {"text": "grue", "blocklistNames": [name]}), 404, "NotFound"
    )
    assert call(backend, BLOCKLISTS + name, {}, method="PATCH").status_code == 201


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"blocklistItems": []},
        {"blocklistItems": [{"description": "no text"}]},
        {"blocklistItems": [{"text": ""}]},
        {"blocklistItems": [{"text": "x" * 129}]},
    ],
)
def test_bad_blocklist_items_are_400(backend: MockProc, body: Any) -> None:
    name = new_list(backend)
    reply = call(backend, f"{BLOCKLISTS}{name}:addOrUpdateBlocklistItems", body)
    assert_error(reply, 400, "InvalidRequestBody")


# -- text:shieldPrompt --------------------------------------------------------------------------


@pytest.mark.parametrize("attack", PROMPT_ATTACKS)
def test_shield_detects_each_attack(backend: MockProc, attack: str) -> None:
    body = {"userPrompt": f"Please,  {attack.upper()}!", "documents": ["fine", f"x {attack} y"]}
    reply = call(backend, SHIELD, body)
    assert reply.status_code == 200
    assert reply.json() == {
        "userPromptAnalysis": {"attackDetected": True},
        "documentsAnalysis": [{"attackDetected": False}, {"attackDetected": True}],
    }


def test_shield_clean_prompt_and_no_documents(backend: MockProc) -> None:
    reply = call(backend, SHIELD, {"userPrompt": "ignore the previous noise, please"})
    assert reply.json() == {
        "userPromptAnalysis": {"attackDetected": False},
        "documentsAnalysis": [],
    }


@pytest.mark.parametrize(
    ("body", "ok"),
    [
        ({"userPrompt": "a" * 10_000}, True),
        ({"userPrompt": "a" * 10_001}, False),
        ({"userPrompt": "", "documents": ["d"] * 5}, True),
        ({"userPrompt": "", "documents": ["d"] * 6}, False),
        ({"userPrompt": "", "documents": ["a" * 5_000, "b" * 5_000]}, True),
        ({"userPrompt": "", "documents": ["a" * 5_000, "b" * 5_001]}, False),
        ({}, False),
        ({"userPrompt": 3}, False),
        ({"userPrompt": "x", "documents": "not a list"}, False),
    ],
)
def test_shield_limits(backend: MockProc, body: Any, ok: bool) -> None:
    reply = call(backend, SHIELD, body)
    if ok:
        assert reply.status_code == 200
    else:
        assert_error(reply, 400, "InvalidRequestBody")


# -- api-version, routing, key ------------------------------------------------------------------


@pytest.mark.parametrize("version", [None, "", "2099-01-01"])
@pytest.mark.parametrize("path", [ANALYZE, SHIELD, BLOCKLISTS + "any"])
def test_missing_or_unknown_api_version_is_404(
    backend: MockProc, version: str | None, path: str
) -> None:
    method = "PATCH" if path.startswith(BLOCKLISTS) else "POST"
    url = backend.base + path + ("" if version is None else f"?api-version={version}")
    reply = httpx.request(method, url, json={"text": "x", "userPrompt": "x"})
    assert reply.status_code == 404 and reply.json() == NOT_FOUND


def test_older_ga_version_is_accepted(backend: MockProc) -> None:
    assert call(backend, ANALYZE, {"text": "x"}, version="2023-10-01").status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/contentsafety/image:analyze", 404),
        ("POST", BLOCKLISTS + "x:removeBlocklistItems", 404),
        ("GET", ANALYZE, 405),
        ("PUT", BLOCKLISTS + "x", 405),
    ],
)
def test_unknown_routes(backend: MockProc, method: str, path: str, status: int) -> None:
    reply = call(backend, path, {}, method=method)
    assert reply.status_code == status and reply.json()["error"]["message"]
    if status == 405:
        assert reply.headers["allow"] in ("POST", "PATCH, DELETE")


@pytest.mark.parametrize("key", [None, "", "wrong", KEY + "x"])
def test_key_is_demanded_when_configured(keyed: MockProc, key: str | None) -> None:
    headers = {} if key is None else {"Ocp-Apim-Subscription-Key": key}
    for path in (ANALYZE, SHIELD):
        reply = call(keyed, path, {"text": "x", "userPrompt": "x"}, headers=headers)
        assert reply.status_code == 401
        error = reply.json()["error"]
        assert error["code"] == "401"
        assert error["message"].startswith("Access denied due to invalid subscription key")


def test_right_key_is_accepted(keyed: MockProc) -> None:
    headers = {"Ocp-Apim-Subscription-Key": KEY}
    assert call(keyed, ANALYZE, {"text": "fight"}, headers=headers).status_code == 200
    name = "keyed" + uuid.uuid4().hex[:8]
    assert call(keyed, BLOCKLISTS + name, {}, method="PATCH", headers=headers).status_code == 201
    assert call(keyed, BLOCKLISTS + name, {}, method="PATCH").status_code == 401
    # the OpenAI-compatible routes do not care about the content-safety key
    assert httpx.post(keyed.url + "/chat/completions", json={"messages": []}).status_code == 200


@pytest.mark.parametrize("via", ["flag", "env"])
def test_cli_content_safety_key(via: str) -> None:
    port = free_port()
    args = ["--content-safety-key", "from-cli"] if via == "flag" else []
    env = {**os.environ, "TOLLWAY_MOCK_CONTENT_SAFETY_KEY": "from-cli"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "mock-llm", "--port", str(port), *args],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}{ANALYZE}?api-version={VERSION}"
        deadline = time.monotonic() + 20
        while True:
            try:
                denied = httpx.post(url, json={"text": "x"})
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
        assert denied.status_code == 401
        allowed = httpx.post(
            url, json={"text": "x"}, headers={"ocp-apim-subscription-key": "from-cli"}
        )
        assert allowed.status_code == 200
    finally:
        proc.terminate()
        proc.wait(10)


# -- faults and recording -----------------------------------------------------------------------


def test_injected_status_is_azure_shaped(backend: MockProc) -> None:
    headers = {"x-mock-status": "429", "x-mock-retry-after": "4"}
    reply = call(backend, ANALYZE, {"text": "x"}, headers=headers)
    assert_error(reply, 429, "TooManyRequests")
    assert reply.headers["retry-after"] == "4"
    assert_error(call(backend, SHIELD, {}, headers={"x-mock-status": "500"}), 500, "500")
    assert_error(
        call(backend, ANALYZE, {}, headers={"x-mock-delay-ms": "soon"}), 400, "InvalidRequestBody"
    )


def test_injected_delay(backend: MockProc) -> None:
    started = time.monotonic()
    reply = call(backend, SHIELD, {"userPrompt": "hi"}, headers={"x-mock-delay-ms": "300"})
    assert 0.28 <= time.monotonic() - started < 5
    assert reply.json()["userPromptAnalysis"] == {"attackDetected": False}


def test_close_after_aborts(backend: MockProc) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        call(backend, ANALYZE, {"text": "x"}, headers={"x-mock-close-after": "0"})


def test_sticky_faults_with_when_apply(backend: MockProc) -> None:
    backend.faults(
        {"faults": {"status": "503"}, "when": {"x-caller": "gateway"}, "times": 2},
        {"faults": {"delay-ms": "200"}, "when": {"x-caller": "slow"}},
    )
    try:
        headers = {"x-caller": "gateway"}
        statuses = [
            call(backend, ANALYZE, {"text": "x"}, headers=headers).status_code for _ in range(3)
        ]
        assert statuses == [503, 503, 200]
        assert call(backend, ANALYZE, {"text": "x"}).status_code == 200
        started = time.monotonic()
        assert (
            call(backend, SHIELD, {"userPrompt": "x"}, headers={"x-caller": "slow"}).status_code
            == 200
        )
        assert time.monotonic() - started >= 0.18
    finally:
        backend.faults()


def test_requests_are_recorded(backend: MockProc) -> None:
    backend.clear()
    body = {"text": "a fight", "categories": ["Violence"]}
    headers = {"Ocp-Apim-Subscription-Key": "anything", "x-trace": "t1"}
    call(backend, ANALYZE, body, headers=headers)
    call(backend, ANALYZE, {"text": "x"}, version=None)
    ok, missing = backend.requests()
    assert (ok["method"], ok["path"], ok["query"], ok["status"]) == (
        "POST",
        ANALYZE,
        f"api-version={VERSION}",
        200,
    )
    assert ["ocp-apim-subscription-key", "anything"] in ok["headers"]
    assert json.loads(ok["body"]) == body and ok["finished"] is not None
    assert (missing["path"], missing["query"], missing["status"]) == (ANALYZE, "", 404)
