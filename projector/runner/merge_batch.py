"""One merge-mode batch, one store transaction: decode → fence → lock documents → merge →
handlers → write states.

Merge mode has no sequence: each document (stream) keeps, per field, the value with the newest
``(ts, id)`` (see :mod:`projector.core.merge`), so arrival order, batching and duplicates do not
matter and nothing is parked. The merge state is kept per document in the store beside the views, held
per document, so instances touching one document serialise and restarts lose nothing.
A handler failure is traced to its document; that document's events become dead letters (a
retry merges them again later, order being irrelevant) and the others go on.

With a ``correlation`` (docs/correlation.md), the batch's events then go through
:mod:`projector.runner.correlate_step` in the same transaction (lock order: fence, documents,
correlations): Debezium's BEGIN/END records feed the correlation only (they describe no row),
and the business events it names go to the handlers' ``handle_business``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from projector.apply import DocumentChange, LoadedHandler
from projector.core.dead_letter import DeadLetter
from projector.core.decode import Decoder
from projector.core.event import Event
from projector.core.merge import DocState, MergeRules, merge_events, purge_tombstones
from projector.core.message import RawMessage
from projector.core.sequencer import StreamPosition, group_by_stream
from projector.runner.batch import BatchResult, Decoded, apply_consumed, first_failure
from projector.runner.correlate_step import PARTS_TYPE, CorrelationOutcome, CorrelationStep
from projector.store.base import Store, StoreBatch, TopicPartition
from projector.store.errors import TransientStoreError, is_transient

log = logging.getLogger(__name__)


class MergeApplier:
    """Applies batches of one merge-mode projection to its store."""

    def __init__(
        self,
        projection: str,
        view_schema: str,
        store: Store,
        handlers: Sequence[LoadedHandler],
        rules: MergeRules,
        clock: Callable[[], float],
        tombstone_retention: float | None = None,
        correlation: CorrelationStep | None = None,
    ):
        self.correlation = correlation
        # The last batch's correlation outcome (reset per try), for metrics after the commit,
        # and which of its partitions had reached their end when it was read.
        self.correlated: CorrelationOutcome | None = None
        self._caught_up: Collection[TopicPartition] = ()
        self.clock = clock
        self.tombstone_retention = tombstone_retention
        self.projection = projection
        self.view_schema = view_schema
        self.store = store
        self.handlers = [h.handle for h in handlers]
        self.handler_names = [h.name for h in handlers]
        self.rules = rules

    def apply(
        self,
        messages: Sequence[RawMessage],
        decoders: Mapping[str, Decoder],
        epochs: Mapping[TopicPartition, int],
        positions: Mapping[TopicPartition, int] | None = None,
        caught_up: Collection[TopicPartition] = (),
        decoded: Decoded | None = None,
    ) -> BatchResult:
        """Apply one consumed batch in one transaction; raises ``Fenced`` like the sequence
        applier when this instance no longer owns one of the batch's partitions.
        ``caught_up``: the batch's partitions whose end it reached (for the correlation's
        idle watermark); ``decoded``: the messages decoded already."""
        self._caught_up = frozenset(caught_up)
        self.correlated = None
        return apply_consumed(self, messages, decoders, epochs, positions, decoded)

    def idle_tick(
        self, epochs: Mapping[TopicPartition, int], caught_up: Collection[TopicPartition]
    ) -> tuple[CorrelationOutcome, BatchResult] | None:
        """With no message to apply: the correlation step with no events, in a transaction
        fenced on the owned partitions' epochs (``epochs``; their checkpoints do not move),
        so the caught-up ones advance the watermark by the clock and what is due closes.
        Raises ``Fenced`` like ``apply``."""
        corr = self.correlation
        owned = {tp: e for tp, e in epochs.items() if tp[0] in (corr.topics if corr else ())}
        if corr is None or not owned:
            return None
        result = BatchResult()
        with self.store.batch(self.projection, self.view_schema) as tx:
            tx.hold(owned)
            outcome = corr.run(tx, [], result, owned.keys(), caught_up)
        return outcome, result

    def apply_events(
        self,
        tx: StoreBatch,
        events: Sequence[Event],
        result: BatchResult,
        overrides: Mapping[str, Callable[[StreamPosition], StreamPosition]] | None = None,
    ) -> None:
        """Merge ``events`` into their documents and run the handlers on what changed; with a
        correlation, then the correlation step. (``overrides`` exist for the sequence
        applier's dead-letter retry; merge mode has no positions to override.)"""
        corr = self.correlation
        if corr is None:
            self._merge_and_handle(tx, events, result)
            return
        split = _Split.of(events, corr)
        result.ignored += len(split.parts) - len(split.rows)
        self._merge_and_handle(tx, split.rows, result)
        if split.parts or result.checkpoints:
            self.correlated = corr.run(
                tx, split.parts, result, result.checkpoints.keys(), self._caught_up
            )
        self._retry_business(tx, corr, split.business, split.rule_letters, result)

    def _merge_and_handle(
        self, tx: StoreBatch, events: Sequence[Event], result: BatchResult
    ) -> None:
        timed = [e for e in events if e.ts is not None]
        untimed = [
            DeadLetter(
                "no_timestamp", "merge mode needs a timestamp: the decoder found none", event=e
            )
            for e in events
            if e.ts is None
        ]
        by_stream = group_by_stream(timed)
        stored = tx.lock_documents(by_stream)
        changes, states, malformed = self._merge(by_stream, stored, result)
        failed = self._run_handlers(tx, changes)
        letters = (
            untimed
            + malformed
            + [
                DeadLetter("handler", reason, event=e)
                for change, reason in failed
                for e in change.events
            ]
        )
        failed_streams = {c.stream for c, _ in failed}
        kept = {s: state for s, state in states.items() if s not in failed_streams}
        tx.write_documents(kept, self.clock())
        tx.dead_letter(letters)
        result.dead_letters += letters
        result.applied += sum(len(c.events) for c in changes) - sum(
            len(c.events) for c, _ in failed
        )

    def _retry_business(
        self,
        tx: StoreBatch,
        corr: CorrelationStep,
        business: Sequence[Event],
        rule_letters: Sequence[Event],
        result: BatchResult,
    ) -> None:
        """Dead letters being retried (``projector dead-letters retry``): a business event
        goes to ``handle_business`` again; a failed rule's parts are named again by the rule
        (the same ids as the first time) and go there too."""
        named: list[Event] = list(business)
        for parts in rule_letters:
            events, error = corr.rename(parts)
            if error is not None:
                letter = DeadLetter("correlation_rule", error, event=parts)
                tx.dead_letter([letter])
                result.dead_letters.append(letter)
            named += events
        if named:
            applied, letters = corr.apply_business(tx, named)
            tx.dead_letter(letters)
            result.dead_letters += letters
            result.applied += applied

    def sweep(self) -> tuple[int, int]:
        """Forget the tombstones of documents unchanged for ``tombstone_retention``; a deleted
        document's state goes entirely. Returns (documents swept, documents removed)."""
        if self.tombstone_retention is None:
            return 0, 0
        now = self.clock()
        unchanged_since = now - self.tombstone_retention
        return self.store.sweep_documents(self.projection, unchanged_since, now, _purged)

    def _merge(
        self,
        by_stream: Mapping[str, list[Event]],
        stored: Mapping[str, dict[str, Any] | None],
        result: BatchResult,
    ) -> tuple[list[DocumentChange], dict[str, dict[str, Any]], list[DeadLetter]]:
        """Each document's events merged into its stored state: the changed documents, their
        new states, and the events no merge takes (dead letters; the others merge without
        them, order not mattering)."""
        changes: list[DocumentChange] = []
        states: dict[str, dict[str, Any]] = {}
        malformed: list[DeadLetter] = []
        for stream, arrived in by_stream.items():
            raw = stored.get(stream)
            state = None if raw is None else DocState.from_json(raw)
            evs = arrived
            try:
                merged = merge_events(state, evs, self.rules)
            except (ValueError, RecursionError):
                evs, refused = _mergeable(state, arrived, self.rules)
                malformed += refused
                if not evs:
                    continue
                merged = merge_events(state, evs, self.rules)
            if not merged.changed:
                result.duplicates += len(evs)  # stale or repeated: nothing new for the view
                continue
            changes.append(DocumentChange(stream, merged.document, tuple(evs)))
            states[stream] = merged.state.to_json()
        return changes, states, malformed

    def _run_handlers(
        self, tx: StoreBatch, changes: list[DocumentChange]
    ) -> list[tuple[DocumentChange, str]]:
        """Run the handlers on every change; a change the handlers fail on is set aside (its
        events become dead letters) and the rest run again. Returns what failed, and why."""
        failed: list[tuple[DocumentChange, str]] = []
        pending = list(changes)
        while pending:
            try:
                tx.run_handlers(self.handlers, pending)
                return failed
            except Exception as exc:
                if is_transient(exc):
                    raise
                culprit, reason = self._find_culprit(tx, pending, exc)
                log.warning("dead letter: document %s: %s", culprit.stream, reason)
                failed.append((culprit, reason))
                pending = [c for c in pending if c is not culprit]
        return failed

    def _find_culprit(
        self, tx: StoreBatch, changes: list[DocumentChange], batch_error: Exception
    ) -> tuple[DocumentChange, str]:
        found = first_failure(tx, self.handlers, self.handler_names, changes)
        if found is None:
            raise TransientStoreError(
                f"handler failed on the batch but on no single document: {batch_error}"
            )
        return found


@dataclass(frozen=True)
class _Split:
    """A correlated batch's events by where they go: ``parts``, the correlation's input (the
    decoded events, duplicates included); ``rows``, those merged into documents (not
    Debezium's BEGIN/END records, which describe no row); and dead letters being retried:
    ``business`` events and a failed rule's ``rule_letters``, which go to
    ``handle_business`` only."""

    parts: list[Event]
    rows: list[Event]
    business: list[Event]
    rule_letters: list[Event]

    @classmethod
    def of(cls, events: Sequence[Event], corr: CorrelationStep) -> _Split:
        retried = [e for e in events if corr.is_business(e)]
        parts = [e for e in events if not corr.is_business(e)]
        return cls(
            parts,
            [e for e in parts if not corr.is_transaction_record(e)],
            [e for e in retried if e.type != PARTS_TYPE],
            [e for e in retried if e.type == PARTS_TYPE],
        )


def _purged(raw: dict[str, Any] | None) -> dict[str, Any] | None:
    """A document's state without its tombstones, or ``None`` when nothing is left. Every
    tombstone of a document unchanged for the retention is that old, whatever its ts units
    (epoch ms or a log position), so all of them go."""
    if raw is None:
        return None
    purged = purge_tombstones(DocState.from_json(raw), older_than=2**63)
    return None if purged == DocState() else purged.to_json()


def _mergeable(
    state: DocState | None, events: list[Event], rules: MergeRules
) -> tuple[list[Event], list[DeadLetter]]:
    """The events that merge into ``state`` one by one, and a dead letter for each that does
    not: a malformed list of removed fields, or data nested deeper than the merge can walk.
    Such an event would fail every batch that holds it, and with it the daemon."""
    good: list[Event] = []
    refused: list[DeadLetter] = []
    for event in events:
        try:
            merge_events(state, [event], rules)
        except ValueError as exc:
            refused.append(DeadLetter("merge", f"the merge refused the event: {exc}", event=event))
        except RecursionError:
            reason = "the event's data nests deeper than the merge can walk"
            refused.append(DeadLetter("merge", reason, event=event))
        else:
            good.append(event)
    for letter in refused:
        log.warning("dead letter: document %s: %s", letter.stream, letter.reason)
    return good, refused
