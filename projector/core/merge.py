"""Merge mode: one stream's document, merged field by field, newest timestamp wins.

Pure: it takes a document's stored merge state and a batch of events and returns the new state,
the materialised document and whether anything changed. The store keeps the state (as JSON)
beside the view; nothing here does I/O.

Every event is stamped ``(ts, id)``: its ``ts``, ties broken by its content-derived ``id``. What
an event says about a path is one of three kinds, ranked OBJECT < VALUE < DELETE, so that at an
equal stamp (one event both writing and removing a path) the higher kind wins:
- OBJECT: the path holds an object. Each nested object of an event's data asserts this at its
  path, the data itself at the document root.
- VALUE: the path holds this whole value: a scalar, an array or ``null`` (null is a value).
- DELETE: the path was removed (a path listed in ``data[removed_field]``, dot-separated or a
  list of keys), or the whole document was (an event whose type is a delete type: its data is
  not written).

Rules, per path, with an assertion ordered by ``(ts, id, kind)``:
- The newest assertion at a path decides what it is: an object, a value, or absent.
- A VALUE or DELETE at a path wipes everything under it that is not newer: an object's fields
  older than a scalar that replaced it, or than its deletion, never come back. So
  ``{"a": {"x": 1}}`` at T1, ``{"a": 5}`` at T3, ``{"a": {"z": 1}}`` at T4 give
  ``{"a": {"z": 1}}`` whatever the order; a write newer than a delete brings the path (or the
  document) back with only the fields written after the delete.
- An object shows its fields that are present; it may be empty.
- A document exists when its root's newest assertion is an OBJECT: an event that only removes
  fields writes nothing, so it does not bring a deleted document back.
- Two assertions with the same stamp and kind but different values (two payloads under one id)
  are ordered by their canonical JSON, so even that conflict resolves the same way everywhere.
``ts`` in an event's data is a field like any other; the document exposes it only as data.

The state is a tree of ``Node``s, one per path that was ever asserted: the newest assertion
(``mark``, and its ``value`` when a VALUE), the newest wipe when an OBJECT is newer than it
(``floor``), and the children. Merging two states takes, per path, the newer mark and the newer
floor, and unites the children: a state-based CRDT (max registers in a map), commutative,
associative and idempotent, so any arrival order, batching or duplication ends in the same
state. After every merge the state is normalised: what a wipe has hidden is dropped, since
wipes only grow and it can never show again. Tombstones (DELETE marks, floors) are what keeps
an older write from resurrecting; ``purge_tombstones`` forgets those older than a bound, after
which a write older than that bound could resurrect what they hid (the documented trade-off of
``tombstone_retention``).

JSON form of a node (``DocState.to_json``, stored as JSONB): ``{"m": [ts, id, kind], "v": value,
"f": [ts, id, kind], "c": {key: node}}``, kind 0 object, 1 value, 2 delete; absent parts are
left out (``"v"`` is present exactly when the kind is 1, even when the value is null).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import IntEnum
from functools import reduce
from typing import Any

from projector.core.event import Event


class Kind(IntEnum):
    """What an assertion says about a path; at an equal stamp the higher kind wins."""

    OBJECT = 0
    VALUE = 1
    DELETE = 2


@dataclass(frozen=True, slots=True, order=True)
class Mark:
    """An assertion's place in the total order: its event's ``(ts, id)``, then its kind."""

    ts: int
    id: str
    kind: Kind

    def to_json(self) -> list[Any]:
        return [self.ts, self.id, int(self.kind)]

    @classmethod
    def from_json(cls, obj: list[Any]) -> Mark:
        return cls(int(obj[0]), str(obj[1]), Kind(obj[2]))


@dataclass(frozen=True, slots=True)
class Node:
    """One path's merge state: its newest assertion (``mark``, with ``value`` when it is a
    VALUE), the newest wipe when an OBJECT is newer (``floor``), and the paths under it."""

    mark: Mark | None = None
    value: Any = None
    floor: Mark | None = None
    children: Mapping[str, Node] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.mark is not None:
            out["m"] = self.mark.to_json()
            if self.mark.kind is Kind.VALUE:
                out["v"] = self.value
        if self.floor is not None:
            out["f"] = self.floor.to_json()
        if self.children:
            out["c"] = {key: self.children[key].to_json() for key in sorted(self.children)}
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Node:
        mark, floor = obj.get("m"), obj.get("f")
        return cls(
            mark=None if mark is None else Mark.from_json(mark),
            value=obj.get("v"),
            floor=None if floor is None else Mark.from_json(floor),
            children={key: cls.from_json(child) for key, child in obj.get("c", {}).items()},
        )


_EMPTY = Node()


@dataclass(frozen=True, slots=True)
class DocState:
    """A document's merge state (what the store keeps, as JSON); always normalised."""

    root: Node = _EMPTY

    def to_json(self) -> dict[str, Any]:
        return self.root.to_json()

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> DocState:
        return cls(_normal(Node.from_json(obj), None) or _EMPTY)


