"""(d) the peer: what users would get with Quix Streams instead (the issue's optional column).

The accounts view built from the same topic into the same ``accounts`` table by a Quix
Streams application (``bench/quix_app.py``: a stateful fold per account, rows upserted by
Quix's PostgreSQL sink), as its own process. Quix Streams pins a confluent-kafka older than
projector's, so it gets an environment of its own, made on first use in ``.dev/quix-venv``.

Timed from its first event to the moment its committed offsets reach the topic's end: Quix
commits them at a checkpoint, after the sink has written the rows, so that is when a reader
sees the whole view. The view is then compared, row by row, with the workload's answer: on
the reordered topic it cannot come out right, since nothing puts a stream's events in order,
drops a duplicate, or asks for a withheld one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient
from psycopg.conninfo import conninfo_to_dict

from bench.baselines import Baseline, pg_rows_wrong
from bench.services import ROOT, Resources, end_offsets, unique
from bench.workload import Workload
from handlers.accounts import MIGRATIONS

QUIX_VERSION = "3.28.1"
QUIX_ENV = ROOT / ".dev/quix-venv"
NAME = "(d) peer: Quix Streams"


def quix_python() -> Path:
    """The Python of Quix Streams' own environment, made (once) if need be."""
    python = QUIX_ENV / "bin/python"
    made = QUIX_ENV / f".quixstreams-{QUIX_VERSION}"
    if not made.exists():
        subprocess.run([sys.executable, "-m", "venv", str(QUIX_ENV)], check=True)
        package = f"quixstreams[postgresql]=={QUIX_VERSION}"
        subprocess.run([str(python), "-m", "pip", "install", "-q", package], check=True)
        made.touch()
    return python


def quix_peer(
    res: Resources, topic: str, w: Workload, label: str, out: Path, timeout: float = 600.0
) -> Baseline:
    """Quix Streams through the whole of ``topic`` into a fresh database: events/s, and
    whether its view is the workload's answer (``label`` names the delivery)."""
    try:
        python = quix_python()
    except (OSError, subprocess.CalledProcessError) as exc:
        return Baseline(
            NAME, 0, 0.0, f"{QUIX_VERSION}, {label}", f"not run: no Quix Streams ({exc})"
        )
    dsn = res.database()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(MIGRATIONS[0])
    group = res.group(unique("bench-quix"))
    res.on_close(lambda: _delete_quix_topics(res.svc.kafka, group))
    ends = end_offsets(res.svc.kafka, topic)
    pg = {k: str(v) for k, v in conninfo_to_dict(dsn).items()}
    log_path = out / f"peer-quix-{label.replace(' ', '-')}.log"
    with tempfile.TemporaryDirectory() as state_dir, log_path.open("w") as log:
        started_file = Path(state_dir) / "started"
        settings = {
            "kafka": res.svc.kafka,
            "topic": topic,
            "group": group,
            "pg": pg,
            "state_dir": str(Path(state_dir) / "state"),
            "started_file": str(started_file),
        }
        app = ROOT / "bench/quix_app.py"
        proc = subprocess.Popen(
            [str(python), str(app), json.dumps(settings)], stdout=log, stderr=subprocess.STDOUT
        )
        try:
            done_at = _committed_to_end(res.svc.kafka, group, topic, ends, proc, timeout)
        except (RuntimeError, TimeoutError) as exc:  # the peer's failure is not projector's
            return Baseline(NAME, 0, 0.0, f"{QUIX_VERSION}, {label}", f"failed: {exc}")
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        seconds = done_at - float(started_file.read_text())
    expected = w.expected()
    with psycopg.connect(dsn) as conn:
        wrong = pg_rows_wrong(conn, expected)
    view = "ok" if not wrong else f"{wrong:,}/{len(expected):,} wrong"
    return Baseline(NAME, sum(ends.values()), seconds, f"{QUIX_VERSION}, {label}", view)


def _committed_to_end(
    kafka: str,
    group: str,
    topic: str,
    ends: dict[int, int],
    proc: subprocess.Popen[bytes],
    timeout: float,
) -> float:
    """When the group's committed offsets first reached every partition's end (polled every
    0.1 s, so up to that much late)."""
    watcher = Consumer({"bootstrap.servers": kafka, "group.id": group})
    tps = [TopicPartition(topic, p) for p in sorted(ends)]
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the Quix Streams app exited ({proc.returncode}); see its log")
            committed = watcher.committed(tps, timeout=10)
            if all(tp.offset >= ends[tp.partition] for tp in committed):
                return time.time()
            time.sleep(0.1)  # a poll interval, not a synchronisation: the time is read above
        raise TimeoutError(f"the Quix Streams app did not reach the topic's end in {timeout} s")
    finally:
        watcher.close()


def _delete_quix_topics(kafka: str, group: str) -> None:
    """The topics Quix Streams made for the app (its state's changelog), named after it."""
    admin = AdminClient({"bootstrap.servers": kafka})
    names = [t for t in admin.list_topics(timeout=10).topics if group in t]
    for fut in (admin.delete_topics(names, operation_timeout=30) if names else {}).values():
        fut.result(timeout=30)
