"""Shared pieces of the fault scenarios that run ``projector run`` as real processes
(``test_fault_crashes.py``, ``test_fault_services.py``): the shop workload (customers and
basketball games, reordered, duplicated, some events withheld for the replay responder), the
row-by-row comparison of every stream with the oracles folded from the complete ordered log,
the daemon process, bounded polling, and what the daemon's log and PostgreSQL tell about it."""

from __future__ import annotations

import ast
import random
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from projector import scenarios
from projector.replay.responder import ReplayResponder
from tests.conftest import unique
from tests.integration.harness import daemon_process
from tests.integration.test_replay_fill import responder_running
from tests.integration.test_responder import SCHEMA, TABLE, store_events
from tests.integration.views import Views

Wire = dict[str, Any]
Row = dict[str, Any]

ASSIGNED = re.compile(r"projector\.source\.kafka: assigned (?!nothing)")
TRANSIENT = "transient store error, retrying"
# A batch whose commit was in flight (PostgreSQL) and failed: found in the store after all,
# or applied again.
LANDED_UNANSWERED = "the batch's commit was not answered"
LANDED_FAILED = "the batch's commit failed"
# A batch built behind a commit in flight (PostgreSQL) that failed, and was applied after.
BUILT_BEHIND = "a batch built behind one in flight failed"


def recoveries(text: str) -> int:
    """How many store failures the daemon's log shows it met and recovered from (one
    failure may show twice: in the batch in flight, and in the one built behind it)."""
    return sum(text.count(m) for m in (TRANSIENT, LANDED_UNANSWERED, LANDED_FAILED, BUILT_BEHIND))


STOPPED = re.compile(r"projection (\w+) stopped after (\d+) batches: (\{.*\})")


# ---------------------------------------------------------------------------- the workload


@dataclass
class Workload:
    """The complete ordered log (the oracles fold it), what reaches the source topic (shuffled
    within windows, duplicated, minus the withheld events), and the withheld events (only in
    the write side's event store: served by the replay responder when a gap asks)."""

    seed: int
    log: list[Wire]
    delivered: list[Wire]
    withheld: list[Wire]

    @property
    def duplicates(self) -> int:
        return len(self.delivered) + len(self.withheld) - len(self.log)

    @property
    def streams(self) -> int:
        return len({w["stream"] for w in self.log})


def shop_workload(
    seed: int,
    customers: int,
    games: int,
    plays: int = 100,
    duplicates: float = 0.01,
    withheld: float = 0.0,
    window: int = 100,
) -> Workload:
    """Customers and games interleaved (each stream in seq order), delivered shuffled within
    ``window``, a ``duplicates`` fraction copied again later, a ``withheld`` fraction left out
    (never a stream's newest event: nothing later would tell it is missing)."""
    rng = random.Random(seed)
    log = scenarios.customer_log(rng, customers) + scenarios.game_log(rng, games, plays)
    log = sorted(log, key=lambda w: (w["seq"], rng.random()))
    last = {w["stream"]: w["seq"] for w in log}
    candidates = [w for w in log if w["seq"] < last[w["stream"]]]
    held_ids = {id(w) for w in rng.sample(candidates, round(len(log) * withheld))}
    kept = [w for w in log if id(w) not in held_ids]
    delivered = scenarios.with_duplicates(
        rng, scenarios.shuffle_within_windows(rng, kept, window), duplicates
    )
    return Workload(seed, log, delivered, [w for w in log if id(w) in held_ids])


# ---------------------------------------------------------------------------- the comparison


@dataclass(frozen=True)
class Comparison:
    """Every stream of the log against the oracle: a customer stream is equal when its row is
    (or both are absent: deleted); a game stream when its game row and all its players' box
    score rows are. ``applied_twice`` sums what the per-row apply counters (customers'
    ``applied_events``, games' ``plays``) hold above the oracle's."""

    streams: int
    equal: int
    applied_twice: int
    stray: int  # view rows of no stream of the log
    examples: list[tuple[str, Any, Any]]

    @property
    def all_equal(self) -> bool:
        return self.equal == self.streams and self.stray == 0

    @property
    def percent_equal(self) -> float:
        return round(100.0 * self.equal / self.streams, 2) if self.streams else 100.0


