"""The Debezium decoder on realistic Debezium 2.x PostgreSQL (and some MySQL) messages."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from projector.core.decode import DecodeError, load_decoder
from projector.core.decode.debezium import DebeziumDecoder
from projector.core.event import Event, SourceRef
from projector.core.message import RawMessage

LSN = 24023176
TS_MS = 1700000000123

KEY_SCHEMA = {
    "type": "struct",
    "fields": [{"type": "int32", "optional": False, "field": "id"}],
    "optional": False,
    "name": "school.public.student.Key",
}
ROW_SCHEMA = {
    "type": "struct",
    "fields": [
        {"type": "int32", "optional": False, "field": "id"},
        {"type": "string", "optional": True, "field": "name"},
        {"type": "string", "optional": True, "field": "email"},
    ],
    "optional": True,
    "name": "school.public.student.Value",
    "field": "after",
}
VALUE_SCHEMA = {
    "type": "struct",
    "fields": [
        {**ROW_SCHEMA, "field": "before"},
        ROW_SCHEMA,
        {
            "type": "struct",
            "fields": [],
            "optional": False,
            "name": "io.debezium.connector.postgresql.Source",
            "field": "source",
        },
        {"type": "string", "optional": False, "field": "op"},
        {"type": "int64", "optional": True, "field": "ts_ms"},
        {
            "type": "struct",
            "fields": [],
            "optional": True,
            "name": "event.block",
            "version": 1,
            "field": "transaction",
        },
    ],
    "optional": False,
    "name": "school.public.student.Envelope",
    "version": 1,
}


def pg_source(snapshot: Any = "false", lsn: int = LSN, **extra: Any) -> dict[str, Any]:
    return {
        "version": "2.5.0.Final",
        "connector": "postgresql",
        "name": "school",
        "ts_ms": TS_MS,
        "snapshot": snapshot,
        "db": "school",
        "sequence": f'["24023120","{lsn}"]',
        "schema": "public",
        "table": "student",
        "txId": 571,
        "lsn": lsn,
        "xmin": None,
        **extra,
    }


def change(
    op: str,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
    transaction: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A bare Debezium change payload (schemas.enable=false)."""
    return {
        "before": before,
        "after": after,
        "source": source if source is not None else pg_source(),
        "op": op,
        "ts_ms": TS_MS + 50,
        "transaction": transaction,
    }


TX = {"id": "571:24023176", "total_order": 1, "data_collection_order": 1}
ROW = {"id": 42, "name": "Jhon", "email": None}
UPDATE = change("u", None, ROW, transaction=TX)


def msg(
    value: Any,
    key: Any = None,
    offset: int = 3,
    envelope: bool = False,
    raw: bytes | None = None,
) -> RawMessage:
    """A message on topic ``school.public.student``; key defaults to ``{"id": 42}``."""
    key = {"id": 42} if key is None else key
    if envelope:
        value = None if value is None else {"schema": VALUE_SCHEMA, "payload": value}
        key = key if isinstance(key, bytes) else {"schema": KEY_SCHEMA, "payload": key}
    body = raw if raw is not None else (None if value is None else json.dumps(value).encode())
    key_bytes = key if isinstance(key, bytes) else json.dumps(key).encode()
    return RawMessage("school.public.student", 0, offset, key_bytes, body, TS_MS + 99)


def decode(value: Any, message_key: Any = None, envelope: bool = False, **options: Any) -> Event:
    ev = load_decoder("debezium", options).decode(msg(value, message_key, envelope=envelope))
    assert ev is not None
    return ev


def reason(value: Any, message_key: Any = None, raw: bytes | None = None, **options: Any) -> str:
    with pytest.raises(DecodeError) as caught:
        load_decoder("debezium", options).decode(msg(value, message_key, raw=raw))
    return caught.value.reason


# --- row changes ----------------------------------------------------------------------------


@pytest.mark.parametrize("envelope", [True, False])
def test_streaming_update_with_before_null(envelope: bool) -> None:
    """Proves an update whose before is null (REPLICA IDENTITY DEFAULT) decodes, with or
    without the schema envelope: stream table:key, ts = LSN, data = after with its nulls,
    content-derived id and the meta facts."""
    ev = decode(UPDATE, envelope=envelope)
    assert (ev.stream, ev.seq, ev.ts, ev.type) == ("student:42", None, LSN, "update")
    assert ev.data == ROW
    assert ev.id == f"student:42@{LSN}/u"
    assert ev.source == SourceRef("school.public.student", 0, 3)
    assert ev.meta == {
        "table": "public.student",
        "table_name": "student",
        "op": "u",
        "lsn": LSN,
        "ts_ms": TS_MS,
        "snapshot": False,
        "tx_id": "571",
        "tx_order": 1,
        "tx_collection_order": 1,
    }


