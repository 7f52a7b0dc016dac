"""Decoders: turn a ``RawMessage`` into an ``Event``, or say precisely why they cannot.

This package owns the decoder contract (``Decoder``, ``DecodeError``), choosing a decoder from
the config (``load_decoder``) and the few helpers the built-in decoders share (bounded JSON
parsing, option validation). It is pure logic: no Kafka, database or metrics imports.

Contract: ``decode`` returns an ``Event``; ``None`` only for messages that are intentionally
ignored (Debezium tombstones, heartbeats and schema-change records, see ``debezium.py``); and
raises ``DecodeError`` for anything it cannot decode, never another exception, so a bad message
becomes a dead letter instead of crashing the daemon.
"""

from __future__ import annotations

import dataclasses
import importlib
import json as jsonlib  # not `json`: importing the submodule .json rebinds that name here
from collections.abc import Mapping
from typing import Any, Literal, Protocol, TypeVar

import orjson

from projector.core.event import Event
from projector.core.json_codec import may_hold_big_int
from projector.core.message import RawMessage

__all__ = ["DecodeError", "Decoder", "GuardedDecoder", "load_decoder"]

T = TypeVar("T")


class DecodeError(Exception):
    """A message that cannot be decoded; ``reason`` says why, for the dead-letter list."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Decoder(Protocol):
    def decode(self, message: RawMessage) -> Event | None:
        """The message's event; ``None`` if it is intentionally ignored; else ``DecodeError``."""
        ...


class _Reasons:
    """See :func:`reasons`. A class, not ``@contextmanager``: it wraps every message, and a
    generator-based context manager cost a microsecond each (5% of the daemon's CPU)."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, _tb: Any
    ) -> Literal[False]:
        if (
            exc is None
            or isinstance(exc, DecodeError | MemoryError)
            or not isinstance(exc, Exception)
        ):
            return False
        raise DecodeError(f"unexpected {type(exc).__name__} while decoding: {exc}") from exc


_REASONS = _Reasons()


def reasons() -> _Reasons:
    """Turns any unexpected exception raised on bad input into a ``DecodeError``.

    MemoryError is let through: it says the process is in trouble, not the message; so is
    what is no ``Exception`` (KeyboardInterrupt, SystemExit).
    """
    return _REASONS


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN/Infinity, which are not JSON and would poison ts arithmetic.
    raise ValueError(f"{name} is not a JSON value")


# How deep a message may nest. orjson reads 1,024 levels, but what reads an event writes it
# out again (its payload hash, the holding table, Redis's cjson), and those stop near 1,000:
# deeper, the event raised in planning and stopped the daemon, instead of becoming a dead letter.
MAX_DEPTH = 512


def parse_json(raw: bytes, max_bytes: int, what: str = "message") -> Any:
    """Parses ``raw`` as UTF-8 JSON of at most ``max_bytes`` bytes and ``MAX_DEPTH`` levels.

    orjson parses (5x the standard library) what it parses exactly (see
    :mod:`projector.core.json_codec`); the rest, and every message it refuses, go to the
    standard library, whose answers and error messages are the reference."""
    if len(raw) > max_bytes:
        raise DecodeError(f"{what} of {len(raw)} bytes exceeds max_bytes {max_bytes}")
    value = _parse(raw, what)
    # Nesting deeper than the bound takes two brackets a level, so the usual message (a few
    # hundred bytes) is let through on its length; a longer one with fewer opening brackets
    # than the bound, on two byte counts; only the others are walked.
    if (
        len(raw) > 2 * MAX_DEPTH
        and raw.count(b"{") + raw.count(b"[") > MAX_DEPTH
        and _deeper_than(value, MAX_DEPTH)
    ):
        raise DecodeError(f"{what} nests deeper than {MAX_DEPTH} levels")
    return value


def _parse(raw: bytes, what: str) -> Any:
    if not may_hold_big_int(raw):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # the standard library says why, below
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"{what} is not valid UTF-8: {exc.reason} at byte {exc.start}") from exc
    try:
        return jsonlib.loads(text, parse_constant=_reject_constant)
    except jsonlib.JSONDecodeError as exc:
        raise DecodeError(f"{what} is not valid JSON: {exc}") from exc
    except (ValueError, RecursionError) as exc:
        # Huge integer literals (ValueError) and very deep nesting (RecursionError).
        raise DecodeError(f"{what} is not valid JSON: {exc}") from exc


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` nests lists and objects more than ``limit`` levels (the top one is
    level 1). A walk with a stack of its own: recursion is what deep input breaks."""
    stack = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def check_max_bytes(value: object) -> int:
    """Validates the ``max_bytes`` option shared by the built-in decoders."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(
            f"decoder option 'max_bytes' must be a positive integer (bytes), got {value!r}"
        )
    return value


def options_from(cls: type[T], options: Mapping[str, Any], decoder: str) -> T:
    """Builds the options dataclass ``cls``, naming unknown or missing keys for people."""
    known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    for key in options:
        if key not in known:
            raise ValueError(
                f"decoder option {key!r} is unknown for the {decoder} decoder; "
                f"known options: {', '.join(known)}"
            )
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if no_default and f.name not in options:
            raise ValueError(f"decoder option {f.name!r} is required for the {decoder} decoder")
    return cls(**options)


class GuardedDecoder:
    """Wraps a plug-in decoder so it keeps the contract: only ``DecodeError`` on bad input,
    and only an ``Event`` or ``None`` as a result."""

    def __init__(self, inner: Decoder, name: str) -> None:
        self.inner = inner
        self.name = name

    def decode(self, message: RawMessage) -> Event | None:
        with reasons():
            result = self.inner.decode(message)
        if result is not None and not isinstance(result, Event):
            raise DecodeError(
                f"decoder {self.name} returned {type(result).__name__}, not an Event or None"
            )
        return result


def load_decoder(kind: str, options: Mapping[str, Any]) -> Decoder:
    """The decoder for a topic: ``"json"``, ``"debezium"``, or ``"package.module:Name"``
    (called as ``Name(**options)``). Bad config raises ``ValueError`` naming the fix."""
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        raise ValueError(f"decoder options must be a mapping of names to values, got {options!r}")
    # Imported here, not at the top: the decoder modules import this package's helpers.
    if kind == "json":
        from projector.core.decode.json import JsonDecoder, JsonOptions  # noqa: PLC0415

        return JsonDecoder(options_from(JsonOptions, options, "json"))
    if kind == "debezium":
        from projector.core.decode.debezium import (  # noqa: PLC0415
            DebeziumDecoder,
            DebeziumOptions,
        )

        return DebeziumDecoder(options_from(DebeziumOptions, options, "debezium"))
    return GuardedDecoder(_load_plugin(kind, options), kind)


def _load_plugin(kind: str, options: Mapping[str, Any]) -> Decoder:
    module_name, sep, attr = kind.partition(":")
    if not sep or not module_name or not attr or ":" in attr:
        raise ValueError(
            f"decoder {kind!r} is unknown; use 'json', 'debezium' or a plug-in "
            "as 'package.module:Name'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"decoder {kind!r}: cannot import module {module_name!r} ({exc}); "
            "check the module path and that it is installed or on the path"
        ) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"decoder {kind!r}: module {module_name!r} has no callable {attr!r}")
    try:
        decoder = factory(**options)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"decoder {kind!r} rejected its options: {exc}") from exc
    if not callable(getattr(decoder, "decode", None)):
        raise ValueError(f"decoder {kind!r}: {attr}(...) returned an object without decode()")
    return decoder  # type: ignore[no-any-return]