@dataclass(frozen=True, slots=True)
class MergeRules:
    """``delete_types``: event types that remove the whole document (Debezium's op ``d``,
    decoded as ``delete``, removes it whatever they are); ``removed_field``: the data field
    that lists removed field paths (``None``: no such field). The timestamp is ``Event.ts``;
    the decoder decides where it comes from."""

    delete_types: frozenset[str] = frozenset({"delete"})
    removed_field: str | None = "$removed"


@dataclass(frozen=True, slots=True)
class MergeResult:
    """The new state, its document (``None`` when there is none, e.g. deleted) and whether
    the state changed (``False`` when every event was stale or a duplicate: skip the write)."""

    state: DocState
    document: dict[str, Any] | None
    changed: bool


def merge_events(state: DocState | None, events: Iterable[Event], rules: MergeRules) -> MergeResult:
    """Merge one stream's events into its state (``None``: nothing stored yet)."""
    old = state or DocState()
    deltas = [event_state(event, rules) for event in _one_stream(events)]
    new = merge_states(old, DocState(reduce(_join, (d.root for d in deltas), _EMPTY)))
    return MergeResult(new, materialise(new), new != old)


def merge_states(a: DocState, b: DocState) -> DocState:
    """The state that holds both: commutative, associative and idempotent."""
    return DocState(_normal(_join(a.root, b.root), None) or _EMPTY)


def event_state(event: Event, rules: MergeRules) -> DocState:
    """What one event says, as a state of its own."""
    if event.ts is None:
        raise ValueError(f"event {event.id} of stream {event.stream} has no ts (merge mode)")
    # Debezium's op d deletes whatever the configured delete types are: a projection that
    # names its own domain's delete types still follows its CDC topics' deletes.
    if event.type in rules.delete_types or event.meta.get("op") == "d":
        return DocState(Node(Mark(event.ts, event.id, Kind.DELETE)))
    data = dict(event.data)
    removed = data.pop(rules.removed_field, None) if rules.removed_field else None
    root = _write(data, event) if data or removed is None else _EMPTY
    removals = (_removal(path, event) for path in _paths(removed, event))
    return DocState(_normal(reduce(_join, removals, root), None) or _EMPTY)


def materialise(state: DocState) -> dict[str, Any] | None:
    """The document the state holds, or ``None`` when there is none (never written, deleted)."""
    root = state.root
    if root.mark is None or root.mark.kind is not Kind.OBJECT:
        return None
    document: dict[str, Any] = _render(root)
    return document


def purge_tombstones(state: DocState, older_than: int) -> DocState:
    """Forget DELETE marks and floors (deletions, and scalars since replaced by an object)
    with ``ts < older_than``, in the events' ``ts`` units. A write older than that bound can
    then resurrect what they hid: the trade-off of ``tombstone_retention``. Values are never
    purged (a current VALUE mark keeps hiding the older fields it replaced)."""
    return DocState(_normal(_purge(state.root, older_than), None) or _EMPTY)


def _one_stream(events: Iterable[Event]) -> list[Event]:
    batch = list(events)
    streams = sorted({event.stream for event in batch})
    if len(streams) > 1:
        raise ValueError(f"one document's merge got events of several streams: {streams}")
    return batch


