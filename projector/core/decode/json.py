"""The JSON decoder: picks an event's fields out of a JSON object by configured paths.

A path is dotted (``payload.playerId``; a number part indexes a list: ``items.0``) or one of
the message's own facts: ``$key`` (the key as UTF-8 text; a quoted JSON string key is unquoted;
``$key.id`` reads a field of a JSON key), ``$topic`` and ``$timestamp`` (Kafka's timestamp, ms).
``$offset`` is refused everywhere: offsets change on replay, so nothing an event is identified
or ordered by may come from them. Field names containing dots cannot be addressed.

Ids: the configured ``id`` path; else ``stream/seq``; else (merge mode, no seq) a hash of the
stream, type, ts and data, so the same content always gets the same id.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from projector.core.decode import DecodeError, check_max_bytes, parse_json, reasons
from projector.core.event import Event
from projector.core.message import RawMessage

_SPECIALS: Final = ("$key", "$topic", "$timestamp")
_INT64_MAX: Final = 2**63 - 1
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MS: Final = timedelta(milliseconds=1)


class _Missing:
    """Marks a path that leads nowhere (distinct from a JSON null)."""


MISSING: Final = _Missing()


@dataclass(frozen=True, slots=True)
class FieldPath:
    """A compiled path: where to look (``value``, ``key``, ``topic``, ``timestamp``) and the
    dotted parts to follow from there."""

    text: str
    origin: str
    parts: tuple[str, ...]

    @classmethod
    def compile(cls, option: str, text: object) -> FieldPath:
        if not isinstance(text, str) or not text:
            raise ValueError(f"decoder option {option!r} must be a path such as 'payload.id'")
        head, *rest = text.split(".")
        if "" in (head, *rest):
            raise ValueError(f"decoder option {option!r}: path {text!r} has an empty part")
        if head == "$offset":
            raise ValueError(
                f"decoder option {option!r} may not be '$offset': Kafka offsets change on "
                "replay; take it from the message content (a field path) instead"
            )
        if not head.startswith("$"):
            return cls(text, "value", (head, *rest))
        if head not in _SPECIALS:
            raise ValueError(
                f"decoder option {option!r}: {head!r} is not a known special path; "
                f"use a field path or one of {', '.join(_SPECIALS)}"
            )
        if rest and head != "$key":
            raise ValueError(f"decoder option {option!r}: {head!r} has no fields to follow")
        return cls(text, head[1:], tuple(rest))

    def resolve(self, message: RawMessage, value: dict[str, Any], max_bytes: int) -> Any:
        if self.origin == "value" and len(self.parts) == 1:
            return value.get(self.parts[0], MISSING)  # the common case, kept short
        if self.origin == "topic":
            return message.topic
        if self.origin == "timestamp":
            return MISSING if message.timestamp_ms is None else message.timestamp_ms
        if self.origin == "key":
            return self._resolve_key(message.key, max_bytes)
        return _follow(value, self.parts)

    def _resolve_key(self, key: bytes | None, max_bytes: int) -> Any:
        if key is None:
            return MISSING
        if self.parts:
            return _follow(parse_json(key, max_bytes, "message key"), self.parts)
        if len(key) > max_bytes:
            raise DecodeError(f"message key of {len(key)} bytes exceeds max_bytes {max_bytes}")
        try:
            text = key.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError(f"message key is not valid UTF-8: {exc.reason}") from exc
        if text.lstrip().startswith(('"', "{", "[")):
            # A JSON-encoded key: unquote a string, hand objects on (the field check says more).
            try:
                return json.loads(text)
            except (ValueError, RecursionError):
                return text
        return text


def _follow(node: Any, parts: tuple[str, ...]) -> Any:
    for part in parts:
        if isinstance(node, dict):
            node = node.get(part, MISSING)
        elif isinstance(node, list) and part.isascii() and part.isdigit():
            index = int(part)
            node = node[index] if index < len(node) else MISSING
        else:
            return MISSING
        if node is MISSING:
            return MISSING
    return node


@dataclass(frozen=True, slots=True)
class JsonOptions:
    """Where each field of the event is found; every string is a path (see module doc)."""

    stream: str
    stream_prefix: str = ""
    seq: str | None = None
    ts: str | None = None
    type: str | None = "type"
    data: str | None = None
    id: str | None = None
    max_bytes: int = 1_000_000

    def __post_init__(self) -> None:
        if not isinstance(self.stream_prefix, str):
            raise ValueError(
                f"decoder option 'stream_prefix' must be text such as 'game:', "
                f"got {self.stream_prefix!r}"
            )
        check_max_bytes(self.max_bytes)
        for name in ("stream", "seq", "ts", "type", "data", "id"):
            value = getattr(self, name)
            if value is not None or name == "stream":
                FieldPath.compile(name, value)


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "text", bool: "a boolean", int: "an integer"}
    if value is None or value == "":
        return "null" if value is None else "empty text"
    return names.get(type(value), "a number")


def _is_int(value: Any) -> bool:
    # bool is an int subclass in Python, but true/false is never a number in an event.
    return isinstance(value, int) and not isinstance(value, bool)


def _digits(value: Any) -> bool:
    # At most 19 digits: anything longer is beyond int64 (and int() of thousands is an error).
    return isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 19


def _bad(field: str, path: FieldPath, value: Any, wanted: str) -> DecodeError:
    reason = f"field {field!r} (path {path.text!r}) must be {wanted}, got {_kind(value)}"
    if isinstance(value, dict | list):
        reason += f"; to use a value inside it, set the path to e.g. '{path.text}.<field>'"
    return DecodeError(reason)


def to_stream(value: Any, path: FieldPath) -> str:
    if isinstance(value, str) and value:
        return value
    if _is_int(value):
        return str(value)
    raise _bad("stream", path, value, "non-empty text or an integer")


def to_seq(value: Any, path: FieldPath) -> int:
    if type(value) is int and 0 <= value <= _INT64_MAX:  # the common case first
        return value
    seq = int(value) if _digits(value) else value
    if _is_int(seq) and 0 <= seq <= _INT64_MAX:
        return int(seq)
    raise _bad("seq", path, value, "a non-negative 64-bit integer or a string of digits")


def to_ts(value: Any, path: FieldPath) -> int:
    """Epoch milliseconds from a number, a string of digits or an ISO-8601 text (naive = UTC)."""
    if type(value) is int and -_INT64_MAX <= value <= _INT64_MAX:  # the common case first
        return value
    ms: int | None = None
    if _is_int(value) or _digits(value):
        ms = int(value)
    elif isinstance(value, float) and math.isfinite(value):
        ms = math.floor(value)
    elif isinstance(value, str):
        ms = _iso_ms(value)
    if ms is None or not -_INT64_MAX <= ms <= _INT64_MAX:
        raise _bad("ts", path, value, "epoch milliseconds or an ISO-8601 time")
    return ms


def _iso_ms(text: str) -> int | None:
    try:
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return (moment - _EPOCH) // _MS
    except ValueError:  # not ISO-8601
        return None


def to_type(value: Any, path: FieldPath) -> str:
    if value is MISSING or value is None:
        return ""  # the type is optional information
    if isinstance(value, str):
        return value
    if _is_int(value):
        return str(value)
    raise _bad("type", path, value, "text")


def to_data(value: Any, path: FieldPath) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    raise _bad("data", path, value, "an object")


def to_id(value: Any, path: FieldPath) -> str:
    if isinstance(value, str) and value:
        return value
    if _is_int(value):
        return str(value)
    raise _bad("id", path, value, "non-empty text or an integer")


def content_id(stream: str, type_: str, ts: int | None, data: dict[str, Any]) -> str:
    """The id of an event without seq or id path: same content, same id, on every replay."""
    canonical = json.dumps([stream, type_, ts, data], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


class JsonDecoder:
    """Decodes a JSON object message into an ``Event`` following ``JsonOptions``."""

    def __init__(self, options: JsonOptions) -> None:
        self.options = options
        self._max = options.max_bytes
        self._stream = FieldPath.compile("stream", options.stream)
        self._seq = _compile_optional("seq", options.seq)
        self._ts = _compile_optional("ts", options.ts)
        self._type = _compile_optional("type", options.type)
        self._data = _compile_optional("data", options.data)
        self._id = _compile_optional("id", options.id)
        self._keys = _top_level_keys(
            self._stream, self._seq, self._ts, self._type, self._data, self._id
        )

    def decode(self, message: RawMessage) -> Event:
        with reasons():
            if self._keys is not None and message.value is not None:
                event = self._decode_plain(message.value, message)
                if event is not None:
                    return event
            return self._decode(message)

    def _decode_plain(self, raw: bytes, message: RawMessage) -> Event | None:
        """The usual message in short, when every path is a key of the top-level object:
        each field taken as it is when it already has its final type and range. ``None``
        for anything else, which :meth:`_decode` (the reference) then decodes or refuses
        with its reason, so both always agree."""
        assert self._keys is not None
        value = parse_json(raw, self._max)
        if type(value) is not dict:
            return None
        get = value.get
        k_stream, k_seq, k_ts, k_type, k_data, k_id = self._keys
        stream: Any = get(k_stream)
        seq = None if k_seq is None else get(k_seq)
        ts = None if k_ts is None else get(k_ts)
        type_: Any = "" if k_type is None else get(k_type)
        data: Any = value if k_data is None else get(k_data)
        id_: Any = None if k_id is None else get(k_id)
        plain = (
            type(stream) is str
            and stream != ""
            and (k_seq is None or (type(seq) is int and 0 <= seq <= _INT64_MAX))
            and (k_ts is None or (type(ts) is int and -_INT64_MAX <= ts <= _INT64_MAX))
            and type(type_) is str
            and type(data) is dict
            # no id path: stream/seq, or (no seq either) a content id the reference computes
            and ((type(id_) is str and id_ != "") if k_id is not None else seq is not None)
        )
        if not plain:
            return None
        stream = self.options.stream_prefix + stream
        if k_id is None:
            id_ = f"{stream}/{seq}"
        return Event(stream, seq, ts, type_, data, id_, message.source)

    def _decode(self, message: RawMessage) -> Event:
        if message.value is None:
            raise DecodeError("empty message (tombstone)")
        value = parse_json(message.value, self._max)
        if not isinstance(value, dict):
            raise DecodeError(f"message must be a JSON object, got {_kind(value)}")
        m = self._max
        stream = self.options.stream_prefix + to_stream(
            _required("stream", self._stream, message, value, m), self._stream
        )
        seq = ts = None
        if self._seq is not None:
            seq = to_seq(_required("seq", self._seq, message, value, m), self._seq)
        if self._ts is not None:
            ts = to_ts(_required("ts", self._ts, message, value, m), self._ts)
        type_ = (
            "" if self._type is None else to_type(self._type.resolve(message, value, m), self._type)
        )
        data = value
        if self._data is not None:
            data = to_data(_required("data", self._data, message, value, m), self._data)
        if self._id is not None:
            id_ = to_id(_required("id", self._id, message, value, m), self._id)
        elif seq is not None:
            id_ = f"{stream}/{seq}"
        else:
            id_ = content_id(stream, type_, ts, data)
        return Event(stream, seq, ts, type_, data, id_, message.source)


def _top_level_keys(*paths: FieldPath | None) -> tuple[str | None, ...] | None:
    """Each path's key when every configured path is one key of the message's top-level
    object (the usual configuration), else ``None``."""
    keys: list[str | None] = []
    for path in paths:
        if path is None:
            keys.append(None)
        elif path.origin == "value" and len(path.parts) == 1:
            keys.append(path.parts[0])
        else:
            return None
    return tuple(keys)


def _compile_optional(name: str, text: str | None) -> FieldPath | None:
    return None if text is None else FieldPath.compile(name, text)


def _required(
    field: str, path: FieldPath, message: RawMessage, value: dict[str, Any], max_bytes: int
) -> Any:
    """A field that must be there: missing or null is a ``DecodeError``."""
    found = path.resolve(message, value, max_bytes)
    if found is MISSING:
        raise DecodeError(f"missing field {field!r} (path {path.text!r})")
    if found is None:
        raise DecodeError(f"field {field!r} (path {path.text!r}) is null")
    return found
