"""Store-neutral readers for the contract suite: the example views and projector's own state,
read back from PostgreSQL or Redis in the shape of the oracles in ``projector.scenarios``.

Each reader restates the documented layout (SQL tables; Redis keys under
``<prefix>:v:<view_schema>:<active version>:``) rather than calling the handlers, so a mistake in a handler is
not silently shared by the check.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
import redis

from tests.integration.harness import rows

Row = dict[str, Any]
Games = tuple[dict[str, Row], dict[tuple[str, int], Row]]


@dataclass(frozen=True)
class OwnState:
    """What projector keeps of a projection, in figures a test can compare."""

    parked: int
    open_gaps: int
    dead_letters: int
    checkpoint_sum: int


class Views(Protocol):
    kind: str

    def customers(self, schema: str) -> dict[str, Row]: ...

    def games(self, schema: str) -> Games: ...

    def own(self, projection: str) -> OwnState: ...

    def documents(self, schema: str) -> dict[str, Any]:
        """Merge mode: the documents by stream (PostgreSQL: the built-in ``docs`` table;
        Redis: ``handlers.profiles_redis``)."""

    def merged(self, projection: str) -> int:
        """Merge mode: how many documents projector keeps merge state for."""

    def parked_count(self, projection: str) -> int:
        """The parked figure the store keeps for metrics and back-pressure (read it when the
        daemon is idle: it must then equal ``own().parked``)."""


def _customer(cid: str, name: str, email: str | None, version: Any, applied: Any) -> Row:
    return {
        "id": cid,
        "name": name,
        "email": email,
        "version": int(version),
        "applied_events": int(applied),
    }


@dataclass
class PgViews:
    dsn: str
    kind: str = "postgres"

    def customers(self, schema: str) -> dict[str, Row]:
        found = rows(
            self.dsn, f"select id, name, email, version, applied_events from {schema}.customers"
        )
        return {r[0]: _customer(*r) for r in found}

    def games(self, schema: str) -> Games:
        games = {
            r[0]: {
                "id": r[0],
                "home": r[1],
                "away": r[2],
                "status": r[3],
                "home_points": r[4],
                "away_points": r[5],
                "pending_assist": r[6],
                "plays": r[7],
                "last_seq": r[8],
            }
            for r in rows(
                self.dsn,
                "select id, home, away, status, home_points, away_points, pending_assist,"
                f" plays, last_seq from {schema}.games",
            )
        }
        players = {
            (r[0], r[1]): {
                "game_id": r[0],
                "player": r[1],
                "team": r[2],
                "points": r[3],
                "assists": r[4],
                "jumps": r[5],
            }
            for r in rows(
                self.dsn,
                f"select game_id, player, team, points, assists, jumps from {schema}.player_stats",
            )
        }
        return games, players

    def own(self, projection: str) -> OwnState:
        with psycopg.connect(self.dsn) as conn:
            row = conn.execute(
                "select (select count(*) from projector.holding where projection = %(p)s),"
                " (select count(*) from projector.gaps where projection = %(p)s"
                "  and state <> 'skipped'),"
                " (select count(*) from projector.dead_letters where projection = %(p)s"
                "  and status = 'open'),"
                " (select coalesce(sum(next_offset), 0) from projector.checkpoints"
                "  where projection = %(p)s)",
                {"p": projection},
            ).fetchone()
        assert row is not None
        return OwnState(int(row[0]), int(row[1]), int(row[2]), int(row[3]))

    def parked_count(self, projection: str) -> int:
        return self.own(projection).parked

    def documents(self, schema: str) -> dict[str, Any]:
        return dict(rows(self.dsn, f"select id, doc from {schema}.docs"))

    def merged(self, projection: str) -> int:
        [(count,)] = rows(
            self.dsn,
            "select count(*) from projector.documents where projection = %s",
            (projection,),
        )
        return int(count)


@dataclass
class RedisViews:
    url: str
    prefix: str
    kind: str = "redis"

    def _client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True)

    def _ns(self, schema: str) -> str:
        """The active version's view namespace, found as a reader finds it."""
        with self._client() as r:
            active = r.get(f"{self.prefix}:v:{schema}:active") or "1"
        return f"{self.prefix}:v:{schema}:{active}"

    def _state(self, projection: str) -> str:
        with self._client() as r:
            version = r.get(f"{self.prefix}:s:{projection}:version") or "1"
        return f"{self.prefix}:s:{projection}:{version}"

    def customers(self, schema: str) -> dict[str, Row]:
        ns = self._ns(schema)
        with self._client() as r:
            ids, hashes = self._customer_hashes(r, ns)
            found = {
                cid: _customer(cid, h["name"], h.get("email"), h["version"], h["applied_events"])
                for cid, h in zip(ids, hashes, strict=True)
            }
            # Every hash is listed in the set and nothing else is stored under customer:.
            stray = {
                k
                for k in r.scan_iter(match=f"{ns}:customer:*", count=1000)
                if k.removeprefix(f"{ns}:customer:") not in ids
            }
        assert not stray, f"customer hashes not in the customers set: {sorted(stray)[:5]}"
        return found

    @staticmethod
    def _customer_hashes(r: redis.Redis, ns: str) -> tuple[list[str], list[dict[str, str]]]:
        """The listed customers and their hashes as of one moment: the set is WATCHed, so a
        daemon deleting a customer meanwhile makes the read start again."""
        while True:
            with r.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(f"{ns}:customers")
                    ids = sorted(str(i) for i in pipe.smembers(f"{ns}:customers"))
                    pipe.multi()
                    for cid in ids:
                        pipe.hgetall(f"{ns}:customer:{cid}")
                    hashes: list[dict[str, str]] = pipe.execute()
                    return ids, hashes
                except redis.exceptions.WatchError:
                    continue

    def games(self, schema: str) -> Games:
        ns = self._ns(schema)
        game_key = re.compile(rf"^{re.escape(ns)}:game:([^:]+)$")
        player_key = re.compile(rf"^{re.escape(ns)}:game:([^:]+):player:(\d+)$")
        games: dict[str, Row] = {}
        players: dict[tuple[str, int], Row] = {}
        with self._client() as r:
            for key in r.scan_iter(match=f"{ns}:game:*", count=1000):
                if m := game_key.match(key):
                    h = r.hgetall(key)
                    assist = h.get("pending_assist")
                    games[m[1]] = {
                        "id": m[1],
                        "home": h["home"],
                        "away": h["away"],
                        "status": h["status"],
                        "home_points": int(h["home_points"]),
                        "away_points": int(h["away_points"]),
                        "pending_assist": None if assist is None else json.loads(assist),
                        "plays": int(h["plays"]),
                        "last_seq": int(h["last_seq"]),
                    }
                elif m := player_key.match(key):
                    h = r.hgetall(key)
                    players[(m[1], int(m[2]))] = {
                        "game_id": m[1],
                        "player": int(m[2]),
                        "team": h["team"],
                        "points": int(h["points"]),
                        "assists": int(h["assists"]),
                        "jumps": int(h["jumps"]),
                    }
            for gid in games:
                board = r.zrange(f"{ns}:game:{gid}:leaderboard", 0, -1, withscores=True)
                box = {str(n): float(row["points"]) for (g, n), row in players.items() if g == gid}
                assert dict(board) == box, f"leaderboard of game {gid} differs from its box score"
        return games, players

    def own(self, projection: str) -> OwnState:
        base = self._state(projection)
        fence = f"{self.prefix}:s:{projection}"
        with self._client() as r:
            parked = sum(
                1
                for key in r.scan_iter(match=f"{base}:st:*", count=1000)
                for field in r.hkeys(key)
                if field.startswith("p:")
            )
            gaps = int(r.zcard(f"{base}:gaps"))
            letters = int(r.scard(f"{base}:dlopen"))
            offsets = sum(int(v) for v in r.hvals(f"{fence}:offsets"))
        return OwnState(parked, gaps, letters, offsets)

    def parked_count(self, projection: str) -> int:
        with self._client() as r:
            return int(r.get(f"{self._state(projection)}:parked") or 0)

    def documents(self, schema: str) -> dict[str, Any]:
        ns = self._ns(schema)
        with self._client() as r:
            listed = r.smembers(f"{ns}:docs")
            found = {s: json.loads(r.get(f"{ns}:doc:{s}") or "null") for s in listed}
            stored = {k.removeprefix(f"{ns}:doc:") for k in r.scan_iter(match=f"{ns}:doc:*")}
        assert stored == listed, "the docs set and the doc keys disagree"
        return found

    def merged(self, projection: str) -> int:
        base = self._state(projection)
        with self._client() as r:
            return sum(
                1 for key in r.scan_iter(match=f"{base}:st:*", count=1000) if r.hexists(key, "doc")
            )
