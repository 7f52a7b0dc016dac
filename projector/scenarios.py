"""Event logs for the seed cases, the oracles that say what their views must hold, and delivery
disorder.

This module owns, for the demo and the tests (pure: no I/O, no drivers):

- generators of realistic ordered logs in the wire format ``{"stream", "seq", "type", "ts",
  "data"}`` (seq contiguous from 1 per stream, ``ts`` epoch milliseconds), deterministic per the
  ``random.Random`` they are given: customers (create/rename/delete/re-create), basketball games
  (ordered plays) and bank accounts (order-dependent rejected withdrawals);
- oracles: the exact rows each view must hold after the ordered log. They replay one stream at a
  time with plain dicts and are written apart from ``handlers/`` on purpose, so that a mistake in
  one is not silently shared by the other;
- delivery-disorder helpers that reorder, duplicate and withhold items the way Kafka delivery can.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from projector.core.event import Event

T = TypeVar("T")
Wire = dict[str, Any]
Row = dict[str, Any]
Story = list[tuple[str, dict[str, Any]]]

# 2025-01-01T00:00:00Z: a fixed origin keeps logs identical from run to run.
BASE_TS = 1_735_689_600_000

FIRST_NAMES = ("Ada", "Bram", "Chen", "Dara", "Emil", "Fatou", "Goran", "Hana", "Ivo", "Jia")
LAST_NAMES = ("Okafor", "Lindqvist", "Moreau", "Tanaka", "Silva", "Novak", "Haddad", "Kowalski")
TEAMS = ("Bulls", "Celtics", "Heat", "Knicks", "Lakers", "Nets", "Spurs", "Suns")

CUSTOMER_TYPES = ("CUSTOMER_CREATED", "CUSTOMER_RENAMED", "CUSTOMER_DELETED")
GAME_TYPES = ("START", "JUMP", "ASSIST", "POINT", "END")
ACCOUNT_TYPES = ("OPENED", "DEPOSITED", "WITHDRAWN")


# ------------------------------------------------------------------------------ wire helpers


def as_events(log: Iterable[Wire]) -> list[Event]:
    """Wire dicts as decoded ``Event``s, with the default id ``stream/seq``."""
    return [
        Event(
            stream=w["stream"],
            seq=w["seq"],
            ts=w["ts"],
            type=w["type"],
            data=w["data"],
            id=f"{w['stream']}/{w['seq']}",
        )
        for w in log
    ]


def _timed(rng: random.Random, stream: str, story: Story) -> list[Wire]:
    """A stream's story as wire events: seq from 1, strictly increasing event time."""
    ts = BASE_TS + rng.randrange(60_000)
    out: list[Wire] = []
    for seq, (kind, data) in enumerate(story, start=1):
        ts += rng.randint(1, 5_000)
        out.append({"stream": stream, "seq": seq, "type": kind, "ts": ts, "data": data})
    return out


def _interleave(streams: Iterable[list[Wire]]) -> list[Wire]:
    """All streams merged by event time, as one topic would carry them. Each stream's times
    strictly increase, so the sort keeps every stream in seq order."""
    merged = [event for stream in streams for event in stream]
    return sorted(merged, key=lambda e: (e["ts"], e["stream"], e["seq"]))


