"""Contract decode+validate throughput for telemetry batches of R readings.

Run: python bench/bench_contract.py   (goal: >= 300k readings/s decoded and validated)

Each payload is a realistic TelemetryBatch (customer-meter readings with three
metrics). The figure is the best of several timed rounds on one core, so a noisy
neighbour on this 2-core machine lowers it less.
"""

import time

from rich.console import Console
from rich.table import Table

from meshwatch.contract import Reading, TelemetryBatch, decode, encode

T0 = 1_767_225_600_000
ROUNDS = 5
READINGS_PER_ROUND = 200_000


def payload(readings_per_batch: int) -> bytes:
    readings = [
        Reading(device_id=f"mtr-{i:07d}", ts_ms=T0 + 900_000 * (i % 4), seq=1000 + i,
                metrics={"flow_lpm": 1.234 + i % 7, "temperature_c": 11.5, "battery_v": 3.61})
        for i in range(readings_per_batch)
    ]
    batch = TelemetryBatch(site="dma-01", gateway_id="gw-01-001", sent_ms=T0, readings=readings)
    return encode(batch)


def best_rate(work, readings_per_call: int, calls: int) -> float:
    best = 0.0
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(calls):
            work()
        best = max(best, readings_per_call * calls / (time.perf_counter() - start))
    return best


def main() -> None:
    table = Table("readings per batch", "bytes per reading", "decode+validate readings/s",
                  "encode readings/s", title="contract throughput (best of 5, one core)")
    for size in (1, 10, 100, 1000):
        data = payload(size)
        batch = decode(data, TelemetryBatch)
        calls = max(1, READINGS_PER_ROUND // size)
        decode_rate = best_rate(lambda d=data: decode(d, TelemetryBatch), size, calls)
        encode_rate = best_rate(lambda b=batch: encode(b), size, calls)
        table.add_row(str(size), f"{len(data) / size:.0f}", f"{decode_rate:,.0f}",
                      f"{encode_rate:,.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
