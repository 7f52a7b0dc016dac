"""Merge mode against real Kafka and PostgreSQL: the seed example in every arrival order, two
services enriching one record from two topics, restarts, duplicates, deletes, bad documents."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from projector.runner.dead_letters import resolve
from tests.conftest import Services
from tests.integration import merge_poison_handler
from tests.integration.gaps_harness import FakeClock, daemon_thread, wait_until
from tests.integration.harness import make_config, migrate_all, publish, rows, run_until_caught_up

pytestmark = pytest.mark.integration

T1, T2, T3 = 1_700_000_001_000, 1_700_000_002_000, 1_700_000_003_000
DECODER = {
    "kind": "json",
    "stream": "id",
    "stream_prefix": "person:",
    "ts": "ts",
    "type": "type",
    "data": None,
}


def merge_projection(topics: list[str], **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "people", "mode": "merge", "topics": topics, "decoder": DECODER}
    base.setdefault("merge", {"view_table": "docs"})
    return {**base, **extra}


def docs(pg_dsn: str) -> dict[str, Any]:
    return {k: v for k, v in rows(pg_dsn, "select id, doc from people.docs")}


@pytest.fixture
def fixed_handler() -> Iterator[None]:
    merge_poison_handler.BROKEN["on"] = True
    yield
    merge_poison_handler.BROKEN["on"] = True


def seed_events(doc_id: int) -> list[dict[str, Any]]:
    return [
        {"id": doc_id, "ts": T2, "name": "Samuel"},
        {"id": doc_id, "ts": T1, "name": "Sam", "age": 26},
        {"id": doc_id, "ts": T3, "name": "Marlon Samuels", "contact": 123},
    ]


def test_the_seed_example_holds_in_every_arrival_order(
    services: Services, pg_dsn: str, new_topic: Callable[..., str]
) -> None:
    """Proves DESIGN's seed example end to end: the three events of one record, published in
    each of the 6 possible orders (one record per order), all end as {id, ts: T3, name:
    "Marlon Samuels", age: 26, contact: 123} in the built-in JSONB view."""
    topic = new_topic(partitions=2)
    wires = []
    for doc_id, order in enumerate(itertools.permutations(range(3)), start=1):
        events = seed_events(doc_id)
        wires += [events[i] for i in order]
    publish(services.kafka, topic, wires, key_of="id")
    config = make_config(services, pg_dsn, [merge_projection([topic])])
    migrate_all(config)
    assert run_until_caught_up(config) == 0
    expected = {
        f"person:{i}": {"id": i, "ts": T3, "name": "Marlon Samuels", "age": 26, "contact": 123}
        for i in range(1, 7)
    }
    assert docs(pg_dsn) == expected


def test_two_services_enrich_one_record_from_two_topics(
    services: Services, pg_dsn: str, new_topic: Callable[..., str]
) -> None:
    """Proves the seed's NLP/CV case: each service adds its own field to record 1234 on its
    own topic, whichever finishes first, and the view holds one document with both."""
    nlp, cv = new_topic(), new_topic()
    base = {"id": 1234, "text": "I love pizza", "photo": "https://photo.service/photo001"}
    publish(
        services.kafka, cv, [{**base, "ts": T1, "cv": ["pizza", "restaurant", "cup"]}], key_of="id"
    )
    publish(services.kafka, nlp, [{**base, "ts": T2, "nlp": "pizza"}], key_of="id")
    config = make_config(services, pg_dsn, [merge_projection([nlp, cv])])
    migrate_all(config)
    assert run_until_caught_up(config) == 0
    assert docs(pg_dsn) == {
        "person:1234": {**base, "ts": T2, "nlp": "pizza", "cv": ["pizza", "restaurant", "cup"]}
    }


def test_a_restart_between_events_keeps_the_merge_right(
    services: Services, pg_dsn: str, new_topic: Callable[..., str]
) -> None:
    """Proves the per-field stamps live in the store: the newest event applied in a first run,
    then (a new daemon) the older ones, a duplicate of the first and a stale rename: the older
    values fill only the fields the newest did not write, duplicates and stale writes change
    nothing."""
    topic = new_topic()
    first, older, oldest = seed_events(1)[2], seed_events(1)[0], seed_events(1)[1]
    publish(services.kafka, topic, [first], key_of="id")
    config = make_config(services, pg_dsn, [merge_projection([topic])])
    migrate_all(config)
    assert run_until_caught_up(config) == 0
    publish(
        services.kafka,
        topic,
        [older, first, oldest, {"id": 1, "ts": T1, "name": "Stale"}],
        key_of="id",
    )
    assert run_until_caught_up(config) == 0
    assert docs(pg_dsn) == {
        "person:1": {"id": 1, "ts": T3, "name": "Marlon Samuels", "age": 26, "contact": 123}
    }
    [(state,)] = rows(pg_dsn, "select state from projector.documents")
    assert state is not None


def test_deletes_are_kept_so_an_older_write_cannot_resurrect(
    services: Services, pg_dsn: str, new_topic: Callable[..., str]
) -> None:
    """Proves explicit deletions: a delete event at T2 removes the document from the view, an
    older write (T1) arriving after it does not bring it back, a newer one (T3) does with only
    its own fields; a removed field path at T3 drops that field for good."""
    topic = new_topic()
    config = make_config(services, pg_dsn, [merge_projection([topic])])
    migrate_all(config)
    publish(
        services.kafka,
        topic,
        [{"id": 7, "ts": T1, "name": "a", "age": 1}, {"id": 7, "ts": T2, "type": "delete"}],
        key_of="id",
    )
    assert run_until_caught_up(config) == 0
    assert docs(pg_dsn) == {}
    publish(services.kafka, topic, [{"id": 7, "ts": T1 + 1, "name": "older"}], key_of="id")
    assert run_until_caught_up(config) == 0
    assert docs(pg_dsn) == {}
    publish(
        services.kafka,
        topic,
        [
            {"id": 7, "ts": T3, "name": "back", "city": "Oslo"},
            {"id": 7, "ts": T3 + 1, "$removed": ["city"]},
        ],
        key_of="id",
    )
    assert run_until_caught_up(config) == 0
    assert docs(pg_dsn) == {"person:7": {"id": 7, "ts": T3 + 1, "name": "back"}}


def test_a_bad_document_is_a_dead_letter_and_retry_merges_it(
    services: Services, pg_dsn: str, new_topic: Callable[..., str], fixed_handler: None
) -> None:
    """Proves handler failures in merge mode: the failing document's events become dead
    letters, the other documents are written, an event without its timestamp is a dead letter
    too; after the fix, retry merges the failed events (order does not matter in merge mode)."""
    topic = new_topic()
    publish(
        services.kafka,
        topic,
        [
            {"id": 1, "ts": T1, "name": "ok"},
            {"id": 2, "ts": T1, "name": "bad", "poison": True},
            {"id": 3, "name": "no ts"},
        ],
        key_of="id",
    )
    proj = merge_projection([topic], handlers=["tests.integration.merge_poison_handler"], merge={})
    config = make_config(services, pg_dsn, [proj])
    migrate_all(config)
    assert run_until_caught_up(config) == 0
    assert docs(pg_dsn) == {"person:1": {"id": 1, "ts": T1, "name": "ok"}}
    letters = rows(pg_dsn, "select id, kind, stream from projector.dead_letters order by id")
    # The event without its timestamp never decodes (the ts path is configured): a dead letter.
    assert sorted((k, s or "") for _, k, s in letters) == [("decode", ""), ("handler", "person:2")]
    merge_poison_handler.BROKEN["on"] = False
    handler_letter = next(i for i, k, _ in letters if k == "handler")
    assert [o.status for o in resolve(config, "people", [handler_letter], "retry", time.time)] == [
        "retried"
    ]
    assert docs(pg_dsn)["person:2"] == {"id": 2, "ts": T1, "name": "bad", "poison": True}
    assert json.dumps(docs(pg_dsn), sort_keys=True)


def test_an_event_no_merge_takes_is_a_dead_letter_and_its_document_merges_the_rest(
    services: Services, pg_dsn: str, new_topic: Callable[..., str]
) -> None:
    """Proves the daemon never exits on an event the merge itself refuses: a list of removed
    fields that is a string, or holds a number, and objects nested 400 levels deep (which the
    decoder reads, but deeper than the merge's recursion goes) each become a dead letter of
    kind ``merge`` with its reason, and the other events of the same documents merge as if
    they had never come."""
    deep: Any = "bottom"
    for _ in range(400):  # objects, which the merge walks field by field (arrays are values)
        deep = {"x": deep}
    topic = new_topic()
    publish(
        services.kafka,
        topic,
        [
            {"id": 4, "ts": T1, "name": "kept"},
            {"id": 4, "ts": T2, "$removed": "name"},
            {"id": 4, "ts": T3, "$removed": [1]},
            {"id": 5, "ts": T1, "x": deep},
            {"id": 5, "ts": T2, "name": "also kept"},
        ],
        key_of="id",
    )
    config = make_config(services, pg_dsn, [merge_projection([topic])])
    migrate_all(config)
    assert run_until_caught_up(config) == 0
    assert docs(pg_dsn) == {
        "person:4": {"id": 4, "ts": T1, "name": "kept"},
        "person:5": {"id": 5, "ts": T2, "name": "also kept"},
    }
    letters = rows(pg_dsn, "select kind, stream, reason from projector.dead_letters order by id")
    assert sorted((k, s) for k, s, _ in letters) == [
        ("merge", "person:4"),
        ("merge", "person:4"),
        ("merge", "person:5"),
    ]
    reasons = " | ".join(r for _, _, r in letters)
    assert "must be a list" in reasons and "is not a field path" in reasons
    assert "nests deeper than the merge can walk" in reasons


def test_tombstones_are_forgotten_after_the_retention(
    services: Services, pg_dsn: str, new_topic: Callable[..., str]
) -> None:
    """Proves tombstone_retention with the daemon's clock: a deleted document's state stays
    (so an older write can't resurrect it) until it has been unchanged for the retention;
    then the sweep removes it, while a live document keeps its fields and loses only its
    removed-field tombstone. After that, a write older than the delete is taken as new: the
    documented trade-off."""
    topic = new_topic()
    publish(
        services.kafka,
        topic,
        [
            {"id": 1, "ts": T1, "name": "gone"},
            {"id": 1, "ts": T2, "type": "delete"},
            {"id": 2, "ts": T1, "name": "kept", "city": "Oslo"},
            {"id": 2, "ts": T2, "$removed": ["city"]},
        ],
        key_of="id",
    )
    proj = merge_projection([topic], merge={"view_table": "docs", "tombstone_retention": "1h"})
    config = make_config(services, pg_dsn, [proj])
    migrate_all(config)
    clock = FakeClock()
    with daemon_thread(config, clock):
        wait_until(
            lambda: rows(pg_dsn, "select count(*) from projector.documents") == [(2,)],
            "both documents",
        )
        wait_until(
            lambda: docs(pg_dsn) == {"person:2": {"id": 2, "ts": T2, "name": "kept"}}, "the merge"
        )
        clock.advance(1800)  # half the retention: nothing is swept
        publish(
            services.kafka, topic, [{"id": 1, "ts": T1 + 1, "name": "late but older"}], key_of="id"
        )
        wait_until(
            lambda: rows(pg_dsn, "select count(*) from projector.dead_letters") == [(0,)],
            "the late write",
        )
        wait_until(
            lambda: (
                rows(pg_dsn, "select coalesce(sum(next_offset), 0) from projector.checkpoints")
                == [(5,)]
            ),
            "the late write to be read",
        )
        assert docs(pg_dsn) == {"person:2": {"id": 2, "ts": T2, "name": "kept"}}
        clock.advance(7200)
        wait_until(
            lambda: (
                rows(pg_dsn, "select stream from projector.documents order by 1") == [("person:2",)]
            ),
            "the sweep",
        )
        assert docs(pg_dsn) == {"person:2": {"id": 2, "ts": T2, "name": "kept"}}
        publish(
            services.kafka, topic, [{"id": 1, "ts": T1 + 2, "name": "resurrected"}], key_of="id"
        )
        wait_until(lambda: "person:1" in docs(pg_dsn), "the trade-off")
