"""The demo's measured figures: computed once, printed in the terminal, written as a report.

:func:`summarise` takes what the demo counted and stamped while it ran, measures latency
and throughput (:mod:`meshwatch.report.timing`), scores detection
(:mod:`meshwatch.report.detection`), exports the Grafana dashboards next to the report (the
logic of ``meshwatch dashboards export``), prints the new lines of the terminal report and
writes ``report.html`` (:mod:`meshwatch.report.html`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from meshwatch.report.detection import (
    SCORED_KINDS,
    WARMUP_DAYS,
    Floor,
    failed_floors,
    floor_verdict,
)
from meshwatch.report.timing import Arrivals, lake_timing, percentiles, throughput

LATENCY_NOTE = (
    "Between wall-clock stamps the demo took (see meshwatch.report.timing): arrival at the"
    " site broker (the bridge's input) or in the mesh, the commit of the lake file holding the"
    " reading, an alert's arrival in the mesh. The simulator publishes as fast as it can, not"
    " in real time, so these include the queue that builds when the dataflow is slower than"
    " the simulator: they are latencies under full load.")


@dataclass(frozen=True)
class Counted:
    """What the demo counted itself: rows of label and value per section, and outcomes."""

    title: str
    elapsed_s: float
    readings_accepted: int
    sections: list[tuple[str, list[tuple[str, str]]]]
    outcomes: dict[str, int]
    influx_url: str | None


@dataclass(frozen=True)
class Summary:
    """The figures :func:`summarise` measured, and the floors missed (empty: all kept)."""

    report: dict[str, Any]
    failed: list[str]
    page: Path


def summarise(console: Console, out: Path, counted: Counted, site: Arrivals, mesh: Arrivals,
              alert_log: Sequence[tuple[float, Any]], truth: Any, simulator: Any,
              floors: Sequence[Floor]) -> Summary:
    """Measure, score, print and write the report (see the module docs)."""
    from meshwatch.report.detection import score_detection
    from meshwatch.report.html import Plots, detection_rows, write_report

    lake = lake_timing(out / "lake", site, mesh)
    alert_latency = _alert_latencies(alert_log, mesh)
    detection, run = score_detection([alert for _, alert in alert_log], truth, simulator)
    failed = failed_floors(detection, floors)
    stored = sum(n for _, n in lake.commits)
    first_s = min((at for at, _ in site.counts()), default=0.0)
    last_s = max((at for at, _ in lake.commits), default=first_s)
    span_s = max(last_s - first_s, 1e-9)
    latency = {"site_broker_to_lake": percentiles(lake.site_to_lake_s),
               "mesh_to_lake": percentiles(lake.mesh_to_lake_s),
               "evidence_in_mesh_to_alert_in_mesh": percentiles(alert_latency)}
    series = {
        "site broker (edge agents' batches)": throughput(site.counts(), 2.0, first_s),
        "mesh (after the bridge)": throughput(mesh.counts(), 2.0, first_s),
        "lake (stored by the dataflow)": throughput(lake.commits, 2.0, first_s)}
    links = _export_dashboards(out / "dashboards", counted.influx_url)

    _print_latency(console, latency, stored, span_s, lake.unmatched)
    _print_detection(console, detection, floors, failed)
    rows = detection_rows(detection["kinds"], SCORED_KINDS)
    floor_rows = [(f"{f.kind} {f.metric} ≥ {f.value:g}",
                   floor_verdict(detection, f) or f"kept: {detection['kinds'][f.kind][f.metric]}")
                  for f in floors]
    report = {
        "title": counted.title,
        "sections": [
            ("Run", [("wall time", f"{counted.elapsed_s:.1f} s"),
                     ("readings accepted by the edge agents", f"{counted.readings_accepted:,}"),
                     ("readings stored in the lake", f"{stored:,}"),
                     ("throughput, site broker to lake (mean)",
                      f"{stored / span_s:,.0f} readings/s over {span_s:.1f} s")]),
            ("Latency (wall clock, seconds)", [
                *((name.replace("_", " "), _latency_text(value)) for name, value in
                  latency.items()),
                ("what this measures", LATENCY_NOTE)]),
            *counted.sections,
            *([("Detection floors (--quick)", floor_rows)] if floors else []),
        ],
        "kinds": rows,
        "detection_note": _detection_note(detection),
        "latency": latency,
        "detection": detection,
        "floors_failed": failed,
        "dashboards": [href for _, href in links],
    }
    plots = Plots(throughput=series,
                  latencies={"site broker → lake": lake.site_to_lake_s,
                             "mesh → lake": lake.mesh_to_lake_s,
                             "evidence in mesh → alert": alert_latency},
                  outcomes=counted.outcomes, detection_run=run, links=links)
    page = write_report(out, report, plots)
    console.print(f"dashboards: {len(links)} Grafana dashboards exported to {out / 'dashboards'}"
                  " (provisioning files beside them)", highlight=False, soft_wrap=True)
    console.print(f"report: [bold]{page}[/bold]", soft_wrap=True, highlight=False)
    return Summary(report, failed, page)


def _alert_latencies(alert_log: Sequence[tuple[float, Any]], mesh: Arrivals) -> list[float]:
    """Seconds from the evidence completing each dataflow alert to the alert in the mesh."""
    found = []
    for at, alert in alert_log:
        if "category" not in alert.evidence or alert.status != "open":
            continue  # an edge alert, or an update of one already counted
        evidence = mesh.frontier_s(alert.last_ts_ms)
        if evidence is not None:
            found.append(at - evidence)
    return found


def _export_dashboards(directory: Path, influx_url: str | None) -> list[tuple[str, str]]:
    """``meshwatch dashboards export`` into ``directory``; (title, relative path) per board."""
    from dashboards.boards import all_dashboards
    from dashboards.provisioning import DatasourceSettings, export

    boards = all_dashboards()
    export(directory, boards, DatasourceSettings(url=influx_url) if influx_url
           else DatasourceSettings())
    return [(str(board["title"]), f"{directory.name}/dashboards/{board['uid']}.json")
            for board in boards]


def _latency_text(value: dict[str, Any]) -> str:
    if not value["n"]:
        return "none measured"
    return (f"p50 {value['p50_s']:.2f}, p99 {value['p99_s']:.2f}, max {value['max_s']:.2f}"
            f" ({value['n']:,})")


def _print_latency(console: Console, latency: dict[str, Any], stored: int, span_s: float,
                   unmatched: int) -> None:
    site, mesh, alert = (latency[k] for k in ("site_broker_to_lake", "mesh_to_lake",
                                              "evidence_in_mesh_to_alert_in_mesh"))
    console.print(
        f"latency (wall clock, s): site broker → lake {_latency_text(site)}; mesh → lake"
        f" {_latency_text(mesh)}; evidence in the mesh → dataflow alert in the mesh"
        f" {_latency_text(alert)}. Throughput: {stored:,} readings stored in {span_s:.1f} s"
        f" from the first arrival at the site broker, {stored / span_s:,.0f} readings/s"
        f"{f'; {unmatched:,} lake rows never seen in the mesh' if unmatched else ''}.",
        highlight=False)


def _detection_note(detection: dict[str, Any]) -> str:
    return (f"The dataflow's alerts as they reached the mesh, matched to the simulator's ground"
            f" truth by models.evaluate (warm-up {WARMUP_DAYS:g} simulated days not scored;"
            " an episode is detectable when its part within the run lasts as long as the"
            " evidence its kind needs, 6.25 h for a silent meter, even if it goes on after;"
            f" TTD in event time; {detection['false_alarms']:,} false alarms in all).")


def _print_detection(console: Console, detection: dict[str, Any], floors: Sequence[Floor],
                     failed: list[str]) -> None:
    from meshwatch.report.html import DETECTION_COLUMNS, detection_rows

    table = Table(*DETECTION_COLUMNS, title="incidents detected against ground truth",
                  caption=_detection_note(detection))
    for row in detection_rows(detection["kinds"], SCORED_KINDS):
        table.add_row(*row)
    console.print(table)
    if floors:
        verdict = "; ".join(failed) if failed else "all kept"
        colour = "red" if failed else "green"
        console.print(f"detection floors: [{colour}]{verdict}[/{colour}]", highlight=False,
                      soft_wrap=True)
