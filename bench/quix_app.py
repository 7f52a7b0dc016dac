"""The peer: the accounts view built with Quix Streams, as its users would build it.

Run by ``bench/peer.py`` with the Python of Quix Streams' own environment (it pins another
confluent-kafka than projector's), so this file imports nothing of projector or bench:

    <quix env>/bin/python bench/quix_app.py '<settings as JSON>'

A stateful fold per account (Quix's state store, RocksDB, keyed by the message key) with
the rules of ``handlers/accounts.py``, and each account's row upserted into the same
``accounts`` table by Quix's PostgreSQL sink at each checkpoint; Quix's defaults otherwise
(at-least-once, a checkpoint every 5 s, state changelog topics). It knows no sequence: events
apply in the order they arrive, a duplicate twice, a withheld one never. It writes the time
it began on its first event to ``started_file``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

# In Quix Streams' own environment only (see bench/peer.py), not projector's.
from quixstreams import Application, State  # type: ignore[import-not-found]
from quixstreams.sinks.community.postgresql import PostgreSQLSink  # type: ignore[import-not-found]

# owner, balance, deposits, withdrawals, rejected, applied_events, last_seq
Account = list[Any]


def fold(account: Account | None, event: dict[str, Any]) -> Account:
    """One event on an account (``None``: none yet), by the rules of handlers/accounts.py.
    An event before its account's OPENED opens it without an owner, as a consumer that does
    not order its input has to."""
    kind, data, seq = event["type"], event["data"], event["seq"]
    owner, balance, deposits, withdrawals, rejected, applied, _ = account or ["", 0, 0, 0, 0, 0, 0]
    if kind == "OPENED":
        owner = data["owner"]
    elif kind == "DEPOSITED":
        balance += data["amount"]
        deposits += data["amount"]
    elif data["amount"] > balance:
        rejected += 1
    else:
        balance -= data["amount"]
        withdrawals += data["amount"]
    return [owner, balance, deposits, withdrawals, rejected, applied + 1, seq]


def main(settings: dict[str, Any]) -> None:
    started_file = Path(settings["started_file"])
    started = False

    def apply(event: dict[str, Any], state: State) -> dict[str, Any]:
        nonlocal started
        if not started:
            started_file.write_text(repr(time.time()))
            started = True
        account = fold(state.get("account"), event)
        state.set("account", account)
        names = ("owner", "balance", "deposits", "withdrawals", "rejected", "applied_events")
        row = dict(zip(names, account, strict=False))
        return {"id": event["stream"].removeprefix("account:"), **row, "last_seq": account[6]}

    app = Application(
        broker_address=settings["kafka"],
        consumer_group=settings["group"],
        auto_offset_reset="earliest",
        state_dir=settings["state_dir"],
        loglevel="WARNING",
    )
    topic = app.topic(settings["topic"], key_deserializer="str", value_deserializer="json")
    pg = settings["pg"]
    sink = PostgreSQLSink(
        host=pg["host"],
        port=int(pg["port"]),
        dbname=pg["dbname"],
        user=pg["user"],
        password=pg.get("password", ""),
        table_name="accounts",
        schema_auto_update=False,
        primary_key_columns="id",
        upsert_on_primary_key=True,
        include_metadata=False,
    )
    app.dataframe(topic).apply(apply, stateful=True).sink(sink)
    app.run()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
