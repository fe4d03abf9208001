"""What the dataflow tests share: a scripted mesh load, its expected result, the flow process.

The load is built from a seed: devices with short and long gaps, readings shuffled within
messages, messages held back past the lateness (the late path), readings repeated in other
messages (keyed de-duplication), messages published twice byte for byte (skipped by the
source), and garbage payloads (dead letters). :func:`expected` runs the same per-shard logic
the flow runs, message by message in broker order per partition, so a test can compare
VictoriaMetrics, the lake and the flow's counters with it.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from servers import Mosquitto, VictoriaMetrics

from dataflows.connectors.lake import read_lake
from dataflows.ordering import COUNTERS, Kind, OrderSettings, ShardState, shard_of
from meshwatch.contract import (
    Alert,
    AlertKind,
    Feedback,
    Reading,
    Severity,
    TelemetryBatch,
    decode,
    encode,
    topics,
)
from meshwatch.contract.topics import partition_of
from meshwatch.registry import COLUMNS

T0 = 1_767_225_600_000
CADENCE_S = 60
PARTITIONS = 4
SHARDS = 2
LATENESS_S = 180
MAX_FILL = 4
CLIENT_ID = "mw-flow-test"
BIN = Path(sys.executable).parent


@dataclass
class Load:
    """Messages per partition in publish order, and what went into them."""

    messages: dict[int, list[bytes]] = field(default_factory=lambda: defaultdict(list))
    readings: set[tuple[str, int]] = field(default_factory=set)  # unique (device, seq)
    keyed_duplicates: int = 0  # repeated readings in other messages
    copies: int = 0  # messages published twice
    garbage: list[bytes] = field(default_factory=list)
    registered: dict[str, int] = field(default_factory=dict)  # device -> cadence_s

    @property
    def message_count(self) -> int:
        return sum(len(m) for m in self.messages.values())


def reading(device: str, seq: int) -> Reading:
    return Reading(device_id=device, ts_ms=T0 + seq * CADENCE_S * 1000, seq=seq,
                   metrics={"flow_lpm": round(1 + (seq % 7) * 0.5, 3), "battery_v": 3.6})


def build_load(seed: int, devices: int = 24, minutes: int = 40, per_message: int = 12) -> Load:
    """The scripted load (see the module doc); deterministic for a seed."""
    rng = random.Random(seed)
    load = Load()
    ids = [f"mtr-{d:04d}" for d in range(devices)]
    load.registered = {d: CADENCE_S for d in ids[::2]}  # the others learn their cadence
    kept: dict[str, list[int]] = {}
    for d, device in enumerate(ids):
        seqs = list(range(minutes))
        short = rng.randrange(5, minutes // 2)
        del seqs[short:short + 1 + d % 3]  # a short gap of 1-3 readings
        if d % 4 == 0:  # a long gap: 8 readings
            long_at = seqs.index(next(s for s in seqs if s > minutes // 2 + 2))
            del seqs[long_at:long_at + 8]
        kept[device] = seqs
    held: dict[int, list[Reading]] = defaultdict(list)  # published at the end: late
    stream: dict[int, list[Reading]] = defaultdict(list)
    for minute in range(minutes):
        for device in ids:
            if minute in kept[device]:
                r = reading(device, minute)
                load.readings.add((device, minute))
                p = partition_of(device, PARTITIONS)
                if minute in (10, 11) and rng.random() < 0.3:
                    held[p].append(r)
                else:
                    stream[p].append(r)
    for p in range(PARTITIONS):
        rows = stream[p]
        batches = [rows[i:i + per_message] for i in range(0, len(rows), per_message)]
        for number, batch in enumerate(batches):
            shuffled = list(batch)
            rng.shuffle(shuffled)  # out of order within a message
            if number % 5 == 3:  # readings repeated from the previous message
                repeat = batches[number - 1][:3]
                shuffled += repeat
                load.keyed_duplicates += len(repeat)
            payload = encode(TelemetryBatch(site="s1", gateway_id="gw-1",
                                            sent_ms=T0, readings=shuffled))
            load.messages[p].append(payload)
            if number % 7 == 2:  # the same message twice (a bridge republish)
                load.messages[p].append(payload)
                load.copies += 1
        if held[p]:
            load.messages[p].append(encode(TelemetryBatch(site="s1", gateway_id="gw-1",
                                                          sent_ms=T0, readings=held[p])))
    alert = Alert(alert_id="a1", device_id="mtr-0000", kind=AlertKind.LEAK,
                  severity=Severity.MINOR, score=0.5, first_ts_ms=T0, last_ts_ms=T0,
                  model_version="v1")
    load.garbage = [b"not json at all", b'{"type": "telemetry"}', encode(alert)]
    for i, junk in enumerate(load.garbage):
        load.messages[i % PARTITIONS].insert(3 + i, junk)
    return load


@dataclass
class Expected:
    """What the flow must produce for a load (no crash: exactly this)."""

    measured: dict[tuple[str, int], float]  # (device, ts_ms) -> flow_lpm, imputed=false
    imputed: dict[tuple[str, int], float]  # (device, ts_ms) -> flow_lpm, imputed=true
    counts: dict[str, int]
    dead_letter_reasons: list[str]


def expected(load: Load) -> Expected:
    """Run the per-shard logic over the load exactly as the flow sees it."""
    shards: dict[int, ShardState] = {}
    measured: dict[tuple[str, int], float] = {}
    imputed: dict[tuple[str, int], float] = {}
    reasons = []
    cadences = {d: float(c) for d, c in load.registered.items()}

    def take(points: Any) -> None:
        for p in points:
            target = imputed if p.kind is Kind.IMPUTED else measured
            target[(p.device_id, p.ts_ms)] = p.metrics["flow_lpm"]

    for p in range(PARTITIONS):
        seen: set[bytes] = set()
        for payload in load.messages[p]:
            if payload in seen:
                continue  # a byte-identical copy, soon after: skipped by the source
            seen.add(payload)
            try:
                batch = decode(payload, TelemetryBatch)
            except ValueError as exc:
                reasons.append(exc.reason.value)  # type: ignore[attr-defined]
                continue
            groups: dict[int, list[Reading]] = defaultdict(list)
            for r in batch.readings:
                groups[shard_of(r.device_id, PARTITIONS, SHARDS)].append(r)
            for shard, rows in groups.items():
                state = shards.setdefault(shard, ShardState(order_settings()))
                take(state.process(rows, cadences).points)
    counts = dict.fromkeys(COUNTERS, 0)
    for state in shards.values():
        take(state.flush(cadences).points)
        for name in COUNTERS:
            counts[name] += state.counts[name]
    return Expected(measured, imputed, counts, sorted(reasons))


def order_settings() -> OrderSettings:
    return OrderSettings(allowed_lateness_ms=LATENESS_S * 1000, gap_fill_max_intervals=MAX_FILL)


def write_config(path: Path, cloud: Mosquitto, vm: VictoriaMetrics | None, lake: Path,
                 registry: Path | None, **flow: Any) -> Path:
    settings = {"client_id": CLIENT_ID, "shards_per_partition": SHARDS,
                "allowed_lateness_s": LATENESS_S, "gap_fill_max_intervals": MAX_FILL,
                "idle_flush_s": 1, "lake_dir": str(lake), "write_retry_max_s": 1} | flow
    lines = ['log_level = "INFO"', "[mesh_broker]", f'url = "{cloud.url}"',
             "[mesh]", f"partitions = {PARTITIONS}"]
    if vm is not None:
        lines += ["[influxdb]", f'url = "{vm.url}"', 'token = "unused"', "batch_size = 2000"]
    if registry is not None:
        lines += ["[registry]", f'file = "{registry}"']
    lines.append("[flow]")
    for key, value in settings.items():
        lines.append(f"{key} = {value!r}".replace("'", '"'))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_registry(path: Path, cadences: dict[str, int]) -> Path:
    rows = [",".join(COLUMNS)]
    for device, cadence in cadences.items():
        rows.append(f"{device},customer_meter,residential,false,s1,dma-01,gw-1,{cadence},,")
    path.write_text("\n".join(rows) + "\n")
    return path


def _client(broker: Mosquitto, client_id: str = "", *, persistent: bool = False) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 3600 if persistent else 0
    client.connect(broker.host, broker.port, clean_start=not persistent, properties=properties)
    client.loop_start()
    return client


def create_sessions(cloud: Mosquitto, client_id: str = CLIENT_ID) -> None:
    """Make the flow's partition sessions exist, so what is published before it starts waits."""
    for p in range(PARTITIONS):
        client = _client(cloud, f"{client_id}-p{p}", persistent=True)
        info = client.subscribe(topics.mesh_telemetry(p), qos=1)
        assert info[0] == mqtt.MQTT_ERR_SUCCESS
        time.sleep(0.05)
        client.disconnect()
        client.loop_stop()


