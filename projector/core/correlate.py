"""Correlation: the events (parts) that belong together become business events.

The seed's case: a student enrols in a course in one database transaction, and Debezium puts
its three row changes on three topics (STUDENT, COURSE, STUDENT_COURSE), in any order. The
user wants one ``enroll`` event, not three row changes; a transaction that touched only
STUDENT_COURSE is a ``change``, one that touched only STUDENT or only COURSE an ``update``.

Pure, like the sequencer: it takes the stored correlations that a batch touches (``Pending``
records, one per correlation key), the batch's events and the event-time watermark, and returns
a plan (records to write or delete, correlations closed, the business events they name, late
and duplicate parts). The store keeps the records durable in the batch transaction, so a crash
loses no open correlation and a restart keeps every deadline. Nothing here does I/O or reads a
clock: time is event time, given as arguments.

Terms:
- a *part* is an event of a configured source (a Debezium table ``schema.table``, or a topic),
  named by the config (``student``); its *key* is a path into the event, by default
  ``meta.tx_id`` (the Debezium transaction id, the part of ``"<txId>:<lsn>"`` before the colon);
  its *time* is a path to epoch milliseconds, by default ``meta.ts_ms`` (Debezium's
  ``source.ts_ms``, the commit time, shared by every change of a transaction);
- a *window* of a key starts at the earliest open part's time and lasts ``window`` ms; the
  parts of the key whose time falls in it are its members. A key can have several windows
  over time (with a field-path key such as an order id); they are cut greedily from the
  earliest, so the cut depends only on the set of parts, never on their arrival;
- a window *closes* as ``complete`` when every expected part is in: as counted by the
  transaction's Debezium END record (``data_collections[].event_count`` per ``schema.table``,
  tables the projection does not consume left out) when ``transaction_metadata`` is on, else
  when each part named in ``complete_when`` is present. It closes as ``expired`` once the
  watermark reaches its deadline (start + window). Nothing else closes a window;
- the *watermark* (see :func:`watermark`) is the event time up to which every input has been
  read; the runner computes it and may advance idle inputs with its clock.

Why the result does not depend on arrival order or batching: parts are de-duplicated by event
id; the window cut is a function of the set of parts; ``complete`` is a function of the set of
parts and the END record; and a window expires only when the watermark says every part with a
time inside it has been read, so its members are all in by then. What can differ is only what
arrives after its window closed (a *late* part, below), which the watermark's definition
confines to inputs advanced by idleness and to inputs out of commit order.

Decisions:
- A part whose key has a closed window covering its time (``time < closed_until``) and whose id
  is not among that window's parts is *late*: reported in the plan (the runner counts it and
  logs it), no business event, no new correlation. A business event already published can't be
  retracted, and a second, partial one (an ``update`` after the ``change`` for the same
  transaction) would misstate what the transaction did. Its row change still reaches the views
  through the merge, which is order-independent on its own.
- A re-delivered part of a closed window (Debezium re-sends after a connector restart) is a
  *duplicate*, not late: closed windows keep their part ids for ``closed_retention`` (event
  time), after which the record is forgotten and a re-delivery older than that opens a new
  correlation - the same trade-off as merge's ``tombstone_retention``.
- The business event's id is derived from the key and the sorted part ids: the same parts
  always name the same ids, in a live run, a replay or a rebuild, so an outbox consumer can
  de-duplicate on it.
- Events that carry the same id are one event (ids are content-derived, never offsets): the
  stored one is kept, else the first of the batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from projector.core.event import Event

MS_PER_DAY = 86_400_000
TX_BEGIN, TX_END = "tx.begin", "tx.end"

PartBy = Literal["table", "topic"]
CloseReason = Literal["complete", "expired"]
SkipReason = Literal["no_key", "no_time", "not_a_part"]


@dataclass(frozen=True, slots=True)
class BusinessEvent:
    """What a rule names: a type and its data, and optionally the stream it belongs to (by
    default ``<correlation name>:<key>``). The core makes it an :class:`Event` with a stable id."""

    type: str
    data: dict[str, Any]
    stream: str | None = None


class BusinessRule(Protocol):
    """Names the business events of a closed correlation (user code, a module path in the
    config). ``parts`` maps each part name present to its events, ordered by (time, ts, id).
    Returns one event, several (e.g. one ``enroll`` per course a transaction enrolled in), or
    ``None``/empty when the parts name none. Must be deterministic: a rebuild calls it again
    on the same parts and must get the same events."""

    def __call__(
        self, parts: Mapping[str, Sequence[Event]]
    ) -> BusinessEvent | Sequence[BusinessEvent] | None: ...


@dataclass(frozen=True, slots=True)
class Part:
    """A configured part: its ``name`` (what the rule sees), its ``source`` (a Debezium
    ``schema.table``, or a topic, per ``CorrelationRules.part_by``) and optionally its own key
    path (a STUDENT_COURSE row keyed by ``data.student_id`` when a STUDENT row is ``data.id``)."""

    name: str
    source: str
    key: str | None = None


@dataclass(frozen=True, slots=True)
class CorrelationRules:
    """One projection's correlation step. Times (``window``, ``closed_retention``) are event-time
    milliseconds, like the ``time`` path's values. ``complete_when``: the part names whose
    presence completes a window when there is no transaction metadata (``None``: every part;
    empty: windows only expire). ``transaction_metadata``: the Debezium transaction topic is an
    input, so a window completes only by its END record's counts."""

    window: int
    parts: tuple[Part, ...]
    rule: BusinessRule
    name: str = "correlation"
    part_by: PartBy = "table"
    key: str = "meta.tx_id"
    time: str = "meta.ts_ms"
    transaction_metadata: bool = False
    complete_when: frozenset[str] | None = None
    closed_retention: int = 7 * MS_PER_DAY
    _by_source: Mapping[str, Part] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for problem in _rule_problems(self):
            raise ValueError(problem)
        object.__setattr__(self, "_by_source", {p.source: p for p in self.parts})

    @property
    def part_names(self) -> frozenset[str]:
        return frozenset(p.name for p in self.parts)

    @property
    def required(self) -> frozenset[str]:
        """The part names that complete a window without transaction metadata."""
        return self.part_names if self.complete_when is None else self.complete_when

    def part_of(self, event: Event) -> Part | None:
        """The configured part an event is, if any."""
        if self.part_by == "table":
            source = event.meta.get("table")
        else:
            source = None if event.source is None else event.source.topic
        return self.part_for_source(source) if isinstance(source, str) else None

    def part_for_source(self, source: object) -> Part | None:
        """The part configured for a source name (an END record names ``schema.table``)."""
        return self._by_source.get(source) if isinstance(source, str) else None


