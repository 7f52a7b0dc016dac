"""projector rebuild: the views built again from the whole history, swapped in live."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from projector.cli.common import ConfigOpt, _config, _guard, _human, _setup_logging
from projector.config import parse_duration
from projector.runner import rebuild as rb


class BarProgress(rb.Progress):
    """A bar with rate and ETA, on a terminal."""

    def __init__(self, projection: str) -> None:
        self._bar = Progress(
            TextColumn(f"rebuild {projection}: {{task.fields[phase]}}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
        )
        self._task = self._bar.add_task("rebuild", total=None, phase="reading", rate="")
        self._started = time.monotonic()
        self._bar.start()

    def update(self, done: int, total: int, phase: str) -> None:
        rate = done / max(time.monotonic() - self._started, 1e-9)
        self._bar.update(
            self._task, completed=done, total=total, phase=phase, rate=f"{rate:,.0f}/s"
        )

    def close(self) -> None:
        self._bar.stop()


class LineProgress(rb.Progress):
    """A line every few seconds, for logs and pipes."""

    def __init__(self, projection: str, every: float = 5.0) -> None:
        self._projection = projection
        self._every = every
        self._started = time.monotonic()
        self._next = 0.0
        self._phase = ""

    def update(self, done: int, total: int, phase: str) -> None:
        now = time.monotonic()
        if now < self._next and phase == self._phase:
            return
        self._next, self._phase = now + self._every, phase
        elapsed = max(now - self._started, 1e-9)
        rate = done / elapsed
        eta = "?" if rate <= 0 else _human((total - done) / rate)
        pct = 100.0 if total <= 0 else 100.0 * done / total
        typer.echo(
            f"rebuild {self._projection}: {phase}, {done:,} of {total:,} messages ({pct:.0f}%),"
            f" {rate:,.0f}/s, ETA {eta}"
        )


def _print_plan(plan: rb.RebuildPlan) -> None:
    action = "resume" if plan.resume else "start"
    typer.echo(
        f"rebuild {plan.projection}: would {action} building shadow schema {plan.shadow_schema},"
        f" {plan.to_read:,} messages to read"
    )
    for p in plan.partitions:
        live = "-" if p.live is None else f"{p.live:,}"
        mark = "  TRIMMED: history starts before what the topic holds" if p.trimmed else ""
        mark = "  (history topic)" if p.history else mark
        typer.echo(
            f"  {p.topic}[{p.partition}]: offsets {p.low:,}..{p.high:,}, history from {p.start:,},"
            f" live at {live}, to read {p.to_read:,}{mark}"
        )


def rebuild(
    projection: Annotated[str, typer.Argument(help="The projection to rebuild.")],
    config: ConfigOpt = Path("projector.yaml"),
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would be read and swapped; change nothing.")
    ] = False,
    restart: Annotated[
        bool, typer.Option("--restart", help="Drop an interrupted rebuild's work and start over.")
    ] = False,
    allow_trimmed_history: Annotated[
        bool,
        typer.Option(
            "--allow-trimmed-history",
            help="Build from what the topics still hold, though retention removed the start.",
        ),
    ] = False,
    history_from: Annotated[
        list[str] | None,
        typer.Option(
            "--history-from",
            help="A topic holding the history retention removed from the projection's topics"
            " (re-published, an archive); read too. Repeat for several.",
        ),
    ] = None,
    lock_timeout: Annotated[
        str, typer.Option(help="The longest the swap waits for a lock (a long reader, a batch).")
    ] = "5s",
) -> None:
    """Build the projection's views again from the beginning of its topics into a shadow copy
    while the daemon keeps running, then swap them in atomically with projector's state.
    Readers keep reading the live views until the swap. Resumes after an interruption."""
    cfg = _config(config)
    _setup_logging(cfg)
    proj = _guard(lambda: cfg.projection(projection))
    progress: rb.Progress = (
        BarProgress(proj.name) if sys.stdout.isatty() and not dry_run else LineProgress(proj.name)
    )
    try:
        report = _guard(
            lambda: rb.rebuild(
                cfg,
                proj.name,
                dry_run=dry_run,
                allow_trimmed=allow_trimmed_history,
                restart=restart,
                progress=progress,
                lock_timeout=parse_duration(lock_timeout),
                history=history_from or (),
            )
        )
    except KeyboardInterrupt:
        progress.close()
        typer.echo(f"rebuild {proj.name}: interrupted; run it again to resume", err=True)
        raise typer.Exit(130) from None
    progress.close()
    if dry_run:
        _print_plan(report.plan)
        return
    typer.echo(
        f"rebuild {proj.name}: read {report.read:,} messages in {_human(report.seconds)};"
        f" {report.status}"
    )
    if report.status == "swapped":
        offsets = ", ".join(f"{t}[{p}]@{o}" for (t, p), o in sorted(report.checkpoints.items()))
        typer.echo(f"the daemon goes on from the rebuilt state at {offsets or 'the start'}")
        if not report.old_dropped:
            typer.echo("the old views are still being read; the next rebuild drops them")
