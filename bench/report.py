"""The results as people read them: a table of every run, a table of the bar (each ratio of
issue 11 with its threshold), a chart of events/s and consumer lag over time, and a JSON file
with every figure."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
from rich.console import Console
from rich.table import Table

from bench.bare import NAME as BARE
from bench.bare import TWO as BARE_TWO
from bench.baselines import Baseline
from bench.latency import LatencyResult
from bench.projector_runs import SAMPLE_SECONDS, RunResult

SHORT = {"postgres": "pg", "redis": "redis"}


@dataclass
class Results:
    params: dict[str, Any]
    runs: list[RunResult] = field(default_factory=list)
    baselines: dict[str, list[Baseline]] = field(default_factory=dict)  # store -> measured
    latency: list[LatencyResult] = field(default_factory=list)

    def run(self, name: str) -> RunResult | None:
        return next((r for r in self.runs if r.name == name), None)

    def baseline(self, store: str, name: str) -> Baseline | None:
        found = [b for b in self.baselines.get(store, []) if b.name == name]
        return max(found, key=lambda b: b.rate) if found else None


def runs_table(results: Results) -> Table:
    table = Table(title=f"projector benchmark ({_scale(results.params)})")
    for col in (
        "run",
        "events/s",
        "seconds (topic read)",
        "batch p50 ms",
        "batch p99 ms",
        "msgs/batch",
    ):
        table.add_column(col, justify="left" if col == "run" else "right")
    for col in ("peak RSS MB", "peak parked", "CPU % daemon/pg/kafka/redis/harness/other", "view"):
        table.add_column(col, justify="right")
    for r in results.runs:
        table.add_row(
            r.name,
            f"{r.rate:,.0f}",
            f"{r.seconds:.1f}" + ("" if r.topic_read is None else f" ({r.topic_read:.1f})"),
            f"{r.p50_ms:.1f}",
            f"{r.p99_ms:.1f}",
            f"{r.messages / r.batches:,.0f}" if r.batches else "-",
            f"{r.peak_rss_mb:.0f}",
            f"{r.peak_parked:,}",
            _cpu(r),
            "ok" if not r.problems else "; ".join(r.problems),
        )
    for store, found in results.baselines.items():
        for b in found:
            best = b is results.baseline(store, b.name)
            mark = " *" if best and b.name == "(b) store-only" else ""
            name = f"{SHORT[store]} {b.name}: {b.detail}{mark}"
            table.add_row(name, f"{b.rate:,.0f}", f"{b.seconds:.1f}", *["-"] * 6, b.view)
    for lat in results.latency:
        table.add_row(
            f"{SHORT[lat.store]} produce→view at {lat.offered_rate:,.0f}/s",
            f"{lat.events / lat.seconds if lat.seconds else 0:,.0f}",
            f"{lat.seconds:.1f}",
            f"p50 {lat.p50_ms:.0f}",
            f"p99 {lat.p99_ms:.0f}",
            f"max {lat.max_ms:.0f}",
            "-",
            "-",
            "-",
            "ok" if not lat.problems and not lat.unseen else f"{lat.unseen} unseen {lat.problems}",
        )
    table.caption = "* the faster store-only method, the one the ratios use"
    return table


def _cpu(r: RunResult) -> str:
    """Each one's CPU time over the run's wall time, in % of one core (this machine has 2)."""
    if r.wall <= 0:
        return "-"
    parts = ("daemon", "pg", "kafka", "redis", "harness", "other")
    return "/".join(f"{100 * r.cpu.get(k, 0.0) / r.wall:.0f}" for k in parts)


def bar_table(results: Results) -> Table:
    table = Table(title="the bar (issue 11)")
    for col in ("ratio", "measured", "bar", ""):
        table.add_column(col, justify="left" if col == "ratio" else "right")
    for row in bar_rows(results):
        name, value, bar, ok = row
        table.add_row(name, value, bar, "" if ok is None else ("pass" if ok else "FAIL"))
    return table


def bar_rows(results: Results) -> list[tuple[str, str, str, bool | None]]:
    rows: list[tuple[str, str, str, bool | None]] = []
    for store, short in (("postgres", "pg"), ("redis", "redis")):
        main, ordered = results.run(f"{short} reordered"), results.run(f"{short} in-order")
        a = results.baseline(store, "(a) consume-only")
        b = results.baseline(store, "(b) store-only")
        c = results.baseline(store, "(c) naive")
        if main and a and b:
            limit = min(a.rate, b.rate)
            rows.append(
                (
                    f"{store}: projector / min(a, b)",
                    f"{main.rate / limit:.2f}",
                    ">= 0.5",
                    main.rate >= 0.5 * limit,
                )
            )
        if main and c:
            bar, ok = (">= 50", main.rate >= 50 * c.rate) if store == "postgres" else ("-", None)
            rows.append((f"{store}: projector / c", f"{main.rate / c.rate:.1f}", bar, ok))
        if main and ordered:
            ratio = main.rate / ordered.rate
            rows.append((f"{store}: reordered / in-order", f"{ratio:.2f}", ">= 0.8", ratio >= 0.8))
            if main.topic_read and ordered.topic_read:
                # The same, to the topic's end: without the wait for the last replays, which is
                # gap_timeout whatever the speed, so the apply path's own cost of reordering.
                ratio = ordered.topic_read / main.topic_read * main.messages / ordered.messages
                rows.append((f"{store}: the same, to the topic's end", f"{ratio:.2f}", "-", None))
        consumers = results.run(f"{short} reordered, 2 consumers")
        if main and consumers:
            ratio = consumers.rate / main.rate
            rows.append((f"{store}: 2 consumers / 1, one process", f"{ratio:.2f}", "-", None))
        peer = next(
            (b for b in results.baselines.get(store, []) if b.detail.endswith(", in order")), None
        )
        if ordered and peer and peer.rate > 0:
            ratio = ordered.rate / peer.rate
            rows.append((f"{store}: projector / Quix Streams, in order", f"{ratio:.2f}", "-", None))
        two = results.run(f"{short} two processes")
        if main and two:
            ratio = two.rate / main.rate
            rows.append((f"{store}: two processes / one", f"{ratio:.2f}", ">= 1.4", ratio >= 1.4))
        rows += _bare_rows(results, store, main, ordered, a, b)
    if results.runs:
        rss = max(r.peak_rss_mb for r in results.runs)
        parked = max(r.peak_parked for r in results.runs)
        rows.append((f"peak RSS MB (peak parked {parked:,})", f"{rss:.0f}", "< 300", rss < 300))
    for lat in results.latency:
        ok = lat.p99_ms <= 250 and not lat.unseen
        rows.append((f"{lat.store}: produce→view p99 ms", f"{lat.p99_ms:.0f}", "<= 250", ok))
    return rows


def _bare_rows(
    results: Results,
    store: str,
    main: RunResult | None,
    ordered: RunResult | None,
    a: Baseline | None,
    b: Baseline | None,
) -> list[tuple[str, str, str, bool | None]]:
    """Projector and the bar beside (e), the bare pipeline: what share of a consumer that keeps
    no order the daemon reaches and the bar asks for, and what two processes of it gain."""
    e, e2 = results.baseline(store, BARE), results.baseline(store, BARE_TWO)
    rows: list[tuple[str, str, str, bool | None]] = []
    if not e or e.rate <= 0:
        return rows
    for label, run in (("projector", main), ("in-order", ordered)):
        if run:
            rows.append((f"{store}: {label} / e", f"{run.rate / e.rate:.2f}", "-", None))
    if a and b:
        share = 0.5 * min(a.rate, b.rate) / e.rate
        rows.append((f"{store}: the bar's 0.5 x min(a, b) / e", f"{share:.2f}", "-", None))
    if e2:
        rows.append((f"{store}: e, two processes / one", f"{e2.rate / e.rate:.2f}", "-", None))
    return rows


def _scale(params: dict[str, Any]) -> str:
    return f"{params['events']:,} events, {params['streams']:,} streams"


def chart(results: Results, path: Path) -> None:
    """Events/s (applied, from checkpoint deltas) and lag over time, one line per run."""
    fig, (rate_ax, lag_ax) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    for r in results.runs:
        ts = [t for t, _lag, _p in r.samples]
        lags = [lag for _t, lag, _p in r.samples]
        rates = [
            max(0.0, (lags[k - 1] - lags[k]) / (ts[k] - ts[k - 1])) if k else 0.0
            for k in range(len(ts))
        ]
        (line,) = rate_ax.plot(ts, _smooth(rates), label=f"{r.name} ({r.rate:,.0f}/s)")
        lag_ax.plot(ts, lags, color=line.get_color(), label=r.name)
    rate_ax.set_ylabel(f"events/s (checkpoint moves per {SAMPLE_SECONDS}s, smoothed)")
    lag_ax.set_ylabel("consumer lag (messages)")
    lag_ax.set_xlabel("seconds since the run's first batch")
    rate_ax.set_title(f"projector: {_scale(results.params)}")
    for ax in (rate_ax, lag_ax):
        ax.grid(alpha=0.3)
        ax.set_xlim(left=0)
    rate_ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _smooth(values: list[float], width: int = 3) -> list[float]:
    return [
        sum(values[max(0, k - width + 1) : k + 1]) / len(values[max(0, k - width + 1) : k + 1])
        for k in range(len(values))
    ]


def write_json(results: Results, path: Path) -> None:
    data = {
        "params": results.params,
        "runs": [r.as_json() for r in results.runs],
        "baselines": {
            store: [{**b.__dict__, "events_per_s": b.rate} for b in found]
            for store, found in results.baselines.items()
        },
        "latency": [lat.as_json() for lat in results.latency],
        "bar": [
            {"ratio": n, "measured": v, "bar": bar, "ok": ok} for n, v, bar, ok in bar_rows(results)
        ],
    }
    path.write_text(json.dumps(data, indent=1))


def show(results: Results, console: Console) -> None:
    console.print(runs_table(results))
    console.print(bar_table(results))
