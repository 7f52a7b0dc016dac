"""Bad input never stops the daemon and is never lost: each kind of poison message becomes a
dead letter with its reason and source offset, only its own stream halts, and
``dead-letters retry`` / ``skip`` resume it."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator

import pytest

from projector import scenarios
from projector.runner.dead_letters import resolve
from tests.conftest import Services
from tests.integration import poison_handler
from tests.integration.harness import (
    make_config,
    migrate_all,
    projection,
    publish,
    rows,
    run_until_caught_up,
)
from tests.integration.test_pipeline import account_rows

pytestmark = pytest.mark.integration


@pytest.fixture
def broken_handler() -> Iterator[None]:
    poison_handler.BROKEN["on"] = True
    yield
    poison_handler.BROKEN["on"] = True


def test_poison_messages_become_dead_letters_and_retry_resumes_the_stream(
    services: Services, pg_dsn: str, new_topic: Callable[..., str], broken_handler: None
) -> None:
    """Proves, with four kinds of poison (not JSON, no seq, a seq jump past the bound, a handler
    that raises) mixed into 100 shuffled streams: the daemon finishes, each poison is a dead
    letter with its reason and offset, the handler failure halts only its stream (its later
    events park, no gap is opened for it), every other stream equals the oracle; after the
    handler is fixed, `retry` applies the event and drains the stream to the oracle too, and
    `skip` resolves the undecodable ones."""
    rng = random.Random(7)
    log = scenarios.account_log(rng, accounts=100, events_per_account=12)
    victim = "account:1"
    victim_events = [w for w in log if w["stream"] == victim]
    poisoned = next(w for w in victim_events if w["seq"] == 5)
    poisoned["data"]["poison"] = True
    delivered: list[dict[str, object] | bytes | None] = list(
        scenarios.shuffle_within_windows(rng, log, 50)
    )
    delivered += [
        b"\x00not json",
        json.dumps({"stream": "account:999", "type": "OPENED", "data": {"owner": "x"}}).encode(),
        {"stream": "account:2", "seq": 5000, "type": "DEPOSITED", "ts": 1, "data": {"amount": 5}},
    ]
    topic = new_topic(partitions=2)
    publish(services.kafka, topic, delivered)
    proj = projection("accounts", [topic], ["tests.integration.poison_handler"], max_seq_jump=1000)
    config = make_config(services, pg_dsn, [proj])
    migrate_all(config)

    assert run_until_caught_up(config) == 0

    letters = rows(
        pg_dsn,
        'select id, kind, stream, seq, topic, "offset", reason from projector.dead_letters order by id',
    )
    kinds = sorted(r[1] for r in letters)
    assert kinds == ["decode", "decode", "handler", "seq_jump"]
    assert all(r[4] == topic and r[5] is not None and r[6] for r in letters)
    handler_letter = next(r for r in letters if r[1] == "handler")
    assert (handler_letter[2], handler_letter[3]) == (victim, 5)
    assert "handler bug" in handler_letter[6]
    assert rows(
        pg_dsn, "select last_seq, blocked_seq from projector.positions where stream = %s", (victim,)
    ) == [(4, 5)]
    assert rows(
        pg_dsn, "select seq from projector.holding where stream = %s order by seq", (victim,)
    ) == [(s,) for s in range(6, 13)]
    assert rows(pg_dsn, "select count(*) from projector.gaps") == [(0,)]

    expected = scenarios.accounts_oracle(log)
    views = account_rows(pg_dsn)
    assert {k: v for k, v in views.items() if k != "1"} == {
        k: v for k, v in expected.items() if k != "1"
    }
    assert views["1"]["last_seq"] == 4

    poison_handler.BROKEN["on"] = False
    outcome = resolve(config, "accounts", [handler_letter[0]], "retry", time.time)
    assert [o.status for o in outcome] == ["retried"]
    assert account_rows(pg_dsn) == expected
    assert rows(pg_dsn, "select count(*) from projector.holding") == [(0,)]

    others = [r[0] for r in letters if r[1] != "handler"]
    assert [o.status for o in resolve(config, "accounts", others, "skip", time.time)] == [
        "skipped"
    ] * 3
    assert rows(
        pg_dsn, "select status, count(*) from projector.dead_letters group by status order by 1"
    ) == [
        ("retried", 1),
        ("skipped", 3),
    ]


def test_skip_moves_a_halted_stream_past_its_dead_letter(
    services: Services, pg_dsn: str, new_topic: Callable[..., str], broken_handler: None
) -> None:
    """Proves `skip` on a handler failure: the stream's position moves past the bad event as if
    applied, and what was parked behind it drains; a retry that fails again keeps the stream
    halted and records a new dead letter."""
    log = [
        {"stream": "account:s", "seq": 1, "type": "OPENED", "ts": 1, "data": {"owner": "o"}},
        {
            "stream": "account:s",
            "seq": 2,
            "type": "DEPOSITED",
            "ts": 2,
            "data": {"amount": 10, "poison": True},
        },
        {"stream": "account:s", "seq": 3, "type": "DEPOSITED", "ts": 3, "data": {"amount": 7}},
    ]
    topic = new_topic()
    publish(services.kafka, topic, log)
    config = make_config(
        services, pg_dsn, [projection("accounts", [topic], ["tests.integration.poison_handler"])]
    )
    migrate_all(config)
    assert run_until_caught_up(config) == 0
    [(letter_id,)] = rows(pg_dsn, "select id from projector.dead_letters")

    again = resolve(config, "accounts", [letter_id], "retry", time.time)
    assert [o.status for o in again] == ["still-failing"]
    [(new_id,)] = rows(pg_dsn, "select id from projector.dead_letters where status = 'open'")
    assert rows(pg_dsn, "select blocked_seq from projector.positions") == [(2,)]

    assert [o.status for o in resolve(config, "accounts", [new_id], "skip", time.time)] == [
        "skipped"
    ]
    assert rows(pg_dsn, "select balance, last_seq, applied_events from accounts.accounts") == [
        (7, 3, 2)
    ]
    assert rows(pg_dsn, "select last_seq, blocked_seq from projector.positions") == [(3, None)]
