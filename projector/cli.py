"""projector: build read models in PostgreSQL from Kafka event streams, in order, exactly once.

Each command wraps one function that does the work. Exit codes: 0 ok, 1 failure, 2 bad
configuration (the message names the key), 3 database schema behind (run `projector migrate`)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from confluent_kafka import KafkaException
from rich.console import Console
from rich.table import Table

from projector.config import Config, ConfigError, ProjectionConfig, load_config, redact
from projector.core.event import Event
from projector.core.gaps import Gap
from projector.logs import setup_logging
from projector.replay.responder import ReplayResponder, respond
from projector.runner.daemon import run as run_daemon
from projector.runner.dead_letters import resolve
from projector.runner.operations import ProjectionStatus, gaps, skip_gaps, status
from projector.runner.worker import build_decoders, load_handlers, view_migrations
from projector.store.errors import SchemaBehind, StoreError
from projector.store.migrate import check_schema
from projector.store.migrate import migrate as do_migrate
from projector.store.postgres import (
    PostgresStore,
    StreamReport,
    inspect_stream,
    list_dead_letters,
    purge_dead_letters,
    request_gaps_now,
)

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
dead_letters_app = typer.Typer(
    no_args_is_help=True, help="List, retry, skip and purge dead letters."
)
app.add_typer(dead_letters_app, name="dead-letters")
gaps_app = typer.Typer(no_args_is_help=True, help="List gaps, request their replay now, skip one.")
app.add_typer(gaps_app, name="gaps")

ConfigOpt = Annotated[
    Path,
    typer.Option("--config", "-c", envvar="PROJECTOR_CONFIG", help="The YAML config file."),
]
ProjectionOpt = Annotated[str, typer.Option("--projection", "-p", help="The projection's name.")]
T = TypeVar("T")


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _config(path: Path) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        raise _fail(str(exc)) from None


def _guard(fn: Callable[[], T]) -> T:
    """Turn the errors a person can act on into one clear line and a non-zero exit."""
    try:
        return fn()
    except SchemaBehind as exc:
        raise _fail(str(exc), 3) from None
    except (ConfigError, ValueError) as exc:
        raise _fail(str(exc)) from None
    except StoreError as exc:
        raise _fail(str(exc), 1) from None
    except KafkaException as exc:
        raise _fail(f"Kafka: {exc}", 1) from None


def _with_store(cfg: Config, work: Callable[[PostgresStore], T]) -> T:
    """Run ``work`` on a store whose schema is current (else SchemaBehind names migrate)."""
    store = PostgresStore(cfg.postgres.dsn.get_secret_value(), cfg.postgres.schema_)
    try:
        check_schema(store.conn, cfg.postgres.schema_, [])
        return work(store)
    finally:
        store.close()


def _setup_logging(config: Config) -> None:
    setup_logging(config.log.level, config.log.format)


def _check_projection(projection: ProjectionConfig) -> None:
    load_handlers(projection)
    build_decoders(projection)


@app.command("check-config")
def check_config(config: ConfigOpt = Path("projector.yaml")) -> None:
    """Validate the config, import every handler and decoder, and print a summary."""
    cfg = _config(config)
    for p in cfg.projections:
        _guard(lambda p=p: _check_projection(p))  # type: ignore[misc]
        typer.echo(
            f"projection {p.name}: mode {p.mode}, topics {', '.join(p.topics)},"
            f" views in schema {p.schema_name}, handlers {', '.join(p.handlers)}"
        )
    typer.echo(
        f"postgres: {redact(cfg.postgres.dsn.get_secret_value())} (schema {cfg.postgres.schema_})"
    )
    typer.echo(
        f"kafka: {cfg.kafka.bootstrap_servers} (groups {cfg.kafka.group_prefix}.<projection>)"
    )
    typer.echo("config OK")


@app.command()
def migrate(config: ConfigOpt = Path("projector.yaml")) -> None:
    """Create or upgrade projector's tables and every projection's views. Safe to run from two
    places at once."""
    cfg = _config(config)
    _setup_logging(cfg)

    def work() -> list[str]:
        views = [v for p in cfg.projections for v in view_migrations(p, load_handlers(p))]
        return do_migrate(
            cfg.postgres.dsn.get_secret_value(),
            cfg.postgres.schema_,
            views,
            cfg.postgres.connect_timeout,
        )

    done = _guard(work)
    for line in done:
        typer.echo(line)
    typer.echo("schema up to date" if not done else f"{len(done)} migration(s) applied")


@app.command()
def run(
    config: ConfigOpt = Path("projector.yaml"),
    projection: Annotated[
        list[str] | None, typer.Option("--projection", "-p", help="Run only these projections.")
    ] = None,
    exit_when_caught_up: Annotated[
        bool,
        typer.Option(
            "--exit-when-caught-up",
            help="Exit once every partition is caught up (demo, tests, backfills).",
        ),
    ] = False,
) -> None:
    """Run the daemon: consume, sequence, apply, until SIGTERM."""
    cfg = _config(config)
    _setup_logging(cfg)
    if projection:
        for name in projection:
            _guard(lambda name=name: cfg.projection(name))  # type: ignore[misc]
    code = _guard(lambda: run_daemon(cfg, projection, exit_when_caught_up))
    raise typer.Exit(code)


@dead_letters_app.command("list")
def dead_letters_list(
    config: ConfigOpt = Path("projector.yaml"),
    projection: Annotated[str | None, typer.Option("--projection", "-p")] = None,
    status: Annotated[
        str | None, typer.Option(help="open, retried or skipped; all when unset.")
    ] = "open",
    limit: int = 100,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List dead letters with their reason and source offset."""
    cfg = _config(config)
    rows = _guard(
        lambda: _with_store(cfg, lambda s: list_dead_letters(s, projection, status, limit))
    )
    items: list[dict[str, Any]] = []
    for r in rows:
        src = r.message.source if r.message is not None else (r.event.source if r.event else None)
        items.append(
            {
                "id": r.id,
                "projection": r.projection,
                "kind": r.kind,
                "status": r.status,
                "stream": r.stream,
                "seq": r.seq,
                "source": None if src is None else f"{src.topic}[{src.partition}]@{src.offset}",
                "attempts": r.attempts,
                "created_at": r.created_at.isoformat(),
                "reason": r.reason,
            }
        )
    if as_json:
        typer.echo(json.dumps(items, indent=2))
        return
    for i in items:
        where = f"{i['stream']} seq {i['seq']}" if i["stream"] else "(undecoded)"
        typer.echo(
            f"#{i['id']} {i['projection']} {i['kind']} {i['status']} {where} from {i['source']}: {i['reason']}"
        )
    typer.echo(f"{len(items)} dead letter(s)")


