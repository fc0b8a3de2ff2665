"""The content-safety policy in-process with the local screen: what is screened together, what
apart, and how a stream is held back and released (proxy/safety/policy.py). The Content
Safety backend is exercised end to end in tests/test_safety.py."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from proxy.config import ContentSafety
from proxy.errors import ContentBlockedError
from proxy.exchange import Exchange
from proxy.safety.policy import SafetyMetrics, SafetyPolicy, check_reply, check_request
from proxy.safety.screen import LocalScreen
from proxy.safety.stream import StreamGuard, stream_texts


def policy(step: int = 20, overlap: int = 30) -> SafetyPolicy:
    spec = ContentSafety(blocklists=("banned",), enforce_on_completions=True,
                         stream_window_size=step, window_overlap_size=overlap)  # fmt: skip
    return SafetyPolicy(spec, LocalScreen({"banned": ["make a bomb"]}), None, SafetyMetrics(None))


def exchange() -> Exchange:
    return Exchange("POST", "/x", "id", "127.0.0.1")


def event(text: str, index: int = 0) -> bytes:
    chunk = {"choices": [{"index": index, "delta": {"content": text}}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_events_are_held_until_enough_text_then_released_in_order() -> None:
    async def main() -> None:
        guard = StreamGuard([policy(step=20)], exchange())
        role = b'data: {"choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n'
        assert await guard.admit([role]) == [role]  # no text: nothing to hold it behind
        first, second = event("Lighthouses "), event("guided ships home.")
        assert await guard.admit([first]) == []  # 12 characters: held
        assert await guard.admit([second]) == [first, second]  # 30: screened, released
        done = b"data: [DONE]\n\n"
        assert await guard.admit([done]) == [done]
        assert await guard.end() == []

    run(main())


def test_the_rest_is_screened_at_the_end() -> None:
    async def main() -> None:
        guard = StreamGuard([policy(step=100)], exchange())
        held = [event("make a"), event(" bomb"), b"data: [DONE]\n\n"]  # under FIRST_STEP
        assert await guard.admit(held) == []
        with pytest.raises(ContentBlockedError, match="blocklist banned in the completion"):
            await guard.end()
        assert guard.blocked

    run(main())


def test_the_first_text_goes_out_early_then_steps_double() -> None:
    async def main() -> None:
        guard = StreamGuard([policy(step=100, overlap=30)], exchange())
        released = []
        for _ in range(40):
            sent = await guard.admit([event("abcd ")])  # 5 characters each
            released.append(len(sent))
        # screened after 16 characters (4 events), then 32 (7), 64 (13), 100 (20), 100 ...
        assert [i for i, n in enumerate(released) if n] == [3, 10, 23]
        assert sum(released) + len(await guard.end()) == 40

    run(main())


def test_a_term_across_two_screenings_is_caught_by_the_overlap() -> None:
    async def main() -> None:
        guard = StreamGuard([policy(step=10, overlap=30)], exchange())
        assert await guard.admit([event("so here is how to make a")]) != []  # screened: clean
        with pytest.raises(ContentBlockedError):
            await guard.admit([event(" bomb, step by step")])

    run(main())


def test_choices_are_screened_apart() -> None:
    async def main() -> None:
        guard = StreamGuard([policy(step=1)], exchange())
        await guard.admit([event("time to make a", 0)])
        await guard.admit([event(" bomb", 1)])  # another choice: no phrase across choices
        with pytest.raises(ContentBlockedError, match=r"completion \(choice 0\)"):
            await guard.admit([event(" bomb", 0)])

    run(main())


def test_a_request_names_the_text_class_that_matched() -> None:
    body = {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "make a"}]},
            {"role": "user", "content": "bomb"},
        ]
    }
    run(check_request([policy()], json.dumps(body).encode(), exchange()))  # never joined
    body["messages"][0]["content"] = [{"type": "text", "text": "make"}, {"type": "text",
                                                                        "text": "a bomb"}]  # fmt: skip
    with pytest.raises(ContentBlockedError) as caught:
        run(check_request([policy()], json.dumps(body).encode(), exchange()))
    assert caught.value.message == (
        "The request was blocked by the content safety policy: blocklist banned in the system text."
    )


def test_cached_streams_and_replies_are_read_per_choice() -> None:
    events = [event("make a", 0), event("harmless", 1), event(" bomb", 0), b"data: [DONE]\n\n"]
    assert stream_texts(events) == [["make a bomb"], ["harmless"]]
    with pytest.raises(ContentBlockedError, match=r"choice 0"):
        run(check_reply([policy()], stream_texts(events), exchange()))
