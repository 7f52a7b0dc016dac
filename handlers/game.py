"""A basketball game's box score from its ordered plays (the seed's basketball question).

Owns the view tables ``games`` (score, status and the game's rule state) and ``player_stats``
(points, assists and jumps per player). Stream ``game:<id>``; types ``START`` {home, away},
``JUMP``/``ASSIST`` {team, player}, ``POINT`` {team, player, value 1|2|3} and ``END``.

The rules only hold when plays are applied in order: no play before START or after END, and an
ASSIST must be immediately followed by a POINT of the same team by another player. The assist is
credited when that POINT lands; until then it waits in ``games.pending_assist`` (which is how the
rule survives a batch boundary). A play that breaks a rule raises ``ValueError`` naming the rule:
it can only happen if events were applied out of order, and this is where such a bug shows.

``handle`` reads the touched games and their players once, folds the batch in Python
(``fold_game``, pure) and upserts each touched row once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from projector.apply import PgView
from projector.core.event import Event

MIGRATIONS = [
    """
    create table games (
        id text primary key,
        home text,
        away text,
        status text not null check (status in ('scheduled', 'live', 'final')),
        home_points int not null default 0,
        away_points int not null default 0,
        pending_assist jsonb null,
        plays bigint not null,
        last_seq bigint not null
    )
    """,
    """
    create table player_stats (
        game_id text not null,
        player int not null,
        team text not null,
        points int not null default 0,
        assists int not null default 0,
        jumps int not null default 0,
        primary key (game_id, player)
    )
    """,
]

START, JUMP, ASSIST, POINT, END = "START", "JUMP", "ASSIST", "POINT", "END"
TYPES = frozenset((START, JUMP, ASSIST, POINT, END))
SCHEDULED, LIVE, FINAL = "scheduled", "live", "final"

_GAME_COLUMNS = "id, home, away, status, home_points, away_points, pending_assist, plays, last_seq"
_SELECT_GAMES = f"select {_GAME_COLUMNS} from games where id = any(%s)"
_SELECT_PLAYERS = (
    "select game_id, player, team, points, assists, jumps from player_stats where game_id = any(%s)"
)
_UPSERT_GAME = f"""
    insert into games ({_GAME_COLUMNS})
    values (%s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s)
    on conflict (id) do update set
        home = excluded.home, away = excluded.away, status = excluded.status,
        home_points = excluded.home_points, away_points = excluded.away_points,
        pending_assist = excluded.pending_assist, plays = excluded.plays,
        last_seq = excluded.last_seq
"""
_UPSERT_PLAYER = """
    insert into player_stats (game_id, player, team, points, assists, jumps)
    values (%s, %s, %s, %s, %s, %s)
    on conflict (game_id, player) do update set
        team = excluded.team, points = excluded.points,
        assists = excluded.assists, jumps = excluded.jumps
"""

PlayerKey = tuple[str, int]


@dataclass(slots=True)
class Game:
    """One ``games`` row. ``plays`` counts JUMP/ASSIST/POINT events; ``last_seq`` is the seq of
    the last event applied (START and END included)."""

    id: str
    home: str | None
    away: str | None
    status: str
    home_points: int
    away_points: int
    pending_assist: dict[str, Any] | None
    plays: int
    last_seq: int


@dataclass(slots=True)
class PlayerStats:
    """One ``player_stats`` row."""

    game_id: str
    player: int
    team: str
    points: int = 0
    assists: int = 0
    jumps: int = 0


def handle(events: Sequence[Event], view: PgView) -> None:
    """Apply a batch: two reads (games, their players), then one upsert executemany per table."""
    ids = sorted({game_id(e) for e in events if e.type in TYPES})
    if not ids:
        return
    games = {g.id: g for g in map(_game_from_row, view.fetchall(_SELECT_GAMES, (ids,)))}
    players = {
        (row[0], row[1]): PlayerStats(*row) for row in view.fetchall(_SELECT_PLAYERS, (ids,))
    }
    new_games, new_players = fold_game(games, players, events)
    # Sorted by key so that concurrent writers touching the same rows lock them in one order.
    if new_games:
        view.executemany(_UPSERT_GAME, [_game_params(new_games[k]) for k in sorted(new_games)])
    if new_players:
        rows = [_player_params(new_players[k]) for k in sorted(new_players)]
        view.executemany(_UPSERT_PLAYER, rows)


def fold_game(
    games: Mapping[str, Game], players: Mapping[PlayerKey, PlayerStats], events: Sequence[Event]
) -> tuple[dict[str, Game], dict[PlayerKey, PlayerStats]]:
    """The touched ``games`` and ``player_stats`` rows after applying ``events`` in order over
    the stored ones (absent = no row). The inputs are not modified. Events of other types are
    not this view's and are skipped."""
    fold = _Fold(games, players)
    for event in events:
        if event.type in TYPES:
            fold.apply(event)
    return fold.games, fold.players


