"""PostgreSQL store: projector's own state and the projections' views, one transaction per batch.

It executes what the runner decided and nothing else: claim partitions (new epoch), fence a
batch (compare-and-set on the checkpoint's epoch), lock and read stream state, run handlers in a
savepoint against the projection's view schema, and write positions, holding, gaps, dead letters
and checkpoints. Driver errors are translated into :mod:`projector.store.errors` here.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, NamedTuple

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb, set_json_dumps, set_json_loads

from projector.apply import Params
from projector.core import json_codec
from projector.core.correlate import InputTime, Pending
from projector.core.dead_letter import DeadLetter
from projector.core.event import Event
from projector.core.gaps import Gap, parent_gap
from projector.core.message import RawMessage
from projector.core.seq_ranges import SeqRanges
from projector.core.sequencer import SequenceRules, StreamPosition
from projector.store import postgres_outbox
from projector.store.base import (
    REBUILD,
    Claim,
    DeadLetterRow,
    Handler,
    HeldSeqs,
    OutboxMessage,
    ProjectionFigures,
    StreamReport,
    TopicPartition,
)
from projector.store.errors import (
    Fenced,
    NotPrepared,
    StoreUnavailable,
    TransientStoreError,
    WriteConflict,
)

log = logging.getLogger(__name__)


def _ts(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC)


def _epoch(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def _json_list(values: Iterable[Any]) -> str:
    """A list as one JSON parameter (``jsonb_array_elements``): for thousands of values
    psycopg's array dumpers cost ten times more client CPU than orjson."""
    return json_codec.dumps(list(values)).decode()


def _contended(exc: BaseException) -> bool:
    """A batch refused because another transaction wrote what it planned on (a stale cached
    position, or PostgreSQL's own serialization check)."""
    return isinstance(exc, psycopg.errors.SerializationFailure | psycopg.errors.DeadlockDetected)


# What positions_current (migrations/0007_position_versions.sql) says when it refuses a batch.
_POSITIONS_MOVED = "stream positions written by another transaction"


def _refused(cache: PositionCache, exc: BaseException) -> BaseException:
    """After a batch failed in its block: empty its projection's cache (read afresh, and not
    planned on for a while if the batch was refused on stale positions); what to raise."""
    cache.clear(_contended(exc))
    return _as_conflict(exc) if isinstance(exc, Exception) else exc


def _as_conflict(exc: Exception) -> Exception:
    """The refusal of a batch planned on stale cached positions, as the write conflict it is
    (run again at once, no new connection, no warning); any other error as it is."""
    message = getattr(getattr(exc, "diag", None), "message_primary", None) or ""
    if not (
        isinstance(exc, psycopg.errors.SerializationFailure)
        and message.startswith(_POSITIONS_MOVED)
    ):
        return exc
    conflict = WriteConflict(
        "streams the batch planned on from memory were written by another writer since"
        " (another instance, a replay, a command); planning it again on locked positions"
    )
    conflict.__cause__ = exc
    return conflict


# The batch's streams, from a JSON list parameter.
_STREAMS = "(select jsonb_array_elements_text(%s::jsonb))"
# A batch reads its streams' rows of positions, holding and gaps, and deletes its parked
# events, key by key: each key a lateral subquery, which the planner can neither flatten into
# a join nor plan as one. (Gap records are deleted by their keys in one statement: see
# replace_gaps.)
# As a join, the planner hashes every row of the projection (live or dead) whenever its
# statistics are missing or stale (a new database's first minutes, a table grown since its
# last ANALYZE): measured, 3.0 ms against 0.9 ms to lock 105 of 10,000 streams, the same
# shape for the holding table, and a cost that grows with the projection's size, not the
# batch's. Key by key costs about 5 us a key whatever the tables hold.
_STREAM_KEYS = "jsonb_array_elements_text(%s::jsonb) k(x)"
# Parked events by (stream, seq) pairs, key by key as above. They are deleted by ctid, found
# so: nothing updates a holding row, it is only ever inserted and deleted.
_PARKED_KEYS = "jsonb_array_elements(%s::jsonb) k"
_PARKED_ROW = "{s}.holding where projection = %s and stream = k->>0 and seq = (k->>1)::bigint"

_GAP_COLUMNS = (
    "stream, from_seq, to_seq, first_seen, attempts, last_request_at, next_request_at, state"
)


def _gap(r: Sequence[Any]) -> Gap:
    return Gap(r[0], r[1], r[2], r[3].timestamp(), r[4], _epoch(r[5]), _epoch(r[6]), r[7])


_DL_COLUMNS = (
    'id, projection, kind, reason, stream, seq, event, topic, partition, "offset", key, value,'
    " status, attempts, created_at"
)


def _dead_letter_row(r: tuple[Any, ...]) -> DeadLetterRow:
    message = None
    if r[7] is not None:
        message = RawMessage(r[7], r[8], r[9], r[10], r[11])
    event = None if r[6] is None else Event.from_json(r[6])
    return DeadLetterRow(r[0], r[1], r[2], r[3], r[4], r[5], event, message, r[12], r[13], r[14])


class PgView:
    """The handler's view of the batch transaction (see :class:`projector.apply.PgView`).

    Writes share one cursor; each read gets its own. In pipeline mode a cursor's results are
    matched to it as they arrive, and a read on the cursor of an executemany whose results
    were still in flight was found to get the INSERT's status instead of its rows (two
    read-modify-write handlers in one projection, intermittently)."""

    def __init__(self, conn: psycopg.Connection[TupleRow]) -> None:
        self._conn = conn
        self._cur = conn.cursor()

    def execute(self, query: str, params: Params = None) -> None:
        self._cur.execute(query, params)

    def executemany(self, query: str, rows: Iterable[Sequence[Any] | Mapping[str, Any]]) -> None:
        self._cur.executemany(query, rows)

    def fetchall(self, query: str, params: Params = None) -> list[tuple[Any, ...]]:
        with self._conn.cursor() as cur:
            return cur.execute(query, params).fetchall()

    def fetchone(self, query: str, params: Params = None) -> tuple[Any, ...] | None:
        with self._conn.cursor() as cur:
            return cur.execute(query, params).fetchone()


# A partition and the cursor of its checkpoint's compare-and-set.
_FenceRow = tuple[TopicPartition, "psycopg.Cursor[TupleRow]"]
# The cursors of the position locks and gap reads a batch sent (None: nothing to read).
_Reads = tuple["psycopg.Cursor[TupleRow]", "psycopg.Cursor[TupleRow]"] | None

# How many streams' positions a store keeps in memory (PositionCache), about half a kilobyte
# each: with more streams than that in use, the least recently written are read again.
CACHED_POSITIONS = 100_000
# A stream with parked events is cached with them (and its gap records) if it has at most
# this many, and while the cache holds fewer than CACHED_PARKED in all (about a kilobyte
# each): a stream far behind, or a backlog, is read from the store as before.
CACHED_PARKED_PER_STREAM = 32
CACHED_PARKED = 20_000
# Batches planned on locked positions, not on the cache, after a refused one: another writer
# is at the same streams, and guesses would keep failing while it is.
CONTENDED_BATCHES = 100
# Seconds a store's connection stays in pipeline mode, batch behind batch, before it lets
# one land first and goes idle for a moment (PostgresStore.plans_ahead).
IDLE_EVERY = 5.0


class HeldState(NamedTuple):
    """What a stream holds besides its position, as this store last wrote it: its parked
    events and its gap records (exactly the seqs missing below its highest parked one)."""

    parked: Mapping[int, Event]
    gaps: tuple[Gap, ...]


# A cached stream: its position, the version it was written at, and what it holds (None:
# nothing parked, no gap record).
CachedStream = tuple[StreamPosition, int, HeldState | None]


