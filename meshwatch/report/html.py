"""``report.json``, ``report.html`` and its PNG plots, written into the demo's directory.

The report is one JSON-ready dict (built by :mod:`meshwatch.demo`); the HTML shows it as
tables next to four plots: readings per second at each stage, the latency histograms, a
timeline of incidents and alerts for a few devices (:func:`models.evaluate.plot_timeline`)
and the work orders' outcomes. matplotlib is imported here, when a report is written.

>>> import tempfile
>>> out = Path(tempfile.mkdtemp())
>>> page = write_report(out, {"title": "t", "sections": [("Ledger", [("lost", "0")])],
...     "kinds": []}, Plots(throughput={"mesh": ([0.0, 1.0], [5.0, 7.0])},
...     latencies={"site → lake": [0.5, 1.5]}, outcomes={"false_alarm": 1}))
>>> sorted(p.name for p in out.iterdir())
['latency.png', 'report.html', 'report.json', 'throughput.png', 'work_orders.png']
>>> "<td>lost</td><td>0</td>" in page.read_text()
True
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Plots:
    """What the plots draw: readings/s per stage, latencies (s) by name, outcome counts."""

    throughput: dict[str, tuple[list[float], list[float]]]
    latencies: dict[str, list[float]]
    outcomes: dict[str, int]
    detection_run: Any = None
    """A :class:`models.evaluate.Run` with traces, for the timeline (None: no timeline)."""
    links: list[tuple[str, str]] = field(default_factory=list)
    """``(label, relative path)`` to link, such as the exported dashboards."""


def write_report(out: Path, report: dict[str, Any], plots: Plots) -> Path:
    """Write ``report.json``, the PNGs and ``report.html`` into ``out``; the HTML's path.

    ``report`` holds a ``title``, ``sections`` (a name and ``(label, value)`` rows each),
    ``kinds`` (rows of the detection table, see :func:`detection_rows`) and anything else
    worth keeping in the JSON.
    """
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    images = [_throughput(out / "throughput.png", plots.throughput),
              _latency(out / "latency.png", plots.latencies),
              _outcomes(out / "work_orders.png", plots.outcomes)]
    if plots.detection_run is not None and plots.detection_run.traces:
        from models.evaluate import plot_timeline

        plot_timeline(plots.detection_run, out / "timeline.png")
        images.insert(2, "timeline.png")
    page = out / "report.html"
    page.write_text(_html(report, images, plots.links), encoding="utf-8")
    return page


DETECTION_COLUMNS = ("kind", "episodes", "detectable", "detected", "recall", "alerts",
                     "precision", "TTD p50 h", "TTD p90 h")


def detection_rows(kinds: dict[str, dict[str, Any]], names: tuple[str, ...]) -> list[list[str]]:
    """Rows of the detection table from :func:`models.evaluate.score_run`'s ``kinds``.

    >>> detection_rows({"burst": {"episodes": 3, "detectable": 3, "detected": 2,
    ...     "recall": 0.6667, "alerts": 2, "precision": 1.0, "median_ttd_h": 0.01,
    ...     "p90_ttd_h": 0.02}}, ("burst",))
    [['burst', '3', '3', '2', '0.67', '2', '1.00', '0.01', '0.02']]
    """
    def number(value: Any) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    return [[name, str(k["episodes"]), str(k["detectable"]), str(k["detected"]),
             number(k["recall"]), str(k.get("alerts", "")), number(k.get("precision")),
             number(k["median_ttd_h"]), number(k["p90_ttd_h"])]
            for name in names if (k := kinds[name])]


def _throughput(path: Path, series: dict[str, tuple[list[float], list[float]]]) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.5))
    for stage, (times, rates) in series.items():
        ax.step(times, rates, where="post", label=stage, lw=1.0)
    ax.set_xlabel("seconds since the first reading reached the site broker (wall clock)")
    ax.set_ylabel("readings / s")
    ax.set_title("Throughput per stage")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def _latency(path: Path, latencies: dict[str, list[float]]) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(len(latencies), 1), figsize=(5 * max(len(latencies), 1),
                                                                 3.2), squeeze=False)
    for ax, (name, values) in zip(axes[0], latencies.items(), strict=False):
        if values:
            ax.hist(values, bins=50, color="tab:blue")
        ax.set_title(f"{name} ({len(values):,})", fontsize=9)
        ax.set_xlabel("seconds")
    axes[0, 0].set_ylabel("count")
    fig.suptitle("Latency (wall clock)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def _outcomes(path: Path, outcomes: dict[str, int]) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3))
    names = sorted(outcomes)
    ax.barh(names, [outcomes[n] for n in names], color="tab:green")
    ax.set_xlabel("work orders")
    ax.set_title("Work orders by outcome")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def _table(header: tuple[str, ...] | None, rows: list[list[str]] | list[tuple[str, str]]) -> str:
    head = "" if header is None else "<tr>" + "".join(
        f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table>{head}{body}</table>"


def _html(report: dict[str, Any], images: list[str], links: list[tuple[str, str]]) -> str:
    title = html.escape(str(report["title"]))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
             "table{border-collapse:collapse;margin:.5em 0 1.5em}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
             "img{max-width:100%}</style></head><body>", f"<h1>{title}</h1>"]
    for name, rows in report["sections"]:
        parts += [f"<h2>{html.escape(name)}</h2>", _table(None, rows)]
    if report["kinds"]:
        parts += ["<h2>Incidents detected against ground truth</h2>",
                  f"<p>{html.escape(str(report.get('detection_note', '')))}</p>",
                  _table(DETECTION_COLUMNS, report["kinds"])]
    if links:
        parts.append("<h2>Grafana dashboards</h2><ul>" + "".join(
            f"<li><a href='{html.escape(href)}'>{html.escape(label)}</a></li>"
            for label, href in links) + "</ul>")
    parts += ["<h2>Plots</h2>"] + [f"<p><img src='{html.escape(i)}' alt='{html.escape(i)}'>"
                                   "</p>" for i in images]
    parts.append("</body></html>\n")
    return "\n".join(parts)
