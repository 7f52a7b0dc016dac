"""One batch, one store transaction: decode → fence → lock → sequence → handlers → write.

The steps, in order, all inside the transaction:
1. decode every message; undecodable ones become dead letters, tombstones are ignored;
2. fence: compare-and-set each partition's checkpoint on this instance's epoch (the new offset
   is written here, and the row lock is held to commit);
3. lock the batch's stream positions (created first, locked in sorted order) and read their
   parked events;
4. sequence each stream (pure), run the handlers on what is to be applied, in a savepoint; a
   handler error that is not transient is traced to its event, which becomes a dead letter that
   halts only its own stream, and the batch is planned again without it;
5. write positions, holding inserts and deletes, gap records and dead letters.
Kafka offsets are committed by the caller only after this commits.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from projector.apply import LoadedHandler
from projector.core.dead_letter import DeadLetter
from projector.core.decode import DecodeError, Decoder
from projector.core.event import Event
from projector.core.gaps import Gap, reconcile_gaps
from projector.core.message import PartitionSpan, RawMessage, partition_spans
from projector.core.sequencer import (
    Rejection,
    SequenceRules,
    StreamPlan,
    StreamPosition,
    group_by_stream,
    parked_needed,
    sequence_stream,
)
from projector.faults import crash_point
from projector.store.base import Handler, Store, StoreBatch, TopicPartition
from projector.store.errors import Fenced, NotPrepared, TransientStoreError, is_transient

log = logging.getLogger(__name__)

Clock = Callable[[], float]


@dataclass
class BatchResult:
    """What one batch did; the runner turns it into metrics after the commit."""

    consumed: int = 0
    ignored: int = 0
    applied: int = 0
    duplicates: int = 0
    parked: int = 0
    unparked: int = 0
    gaps_opened: int = 0
    gaps_closed: int = 0
    gaps_skipped: int = 0
    gaps_due: float | None = None  # when the gaps this batch opened fall due (first request)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    checkpoints: dict[TopicPartition, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Decoded:
    """A batch's messages decoded, and what it read of each partition."""

    events: list[Event]
    dead_letters: list[DeadLetter]
    ignored: int
    spans: dict[TopicPartition, PartitionSpan]


def decode_all(messages: Sequence[RawMessage], decoders: Mapping[str, Decoder]) -> Decoded:
    events: list[Event] = []
    letters: list[DeadLetter] = []
    ignored = 0
    for msg in messages:
        try:
            event = decoders[msg.topic].decode(msg)
        except DecodeError as exc:
            letters.append(DeadLetter("decode", exc.reason, message=msg))
            continue
        if event is None:
            ignored += 1
        # Only a JSON escape (\\u...) can put what no store holds into a string.
        elif msg.value is not None and b"\\u" in msg.value and (why := _unstorable(event)):
            letters.append(DeadLetter("decode", why, message=msg))
        else:
            events.append(event)
    return Decoded(events, letters, ignored, partition_spans(messages))


def _unstorable(event: Event) -> str | None:
    """Why the event's strings cannot be stored, if they cannot: a lone UTF-16 surrogate is
    not Unicode (neither PostgreSQL's jsonb nor Redis's scripts take it), and PostgreSQL's
    jsonb and text refuse the NUL character. Such an event stays out of every store alike."""
    value = event.to_json()
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return "the event holds a lone UTF-16 surrogate (an escape such as \\ud800), not Unicode"
    if _holds_nul(value):
        return "the event holds a NUL character (\\u0000), which PostgreSQL's text and jsonb refuse"
    return None


def _holds_nul(value: object) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_nul(v) for v in value)
    return False


@dataclass(frozen=True)
class Loaded:
    """The stored state of a batch's streams, read under their position locks. ``positions``
    are what to plan from (a retried or skipped dead letter changes them); ``stored`` what is
    in the store, which a plan's positions are compared with to know what to write."""

    positions: dict[str, StreamPosition]
    parked_seqs: Mapping[str, Collection[int]]
    parked: dict[str, dict[int, Event]]  # the parked events the batch may meet
    skipped: dict[str, list[tuple[int, int]]]
    stored: dict[str, StreamPosition]
    # The stored gaps of the streams whose gaps the batch rewrites, read once they are known
    # (after planning) and before the handlers run: a pipelined batch then reads nothing
    # after its first write.
    gaps: dict[str, list[Gap]] = field(default_factory=dict)