def _rule_problems(rules: CorrelationRules) -> list[str]:
    """What is wrong with a configuration, each message naming its key."""
    names = [p.name for p in rules.parts]
    sources = [p.source for p in rules.parts]
    problems = [
        *(["correlation.window must be a positive duration"] if rules.window <= 0 else []),
        *(["correlation.parts must name at least one part"] if not rules.parts else []),
        *(["correlation.parts names a part twice"] if len(set(names)) != len(names) else []),
        *(
            ["correlation.parts lists a source twice; a source is one part"]
            if len(set(sources)) != len(sources)
            else []
        ),
        *(["correlation.closed_retention must be >= 0"] if rules.closed_retention < 0 else []),
        *_path_problems("correlation.key", rules.key),
        *_path_problems("correlation.time", rules.time, allow_ts=True),
    ]
    for part in rules.parts:
        if part.key is not None:
            problems += _path_problems(f"correlation.parts.{part.name}.key", part.key)
    unknown = sorted((rules.complete_when or frozenset()) - set(names))
    if unknown:
        problems.append(
            f"correlation.complete_when names parts not in correlation.parts: {unknown}"
        )
    if rules.transaction_metadata and rules.complete_when is not None:
        problems.append(
            "correlation.complete_when does not apply with transaction_metadata: the END"
            " record's counts decide when a transaction is complete"
        )
    if rules.transaction_metadata and (rules.part_by != "table" or rules.key != "meta.tx_id"):
        problems.append(
            "correlation.transaction_metadata needs part_by: table and key: meta.tx_id (the END"
            " record counts events per schema.table of one transaction)"
        )
    return problems


def _path_problems(name: str, path: str, allow_ts: bool = False) -> list[str]:
    if allow_ts and path == "ts":
        return []
    head, _, rest = path.partition(".")
    if head in ("meta", "data") and rest and all(rest.split(".")):
        return []
    also = ", or ts" if allow_ts else ""
    return [f"{name} must be a path such as meta.tx_id or data.order_id{also}; got {path!r}"]


