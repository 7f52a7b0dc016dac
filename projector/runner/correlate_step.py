"""The correlation step of a merge batch (docs/correlation.md, section 4), in the batch
transaction, after the documents are merged and their handlers ran:

1. inputs: each batch partition's event-time progress (its highest event time, raised by the
   clock when the partition is caught up, ``idle_after`` behind ``now``);
2. watermark: over every stored partition of the correlation's topics (other owners' too);
3. lock and load the records of the batch's keys and of every key due at the watermark;
4. plan with the pure core (:func:`projector.core.correlate.correlate`);
5. hand the business events to the handler modules' ``handle_business``; one they fail on (not
   transiently) becomes a dead letter holding it, the others go on;
6. write the records, the partitions' progress, the outbox rows of the applied business
   events (with ``correlation.outbox``; a rebuild's batch holds them aside instead, section 8),
   and dead letters: ``correlation_rule`` for a rule that raised (holding the window's parts),
   ``handler`` for business events.

The same step with no events is the worker's idle tick: it closes what an idle watermark made
due. Nothing here reads the wall clock but ``clock`` (the daemon's, injectable in tests).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from projector.apply import LoadedHandler
from projector.config import OutboxConfig
from projector.core.correlate import (
    TX_BEGIN,
    TX_END,
    Closed,
    CloseReason,
    CorrelationPlan,
    CorrelationRules,
    InputTime,
    _name,
    business_id,
    correlate,
    correlation_key,
    event_time,
    input_time,
    watermark,
)
from projector.core.dead_letter import DeadLetter
from projector.core.event import Event
from projector.runner.batch import BatchResult, first_failure
from projector.store.base import Handler, OutboxMessage, StoreBatch, TopicPartition
from projector.store.errors import TransientStoreError, is_transient

log = logging.getLogger(__name__)

PARTS_TYPE = "correlation.parts"  # a rule's dead letter: the window's parts, as one event


@dataclass
class CorrelationOutcome:
    """What one batch's (or idle tick's) correlation did; metrics after the commit."""

    closed: dict[str, int] = field(default_factory=dict)  # by reason
    late: int = 0
    duplicates: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # by reason
    missing: int = 0
    business: int = 0  # business events the handlers applied
    watermark: int | None = None


class CorrelationStep:
    """One projection's correlation: its rules, its input topics and the business handlers."""

    def __init__(
        self,
        rules: CorrelationRules,
        topics: Collection[str],
        handlers: Sequence[LoadedHandler],
        clock: Callable[[], float],
        lateness: int = 0,
        idle_after: int | None = None,
        outbox: OutboxConfig | None = None,
    ):
        self.rules = rules
        self.topics = frozenset(topics)
        self.handlers: list[Handler] = [h.business for h in handlers if h.business is not None]
        self.handler_names = [h.name for h in handlers if h.business is not None]
        self.clock = clock
        self.lateness = lateness
        self.idle_after = idle_after
        self.outbox = outbox

    # -- which events --------------------------------------------------------------------
    def takes(self, event: Event) -> bool:
        """Whether an event comes from one of the correlation's topics."""
        return event.source is not None and event.source.topic in self.topics

    def is_business(self, event: Event) -> bool:
        """A business event of this correlation (a dead letter being retried), not a part."""
        return event.source is None and event.meta.get("correlation") == self.rules.name

    @staticmethod
    def is_transaction_record(event: Event) -> bool:
        """A Debezium BEGIN/END record: input to the correlation only, no document."""
        return event.type in (TX_BEGIN, TX_END)

    # -- the step ------------------------------------------------------------------------
    def run(
        self,
        tx: StoreBatch,
        events: Sequence[Event],
        result: BatchResult,
        partitions: Collection[TopicPartition],
        caught_up: Collection[TopicPartition],
    ) -> CorrelationOutcome:
        """Steps 1 to 6 for ``events`` (those of the correlation's topics are taken) read from
        ``partitions`` (of which ``caught_up`` reached their end)."""
        mine = [e for e in events if self.takes(e)]
        stored = tx.input_times(self.topics)
        batch = self._inputs(mine, partitions, caught_up, stored)
        mark = watermark({**stored, **batch}.values(), lateness=self.lateness)
        keys = {k for e in mine if (k := correlation_key(e, self.rules)) is not None}
        records = tx.lock_correlations(keys, mark)
        plan = correlate(records, mine, mark, self.rules)
        letters = [_rule_letter(c, self.rules) for c in plan.closed if c.error is not None]
        applied, failed = self.apply_business(tx, plan.business)
        letters += failed
        tx.write_correlations([(r, r.due(self.rules)) for r in plan.write], plan.delete)
        tx.write_input_times(batch)
        self._prune_held(tx, mark)
        tx.dead_letter(letters)
        result.dead_letters += letters
        for event in plan.late:
            log.warning(
                "correlation %s: late part %s of key %s: its window closed already",
                self.rules.name,
                event.id,
                correlation_key(event, self.rules),
            )
        return _outcome(plan, applied, mark)

    def apply_business(
        self, tx: StoreBatch, events: Sequence[Event]
    ) -> tuple[int, list[DeadLetter]]:
        """Run ``handle_business`` on the business events; one the handlers fail on (not
        transiently) is set aside as a dead letter and the rest run again. Returns how many
        were applied, and the dead letters."""
        failed: list[DeadLetter] = []
        pending = list(events)
        while pending and self.handlers:
            try:
                tx.run_handlers(self.handlers, pending)
                break
            except Exception as exc:
                if is_transient(exc):
                    raise
                found = first_failure(tx, self.handlers, self.handler_names, pending)
                if found is None:
                    raise TransientStoreError(
                        f"handle_business failed on the batch but on no single event: {exc}"
                    ) from exc
                culprit, reason = found
                log.warning("dead letter: business event %s: %s", culprit.id, reason)
                failed.append(DeadLetter("handler", reason, event=culprit))
                pending = [e for e in pending if e is not culprit]
        self._queue(tx, pending)
        return (len(pending) if self.handlers else 0), failed

    def _queue(self, tx: StoreBatch, events: Sequence[Event]) -> None:
        """The applied business events' outbox rows, in the batch transaction (a rebuild's
        batch holds them aside: the live run published them)."""
        box = self.outbox
        if box is None or not events:
            return
        messages = [
            OutboxMessage(e, box.topic, e.stream if box.key == "stream" else e.id) for e in events
        ]
        tx.write_outbox(messages)

    def _prune_held(self, tx: StoreBatch, mark: int | None) -> None:
        """A rebuild's held events further than ``window + closed_retention`` behind the
        watermark are forgotten: no correlation that old is still open live at the swap (the
        store knows a rebuild's batch by its name and does nothing for a live one)."""
        if self.outbox is None or mark is None:
            return
        horizon = mark - self.rules.window - self.rules.closed_retention
        tx.write_outbox([], prune_held_before=horizon)  # a live batch's store ignores it

    def rename(self, letter: Event) -> tuple[tuple[Event, ...], str | None]:
        """A failed rule's dead letter (its window's parts) named again by the rule, after a
        fix: the same business ids as a first success would have had; or the error again."""
        key = str(letter.data["key"])
        parts = {
            name: tuple(Event.from_json(x) for x in evs)
            for name, evs in letter.data["parts"].items()
        }
        first = business_id(self.rules.name, key, (e.id for evs in parts.values() for e in evs))
        reason: CloseReason = "complete" if letter.meta.get("closed") == "complete" else "expired"
        counted = bool(letter.meta.get("counted"))
        # The core's own naming (private there: the runner is its one other user), so a retry
        # gives exactly the events, ids and meta the window would have given.
        return _name(key, first, parts, reason, counted, self.rules)

    def _inputs(
        self,
        events: Sequence[Event],
        partitions: Collection[TopicPartition],
        caught_up: Collection[TopicPartition],
        stored: Mapping[TopicPartition, InputTime],
    ) -> dict[TopicPartition, InputTime]:
        """Each batch partition's progress: the highest event time read from it (stored or in
        this batch), raised to ``now - idle_after`` when it is caught up."""
        highs: dict[TopicPartition, int] = {}
        for e in events:
            t = event_time(e, self.rules)
            if t is not None and e.source is not None:
                tp = (e.source.topic, e.source.partition)
                highs[tp] = max(highs.get(tp, t), t)
        now = round(self.clock() * 1000)
        out: dict[TopicPartition, InputTime] = {}
        for tp in partitions:
            if tp[0] not in self.topics:
                continue
            before = stored.get(tp, InputTime(None)).high
            high = max((h for h in (before, highs.get(tp)) if h is not None), default=None)
            out[tp] = input_time(high, tp in caught_up, idle_after=self.idle_after, now=now)
        return out


