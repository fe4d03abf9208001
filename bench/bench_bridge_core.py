"""Bridge core throughput: ``Router.route`` on telemetry batches of 100 readings, one core.

Run: python bench/bench_bridge_core.py

Each batch is a realistic TelemetryBatch (three metrics per reading) from one gateway that owns
all its devices; seqs grow, so every reading is new and forwarded (the common case) to P=8
partitions. The figure is the best of several rounds. For comparison the same payloads are
decoded only (``decode(payload, TelemetryBatch)``), the floor of any validating bridge.
"""

import time

from mesh_bridge.identity import Identity
from mesh_bridge.route import Incoming, Router
from meshwatch.contract import Reading, TelemetryBatch, decode, encode, topics
from meshwatch.registry import Device, DeviceKind, Registry

T0 = 1_767_225_600_000
READINGS = 100
DEVICES = 10_000
BATCHES = 2_000
ROUNDS = 5


def registry() -> Registry:
    return Registry([
        Device(device_id=f"mtr-{i:07d}", device_kind=DeviceKind.CUSTOMER_METER, site="dma-01",
               district="dma-01", gateway_id="gw-01", cadence_s=900)
        for i in range(DEVICES)
    ])


def incoming(round_no: int) -> list[Incoming]:
    topic = topics.site_telemetry("dma-01", "gw-01")
    out = []
    for b in range(BATCHES):
        first = b * READINGS
        readings = [
            Reading(device_id=f"mtr-{(first + i) % DEVICES:07d}", ts_ms=T0 + 900_000 * b,
                    seq=round_no * BATCHES + b, metrics={"flow_lpm": 1.234 + i % 7,
                                                         "temperature_c": 11.5, "battery_v": 3.61})
            for i in range(READINGS)
        ]
        batch = TelemetryBatch(site="dma-01", gateway_id="gw-01", sent_ms=T0 + 900_000 * b,
                               readings=readings)
        out.append(Incoming(topic, encode(batch), T0 + 900_000 * b + 50))
    return out


def main() -> None:
    router = Router(Identity(registry()), partitions=8)
    best_route = best_decode = 0.0
    for round_no in range(ROUNDS):
        messages = incoming(round_no)
        start = time.perf_counter()
        for message in messages:
            router.route(message)
        best_route = max(best_route, BATCHES * READINGS / (time.perf_counter() - start))
        start = time.perf_counter()
        for message in messages:
            decode(message.payload, TelemetryBatch)
        best_decode = max(best_decode, BATCHES * READINGS / (time.perf_counter() - start))
    print(f"route():  {best_route:,.0f} readings/s  ({best_route / READINGS:,.0f} batches/s)")
    print(f"decode(): {best_decode:,.0f} readings/s  (validation alone)")
    print(f"route() per reading: {1e6 / best_route:.2f} µs; "
          f"beyond decoding: {1e6 / best_route - 1e6 / best_decode:.2f} µs")


if __name__ == "__main__":
    main()
