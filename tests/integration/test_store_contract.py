"""The store contract: the same scenarios, run once on PostgreSQL and once on Redis, end in
exactly the oracle's views and a clean state of projector's own (nothing parked, no gap, no
dead letter unless the scenario makes one, checkpoints at the end of every partition)."""

from __future__ import annotations

import itertools
import random
import signal
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from projector import scenarios
from projector.replay.responder import ReplayResponder
from projector.runner.dead_letters import resolve
from projector.runner.rebuild import rebuild
from projector.store.connect import StoreSet
from tests.conftest import unique
from tests.integration.conftest import StoreUnderTest
from tests.integration.gaps_harness import FakeClock, daemon_thread, wait_until
from tests.integration.harness import daemon_process, publish, run_until_caught_up
from tests.integration.test_replay_fill import responder_running
from tests.integration.test_responder import SCHEMA, TABLE, store_events
from tests.integration.views import OwnState

pytestmark = pytest.mark.integration


def test_shuffled_duplicated_events_equal_the_oracle(
    store: StoreUnderTest, new_topic: Callable[..., str]
) -> None:
    """Proves the core promise on both stores: 300 customers and 30 games interleaved (about
    6,000 events), shuffled within windows and 3% duplicated, on 4 partitions, end in exactly
    the oracles' customer list and box scores (the per-row counters show no double apply),
    with nothing parked, no gap, no dead letter and every checkpoint at its partition's end."""
    rng = random.Random(11)
    log = scenarios.customer_log(rng, 300) + scenarios.game_log(rng, 30, 100)
    rng.shuffle(log)  # interleave the two stories; each stream keeps its own order below
    log = sorted(log, key=lambda w: (w["seq"], rng.random()))
    delivered = scenarios.with_duplicates(
        rng, scenarios.shuffle_within_windows(rng, log, 100), 0.03
    )
    topic = new_topic(partitions=4)
    publish(store.services.kafka, topic, delivered)
    config = store.config([store.projection("shop", [topic], ["customers", "game"])])

    assert run_until_caught_up(config) == 0

    assert store.views.customers("shop") == scenarios.customers_oracle(log)
    assert store.views.games("shop") == scenarios.game_oracle(log)
    assert store.views.own("shop") == OwnState(0, 0, 0, len(delivered))


