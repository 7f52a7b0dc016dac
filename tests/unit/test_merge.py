"""Merge mode's rules, and the property it rests on: whatever the arrival order, batching and
duplication, a document's events merge into the same state and the same document, the one
their timestamp order says."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from itertools import permutations
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from projector.core.decode import load_decoder
from projector.core.event import Event
from projector.core.merge import (
    DocState,
    MergeResult,
    MergeRules,
    materialise,
    merge_events,
    merge_states,
    purge_tombstones,
)
from projector.core.message import RawMessage

RULES = MergeRules()


def ev(ts: int, data: dict[str, Any], id_: str | None = None, type_: str = "upsert") -> Event:
    return Event("doc:1", None, ts, type_, data, id_ or f"e{ts}")


def delete(ts: int, id_: str | None = None) -> Event:
    return ev(ts, {}, id_ or f"d{ts}", "delete")


def one_by_one(events: list[Event], rules: MergeRules = RULES) -> MergeResult:
    """Each event its own batch, the state carried through JSON as the store carries it."""
    state: DocState | None = None
    result = merge_events(None, [], rules)
    for event in events:
        result = merge_events(state, [event], rules)
        state = DocState.from_json(json.loads(json.dumps(result.state.to_json())))
    return result


def every_order(events: list[Event], rules: MergeRules = RULES) -> dict[str, Any] | None:
    """The document, after checking that every arrival order, in one batch or one event per
    batch, gives the same state."""
    reference = merge_events(None, events, rules)
    for order in permutations(events):
        assert merge_events(None, order, rules).state == reference.state
        assert one_by_one(list(order), rules).state == reference.state
    return reference.document


# --- the seed's cases ---------------------------------------------------------------------


def test_seed_example_holds_for_all_six_arrival_orders() -> None:
    """Proves DESIGN's seed example: T2, T1, T3 in any of the 6 orders give the T3 name, T1's
    age and T3's contact; ``ts`` in the data is a field like any other."""
    events = [
        ev(2, {"id": 1, "ts": 2, "name": "Samuel"}),
        ev(1, {"id": 1, "ts": 1, "name": "Sam", "age": 26}),
        ev(3, {"id": 1, "ts": 3, "name": "Marlon Samuels", "contact": 123}),
    ]
    expected = {"id": 1, "ts": 3, "name": "Marlon Samuels", "age": 26, "contact": 123}
    documents = [merge_events(None, order, RULES).document for order in permutations(events)]
    assert len(documents) == 6
    assert all(document == expected for document in documents)
    assert every_order(events) == expected


def test_two_services_enriching_one_record_end_in_one_document() -> None:
    """Proves the NLP/CV case: two topics sharing a key each add their field, whichever
    finishes first, and the shared fields agree."""
    base = {"id": 1234, "text": "I love pizza", "photo": "https://photo.service/photo001"}
    nlp = ev(10, {**base, "nlp": {"topic": "pizza", "score": 0.9}}, "nlp/1234")
    cv = ev(12, {**base, "cv": ["pizza", "restaurant", "cup"]}, "cv/1234")
    assert every_order([nlp, cv]) == {
        **base,
        "nlp": {"topic": "pizza", "score": 0.9},
        "cv": ["pizza", "restaurant", "cup"],
    }


# --- fields, values, ties -----------------------------------------------------------------


def test_nested_objects_merge_field_by_field() -> None:
    """Proves the merge recurses: an older write's other nested fields survive a newer one."""
    events = [ev(2, {"a": {"x": 1, "n": {"p": 1}}}), ev(1, {"a": {"y": 2, "n": {"q": 2}}})]
    assert every_order(events) == {"a": {"x": 1, "y": 2, "n": {"p": 1, "q": 2}}}


def test_a_scalar_replaces_an_object_and_its_older_fields_never_come_back() -> None:
    """Proves the type-change rule: ``{a:{x}}`` T1, ``{a:{y}}`` T2, ``{a:5}`` T3, ``{a:{z}}``
    T4 give ``{a:{z}}`` in all 24 orders (x and y, older than the scalar, stay gone)."""
    events = [
        ev(1, {"a": {"x": 1}}),
        ev(2, {"a": {"y": 2}}),
        ev(3, {"a": 5}),
        ev(4, {"a": {"z": 1}}),
    ]
    assert every_order(events) == {"a": {"z": 1}}
    assert every_order(events[:3]) == {"a": 5}


