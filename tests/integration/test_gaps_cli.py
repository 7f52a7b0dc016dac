"""``projector gaps`` (list, request, skip) and ``projector status`` against the real services,
on a projection whose log has a withheld event: the gap is listed with its range, age and
replay attempts, made due by hand, skipped by hand (the parked events behind it apply), and
``status`` reports lag, parked events, gaps and dead letters as the store and Kafka hold them,
also for a projection that never ran and while the daemon runs."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from projector.cli import app
from projector.config import Config, parse_config
from projector.runner.daemon import run
from projector.runner.operations import status
from projector.store.connect import StoreSet
from projector.store.postgres import PostgresStore
from tests.conftest import Services
from tests.integration.harness import (
    config_dict,
    migrate_all,
    projection,
    publish,
    rows,
    write_config,
)
from tests.integration.test_cli import assert_clean_exit, close_leaked_stores
from tests.integration.test_pipeline import account_rows

pytestmark = pytest.mark.integration

GAP_STREAM = "account:g"


def event(stream: str, seq: int) -> dict[str, Any]:
    if seq == 1:
        return {"stream": stream, "seq": 1, "type": "OPENED", "ts": 1, "data": {"owner": "o"}}
    return {"stream": stream, "seq": seq, "type": "DEPOSITED", "ts": seq, "data": {"amount": seq}}


@dataclass
class Setup:
    config: Config
    path: Path
    pg_dsn: str
    source: str  # accounts' topic: account:g 1..6 without 3, account:h 1..3, one poison
    idle_topic: str  # the never-run projection's topic
    idle_messages: int


@pytest.fixture
def setup(tmp_path: Path, services: Services, pg_dsn: str, new_topic: Callable[..., str]) -> Setup:
    """Two projections, migrated: ``accounts`` (replay channel none, so a burst run exits
    with its gap open) with its log published, and ``idle``, which never runs, with 7
    messages on its 2-partition topic."""
    source, idle_topic = new_topic(), new_topic(partitions=2)
    log: list[dict[str, Any] | bytes | None] = [
        *(event(GAP_STREAM, s) for s in (1, 2, 4, 5, 6)),
        *(event("account:h", s) for s in (1, 2, 3)),
        b"\x00not json",
    ]
    publish(services.kafka, source, log)
    idle_messages = publish(
        services.kafka, idle_topic, [event(f"account:{i}", 1) for i in range(7)]
    )
    data = config_dict(
        services,
        pg_dsn,
        [
            projection("accounts", [source], ["handlers.accounts"]),
            projection("idle", [idle_topic], ["handlers.accounts"], view_schema="idle_accounts"),
        ],
    )
    config = parse_config(data, env={})
    migrate_all(config)
    return Setup(
        config,
        write_config(tmp_path / "projector.yaml", data),
        pg_dsn,
        source,
        idle_topic,
        idle_messages,
    )


def run_accounts(setup: Setup) -> None:
    assert run(setup.config, ["accounts"], exit_when_caught_up=True) == 0


def invoke(setup: Setup, *args: str) -> Result:
    return CliRunner().invoke(app, [*args, "-c", str(setup.path)])


def gaps_json(setup: Setup, *args: str) -> list[dict[str, Any]]:
    result = invoke(setup, "gaps", "list", "--json", *args)
    assert_clean_exit(result, 0)
    items: list[dict[str, Any]] = json.loads(result.stdout)
    return items


def status_json(setup: Setup, *args: str) -> dict[str, dict[str, Any]]:
    # No sampling here: rate and ETA have their own test, and the figures must be repeatable.
    result = invoke(setup, "status", "--json", "--sample", "0", *args)
    assert_clean_exit(result, 0)
    return {item["projection"]: item for item in json.loads(result.stdout)}


def test_gaps_list_shows_the_gap_and_request_makes_it_due(setup: Setup) -> None:
    """Proves `gaps list` shows the withheld event's gap (projection, stream, range 3-3, open,
    age, no attempt yet, the first request still ahead), as text and parseable JSON, filtered
    by projection and stream; `gaps request` makes it due now (next_request_at <= now), and on
    its next check the daemon counts a request attempt, which `gaps list` then shows."""
    run_accounts(setup)

    result = invoke(setup, "gaps", "list")
    assert_clean_exit(result, 0)
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "1 gap(s)"
    assert lines[0].startswith(f"accounts {GAP_STREAM} 3-3 open: age ")
    assert "0 attempt(s), last request never, next request in " in lines[0]

    (item,) = gaps_json(setup, "-p", "accounts", "--stream", GAP_STREAM)
    assert (item["projection"], item["stream"], item["from_seq"], item["to_seq"]) == (
        "accounts",
        GAP_STREAM,
        3,
        3,
    )
    assert (item["state"], item["attempts"], item["last_request_at"]) == ("open", 0, None)
    assert 0 <= item["age_s"] < 120
    assert 0 < item["next_request_in_s"] <= 30
    assert gaps_json(setup, "--stream", "account:h") == []
    assert gaps_json(setup, "-p", "idle") == []

    result = invoke(setup, "gaps", "request", "-p", "accounts")
    assert_clean_exit(result, 0)
    assert result.stdout.startswith("1 gap(s) of accounts due now")
    assert "no replay channel" in result.stdout
    assert rows(
        setup.pg_dsn,
        "select next_request_at <= now(), attempts from projector.gaps where stream = %s",
        (GAP_STREAM,),
    ) == [(True, 0)]
    (item,) = gaps_json(setup)
    assert item["next_request_in_s"] == 0

    run_accounts(setup)  # its gap timer claims the due gap: one attempt, the next one later
    (item,) = gaps_json(setup)
    assert item["attempts"] == 1
    assert item["last_request_at"] is not None
    assert item["next_request_in_s"] > 0
    result = invoke(setup, "gaps", "list", "-p", "accounts")
    assert "1 attempt(s), last request " in result.stdout
    assert " ago, next request in " in result.stdout


def test_gaps_skip_steps_over_the_gap_and_drains_what_was_parked(setup: Setup) -> None:
    """Proves `gaps skip` gives up on the gap by hand: the gap's state becomes 'skipped', the
    three events parked behind it are applied (the view shows seq 6) and leave the holding
    table, `gaps list` no longer shows it (`--all` does, with no next request); skipping again
    finds no open gap and exits 1."""
    run_accounts(setup)
    assert account_rows(setup.pg_dsn)["g"]["last_seq"] == 2

    result = invoke(setup, "gaps", "skip", "-p", "accounts", "--stream", GAP_STREAM)
    assert_clean_exit(result, 0)
    assert f"skipped {GAP_STREAM} 3-3" in result.stdout
    assert f"{GAP_STREAM}: applied 3 parked event(s), 0 dead letter(s)" in result.stdout

    assert rows(setup.pg_dsn, "select from_seq, to_seq, state from projector.gaps") == [
        (3, 3, "skipped")
    ]
    assert rows(setup.pg_dsn, "select count(*) from projector.holding") == [(0,)]
    view = account_rows(setup.pg_dsn)["g"]
    assert (view["last_seq"], view["applied_events"], view["balance"]) == (6, 5, 2 + 4 + 5 + 6)
    assert gaps_json(setup) == []
    (item,) = gaps_json(setup, "--all")
    assert (item["state"], item["next_request_at"]) == ("skipped", None)
    listed = invoke(setup, "gaps", "list", "--all")
    assert "3-3 skipped:" in listed.stdout
    assert "next request -" in listed.stdout

    again = invoke(setup, "gaps", "skip", "-p", "accounts", "--stream", GAP_STREAM)
    assert_clean_exit(again, 1)
    assert f"no open gap of {GAP_STREAM}" in again.stderr


def test_gaps_skip_from_seq_picks_one_gap(setup: Setup, services: Services) -> None:
    """Proves `gaps skip --from-seq N` skips only the gap holding N: with gaps 3-3 and 7-8 of
    one stream, skipping from seq 7 leaves 3-3 open, records 7-8 as skipped, and drains
    nothing because the stream still waits for seq 3."""
    publish(services.kafka, setup.source, [event(GAP_STREAM, 9)])
    run_accounts(setup)
    assert [(g["from_seq"], g["to_seq"]) for g in gaps_json(setup)] == [(3, 3), (7, 8)]

    result = invoke(
        setup, "gaps", "skip", "-p", "accounts", "--stream", GAP_STREAM, "--from-seq", "8"
    )
    assert_clean_exit(result, 0)
    assert f"skipped {GAP_STREAM} 7-8" in result.stdout
    assert "applied 0 parked event(s)" in result.stdout
    assert rows(
        setup.pg_dsn, "select from_seq, to_seq, state from projector.gaps order by from_seq"
    ) == [(3, 3, "open"), (7, 8, "skipped")]


def test_status_reports_lag_parked_gaps_and_dead_letters(setup: Setup) -> None:
    """Proves `status --json` for a projection that ran: lag 0 on its partition (checkpoint at
    the high watermark), and parked count, open gaps, oldest gap age and open dead letters
    equal to what the store holds; for the projection that never ran: lag equals the messages
    on its topic, per partition from the low watermark, with no checkpoint; the text form is a
    table naming both."""
    run_accounts(setup)

    found = status_json(setup)
    accounts, idle = found["accounts"], found["idle"]
    assert accounts["lag"] == 0
    assert [
        (p["partition"], p["checkpoint"], p["high"], p["lag"]) for p in accounts["partitions"]
    ] == [(0, 9, 9, 0)]
    assert (
        accounts["parked"]
        == rows(setup.pg_dsn, "select count(*) from projector.holding")[0][0]
        == 3
    )
    assert accounts["open_gaps"] == 1
    assert accounts["held_gaps"] == 0
    assert 0 <= accounts["oldest_gap_age_s"] < 120
    open_letters = rows(
        setup.pg_dsn, "select count(*) from projector.dead_letters where status = 'open'"
    )[0][0]
    assert accounts["dead_letters"] == open_letters == 1
    assert accounts["unavailable_topics"] == {}

    assert idle["lag"] == setup.idle_messages == 7
    assert [p["checkpoint"] for p in idle["partitions"]] == [None, None]
    assert sum(p["high"] - p["low"] for p in idle["partitions"]) == 7
    assert (idle["parked"], idle["open_gaps"], idle["oldest_gap_age_s"], idle["dead_letters"]) == (
        0,
        0,
        None,
        0,
    )
    assert status_json(setup, "-p", "idle") == {"idle": idle}

    text = invoke(setup, "status", "--sample", "0")
    assert_clean_exit(text, 0)
    assert "projection" in text.stdout and "dead letters" in text.stdout
    assert "accounts" in text.stdout and "idle" in text.stdout


def test_status_works_while_the_daemon_runs(setup: Setup, services: Services) -> None:
    """Proves `status` reads while the daemon is running without disturbing it: it reports
    the lag falling to 0, and the daemon, still running, then applies events published
    after the status calls."""
    stop = threading.Event()
    thread = threading.Thread(target=run, args=(setup.config, ["accounts"]), kwargs={"stop": stop})
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while (
            status_json(setup, "-p", "accounts")["accounts"]["lag"] and time.monotonic() < deadline
        ):
            time.sleep(0.5)
        assert status_json(setup, "-p", "accounts")["accounts"]["lag"] == 0
        publish(services.kafka, setup.source, [event("account:h", 4)])
        while account_rows(setup.pg_dsn)["h"]["last_seq"] != 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert account_rows(setup.pg_dsn)["h"]["last_seq"] == 4
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()


def test_unknown_projection_is_refused(setup: Setup) -> None:
    """Proves the gaps and status commands name an unknown projection and exit 2."""
    for args in (
        ["gaps", "list", "-p", "nope"],
        ["gaps", "request", "-p", "nope"],
        ["gaps", "skip", "-p", "nope", "--stream", "s"],
        ["status", "-p", "nope"],
    ):
        result = invoke(setup, *args)
        assert_clean_exit(result, 2)
        assert "no projection named 'nope'" in result.stderr


def test_commands_refuse_a_database_never_migrated(
    tmp_path: Path, services: Services, pg_dsn: str
) -> None:
    """Proves gaps list/request/skip and status on a database that was never migrated exit 3
    naming `projector migrate`, without a traceback, and create nothing."""
    data = config_dict(services, pg_dsn, [projection("accounts", ["none"], ["handlers.accounts"])])
    path = write_config(tmp_path / "projector.yaml", data)
    for args in (
        ["gaps", "list"],
        ["gaps", "request", "-p", "accounts"],
        ["gaps", "skip", "-p", "accounts", "--stream", "s"],
        ["status"],
    ):
        result = CliRunner().invoke(app, [*args, "-c", str(path)])
        try:
            assert_clean_exit(result, 3)
            assert "projector migrate" in result.stderr
        finally:
            close_leaked_stores(result)
    assert rows(pg_dsn, "select count(*) from pg_namespace where nspname = 'projector'") == [(0,)]


def test_status_samples_the_rate_and_gives_an_eta(setup: Setup) -> None:
    """Proves the rate and ETA of a projection that is behind: its checkpoints are read twice
    around the sample window (here the window itself moves the checkpoint 100 offsets on, as
    a running daemon would), giving a positive rate and lag / rate as the ETA; a projection
    that is behind and does not move has rate 0 and no ETA."""
    config = setup.config
    stores = StoreSet(config)
    store = stores.of("idle")
    assert isinstance(store, PostgresStore)
    store.claim("idle", [(setup.idle_topic, 0)], "x")

    def progress(_seconds: float) -> None:
        with store.conn.transaction():
            store.conn.execute(
                "update projector.checkpoints set next_offset = coalesce(next_offset, 0) + 100 where projection = 'idle'"
            )

    try:
        found = {s.projection: s for s in status(config, stores, None, sample=0.5, wait=progress)}
    finally:
        stores.close()
    idle = found["idle"]
    assert idle.rate is not None and idle.rate > 0
    assert idle.eta_seconds == pytest.approx(idle.lag / idle.rate)
    stuck = found["accounts"]
    assert stuck.lag > 0 and stuck.rate == 0 and stuck.eta_seconds is None
