"""Redis store: projector's own state and the projections' views, one Lua script per batch.

A batch reads what it needs first, on one connection: under WATCH the version pointer, the
correlation records it touches or finds due, and whatever the handlers read (a correlation's
input progress is read unwatched: a stale read only lowers its watermark); the batch's stream
hashes (position, parked events, gaps, merge state) are read unwatched, each with its version
token (field ``v``, see below), or taken from the store's cache of the hashes it last read or
wrote (:class:`StreamCache`), as is the version. The runner plans as usual; the handlers'
writes and projector's own changes are collected as plain commands. The commit is MULTI /
EVALSHA / EXEC: the script checks the fence (each partition's epoch), that the version pointer
and every stream hash the batch read still hold what the batch planned on, and the type of
every key it will touch before it writes anything, since Redis never rolls a script back.
EXEC fails if anything WATCHed changed meanwhile, and the script answers "conflict" if the
pointer or a stream hash did (another instance touched one of the streams or records, a
rebuild swapped): either way the batch is planned again from fresh reads. A retry always plans
again, and a commit whose reply was lost is read back from the stored checkpoints, so it is
never applied twice. A pipelined batch's commit is sent after its block (``send_commit``) and
answered later (``wait_commit``): see :class:`RedisStore`.

Why tokens rather than WATCH for the stream hashes: a batch reads about one hash per event,
and Redis 7.0's WATCH scans the connection's whole list of watched keys for every key it adds
(quadratic: ~1 s of Redis time per 100k events). The token check is the same optimistic check
(DESIGN: "reads happen before, under WATCH, and a conflict means re-plan and retry"), done by
the batch script instead of by EXEC. Every write of a stream hash, by anyone, sets ``v`` to a
token drawn for that write (a batch draws one per batch), never a counter: a hash deleted and
written again can't come back to a token a reader saw (no ABA).

Keys, under ``<prefix>:`` (no TTLs, but on a rebuild's swapped-out version and its pause, so
only an ``allkeys-*`` policy could evict live ones):
- ``s:<projection>:epochs|offsets|owners|starts``: hashes per ``topic:partition`` (fence,
  checkpoint, first offset ever read); ``s:<projection>:times``: beside them, a correlation's
  input progress per ``topic:partition`` (``"<high>,<0|1>"``: the highest event time read, ms,
  empty when none; caught up); ``s:<projection>:version``: the version written;
- at that version, ``s:<projection>:<version>:st:<stream>``: a stream's hash: ``seq id hash
  blocked`` (position), ``p:<seq>`` (a parked event), ``gaps`` (JSON), ``doc``/``doc_at``,
  ``v`` (the version token of its last write);
- ``s:<projection>:<version>:parked`` (count), ``gaps``/``gapdue``/``gapskipped`` (sorted sets
  of ``[stream, from_seq]`` by first seen / next request), ``gapheld`` (set), ``gapsched``
  (hash: the gap timer's schedule of a gap, which wins over its stream hash's), ``dl`` (dead
  letters by id), ``dlseq``, ``dlopen``, ``docs`` (merge documents by last change);
- correlation (docs/correlation.md), at that version: ``co:<key>`` (a correlation record, the
  core's ``Pending`` as JSON), ``codue`` (sorted set: correlation key by due, event time ms)
  and ``coopen`` (set: the keys with open parts, for metrics);
- the outbox (:mod:`projector.store.redis_outbox`), not versioned: ``s:<projection>:outbox``
  (a stream, the queue), ``outbox:ids``, ``outbox:seq``, ``outbox:lock``; a rebuild's held
  business events at its version: ``cohold``, ``coholdts``, ``coholdseq``;
- ``v:<view_schema>:<version>:<key>``: the handlers' views; ``v:<view_schema>:active``: the
  version readers read.
A rebuild builds the next version beside the live one (:mod:`projector.store.redis_rebuild`).
The stream id is always the last part of its key, so distinct streams never share a key;
likewise a correlation key.
"""

from __future__ import annotations

import base64
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from importlib import resources
from itertools import chain
from typing import Any, cast

import redis
from redis.backoff import NoBackoff
from redis.client import Pipeline
from redis.connection import Connection
from redis.retry import Retry

from projector.core import json_codec
from projector.core.correlate import InputTime, Pending, watermark
from projector.core.dead_letter import DeadLetter
from projector.core.event import Event
from projector.core.gaps import Gap, parent_gap
from projector.core.message import RawMessage
from projector.core.sequencer import SequenceRules, StreamPosition
from projector.store import redis_outbox
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
    StoreError,
    StoreUnavailable,
    TransientStoreError,
    WriteConflict,
)
from projector.store.redis_view import Op, RedisView

log = logging.getLogger(__name__)

MAX_ARGS = 1000  # per recorded command: Lua's unpack() has a stack limit
DUE_PER_BATCH = 1000  # correlation records a batch closes at most; the next batch takes more
TOKEN = "v"  # a stream hash's field: the version token of its last write (module docstring)


def new_token() -> str:
    """A version token for one write of stream hashes (a batch, a sweep, a purge):
    random, so a hash deleted and written again never comes back to a token read before."""
    return secrets.token_hex(8)


def _watch(pipe: Pipeline, *keys: str) -> None:
    pipe.watch(*keys)  # type: ignore[no-untyped-call]


def _script(name: str) -> str:
    return resources.files("projector.store").joinpath(f"lua/{name}.lua").read_text()


class RedisWriteRejected(Exception):
    """A handler's write would fail in Redis (a key of another type, a counter that holds no
    number). Not transient: it is the handler's event that is at fault."""


class RedisStateCorrupt(StoreError):
    """One of projector's own keys has a type projector never gives it: something else writes
    in its namespace. The projection stops rather than guess."""


def version_pointer(prefix: str, projection: str) -> str:
    """Where the version of a projection's state and views is kept: the live one's, or, for
    "<name>#rebuild", the version it builds."""
    return f"{prefix}:s:{projection}:{'target' if projection.endswith(REBUILD) else 'version'}"


def reader_pointer(prefix: str, view_schema: str) -> str:
    """The active version of a view namespace, for readers: keys are under
    ``<prefix>:v:<view_schema>:<active version>:``."""
    return f"{prefix}:v:{view_schema}:active"


class Keys:
    """Key names of one projection at one version (see the module docstring). A rebuild
    ("<name>#rebuild") has its own fence and checkpoints, and builds <name>'s state and views
    at a version of their own; the swap makes that version the live one."""

    def __init__(self, prefix: str, projection: str, version: str) -> None:
        self.prefix = prefix
        self.version = version
        owner = projection.removesuffix(REBUILD)
        fence = f"{prefix}:s:{projection}"
        self.epochs = f"{fence}:epochs"  # topic:partition -> the owner's epoch (the fence)
        self.offsets = f"{fence}:offsets"  # topic:partition -> the next offset to read
        self.owners = f"{fence}:owners"  # topic:partition -> the instance that claimed it
        self.starts = f"{fence}:starts"  # topic:partition -> the first offset ever read
        self.times = f"{fence}:times"  # topic:partition -> a correlation's input progress
        self.pointer = version_pointer(prefix, projection)
        # Live batches stop while a rebuild swaps in (a rebuild's own batches never do).
        self.paused = "" if projection.endswith(REBUILD) else f"{prefix}:s:{owner}:paused"
        self.base = base = f"{prefix}:s:{owner}:{version}"
        self.parked = f"{base}:parked"  # how many events are parked, for metrics
        self.gaps = f"{base}:gaps"  # open and held gaps by first seen
        self.gapdue = f"{base}:gapdue"  # open and held gaps by next request time
        self.gapheld = f"{base}:gapheld"  # the held ones
        self.gapskipped = f"{base}:gapskipped"  # ranges given up on, by first seen
        self.gapsched = f"{base}:gapsched"  # gap -> its schedule, once the gap timer set one
        self.dl = f"{base}:dl"  # dead letter id -> its record (JSON)
        self.dlseq = f"{base}:dlseq"  # the last dead letter id
        self.dlopen = f"{base}:dlopen"  # ids of open dead letters
        self.docs = f"{base}:docs"  # merge documents by last change, for the sweep
        self.codue = f"{base}:codue"  # correlation key -> due (event time, ms)
        self.coopen = f"{base}:coopen"  # correlation keys with open parts, for metrics

    def stream(self, stream: str) -> str:
        return f"{self.base}:st:{stream}"

    def correlation(self, key: str) -> str:
        return f"{self.base}:co:{key}"

    def views(self, view_schema: str) -> str:
        return f"{self.prefix}:v:{view_schema}:{self.version}"


