"""projector gaps list|request|skip."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from projector.cli.common import (
    ConfigOpt,
    ProjectionOpt,
    _config,
    _guard,
    _human,
    _iso,
    _setup_logging,
    _with_stores,
)
from projector.core.gaps import Gap
from projector.runner.operations import gaps, skip_gaps

app = typer.Typer(no_args_is_help=True, help="List gaps, request their replay now, skip one.")


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


@app.command("list")
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
    found = _guard(
        lambda: _with_stores(cfg, lambda s: gaps(cfg, s, projection, stream, include_skipped))
    )
    now = time.time()
    items = [_gap_item(p, g, now) for p, g in found]
    if as_json:
        typer.echo(json.dumps(items, indent=2))
        return
    for item, (_, g) in zip(items, found, strict=True):
        typer.echo(_gap_line(item, g, now))
    typer.echo(f"{len(items)} gap(s)")


@app.command("request")
def gaps_request(
    projection: ProjectionOpt,
    config: ConfigOpt = Path("projector.yaml"),
    stream: Annotated[str | None, typer.Option("--stream", help="Only this stream.")] = None,
) -> None:
    """Make open gaps due now: the daemon requests their replay on its next gap check."""
    cfg = _config(config)
    proj = _guard(lambda: cfg.projection(projection))
    count = _guard(
        lambda: _with_stores(
            cfg, lambda s: s.of(proj).request_gaps_now(proj.name, stream, time.time())
        )
    )
    typer.echo(f"{count} gap(s) of {proj.name} due now: the daemon requests them on its next check")
    if count and proj.replay.channel == "none":
        typer.echo(
            f"note: {proj.name} has no replay channel (replay.channel: none): no request goes out"
        )


@app.command("skip")
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
        lambda: _with_stores(
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