def test_an_older_object_does_not_replace_a_newer_scalar() -> None:
    """Proves the newest assertion decides a path's type, not the richest one."""
    assert every_order([ev(2, {"a": "flat"}), ev(1, {"a": {"x": 1}})]) == {"a": "flat"}


def test_an_empty_object_is_an_object() -> None:
    """Proves ``{}`` is a write: it replaces an older scalar with an empty object."""
    assert every_order([ev(1, {"a": 5}), ev(2, {"a": {}})]) == {"a": {}}


def test_arrays_are_whole_values() -> None:
    """Proves arrays are not merged element by element: the newest array wins whole."""
    events = [ev(1, {"tags": ["a", "b", "c"]}), ev(2, {"tags": ["z"]})]
    assert every_order(events) == {"tags": ["z"]}


def test_null_is_a_value() -> None:
    """Proves a field set to null at T2 beats a value at T1 and is kept (not removed)."""
    events = [ev(1, {"name": "Sam", "age": 26}), ev(2, {"name": None})]
    assert every_order(events) == {"name": None, "age": 26}


def test_a_timestamp_tie_is_broken_by_event_id() -> None:
    """Proves equal timestamps are ordered by id: the larger id wins, in every order."""
    events = [ev(5, {"v": "from a"}, "a"), ev(5, {"v": "from b"}, "b")]
    assert every_order(events) == {"v": "from b"}


def test_two_payloads_under_one_stamp_resolve_the_same_way_in_any_order() -> None:
    """Proves even a conflict (same ts and id, different data) ends in one deterministic
    document, so two instances can never disagree."""
    events = [ev(5, {"v": 1, "w": [1]}, "x"), ev(5, {"v": 2, "w": {"k": 1}}, "x")]
    assert every_order(events) == {"v": 2, "w": [1]}


# --- deletes --------------------------------------------------------------------------------


def test_a_deleted_document_is_not_resurrected_by_an_older_write() -> None:
    """Proves the delete tombstone: a write older than the delete, arriving after it (or
    before), leaves no document."""
    assert every_order([ev(1, {"name": "Sam"}), delete(3), ev(2, {"age": 26})]) is None


def test_a_write_newer_than_a_delete_brings_back_only_newer_fields() -> None:
    """Proves a document comes back with the fields written after its delete; older fields,
    nested ones too, stay deleted."""
    events = [
        ev(1, {"name": "Sam", "age": 26, "a": {"x": 1}}),
        delete(2),
        ev(3, {"contact": 123, "a": {"y": 2}}),
    ]
    assert every_order(events) == {"contact": 123, "a": {"y": 2}}


def test_configured_delete_types_remove_the_document() -> None:
    """Proves the delete event types come from the rules; ``delete`` is then ordinary."""
    rules = MergeRules(delete_types=frozenset({"CustomerDeleted"}))
    gone = [ev(1, {"name": "Sam"}), ev(2, {}, "x", "CustomerDeleted")]
    assert every_order(gone, rules) is None
    kept = [ev(1, {"name": "Sam"}), ev(2, {"reason": "x"}, "x", "delete")]
    assert every_order(kept, rules) == {"name": "Sam", "reason": "x"}


def test_a_debezium_delete_removes_the_document_whatever_the_delete_types() -> None:
    """Proves a CDC delete (Debezium's op d) removes the document even when the projection
    configures its own delete types, which do not name the decoder's ``delete``, and that an
    older change arriving after it does not bring the row back."""
    decoder = load_decoder("debezium", {})

    def cdc(op: str, lsn: int, row: dict[str, Any]) -> Event:
        source = {"connector": "postgresql", "schema": "public", "table": "student", "lsn": lsn}
        before, after = (row, None) if op == "d" else (None, row)
        value = {"before": before, "after": after, "source": source, "op": op, "ts_ms": 1}
        raw = RawMessage("cdc.student", 0, lsn, b'{"id": 42}', json.dumps(value).encode())
        event = decoder.decode(raw)
        assert event is not None
        return event

    rules = MergeRules(delete_types=frozenset({"StudentExpelled"}))
    row = {"id": 42, "name": "Jhon"}
    assert every_order([cdc("c", 10, row), cdc("d", 20, row)], rules) is None
    assert every_order([cdc("c", 10, row), cdc("d", 20, row), cdc("u", 15, row)], rules) is None