def resolve(event: Event, path: str) -> Any:
    """The value at ``path`` (``ts``, ``meta.<...>`` or ``data.<...>``), ``None`` if absent."""
    if path == "ts":
        return event.ts
    head, _, rest = path.partition(".")
    value: Any = event.meta if head == "meta" else event.data
    for step in rest.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(step)
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def event_time(event: Event, rules: CorrelationRules) -> int | None:
    """An event's correlation time (epoch ms), ``None`` when it has none."""
    value = resolve(event, rules.time)
    return int(value) if _is_int(value) else None


def _time(event: Event, rules: CorrelationRules) -> int:
    """The time of an event already admitted (it had one when admitted)."""
    value = event_time(event, rules)
    if value is None:
        raise ValueError(f"event {event.id} has no {rules.time}: was correlation.time changed?")
    return value


def _key(event: Event, path: str) -> str | None:
    value = resolve(event, path)
    if isinstance(value, str) and value:
        return value
    return str(value) if _is_int(value) else None


def expected_counts(end: Event, rules: CorrelationRules) -> dict[str, int]:
    """Per part name, how many events a Debezium END record counts for it (tables the
    projection does not correlate are left out: the transaction may touch others)."""
    counts: dict[str, int] = {}
    collections = end.data.get("data_collections")
    for entry in collections if isinstance(collections, list) else []:
        if not isinstance(entry, Mapping):
            continue
        part = rules.part_for_source(entry.get("data_collection"))
        count = entry.get("event_count")
        if part is not None and isinstance(count, int) and not isinstance(count, bool):
            counts[part.name] = counts.get(part.name, 0) + max(count, 0)
    return {name: count for name, count in counts.items() if count > 0}


# --- stored state -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClosedWindow:
    """What a closed window leaves behind for ``closed_retention``: its end (``until``), its
    event ids (so a re-delivery is a duplicate) and its first business event id (``None``:
    the rule named none)."""

    until: int
    ids: frozenset[str]
    business_id: str | None

    def to_json(self) -> dict[str, Any]:
        return {"until": self.until, "ids": sorted(self.ids), "business_id": self.business_id}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ClosedWindow:
        return cls(int(obj["until"]), frozenset(obj["ids"]), obj.get("business_id"))


@dataclass(frozen=True, slots=True)
class Pending:
    """One correlation key's stored record: its open parts (by part name, each part's events
    unique by id, sorted by id), the transaction's END record once seen, the windows closed
    within ``closed_retention`` and the end of the last closed window (``closed_until``):
    a part older than that is late."""

    key: str
    parts: Mapping[str, tuple[Event, ...]] = field(default_factory=dict)
    end: Event | None = None
    closed: tuple[ClosedWindow, ...] = ()
    closed_until: int | None = None

    def first_time(self, rules: CorrelationRules) -> int | None:
        """Where the earliest open window starts: the earliest open part's time, else the END
        record's (a transaction seen only by its END so far)."""
        times = [_time(e, rules) for events in self.parts.values() for e in events]
        if times:
            return min(times)
        return None if self.end is None else _time(self.end, rules)

    def deadline(self, rules: CorrelationRules) -> int | None:
        """When the earliest open window expires (first time + window)."""
        first = self.first_time(rules)
        return None if first is None else first + rules.window

    def expected(self, rules: CorrelationRules) -> dict[str, int] | None:
        """Per part name, the count the END record says (``None``: no END record yet)."""
        return None if self.end is None else expected_counts(self.end, rules)

    def due(self, rules: CorrelationRules) -> int | None:
        """The watermark at which this record next needs attention even if no part arrives:
        its deadline, or when its oldest closed window is forgotten. The store indexes it, so
        the runner loads exactly the records to close or forget."""
        times = [self.deadline(rules)]
        times += [w.until + rules.closed_retention for w in self.closed]
        present = [t for t in times if t is not None]
        return min(present) if present else None

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "parts": {n: [e.to_json() for e in evs] for n, evs in sorted(self.parts.items())},
            "end": None if self.end is None else self.end.to_json(),
            "closed": [w.to_json() for w in self.closed],
            "closed_until": self.closed_until,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Pending:
        end = obj.get("end")
        return cls(
            key=obj["key"],
            parts={n: tuple(Event.from_json(e) for e in evs) for n, evs in obj["parts"].items()},
            end=None if end is None else Event.from_json(end),
            closed=tuple(ClosedWindow.from_json(w) for w in obj.get("closed", ())),
            closed_until=obj.get("closed_until"),
        )


