"""projector status and inspect: how projections stand, and one stream's story."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from projector.cli.common import (
    ConfigOpt,
    _config,
    _guard,
    _human,
    _iso,
    _with_stores,
)
from projector.config import Config, ProjectionConfig
from projector.core.correlate import Pending
from projector.core.event import Event
from projector.runner.operations import ProjectionStatus, selected, status
from projector.store.base import Store, StreamReport
from projector.store.connect import StoreSet


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


def _correlation_item(store: Store, proj: ProjectionConfig, now: float) -> dict[str, Any] | None:
    """A correlated projection's figures, as its gauges show them: open correlations, the
    watermark's lag (now minus the lowest input high, less ``lateness``; ``None`` while it is
    unset) and, with the outbox table, pending business events and the oldest one's age."""
    if proj.correlation is None:
        return None
    count, high = store.correlation_figures(proj.name, proj.correlation_topics)
    lag = None if high is None else max(0.0, now - high / 1000 + proj.correlation.lateness)
    box = store.outbox_figures(proj.name) if proj.correlation.outbox is not None else None
    return {
        "open_correlations": count,
        "watermark_lag_s": None if lag is None else round(lag, 1),
        "outbox_pending": None if box is None else box[0],
        "outbox_oldest_pending_age_s": None if box is None or box[1] is None else round(box[1], 1),
    }


def _correlations(
    cfg: Config, stores: StoreSet, projection: str | None
) -> dict[str, dict[str, Any] | None]:
    now = time.time()
    return {p.name: _correlation_item(stores.of(p), p, now) for p in selected(cfg, projection)}


def _correlation_table(items: list[dict[str, Any]]) -> Table | None:
    table = Table(
        "projection",
        "open",
        "watermark lag",
        "outbox pending",
        "oldest pending",
        title="correlation",
    )
    for i in items:
        c = i.get("correlation")
        if c is None:
            continue
        lag, age = c["watermark_lag_s"], c["outbox_oldest_pending_age_s"]
        table.add_row(
            i["projection"],
            str(c["open_correlations"]),
            "unset" if lag is None else _human(lag),
            "-" if c["outbox_pending"] is None else str(c["outbox_pending"]),
            "-" if age is None else _human(age),
        )
    return table if table.row_count else None


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
    correlation = _correlation_table(items)
    return [summary, lags] if correlation is None else [summary, lags, correlation]


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
    parked events, open gaps and the oldest one's age, open dead letters; with a correlation,
    its open correlations, watermark lag and outbox backlog. Reads only; safe while the daemon
    runs."""
    cfg = _config(config)
    found, correlated = _guard(
        lambda: _with_stores(
            cfg, lambda s: (status(cfg, s, projection, sample), _correlations(cfg, s, projection))
        )
    )
    now = time.time()
    items = [
        {**_status_item(st, now), "correlation": correlated.get(st.projection)} for st in found
    ]
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


def _correlation_record(store: Store, proj: ProjectionConfig, stream: str) -> dict[str, Any] | None:
    """The correlation record of a ``<correlation name>:<key>`` stream, if the projection has
    a correlation, its store can read records, and the key has one."""
    c = proj.correlation
    prefix = f"{proj.name if c is None or c.name is None else c.name}:"
    if c is None or not stream.startswith(prefix):
        return None
    found = store.correlation_record(proj.name, stream.removeprefix(prefix))
    return None if found is None else _record_item(*found)


def _record_item(record: Pending, due: int | None) -> dict[str, Any]:
    return {
        "key": record.key,
        "open_parts": {name: [e.id for e in evs] for name, evs in sorted(record.parts.items())},
        "end": None if record.end is None else record.end.id,
        "due": _iso(None if due is None else due / 1000),
        "closed": [
            {"until": _iso(w.until / 1000), "business_id": w.business_id, "events": len(w.ids)}
            for w in record.closed
        ],
    }


def inspect(
    projection: Annotated[str, typer.Argument(help="The projection.")],
    stream: Annotated[str, typer.Argument(help="The stream, e.g. account:42.")],
    config: ConfigOpt = Path("projector.yaml"),
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """One stream's story: position, parked events, gaps with replay attempts, dead letters,
    and the offsets they came from; for a correlation's stream (``<name>:<key>``), its
    correlation record (open parts, END record, due, closed windows)."""
    cfg = _config(config)
    proj = _guard(lambda: cfg.projection(projection))

    def read(stores: StoreSet) -> tuple[StreamReport, dict[str, Any] | None]:
        store = stores.of(proj)
        return store.inspect_stream(proj.name, stream), _correlation_record(store, proj, stream)

    report, record = _guard(lambda: _with_stores(cfg, read))
    item = {**_report_item(report), "correlation": record}
    if as_json:
        typer.echo(json.dumps(item, indent=2))
        return
    pos = item["position"]
    if record is not None:
        _echo_record(stream, record)
    if pos is None and record is None:
        typer.echo(f"{stream}: no event of this stream has reached {projection}")
    elif pos is not None:
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


def _echo_record(stream: str, record: dict[str, Any]) -> None:
    parts = ", ".join(f"{n} ({len(ids)})" for n, ids in record["open_parts"].items())
    end = ", END record in" if record["end"] else ""
    due = f", due at {record['due']} (event time)" if record["due"] else ""
    typer.echo(f"{stream}: correlation key {record['key']}: open parts {parts or 'none'}{end}{due}")
    for w in record["closed"]:
        typer.echo(
            f"  closed window until {w['until']}: {w['events']} event(s), {w['business_id']}"
        )
