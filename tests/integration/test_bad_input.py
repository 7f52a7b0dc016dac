"""Bad input, 5% of the messages, of every kind: each becomes a dead letter with its reason and
offset, a poisoned stream applies nothing after its poison, every other stream reaches the
oracle, and the daemon never stops."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from projector import scenarios
from projector.store.connect import StoreSet
from tests.integration.conftest import StoreUnderTest
from tests.integration.harness import WIRE_DECODER, publish, run_until_caught_up

pytestmark = pytest.mark.integration

MAX_BYTES = 100_000  # the decoder's limit in this test (the broker's own is about 1 MB)


def wire(stream: str, seq: Any, kind: str = "CUSTOMER_RENAMED", **data: Any) -> dict[str, Any]:
    return {"stream": stream, "seq": seq, "ts": 1, "type": kind, "data": data}


def bad_messages(rng: random.Random, count: int) -> list[tuple[str, dict[str, Any] | bytes]]:
    """``count`` bad messages, as (kind, message), the kinds taking turns."""
    deep = b"[" * 5000 + b'"x"' + b"]" * 5000  # past any parser's recursion limit
    # Within orjson's reading limit (1,024 levels), past what the payload hash, the holding
    # table and Redis's cjson can write back out (about 1,000).
    readable_deep = b"[" * 1010 + b'"x"' + b"]" * 1010
    makers: list[tuple[str, Callable[[int], dict[str, Any] | bytes]]] = [
        ("not json", lambda i: b'{"stream": "customer:1", "seq": ' + str(i).encode()),
        ("bad utf-8", lambda i: b'{"stream": "c\xff\xfe", "seq": 1, "type": "T", "data": {}}'),
        ("wrong types", lambda i: wire(f"customer:w{i}", "one")),
        ("missing stream", lambda i: {"seq": 1, "ts": 1, "type": "T", "data": {}}),
        ("seq below first", lambda i: wire(f"customer:b{i}", 0, "CUSTOMER_CREATED", id=f"b{i}")),
        ("seq jump", lambda i: wire(f"customer:j{i}", 10**9, "CUSTOMER_CREATED", id=f"j{i}")),
        (
            "oversize",
            lambda i: wire(f"customer:o{i}", 1, "CUSTOMER_CREATED", pad="x" * 2 * MAX_BYTES),
        ),
        (
            "deep",
            lambda i: (
                b'{"stream": "customer:d%d", "seq": 1, "ts": 1, "type": "T", "data": {"x": ' % i
                + deep
                + b"}}"
            ),
        ),
        (
            "readable deep",
            lambda i: (
                b'{"stream": "customer:r%d", "seq": 1, "ts": 1, "type": "T", "data": {"x": ' % i
                + readable_deep
                + b"}}"
            ),
        ),
        (
            "handler",
            lambda i: wire(f"customer:p{i}", 1, id=f"p{i}", name="renamed before created"),
        ),
        # Valid JSON whose string PostgreSQL's text and jsonb refuse (json.dumps writes \u0000).
        ("nul", lambda i: wire(f"customer:n{i}", 1, "CUSTOMER_CREATED", id=f"n{i}", name="a\x00b")),
    ]
    return [(makers[i % len(makers)][0], makers[i % len(makers)][1](i)) for i in range(count)]


def test_five_percent_of_bad_input_of_every_kind(
    store: StoreUnderTest, new_topic: Callable[..., str]
) -> None:
    """Proves on both stores, with 5% bad messages of eleven kinds interleaved at random in a
    shuffled log (not JSON, bad UTF-8, wrong types, a missing stream, seq below the first,
    a seq jump beyond max_seq_jump, oversize, nested 5,000 deep, nested 1,010 deep (which
    JSON parsers read but no stage can write back out), a handler exception, a NUL character
    in a string, and conflicting copies: the same stream and seq with another payload): the
    run ends (the daemon never exits on bad data), every bad message is one dead letter with
    its reason and source offset, each poisoned stream holds back what follows its poison
    (parked, not applied), and every other stream equals the oracle."""
    rng = random.Random(19)
    log = scenarios.customer_log(rng, 300)
    good = scenarios.shuffle_within_windows(rng, log, 50)
    bad = bad_messages(rng, len(good) * 5 // 100 - 10)
    # What follows a poison on its stream: it must be parked, never applied.
    followers = [
        wire(str(m["stream"]), 2, "CUSTOMER_CREATED", id=str(m["stream"]), name="after poison")
        for kind, m in bad
        if kind == "handler" and isinstance(m, dict)
    ]
    # Same stream and seq as a stream's last event, another payload: a conflict once the real
    # one is applied (published last, so it always comes first). Older seqs are plain
    # duplicates: only the last applied event's payload hash is kept.
    last = {w["stream"]: w["seq"] for w in log}
    conflicts = [
        {**w, "data": {**w["data"], "name": "a conflicting copy"}}
        for w in log
        if w["seq"] == last[w["stream"]]
    ][:10]
    delivered: list[dict[str, Any] | bytes] = list(good)
    for _, message in bad:
        delivered.insert(rng.randrange(len(delivered) + 1), message)
    delivered += followers + conflicts
    topic = new_topic(partitions=2)
    publish(store.services.kafka, topic, delivered)
    decoder = {**WIRE_DECODER, "max_bytes": MAX_BYTES}
    config = store.config([store.projection("people", [topic], ["customers"], decoder=decoder)])

    assert run_until_caught_up(config) == 0

    assert store.views.customers("people") == scenarios.customers_oracle(log)
    own = store.views.own("people")
    assert own.parked == len(followers)
    assert own.dead_letters == len(bad) + len(conflicts)
    assert own.checkpoint_sum == len(delivered)
    stores = StoreSet(config)
    try:
        letters = stores.of("people").list_dead_letters("people", "open", 10_000)
    finally:
        stores.close()
    assert all(letter.reason for letter in letters)
    sources = [letter.message or (letter.event and letter.event.source) for letter in letters]
    assert all(source is not None for source in sources)
    kinds = Counter(letter.kind for letter in letters)
    print(f"{store.kind}: {len(delivered)} messages, {len(letters)} dead letters {dict(kinds)}")
    assert {"decode", "seq_below_first", "seq_jump", "conflict", "handler"} <= set(kinds)