# --- the plan ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Skipped:
    """An event the correlation step does not take: ``not_a_part`` (no configured source,
    a BEGIN record, an END record of a transaction that touched none of the parts),
    ``no_key`` (e.g. a snapshot row: no transaction) or ``no_time``. Its row change still
    reaches the views; the runner counts these by reason."""

    event: Event
    reason: SkipReason


@dataclass(frozen=True, slots=True)
class Closed:
    """A window closed in this plan: why, its parts (the rule's input), the END record if
    one counted it, the parts that END record counted but never came (``missing``), the
    business events named (``business``), and the rule's error if it failed (the runner
    dead-letters the parts; the window stays closed so they are not correlated twice)."""

    key: str
    reason: CloseReason
    parts: Mapping[str, tuple[Event, ...]]
    end: Event | None
    missing: Mapping[str, int]
    business: tuple[Event, ...] = ()
    error: str | None = None


@dataclass(frozen=True, slots=True)
class CorrelationPlan:
    """What the store does in the batch transaction: write ``write`` (records created or
    changed), delete the records of ``delete``; the runner hands ``business`` to the handlers
    (and the outbox), and counts ``duplicates``, ``late`` and ``skipped``."""

    write: tuple[Pending, ...] = ()
    delete: tuple[str, ...] = ()
    closed: tuple[Closed, ...] = ()
    late: tuple[Event, ...] = ()
    duplicates: int = 0
    skipped: tuple[Skipped, ...] = ()

    @property
    def business(self) -> tuple[Event, ...]:
        """Every business event named, ordered by (ts, id): the same order for any batching."""
        events = (e for c in self.closed for e in c.business)
        return tuple(sorted(events, key=lambda e: (e.ts or 0, e.id)))


# --- correlate --------------------------------------------------------------------------------


@dataclass(slots=True)
class _Work:
    """Mutable scratch state of one key while a batch is folded in."""

    key: str
    parts: dict[str, dict[str, Event]]
    end: Event | None
    closed: list[ClosedWindow]
    closed_until: int | None
    ids: set[str]

    @classmethod
    def of(cls, record: Pending) -> _Work:
        parts = {name: {e.id: e for e in evs} for name, evs in record.parts.items()}
        ids = {i for evs in parts.values() for i in evs}
        ids |= {i for w in record.closed for i in w.ids}
        if record.end is not None:
            ids.add(record.end.id)
        return cls(record.key, parts, record.end, list(record.closed), record.closed_until, ids)

    def record(self) -> Pending:
        parts = {n: tuple(evs[i] for i in sorted(evs)) for n, evs in self.parts.items() if evs}
        return Pending(
            self.key, dict(sorted(parts.items())), self.end, tuple(self.closed), self.closed_until
        )

    @property
    def empty(self) -> bool:
        return not self.parts and self.end is None and not self.closed


@dataclass(frozen=True, slots=True)
class _Item:
    """An event the correlation takes: its key, time and part name (``None``: an END record)."""

    event: Event
    key: str
    time: int
    part: str | None


def correlate(
    pending: Mapping[str, Pending],
    incoming: Sequence[Event],
    watermark: int | None,
    rules: CorrelationRules,
) -> CorrelationPlan:
    """Fold ``incoming`` into the stored records it touches (``pending``, by key: every
    stored record of the incoming events' keys, plus any whose ``due`` the watermark has
    reached) and close what is complete or expired at ``watermark`` (the watermark after this
    batch's events; ``None``: not known yet, nothing expires)."""
    work = {key: _Work.of(record) for key, record in pending.items()}
    late: list[Event] = []
    skipped: list[Skipped] = []
    duplicates = 0
    for event in sorted(incoming, key=lambda e: e.id):
        item = _classify(event, rules)
        if isinstance(item, Skipped):
            skipped.append(item)
            continue
        outcome = _admit(
            work.setdefault(item.key, _Work(item.key, {}, None, [], None, set())), item
        )
        duplicates += outcome == "duplicate"
        if outcome == "late":
            late.append(event)
    closed: list[Closed] = []
    write: list[Pending] = []
    delete: list[str] = []
    for key in sorted(work):
        closed += _close_due(work[key], watermark, rules)
        _forget(work[key], watermark, rules)
        _settle(work[key], pending.get(key), write, delete)
    return CorrelationPlan(
        tuple(write), tuple(delete), tuple(closed), tuple(late), duplicates, tuple(skipped)
    )


