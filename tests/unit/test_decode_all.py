"""Step 1 of a batch, ``decode_all``: what becomes an event, a dead letter or nothing."""

from __future__ import annotations

import json

from projector.core.decode import load_decoder
from projector.core.message import RawMessage
from projector.runner.batch import decode_all

DECODER = load_decoder(
    "json", {"stream": "stream", "seq": "seq", "ts": "ts", "type": "type", "data": "data"}
)


def message(offset: int, value: bytes) -> RawMessage:
    return RawMessage("t", 0, offset, b"k", value)


def wire(**data: object) -> bytes:
    return json.dumps({"stream": "s", "seq": 1, "ts": 1, "type": "T", "data": data}).encode()


def test_a_lone_surrogate_is_a_decode_dead_letter_and_escaped_unicode_is_not() -> None:
    """Proves an event whose JSON holds a lone UTF-16 surrogate escape (valid JSON, not valid
    Unicode: neither PostgreSQL's jsonb nor Redis's scripts take it) becomes a dead letter
    naming why, with its offset, while properly escaped non-ASCII text (a surrogate pair, an
    accented letter) decodes as usual."""
    lone = b'{"stream": "s", "seq": 1, "ts": 1, "type": "T", "data": {"x": "a\\ud800b"}}'
    decoded = decode_all(
        [message(0, lone), message(1, wire(x="caf\u00e9 \U0001f600")), message(2, wire(x="plain"))],
        {"t": DECODER},
    )
    [letter] = decoded.dead_letters
    assert letter.kind == "decode" and "surrogate" in letter.reason
    assert letter.message is not None and letter.message.offset == 0
    assert [e.data["x"] for e in decoded.events] == ["caf\u00e9 \U0001f600", "plain"]


def test_a_nul_character_is_a_decode_dead_letter_and_an_escaped_backslash_is_not() -> None:
    """Proves an event holding the NUL character (``\\u0000``, valid JSON, refused by
    PostgreSQL's text and jsonb, so it would fail every batch that holds it) becomes a dead
    letter naming why, wherever the NUL stands (a value, a key, the stream), while the text
    ``\\u0000`` written with an escaped backslash is ordinary data."""
    nul_in = [
        b'{"stream": "s", "seq": 1, "ts": 1, "type": "T", "data": {"x": "a\\u0000b"}}',
        b'{"stream": "s", "seq": 1, "ts": 1, "type": "T", "data": {"x": [{"k\\u0000": 1}]}}',
        b'{"stream": "s\\u0000", "seq": 1, "ts": 1, "type": "T", "data": {}}',
    ]
    literal = b'{"stream": "s", "seq": 1, "ts": 1, "type": "T", "data": {"x": "a\\\\u0000b"}}'
    messages = [message(k, raw) for k, raw in enumerate([*nul_in, literal])]
    decoded = decode_all(messages, {"t": DECODER})
    assert [letter.message.offset for letter in decoded.dead_letters if letter.message] == [0, 1, 2]
    assert all("NUL" in letter.reason for letter in decoded.dead_letters)
    assert [e.data["x"] for e in decoded.events] == ["a\\u0000b"]
