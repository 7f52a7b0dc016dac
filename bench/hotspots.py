"""Where a profiled run's projection thread spent its time: ``--profile`` writes py-spy's
collapsed stacks (``<run>.pyspy.txt``); this folds them per function.

    python -m bench.hotspots .dev/bench/pg-reordered.pyspy.txt [--top 40]

Prints, for the worker thread's samples, each function's cumulative share (itself and what it
calls) and its own share (the top of the stack). py-spy counts a thread only while it runs
Python or native code, not while it sleeps in a system call such as a socket read, so the
shares are of the daemon's CPU time, not of the wall time.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"(?P<fn>\S+) \((?P<file>[^:]+):\d+\)")
_WORKER = "projector/runner/worker.py"


def fold(path: Path) -> tuple[int, Counter[str], Counter[str]]:
    """(worker samples, cumulative samples per function, own samples per function)."""
    total, cumulative, own = 0, Counter[str](), Counter[str]()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [_name(f) for f in stack.split(";")]
        if not any(_WORKER in f for f in frames):
            continue
        n = int(count)
        total += n
        own[frames[-1]] += n
        for name in set(frames):
            cumulative[name] += n
    return total, cumulative, own


def _name(frame: str) -> str:
    m = _FRAME.match(frame)
    if m is None:
        return frame
    return f"{m['file'].split('site-packages/')[-1]}:{m['fn']}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.hotspots", description=__doc__)
    p.add_argument("profile", type=Path)
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args(argv)
    total, cumulative, own = fold(args.profile)
    print(f"{args.profile}: {total} samples of the projection thread (200 Hz)")
    for title, counts in (("cumulative", cumulative), ("own", own)):
        print(f"-- {title}")
        for name, n in counts.most_common(args.top):
            print(f"{100 * n / max(total, 1):5.1f}%  {name}")


if __name__ == "__main__":
    main()
