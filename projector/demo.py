"""``make demo`` (``python -m projector.demo``): projector's promise, end to end, in one run.

Against the local services it creates a fresh database and fresh topics, writes a config with
three projections (accounts, customers, games), checks and migrates it with the real CLI, and
publishes the seed scenarios of :mod:`projector.scenarios` shuffled and partly duplicated, with one
game's POINT published before its ASSIST as in the seed's basketball question. Then it runs
``projector run --exit-when-caught-up``, compares every row of every view with the scenarios'
oracles and shows projector's own state. It exits non-zero if a view differs from its oracle or
events are left parked, missing, dead-lettered or unread. Every run starts from scratch.

Environment: ``PROJECTOR_DEMO_KAFKA`` and ``PROJECTOR_DEMO_PG_DSN`` (default: the
``PROJECTOR_TEST_*`` settings of ``dev/services.sh env``, else the local services),
``PROJECTOR_DEMO_DB`` (the database it drops and creates, default ``projector_demo``) and
``PROJECTOR_DEMO_PREFIX`` (its topics and consumer groups, default ``demo``).
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import yaml
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row
from rich.console import Console
from rich.table import Table
from rich.text import Text
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception,
    retry_if_result,
    stop_after_delay,
    wait_fixed,
)

from projector import scenarios
from projector.config import redact
from projector.scenarios import Row, Wire

ROOT = Path(__file__).resolve().parent.parent
SEED = 2025  # the same events, the same disorder, every run
PARTITIONS = 3
WINDOW = 50  # no message moves more than this many places in its topic
DUPLICATES = 0.05  # the fraction of messages published twice
BATCH = 100  # small batches, so early events also wait across transactions
SHOWN_ROWS = 5
STATE_SCHEMA = "projector"

console = Console(highlight=False)


# ------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class Settings:
    kafka: str
    admin_dsn: str  # any database of the server; the demo's own is created beside it
    database: str
    prefix: str

    @property
    def dsn(self) -> str:
        return make_conninfo(self.admin_dsn, dbname=self.database)

    @property
    def config_path(self) -> Path:
        return ROOT / ".dev" / "demo" / f"{self.prefix}.yaml"

    def topic(self, name: str) -> str:
        return f"{self.prefix}-{name}"


def settings_from(env: Mapping[str, str]) -> Settings:
    return Settings(
        kafka=env.get("PROJECTOR_DEMO_KAFKA")
        or env.get("PROJECTOR_TEST_KAFKA")
        or "127.0.0.1:19092",
        admin_dsn=env.get("PROJECTOR_DEMO_PG_DSN")
        or env.get("PROJECTOR_TEST_PG_DSN")
        or "postgresql://projector@127.0.0.1:15432/projector",
        database=env.get("PROJECTOR_DEMO_DB") or "projector_demo",
        prefix=env.get("PROJECTOR_DEMO_PREFIX") or "demo",
    )


# ------------------------------------------------------------------------------ scenarios


@dataclass(frozen=True)
class Projection:
    name: str  # also its view schema
    topic: str  # without the prefix
    handler: str
    log: list[Wire]  # the ordered log: what happened


@dataclass(frozen=True)
class View:
    table: str  # schema.table
    key: tuple[str, ...]
    expected: dict[Any, Row]  # the oracle's rows by key

    def key_of(self, row: Row) -> Any:
        return row[self.key[0]] if len(self.key) == 1 else tuple(row[k] for k in self.key)

    def only(self, keep: Callable[[Any], bool]) -> View:
        """This view restricted to the rows whose key ``keep`` accepts."""
        return View(self.table, self.key, {k: r for k, r in self.expected.items() if keep(k)})


def make_projections(rng: random.Random) -> list[Projection]:
    return [
        Projection(
            "accounts", "accounts", "handlers.accounts", scenarios.account_log(rng, 100, 10)
        ),
        Projection("customers", "customers", "handlers.customers", scenarios.customer_log(rng, 50)),
        Projection("games", "game-plays", "handlers.game", scenarios.game_log(rng, 6, 40)),
    ]


def make_views(logs: Mapping[str, list[Wire]]) -> dict[str, View]:
    games, players = scenarios.game_oracle(logs["games"])
    views = [
        View("accounts.accounts", ("id",), scenarios.accounts_oracle(logs["accounts"])),
        View("customers.customers", ("id",), scenarios.customers_oracle(logs["customers"])),
        View("games.games", ("id",), games),
        View("games.player_stats", ("game_id", "player"), players),
    ]
    return {v.table: v for v in views}


# ------------------------------------------------------------------------------ the seed's game


@dataclass(frozen=True)
class SeedCase:
    """An ASSIST, its POINT and the play after them, consecutive in one game."""

    assist: Wire
    point: Wire
    after: Wire

    @property
    def game_id(self) -> str:
        return str(self.assist["stream"]).removeprefix("game:")

    def as_played(self) -> list[Wire]:
        return [self.assist, self.point, self.after]

    def as_published(self) -> list[Wire]:
        """The seed's disorder: "Assist -> Point -> Jump" arrives as "Point -> Assist -> Jump"."""
        return [self.point, self.assist, self.after]


