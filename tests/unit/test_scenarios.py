"""The scenario generators, oracles and delivery-disorder helpers (pure; no services).

The oracles are the reference every projection test compares against, so they are checked here
on small hand-made logs with the exact rows spelled out.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from projector.scenarios import (
    account_log,
    accounts_oracle,
    as_events,
    customer_log,
    customers_oracle,
    game_log,
    game_oracle,
    shuffle_within_windows,
    with_duplicates,
    withhold,
)

Wire = dict[str, Any]


def log_of(*streams: tuple[str, list[tuple[str, dict[str, Any]]]]) -> list[Wire]:
    """A hand-made log: each stream's (type, data) events with seq from 1, streams in turn."""
    out: list[Wire] = []
    for stream, story in streams:
        for seq, (kind, data) in enumerate(story, start=1):
            out.append({"stream": stream, "seq": seq, "type": kind, "ts": 1000 * seq, "data": data})
    return out


def interleave(a: list[Wire], b: list[Wire]) -> list[Wire]:
    """Alternate two logs (keeps each stream's order): oracles must not depend on interleaving."""
    out: list[Wire] = []
    for i in range(max(len(a), len(b))):
        out += a[i : i + 1] + b[i : i + 1]
    return out


# ------------------------------------------------------------------------------ customers oracle


def test_customers_oracle_create_rename_delete_recreate() -> None:
    seven = log_of(
        (
            "customer:7",
            [
                ("CUSTOMER_CREATED", {"id": "7", "name": "Ada", "email": "ada@example.com"}),
                ("CUSTOMER_RENAMED", {"id": "7", "name": "Ada L."}),
                ("CUSTOMER_DELETED", {"id": "7"}),
                ("CUSTOMER_CREATED", {"id": "7", "name": "Ada Again", "email": None}),
                ("CUSTOMER_RENAMED", {"id": "7", "name": "Ada B."}),
            ],
        )
    )
    eight = log_of(
        (
            "customer:8",
            [
                ("CUSTOMER_CREATED", {"id": "8", "name": "Bo", "email": "bo@example.com"}),
                ("CUSTOMER_DELETED", {"id": "8"}),
            ],
        )
    )
    nine = log_of(("customer:9", [("CUSTOMER_CREATED", {"id": "9", "name": "Cy"})]))
    assert customers_oracle(interleave(seven, eight) + nine) == {
        "7": {"id": "7", "name": "Ada B.", "email": None, "version": 5, "applied_events": 2},
        "9": {"id": "9", "name": "Cy", "email": None, "version": 1, "applied_events": 1},
    }


@pytest.mark.parametrize(
    "story",
    [
        [("CUSTOMER_RENAMED", {"id": "1", "name": "X"})],
        [
            ("CUSTOMER_CREATED", {"id": "1", "name": "X"}),
            ("CUSTOMER_CREATED", {"id": "1", "name": "Y"}),
        ],
        [
            ("CUSTOMER_CREATED", {"id": "1", "name": "X"}),
            ("CUSTOMER_DELETED", {"id": "1"}),
            ("CUSTOMER_DELETED", {"id": "1"}),
        ],
    ],
)
def test_customers_oracle_refuses_impossible_orders(
    story: list[tuple[str, dict[str, Any]]],
) -> None:
    with pytest.raises(ValueError, match=r"customer:1 seq \d"):
        customers_oracle(log_of(("customer:1", story)))


def test_oracles_refuse_a_log_out_of_sequence() -> None:
    log = log_of(("customer:1", [("CUSTOMER_CREATED", {"id": "1", "name": "X"})] * 2))
    with pytest.raises(ValueError, match="expected seq 1"):
        customers_oracle(log[::-1])


# ------------------------------------------------------------------------------ game oracle

HOME, AWAY = "Bulls", "Heat"


def play(kind: str, team: str, player: int, value: int | None = None) -> tuple[str, dict[str, Any]]:
    data: dict[str, Any] = {"team": team, "player": player}
    if value is not None:
        data["value"] = value
    return (kind, data)