def _resolve(config: Path, projection: str, ids: list[int], action: str) -> None:
    cfg = _config(config)
    _setup_logging(cfg)
    outcomes = _guard(lambda: resolve(cfg, projection, ids, action, time.time))
    for o in outcomes:
        typer.echo(f"#{o.id}: {o.status}: {o.detail}")
    failed = [o for o in outcomes if o.status not in ("retried", "skipped")]
    raise typer.Exit(1 if failed else 0)


@dead_letters_app.command("retry")
def dead_letters_retry(
    ids: Annotated[list[int], typer.Argument(help="Dead letter ids (see list).")],
    projection: ProjectionOpt,
    config: ConfigOpt = Path("projector.yaml"),
) -> None:
    """Apply dead letters again after a fix; their streams resume and drain."""
    _resolve(config, projection, ids, "retry")


@dead_letters_app.command("skip")
def dead_letters_skip(
    ids: Annotated[list[int], typer.Argument(help="Dead letter ids (see list).")],
    projection: ProjectionOpt,
    config: ConfigOpt = Path("projector.yaml"),
) -> None:
    """Move past dead letters without applying them; their streams resume and drain."""
    _resolve(config, projection, ids, "skip")


@dead_letters_app.command("purge")
def dead_letters_purge(
    config: ConfigOpt = Path("projector.yaml"),
    projection: Annotated[str | None, typer.Option("--projection", "-p")] = None,
    include_open: Annotated[
        bool,
        typer.Option("--include-open", help="Also delete open ones (they block their streams)."),
    ] = False,
) -> None:
    """Delete resolved (retried or skipped) dead letters."""
    cfg = _config(config)
    count = _guard(
        lambda: _with_store(cfg, lambda s: purge_dead_letters(s, projection, include_open))
    )
    typer.echo(f"purged {count} dead letter(s)")