def find_seed_case(log: Sequence[Wire]) -> SeedCase:
    """The first ASSIST -> POINT -> JUMP of a game, else the first ASSIST -> POINT -> play."""
    streams: dict[str, list[Wire]] = {}
    for event in log:
        streams.setdefault(event["stream"], []).append(event)
    cases = [
        SeedCase(*events[i : i + 3])
        for events in streams.values()
        for i in range(len(events) - 2)
        if (events[i]["type"], events[i + 1]["type"]) == ("ASSIST", "POINT")
    ]
    return next((c for c in cases if c.after["type"] == "JUMP"), cases[0])


def _key(event: Wire) -> tuple[str, int]:
    return event["stream"], event["seq"]


def with_seed_disorder(messages: list[Wire], case: SeedCase) -> list[Wire]:
    """``messages`` with the case's three plays moved together, in the seed's wrong order."""
    keys = {_key(e) for e in case.as_published()}
    first = min(i for i, e in enumerate(messages) if _key(e) in keys)
    rest = [e for e in messages if _key(e) not in keys]
    return rest[:first] + case.as_published() + rest[first:]


def _plays(events: Iterable[Wire]) -> str:
    def play(e: Wire) -> str:
        value = f" +{e['data']['value']}" if "value" in e["data"] else ""
        return f"{e['type']}{value} by #{e['data']['player']} (seq {e['seq']})"

    return "  →  ".join(play(e) for e in events)


# ------------------------------------------------------------------------------ delivery


@dataclass(frozen=True)
class Delivery:
    projection: str
    topic: str
    events: int  # in the ordered log
    messages: list[Wire]  # as published

    @property
    def duplicates(self) -> int:
        return len(self.messages) - self.events

    @property
    def early(self) -> int:
        return count_early(self.messages)


def deliver(rng: random.Random, log: list[Wire], case: SeedCase | None = None) -> list[Wire]:
    """``log`` shuffled within windows and ``DUPLICATES`` of it published twice."""
    messages = scenarios.shuffle_within_windows(rng, log, WINDOW)
    if case is not None:
        messages = with_seed_disorder(messages, case)
    return scenarios.with_duplicates(rng, messages, DUPLICATES)


def count_early(messages: Iterable[Wire]) -> int:
    """Events published before an earlier event of their own stream: projector must hold them
    back until their predecessors arrive. (A stream's events share a key, so a partition, so
    they are consumed in this order.)"""
    seen: dict[str, set[int]] = {}
    expected: dict[str, int] = {}
    early = 0
    for event in messages:
        stream, seq = event["stream"], event["seq"]
        got = seen.setdefault(stream, set())
        if seq in got:
            continue
        got.add(seq)
        nxt = expected.get(stream, 1)
        early += seq > nxt
        while nxt in got:
            nxt += 1
        expected[stream] = nxt
    return early


