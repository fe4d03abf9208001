"""Dataflow throughput (mosquitto → ``meshwatch flow`` → VictoriaMetrics) against a null pipeline.

Run: python bench/bench_flow.py [--devices N] [--readings K] [--workers W ...]

N devices x K readings (15-minute cadence, two metrics) are encoded as TelemetryBatch
messages of 500 readings per mesh partition (8 partitions), as the bridge publishes them.
Each consumer first creates its persistent QoS1 sessions, then the whole load is published
into them (a backlog), then the consumer is started and timed until it has handled
everything:

- *null*: one paho client per partition (MQTT 5, Receive Maximum 1000) that ``json.loads``
  each payload, counts its readings and acknowledges at once. No processing, no storage.
- *flow W* / *N processes*: ``meshwatch flow -w W -s 1`` (or N processes of one cluster,
  ``-i``/``-a``, one worker each) (no recovery directory, no lake, no detector):
  decode, de-duplicate, order, gap-fill, write to VictoriaMetrics in batches of 5,000 lines,
  acks one snapshot late. Timed from process start (imports included) until the flow's own
  ``mw_flow`` counters in VictoriaMetrics show every reading released and written.
- *flow W + detection* (``--detect``): the same with a registry (the devices as customer
  meters in districts of 2,000): the detection stage (one water pipeline per district,
  ``mw_score`` per reading, alerts), timed until its ``mw_detect`` counters also show every
  reading fed.

readings/s = readings / seconds; "startup s" is when the flow's first partition was connected
(process start, imports, bytewax set-up), "after startup/s" the rate from then on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from servers import Mosquitto, VictoriaMetrics, free_port

from meshwatch.contract import Reading, TelemetryBatch, encode, topics
from meshwatch.contract.topics import partition_of

T0 = 1_767_225_600_000
PARTITIONS = 8
PER_MESSAGE = 500
CADENCE_MS = 900_000
TIMEOUT_S = 600.0
BIN = Path(sys.executable).parent


def build_messages(devices: int, readings: int) -> tuple[dict[int, list[bytes]], int]:
    """Payloads per partition, in time order; and the number of readings."""
    rows: dict[int, list[Reading]] = defaultdict(list)
    ids = [f"mtr-{d:06d}" for d in range(devices)]
    part = {d: partition_of(d, PARTITIONS) for d in ids}
    for k in range(readings):
        for d in ids:
            rows[part[d]].append(Reading.model_construct(
                device_id=d, ts_ms=T0 + k * CADENCE_MS, seq=k,
                metrics={"flow_lpm": 1.0 + (k % 5) * 0.25, "battery_v": 3.6}, quality=()))
    messages: dict[int, list[bytes]] = {}
    for p, rs in rows.items():
        messages[p] = [encode(TelemetryBatch.model_construct(
            site="dma-01", gateway_id="gw-01", sent_ms=T0, readings=rs[i:i + PER_MESSAGE]))
            for i in range(0, len(rs), PER_MESSAGE)]
    return messages, devices * readings


def _connect(broker: Mosquitto, client_id: str, *, persistent: bool,
             manual_ack: bool = False) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5, manual_ack=manual_ack)
    client.max_inflight_messages_set(1000)
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 3600 if persistent else 0
    properties.ReceiveMaximum = 1000
    client.connect(broker.host, broker.port, clean_start=not persistent, properties=properties)
    return client


def create_sessions(broker: Mosquitto, prefix: str) -> None:
    for p in range(PARTITIONS):
        client = _connect(broker, f"{prefix}-p{p}", persistent=True)
        client.loop_start()
        client.subscribe(topics.mesh_telemetry(p), qos=1)[1]
        time.sleep(0.05)
        client.disconnect()
        client.loop_stop()


def publish(broker: Mosquitto, messages: dict[int, list[bytes]]) -> None:
    client = _connect(broker, "", persistent=False)
    client.loop_start()
    infos = [client.publish(topics.mesh_telemetry(p), payload, qos=1)
             for p, payloads in messages.items() for payload in payloads]
    for info in infos:
        info.wait_for_publish(60)
    client.disconnect()
    client.loop_stop()


def run_null(broker: Mosquitto, total: int) -> float:
    """Seconds for one paho subscriber per partition to json.loads and count everything."""
    counted = [0]
    lock = threading.Lock()
    done = threading.Event()

    def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        n = len(json.loads(msg.payload)["readings"])
        client.ack(msg.mid, msg.qos)
        with lock:
            counted[0] += n
            if counted[0] >= total:
                done.set()

    start = time.perf_counter()
    clients = []
    for p in range(PARTITIONS):
        client = _connect(broker, f"null-p{p}", persistent=True, manual_ack=True)
        client.on_message = on_message
        client.loop_start()
        clients.append(client)
    if not done.wait(TIMEOUT_S):
        msg = f"null pipeline counted {counted[0]} of {total} readings"
        raise RuntimeError(msg)
    elapsed = time.perf_counter() - start
    for client in clients:
        client.disconnect()
        client.loop_stop()
    return elapsed


def written(vm: VictoriaMetrics, detect: bool = False) -> int:
    """Readings the flow has released and written (and fed to detection), from its counters."""
    vm.force_flush()
    count = 0
    for name in ("measured", "late"):
        for series in vm.export(f'{{__name__="mw_flow_{name}"}}'):
            count += int(max(zip(series["timestamps"], series["values"], strict=True))[1])
    if detect:
        fed = 0
        for series in vm.export('{__name__="mw_detect_fed"}'):
            fed += int(max(zip(series["timestamps"], series["values"], strict=True))[1])
        count = min(count, fed)
    return count


def write_registry(path: Path, devices: int, per_district: int = 2000) -> Path:
    """The bench's devices as customer meters, ``per_district`` to a district."""
    rows = ["device_id,device_kind,site,district,gateway_id,cadence_s"]
    for d in range(devices):
        district = f"dma-{d // per_district + 1:02d}"
        rows.append(f"mtr-{d:06d},customer_meter,{district},{district},gw-01,900")
    path.write_text("\n".join(rows) + "\n")
    return path


