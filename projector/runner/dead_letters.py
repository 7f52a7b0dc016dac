"""``projector dead-letters retry|skip``: resume a stream after a fix, or move past its event.

Each dead letter is handled in its own store transaction, serialised with a running daemon on
the stream's position lock, through the same batch applier the daemon uses:
- retry: an undecodable message is decoded again; a decoded event is sequenced again (a
  handler failure's stream is unblocked first), and what was parked behind it drains. If it
  fails again it becomes a new dead letter and the stream stays halted.
- skip: the stream moves past the event as if it had been applied, and drains.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from projector.config import Config
from projector.core.decode import DecodeError, Decoder
from projector.core.event import Event
from projector.core.sequencer import StreamPosition
from projector.runner.batch import BatchResult, Clock
from projector.runner.worker import Applier, build_applier, build_decoders, load_handlers
from projector.store.base import DeadLetterRow, StoreBatch
from projector.store.connect import StoreSet
from projector.store.errors import transient_retries

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    id: int
    status: str  # retried | skipped | still-failing | not-found | already-resolved
    detail: str


def _unblock(seq: int | None) -> Callable[[StreamPosition], StreamPosition]:
    def change(pos: StreamPosition) -> StreamPosition:
        return pos._replace(blocked_seq=None) if pos.blocked_seq == seq else pos

    return change


def _skip_past(event: Event) -> Callable[[StreamPosition], StreamPosition]:
    def change(pos: StreamPosition) -> StreamPosition:
        if pos.blocked_seq != event.seq or event.seq is None:
            return pos
        return pos._replace(
            last_seq=event.seq, last_id=event.id, last_hash=event.hash, blocked_seq=None
        )

    return change


def resolve(
    config: Config, projection: str, ids: list[int], action: str, clock: Clock
) -> list[Outcome]:
    """Retry or skip the given dead letters of one projection."""
    proj = config.projection(projection)
    stores = StoreSet(config)
    try:
        stores.check([proj], [load_handlers(proj)])
        store = stores.of(proj)
        applier = build_applier(config, proj, store, clock)
        decoders = build_decoders(proj)
        outcomes = []
        for letter_id in ids:
            for attempt in transient_retries():
                with attempt, store.batch(proj.name, proj.schema_name) as tx:
                    outcome = resolve_one(applier, decoders, tx, letter_id, action)
            outcomes.append(outcome)
    finally:
        stores.close()
    return outcomes


def resolve_one(
    applier: Applier,
    decoders: Mapping[str, Decoder],
    tx: StoreBatch,
    letter_id: int,
    action: str,
) -> Outcome:
    """Retry or skip one dead letter of ``tx``'s projection, in ``tx``."""
    row = tx.lock_dead_letter(letter_id)
    if row is None:
        return Outcome(letter_id, "not-found", f"no dead letter {letter_id} in {tx.projection}")
    if row.status != "open":
        return Outcome(letter_id, "already-resolved", f"status is {row.status}")
    result = BatchResult()
    if action == "skip":
        return _skip(applier, tx, row, result)
    return _retry(applier, decoders, tx, row, result)


def _skip(applier: Applier, tx: StoreBatch, row: DeadLetterRow, result: BatchResult) -> Outcome:
    overrides: dict[str, Callable[[StreamPosition], StreamPosition]] = {}
    if row.kind == "handler" and row.event is not None:
        overrides[row.event.stream] = _skip_past(row.event)
    applier.apply_events(tx, [], result, overrides)
    tx.resolve_dead_letter(row.id, "skipped")
    return Outcome(row.id, "skipped", f"drained {result.applied} parked event(s)")


def _retry(
    applier: Applier,
    decoders: Mapping[str, Decoder],
    tx: StoreBatch,
    row: DeadLetterRow,
    result: BatchResult,
) -> Outcome:
    event = row.event
    if row.kind == "decode":
        decoder = decoders.get(row.message.topic) if row.message is not None else None
        if decoder is None or row.message is None:
            return Outcome(
                row.id, "still-failing", "its topic is no longer consumed by the projection"
            )
        try:
            event = decoder.decode(row.message)
        except DecodeError as exc:
            tx.resolve_dead_letter(row.id, "open", exc.reason)
            return Outcome(row.id, "still-failing", exc.reason)
    overrides: dict[str, Callable[[StreamPosition], StreamPosition]] = {}
    if row.kind == "handler" and event is not None:
        overrides[event.stream] = _unblock(event.seq)
    applier.apply_events(tx, [] if event is None else [event], result, overrides)
    tx.resolve_dead_letter(row.id, "retried")
    if result.dead_letters:
        return Outcome(row.id, "still-failing", result.dead_letters[0].reason)
    return Outcome(
        row.id, "retried", f"applied {result.applied} event(s), {result.duplicates} duplicate(s)"
    )
