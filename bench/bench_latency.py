"""Alert latency: a reading published to the site broker → its alert on the mesh's alert topic.

Run: python bench/bench_latency.py [--fraction 0.2] [--lateness 0 60] [--rounds 240]

The chain is ``meshwatch bridge`` (site mosquitto → cloud mosquitto) and ``meshwatch flow -w 1
-s 1`` with detection, writing to VictoriaMetrics (no lake, no recovery directory), as
deployed. The fleet: ``--districts`` districts, each behind one gateway of its own site, with
one inlet (district meter: ``flow_lpm``, ``pressure_bar``) and customer meters, every device
reporting once per *round*; a round is one event-time minute, published every ``--period``
wall seconds (event time runs 60 / period times faster than wall time).

1. **Maximum.** ``--max-rounds`` rounds are published into the bridge's site session as a
   backlog; the bridge and the flow start, and the rate from the flow's first connection
   until its counters (``mw_flow``, ``mw_detect fed``) show every reading is the maximum.
2. **Latency**, per ``--lateness`` (``flow.allowed_lateness_s``, event-time seconds): the
   customer meters per district are chosen so that the offered load is ``--fraction`` of the
   maximum; every inlet has bursts (flow up, pressure down for 3 readings) about every 80
   rounds, staggered over districts. A burst opens an alert on its first reading
   (``alert.last_ts_ms``). Latency is the time from the publish of the message carrying that
   reading (its district's, that round's) to the alert's arrival at a subscriber of
   ``mw/v1/alerts/#`` on the cloud broker; a subscriber of the mesh telemetry splits it into
   the bridge's part (site publish → mesh) and the flow's (mesh → alert). The bridge does not
   expose when a message reached it, so this is measured from the publish to the site broker:
   an upper bound of the bridge's arrival. Only openings are timed: a clear comes with a
   reading 15 event minutes after the burst, which the alert does not name (counted as
   "other alert messages").

An inlet's in-order readings reach the burst detector on the fast path (see
:mod:`dataflows.detection`): at once, without waiting for the district's watermark, except a
burst stamped after a 15-minute boundary that the district's watermark has not reached yet
(its ticks go first): it waits until every ordering shard holding a device of the district
has seen a reading ``allowed_lateness_s`` newer than the boundary. Before the fast path every
burst waited so: ``lateness / 60 * period`` wall seconds here (rounds), ``lateness`` seconds
on a live fleet. ``--idle-flush`` sets ``flow.idle_flush_s``, after which a district stops
waiting for a shard that is behind (see the BENCHMARKS notes on lateness 0).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_flow import written
from bridge_support import P, create_site_session, spawn_bridge
from bridge_support import write_config as write_bridge_config
from flow_support import FlowProcess, create_sessions
from servers import Mosquitto, VictoriaMetrics

from meshwatch.contract import Alert, Reading, TelemetryBatch, decode, encode, topics
from meshwatch.registry import COLUMNS

T0 = 1_767_225_600_000  # a 15-minute boundary
ROUND_MS = 60_000
BURST_EVERY = 80  # rounds: a burst, 15 minutes to clear, and more than the 1 h fold after it
BURST_ROUNDS = 3
BURST_FLOW = 950.0
WARMUP_ROUNDS = 20  # the burst detector's reference needs 10 readings
FLOW_ID = "bench-latency"
BRIDGE_ID = "bench-latency-bridge"


@dataclass(frozen=True)
class Fleet:
    """Districts, each one gateway and site, one inlet and ``customers`` customer meters."""

    districts: int
    customers: int

    @property
    def per_round(self) -> int:
        return self.districts * (1 + self.customers)

    def district(self, d: int) -> str:
        return f"dma-{d + 1:03d}"

    def write_registry(self, path: Path) -> Path:
        rows = [",".join(COLUMNS)]
        for d in range(self.districts):
            name = self.district(d)
            rows.append(f"{name}-inlet,district_meter,,false,{name},{name},{name}-gw,60,,")
            rows += [f"{name}-m{c:04d},customer_meter,residential,false,{name},{name},"
                     f"{name}-gw,60,," for c in range(self.customers)]
        path.write_text("\n".join(rows) + "\n")
        return path

    def bursting(self, d: int, k: int) -> bool:
        """Whether district ``d``'s inlet reads a burst in round ``k`` (staggered)."""
        phase = k - WARMUP_ROUNDS - (d * 7) % BURST_EVERY
        return phase >= 0 and phase % BURST_EVERY < BURST_ROUNDS

    def messages(self, rounds: int, seed: int = 1) -> list[list[tuple[str, bytes]]]:
        """Per round, ``(topic, payload)`` per district: its gateway's batch of the round."""
        rng = random.Random(seed)
        out = []
        for k in range(rounds):
            ts = T0 + k * ROUND_MS
            batch = []
            for d in range(self.districts):
                name = self.district(d)
                burst = self.bursting(d, k)
                inlet = {"flow_lpm": BURST_FLOW if burst else 700.0 + 10 * (k % 3),
                         "pressure_bar": 3.2 if burst else 3.9 - 0.01 * (k % 2)}
                readings = [Reading.model_construct(device_id=f"{name}-inlet", ts_ms=ts, seq=k,
                                                    metrics=inlet, quality=())]
                readings += [Reading.model_construct(
                    device_id=f"{name}-m{c:04d}", ts_ms=ts, seq=k, quality=(),
                    metrics={"flow_lpm": round(rng.random() * 3, 3), "battery_v": 3.6})
                    for c in range(self.customers)]
                payload = encode(TelemetryBatch.model_construct(
                    site=name, gateway_id=f"{name}-gw", sent_ms=ts, readings=readings))
                batch.append((topics.site_telemetry(name, f"{name}-gw"), payload))
            out.append(batch)
        return out


