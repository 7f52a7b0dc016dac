"""Exact JSON at orjson's speed: one place that knows where orjson differs from the standard
library, so every reader and writer of JSON in projector (decoders, the payload hash, the
stores' holding rows and documents) gets the same values either way.

orjson reads integers beyond 64 bits as floats (losing digits) and refuses to write them;
those documents go through the standard library, which keeps them exact. Everything else
orjson reads and writes as the standard library would (it is stricter: no NaN, no lone
surrogates; callers that need the standard library's error messages fall back themselves).
"""

from __future__ import annotations

import json
from typing import Any

import orjson

# Integers orjson would turn into floats (beyond -2**63 .. 2**64-1) have twenty digits, or a
# minus sign and nineteen. Found by mapping every digit to 0 (a translate and a substring
# search cost a fifth of a regular expression); digits inside strings count too, which only
# costs the slower parser.
_DIGITS_AS_ZERO = bytes(48 if 48 <= b <= 57 else b for b in range(256))
_NINETEEN_DIGITS, _TWENTY_DIGITS = b"0" * 19, b"0" * 20
_MINUS_NINETEEN = b"-" + _NINETEEN_DIGITS


def may_hold_big_int(raw: bytes) -> bool:
    """Whether ``raw`` may hold an integer orjson cannot read exactly."""
    zeroed = raw.translate(_DIGITS_AS_ZERO)
    # Both cases hold nineteen digits in a row, so one search rules out nearly every message.
    # ``find`` rather than ``in``: on bytes it costs about half as much here.
    if zeroed.find(_NINETEEN_DIGITS) < 0:
        return False
    return zeroed.find(_TWENTY_DIGITS) >= 0 or zeroed.find(_MINUS_NINETEEN) >= 0


def loads(raw: bytes | str) -> Any:
    """Parse JSON exactly (raises ``ValueError`` on invalid JSON)."""
    data = raw.encode() if isinstance(raw, str) else raw
    if may_hold_big_int(data):
        return json.loads(data)
    return orjson.loads(data)


def dumps(value: Any, *, sort_keys: bool = False) -> bytes:
    """Compact UTF-8 JSON; keys sorted (recursively) when asked, for canonical forms."""
    option = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS if sort_keys else 0
    try:
        return orjson.dumps(value, option=option, default=str)
    except TypeError:  # an integer beyond 64 bits: the same value always takes this path
        text = json.dumps(value, sort_keys=sort_keys, separators=(",", ":"), default=str)
        return text.encode()