def game_id(event: Event) -> str:
    return event.stream.removeprefix("game:")


class _Fold:
    """Working copies of the rows a batch touches; the stored ones are copied on first touch."""

    def __init__(self, games: Mapping[str, Game], players: Mapping[PlayerKey, PlayerStats]):
        self._stored_games = games
        self._stored_players = players
        self.games: dict[str, Game] = {}
        self.players: dict[PlayerKey, PlayerStats] = {}

    def apply(self, event: Event) -> None:
        game = self._game(game_id(event))
        started = game is not None and game.status != SCHEDULED
        if event.type == START:
            if started:
                raise _violation(event, "START only once")
            self.games[game_id(event)] = _started(event)
            return
        if game is None or not started:
            raise _violation(event, "no play before START")
        _check_next(game, event)
        game.last_seq = _seq(event)
        if event.type == END:
            game.status = FINAL
        else:
            self._play(game, event)

    def _play(self, game: Game, event: Event) -> None:
        team, player = event.data["team"], event.data["player"]
        if team not in (game.home, game.away):
            raise _violation(event, f"team {team!r} does not play in this game")
        game.plays += 1
        if event.type == ASSIST:
            game.pending_assist = {"team": team, "player": player}
        elif event.type == JUMP:
            self._stats(game.id, team, player, event).jumps += 1
        else:
            self._point(game, team, player, event)

    def _point(self, game: Game, team: str, player: int, event: Event) -> None:
        value = event.data["value"]
        if value not in (1, 2, 3):
            raise _violation(event, "a POINT is worth 1, 2 or 3")
        self._stats(game.id, team, player, event).points += value
        if team == game.home:
            game.home_points += value
        else:
            game.away_points += value
        if game.pending_assist is not None:
            passer = game.pending_assist
            self._stats(game.id, passer["team"], passer["player"], event).assists += 1
            game.pending_assist = None

    def _game(self, gid: str) -> Game | None:
        if gid not in self.games:
            stored = self._stored_games.get(gid)
            if stored is None:
                return None
            self.games[gid] = replace(stored, pending_assist=_copy(stored.pending_assist))
        return self.games[gid]

    def _stats(self, gid: str, team: str, player: int, event: Event) -> PlayerStats:
        key = (gid, player)
        if key not in self.players:
            stored = self._stored_players.get(key)
            self.players[key] = (
                PlayerStats(gid, player, team) if stored is None else replace(stored)
            )
        stats = self.players[key]
        if stats.team != team:
            raise _violation(event, f"player {player} plays for {stats.team}, not {team}")
        return stats


def _check_next(game: Game, event: Event) -> None:
    """The rules a started game puts on its next event."""
    if game.status == FINAL:
        raise _violation(event, "no play after END")
    if _seq(event) <= game.last_seq:
        raise _violation(event, f"seq must grow (game is at {game.last_seq})")
    passer = game.pending_assist
    if passer is None:
        return
    data = event.data
    if not (
        event.type == POINT
        and data["team"] == passer["team"]
        and data["player"] != passer["player"]
    ):
        raise _violation(
            event, "an ASSIST must be immediately followed by a POINT of the same team"
        )


def _started(event: Event) -> Game:
    home, away = event.data["home"], event.data["away"]
    if home == away:
        raise _violation(event, "home and away must be different teams")
    return Game(game_id(event), home, away, LIVE, 0, 0, None, 0, _seq(event))


def _seq(event: Event) -> int:
    if event.seq is None:
        raise _violation(event, "games need sequence mode (event has no seq)")
    return event.seq


def _violation(event: Event, rule: str) -> ValueError:
    return ValueError(f"{event.stream} seq {event.seq} {event.type}: {rule}")


def _copy(assist: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if assist is None else dict(assist)


def _game_from_row(row: tuple[Any, ...]) -> Game:
    assist = row[6]
    # psycopg decodes jsonb to Python; another driver may hand over the JSON text.
    if isinstance(assist, str):
        assist = json.loads(assist)
    return Game(row[0], row[1], row[2], row[3], row[4], row[5], assist, row[7], row[8])


def _game_params(g: Game) -> tuple[Any, ...]:
    assist = None if g.pending_assist is None else json.dumps(g.pending_assist)
    return (
        g.id,
        g.home,
        g.away,
        g.status,
        g.home_points,
        g.away_points,
        assist,
        g.plays,
        g.last_seq,
    )


def _player_params(p: PlayerStats) -> tuple[Any, ...]:
    return (p.game_id, p.player, p.team, p.points, p.assists, p.jumps)