class _Clock:
    """A subscriber to ``topic_filter`` that stamps each message's arrival (``time.monotonic``)
    and hands both to ``arrived``."""

    def __init__(self, broker: Mosquitto, topic_filter: str, qos: int,
                 arrived: Callable[[float, mqtt.MQTTMessage], None]) -> None:
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = lambda _c, _u, msg: arrived(time.monotonic(), msg)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe(topic_filter, qos=qos)
        if not subscribed.wait(10):
            msg = f"cannot subscribe to {topic_filter} at {broker.url}"
            raise RuntimeError(msg)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class MeshClock(_Clock):
    """When each burst reading arrived in the mesh (after the bridge), by ``(district, round)``."""

    def __init__(self, broker: Mosquitto) -> None:
        self.arrivals: dict[tuple[str, int], float] = {}
        super().__init__(broker, topics.subscription("mesh_telemetry"), 0, self._arrived)

    def _arrived(self, now: float, msg: mqtt.MQTTMessage) -> None:
        if b"950.0" not in msg.payload:  # no burst reading in it
            return
        for reading in json.loads(msg.payload)["readings"]:
            if reading["metrics"].get("flow_lpm") == BURST_FLOW:
                k = (reading["ts_ms"] - T0) // ROUND_MS
                with self._lock:
                    self.arrivals.setdefault((reading["device_id"][:-len("-inlet")], k), now)


class AlertClock(_Clock):
    """Each alert of ``mw/v1/alerts/#`` with its arrival time."""

    def __init__(self, broker: Mosquitto) -> None:
        self.arrivals: list[tuple[float, Alert]] = []
        super().__init__(broker, topics.subscription("alerts"), 1, self._arrived)

    def _arrived(self, now: float, msg: mqtt.MQTTMessage) -> None:
        alert = decode(msg.payload, Alert)
        with self._lock:
            self.arrivals.append((now, alert))


def publisher(broker: Mosquitto) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(0)  # no limit: the rounds' timing is the bench's
    client.connect(broker.host, broker.port)
    client.loop_start()
    return client


def flow_config(path: Path, cloud: Mosquitto, vm: VictoriaMetrics, registry: Path,
                lateness_s: float, idle_flush_s: float) -> Path:
    path.write_text("\n".join([
        'log_level = "INFO"', "[mesh_broker]", f'url = "{cloud.url}"', "[mesh]",
        f"partitions = {P}", "[influxdb]", f'url = "{vm.url}"', 'token = "unused"',
        "batch_size = 5000", "[registry]", f'file = "{registry}"', "[flow]",
        f'client_id = "{FLOW_ID}"', f"allowed_lateness_s = {lateness_s}",
        f"idle_flush_s = {idle_flush_s}", "snapshot_interval_s = 1"]) + "\n")
    return path