def _human(seconds: float) -> str:
    """A duration as people read it: 42s, 3m12s, 2h05m, 3d04h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _iso(epoch: float | None) -> str | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC).isoformat()


def _gap_item(projection: str, g: Gap, now: float) -> dict[str, Any]:
    due = None if g.next_request_at is None or g.state == "skipped" else g.next_request_at
    return {
        "projection": projection,
        "stream": g.stream,
        "from_seq": g.from_seq,
        "to_seq": g.to_seq,
        "state": g.state,
        "first_seen": _iso(g.first_seen),
        "age_s": round(now - g.first_seen, 1),
        "attempts": g.attempts,
        "last_request_at": _iso(g.last_request_at),
        "next_request_at": _iso(due),
        "next_request_in_s": None if due is None else round(max(0.0, due - now), 1),
    }


def _gap_line(item: dict[str, Any], g: Gap, now: float) -> str:
    last = "never" if g.last_request_at is None else f"{_human(now - g.last_request_at)} ago"
    wait = item["next_request_in_s"]
    upcoming = "-" if wait is None else ("due now" if wait <= 0 else f"in {_human(wait)}")
    return (
        f"{item['projection']} {g.stream} {g.from_seq}-{g.to_seq} {g.state}:"
        f" age {_human(now - g.first_seen)}, {g.attempts} attempt(s),"
        f" last request {last}, next request {upcoming}"
    )


@gaps_app.command("list")
def gaps_list(
    config: ConfigOpt = Path("projector.yaml"),
    projection: Annotated[str | None, typer.Option("--projection", "-p")] = None,
    stream: Annotated[str | None, typer.Option("--stream", help="Only this stream.")] = None,
    include_skipped: Annotated[
        bool, typer.Option("--all", help="Also the ranges given up on (skipped).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List open gaps: range, state, age, replay requests so far, the next one."""
    cfg = _config(config)
    if projection:
        _guard(lambda: cfg.projection(projection))
    found = _guard(lambda: _with_store(cfg, lambda s: gaps(s, projection, stream, include_skipped)))
    now = time.time()
    items = [_gap_item(p, g, now) for p, g in found]
    if as_json:
        typer.echo(json.dumps(items, indent=2))
        return
    for item, (_, g) in zip(items, found, strict=True):
        typer.echo(_gap_line(item, g, now))
    typer.echo(f"{len(items)} gap(s)")


@gaps_app.command("request")
def gaps_request(
    projection: ProjectionOpt,
    config: ConfigOpt = Path("projector.yaml"),
    stream: Annotated[str | None, typer.Option("--stream", help="Only this stream.")] = None,
) -> None:
    """Make open gaps due now: the daemon requests their replay on its next gap check."""
    cfg = _config(config)
    proj = _guard(lambda: cfg.projection(projection))
    count = _guard(
        lambda: _with_store(cfg, lambda s: request_gaps_now(s, proj.name, stream, time.time()))
    )
    typer.echo(f"{count} gap(s) of {proj.name} due now: the daemon requests them on its next check")
    if count and proj.replay.channel == "none":
        typer.echo(
            f"note: {proj.name} has no replay channel (replay.channel: none): no request goes out"
        )


@gaps_app.command("skip")
def gaps_skip(
    projection: ProjectionOpt,
    stream: Annotated[str, typer.Option("--stream", help="The stream whose gap to skip.")],
    config: ConfigOpt = Path("projector.yaml"),
    from_seq: Annotated[
        int | None, typer.Option("--from-seq", help="Only the gap holding this seq.")
    ] = None,
) -> None:
    """Give up on a stream's gaps by hand: record them as skipped and apply what was parked
    behind them (one transaction per gap). A late event for a skipped range is dead-lettered."""
    cfg = _config(config)
    _setup_logging(cfg)
    outcomes = _guard(
        lambda: _with_store(
            cfg, lambda s: skip_gaps(cfg, s, projection, stream, from_seq, time.time)
        )
    )
    for o in outcomes:
        if not o.skipped:
            typer.echo(
                f"{o.stream} {o.listed[0]}-{o.listed[1]}: no longer open (filled or skipped meanwhile)"
            )
        for lo, hi in o.skipped:
            typer.echo(f"skipped {o.stream} {lo}-{hi}")
        if o.skipped:
            typer.echo(
                f"{o.stream}: applied {o.drained} parked event(s), {o.dead_letters} dead letter(s)"
            )
    if not outcomes:
        where = "" if from_seq is None else f" holding seq {from_seq}"
        typer.echo(f"no open gap of {stream}{where} in {projection}", err=True)
    raise typer.Exit(0 if any(o.skipped for o in outcomes) else 1)


