"""proxy.yamledit on the layouts tests/test_import.py does not meet: a flow list with items,
comments right at the insertion point, CRLF with a ``---`` prologue, and each refusal."""

from __future__ import annotations

import re

import pytest

from proxy.yamledit import LineChangedError, ParseError, YamlEditError, append_to_lists

NEW = {"id": "new", "url": "http://new/v1"}


def test_a_flow_list_with_items_becomes_a_block_list() -> None:
    text = "# the backends\nbackends: [{id: a, url: http://a/v1}, {id: b, url: http://b/v1}]\napis: []\n"  # fmt: skip
    assert append_to_lists(text, [("backends", NEW)]) == (
        "# the backends\n"
        "backends:\n"
        "  - {id: a, url: http://a/v1}\n"
        "  - {id: b, url: http://b/v1}\n"
        "  - id: new\n"
        "    url: http://new/v1\n"
        "apis: []\n"
    )


def test_comments_indented_into_the_last_item_stay_with_it_the_rest_follow_the_new_one() -> None:
    text = (
        "backends:\n"
        "  - id: a\n"
        "    url: http://a/v1  # a's url\n"
        "    # still about a\n"
        "  # about the list\n"
        "\n"
        "# the next section\n"
        "apis: []\n"
    )
    assert append_to_lists(text, [("backends", NEW), ("apis", "plain")]) == (
        "backends:\n"
        "  - id: a\n"
        "    url: http://a/v1  # a's url\n"
        "    # still about a\n"
        "  - id: new\n"
        "    url: http://new/v1\n"
        "  # about the list\n"
        "\n"
        "# the next section\n"
        "apis:\n"
        "  - plain\n"
    )


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_line_endings_and_the_comments_before_the_document_marker_are_kept(newline: str) -> None:
    text = "# before the marker\n---  # the document\nbackends:\n- id: a\napis: []\n"
    new = append_to_lists(text.replace("\n", newline), [("backends", NEW)])
    assert new == (
        "# before the marker\n---  # the document\nbackends:\n- id: a\n"
        "- id: new\n  url: http://new/v1\napis: []\n"
    ).replace("\n", newline)


@pytest.mark.parametrize(
    ("text", "error", "message"),
    [
        ("backends:\n  - id: a\n    url:   http://a/v1\napis: []\n", LineChangedError, "line 3 ('url:   http://a/v1')"),
        ("backends: {id: a}\n", YamlEditError, "backends: not a list"),
        ("apis: []\n", YamlEditError, "backends: not a list"),
        ("", YamlEditError, "backends: not a list"),
        ("backends: [\n", ParseError, "expected the node content"),
    ],
)  # fmt: skip
def test_refusals(text: str, error: type[YamlEditError], message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        append_to_lists(text, [("backends", NEW)])
