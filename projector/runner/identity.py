"""The instance id used for Kafka static group membership.

It must be stable across restarts (so a restarted instance gets its partitions back at once)
and distinct between instances running at the same time (two members with one id fence each
other). Configured ids win (in Kubernetes: the StatefulSet pod name). Otherwise the id is the
host name plus the lowest free slot number, held by an exclusive lock on a file for as long as
the process lives: a process killed with -9 releases its lock, and its restart takes the same
slot back.
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO


def _lock_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    path = Path(base) / f"projector-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


@dataclass
class InstanceId:
    """The id, and the slot lock held while the daemon runs (released at its end, so a daemon
    started again in the same process takes the same slot)."""

    value: str
    _lock: IO[bytes] | None = None

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def instance_id(configured: str | None, scope: str = "default", max_slots: int = 64) -> InstanceId:
    """``configured`` if set; else ``<hostname>-<slot>`` for the first slot not held by a live
    daemon on this host (``scope`` separates unrelated deployments, e.g. by group prefix)."""
    if configured:
        return InstanceId(configured)
    host = socket.gethostname()
    for slot in range(max_slots):
        handle = (_lock_dir() / f"{scope}.{slot}.lock").open("ab")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        return InstanceId(f"{host}-{slot}", handle)
    raise RuntimeError(
        f"more than {max_slots} projector instances on this host: set kafka.instance_id"
    )
