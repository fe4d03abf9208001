"""The flow's side inputs: crews' feedback and edge scores, from the mesh broker.

:class:`TopicSource` is the mesh source of :mod:`dataflows.connectors.mqtt` (persistent
sessions, QoS1, acks one snapshot late, redeliveries skipped by digest, MQTT 5 or 3.1.1) on
other topics: partition ``n`` subscribes to ``template.format(partition=n)`` as client
``{client_id}-p{n}`` (give each source a ``client_id`` of its own). The flow runs two:

- **feedback**: one partition on ``mw/v1/feedback/+`` (client ``{flow.client_id}-fb``).
  :func:`route_feedback` keys each :class:`~meshwatch.contract.Feedback` by the district
  whose pipeline raised the alerts: the district of its device if the registry knows it,
  else its own ``district``, else the topic's; the district's detection step applies it at
  its event time (:mod:`dataflows.detection`). A payload that is not a valid ``Feedback``,
  or for a district the flow does not detect in, becomes a dead letter.
- **edge scores**: one partition per mesh partition on ``mw/v1/mesh/scores/{n}`` (client
  ``{flow.client_id}-sc``; the bridge puts a device's scores in the partition of its
  telemetry). :func:`decode_scores` gives the :class:`~meshwatch.contract.EdgeScore`, which
  the InfluxDB sink writes as ``mw_edge_score`` per device at the window's end, beside the
  flow's own ``mw_score``: edge and cloud scores of a device side by side, by device tag and
  event time.

>>> from dataflows.detection import DetectionLayout, DistrictFeedback
>>> from meshwatch.contract import Feedback, encode
>>> layout = DetectionLayout.from_rows([("mtr-1", "customer_meter", "dma-01", 900)], 1, 1)
>>> fb = Feedback(work_order_id="wo-1", alert_ids=["al-1"], outcome="false_alarm",
...               ts_ms=1767225600000, device_id="mtr-1")
>>> route_feedback(MeshMessage(0, "mw/v1/feedback/dma-09", encode(fb), 0), layout)[0][0]
'dma-01'
>>> [dl] = route_feedback(MeshMessage(0, "mw/v1/feedback/dma-09", b"{}", 1767225600000), layout)
>>> dl.reason
'missing_field'
"""

from __future__ import annotations

import base64

from dataflows.connectors.mqtt import MeshMessage, MeshSource, MqttSourceSettings, SourceState
from dataflows.connectors.mqtt import _MeshPartition as _TelemetryPartition
from dataflows.detection import DetectionLayout, DistrictFeedback
from meshwatch.contract import ContractError, DeadLetter, EdgeScore, Feedback, decode, topics

__all__ = ["TopicSource", "decode_scores", "route_feedback"]

UNKNOWN_DISTRICT = "unknown_district"
"""The dead-letter reason of feedback for a district the flow does not detect in."""


class _TopicPartition(_TelemetryPartition):
    """A mesh partition subscribed to its source's topic (the base class's is ignored)."""

    template = ""

    @property
    def topic(self) -> str:
        return self.template.format(partition=self.partition)

    @topic.setter
    def topic(self, value: str) -> None:
        """The base class sets the telemetry topic, which is not ours: ignore it."""


class TopicSource(MeshSource):
    """The mesh source on ``template`` (``{partition}`` is the partition), ``partitions`` of it.

    >>> from edge_agent.publisher import BrokerAddress
    >>> source = TopicSource(MqttSourceSettings(BrokerAddress("127.0.0.1", 1883), 2),
    ...                      "mw/v1/mesh/scores/{partition}")
    >>> source.list_parts(), source.topic_of(1)
    (['0', '1'], 'mw/v1/mesh/scores/1')
    """

    def __init__(self, settings: MqttSourceSettings, template: str) -> None:
        super().__init__(settings)
        self.template = template
        self._part: type[_TopicPartition] = type("_Partition", (_TopicPartition,),
                                                 {"template": template})

    def topic_of(self, partition: int) -> str:
        """The topic partition ``partition`` subscribes to."""
        return self.template.format(partition=partition)

    def build_part(self, step_id: str, for_part: str,
                   resume_state: SourceState | None) -> _TopicPartition:
        """Connect partition ``for_part``, resuming from its snapshot."""
        return self._part(self.settings, int(for_part), resume_state)


def decode_scores(message: MeshMessage) -> list[tuple[str, EdgeScore] | DeadLetter]:
    """An edge-score message keyed by its partition, or its dead letter.

    >>> [dl] = decode_scores(MeshMessage(1, "mw/v1/mesh/scores/1", b"[]", 1767225600000))
    >>> dl.reason
    'not_an_object'
    """
    try:
        return [(str(message.partition), decode(message.payload, EdgeScore))]
    except ContractError as exc:
        return [_dead_letter(message, exc.reason.value, exc.detail)]


def route_feedback(message: MeshMessage, layout: DetectionLayout,
                   ) -> list[tuple[str, DistrictFeedback] | DeadLetter]:
    """A feedback message as ``(district, feedback)``, or its dead letter (module doc)."""
    try:
        feedback = decode(message.payload, Feedback)
        district = topics.parse(message.topic).params.get("district")
    except ContractError as exc:
        return [_dead_letter(message, exc.reason.value, exc.detail)]
    where = layout.slot_of.get(feedback.device_id or "")
    if where is not None:
        district = where[0]
    elif feedback.district in layout.layouts:
        district = feedback.district
    if district not in layout.layouts:
        return [_dead_letter(message, UNKNOWN_DISTRICT,
                             f"feedback for district {district!r}, which the flow does not "
                             f"detect in (not in the registry)")]
    return [(district, DistrictFeedback(district, feedback))]


def _dead_letter(message: MeshMessage, reason: str, detail: str) -> DeadLetter:
    return DeadLetter(reason=reason, detail=detail[:2000],
                      payload_b64=base64.b64encode(message.payload).decode(),
                      received_ms=max(message.received_ms, 946_684_800_000),
                      source_topic=message.topic)
