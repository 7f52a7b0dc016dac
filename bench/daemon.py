"""The daemon under test, as its own process: what ``projector run -c CONFIG
[--exit-when-caught-up]`` runs (the same :class:`~projector.runner.daemon.Daemon`), with each
batch's apply time recorded exactly rather than in the Prometheus histogram's coarse buckets.

    python -m bench.daemon CONFIG RESULT.json [--until-stopped]

On exit it writes RESULT.json: per batch ``[end (epoch s), apply seconds, messages, applied]``,
the exit code, the process's peak RSS and CPU time, and per generation of Python's cyclic
garbage collector its collections and their seconds. ``--until-stopped`` runs until SIGTERM instead of
exiting when caught up.
"""

from __future__ import annotations

import gc
import json
import resource
import sys
import time
from pathlib import Path

from projector.config import load_config
from projector.logs import setup_logging
from projector.metrics import Metrics
from projector.runner.batch import BatchResult
from projector.runner.daemon import Daemon


class TimedMetrics(Metrics):
    """projector's metrics, plus each batch's end time, apply time and size."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[tuple[float, float, int, int]] = []

    def record_batch(self, projection: str, result: BatchResult, seconds: float) -> None:
        super().record_batch(projection, result, seconds)
        self.batches.append((time.time(), seconds, result.consumed, result.applied))


class CollectorTime:
    """Collections and their seconds per generation of the cyclic garbage collector (the
    time a batch loses to it does not show as any function of the daemon)."""

    def __init__(self) -> None:
        self.by_generation: dict[int, list[float]] = {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}
        self._started = 0.0
        gc.callbacks.append(self._observe)

    def _observe(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        figures = self.by_generation[info["generation"]]
        figures[0] += 1
        figures[1] += time.perf_counter() - self._started


def main(argv: list[str]) -> int:
    config_path, out = Path(argv[0]), Path(argv[1])
    collector = CollectorTime()
    config = load_config(config_path)
    setup_logging(config.log.level, config.log.format)
    metrics = TimedMetrics()
    started = time.time()
    daemon = Daemon(config, exit_when_caught_up="--until-stopped" not in argv, metrics=metrics)
    code = daemon.run()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result = {
        "started": started,
        "ended": time.time(),
        "code": code,
        "peak_rss_bytes": peak_rss(),
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "batches": metrics.batches,
        "gc": collector.by_generation,
    }
    out.write_text(json.dumps(result))
    return code


def peak_rss() -> int:
    """This process's peak resident set (VmHWM). Not ``ru_maxrss``: Linux carries that over
    ``exec`` from the parent's memory at ``fork``, so it would count the harness's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
