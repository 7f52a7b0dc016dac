"""The JSON decoder, the decoder contract and ``load_decoder`` (pure: no services)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from projector.core.decode import DecodeError, GuardedDecoder, load_decoder
from projector.core.decode.debezium import DebeziumDecoder
from projector.core.decode.json import JsonDecoder
from projector.core.event import Event, SourceRef
from projector.core.message import RawMessage

PLAY = {"game": 5, "seq": 3, "type": "POINT", "at": 1700000000123, "payload": {"playerId": 44}}


def msg(
    value: Any = PLAY,
    key: bytes | None = b"5",
    offset: int = 7,
    timestamp_ms: int | None = 1700000000999,
    raw: bytes | None = None,
) -> RawMessage:
    """A message on topic ``plays``; ``raw`` overrides the JSON-encoded ``value``."""
    body = raw if raw is not None or value is None else json.dumps(value).encode()
    return RawMessage("plays", 0, offset, key, body, timestamp_ms)


def decoder(**options: Any) -> JsonDecoder:
    built = load_decoder("json", {"stream": "game", **options})
    assert isinstance(built, JsonDecoder)
    return built


def decode(value: Any = PLAY, **options: Any) -> Event:
    return decoder(**options).decode(msg(value))


def reason(value: Any = PLAY, *, message: RawMessage | None = None, **options: Any) -> str:
    with pytest.raises(DecodeError) as caught:
        decoder(**options).decode(message or msg(value))
    assert str(caught.value) == caught.value.reason
    return caught.value.reason


# --- decoding -------------------------------------------------------------------------------


def test_seed_play_decodes_by_paths() -> None:
    """Proves every field is picked by its path, seq gives the id stream/seq, the source is the
    message's coordinates and meta stays empty."""
    ev = decode(stream_prefix="game:", seq="seq", ts="at", data="payload")
    assert (ev.stream, ev.seq, ev.ts, ev.type) == ("game:5", 3, 1700000000123, "POINT")
    assert ev.data == {"playerId": 44}
    assert ev.id == "game:5/3"
    assert ev.source == SourceRef("plays", 0, 7)
    assert ev.meta == {}


def test_data_defaults_to_whole_object_and_seq_to_none() -> None:
    """Proves the defaults: data is the whole message object, no seq (merge mode), no ts."""
    ev = decode()
    assert ev.data == PLAY
    assert ev.seq is None
    assert ev.ts is None


def test_string_stream_and_digit_string_seq() -> None:
    """Proves a text stream is taken as is and a seq given as a string of digits is an int."""
    ev = decode({"g": "abc", "s": "12"}, stream="g", seq="s")
    assert (ev.stream, ev.seq) == ("abc", 12)


@pytest.mark.parametrize(
    ("seq", "wanted"),
    [(True, "a boolean"), (1.5, "a number"), (-1, "an integer"), (2**63, "an integer")],
)
def test_bad_seq_values(seq: Any, wanted: str) -> None:
    """Proves seq must be a non-negative int64: bools, floats, negatives, huge values fail."""
    assert f"got {wanted}" in reason({"game": 1, "seq": seq}, seq="seq")


@pytest.mark.parametrize("seq", ["12a", "", "-3", "١٢", "9" * 20])
def test_bad_seq_strings(seq: str) -> None:
    """Proves only ASCII digit strings (at most int64) count as a seq."""
    assert "field 'seq' (path 'seq') must be" in reason({"game": 1, "seq": seq}, seq="seq")


@pytest.mark.parametrize(
    ("ts", "ms"),
    [
        (1700000000123, 1700000000123),
        (1700000000123.9, 1700000000123),
        ("1700000000123", 1700000000123),
        ("2023-11-14T22:13:20.123Z", 1700000000123),
        ("2023-11-14T23:13:20.123+01:00", 1700000000123),
        ("2023-11-14T22:13:20.123", 1700000000123),
        ("2023-11-14T22:13:20.123456789Z", 1700000000123),
    ],
)
def test_ts_forms(ts: Any, ms: int) -> None:
    """Proves ts accepts epoch ms as int, float, digit string, and ISO-8601 (naive = UTC)."""
    assert decode({"game": 1, "t": ts}, ts="t").ts == ms


@pytest.mark.parametrize("ts", [True, "yesterday", [1], {"ms": 1}, "2023-13-01"])
def test_bad_ts(ts: Any) -> None:
    """Proves a ts that is no time at all (or no valid date) is a DecodeError."""
    assert "field 'ts' (path 't') must be epoch milliseconds" in reason(
        {"game": 1, "t": ts}, ts="t"
    )