def _rule_letter(closed: Closed, rules: CorrelationRules) -> DeadLetter:
    """A failed rule's dead letter: the window's parts as one event, so nothing is lost (the
    rows reached the views through the merge; the business event is what is missing)."""
    parts = {name: [e.to_json() for e in evs] for name, evs in closed.parts.items()}
    times = [t for evs in closed.parts.values() for e in evs if (t := event_time(e, rules))]
    event = Event(
        f"{rules.name}:{closed.key}",
        None,
        max(times, default=None),
        PARTS_TYPE,
        {"key": closed.key, "parts": parts},
        f"{rules.name}:{closed.key}:parts",
        None,
        {
            "correlation": rules.name,
            "key": closed.key,
            "closed": closed.reason,
            "counted": closed.end is not None,
        },
    )
    return DeadLetter("correlation_rule", closed.error or "the rule failed", event=event)


def _outcome(plan: CorrelationPlan, applied: int, mark: int | None) -> CorrelationOutcome:
    out = CorrelationOutcome(late=len(plan.late), duplicates=plan.duplicates, watermark=mark)
    for c in plan.closed:
        out.closed[c.reason] = out.closed.get(c.reason, 0) + 1
        out.missing += sum(c.missing.values())
    for s in plan.skipped:
        out.skipped[s.reason] = out.skipped.get(s.reason, 0) + 1
    out.business = applied
    return out
