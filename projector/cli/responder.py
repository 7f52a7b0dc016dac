"""projector replay-responder: the reference write-side responder."""

from __future__ import annotations

from typing import Annotated

import typer

from projector.cli.common import (
    _fail,
    _guard,
)
from projector.logs import setup_logging
from projector.replay.responder import ReplayResponder, respond


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