def publish(cloud: Mosquitto, load: Load, *, pause_every: int = 0, pause_s: float = 0.0) -> None:
    """Publish every message at QoS1, partition by partition interleaved, waiting for PUBACKs."""
    client = _client(cloud)
    queues = {p: list(m) for p, m in load.messages.items()}
    sent = 0
    while any(queues.values()):
        for p in range(PARTITIONS):
            if queues.get(p):
                info = client.publish(topics.mesh_telemetry(p), queues[p].pop(0), qos=1)
                info.wait_for_publish(10)
                sent += 1
                if pause_every and sent % pause_every == 0:
                    time.sleep(pause_s)
    client.disconnect()
    client.loop_stop()


class DeadLetters:
    """A persistent QoS1 subscriber to ``mw/v1/deadletter/#``."""

    def __init__(self, cloud: Mosquitto) -> None:
        self.topics: list[str] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dl-watch",
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.connect(cloud.host, cloud.port)
        self.client.loop_start()
        self.client.subscribe(topics.subscription("dead_letter"), qos=1)
        assert self._subscribed.wait(10)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.topics.append(msg.topic)

    def reasons(self) -> list[str]:
        with self._lock:
            return sorted(t.rsplit("/", 1)[1] for t in self.topics)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class FlowProcess:
    """``meshwatch flow`` in a subprocess of its own process group (so kill -9 takes all)."""

    def __init__(self, config: Path, log: Path, *, workers: int = 1,
                 recovery: Path | None = None, snapshot_s: float = 1.0) -> None:
        self.args = [str(BIN / "meshwatch"), "flow", "--config", str(config), "-w", str(workers),
                     "-s", str(snapshot_s)]
        if recovery is not None:
            self.args += ["-r", str(recovery)]
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> FlowProcess:
        with self.log.open("ab") as out:
            out.write(f"\n=== start {' '.join(self.args)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=os.environ.copy())
        return self

    def kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_mb(self) -> float:
        """The flow process's resident set size now, in MB (``VmRSS`` of /proc)."""
        assert self.proc is not None, "the flow is not running: start() it first"
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        kb = next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))
        return int(kb) / 1024

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> FlowProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


