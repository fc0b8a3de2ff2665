"""Streamed completions screened as they flow (`enforce-on-completions`; the policy itself
is proxy/safety/policy.py).

`StreamGuard` sits in the relay (proxy/relay.py `relay_events`): it holds a stream's events
back until enough new text has arrived (`FIRST_STEP` characters, then twice as many each
time, up to `stream-window-size`), screens that text with the `window-overlap-size`
characters before it (a phrase cut between two screenings is still whole in one), and then
lets the held events go. Each choice is screened on its own. A violation raises
`ContentBlockedError`, which the relay turns into the stream's one error event: nothing
held, and nothing after it, is sent.
"""

from __future__ import annotations

from collections.abc import Sequence

from proxy.errors import ContentBlockedError
from proxy.exchange import Exchange
from proxy.safety.policy import COMPLETION, Classes, SafetyPolicy, check, choice_label
from proxy.schemas import delta_texts
from proxy.sse import parse_event

FIRST_STEP = 16  # characters of a stream screened before its first text goes out


def stream_texts(events: Sequence[bytes]) -> list[list[str]]:
    """The text of a whole recorded stream, one list per choice."""
    by_choice: dict[int, list[str]] = {}
    for index, text in _event_texts(events):
        by_choice.setdefault(index, []).append(text)
    return [["".join(by_choice[i])] for i in sorted(by_choice)]


def _event_texts(events: Sequence[bytes]) -> list[tuple[int, str]]:
    """`(choice, text)` for the output text the SSE `events` carry, in order."""
    texts: list[str] = []
    choices: list[int] = []
    for event in events:
        _, data = parse_event(event)
        if data:
            delta_texts(data, texts, choices)
    return list(zip(choices, texts, strict=True))


class StreamGuard:
    """Screens a streamed completion as it flows (see the module docstring)."""

    __slots__ = ("_exchange", "_held", "_max_step", "_new", "_overlap", "_pending", "_policies",
                 "_step", "_tail", "blocked")  # fmt: skip

    def __init__(self, policies: Sequence[SafetyPolicy], exchange: Exchange):
        self._policies = tuple(policies)
        self._exchange = exchange
        # The first text goes out after FIRST_STEP characters (time to first token), each
        # next step twice as long, up to stream-window-size: few more calls, a quick start.
        self._max_step = min(p.spec.stream_window_size for p in policies)
        self._step = min(FIRST_STEP, self._max_step)
        self._overlap = max(p.spec.window_overlap_size for p in policies)
        self._held: list[bytes] = []
        self._pending: dict[int, list[str]] = {}  # choice -> text not yet screened
        self._tail: dict[int, str] = {}  # choice -> the screened text's last `overlap` chars
        self._new = 0  # characters pending
        self.blocked = False

    async def admit(self, events: list[bytes]) -> list[bytes]:
        """The events that may go out now (possibly none: held until screened)."""
        for index, text in _event_texts(events):
            self._pending.setdefault(index, []).append(text)
            self._new += len(text)
        if not self._held and not self._new:
            return events  # no text waiting: nothing to hold these behind
        self._held += events
        if self._new < self._step:
            return []
        return await self._release()

    async def end(self) -> list[bytes]:
        """The stream ended: screen what is left and release the rest."""
        return await self._release() if self._held or self._new else []

    async def _release(self) -> list[bytes]:
        pending, self._pending, self._new = self._pending, {}, 0
        self._step = min(self._step * 2, self._max_step)
        count = max((*pending, *self._tail), default=0) + 1  # the choices seen so far
        classes: Classes = []
        for index, parts in sorted(pending.items()):
            text = self._tail.get(index, "") + "".join(parts)
            self._tail[index] = text[-self._overlap :] if self._overlap else ""
            classes.append((choice_label(index, count), [text]))
        try:
            await check(self._policies, classes, self._exchange, COMPLETION)
        except ContentBlockedError:
            self.blocked = True
            self._held = []
            raise
        held, self._held = self._held, []
        return held