def test_create() -> None:
    """Proves op c is a create whose data is after."""
    ev = decode(change("c", None, ROW, transaction=TX))
    assert (ev.type, ev.data, ev.id) == ("create", ROW, f"student:42@{LSN}/c")


@pytest.mark.parametrize(
    ("snapshot", "flag"),
    [
        ("true", True),
        ("last", True),
        ("first", True),
        ("incremental", True),
        (True, True),
        ("false", False),
        (False, False),
        (None, False),
    ],
)
def test_snapshot_flag(snapshot: Any, flag: bool) -> None:
    """Proves source.snapshot is read as a string ("false" while streaming) and tolerated as a
    bool or null; snapshot rows get no tx_id (they belong to no BEGIN/END pair)."""
    ev = decode(change("r", None, ROW, source=pg_source(snapshot)))
    assert ev.type == "read"
    assert ev.meta["snapshot"] is flag
    assert ev.meta["tx_id"] == (None if flag else "571")
    assert ev.meta["tx_order"] is None


def test_snapshot_field_missing_means_streaming() -> None:
    """Proves a source without a snapshot field counts as streaming."""
    source = pg_source()
    del source["snapshot"]
    assert decode(change("u", None, ROW, source=source)).meta["snapshot"] is False


def test_delete_keeps_only_non_null_before_fields() -> None:
    """Proves a delete's data is before without its nulls: with REPLICA IDENTITY DEFAULT they
    are not data."""
    before = {"id": 42, "name": None, "email": None}
    ev = decode(change("d", before, None, transaction=TX))
    assert (ev.type, ev.data, ev.id) == ("delete", {"id": 42}, f"student:42@{LSN}/d")


def test_delete_without_before_uses_the_key() -> None:
    """Proves a delete with before null takes its data from the key."""
    assert decode(change("d"), message_key={"id": 42}).data == {"id": 42}


def test_tombstones_are_ignored() -> None:
    """Proves the null-value tombstone after a delete, and an envelope with a null payload,
    decode to None (intentionally ignored), not to an error."""
    dec = load_decoder("debezium", {})
    assert dec.decode(msg(None)) is None
    assert dec.decode(msg(None, raw=b'{"schema": null, "payload": null}')) is None


def test_heartbeat_and_schema_change_are_ignored() -> None:
    """Proves heartbeats ({ts_ms} only) and schema-change records decode to None."""
    dec = load_decoder("debezium", {})
    assert dec.decode(msg({"ts_ms": TS_MS})) is None
    ddl = {
        "source": pg_source(),
        "databaseName": "school",
        "ddl": "ALTER TABLE x",
        "tableChanges": [],
    }
    assert dec.decode(msg({"schema": {}, "payload": ddl})) is None


def test_redelivery_gets_the_same_id() -> None:
    """Proves the id is content-derived: the same change at another offset has the same id and
    payload hash (never the Kafka offset)."""
    dec = load_decoder("debezium", {})
    first, again = dec.decode(msg(UPDATE, offset=1)), dec.decode(msg(UPDATE, offset=77))
    assert first is not None and again is not None
    assert (first.id, first.hash) == (again.id, again.hash)


def test_multi_column_key_from_message_key() -> None:
    """Proves a composite message key gives the values joined by "," in key order."""
    source = pg_source(table="student_course")
    row = {"student_id": 42, "course_id": 7, "since": "2024-01-01"}
    ev = decode(
        change("c", None, row, source=source), message_key={"student_id": 42, "course_id": 7}
    )
    assert ev.stream == "student_course:42,7"
    assert ev.meta["table"] == "public.student_course"


def test_key_option_and_stream_prefix() -> None:
    """Proves the key option picks columns from the row, and stream_prefix replaces the table."""
    row = {"student_id": 42, "course_id": 7}
    ev = decode(change("c", None, row), {"x": 1}, key=["course_id", "student_id"])
    assert ev.stream == "student:7,42"
    assert decode(UPDATE, stream_prefix="s/").stream == "s/42"
    assert decode(UPDATE, stream_prefix="").stream == "42"


def test_key_option_falls_back_to_the_message_key() -> None:
    """Proves a key column absent from the row (a delete with before null) is taken from the
    message key, and missing everywhere is a DecodeError."""
    ev = decode(change("d"), {"id": 42}, key=["id"])
    assert (ev.stream, ev.data) == ("student:42", {"id": 42})
    with pytest.raises(DecodeError, match="key column 'uid' is missing or null in 'after'"):
        load_decoder("debezium", {"key": ["uid"]}).decode(msg(UPDATE))


