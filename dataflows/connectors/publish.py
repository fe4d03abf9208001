"""Publishing contract events from the flow at QoS1, returning only once the broker holds them.

:class:`QoS1Sink` is a bytewax ``DynamicSink`` (one MQTT client per worker, MQTT 5 or 3.1.1
like the flow's source, client id ``{client_id}-{name}-w{worker}``). ``write_batch`` publishes
every event of the batch at QoS1 (many in flight), then waits for every PUBACK; an event not
confirmed within ``timeout_s`` (broker gone, connection lost) is published again on a new
connection, with capped back-off, until it is. ``write_batch`` returns only when the broker
holds every event, so the epoch that produced them completes only then, and the flow's input
is acknowledged only after that (see :mod:`dataflows.connectors.mqtt`).

At-least-once: after a crash, the replayed epoch publishes its events again, and a lost PUBACK
means a second copy; consumers de-duplicate (alert ids are deterministic, dead letters are
diagnostics). The flow uses it for alerts (:func:`dataflows.connectors.alerts.AlertSink`) and
dead letters (:func:`DeadLetterSink`).

>>> from edge_agent.publisher import BrokerAddress
>>> from meshwatch.contract import DeadLetter
>>> sink = DeadLetterSink(BrokerAddress("127.0.0.1", 1883), client_id="mw-flow")
>>> sink.topic_of(DeadLetter(reason="malformed_json", detail="x", payload_b64="",
...                          received_ms=1767225600000))
'mw/v1/deadletter/malformed_json'
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Generic, TypeVar

import paho.mqtt.client as mqtt
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from pydantic import BaseModel

from edge_agent.publisher import BrokerAddress, MqttProtocol, apply_address, paho_protocol
from meshwatch.backoff import Backoff
from meshwatch.contract import DeadLetter, encode, topics

__all__ = ["DeadLetterSink", "QoS1Sink"]

log = logging.getLogger(__name__)

E = TypeVar("E", bound=BaseModel)


class _Partition(StatelessSinkPartition[E], Generic[E]):
    def __init__(self, sink: QoS1Sink[E], client_id: str) -> None:
        self.sink = sink
        self.client_id = client_id
        self.published = 0
        self.republished = 0
        self._client: mqtt.Client | None = None
        self._backoff = Backoff(initial_s=0.2, max_s=10.0)

    def _connected(self) -> mqtt.Client:
        broker = self.sink.broker
        while self._client is None:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                 protocol=paho_protocol(self.sink.protocol))
            client.max_inflight_messages_set(self.sink.max_in_flight)
            client.max_queued_messages_set(0)
            apply_address(client, broker)
            try:
                client.connect(broker.host, broker.port, keepalive=30)
            except OSError as exc:
                delay = self._backoff.next_delay()
                log.warning("%s: cannot reach %s:%d (%s); retry in %.1fs", self.sink.name,
                            broker.host, broker.port, exc, delay)
                time.sleep(delay)
                continue
            client.loop_start()
            self._client = client
        return self._client

    def write_batch(self, items: list[E]) -> None:
        pending = [(self.sink.topic_of(item), encode(item)) for item in items]
        first = True
        while pending:
            if not first:
                self.republished += len(pending)
                time.sleep(self._backoff.next_delay())
            first = False
            client = self._connected()
            sent = [(topic, payload, client.publish(topic, payload, qos=1))
                    for topic, payload in pending]
            deadline = time.monotonic() + self.sink.timeout_s
            unconfirmed = []
            for topic, payload, info in sent:
                with contextlib.suppress(RuntimeError, ValueError):  # not sent / timed out
                    info.wait_for_publish(max(0.0, deadline - time.monotonic()))
                if not (info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS and info.is_published()):
                    unconfirmed.append((topic, payload))
            self.published += len(pending) - len(unconfirmed)
            if unconfirmed:
                log.warning("%s: %d of %d not confirmed by %s:%d; reconnecting",
                            self.sink.name, len(unconfirmed), len(pending),
                            self.sink.broker.host, self.sink.broker.port)
                self._drop()
            else:
                self._backoff.reset()
            pending = unconfirmed

    def _drop(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None

    def close(self) -> None:
        self._drop()


class QoS1Sink(DynamicSink[E], Generic[E]):
    """Publishes events at QoS1 to ``topic_of(event)``, waiting for PUBACKs; see the module doc.

    ``name`` goes into the client ids and the log.
    """

    def __init__(self, broker: BrokerAddress, topic_of: Callable[[E], str], name: str, *,
                 client_id: str = "mw-flow", timeout_s: float = 10.0,
                 max_in_flight: int = 1000, protocol: MqttProtocol = "5") -> None:
        self.broker = broker
        self.topic_of = topic_of
        self.name = name
        self.client_id = client_id
        self.timeout_s = timeout_s
        self.max_in_flight = max_in_flight
        self.protocol = protocol

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _Partition[E]:
        """One publisher per worker."""
        return _Partition(self, f"{self.client_id}-{self.name}-w{worker_index}")


def _dead_letter_topic(letter: DeadLetter) -> str:
    return topics.dead_letter(letter.reason)


def DeadLetterSink(broker: BrokerAddress, client_id: str = "mw-flow",
                   protocol: MqttProtocol = "5") -> QoS1Sink[DeadLetter]:
    """Dead letters at QoS1 to ``mw/v1/deadletter/{reason}`` (clients ``{client_id}-dl-w{n}``)."""
    return QoS1Sink(broker, _dead_letter_topic, "dl", client_id=client_id, protocol=protocol)
