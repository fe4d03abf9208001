"""MQTT in and out for the dataflow: the mesh telemetry source and the dead-letter sink.

**Source.** :class:`MeshSource` is a bytewax ``FixedPartitionedSource`` with one partition
per mesh telemetry partition (``mw/v1/mesh/telemetry/{n}``). Each partition has its own paho
client (client id ``{client_id}-p{n}``) with a persistent session, a QoS1 subscription and
manual acks. MQTT 5 (the default): ``clean_start=False`` on every connect, a session expiry,
and Receive Maximum. MQTT 3.1.1 (``protocol="3.1.1"``, for brokers without MQTT 5 such as the
embedded amqtt): ``clean_session=False`` (such sessions do not expire) and no Receive Maximum,
so the partition bounds what it holds itself: at most ``receive_maximum`` messages received
and not yet acknowledged (queued, taken or pending); the paho network thread waits for a free
slot before it queues the next one, so the rest stays in the broker's session or the socket.

**Ack protocol** (at-least-once in). bytewax calls ``snapshot()`` once per epoch per
partition and does not start epoch N+1's snapshot until epoch N's is committed. A message is
*taken* when ``next_batch`` returns it, which puts it in the epoch being built. At snapshot N
the partition acknowledges what was taken during epoch N-1 (committed by now) and keeps
what was taken during epoch N pending: acks are one snapshot late. Acking at snapshot N what
arrived during epoch N loses messages if the process dies before N is durable.

A message is identified by a 64-bit BLAKE2b digest of its payload: a redelivery is byte for
byte the same, and the digest also covers payloads that do not decode (their dead letter is
not sent twice). The snapshot holds the digests of the pending messages and of those acked
in the last ``remember_epochs`` snapshots. After a restart from snapshot N, the broker
redelivers what was not acked; a message whose digest is in the snapshot is already in the
restored state, so it is acknowledged and skipped (counted in ``skipped``). Everything else
is taken again, and its effects are recomputed from the restored state. Within a process,
a copy of a message still pending (a redelivery on a new connection, or the same bytes
published twice) is skipped and acknowledged together with the original; acks of an older
connection are dropped (packet ids are reused per connection) and the broker redelivers
those messages, which are then skipped. Readings are de-duplicated
again by ``(device, seq)`` in keyed state, whatever happens here.

Back-pressure: when the flow is blocked (a sink retrying), ``next_batch`` is not called,
no snapshot completes, no ack is sent, and the broker stops at Receive Maximum (on 3.1.1, the
partition stops reading at ``receive_maximum``); the rest waits in the session. On 3.1.1 a
blocked network thread sends no PINGREQ either: a broker may drop the connection after 1.5
keep-alives, and the messages not acknowledged come again on the next one (skipped as above).

Undecodable payloads become dead letters, published by
:func:`dataflows.connectors.publish.DeadLetterSink`.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import paho.mqtt.client as mqtt
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.publisher import BrokerAddress, MqttProtocol, apply_address, paho_protocol
from meshwatch.contract import topics

__all__ = ["MeshMessage", "MeshSource", "MqttSourceSettings", "SourceState", "digest"]

log = logging.getLogger(__name__)

IDLE_POLL = timedelta(milliseconds=5)


def digest(payload: bytes) -> bytes:
    """The id of a message: 8 bytes of BLAKE2b over its payload.

    >>> digest(b"{}") == digest(b"{}"), digest(b"{}") == digest(b"[]"), len(digest(b""))
    (True, False, 8)
    """
    return hashlib.blake2b(payload, digest_size=8).digest()


@dataclass(frozen=True, slots=True)
class MqttSourceSettings:
    """How the partitions connect (see the module doc).

    ``receive_maximum`` bounds the messages a partition holds unacknowledged: sent to the
    broker as Receive Maximum on MQTT 5, enforced by the partition itself on 3.1.1.
    """

    broker: BrokerAddress
    partitions: int
    client_id: str = "mw-flow"
    session_expiry_s: int = 7 * 24 * 3600
    receive_maximum: int = 1000
    keepalive_s: int = 30
    max_batch: int = 20
    remember_epochs: int = 5
    protocol: MqttProtocol = "5"

    def __post_init__(self) -> None:
        paho_protocol(self.protocol)  # raises ValueError for anything but "5" and "3.1.1"
        if self.receive_maximum < 1:
            msg = f"receive_maximum must be at least 1, got {self.receive_maximum}"
            raise ValueError(msg)


@dataclass(frozen=True, slots=True)
class MeshMessage:
    """One taken message: its partition, topic, payload and receive time (UTC ms)."""

    partition: int
    topic: str
    payload: bytes
    received_ms: int


@dataclass(slots=True)
class SourceState:
    """What a partition snapshots: digests to skip on redelivery, and its counters."""

    skip: frozenset[bytes] = frozenset()
    taken: int = 0
    skipped: int = 0


@dataclass(slots=True)
class _Delivery:
    connection: int
    mid: int


@dataclass(slots=True)
class _Epoch:
    """Messages taken in one epoch: digest -> where to ack it (and its copies, if any)."""

    taken: dict[bytes, list[_Delivery]] = field(default_factory=dict)


def _connect_properties(session_expiry_s: int, receive_maximum: int) -> Properties:
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = session_expiry_s
    properties.ReceiveMaximum = receive_maximum
    return properties


class _MeshPartition(StatefulSourcePartition[MeshMessage, SourceState]):
    def __init__(self, settings: MqttSourceSettings, partition: int,
                 resume: SourceState | None) -> None:
        self.settings = settings
        self.partition = partition
        self.topic = topics.mesh_telemetry(partition)
        resume = resume or SourceState()
        self.taken_count = resume.taken
        self.skipped_count = resume.skipped
        self._current = _Epoch()  # taken in the epoch being built
        self._previous = _Epoch()  # taken in the epoch being committed
        # digests acked in the last snapshots (and, at first, those of the restored state)
        self._acked: deque[frozenset[bytes]] = deque(maxlen=settings.remember_epochs)
        if resume.skip:
            self._acked.append(resume.skip)
        self._inbox: queue.SimpleQueue[tuple[int, mqtt.MQTTMessage]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._connection = 0
        self._connected = False
        self._closing = False
        v5 = settings.protocol == "5"
        # MQTT 3.1.1 has no Receive Maximum: one slot per message received and not yet
        # acknowledged (released in _ack), taken by the network thread before it queues one
        self._slots = None if v5 else threading.BoundedSemaphore(settings.receive_maximum)
        client_id = f"{settings.client_id}-p{partition}"
        self.client_id = client_id
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=paho_protocol(settings.protocol),
                             clean_session=None if v5 else False, manual_ack=True)
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        apply_address(client, settings.broker)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client
        if v5:
            # clean_start=False on every connect, the first included: a session created clean
            # is not persisted by mosquitto, and a clean start would drop what waits in it.
            client.connect_async(settings.broker.host, settings.broker.port,
                                 keepalive=settings.keepalive_s, clean_start=False,
                                 properties=_connect_properties(settings.session_expiry_s,
                                                                settings.receive_maximum))
        else:  # clean_session=False (set above) holds for every connect
            client.connect_async(settings.broker.host, settings.broker.port,
                                 keepalive=settings.keepalive_s)
        client.loop_start()

    # paho network thread -------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        if reason_code.is_failure:
            log.warning("mesh broker refused %s: %s", self.client_id, reason_code)
            return
        with self._lock:
            self._connection += 1
            self._connected = True
        log.info("partition %d connected as %s (session present: %s)", self.partition,
                 self.client_id, flags.session_present)
        client.subscribe(self.topic, qos=1)  # harmless when the session kept it

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: mqtt.DisconnectFlags,
                       reason_code: ReasonCode, properties: Properties | None) -> None:
        with self._lock:
            self._connected = False
        if not self._closing:
            log.warning("partition %d lost the mesh broker (%s); paho reconnects",
                        self.partition, reason_code)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if self._slots is not None:  # 3.1.1: wait until fewer than receive_maximum are held
            while not self._slots.acquire(timeout=0.5):
                if self._closing:
                    return  # not acknowledged: the session keeps it for the next process
        with self._lock:
            connection = self._connection
        self._inbox.put((connection, msg))

    # bytewax worker thread -----------------------------------------------------------------

    def _ack(self, delivery: _Delivery) -> None:
        with self._lock:
            current = self._connected and delivery.connection == self._connection
        if current:  # else the broker redelivers it on the new connection; it is skipped then
            self._client.ack(delivery.mid, 1)
        self._release()

    def _release(self) -> None:
        """A received message is no longer held (3.1.1: its slot is free)."""
        if self._slots is not None:
            self._slots.release()

    def _known(self, key: bytes) -> list[_Delivery] | bool:
        """The pending deliveries of ``key``; else whether it was acked or restored."""
        pending = self._current.taken.get(key) or self._previous.taken.get(key)
        if pending is not None:
            return pending
        return any(key in acked for acked in self._acked)

    def next_batch(self) -> list[MeshMessage]:
        out: list[MeshMessage] = []
        now_ms = int(time.time() * 1000)
        for _ in range(self.settings.max_batch):
            try:
                connection, msg = self._inbox.get_nowait()
            except queue.Empty:
                break
            if msg.qos == 0:  # nothing to acknowledge, nothing to remember
                out.append(MeshMessage(self.partition, msg.topic, bytes(msg.payload), now_ms))
                self.taken_count += 1
                self._release()
                continue
            payload = bytes(msg.payload)
            key = digest(payload)
            known = self._known(key)
            if isinstance(known, list):  # a copy or redelivery of a pending message: ack it
                known.append(_Delivery(connection, msg.mid))  # with the original
                self.skipped_count += 1
                continue
            if known:
                self._ack(_Delivery(connection, msg.mid))
                self.skipped_count += 1
                continue
            self._current.taken[key] = [_Delivery(connection, msg.mid)]
            self.taken_count += 1
            out.append(MeshMessage(self.partition, msg.topic, payload, now_ms))
        return out

    def next_awake(self) -> datetime | None:
        return None if not self._inbox.empty() else datetime.now(UTC) + IDLE_POLL

    def snapshot(self) -> SourceState:
        # Epoch N-1 is committed: acknowledge what it took. Epoch N's stay pending.
        acked = self._previous
        for deliveries in acked.taken.values():
            for delivery in deliveries:
                self._ack(delivery)
        self._acked.append(frozenset(acked.taken))
        self._previous, self._current = self._current, _Epoch()
        skip = frozenset(self._previous.taken).union(*self._acked)
        return SourceState(skip, self.taken_count, self.skipped_count)

    def close(self) -> None:
        self._closing = True
        self._client.disconnect()
        self._client.loop_stop()


class MeshSource(FixedPartitionedSource[MeshMessage, SourceState]):
    """The mesh telemetry topics, one bytewax partition per mesh partition.

    >>> from edge_agent.publisher import BrokerAddress
    >>> MeshSource(MqttSourceSettings(BrokerAddress("127.0.0.1", 1883), 3)).list_parts()
    ['0', '1', '2']
    """

    def __init__(self, settings: MqttSourceSettings) -> None:
        self.settings = settings

    def list_parts(self) -> list[str]:
        """Every mesh partition (bytewax assigns each to one worker)."""
        return [str(p) for p in range(self.settings.partitions)]

    def build_part(self, step_id: str, for_part: str,
                   resume_state: SourceState | None) -> _MeshPartition:
        """Connect partition ``for_part``, resuming from its snapshot."""
        return _MeshPartition(self.settings, int(for_part), resume_state)

