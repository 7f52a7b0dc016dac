"""projector's JSON: orjson's speed, the standard library's values."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from projector.core import json_codec
from projector.core.decode import DecodeError, parse_json

_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@given(_JSON)
def test_reads_and_writes_what_the_standard_library_does(value: object) -> None:
    """Proves no value changes on the fast path: integers beyond 64 bits (which orjson would
    read as floats and refuses to write) round-trip exactly, like everything else."""
    assert json_codec.loads(json_codec.dumps(value)) == json.loads(json.dumps(value))
    assert json_codec.loads(json.dumps(value)) == json.loads(json.dumps(value))


def test_big_integers_keep_every_digit() -> None:
    """Proves the two edges orjson gets wrong: above 2**64 - 1 and below -2**63."""
    for number in (2**64, 123456789012345678901234567890, -(2**63) - 1):
        assert json_codec.loads(f'{{"n": {number}}}'.encode()) == {"n": number}
        assert parse_json(f'{{"n": {number}}}'.encode(), 1000) == {"n": number}
        assert json_codec.dumps({"n": number}) == f'{{"n":{number}}}'.encode()


def test_the_guard_sends_only_long_integers_to_the_exact_parser() -> None:
    """Proves the big-integer guard's edges: twenty digits, or a minus sign and nineteen, go
    to the exact parser; nineteen digits alone (at most 10**19 - 1, which orjson reads exactly)
    and a minus sign with eighteen stay on the fast path, wherever they stand."""
    slow = [b"18446744073709551616", b'{"n":-9223372036854775809}', b'"x12345678901234567890"']
    fast = [b"1234567890123456789", b'{"n":-922337203685477580}', b'{"ts":1735689600005}']
    assert all(json_codec.may_hold_big_int(raw) for raw in slow)
    assert not any(json_codec.may_hold_big_int(raw) for raw in fast)


def test_sorted_keys_make_one_canonical_form() -> None:
    """Proves the payload hash's form: key order never matters, nested objects included."""
    a = {"b": 1, "a": {"y": [1, {"d": 1, "c": 2}], "x": None}}
    b = {"a": {"x": None, "y": [1, {"c": 2, "d": 1}]}, "b": 1}
    assert json_codec.dumps(a, sort_keys=True) == json_codec.dumps(b, sort_keys=True)


def test_what_orjson_refuses_gets_the_standard_librarys_reason() -> None:
    """Proves bad messages are reported as before the fast path: the standard library's
    reasons (NaN, bad UTF-8, trailing garbage), and a lone surrogate escape still parses (the
    decoder dead-letters it later, naming the escape)."""
    cases = {
        b'{"a": NaN}': "NaN is not a JSON value",
        b'{"a": 1} x': "Extra data",
        b'{"a": "\xff"}': "not valid UTF-8",
    }
    for raw, reason in cases.items():
        try:
            parse_json(raw, 1000)
        except DecodeError as exc:
            assert reason in exc.reason
        else:
            raise AssertionError(f"{raw!r} parsed")
    assert parse_json(b'{"a": "\\ud800"}', 1000) == {"a": "\ud800"}