def _status_item(st: ProjectionStatus, now: float) -> dict[str, Any]:
    oldest = st.oldest_gap_first_seen
    return {
        "projection": st.projection,
        "lag": st.lag,
        "partitions": [
            {
                "topic": p.topic,
                "partition": p.partition,
                "low": p.low,
                "high": p.high,
                "checkpoint": p.checkpoint,
                "lag": p.lag,
            }
            for p in st.partitions
        ],
        "unavailable_topics": st.unavailable_topics,
        "parked": st.parked,
        "open_gaps": st.open_gaps,
        "held_gaps": st.held_gaps,
        "oldest_gap_age_s": None if oldest is None else round(now - oldest, 1),
        "dead_letters": st.dead_letters,
        "rate_per_s": None if st.rate is None else round(st.rate, 1),
        "eta_s": None if st.eta_seconds is None else round(st.eta_seconds, 1),
    }


def _status_tables(items: list[dict[str, Any]]) -> list[Table]:
    summary = Table(
        "projection", "lag", "rate/s", "ETA", "parked", "open gaps", "oldest gap", "dead letters"
    )
    lags = Table("projection", "topic", "partition", "checkpoint", "high", "lag", title="lag")
    for i in items:
        age = i["oldest_gap_age_s"]
        gaps_text = f"{i['open_gaps']}" + (f" ({i['held_gaps']} held)" if i["held_gaps"] else "")
        eta = i["eta_s"]
        summary.add_row(
            i["projection"],
            str(i["lag"]),
            "-" if i["rate_per_s"] is None else f"{i['rate_per_s']:.0f}",
            "-" if eta is None else _human(eta),
            str(i["parked"]),
            gaps_text,
            "-" if age is None else _human(age),
            str(i["dead_letters"]),
        )
        for p in i["partitions"]:
            checkpoint = "-" if p["checkpoint"] is None else str(p["checkpoint"])
            lags.add_row(
                i["projection"],
                p["topic"],
                str(p["partition"]),
                checkpoint,
                str(p["high"]),
                str(p["lag"]),
            )
        for topic, why in i["unavailable_topics"].items():
            lags.add_row(i["projection"], topic, "-", "-", "-", f"unavailable: {why}")
    return [summary, lags]