def _tp(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


def _untp(text: str) -> TopicPartition:
    topic, _, part = text.rpartition(":")
    return topic, int(part)


def input_time_text(t: InputTime) -> str:
    """A partition's input progress as ``times`` holds it: ``"<high>,<0|1>"``."""
    return f"{'' if t.high is None else t.high},{int(t.caught_up)}"


def parse_input_time(text: str) -> InputTime:
    high, _, caught_up = text.partition(",")
    return InputTime(int(high) if high else None, caught_up == "1")


def stored_input_times(
    times: Mapping[str, str], claimed: Iterable[str], topics: Collection[str]
) -> dict[TopicPartition, InputTime]:
    """Every claimed partition (``epochs``' fields) of ``topics`` with its stored progress;
    one with none stored yet holds the watermark unset (as a new checkpoint row does in
    PostgreSQL). Progress stored for a partition not claimed does not count."""
    out: dict[TopicPartition, InputTime] = {}
    for name in claimed:
        tp = _untp(name)
        if tp[0] in topics:
            raw = times.get(name)
            out[tp] = InputTime(None) if raw is None else parse_input_time(raw)
    return out


def _dumps(value: Any) -> str:
    return json_codec.dumps(value).decode()


def _gap_json(g: Gap) -> dict[str, Any]:
    """A gap as its stream hash keeps it: every field but the stream, in field order. Spelled
    out: ``dataclasses.asdict`` copies recursively, and took a third of a reordered batch's
    gap writes."""
    return {
        "from_seq": g.from_seq,
        "to_seq": g.to_seq,
        "first_seen": g.first_seen,
        "attempts": g.attempts,
        "last_request_at": g.last_request_at,
        "next_request_at": g.next_request_at,
        "state": g.state,
    }


def _gap(stream: str, d: Mapping[str, Any]) -> Gap:
    return Gap(stream, **d)


def _schedule_json(g: Gap) -> str:
    """A gap's replay schedule as ``gapsched`` keeps it."""
    return _dumps([g.attempts, g.last_request_at, g.next_request_at, g.state])


def _scheduled(g: Gap, schedule: str) -> Gap:
    """``g`` with the schedule the gap timer set for it, if it set one (``""``: none)."""
    if not schedule or g.state == "skipped":
        return g
    attempts, last, next_at, state = json_codec.loads(schedule)
    return replace(g, attempts=attempts, last_request_at=last, next_request_at=next_at, state=state)


def _member(stream: str, from_seq: int) -> str:
    return _dumps([stream, from_seq])


def _score(value: float | None) -> str:
    return "+inf" if value is None else repr(float(value))


def _chunks(command: str, key: str, args: Sequence[str], width: int) -> list[Op]:
    step = max(width, (MAX_ARGS // width) * width)
    return [[command, key, *args[i : i + step]] for i in range(0, len(args), step)]


_FIELDS_PER_READ = 5_000  # Lua's unpack() fails past about 8,000 values
# What a store's cache of stream hashes holds at most, in characters of field names and
# values (plus 64 a hash): a merge document or a parked event weighs what it holds. A workload
# of 10k streams with 10k parked events takes ~5 MB of it.
CACHED_CHARACTERS = 16_000_000
CONTENDED_BATCHES = 100  # batches planned the careful way after a conflict (RedisStore.contended)


class StreamCache:
    """The stream hashes this client last read or wrote, each with its version token, so
    that a batch on a hot stream reads nothing (nor the events it parked there). A cached
    hash is only a guess: the batch script checks every hash the batch planned on against
    the token it was planned with (conflict: planned again from fresh reads, the cache
    emptied). So a stale entry costs a re-plan, never a wrong write. Least recently used
    first out."""

    def __init__(self, size: int = CACHED_CHARACTERS) -> None:
        self.size = size
        self._hashes: OrderedDict[str, tuple[dict[str, str], int]] = OrderedDict()
        self._weight = 0
        # What was dropped as changed, and when (a count of drops): a batch planned before
        # on one of those hashes, and not yet sent, is planned again (``changed_since``).
        self.generation = 0
        self._forgotten: dict[str, int] = {}
        self._cleared_at = 0

    def get(self, key: str) -> dict[str, str] | None:
        """The hash as last seen (its token in field ``v``), or None. Not a copy: nothing
        changes a hash read or cached (a batch keeps its changes beside it, and puts a new
        dict in the cache)."""
        found = self._hashes.get(key)
        if found is None:
            return None
        self._hashes.move_to_end(key)
        return found[0]

    def put(self, key: str, fields: dict[str, str]) -> None:
        weight = 64 + sum(map(len, fields)) + sum(map(len, fields.values()))
        old = self._hashes.pop(key, None)
        if old is not None:
            self._weight -= old[1]
        self._hashes[key] = (fields, weight)
        self._weight += weight
        while self._weight > self.size:
            _, (_, gone) = self._hashes.popitem(last=False)
            self._weight -= gone

    def forget(self, keys: Iterable[str]) -> None:
        """Drop these hashes: they were written by someone else (or may have been)."""
        self.generation += 1
        for key in keys:
            self._forgotten[key] = self.generation
            old = self._hashes.pop(key, None)
            if old is not None:
                self._weight -= old[1]
        if len(self._forgotten) > 100_000:  # a long run's sweeps: start afresh
            self.clear()

    def clear(self) -> None:
        """Drop every hash (a batch was refused: what it planned on is read afresh)."""
        self.generation += 1
        self._cleared_at = self.generation
        self._forgotten.clear()
        self._hashes.clear()
        self._weight = 0

    def changed_since(self, generation: int, keys: Iterable[str]) -> bool:
        """Whether any of these hashes was dropped as changed after ``generation``."""
        if self._cleared_at > generation:
            return True
        forgotten = self._forgotten
        return bool(forgotten) and any(forgotten.get(key, 0) > generation for key in keys)

    def __len__(self) -> int:
        return len(self._hashes)


class _Stream:
    """One stream hash as read, and what the batch changes in it, kept beside it: ``stored``
    is never changed (it may be the cache's own dict)."""

    __slots__ = ("_stored_gaps", "dels", "gaps", "key", "sets", "stored", "token")

    def __init__(self, key: str, stored: dict[str, str]) -> None:
        self.key = key
        self.stored = stored  # the version token included, in ``v``
        self.sets: dict[str, str] = {}
        self.dels: set[str] = set()
        self.gaps: list[Gap] | None = None  # the stream's gap list once the batch changed it
        self.token = stored.get(TOKEN)  # None: no field, or no hash
        self._stored_gaps: list[Gap] | None = None  # parsed once: ``stored`` never changes

    def get(self, name: str) -> str | None:
        if name in self.sets:
            return self.sets[name]
        return None if name in self.dels else self.stored.get(name)

    def set(self, name: str, value: str) -> None:
        self.sets[name] = value
        self.dels.discard(name)

    def delete(self, name: str) -> None:
        self.sets.pop(name, None)
        self.dels.add(name)

    def stored_gaps(self, stream: str) -> list[Gap]:
        if self._stored_gaps is None:
            raw = self.stored.get("gaps")
            self._stored_gaps = [_gap(stream, d) for d in json_codec.loads(raw)] if raw else []
        return list(self._stored_gaps)

    def current_gaps(self, stream: str) -> list[Gap]:
        return list(self.gaps) if self.gaps is not None else self.stored_gaps(stream)

    def written(self) -> bool:
        """Whether the batch writes this hash (and so sets its token: see ``ops``)."""
        return bool(self.sets) or any(n in self.stored for n in self.dels)

    def after(self, token: str) -> dict[str, str]:
        """The hash as it stands once the batch that wrote ``token`` committed (the values
        of the events it parked included; a read leaves them out)."""
        dels = self.dels
        if not dels:
            return {**self.stored, **self.sets, TOKEN: token}
        fields = {n: v for n, v in self.stored.items() if n not in dels}
        fields.update(self.sets)
        fields[TOKEN] = token
        return fields


def _position(stream: str, s: _Stream, rules: SequenceRules) -> StreamPosition:
    get = s.get if s.sets or s.dels else s.stored.get  # as read: the usual case
    seq = get("seq")
    blocked = get("blocked")
    return StreamPosition(
        stream,
        rules.first_seq - 1 if seq is None else int(seq),
        get("id"),
        get("hash"),
        None if blocked is None else int(blocked),
    )


def _letter_record(d: DeadLetter, now: float) -> dict[str, Any]:
    e, m = d.event, d.message
    src = e.source if e is not None else (m.source if m is not None else None)
    return {
        "kind": d.kind,
        "reason": d.reason,
        "stream": d.stream,
        "seq": d.seq,
        "event": None if e is None else e.to_json(),
        "source": None if src is None else [src.topic, src.partition, src.offset],
        "key": None if m is None or m.key is None else base64.b64encode(m.key).decode(),
        "value": None if m is None or m.value is None else base64.b64encode(m.value).decode(),
        "status": "open",
        "attempts": 0,
        "created_at": now,
    }


def _letter_row(projection: str, letter_id: int, raw: str) -> DeadLetterRow:
    r = json_codec.loads(raw)
    message = None
    if r["source"] is not None and r["event"] is None:
        key = None if r["key"] is None else base64.b64decode(r["key"])
        value = None if r["value"] is None else base64.b64decode(r["value"])
        message = RawMessage(r["source"][0], r["source"][1], r["source"][2], key, value)
    return DeadLetterRow(
        letter_id,
        projection,
        r["kind"],
        r["reason"],
        r["stream"],
        r["seq"],
        None if r["event"] is None else Event.from_json(r["event"]),
        message,
        r["status"],
        r["attempts"],
        datetime.fromtimestamp(r["created_at"], UTC),
    )


class _Scripts:
    """The store's Lua scripts by SHA; loaded again when Redis answers NOSCRIPT (a restart
    without persistence of the script cache, SCRIPT FLUSH, a failover)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.source = {name: _script(name) for name in ("batch", "read", "claim", "schedule")}
        self.sha: dict[str, str] = {}

    def load(self) -> None:
        for name, text in self.source.items():
            self.sha[name] = str(self.client.script_load(text))

    def sha_of(self, name: str) -> str:
        if not self.sha:
            self.load()
        return self.sha[name]

    def call(
        self, runner: redis.Redis | Pipeline, name: str, keys: Sequence[str], *args: str
    ) -> Any:
        if not self.sha:
            self.load()
        try:
            return runner.evalsha(self.sha[name], len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            log.info("Redis lost projector's scripts (NOSCRIPT); loading them again")
            self.load()
            return runner.evalsha(self.sha[name], len(keys), *keys, *args)


class RedisBatch:
    """One batch of one projection (see :class:`projector.store.base.StoreBatch`)."""

    def __init__(
        self,
        store: RedisStore,
        projection: str,
        view_schema: str,
        check_writes: bool,
    ) -> None:
        self.projection = projection
        self.pipelined = False
        self._store = store
        self.planned_at = store.streams.generation  # what the cache had dropped by then
        self._opened: Pipeline | None = None
        self._pointer = version_pointer(store.prefix, projection)
        # The version as this store last saw it, else read: the batch script checks it still
        # is the pointer's (a rebuild swapped meanwhile: planned again, at the new version).
        version = store.seen_versions.get(projection)
        self._version_seen = version is not None
        if version is None:
            version = cast(str | None, self._pipe.get(self._pointer))
        self._version_read = version or ""
        self._own: list[Op] = []
        if version is None:
            if projection.endswith(REBUILD):
                raise RedisStateCorrupt(f"{projection} has no version to build: start it again")
            version = "1"  # the first batch ever: version 1, for writers and readers
            self._own += [
                ["SET", self._pointer, version],
                ["SET", reader_pointer(store.prefix, view_schema), version],
            ]
        self.keys = Keys(store.prefix, projection, str(version))
        self.token = new_token()  # set in every stream hash this batch writes
        self._namespace = self.keys.views(view_schema)
        self._check_writes = check_writes
        self._streams: dict[str, _Stream] = {}
        self._fence: list[list[str]] = []
        self._views: list[Op] = []
        self._parked_delta = 0
        self._letters: dict[int, dict[str, Any]] = {}
        self._payload: str | None = None  # the commit's, once prepared
        self._own_ops = 0  # how many of the commit's ops are projector's own, the views' after

    @property
    def _pipe(self) -> Pipeline:
        """The batch's connection for reads, opened at its first read (a batch planned from
        the store's caches opens none): the commit in flight is waited for first, and the
        version pointer WATCHed (which also makes the reads run at once) and checked."""
        if self._opened is None:
            pipe = self._opened = self._store.pipeline()
            _watch(pipe, self._pointer)
            # Planned at the version last seen: reading another version's keys would mislead
            # the handlers until the commit is refused.
            if self._version_seen and (pipe.get(self._pointer) or "") != self._version_read:
                self._store.contended()
                raise _conflict()
        return self._opened

    def release(self) -> None:
        """Give the batch's connection back (EXEC, or a refused EXEC, ended its WATCHes)."""
        if self._opened is not None:
            self._opened.reset()
            self._opened = None

    def stream_keys(self) -> Iterator[str]:
        return (s.key for s in self._streams.values())

    def connection(self) -> Connection | None:
        """The connection whose WATCHes the commit must go out on, if the batch has one."""
        return None if self._opened is None else self._opened.connection

    # -- reads ----------------------------------------------------------------------------
    def read(
        self, op: str, keys: Sequence[str], args: Sequence[str], watch: bool = True
    ) -> list[Any]:
        """One read script call for ``keys``; WATCHed first unless ``watch`` is false (the
        stream hashes: their version tokens are checked by the batch script instead)."""
        if not keys:
            return []
        if watch:
            _watch(self._pipe, *keys)
        rows = self._store.scripts.call(self._pipe, "read", keys, op, *args)
        if op in ("get", "hget", "zscore", "exists"):
            return [r[0] for r in rows]
        return list(rows)

    def _load(self, streams: Iterable[str]) -> dict[str, _Stream]:
        """The stream hashes, once per batch, not WATCHed: as the store's cache holds them,
        else read. Each one's version token goes to the batch script, which refuses the
        commit ("conflict") if it changed."""
        cache = self._store.streams
        warm = self._store.plans_ahead  # the cache is not used while another writer is about
        unread: list[tuple[str, str]] = []
        for stream in {s for s in streams if s not in self._streams}:
            key = self.keys.stream(stream)
            cached = cache.get(key) if warm else None
            if cached is None:
                unread.append((stream, key))
            else:
                self._streams[stream] = _Stream(key, cached)
        unread.sort()
        rows = self.read("stream", [key for _, key in unread], [], watch=False)
        for (stream, key), flat in zip(unread, rows, strict=True):
            self._streams[stream] = _Stream(key, dict(zip(flat[::2], flat[1::2], strict=True)))
        return self._streams

    def _stream(self, stream: str) -> _Stream:
        """One stream's hash: as loaded already (the writes' case: the planning read it), else
        read now."""
        found = self._streams.get(stream)
        return found if found is not None else self._load([stream])[stream]

    # -- the StoreBatch interface ---------------------------------------------------------
    def fence(
        self,
        checkpoints: Mapping[TopicPartition, int],
        epochs: Mapping[TopicPartition, int],
        starts: Mapping[TopicPartition, int] | None = None,
    ) -> None:
        """Checked by the script at commit: ``Fenced`` is raised then, and nothing written."""
        starts = starts or {}
        for tp, offset in sorted(checkpoints.items()):
            self._fence_entry(tp, epochs.get(tp, -1), offset, starts.get(tp))

    def hold(self, epochs: Mapping[TopicPartition, int]) -> None:
        """The fence of a batch that moves no offset (a correlation's idle tick), checked by
        the script at commit like ``fence``."""
        for tp, epoch in sorted(epochs.items()):
            self._fence_entry(tp, epoch, None, None)

    def _fence_entry(
        self, tp: TopicPartition, epoch: int, offset: int | None, start: int | None
    ) -> None:
        """One partition's fence for batch.lua; an empty offset or start moves nothing."""
        k = self.keys
        self._fence.append(
            [
                k.epochs,
                k.offsets,
                _tp(*tp),
                str(epoch),
                "" if offset is None else str(offset),
                k.starts,
                "" if start is None else str(start),
                k.paused,
            ]
        )

    def read_ahead(self, streams: Iterable[str]) -> dict[str, StreamPosition]:
        return {}  # planned before the batch ahead lands: nothing waits for its reads

    def lock_positions(
        self, streams: Iterable[str], rules: SequenceRules
    ) -> dict[str, StreamPosition]:
        names = set(streams)
        loaded = self._load(names)
        return {s: _position(s, loaded[s], rules) for s in names}

    def held_seqs(self, streams: Iterable[str]) -> HeldSeqs:
        parked: dict[str, set[int]] = {}
        skipped: dict[str, list[tuple[int, int]]] = {}
        names = set(streams)
        loaded = self._load(names)
        for stream in names:
            s = loaded[stream]
            stored = s.stored
            # Every write keeps a stream's gaps as the seqs missing up to its highest parked
            # one: without gaps or a blocked seq it has nothing parked (nor skipped).
            if (
                not (s.sets or s.dels or s.gaps)
                and "gaps" not in stored
                and "blocked" not in stored
            ):
                continue
            seqs = {int(n[2:]) for n in (*stored, *s.sets) if n.startswith("p:")}
            seqs -= {int(n[2:]) for n in s.dels if n.startswith("p:")}
            if seqs:
                parked[stream] = seqs
            for g in s.current_gaps(stream):
                if g.state == "skipped":
                    skipped.setdefault(stream, []).append((g.from_seq, g.to_seq))
        return parked, skipped

    def load_parked(self, wanted: Mapping[str, Iterable[int]]) -> dict[str, dict[int, Event]]:
        """The parked events wanted. Their values are not in a hash as read (see read.lua's
        "stream"), but are in one this store parked them into (cached); the others are read
        now, in one round trip, a stream's fields split in parts that Lua's ``unpack`` takes.
        Not WATCHed: a hash changed since ``_load`` has another version token, and the commit
        is refused; one whose parked event is gone already is a conflict at once."""
        loaded = self._load(wanted)
        parked: dict[str, dict[int, Event]] = {}
        unread: list[tuple[str, list[str]]] = []
        for stream, seqs in sorted(wanted.items()):
            s, names = loaded[stream], []
            for seq in sorted(seqs):
                name = f"p:{seq}"
                value = s.sets.get(name) or s.stored.get(name)
                if value:
                    parked.setdefault(stream, {})[seq] = Event.from_json(json_codec.loads(value))
                elif name in s.stored:
                    names.append(name)
            unread += [
                (stream, names[i : i + _FIELDS_PER_READ])
                for i in range(0, len(names), _FIELDS_PER_READ)
            ]
        args = [arg for _, names in unread for arg in (str(len(names)), *names)]
        keys = [loaded[stream].key for stream, _ in unread]
        values = self.read("fields", keys, args, watch=False)
        for (stream, names), raws in zip(unread, values, strict=True):
            for name, raw in zip(names, raws, strict=True):
                if raw is None:  # drained by another writer since the hash was read
                    self._store.contended()
                    raise _conflict()
                parked.setdefault(stream, {})[int(name[2:])] = Event.from_json(
                    json_codec.loads(raw)
                )
        return parked

    def load_gaps(self, streams: Iterable[str]) -> dict[str, list[Gap]]:
        loaded = self._load(streams)
        out: dict[str, list[Gap]] = {}
        for stream in set(streams):
            found = [g for g in loaded[stream].current_gaps(stream) if g.state != "skipped"]
            if found:
                out[stream] = found
        return out

    def mark_skipped(self, gap: Gap) -> None:
        s = self._stream(gap.stream)
        s.gaps = [
            replace(g, state="skipped") if g.from_seq == gap.from_seq else g
            for g in s.current_gaps(gap.stream)
        ]

    @contextmanager
    def rolled_back(self) -> Iterator[None]:
        mark = len(self._views)
        try:
            yield
        finally:
            del self._views[mark:]

    def run_handlers(self, handlers: Sequence[Handler], items: Sequence[Any]) -> None:
        if not items:
            return
        mark = len(self._views)
        view = RedisView(self._namespace, self._views, self.read)
        try:
            for handler in handlers:
                handler(items, view)
            if self._check_writes:
                self._dry_run(mark)
        except BaseException:
            del self._views[mark:]
            raise

    def _dry_run(self, mark: int) -> None:
        """Check this batch's view writes so far without writing: the first that would fail,
        if it is one of these handlers' (from ``mark`` on), is their error."""
        verdict = self._store.scripts.call(
            self._store.client, "batch", [], "check", _dumps({"fence": [], "ops": self._views})
        )
        if verdict[0] == "badwrite":
            index = int(verdict[1]) - 1
            if index >= mark:
                raise RedisWriteRejected(verdict[2])
            raise TransientStoreError(f"a view write checked before is rejected now: {verdict[2]}")

    def write_positions(self, positions: Iterable[StreamPosition]) -> None:
        for p in positions:
            s = self._stream(p.stream)
            if p.last_id is not None and p.last_hash is not None and not s.dels:
                # The usual position, on a stream the batch deleted nothing of: set at once.
                s.sets.update(seq=str(p.last_seq), id=p.last_id, hash=p.last_hash)
            else:
                s.set("seq", str(p.last_seq))
                for name, value in (("id", p.last_id), ("hash", p.last_hash)):
                    if value is None:
                        s.delete(name)
                    else:
                        s.set(name, value)
            if p.blocked_seq is not None:
                s.set("blocked", str(p.blocked_seq))
            elif "blocked" in s.stored or "blocked" in s.sets:  # else there is none to delete
                s.delete("blocked")

    def park(self, events: Iterable[Event]) -> None:
        for e in events:
            self._stream(e.stream).set(f"p:{e.seq}", _dumps(e.to_json()))
            self._parked_delta += 1

    def unpark(self, keys: Iterable[tuple[str, int]]) -> None:
        for stream, seq in keys:
            s = self._stream(stream)
            if f"p:{seq}" in s.stored:
                s.delete(f"p:{seq}")
                self._parked_delta -= 1

    def replace_gaps(self, streams: Iterable[str], gaps: Iterable[Gap]) -> None:
        names = set(streams)
        new: dict[str, list[Gap]] = {s: [] for s in names}
        for g in gaps:
            new[g.stream].append(g)
        for stream, s in self._load(names).items():
            if stream in names:
                kept = [g for g in s.current_gaps(stream) if g.state == "skipped"]
                s.gaps = kept + new[stream]

    def dead_letter(self, letters: Iterable[DeadLetter]) -> None:
        k = self.keys
        for d in letters:
            record = _dumps(_letter_record(d, self._store.now()))
            self._own.append(["DLADD", k.dl, k.dlseq, k.dlopen, record])

    def lock_documents(self, streams: Iterable[str]) -> dict[str, dict[str, Any] | None]:
        names = set(streams)
        loaded = self._load(names)
        out: dict[str, dict[str, Any] | None] = {}
        for stream in names:
            raw = loaded[stream].get("doc")
            out[stream] = None if raw is None else json_codec.loads(raw)
        return out

    def write_documents(self, states: Mapping[str, dict[str, Any]], now: float) -> None:
        for stream, state in states.items():
            s = self._stream(stream)
            s.set("doc", _dumps(state))
            s.set("doc_at", repr(now))
            self._own.append(["ZADD", self.keys.docs, repr(now), stream])

    # -- correlation (docs/correlation.md, section 6) ----------------------------------------
    def lock_correlations(self, keys: Iterable[str], watermark: int | None) -> dict[str, Pending]:
        """The records of ``keys`` and of (at most ``DUE_PER_BATCH``) keys due at
        ``watermark``, read under WATCH: another instance writing one of them before this
        batch commits (closing a record both found due, adding a part) makes the commit fail
        and the batch is planned again from fresh reads. The due index is not watched (every
        batch writes it); a record no longer due when read is left as it is by the plan."""
        k = self.keys
        names = set(keys)
        if watermark is not None:
            due = self._pipe.zrangebyscore(k.codue, "-inf", watermark, start=0, num=DUE_PER_BATCH)
            names.update(cast(list[str], due))
        ordered = sorted(names)
        raws = self.read("get", [k.correlation(n) for n in ordered], [])
        return {
            name: Pending.from_json(json_codec.loads(raw))
            for name, raw in zip(ordered, raws, strict=True)
            if raw is not None
        }

    def write_correlations(
        self, write: Iterable[tuple[Pending, int | None]], delete: Iterable[str]
    ) -> None:
        k = self.keys
        for record, due in write:
            self._own.append(["COSET", k.correlation(record.key), _dumps(record.to_json())])
            if due is None:
                self._own.append(["ZREM", k.codue, record.key])
            else:
                self._own.append(["ZADD", k.codue, str(due), record.key])
            self._own.append(["SADD" if record.parts else "SREM", k.coopen, record.key])
        gone = sorted(set(delete))
        self._own += [["DEL", k.correlation(name)] for name in gone]
        self._own += _chunks("ZREM", k.codue, gone, 1) + _chunks("SREM", k.coopen, gone, 1)

    def input_times(self, topics: Iterable[str]) -> dict[TopicPartition, InputTime]:
        """Read in one round trip and not WATCHed: every owner writes its partitions' progress
        with each batch, and a stale read only lowers the watermark (windows close later,
        never wrongly)."""
        k = self.keys
        times, claimed = self._store.scripts.call(
            self._pipe, "read", [k.times, k.epochs], "hgetall"
        )
        stored = dict(zip(times[::2], times[1::2], strict=True))
        return stored_input_times(stored, claimed[::2], set(topics))

    def write_input_times(self, times: Mapping[TopicPartition, InputTime]) -> None:
        """Written by the script after its fence check; a stored high never goes back."""
        for (topic, part), t in sorted(times.items()):
            self._own.append(["COTIME", self.keys.times, _tp(topic, part), input_time_text(t)])

    def write_outbox(
        self, messages: Sequence[OutboxMessage], prune_held_before: int | None = None
    ) -> int:
        """Queued by the script after its fence and type checks (``OUTBOX``: only an id not
        in ``outbox:ids`` is added to the queue); a rebuild's batch holds them at the version it
        builds instead, after pruning (:mod:`projector.store.redis_outbox`). Returns how many
        were handed to the script: which are new is only known when it runs."""
        k = self.keys
        owner = self.projection.removesuffix(REBUILD)
        held = self.projection.endswith(REBUILD)
        self._own += redis_outbox.batch_ops(
            k.prefix, owner, k.base, messages, held, prune_held_before
        )
        return len(messages)

    def lock_dead_letter(self, letter_id: int) -> DeadLetterRow | None:
        raw = self.read("hget", [self.keys.dl], [str(letter_id)])[0]
        if raw is None:
            return None
        self._letters[letter_id] = json_codec.loads(raw)
        return _letter_row(self.projection, letter_id, raw)

    def resolve_dead_letter(self, letter_id: int, status: str, reason: str | None = None) -> None:
        record = self._letters[letter_id]
        record["status"] = status
        if reason is not None:
            record["reason"] = reason
        if status == "open":
            record["attempts"] += 1
        k = self.keys
        self._own.append(["HSET", k.dl, str(letter_id), _dumps(record)])
        self._own.append(["SADD" if status == "open" else "SREM", k.dlopen, str(letter_id)])

    # -- the commit -----------------------------------------------------------------------
    def ops(self) -> list[Op]:
        """Projector's own changes as commands, then the handlers' view writes. Every stream
        hash written gets this batch's version token (``v``) in its first HSET."""
        k = self.keys
        own: list[Op] = []
        for stream, s in sorted(self._streams.items()):
            if s.gaps is not None:
                own += self._gap_ops(stream, s)
            gone = sorted(n for n in s.dels if n in s.stored) if s.dels else ()
            if s.sets or gone:
                pairs = [TOKEN, self.token, *chain.from_iterable(sorted(s.sets.items()))]
                if len(pairs) <= MAX_ARGS:
                    own.append(["HSET", s.key, *pairs])
                else:
                    own += _chunks("HSET", s.key, pairs, 2)
            if gone:
                own += _chunks("HDEL", s.key, gone, 1)
        if self._parked_delta:
            own.append(["INCRBY", k.parked, str(self._parked_delta)])
        return own + self._own + self._views

    def _gap_ops(self, stream: str, s: _Stream) -> list[Op]:
        """The indexes' changes for the stream's new gap list. A gap that stays (its first
        seq unchanged) keeps its entries, schedule included, as they stand: the gap timer may
        have moved them since this batch read the stream. One carved out of an older gap (a
        seq at its start or in its middle arrived) takes the older one's, copied in the
        script; the older one's go if it went."""
        k = self.keys
        assert s.gaps is not None
        ops: list[Op] = []
        before = {g.from_seq: g for g in s.stored_gaps(stream) if g.state != "skipped"}
        staying: set[int] = set()
        for g in s.gaps:
            member = _member(stream, g.from_seq)
            if g.state == "skipped":
                ops.append(["ZADD", k.gapskipped, _score(g.first_seen), member])
                continue
            if g.from_seq in before:
                staying.add(g.from_seq)
                continue
            ops.append(["ZADD", k.gaps, _score(g.first_seen), member])
            parent = parent_gap(before.values(), g.from_seq, g.to_seq)
            held = "1" if g.state == "held" else "0"
            score = _score(g.next_request_at)
            if parent is None:
                ops.append(["ZADD", k.gapdue, score, member])
                if held == "1":
                    ops.append(["SADD", k.gapheld, member])
            else:
                origin = _member(stream, parent.from_seq)
                ops.append(
                    ["GAPCOPY", k.gapsched, k.gapdue, k.gapheld, member, score, held, origin]
                )
        gone = [_member(stream, f) for f in before if f not in staying]
        if gone:
            for index in (k.gaps, k.gapdue):
                ops += _chunks("ZREM", index, gone, 1)
            ops += _chunks("SREM", k.gapheld, gone, 1)
            ops += _chunks("HDEL", k.gapsched, gone, 1)
        if s.gaps:
            s.set("gaps", _dumps([_gap_json(g) for g in s.gaps]))
        else:
            s.delete("gaps")
        return ops

    def versions(self) -> list[list[str]]:
        """Every stream hash the batch read, written or not, with the version token it was
        read with ("" for none): the batch script checks them before it writes anything."""
        return [[s.key, s.token or ""] for _, s in sorted(self._streams.items())]

    def prepare(self) -> bool:
        """Build the commit (the batch script's argument); False when there is nothing to
        commit. The store's caches take the batch's writes as done: the next batch may be
        planned on them before this one's answer (a stale entry is a conflict then)."""
        ops = self.ops()
        if not ops and not self._fence:
            return False
        self._own_ops = len(ops) - len(self._views)
        pointer = [self._pointer, self._version_read]
        batch = {"fence": self._fence, "ops": ops, "versions": self.versions(), "pointer": pointer}
        self._payload = _dumps(batch)
        self._remember()
        return True

    @property
    def payload(self) -> str:
        assert self._payload is not None, "prepare() first"
        return self._payload

    def _remember(self) -> None:
        """Keep the batch's stream hashes in the store's cache as they stand once it commits
        (as read where it writes none), and its version."""
        cache = self._store.streams
        self._store.seen_versions[self.projection] = self.keys.version
        for s in self._streams.values():
            cache.put(s.key, s.after(self.token if s.written() else s.token or ""))

    def forget_guesses(self) -> None:
        """The batch will not be sent (planned again): what it put in the store's cache as
        its outcome goes. Its hashes go back to how it read them, but for those dropped as
        changed since it was planned, which are dropped (all of them, if the cache was
        emptied since: the batch before it failed where it landed, maybe while this one was
        planned). Emptying the whole cache instead, each time a sweep rewrote a stream the
        next batch touched, made the batches after it read every stream again."""
        cache = self._store.streams
        keys = [s.key for s in self._streams.values()]
        changed = {key for key in keys if cache.changed_since(self.planned_at, (key,))}
        cache.forget(changed)
        for s in self._streams.values():
            if s.key not in changed:
                cache.put(s.key, {**s.stored, TOKEN: s.token or ""})

    def verdict(self, reply: list[Any]) -> None:
        """Raise what the batch script's answer means, if it is not "ok"."""
        if reply[0] == "ok":
            return
        if reply[0] == "conflict":  # a stream hash's token, or the version, changed
            raise _conflict()
        if reply[0] == "fenced":
            raise Fenced([_untp(f) for f in reply[1:]])
        if reply[0] == "paused":
            raise TransientStoreError("a rebuild is swapping in; the batch waits for it")
        if reply[0] == "badwrite":
            index = int(reply[1])
            if index <= self._own_ops:
                raise RedisStateCorrupt(f"projector's own state in Redis is damaged: {reply[2]}")
            self._store.check_writes_once()
            raise TransientStoreError(f"a handler's write was rejected ({reply[2]}); re-planning")
        raise RedisStateCorrupt(f"the batch script answered {reply!r}")


def _conflict() -> WriteConflict:
    return WriteConflict(
        "another instance changed what the batch read (a stream, a correlation record,"
        " a view); planning it again"
    )


def _disconnect(conn: Connection) -> None:
    conn.disconnect()  # type: ignore[no-untyped-call]


def _read_exec(conn: Connection) -> list[Any]:
    """The batch script's answer, from the replies to MULTI, EVALSHA and EXEC sent on
    ``conn``: WriteConflict when a WATCHed key changed (EXEC answers nil)."""
    queued: list[redis.exceptions.ResponseError] = []
    for _ in range(2):
        try:
            conn.read_response()
        except redis.exceptions.ResponseError as exc:  # not queued: EXEC aborts below
            queued.append(exc)
    try:
        reply = conn.read_response()
    except redis.exceptions.ExecAbortError:
        if queued:
            raise queued[-1] from None
        raise
    if reply is None:
        raise _conflict()
    answer = reply[0]
    if isinstance(answer, Exception):
        raise answer
    return cast(list[Any], answer)


class RedisStore:
    """One client per projection worker or command (see :class:`projector.store.base.Store`).

    A pipelined batch's block ends with its commit prepared (:meth:`RedisBatch.prepare`);
    :meth:`send_commit` sends it (MULTI / EVALSHA / EXEC) and leaves it in flight, and
    :meth:`wait_commit` reads its answer. Planned from the store's caches, the next batch
    reads nothing, so it is planned while this one runs in Redis. Anything else that uses the
    client first waits for the commit in flight (its error kept for ``wait_commit``)."""

    @property
    def commits_in_flight(self) -> bool:
        return self.plans_ahead  # both, or neither while contended (see ``contended``)

    @property
    def plans_ahead(self) -> bool:
        return self._batches >= self._contended_until

    traces_in_pipeline = True  # the batch script applies all or nothing; culprits found here

    def __init__(
        self,
        url: str,
        prefix: str = "projector",
        connect_timeout: float = 10.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.prefix = prefix
        self.now = clock or time.time
        # No retries inside the client: a retried EXEC whose first reply was lost would
        # apply a batch twice. The runner retries by planning the batch again.
        self._client: redis.Redis = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=connect_timeout,
            socket_timeout=max(30.0, connect_timeout),
            socket_keepalive=True,
            retry=Retry(NoBackoff(), 0),
        )
        self.scripts = _Scripts(self._client)
        self.streams = StreamCache()
        self.seen_versions: dict[str, str] = {}  # projection: its version, as last seen
        self._check_writes = False
        self._batches = 0  # batches begun
        self._contended_until = 0  # no cache, no commit in flight before this many (contended)
        self._prepared: RedisBatch | None = None  # a pipelined batch's commit, not sent
        self._sent: tuple[RedisBatch, Connection] | None = None  # sent, its answer unread
        self._late_error: Exception | None = None  # what the commit in flight failed with

    @property
    def client(self) -> redis.Redis:
        """The client, once the commit in flight (if any) has answered."""
        self._settle()
        return self._client

    def pipeline(self) -> Pipeline:
        """A transaction pipeline, once the commit in flight (if any) has answered."""
        return self.client.pipeline(transaction=True)

    def close(self) -> None:
        """Close the client. A commit still in flight is not waited for: its connection is
        dropped, and ``wait_commit`` raises a transient error (whether it applied is read
        back from the stored checkpoints); a prepared one is never sent, and raises so too."""
        if self._sent is not None:
            tx, conn = self._sent
            self._sent = None
            _disconnect(conn)
            self._lost(tx, conn, "the store was closed with the commit in flight")
        if self._prepared is not None:
            self._prepared.release()
            self._prepared = None
            if self._late_error is None:  # the worker takes it for in flight: never landed
                self._late_error = TransientStoreError(
                    "the store was closed before the batch's commit was sent; it is applied again"
                )
        self.forget_all()
        self._client.close()

    def forget_all(self) -> None:
        self.streams.clear()
        self.seen_versions.clear()

    def contended(self) -> None:
        """Another writer changed what a batch planned on (a conflict). Where that happens
        often (two instances on shared streams: a replay topic) the cache's guesses keep
        failing, and each costs a batch planned again: so for the next batches the store reads
        before it plans and waits for each commit, as it would without a cache. Measured with
        two consumers on the benchmark's reordered workload: 4,400-6,800 events/s guessing,
        9,800 so (10,700 before the cache)."""
        self.forget_all()
        self._contended_until = self._batches + CONTENDED_BATCHES

    def check_writes_once(self) -> None:
        """The next batch checks each handler's writes as they are made, so that the one that
        fails is traced to its event."""
        self._check_writes = True

    def apply(
        self,
        pipe: Pipeline,
        fence: list[list[str]],
        ops: list[Op],
        versions: Sequence[Sequence[str]] = (),
    ) -> list[Any]:
        """MULTI / EVALSHA batch / EXEC on ``pipe`` (WatchError if a WATCHed key changed);
        the script's verdict ("conflict" if a stream hash of ``versions``, ``[key, token
        read]``, holds another token now). A NOSCRIPT loads the scripts again and the caller
        plans anew."""
        pipe.multi()
        batch = {"fence": fence, "ops": ops, "versions": versions}
        self.scripts.call(pipe, "batch", [], "commit", _dumps(batch))
        try:
            verdict: list[Any] = pipe.execute()[0]
        except redis.exceptions.NoScriptError:
            self.scripts.load()
            raise TransientStoreError("Redis lost projector's scripts; loaded them again") from None
        return verdict

    def _apply_own(self, pipe: Pipeline, ops: list[Op]) -> None:
        """Projector's own changes outside a batch (purge, sweep). They may write stream
        hashes, with a token of their own: those are dropped from the cache (a batch planned
        on one before is planned again)."""
        if not ops:
            return
        self.streams.forget(op[1] for op in ops)
        verdict = self.apply(pipe, [], ops)
        if verdict[0] != "ok":
            raise RedisStateCorrupt(f"projector's own state in Redis is damaged: {verdict}")

    def keys(self, projection: str) -> Keys:
        """The projection's keys at its current version."""
        version = self.client.get(version_pointer(self.prefix, projection))
        return Keys(self.prefix, projection, "1" if version is None else str(version))

    @contextmanager
    def _watching(self) -> Iterator[Pipeline]:
        try:
            with self.client.pipeline(transaction=True) as pipe:
                yield pipe
        except redis.exceptions.ConnectionError as exc:
            raise StoreUnavailable(f"cannot reach Redis: {exc}") from exc

    @contextmanager
    def batch(
        self, projection: str, view_schema: str, pipelined: bool = False
    ) -> Iterator[RedisBatch]:
        """A batch, applied by one script when the block exits normally: its answer waited
        for, or, ``pipelined``, the commit prepared for :meth:`send_commit`."""
        checked, self._check_writes = self._check_writes, False
        self._batches += 1
        try:
            tx = RedisBatch(self, projection, view_schema, checked)
        except redis.exceptions.ConnectionError as exc:
            raise StoreUnavailable(f"cannot reach Redis: {exc}") from exc
        handed = False
        try:
            yield tx
            if tx.prepare():
                handed = True
                if pipelined:
                    self._prepared = tx
                else:
                    self._send(tx)
                    self.wait_commit()
        except TransientStoreError:
            if checked:
                self._check_writes = True  # keep checking until that batch goes through
            raise
        except redis.exceptions.ConnectionError as exc:
            raise StoreUnavailable(f"cannot reach Redis: {exc}") from exc
        finally:
            if not handed:
                tx.release()

    def send_commit(self) -> bool:
        """Send the commit the last pipelined batch prepared, and leave it in flight. False
        if, since it was planned, a hash it planned on was dropped as changed (the batch
        before it was refused where it landed; the tombstone sweep rewrote a stream): it is not
        sent, and the caller plans it again. Sent, it would only be refused."""
        tx, self._prepared = self._prepared, None
        if tx is None:
            return True
        if self.streams.changed_since(tx.planned_at, tx.stream_keys()):
            tx.release()
            tx.forget_guesses()  # it took its own writes as done
            return False
        self._send(tx)
        return True

    def _send(self, tx: RedisBatch) -> None:
        """MULTI / EVALSHA / EXEC, the answer not read: on the batch's own connection if it
        has one (its WATCHes hold there), else on one from the pool, kept until answered."""
        self._settle()  # one commit in flight at a time, answered in order
        sha = self.scripts.sha_of("batch")
        conn = tx.connection() or self._client.connection_pool.get_connection()
        self._sent = (tx, conn)
        try:
            commands = [("MULTI",), ("EVALSHA", sha, 0, "commit", tx.payload), ("EXEC",)]
            conn.send_packed_command(conn.pack_commands(commands))  # type: ignore[no-untyped-call]
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            self._sent = None
            _disconnect(conn)
            self._lost(tx, conn, f"the connection to Redis was lost sending the commit ({exc})")

    def _settle(self) -> None:
        """Read the answer of the commit in flight; what it failed with is kept for
        ``wait_commit``. A batch refused for any reason empties the caches: whatever it
        planned on is read afresh."""
        if self._sent is None:
            return
        tx, conn = self._sent
        self._sent = None
        try:
            reply = _read_exec(conn)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            _disconnect(conn)
            self._lost(tx, conn, f"the connection to Redis was lost at the commit ({exc})")
            return
        except redis.exceptions.NoScriptError:
            self._failed(tx, conn, TransientStoreError("Redis lost projector's scripts"))
            self.scripts.load()
            return
        except Exception as exc:
            self._failed(tx, conn, exc)
            return
        try:
            tx.verdict(reply)
        except Exception as exc:
            self._failed(tx, conn, exc)
            return
        self._release(tx, conn)

    def _lost(self, tx: RedisBatch, conn: Connection, what: str) -> None:
        error = TransientStoreError(
            f"{what}; whether it applied is read back from the stored checkpoints"
        )
        self._failed(tx, conn, error)

    def _failed(self, tx: RedisBatch, conn: Connection, exc: Exception) -> None:
        if isinstance(exc, WriteConflict):
            self.contended()
        else:
            self.forget_all()
        if self._late_error is None:
            self._late_error = exc
        self._release(tx, conn)

    def _release(self, tx: RedisBatch, conn: Connection) -> None:
        if tx.connection() is conn:
            tx.release()
        else:
            self._client.connection_pool.release(conn)

    def wait_commit(self) -> None:
        """Wait for the commit in flight, raising what it failed with (a refusal of the
        batch script, a lost connection); at once when there is none."""
        self._settle()
        error, self._late_error = self._late_error, None
        if error is not None:
            try:
                raise error
            finally:
                # Its traceback holds this frame: through ``error`` the two would be a cycle,
                # kept with the failed batch's objects until the garbage collector came.
                error = None

    def claim(
        self, projection: str, partitions: Iterable[TopicPartition], owner: str
    ) -> dict[TopicPartition, Claim]:
        parts = sorted(partitions)
        if not parts:
            return {}
        k = self.keys(projection)
        fields = [_tp(t, p) for t, p in parts]
        rows = self.scripts.call(
            self.client, "claim", [k.epochs, k.offsets, k.owners], owner, *fields
        )
        return {
            tp: Claim(int(epoch), None if offset is None else int(offset))
            for tp, (epoch, offset) in zip(parts, rows, strict=True)
        }

    def checkpoints(self, projection: str) -> dict[TopicPartition, int | None]:
        k = self.keys(projection)
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hkeys(k.epochs)
            pipe.hgetall(k.offsets)
            claimed, offsets = pipe.execute()
        out: dict[TopicPartition, int | None] = {_untp(f): None for f in claimed}
        out.update({_untp(f): int(v) for f, v in offsets.items()})
        return out

    # -- gaps -----------------------------------------------------------------------------
    # A gap's record lives in its stream hash (field ``gaps``), written by the batches, its
    # replay schedule as the batch that opened it set it. The gap timer keeps the schedule it
    # moves in ``gapsched`` instead (schedule.lua), which wins where present: so a claim
    # never changes a stream hash, and a batch planned meanwhile on that hash (the next one,
    # planned while a commit is in flight; another consumer's) is not planned again. When
    # the gap timer rewrote the hash, 13% of a reordered run's batches were planned twice
    # with one consumer; with two, the conflicts kept the store from planning ahead at all.
    def _scheduled_gaps(
        self, k: Keys, streams: Sequence[str]
    ) -> tuple[dict[str, list[Gap]], dict[str, str]]:
        """The streams' gap records, each with its schedule in effect, and the schedules
        ``gapsched`` holds, by member ("" for none): what a compare-and-set expects."""
        if not streams:
            return {}, {}
        rows = self.scripts.call(
            self.client, "read", [k.stream(s) for s in streams], "hget", "gaps"
        )
        stored = {
            s: [_gap(s, d) for d in json_codec.loads(raw)] if raw else []
            for s, (raw,) in zip(streams, rows, strict=True)
        }
        members = [_member(s, g.from_seq) for s in streams for g in stored[s]]
        held = self.client.hmget(k.gapsched, members) if members else []
        schedules = {m: raw or "" for m, raw in zip(members, cast(list[Any], held), strict=True)}
        gaps = {
            s: [_scheduled(g, schedules[_member(s, g.from_seq)]) for g in found]
            for s, found in stored.items()
        }
        return gaps, schedules

    def _set_schedules(self, k: Keys, entries: Sequence[tuple[str, str, Gap | None]]) -> list[str]:
        """schedule.lua for ``(member, schedule read, gap with its new schedule, or None to
        forget it if gone)``: "ok", "moved" or "gone" for each."""
        if not entries:
            return []
        args: list[str] = []
        for member, read, gap in entries:
            if gap is None:
                args += [member, read, "", "+inf", "0"]
            else:
                args += [
                    member,
                    read,
                    _schedule_json(gap),
                    _score(gap.next_request_at),
                    "1" if gap.state == "held" else "0",
                ]
        keys = [k.gaps, k.gapdue, k.gapheld, k.gapsched]
        try:
            return cast(list[str], self.scripts.call(self.client, "schedule", keys, *args))
        except redis.exceptions.ResponseError as exc:
            raise RedisStateCorrupt(f"projector's own state in Redis is damaged: {exc}") from exc

    def _members(
        self, index: str, lo: str, hi: str, limit: int | None = None
    ) -> list[tuple[str, int]]:
        if limit is None:
            raw = self.client.zrangebyscore(index, lo, hi)
        else:
            raw = self.client.zrangebyscore(index, lo, hi, start=0, num=limit)
        return [(m[0], m[1]) for m in map(json_codec.loads, cast(list[str], raw))]

    def claim_due_gaps(
        self,
        projection: str,
        now: float,
        limit: int,
        decide: Callable[[Gap], tuple[str, Gap]],
    ) -> list[tuple[str, Gap]]:
        """The due gaps, decided, with their new schedule stored: each set only where it still
        stands as read, so of two instances deciding the same gap one sets it and acts, and
        the other leaves it."""
        k = self.keys(projection)
        due = self._members(k.gapdue, "-inf", repr(now), limit)
        if not due:
            return []
        stored, schedules = self._scheduled_gaps(k, sorted({s for s, _ in due}))
        open_gaps = {
            _member(s, g.from_seq): g
            for s, gs in stored.items()
            for g in gs
            if g.state != "skipped"
        }
        entries: list[tuple[str, str, Gap | None]] = []
        actions: list[tuple[str, Gap] | None] = []
        for stream, from_seq in due:
            member = _member(stream, from_seq)
            gap = open_gaps.get(member)
            if gap is None:  # filled or skipped since the index was read
                entries.append((member, "", None))
                actions.append(None)
            elif gap.next_request_at is None or gap.next_request_at > now:
                entries.append((member, schedules[member], gap))  # the index set right
                actions.append(None)
            else:
                action, decided = decide(gap)
                entries.append((member, schedules[member], decided))
                actions.append((action, decided))
        outcomes = self._set_schedules(k, entries)
        return [a for a, o in zip(actions, outcomes, strict=True) if a is not None and o == "ok"]

    def list_gaps(self, projection: str, stream: str | None = None) -> list[Gap]:
        k = self.keys(projection)
        members = self._members(k.gaps, "-inf", "+inf") + self._members(
            k.gapskipped, "-inf", "+inf"
        )
        streams = sorted({s for s, _ in members if stream is None or s == stream})
        if stream is not None:
            streams = [stream]
        stored, _ = self._scheduled_gaps(k, streams)
        found = [g for gs in stored.values() for g in gs]
        return sorted(found, key=lambda g: (g.first_seen, g.stream, g.from_seq))

    def request_gaps_now(self, projection: str, stream: str | None, now: float) -> int:
        k = self.keys(projection)
        done: set[str] = set()
        for _ in range(10):
            members = self._members(k.gaps, "-inf", "+inf")
            streams = sorted({s for s, _ in members if stream is None or s == stream})
            stored, schedules = self._scheduled_gaps(k, streams)
            entries: list[tuple[str, str, Gap | None]] = []
            for g in (g for gs in stored.values() for g in gs if g.state != "skipped"):
                member = _member(g.stream, g.from_seq)
                if member not in done:
                    entries.append((member, schedules[member], replace(g, next_request_at=now)))
            outcomes = self._set_schedules(k, entries)
            done.update(m for (m, _, _), o in zip(entries, outcomes, strict=True) if o == "ok")
            if "moved" not in outcomes:  # set meanwhile by the gap timer: read it again
                return len(done)
        raise TransientStoreError("gaps kept changing; try again")

    # -- figures --------------------------------------------------------------------------
    def _figures(self, projection: str) -> tuple[int, int, int, float | None, int]:
        """parked, open+held gaps, held gaps, oldest first seen, open dead letters."""
        k = self.keys(projection)
        with self.client.pipeline(transaction=False) as pipe:
            pipe.get(k.parked)
            pipe.zcard(k.gaps)
            pipe.scard(k.gapheld)
            pipe.zrange(k.gaps, 0, 0, withscores=True)
            pipe.scard(k.dlopen)
            parked, gaps, held, oldest, letters = pipe.execute()
        first = float(oldest[0][1]) if oldest else None
        return int(parked or 0), int(gaps), int(held), first, int(letters)

    def count_parked(self, projection: str) -> int:
        return self._figures(projection)[0]

    def count_open_gaps(self, projection: str) -> int:
        _, gaps, held, _, _ = self._figures(projection)
        return gaps - held

    def gap_summary(self, projection: str) -> tuple[int, int, float | None]:
        _, gaps, held, oldest, _ = self._figures(projection)
        return gaps, held, oldest

    def count_open_dead_letters(self, projection: str) -> int:
        return self._figures(projection)[4]

    def correlation_figures(self, projection: str, topics: Sequence[str]) -> tuple[int, int | None]:
        """Correlations with open parts (``coopen``), and the lowest stored event-time high of
        ``topics``' claimed partitions (``None`` while one has none and is not caught up)."""
        k = self.keys(projection)
        with self.client.pipeline(transaction=False) as pipe:
            pipe.scard(k.coopen)
            pipe.hgetall(k.times)
            pipe.hkeys(k.epochs)
            count, times, claimed = pipe.execute()
        return int(count), watermark(stored_input_times(times, claimed, set(topics)).values())

    def correlation_record(self, projection: str, key: str) -> tuple[Pending, int | None] | None:
        k = self.keys(projection)
        with self.client.pipeline(transaction=False) as pipe:
            pipe.get(k.correlation(key))
            pipe.zscore(k.codue, key)
            raw, due = pipe.execute()
        record = None if raw is None else Pending.from_json(json_codec.loads(raw))
        return None if record is None else (record, None if due is None else int(due))

    def outbox_figures(self, projection: str) -> tuple[int, float | None] | None:
        """Entries waiting in the projection's outbox stream and the oldest one's age (Redis's
        clock); an outbox never written to reads as empty."""
        return redis_outbox.RedisOutbox(self, projection).figures()

    def projection_figures(self, projections: Sequence[str], now: float) -> list[ProjectionFigures]:
        out = []
        for name in projections:
            parked, gaps, _, oldest, letters = self._figures(name)
            age = 0.0 if oldest is None else max(0.0, now - oldest)
            out.append(ProjectionFigures(name, parked, gaps, age, letters))
        return out

    # -- dead letters ---------------------------------------------------------------------
    def _letters(self, projection: str) -> list[DeadLetterRow]:
        raw = cast(dict[str, str], self.client.hgetall(self.keys(projection).dl))
        rows = [_letter_row(projection, int(i), r) for i, r in raw.items()]
        return sorted(rows, key=lambda r: r.id)

    def list_dead_letters(
        self, projection: str, status: str | None, limit: int
    ) -> list[DeadLetterRow]:
        rows = [r for r in self._letters(projection) if status is None or r.status == status]
        return rows[:limit]

    def purge_dead_letters(self, projection: str, include_open: bool) -> int:
        k = self.keys(projection)
        for _ in range(10):
            try:
                with self._watching() as pipe:
                    _watch(pipe, k.dl, k.dlopen)
                    ids = cast(list[str], pipe.hkeys(k.dl))
                    still_open = cast(set[str], pipe.smembers(k.dlopen))
                    gone = [i for i in ids if include_open or i not in still_open]
                    ops = _chunks("HDEL", k.dl, gone, 1) + _chunks("SREM", k.dlopen, gone, 1)
                    self._apply_own(pipe, ops)
                    return len(gone)
            except redis.exceptions.WatchError:
                continue
        raise TransientStoreError("dead letters kept changing; try again")

    def inspect_stream(self, projection: str, stream: str) -> StreamReport:
        k = self.keys(projection)
        stored = cast(dict[str, str], self.client.hgetall(k.stream(stream)))
        s = _Stream(k.stream(stream), stored)
        position = None if "seq" not in stored else _position(stream, s, SequenceRules())
        parked = sorted(
            (int(n[2:]), Event.from_json(json_codec.loads(v)))
            for n, v in stored.items()
            if n.startswith("p:")
        )
        return StreamReport(
            stream,
            position,
            [(seq, e) for seq, e in parked],
            sorted(self._scheduled_gaps(k, [stream])[0][stream], key=lambda g: g.from_seq),
            [r for r in self._letters(projection) if r.stream == stream],
        )

    # -- merge documents ------------------------------------------------------------------
    def sweep_documents(
        self,
        projection: str,
        unchanged_since: float,
        now: float,
        purge: Callable[[dict[str, Any]], dict[str, Any] | None],
        limit: int = 500,
    ) -> tuple[int, int]:
        k = self.keys(projection)
        for _ in range(10):
            streams = cast(
                list[str],
                self.client.zrangebyscore(
                    k.docs, "-inf", f"({unchanged_since!r}", start=0, num=limit
                ),
            )
            if not streams:
                return 0, 0
            try:
                with self._watching() as pipe:
                    keys = [k.stream(s) for s in streams]
                    _watch(pipe, *keys)
                    hashes = [
                        dict(zip(flat[::2], flat[1::2], strict=True))
                        for flat in self.scripts.call(pipe, "read", keys, "stream")
                    ]
                    # Changed since they were listed (WATCH covers only what follows): not
                    # due; they stay in the index with their new time.
                    due = [
                        (stream, key, h)
                        for stream, key, h in zip(streams, keys, hashes, strict=True)
                        if h.get("doc_at") is None or float(h["doc_at"]) < unchanged_since
                    ]
                    ops: list[Op] = _chunks("ZREM", k.docs, [s for s, _, _ in due], 1)
                    removed = 0
                    # Each write sets a new version token (``v``), so a batch that read the
                    # stream before is refused and planned again; a hash left with nothing
                    # but its token is deleted, as it was before tokens (a batch that read
                    # token T finds none: refused too; one that read no hash at all, before
                    # the document was written and then swept a retention later, finds none
                    # again, and its plan is what a fresh read would give: no document).
                    token = new_token()
                    for _, key, h in due:
                        raw = h.get("doc")
                        if raw is None:
                            continue
                        kept = purge(json_codec.loads(raw))
                        if kept is None:
                            if set(h) <= {"doc", "doc_at", TOKEN}:
                                ops.append(["DEL", key])
                            else:
                                ops.append(["HDEL", key, "doc", "doc_at"])
                                ops.append(["HSET", key, TOKEN, token])
                            removed += 1
                        else:
                            ops.append(["HSET", key, "doc", _dumps(kept), TOKEN, token])
                    self._apply_own(pipe, ops)
                    return len(due), removed
            except redis.exceptions.WatchError:
                continue
        raise TransientStoreError("documents kept changing under the sweep")
