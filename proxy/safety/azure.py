"""A client for the Azure AI Content Safety text API, through a configured backend: its pool
members, retries, breakers and credentials (`Ocp-Apim-Subscription-Key`, or whatever the
backend's `credentials` set) apply as to any request (proxy/dispatch.py).

- `analyze(text, ...)`: `POST /contentsafety/text:analyze` with the categories, output type
  and blocklist names; returns each category's severity and the blocklists that matched.
- `shield(user_prompt, documents)`: `POST /contentsafety/text:shieldPrompt`; returns whether
  Prompt Shields detected a user-prompt attack and a document (indirect) attack.

Anything but a 200 in the documented shape is `SafetyUnavailableError`, whose message names
what went wrong (a status, a code) and never the text screened; the policy decides whether
that blocks (proxy/safety/policy.py, `on-error`).
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from proxy.dispatch import Route
from proxy.errors import GatewayError

API_VERSION = "2024-09-01"
_QUERY = f"api-version={API_VERSION}"
_HEADERS = b"content-type: application/json\r\naccept-encoding: identity\r\n"
_ANALYZE = "contentsafety/text:analyze"
_SHIELD = "contentsafety/text:shieldPrompt"


class SafetyUnavailableError(Exception):
    """The Content Safety backend could not screen a text (unreachable, an error status,
    an answer not in the documented shape)."""


class _AnalyzeRequest(msgspec.Struct, rename="camel", omit_defaults=True):
    text: str
    categories: list[str]
    output_type: str
    blocklist_names: list[str] = []
    halt_on_blocklist_hit: bool = False


class _CategoryAnalysis(msgspec.Struct):
    category: str
    severity: int | None = 0


class _BlocklistMatch(msgspec.Struct, rename="camel"):
    blocklist_name: str


class _AnalyzeReply(msgspec.Struct, rename="camel"):
    categories_analysis: list[_CategoryAnalysis] = []
    blocklists_match: list[_BlocklistMatch] | None = None


class _ShieldRequest(msgspec.Struct, rename="camel", omit_defaults=True):
    user_prompt: str | None = None
    documents: list[str] = []


class _Detection(msgspec.Struct, rename="camel"):
    attack_detected: bool


class _ShieldReply(msgspec.Struct, rename="camel"):
    user_prompt_analysis: _Detection | None = None
    documents_analysis: list[_Detection] = []


class Analysis(msgspec.Struct, frozen=True):
    """What `text:analyze` found: severity by category, and the blocklists that matched."""

    severities: dict[str, int]
    blocklists: tuple[str, ...]


_encoder = msgspec.json.Encoder()
_analysis_decoder = msgspec.json.Decoder(_AnalyzeReply)
_shield_decoder = msgspec.json.Decoder(_ShieldReply)
_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError)


class ContentSafetyClient:
    """The text API of the Content Safety backend `backend_id`, reached through `route`."""

    def __init__(self, route: Route, backend_id: str):
        self._route = route
        self.backend_id = backend_id

    async def analyze(
        self,
        text: str,
        categories: Sequence[str],
        output_type: str,
        blocklists: Sequence[str] = (),
    ) -> Analysis:
        request = _AnalyzeRequest(text, list(categories), output_type, list(blocklists),
                                  halt_on_blocklist_hit=bool(blocklists))  # fmt: skip
        payload = await self._post(_ANALYZE, _encoder.encode(request))
        try:
            reply = _analysis_decoder.decode(payload)
        except _ERRORS:
            raise SafetyUnavailableError("text:analyze: not an analysis reply") from None
        severities = {c.category: c.severity or 0 for c in reply.categories_analysis}
        matched = tuple(dict.fromkeys(m.blocklist_name for m in reply.blocklists_match or ()))
        return Analysis(severities, matched)

    async def shield(
        self, user_prompt: str | None, documents: Sequence[str] = ()
    ) -> tuple[bool, bool]:
        """Did Prompt Shields find an attack in the user prompt, in any of the documents?"""
        request = _ShieldRequest(user_prompt, list(documents))
        payload = await self._post(_SHIELD, _encoder.encode(request))
        try:
            reply = _shield_decoder.decode(payload)
        except _ERRORS:
            raise SafetyUnavailableError("text:shieldPrompt: not a Prompt Shields reply") from None
        if user_prompt is not None and reply.user_prompt_analysis is None:
            raise SafetyUnavailableError("text:shieldPrompt: no userPromptAnalysis")
        if len(reply.documents_analysis) != len(documents):
            raise SafetyUnavailableError("text:shieldPrompt: not one analysis per document")
        user = reply.user_prompt_analysis is not None and reply.user_prompt_analysis.attack_detected
        return user, any(d.attack_detected for d in reply.documents_analysis)

    async def _post(self, subpath: str, body: bytes) -> bytes:
        try:
            status, payload = await self._route.fetch(subpath, _QUERY, _HEADERS, body)
        except GatewayError as exc:
            raise SafetyUnavailableError(f"{subpath}: {exc.code}") from exc
        if status != 200:
            raise SafetyUnavailableError(f"{subpath}: answered {status}{_code(payload)}")
        return payload


class _ErrorBody(msgspec.Struct):
    code: str = ""


class _Error(msgspec.Struct):
    error: _ErrorBody


def _code(payload: bytes) -> str:
    """` (code X)` from an Azure error body, if it has one (its message may quote the text)."""
    try:
        code = msgspec.json.decode(payload, type=_Error).error.code
    except _ERRORS:
        return ""
    return f" (code {code[:60]})" if code else ""