def _name(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


# ------------------------------------------------------------------------------ customers


def customer_log(rng: random.Random, customers: int) -> list[Wire]:
    """Customers ``1..customers`` created, renamed, some deleted and some of those re-created."""
    return _interleave(
        _timed(rng, f"customer:{n}", _customer_story(rng, str(n))) for n in range(1, customers + 1)
    )


def _customer_story(rng: random.Random, cid: str) -> Story:
    story = [_customer_created(rng, cid)]
    story += _renames(rng, cid, rng.choice((0, 0, 1, 1, 2, 3)))
    if rng.random() < 0.25:
        story.append(("CUSTOMER_DELETED", {"id": cid}))
        # A re-create after a delete must start a fresh row, not be refused as a duplicate.
        if rng.random() < 0.4:
            story.append(_customer_created(rng, cid))
            story += _renames(rng, cid, rng.choice((0, 1)))
    return story


def _customer_created(rng: random.Random, cid: str) -> tuple[str, dict[str, Any]]:
    name = _name(rng)
    # Some customers give no email: the column is nullable and the view must keep the null.
    email = None if rng.random() < 0.1 else f"{name.lower().replace(' ', '.')}.{cid}@example.com"
    return ("CUSTOMER_CREATED", {"id": cid, "name": name, "email": email})


def _renames(rng: random.Random, cid: str, count: int) -> Story:
    return [("CUSTOMER_RENAMED", {"id": cid, "name": _name(rng)}) for _ in range(count)]


def customers_oracle(log: Iterable[Wire]) -> dict[str, Row]:
    """The ``customers`` rows after the ordered ``log``, by id."""
    rows: dict[str, Row] = {}
    for events in _by_stream(log).values():
        row: Row | None = None
        for e in events:
            if e["type"] in CUSTOMER_TYPES:
                row = _customer_step(row, e)
        if row is not None:
            rows[row["id"]] = row
    return rows


def _customer_step(row: Row | None, e: Wire) -> Row | None:
    kind, data = e["type"], e["data"]
    if kind == "CUSTOMER_CREATED":
        if row is not None:
            raise _invalid(e, "customer created twice")
        return {
            "id": str(data["id"]),
            "name": data["name"],
            "email": data.get("email"),
            "version": e["seq"],
            "applied_events": 1,
        }
    if row is None:
        raise _invalid(e, "customer does not exist")
    if kind == "CUSTOMER_DELETED":
        return None
    return {
        **row,
        "name": data["name"],
        "version": e["seq"],
        "applied_events": row["applied_events"] + 1,
    }


# ------------------------------------------------------------------------------ games


def game_log(rng: random.Random, games: int, plays_per_game: int) -> list[Wire]:
    """Games ``1..games``: START, ``plays_per_game`` plays (tip-off JUMP, POINTs, ASSIST+POINT
    pairs, JUMPs), END. About one game in seven is still live when the log ends, and half of
    those end on an ASSIST whose POINT has not happened yet."""
    return _interleave(
        _timed(rng, f"game:{n}", _game_story(rng, plays_per_game)) for n in range(1, games + 1)
    )


def _game_story(rng: random.Random, plays: int) -> Story:
    home, away = rng.sample(TEAMS, 2)
    # Player ids are unique within a game (the box score is keyed by game and player).
    numbers = rng.sample(range(1, 100), 16)
    rosters = {home: numbers[:8], away: numbers[8:]}
    live = rng.random() < 0.15
    dangling = live and rng.random() < 0.5
    story: Story = [("START", {"home": home, "away": away})]
    story += _plays(rng, rosters, plays - 1 if dangling else plays)
    if dangling:
        team = rng.choice((home, away))
        story.append(("ASSIST", {"team": team, "player": rng.choice(rosters[team])}))
    if not live:
        story.append(("END", {}))
    return story


def _plays(rng: random.Random, rosters: dict[str, list[int]], count: int) -> Story:
    teams = list(rosters)
    out: Story = []
    if count > 0:
        team = rng.choice(teams)
        out.append(("JUMP", {"team": team, "player": rng.choice(rosters[team])}))
    while len(out) < count:
        team, roll = rng.choice(teams), rng.random()
        if roll < 0.35 and count - len(out) >= 2:
            passer, scorer = rng.sample(rosters[team], 2)
            out.append(("ASSIST", {"team": team, "player": passer}))
            out.append(("POINT", {"team": team, "player": scorer, "value": rng.choice((2, 3))}))
        elif roll < 0.9:
            value = rng.choice((1, 2, 2, 3))
            out.append(
                ("POINT", {"team": team, "player": rng.choice(rosters[team]), "value": value})
            )
        else:
            out.append(("JUMP", {"team": team, "player": rng.choice(rosters[team])}))
    return out


def game_oracle(log: Iterable[Wire]) -> tuple[dict[str, Row], dict[tuple[str, int], Row]]:
    """The ``games`` rows by id and the ``player_stats`` rows by (game_id, player) after the
    ordered ``log``. An assist is credited when its POINT lands; until then it is the game's
    ``pending_assist``. ``plays`` counts JUMP/ASSIST/POINT events."""
    games: dict[str, Row] = {}
    players: dict[tuple[str, int], Row] = {}
    for stream, events in _by_stream(log).items():
        game_id = stream.removeprefix("game:")
        game: Row | None = None
        for e in events:
            if e["type"] in GAME_TYPES:
                game = _game_step(game_id, game, players, e)
        if game is not None:
            games[game_id] = game
    return games, players


def _game_step(game_id: str, game: Row | None, players: dict[tuple[str, int], Row], e: Wire) -> Row:
    kind, data = e["type"], e["data"]
    if kind == "START":
        if game is not None:
            raise _invalid(e, "START twice")
        return {
            "id": game_id,
            "home": data["home"],
            "away": data["away"],
            "status": "live",
            "home_points": 0,
            "away_points": 0,
            "pending_assist": None,
            "plays": 0,
            "last_seq": e["seq"],
        }
    if game is None:
        raise _invalid(e, "play before START")
    if game["status"] == "final":
        raise _invalid(e, "play after END")
    assist = game["pending_assist"]
    if assist is not None and not (
        kind == "POINT" and data["team"] == assist["team"] and data["player"] != assist["player"]
    ):
        raise _invalid(e, "ASSIST not followed by a POINT of its team")
    game["last_seq"] = e["seq"]
    if kind == "END":
        game["status"] = "final"
    else:
        _game_play(game, players, e)
    return game


def _game_play(game: Row, players: dict[tuple[str, int], Row], e: Wire) -> None:
    kind, team, player = e["type"], e["data"]["team"], e["data"]["player"]
    if team not in (game["home"], game["away"]):
        raise _invalid(e, "team not in this game")
    game["plays"] += 1
    if kind == "ASSIST":
        game["pending_assist"] = {"team": team, "player": player}
        return
    if kind == "JUMP":
        _box(game["id"], players, team, player, e)["jumps"] += 1
        return
    value = e["data"]["value"]
    if value not in (1, 2, 3):
        raise _invalid(e, "POINT value not 1, 2 or 3")
    _box(game["id"], players, team, player, e)["points"] += value
    game["home_points" if team == game["home"] else "away_points"] += value
    assist = game["pending_assist"]
    if assist is not None:
        _box(game["id"], players, assist["team"], assist["player"], e)["assists"] += 1
        game["pending_assist"] = None


def _box(game_id: str, players: dict[tuple[str, int], Row], team: str, player: int, e: Wire) -> Row:
    row = players.setdefault(
        (game_id, player),
        {"game_id": game_id, "player": player, "team": team, "points": 0, "assists": 0, "jumps": 0},
    )
    if row["team"] != team:
        raise _invalid(e, "player changed team")
    return row


# ------------------------------------------------------------------------------ accounts


def account_log(rng: random.Random, accounts: int, events_per_account: int) -> list[Wire]:
    """Accounts ``1..accounts``, each OPENED then ``events_per_account - 1`` deposits and
    withdrawals; about a quarter of the withdrawals overdraw and are rejected even in order."""
    return _interleave(
        _timed(rng, f"account:{n}", _account_story(rng, events_per_account))
        for n in range(1, accounts + 1)
    )


def _account_story(rng: random.Random, events: int) -> Story:
    story: Story = [("OPENED", {"owner": _name(rng)})]
    balance = 0
    while len(story) < events:
        if rng.random() < 0.55:
            amount = rng.randint(100, 50_000)
            story.append(("DEPOSITED", {"amount": amount}))
            balance += amount
            continue
        if balance == 0 or rng.random() < 0.25:
            amount = rng.randint(balance + 1, balance + 20_000)
        else:
            amount = rng.randint(1, balance)
            balance -= amount
        story.append(("WITHDRAWN", {"amount": amount}))
    return story


def accounts_oracle(log: Iterable[Wire]) -> dict[str, Row]:
    """The ``accounts`` rows after the ordered ``log``, by id. ``deposits`` and ``withdrawals``
    are the applied totals in cents (so ``balance == deposits - withdrawals``); ``rejected``
    counts withdrawals refused for want of funds."""
    rows: dict[str, Row] = {}
    for stream, events in _by_stream(log).items():
        row: Row | None = None
        for e in events:
            if e["type"] in ACCOUNT_TYPES:
                row = _account_step(stream.removeprefix("account:"), row, e)
        if row is not None:
            rows[row["id"]] = row
    return rows


def _account_step(account_id: str, row: Row | None, e: Wire) -> Row:
    kind = e["type"]
    if kind == "OPENED":
        if row is not None:
            raise _invalid(e, "account opened twice")
        row = {"id": account_id, "owner": e["data"]["owner"], "balance": 0, "deposits": 0}
        row |= {"withdrawals": 0, "rejected": 0, "applied_events": 0}
    elif row is None:
        raise _invalid(e, "account not opened")
    else:
        amount = e["data"]["amount"]
        if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
            raise _invalid(e, "amount not a positive integer")
        if kind == "DEPOSITED":
            row["balance"] += amount
            row["deposits"] += amount
        elif amount > row["balance"]:
            row["rejected"] += 1
        else:
            row["balance"] -= amount
            row["withdrawals"] += amount
    row["applied_events"] += 1
    row["last_seq"] = e["seq"]
    return row


# ------------------------------------------------------------------------------ oracle helpers


def _by_stream(log: Iterable[Wire]) -> dict[str, list[Wire]]:
    """The log split per stream, checking it is ordered: an oracle is only defined for that."""
    streams: dict[str, list[Wire]] = {}
    for e in log:
        events = streams.setdefault(e["stream"], [])
        if e["seq"] != len(events) + 1:
            raise _invalid(e, f"expected seq {len(events) + 1}")
        events.append(e)
    return streams


def _invalid(e: Wire, rule: str) -> ValueError:
    return ValueError(f"{e['stream']} seq {e['seq']} {e['type']}: {rule}")


# ------------------------------------------------------------------------------ delivery disorder


def shuffle_within_windows(rng: random.Random, items: Sequence[T], window: int) -> list[T]:
    """``items`` reordered so that none moves more than ``window`` positions: each sorts by its
    index plus a random offset below ``window + 1``, so items more than ``window`` apart never
    swap (and ``window=1`` swaps neighbours only)."""
    if window <= 0:
        return list(items)
    keyed = [(i + rng.random() * (window + 1), i) for i in range(len(items))]
    return [items[i] for _, i in sorted(keyed)]


def with_duplicates(rng: random.Random, items: Sequence[T], fraction: float) -> list[T]:
    """``items`` plus copies of ``round(fraction * len(items))`` of them (each at most once),
    each copy re-inserted somewhere after its original, as a redelivery would be."""
    n = len(items)
    chosen = rng.sample(range(n), min(n, round(fraction * n)))
    after: dict[int, list[int]] = {}
    for i in chosen:
        after.setdefault(rng.randrange(i, n), []).append(i)
    out: list[T] = []
    for p, item in enumerate(items):
        out.append(item)
        out.extend(copy.deepcopy(items[i]) for i in after.get(p, ()))
    return out


def withhold(rng: random.Random, items: Sequence[T], fraction: float) -> tuple[list[T], list[T]]:
    """``(delivered, withheld)``: ``round(fraction * len(items))`` items held back (lost until a
    replay), both parts in their original order."""
    n = len(items)
    held = set(rng.sample(range(n), min(n, round(fraction * n))))
    delivered = [item for i, item in enumerate(items) if i not in held]
    withheld = [item for i, item in enumerate(items) if i in held]
    return delivered, withheld
