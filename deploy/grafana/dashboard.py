"""The projector Grafana dashboard, built with Grafana's own builder library
(grafana-foundation-sdk, in the ``dev`` extra).

    .venv/bin/python deploy/grafana/dashboard.py > deploy/grafana/projector.json

Both files are committed; tests/integration/test_deploy.py regenerates the JSON and compares,
and checks that every metric a query names is one a live daemon exports.

Projection-wide figures (parked events, open gaps, oldest gap age, open dead letters) are read
from the store by every instance, so they are combined with ``max``, never ``sum``; per-partition
lag is reported only by the partition's current owner.
"""

from __future__ import annotations

import itertools
import sys

from grafana_foundation_sdk.builders.common import VizLegendOptions
from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    DatasourceVariable,
    QueryVariable,
    Row,
    ThresholdsConfig,
)
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.builders.stat import Panel as Stat
from grafana_foundation_sdk.builders.timeseries import Panel as Timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import LegendDisplayMode, LegendPlacement
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    Threshold,
    ThresholdsMode,
    VariableRefresh,
    VariableSort,
)

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
SEL = '{projection=~"$projection"}'
RATE = "$__rate_interval"

_ids = itertools.count(1)


def query(expr: str, legend: str, ref: str = "A") -> Dataquery:
    return Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DATASOURCE)


def timeseries(
    title: str, description: str, unit: str, queries: list[Dataquery], width: int = 12
) -> Timeseries:
    panel = (
        Timeseries()
        .id(next(_ids))
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .min(0)
        .height(8)
        .span(width)
        .fill_opacity(10)
        .legend(
            VizLegendOptions()
            .show_legend(True)
            .display_mode(LegendDisplayMode.TABLE)
            .placement(LegendPlacement.BOTTOM)
            .calcs(["lastNotNull", "max"])
        )
    )
    for q in queries:
        panel = panel.with_target(q)
    return panel


def stat(
    title: str, description: str, expr: str, unit: str, red_at: float, fine: str = "green"
) -> Stat:
    """A single figure: ``fine`` below ``red_at``, red from it (the other way round when
    ``fine`` is "red": then red below and green from ``red_at``)."""
    above = "green" if fine == "red" else "red"
    return (
        Stat()
        .id(next(_ids))
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .height(4)
        .span(4)
        .thresholds(
            ThresholdsConfig()
            .mode(ThresholdsMode.ABSOLUTE)
            .steps([Threshold(value=None, color=fine), Threshold(value=red_at, color=above)])
        )
        .with_target(query(expr, ""))
    )


def overview(dashboard: Dashboard) -> Dashboard:
    return (
        dashboard.with_row(Row("Overview").id(next(_ids)))
        .with_panel(
            stat(
                "Open dead letters",
                "Dead letters not yet retried or skipped; each blocks its stream.",
                f"sum(max by (projection) (projector_dead_letters_open{SEL}))",
                "none",
                1,
            )
        )
        .with_panel(
            stat(
                "Open gaps",
                "Missing ranges still open, held ones included.",
                f"sum(max by (projection) (projector_open_gaps{SEL}))",
                "none",
                1,
            )
        )
        .with_panel(
            stat(
                "Parked events",
                "Events waiting in the holding table for a gap to fill.",
                f"sum(max by (projection) (projector_parked_events{SEL}))",
                "none",
                10000,
            )
        )
        .with_panel(
            stat(
                "Oldest gap",
                "Age of the oldest open gap across the selected projections.",
                f"max(projector_oldest_gap_age_seconds{SEL})",
                "s",
                300,
            )
        )
        .with_panel(
            stat(
                "Max lag",
                "Largest consumer lag in message time of any partition.",
                f"max(projector_consumer_lag_seconds{SEL})",
                "s",
                60,
            )
        )
        .with_panel(
            stat(
                "Instances",
                "Running projector processes (one build_info series each).",
                "count(projector_build_info)",
                "none",
                1,
                fine="red",
            )
        )
    )