def test_infinite_ts_is_rejected() -> None:
    """Proves 1e400 (parsed by Python as infinity) is a DecodeError, not an OverflowError."""
    assert "field 'ts'" in reason(message=msg(raw=b'{"game":1,"t":1e400}'), ts="t")


def test_type_is_optional_information() -> None:
    """Proves a missing or null type is "", a numeric type is text, and type=None skips it."""
    assert decode({"game": 1}).type == ""
    assert decode({"game": 1, "type": None}).type == ""
    assert decode({"game": 1, "type": 7}).type == "7"
    assert decode(PLAY, type=None).type == ""


def test_type_of_wrong_kind() -> None:
    """Proves a type that is an object is a DecodeError rather than a garbled string."""
    assert "field 'type' (path 'type') must be text" in reason({"game": 1, "type": {"a": 1}})


def test_data_must_be_an_object() -> None:
    """Proves a data path pointing at a non-object, or at nothing, is a DecodeError."""
    assert "field 'data' (path 'game') must be an object, got an integer" in reason(data="game")
    assert reason(data="nope") == "missing field 'data' (path 'nope')"


def test_id_from_path() -> None:
    """Proves a configured id path wins over stream/seq, and integer ids become text."""
    assert decode({"game": 1, "seq": 2, "eid": "e-9"}, seq="seq", id="eid").id == "e-9"
    assert decode({"game": 1, "eid": 99}, id="eid").id == "99"


def test_bad_ids() -> None:
    """Proves a missing, empty or structured id is a DecodeError."""
    assert reason({"game": 1}, id="eid") == "missing field 'id' (path 'eid')"
    assert "got empty text" in reason({"game": 1, "eid": ""}, id="eid")
    assert "got a list" in reason({"game": 1, "eid": [1]}, id="eid")


def test_content_id_is_stable_and_content_derived() -> None:
    """Proves without seq or id path the id hashes the content: the same message at another
    offset (a replay) gets the same id; different data, type or ts gets another."""
    dec = decoder(ts="at")
    first = dec.decode(msg(PLAY, offset=1))
    again = dec.decode(msg(PLAY, offset=900))
    assert first.id == again.id
    assert re.fullmatch(r"[0-9a-f]{32}", first.id)
    for change in ({"type": "ASSIST"}, {"at": 1}, {"payload": {"playerId": 45}}):
        assert dec.decode(msg({**PLAY, **change})).id != first.id


def test_null_and_missing_fields_name_the_path() -> None:
    """Proves a missing or null required field names the field and its path."""
    assert reason({"x": 1}) == "missing field 'stream' (path 'game')"
    assert reason({"game": None}) == "field 'stream' (path 'game') is null"
    assert reason({"game": 1}, seq="seq") == "missing field 'seq' (path 'seq')"
    assert reason({"game": 1}, ts="at") == "missing field 'ts' (path 'at')"


@pytest.mark.parametrize("stream", [True, 1.5, "", {"a": 1}])
def test_bad_stream_values(stream: Any) -> None:
    """Proves a stream must be non-empty text or an integer."""
    assert "field 'stream' (path 'game') must be" in reason({"game": stream})


def test_list_index_paths() -> None:
    """Proves a number part indexes a list, and an index past the end is missing."""
    value = {"items": [{"g": "a"}, {"g": "b"}]}
    assert decode(value, stream="items.1.g").stream == "b"
    assert reason(value, stream="items.2.g") == "missing field 'stream' (path 'items.2.g')"
    assert reason(value, stream="items.x") == "missing field 'stream' (path 'items.x')"


# --- special paths --------------------------------------------------------------------------


def test_key_topic_and_timestamp_paths() -> None:
    """Proves $key is the key's text, $topic the topic, $timestamp Kafka's timestamp."""
    ev = decoder(stream="$key", type="$topic", ts="$timestamp").decode(msg(key=b"player-1"))
    assert (ev.stream, ev.type, ev.ts) == ("player-1", "plays", 1700000000999)


def test_json_keys() -> None:
    """Proves a JSON string key is unquoted, a number key is its text, $key.id reads a field
    of an object key, and $key on an object key explains the fix."""
    dec = decoder(stream="$key")
    assert dec.decode(msg(key=b'"abc"')).stream == "abc"
    assert dec.decode(msg(key=b"42")).stream == "42"
    assert dec.decode(msg(key=b'"unterminated')).stream == '"unterminated'
    assert decoder(stream="$key.id").decode(msg(key=b'{"id": 9}')).stream == "9"
    with pytest.raises(DecodeError, match=r"got an object; .* e\.g\. '\$key\.<field>'"):
        dec.decode(msg(key=b'{"id": 9}'))