class PositionCache:
    """The positions of one projection's streams as this store last wrote them, with the
    version it wrote (its transaction's id), for the streams it left clean (nothing parked,
    no gap record, not blocked) or holding a few parked events, which are kept with their
    gap records. A batch on those streams reads and locks nothing before it plans, nor loads
    the parked events it drains; its position update checks instead that each still holds
    that version, and a stream that another writer (another instance, a replay, a command,
    a rebuild's swap) wrote since fails the whole batch as a serialization failure, which
    runs it again on positions read under their locks, the cache emptied. Every write of a
    stream's parked events or gaps moves its version (``PgBatch.finish``); a gap timer's
    new schedule does not, and need not: a batch writes a gap's schedule as stored. So an
    entry is a guess that costs a rerun when wrong, never a wrong write. Least recently
    written first out."""

    def __init__(
        self,
        size: int = CACHED_POSITIONS,
        parked_size: int = CACHED_PARKED,
        parked_per_stream: int = CACHED_PARKED_PER_STREAM,
    ) -> None:
        self.size = size
        self.parked_size = parked_size
        self.parked_per_stream = parked_per_stream
        self._entries: OrderedDict[str, CachedStream] = OrderedDict()
        self._parked = 0  # parked events held by the entries
        self._resting = 0  # batches left before the cache is planned on again

    @property
    def usable(self) -> bool:
        return self._resting == 0

    def get(self, stream: str) -> CachedStream | None:
        return self._entries.get(stream)

    def update(
        self,
        written: Mapping[str, StreamPosition],
        left: Mapping[str, HeldState | None],
        version: int,
    ) -> None:
        """After a commit: the streams it wrote, at ``version``; of those, the ones in
        ``left`` are kept, with what each holds (``None``: clean), the others dropped."""
        if self._resting:
            self._resting -= 1
        entries = self._entries
        for stream, position in written.items():
            old = entries.pop(stream, None)
            if old is not None:
                self._drop(old)
            if stream not in left:
                continue
            held = left[stream]
            if held is not None:
                count = len(held.parked)
                if count > self.parked_per_stream or self._parked + count > self.parked_size:
                    continue
                self._parked += count
            entries[stream] = (position, version, held)
        while len(entries) > self.size:
            self._drop(entries.popitem(last=False)[1])

    def _drop(self, entry: CachedStream) -> None:
        if entry[2] is not None:
            self._parked -= len(entry[2].parked)

    def forget(self, streams: Iterable[str]) -> None:
        for stream in streams:
            entry = self._entries.pop(stream, None)
            if entry is not None:
                self._drop(entry)

    def clear(self, contended: bool = False) -> None:
        """Forget every entry; ``contended``: a batch was refused on a stale one, so the next
        :data:`CONTENDED_BATCHES` batches lock what they plan on."""
        self._entries.clear()
        self._parked = 0
        if contended:
            self._resting = CONTENDED_BATCHES

    @property
    def parked(self) -> int:
        """How many parked events the entries hold."""
        return self._parked

    def __len__(self) -> int:
        return len(self._entries)


