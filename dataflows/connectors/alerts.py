"""The alert sink: contract alerts to ``mw/v1/alerts/{district}/{kind}`` at QoS1.

:class:`AlertSink` is a bytewax ``DynamicSink`` (one MQTT client per worker, MQTT 5 or
3.1.1 like the flow's source, client id ``{client_id}-alerts-w{worker}``). ``write_batch``
publishes every alert of the batch at QoS1 (many in flight), then waits for every PUBACK;
an alert not confirmed within ``timeout_s`` (broker gone, connection lost) is published
again on a new connection, with capped back-off, until it is. ``write_batch`` returns only
when the broker holds every alert, so the epoch that produced them completes only then, and
the flow's input is acknowledged only after that (see :mod:`dataflows.connectors.mqtt`).

At-least-once: after a crash, the replayed epoch publishes its alerts again, and a lost
PUBACK means a second copy. Alert ids are deterministic (category, subject, incident start:
:func:`models.alerting.make_alert_id`), so consumers de-duplicate by ``(alert_id, status,
last_ts_ms)``; remediation keeps one work order per incident.

>>> alert_topic(Alert(alert_id="al-1", device_id="mtr-1", district="dma-01", kind="leak",
...     severity="minor", score=0.95, first_ts_ms=1767225600000, last_ts_ms=1767225600000,
...     model_version="water-1.0"))
'mw/v1/alerts/dma-01/leak'
"""

from __future__ import annotations

import contextlib
import logging
import time

import paho.mqtt.client as mqtt
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from edge_agent.publisher import BrokerAddress, MqttProtocol, apply_address, paho_protocol
from meshwatch.backoff import Backoff
from meshwatch.contract import Alert, encode, topics

__all__ = ["NO_DISTRICT", "AlertSink", "alert_topic"]

log = logging.getLogger(__name__)

NO_DISTRICT = "unknown"
"""The district level of the topic of an alert that names no district."""


def alert_topic(alert: Alert) -> str:
    """Where an alert goes: ``mw/v1/alerts/{district}/{kind}``."""
    return topics.alerts(alert.district or NO_DISTRICT, alert.kind.value)


class _AlertPartition(StatelessSinkPartition[Alert]):
    def __init__(self, broker: BrokerAddress, client_id: str, timeout_s: float,
                 max_in_flight: int, protocol: MqttProtocol) -> None:
        self.broker = broker
        self.client_id = client_id
        self.protocol = protocol
        self.timeout_s = timeout_s
        self.max_in_flight = max_in_flight
        self.published = 0
        self.republished = 0
        self._client: mqtt.Client | None = None
        self._backoff = Backoff(initial_s=0.2, max_s=10.0)

    def _connected(self) -> mqtt.Client:
        while self._client is None:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                 protocol=paho_protocol(self.protocol))
            client.max_inflight_messages_set(self.max_in_flight)
            client.max_queued_messages_set(0)
            apply_address(client, self.broker)
            try:
                client.connect(self.broker.host, self.broker.port, keepalive=30)
            except OSError as exc:
                delay = self._backoff.next_delay()
                log.warning("alerts: cannot reach %s:%d (%s); retry in %.1fs",
                            self.broker.host, self.broker.port, exc, delay)
                time.sleep(delay)
                continue
            client.loop_start()
            self._client = client
        return self._client

    def write_batch(self, items: list[Alert]) -> None:
        pending = [(alert_topic(alert), encode(alert)) for alert in items]
        first = True
        while pending:
            if not first:
                self.republished += len(pending)
                time.sleep(self._backoff.next_delay())
            first = False
            client = self._connected()
            sent = [(topic, payload, client.publish(topic, payload, qos=1))
                    for topic, payload in pending]
            deadline = time.monotonic() + self.timeout_s
            unconfirmed = []
            for topic, payload, info in sent:
                with contextlib.suppress(RuntimeError, ValueError):  # not sent / timed out
                    info.wait_for_publish(max(0.0, deadline - time.monotonic()))
                if not (info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS and info.is_published()):
                    unconfirmed.append((topic, payload))
            self.published += len(pending) - len(unconfirmed)
            if unconfirmed:
                log.warning("%d of %d alerts not confirmed by %s:%d; reconnecting",
                            len(unconfirmed), len(pending), self.broker.host, self.broker.port)
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


class AlertSink(DynamicSink[Alert]):
    """Publishes alerts at QoS1 to ``mw/v1/alerts/{district}/{kind}``, waiting for PUBACKs."""

    def __init__(self, broker: BrokerAddress, client_id: str = "mw-flow",
                 timeout_s: float = 10.0, max_in_flight: int = 1000,
                 protocol: MqttProtocol = "5") -> None:
        self.broker = broker
        self.client_id = client_id
        self.timeout_s = timeout_s
        self.max_in_flight = max_in_flight
        self.protocol = protocol

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _AlertPartition:
        """One publisher per worker."""
        return _AlertPartition(self.broker, f"{self.client_id}-alerts-w{worker_index}",
                               self.timeout_s, self.max_in_flight, self.protocol)
