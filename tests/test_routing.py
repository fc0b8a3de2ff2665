"""Route table answers and passthrough path confinement."""

from __future__ import annotations

import pytest

from proxy.clients import ClientAddress
from proxy.errors import InvalidRequestError, MethodNotAllowedError, OperationNotFoundError
from proxy.routing import Router, confine


def make_router() -> Router[str]:
    router: Router[str] = Router()
    router.add_openai("/openai", "chat-api")
    router.add_passthrough("/raw", "raw-api")
    router.add_passthrough("/raw/deeper", "deeper-api")
    return router


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", "/openai/chat/completions", ("chat-api", "chat-completions", "chat/completions")),
        ("POST", "/openai/embeddings", ("chat-api", "embeddings", "embeddings")),
        ("GET", "/openai/models", ("chat-api", "models", "models")),
        ("PATCH", "/raw/a/b", ("raw-api", "passthrough", "a/b")),
        ("GET", "/raw/deeper/x", ("deeper-api", "passthrough", "x")),
        ("GET", "/raw", ("raw-api", "passthrough", "")),
    ],
)
def test_matches(method: str, path: str, expected: tuple[str, str, str]) -> None:
    assert tuple(make_router().match(method, path, path.encode())) == expected


def test_wrong_verb_is_405_with_allow() -> None:
    with pytest.raises(MethodNotAllowedError) as info:
        make_router().match("GET", "/openai/chat/completions", b"/openai/chat/completions")
    assert info.value.headers == (("allow", "POST"),)


@pytest.mark.parametrize(
    "path", ["/", "/openai", "/openai/chat", "/rawx/a", "/openai/chat/completions/"]
)
def test_unknown_is_404(path: str) -> None:
    with pytest.raises(OperationNotFoundError):
        make_router().match("POST", path, path.encode())


@pytest.mark.parametrize(
    "subpath",
    ["..", "a/../b", "%2e%2e", "%2E%2e/x", "..%2fx", "a/..%2F..%2Fb", "%252e%252e", "%25252e%25252e",
     ".", "a/./b", "a\\b", "a%5c..%5cb", "a%00b", "a%0d%0ab"],
)  # fmt: skip
def test_confine_refuses_escapes(subpath: str) -> None:
    with pytest.raises(InvalidRequestError):
        confine(subpath)


@pytest.mark.parametrize(
    "subpath",
    ["", "a/b", "a..b/c", "...", "//host/x", "http://evil/x", "a%2Fb", "v1/files/file-abc"],
)
def test_confine_keeps_the_rest_unchanged(subpath: str) -> None:
    assert confine(subpath) == subpath


def _scope(peer: str, forwarded: str | None = None) -> dict[str, object]:
    headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded else []
    return {"client": (peer, 1234), "headers": headers}


@pytest.mark.parametrize(
    ("trusted", "peer", "forwarded", "expected"),
    [
        ((), "10.0.0.5", "1.2.3.4", "10.0.0.5"),  # no trusted proxies: XFF ignored
        (("10.0.0.0/8",), "10.0.0.5", "1.2.3.4", "1.2.3.4"),
        (
            ("10.0.0.0/8",),
            "10.0.0.5",
            "6.6.6.6, 1.2.3.4, 10.0.0.9",
            "1.2.3.4",
        ),  # rightmost untrusted
        (("10.0.0.0/8",), "8.8.8.8", "1.2.3.4", "8.8.8.8"),  # untrusted peer: XFF ignored
        (("10.0.0.0/8",), "10.0.0.5", None, "10.0.0.5"),
    ],
)
def test_client_address(
    trusted: tuple[str, ...], peer: str, forwarded: str | None, expected: str
) -> None:
    assert ClientAddress(trusted).of(_scope(peer, forwarded)) == expected
