"""The alert sink: contract alerts to ``mw/v1/alerts/{district}/{kind}`` at QoS1.

:func:`AlertSink` is a :class:`~dataflows.connectors.publish.QoS1Sink`: ``write_batch``
returns only when the broker holds every alert, so the epoch that produced them completes only
then, and the flow's input is acknowledged only after that.

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

from dataflows.connectors.publish import QoS1Sink
from edge_agent.publisher import BrokerAddress, MqttProtocol
from meshwatch.contract import Alert, topics

__all__ = ["NO_DISTRICT", "AlertSink", "alert_topic"]

NO_DISTRICT = "unknown"
"""The district level of the topic of an alert that names no district."""


def alert_topic(alert: Alert) -> str:
    """Where an alert goes: ``mw/v1/alerts/{district}/{kind}``."""
    return topics.alerts(alert.district or NO_DISTRICT, alert.kind.value)


def AlertSink(broker: BrokerAddress, client_id: str = "mw-flow",
              protocol: MqttProtocol = "5") -> QoS1Sink[Alert]:
    """Alerts at QoS1 to ``mw/v1/alerts/{district}/{kind}`` (clients ``{client_id}-alerts-w{n}``).

    Publishing waits for every PUBACK (:class:`~dataflows.connectors.publish.QoS1Sink`).
    """
    return QoS1Sink(broker, alert_topic, "alerts", client_id=client_id, protocol=protocol)