def compare_shop(views: Views, schema: str, log: list[Wire]) -> Comparison:
    customers = views.customers(schema)
    games, players = views.games(schema)
    want_customers = scenarios.customers_oracle(log)
    want_games, want_players = scenarios.game_oracle(log)
    streams = sorted({w["stream"] for w in log})
    equal, twice = 0, 0
    examples: list[tuple[str, Any, Any]] = []
    stray = set(customers) - {s.removeprefix("customer:") for s in streams}
    stray |= set(games) - {s.removeprefix("game:") for s in streams}
    for stream in streams:
        kind, key = stream.split(":", 1)
        got: Any
        want: Any
        if kind == "customer":
            got, want = customers.get(key), want_customers.get(key)
            if got is not None and want is not None:
                twice += max(0, got["applied_events"] - want["applied_events"])
        else:
            game, want_game = games.get(key), want_games.get(key)
            got = (game, {k: v for k, v in players.items() if k[0] == key})
            want = (want_game, {k: v for k, v in want_players.items() if k[0] == key})
            if game is not None and want_game is not None:
                twice += max(0, game["plays"] - want_game["plays"])
        if got == want:
            equal += 1
        elif len(examples) < 3:
            examples.append((stream, got, want))
    if stray:
        examples.append(("rows of no stream", sorted(stray)[:5], None))
    return Comparison(len(streams), equal, twice, len(stray), examples)


# ---------------------------------------------------------------------------- polling


def wait_for(
    check: Callable[[], Any],
    what: str,
    limit: float,
    alive: Callable[[], None] = lambda: None,
    every: float = 0.1,
) -> Any:
    """Poll ``check`` every ``every`` seconds (bounded by ``limit``) until it is truthy,
    calling ``alive`` (which raises when a watched process died) each round; its first truthy
    value."""
    deadline = time.monotonic() + limit
    while True:
        alive()
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit:.0f}s waiting for {what}")
        time.sleep(every)


# ---------------------------------------------------------------------------- the daemon


@dataclass
class Daemon:
    """``projector run -c config`` as a real process, its output appended to ``log``."""

    config: Path
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    name: str = "daemon"

    def start(self) -> Daemon:
        assert not self.alive(), "already running"
        self.proc = daemon_process(self.config, log=self.log, env=self.env)
        self.starts += 1
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def size(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def tail(self, chars: int = 4000) -> str:
        return self.text()[-chars:]

    def count(self, pattern: re.Pattern[str] | str, since: int = 0) -> int:
        """How often ``pattern`` is in the log past character ``since``."""
        text = self.text()[since:]
        if isinstance(pattern, str):
            return text.count(pattern)
        return len(pattern.findall(text))

    def check_alive(self) -> None:
        """Raises if the process exited (with its log's tail)."""
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"the daemon exited with {self.proc.returncode}:\n{self.tail()}")

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM: the daemon finishes its batch and exits; its exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a frozen daemon must see the SIGTERM
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.reap()
            raise

    def reap(self) -> None:
        """Make sure the process is gone (killed if it still runs)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(timeout=30)

    def wait_assigned(self, since: int, limit: float = 120) -> None:
        """Poll the log, past byte ``since``, until the daemon has partitions."""

        def assigned() -> bool:
            with self.log.open("rb") as f:
                f.seek(since)
                return bool(ASSIGNED.search(f.read().decode(errors="replace")))

        wait_for(assigned, "the daemon to get its partitions", limit, self.check_alive)

    def totals(self, projection: str) -> dict[str, int]:
        """The totals the daemon logged when it stopped, summed over its runs."""
        out: dict[str, int] = {}
        for name, _batches, totals in STOPPED.findall(self.text()):
            if name == projection:
                for key, value in ast.literal_eval(totals).items():
                    out[key] = out.get(key, 0) + int(value)
        return out


@contextmanager
def daemon(config: Path, log: Path, env: dict[str, str] | None = None) -> Iterator[Daemon]:
    """A ``Daemon`` (not started) that is killed at the end of the block if it still runs."""
    d = Daemon(config, log, env or {})
    try:
        yield d
    finally:
        d.reap()


@contextmanager
def replay_responder(
    bootstrap: str, event_store_dsn: str, log: list[Wire], requests: str, replays: str
) -> Iterator[None]:
    """The reference responder in a thread, serving ``requests`` from an event store (in
    ``event_store_dsn``) holding the whole ``log``, onto ``replays``."""
    store_events(event_store_dsn, log)
    responder = ReplayResponder(
        bootstrap,
        event_store_dsn,
        replays,
        requests_topic=requests,
        group=unique("responder"),
        schema=SCHEMA,
        table=TABLE,
    )
    with responder_running(responder, "kafka"):
        yield


# ---------------------------------------------------------------------------- PostgreSQL


def one(dsn: str, query: str, params: tuple[Any, ...] = ()) -> Any:
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def source_committed(dsn: str, projection: str, topic: str) -> int:
    """The sum of the stored checkpoints of ``topic`` (= messages consumed from it)."""
    return int(
        one(
            dsn,
            "select coalesce(sum(next_offset), 0) from projector.checkpoints"
            " where projection = %s and topic = %s",
            (projection, topic),
        )
    )


@dataclass(frozen=True)
class PgState:
    """Projector's own state of a projection: parked events (the whole holding table, every
    projection), open gaps, open dead letters, and what the source topic's checkpoints sum to."""

    holding: int
    open_gaps: int
    dead_letters: int
    source_committed: int