@app.command("status")
def status_cmd(
    config: ConfigOpt = Path("projector.yaml"),
    projection: Annotated[str | None, typer.Option("--projection", "-p")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    sample: Annotated[
        float,
        typer.Option(
            help="Seconds to watch a projection that is behind, for its rate and ETA (0: don't)."
        ),
    ] = 2.0,
) -> None:
    """Per projection: consumer lag (per partition and total), rate and ETA while behind,
    parked events, open gaps and the oldest one's age, open dead letters. Reads only; safe
    while the daemon runs."""
    cfg = _config(config)
    found = _guard(lambda: _with_store(cfg, lambda s: status(cfg, s, projection, sample)))
    now = time.time()
    items = [_status_item(st, now) for st in found]
    if as_json:
        typer.echo(json.dumps(items, indent=2))
        return
    # Piped (a log, a test) there is no terminal width to fit: don't wrap the tables at 80.
    console = Console() if sys.stdout.isatty() else Console(width=200)
    for table in _status_tables(items):
        console.print(table)


def _source(event: Event | None) -> str:
    src = None if event is None else event.source
    return "-" if src is None else f"{src.topic}[{src.partition}]@{src.offset}"


def _report_item(r: StreamReport) -> dict[str, Any]:
    pos = r.position
    return {
        "stream": r.stream,
        "position": None
        if pos is None
        else {"last_seq": pos.last_seq, "last_id": pos.last_id, "blocked_seq": pos.blocked_seq},
        "parked": [{"seq": seq, "id": e.id, "source": _source(e)} for seq, e in r.parked],
        "gaps": [
            {"from_seq": g.from_seq, "to_seq": g.to_seq, "state": g.state, "attempts": g.attempts}
            for g in r.gaps
        ],
        "dead_letters": [
            {
                "id": d.id,
                "kind": d.kind,
                "status": d.status,
                "seq": d.seq,
                "source": _source(d.event),
                "reason": d.reason,
            }
            for d in r.dead_letters
        ],
    }


@app.command()
def inspect(
    projection: Annotated[str, typer.Argument(help="The projection.")],
    stream: Annotated[str, typer.Argument(help="The stream, e.g. account:42.")],
    config: ConfigOpt = Path("projector.yaml"),
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """One stream's story: position, parked events, gaps with replay attempts, dead letters,
    and the offsets they came from."""
    cfg = _config(config)
    cfg_projection = _guard(lambda: cfg.projection(projection))
    report = _guard(
        lambda: _with_store(cfg, lambda s: inspect_stream(s, cfg_projection.name, stream))
    )
    item = _report_item(report)
    if as_json:
        typer.echo(json.dumps(item, indent=2))
        return
    pos = item["position"]
    if pos is None:
        typer.echo(f"{stream}: no event of this stream has reached {projection}")
    else:
        blocked = (
            f", blocked at seq {pos['blocked_seq']} by a dead letter" if pos["blocked_seq"] else ""
        )
        typer.echo(
            f"{stream}: applied up to seq {pos['last_seq']} (event {pos['last_id']}){blocked}"
        )
    for p in item["parked"]:
        typer.echo(f"  parked seq {p['seq']} ({p['id']}) from {p['source']}")
    for g in item["gaps"]:
        typer.echo(
            f"  gap {g['from_seq']}-{g['to_seq']} {g['state']}, {g['attempts']} replay request(s)"
        )
    for d in item["dead_letters"]:
        typer.echo(
            f"  dead letter #{d['id']} {d['kind']} {d['status']} seq {d['seq']} from {d['source']}: {d['reason']}"
        )


@app.command("replay-responder")
def replay_responder(
    bootstrap: Annotated[
        str, typer.Option("--bootstrap", envvar="PROJECTOR_RESPONDER_BOOTSTRAP", help="Kafka.")
    ],
    dsn: Annotated[
        str,
        typer.Option(
            "--dsn", envvar="PROJECTOR_RESPONDER_DSN", help="The event store's PostgreSQL DSN."
        ),
    ],
    target_topic: Annotated[
        str,
        typer.Option(
            "--target-topic", help="Where replayed events go: the replay topic or source topic."
        ),
    ],
    requests_topic: Annotated[
        str | None,
        typer.Option("--requests-topic", help="The topic requests arrive on (replay.topic)."),
    ] = None,
    group: Annotated[str, typer.Option(help="The responder's consumer group.")] = (
        "projector-replay-responder"
    ),
    schema: Annotated[str, typer.Option(help="The event store table's schema.")] = "public",
    table: Annotated[str, typer.Option(help="The event store table.")] = "event_store",
    http: Annotated[
        str | None,
        typer.Option(
            "--http", metavar="HOST:PORT", help="Answer HTTP POSTs instead of consuming Kafka."
        ),
    ] = None,
    exit_when_idle: Annotated[
        bool, typer.Option("--exit-when-idle", help="Exit once no request came for a while.")
    ] = False,
    idle_seconds: Annotated[
        float, typer.Option("--idle-seconds", help="How long is a while.")
    ] = 5.0,
) -> None:
    """The reference write side: serve replay requests from an event-store table in PostgreSQL
    by re-publishing the requested events to Kafka (see docs/replay.md). Exits on SIGTERM."""
    setup_logging("INFO")
    if (requests_topic is None) == (http is None):
        raise _fail("give either --requests-topic (Kafka channel) or --http HOST:PORT")
    responder = _guard(
        lambda: ReplayResponder(
            bootstrap,
            dsn,
            target_topic,
            requests_topic=requests_topic,
            group=group,
            schema=schema,
            table=table,
        )
    )
    _guard(lambda: respond(responder, http, idle_seconds if exit_when_idle else None))


def main() -> None:
    app(prog_name="projector")


if __name__ == "__main__":
    main()
