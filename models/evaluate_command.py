"""``meshwatch evaluate``: score the water detectors against simulated ground truth.

Runs :func:`models.evaluate.simulate_and_detect` on a simulated fleet (communication faults
included), prints per incident kind precision, recall, F1, median and p90 time to detect
and false alarms per 1,000 meters per day, and writes ``report.json`` and ``timeline.png``
into ``--out``. Matching rules and what is scored: :mod:`models.evaluate`. Seeds: the
default is the first of :data:`models.seeds.EVALUATION_SEEDS`; a seed used for tuning or
training is reported as not held out.

Example::

    meshwatch evaluate --meters 2000 --days 28 --seed 2026501 --out evaluation/
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from models.seeds import EVALUATION_SEEDS


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        msg = f"{text} is not a positive integer"
        raise argparse.ArgumentTypeError(msg)
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        msg = f"{text} is not a positive number"
        raise argparse.ArgumentTypeError(msg)
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``meshwatch evaluate``."""
    parser.add_argument("--meters", type=_positive_int, default=2000,
                        help="customer meters to simulate (default 2000)")
    parser.add_argument("--days", type=_positive_float, default=28.0,
                        help="simulated days (default 28)")
    parser.add_argument("--seed", type=int, default=EVALUATION_SEEDS[0],
                        help=f"simulation seed (default {EVALUATION_SEEDS[0]}, held out)")
    parser.add_argument("--districts", type=_positive_int, default=None,
                        help="districts (default: one per 500 meters, at least 2)")
    parser.add_argument("--warmup-days", type=float, default=None,
                        help="days the detectors learn before scoring (default 7, at most "
                             "half the run)")
    parser.add_argument("--out", type=Path, default=Path("evaluation"),
                        help="directory for report.json and timeline.png (default evaluation/)")


def run(args: argparse.Namespace) -> int:
    """Run the evaluation; exit code 0, or 1 for bad settings."""
    from models.evaluate import EvalSettings, plot_timeline, score_run, simulate_and_detect

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 130))
    warmup = args.warmup_days if args.warmup_days is not None else min(7.0, args.days / 2)
    settings = EvalSettings(meters=args.meters, days=args.days, seed=args.seed,
                            districts=args.districts, warmup_days=warmup)
    try:
        settings.validate()
    except ValueError as exc:
        console.print(f"[red]invalid settings:[/red] {exc}")
        return 1
    started = time.perf_counter()
    with console.status("simulating and detecting...") as status:
        def progress(done: float) -> None:
            status.update(f"simulating and detecting... {done:.0%}")

        result = simulate_and_detect(settings, progress)
    report = score_run(result)
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "timeline.png"
    report["timeline_devices"] = plot_timeline(result, png)
    report["run_s"] = round(time.perf_counter() - started, 2)
    report_path = args.out / "report.json"
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    console.print(build_table(report))
    console.print(
        f"false alarms: {report['false_alarms']} "
        f"({report['false_alarms_per_1000_meter_days']} per 1,000 meters per day) over "
        f"{report['scored_days']} scored days; seed {settings.seed} "
        f"{'held out' if report['held_out_seed'] else '[yellow]NOT held out[/yellow]'}; "
        f"detectors {report['readings_per_s']:,.0f} readings/s; run {report['run_s']} s")
    console.print(f"wrote {report_path} and {png}")
    return 0


def build_table(report: dict[str, Any]) -> Table:
    """The per-kind table printed by the command (the same numbers as ``report['kinds']``)."""
    table = Table(title="Detection quality (held-out seed)" if report["held_out_seed"]
                  else "Detection quality (seed NOT held out)")
    table.add_column("kind", no_wrap=True)
    for name in ("episodes", "short", "detected", "recall", "alerts", "precision", "F1",
                 "TTD p50 h", "TTD p90 h", "FA/1k m/d"):
        table.add_column(name, justify="right", no_wrap=True)
    for kind, row in report["kinds"].items():
        table.add_row(
            kind if kind in ("customer_leak", "network_leak", "burst", "sensor_fault",
                             "clock_skew", "silent") else f"  {kind}",
            str(row["episodes"]), str(row["too_short"]), str(row["detected"]),
            _fmt(row["recall"]), _fmt(row.get("alerts")), _fmt(row.get("precision")),
            _fmt(row.get("f1")), _fmt(row["median_ttd_h"]), _fmt(row["p90_ttd_h"]),
            _fmt(row.get("false_alarms_per_1000_meter_days")))
    return table


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    return str(value)