def poisoned_log() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Customers 1-40, and customer ``bad`` whose first event is a rename: the handler raises
    on it (a rename before the create breaks the view's rule). Its create comes next."""
    log = scenarios.customer_log(random.Random(5), 40)
    bad = [
        {
            "stream": "customer:bad",
            "seq": 1,
            "type": "CUSTOMER_RENAMED",
            "ts": 1,
            "data": {"id": "bad", "name": "too early"},
        },
        {
            "stream": "customer:bad",
            "seq": 2,
            "type": "CUSTOMER_CREATED",
            "ts": 2,
            "data": {"id": "bad", "name": "Ada", "email": None},
        },
        {
            "stream": "customer:bad",
            "seq": 3,
            "type": "CUSTOMER_RENAMED",
            "ts": 3,
            "data": {"id": "bad", "name": "Ada Okafor"},
        },
    ]
    return log, bad


def test_a_poison_event_halts_only_its_stream_and_skip_resumes_it(
    store: StoreUnderTest, new_topic: Callable[..., str]
) -> None:
    """Proves on both stores: an event the handler rejects becomes a dead letter with the
    handler's reason, its stream applies nothing after it (its successors are parked, not
    applied), every other stream reaches the oracle, and the daemon does not stop;
    ``dead-letters skip`` then moves the stream past it and drains what was parked, and a
    rebuild skips it again."""
    log, bad = poisoned_log()
    delivered = log[:20] + bad + log[20:]
    topic = new_topic(partitions=2)
    publish(store.services.kafka, topic, delivered)
    config = store.config([store.projection("people", [topic], ["customers"])])

    assert run_until_caught_up(config) == 0

    assert store.views.customers("people") == scenarios.customers_oracle(log)
    assert store.views.own("people") == OwnState(2, 0, 1, len(delivered))
    assert store.views.parked_count("people") == 2
    stores = StoreSet(config)
    try:
        [letter] = stores.of("people").list_dead_letters("people", "open", 10)
    finally:
        stores.close()
    assert letter.stream == "customer:bad" and letter.seq == 1
    assert "CUSTOMER_RENAMED of a customer that does not exist" in letter.reason

    [outcome] = resolve(config, "people", [letter.id], "skip", clock=lambda: 0.0)

    assert outcome.status == "skipped"
    # Past the skipped rename: created at seq 2, renamed at seq 3, two events applied.
    resumed = {"id": "bad", "name": "Ada Okafor", "email": None, "version": 3, "applied_events": 2}
    assert store.views.customers("people") == {**scenarios.customers_oracle(log), "bad": resumed}
    assert store.views.own("people") == OwnState(0, 0, 0, len(delivered))

    # A rebuild meets the poison again (its handler still fails) and skips it as the operator
    # did: the rebuilt view is the live one, not the stream stopped before its poison.
    assert rebuild(config, "people").status == "swapped"
    assert store.views.customers("people") == {**scenarios.customers_oracle(log), "bad": resumed}
    assert store.views.own("people") == OwnState(0, 0, 0, len(delivered))


def test_two_instances_touching_the_same_streams_serialise(
    store: StoreUnderTest, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    """Proves instances serialise on a stream in the store, on both stores: every event is
    published to a random partition (not by its stream), so two daemon processes in one group
    apply batches of the same streams at the same time, each stream's events scattered and
    reordered across both. Row locks (PostgreSQL) or WATCH and re-planning (Redis) must leave
    exactly the oracle's views: no event lost, none applied twice, nothing left parked."""
    rng = random.Random(7)
    log = scenarios.customer_log(rng, 150) + scenarios.game_log(rng, 15, 60)
    log = sorted(log, key=lambda w: (w["seq"], rng.random()))
    routed = [{**w, "route": str(rng.random())} for w in log]
    topic = new_topic(partitions=4)
    path = store.process_config(
        tmp_path,
        [store.projection("shared", [topic], ["customers", "game"], batch_max_messages=100)],
    )
    expected = OwnState(0, 0, 0, len(log))
    procs = [daemon_process(path, log=tmp_path / f"instance{i}.log") for i in range(2)]
    logs = [tmp_path / f"instance{i}.log" for i in range(2)]
    try:
        wait_until(
            lambda: all("assigned" in p.read_text() for p in logs),
            "both instances to own partitions",
            limit=60,
        )
        publish(store.services.kafka, topic, routed, key_of="route")
        wait_until(lambda: store.views.own("shared") == expected, "both to catch up", limit=120)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(timeout=30) for proc in procs]
    assert codes == [0, 0], [p.read_text()[-2000:] for p in logs]
    assert store.views.customers("shared") == scenarios.customers_oracle(log)
    assert store.views.games("shared") == scenarios.game_oracle(log)
    assert store.views.parked_count("shared") == 0


T1, T2, T3 = 1_700_000_001_000, 1_700_000_002_000, 1_700_000_003_000
PERSON: dict[str, Any] = {
    "kind": "json",
    "stream": "id",
    "stream_prefix": "person:",
    "ts": "ts",
    "type": "type",
    "data": None,
}


def test_merge_mode_gives_the_seed_result_in_every_order_and_keeps_deletes(
    store: StoreUnderTest, new_topic: Callable[..., str]
) -> None:
    """Proves merge mode on both stores: the seed's three events of one record in each of the
    6 arrival orders all end as {ts: T3, name: "Marlon Samuels", age: 26, contact: 123}; a
    delete removes its document and an older write arriving after it does not bring it back;
    a newer write does, with only its own fields."""
    topic = new_topic(partitions=2)
    seed = [
        {"ts": T2, "name": "Samuel"},
        {"ts": T1, "name": "Sam", "age": 26},
        {"ts": T3, "name": "Marlon Samuels", "contact": 123},
    ]
    wires = [
        {"id": doc_id, **seed[i]}
        for doc_id, order in enumerate(itertools.permutations(range(3)), start=1)
        for i in order
    ]
    wires += [{"id": 7, "ts": T1, "name": "a"}, {"id": 7, "ts": T2, "type": "delete"}]
    publish(store.services.kafka, topic, wires, key_of="id")
    config = store.config([store.merge_projection("people", [topic], PERSON)])

    assert run_until_caught_up(config) == 0
    marlon = {"ts": T3, "name": "Marlon Samuels", "age": 26, "contact": 123}
    expected = {f"person:{i}": {"id": i, **marlon} for i in range(1, 7)}
    assert store.views.documents("people") == expected

    publish(store.services.kafka, topic, [{"id": 7, "ts": T1 + 1, "name": "older"}], key_of="id")
    assert run_until_caught_up(config) == 0
    assert store.views.documents("people") == expected

    publish(store.services.kafka, topic, [{"id": 7, "ts": T3, "city": "Oslo"}], key_of="id")
    assert run_until_caught_up(config) == 0
    expected["person:7"] = {"id": 7, "ts": T3, "city": "Oslo"}
    assert store.views.documents("people") == expected
    assert store.views.own("people").dead_letters == 0


def test_merge_tombstones_are_swept_after_the_retention(
    store: StoreUnderTest, new_topic: Callable[..., str]
) -> None:
    """Proves the tombstone sweep on both stores, on the daemon's clock: a deleted document's
    merge state stays while younger than ``tombstone_retention`` and is removed after it; a
    live document keeps its state."""
    topic = new_topic()
    publish(
        store.services.kafka,
        topic,
        [
            {"id": 1, "ts": T1, "name": "gone"},
            {"id": 1, "ts": T2, "type": "delete"},
            {"id": 2, "ts": T1, "name": "kept"},
        ],
        key_of="id",
    )
    config = store.config(
        [store.merge_projection("people", [topic], PERSON, tombstone_retention="1h")]
    )
    clock = FakeClock()
    with daemon_thread(config, clock):
        wait_until(lambda: store.views.merged("people") == 2, "both documents merged")
        clock.advance(1800)
        assert store.views.merged("people") == 2
        clock.advance(1900)  # past the retention, and past the next sweep's minute
        wait_until(lambda: store.views.merged("people") == 1, "the deleted document swept")
    assert store.views.documents("people") == {"person:2": {"id": 2, "ts": T1, "name": "kept"}}


@pytest.mark.parametrize("begun_before_the_skips", [False, True])
def test_a_rebuild_steps_over_the_ranges_the_live_run_skipped(
    store: StoreUnderTest, new_topic: Callable[..., str], begun_before_the_skips: bool
) -> None:
    """Proves on both stores that a rebuild keeps what on_give_up: skip decided: the seq-2
    rename of some customers never comes, the live run gives up on it and applies what
    follows. The topic holds nothing for seq 2, so a rebuild that did not know of the skips
    would stop those streams at seq 1 and, once swapped, show readers an older view. The
    rebuilt view equals the live one, with nothing parked and no gap open, whether the
    rebuild began after the skips or before them (begun, interrupted, then resumed)."""
    log = scenarios.customer_log(random.Random(5), 80)
    length = Counter(str(w["stream"]) for w in log)
    withheld = [
        w
        for w in log
        if w["seq"] == 2 and w["type"] == "CUSTOMER_RENAMED" and length[str(w["stream"])] >= 3
    ]
    delivered = [w for w in log if w not in withheld]
    assert len(withheld) >= 5
    topic = new_topic()
    publish(store.services.kafka, topic, delivered)
    skip = {"gap_timeout": "10s", "give_up_after": "20s", "on_give_up": "skip"}
    config = store.config([store.projection("people", [topic], ["customers"], **skip)])
    clock = FakeClock()
    with daemon_thread(config, clock):
        wait_until(lambda: store.views.own("people").open_gaps == len(withheld), "the gaps")
        if begun_before_the_skips:  # the rebuild starts, then stops at once: resumed below
            assert rebuild(config, "people", stop=stopped()).status == "interrupted"
        clock.advance(10)  # the requests (no channel: only logged)
        clock.advance(11)  # past give_up_after: skipped at the next check

        def skipped_and_drained() -> bool:
            own = store.views.own("people")
            return (own.parked, own.open_gaps, own.checkpoint_sum) == (0, 0, len(delivered))

        wait_until(skipped_and_drained, "the skips, and what followed them applied")
    live = store.views.customers("people")
    assert rebuild(config, "people").status == "swapped"
    assert store.views.customers("people") == live
    own = store.views.own("people")
    assert (own.parked, own.open_gaps, own.dead_letters) == (0, 0, 0)


def test_an_event_that_comes_after_its_gap_was_skipped_is_a_dead_letter(
    store: StoreUnderTest, new_topic: Callable[..., str]
) -> None:
    """Proves on both stores the skip policy's late event: once the live run gave up on a
    customer's seq-2 rename and applied what follows, the rename arriving at last is counted
    and dead-lettered (kind ``skipped``, naming the skipped range), never applied over the
    newer state, and its stream goes on."""
    log = scenarios.customer_log(random.Random(5), 80)
    length = Counter(str(w["stream"]) for w in log)
    late = [
        w
        for w in log
        if w["seq"] == 2 and w["type"] == "CUSTOMER_RENAMED" and length[str(w["stream"])] >= 3
    ][:3]
    topic = new_topic()
    publish(store.services.kafka, topic, [w for w in log if w not in late])
    skip = {"gap_timeout": "10s", "give_up_after": "20s", "on_give_up": "skip"}
    config = store.config([store.projection("people", [topic], ["customers"], **skip)])
    clock = FakeClock()
    with daemon_thread(config, clock):
        wait_until(lambda: store.views.own("people").open_gaps == len(late), "the gaps")
        clock.advance(10)
        clock.advance(11)
        wait_until(lambda: store.views.own("people").open_gaps == 0, "the skips")
        wait_until(lambda: store.views.own("people").parked == 0, "what followed applied")
        before = store.views.customers("people")
        publish(store.services.kafka, topic, late)
        wait_until(lambda: store.views.own("people").dead_letters == len(late), "the late ones")
        assert store.views.customers("people") == before
    stores = StoreSet(config)
    try:
        letters = stores.of("people").list_dead_letters("people", "open", 10)
    finally:
        stores.close()
    assert sorted(str(letter.stream) for letter in letters) == sorted(
        str(w["stream"]) for w in late
    )
    assert all(
        letter.kind == "skipped" and "arrived after its gap 2-2 was skipped" in letter.reason
        for letter in letters
    )


def stopped() -> threading.Event:
    """A stop signal already given: a rebuild started with it stops before reading."""
    stop = threading.Event()
    stop.set()
    return stop


def test_withheld_events_are_served_through_replay(
    store: StoreUnderTest, new_topic: Callable[..., str]
) -> None:
    """Proves the gap loop on both stores: 1% of a shuffled, duplicated log of customers and
    games never reaches the source topic (it is only in the write side's event store); gaps
    open, their replay requests reach the reference responder, which re-publishes the events on
    the replay topic, and the run ends with every gap filled, nothing parked, no dead letter
    and the views equal to the oracles."""
    rng = random.Random(31)
    log = scenarios.customer_log(rng, 200) + scenarios.game_log(rng, 20, 60)
    log = sorted(log, key=lambda w: (w["seq"], rng.random()))
    last = {w["stream"]: w["seq"] for w in log}
    # A stream's newest event can't be known missing (nothing later tells it exists).
    candidates = [w for w in log if w["seq"] < last[w["stream"]]]
    withheld = {id(w) for w in rng.sample(candidates, len(log) // 100)}
    delivered = scenarios.with_duplicates(
        rng,
        scenarios.shuffle_within_windows(rng, [w for w in log if id(w) not in withheld], 100),
        0.01,
    )
    source, requests, replays = new_topic(partitions=3), new_topic(), new_topic()
    publish(store.services.kafka, source, delivered)
    store_events(store.pg_dsn, log)
    responder = ReplayResponder(
        store.services.kafka,
        store.pg_dsn,
        replays,
        requests_topic=requests,
        group=unique("responder"),
        schema=SCHEMA,
        table=TABLE,
    )
    with responder_running(responder, "kafka"):
        proj = store.projection(
            "shop",
            [source],
            ["customers", "game"],
            gap_timeout="300ms",
            replay={"channel": "kafka", "topic": requests, "max_interval": "2s"},
            replay_topic=replays,
        )
        assert run_until_caught_up(store.config([proj])) == 0

    own = store.views.own("shop")
    assert (own.parked, own.open_gaps, own.dead_letters) == (0, 0, 0)
    assert store.views.customers("shop") == scenarios.customers_oracle(log)
    assert store.views.games("shop") == scenarios.game_oracle(log)


def test_skipping_a_dead_letter_with_nothing_behind_it_unblocks_its_stream(
    store: StoreUnderTest, new_topic: Callable[..., str]
) -> None:
    """Proves on both stores that ``dead-letters skip`` resumes a stream even when nothing was
    parked behind its failed event (the skip itself is the only change to write): the stream
    is no longer blocked, and its next event, published after the skip, is applied."""
    _, bad = poisoned_log()
    topic = new_topic()
    publish(store.services.kafka, topic, bad[:1])
    config = store.config([store.projection("people", [topic], ["customers"])])
    assert run_until_caught_up(config) == 0
    stores = StoreSet(config)
    try:
        [letter] = stores.of("people").list_dead_letters("people", "open", 10)
        [outcome] = resolve(config, "people", [letter.id], "skip", clock=lambda: 0.0)
        assert outcome.status == "skipped"
        position = stores.of("people").inspect_stream("people", "customer:bad").position
        assert position is not None
        assert (position.last_seq, position.blocked_seq) == (1, None)
    finally:
        stores.close()

    publish(store.services.kafka, topic, bad[1:2])
    assert run_until_caught_up(config) == 0

    created = {"id": "bad", "name": "Ada", "email": None, "version": 2, "applied_events": 1}
    assert store.views.customers("people") == {"bad": created}
    assert store.views.own("people") == OwnState(0, 0, 0, 2)
