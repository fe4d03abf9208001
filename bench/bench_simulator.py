"""Simulator throughput on one core: readings/s into the iterator, to files and to JSON.

Run: ``python bench/bench_simulator.py`` (add ``--quick`` to skip the 600k-meter day).
Prints a markdown table. The process is pinned to one CPU where the OS allows it.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from simulators import FleetConfig, FleetSimulator, SimConfig
from simulators.output import write_run


def iterate(config: SimConfig) -> int:
    readings = 0
    for block in FleetSimulator(config):
        readings += len(block)
    return readings


def to_files(config: SimConfig) -> int:
    with tempfile.TemporaryDirectory() as out:
        return write_run(config, Path(out)).delivered_rows


def to_json(config: SimConfig) -> int:
    readings = 0
    for block in FleetSimulator(config):
        block.to_json_payloads(500)
        readings += len(block)
    return readings


def measure(name: str, work: Callable[[SimConfig], int], config: SimConfig) -> list[str]:
    started = time.perf_counter()
    readings = work(config)
    elapsed = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return [name, f"{config.fleet.meters:,}", f"{config.days:g}", f"{readings:,}",
            f"{elapsed:.1f}", f"{readings / elapsed:,.0f}", f"{peak_mb:,.0f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="skip the 600k-meter day")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    cases: list[tuple[str, Callable[[SimConfig], int], int, float]] = [
        ("iterator", iterate, 50_000, 1.0),
        ("parquet files", to_files, 50_000, 1.0),
        ("JSON payloads", to_json, 50_000, 0.25),
    ]
    if not args.quick:
        cases.append(("iterator", iterate, 600_000, 1.0))
    rows = [measure(name, work, SimConfig(fleet=FleetConfig(meters=meters), days=days, seed=1))
            for name, work, meters, days in cases]
    header = ["path", "meters", "days", "readings", "seconds", "readings/s", "peak RSS MB"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
