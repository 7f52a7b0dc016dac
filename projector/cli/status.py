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
    _with_stores,
)
from projector.core.event import Event
from projector.runner.operations import ProjectionStatus, status
from projector.store.base import StreamReport


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
    found = _guard(lambda: _with_stores(cfg, lambda s: status(cfg, s, projection, sample)))
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
        lambda: _with_stores(
            cfg, lambda s: s.of(cfg_projection).inspect_stream(cfg_projection.name, stream)
        )
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