def test_removed_field_paths_are_tombstoned_nested_too() -> None:
    """Proves ``$removed`` removes top-level and nested fields, an older write cannot bring
    them back, a newer one can, and ``$removed`` itself is not data."""
    events = [
        ev(1, {"name": "Sam", "contact": 123, "address": {"city": "Oslo", "zip": "0150"}}),
        ev(3, {"$removed": ["contact", "address.city"]}),
        ev(2, {"contact": 456, "address": {"city": "Bergen"}}),
    ]
    assert every_order(events) == {"name": "Sam", "address": {"zip": "0150"}}
    newer = [*events, ev(4, {"address": {"city": "Tromsø"}})]
    assert every_order(newer) == {"name": "Sam", "address": {"zip": "0150", "city": "Tromsø"}}


def test_a_removed_path_may_be_a_list_of_keys_for_keys_with_dots() -> None:
    """Proves a path given as a list of keys names keys that contain a dot."""
    events = [ev(1, {"a.b": 1, "a": {"b": 2}}), ev(2, {"$removed": [["a.b"]]})]
    assert every_order(events) == {"a": {"b": 2}}


def test_removing_and_writing_a_path_in_one_event_removes_it() -> None:
    """Proves the tie rule within one event: a removal beats a write of the same path."""
    events = [ev(1, {"a": {"x": 1}, "b": 1, "$removed": ["a", "b"]})]
    assert every_order(events) == {}


def test_a_removal_only_event_does_not_bring_a_deleted_document_back() -> None:
    """Proves an event that only removes fields writes nothing, so it can't resurrect a
    document deleted before it."""
    assert every_order([ev(1, {"a": 1}), delete(2), ev(3, {"$removed": ["a"]})]) is None


def test_a_removed_field_of_a_scalar_holds_when_the_path_becomes_an_object() -> None:
    """Proves a removal newer than an object write wins even if the path was a scalar when
    the removal arrived."""
    events = [ev(1, {"a": 5}), ev(3, {"$removed": ["a.b"]}), ev(2, {"a": {"b": 1, "c": 2}})]
    assert every_order(events) == {"a": {"c": 2}}


def test_without_a_removed_field_rule_it_is_ordinary_data() -> None:
    """Proves ``removed_field=None`` turns the removal list off."""
    rules = MergeRules(removed_field=None)
    assert every_order([ev(1, {"$removed": ["a"], "a": 1})], rules) == {"$removed": ["a"], "a": 1}


# --- purge ----------------------------------------------------------------------------------


def test_purge_forgets_old_tombstones_and_then_an_older_write_may_resurrect() -> None:
    """Proves the documented trade-off: tombstones older than the bound are dropped (a late
    write older than them then shows again), newer ones stay, the document is unchanged."""
    state = merge_events(None, [ev(1, {"a": 1, "b": 2}), delete(5)], RULES).state
    assert purge_tombstones(state, older_than=5) == state
    purged = purge_tombstones(state, older_than=6)
    assert purged == DocState() and materialise(purged) is None
    assert merge_events(purged, [ev(2, {"a": 3})], RULES).document == {"a": 3}
    assert merge_events(state, [ev(2, {"a": 3})], RULES).document is None


def test_purge_keeps_values_and_drops_only_old_field_tombstones() -> None:
    """Proves purge never drops a value, and drops an old removal and an old type-change
    floor."""
    events = [ev(1, {"a": {"x": 1}, "b": 1}), ev(2, {"$removed": ["b"], "a": 5})]
    state = merge_events(None, [*events, ev(3, {"a": {"z": 1}, "c": None})], RULES).state
    purged = purge_tombstones(state, older_than=10)
    assert materialise(purged) == materialise(state) == {"a": {"z": 1}, "c": None}
    late = [ev(1, {"a": {"y": 1}, "b": 2}, "late")]
    assert merge_events(state, late, RULES).changed is False
    assert merge_events(purged, late, RULES).document == {"a": {"y": 1, "z": 1}, "b": 2, "c": None}


# --- state, changed, errors ----------------------------------------------------------------


def test_state_round_trips_through_json() -> None:
    """Proves the state the store keeps as JSONB comes back equal: marks, null values,
    arrays, floors and tombstones."""
    events = [
        ev(1, {"a": {"x": 1}, "n": None, "l": [1, {"k": None}]}),
        ev(2, {"a": 5, "$removed": ["gone.deep"]}),
        ev(3, {"a": {"z": 1}}, "e3"),
        delete(0),
    ]
    state = merge_events(None, events, RULES).state
    text = json.dumps(state.to_json())
    assert DocState.from_json(json.loads(text)) == state
    assert json.dumps(DocState.from_json(json.loads(text)).to_json()) == text