def test_game_oracle_box_score() -> None:
    one = log_of(
        (
            "game:1",
            [
                ("START", {"home": HOME, "away": AWAY}),
                play("JUMP", HOME, 23),
                play("ASSIST", HOME, 33),
                play("POINT", HOME, 23, 3),
                play("POINT", AWAY, 8, 2),
                play("POINT", AWAY, 8, 1),
                play("JUMP", AWAY, 9),
                ("END", {}),
            ],
        )
    )
    two = log_of(
        (
            "game:2",
            [
                ("START", {"home": AWAY, "away": HOME}),
                play("POINT", HOME, 23, 2),
                play("ASSIST", AWAY, 5),
            ],
        )
    )
    games, players = game_oracle(interleave(one, two))
    assert games == {
        "1": {
            "id": "1",
            "home": HOME,
            "away": AWAY,
            "status": "final",
            "home_points": 3,
            "away_points": 3,
            "pending_assist": None,
            "plays": 6,
            "last_seq": 8,
        },
        "2": {
            "id": "2",
            "home": AWAY,
            "away": HOME,
            "status": "live",
            "home_points": 0,
            "away_points": 2,
            "pending_assist": {"team": AWAY, "player": 5},
            "plays": 2,
            "last_seq": 3,
        },
    }

    def stats(key: tuple[str, int], team: str, points: int, assists: int, jumps: int) -> Wire:
        return {
            "game_id": key[0],
            "player": key[1],
            "team": team,
            "points": points,
            "assists": assists,
            "jumps": jumps,
        }

    assert players == {
        ("1", 23): stats(("1", 23), HOME, 3, 0, 1),
        ("1", 33): stats(("1", 33), HOME, 0, 1, 0),
        ("1", 8): stats(("1", 8), AWAY, 3, 0, 0),
        ("1", 9): stats(("1", 9), AWAY, 0, 0, 1),
        ("2", 23): stats(("2", 23), HOME, 2, 0, 0),
    }


START = ("START", {"home": HOME, "away": AWAY})


@pytest.mark.parametrize(
    ("story", "rule"),
    [
        ([play("JUMP", HOME, 1), START], "play before START"),
        ([START, ("END", {}), play("POINT", HOME, 1, 2)], "play after END"),
        ([START, play("ASSIST", HOME, 1), play("JUMP", HOME, 2)], "ASSIST not followed"),
        ([START, play("ASSIST", HOME, 1), play("POINT", AWAY, 2, 2)], "ASSIST not followed"),
        ([START, play("ASSIST", HOME, 1), play("POINT", HOME, 1, 2)], "ASSIST not followed"),
        ([START, play("ASSIST", HOME, 1), ("END", {})], "ASSIST not followed"),
        ([START, START], "START twice"),
        ([START, play("POINT", "Suns", 1, 2)], "team not in this game"),
        ([START, play("POINT", HOME, 1, 4)], "POINT value"),
        ([START, play("JUMP", HOME, 1), play("JUMP", AWAY, 1)], "player changed team"),
    ],
)
def test_game_oracle_rules(story: list[tuple[str, dict[str, Any]]], rule: str) -> None:
    with pytest.raises(ValueError, match=rule):
        game_oracle(log_of(("game:1", story)))


# ------------------------------------------------------------------------------ accounts oracle

OPEN = ("OPENED", {"owner": "Ada"})


def money(kind: str, amount: int) -> tuple[str, dict[str, Any]]:
    return (kind, {"amount": amount})


def account_row(**fields: Any) -> Wire:
    base = {"id": "1", "owner": "Ada", "balance": 0, "deposits": 0, "withdrawals": 0}
    return base | {"rejected": 0, "applied_events": 1, "last_seq": 1} | fields


def test_accounts_oracle_rejects_overdraft() -> None:
    log = log_of(
        (
            "account:1",
            [
                OPEN,
                money("DEPOSITED", 1000),
                money("WITHDRAWN", 1500),
                money("WITHDRAWN", 400),
                money("WITHDRAWN", 600),
            ],
        ),
        ("account:2", [("OPENED", {"owner": "Bo"})]),
    )
    assert accounts_oracle(log) == {
        "1": account_row(balance=0, deposits=1000, withdrawals=1000, rejected=1)
        | {"applied_events": 5, "last_seq": 5},
        "2": account_row(id="2", owner="Bo"),
    }


def test_accounts_result_depends_on_order() -> None:
    in_order = [OPEN, money("DEPOSITED", 1000), money("WITHDRAWN", 700)]
    swapped = [OPEN, money("WITHDRAWN", 700), money("DEPOSITED", 1000)]
    assert accounts_oracle(log_of(("account:1", in_order)))["1"] == account_row(
        balance=300, deposits=1000, withdrawals=700, applied_events=3, last_seq=3
    )
    assert accounts_oracle(log_of(("account:1", swapped)))["1"] == account_row(
        balance=1000, deposits=1000, rejected=1, applied_events=3, last_seq=3
    )


@pytest.mark.parametrize(
    ("story", "rule"),
    [
        ([money("DEPOSITED", 5), OPEN], "not opened"),
        ([OPEN, OPEN], "opened twice"),
        ([OPEN, money("DEPOSITED", 0)], "positive"),
        ([OPEN, money("DEPOSITED", True)], "positive"),
    ],
)
def test_accounts_oracle_rules(story: list[tuple[str, dict[str, Any]]], rule: str) -> None:
    with pytest.raises(ValueError, match=rule):
        accounts_oracle(log_of(("account:1", story)))


