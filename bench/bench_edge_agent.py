"""Edge agent throughput and memory: readings/s per core from input to the broker, RSS.

Run: ``python bench/bench_edge_agent.py`` (needs mosquitto; starts its own on a free port).

Each run is one ``meshwatch edge --simulate`` process serving ONE gateway of 5,000 meters
(15-minute cadence) for the given simulated days, as fast as it can, with or without the edge
model scoring every hourly window, into a real mosquitto at QoS1 through the durable outbox.
The process exits once the outbox has drained, so the figures cover input → outbox → broker
PUBACK.

The load generator (the fleet simulator) runs in a child process of the agent
(:mod:`simulators.feed`), so the agent's figures are its own: CPU seconds are user + system of
the agent process (all its threads) and peak RSS its ru_maxrss, both as the agent reports them
for itself (RUSAGE_SELF) in its summary, before printing it. Readings per CPU second is the
per-core rate. The last column is the whole process's ru_maxrss from ``wait4`` (the larger of
the agent's and its simulator child's), which also covers the summary printed at exit (rich is
imported only then). The simulator is measured on its own too, as a separate process writing
the same blocks to /dev/null. Each configuration runs ``--repeat`` times; the table shows the
run with the highest peak RSS.

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


SIM_ARGS = ["--meters", "5000", "--meters-per-gateway", "5000", "--districts", "1", "--seed", "3"]
GATEWAY = "dma-01-gw-001"


def run_agent(broker: Mosquitto, work: Path, model: Path | None, days: float,
              synchronous: str) -> dict[str, float]:
    config = work / f"edge-{synchronous}-{model is not None}.toml"
    outbox = work / f"outbox-{time.monotonic_ns()}.db"
    model_line = f'model_dir = "{model}"\n' if model else ""
    config.write_text(
        f'[site_broker]\nurl = "{broker.url}"\n[edge]\nsite = "dma-01"\n'
        f'gateway_id = "{GATEWAY}"\noutbox_path = "{outbox}"\n'
        f'outbox_synchronous = "{synchronous}"\nbacklog_rate_per_s = 0\nmax_in_flight = 64\n'
        f"shutdown_timeout_s = 120\n{model_line}")
    out = work / "agent.out"
    started = time.perf_counter()
    with out.open("w") as stdout, (work / "agent.err").open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "meshwatch.cli", "edge", "--config", str(config),
             "--simulate", *SIM_ARGS, "--days", str(days)],
            stdout=stdout, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)  # the agent and its simulator child
    wall = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"the agent failed: {(work / 'agent.err').read_text()[-2000:]}")
    summary = out.read_text()

    def row(name: str) -> str:
        found = re.search(rf"{name}\s*│\s*([\d,.]+)", summary)
        assert found, summary
        return found.group(1).replace(",", "")

    return {"readings": int(row("readings_in")), "wall_s": wall, "cpu_s": float(row("cpu")),
            "rss_mb": float(row("peak rss")), "exit_rss_mb": usage.ru_maxrss / 1024}


def run_simulator(days: float) -> dict[str, float]:
    """The load generator alone: the same blocks, written to /dev/null."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "simulators.feed", "--gateway", GATEWAY,
                                *SIM_ARGS, "--days", str(days)], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    assert status == 0
    return {"wall_s": time.perf_counter() - started, "cpu_s": usage.ru_utime + usage.ru_stime,
            "rss_mb": usage.ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=3, help="runs per configuration")
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
                runs = [run_agent(broker, work, package, args.days, synchronous)
                        for _ in range(args.repeat)]
                peaks = sorted(f["rss_mb"] for f in runs)
                rows.append((label, max(runs, key=lambda f: f["rss_mb"]), peaks))
        simulator = run_simulator(args.days)
    print("| run | readings | wall s | agent CPU s | readings/s (wall) | readings per agent CPU s"
          " | agent peak RSS MB (all runs) | with the exit summary MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, f, peaks in rows:
        print(f"| {label} | {f['readings']:,} | {f['wall_s']:.1f} | {f['cpu_s']:.1f} |"
              f" {f['readings'] / f['wall_s']:,.0f} | {f['readings'] / f['cpu_s']:,.0f} |"
              f" **{f['rss_mb']:.1f}** ({', '.join(f'{p:.1f}' for p in peaks)}) |"
              f" {f['exit_rss_mb']:.1f} |")
    print(f"\nThe simulator alone (separate process): {simulator['cpu_s']:.1f} CPU s,"
          f" {simulator['wall_s']:.1f} s wall, peak RSS {simulator['rss_mb']:.1f} MB.")


if __name__ == "__main__":
    main()