def publish(kafka: str, topic: str, messages: Sequence[Wire]) -> None:
    """JSON values keyed by stream, so that each stream lives in one partition."""
    producer = Producer({"bootstrap.servers": kafka, "enable.idempotence": True, "linger.ms": 5})
    for event in messages:
        producer.produce(topic, value=json.dumps(event).encode(), key=event["stream"].encode())
        producer.poll(0)
    if producer.flush(60) != 0:
        raise RuntimeError(f"could not publish every message to {topic}")


# ------------------------------------------------------------------------------ set-up


def recreate_database(s: Settings) -> None:
    name = sql.Identifier(s.database)
    with psycopg.connect(s.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("drop database if exists {} with (force)").format(name))
        conn.execute(sql.SQL("create database {}").format(name))


def _wait_until(what: str, condition: Callable[[], bool], timeout: float = 60) -> None:
    retrying = Retrying(
        retry=retry_if_result(lambda ok: not ok),
        stop=stop_after_delay(timeout),
        wait=wait_fixed(0.2),
    )
    try:
        retrying(condition)
    except RetryError:
        raise TimeoutError(f"{what}: not done after {timeout:.0f} s") from None


def _topics(admin: AdminClient) -> dict[str, Any]:
    return dict(admin.list_topics(timeout=10).topics)


def _ready(admin: AdminClient, names: Sequence[str]) -> bool:
    """Every topic known with all its partitions led (the broker accepts writes)."""
    topics = _topics(admin)
    return all(
        n in topics
        and len(topics[n].partitions) == PARTITIONS
        and all(p.leader >= 0 for p in topics[n].partitions.values())
        for n in names
    )


def _exists_yet(exc: BaseException) -> bool:
    """A topic just deleted can still be finishing its deletion: try again."""
    return isinstance(exc, KafkaException) and exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS


def recreate_topics(kafka: str, names: Sequence[str]) -> None:
    admin = AdminClient({"bootstrap.servers": kafka})
    old = [n for n in names if n in _topics(admin)]
    if old:
        for future in admin.delete_topics(old, operation_timeout=30).values():
            future.result(timeout=60)
        _wait_until("deleting the old topics", lambda: not set(old) & set(_topics(admin)))
    retrying = Retrying(
        retry=retry_if_exception(_exists_yet), stop=stop_after_delay(60), wait=wait_fixed(0.5)
    )
    for name in names:
        retrying(_create_topic, admin, name)
    _wait_until("creating the topics", lambda: _ready(admin, names))


def _create_topic(admin: AdminClient, name: str) -> None:
    futures = admin.create_topics([NewTopic(name, PARTITIONS, 1)], operation_timeout=30)
    futures[name].result(timeout=60)


def write_config(s: Settings, projections: Sequence[Projection]) -> Path:
    decoder = {"kind": "json", "stream": "stream", "seq": "seq", "ts": "ts", "type": "type"}
    config = {
        "kafka": {"bootstrap_servers": s.kafka, "group_prefix": s.prefix},
        "postgres": {"dsn": s.dsn, "schema": STATE_SCHEMA},
        "metrics": {"enabled": False},
        "projections": [
            {
                "name": p.name,
                "topics": [s.topic(p.topic)],
                "handlers": [p.handler],
                "decoder": {**decoder, "data": "data"},
                "batch_max_messages": BATCH,
            }
            for p in projections
        ],
    }
    s.config_path.parent.mkdir(parents=True, exist_ok=True)
    header = "# Written by `make demo` (projector/demo.py), again on every run.\n"
    body = yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=100)
    s.config_path.write_text(header + body)
    return s.config_path


# ------------------------------------------------------------------------------ the CLI

_LOG_LINE = re.compile(r"^\S+ (\d\d:\d\d:\d\d)\S* (\w+) \[([^\]]+)\] [\w.]+: (.*)$")
_STOPPED = re.compile(r"^projection (\w+) stopped after (\d+) batches: (\{.*\})$")


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _echo(line: str) -> None:
    """One line of a command's output, indented; a log line without its date and logger."""
    match = _LOG_LINE.match(line)
    if match:
        clock, level, thread, message = match.groups()
        level = "" if level == "INFO" else f"{level} "
        line = f"{clock} {thread.removeprefix('projection-'):<9} {level}{message}"
    console.print(Text("  │ " + line, style="dim"), soft_wrap=True)


