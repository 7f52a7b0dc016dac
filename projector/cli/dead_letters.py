"""projector dead-letters list|retry|skip|purge."""

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
    _setup_logging,
    _with_stores,
)
from projector.runner.dead_letters import resolve
from projector.runner.operations import selected

app = typer.Typer(no_args_is_help=True, help="List, retry, skip and purge dead letters.")


@app.command("list")
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
        lambda: _with_stores(
            cfg,
            lambda s: [
                r
                for p in selected(cfg, projection)
                for r in s.of(p).list_dead_letters(p.name, status, limit)
            ][:limit],
        )
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


@app.command("retry")
def dead_letters_retry(
    ids: Annotated[list[int], typer.Argument(help="Dead letter ids (see list).")],
    projection: ProjectionOpt,
    config: ConfigOpt = Path("projector.yaml"),
) -> None:
    """Apply dead letters again after a fix; their streams resume and drain."""
    _resolve(config, projection, ids, "retry")


@app.command("skip")
def dead_letters_skip(
    ids: Annotated[list[int], typer.Argument(help="Dead letter ids (see list).")],
    projection: ProjectionOpt,
    config: ConfigOpt = Path("projector.yaml"),
) -> None:
    """Move past dead letters without applying them; their streams resume and drain."""
    _resolve(config, projection, ids, "skip")


@app.command("purge")
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
        lambda: _with_stores(
            cfg,
            lambda s: sum(
                s.of(p).purge_dead_letters(p.name, include_open) for p in selected(cfg, projection)
            ),
        )
    )
    typer.echo(f"purged {count} dead letter(s)")