def _write(obj: Mapping[str, Any], event: Event) -> Node:
    assert event.ts is not None
    children = {key: _write_value(value, event) for key, value in obj.items()}
    return Node(Mark(event.ts, event.id, Kind.OBJECT), children=children)


def _write_value(value: Any, event: Event) -> Node:
    if isinstance(value, Mapping):
        return _write(value, event)
    assert event.ts is not None
    return Node(Mark(event.ts, event.id, Kind.VALUE), value)


def _removal(path: tuple[str, ...], event: Event) -> Node:
    assert event.ts is not None
    node = Node(Mark(event.ts, event.id, Kind.DELETE))
    for key in reversed(path):
        node = Node(children={key: node})
    return node


def _paths(removed: Any, event: Event) -> list[tuple[str, ...]]:
    """The removed field paths: each a dot-separated string or a list of keys."""
    if removed is None:
        return []
    if not isinstance(removed, list):
        raise ValueError(f"event {event.id}: the removed fields must be a list, got {removed!r}")
    return [_path(item, event) for item in removed]


def _path(item: Any, event: Event) -> tuple[str, ...]:
    keys = item.split(".") if isinstance(item, str) else item
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k for k in keys):
        raise ValueError(f"event {event.id}: {item!r} is not a field path")
    return tuple(keys)


def _join(a: Node, b: Node) -> Node:
    """Both nodes' assertions: the newer mark, the newer wipe, the children united."""
    newest = _newest(a, b)
    children = {
        key: _join(a.children.get(key, _EMPTY), b.children.get(key, _EMPTY))
        for key in a.children.keys() | b.children.keys()
    }
    return Node(newest.mark, newest.value, _later(_wipe(a), _wipe(b)), children)


def _newest(a: Node, b: Node) -> Node:
    if a.mark is None or b.mark is None:
        return b if a.mark is None else a
    if a.mark != b.mark:
        return a if a.mark > b.mark else b
    return a if _canonical(a.value) >= _canonical(b.value) else b


def _wipe(node: Node) -> Mark | None:
    """The newest VALUE or DELETE at this node: nothing under it that is not newer shows."""
    mark = node.mark
    return _later(node.floor, mark if mark is not None and mark.kind is not Kind.OBJECT else None)


def _later(a: Mark | None, b: Mark | None) -> Mark | None:
    if a is None or b is None:
        return b if a is None else a
    return max(a, b)


def _newer(mark: Mark | None, than: Mark | None) -> bool:
    return mark is not None and (than is None or mark > than)


def _normal(node: Node, above: Mark | None) -> Node | None:
    """The node without what the wipe ``above`` it (or its own) hides for good; ``None`` when
    nothing is left. A floor is kept only under a newer OBJECT mark (else the mark implies it)."""
    mark = node.mark if _newer(node.mark, above) else None
    if mark is not None and mark.kind is Kind.OBJECT:
        own = Node(mark, floor=node.floor if _newer(node.floor, above) else None)
    else:
        own = Node(mark, node.value if mark is not None and mark.kind is Kind.VALUE else None)
    children = _normal_children(node.children, _later(above, _wipe(own)))
    if own == _EMPTY and not children:
        return None
    return replace(own, children=children)


def _normal_children(children: Mapping[str, Node], above: Mark | None) -> dict[str, Node]:
    normal = ((key, _normal(child, above)) for key, child in children.items())
    return {key: child for key, child in normal if child is not None}


def _purge(node: Node, older_than: int) -> Node:
    mark, floor = node.mark, node.floor
    if mark is not None and mark.kind is Kind.DELETE and mark.ts < older_than:
        mark = None
    if floor is not None and floor.ts < older_than:
        floor = None
    children = {key: _purge(child, older_than) for key, child in node.children.items()}
    return Node(mark, node.value, floor, children)


def _render(node: Node) -> Any:
    """A present node's content (the caller checks it is present)."""
    if node.mark is not None and node.mark.kind is Kind.VALUE:
        # A copy: a handler that edits an array in the document must not edit the state.
        return copy.deepcopy(node.value)
    return {key: _render(child) for key, child in sorted(node.children.items()) if _present(child)}


def _present(node: Node) -> bool:
    return node.mark is not None and node.mark.kind is not Kind.DELETE


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