def telemetry(vm: VictoriaMetrics) -> dict[str, dict[tuple[str, int], list[float]]]:
    """``{"true"|"false": {(device, ts_ms): [flow_lpm samples]}}`` as VictoriaMetrics holds them."""
    vm.force_flush()
    out: dict[str, dict[tuple[str, int], list[float]]] = {"true": {}, "false": {}}
    for series in vm.export('{__name__="mw_telemetry_flow_lpm"}'):
        labels = series["metric"]
        target = out[labels["imputed"]]
        for ts, value in zip(series["timestamps"], series["values"], strict=True):
            target.setdefault((labels["device"], ts), []).append(value)
    return out


def counters(vm: VictoriaMetrics) -> dict[str, int]:
    """The newest value of every ``mw_flow`` counter, summed over shards."""
    vm.force_flush()
    totals: dict[str, int] = defaultdict(int)
    for name in COUNTERS:
        for series in vm.export(f'{{__name__="mw_flow_{name}"}}'):
            newest = max(zip(series["timestamps"], series["values"], strict=True))
            totals[name] += int(newest[1])
    return dict(totals)


def lake_ids(lake: Path) -> list[tuple[str, int]]:
    if not any(lake.rglob("*.parquet")):
        return []
    table = read_lake(lake)
    return list(zip(table.column("device_id").to_pylist(), table.column("seq").to_pylist(),
                    strict=True))


def wait_for(condition: Any, timeout: float, what: str, flow: FlowProcess | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            tail = f"\nflow log:\n{flow.tail()}" if flow is not None else ""
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}{tail}")
        time.sleep(0.2)


def measured_count(vm: VictoriaMetrics) -> int:
    return len(telemetry(vm)["false"])


@contextlib.contextmanager
def dead_letter_watch(cloud: Mosquitto) -> Iterator[DeadLetters]:
    watch = DeadLetters(cloud)
    try:
        yield watch
    finally:
        watch.close()


class AlertWatch:
    """A QoS1 subscriber to ``mw/v1/alerts/#``, decoding every alert it gets."""

    def __init__(self, cloud) -> None:
        self.alerts: list[Alert] = []
        self.topics: list[str] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="alert-watch",
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect(cloud.host, cloud.port)
        self.client.loop_start()
        self.client.subscribe(topics.subscription("alerts"), qos=1)
        assert subscribed.wait(10)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        alert = decode(msg.payload, Alert)
        with self._lock:
            self.alerts.append(alert)
            self.topics.append(msg.topic)

    def distinct(self) -> list[Alert]:
        with self._lock:
            return list({(a.alert_id, a.status, a.last_ts_ms): a for a in self.alerts}.values())

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish_feedback(cloud, feedback: Feedback, alerts: list[Alert]) -> None:
    """Publish a crew's feedback to the district of the alert it names, at QoS1."""
    district = next(a.district for a in alerts if a.alert_id == feedback.alert_ids[0])
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(cloud.host, cloud.port)
    client.loop_start()
    client.publish(topics.build("feedback", district=district), encode(feedback),
                   qos=1).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


def detect_counts(vm) -> dict[str, int]:
    """The newest ``mw_detect`` counters, summed over districts."""
    vm.force_flush()
    totals: dict[str, int] = defaultdict(int)
    for name in ("fed", "behind", "waiting", "feedback"):
        for series in vm.export(f'{{__name__="mw_detect_{name}"}}'):
            totals[name] += int(max(zip(series["timestamps"], series["values"],
                                        strict=True))[1])
    return dict(totals)
