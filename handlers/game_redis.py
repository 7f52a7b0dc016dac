"""The basketball box score of :mod:`handlers.game`, kept in Redis (store: redis), with a
leaderboard per game.

Same events, same rules, same fold (``fold_game``); only the layout differs. Keys, as the
handler names them (a reader prefixes each with ``<redis.prefix>:v:<view_schema>:<version>:``,
the version being in ``<redis.prefix>:v:<view_schema>:active``, e.g.
``projector:v:games:1:game:7``):

- ``game:<id>`` hash: ``home``, ``away``, ``status`` (live, final), ``home_points``,
  ``away_points``, ``plays`` (JUMP/ASSIST/POINT events applied), ``last_seq`` and, only while
  an ASSIST waits for its POINT, ``pending_assist`` (JSON ``{"player":7,"team":"Bulls"}``).
- ``game:<id>:player:<n>`` hash, one per player with a line in the box score: ``team``,
  ``points``, ``assists``, ``jumps``.
- ``game:<id>:players`` set: the player numbers ``<n>`` that have such a hash.
- ``game:<id>:leaderboard`` sorted set: member ``<n>``, score its points; every player of the
  box score is in it, scoreless ones at 0. ``ZRANGE game:7:leaderboard 0 9 REV WITHSCORES`` is
  the top ten (ties in reverse member order, Redis's rule).

A reader shows a box score with ``HGETALL game:<id>``, then the players from the set or the
leaderboard and their hashes in one pipeline.

``handle`` reads in one round trip the touched games and the player hashes this batch's plays
name (the fold reads only the players it touches), and in a second one, only when a stored
ASSIST waits for its POINT in this batch and the passer is not named in it, that passer. It
folds the batch and writes each touched hash once, and per game one ``SADD`` of its new
players and one ``ZADD`` of the scores that moved. Player numbers must be integers, as the
PostgreSQL flavour's ``int`` column requires; anything else raises ``ValueError``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence

from handlers.game import (
    ASSIST,
    JUMP,
    POINT,
    TYPES,
    Game,
    PlayerKey,
    PlayerStats,
    fold_game,
    game_id,
)
from projector.core.event import Event
from projector.store.redis_view import RedisView, Value

PLAYS = frozenset((JUMP, ASSIST, POINT))


def game_key(gid: str) -> str:
    return f"game:{gid}"


def player_key(gid: str, player: int) -> str:
    return f"game:{gid}:player:{player}"


def players_key(gid: str) -> str:
    return f"game:{gid}:players"


def leaderboard_key(gid: str) -> str:
    return f"game:{gid}:leaderboard"


def handle(events: Sequence[Event], view: RedisView) -> None:
    """Apply a batch: one or two reads, then each touched hash written once."""
    ids = sorted({game_id(e) for e in events if e.type in TYPES})
    if not ids:
        return
    named = sorted({(game_id(e), player_of(e)) for e in events if e.type in PLAYS})
    hashes = view.hgetall_many([game_key(g) for g in ids] + [player_key(*k) for k in named])
    game_hashes = dict(zip(ids, hashes[: len(ids)], strict=True))
    games = {gid: game_from_hash(gid, h) for gid, h in game_hashes.items() if h}
    players = _players(named, hashes[len(ids) :])
    passers = sorted(_passers(games.values()) - set(named))
    players |= _players(passers, view.hgetall_many(player_key(*k) for k in passers))
    new_games, new_players = fold_game(games, players, events)
    for gid in sorted(new_games):
        _write_hash(view, game_key(gid), game_hashes[gid], game_to_hash(new_games[gid]))
    _write_players(view, players, new_players)


def player_of(event: Event) -> int:
    """The player number of a play; it names a key, so it must be an integer."""
    player = event.data["player"]
    if not isinstance(player, int) or isinstance(player, bool):
        rule = f"player must be an integer, not {player!r}"
        raise ValueError(f"{event.stream} seq {event.seq} {event.type}: {rule}")
    return player


def game_from_hash(gid: str, fields: Mapping[str, str]) -> Game:
    """A game as its ``game:<id>`` hash stores it."""
    assist = fields.get("pending_assist")
    return Game(
        gid,
        fields.get("home"),
        fields.get("away"),
        fields["status"],
        int(fields["home_points"]),
        int(fields["away_points"]),
        None if assist is None else json.loads(assist),
        int(fields["plays"]),
        int(fields["last_seq"]),
    )


def game_to_hash(game: Game) -> dict[str, Value]:
    """The ``game:<id>`` hash of ``game``; a field that is ``None`` is left out."""
    assist = game.pending_assist
    fields: dict[str, Value | None] = {
        "home": game.home,
        "away": game.away,
        "status": game.status,
        "home_points": game.home_points,
        "away_points": game.away_points,
        "pending_assist": None if assist is None else _json(assist),
        "plays": game.plays,
        "last_seq": game.last_seq,
    }
    return {name: value for name, value in fields.items() if value is not None}


def player_from_hash(key: PlayerKey, fields: Mapping[str, str]) -> PlayerStats:
    """A player's line as its ``game:<id>:player:<n>`` hash stores it."""
    return PlayerStats(
        key[0],
        key[1],
        fields["team"],
        int(fields["points"]),
        int(fields["assists"]),
        int(fields["jumps"]),
    )


def player_to_hash(stats: PlayerStats) -> dict[str, Value]:
    return {
        "team": stats.team,
        "points": stats.points,
        "assists": stats.assists,
        "jumps": stats.jumps,
    }


def _players(
    keys: Sequence[PlayerKey], hashes: Sequence[Mapping[str, str]]
) -> dict[PlayerKey, PlayerStats]:
    return {k: player_from_hash(k, h) for k, h in zip(keys, hashes, strict=True) if h}


def _passers(games: Iterable[Game]) -> set[PlayerKey]:
    """The players whose stored ASSIST waits for its POINT: this batch may credit them."""
    return {(g.id, g.pending_assist["player"]) for g in games if g.pending_assist is not None}


def _write_hash(
    view: RedisView, key: str, stored: Mapping[str, str], fields: Mapping[str, Value]
) -> None:
    # A field that became None (the pending assist, once credited) must go: hset alone keeps it.
    view.hdel(key, *sorted(stored.keys() - fields.keys()))
    view.hset(key, fields)


def _write_players(
    view: RedisView,
    stored: Mapping[PlayerKey, PlayerStats],
    changed: Mapping[PlayerKey, PlayerStats],
) -> None:
    by_game: dict[str, list[PlayerStats]] = {}
    for key in sorted(changed):
        by_game.setdefault(key[0], []).append(changed[key])
    for gid, lines in by_game.items():
        for stats in lines:
            view.hset(player_key(gid, stats.player), player_to_hash(stats))
        view.sadd(players_key(gid), *(s.player for s in lines if (gid, s.player) not in stored))
        moved = [s for s in lines if _points(stored.get((gid, s.player))) != s.points]
        view.zadd(leaderboard_key(gid), {str(s.player): s.points for s in moved})


def _points(stats: PlayerStats | None) -> int | None:
    """A player's leaderboard score as stored (``None``: not on the leaderboard yet)."""
    return None if stats is None else stats.points


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)
