"""Water detectors: readings/s per core through the batch path, and per-device state size.

Run: ``python bench/bench_water_detectors.py [--meters 10000] [--days 2]``. Simulates a
fleet once (blocks kept in memory, comm faults included), then times, on one pinned core:

1. each fleet detector's ``process`` over the customer-meter blocks as delivered (one
   gateway's step, up to 500 readings), and the burst detector over inlet blocks;
2. the whole :class:`~models.water.pipeline.WaterPipeline` (both customer detectors, the
   district aggregator, the burst detector, ticks with silence checks and district leaks,
   the alert policy) over every block, as the dataflow would call it;
3. the one-at-a-time contract path (``score_one`` + ``learn_one``) on a sample, for scale.

Goal: ≥ 50,000 readings/s per core for the water detectors. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from models.water import (
    BurstFleet,
    CustomerLeakDetector,
    CustomerLeakFleet,
    DistrictLeakDetector,
    SensorFaultDetector,
    SensorFaultFleet,
    SilenceDetector,
)
from models.water.burst import BurstDetector
from models.water.pipeline import FleetLayout, WaterPipeline
from simulators import FleetConfig, FleetSimulator, SimConfig

TICK_MS = 900_000


def pin() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def best_of(runs: int, call) -> float:
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--meters", type=int, default=10_000)
    parser.add_argument("--days", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    pin()
    config = SimConfig(fleet=FleetConfig(meters=args.meters), days=args.days, seed=args.seed)
    simulator = FleetSimulator(config)
    blocks = list(simulator)
    fleet = simulator.fleet
    customer = [b for b in blocks if b.kind == "customer_meter"]
    inlet = [b for b in blocks if b.kind == "district_meter"]
    n_customer = sum(len(b) for b in customer)
    n_inlet = sum(len(b) for b in inlet)
    n_all = sum(len(b) for b in blocks)
    print(f"fleet: {args.meters} meters, {fleet.district_count} districts, {args.days} days; "
          f"{n_all:,} readings ({n_customer:,} customer, {n_inlet:,} inlet), "
          f"{np.mean([len(b) for b in customer]):.0f} readings per customer block\n")

    def customer_cols(b):
        return {"ts_ms": b.ts_ms, "flow_lpm": b.metrics["flow_lpm"],
                "battery_v": b.metrics["battery_v"]}

    rows = []
    for name, make in (("customer leak", CustomerLeakFleet), ("sensor faults", SensorFaultFleet)):
        def run(make=make):
            detector = make(capacity=fleet.device_count)
            for b in customer:
                detector.process(b.device_index, customer_cols(b))
        seconds = best_of(args.runs, run)
        rows.append((name, n_customer, seconds, make().state_bytes()))

    def run_burst():
        detector = BurstFleet(capacity=fleet.district_count)
        for b in inlet:
            detector.process(b.device_index - fleet.customer_count,
                             {"ts_ms": b.ts_ms, "flow_lpm": b.metrics["flow_lpm"],
                              "pressure_bar": b.metrics["pressure_bar"]})
    rows.append(("burst (inlet)", n_inlet, best_of(args.runs, run_burst),
                 BurstFleet().state_bytes()))

    layout = FleetLayout.from_simulator(fleet, config.fleet.customer_cadence_s,
                                        config.fleet.scada_cadence_s)

    def run_pipeline():
        pipeline = WaterPipeline(layout)
        next_tick = config.start_ms + TICK_MS
        for b in blocks:
            while next_tick <= b.sent_ms:
                pipeline.tick(min(next_tick, pipeline.max_ts or next_tick))
                next_tick += TICK_MS
            if b.kind == "customer_meter":
                pipeline.customer_readings(b.device_index, b.ts_ms, b.metrics)
            elif b.kind == "district_meter":
                pipeline.inlet_readings(b.device_index, b.ts_ms, b.metrics)
            else:
                pipeline.other_readings(b.device_index, b.ts_ms)
    seconds = best_of(args.runs, run_pipeline)
    rows.append(("whole pipeline + alert policy (all readings)", n_all, seconds, 0))

    print("| path | readings | s | readings/s | µs/reading | state bytes/stream |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, count, seconds, size in rows:
        print(f"| {name} | {count:,} | {seconds:.2f} | {count / seconds:,.0f} | "
              f"{seconds / count * 1e6:.2f} | {size or '-'} |")

    sample = customer[: max(1, len(customer) // 50)]
    xs = [(int(d), {"ts_ms": int(t), "flow_lpm": float(f), "battery_v": float(v)})
          for b in sample for d, t, f, v in zip(b.device_index, b.ts_ms, b.metrics["flow_lpm"],
                                                b.metrics["battery_v"], strict=True)]
    print("\n| one-at-a-time contract path | readings | readings/s | pickled bytes/device |")
    print("|---|---:|---:|---:|")
    for name, make in (("CustomerLeakDetector", CustomerLeakDetector),
                       ("SensorFaultDetector", SensorFaultDetector)):
        detectors: dict[int, object] = {}
        started = time.perf_counter()
        for device, x in xs:
            detector = detectors.setdefault(device, make())
            detector.score_one(x)
            detector.learn_one(x)
        seconds = time.perf_counter() - started
        size = max(d.state_size() for d in list(detectors.values())[:50])
        print(f"| {name} | {len(xs):,} | {len(xs) / seconds:,.0f} | {size:,} |")
    for name, make in (("BurstDetector", BurstDetector), ("DistrictLeakDetector",
                                                          DistrictLeakDetector),
                       ("SilenceDetector", SilenceDetector)):
        detector = make()
        detector.learn_one({"ts_ms": config.start_ms + 60_000, "flow_lpm": 1.0,
                            "pressure_bar": 4.0, "last_seen_ms": config.start_ms,
                            "cadence_s": 60.0})
        print(f"| {name} | - | - | {detector.state_size():,} |")


if __name__ == "__main__":
    main()
