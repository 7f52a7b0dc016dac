"""The store interface: what the runner and the operations ask of a store, whatever it is.

Two stores implement it: :mod:`projector.store.postgres` (one SQL transaction per batch) and
:mod:`projector.store.redis` (one Lua script per batch, after optimistic reads under WATCH).
The runner decides (sequence, merge, gaps); a store only executes, in one atomic unit per batch:
fence, positions, holding, gaps, dead letters, documents, the handlers' view writes and the
checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from projector.core.correlate import InputTime, Pending
from projector.core.dead_letter import DeadLetter
from projector.core.event import Event
from projector.core.gaps import Gap
from projector.core.message import RawMessage
from projector.core.sequencer import SequenceRules, StreamPosition
from projector.store.errors import StoreError

TopicPartition = tuple[str, int]
# A rebuild keeps its own state under "<name>#rebuild" (fence, checkpoints, positions...).
REBUILD = "#rebuild"
Handler = Callable[[Sequence[Any], Any], None]


@dataclass(frozen=True, slots=True)
class Claim:
    epoch: int
    next_offset: int | None


@dataclass(frozen=True, slots=True)
class DeadLetterRow:
    id: int
    projection: str
    kind: str
    reason: str
    stream: str | None
    seq: int | None
    event: Event | None
    message: RawMessage | None
    status: str
    attempts: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ProjectionFigures:
    """What a dashboard shows of a projection, from the store."""

    projection: str
    parked: int
    open_gaps: int
    oldest_gap_age: float
    dead_letters: int


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """A business event to publish, as the batch queues it: its topic and Kafka key."""

    event: Event
    topic: str
    key: str


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """A queued business event, as the publisher reads it (``event``: ``Event.to_json()``)."""

    seq: int
    event_id: str
    topic: str
    key: str
    event: dict[str, Any]


@dataclass(frozen=True)
class StreamReport:
    """One stream's story, for an operator chasing a hole."""

    stream: str
    position: StreamPosition | None
    parked: list[tuple[int, Event]]
    gaps: list[Gap]
    dead_letters: list[DeadLetterRow]


@dataclass(frozen=True)
class LivePartition:
    """A live projection's checkpoint, as a rebuild sees it."""

    next_offset: int | None
    start_offset: int | None


class RebuildRunning(StoreError):
    """Another rebuild of the same projection holds its lock."""


class NotCaughtUp(Exception):
    """At the swap the rebuild was still behind the live projection; go on reading."""


# Per stream: the seqs in the holding table (a set, or SeqRanges), and the ranges skipped (by
# the skip policy).
HeldSeqs = tuple[Mapping[str, Collection[int]], dict[str, list[tuple[int, int]]]]


