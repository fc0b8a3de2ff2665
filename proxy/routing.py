"""The route table: built once from the config, looked up by path (SPEC §4).

openai-type APIs expose five fixed operations, matched exactly; passthrough APIs own every
subpath under their prefix. A known path with the wrong verb is 405 with `Allow`.
"""

from __future__ import annotations

from typing import Generic, NamedTuple, TypeVar
from urllib.parse import unquote

from proxy.errors import InvalidRequestError, MethodNotAllowedError, OperationNotFoundError

OPENAI_OPERATIONS: dict[str, tuple[str, str]] = {
    # subpath: (operation id, method)
    "chat/completions": ("chat-completions", "POST"),
    "completions": ("completions", "POST"),
    "embeddings": ("embeddings", "POST"),
    "responses": ("responses", "POST"),
    "models": ("models", "GET"),
}
PASSTHROUGH_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
_PASSTHROUGH_SET = frozenset(PASSTHROUGH_METHODS)

T = TypeVar("T")


class Match(NamedTuple, Generic[T]):
    target: T  # what the route leads to (the API's handler state)
    operation: str  # operation id; "passthrough" for passthrough APIs
    subpath: str  # openai: the fixed operation path; passthrough: the raw subpath


class Router(Generic[T]):
    """Maps request paths to API targets."""

    def __init__(self) -> None:
        self._exact: dict[str, tuple[T, str, str, str]] = {}
        self._passthrough: list[tuple[bytes, T]] = []

    def add_openai(self, path: str, target: T) -> None:
        for subpath, (operation, method) in OPENAI_OPERATIONS.items():
            self._exact[f"{path}/{subpath}"] = (target, operation, subpath, method)

    def add_passthrough(self, path: str, target: T) -> None:
        self._passthrough.append((path.encode("latin-1"), target))
        # Longest prefix first, so nested passthrough roots resolve to the deepest one.
        self._passthrough.sort(key=lambda item: -len(item[0]))

    def match(self, method: str, path: str, raw_path: bytes) -> Match[T]:
        """Find the route or raise 404 `OperationNotFound` / 405 `MethodNotAllowed`."""
        exact = self._exact.get(path)
        if exact is not None:
            target, operation, subpath, allowed = exact
            if method != allowed:
                raise MethodNotAllowedError((allowed,))
            return Match(target, operation, subpath)
        for prefix, target in self._passthrough:
            if raw_path == prefix or raw_path.startswith(prefix + b"/"):
                if method not in _PASSTHROUGH_SET:
                    raise MethodNotAllowedError(PASSTHROUGH_METHODS)
                return Match(target, "passthrough", raw_path[len(prefix) + 1 :].decode("latin-1"))
        raise OperationNotFoundError


_FORBIDDEN_CHARS = ("\\", "\x00", "\r", "\n", "\t")


def confine(subpath: str) -> str:
    """Check a passthrough subpath (raw, percent-encoded) and return it unchanged.

    The backend URL is the base URL plus this subpath, so the only way out of the base path
    would be a dot segment, literal or percent-encoded (`..`, `%2e%2e`, `..%2f`, doubly
    encoded, or before a `;` path parameter: `..;x`, `%2e%2e%3b`): any such segment, a
    backslash or a control character is refused with 400.
    Leading slashes (`//host`) stay under the base path because nothing is URL-joined.
    """
    decoded = subpath
    for _ in range(4):  # the raw form, then up to three layers of percent-encoding
        _check_segments(decoded)
        if "%" not in decoded:
            return subpath
        decoded = unquote(decoded)
    _check_segments(decoded)
    if "%25" in decoded:
        raise InvalidRequestError("The request path is percent-encoded too many times.")
    return subpath


def _check_segments(path: str) -> None:
    if any(c in path for c in _FORBIDDEN_CHARS):
        raise InvalidRequestError("The request path contains a forbidden character.")
    for segment in path.split("/"):
        # Java servers (Tomcat, Jetty) take `..;jsessionid=x` as the segment `..` (path params)
        if segment.partition(";")[0].strip(" ") in (".", ".."):
            raise InvalidRequestError("The request path may not contain dot segments.")