def test_key_errors() -> None:
    """Proves no key, a non-UTF-8 key, an oversize key and a non-JSON key under $key.path are
    DecodeErrors with reasons."""
    assert reason(message=msg(key=None), stream="$key") == "missing field 'stream' (path '$key')"
    assert "message key is not valid UTF-8" in reason(message=msg(key=b"\xff"), stream="$key")
    assert "message key of 11 bytes exceeds max_bytes 10" in reason(
        message=msg(raw=b"{}", key=b"x" * 11), stream="$key", max_bytes=10
    )
    assert "message key is not valid JSON" in reason(message=msg(key=b"abc"), stream="$key.id")


def test_missing_timestamp() -> None:
    """Proves $timestamp on a message without one is a missing field."""
    assert reason(message=msg(timestamp_ms=None), ts="$timestamp") == (
        "missing field 'ts' (path '$timestamp')"
    )


# --- undecodable messages -------------------------------------------------------------------


def test_tombstone_is_an_error_for_json() -> None:
    """Proves a null value is a DecodeError for the JSON decoder (nothing ignores it)."""
    assert reason(message=msg(None)) == "empty message (tombstone)"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"", "message is not valid JSON: Expecting value: line 1 column 1 (char 0)"),
        (b"\xff\xfe", "message is not valid UTF-8"),
        (b"[1, 2]", "message must be a JSON object, got a list"),
        (b'"text"', "message must be a JSON object, got text"),
        (b'{"game": NaN}', "message is not valid JSON: NaN is not a JSON value"),
        (b"[" * 100_000, "message is not valid JSON"),
        (b'{"game": ' + b"9" * 5000 + b"}", "message is not valid JSON"),
    ],
)
def test_undecodable_values(raw: bytes, expected: str) -> None:
    """Proves bad bytes, non-JSON, non-objects, NaN, deep nesting and huge integer literals are
    DecodeErrors with a reason (never RecursionError or ValueError)."""
    assert reason(message=msg(raw=raw)).startswith(expected)


def test_nesting_deeper_than_any_stage_writes_back_is_refused_and_wide_is_not() -> None:
    """Proves a message nested past MAX_DEPTH (512), which orjson still reads (to 1,024) but
    which the payload hash and the stores cannot write out again, is a DecodeError naming the
    bound, in both of the parser's paths (orjson, and the standard library that takes huge
    integers); while a message as deep as the bound, or with more brackets than the bound
    side by side, decodes."""

    def nested(levels: int, inner: bytes = b"1") -> bytes:
        return b'{"game": 5, "seq": 3, "payload": ' + b"[" * levels + inner + b"]" * levels + b"}"

    for inner in (b"1", b"9" * 25):  # the second: a huge integer, read by the standard library
        assert reason(message=msg(raw=nested(512, inner))) == "message nests deeper than 512 levels"
        assert decode(json.loads(nested(510, inner))).data["payload"][0][0][0] is not None
    wide = {**PLAY, "payload": [{"n": [i]} for i in range(600)]}
    assert len(decode(wide).data["payload"]) == 600


def test_oversize_message() -> None:
    """Proves a message over max_bytes is refused before parsing, with both sizes named."""
    raw = json.dumps({"game": 1, "pad": "x" * 2_000_000}).encode()
    assert reason(message=msg(raw=raw)) == (
        f"message of {len(raw)} bytes exceeds max_bytes 1000000"
    )


# --- options --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"stream": "game", "sequ": "x"}, "decoder option 'sequ' is unknown"),
        ({}, "decoder option 'stream' is required"),
        ({"stream": "game", "id": "$offset"}, "decoder option 'id' may not be '$offset'"),
        ({"stream": "game", "seq": "$offset"}, "decoder option 'seq' may not be '$offset'"),
        ({"stream": "$partition"}, "'$partition' is not a known special path"),
        ({"stream": "$topic.x"}, "'$topic' has no fields to follow"),
        ({"stream": "a..b"}, "path 'a..b' has an empty part"),
        ({"stream": ""}, "decoder option 'stream' must be a path"),
        ({"stream": None}, "decoder option 'stream' must be a path"),
        ({"stream": "game", "ts": 5}, "decoder option 'ts' must be a path"),
        ({"stream": "game", "max_bytes": 0}, "decoder option 'max_bytes' must be a positive"),
        ({"stream": "game", "max_bytes": True}, "decoder option 'max_bytes' must be a positive"),
        ({"stream": "game", "stream_prefix": 1}, "decoder option 'stream_prefix' must be text"),
    ],
)
def test_option_validation(options: dict[str, Any], expected: str) -> None:
    """Proves bad config raises ValueError naming the option (and not at decode time)."""
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_decoder("json", options)


