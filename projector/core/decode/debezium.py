"""The Debezium decoder: change events (PostgreSQL connector 2.x/3.x; MySQL where cheap).

Accepts the JSON converter's ``{"schema": ..., "payload": ...}`` envelope and bare payloads
(``schemas.enable=false``), for message values and keys alike.

- op c/r/u: type create/read/update, data = ``after`` (its nulls are real values). An update
  with ``before`` null is normal (REPLICA IDENTITY DEFAULT). An unchanged TOASTed column comes
  as Debezium's placeholder ``__debezium_unavailable_value``: not data, so it is left out and a
  merge keeps the value it had.
- op d: type delete, data = the non-null fields of ``before`` (with REPLICA IDENTITY DEFAULT it
  holds the key and nulls that are not data); the key when ``before`` is null.
- Ignored (``None``): tombstones (null value, or an envelope with a null payload), heartbeats
  (a payload of only ``ts_ms``) and schema-change records (``ddl``/``tableChanges``): none of
  them says anything about a row.
- Transaction metadata (``status`` BEGIN/END, on its own topic): type ``tx.begin``/``tx.end``,
  stream ``tx:<txId>``, data = the payload, so a later stage can correlate on ``meta.tx_id``.
- Anything else, including TRUNCATE (op t) and logical messages (op m), is a ``DecodeError``:
  a dead letter someone sees, never a silent drop.

Stream: ``<table>:<key values joined by ",">``. seq is None (no contiguous sequence). ts is the
log position by default: ``source.lsn``, else the MySQL binlog position as
``file number * 10**12 + pos``, else ``source.ts_ms``. The id is ``<stream>@<position>/<op>``
(``source.ts_ms`` when there is no position): identical on re-delivery, never the Kafka offset.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final, Literal

from projector.core.decode import DecodeError, check_max_bytes, parse_json, reasons
from projector.core.event import Event
from projector.core.message import RawMessage

_TYPES: Final = {"c": "create", "r": "read", "u": "update", "d": "delete"}
_TS_MODES: Final = ("position", "lsn", "ts_ms")
_BINLOG_NUMBER: Final = re.compile(r"\.(\d{1,6})$")
_BINLOG_SPAN: Final = 10**12  # room for a binlog offset within one file (max_binlog_size is 1 GiB)


@dataclass(frozen=True, slots=True)
class DebeziumOptions:
    """``key``: primary-key columns (default: every field of the message key, in order);
    ``stream_prefix``: default ``"<table>:"``; ``ts``: ``position`` | ``lsn`` | ``ts_ms``."""

    key: list[str] | None = None
    stream_prefix: str | None = None
    ts: Literal["position", "lsn", "ts_ms"] = "position"
    max_bytes: int = 1_000_000

    def __post_init__(self) -> None:
        _check_key(self.key)
        if self.stream_prefix is not None and not isinstance(self.stream_prefix, str):
            raise ValueError(
                "decoder option 'stream_prefix' must be text such as 'student:', "
                f"or left unset for '<table>:'; got {self.stream_prefix!r}"
            )
        if self.ts not in _TS_MODES:
            raise ValueError(
                f"decoder option 'ts' must be one of {', '.join(_TS_MODES)}; got {self.ts!r}"
            )
        check_max_bytes(self.max_bytes)


def _check_key(key: object) -> None:
    if key is None:
        return
    columns = list(key) if isinstance(key, list | tuple) else []
    if (
        not columns
        or not all(isinstance(c, str) and c for c in columns)
        or (len(set(columns)) != len(columns))
    ):
        raise ValueError(
            "decoder option 'key' must be a list of distinct column names, e.g. [id], "
            f"or left unset to use the message key; got {key!r}"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _unwrap(obj: Any) -> Any:
    """The payload of a JSON-converter envelope; anything else is already bare."""
    if isinstance(obj, dict) and "payload" in obj and set(obj) <= {"schema", "payload"}:
        return obj["payload"]
    return obj


def _int_field(source: dict[str, Any], name: str) -> int | None:
    value = source.get(name)
    if value is None or _is_int(value):
        return value
    raise DecodeError(f"source.{name} must be an integer, got {_kind(value)}")


def _binlog_position(source: dict[str, Any]) -> int | None:
    """A MySQL binlog position as one sortable int, or None when there is none."""
    file, pos = source.get("file"), source.get("pos")
    if not file or pos is None:
        return None
    match = _BINLOG_NUMBER.search(file) if isinstance(file, str) else None
    if match is None:
        raise DecodeError(f"source.file {file!r} is not a binlog file name ending in a number")
    if not _is_int(pos) or not 0 <= pos < _BINLOG_SPAN:
        raise DecodeError(f"source.pos must be a binlog offset, got {pos!r}")
    return int(match[1]) * _BINLOG_SPAN + int(pos)


def _tx_parts(tx: str) -> tuple[str, int | None]:
    """PostgreSQL's ``"<txId>:<lsn>"`` split in two; other ids (a MySQL GTID's part before the
    colon names the server, not the transaction) are kept whole, with no LSN."""
    head, sep, tail = tx.partition(":")
    if sep and head.isascii() and head.isdigit():
        lsn = int(tail) if tail.isascii() and tail.isdigit() and len(tail) <= 19 else None
        return head, lsn
    return tx, None


def _is_snapshot(value: Any) -> bool:
    # A string since 1.x ("false" while streaming); tolerate a bool from other producers.
    if isinstance(value, str):
        return value.lower() != "false"
    return value not in (None, False)


def _key_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def _ignored(payload: dict[str, Any]) -> bool:
    heartbeat = set(payload) == {"ts_ms"}
    schema_change = "ddl" in payload or "tableChanges" in payload
    return heartbeat or schema_change


def _op_error(op: Any, source: Any) -> DecodeError:
    table = source.get("table") if isinstance(source, dict) else None
    if op is None:
        return DecodeError("missing field 'op': not a Debezium change event")
    if op == "t":
        return DecodeError(
            f"op 't' is a TRUNCATE of table {table!r}: every row was removed, which no row "
            "event says; rebuild the projection, or keep truncates out with the connector's "
            "skipped.operations"
        )
    if op == "m":
        return DecodeError("op 'm' is a logical decoding message, not a row change")
    return DecodeError(f"unknown op {op!r}; expected one of c, r, u, d")


def _transaction(message: RawMessage, payload: dict[str, Any], ts_mode: str) -> Event:
    """A BEGIN/END record of the transaction metadata topic."""
    status, tx = payload.get("status"), payload.get("id")
    if status not in ("BEGIN", "END"):
        raise DecodeError(f"transaction record status must be BEGIN or END, got {status!r}")
    if not isinstance(tx, str) or not tx:
        raise DecodeError("transaction record without an 'id'")
    tx_id, lsn = _tx_parts(tx)
    ts_ms = payload.get("ts_ms") if _is_int(payload.get("ts_ms")) else None
    # In a log-position mode the record's own LSN orders it among the change events.
    ts = lsn if ts_mode != "ts_ms" and lsn is not None else ts_ms
    stream, kind = f"tx:{tx_id}", status.lower()
    meta = {"tx_id": tx_id, "tx_status": status, "lsn": lsn, "ts_ms": ts_ms}
    return Event(
        stream, None, ts, f"tx.{kind}", payload, f"{stream}@{tx}/{kind}", message.source, meta
    )


class DebeziumDecoder:
    """Decodes Debezium change events and transaction records into ``Event``s."""

    def __init__(self, options: DebeziumOptions) -> None:
        self.options = options
        self._columns = None if options.key is None else tuple(options.key)

    def decode(self, message: RawMessage) -> Event | None:
        with reasons():
            return self._decode(message)

    def _decode(self, message: RawMessage) -> Event | None:
        if message.value is None:
            return None  # the tombstone that follows a delete, for log compaction
        payload = _unwrap(parse_json(message.value, self.options.max_bytes))
        if payload is None:
            return None  # an enveloped tombstone
        if not isinstance(payload, dict):
            raise DecodeError(f"Debezium payload must be a JSON object, got {_kind(payload)}")
        if "op" in payload:
            return self._change(message, payload)
        if "status" in payload:
            return _transaction(message, payload, self.options.ts)
        if _ignored(payload):
            return None
        raise _op_error(None, None)

    def _change(self, message: RawMessage, payload: dict[str, Any]) -> Event:
        op, source = payload.get("op"), payload.get("source")
        if op not in _TYPES:
            raise _op_error(op, source)
        if not isinstance(source, dict):
            raise DecodeError(f"missing field 'source' (got {_kind(source)})")
        table = source.get("table")
        if not isinstance(table, str) or not table:
            raise DecodeError("missing field 'source.table'")
        before, after = _row(payload, "before"), _row(payload, "after")
        if op == "d":
            key = self._key(message, before, "before")
            data = _deleted(before, key)
        elif after is None:
            raise DecodeError(f"op {op!r} without an 'after' row")
        else:
            key, data = self._key(message, after, "after"), _available(after)
        prefix = f"{table}:" if self.options.stream_prefix is None else self.options.stream_prefix
        stream = prefix + ",".join(_key_text(v) for v in key.values())
        position = _position(source)
        ts = self._ts(source, position)
        id_ = f"{stream}@{ts if position is None else position}/{op}"
        meta = _meta(payload, source, table, op)
        return Event(stream, None, ts, _TYPES[op], data, id_, message.source, meta)

    def _key(self, message: RawMessage, row: dict[str, Any] | None, side: str) -> dict[str, Any]:
        """The row's key columns, in order: the configured ones (from the row, else the message
        key), or every field of the message key."""
        if self._columns is None:
            return _message_key(message, self.options.max_bytes)
        key: dict[str, Any] = {}
        fallback: dict[str, Any] | None = None
        for column in self._columns:
            value = None if row is None else row.get(column)
            if value is None:
                fallback = fallback or _message_key(message, self.options.max_bytes, column)
                value = fallback.get(column)
            if value is None:
                raise DecodeError(
                    f"key column {column!r} is missing or null in {side!r} and the message key"
                )
            key[column] = value
        return key

    def _ts(self, source: dict[str, Any], position: int | None) -> int:
        mode = self.options.ts
        if mode == "position" and position is not None:
            return position
        field = "lsn" if mode == "lsn" else "ts_ms"
        value = _int_field(source, field)
        if value is None:
            raise DecodeError(
                f"missing field 'source.{field}', needed by decoder option ts {mode!r}"
            )
        return value


def _row(payload: dict[str, Any], side: str) -> dict[str, Any] | None:
    row = payload.get(side)
    if row is None or isinstance(row, dict):
        return row
    raise DecodeError(f"field {side!r} must be an object or null, got {_kind(row)}")


def _position(source: dict[str, Any]) -> int | None:
    """The change's place in the database log: PostgreSQL LSN, else MySQL binlog position."""
    lsn = _int_field(source, "lsn")
    return lsn if lsn is not None else _binlog_position(source)