def progress(dashboard: Dashboard) -> Dashboard:
    return (
        dashboard.with_row(Row("Progress").id(next(_ids)))
        .with_panel(
            timeseries(
                "Consumer lag (messages) per partition",
                "Stable end offset minus the applied position; 0 when caught up.",
                "short",
                [
                    query(
                        "sum by (projection, topic, partition)"
                        f" (projector_consumer_lag_messages{SEL})",
                        "{{projection}} {{topic}}[{{partition}}]",
                    )
                ],
            )
        )
        .with_panel(
            timeseries(
                "Consumer lag (seconds) per partition",
                "Age of the newest applied message's timestamp while behind; 0 when caught up.",
                "s",
                [
                    query(
                        "max by (projection, topic, partition)"
                        f" (projector_consumer_lag_seconds{SEL})",
                        "{{projection}} {{topic}}[{{partition}}]",
                    )
                ],
            )
        )
        .with_panel(
            timeseries(
                "Throughput by outcome",
                "Events per second: consumed, applied, duplicate, parked, ignored.",
                "ops",
                [
                    query(
                        f"sum by (projection, outcome) (rate(projector_events_total{SEL}[{RATE}]))",
                        "{{projection}} {{outcome}}",
                    )
                ],
            )
        )
        .with_panel(
            timeseries(
                "Back-pressure",
                "1 while max_parked holds the projection's source partitions paused.",
                "short",
                [
                    query(
                        f"max by (projection) (projector_backpressure{SEL})",
                        "{{projection}}",
                    )
                ],
            )
        )
    )


def gaps(dashboard: Dashboard) -> Dashboard:
    return (
        dashboard.with_row(Row("Gaps and replay").id(next(_ids)))
        .with_panel(
            timeseries(
                "Parked events",
                "Events in the holding table, waiting for the gap before them to fill.",
                "short",
                [query(f"max by (projection) (projector_parked_events{SEL})", "{{projection}}")],
                width=8,
            )
        )
        .with_panel(
            timeseries(
                "Open gaps",
                "Missing ranges still open (held ones included).",
                "short",
                [query(f"max by (projection) (projector_open_gaps{SEL})", "{{projection}}")],
                width=8,
            )
        )
        .with_panel(
            timeseries(
                "Oldest gap age vs gap_timeout",
                "A gap older than gap_timeout has had a replay requested; requests repeat at"
                " growing intervals until it fills or is given up on.",
                "s",
                [
                    query(
                        f"max by (projection) (projector_oldest_gap_age_seconds{SEL})",
                        "{{projection}} oldest gap",
                    ),
                    query(
                        f"max by (projection) (projector_gap_timeout_seconds{SEL})",
                        "{{projection}} gap_timeout",
                        "B",
                    ),
                ],
                width=8,
            )
        )
        .with_panel(
            timeseries(
                "Gaps detected / filled / skipped",
                "Gap ranges per second by what happened to them.",
                "ops",
                [
                    query(
                        f"sum by (projection, event) (rate(projector_gaps_total{SEL}[{RATE}]))",
                        "{{projection}} {{event}}",
                    )
                ],
            )
        )
        .with_panel(
            timeseries(
                "Replay requests by outcome",
                "Replay requests per second: sent, failed, no_channel, skipped.",
                "ops",
                [
                    query(
                        "sum by (projection, outcome)"
                        f" (rate(projector_replay_requests_total{SEL}[{RATE}]))",
                        "{{projection}} {{outcome}}",
                    )
                ],
            )
        )
    )


def dead_letters(dashboard: Dashboard) -> Dashboard:
    return (
        dashboard.with_row(Row("Dead letters").id(next(_ids)))
        .with_panel(
            timeseries(
                "Open dead letters",
                "Not yet retried or skipped; each blocks its stream (projector dead-letters list).",
                "short",
                [
                    query(
                        f"max by (projection) (projector_dead_letters_open{SEL})", "{{projection}}"
                    )
                ],
            )
        )
        .with_panel(
            timeseries(
                "Dead letters recorded",
                "New dead letters per second by kind.",
                "ops",
                [
                    query(
                        f"sum by (projection, kind) (rate(projector_dead_letters_total{SEL}[{RATE}]))",
                        "{{projection}} {{kind}}",
                    )
                ],
            )
        )
    )


