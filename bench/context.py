"""What every measurement of one invocation shares: the services, the workload (and its
payloads, encoded once), the settings, and how to configure and start the daemon under test."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from bench.services import ROOT, Resources, Services, unique
from bench.workload import Row, Workload
from projector.config import Config, parse_config
from projector.core.message import RawMessage
from projector.runner.batch import BatchApplier, BatchResult, decode_all
from projector.runner.worker import build_applier, build_decoders, load_handlers
from projector.store.base import Store
from projector.store.connect import open_store, view_migrations
from projector.store.errors import NotPrepared
from projector.store.migrate import migrate

PROJECTION = "accounts"
HANDLERS = {"postgres": "handlers.accounts", "redis": "bench.redis_accounts"}
EVENT_STORE = ("public", "event_store")  # in the events database, for the replay responder
WIRE_DECODER = {"kind": "json", "stream": "stream", "seq": "seq", "ts": "ts", "type": "type"}


@dataclass
class Context:
    svc: Services
    workload: Workload
    payloads: list[bytes]
    keys: list[bytes]
    out: Path  # results, chart, configs and daemon logs
    partitions: int
    gap_timeout: float
    batch_size: int
    consumer: dict[str, Any]  # extra librdkafka settings for projector's consumer
    consumers: int  # the projection's ``consumers``: Kafka consumers in one daemon process
    profile: bool  # run the first process of each projector run under py-spy
    console: Console
    events_dsn: str = ""  # the replay responder's event store
    _expected: dict[str, Row] | None = field(default=None, repr=False)

    def expected(self) -> dict[str, Row]:
        if self._expected is None:
            self._expected = self.workload.expected()
        return self._expected

    def say(self, text: str) -> None:
        self.console.log(text)


def accounts_projection(store: str, topic: str) -> dict[str, Any]:
    """The keys of the accounts projection that every run and tool shares."""
    return {
        "name": PROJECTION,
        "store": store,
        "view_schema": PROJECTION,
        "topics": [topic],
        "handlers": [HANDLERS[store]],
        "decoder": {**WIRE_DECODER, "data": "data"},
    }


def projector_config(
    ctx: Context,
    store: str,
    topic: str,
    *,
    dsn: str | None = None,
    prefix: str | None = None,
    replay: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """The config of one run: one projection ``accounts`` on ``topic``; ``replay`` is
    (requests topic, replay topic) for the reference responder."""
    projection: dict[str, Any] = {
        **accounts_projection(store, topic),
        "batch_max_messages": ctx.batch_size,
        "consumers": ctx.consumers,
        "gap_timeout": f"{ctx.gap_timeout}s",
    }
    if replay is not None:
        requests, replayed = replay
        projection["replay"] = {"channel": "kafka", "topic": requests, "max_interval": "2s"}
        projection["replay_topic"] = replayed
    config: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": ctx.svc.kafka,
            "group_prefix": unique("bench"),
            "consumer": dict(ctx.consumer),
        },
        "metrics": {"enabled": False},
        "log": {"level": "INFO"},
        "projections": [projection],
    }
    if dsn is not None:
        config["postgres"] = {"dsn": dsn}
    if prefix is not None:
        config["redis"] = {"url": ctx.svc.redis_url, "prefix": prefix}
    return config


def prepare(config: dict[str, Any], path: Path) -> Config:
    """Write the config file and migrate what lives in PostgreSQL (as ``projector migrate``)."""
    path.write_text(yaml.safe_dump(config))
    parsed = parse_config(config, env={})
    on_pg = [p for p in parsed.projections if p.store == "postgres"]
    if on_pg:
        views = [v for p in on_pg for v in view_migrations(p, load_handlers(p))]
        pg = parsed.postgres_config()
        migrate(pg.dsn.get_secret_value(), pg.schema_, views)
    return parsed


def start_daemon(
    config_path: Path, result_path: Path, *, until_stopped: bool = False
) -> subprocess.Popen[bytes]:
    """``bench.daemon`` (projector's daemon, timed) as its own process; its log beside the
    result."""
    cmd = daemon_command(config_path, result_path, until_stopped)
    log = result_path.with_suffix(".log").open("ab")
    try:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def profile(pid: int, path: Path) -> subprocess.Popen[bytes]:
    """``py-spy record`` attached to ``pid`` until it exits: collapsed stacks (one line per
    stack, its sample count last) at 200 Hz, without pausing the target."""
    spy = str(Path(sys.executable).parent / "py-spy")
    cmd = [spy, "record", "--pid", str(pid), "--nonblocking", "--format", "raw", "-r", "200"]
    return subprocess.Popen(
        [*cmd, "-o", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def daemon_command(config_path: Path, result_path: Path, until_stopped: bool) -> list[str]:
    tail = [sys.executable, "-m", "bench.daemon", str(config_path), str(result_path)]
    return [*tail, "--until-stopped"] if until_stopped else tail


def read_result(path: Path) -> dict[str, Any]:
    """What ``bench.daemon`` wrote on exit ({} if it died before)."""
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data


def in_memory_config(
    svc: Services, res: Resources, store: str, topic: str, **projection: Any
) -> Config:
    """The accounts projection on ``topic`` in ``store`` (a fresh database or key prefix of
    ``res``), its views migrated: for the tools that feed its batch applier from memory
    (``apply_only``, ``backlog``). ``projection`` adds or overrides projection keys."""
    dsn = res.database()
    config = parse_config(
        {
            "kafka": {"bootstrap_servers": svc.kafka, "group_prefix": topic},
            "postgres": {"dsn": dsn},
            "redis": {"url": svc.redis_url, "prefix": res.redis_prefix()},
            "metrics": {"enabled": False},
            "projections": [{**accounts_projection(store, topic), **projection}],
        },
        env={},
    )
    assert config.postgres is not None
    loaded = config.projections[0]
    migrate(dsn, config.postgres.schema_, view_migrations(loaded, load_handlers(loaded)))
    return config


Apply = Callable[[Sequence[RawMessage]], BatchResult]


@contextmanager
def batch_feeder(config: Config, topic: str) -> Iterator[tuple[Store, Apply]]:
    """The store, and a function applying a batch of messages (partition 0 of ``topic``,
    claimed here) through the projection's batch applier, as ``projector run`` does after a
    poll: the batch is decoded and planned while the previous one's commit is in flight, which
    then lands, and its own commit is left in flight. For the tools that feed it from
    memory."""
    projection = config.projections[0]
    store = open_store(config, projection)
    try:
        claims = store.claim(PROJECTION, [(topic, 0)], topic)
        epochs = {tp: claim.epoch for tp, claim in claims.items()}
        applier = build_applier(config, projection, store, time.time)
        assert isinstance(applier, BatchApplier)
        decoders = build_decoders(projection)

        def apply(messages: Sequence[RawMessage]) -> BatchResult:
            decoded = decode_all(messages, decoders)

            def applied() -> BatchResult:
                pipelined = store.commits_in_flight
                return applier.apply(messages, decoders, epochs, None, decoded, pipelined)

            try:
                result = applied()
            except NotPrepared:  # the one in flight failed, say: it lands, then this goes
                store.wait_commit()
                result = applied()
            store.wait_commit()  # planned while the previous one ran: that one lands first
            while not store.send_commit():
                result = applied()
            return result

        yield store, apply
        store.wait_commit()
    finally:
        store.close()
