"""Publishing a simulated fleet to a real mosquitto: every delivered reading arrives."""

from __future__ import annotations

import threading
import time

import paho.mqtt.client as mqtt
import pytest
from servers import Mosquitto

from meshwatch.contract import TelemetryBatch, decode, topics
from simulators import FleetConfig, FleetSimulator, SimConfig
from simulators.publish import FleetPublisher, PublishError, PublishSettings

CONFIG = SimConfig(fleet=FleetConfig(meters=600, meters_per_gateway=150), days=0.25, seed=21)


class Collector:
    """A QoS1 subscriber that decodes every batch and keeps its (device, seq) pairs."""

    def __init__(self, host: str, port: int) -> None:
        self.pairs: list[tuple[str, int]] = []
        self.topics_ok = True
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="collector",
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.connect(host, port)
        self.client.loop_start()
        self.client.subscribe(topics.subscription("site_telemetry"), qos=1)
        assert self._subscribed.wait(10)

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        batch = decode(message.payload, TelemetryBatch)
        with self._lock:
            self.topics_ok &= message.topic == topics.site_telemetry(batch.site,
                                                                    batch.gateway_id)
            self.pairs += [(r.device_id, r.seq) for r in batch.readings]

    def wait_for(self, count: int, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.pairs) < count and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_subscriber_receives_every_delivered_reading(mosquitto: Mosquitto) -> None:
    expected = [pair for block in FleetSimulator(CONFIG)
                for pair in zip(block.device_ids.tolist(), block.seq.tolist(), strict=True)]
    collector = Collector("127.0.0.1", mosquitto.port)
    try:
        simulator = FleetSimulator(CONFIG)
        settings = PublishSettings(mosquitto.url, batch_size=100, connections=3)
        with FleetPublisher(settings) as publisher:
            for block in simulator:
                publisher.publish(block)
            publisher.wait_for_acks()
        assert publisher.readings == len(expected) == simulator.stats.delivered_rows
        collector.wait_for(len(expected))
    finally:
        collector.close()
    assert collector.topics_ok
    assert sorted(collector.pairs) == sorted(expected)  # duplicates included, nothing lost
    assert publisher.messages >= len(expected) / 100


def test_rate_limit_holds_the_publisher_back(mosquitto: Mosquitto) -> None:
    config = SimConfig(fleet=FleetConfig(meters=100), days=0.1, seed=1)
    blocks = list(FleetSimulator(config))
    readings = sum(len(block) for block in blocks)
    settings = PublishSettings(mosquitto.url, batch_size=50, rate=readings / 0.5)
    with FleetPublisher(settings) as publisher:
        for block in blocks:
            publisher.publish(block)
        publisher.wait_for_acks()
        elapsed = publisher.elapsed_s
    assert 0.4 <= elapsed < 5


def test_refused_connection_raises_publish_error() -> None:
    expected = r"cannot connect to the MQTT broker at 127\.0\.0\.1:1"
    with pytest.raises(PublishError, match=expected), \
            FleetPublisher(PublishSettings("mqtt://127.0.0.1:1")):
        pass