def run_flow(broker: Mosquitto, vm: VictoriaMetrics, base: Path, workers: int,
             total: int, processes: int = 1,
             registry: Path | None = None) -> tuple[float, float]:
    """Seconds from starting ``meshwatch flow`` until it is connected, and until done.

    With ``processes`` > 1, that many processes of one bytewax cluster (``-i``/``-a``).
    """
    prefix = f"bench-flow-{processes}x{workers}"
    config = base / f"{prefix}.toml"
    config.write_text("\n".join([
        'log_level = "INFO"', "[mesh_broker]", f'url = "{broker.url}"',
        "[mesh]", f"partitions = {PARTITIONS}",
        "[influxdb]", f'url = "{vm.url}"', 'token = "unused"', "batch_size = 5000",
        *([] if registry is None else ["[registry]", f'file = "{registry}"']),
        "[flow]", f'client_id = "{prefix}"', "allowed_lateness_s = 0", "idle_flush_s = 0.5",
    ]) + "\n")
    command = [str(BIN / "meshwatch"), "flow", "--config", str(config), "-w", str(workers),
               "-s", "1"]
    if processes > 1:
        addresses = ";".join(f"127.0.0.1:{free_port()}" for _ in range(processes))
        commands = [[*command, "-i", str(i), "-a", addresses] for i in range(processes)]
    else:
        commands = [command]
    start = time.perf_counter()
    procs = [subprocess.Popen(c, env=os.environ.copy(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for c in commands]
    connected: list[float] = []

    def watch_log(proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "connected as" in line and not connected:
                connected.append(time.perf_counter() - start)

    for proc in procs:
        threading.Thread(target=watch_log, args=(proc,), daemon=True).start()
    try:
        while written(vm, registry is not None) < total:
            if any(proc.poll() is not None for proc in procs):
                msg = "a flow process exited"
                raise RuntimeError(msg)
            if time.perf_counter() - start > TIMEOUT_S:
                msg = "the flow did not finish in time"
                raise RuntimeError(msg)
            time.sleep(0.1)
        elapsed = time.perf_counter() - start
        return (connected[0] if connected else 0.0), elapsed
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--readings", type=int, default=30, help="readings per device")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--processes", type=int, nargs="+", default=[2],
                        help="also run clusters of this many 1-worker processes")
    parser.add_argument("--detect", action="store_true",
                        help="also run each worker count with the detection stage")
    args = parser.parse_args()
    messages, total = build_messages(args.devices, args.readings)
    count = sum(len(m) for m in messages.values())
    print(f"load: {args.devices} devices x {args.readings} readings = {total} readings in"
          f" {count} messages of <= {PER_MESSAGE}, {PARTITIONS} partitions, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        results = []
        with Mosquitto(base) as broker:
            create_sessions(broker, "null")
            publish(broker, messages)
            seconds = run_null(broker, total)
            results.append(("null (paho json.loads + count)", 0.0, seconds))
        runs = [(1, w, False) for w in args.workers] + [
            (p, 1, False) for p in args.processes if p > 1]
        if args.detect:
            runs += [(1, w, True) for w in args.workers]
        registry = write_registry(base / "registry.csv", args.devices)
        for processes, workers, detect in runs:
            with Mosquitto(base) as broker, VictoriaMetrics(base) as vm:
                create_sessions(broker, f"bench-flow-{processes}x{workers}")
                publish(broker, messages)
                first, seconds = run_flow(broker, vm, base, workers, total, processes,
                                          registry if detect else None)
                name = (f"flow -w {workers}" if processes == 1
                        else f"flow {processes} processes × -w 1")
                name += " + detection" if detect else ""
                results.append((f"{name} → VictoriaMetrics", first, seconds))
    null_rate = total / results[0][2]
    print(f"{'pipeline':<44} {'seconds':>8} {'readings/s':>11} {'of null':>8}"
          f" {'startup s':>10} {'after startup/s':>16}")
    for name, first, seconds in results:
        rate = total / seconds
        steady = total / (seconds - first) if seconds > first else rate
        print(f"{name:<44} {seconds:8.2f} {rate:11,.0f} {rate / null_rate:8.0%}"
              f" {first:10.2f} {steady:16,.0f}")


if __name__ == "__main__":
    main()
