"""projector: build read models in PostgreSQL or Redis from Kafka event streams, in order, exactly once.

Each command wraps one function that does the work. Exit codes: 0 ok, 1 failure, 2 bad
configuration (the message names the key), 3 database schema behind (run `projector migrate`)."""

from __future__ import annotations

import typer

from projector.cli import daemon, dead_letters, gaps, rebuild, responder, status

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
app.command("check-config")(daemon.check_config)
app.command("migrate")(daemon.migrate)
app.command("run")(daemon.run)
app.command("rebuild")(rebuild.rebuild)
app.command("status")(status.status_cmd)
app.command("inspect")(status.inspect)
app.command("replay-responder")(responder.replay_responder)
app.add_typer(dead_letters.app, name="dead-letters")
app.add_typer(gaps.app, name="gaps")


def main() -> None:
    app(prog_name="projector")