def test_key_value_forms() -> None:
    """Proves non-text key values become their JSON text (uuids stay as they are)."""
    key = {"a": "b1f4", "b": True, "c": 1.5, "d": {"scale": 2, "value": "AQ=="}}
    assert (
        decode(UPDATE, message_key=key).stream == 'student:b1f4,true,1.5,{"scale":2,"value":"AQ=="}'
    )


# --- positions ------------------------------------------------------------------------------


def test_ts_modes() -> None:
    """Proves ts "lsn" and "position" use source.lsn and "ts_ms" uses source.ts_ms, while the
    id keeps the LSN (ts_ms can repeat within a millisecond)."""
    assert decode(UPDATE, ts="lsn").ts == LSN
    ev = decode(UPDATE, ts="ts_ms")
    assert (ev.ts, ev.id) == (TS_MS, f"student:42@{LSN}/u")


def test_position_falls_back_to_ts_ms() -> None:
    """Proves "position" without an LSN or binlog position uses source.ts_ms, also in the id."""
    source = {k: v for k, v in pg_source().items() if k != "lsn"}
    ev = decode(change("u", None, ROW, source=source))
    assert (ev.ts, ev.id, ev.meta["lsn"]) == (TS_MS, f"student:42@{TS_MS}/u", None)


def test_mysql_binlog_position() -> None:
    """Proves a MySQL change is ordered by file number * 10**12 + pos, its table is db.table,
    and its GTID transaction id is kept whole (its part before ':' is the server)."""
    gtid = "3e11fa47-71ca-11e1-9e33-c80aa9429562:23"
    source = {
        "version": "2.5.0.Final",
        "connector": "mysql",
        "name": "shop",
        "ts_ms": TS_MS,
        "snapshot": "false",
        "db": "shop",
        "table": "customer",
        "server_id": 223344,
        "gtid": gtid,
        "file": "mysql-bin.000003",
        "pos": 154,
        "row": 0,
        "thread": 7,
    }
    ev = decode(change("u", None, ROW, source=source, transaction={"id": gtid, "total_order": 2}))
    assert ev.ts == 3 * 10**12 + 154
    assert ev.id == f"customer:42@{3 * 10**12 + 154}/u"
    assert (ev.meta["table"], ev.meta["tx_id"], ev.meta["tx_order"]) == ("shop.customer", gtid, 2)


def test_source_tx_id_without_transaction_block() -> None:
    """Proves a streaming change without a transaction block takes tx_id from source.txId."""
    assert decode(change("u", None, ROW)).meta["tx_id"] == "571"


# --- transaction metadata -------------------------------------------------------------------

BEGIN = {
    "status": "BEGIN",
    "id": "571:24023120",
    "ts_ms": TS_MS,
    "event_count": None,
    "data_collections": None,
}
END = {
    "status": "END",
    "id": "571:24023240",
    "ts_ms": TS_MS + 5,
    "event_count": 2,
    "data_collections": [
        {"data_collection": "public.student", "event_count": 1},
        {"data_collection": "public.student_course", "event_count": 1},
    ],
}


def test_begin_and_end() -> None:
    """Proves BEGIN/END records become tx.begin/tx.end events on stream tx:<txId>, with the
    payload as data, the txId before the colon as meta.tx_id, and their own LSN as ts."""
    begin, end = decode(BEGIN, message_key={"id": BEGIN["id"]}), decode(END, envelope=True)
    assert (begin.stream, begin.type, begin.ts, begin.data) == (
        "tx:571",
        "tx.begin",
        24023120,
        BEGIN,
    )
    assert (end.stream, end.type, end.ts, end.data) == ("tx:571", "tx.end", 24023240, END)
    assert begin.meta["tx_id"] == end.meta["tx_id"] == "571"
    assert begin.id != end.id
    assert decode(BEGIN, ts="ts_ms").ts == TS_MS


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({**BEGIN, "status": "COMMIT"}, "transaction record status must be BEGIN or END"),
        ({**BEGIN, "id": None}, "transaction record without an 'id'"),
    ],
)
def test_bad_transaction_records(payload: dict[str, Any], expected: str) -> None:
    """Proves a malformed transaction record is a DecodeError."""
    assert reason(payload).startswith(expected)


# --- errors ---------------------------------------------------------------------------------