def correlation_key(event: Event, rules: CorrelationRules) -> str | None:
    """The key an event correlates on, ``None`` when the correlation does not take it. The
    runner loads the stored records of a batch's keys (and those due) before :func:`correlate`."""
    item = _classify(event, rules)
    return None if isinstance(item, Skipped) else item.key


def _classify(event: Event, rules: CorrelationRules) -> _Item | Skipped:
    """Which key, time and part an event is, or why the correlation does not take it."""
    part_name: str | None
    if event.type == TX_END and rules.transaction_metadata:
        if not expected_counts(event, rules):
            return Skipped(event, "not_a_part")  # a transaction on other tables only
        key, part_name = _key(event, rules.key), None
    else:
        part = None if event.type in (TX_BEGIN, TX_END) else rules.part_of(event)
        if part is None:
            return Skipped(event, "not_a_part")
        key, part_name = _key(event, part.key or rules.key), part.name
    if key is None:
        return Skipped(event, "no_key")
    time = event_time(event, rules)
    if time is None:
        return Skipped(event, "no_time")
    return _Item(event, key, time, part_name)


def _admit(work: _Work, item: _Item) -> Literal["duplicate", "late", "added"]:
    event = item.event
    if event.id in work.ids:
        return "duplicate"
    if work.closed_until is not None and item.time < work.closed_until:
        return "late"
    work.ids.add(event.id)
    if item.part is not None:
        work.parts.setdefault(item.part, {})[event.id] = event
    elif work.end is None or event.id < work.end.id:
        # One transaction has one END record; should two ids ever claim it, the same one wins
        # whatever the arrival order.
        work.end = event
    return "added"


def _close_due(work: _Work, watermark: int | None, rules: CorrelationRules) -> list[Closed]:
    """Close the key's windows, earliest first, while the earliest is complete or expired."""
    closed: list[Closed] = []
    while True:
        window = _earliest(work, rules)
        if window is None:
            return closed
        start, members = window
        deadline = start + rules.window
        expected = None if work.end is None else expected_counts(work.end, rules)
        if _complete(members, expected, rules):
            reason: CloseReason = "complete"
        elif watermark is not None and watermark >= deadline:
            reason = "expired"
        else:
            return closed
        closed.append(_close(work, members, deadline, reason, expected, rules))


def _earliest(work: _Work, rules: CorrelationRules) -> tuple[int, dict[str, list[Event]]] | None:
    """The earliest open window: its start and its members by part name."""
    timed = [(_time(e, rules), name, e) for name, evs in work.parts.items() for e in evs.values()]
    if not timed:
        return None if work.end is None else (_time(work.end, rules), {})
    start = min(t for t, _, _ in timed)
    members: dict[str, list[Event]] = {}
    for t, name, event in sorted(timed, key=lambda x: (x[0], x[2].ts or 0, x[2].id)):
        if t < start + rules.window:
            members.setdefault(name, []).append(event)
    return start, members


def _complete(
    members: Mapping[str, Sequence[Event]],
    expected: Mapping[str, int] | None,
    rules: CorrelationRules,
) -> bool:
    if rules.transaction_metadata:
        return bool(expected) and all(
            len(members.get(name, ())) >= count for name, count in (expected or {}).items()
        )
    return bool(rules.required) and rules.required <= members.keys()


def _close(
    work: _Work,
    members: Mapping[str, Sequence[Event]],
    deadline: int,
    reason: CloseReason,
    expected: Mapping[str, int] | None,
    rules: CorrelationRules,
) -> Closed:
    """Take a window's members out of the open parts and name its business events."""
    end, work.end = work.end, None  # only ever set with transaction metadata
    for name, events in members.items():
        for event in events:
            del work.parts[name][event.id]
        if not work.parts[name]:
            del work.parts[name]
    parts = {name: tuple(events) for name, events in sorted(members.items())}
    ids = frozenset(e.id for evs in parts.values() for e in evs)
    first = business_id(rules.name, work.key, ids)
    business, error = _name(work.key, first, parts, reason, end is not None, rules)
    named = business[0].id if business else None
    work.closed.append(ClosedWindow(deadline, ids | ({end.id} if end else set()), named))
    work.closed_until = max(deadline, work.closed_until or deadline)
    missing = {
        name: count - len(parts.get(name, ()))
        for name, count in sorted((expected or {}).items())
        if len(parts.get(name, ())) < count
    }
    return Closed(work.key, reason, parts, end, missing, business, error)