class StoreBatch(Protocol):
    """One batch of one projection, applied atomically when its context exits normally.
    Methods are called in the order the runner's appliers document: fence → lock → load →
    handlers → write."""

    projection: str
    # The handlers' writes are sent without waiting and with no savepoint (a pipelined
    # PostgreSQL batch): a handler error cannot be traced to its event in this batch.
    pipelined: bool

    def fence(
        self,
        checkpoints: Mapping[TopicPartition, int],
        epochs: Mapping[TopicPartition, int],
        starts: Mapping[TopicPartition, int] | None = None,
    ) -> None:
        """Compare-and-set every checkpoint on its epoch; raises ``Fenced`` (now, or at the
        latest when the batch commits) naming the partitions this instance no longer owns.
        ``starts`` (the batch's first offsets) record where a partition's history starts, on
        its first batch ever."""

    def hold(self, epochs: Mapping[TopicPartition, int]) -> None:
        """Fence without moving any checkpoint (an idle tick): the partitions' rows are held
        on their epochs; raises ``Fenced`` naming those this instance no longer owns."""

    def read_ahead(self, streams: Iterable[str]) -> dict[str, StreamPosition]:
        """Start reading what :meth:`lock_positions` of these streams will return, and give
        the positions known without a read of those with nothing parked and no gap record
        (none, on a store that has no such), to plan on while the reads are answered."""

    def lock_positions(
        self, streams: Iterable[str], rules: SequenceRules
    ) -> dict[str, StreamPosition]:
        """The streams' positions, held so that no other batch changes them before this one
        commits (a lock, or a watch that makes the commit fail and the batch run again)."""

    def held_seqs(self, streams: Iterable[str]) -> HeldSeqs:
        """The parked seqs (not the events) and the ranges skipped, of streams already locked:
        a batch reads a parked event only when it may drain or meet it, so its cost does not
        grow with a backlog it does not touch."""

    def load_parked(self, wanted: Mapping[str, Iterable[int]]) -> dict[str, dict[int, Event]]:
        """The parked events of these streams and seqs (locked already)."""

    def load_gaps(self, streams: Iterable[str]) -> dict[str, list[Gap]]:
        """The open or held gaps of streams already locked."""

    def mark_skipped(self, gap: Gap) -> None: ...

    def rolled_back(self) -> AbstractContextManager[None]:
        """A scope whose view writes are always discarded, for trying handlers out."""

    def run_handlers(self, handlers: Sequence[Handler], items: Sequence[Any]) -> None:
        """Run the handlers on ``items``; on an error their writes are discarded and the error
        propagates."""

    def write_positions(self, positions: Iterable[StreamPosition]) -> None: ...

    def park(self, events: Iterable[Event]) -> None: ...

    def unpark(self, keys: Iterable[tuple[str, int]]) -> None: ...

    def replace_gaps(self, streams: Iterable[str], gaps: Iterable[Gap]) -> None:
        """The open/held gaps of ``streams`` become ``gaps`` (skipped ranges stay). A gap that
        stays (the same first seq) keeps the replay schedule it has in the store, and one
        carved out of an older gap takes that one's, as they stand when written: the gap
        timer moves schedules without the streams' locks, and one written back as this batch
        read it would have the gap asked for again at once."""

    def dead_letter(self, letters: Iterable[DeadLetter]) -> None: ...

    def lock_documents(self, streams: Iterable[str]) -> dict[str, dict[str, Any] | None]:
        """Merge mode: the documents' stored merge states, held like positions."""

    def write_documents(self, states: Mapping[str, dict[str, Any]], now: float) -> None: ...

    def lock_correlations(self, keys: Iterable[str], watermark: int | None) -> dict[str, Pending]:
        """Correlation: the records of ``keys`` and of every key whose stored ``due`` is at or
        below ``watermark``, held like positions (created first, locked in key order, after the
        documents). A key with no record yet is absent from the result."""

    def write_correlations(
        self, write: Iterable[tuple[Pending, int | None]], delete: Iterable[str]
    ) -> None:
        """Store the written records with their ``due`` (event time, ms; ``None``: never),
        delete ``delete``'s, and the rows created by ``lock_correlations`` but never written."""

    def input_times(self, topics: Iterable[str]) -> dict[TopicPartition, InputTime]:
        """Every stored partition's event-time progress of these topics (all owners')."""

    def write_input_times(self, times: Mapping[TopicPartition, InputTime]) -> None:
        """Store this batch's partitions' event-time progress (beside their fence)."""

    def write_outbox(
        self, messages: Sequence[OutboxMessage], prune_held_before: int | None = None
    ) -> int:
        """Queue business events to publish, in order, under this batch's projection; a
        rebuild's batch (its projection ends with ``REBUILD``) holds them aside for the swap
        instead, never published. An event already there (same projection and id, in any
        status) keeps its row. In a rebuild's batch, with ``prune_held_before`` (event time,
        ms), the held events older than that are forgotten first. Returns how many rows were
        added."""

    def lock_dead_letter(self, letter_id: int) -> DeadLetterRow | None: ...

    def resolve_dead_letter(
        self, letter_id: int, status: str, reason: str | None = None
    ) -> None: ...


