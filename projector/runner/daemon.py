"""``projector run``: one worker thread per projection, clean shutdown on SIGTERM/SIGINT.

SIGTERM lets each worker finish its batch, commit it, close its consumer (a static member does
not leave the group) and return; the process exits 0. A worker that dies of a non-transient
error stops the others and the process exits non-zero, for systemd or Kubernetes to restart.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType

from projector.config import Config
from projector.runner.batch import Clock
from projector.runner.gap_timer import ProjectionFailed
from projector.runner.identity import instance_id
from projector.runner.worker import ProjectionWorker, load_handlers, view_migrations
from projector.store.migrate import check_schema
from projector.store.postgres import PostgresStore

log = logging.getLogger(__name__)


def check_ready_to_run(config: Config) -> None:
    """``projector run`` never changes the schema: it refuses one that is behind."""
    store = PostgresStore(config.postgres.dsn.get_secret_value(), config.postgres.schema_)
    try:
        views = [v for p in config.projections for v in view_migrations(p, load_handlers(p))]
        check_schema(store.conn, config.postgres.schema_, views)
    finally:
        store.close()


def run(
    config: Config,
    projections: list[str] | None = None,
    exit_when_caught_up: bool = False,
    clock: Clock = time.time,
    stop: threading.Event | None = None,
) -> int:
    """Run the selected projections until ``stop`` is set (SIGTERM/SIGINT set it when this is
    the main thread) or, with ``exit_when_caught_up``, until all are caught up."""
    check_ready_to_run(config)
    stop = stop or threading.Event()
    failures: list[BaseException] = []
    instance = instance_id(config.kafka.instance_id, scope=config.kafka.group_prefix)
    selected = [p for p in config.projections if not projections or p.name in projections]
    workers = [
        ProjectionWorker(config, p, instance, stop, clock, exit_when_caught_up) for p in selected
    ]

    def guarded(worker: ProjectionWorker) -> None:
        try:
            worker.run()
        except ProjectionFailed as exc:
            log.error("%s", exc)
            failures.append(exc)
            stop.set()
        except BaseException as exc:
            log.exception("projection %s failed: %s", worker.projection.name, exc)
            failures.append(exc)
            stop.set()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("%s: finishing the current batches, then exiting", signal.Signals(signum).name)
        stop.set()

    in_main = threading.current_thread() is threading.main_thread()
    signals = (signal.SIGTERM, signal.SIGINT) if in_main else ()
    previous = {s: signal.signal(s, on_signal) for s in signals}
    threads = [
        threading.Thread(target=guarded, args=(w,), name=f"projection-{w.projection.name}")
        for w in workers
    ]
    try:
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(timeout=0.5)  # join with a timeout so signals reach the main thread
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 1 if failures else 0
