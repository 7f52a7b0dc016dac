"""The Redis store's correlation keys and encodings (docs/correlation.md section 6, slice 4),
and the Redis enrolment-history example's writes, without Redis."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from handlers import school_history_redis
from projector.core.correlate import InputTime
from projector.core.event import Event
from projector.store.redis import Keys, input_time_text, parse_input_time, stored_input_times
from projector.store.redis_view import Op, RedisView


def test_correlation_state_is_versioned_and_input_times_sit_with_the_fence() -> None:
    """Proves the layout a rebuild's swap relies on: the records, the due index and the open
    set live under the projection's versioned state base (the rebuild builds them at its own
    version, the swap carries them with the positions), while the input progress sits beside
    the fence and checkpoints of whoever reads the partitions (a rebuild has its own). A
    correlation key is the last part of its key name, as a stream id is."""
    live = Keys("p", "school", "3")
    assert live.correlation("tx:7") == "p:s:school:3:co:tx:7"
    assert (live.codue, live.coopen) == ("p:s:school:3:codue", "p:s:school:3:coopen")
    assert (live.times, live.epochs) == ("p:s:school:times", "p:s:school:epochs")
    rebuild = Keys("p", "school#rebuild", "4")
    assert rebuild.correlation("tx:7") == "p:s:school:4:co:tx:7"
    assert rebuild.times == "p:s:school#rebuild:times"


@given(st.one_of(st.none(), st.integers(-(2**53), 2**53)), st.booleans())
def test_an_input_time_reads_back_as_written(high: int | None, caught_up: bool) -> None:
    """Proves the ``times`` encoding (``"<high>,<0|1>"``, high empty when none) round-trips
    every progress a partition can have, negative and epoch-ms highs included."""
    t = InputTime(high, caught_up)
    assert parse_input_time(input_time_text(t)) == t


def test_stored_input_times_are_the_claimed_partitions_of_the_topics() -> None:
    """Proves which partitions count for the watermark: every claimed partition of the
    correlation's topics, one with no progress stored yet as unset (it holds the watermark,
    as a new checkpoint row does in PostgreSQL); progress stored for a partition not claimed
    and other topics' partitions do not count. Topic names
    may hold colons: the partition is after the last one."""
    times = {"a:0": "100,0", "a:1": ",1", "b:0": "5,0", "gone:0": "1,0", "x:y:2": "7,1"}
    claimed = ["a:0", "a:1", "a:2", "b:0", "x:y:2"]
    assert stored_input_times(times, claimed, {"a", "x:y"}) == {
        ("a", 0): InputTime(100),
        ("a", 1): InputTime(None, caught_up=True),
        ("a", 2): InputTime(None),
        ("x:y", 2): InputTime(7, caught_up=True),
    }


def test_the_redis_enrolment_history_writes_one_hash_and_two_indexes_per_event() -> None:
    """Proves the layout ``handlers.school_history_redis`` documents: per business event a
    hash keyed by its id (type, student and course ids, time, data as JSON; ids the event does
    not name are left out), its id in ``history`` and in the student's ``student_history``,
    scored by the commit time; an ``update`` of a course alone touches no student's set.
    Every write is keyed by the id, so applying the same events twice writes the same."""
    enroll = Event(
        "student:1",
        None,
        1_700,
        "enroll",
        {"student": {"id": 1}, "course": {"id": 7}, "lookup": {}},
        "school:9:abc",
    )
    update = Event("course:7", None, 1_800, "update", {"course": {"id": 7}}, "school:10:def")
    ops: list[Op] = []
    view = RedisView("ns", ops, lambda *_: [])
    school_history_redis.handle_business([enroll, update], view)
    first = list(ops)
    school_history_redis.handle_business([enroll, update], view)
    assert ops == first + first
    fields = dict(zip(first[0][2::2], first[0][3::2], strict=True))
    assert first[0][:2] == ["HSET", "ns:history:school:9:abc"]
    assert {k: v for k, v in fields.items() if k != "data"} == {
        "type": "enroll",
        "student_id": "1",
        "course_id": "7",
        "at": "1700",
    }
    assert json.loads(fields["data"]) == enroll.data
    assert first[1] == ["ZADD", "ns:history", "1700", "school:9:abc"]
    assert first[2] == ["ZADD", "ns:student_history:1", "1700", "school:9:abc"]
    assert [op[:2] for op in first[3:]] == [
        ["HSET", "ns:history:school:10:def"],
        ["ZADD", "ns:history"],
    ]