# ------------------------------------------------------------------------------ generators

GENERATORS: dict[str, Callable[[random.Random], list[Wire]]] = {
    "customers": lambda rng: customer_log(rng, 60),
    "games": lambda rng: game_log(rng, 20, 40),
    "accounts": lambda rng: account_log(rng, 30, 25),
}


@pytest.mark.parametrize("name", GENERATORS)
def test_generators_are_deterministic_per_seed(name: str) -> None:
    make = GENERATORS[name]
    assert make(random.Random(7)) == make(random.Random(7))
    assert make(random.Random(7)) != make(random.Random(8))


@pytest.mark.parametrize("name", GENERATORS)
@pytest.mark.parametrize("seed", range(5))
def test_generated_logs_are_well_formed(name: str, seed: int) -> None:
    log = GENERATORS[name](random.Random(seed))
    assert [e["ts"] for e in log] == sorted(e["ts"] for e in log)
    last: dict[str, Wire] = {}
    for e in log:
        assert set(e) == {"stream", "seq", "type", "ts", "data"}
        assert isinstance(e["ts"], int)
        previous = last.get(e["stream"])
        assert e["seq"] == (1 if previous is None else previous["seq"] + 1)
        assert previous is None or e["ts"] > previous["ts"]
        last[e["stream"]] = e
    as_events(log)  # every wire event makes an Event


def test_customer_log_has_every_case() -> None:
    log = customer_log(random.Random(1), 200)
    rows = customers_oracle(log)
    assert len({e["stream"] for e in log}) == 200
    assert 0 < len(rows) < 200  # some deleted for good
    assert any(r["version"] > r["applied_events"] for r in rows.values())  # re-created
    assert any(r["email"] is None for r in rows.values())


def test_game_log_has_every_case() -> None:
    log = game_log(random.Random(1), 60, 30)
    games, players = game_oracle(log)
    assert len(games) == 60
    assert {g["status"] for g in games.values()} == {"live", "final"}
    assert any(g["pending_assist"] is not None for g in games.values())
    assert all(g["plays"] == 30 for g in games.values())
    assert sum(p["assists"] for p in players.values()) > 0
    for game in games.values():
        scored = sum(
            p["points"]
            for (gid, _), p in players.items()
            if gid == game["id"] and p["team"] == game["home"]
        )
        assert scored == game["home_points"]


def test_account_log_has_rejections() -> None:
    log = account_log(random.Random(1), 50, 30)
    rows = accounts_oracle(log)
    assert len(rows) == 50
    assert all(len([e for e in log if e["stream"] == f"account:{i}"]) == 30 for i in rows)
    assert sum(r["rejected"] for r in rows.values()) > 0
    for r in rows.values():
        assert r["balance"] == r["deposits"] - r["withdrawals"] >= 0
        assert r["applied_events"] == r["last_seq"] == 30


# ------------------------------------------------------------------------------ disorder


@pytest.mark.parametrize("window", [0, 1, 5, 50])
def test_shuffle_within_windows(window: int) -> None:
    items = list(range(500))
    shuffled = shuffle_within_windows(random.Random(3), items, window)
    assert Counter(shuffled) == Counter(items)
    assert max(abs(pos - item) for pos, item in enumerate(shuffled)) <= window
    assert (shuffled == items) == (window <= 0)


def test_shuffle_is_deterministic_per_seed() -> None:
    items = list(range(100))
    a = shuffle_within_windows(random.Random(5), items, 10)
    assert a == shuffle_within_windows(random.Random(5), items, 10)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 1.0])
def test_with_duplicates(fraction: float) -> None:
    items = [{"n": i} for i in range(400)]
    out = with_duplicates(random.Random(4), items, fraction)
    counts = Counter(d["n"] for d in out)
    assert set(counts) == set(range(400))
    assert len(out) - len(items) == round(fraction * 400)
    assert max(counts.values()) <= 2
    originals = [d["n"] for d in out if d is items[d["n"]]]
    assert originals == list(range(400))  # originals keep their order; copies come after them
    for n, count in counts.items():
        if count == 2:
            positions = [i for i, d in enumerate(out) if d["n"] == n]
            assert out[positions[0]] is items[n] and out[positions[1]] is not items[n]


def test_withhold() -> None:
    items = list(range(300))
    delivered, withheld = withhold(random.Random(6), items, 0.1)
    assert len(withheld) == 30
    assert sorted(delivered + withheld) == items
    assert delivered == sorted(delivered) and withheld == sorted(withheld)
    assert withhold(random.Random(6), items, 0.0) == (items, [])
