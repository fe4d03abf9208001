"""``meshwatch train``: train models and write model packages.

``meshwatch train edge`` simulates a fleet in-process, trains the edge model on its feature
windows and writes a model package (``model.onnx`` + ``manifest.json``; see
:mod:`models.edge.train`). Needs ``meshwatch[train]`` (scikit-learn, skl2onnx). Examples::

    meshwatch train edge --out packages/edge-rf
    meshwatch train edge --meters 300 --days 3 --districts 4 --seed 11 --out /tmp/edge

>>> parser = argparse.ArgumentParser(prog="train")
>>> add_arguments(parser)
>>> args = parser.parse_args(["edge", "--night", "01:00-04:00", "--window-min", "30"])
>>> _settings(args).window
WindowSpec(length_ms=1800000, night_start_min=60, night_end_min=240)
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from models.edge.features import WindowSpec

if TYPE_CHECKING:
    from models.edge.train import TrainSettings

DEFAULT_OUT = Path("edge-model")
_STAGES = {"simulating": "simulating and windowing", "fitting": "fitting trees",
           "exporting": "exporting to ONNX"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``train`` subcommands to ``parser``."""
    commands = parser.add_subparsers(title="models", metavar="MODEL", required=True)
    edge = commands.add_parser("edge", help="the edge model of the gateways (ONNX package)",
                               description="Train the edge model on simulated windows.")
    data = edge.add_argument_group("training data (simulated)")
    data.add_argument("--meters", type=int, default=2000,
                      help="customer meters (default %(default)s)")
    data.add_argument("--days", type=float, default=7.0,
                      help="simulated days (default %(default)s)")
    data.add_argument("--districts", type=int, default=8,
                      help="districts; a quarter of them is held out (default %(default)s)")
    data.add_argument("--seed", type=int, default=None,
                      help="training seed; keep it apart from evaluation seeds "
                           "(default 1000003)")
    data.add_argument("--rates", type=Path, default=None, metavar="FILE.toml",
                      help="override training incident rates with an [incidents] table")
    model = edge.add_argument_group("windows and model")
    model.add_argument("--window-min", type=int, default=60,
                       help="window length in minutes, dividing a day (default %(default)s)")
    model.add_argument("--night", default="01:00-04:00", metavar="HH:MM-HH:MM",
                       help="UTC span of the night-minimum flow (default %(default)s)")
    model.add_argument("--trees", type=int, default=20, help="trees (default %(default)s)")
    model.add_argument("--max-depth", type=int, default=6,
                       help="depth of each tree (default %(default)s)")
    model.add_argument("--model-id", default="edge-rf", help="model id (default %(default)s)")
    edge.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                      help="package directory to write (default %(default)s)")
    edge.add_argument("--quiet", action="store_true", help="no progress or summary")
    edge.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Train what the options describe; return the exit code (2: bad options)."""
    from models.edge.train import train_edge_model, write_package

    errors = Console(stderr=True)
    try:
        settings = _settings(args)
        settings.validate()
    except ValueError as exc:
        errors.print(f"[red]train edge: error:[/] {exc}", highlight=False)
        return 2
    started = time.perf_counter()
    with TrainingProgress(args.quiet) as progress:
        trained = train_edge_model(settings, progress)
    try:
        target = write_package(trained, args.out)
    except OSError as exc:
        errors.print(f"[red]train edge: error:[/] cannot write {exc.filename}: {exc.strerror}",
                     highlight=False)
        return 1
    if not args.quiet:
        Console().print(_summary(trained.manifest, target, time.perf_counter() - started))
    return 0


def _settings(args: argparse.Namespace) -> TrainSettings:
    from models.edge.train import DEFAULT_SEED, TrainSettings
    from simulators.config import SimConfig, load_rates

    night_start, night_end = _night_span(args.night)
    settings = TrainSettings(
        meters=args.meters, days=args.days, districts=args.districts,
        seed=DEFAULT_SEED if args.seed is None else args.seed,
        window=WindowSpec(length_ms=args.window_min * 60_000, night_start_min=night_start,
                          night_end_min=night_end),
        trees=args.trees, max_depth=args.max_depth, model_id=args.model_id)
    if args.rates is not None:
        rates = load_rates(args.rates, SimConfig(incidents=settings.rates)).incidents
        settings = dataclasses.replace(settings, rates=rates)
    return settings


def _night_span(text: str) -> tuple[int, int]:
    """Minutes after midnight of ``HH:MM-HH:MM``."""
    try:
        start, end = (int(part[:2]) * 60 + int(part[3:]) for part in text.split("-")
                      if len(part) == 5 and part[2] == ":")
    except ValueError:
        msg = f"--night is {text!r}; expected a UTC span like 01:00-04:00"
        raise ValueError(msg) from None
    return start, end


class TrainingProgress:
    """A rich progress display with one bar per training stage, or nothing when quiet."""

    def __init__(self, quiet: bool) -> None:
        self._progress = None if quiet else Progress(
            TextColumn("{task.description:<26}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=Console(stderr=True))
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> TrainingProgress:
        if self._progress is not None:
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(None, None, None)

    def __call__(self, stage: str, done: float, total: float) -> None:
        """Show ``done`` of ``total`` for a training stage."""
        if self._progress is None:
            return
        if stage not in self._tasks:
            self._tasks[stage] = self._progress.add_task(_STAGES.get(stage, stage), total=None)
        scale = 3_600_000 if stage == "simulating" else 1  # simulated ms shown as hours
        self._progress.update(self._tasks[stage], completed=int(done // scale),
                              total=int(total // scale))


def _summary(manifest: dict[str, object], target: Path, elapsed: float) -> Table:
    metrics = manifest["metrics"]
    assert isinstance(metrics, dict)
    table = Table(title=f"{manifest['model_id']} {manifest['version']} → {target}",
                  caption=f"held-out districts, {metrics['windows']:,} windows; "
                          f"{elapsed:.1f} s", header_style="bold")
    for column in ("class", "precision", "recall", "F1", "support", "base rate"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, row in metrics["per_class"].items():
        table.add_row(name, f"{row['precision']:.3f}", f"{row['recall']:.3f}",
                      f"{row['f1']:.3f}", f"{row['support']:,}", f"{row['base_rate']:.3f}")
    return table