def test_changed_is_false_for_duplicates_and_stale_events() -> None:
    """Proves ``changed`` lets the store skip a write: duplicates and events older than every
    field they touch change nothing."""
    first = merge_events(None, [ev(5, {"a": 1, "b": {"c": 2}}), delete(3)], RULES)
    assert first.changed
    assert not merge_events(first.state, [ev(5, {"a": 1, "b": {"c": 2}})], RULES).changed
    stale = [ev(4, {"a": 9, "b": {"c": 9}}), ev(2, {"z": 1}), delete(1)]
    assert not merge_events(first.state, stale, RULES).changed
    assert merge_events(first.state, [ev(6, {"a": 2})], RULES).changed


def test_editing_the_document_does_not_edit_the_state() -> None:
    """Proves the document is the caller's own: appending to one of its arrays leaves the
    state (which the store is about to write) as it was."""
    result = merge_events(None, [ev(1, {"tags": ["a"], "n": {"l": [1]}})], RULES)
    assert result.document is not None
    result.document["tags"].append("b")
    result.document["n"]["l"].append(2)
    assert materialise(result.state) == {"tags": ["a"], "n": {"l": [1]}}


def test_nothing_merged_is_no_document() -> None:
    """Proves an empty batch on no state gives no document and no change."""
    result = merge_events(None, [], RULES)
    assert result == MergeResult(DocState(), None, False)


def test_caller_errors_are_value_errors() -> None:
    """Proves a missing ts, mixed streams and malformed removal lists are refused."""
    with pytest.raises(ValueError, match="no ts"):
        merge_events(None, [Event("doc:1", None, None, "upsert", {}, "x")], RULES)
    with pytest.raises(ValueError, match="several streams"):
        merge_events(None, [ev(1, {}), Event("doc:2", None, 1, "upsert", {}, "y")], RULES)
    removed: object
    for removed in ("a", [""], ["a..b"], [[]], [1]):
        with pytest.raises(ValueError):
            merge_events(None, [ev(1, {"$removed": removed})], RULES)