def test_unknown_option_lists_known_ones() -> None:
    """Proves the unknown-option message tells people which options exist."""
    with pytest.raises(ValueError, match="known options: stream, stream_prefix, seq, ts, type"):
        load_decoder("json", {"stream": "game", "sequ": "seq"})


# --- load_decoder and plug-ins --------------------------------------------------------------


class EchoDecoder:
    """A plug-in used by the tests below: streams by topic, optionally misbehaving."""

    def __init__(self, prefix: str = "", mode: str = "ok") -> None:
        if mode not in ("ok", "crash", "wrong"):
            raise ValueError(f"mode {mode!r} is not ok, crash or wrong")
        self.prefix, self.mode = prefix, mode

    def decode(self, message: RawMessage) -> Event | None:
        if self.mode == "crash":
            raise KeyError("boom")
        if self.mode == "wrong":
            return "not an event"  # type: ignore[return-value]
        return Event(self.prefix + message.topic, None, None, "", {}, "x", message.source)


NotADecoder = dict
not_callable = 5
PLUGIN = f"{__name__}:EchoDecoder"


def test_builtin_kinds() -> None:
    """Proves "json" and "debezium" give the built-in decoders."""
    assert isinstance(load_decoder("json", {"stream": "game"}), JsonDecoder)
    assert isinstance(load_decoder("debezium", {}), DebeziumDecoder)


def test_plugin_is_imported_and_called_with_options() -> None:
    """Proves "package.module:Name" is imported and called as Name(**options)."""
    dec = load_decoder(PLUGIN, {"prefix": "p:"})
    assert isinstance(dec, GuardedDecoder)
    ev = dec.decode(msg())
    assert ev is not None
    assert ev.stream == "p:plays"


def test_plugin_errors_become_decode_errors() -> None:
    """Proves a plug-in that raises or returns a non-Event still keeps the contract: only
    DecodeError reaches the caller."""
    with pytest.raises(DecodeError, match="unexpected KeyError while decoding"):
        load_decoder(PLUGIN, {"mode": "crash"}).decode(msg())
    with pytest.raises(DecodeError, match="returned str, not an Event or None"):
        load_decoder(PLUGIN, {"mode": "wrong"}).decode(msg())


@pytest.mark.parametrize(
    ("kind", "options", "expected"),
    [
        ("avro", {}, "decoder 'avro' is unknown; use 'json', 'debezium' or a plug-in"),
        ("a:b:c", {}, "decoder 'a:b:c' is unknown"),
        ("no_such_module_x:Dec", {}, "cannot import module 'no_such_module_x'"),
        (f"{__name__}:Missing", {}, "has no callable 'Missing'"),
        (f"{__name__}:not_callable", {}, "has no callable 'not_callable'"),
        (PLUGIN, {"colour": "red"}, "rejected its options"),
        (PLUGIN, {"mode": "odd"}, "rejected its options: mode 'odd'"),
        (f"{__name__}:NotADecoder", {}, "returned an object without decode()"),
        ("json", ["stream"], "decoder options must be a mapping"),
    ],
)
def test_load_decoder_config_errors(kind: str, options: Any, expected: str) -> None:
    """Proves every way of naming a decoder wrongly is a ValueError that says what to fix."""
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_decoder(kind, options)


# --- properties -----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(["game", "seq", "at", "type", "id", "d", "0"]), inner)
    ),
    max_leaves=20,
)


def _decode_or_reason(dec: JsonDecoder, message: RawMessage) -> None:
    try:
        result = dec.decode(message)
    except DecodeError as exc:
        assert exc.reason
    else:
        assert isinstance(result, Event)


@given(value=st.binary(max_size=300), key=st.none() | st.binary(max_size=40))
def test_arbitrary_bytes_only_raise_decode_error(value: bytes, key: bytes | None) -> None:
    """Proves any bytes as value and key give an Event or a DecodeError, nothing else."""
    for options in ({}, {"stream": "$key", "seq": "seq", "ts": "at"}, {"stream": "$key.0"}):
        dec = decoder(**options)
        _decode_or_reason(dec, RawMessage("t", 0, 0, key, value, None))


@given(value=json_values)
def test_arbitrary_json_only_raises_decode_error(value: Any) -> None:
    """Proves any JSON value (the structured-fuzz case) gives an Event or a DecodeError."""
    raw = json.dumps(value).encode()
    for options in ({}, {"seq": "seq", "ts": "at", "data": "d", "id": "id"}, {"stream": "0.0"}):
        _decode_or_reason(decoder(**options), msg(raw=raw))


