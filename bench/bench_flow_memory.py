"""Dataflow memory per device: ``meshwatch flow`` RSS and snapshot size at 2k, 10k, 50k devices.

Run: python bench/bench_flow_memory.py [--devices 2000 10000 50000] [--readings 8]

For each fleet size N, N customer meters (districts of 2,000, 15-minute cadence, two
metrics; ``bench_flow``'s load and registry) send K readings each. ``meshwatch flow -w 1 -s 1
-r DIR`` with detection and VictoriaMetrics starts on an empty mesh; once connected its RSS is
the *idle* figure. Then the load is published and, when the flow's counters show every
reading written and fed to detection and two more epochs passed, its RSS (``VmRSS``) and peak
(``VmHWM``) are read. The snapshot size is what bytewax stored for the newest epoch of each
state key in the recovery directory (``snaps.ser_change``), by step: ``order`` (per shard:
de-duplication bitmaps, cadences, pending readings), ``detect`` (per district: the water
pipeline) and the source (``mesh``: digests of pending messages).

KB/device = (RSS after - idle RSS) / N; the slope between two sizes removes what does not
grow with the fleet (allocator arenas, the in-flight messages).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sqlite3
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_flow import PARTITIONS, build_messages, create_sessions, publish, write_registry, written
from flow_support import FlowProcess
from servers import Mosquitto, VictoriaMetrics

CLIENT_ID = "bench-memory"


def status_mb(pid: int, field: str) -> float:
    """A ``/proc/PID/status`` field (``VmRSS``, ``VmHWM``) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    msg = f"/proc/{pid}/status has no {field}"
    raise RuntimeError(msg)


def snapshot_bytes(recovery: Path) -> dict[str, int]:
    """Bytes of the newest snapshot of every state key, summed by step id."""
    sizes: dict[str, int] = defaultdict(int)
    for part in recovery.glob("*.sqlite3"):
        db = sqlite3.connect(f"file:{part}?mode=ro", uri=True)
        try:
            rows = db.execute(
                "SELECT s.step_id, length(s.ser_change) FROM snaps s JOIN ("
                " SELECT step_id, state_key, max(snap_epoch) AS epoch FROM snaps"
                " GROUP BY step_id, state_key) n ON s.step_id = n.step_id"
                " AND s.state_key = n.state_key AND s.snap_epoch = n.epoch")
            for step, size in rows:
                sizes[step.rsplit(".", 1)[-1]] += size or 0
        finally:
            db.close()
    return dict(sizes)


def measure(base: Path, devices: int, readings: int) -> dict[str, float]:
    """Idle and loaded RSS, peak, and snapshot bytes by step, for one fleet size."""
    messages, total = build_messages(devices, readings)
    registry = write_registry(base / "registry.csv", devices)
    recovery = base / "recovery"
    with Mosquitto(base) as broker, VictoriaMetrics(base) as vm:
        create_sessions(broker, CLIENT_ID)
        config = base / "flow.toml"
        config.write_text("\n".join([
            'log_level = "INFO"', "[mesh_broker]", f'url = "{broker.url}"',
            "[mesh]", f"partitions = {PARTITIONS}",
            "[influxdb]", f'url = "{vm.url}"', 'token = "unused"', "batch_size = 5000",
            "[registry]", f'file = "{registry}"',
            "[flow]", f'client_id = "{CLIENT_ID}"', "allowed_lateness_s = 0",
            "idle_flush_s = 0.5"]) + "\n")
        with FlowProcess(config, base / "flow.log", recovery=recovery, snapshot_s=1.0) as flow:
            assert flow.proc is not None
            deadline = time.monotonic() + 120
            while "connected as" not in flow.log.read_text():
                if not flow.alive() or time.monotonic() > deadline:
                    msg = f"the flow did not start; see {flow.log}"
                    raise RuntimeError(msg)
                time.sleep(0.1)
            time.sleep(2)
            idle = status_mb(flow.proc.pid, "VmRSS")
            publish(broker, messages)
            deadline = time.monotonic() + 900
            while written(vm, detect=True) < total:
                if not flow.alive() or time.monotonic() > deadline:
                    msg = f"the flow did not take the load; see {flow.log}"
                    raise RuntimeError(msg)
                time.sleep(0.5)
            time.sleep(3)  # two more epochs: the snapshots hold everything
            rss = status_mb(flow.proc.pid, "VmRSS")
            peak = status_mb(flow.proc.pid, "VmHWM")
    return {"idle": idle, "rss": rss, "peak": peak, **snapshot_bytes(recovery)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[2_000, 10_000, 50_000])
    parser.add_argument("--readings", type=int, default=8, help="readings per device")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs; {args.readings} readings per device; flow -w 1 with "
          f"detection (districts of 2,000), {PARTITIONS} partitions")
    print(f"{'devices':>8} {'idle MB':>8} {'RSS MB':>8} {'peak MB':>8} {'KB/dev':>7}"
          f" {'order KB':>9} {'detect KB':>10} {'source KB':>10} {'snap B/dev':>10}  load")
    results = []
    for devices in args.devices:
        with tempfile.TemporaryDirectory() as tmp:
            r = measure(Path(tmp), devices, args.readings)
        results.append((devices, r))
        snap = r.get("order", 0) + r.get("detect", 0) + r.get("mesh", 0)
        print(f"{devices:8d} {r['idle']:8.1f} {r['rss']:8.1f} {r['peak']:8.1f}"
              f" {(r['rss'] - r['idle']) * 1024 / devices:7.2f}"
              f" {r.get('order', 0) / 1024:9.0f} {r.get('detect', 0) / 1024:10.0f}"
              f" {r.get('mesh', 0) / 1024:10.0f} {snap / devices:10.0f}"
              f"  {os.getloadavg()[0]:.2f}", flush=True)
    for (n1, a), (n2, b) in itertools.pairwise(results):
        print(f"slope {n1} -> {n2}: {(b['rss'] - a['rss']) * 1024 / (n2 - n1):.2f} KB RSS per "
              f"device")


if __name__ == "__main__":
    main()