@contextlib.contextmanager
def chain(base: Path) -> Iterator[tuple[Mosquitto, Mosquitto, VictoriaMetrics]]:
    """Fresh brokers and VictoriaMetrics, the sessions of the bridge and the flow created."""
    base.mkdir()
    (base / "cloud").mkdir()
    with Mosquitto(base) as site, Mosquitto(base / "cloud") as cloud, \
            VictoriaMetrics(base) as vm:
        create_site_session(site, BRIDGE_ID)
        create_sessions(cloud, FLOW_ID)
        yield site, cloud, vm


@contextlib.contextmanager
def running(base: Path, fleet: Fleet, site: Mosquitto, cloud: Mosquitto, vm: VictoriaMetrics,
            lateness_s: float, idle_flush_s: float = 1.0) -> Iterator[FlowProcess]:
    """The bridge and the flow, started; stopped on the way out."""
    registry = fleet.write_registry(base / "registry.csv")
    bridge = spawn_bridge(write_bridge_config(base, site, cloud, BRIDGE_ID, registry=registry),
                          base / "bridge.log")
    config = flow_config(base / "flow.toml", cloud, vm, registry, lateness_s, idle_flush_s)
    flow = FlowProcess(config, base / "flow.log", snapshot_s=1.0).start()
    try:
        yield flow
    finally:
        flow.kill()
        bridge.kill()
        bridge.wait()


def maximum(base: Path, fleet: Fleet, rounds: int) -> float:
    """Readings per second through bridge and flow with detection, from a backlog."""
    messages = fleet.messages(rounds)
    total = fleet.per_round * rounds
    with chain(base) as (site, cloud, vm):
        client = publisher(site)
        infos = [client.publish(topic, payload, qos=1) for batch in messages
                 for topic, payload in batch]
        for info in infos:
            info.wait_for_publish(60)
        with running(base, fleet, site, cloud, vm, 60) as flow:
            while "connected as" not in flow.log.read_text():
                time.sleep(0.05)
            start = time.monotonic()
            while written(vm, detect=True) < total:
                if not flow.alive() or time.monotonic() - start > 600:
                    msg = f"the flow did not take the backlog; see {flow.log}"
                    raise RuntimeError(msg)
                time.sleep(0.1)
            seconds = time.monotonic() - start
        client.disconnect()
        client.loop_stop()
    return total / seconds


