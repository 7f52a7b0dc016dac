"""The benchmark harness at a tiny scale, so it does not rot between the runs that matter:
every measurement runs, every view comes out right, and the chart and results are written.

Here rather than in tests/ because it needs the ``bench`` extra (``pip install -e '.[bench]'``),
which ``make test`` does not install: ``pytest bench -m bench``. ``make bench`` runs the real
thing. Services as for the test suite (``PROJECTOR_TEST_*``, else ``dev/services.sh``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.harness import main
from bench.responder import main as responder_main

pytestmark = [pytest.mark.integration, pytest.mark.bench]


def test_every_measurement_runs_and_every_view_is_right(tmp_path: Path) -> None:
    """Proves the harness end to end on 3,000 events over 300 streams: projector on both
    stores (reordered, in order, 2 consumers, two processes; on PostgreSQL also replays after
    a longer gap_timeout), the three baselines, the bare pipeline in one process and in two,
    the peer (Quix Streams, whose view is right in order) and both latency runs finish, each
    view of projector equals the workload's answer, and the figures land in results.json."""
    args = ["--events", "3000", "--streams", "300", "--out", str(tmp_path), "--gap-timeout", "1"]
    args += ["--parked-gap-timeout", "2"]
    args += ["--baseline-events", "3000", "--naive-events", "300", "--latency-seconds", "2"]
    assert main(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    names = {r["name"] for r in results["runs"]}
    assert names == {
        "pg reordered",
        "pg in-order",
        "pg reordered, 2 consumers",
        "pg two processes",
        "pg reordered, replays after 2 s",
        "redis reordered",
        "redis in-order",
        "redis reordered, 2 consumers",
        "redis two processes",
    }
    assert all(r["events_per_s"] > 0 and not r["problems"] for r in results["runs"])
    for store in ("postgres", "redis"):
        found = {b["name"]: b for b in results["baselines"][store]}
        assert found.keys() >= {
            "(a) consume-only",
            "(b) store-only",
            "(c) naive",
            "(e) bare pipeline",
            "(e) bare pipeline, two processes",
        }
        # The bare pipeline read the whole in-order topic, in one process and in two (its
        # view is checked inside: a wrong row raises).
        assert found["(e) bare pipeline"]["events"] == 3000
        assert found["(e) bare pipeline, two processes"]["events"] == 3000
    bar = {row["ratio"] for row in results["bar"]}
    assert {"postgres: projector / e", "redis: e, two processes / one"} <= bar
    peer = {b["detail"]: b for b in results["baselines"]["postgres"] if "Quix" in b["name"]}
    assert peer["3.28.1, in order"]["view"] == "ok" and peer["3.28.1, in order"]["events_per_s"] > 0
    assert "3.28.1, reordered" in peer
    assert [lat["store"] for lat in results["latency"]] == ["postgres", "redis"]
    assert (tmp_path / "bench.png").stat().st_size > 10_000


def test_the_responder_benchmark_serves_every_request_both_ways(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Proves ``python -m bench.responder`` runs at a tiny scale: 30 waiting requests served
    one at a time and together (each loop ends only once every request was served), and a
    line of figures per round."""
    assert responder_main(["--requests", "30", "--rounds", "1"]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("round 1:")]
    assert "29 requests one at a time" in line and "the broker's CPU" in line
