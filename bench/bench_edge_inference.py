"""Edge model latency (onnxruntime) and feature-window throughput on one core.

Run: ``python bench/bench_edge_inference.py`` (trains the default package first, ~10 s) or
``--package DIR`` to measure an existing package. Prints markdown tables:

1. ``EdgeModel.score`` p50/p99 for one window and for a batch of 100 (goal: p99 ≤ 50 µs
   for one window), next to other model families on the same windows for comparison.
2. Readings/s through :class:`models.edge.features.FeatureWindows` with simulator blocks,
   as delivered (one gateway's step, up to 500 readings) and re-cut into smaller batches,
   with and without scoring the windows that close.

The process is pinned to one CPU where the OS allows it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from models.edge.features import ClosedWindows, FeatureWindows, pressure_of
from models.edge.package import EdgeModel, load_package
from models.edge.train import TrainSettings, export_onnx, train_edge_model, write_package
from simulators import FleetConfig, FleetSimulator, ReadingBlock, SimConfig


def percentiles(call: Callable[[], object], rounds: int) -> tuple[float, float]:
    """p50 and p99 of one call, in microseconds, after a warm-up."""
    for _ in range(200):
        call()
    times = np.empty(rounds)
    clock = time.perf_counter_ns
    for i in range(rounds):
        started = clock()
        call()
        times[i] = clock() - started
    p50, p99 = np.percentile(times, [50, 99]) / 1000
    return float(p50), float(p99)


def latency_rows(name: str, model: EdgeModel, windows: np.ndarray, rounds: int) -> list[str]:
    one, batch = windows[:1], windows[:100]
    single = percentiles(lambda: model.score(one), rounds)
    hundred = percentiles(lambda: model.score(batch), rounds // 5)
    return [name, f"{single[0]:.1f}", f"{single[1]:.1f}", f"{hundred[0]:.1f}",
            f"{hundred[1]:.1f}", f"{hundred[0] / 100:.2f}"]


def other_families(trained_dir: Path, features: np.ndarray, labels: np.ndarray,
                   out: Path) -> list[tuple[str, EdgeModel]]:
    """The same package with other forests in it, to show what size costs."""
    import json

    from sklearn.ensemble import RandomForestClassifier

    models = []
    for trees, depth in ((5, 6), (50, 8), (100, 12)):
        forest = RandomForestClassifier(trees, max_depth=depth, random_state=1, n_jobs=1)
        forest.fit(features, labels)
        target = out / f"rf-{trees}-{depth}"
        target.mkdir()
        data = export_onnx(forest)
        (target / "model.onnx").write_bytes(data)
        manifest = json.loads((trained_dir / "manifest.json").read_text())
        manifest["sha256"] = __import__("hashlib").sha256(data).hexdigest()
        (target / "manifest.json").write_text(json.dumps(manifest))
        models.append((f"RandomForest({trees} trees, depth {depth})", load_package(target)))
    return models


def simulated_blocks(meters: int, days: float) -> list[ReadingBlock]:
    config = SimConfig(fleet=FleetConfig(meters=meters), days=days, seed=3)
    return list(FleetSimulator(config))


def recut(blocks: list[ReadingBlock], size: int | None) -> list[tuple[np.ndarray, ...]]:
    """Blocks as (device index, ts, flow, pressure) columns, cut to ``size`` readings."""
    parts = []
    for block in blocks:
        pressure = pressure_of(block.metrics)
        columns = (block.device_index, block.ts_ms, block.metrics["flow_lpm"],
                   np.full(len(block), np.nan) if pressure is None else pressure)
        step = size or len(block)
        parts += [tuple(column[i:i + step] for column in columns)
                  for i in range(0, len(block), step)]
    return parts


def throughput(parts: list[tuple[np.ndarray, ...]], id_table: np.ndarray,
               model: EdgeModel | None) -> tuple[float, int]:
    """Readings/s through feature windows (and scoring), and windows closed."""
    windows = FeatureWindows(model.window_spec if model else None, capacity=len(id_table))
    table_slots = windows.slots(id_table.tolist())
    readings = sum(len(part[0]) for part in parts)
    closed_count = 0
    started = time.perf_counter()
    for device, ts, flow, pressure in parts:
        closed = windows.add(table_slots[device], ts, flow, pressure)
        closed_count += score(closed, model)
    closed_count += score(windows.flush(), model)
    return readings / (time.perf_counter() - started), closed_count


def score(closed: ClosedWindows, model: EdgeModel | None) -> int:
    if model is not None and len(closed):
        model.score(closed.features)
    return len(closed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--package", type=Path, default=None, help="an existing package")
    parser.add_argument("--rounds", type=int, default=20_000, help="single-window calls")
    parser.add_argument("--meters", type=int, default=5000, help="meters for throughput")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    with tempfile.TemporaryDirectory() as scratch:
        settings = TrainSettings()
        trained = train_edge_model(settings)
        package = args.package or write_package(trained, Path(scratch) / "edge")
        model = load_package(package)
        windows = np.ascontiguousarray(trained.test_features[:1000])
        rows = [latency_rows(f"**{model.manifest.raw.get('family', model.model_id)}** "
                             "(the package)", model, windows, args.rounds)]
        rows += [latency_rows(name, other, windows, args.rounds // 4)
                 for name, other in other_families(Path(package), trained.test_features,
                                                   trained.test_labels, Path(scratch))]
    print("### Inference: `EdgeModel.score`, one onnxruntime session, 1 thread (µs)\n")
    print("| model | 1 window p50 | 1 window p99 | 100 windows p50 | 100 windows p99 "
          "| per window in a batch of 100 |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")

    blocks = simulated_blocks(args.meters, 2.0)
    id_table = blocks[0].id_table
    print(f"\n### Feature windows: {args.meters:,} meters, 2 simulated days, "
          f"{model.window_spec.length_ms // 60_000}-minute windows, one core\n")
    print("| readings per `add` call | readings | windows closed | features readings/s "
          "| features + scoring readings/s |")
    print("|---|---:|---:|---:|---:|")
    for size in (None, 100, 10):
        parts = recut(blocks, size)
        readings = sum(len(part[0]) for part in parts)
        bare, closed = throughput(parts, id_table, None)
        scored, _ = throughput(parts, id_table, model)
        label = "as delivered (gateway step, ≤ 500)" if size is None else str(size)
        print(f"| {label} | {readings:,} | {closed:,} | {bare:,.0f} | {scored:,.0f} |")


if __name__ == "__main__":
    main()
