"""The alert consumer: MQTT in, :meth:`Store.ingest` in the middle, acknowledgement last.

The client subscribes at QoS1 to ``mw/v1/alerts/+/+`` with a stable client id and a persistent
session (MQTT 5 ``clean_start=False`` on every connect, with a session expiry), and uses
paho's manual acknowledgement: the network thread only queues what arrives; the worker thread
decodes up to ``batch_max`` queued messages, stores them (alerts, and dead letters for what
breaks the contract) in **one** transaction, and only after the commit sends their PUBACKs,
on the connection they came on. A crash before the commit loses nothing: the broker sends the
messages again, and :meth:`Store.ingest` takes a redelivered alert for the duplicate it is.

A message that is not a valid ``Alert`` (bad JSON, a missing field, a wrong ``type``, a topic
that is not an alert topic) is not dropped: it becomes a ``DeadLetter`` with the contract's
reason code, queued in the database outbox in the same transaction and published by
:class:`remediation.notify.OutboxSender` to ``mw/v1/deadletter/{reason}``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from prometheus_client import CollectorRegistry, Counter, Histogram

from edge_agent.publisher import BrokerAddress, apply_address
from meshwatch.contract import topics
from meshwatch.contract.codec import decode
from meshwatch.contract.errors import ContractError, Reason
from meshwatch.contract.events import Alert
from remediation.store import Incoming, Store, dead_letter_for, now_ms

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 24 * 3600
RECEIVE_MAXIMUM = 2000


@dataclass(frozen=True, slots=True)
class _Message:
    topic: str
    payload: bytes
    mid: int
    qos: int
    connection: int
    arrived: float


class IntakeMetrics:
    """Prometheus metrics of the intake."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.received = Counter("mw_remediation_alert_messages", "alert messages received",
                                registry=registry)
        self.outcomes = Counter("mw_remediation_alerts", "alerts by intake outcome",
                                ["outcome"], registry=registry)
        self.latency = Histogram("mw_remediation_intake_seconds",
                                 "message arrival to commit", registry=registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))


class AlertIntake:
    """Consume the alert topic into the store; see the module doc."""

    def __init__(self, store: Store, broker: BrokerAddress, *, client_id: str,
                 batch_max: int = 200, protocol: str = "5",
                 registry: CollectorRegistry | None = None) -> None:
        self.store = store
        self.broker = broker
        self.client_id = client_id
        self.batch_max = batch_max
        self.protocol = protocol
        self.metrics = IntakeMetrics(registry or CollectorRegistry())
        self.stored = 0
        self.duplicates = 0
        self.dead_letters = 0
        self.last_commit = 0.0
        self._queue: queue.Queue[_Message] = queue.Queue()
        self._connection = 0
        self._stop = threading.Event()
        self._client: mqtt.Client | None = None
        self._worker = threading.Thread(target=self._run, name="remediation-intake",
                                        daemon=True)

    @property
    def connected(self) -> bool:
        """Whether the MQTT connection is up."""
        return self._client is not None and self._client.is_connected()

    def start(self) -> AlertIntake:
        """Connect (paho reconnects with back-off) and start the worker."""
        v5 = self.protocol == "5"
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                             clean_session=None if v5 else False, manual_ack=True)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.max_inflight_messages_set(RECEIVE_MAXIMUM)
        apply_address(client, self.broker)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        if v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = SESSION_EXPIRY_S
            props.ReceiveMaximum = RECEIVE_MAXIMUM
            client.connect_async(self.broker.host, self.broker.port, keepalive=30,
                                 clean_start=False, properties=props)
        else:
            client.connect_async(self.broker.host, self.broker.port, keepalive=30)
        self._client = client
        client.loop_start()
        self._worker.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop: what was committed is acknowledged; the rest comes again next start."""
        self._stop.set()
        self._worker.join(timeout_s)
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Properties | None) -> None:
        if reason.is_failure:
            log.warning("alert broker refused the connection: %s", reason)
            return
        self._connection += 1
        client.subscribe(topics.subscription("alerts"), qos=1)
        log.info("consuming %s (connection %d)", topics.subscription("alerts"),
                 self._connection)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage,
                    ) -> None:
        self.metrics.received.inc()
        self._queue.put(_Message(message.topic, bytes(message.payload), message.mid,
                                 message.qos, self._connection, time.monotonic()))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            batch = [first]
            while len(batch) < self.batch_max:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            while not self._stop.is_set():
                try:
                    self._process(batch)
                    break
                except Exception:
                    log.exception("storing %d alerts failed; retrying in 1 s", len(batch))
                    time.sleep(1.0)

    def _process(self, batch: list[_Message]) -> None:
        items = [self.incoming(m.topic, m.payload) for m in batch]
        result = self.store.ingest(items)
        self.last_commit = time.monotonic()
        self.stored += result.stored
        self.duplicates += result.duplicates
        self.dead_letters += result.dead_letters
        self.metrics.outcomes.labels("stored").inc(result.stored)
        self.metrics.outcomes.labels("duplicate").inc(result.duplicates)
        self.metrics.outcomes.labels("dead_letter").inc(
            sum(1 for item in items if item.dead_letter is not None))
        client = self._client
        for message in batch:
            self.metrics.latency.observe(self.last_commit - message.arrived)
            if client is not None and message.qos > 0 and message.connection == self._connection:
                client.ack(message.mid, message.qos)

    def incoming(self, topic: str, payload: bytes) -> Incoming:
        """Decode one message into an alert, or a dead letter with its reason."""
        try:
            parsed = topics.parse(topic)
            if parsed.kind != "alerts":
                raise ContractError(Reason.BAD_TOPIC, f"not an alert topic: {topic[:200]!r}")
            alert = decode(payload, Alert)
        except ContractError as exc:
            log.warning("dead-lettering a message on %r: %s", topic[:200], exc)
            return Incoming(dead_letter=dead_letter_for(
                payload, reason=exc.reason.value, detail=exc.detail, topic=topic,
                client_id=self.client_id, received_ms=now_ms()))
        return Incoming(alert=alert, district=parsed.params["district"])
