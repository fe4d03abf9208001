"""Bridge throughput against a plain paho relay, on the same two real mosquitto brokers.

Run: python bench/bench_bridge.py [--gateways N] [--batches M] [--partitions P]

Both consumers first create their persistent sessions on the site broker (QoS1 subscriptions),
then disconnect. N gateways x M telemetry batches of 100 readings (pre-encoded) are published
once to the site broker, so the same backlog is queued in both sessions. Each consumer is then
started in turn and timed from start until a QoS1 subscriber on the cloud broker has received
everything it forwards:

- *bridge*: :class:`mesh_bridge.shell.Bridge` with a registry owning every device (validation,
  authorization, de-duplication, P partitions; site ack after the cloud PUBACK, at most 100
  site messages in flight).
- *relay*: a paho client subscribing at QoS1 to site telemetry (Receive Maximum 100, like the
  bridge) and republishing each payload unchanged to one cloud topic at QoS1; each site
  message is acknowledged (paho manual ack) after the cloud PUBACK.

messages/s counts site messages consumed; readings/s counts readings arriving at the cloud.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from servers import Mosquitto

from edge_agent.publisher import parse_broker_url
from mesh_bridge.routing import RouterSpec
from mesh_bridge.shell import Bridge, BridgeSettings, SiteBroker
from meshwatch.contract import Reading, TelemetryBatch, encode, topics
from meshwatch.registry import Device, DeviceKind, Registry

T0 = 1_767_225_600_000
SITE = "dma-01"
READINGS = 100
RELAY_TOPIC = "bench/relay"
IN_FLIGHT = 500  # the bridge default (BridgeSettings.max_in_flight), for both consumers
TIMEOUT_S = 60.0


def devices(gateway: int) -> list[str]:
    """The 100 devices of gateway ``gateway``."""
    return [f"gw{gateway:03d}-m{i:03d}" for i in range(READINGS)]


def registry(gateways: int) -> Registry:
    """Every gateway owns its devices."""
    return Registry([
        Device(device_id=d, device_kind=DeviceKind.CUSTOMER_METER, site=SITE, district=SITE,
               gateway_id=f"gw{g:03d}", cadence_s=900)
        for g in range(gateways) for d in devices(g)
    ])


def backlog(gateways: int, batches: int) -> list[tuple[str, bytes]]:
    """Pre-encoded telemetry: ``batches`` per gateway, round robin, fresh seqs."""
    out = []
    for b in range(batches):
        for g in range(gateways):
            readings = [Reading(device_id=d, ts_ms=T0 + 900_000 * b, seq=b,
                                metrics={"flow_lpm": 1.234 + i % 7, "temperature_c": 11.5,
                                         "battery_v": 3.61})
                        for i, d in enumerate(devices(g))]
            batch = TelemetryBatch(site=SITE, gateway_id=f"gw{g:03d}", sent_ms=T0 + 900_000 * b,
                                   readings=readings)
            out.append((topics.site_telemetry(SITE, f"gw{g:03d}"), encode(batch)))
    return out


def connect_v5(client: mqtt.Client, broker: Mosquitto, receive_max: int | None = None) -> None:
    """Connect with a persistent session (clean_start off, session expiry)."""
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 3600
    if receive_max is not None:
        properties.ReceiveMaximum = receive_max
    client.connect(broker.host, broker.port, clean_start=False, properties=properties)


class Counter:
    """A QoS1 subscriber on the cloud broker counting messages and readings."""

    def __init__(self, cloud: Mosquitto, topic_filter: str) -> None:
        self.messages = self.readings = 0
        self.first_at = 0.0
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"count-{topic_filter}")
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.connect(cloud.host, cloud.port)
        self.client.subscribe(topic_filter, qos=1)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("the counter could not subscribe")

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        if not self.messages:
            self.first_at = time.perf_counter()
        self.messages += 1
        self.readings += msg.payload.count(b'"device_id"')

    def wait_readings(self, readings: int) -> float:
        """Wait until ``readings`` arrived; the seconds from the first arrival to the last."""
        deadline = time.monotonic() + TIMEOUT_S
        while self.readings < readings:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {self.readings} of {readings} readings arrived")
            time.sleep(0.001)
        return time.perf_counter() - self.first_at

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Relay:
    """The plain relay: site QoS1 in, cloud QoS1 out, site ack after the cloud PUBACK."""

    def __init__(self, site: Mosquitto, cloud: Mosquitto) -> None:
        self._site_broker = site
        self._cloud_broker = cloud
        self._lock = threading.Lock()
        self._pending: dict[int, int] = {}  # cloud mid -> site mid
        self._early: set[int] = set()  # cloud mids PUBACKed before they were recorded
        self._subscribed = threading.Event()
        self.cloud = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="relay-cloud")
        self.cloud.max_inflight_messages_set(0)
        self.cloud.on_publish = self._on_publish
        self.site = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="relay-site",
                                protocol=mqtt.MQTTv5, manual_ack=True)
        self.site.on_message = self._on_message
        self.site.on_subscribe = lambda *_: self._subscribed.set()

    def start(self) -> None:
        """Connect both sides and subscribe (resuming the session when it exists)."""
        self.cloud.connect(self._cloud_broker.host, self._cloud_broker.port)
        self.cloud.loop_start()
        connect_v5(self.site, self._site_broker, receive_max=IN_FLIGHT)
        self.site.subscribe(topics.subscription("site_telemetry"), qos=1)
        self.site.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("the relay could not subscribe")

    def stop(self) -> None:
        """Disconnect both sides; the site session stays."""
        self.site.disconnect()
        self.site.loop_stop()
        self.cloud.disconnect()
        self.cloud.loop_stop()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        # Not under self._lock: paho holds its own lock while calling on_publish.
        info = self.cloud.publish(RELAY_TOPIC, msg.payload, qos=1)
        with self._lock:
            early = info.mid in self._early
            if early:
                self._early.discard(info.mid)
            else:
                self._pending[info.mid] = msg.mid
        if early:
            self.site.ack(msg.mid, 1)

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int, *_: object) -> None:
        with self._lock:
            site_mid = self._pending.pop(mid, None)
            if site_mid is None:  # the PUBACK beat the bookkeeping
                self._early.add(mid)
        if site_mid is not None:
            self.site.ack(site_mid, 1)


def make_bridge(site: Mosquitto, cloud: Mosquitto, gateways: int, partitions: int,
                processes: int) -> Bridge:
    """A bridge with default settings whose registry owns every device (own session)."""
    settings = BridgeSettings(sites=(SiteBroker(parse_broker_url(site.url)),),
                              cloud=parse_broker_url(cloud.url),
                              client_id=f"bench-bridge-{processes}", max_in_flight=IN_FLIGHT,
                              routing_processes=processes)
    return Bridge(settings, RouterSpec(registry(gateways), partitions=partitions))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gateways", type=int, default=10)
    parser.add_argument("--batches", type=int, default=300, help="batches per gateway")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2],
                        help="bridge router processes to compare (default: 1 2)")
    args = parser.parse_args()
    messages = backlog(args.gateways, args.batches)
    total_readings = len(messages) * READINGS
    with tempfile.TemporaryDirectory() as base:
        (Path(base) / "site").mkdir()
        (Path(base) / "cloud").mkdir()
        with Mosquitto(Path(base) / "site") as site, Mosquitto(Path(base) / "cloud") as cloud:
            # 1. Sessions: every consumer subscribes once, then goes away.
            for processes in args.processes:
                bridge = make_bridge(site, cloud, args.gateways, args.partitions, processes)
                bridge.start()
                if not bridge.site.subscribed.wait(10):
                    raise RuntimeError("the bridge could not subscribe")
                bridge.stop(5)
            relay = Relay(site, cloud)
            relay.start()
            relay.stop()
            # 2. The backlog, queued in every session.
            publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-pub")
            publisher.max_inflight_messages_set(1000)
            publisher.connect(site.host, site.port)
            publisher.loop_start()
            infos = [publisher.publish(t, p, qos=1) for t, p in messages]
            for info in infos:
                info.wait_for_publish(TIMEOUT_S)
            publisher.disconnect()
            publisher.loop_stop()
            # 3. Drain, one consumer at a time, timed from the first arrival to the last.
            results = {}
            for processes in args.processes:
                counter = Counter(cloud, topics.subscription("mesh_telemetry"))
                bridge = make_bridge(site, cloud, args.gateways, args.partitions, processes)
                bridge.start()
                seconds = counter.wait_readings(total_readings)
                results[f"bridge, {processes} router process(es)"] = (seconds, counter.messages)
                bridge.stop(10)
                counter.close()
            counter = Counter(cloud, RELAY_TOPIC)
            relay = Relay(site, cloud)
            relay.start()
            results["relay"] = (counter.wait_readings(total_readings), counter.messages)
            relay.stop()
            counter.close()
    print(f"{args.gateways} gateways x {args.batches} batches x {READINGS} readings = "
          f"{len(messages)} site messages, {total_readings} readings; "
          f"bridge P={args.partitions}\n")
    print("| consumer | seconds | readings/s | messages/s (site in) | cloud messages | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    relay_rate = total_readings / results["relay"][0]
    for name, (seconds, out) in results.items():
        rate = total_readings / seconds
        print(f"| {name} | {seconds:.2f} | {rate:,.0f} | {len(messages) / seconds:,.0f} | "
              f"{out} | {rate / relay_rate:.0%} |")


if __name__ == "__main__":
    main()