@dataclass
class Latencies:
    """Milliseconds per burst alert opened: publish → alert, publish → mesh, mesh → alert."""

    total: list[float]
    bridge: list[float]
    flow: list[float]
    rounds: list[int]  # the round of each burst alert's reading
    offered: float
    other_alerts: int  # clears and other kinds: no single triggering reading to time from
    flow_cpu: float  # the flow's CPU seconds per wall second while the load was offered

    def by_third(self, n: int) -> list[float]:
        """Median total latency (ms) of the alerts of each third of the run's rounds."""
        thirds: list[list[float]] = [[], [], []]
        for k, value in zip(self.rounds, self.total, strict=True):
            thirds[min(2, 3 * k // n)].append(value)
        return [statistics.median(t) if t else float("nan") for t in thirds]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def latency(base: Path, fleet: Fleet, rounds: int, period_s: float, lateness_s: float,
            idle_flush_s: float) -> Latencies:
    """The burst alerts' latencies at the fleet's load (see the module doc)."""
    messages = fleet.messages(rounds)
    published: dict[tuple[str, int], float] = {}
    with chain(base) as (site, cloud, vm):
        clock = AlertClock(cloud)
        mesh = MeshClock(cloud)
        client = publisher(site)
        with running(base, fleet, site, cloud, vm, lateness_s, idle_flush_s) as flow:
            while "connected as" not in flow.log.read_text():
                time.sleep(0.05)
            time.sleep(2)  # the bridge too
            assert flow.proc is not None
            cpu_before = cpu_seconds(flow.proc.pid)
            start = time.monotonic()
            for k, batch in enumerate(messages):
                wait = start + k * period_s - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                for d, (topic, payload) in enumerate(batch):
                    published[(fleet.district(d), k)] = time.monotonic()
                    client.publish(topic, payload, qos=1)
            wall = time.monotonic() - start
            offered = fleet.per_round * rounds / wall
            flow_cpu = (cpu_seconds(flow.proc.pid) - cpu_before) / wall
            deadline = time.monotonic() + 600
            while written(vm, detect=True) < fleet.per_round * rounds - fleet.per_round:
                if not flow.alive() or time.monotonic() > deadline:  # the last round waits
                    msg = f"the flow did not take the load; see {flow.log}"
                    raise RuntimeError(msg)
                time.sleep(0.2)
            time.sleep(2)  # the last alerts
        clock.close()
        mesh.close()
        client.disconnect()
        client.loop_stop()
    out = Latencies([], [], [], [], offered, 0, flow_cpu)
    for arrived, alert in clock.arrivals:
        if (alert.kind.value, alert.status.value) != ("burst", "open"):
            out.other_alerts += 1
            continue
        key = (alert.district or "", (alert.last_ts_ms - T0) // ROUND_MS)
        sent, in_mesh = published[key], mesh.arrivals[key]
        out.total.append((arrived - sent) * 1000)
        out.bridge.append((in_mesh - sent) * 1000)
        out.flow.append((arrived - in_mesh) * 1000)
        out.rounds.append(key[1])
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--districts", type=int, default=60)
    parser.add_argument("--max-customers", type=int, default=99,
                        help="customer meters per district for the maximum")
    parser.add_argument("--max-rounds", type=int, default=40)
    parser.add_argument("--max-rate", type=float, default=None,
                        help="skip step 1: the maximum readings/s")
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--period", type=float, default=0.5, help="wall seconds per round")
    parser.add_argument("--rounds", type=int, default=240)
    parser.add_argument("--lateness", type=float, nargs="+", default=[0.0, 60.0])
    parser.add_argument("--idle-flush", type=float, default=1.0,
                        help="flow.idle_flush_s (wall seconds)")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        top = args.max_rate
        if top is None:
            fleet = Fleet(args.districts, args.max_customers)
            top = maximum(base / "max", fleet, args.max_rounds)
            print(f"maximum: {top:,.0f} readings/s ({fleet.per_round} devices x "
                  f"{args.max_rounds} rounds, backlog), load average {os.getloadavg()}")
        target = args.fraction * top
        customers = max(0, round(target * args.period / args.districts) - 1)
        fleet = Fleet(args.districts, customers)
        print(f"offering {args.fraction:.0%}: {fleet.per_round} devices every {args.period}s "
              f"({args.districts} districts x (1 inlet + {customers} meters))")
        print(f"{'lateness s':>10} {'offered/s':>10} {'alerts':>6} {'p50 ms':>7} {'p99 ms':>7}"
              f" {'max ms':>7} {'bridge p50/p99':>15} {'flow p50/p99':>13}  load average")
        for lateness in args.lateness:
            found = latency(base / f"lat-{lateness:g}", fleet, args.rounds, args.period,
                            lateness, args.idle_flush)
            t, b, f = found.total, found.bridge, found.flow
            print(f"{lateness:10g} {found.offered:10,.0f} {len(t):6d} {statistics.median(t):7.0f}"
                  f" {percentile(t, 0.99):7.0f} {max(t):7.0f}"
                  f" {statistics.median(b):7.0f}/{percentile(b, 0.99):<7.0f}"
                  f" {statistics.median(f):6.0f}/{percentile(f, 0.99):<6.0f}"
                  f"  {os.getloadavg()[0]:.2f}")
            thirds = " / ".join(f"{m:.0f}" for m in found.by_third(args.rounds))
            print(f"{'':10} p50 ms by third of the run: {thirds}; flow CPU "
                  f"{found.flow_cpu:.0%} of a core; {found.other_alerts} other alert messages")


if __name__ == "__main__":
    main()