def test_merge_imports_no_driver() -> None:
    """Proves the merge core is pure: importing it loads no Kafka, PostgreSQL, Redis or
    Prometheus module."""
    code = (
        "import sys, projector.core.merge; "
        "bad = [m for m in ('confluent_kafka', 'psycopg', 'redis', 'prometheus_client') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# --- properties -----------------------------------------------------------------------------

KEYS = st.sampled_from(["a", "b", "c"])
SCALARS = st.one_of(
    st.none(),
    st.integers(-2, 2),
    st.sampled_from(["x", "y"]),
    st.lists(st.integers(0, 2), max_size=2),
)
VALUES = st.recursive(SCALARS, lambda inner: st.dictionaries(KEYS, inner, max_size=3), max_leaves=6)
OBJECTS = st.dictionaries(KEYS, VALUES, max_size=3)
PATHS = st.lists(KEYS, min_size=1, max_size=3).map(".".join)


@st.composite
def event_sets(draw: st.DrawFn, unique_ids: bool = False) -> list[Event]:
    """Writes, removals and deletes with colliding paths and timestamps; with ``unique_ids``
    no two events share a stamp, else some share one with different payloads."""
    n = draw(st.integers(1, 8))
    events = []
    for i in range(n):
        ts = draw(st.integers(0, 4))
        id_ = f"e{i}" if unique_ids else draw(st.sampled_from(["p", "q", "r"]))
        kind = draw(st.sampled_from(["write", "write", "write", "remove", "delete"]))
        data: dict[str, Any] = {} if kind == "delete" else draw(OBJECTS)
        if kind == "remove":
            data["$removed"] = draw(st.lists(PATHS, min_size=1, max_size=2))
        events.append(ev(ts, data, id_, "delete" if kind == "delete" else "upsert"))
    return events


@st.composite
def deliveries(draw: st.DrawFn, events: list[Event]) -> list[list[Event]]:
    """The events in any order, some twice, cut into any batches."""
    dups = draw(st.lists(st.sampled_from(events), max_size=len(events)))
    order = draw(st.permutations(events + dups))
    cuts = sorted(draw(st.sets(st.integers(1, len(order)), max_size=5)))
    return [order[lo:hi] for lo, hi in zip([0, *cuts], [*cuts, len(order)], strict=True)]


def deliver(batches: list[list[Event]]) -> MergeResult:
    """Merges batch after batch, the state carried through JSON between them."""
    state: DocState | None = None
    result = merge_events(None, [], RULES)
    for batch in batches:
        result = merge_events(state, batch, RULES)
        state = DocState.from_json(json.loads(json.dumps(result.state.to_json())))
    return result


def replay_in_stamp_order(events: list[Event]) -> dict[str, Any] | None:
    """An independent model: apply the events one after the other in (ts, id) order, with a
    plain deep merge, path removal and document delete."""
    document: dict[str, Any] | None = None
    for event in sorted(events, key=lambda e: (e.ts, e.id)):
        if event.type == "delete":
            document = None
            continue
        data = copy.deepcopy(event.data)
        removed = data.pop("$removed", None)
        if data or removed is None:
            document = deep_merge(document or {}, data)
        for path in removed or []:
            remove_path(document, path.split("."))
    return document


def deep_merge(into: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    for key, value in data.items():
        old = into.get(key)
        is_obj = isinstance(value, dict)
        into[key] = deep_merge(old if isinstance(old, dict) else {}, value) if is_obj else value
    return into


def remove_path(document: dict[str, Any] | None, keys: list[str]) -> None:
    for key in keys[:-1]:
        document = document.get(key) if isinstance(document, dict) else None
    if isinstance(document, dict):
        document.pop(keys[-1], None)


@given(event_sets(unique_ids=True), st.data())
def test_the_merge_equals_replaying_events_in_timestamp_order(
    events: list[Event], data: st.DataObject
) -> None:
    """Proves the semantics against an independent model: however the events arrive
    (reordered, duplicated, batched), the document is what applying them one by one in
    (ts, id) order gives."""
    result = deliver(data.draw(deliveries(events)))
    assert result.document == replay_in_stamp_order(events)


@given(event_sets(), st.data())
def test_order_duplication_and_batching_give_the_identical_state(
    events: list[Event], data: st.DataObject
) -> None:
    """Proves the CRDT property, deletes, removals and same-stamp conflicts included: any
    permutation, duplication and batching (state through JSON between batches) ends in the
    identical state and document as one batch in the original order."""
    reference = merge_events(None, events, RULES)
    result = deliver(data.draw(deliveries(events)))
    assert result.state == reference.state
    assert result.document == reference.document == materialise(reference.state)


@given(event_sets())
def test_merging_the_same_events_again_changes_nothing(events: list[Event]) -> None:
    """Proves idempotence: a second delivery of already-merged events reports no change and
    leaves the state as it was."""
    first = merge_events(None, events, RULES)
    again = merge_events(first.state, events, RULES)
    assert not again.changed and again.state == first.state
    assert all(not merge_events(first.state, [e], RULES).changed for e in events)


@given(event_sets(), event_sets(), event_sets())
def test_merge_states_is_a_join(a: list[Event], b: list[Event], c: list[Event]) -> None:
    """Proves ``merge_states`` is commutative, associative and idempotent, and that merging
    the states of two subsets equals merging all the events."""
    sa, sb, sc = (merge_events(None, events, RULES).state for events in (a, b, c))
    assert merge_states(sa, sb) == merge_states(sb, sa)
    assert merge_states(merge_states(sa, sb), sc) == merge_states(sa, merge_states(sb, sc))
    assert merge_states(sa, sa) == sa
    assert merge_states(sa, sb) == merge_events(None, a + b, RULES).state


@given(event_sets(), event_sets(), st.integers(0, 5))
def test_purge_keeps_the_document_and_the_merge_of_newer_events(
    old: list[Event], new: list[Event], bound: int
) -> None:
    """Proves purging tombstones older than a bound changes no document, now or after events
    at or after the bound are merged (purging before or after them ends alike), and that a bound below
    every timestamp purges nothing."""
    state = merge_events(None, old, RULES).state
    purged = purge_tombstones(state, bound)
    assert purge_tombstones(state, 0) == state
    assert materialise(purged) == materialise(state)
    newer = [e for e in new if e.ts is not None and e.ts >= bound]
    after = merge_events(state, newer, RULES)
    later = merge_events(purged, newer, RULES).state
    assert purge_tombstones(later, bound) == purge_tombstones(after.state, bound)
    assert merge_events(purged, newer, RULES).document == after.document
