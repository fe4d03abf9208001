"""Edge agent throughput and memory: readings/s per core from input to the broker, RSS.

Run: ``python bench/bench_edge_agent.py`` (needs mosquitto; starts its own on a free port).

Each run is one ``meshwatch edge --simulate`` process serving ONE gateway of 5,000 meters
(15-minute cadence) for the given simulated days, as fast as it can, with the edge model
scoring every hourly window, into a real mosquitto at QoS1 through the durable outbox
(``FULL`` fsync, the default). The process exits once the outbox has drained, so the figures
cover input → outbox → broker PUBACK. CPU seconds are user + system of the agent process
(all its threads), so readings per CPU second is the per-core rate; the simulator runs inside
the same process and is counted against the agent. Peak RSS is the process's ru_maxrss.

Goals (issue 3): >= 20k readings/s per core; RSS with 5,000 devices <= 80 MB.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the real-server harness the tests use

from servers import Mosquitto  # noqa: E402


def train_model(directory: Path) -> Path:
    subprocess.run([sys.executable, "-m", "meshwatch.cli", "train", "edge", "--meters", "600",
                    "--days", "3", "--out", str(directory), "--quiet"], check=True)
    return directory


def run_agent(broker: Mosquitto, work: Path, model: Path | None, days: float,
              synchronous: str) -> dict[str, float]:
    config = work / f"edge-{synchronous}-{model is not None}.toml"
    outbox = work / f"outbox-{time.monotonic_ns()}.db"
    model_line = f'model_dir = "{model}"\n' if model else ""
    config.write_text(
        f'[site_broker]\nurl = "{broker.url}"\n[edge]\nsite = "dma-01"\n'
        f'gateway_id = "dma-01-gw-001"\noutbox_path = "{outbox}"\n'
        f'outbox_synchronous = "{synchronous}"\nbacklog_rate_per_s = 0\nmax_in_flight = 64\n'
        f"shutdown_timeout_s = 120\n{model_line}")
    out = work / "agent.out"
    started = time.perf_counter()
    with out.open("w") as stdout, (work / "agent.err").open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "meshwatch.cli", "edge", "--config", str(config),
             "--simulate", "--meters", "5000", "--meters-per-gateway", "5000",
             "--districts", "1", "--days", str(days), "--seed", "3"],
            stdout=stdout, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own CPU and peak RSS
    wall = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"the agent failed: {(work / 'agent.err').read_text()[-2000:]}")
    found = re.search(r"readings_in\s*│\s*([\d,]+)", out.read_text())
    assert found, out.read_text()
    return {"readings": int(found.group(1).replace(",", "")), "wall_s": wall,
            "cpu_s": usage.ru_utime + usage.ru_stime, "rss_mb": usage.ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=float, default=2.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = train_model(work / "model")
        rows = []
        with Mosquitto(work) as broker:
            for label, package, synchronous in (
                ("telemetry only, FULL", None, "FULL"),
                ("with edge scoring, FULL", model, "FULL"),
                ("with edge scoring, NORMAL", model, "NORMAL"),
            ):
                figures = run_agent(broker, work, package, args.days, synchronous)
                rows.append((label, figures))
    print("| run | readings | wall s | CPU s | readings/s (wall) | readings per CPU s |"
          " peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, f in rows:
        print(f"| {label} | {f['readings']:,} | {f['wall_s']:.1f} | {f['cpu_s']:.1f} |"
              f" {f['readings'] / f['wall_s']:,.0f} | {f['readings'] / f['cpu_s']:,.0f} |"
              f" {f['rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
