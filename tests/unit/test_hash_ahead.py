"""hash_ahead: the hashes a batch's planning needs, computed before the batch begins (pure)."""

from __future__ import annotations

from projector.core.event import Event, payload_hash
from projector.core.sequencer import SequenceRules, StreamPosition, sequence_stream
from projector.runner.batch import Decoded, hash_ahead


def _event(stream: str, seq: int) -> Event:
    return Event(stream, seq, 0, "DEPOSITED", {"amount": seq}, f"{stream}/{seq}")


def test_each_streams_last_event_is_hashed_ahead_and_no_other() -> None:
    """Proves that hash_ahead fills in exactly the hash each stream's new position keeps
    (its last event's, the right one), and leaves the earlier events of a hot stream alone:
    they need none, and hashing them would cost a stream of many events per batch more than
    it saves. Then planning finds the hash there and the position holds it."""
    events = [_event("a", 1), _event("b", 1), _event("a", 2), _event("a", 3)]
    hash_ahead(Decoded(events, [], 0, {}))
    assert [e._hash for e in events] == ["", events[1]._hash, "", events[3]._hash]
    assert events[3]._hash == payload_hash("DEPOSITED", {"amount": 3})
    plan = sequence_stream(
        StreamPosition("a", 0), {}, [events[0], events[2], events[3]], SequenceRules()
    )
    assert plan.position.last_hash == events[3]._hash