class Store(Protocol):
    """A store connection of one worker or command."""

    @property
    def commits_in_flight(self) -> bool:
        """Whether a pipelined batch may leave its commit in flight (see ``batch``)."""

    @property
    def plans_ahead(self) -> bool:
        """Whether a pipelined batch's block ends with its commit prepared, not sent: the
        next batch can then be planned while the previous one's commit is in flight (Redis
        plans on what it read before; PostgreSQL builds it behind that commit, on the same
        connection), and sent once that one has landed."""

    @property
    def traces_in_pipeline(self) -> bool:
        """Whether a pipelined batch finds a failing handler's event itself (Redis). If not
        (PostgreSQL: no savepoint in a pipeline), a pipelined batch that fails is run again
        step by step."""

    def close(self) -> None: ...

    def claim(
        self, projection: str, partitions: Iterable[TopicPartition], owner: str
    ) -> dict[TopicPartition, Claim]:
        """Take a new epoch per partition (fencing out the previous owner); with the stored
        checkpoint to seek to."""

    def batch(
        self, projection: str, view_schema: str, pipelined: bool = False
    ) -> AbstractContextManager[StoreBatch]:
        """A batch, applied when the block exits normally. ``pipelined``: a store may leave the
        commit only prepared at the exit (``plans_ahead``); :meth:`send_commit` sends it,
        :meth:`wait_commit` waits for it. A batch begun behind one in flight that fails
        before its block ends may raise :class:`~projector.store.errors.NotPrepared`."""

    def send_commit(self) -> bool:
        """Send the commit the last pipelined batch prepared (``plans_ahead``), leaving it in
        flight; nothing to send (a batch applied step by step): returns at once. False: what
        the batch was planned on has changed since (the batch before it failed where it
        landed, say), so it was not sent: plan it again."""

    def wait_commit(self) -> None:
        """Wait for a batch's commit left in flight, raising what it failed with (nothing to
        wait for: returns at once)."""

    def checkpoints(self, projection: str) -> dict[TopicPartition, int | None]: ...

    def claim_due_gaps(
        self,
        projection: str,
        now: float,
        limit: int,
        decide: Callable[[Gap], tuple[str, Gap]],
    ) -> list[tuple[str, Gap]]:
        """Take the gaps due by ``now``, decide each and store their new schedule, so that
        several instances send one request per gap per attempt."""

    def list_gaps(self, projection: str, stream: str | None = None) -> list[Gap]:
        """Every gap (skipped ones too), oldest first."""

    def request_gaps_now(self, projection: str, stream: str | None, now: float) -> int: ...

    def count_parked(self, projection: str) -> int: ...

    def count_open_gaps(self, projection: str) -> int: ...

    def gap_summary(self, projection: str) -> tuple[int, int, float | None]:
        """Open or held gaps, how many held, and when the oldest was first seen."""

    def count_open_dead_letters(self, projection: str) -> int: ...

    def correlation_figures(self, projection: str, topics: Sequence[str]) -> tuple[int, int | None]:
        """Open correlations (records with open parts), and the lowest stored event-time high
        of ``topics``' partitions (``None``: one has none yet), for metrics."""

    def correlation_record(self, projection: str, key: str) -> tuple[Pending, int | None] | None:
        """One correlation key's stored record and its ``due`` (event time, ms), for
        ``projector inspect``; ``None`` when the key has none."""

    def outbox_figures(self, projection: str) -> tuple[int, float | None] | None:
        """Business events waiting in the projection's outbox and the oldest one's age in
        seconds (the store's clock), for ``projector status``; ``None``: no outbox here."""

    def projection_figures(
        self, projections: Sequence[str], now: float
    ) -> list[ProjectionFigures]: ...

    def list_dead_letters(
        self, projection: str, status: str | None, limit: int
    ) -> list[DeadLetterRow]: ...

    def purge_dead_letters(self, projection: str, include_open: bool) -> int: ...

    def inspect_stream(self, projection: str, stream: str) -> StreamReport: ...

    def sweep_documents(
        self,
        projection: str,
        unchanged_since: float,
        now: float,
        purge: Callable[[dict[str, Any]], dict[str, Any] | None],
        limit: int = 500,
    ) -> tuple[int, int]:
        """Forget the tombstones of documents unchanged since ``unchanged_since``; returns
        (swept, removed)."""


class OutboxStore(Protocol):
    """A projection's outbox, as its publisher sees it, on a connection of its own (never
    inside a batch transaction)."""

    def try_lock(self) -> bool:
        """Become the projection's one publisher, until ``unlock`` or, if this publisher
        dies, until the store frees it (PostgreSQL: its session ends; Redis: its lease
        expires); False while another holds it."""

    def unlock(self) -> None: ...

    def pending(self, limit: int) -> list[OutboxRow]:
        """The oldest ``limit`` rows still to publish, in queue order."""

    def mark_published(self, seqs: Sequence[int], now: float) -> int:
        """The delivered rows: published at ``now`` (epoch seconds), one more attempt."""

    def sweep(self, published_before: float, limit: int = 5000) -> int:
        """Delete rows published before ``published_before`` (epoch seconds); how many."""

    def figures(self) -> tuple[int, float | None]:
        """Rows pending, and the oldest pending row's age in seconds (``None``: none)."""

    def close(self) -> None: ...
