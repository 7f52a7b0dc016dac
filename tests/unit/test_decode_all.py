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
