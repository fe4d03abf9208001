"""Publish a simulated fleet to MQTT as its gateways would: TelemetryBatch JSON at QoS1.

Each gateway's blocks go to ``meshwatch.contract.topics.site_telemetry(site, gateway)``,
split into messages of at most ``batch_size`` readings. A small pool of MQTT v5
connections shares the gateways (a gateway always uses the same connection, so its
messages stay in order); each connection allows many QoS1 messages in flight and the
publisher waits for every PUBACK before it reports success. ``rate`` caps readings per
second (0: as fast as the broker acknowledges).

>>> parse_mqtt_url("mqtt://127.0.0.1:1883")
('127.0.0.1', 1883)
>>> parse_mqtt_url("http://x")
Traceback (most recent call last):
...
ValueError: broker URL 'http://x' must look like mqtt://host:port
"""

from __future__ import annotations

import threading
import time
import urllib.parse
import zlib
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt

from meshwatch.contract import topics
from simulators.block import MAX_READINGS_PER_BATCH, ReadingBlock

CONNECT_TIMEOUT_S = 10.0
DEFAULT_PORT = 1883


class PublishError(RuntimeError):
    """Publishing failed: the broker is unreachable, refused us, or did not acknowledge."""


@dataclass(frozen=True)
class PublishSettings:
    """Where and how to publish; see the module docstring."""

    url: str
    batch_size: int = 500
    rate: float = 0.0  # readings per second; 0 = unlimited
    connections: int = 4
    max_inflight: int = 1000
    client_id_prefix: str = "meshwatch-sim"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""
        parse_mqtt_url(self.url)
        if not 1 <= self.batch_size <= MAX_READINGS_PER_BATCH:
            msg = f"batch size is {self.batch_size}; use 1 to {MAX_READINGS_PER_BATCH}"
            raise ValueError(msg)
        if not self.rate >= 0:
            msg = f"rate is {self.rate}; use readings per second, or 0 for no limit"
            raise ValueError(msg)
        if not 1 <= self.connections <= 64:
            msg = f"connections is {self.connections}; use 1 to 64"
            raise ValueError(msg)
        if self.max_inflight < 1:
            msg = f"max_inflight is {self.max_inflight}; use at least 1"
            raise ValueError(msg)


def parse_mqtt_url(url: str) -> tuple[str, int]:
    """Host and port of an ``mqtt://host[:port]`` URL; ``ValueError`` if it is not one."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        port = -1
    if parts.scheme != "mqtt" or not parts.hostname or port < 1:
        msg = f"broker URL {url!r} must look like mqtt://host:port"
        raise ValueError(msg)
    return parts.hostname, port


class _Connection:
    """One paho client with counters of published and acknowledged messages."""

    def __init__(self, client_id: str, max_inflight: int) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(max_inflight)
        self.client.max_queued_messages_set(0)
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.connected = threading.Event()
        self.refusal: str | None = None
        self.published = 0
        self.acked = 0
        self.failed = 0
        self.changed = threading.Condition()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any,
                    reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self.refusal = str(reason)
        self.connected.set()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any,
                    properties: Any) -> None:
        with self.changed:
            self.acked += 1
            if reason.is_failure:
                self.failed += 1
            self.changed.notify_all()


class FleetPublisher:
    """A pool of MQTT connections that publishes reading blocks; use as a context manager."""

    def __init__(self, settings: PublishSettings) -> None:
        settings.validate()
        self.settings = settings
        self._connections: list[_Connection] = []
        self.messages = 0
        self.readings = 0
        self._started = 0.0

    def __enter__(self) -> FleetPublisher:
        """Connect every client; raise :class:`PublishError` if the broker is not there."""
        host, port = parse_mqtt_url(self.settings.url)
        try:
            for index in range(self.settings.connections):
                connection = _Connection(f"{self.settings.client_id_prefix}-{index}",
                                         self.settings.max_inflight)
                self._connections.append(connection)
                connection.client.connect(host, port, keepalive=60)
                connection.client.loop_start()
            for connection in self._connections:
                if not connection.connected.wait(CONNECT_TIMEOUT_S):
                    msg = (f"no answer from the MQTT broker at {host}:{port} within "
                           f"{CONNECT_TIMEOUT_S:.0f} s; check the URL and the broker")
                    raise PublishError(msg)
                if connection.refusal is not None:
                    msg = f"the MQTT broker at {host}:{port} refused us: {connection.refusal}"
                    raise PublishError(msg)
        except OSError as exc:
            self._disconnect()
            msg = (f"cannot connect to the MQTT broker at {host}:{port} ({exc.strerror or exc});"
                   " is it running and is the URL right?")
            raise PublishError(msg) from None
        except PublishError:
            self._disconnect()
            raise
        self._started = time.perf_counter()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        """Disconnect every client (after :meth:`wait_for_acks` on success)."""
        self._disconnect()

    def publish(self, block: ReadingBlock) -> None:
        """Publish one block as messages of at most ``batch_size`` readings."""
        settings = self.settings
        connection = self._connections[
            zlib.crc32(block.gateway_id.encode()) % len(self._connections)]
        topic = topics.site_telemetry(block.site, block.gateway_id)
        for payload in block.to_json_payloads(settings.batch_size):
            self._wait_for_room(connection)
            info = connection.client.publish(topic, payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                msg = f"publishing to {topic} failed: {mqtt.error_string(info.rc)}"
                raise PublishError(msg)
            with connection.changed:
                connection.published += 1
            self.messages += 1
        self.readings += len(block)
        if settings.rate > 0:
            ahead = self.readings / settings.rate - (time.perf_counter() - self._started)
            if ahead > 0:
                time.sleep(ahead)

    def _wait_for_room(self, connection: _Connection) -> None:
        """Keep at most twice the in-flight window queued per connection."""
        limit = 2 * self.settings.max_inflight
        with connection.changed:
            while connection.published - connection.acked >= limit:
                if not connection.changed.wait(CONNECT_TIMEOUT_S):
                    msg = "the MQTT broker stopped acknowledging messages; is it overloaded?"
                    raise PublishError(msg)

    def wait_for_acks(self, timeout_s: float = 60.0) -> None:
        """Block until every published message is acknowledged (PUBACK)."""
        deadline = time.monotonic() + timeout_s
        for connection in self._connections:
            with connection.changed:
                while connection.acked < connection.published:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        missing = connection.published - connection.acked
                        msg = f"{missing} messages were not acknowledged within {timeout_s} s"
                        raise PublishError(msg)
                    connection.changed.wait(left)
            if connection.failed:
                msg = f"the broker rejected {connection.failed} messages (PUBACK failure)"
                raise PublishError(msg)

    @property
    def elapsed_s(self) -> float:
        """Seconds since the connections were up."""
        return time.perf_counter() - self._started

    def _disconnect(self) -> None:
        for connection in self._connections:
            connection.client.disconnect()
            connection.client.loop_stop()
        self._connections.clear()