Item = TypeVar("Item")


def first_failure(
    tx: StoreBatch,
    handlers: Sequence[Handler],
    names: Sequence[str],
    items: Sequence[Item],
) -> tuple[Item, str] | None:
    """After the handlers failed on a whole batch: find the shortest prefix of ``items``
    (events, or merge documents) they fail on, by bisection, each try in a scope that is
    always rolled back. Its last item is the culprit. Prefixes, not single items, because a
    handler may need the batch's earlier items (a Redis handler's reads never see the batch's
    own writes, so item by item it would fail where the whole batch is fine). ``None`` when
    the whole batch passes on a second try: the failure was not deterministic. Transient
    errors propagate: they say nothing about the items."""

    def failure(count: int) -> str | None:
        with tx.rolled_back():
            try:
                tx.run_handlers(handlers, items[:count])
            except Exception as exc:
                if is_transient(exc):
                    raise
                return f"handler {', '.join(names)} raised {type(exc).__name__}: {exc}"
        return None

    reason = failure(len(items))
    if reason is None:
        return None
    passes, fails = 0, len(items)  # items[:passes] pass, items[:fails] fail with ``reason``
    while fails - passes > 1:
        middle = (passes + fails) // 2
        found = failure(middle)
        if found is None:
            passes = middle
        else:
            fails, reason = middle, found
    return items[fails - 1], reason


class EventsApplier(Protocol):
    """What a mode's applier does inside the batch transaction (sequence or merge)."""

    projection: str
    view_schema: str
    store: Store

    def apply_events(
        self,
        tx: StoreBatch,
        events: Sequence[Event],
        result: BatchResult,
        overrides: Mapping[str, Callable[[StreamPosition], StreamPosition]] | None = None,
    ) -> None: ...


def apply_consumed(
    applier: EventsApplier,
    messages: Sequence[RawMessage],
    decoders: Mapping[str, Decoder],
    epochs: Mapping[TopicPartition, int],
    positions: Mapping[TopicPartition, int] | None,
    decoded: Decoded | None = None,
    pipelined: bool = False,
) -> BatchResult:
    """Steps 1 and 2 (decode, fence with the new checkpoints) around the mode's own steps, in
    one transaction. ``positions`` are the consumer's positions right after the batch: past a
    transaction's commit marker where one follows, so the checkpoint reaches the end.
    ``decoded``: the messages decoded already (by the caller, while the previous batch's
    commit was in flight). ``pipelined``: the store may leave the commit in flight
    (``Store.wait_commit``) or prepared (``Store.send_commit``). On PostgreSQL, a batch that
    fails so for any reason but a transient one or a fence is run again at once without
    pipelining, where a handler error is traced to its event; one built behind a commit in
    flight raises ``NotPrepared`` instead, for the caller to land that one first. Redis
    traces handler errors in the pipelined batch itself: its batch runs once."""
    if decoded is None:
        decoded = decode_all(messages, decoders)
    if pipelined and not applier.store.traces_in_pipeline:
        try:
            return _apply_decoded(applier, messages, decoded, epochs, positions, True)
        except Exception as exc:
            if is_transient(exc) or isinstance(exc, Fenced | NotPrepared):
                raise
            log.info("batch failed pipelined (%s); running it again step by step", exc)
        pipelined = False
    return _apply_decoded(applier, messages, decoded, epochs, positions, pipelined)


def _apply_decoded(
    applier: EventsApplier,
    messages: Sequence[RawMessage],
    decoded: Decoded,
    epochs: Mapping[TopicPartition, int],
    positions: Mapping[TopicPartition, int] | None,
    pipelined: bool,
) -> BatchResult:
    result = BatchResult(consumed=len(messages), ignored=decoded.ignored)
    starts = {tp: span.first for tp, span in decoded.spans.items()}
    result.checkpoints = {tp: span.next for tp, span in decoded.spans.items()}
    for tp, position in (positions or {}).items():
        if tp in result.checkpoints:
            result.checkpoints[tp] = max(result.checkpoints[tp], position)
    with applier.store.batch(applier.projection, applier.view_schema, pipelined) as tx:
        tx.fence(result.checkpoints, epochs, starts)
        applier.apply_events(tx, decoded.events, result)
        result.dead_letters[:0] = decoded.dead_letters
        tx.dead_letter(decoded.dead_letters)
        crash_point("before-commit")
    return result