def without(payload: dict[str, Any], *path: str) -> dict[str, Any]:
    out = copy.deepcopy(payload)
    node = out
    for part in path[:-1]:
        node = node[part]
    del node[path[-1]]
    return out


def with_(payload: dict[str, Any], value: Any, *path: str) -> dict[str, Any]:
    out = copy.deepcopy(payload)
    node = out
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return out


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"before": None, "after": ROW}, "missing field 'op': not a Debezium change event"),
        (with_(UPDATE, "x", "op"), "unknown op 'x'; expected one of c, r, u, d"),
        (with_(UPDATE, None, "op"), "missing field 'op'"),
        (with_(UPDATE, "t", "op"), "op 't' is a TRUNCATE of table 'student'"),
        (with_(UPDATE, "m", "op"), "op 'm' is a logical decoding message"),
        (without(UPDATE, "source"), "missing field 'source' (got null)"),
        (with_(UPDATE, "s", "source"), "missing field 'source' (got str)"),
        (without(UPDATE, "source", "table"), "missing field 'source.table'"),
        (with_(UPDATE, None, "after"), "op 'u' without an 'after' row"),
        (change("c"), "op 'c' without an 'after' row"),
        (change("r"), "op 'r' without an 'after' row"),
        (with_(UPDATE, [1], "before"), "field 'before' must be an object or null, got list"),
        (with_(UPDATE, "24023176", "source", "lsn"), "source.lsn must be an integer, got str"),
        (with_(UPDATE, True, "source", "lsn"), "source.lsn must be an integer, got bool"),
        ([UPDATE], "Debezium payload must be a JSON object, got list"),
        ({"schema": {}, "payload": 5}, "Debezium payload must be a JSON object, got int"),
    ],
)
def test_bad_change_events(payload: Any, expected: str) -> None:
    """Proves each malformed change event is a DecodeError with a reason that names it."""
    assert reason(payload).startswith(expected)


def test_missing_positions() -> None:
    """Proves a ts mode whose field is missing is a DecodeError naming field and option."""
    no_lsn = without(UPDATE, "source", "lsn")
    assert (
        reason(no_lsn, ts="lsn") == "missing field 'source.lsn', needed by decoder option ts 'lsn'"
    )
    bare = without(no_lsn, "source", "ts_ms")
    assert reason(bare) == "missing field 'source.ts_ms', needed by decoder option ts 'position'"
    assert reason(without(UPDATE, "source", "ts_ms"), ts="ts_ms").startswith(
        "missing field 'source.ts_ms'"
    )


@pytest.mark.parametrize(
    ("file", "pos", "expected"),
    [
        ("mysql-bin", 4, "source.file 'mysql-bin' is not a binlog file name ending in a number"),
        (7, 4, "source.file 7 is not a binlog file name"),
        ("mysql-bin.000001", -1, "source.pos must be a binlog offset, got -1"),
        ("mysql-bin.000001", "4", "source.pos must be a binlog offset, got '4'"),
    ],
)
def test_bad_binlog_positions(file: Any, pos: Any, expected: str) -> None:
    """Proves an unusable MySQL binlog position is a DecodeError, not a wrong order."""
    source = {"ts_ms": TS_MS, "db": "shop", "table": "customer", "file": file, "pos": pos}
    assert reason(change("u", None, ROW, source=source)).startswith(expected)


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (b"not json", "message key is not valid JSON"),
        ([42], "message key must be a non-empty JSON object, got list"),
        ({}, "message key must be a non-empty JSON object, got dict"),
        ({"id": None}, "message key has a null field"),
    ],
)
def test_bad_message_keys(key: Any, expected: str) -> None:
    """Proves a key that gives no stream is a DecodeError."""
    assert reason(UPDATE, message_key=key).startswith(expected)


def test_missing_message_key() -> None:
    """Proves a change without a message key (a table without a primary key) says to set the
    key option."""
    message = RawMessage("t", 0, 0, None, json.dumps(UPDATE).encode())
    with pytest.raises(DecodeError, match=r"message has no key .* set decoder option 'key'"):
        load_decoder("debezium", {}).decode(message)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"\xc3\x28", "message is not valid UTF-8"),
        (b"{oops", "message is not valid JSON: Expecting property name"),
        (b'{"op": Infinity}', "message is not valid JSON: Infinity is not a JSON value"),
    ],
)
def test_undecodable_values(raw: bytes, expected: str) -> None:
    """Proves bytes that are not a JSON document are DecodeErrors."""
    assert reason(None, raw=raw).startswith(expected)