class PgBatch:
    """One batch transaction of one projection. Methods are called in the order the runner's
    batch applier documents: fence → lock → load → handlers → write.

    ``pipelined``: the connection is in pipeline mode for the whole batch
    (:meth:`PostgresStore.batch`): statements are sent without waiting for each, and only a
    read waits, for its answer and everything sent before it. The fence's answer is checked
    last, before the COMMIT. The handlers run without a savepoint, so a handler that fails
    leaves the batch to be run again without pipelining."""

    def __init__(
        self,
        conn: psycopg.Connection[TupleRow],
        schema: str,
        projection: str,
        view_schema: str,
        pipelined: bool = False,
        cache: PositionCache | None = None,
    ):
        self.conn = conn
        self.projection = projection
        self.pipelined = pipelined
        self.cache = cache
        self.version: int | None = None  # this transaction's id, read with the fence
        # A pipelined batch's fence, sent and not yet checked: its txid and update cursors.
        self._fence: tuple[psycopg.Cursor[TupleRow], list[_FenceRow]] | None = None
        self._s = sql.Identifier(schema)
        self._view_schema = view_schema
        self._created: list[str] = []  # correlation rows lock_correlations created
        self._locked: dict[str, StreamPosition] = {}  # positions as lock_positions read them
        # Read with the locks, for held_seqs and load_gaps: the locked streams' gap records
        # (every state), and the highest parked seq of each that has any; ``_read``: the
        # streams they are current for (a write of their holding or gaps ends that).
        self._gaps: dict[str, list[Gap]] = {}
        self._top_parked: dict[str, int] = {}
        self._read: set[str] = set()
        # Every parked event of a stream, where the batch knows them all (from the cache, or
        # loaded, then as it parks and drains): what it leaves in the cache once committed.
        # ``_unknown``: streams with parked events not all loaded. A stream in neither has
        # nothing parked. ``_seqs``: the parked seqs held_seqs found for the unknown ones.
        self._held: dict[str, dict[int, Event]] = {}
        self._unknown: set[str] = set()
        self._seqs: dict[str, SeqRanges] = {}
        # The position update, sent by finish(): the streams' new positions; the cached
        # streams planned on, with the version each must still hold; the streams whose parked
        # events or gaps the batch wrote (their version moves too); the gap records each of
        # those is left with.
        self._positions: dict[str, StreamPosition] = {}
        self._expected: dict[str, int] = {}
        self._state_written: set[str] = set()
        self._gaps_after: dict[str, list[Gap]] = {}
        self.written: dict[str, StreamPosition] = {}  # what finish() wrote
        self.cached = False  # what it wrote is in the position cache (committed, or assumed)
        # What read_ahead did, for lock_positions: the streams, those known from the cache,
        # and the lock and gap reads sent for the others.
        self._ahead: tuple[list[str], dict[str, StreamPosition], list[str], _Reads] | None = None

    def _q(self, text: str) -> sql.Composed:
        return sql.SQL(text).format(s=self._s)

    def fence(
        self,
        checkpoints: Mapping[TopicPartition, int | None],
        epochs: Mapping[TopicPartition, int],
        starts: Mapping[TopicPartition, int] | None = None,
    ) -> None:
        """Compare-and-set every checkpoint of the batch on its epoch; the row locks are held to
        commit, so a new owner's claim waits for this batch and then sees its checkpoint. The
        first batch ever of a partition records where its history starts (``starts``: the
        batch's first offsets). A checkpoint of ``None`` moves nothing (``greatest`` ignores
        nulls). Raises :class:`Fenced` naming the partitions this instance no longer owns;
        a pipelined batch, from :meth:`finish`, where its answer is read (the statements
        after the fence ran under its row locks all the same, and are rolled back)."""
        starts = starts or {}
        sent: list[_FenceRow] = []
        with ExitStack() if self.pipelined else self.conn.pipeline():  # one round trip
            txid = self.conn.execute("select txid_current()")
            for (topic, part), offset in sorted(checkpoints.items()):
                cur = self.conn.execute(
                    self._q(
                        "update {s}.checkpoints set"
                        " start_offset = case when next_offset is null"
                        "  then coalesce(start_offset, %s) else start_offset end,"
                        " next_offset = greatest(next_offset, %s), updated_at = now()"
                        " where projection = %s and topic = %s and partition = %s and epoch = %s"
                    ),
                    (
                        starts.get((topic, part)),
                        offset,
                        self.projection,
                        topic,
                        part,
                        epochs.get((topic, part), -1),
                    ),
                )
                sent.append(((topic, part), cur))
        self._fence = (txid, sent)
        if not self.pipelined:
            self._check_fence()

    def _check_fence(self) -> None:
        """The fence's answer (read now if it is not in yet): raise :class:`Fenced` if it
        lost a partition, else keep the transaction's id as its version."""
        if self._fence is None:
            return
        txid, sent = self._fence
        self._fence = None
        row = txid.fetchone()
        lost = [tp for tp, cur in sent if cur.rowcount != 1]
        if lost:
            raise Fenced(lost)
        self.version = None if row is None else row[0]

    def hold(self, epochs: Mapping[TopicPartition, int]) -> None:
        """The fence of a batch that moves no offset (a correlation's idle tick)."""
        self.fence(dict.fromkeys(epochs), epochs)

    def read_ahead(self, streams: Iterable[str]) -> dict[str, StreamPosition]:
        """A pipelined batch: send the reads :meth:`lock_positions` will wait for, and return
        the positions it can plan on meanwhile, those of the cache with nothing parked
        (behind a commit in flight, the reads wait for it)."""
        if not self.pipelined:
            return {}
        names = sorted(set(streams))
        found: dict[str, StreamPosition] = {}
        left = self._from_cache(names, found) if self._plans_on_cache else names
        self._ahead = (names, found, left, self._send_lock(left))
        held = self._held  # at this point: the cached streams holding parked events
        return {s: p for s, p in found.items() if s not in held} if held else dict(found)

    @property
    def _plans_on_cache(self) -> bool:
        """Only a pipelined batch plans on the cache. A handler may fail on a view row
        another writer moved past a stale cached position; a pipelined batch that fails runs
        again step by step, on locked rows, and only there is a failure traced to its event."""
        fenced = self.version is not None or self._fence is not None
        return self.pipelined and self.cache is not None and self.cache.usable and fenced

    def lock_positions(
        self, streams: Iterable[str], rules: SequenceRules
    ) -> dict[str, StreamPosition]:
        """Lock the streams' position rows in sorted order, creating the missing ones first:
        two instances that touch the same stream serialise here, and sorted order avoids lock
        cycles. Rows that exist (nearly all, once running) are locked in one statement; new
        streams cost a second."""
        names = sorted(set(streams))
        if not names:
            return {}
        found: dict[str, StreamPosition] = {}
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == names:
            _, cached, names, reads = ahead
            found.update(cached)
        else:
            if self._plans_on_cache:
                names = self._from_cache(names, found)
            reads = self._send_lock(names)
        if not names:
            return found
        found.update(self._take_lock(names, reads))
        missing = [n for n in names if n not in found]
        if missing:
            self.conn.execute(
                self._q(
                    "insert into {s}.positions (projection, stream, last_seq)"
                    f" select %s, x, %s from {_STREAMS} as t(x) order by x on conflict do nothing"
                ),
                (self.projection, rules.first_seq - 1, _json_list(missing)),
            )
            found.update(self._lock_positions(missing))
        self._locked.update(found)
        return found

    def _from_cache(self, names: list[str], found: dict[str, StreamPosition]) -> list[str]:
        """Take the cached streams' positions, with the version finish() will check, and
        what they hold (parked events, gap records); the names left to lock."""
        assert self.cache is not None
        get, locked, expected = self.cache.get, self._locked, self._expected
        left = []
        holding: dict[str, HeldState] = {}
        for name in names:
            hit = get(name)
            if hit is None or name in locked:
                left.append(name)
            else:
                found[name], expected[name], held = hit
                if held is not None:
                    holding[name] = held
        if self._gaps or self._top_parked or self._held:  # from earlier in this batch
            for name in found:
                self._gaps.pop(name, None)
                self._top_parked.pop(name, None)
                self._held.pop(name, None)
        for name, held in holding.items():
            self._gaps[name] = list(held.gaps)
            self._held[name] = dict(held.parked)  # a copy: the batch parks and drains in it
        locked.update(found)
        self._read.update(found)
        return left

    def _lock_positions(self, names: list[str]) -> dict[str, StreamPosition]:
        return self._take_lock(names, self._send_lock(names))

    def _send_lock(self, names: list[str]) -> _Reads:
        """Lock the rows and, in the same round trip and under the locks, read the streams'
        gap records with, for each stream that has any, its highest parked seq: what
        held_seqs and load_gaps answer from (:meth:`_take_lock`)."""
        if not names:
            return None
        streams = _json_list(names)
        with ExitStack() if self.pipelined else self.conn.pipeline():
            # Locked one by one in the order of ``names``, sorted.
            locking = self.conn.execute(
                self._q(
                    f"select p.* from {_STREAM_KEYS} cross join lateral"
                    " (select stream, last_seq, last_id, last_hash, blocked_seq"
                    "  from {s}.positions where projection = %s and stream = k.x for update) p"
                ),
                (streams, self.projection),
            )
            reading = self.conn.execute(
                self._q(
                    f"select {_GAP_COLUMNS}, (select max(h.seq) from {{s}}.holding h"
                    "  where h.projection = g.projection and h.stream = g.stream)"
                    f" from {_STREAM_KEYS} cross join lateral"
                    "  (select * from {s}.gaps where projection = %s and stream = k.x offset 0) g"
                ),
                (streams, self.projection),
            )
        return locking, reading

    def _take_lock(self, names: list[str], reads: _Reads) -> dict[str, StreamPosition]:
        """The answers of :meth:`_send_lock` (waited for if not in yet)."""
        assert reads is not None
        locking, reading = reads
        for stream in names:
            self._gaps.pop(stream, None)
            self._top_parked.pop(stream, None)
            self._held.pop(stream, None)
            self._unknown.discard(stream)
            self._seqs.pop(stream, None)
        self._read.update(names)
        for r in reading.fetchall():
            self._gaps.setdefault(r[0], []).append(_gap(r))
            if r[8] is not None:
                self._top_parked[r[0]] = r[8]
                self._unknown.add(r[0])
        return {r[0]: StreamPosition(r[0], r[1], r[2], r[3], r[4]) for r in locking.fetchall()}

    def held_seqs(self, streams: Iterable[str]) -> HeldSeqs:
        """The streams' parked seqs, and their ranges given up on with the skip policy (which
        the sequencer steps over); the streams locked first (``lock_positions``, which read
        their gap records and highest parked seqs).

        Not read row by row, which costs per parked event (with a backlog of 100k parked on
        a batch's streams, most of the batch's time): a stream's parked seqs are all those
        from its position to its highest parked seq that none of its gap records (open,
        held or skipped) covers, but its blocked seq. That holds because every write of a
        stream stores its gaps as exactly the seqs missing up to its highest parked one.
        Only streams with gap records or a blocked seq can have parked events; the highest
        parked seq of a blocked stream without gap records (a dead letter's) is read here."""
        names = self._current(streams)
        parked: dict[str, SeqRanges] = {}
        skipped: dict[str, list[tuple[int, int]]] = {}
        tops = self._top_parked
        blocked = [
            s for s in names if self._locked[s].blocked_seq is not None and s not in self._gaps
        ]
        for s in blocked:
            self._unknown.add(s)  # its parked events, if any, are read below, not loaded
        if blocked:
            tops = tops | dict(
                self.conn.execute(
                    self._q(
                        "select x, (select max(h.seq) from {s}.holding h"
                        " where h.projection = %s and h.stream = x) from unnest(%s::text[]) x"
                    ),
                    (self.projection, sorted(blocked)),
                ).fetchall()
            )
        held = self._held
        for stream in names:
            gaps = self._gaps.get(stream, ())
            for g in gaps:
                if g.state == "skipped":
                    skipped.setdefault(stream, []).append((g.from_seq, g.to_seq))
            known = held.get(stream)
            if known is not None:  # every parked event known (the cache's)
                if known:
                    parked[stream] = SeqRanges.of(known)
                continue
            top = tops.get(stream)
            if top is None:
                continue
            position = self._locked[stream]
            seqs = SeqRanges.span(
                position.last_seq + 1, top, [(g.from_seq, g.to_seq) for g in gaps]
            )
            if position.blocked_seq is not None:
                seqs.discard(position.blocked_seq)
            if seqs:
                parked[stream] = seqs
                self._seqs[stream] = seqs
        return parked, skipped

    def _current(self, streams: Iterable[str]) -> set[str]:
        names = set(streams)
        if not names <= self._read:
            stale = sorted(names - self._read)[:3]
            raise RuntimeError(f"streams {stale} not locked since their last write in this batch")
        return names

    def load_parked(self, wanted: Mapping[str, Iterable[int]]) -> dict[str, dict[int, Event]]:
        """The parked events asked for: those of streams whose every parked event is known
        (from the cache) from memory, the others read."""
        parked: dict[str, dict[int, Event]] = {}
        pairs = []
        for stream, seqs in wanted.items():
            known = self._held.get(stream)
            if known is None:
                pairs += [[stream, seq] for seq in seqs]
            else:
                parked[stream] = {seq: known[seq] for seq in seqs if seq in known}
        if not pairs:
            return parked
        rows = self.conn.execute(
            self._q(
                f"select h.stream, h.seq, h.event from {_PARKED_KEYS} cross join lateral"
                f" (select stream, seq, event from {_PARKED_ROW} offset 0) h"
            ),
            (_json_list(pairs), self.projection),
        ).fetchall()
        for stream, seq, event in rows:
            parked.setdefault(stream, {})[seq] = Event.from_json(event)
        for stream, seqs in self._seqs.items():
            events = parked.get(stream)
            if events is not None and len(events) == len(seqs) and stream in self._unknown:
                self._held[stream] = dict(events)  # all of them loaded
                self._unknown.discard(stream)
        return parked

    def load_gaps(self, streams: Iterable[str]) -> dict[str, list[Gap]]:
        """The open (or held) gaps of these streams, locked first (``lock_positions`` read
        them); skipped ranges are not gaps any more."""
        out: dict[str, list[Gap]] = {}
        for stream in self._current(streams):
            gaps = [g for g in self._gaps.get(stream, ()) if g.state != "skipped"]
            if gaps:
                out[stream] = gaps
        return out

    def mark_skipped(self, gap: Gap) -> None:
        self.conn.execute(
            self._q(
                "update {s}.gaps set state = 'skipped' where projection = %s and stream = %s"
                " and from_seq = %s"
            ),
            (self.projection, gap.stream, gap.from_seq),
        )
        self._state_written.add(gap.stream)
        self._gaps[gap.stream] = [
            replace(g, state="skipped") if g.from_seq == gap.from_seq else g
            for g in self._gaps.get(gap.stream, ())
        ]

    @contextmanager
    def rolled_back(self) -> Iterator[None]:
        """A savepoint that is always rolled back, for trying things out."""
        with self.conn.transaction(force_rollback=True):
            yield

    def run_handlers(self, handlers: Sequence[Handler], events: Sequence[Any]) -> None:
        """Run the handlers in a savepoint with the view schema as search_path; on any error the
        savepoint is rolled back and the error propagates. Pipelined, there is no savepoint and
        their writes are not waited for: an error may surface only at the commit."""
        if not events:
            return
        if self.pipelined:
            self._run_handlers(handlers, events)
            return
        with self.conn.transaction(), self.conn.pipeline():
            self._run_handlers(handlers, events)
            # A view's deferred constraints are checked here, in the savepoint, where a
            # failure is traced to its event, not at the COMMIT.
            self.conn.execute("set constraints all immediate")

    def _run_handlers(self, handlers: Sequence[Handler], events: Sequence[Any]) -> None:
        self.conn.execute(
            "select set_config('search_path', %s, true)",
            (sql.Identifier(self._view_schema).as_string(self.conn),),
        )
        view = PgView(self.conn)
        for handler in handlers:
            handler(events, view)

    def write_positions(self, positions: Iterable[StreamPosition]) -> None:
        """Kept for :meth:`finish`, which writes them with the version checks, once the
        batch's parked events and gaps are written too."""
        for p in positions:
            self._positions[p.stream] = p

    def finish(self) -> None:
        """The batch's position update, last before its COMMIT, in one statement: the new
        positions; the cached streams it planned on, checked to still hold the version this
        store wrote (``positions_current`` fails the batch otherwise); and every stream whose
        parked events or gaps it wrote. Each gets this transaction's version, so a store that
        cached any of them finds out. Before it, the fence's answer is checked: a batch
        fenced out never sends its COMMIT."""
        self._check_fence()
        names = sorted(set(self._positions) | set(self._expected) | self._state_written)
        if not names:
            return
        expected = self._expected
        rows = []
        for s in names:
            p = self._positions.get(s) or self._locked[s]
            self.written[s] = p
            rows.append([s, p.last_seq, p.last_id, p.last_hash, p.blocked_seq, expected.get(s)])
        # one statement, not one per row: a batch moves thousands
        self.conn.execute(
            self._q(
                "with written as (update {s}.positions p set last_seq = (e->>1)::bigint,"
                " last_id = e->>2, last_hash = e->>3, blocked_seq = (e->>4)::bigint,"
                " version = txid_current(), updated_at = now()"
                " from jsonb_array_elements(%s::jsonb) e"
                " where p.projection = %s and p.stream = e->>0"
                " and (e->>5 is null or p.version = (e->>5)::bigint) returning 1)"
                " select {s}.positions_current(count(*), %s) from written"
            ),
            (_json_list(rows), self.projection, len(rows)),
        )

    def left_cached(self) -> dict[str, HeldState | None]:
        """Of the streams :meth:`finish` wrote, those the store may cache once the batch
        commits, with what each holds: the streams left with no dead letter and either no
        gap record (``None``: every write of a stream keeps its gaps as exactly the seqs
        missing up to its highest parked one, so such a stream has nothing parked) or open
        gaps only and every parked event known."""
        out: dict[str, HeldState | None] = {}
        gaps_after, gaps_read, held = self._gaps_after, self._gaps, self._held
        for s, p in self.written.items():
            if p.blocked_seq is not None:
                continue
            gaps = gaps_after.get(s, gaps_read.get(s))
            if not gaps:
                out[s] = None
                continue
            parked = held.get(s)
            if parked and s not in self._unknown and all(g.state != "skipped" for g in gaps):
                out[s] = HeldState(parked, tuple(gaps))
        return out

    def park(self, events: Iterable[Event]) -> None:
        events = list(events)
        rows = [e.to_json() for e in events]
        held, unknown = self._held, self._unknown
        for e in events:
            if e.seq is not None and e.stream not in unknown:
                held.setdefault(e.stream, {})[e.seq] = e
        self._read.difference_update(r["stream"] for r in rows)
        self._state_written.update(r["stream"] for r in rows)
        if rows:
            self.conn.execute(
                self._q(
                    "insert into {s}.holding (projection, stream, seq, event)"
                    " select %s, e->>'stream', (e->>'seq')::bigint, e"
                    " from jsonb_array_elements(%s::jsonb) e"
                ),
                (self.projection, _json_list(rows)),
            )

    def unpark(self, keys: Iterable[tuple[str, int]]) -> None:
        keys = list(keys)
        for stream, seq in keys:
            known = self._held.get(stream)
            if known is not None:
                known.pop(seq, None)
        self._read.difference_update(stream for stream, _ in keys)
        self._state_written.update(stream for stream, _ in keys)
        pairs = [list(k) for k in keys]
        if pairs:
            self.conn.execute(
                self._q(
                    "delete from {s}.holding where ctid = any(array("
                    f"select h.ctid from {_PARKED_KEYS} cross join lateral"
                    f" (select ctid from {_PARKED_ROW} offset 0) h))"
                ),
                (_json_list(pairs), self.projection),
            )

    def replace_gaps(self, streams: Iterable[str], gaps: Iterable[Gap]) -> None:
        """Upserted by their keys: a gap that stays keeps its row's replay schedule, and one
        carved out of an older gap takes that row's, both as they stand when written, not
        as this batch read them: another instance's gap timer updates gap rows without the
        positions' locks, and a schedule written back as read made it ask for the gap again
        at once. The gaps that went are deleted by their keys after."""
        names = sorted(set(streams))
        gaps = list(gaps)
        self._read.difference_update(names)
        self._state_written.update(names)
        for name in names:
            self._gaps_after[name] = [g for g in self._gaps.get(name, ()) if g.state == "skipped"]
        for g in gaps:
            self._gaps_after.setdefault(g.stream, []).append(g)
        if not names:
            return
        rows = []
        for g in gaps:
            # The row it stays as or was carved out of: its schedule is taken as stored.
            parent = parent_gap(self._gaps.get(g.stream, ()), g.from_seq, g.to_seq)
            rows.append(
                [
                    g.stream,
                    g.from_seq,
                    g.to_seq,
                    _ts(g.first_seen),
                    g.attempts,
                    _ts(g.last_request_at),
                    _ts(g.next_request_at),
                    g.state,
                    None if parent is None else parent.from_seq,
                ]
            )
        if rows:
            self.conn.execute(
                self._q(
                    "insert into {s}.gaps (projection, stream, from_seq, to_seq, first_seen,"
                    " attempts, last_request_at, next_request_at, state)"
                    " select %s, e->>0, (e->>1)::bigint, (e->>2)::bigint, (e->>3)::timestamptz,"
                    "  coalesce(p.attempts, (e->>4)::int),"
                    "  case when p.attempts is null then (e->>5)::timestamptz"
                    "   else p.last_request_at end,"
                    "  case when p.attempts is null then (e->>6)::timestamptz"
                    "   else p.next_request_at end,"
                    "  coalesce(p.state, e->>7)"
                    " from jsonb_array_elements(%s::jsonb) e left join lateral"
                    "  (select attempts, last_request_at, next_request_at, state from {s}.gaps"
                    "   where projection = %s and stream = e->>0 and from_seq = (e->>8)::bigint"
                    "   and state <> 'skipped' offset 0) p on true"
                    " on conflict (projection, stream, from_seq) do update set to_seq = excluded.to_seq"
                ),
                (self.projection, _json_list(rows), self.projection),
            )
        self.conn.execute(
            self._q(
                f"delete from {{s}}.gaps where projection = %s and stream in {_STREAMS}"
                " and state <> 'skipped' and (stream, from_seq) not in"
                " (select e->>0, (e->>1)::bigint from jsonb_array_elements(%s::jsonb) e)"
            ),
            (self.projection, _json_list(names), _json_list([r[:2] for r in rows])),
        )

    def dead_letter(self, letters: Iterable[DeadLetter]) -> None:
        rows = []
        for d in letters:
            e, m = d.event, d.message
            src = e.source if e is not None else (m.source if m is not None else None)
            rows.append(
                (
                    self.projection,
                    d.kind,
                    d.reason,
                    d.stream,
                    d.seq,
                    None if e is None else e.id,
                    None if e is None else Jsonb(e.to_json()),
                    None if src is None else src.topic,
                    None if src is None else src.partition,
                    None if src is None else src.offset,
                    None if m is None else m.key,
                    None if m is None else m.value,
                )
            )
        if rows:
            with self.conn.cursor() as cur:
                cur.executemany(
                    self._q(
                        "insert into {s}.dead_letters (projection, kind, reason, stream, seq, event_id, event,"
                        ' topic, partition, "offset", key, value)'
                        " values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                    ),
                    rows,
                )

    def lock_documents(self, streams: Iterable[str]) -> dict[str, dict[str, Any] | None]:
        """Merge mode: create missing document rows, lock them all in sorted order (instances
        that touch one document serialise here) and return their stored merge states (``None``:
        nothing merged yet)."""
        names = sorted(set(streams))
        if not names:
            return {}
        self.conn.execute(
            self._q(
                "insert into {s}.documents (projection, stream, state)"
                " select %s, x, 'null'::jsonb from unnest(%s::text[]) as x order by x"
                " on conflict do nothing"
            ),
            (self.projection, names),
        )
        rows = self.conn.execute(
            self._q(
                "select stream, state from {s}.documents where projection = %s"
                " and stream = any(%s) order by stream for update"
            ),
            (self.projection, names),
        ).fetchall()
        return {stream: state for stream, state in rows}

    def write_documents(self, states: Mapping[str, dict[str, Any]], now: float) -> None:
        """Store merge states; ``now`` (the daemon's clock) dates the change, for the sweep."""
        if states:
            with self.conn.cursor() as cur:
                cur.executemany(
                    self._q(
                        "update {s}.documents set state = %s, updated_at = %s"
                        " where projection = %s and stream = %s"
                    ),
                    [
                        (Jsonb(state), _ts(now), self.projection, stream)
                        for stream, state in states.items()
                    ],
                )

    # -- correlation (docs/correlation.md, section 5) ----------------------------------------
    def lock_correlations(self, keys: Iterable[str], watermark: int | None) -> dict[str, Pending]:
        """Create the keys' rows (sorted, ``on conflict do nothing``, as positions are), then
        lock them and every row due at ``watermark`` in one statement, in key order: two
        instances touching one key serialise here, and a record both find due is closed once
        (the second re-reads the row after the first commits; READ COMMITTED re-checks
        ``due <= watermark`` on the new version and skips it when no longer due)."""
        names = sorted(set(keys))
        self._created = names
        if names:
            self.conn.execute(
                self._q(
                    "insert into {s}.correlations (projection, key)"
                    " select %s, k from unnest(%s::text[]) as k order by k on conflict do nothing"
                ),
                (self.projection, names),
            )
        if not names and watermark is None:
            return {}
        rows = self.conn.execute(
            self._q(
                "select key, record from {s}.correlations where projection = %s"
                " and (key = any(%s) or due <= %s) order by key for update"
            ),
            (self.projection, names, watermark),
        ).fetchall()
        return {key: Pending.from_json(record) for key, record in rows if record is not None}

    def write_correlations(
        self, write: Iterable[tuple[Pending, int | None]], delete: Iterable[str]
    ) -> None:
        rows = [(Jsonb(p.to_json()), due, self.projection, p.key) for p, due in write]
        if rows:
            with self.conn.cursor() as cur:
                cur.executemany(
                    self._q(
                        "update {s}.correlations set record = %s, due = %s, updated_at = now()"
                        " where projection = %s and key = %s"
                    ),
                    rows,
                )
        gone = sorted(set(delete))
        created = self._created
        if gone or created:
            self.conn.execute(
                self._q(
                    "delete from {s}.correlations where projection = %s"
                    " and (key = any(%s) or (key = any(%s) and record is null))"
                ),
                (self.projection, gone, created),
            )

    def input_times(self, topics: Iterable[str]) -> dict[TopicPartition, InputTime]:
        rows = self.conn.execute(
            self._q(
                "select topic, partition, event_time_high, caught_up from {s}.checkpoints"
                " where projection = %s and topic = any(%s)"
            ),
            (self.projection, sorted(set(topics))),
        ).fetchall()
        return {(r[0], r[1]): InputTime(r[2], r[3]) for r in rows}

    def write_input_times(self, times: Mapping[TopicPartition, InputTime]) -> None:
        """On the checkpoint rows the batch's fence holds already; a high never goes back."""
        rows = [
            (t.high, t.caught_up, self.projection, topic, part)
            for (topic, part), t in sorted(times.items())
        ]
        if rows:
            with self.conn.cursor() as cur:
                cur.executemany(
                    self._q(
                        "update {s}.checkpoints set event_time_high = greatest(event_time_high, %s),"
                        " caught_up = %s where projection = %s and topic = %s and partition = %s"
                    ),
                    rows,
                )

    # -- the outbox (docs/correlation.md, section 7): projector/store/postgres_outbox.py --------
    def write_outbox(
        self, messages: Sequence[OutboxMessage], prune_held_before: int | None = None
    ) -> int:
        held = self.projection.endswith(REBUILD)
        if held and prune_held_before is not None:
            postgres_outbox.prune_held(self.conn, self._s, self.projection, prune_held_before)
        return postgres_outbox.write_outbox(self.conn, self._s, self.projection, messages, held)

    def lock_dead_letter(self, letter_id: int) -> DeadLetterRow | None:
        row = self.conn.execute(
            self._q(
                f"select {_DL_COLUMNS} from {{s}}.dead_letters where id = %s and projection = %s"
                " for update"
            ),
            (letter_id, self.projection),
        ).fetchone()
        return None if row is None else _dead_letter_row(row)

    def resolve_dead_letter(self, letter_id: int, status: str, reason: str | None = None) -> None:
        self.conn.execute(
            self._q(
                "update {s}.dead_letters set status = %s, reason = coalesce(%s, reason),"
                " attempts = attempts + (case when %s = 'open' then 1 else 0 end),"
                " resolved_at = case when %s = 'open' then null else now() end where id = %s"
            ),
            (status, reason, status, status, letter_id),
        )


class PostgresStore:
    """One connection (autocommit, explicit transaction blocks) per projection worker."""

    commits_in_flight = True
    traces_in_pipeline = False  # a pipelined batch that fails is run again step by step

    def __init__(
        self,
        dsn: str,
        schema: str = "projector",
        connect_timeout: float = 10.0,
        idle_in_transaction_timeout: float | None = None,
    ):
        self.dsn = dsn
        self.schema = schema
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_in_transaction_timeout
        self._conn: psycopg.Connection[TupleRow] | None = None
        # Pipeline mode, from a pipelined batch's BEGIN until something else needs the
        # connection: it spans the batch in flight and the one prepared behind it.
        self._pipeline: ExitStack | None = None
        # A batch's COMMIT in flight: the cursor that will hold its answer, and the batch
        # (what it leaves in the position caches once committed).
        self._in_flight: tuple[psycopg.Cursor[TupleRow], PgBatch] | None = None
        # A pipelined batch sent up to its COMMIT, which send_commit sends; _replan: one was
        # rolled back instead (the batch ahead of it failed), so send_commit answers False.
        self._prepared: PgBatch | None = None
        self._replan = False
        self._caches: dict[str, PositionCache] = {}  # per projection
        self._late_error: Exception | None = None  # what it failed with, for wait_commit
        self.idle_every = IDLE_EVERY
        self._pipelined_since = 0.0  # when pipeline mode was entered (time.monotonic)

    @property
    def plans_ahead(self) -> bool:
        """A batch is built behind the one whose COMMIT is in flight, on the same
        connection: the server runs it after that COMMIT, so its reads see what the batch
        ahead wrote. Not when pipeline mode has gone ``idle_every`` seconds unbroken: then
        the batch in flight lands first and the connection goes idle for a moment, which is
        when PostgreSQL reports what its session wrote to the statistics that autovacuum
        acts on. A session that never goes idle reports none: under a sustained load the
        holding and gap tables (a twentieth of a reordered topic's events is inserted and
        deleted there) would go unvacuumed for as long as the load lasts."""
        since = self._pipelined_since
        return self._pipeline is None or time.monotonic() - since < self.idle_every

    @property
    def conn(self) -> psycopg.Connection[TupleRow]:
        # Anything else on this connection (a claim in a rebalance) comes after the batch
        # whose commit is in flight, whose error waits for wait_commit; a batch prepared
        # behind it is rolled back, to be planned again.
        if self._prepared is not None:
            self._discard_prepared()
        if self._pipeline is not None:
            self._settle()
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = self._connect()
        return self._conn

    def _settle(self, error: Exception | None = None) -> None:
        """Leave pipeline mode, every answer read: the batch in flight is committed, or what
        it failed with is kept for :meth:`wait_commit`. An error of what was sent after its
        COMMIT (a batch being built behind it) is left to that batch's caller. ``error``:
        the first the pipeline answered with, raised already (in the batch built behind)."""
        in_flight, self._in_flight = self._in_flight, None
        held, self._pipeline = self._pipeline, None
        if not isinstance(error, psycopg.Error):
            error = None
        if held is not None:
            try:
                held.close()
            except Exception as exc:
                error = error or exc
        if in_flight is None:
            return
        commit, tx = in_flight
        if commit.statusmessage == "COMMIT":
            self._committed(tx)
            return
        # Never taken for done unless the server said so (a connection that closes may end
        # the pipeline with no error and no answer).
        self._late_error = (
            _as_conflict(error)
            if error is not None
            else TransientStoreError(
                f"the batch's COMMIT was answered {commit.statusmessage!r}, not COMMIT"
            )
        )
        self.close()  # its transaction's state is unknown: a fresh connection after
        if tx.cache is not None and error is not None and _contended(error):
            tx.cache.clear(contended=True)

    def _committed(self, tx: PgBatch) -> None:
        """What a committed batch leaves in its projection's position cache (once: a batch
        built behind it may have put it there already, as if committed)."""
        if tx.cache is None or tx.cached:
            return
        tx.cached = True
        if tx.version is None:  # not fenced (a command's batch): its versions are unknown
            tx.cache.forget(tx.written)
        else:
            tx.cache.update(tx.written, tx.left_cached(), tx.version)

    def _discard_prepared(self) -> None:
        """Roll back the batch prepared behind the one in flight: :meth:`send_commit` will
        answer False, and it is planned again."""
        self._prepared = None
        self._replan = True
        self._settle()
        self._rollback()

    def _rollback(self) -> None:
        """End a batch's transaction that will not commit (pipeline mode left already)."""
        if self._conn is None or self._conn.closed:
            return
        try:
            self._conn.execute("ROLLBACK")
        except psycopg.Error:
            self.close()

    def send_commit(self) -> bool:
        """Send the COMMIT of the batch prepared last, leaving it in flight. False if that
        batch was rolled back since (the batch ahead of it failed, or something else needed
        the connection): plan it again."""
        if self._replan:
            self._replan = False
            return False
        tx, self._prepared = self._prepared, None
        if tx is None:  # applied step by step: committed already
            return True
        try:
            commit = tx.conn.execute("COMMIT", prepare=False)
        except Exception as exc:
            # An answer read while sending it says the batch failed (a refusal of its
            # position update, say): it did not commit, and wait_commit says so.
            self._settle()
            self._rollback()
            if tx.cache is not None:
                tx.cache.clear(_contended(exc))
            self._late_error = _as_conflict(exc)
            return True
        self._in_flight = (commit, tx)
        try:
            # The server answers at once instead of at the next Sync: the answer is on its
            # way, or in, should the connection drop meanwhile.
            tx.conn.pgconn.send_flush_request()
            tx.conn.pgconn.flush()
        except psycopg.Error:
            pass  # a lost connection: wait_commit says so, and whether it committed is read
        return True

    def wait_commit(self) -> None:
        """Wait for the COMMIT in flight; raise what its batch failed with, if it did (a
        handler's write, a lost connection). A batch prepared behind it stays prepared if
        it committed, and is rolled back if not (:meth:`send_commit` then answers False)."""
        if self._in_flight is not None:
            if self._prepared is not None:
                self._land_ahead_of_prepared()
            else:
                self._settle()
        error, self._late_error = self._late_error, None
        if error is not None:
            try:
                raise error
            finally:
                # Its traceback holds this frame: through ``error`` the two would be a cycle,
                # kept with the failed batch's objects until the garbage collector came.
                error = None

    def _land_ahead_of_prepared(self) -> None:
        """Land the COMMIT in flight, staying in pipeline mode for the batch prepared behind
        it. Its answer is in: that batch's fence check read it, at the latest."""
        assert self._in_flight is not None
        commit, tx = self._in_flight
        if commit.statusmessage == "COMMIT":
            self._in_flight = None
            self._committed(tx)
        else:
            self._discard_prepared()  # and _settle keeps the failure for wait_commit

    def _connect(self) -> psycopg.Connection[TupleRow]:
        try:
            conn = psycopg.connect(
                self.dsn,
                autocommit=True,
                connect_timeout=max(1, int(self._connect_timeout)),
                application_name="projector",
                options=""
                if self._idle_timeout is None
                else f"-c idle_in_transaction_session_timeout={int(self._idle_timeout * 1000)}",
                keepalives=1,
                keepalives_idle=10,
                keepalives_interval=5,
                keepalives_count=3,
            )
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc
        set_json_dumps(json_codec.dumps, conn)
        set_json_loads(json_codec.loads, conn)
        self._forget_positions()  # a new server, maybe: a failover, a restore
        return conn

    def close(self) -> None:
        if self._in_flight is not None:  # closed unanswered: it may or may not have committed
            self._in_flight = None
            self._late_error = TransientStoreError("the store was closed with a commit in flight")
        if self._prepared is not None:
            self._prepared = None
            self._replan = True
        self._pipeline = None  # ends with the connection
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._forget_positions()

    def _forget_positions(self) -> None:
        for cache in self._caches.values():
            cache.clear()

    def _q(self, text: str) -> sql.Composed:
        return sql.SQL(text).format(s=sql.Identifier(self.schema))

    def _cache(self, projection: str) -> PositionCache:
        cache = self._caches.get(projection)
        if cache is None:
            cache = self._caches[projection] = PositionCache()
        return cache

    def claim(
        self, projection: str, partitions: Iterable[TopicPartition], owner: str
    ) -> dict[TopicPartition, Claim]:
        """Take a new epoch for each partition (fencing out any previous owner) and return it with
        the stored checkpoint to seek to. A batch of the previous owner in flight holds the
        checkpoint rows: the claim waits for it. If that owner is frozen mid-batch (SIGSTOP, a
        VM pause: its session waits on it without end), the wait is bounded by
        ``idle_in_transaction_timeout``, after which sessions stuck on their client that long
        are ended (their batch rolls back; it would be fenced anyway) and the claim retried."""
        parts = sorted(partitions)
        # Partitions move: the streams of those coming back may have been written meanwhile.
        self._cache(projection).clear()
        for _ in range(3):
            try:
                return self._claim(projection, parts, owner)
            except psycopg.errors.LockNotAvailable:
                ended = self._end_stuck_sessions()
                log.warning(
                    "claiming %s waited %.0fs on another session; ended %d session(s) stuck"
                    " on their client",
                    projection,
                    self._idle_timeout or 0,
                    ended,
                )
        return self._claim(projection, parts, owner)

    def _claim(
        self, projection: str, partitions: list[TopicPartition], owner: str
    ) -> dict[TopicPartition, Claim]:
        out: dict[TopicPartition, Claim] = {}
        with self.conn.transaction(), self.conn.cursor() as cur:
            if self._idle_timeout is not None:
                cur.execute(
                    "select set_config('lock_timeout', %s, true)",
                    (f"{int(self._idle_timeout * 1000)}ms",),
                )
            for topic, part in partitions:
                row = cur.execute(
                    self._q(
                        "insert into {s}.checkpoints as c (projection, topic, partition, epoch, owner)"
                        " values (%s, %s, %s, 1, %s) on conflict (projection, topic, partition)"
                        " do update set epoch = c.epoch + 1, owner = excluded.owner, updated_at = now()"
                        " returning epoch, next_offset"
                    ),
                    (projection, topic, part, owner),
                ).fetchone()
                assert row is not None
                out[(topic, part)] = Claim(row[0], row[1])
        return out

    def _end_stuck_sessions(self) -> int:
        """End projector's sessions in this database that have waited on their client for
        longer than ``idle_in_transaction_timeout`` inside a transaction or a pipeline (a
        healthy daemon never does: it sends its next statement at once)."""
        if self._idle_timeout is None:
            return 0
        rows = self.conn.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity"
            " where datname = current_database() and pid <> pg_backend_pid()"
            " and application_name = 'projector' and wait_event = 'ClientRead'"
            " and state in ('active', 'idle in transaction', 'idle in transaction (aborted)')"
            " and now() - state_change > make_interval(secs => %s)",
            (self._idle_timeout,),
        ).fetchall()
        return len(rows)

    @contextmanager
    def batch(
        self, projection: str, view_schema: str, pipelined: bool = False
    ) -> Iterator[PgBatch]:
        """A batch transaction; commits when the block exits normally.

        ``pipelined``: the batch's statements are sent in pipeline mode without waiting for
        them (a read waits for its answer only), and the block exits with all sent but the
        COMMIT, which :meth:`send_commit` sends; :meth:`wait_commit` waits for it and raises
        what failed. Until then the batch is not committed: its Kafka offsets wait too.
        A pipelined batch begun while another's COMMIT is in flight is built behind it, on
        the same connection, so the caller plans and sends it meanwhile: it waits at its
        first read, for that COMMIT's answer. If it fails before the block's end, for any
        reason, it is rolled back and :class:`NotPrepared` raised: land the one in flight,
        then apply this one again."""
        cache = self._cache(projection)
        if not pipelined:
            try:
                with self.conn.transaction():
                    tx = PgBatch(self.conn, self.schema, projection, view_schema, cache=cache)
                    yield tx
                    tx.finish()
            except BaseException as exc:
                error = _refused(cache, exc)
                if error is exc:
                    raise
                raise error from exc
            self._committed(tx)
            return
        if self._prepared is not None:
            raise RuntimeError("a prepared batch was neither sent nor rolled back")
        self._replan = False
        ahead = self._in_flight
        if ahead is not None:
            # Behind the COMMIT in flight, in the same pipeline (no Sync between): should
            # that batch fail, the server skips this one's statements too. Its positions
            # are planned on as if it committed; if not, the cache is emptied with it.
            conn = self._conn
            assert conn is not None
            self._committed(ahead[1])
        else:
            conn = self.conn
            self._pipeline = ExitStack()
            self._pipelined_since = time.monotonic()
            self._pipeline.enter_context(conn.pipeline())
        tx = PgBatch(conn, self.schema, projection, view_schema, pipelined=True, cache=cache)
        try:
            # Behind a commit in flight, even this may raise what that batch failed with.
            conn.execute("BEGIN", prepare=False)
            yield tx
            tx.finish()
        except BaseException as exc:
            # The batch ahead lands, or its error (raised in this block, maybe) waits for
            # wait_commit.
            self._settle(exc if isinstance(exc, Exception) else None)
            self._rollback()
            if ahead is not None and isinstance(exc, Exception):
                raise NotPrepared(f"a batch built behind one in flight failed: {exc}") from exc
            error = _refused(cache, exc)
            if error is exc:
                raise
            raise error from exc
        self._prepared = tx

    def checkpoints(self, projection: str) -> dict[TopicPartition, int | None]:
        rows = self.conn.execute(
            self._q(
                "select topic, partition, next_offset from {s}.checkpoints where projection = %s"
            ),
            (projection,),
        ).fetchall()
        return {(r[0], r[1]): r[2] for r in rows}

    def claim_due_gaps(
        self,
        projection: str,
        now: float,
        limit: int,
        decide: Callable[[Gap], tuple[str, Gap]],
    ) -> list[tuple[str, Gap]]:
        """Take the gaps whose next request time has passed, decide each, and store their new
        schedule, in one transaction. ``skip locked`` and the schedule moving forward make it
        one request (or one skip) per gap per attempt, whatever the number of instances. The
        requests are sent, and skips applied, after this commits (no lock is held over the
        network)."""
        with self.conn.transaction():
            rows = self.conn.execute(
                self._q(
                    f"select {_GAP_COLUMNS} from {{s}}.gaps where projection = %s"
                    " and state in ('open', 'held') and next_request_at <= %s"
                    " order by next_request_at limit %s for update skip locked"
                ),
                (projection, _ts(now), limit),
            ).fetchall()
            decided = [decide(_gap(r)) for r in rows]
            updates = [
                (
                    g.attempts,
                    _ts(g.last_request_at),
                    _ts(g.next_request_at),
                    g.state,
                    projection,
                    g.stream,
                    g.from_seq,
                )
                for _, g in decided
            ]
            if updates:
                with self.conn.cursor() as cur:
                    cur.executemany(
                        self._q(
                            "update {s}.gaps set attempts = %s, last_request_at = %s,"
                            " next_request_at = %s, state = %s"
                            " where projection = %s and stream = %s and from_seq = %s"
                        ),
                        updates,
                    )
        return decided

    def list_gaps(self, projection: str, stream: str | None = None) -> list[Gap]:
        rows = self.conn.execute(
            self._q(
                f"select {_GAP_COLUMNS} from {{s}}.gaps where projection = %s"
                " and (%s::text is null or stream = %s) order by first_seen, stream, from_seq"
            ),
            (projection, stream, stream),
        ).fetchall()
        return [_gap(r) for r in rows]

    def request_gaps_now(self, projection: str, stream: str | None, now: float) -> int:
        """Make open gaps due now (the daemon sends their requests on its next gap check)."""
        with self.conn.transaction():
            cur = self.conn.execute(
                self._q(
                    "update {s}.gaps set next_request_at = %s where projection = %s"
                    " and (%s::text is null or stream = %s) and state in ('open', 'held')"
                ),
                (_ts(now), projection, stream, stream),
            )
            return cur.rowcount

    def _count(self, query: str, projection: str) -> int:
        row = self.conn.execute(self._q(query), (projection,)).fetchone()
        return 0 if row is None else int(row[0])

    def count_parked(self, projection: str) -> int:
        return self._count("select count(*) from {s}.holding where projection = %s", projection)

    def count_open_gaps(self, projection: str) -> int:
        return self._count(
            "select count(*) from {s}.gaps where projection = %s and state = 'open'", projection
        )

    def count_open_dead_letters(self, projection: str) -> int:
        return self._count(
            "select count(*) from {s}.dead_letters where projection = %s and status = 'open'",
            projection,
        )

    def correlation_figures(self, projection: str, topics: Sequence[str]) -> tuple[int, int | None]:
        """Correlations with open parts, and the lowest event-time high of ``topics``'
        partitions (``None`` while one has none and is not caught up: the watermark is
        unset then, as the core's ``watermark`` says)."""
        row = self.conn.execute(
            self._q(
                "select (select count(*) from {s}.correlations where projection = %s"
                "  and record is not null and record->'parts' <> '{{}}'::jsonb),"
                " (select case when bool_and(event_time_high is not null or caught_up)"
                "  then min(event_time_high) end from {s}.checkpoints"
                "  where projection = %s and topic = any(%s))"
            ),
            (projection, projection, list(topics)),
        ).fetchone()
        return (0, None) if row is None else (int(row[0]), row[1])

    def correlation_record(self, projection: str, key: str) -> tuple[Pending, int | None] | None:
        """One correlation key's stored record and its ``due`` (event time, ms), for
        ``projector inspect``; ``None`` when the key has none."""
        row = self.conn.execute(
            self._q(
                "select record, due from {s}.correlations where projection = %s and key = %s"
                " and record is not null"
            ),
            (projection, key),
        ).fetchone()
        return None if row is None else (Pending.from_json(row[0]), row[1])

    def has_outbox(self) -> bool:
        """Whether projector's schema has the outbox table (``migrations/0006_outbox.sql``)."""
        row = self.conn.execute(
            "select 1 from pg_class c join pg_namespace n on n.oid = c.relnamespace"
            " where n.nspname = %s and c.relname = 'outbox' and c.relkind = 'r'",
            (self.schema,),
        ).fetchone()
        return row is not None

    def outbox_figures(self, projection: str) -> tuple[int, float | None] | None:
        """Pending outbox rows and the oldest one's age in seconds (the database's clock), for
        ``projector status``; ``None`` without the outbox table."""
        if not self.has_outbox():
            return None
        return postgres_outbox.PgOutbox(self, projection).figures()

    def gap_summary(self, projection: str) -> tuple[int, int, float | None]:
        """A projection's open gaps, how many of them are held (given up on, policy hold), and
        when the oldest was first seen."""
        row = self.conn.execute(
            self._q(
                "select count(*), count(*) filter (where state = 'held'), min(first_seen)"
                " from {s}.gaps where projection = %s and state in ('open', 'held')"
            ),
            (projection,),
        ).fetchone()
        return (0, 0, None) if row is None else (int(row[0]), int(row[1]), _epoch(row[2]))

    def projection_figures(self, projections: Sequence[str], now: float) -> list[ProjectionFigures]:
        """Parked events, open gaps with the oldest one's age (by the daemon's clock), and open
        dead letters, per projection, in one round trip."""
        rows = self.conn.execute(
            self._q(
                "select p.name,"
                " (select count(*) from {s}.holding h where h.projection = p.name),"
                " (select count(*) from {s}.gaps g where g.projection = p.name"
                "  and g.state <> 'skipped'),"
                " (select min(first_seen) from {s}.gaps g where g.projection = p.name"
                "  and g.state <> 'skipped'),"
                " (select count(*) from {s}.dead_letters d where d.projection = p.name"
                "  and d.status = 'open')"
                " from unnest(%s::text[]) as p(name)"
            ),
            (list(projections),),
        ).fetchall()
        return [
            ProjectionFigures(
                r[0], r[1], r[2], 0.0 if r[3] is None else max(0.0, now - r[3].timestamp()), r[4]
            )
            for r in rows
        ]

    def list_dead_letters(
        self, projection: str, status: str | None, limit: int
    ) -> list[DeadLetterRow]:
        rows = self.conn.execute(
            self._q(
                f"select {_DL_COLUMNS} from {{s}}.dead_letters where projection = %s"
                " and (%s::text is null or status = %s) order by id limit %s"
            ),
            (projection, status, status, limit),
        ).fetchall()
        return [_dead_letter_row(r) for r in rows]

    def purge_dead_letters(self, projection: str, include_open: bool) -> int:
        with self.conn.transaction():
            cur = self.conn.execute(
                self._q(
                    "delete from {s}.dead_letters where projection = %s"
                    " and (%s or status <> 'open')"
                ),
                (projection, include_open),
            )
            return cur.rowcount

    def inspect_stream(self, projection: str, stream: str) -> StreamReport:
        conn, q = self.conn, self._q
        pos = conn.execute(
            q(
                "select stream, last_seq, last_id, last_hash, blocked_seq from {s}.positions"
                " where projection = %s and stream = %s"
            ),
            (projection, stream),
        ).fetchone()
        parked = conn.execute(
            q(
                "select seq, event from {s}.holding where projection = %s and stream = %s"
                " order by seq"
            ),
            (projection, stream),
        ).fetchall()
        letters = conn.execute(
            q(
                f"select {_DL_COLUMNS} from {{s}}.dead_letters where projection = %s"
                " and stream = %s order by id"
            ),
            (projection, stream),
        ).fetchall()
        return StreamReport(
            stream,
            None if pos is None else StreamPosition(pos[0], pos[1], pos[2], pos[3], pos[4]),
            [(seq, Event.from_json(event)) for seq, event in parked],
            self.list_gaps(projection, stream),
            [_dead_letter_row(r) for r in letters],
        )

    def sweep_documents(
        self,
        projection: str,
        unchanged_since: float,
        now: float,
        purge: Callable[[dict[str, Any]], dict[str, Any] | None],
        limit: int = 500,
    ) -> tuple[int, int]:
        """Forget the tombstones of documents unchanged since ``unchanged_since`` and not swept
        since their last change: ``purge`` returns the state to keep, or ``None`` when nothing
        is left (a deleted document: its row goes). Returns (swept, removed)."""
        with self.conn.transaction():
            rows = self.conn.execute(
                self._q(
                    "select stream, state from {s}.documents where projection = %s"
                    " and updated_at < %s and (swept_at is null or swept_at < updated_at)"
                    " limit %s for update skip locked"
                ),
                (projection, _ts(unchanged_since), limit),
            ).fetchall()
            kept = [(stream, purge(state)) for stream, state in rows]
            gone = [stream for stream, state in kept if state is None]
            with self.conn.cursor() as cur:
                cur.executemany(
                    self._q(
                        "update {s}.documents set state = %s, swept_at = %s"
                        " where projection = %s and stream = %s"
                    ),
                    [
                        (Jsonb(state), _ts(now), projection, stream)
                        for stream, state in kept
                        if state is not None
                    ],
                )
            if gone:
                self.conn.execute(
                    self._q("delete from {s}.documents where projection = %s and stream = any(%s)"),
                    (projection, gone),
                )
        return len(rows), len(gone)