def _deleted(before: dict[str, Any] | None, key: dict[str, Any]) -> dict[str, Any]:
    """A delete's data: ``before`` without its nulls (with REPLICA IDENTITY DEFAULT only the
    key is filled in; the nulls are not data), or the key when there is no ``before``."""
    kept = {} if before is None else {k: v for k, v in before.items() if v is not None}
    return kept or dict(key)


def _message_key(message: RawMessage, max_bytes: int, column: str | None = None) -> dict[str, Any]:
    if message.key is None:
        hint = f"column {column!r}" if column else "the key"
        raise DecodeError(
            f"message has no key to take {hint} from (a table without a primary key?); "
            "set decoder option 'key' to the key columns"
        )
    key = _unwrap(parse_json(message.key, max_bytes, "message key"))
    if not isinstance(key, dict) or not key:
        raise DecodeError(f"message key must be a non-empty JSON object, got {_kind(key)}")
    if column is None and any(v is None for v in key.values()):
        raise DecodeError("message key has a null field")
    return key


def _meta(payload: dict[str, Any], source: dict[str, Any], table: str, op: str) -> dict[str, Any]:
    """Facts that are not row data: where the change happened, its transaction, snapshot."""
    schema = source.get("schema") or source.get("db")
    snapshot = _is_snapshot(source.get("snapshot"))
    tx = payload.get("transaction")
    tx = tx if isinstance(tx, dict) else {}
    tx_id: str | None = None
    if isinstance(tx.get("id"), str):
        tx_id = _tx_parts(tx["id"])[0]
    elif source.get("txId") is not None and not snapshot:
        # No transaction block (metadata off); snapshot rows belong to no BEGIN/END pair.
        tx_id = str(source["txId"])
    return {
        "table": f"{schema}.{table}" if isinstance(schema, str) and schema else table,
        "table_name": table,
        "op": op,
        "lsn": _int_field(source, "lsn"),
        "ts_ms": _int_field(source, "ts_ms"),
        "snapshot": snapshot,
        "tx_id": tx_id,
        "tx_order": tx.get("total_order") if _is_int(tx.get("total_order")) else None,
        "tx_collection_order": (
            tx.get("data_collection_order") if _is_int(tx.get("data_collection_order")) else None
        ),
    }


UNAVAILABLE = "__debezium_unavailable_value"


def _available(row: dict[str, Any]) -> dict[str, Any]:
    """The row without Debezium's placeholder for unchanged TOASTed columns."""
    return {k: v for k, v in row.items() if v != UNAVAILABLE}