def business_id(name: str, key: str, part_ids: Iterable[str]) -> str:
    """The stable id of a correlation's (first) business event: the correlation's name, its
    key and a digest of its sorted part ids. The same parts give the same id in any run."""
    text = "\n".join([name, key, *sorted(part_ids)]).encode()
    return f"{name}:{key}:{hashlib.blake2b(text, digest_size=12).hexdigest()}"


def _name(
    key: str,
    first: str,
    parts: Mapping[str, tuple[Event, ...]],
    reason: CloseReason,
    counted: bool,
    rules: CorrelationRules,
) -> tuple[tuple[Event, ...], str | None]:
    """The rule's business events as ``Event``s (ids ``first``, ``first.1``, ...), or the
    rule's error. A failing rule (user code) must not stop the projection: its error goes into
    the plan, as a handler's does."""
    if not parts:
        return (), None  # only an END record: nothing to name
    try:
        named = rules.rule(parts)
        items = _as_list(named)
    except Exception as exc:
        return (), f"correlation rule failed on {key}: {type(exc).__name__}: {exc}"
    ts = max(_time(e, rules) for evs in parts.values() for e in evs)
    meta = {
        "correlation": rules.name,
        "key": key,
        "parts": {name: [e.id for e in evs] for name, evs in parts.items()},
        "closed": reason,
        "counted": counted,
    }
    events = tuple(
        Event(
            item.stream or f"{rules.name}:{key}",
            None,
            ts,
            item.type,
            item.data,
            first if i == 0 else f"{first}.{i}",
            None,
            dict(meta),
        )
        for i, item in enumerate(items)
    )
    return events, None


def _as_list(named: object) -> list[BusinessEvent]:
    if named is None:
        return []
    items = [named] if isinstance(named, BusinessEvent) else named
    if not isinstance(items, Sequence) or not all(isinstance(i, BusinessEvent) for i in items):
        raise TypeError(f"the rule must return BusinessEvent(s) or None, got {named!r}")
    return list(items)


def _forget(work: _Work, watermark: int | None, rules: CorrelationRules) -> None:
    """Drop closed windows older than ``closed_retention`` behind the watermark."""
    if watermark is None:
        return
    kept = [w for w in work.closed if w.until + rules.closed_retention > watermark]
    for window in work.closed:
        if window not in kept:
            work.ids -= window.ids
    work.closed = kept


def _settle(work: _Work, stored: Pending | None, write: list[Pending], delete: list[str]) -> None:
    """Write the record if it changed, delete it once nothing is left of it."""
    if work.empty:
        if stored is not None:
            delete.append(work.key)
        return
    record = work.record()
    if record != stored:
        write.append(record)


# --- the watermark ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InputTime:
    """One input partition's event-time progress, as its owner last stored it: ``high``, the
    highest event time read from it (``None``: none yet), and ``caught_up``, whether nothing
    was left to read (its position at the last stable offset)."""

    high: int | None
    caught_up: bool = False


def input_time(
    high: int | None, caught_up: bool, *, idle_after: int | None, now: int | None
) -> InputTime:
    """An input's progress as its owner stores it after a batch or an idle tick. A caught-up
    input holds nothing back but the events still on their way to it: with ``idle_after``
    set (ms, the longest delay from commit to Kafka that is allowed for) its high is raised to
    ``now - idle_after``. ``now`` is the runner's clock in epoch ms; the core never reads one."""
    if caught_up and idle_after is not None and now is not None:
        floor = now - idle_after
        high = floor if high is None else max(high, floor)
    return InputTime(high, caught_up)


def watermark(
    inputs: Iterable[InputTime], *, lateness: int = 0, previous: int | None = None
) -> int | None:
    """The event time up to which every input of the projection has been read: the lowest
    input ``high`` minus the allowed ``lateness``, never below ``previous``. Every input
    partition counts (those of other instances too, read from the store), since a correlation
    gathers parts from all of them: one lagging input holds the watermark, so a window never
    expires while its parts are still unread there. An input never read holds it unset, unless
    it is caught up (an empty partition holds nothing back)."""
    highs: list[int] = []
    for entry in inputs:
        if entry.high is not None:
            highs.append(entry.high)
        elif not entry.caught_up:
            return previous
    if not highs:
        return previous
    value = min(highs) - lateness
    return value if previous is None else max(previous, value)