def test_oversize_value_and_key() -> None:
    """Proves max_bytes bounds both the value and the key."""
    assert reason(UPDATE, max_bytes=100).startswith("message of ")
    big_key = {"id": "x" * 200}
    small = {"op": "u", "after": {}, "source": {"table": "t", "ts_ms": 1}}
    assert reason(small, message_key=big_key, max_bytes=150).startswith("message key of ")


# --- options --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (
            {"keys": ["id"]},
            "decoder option 'keys' is unknown for the debezium decoder; known "
            "options: key, stream_prefix, ts, max_bytes",
        ),
        ({"key": "id"}, "decoder option 'key' must be a list of distinct column names"),
        ({"key": []}, "decoder option 'key' must be a list"),
        ({"key": ["id", "id"]}, "decoder option 'key' must be a list"),
        ({"key": ["id", 3]}, "decoder option 'key' must be a list"),
        ({"stream_prefix": 5}, "decoder option 'stream_prefix' must be text"),
        ({"ts": "scn"}, "decoder option 'ts' must be one of position, lsn, ts_ms; got 'scn'"),
        ({"max_bytes": -1}, "decoder option 'max_bytes' must be a positive integer"),
    ],
)
def test_option_validation(options: dict[str, Any], expected: str) -> None:
    """Proves bad Debezium options raise ValueError naming the option and the fix."""
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_decoder("debezium", options)


def test_key_option_accepts_a_tuple() -> None:
    """Proves key columns given as a tuple (not only a YAML list) are accepted."""
    assert isinstance(load_decoder("debezium", {"key": ("id",)}), DebeziumDecoder)


# --- properties -----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["id", "op", "lsn", "file", "pos", "table"]), inner)
    ),
    max_leaves=12,
)
FIELDS = [
    ("op",),
    ("before",),
    ("after",),
    ("source",),
    ("transaction",),
    ("source", "lsn"),
    ("source", "ts_ms"),
    ("source", "table"),
    ("source", "snapshot"),
    ("source", "file"),
    ("source", "pos"),
    ("transaction", "id"),
    ("transaction", "total_order"),
]


def _decode_or_reason(options: dict[str, Any], message: RawMessage) -> None:
    try:
        result = load_decoder("debezium", options).decode(message)
    except DecodeError as exc:
        assert exc.reason
    else:
        assert result is None or isinstance(result, Event)


@given(value=st.none() | st.binary(max_size=300), key=st.none() | st.binary(max_size=40))
def test_arbitrary_bytes_only_raise_decode_error(value: bytes | None, key: bytes | None) -> None:
    """Proves any bytes as value and key give an Event, None or a DecodeError, nothing else."""
    for options in ({}, {"key": ["id"], "ts": "lsn"}):
        _decode_or_reason(options, RawMessage("t", 0, 0, key, value))


@given(
    field=st.sampled_from(FIELDS),
    value=json_values,
    key=json_values,
    envelope=st.booleans(),
)
def test_mutated_events_only_raise_decode_error(
    field: tuple[str, ...], value: Any, key: Any, envelope: bool
) -> None:
    """Proves a realistic event with any one field replaced by any JSON value, under any JSON
    key, gives an Event, None or a DecodeError, nothing else."""
    payload = with_({**UPDATE, "transaction": dict(TX)}, value, *field)
    raw_key = json.dumps(key).encode()
    for options in ({}, {"key": ["id"]}, {"ts": "ts_ms"}):
        _decode_or_reason(options, msg(payload, raw_key, envelope=envelope))


def test_key_option_without_any_key_source() -> None:
    """Proves a delete with before null, no message key and a key option names the column it
    could not find."""
    message = RawMessage("t", 0, 0, None, json.dumps(change("d")).encode())
    with pytest.raises(DecodeError, match="message has no key to take column 'id' from"):
        load_decoder("debezium", {"key": ["id"]}).decode(message)


def test_unchanged_toasted_column_placeholder_is_not_data() -> None:
    """Proves an update whose unchanged TOASTed column comes as Debezium's placeholder leaves
    that column out of the data (so a merge keeps its stored value) and keeps the others."""
    payload = {
        "before": None,
        "after": {"id": 1, "bio": "__debezium_unavailable_value", "name": "Ann"},
        "source": {
            "table": "student",
            "schema": "public",
            "lsn": 42,
            "ts_ms": 1,
            "snapshot": "false",
        },
        "op": "u",
        "ts_ms": 2,
    }
    message = RawMessage("t", 0, 0, json.dumps({"id": 1}).encode(), json.dumps(payload).encode())
    event = load_decoder("debezium", {}).decode(message)
    assert event is not None and event.data == {"id": 1, "name": "Ann"}
