"""The example handlers' pure folds against the independent oracles in ``projector.scenarios``.

A handler is read -> fold -> write; the fold is where the view's meaning lives, so it is checked
here without a database: over a whole ordered log, over the same log cut into batches with the
state carried between them as the store would, and against the misorderings its rules must
catch. ``handle`` itself is checked for the shape of its writes with a recording view; its SQL is
exercised against PostgreSQL by the integration tests.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, replace
from typing import Any

import pytest

from handlers import accounts, customers, game
from projector.apply import Params
from projector.core.event import Event
from projector.scenarios import (
    account_log,
    accounts_oracle,
    as_events,
    customer_log,
    customers_oracle,
    game_log,
    game_oracle,
)

SEEDS = range(6)
Row = dict[str, Any]


def batches(rng: random.Random, events: Sequence[Event]) -> Iterable[Sequence[Event]]:
    """``events`` cut into consecutive batches of random size (1 to 60)."""
    i = 0
    while i < len(events):
        size = rng.randint(1, 60)
        yield events[i : i + size]
        i += size


def rows(state: Mapping[Any, Any]) -> dict[Any, Row]:
    return {key: asdict(value) for key, value in state.items()}


# ------------------------------------------------------------------------------ customers


def customers_in_batches(rng: random.Random, events: Sequence[Event]) -> dict[str, Row]:
    store: dict[str, customers.Customer] = {}
    for batch in batches(rng, events):
        for cid, customer in customers.fold_customers(store, batch).items():
            if customer is None:
                store.pop(cid, None)
            else:
                store[cid] = customer
    return rows(store)


@pytest.mark.parametrize("seed", SEEDS)
def test_customers_fold_matches_oracle(seed: int) -> None:
    log = customer_log(random.Random(seed), 80)
    expected = customers_oracle(log)
    whole = customers.fold_customers({}, as_events(log))
    assert {k: asdict(v) for k, v in whole.items() if v is not None} == expected
    assert customers_in_batches(random.Random(seed), as_events(log)) == expected


# ------------------------------------------------------------------------------ games


def games_in_batches(
    rng: random.Random, events: Sequence[Event]
) -> tuple[dict[str, Row], dict[tuple[str, int], Row]]:
    games: dict[str, game.Game] = {}
    players: dict[tuple[str, int], game.PlayerStats] = {}
    for batch in batches(rng, events):
        new_games, new_players = game.fold_game(games, players, batch)
        games |= new_games
        players |= new_players
    return rows(games), rows(players)


@pytest.mark.parametrize("seed", SEEDS)
def test_game_fold_matches_oracle(seed: int) -> None:
    log = game_log(random.Random(seed), 12, 60)
    expected = game_oracle(log)
    new_games, new_players = game.fold_game({}, {}, as_events(log))
    assert (rows(new_games), rows(new_players)) == expected
    assert games_in_batches(random.Random(seed), as_events(log)) == expected


def test_game_pending_assist_survives_a_batch_boundary() -> None:
    events = as_events(
        [
            wire("game:1", 1, "START", {"home": "Bulls", "away": "Heat"}),
            wire("game:1", 2, "ASSIST", {"team": "Bulls", "player": 7}),
            wire("game:1", 3, "POINT", {"team": "Bulls", "player": 23, "value": 2}),
        ]
    )
    first, _ = game.fold_game({}, {}, events[:2])
    assert first["1"].pending_assist == {"team": "Bulls", "player": 7}
    games, players = game.fold_game(first, {}, events[2:])
    assert games["1"].pending_assist is None
    assert first["1"].pending_assist is not None  # the stored state is not modified
    assert players[("1", 7)].assists == 1


# ------------------------------------------------------------------------------ accounts


def accounts_in_batches(rng: random.Random, events: Sequence[Event]) -> dict[str, Row]:
    store: dict[str, accounts.Account] = {}
    for batch in batches(rng, events):
        store |= accounts.fold_accounts(store, batch)
    return rows(store)


@pytest.mark.parametrize("seed", SEEDS)
def test_accounts_fold_matches_oracle(seed: int) -> None:
    log = account_log(random.Random(seed), 40, 30)
    expected = accounts_oracle(log)
    assert rows(accounts.fold_accounts({}, as_events(log))) == expected
    assert accounts_in_batches(random.Random(seed), as_events(log)) == expected


# ------------------------------------------------------------------------------ misordering


def wire(stream: str, seq: int, kind: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"stream": stream, "seq": seq, "type": kind, "ts": seq, "data": data}


def test_game_fold_catches_the_seeds_misordering() -> None:
    """The seed: Assist -> Point -> Jump happened, Point -> Assist -> Jump reached the topic."""
    start = ("START", {"home": "Bulls", "away": "Heat"})
    assist = ("ASSIST", {"team": "Bulls", "player": 7})
    point = ("POINT", {"team": "Bulls", "player": 23, "value": 2})
    jump = ("JUMP", {"team": "Heat", "player": 5})

    def events(*story: tuple[str, dict[str, Any]]) -> list[Event]:
        return as_events(wire("game:5", seq, k, d) for seq, (k, d) in enumerate(story, 1))

    games, _ = game.fold_game({}, {}, events(start, assist, point, jump))
    assert games["5"].home_points == 2
    with pytest.raises(ValueError, match="ASSIST must be immediately followed by a POINT"):
        game.fold_game({}, {}, events(start, point, assist, jump))


@pytest.mark.parametrize(
    ("story", "rule"),
    [
        ([("JUMP", {"team": "Bulls", "player": 1})], "no play before START"),
        ([("START", {"home": "Bulls", "away": "Heat"})] * 2, "START only once"),
        ([("START", {"home": "Bulls", "away": "Heat"}), ("END", {}), ("END", {})], "after END"),
    ],
)
def test_game_fold_rules(story: list[tuple[str, dict[str, Any]]], rule: str) -> None:
    events = as_events(wire("game:9", seq, kind, data) for seq, (kind, data) in enumerate(story, 1))
    with pytest.raises(ValueError, match=rule):
        game.fold_game({}, {}, events)


def test_customers_fold_catches_a_rename_before_the_create() -> None:
    events = as_events(
        [
            wire("customer:1", 2, "CUSTOMER_RENAMED", {"id": "1", "name": "B"}),
            wire("customer:1", 1, "CUSTOMER_CREATED", {"id": "1", "name": "A"}),
        ]
    )
    with pytest.raises(ValueError, match="does not exist"):
        customers.fold_customers({}, events)


def fold_twice(fold: Callable[[Any, Sequence[Event]], Any], events: Sequence[Event]) -> None:
    """Fold ``events``, then their last one again over the state they produced."""
    state = fold({}, events)
    fold({k: v for k, v in state.items() if v is not None}, events[-1:])


@pytest.mark.parametrize(
    "case",
    [
        (customers.fold_customers, customer_log(random.Random(1), 5)),
        (accounts.fold_accounts, account_log(random.Random(1), 5, 5)),
    ],
)
def test_folds_refuse_an_event_applied_twice(case: tuple[Any, list[dict[str, Any]]]) -> None:
    fold, log = case
    events = as_events(log)
    deleted = {e.stream for e in events if e.type == "CUSTOMER_DELETED"}
    stream = next(e.stream for e in events if e.seq == 2 and e.stream not in deleted)
    with pytest.raises(ValueError, match="seq must grow"):
        fold_twice(fold, [e for e in events if e.stream == stream])


def test_game_fold_refuses_an_event_applied_twice() -> None:
    events = as_events(game_log(random.Random(1), 1, 10))
    games, players = game.fold_game({}, {}, events[:5])
    with pytest.raises(ValueError, match="seq must grow"):
        game.fold_game(games, players, events[4:5])


def test_accounts_order_changes_the_result_without_breaking_a_rule() -> None:
    log = [
        wire("account:1", 1, "OPENED", {"owner": "Ada"}),
        wire("account:1", 2, "DEPOSITED", {"amount": 500}),
        wire("account:1", 3, "WITHDRAWN", {"amount": 300}),
    ]
    swapped = [log[0], log[2] | {"seq": 2}, log[1] | {"seq": 3}]
    assert accounts.fold_accounts({}, as_events(log))["1"].rejected == 0
    assert accounts.fold_accounts({}, as_events(swapped))["1"].rejected == 1


def test_folds_leave_their_input_alone() -> None:
    events = as_events(account_log(random.Random(3), 4, 12))
    stored = accounts.fold_accounts({}, events[:20])
    before = copy.deepcopy(stored)
    accounts.fold_accounts(stored, events[20:])
    assert stored == before
    cust = as_events(customer_log(random.Random(3), 10))
    stored_c = customers.fold_customers({}, cust[:8])
    snapshot = {k: None if v is None else replace(v) for k, v in stored_c.items()}
    customers.fold_customers({k: v for k, v in stored_c.items() if v is not None}, cust[8:])
    assert stored_c == snapshot


# ------------------------------------------------------------------------------ handle's writes


class RecordingView:
    """A PgView over an empty store that records the writes a batch makes."""

    def __init__(self) -> None:
        self.reads = 0
        self.writes: list[tuple[str, list[Any]]] = []

    def execute(self, sql: str, params: Params = None) -> None:
        self.writes.append((sql, [params]))

    def executemany(self, sql: str, rows: Iterable[Sequence[Any] | Mapping[str, Any]]) -> None:
        self.writes.append((sql, list(rows)))

    def fetchall(self, sql: str, params: Params = None) -> list[tuple[Any, ...]]:
        self.reads += 1
        return []

    def fetchone(self, sql: str, params: Params = None) -> tuple[Any, ...] | None:
        self.reads += 1
        return None


def test_handle_writes_each_touched_row_once() -> None:
    log = account_log(random.Random(4), 30, 20)
    view = RecordingView()
    accounts.handle(as_events(log), view)
    assert view.reads == 1
    [(sql, [[rows_json]])] = view.writes  # one statement, the rows as one JSON parameter
    assert sql.lstrip().startswith("insert into accounts")
    columns = list(next(iter(accounts_oracle(log).values())))
    rows = rows_json.obj
    assert {p[0]: dict(zip(columns, p, strict=True)) for p in rows} == accounts_oracle(log)
    assert [p[0] for p in rows] == sorted(p[0] for p in rows)  # one lock order for all writers


def test_game_handle_writes_two_upserts() -> None:
    log = game_log(random.Random(4), 10, 30)
    view = RecordingView()
    game.handle(as_events(log), view)
    assert view.reads == 2
    assert [len(params) for _, params in view.writes] == [10, len(game_oracle(log)[1])]


def test_customers_handle_creates_and_deletes_in_one_batch() -> None:
    log = customer_log(random.Random(4), 50)
    view = RecordingView()
    customers.handle(as_events(log), view)
    # Nothing was stored, so a customer created and deleted within the batch needs no delete.
    [(sql, params)] = view.writes
    assert sql.lstrip().startswith("insert into customers")
    assert len(params) == len(customers_oracle(log))


def test_handle_ignores_a_batch_without_its_types() -> None:
    view = RecordingView()
    other = as_events([wire("other:1", 1, "SOMETHING", {})])
    for handle in (customers.handle, game.handle, accounts.handle):
        handle(other, view)
    assert view.reads == 0
    assert view.writes == []