def _gaps_touched(plans: Mapping[str, StreamPlan], state: Loaded) -> list[str]:
    """The streams whose gap records a batch rewrites: only streams that had or now have
    parked events can have gaps before or after."""
    return [s for s, p in plans.items() if p.park or p.gaps or state.parked_seqs.get(s)]


class BatchApplier:
    """Applies batches of one sequence-mode projection to its store."""

    def __init__(
        self,
        projection: str,
        view_schema: str,
        store: Store,
        handlers: Sequence[LoadedHandler],
        rules: SequenceRules,
        gap_timeout: float,
        clock: Clock,
    ):
        self.projection = projection
        self.view_schema = view_schema
        self.store = store
        self.handlers = [h.handle for h in handlers]
        self.handler_names = [h.name for h in handlers]
        self.rules = rules
        self.gap_timeout = gap_timeout
        self.clock = clock

    def apply(
        self,
        messages: Sequence[RawMessage],
        decoders: Mapping[str, Decoder],
        epochs: Mapping[TopicPartition, int],
        positions: Mapping[TopicPartition, int] | None = None,
        decoded: Decoded | None = None,
        pipelined: bool = False,
    ) -> BatchResult:
        """Apply one consumed batch in one transaction (see the module docstring for the steps;
        :func:`apply_consumed` for ``decoded`` and ``pipelined``). Raises ``Fenced`` if this
        instance no longer owns one of the batch's partitions."""
        return apply_consumed(self, messages, decoders, epochs, positions, decoded, pipelined)

    def apply_events(
        self,
        tx: StoreBatch,
        events: Sequence[Event],
        result: BatchResult,
        overrides: Mapping[str, Callable[[StreamPosition], StreamPosition]] | None = None,
    ) -> None:
        """Steps 3 to 5 for ``events``. ``overrides`` change a stream's stored position before
        planning (a dead letter retried or skipped); their streams are planned even with no
        incoming event, so what was parked behind them drains."""
        overrides = overrides or {}
        incoming = group_by_stream(events)
        for stream in overrides:
            incoming.setdefault(stream, [])
        # The streams whose positions are known without a read (clean: nothing parked, no
        # gaps) are planned while the store reads the others: behind a commit in flight,
        # that read waits for the commit.
        known = {} if overrides else tx.read_ahead(incoming)
        early = {
            s: sequence_stream(p, {}, incoming[s], self.rules, (), ()) for s, p in known.items()
        }
        stored = tx.lock_positions(incoming, self.rules)
        positions = {s: overrides[s](p) if s in overrides else p for s, p in stored.items()}
        seqs, skipped = tx.held_seqs(incoming)
        wanted = {
            s: parked_needed(
                positions[s],
                held,
                (e.seq for e in incoming[s] if e.seq is not None),
                skipped.get(s, ()),
            )
            for s, held in seqs.items()
        }
        parked = tx.load_parked({s: w for s, w in wanted.items() if w})
        state = Loaded(positions, seqs, parked, skipped, stored)
        plans, touched, culprits = self._plan_and_run(tx, incoming, state, early)
        self._write(tx, plans, touched, state, culprits, result)

    def skip_gap(self, tx: StoreBatch, gap: Gap, result: BatchResult) -> list[tuple[int, int]]:
        """Give up on a gap (policy skip, or by hand): record what is still missing of it as
        skipped, then let its stream step over it and drain what was parked behind it, in this
        transaction. The gap is read again under the stream's lock, since events may have
        filled, shrunk or split it since it was listed; returns the ranges skipped."""
        tx.lock_positions([gap.stream], self.rules)
        current = [
            g
            for g in tx.load_gaps([gap.stream]).get(gap.stream, [])
            if g.from_seq <= gap.to_seq and gap.from_seq <= g.to_seq
        ]
        for g in current:
            tx.mark_skipped(g)
        if current:
            self.apply_events(tx, [], result, {gap.stream: lambda pos: pos})
        result.gaps_skipped += len(current)
        return [(g.from_seq, g.to_seq) for g in current]

    def _plan_and_run(
        self,
        tx: StoreBatch,
        incoming: Mapping[str, list[Event]],
        state: Loaded,
        early: Mapping[str, StreamPlan],
    ) -> tuple[dict[str, StreamPlan], list[str], dict[str, DeadLetter]]:
        """The streams' plans (``early``: some made already), with the handlers run on what
        they apply; the streams whose gaps the plans rewrite; the dead letters of handler
        errors."""
        culprits: dict[str, DeadLetter] = {}
        while True:
            plans = {}
            for stream, arrived in incoming.items():
                pos, evs = state.positions[stream], arrived
                letter = culprits.get(stream)
                if letter is None and stream in early:
                    plans[stream] = early[stream]
                    continue
                if letter is not None and letter.event is not None:
                    pos = pos._replace(blocked_seq=letter.event.seq)
                    evs = [e for e in arrived if e is not letter.event]
                plans[stream] = sequence_stream(
                    pos,
                    state.parked.get(stream, {}),
                    evs,
                    self.rules,
                    state.skipped.get(stream, ()),
                    state.parked_seqs.get(stream, ()),
                )
            to_apply = [e for plan in plans.values() for e in plan.apply]
            touched = _gaps_touched(plans, state)
            unread = [s for s in touched if s not in state.gaps]
            if unread:
                found = tx.load_gaps(unread)
                state.gaps.update({s: found.get(s, []) for s in unread})
            try:
                tx.run_handlers(self.handlers, to_apply)
                return plans, touched, culprits
            except Exception as exc:
                if is_transient(exc) or tx.pipelined:
                    raise  # pipelined: no savepoint to find the culprit in; run step by step
                letter = self._find_culprit(tx, to_apply, exc)
                culprits[letter.stream or ""] = letter

    def _find_culprit(
        self, tx: StoreBatch, events: Sequence[Event], batch_error: Exception
    ) -> DeadLetter:
        found = first_failure(tx, self.handlers, self.handler_names, events)
        if found is None:
            # Every event passed on its own: the failure was not deterministic; retry the batch.
            raise TransientStoreError(
                f"handler failed on the batch but on no single event: {batch_error}"
            )
        event, reason = found
        log.warning("dead letter: stream %s seq %s: %s", event.stream, event.seq, reason)
        return DeadLetter("handler", reason, event=event)

    def _write(
        self,
        tx: StoreBatch,
        plans: Mapping[str, StreamPlan],
        touched: Sequence[str],
        state: Loaded,
        culprits: Mapping[str, DeadLetter],
        result: BatchResult,
    ) -> None:
        # One pass over the plans (thousands a batch); most only apply, and move their position.
        before = state.stored
        positions: list[StreamPosition] = []
        unparked: list[tuple[str, int]] = []
        parked: list[Event] = []
        rejected: list[Rejection] = []
        applied = 0
        for s, p in plans.items():
            if p.position != before[s]:
                positions.append(p.position)
            applied += len(p.apply)
            if p.park or p.unpark or p.rejected or p.duplicates:
                parked += p.park
                unparked += [(s, seq) for seq in p.unpark]
                rejected += p.rejected
                result.duplicates += p.duplicates
                result.parked += len(p.park)
                result.unparked += len(p.unpark)
        result.applied += applied
        tx.write_positions(positions)
        tx.unpark(unparked)
        if unparked:
            crash_point("mid-drain")
        tx.park(parked)
        if parked:
            crash_point("after-park")
        self._write_gaps(tx, plans, touched, state.gaps, result)
        letters = [DeadLetter(r.kind, r.reason, event=r.event) for r in rejected]
        letters += culprits.values()
        tx.dead_letter(letters)
        result.dead_letters += letters

    def _write_gaps(
        self,
        tx: StoreBatch,
        plans: Mapping[str, StreamPlan],
        touched: Sequence[str],
        old: Mapping[str, list[Gap]],
        result: BatchResult,
    ) -> None:
        if not touched:
            return
        now = self.clock()
        new: list[Gap] = []
        for stream in touched:
            change = reconcile_gaps(
                stream, old.get(stream, []), plans[stream].gaps, now, now + self.gap_timeout
            )
            new += change.gaps
            result.gaps_opened += change.opened
            if change.opened:
                result.gaps_due = now + self.gap_timeout
            result.gaps_closed += change.closed
        tx.replace_gaps(touched, new)