def correlation(dashboard: Dashboard) -> Dashboard:
    """Projections with a ``correlation`` (docs/correlation.md); empty for the others."""
    return (
        dashboard.with_row(Row("Correlation and outbox").id(next(_ids)))
        .with_panel(
            timeseries(
                "Business events",
                "Correlation windows closed per second, complete (every part in) or expired"
                " (the window's time passed with parts missing), and business events applied.",
                "ops",
                [
                    query(
                        "sum by (projection, reason)"
                        f" (rate(projector_correlations_closed_total{SEL}[{RATE}]))",
                        "{{projection}} closed {{reason}}",
                    ),
                    query(
                        f"sum by (projection) (rate(projector_business_events_total{SEL}[{RATE}]))",
                        "{{projection}} applied",
                        "B",
                    ),
                ],
                width=8,
            )
        )
        .with_panel(
            timeseries(
                "Open correlations",
                "Correlation keys with parts waiting for their window to close.",
                "short",
                [
                    query(
                        f"max by (projection) (projector_correlations_open{SEL})", "{{projection}}"
                    )
                ],
                width=8,
            )
        )
        .with_panel(
            timeseries(
                "Outbox",
                "Business events queued and not yet published, and the age of the oldest"
                " (ProjectorOutboxStuck fires past 5 minutes).",
                "short",
                [
                    query(
                        f"max by (projection) (projector_outbox_pending{SEL})",
                        "{{projection}} pending",
                    ),
                    query(
                        f"max by (projection) (projector_outbox_oldest_pending_seconds{SEL})",
                        "{{projection}} oldest (s)",
                        "B",
                    ),
                ],
                width=8,
            )
        )
    )


def batches(dashboard: Dashboard) -> Dashboard:
    def quantiles(metric: str) -> list[Dataquery]:
        return [
            query(
                f"histogram_quantile({q}, sum by (projection, le)"
                f" (rate({metric}_bucket{SEL}[{RATE}])))",
                f"{{{{projection}}}} p{int(q * 100)}",
                ref,
            )
            for q, ref in ((0.5, "A"), (0.99, "B"))
        ]

    return (
        dashboard.with_row(Row("Batches").id(next(_ids)))
        .with_panel(
            timeseries(
                "Apply latency",
                "Time to apply one batch, its store transaction included.",
                "s",
                quantiles("projector_batch_apply_seconds"),
            )
        )
        .with_panel(
            timeseries(
                "Batch size",
                "Messages per applied batch (bounded by batch_max_messages).",
                "short",
                [
                    *quantiles("projector_batch_size_messages"),
                    query(
                        f"sum by (projection) (rate(projector_batch_size_messages_sum{SEL}[{RATE}]))"
                        " / sum by (projection)"
                        f" (rate(projector_batch_size_messages_count{SEL}[{RATE}]))",
                        "{{projection}} mean",
                        "C",
                    ),
                ],
            )
        )
        .with_panel(
            timeseries(
                "Poll loop age",
                "Seconds since each projection's poll loop last went round; /healthz turns"
                " 503 past metrics.stall_after.",
                "s",
                [
                    query(
                        f"time() - max by (projection) (projector_loop_last_run_timestamp_seconds{SEL})",
                        "{{projection}}",
                    )
                ],
            )
        )
    )


def build() -> Dashboard:
    dashboard = (
        Dashboard("projector")
        .uid("projector")
        .description(
            "projector: read models from Kafka event streams. Lag, throughput, gaps and"
            " replay, dead letters, correlation and outbox, batches. Generated by deploy/grafana/dashboard.py."
        )
        .tags(["projector", "kafka", "postgresql"])
        .editable()
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .refresh("30s")
        .time("now-3h", "now")
        .timezone("browser")
        .with_variable(DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(
            QueryVariable("projection")
            .label("Projection")
            .datasource(DATASOURCE)
            .query("label_values(projector_gap_timeout_seconds, projection)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
        )
    )
    for section in (overview, progress, gaps, dead_letters, correlation, batches):
        dashboard = section(dashboard)
    return dashboard


def main() -> None:
    sys.stdout.write(JSONEncoder(sort_keys=True, indent=2).encode(build().build()) + "\n")


if __name__ == "__main__":
    main()