_ABSENT = object()
_odd_values = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["", "7", "2024-01-02T03:04:05Z"])
    | st.lists(st.integers(), max_size=2)
)


_usual_fields = st.fixed_dictionaries(
    {
        "game": st.text(min_size=1, max_size=4),
        "seq": st.integers(min_value=0, max_value=2**63 - 1),
        "at": st.integers(min_value=-(2**63) + 1, max_value=2**63 - 1),
        "type": st.text(max_size=3),
        "id": st.text(min_size=1, max_size=3),
        "d": st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    }
)
_edges = {
    "game": st.sampled_from(["", 7, True]),
    "seq": st.sampled_from([-1, 2**63, True, 1.0, "7"]),
    "at": st.sampled_from([-(2**63), 2**63, 1.5, "7", "2024-01-02T03:04:05Z"]),
    "type": st.sampled_from([7, True, ["x"]]),
    "id": st.sampled_from(["", 7, False]),
    "d": st.sampled_from([[], "x", 1]),
}


@st.composite
def _messages(draw: st.DrawFn) -> dict[str, Any]:
    """A usual message (every field of its final type), with a few fields then made odd:
    absent, null, just out of range or of another type, or anything at all."""
    fields: dict[str, Any] = draw(_usual_fields)
    for key in draw(st.sets(st.sampled_from(sorted(fields)), min_size=1, max_size=2)):
        how = draw(st.sampled_from(("absent", "edge", "edge", "odd")))
        fields[key] = (
            _ABSENT if how == "absent" else draw(_edges[key] if how == "edge" else _odd_values)
        )
    return {k: v for k, v in fields.items() if v is not _ABSENT}


_OPTION_SETS: list[dict[str, Any]] = [
    {},
    {"seq": "seq"},
    {"seq": "seq", "ts": "at", "data": "d", "id": "id"},
    {"seq": "seq", "ts": "at", "type": None, "stream_prefix": "g:"},
    {"ts": "at", "data": "d"},
]


def _outcome(decode: Any, message: RawMessage) -> Event | str:
    """The event decoded, or the dead letter's reason."""
    try:
        event = decode(message)
    except DecodeError as exc:
        return exc.reason
    assert isinstance(event, Event)
    return event


@settings(max_examples=300)
@given(
    fields=_messages(),
    options=st.sampled_from(_OPTION_SETS),
)
def test_the_short_path_decodes_as_the_reference_does(
    fields: dict[str, Any], options: dict[str, Any]
) -> None:
    """Proves the decoder's short path for top-level keys (taken when each field already has
    its final type) gives exactly the Event the full decoder gives, or leaves the message
    to it: on any mix of present, missing, null and wrongly typed fields, ``decode`` and the
    reference ``_decode`` give equal events or the same dead-letter reason."""
    dec = decoder(**options)
    assert _outcome(dec.decode, msg(fields)) == _outcome(dec._decode, msg(fields))


_USUAL = {"game": "g", "seq": 3, "at": 5, "type": "T", "id": "i", "d": {"a": 1}}
_EDGES = {
    "game": ["", 7, True, None],
    "seq": [-1, 0, 2**63 - 1, 2**63, True, 1.0, "7", None],
    "at": [-(2**63) + 1, -(2**63), 2**63 - 1, 2**63, 1.5, "7", "2024-01-02T03:04:05Z", None],
    "type": [7, True, ["x"], None, ""],
    "id": ["", 7, False, None],
    "d": [[], "x", 1, None, {}],
}


@pytest.mark.parametrize(
    ("key", "value"), [(k, v) for k, values in _EDGES.items() for v in [*values, _ABSENT]]
)
def test_the_short_path_agrees_at_each_fields_edges(key: str, value: Any) -> None:
    """Proves, for each field at the edges of its type and range (and absent), that the
    short path and the reference give the same outcome under every option set above: each
    check of the short path is needed and none is too loose."""
    fields = {k: v for k, v in {**_USUAL, key: value}.items() if v is not _ABSENT}
    for options in _OPTION_SETS:
        dec = decoder(**options)
        assert _outcome(dec.decode, msg(fields)) == _outcome(dec._decode, msg(fields))


def test_the_short_path_is_taken_for_the_usual_message() -> None:
    """Proves the usual message (every field a top-level key, of its final type) is decoded
    by the short path, so the property test above compares two paths and not one."""
    dec = decoder(seq="seq", ts="at", data="payload")
    assert dec._keys == ("game", "seq", "at", "type", "payload", None)
    message = msg({**PLAY, "game": "5"})
    assert message.value is not None
    assert dec._decode_plain(message.value, message) == dec._decode(message)
