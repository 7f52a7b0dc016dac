"""`projector inspect`: one stream's story for an operator chasing a hole."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from projector.cli import app
from projector.config import parse_config
from tests.conftest import Services
from tests.integration import poison_handler
from tests.integration.harness import (
    config_dict,
    migrate_all,
    projection,
    publish,
    run_until_caught_up,
    write_config,
)

pytestmark = pytest.mark.integration


def test_inspect_tells_a_halted_streams_story(
    services: Services, pg_dsn: str, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    """Proves inspect shows, for a stream halted by a handler failure: its position and the
    blocked seq, the events parked behind it with the offsets they came from, its gap, and its
    dead letter with reason and source; and --json carries the same."""

    def ev(seq: int, **data: object) -> dict[str, object]:
        kind = "OPENED" if seq == 1 else "DEPOSITED"
        return {
            "stream": "account:x",
            "seq": seq,
            "type": kind,
            "ts": seq,
            "data": {"owner": "o"} if seq == 1 else {"amount": 1, **data},
        }

    topic = new_topic()
    publish(services.kafka, topic, [ev(1), ev(2, poison=True), ev(3), ev(5)])
    data = config_dict(
        services, pg_dsn, [projection("accounts", [topic], ["tests.integration.poison_handler"])]
    )
    path = write_config(tmp_path / "config.yaml", data)
    config = parse_config(data, env={})
    migrate_all(config)
    poison_handler.BROKEN["on"] = True
    assert run_until_caught_up(config) == 0

    result = CliRunner().invoke(app, ["inspect", "accounts", "account:x", "-c", str(path)])
    assert result.exit_code == 0, result.output
    assert "applied up to seq 1" in result.output and "blocked at seq 2" in result.output
    assert f"parked seq 3 (account:x/3) from {topic}[0]@2" in result.output
    assert "gap 4-4 open" in result.output
    assert "dead letter #" in result.output and "handler bug" in result.output

    as_json = CliRunner().invoke(
        app, ["inspect", "accounts", "account:x", "-c", str(path), "--json"]
    )
    report = json.loads(as_json.output)
    assert report["position"] == {"last_seq": 1, "last_id": "account:x/1", "blocked_seq": 2}
    assert [p["seq"] for p in report["parked"]] == [3, 5]
    assert [(d["kind"], d["seq"], d["source"]) for d in report["dead_letters"]] == [
        ("handler", 2, f"{topic}[0]@1")
    ]

    unknown = CliRunner().invoke(app, ["inspect", "accounts", "account:nope", "-c", str(path)])
    assert unknown.exit_code == 0 and "no event of this stream" in unknown.output
