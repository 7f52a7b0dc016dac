"""What a Redis handler is handed: a plan of writes, and reads of the views as they stand.

A handler never gets a client. Its writes are recorded here as plain commands, checked as they
are made (types, finite numbers), and applied by the batch script together with projector's own
state, after the script has checked the fence and the type of every key it will touch. Its
reads go to Redis at once and their keys are WATCHed, so if another instance changes what was
read before the batch commits, the batch is read, planned and applied again.

Keys are relative: ``customer:42``. The store puts them in the projection's view namespace
(``<redis.prefix>:v:<view_schema>:<version>:customer:42``, the version readers find in
``<redis.prefix>:v:<view_schema>:active``), so handlers never name it, as SQL handlers
never name a schema.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

Value = str | int | float
CHUNK = 1000  # values per recorded command: the batch script unpacks each one onto Lua's stack
Members = set[str]  # named here: inside RedisView, ``set`` is the method
Op = list[str]  # [command, full key, arg...]: every part a string, as Redis receives it


def _text(value: str, what: str) -> str:
    if value.isascii():  # nearly every key and value: nothing to check
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate, from a JSON escape such as \ud800
        raise ValueError(f"{what} is not valid Unicode: {exc.reason}") from None
    return value


def _value(value: Any, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise TypeError(f"{what} must be a str, int or float, not {type(value).__name__}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{what} must be finite, not {value}")
        return repr(value)
    return _text(value, what) if isinstance(value, str) else str(value)


def _integer(value: Any, what: str) -> str:
    if type(value) is int and -(2**63) <= value < 2**63:  # the usual value: a plain int
        return str(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"{what} {value} does not fit in 64 bits")
    return str(value)


def _number(value: Any, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a number, not {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, not {value}")
    return repr(float(value)) if isinstance(value, float) else str(value)


def _key(key: Any) -> str:
    if type(key) is str and key.isascii() and key:  # nearly every key: nothing more to check
        return key
    if not isinstance(key, str) or not key:
        raise ValueError(f"a key must be a non-empty str, not {key!r}")
    return _text(key, "a key")


Reader = Callable[[str, Sequence[str], Sequence[str]], list[Any]]


class RedisView:
    """A projection's Redis views inside one batch (see :class:`projector.apply.RedisView`).

    Writes: strings (``set``, ``set_json``), counters (``incrby``, ``incrbyfloat``), hashes
    (``hset``, ``hdel``, ``hincrby``, ``hincrbyfloat``), sets (``sadd``, ``srem``), sorted
    sets (``zadd``, ``zrem``, ``zincrby``) and ``delete``. Reads: ``get``, ``get_json``,
    ``hget``, ``hgetall``, ``hgetall_many``, ``smembers``, ``zscore``, ``exists``; they see
    what is stored, not this batch's writes, so accumulate with the counters rather than
    read-then-write where you can.
    """

    def __init__(self, namespace: str, ops: list[Op], reader: Reader) -> None:
        self._ns = namespace
        self._ops = ops
        self._read = reader

    def _full(self, key: str) -> str:
        return f"{self._ns}:{_key(key)}"

    def _add(self, command: str, key: str, *args: str, width: int = 1) -> None:
        """Record a command; a long variadic one (``width`` arguments per item) is split."""
        full = self._full(key)
        if len(args) <= CHUNK:
            self._ops.append([command, full, *args])
            return
        step = CHUNK - CHUNK % width
        for i in range(0, len(args), step):
            self._ops.append([command, full, *args[i : i + step]])

    # -- strings and counters -------------------------------------------------------------
    def set(self, key: str, value: Value) -> None:
        self._add("SET", key, _value(value, "value"))

    def set_json(self, key: str, value: Any) -> None:
        """Store ``value`` as a JSON string (``get_json`` reads it back)."""
        text = json.dumps(value, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
        self._add("SET", key, _text(text, "the JSON value"))

    def incrby(self, key: str, amount: int = 1) -> None:
        # The commands of one value each are recorded straight: a handler may make one per
        # event, and _add's generality cost a fifth of the Redis store's own time per batch.
        self._ops.append(["INCRBY", self._full(key), _integer(amount, "amount")])

    def incrbyfloat(self, key: str, amount: float) -> None:
        self._add("INCRBYFLOAT", key, _number(amount, "amount"))

    def delete(self, *keys: str) -> None:
        for key in keys:
            self._add("DEL", key)

    # -- hashes ---------------------------------------------------------------------------
    def hset(self, key: str, mapping: Mapping[str, Value]) -> None:
        if not mapping:
            raise ValueError("hset needs at least one field")
        args = [p for f, v in mapping.items() for p in (_key(f), _value(v, f"field {f!r}"))]
        self._add("HSET", key, *args, width=2)

    def hdel(self, key: str, *fields: str) -> None:
        if fields:
            self._add("HDEL", key, *map(_key, fields))

    def hincrby(self, key: str, field: str, amount: int = 1) -> None:
        self._ops.append(["HINCRBY", self._full(key), _key(field), _integer(amount, "amount")])

    def hincrbyfloat(self, key: str, field: str, amount: float) -> None:
        self._ops.append(["HINCRBYFLOAT", self._full(key), _key(field), _number(amount, "amount")])

    # -- sets and sorted sets -------------------------------------------------------------
    def sadd(self, key: str, *members: Value) -> None:
        if members:
            self._add("SADD", key, *(_value(m, "member") for m in members))

    def srem(self, key: str, *members: Value) -> None:
        if members:
            self._add("SREM", key, *(_value(m, "member") for m in members))

    def zadd(self, key: str, mapping: Mapping[str, float]) -> None:
        if mapping:
            args = [
                p for m, s in mapping.items() for p in (_number(s, "score"), _value(m, "member"))
            ]
            self._add("ZADD", key, *args, width=2)

    def zrem(self, key: str, *members: Value) -> None:
        if members:
            self._add("ZREM", key, *(_value(m, "member") for m in members))

    def zincrby(self, key: str, amount: float, member: Value) -> None:
        self._add("ZINCRBY", key, _number(amount, "amount"), _value(member, "member"))

    # -- reads (now, WATCHed) -------------------------------------------------------------
    def get(self, key: str) -> str | None:
        value: str | None = self._read("get", [self._full(key)], [])[0]
        return value

    def get_json(self, key: str) -> Any:
        raw = self.get(key)
        return None if raw is None else json.loads(raw)

    def hget(self, key: str, field: str) -> str | None:
        value: str | None = self._read("hget", [self._full(key)], [_key(field)])[0]
        return value

    def hgetall(self, key: str) -> dict[str, str]:
        return self.hgetall_many([key])[0]

    def hgetall_many(self, keys: Iterable[str]) -> list[dict[str, str]]:
        """Several hashes in one round trip; ``{}`` for a missing one."""
        names = [self._full(k) for k in keys]
        if not names:
            return []
        return [_pairs(flat) for flat in self._read("hgetall", names, [])]

    def smembers(self, key: str) -> Members:
        return set(self._read("smembers", [self._full(key)], [])[0])

    def zscore(self, key: str, member: Value) -> float | None:
        raw = self._read("zscore", [self._full(key)], [_value(member, "member")])[0]
        return None if raw is None else float(raw)

    def exists(self, key: str) -> bool:
        return bool(self._read("exists", [self._full(key)], [])[0])


def _pairs(flat: Sequence[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))