def cli(config: Path, *args: str, timeout: float = 300) -> tuple[int, list[str]]:
    """``python -m projector ARGS -c CONFIG``, its output echoed as it comes; its exit code and
    output lines. Killed after ``timeout`` seconds."""
    console.print(f"$ projector {' '.join(args)} -c {_shown(config)}", style="bold")
    command = [sys.executable, "-m", "projector", *args, "-c", str(config)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    lines: list[str] = []
    with subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        watchdog = threading.Timer(timeout, proc.kill)
        watchdog.daemon = True
        watchdog.start()
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                _echo(lines[-1])
        finally:
            watchdog.cancel()
        return proc.wait(), lines


def worker_totals(lines: Iterable[str]) -> dict[str, dict[str, int]]:
    """Per projection, the totals its worker logs when it stops (batches, applied, ...)."""
    totals: dict[str, dict[str, int]] = {}
    for line in lines:
        match = _LOG_LINE.match(line)
        stopped = _STOPPED.match(match.group(4)) if match else None
        if stopped:
            name, batches, counts = stopped.groups()
            totals[name] = {"batches": int(batches), **ast.literal_eval(counts)}
    return totals


# ------------------------------------------------------------------------------ showing


def _cell(value: Any) -> Text:
    if value is None:
        return Text("—")
    if isinstance(value, dict):
        return Text(json.dumps(value))
    return Text(str(value))


def _natural(key: Any) -> tuple[Any, ...]:
    parts = key if isinstance(key, tuple) else (key,)
    return tuple((0, int(p), "") if str(p).isdigit() else (1, 0, str(p)) for p in parts)


def table(title: str, rows: Sequence[Row]) -> Table:
    out = Table(title=title, title_justify="left", title_style="bold")
    for column in rows[0] if rows else []:
        out.add_column(column)
    for row in rows:
        out.add_row(*(_cell(v) for v in row.values()))
    return out


def fetch(dsn: str, relation: str) -> list[Row]:
    schema, name = relation.split(".")
    query = sql.SQL("select * from {}").format(sql.Identifier(schema, name))
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        return conn.execute(query).fetchall()


def compare(view: View, rows: Sequence[Row]) -> str | None:
    """None when the view holds exactly the oracle's rows, else what differs."""
    actual = {view.key_of(r): r for r in rows}
    missing = len(view.expected.keys() - actual.keys())
    extra = len(actual.keys() - view.expected.keys())
    wrong = sum(actual[k] != view.expected[k] for k in view.expected.keys() & actual.keys())
    if missing == extra == wrong == 0 and len(actual) == len(rows):
        return None
    return f"{missing} missing, {extra} unexpected, {wrong} different rows"


def show_view(dsn: str, view: View) -> bool:
    rows = sorted(fetch(dsn, view.table), key=lambda r: _natural(view.key_of(r)))
    console.print(
        table(f"{view.table}: {len(rows)} rows, the first {SHOWN_ROWS}", rows[:SHOWN_ROWS])
    )
    problem = compare(view, rows)
    if problem is None:
        console.print(f"[green]✓[/] {view.table} equals its oracle, all {len(rows)} rows\n")
    else:
        console.print(f"[red]✗ {view.table} differs from its oracle: {problem}[/]\n")
    return problem is None


def show_seed_case(dsn: str, case: SeedCase, views: Mapping[str, View]) -> bool:
    gid = case.game_id
    game = [r for r in fetch(dsn, "games.games") if r["id"] == gid]
    box = [r for r in fetch(dsn, "games.player_stats") if r["game_id"] == gid]
    console.print(f"Game {gid}, published as  {_plays(case.as_published())}")
    console.print(table(f"games.games, game {gid}", game))
    involved = {case.assist["data"]["player"], case.point["data"]["player"]}
    shown = sorted((r for r in box if r["player"] in involved), key=lambda r: int(r["player"]))
    console.print(table(f"games.player_stats, game {gid}: the passer and the scorer", shown))
    ok = compare(views["games.games"].only(lambda k: k == gid), game) is None
    ok = compare(views["games.player_stats"].only(lambda k: k[0] == gid), box) is None and ok
    verdict = "[green]✓[/] equal" if ok else "[red]✗ NOT equal[/]"
    console.print(
        f"{verdict} to the oracle: game {gid}'s score and all {len(box)} of its box-score rows"
    )
    return ok


def _count(conn: psycopg.Connection[Any], table_name: str) -> int:
    query = sql.SQL("select count(*) from {}").format(sql.Identifier(STATE_SCHEMA, table_name))
    row = conn.execute(query).fetchone()
    return int(row[0]) if row else 0


def show_state(s: Settings) -> bool:
    with psycopg.connect(s.dsn) as conn:
        counts = {t: _count(conn, t) for t in ("holding", "gaps", "dead_letters")}
        checkpoints = conn.execute(
            "select projection, topic, partition, next_offset"
            f" from {STATE_SCHEMA}.checkpoints order by 1, 2, 3"
        ).fetchall()
    for name, what in (
        ("holding", "parked events"),
        ("gaps", "gaps"),
        ("dead_letters", "dead letters"),
    ):
        mark = "[green]✓[/]" if counts[name] == 0 else "[red]✗[/]"
        console.print(f"{mark} {what} ({STATE_SCHEMA}.{name}): {counts[name]}")
    ends = high_watermarks(s.kafka, [(t, p) for _, t, p, _ in checkpoints])
    read = sum(offset == ends[(t, p)] for _, t, p, offset in checkpoints)
    mark = "[green]✓[/]" if read == len(checkpoints) else "[red]✗[/]"
    console.print(f"{mark} partitions read to their end: {read} of {len(checkpoints)}")
    out = Table("projection", "partition", "checkpoint", "end of partition", title_justify="left")
    out.title = f"{STATE_SCHEMA}.checkpoints, committed with the views"
    for projection, topic, partition, offset in checkpoints:
        out.add_row(
            projection, Text(f"{topic}[{partition}]"), str(offset), str(ends[(topic, partition)])
        )
    console.print(out)
    return read == len(checkpoints) and not any(counts.values())


def high_watermarks(
    kafka: str, partitions: Sequence[tuple[str, int]]
) -> dict[tuple[str, int], int]:
    consumer = Consumer({"bootstrap.servers": kafka, "group.id": "projector-demo-watermarks"})
    try:
        return {
            (t, p): consumer.get_watermark_offsets(TopicPartition(t, p), timeout=10)[1]
            for t, p in partitions
        }
    finally:
        consumer.close()


# ------------------------------------------------------------------------------ the story


def section(title: str) -> None:
    console.print()
    console.rule(f"[bold]{title}", align="left")


def introduce() -> None:
    console.rule("[bold]projector demo")
    console.print(
        "Three read models (bank accounts, customers, basketball box scores) built from events"
        " published out of order and some twice, then compared row by row with what the events,"
        " in their true order, say they must hold: the oracle."
    )


def set_up(s: Settings, projections: Sequence[Projection]) -> Path:
    section("1. A fresh database, fresh topics, a config")
    recreate_database(s)
    console.print(f"database  {redact(s.dsn)}  (dropped and created)")
    topics = [s.topic(p.topic) for p in projections]
    recreate_topics(s.kafka, topics)
    console.print(f"topics    {', '.join(topics)}  ({PARTITIONS} partitions each)")
    config = write_config(s, projections)
    console.print(
        f"config    {_shown(config)}  (projections {', '.join(p.name for p in projections)})"
    )
    return config


def check_and_migrate(config: Path) -> int:
    section("2. Check the config, create the tables")
    return cli(config, "check-config")[0] or cli(config, "migrate")[0]


def publish_all(
    s: Settings, rng: random.Random, projections: Sequence[Projection], case: SeedCase
) -> list[Delivery]:
    section("3. Publish the events: shuffled, some twice")
    deliveries = []
    for p in projections:
        messages = deliver(rng, p.log, case if p.name == "games" else None)
        deliveries.append(Delivery(p.name, s.topic(p.topic), len(p.log), messages))
    out = Table("topic", "events", "published", "out of order", "twice")
    for d in deliveries:
        publish(s.kafka, d.topic, d.messages)
        out.add_row(d.topic, str(d.events), str(len(d.messages)), str(d.early), str(d.duplicates))
    console.print(out)
    console.print(
        f"Keyed by stream, so each stream is in one partition. No message moved more than {WINDOW}"
        f" places in its topic and {DUPLICATES:.0%} were published twice. 'Out of order': events"
        " published before an earlier event of their own stream.\n"
    )
    console.print(f"The seed's basketball question: in game {case.game_id} the plays were")
    console.print(f"    {_plays(case.as_played())}")
    console.print("and they are published, like the seed's, as")
    console.print(f"    {_plays(case.as_published())}")
    return deliveries


def run_projector(config: Path, deliveries: Sequence[Delivery]) -> int:
    section("4. Run projector until it has caught up")
    started = time.monotonic()
    code, lines = cli(config, "run", "--exit-when-caught-up")
    console.print(f"exit code {code} after {time.monotonic() - started:.1f} s")
    totals = worker_totals(lines)
    if totals and code == 0:
        console.print(run_table(totals, deliveries))
        console.print(
            "Each event applied once, in its stream's order. An early event waited for its"
            " predecessors: in memory when they came in the same batch, parked in"
            f" {STATE_SCHEMA}.holding when they came in a later one (batches of {BATCH} here)."
        )
    return code


def run_table(totals: Mapping[str, Mapping[str, int]], deliveries: Sequence[Delivery]) -> Table:
    columns = ("batches", "consumed", "applied", "duplicates", "parked", "dead_letters")
    out = Table("projection", "events", *(c.replace("_", " ") for c in columns))
    events = {d.projection: d.events for d in deliveries}
    for name, counts in totals.items():
        out.add_row(name, str(events.get(name, "?")), *(str(counts.get(c, "?")) for c in columns))
    return out


def show_results(s: Settings, views: Mapping[str, View], case: SeedCase) -> bool:
    section("5. The views, compared row by row with the oracle")
    ok = all([show_view(s.dsn, v) for v in views.values()])  # a list: show every view
    ok = show_seed_case(s.dsn, case, views) and ok
    section("6. projector's own state")
    return show_state(s) and ok


def what_next(s: Settings, config: Path) -> None:
    section("Try next")
    c = _shown(config)
    for comment, command in (
        (
            "what could not be applied, and why (nothing, here)",
            f"projector dead-letters list -c {c}",
        ),
        ("keep projecting while you publish more; Ctrl-C stops cleanly", f"projector run -c {c}"),
        ("the views themselves", f"psql '{redact(s.dsn)}' -c 'table games.games'"),
        ("all of this again, from scratch", "make demo"),
    ):
        console.print(f"  [dim]# {comment}[/]")
        console.print(f"  {'.venv/bin/' if command.startswith('projector') else ''}{command}")


def main() -> int:
    started = time.monotonic()
    s = settings_from(os.environ)
    rng = random.Random(SEED)
    projections = make_projections(rng)
    views = make_views({p.name: p.log for p in projections})
    case = find_seed_case(next(p.log for p in projections if p.name == "games"))
    introduce()
    config = set_up(s, projections)
    code = check_and_migrate(config)
    if code:
        return code
    deliveries = publish_all(s, rng, projections, case)
    code = run_projector(config, deliveries)
    if code:
        return code
    ok = show_results(s, views, case)
    what_next(s, config)
    console.print()
    if ok:
        console.print(f"[green bold]Every view is right.[/] ({time.monotonic() - started:.1f} s)")
    else:
        console.print("[red bold]A view or projector's state is NOT what the events say.[/]")
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