def pg_state(dsn: str, projection: str, topic: str) -> PgState:
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        row = conn.execute(
            "select (select count(*) from projector.holding),"
            " (select count(*) from projector.gaps where projection = %(p)s"
            "  and state <> 'skipped'),"
            " (select count(*) from projector.dead_letters where projection = %(p)s"
            "  and status = 'open'),"
            " (select coalesce(sum(next_offset), 0) from projector.checkpoints"
            "  where projection = %(p)s and topic = %(t)s)",
            {"p": projection, "t": topic},
        ).fetchone()
    assert row is not None
    return PgState(*(int(v) for v in row))


@dataclass(frozen=True)
class Session:
    """One of the daemon's PostgreSQL sessions as ``pg_stat_activity`` shows it."""

    pid: int
    state: str
    wait_event: str
    in_transaction: bool  # xact_start is not null

    @property
    def waiting_on_client(self) -> bool:
        """Idle, or in a statement or pipeline that waits for the client's next message."""
        return self.state != "active" or self.wait_event in ("ClientRead", "ClientWrite")


def daemon_sessions(dsn: str) -> list[Session]:
    """The daemon's sessions in ``dsn``'s database (application_name ``projector``)."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        found = conn.execute(
            "select pid, coalesce(state, ''), coalesce(wait_event, ''), xact_start is not null"
            " from pg_stat_activity where datname = current_database()"
            " and application_name = 'projector' and pid <> pg_backend_pid()"
        ).fetchall()
    return [Session(int(p), str(s), str(w), bool(x)) for p, s, w, x in found]


def terminate_daemon_sessions(dsn: str, mid_transaction: bool = True) -> int:
    """``pg_terminate_backend`` on the daemon's sessions (those with a transaction open, when
    ``mid_transaction``); how many were ended."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        found = conn.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity"
            " where datname = current_database() and application_name = 'projector'"
            " and pid <> pg_backend_pid() and (not %s or xact_start is not null)",
            (mid_transaction,),
        ).fetchall()
    return sum(1 for (ok,) in found if ok)


def figures(name: str, values: dict[str, Any]) -> None:
    """The scenario's figures, on one line that starts with ``FIGURES``."""
    print(f"FIGURES {name}:", values, flush=True)
