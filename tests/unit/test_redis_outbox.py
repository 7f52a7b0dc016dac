"""The Redis outbox's pure helpers (projector/store/redis_outbox.py): key layout, the batch's
outbox commands, the held entries' encoding and order, and the swap's hand-off rule."""

from __future__ import annotations

import json

from projector.core.correlate import ClosedWindow, Pending
from projector.core.event import Event
from projector.store.base import OutboxMessage
from projector.store.redis_outbox import (
    HeldKeys,
    OutboxKeys,
    batch_ops,
    correlation_keys,
    handover_ops,
    held_in_order,
    owed,
    parse_held,
    row_of,
)


def event(n: int, key: str) -> Event:
    return Event(
        f"student:{n}", None, 1_000 + n, "update", {"n": n}, f"c:{key}:{n}", None, {"key": key}
    )


def message(n: int, key: str) -> OutboxMessage:
    return OutboxMessage(event(n, key), "out", f"student:{n}")


def test_outbox_keys_sit_beside_the_fence_and_held_keys_at_the_rebuilds_version() -> None:
    """Proves the layout of docs/redis.md: the live outbox under ``<prefix>:s:<name>:outbox``
    (not versioned), the held set under the version the rebuild builds."""
    assert OutboxKeys.of("p", "school") == OutboxKeys(
        "p:s:school:outbox",
        "p:s:school:outbox:ids",
        "p:s:school:outbox:seq",
        "p:s:school:outbox:lock",
    )
    assert HeldKeys.of("p:s:school:3") == HeldKeys(
        "p:s:school:3:cohold", "p:s:school:3:coholdts", "p:s:school:3:coholdseq"
    )


def test_a_live_batch_queues_and_a_rebuilds_batch_prunes_then_holds() -> None:
    """Proves the commands a batch hands its script: a live batch one ``OUTBOX`` per event,
    in order, with the event's JSON (no pruning, even if asked: nothing is held live); a
    rebuild's batch ``OUTPRUNE`` first (when asked), then one ``OUTHOLD`` per event with its
    event time and the message (topic, key, event) as JSON."""
    live = batch_ops("p", "school", "p:s:school:1", [message(1, "a"), message(2, "b")], False, 5)
    assert [op[:5] for op in live] == [
        ["OUTBOX", "p:s:school:outbox:ids", "p:s:school:outbox", "p:s:school:outbox:seq", "c:a:1"],
        ["OUTBOX", "p:s:school:outbox:ids", "p:s:school:outbox", "p:s:school:outbox:seq", "c:b:2"],
    ]
    assert live[0][5:7] == ["out", "student:1"]
    assert Event.from_json(json.loads(live[0][7])) == event(1, "a")

    held = batch_ops("p", "school", "p:s:school:2", [message(1, "a")], True, 123)
    assert held[0] == ["OUTPRUNE", "p:s:school:2:cohold", "p:s:school:2:coholdts", "123"]
    assert held[1][:6] == [
        "OUTHOLD",
        "p:s:school:2:cohold",
        "p:s:school:2:coholdts",
        "p:s:school:2:coholdseq",
        "c:a:1",
        "1001",
    ]
    assert json.loads(held[1][6]) == {
        "topic": "out",
        "key": "student:1",
        "event": event(1, "a").to_json(),
    }
    assert batch_ops("p", "school", "b", [], True, None) == []


def test_held_entries_come_back_in_the_order_they_were_named() -> None:
    """Proves the held value ``"<n> <message JSON>"`` parses back, and that the hand-off takes
    held entries by ``n`` (the naming order), not by id; their correlation keys once each."""
    body = json.dumps({"topic": "out", "key": "k", "event": event(1, "a").to_json()})
    assert parse_held(f"12 {body}") == (12, json.loads(body))
    held = {
        "c:a:1": f"2 {json.dumps({'topic': 't', 'key': 'k', 'event': event(1, 'a').to_json()})}",
        "c:z:2": f"1 {json.dumps({'topic': 't', 'key': 'k', 'event': event(2, 'z').to_json()})}",
        "c:a:3": f"10 {json.dumps({'topic': 't', 'key': 'k', 'event': event(3, 'a').to_json()})}",
    }
    assert [i for i, _ in held_in_order(held)] == ["c:z:2", "c:a:1", "c:a:3"]
    assert correlation_keys(held) == ["a", "z"]


def record(parts: bool, closed: bool, end: bool = False) -> str:
    e = Event("s", None, 1, "c", {}, "p/1", None, {})
    return json.dumps(
        Pending(
            "k",
            {"student": (e,)} if parts else {},
            end=e if end else None,
            closed=(ClosedWindow(5, frozenset({"p/0"}), None),) if closed else (),
        ).to_json()
    )


def test_a_held_event_is_owed_unless_the_live_run_closed_its_key_with_nothing_open() -> None:
    """Proves the hand-off rule (PostgreSQL's, docs/correlation.md "Slice 5 as built"): not owed
    only when the live record has a closed window and no open part and no END record waiting;
    owed with no record, with open parts, with an END record waiting, or with nothing closed."""
    assert not owed(record(parts=False, closed=True))
    assert owed(None)
    assert owed(record(parts=True, closed=True))
    assert owed(record(parts=False, closed=True, end=True))
    assert owed(record(parts=False, closed=False))


def test_the_hand_off_queues_what_is_owed_in_order_then_deletes_the_held_set() -> None:
    """Proves the hand-off's commands: ``OUTBOX`` for each owed held event, in naming order,
    under the live projection's queue with the held topic and key, then ``DEL`` of the three
    held keys."""

    def held_value(n: int, e: Event) -> str:
        return f"{n} {json.dumps({'topic': 't', 'key': e.stream, 'event': e.to_json()})}"

    held = {
        "c:done:1": held_value(1, event(1, "done")),
        "c:open:2": held_value(2, event(2, "open")),
    }
    ops = handover_ops("p", "school", "p:s:school:2", held, {"done": record(False, True)})
    assert [op[0] for op in ops] == ["OUTBOX", "DEL", "DEL", "DEL"]
    assert ops[0][1:7] == [
        "p:s:school:outbox:ids",
        "p:s:school:outbox",
        "p:s:school:outbox:seq",
        "c:open:2",
        "t",
        "student:2",
    ]
    assert Event.from_json(json.loads(ops[0][7])) == event(2, "open")
    assert [op[1] for op in ops[1:]] == [
        "p:s:school:2:cohold",
        "p:s:school:2:coholdts",
        "p:s:school:2:coholdseq",
    ]


def test_a_queue_entry_is_a_row_whose_seq_is_its_position() -> None:
    """Proves a stream entry ``<n>-0`` reads back as the row the publisher marks by ``seq``."""
    fields = {
        "id": "c:a:1",
        "topic": "out",
        "key": "student:1",
        "event": '{"id": "c:a:1"}',
        "at": "5",
    }
    row = row_of("42-0", fields)
    assert (row.seq, row.event_id, row.topic, row.key, row.event) == (
        42,
        "c:a:1",
        "out",
        "student:1",
        {"id": "c:a:1"},
    )
