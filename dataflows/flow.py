"""The Meshwatch dataflow: mesh telemetry in; order, gaps, detection; InfluxDB, lake, alerts out.

Steps (bytewax ``step_id`` in brackets)::

    [mesh] MeshSource, one partition per mesh topic partition (at-least-once, see
      |    dataflows.connectors.mqtt)
    [decode] TelemetryBatch, readings grouped by shard ──errs──> [dead_letters] DeadLetterSink
      |                                                          (mw/v1/deadletter/{reason})
    [order] per shard: de-duplicate, order by event time, late path, gaps (dataflows.ordering)
      |
      +──> [by_district] in-order measured readings as columns per district, with the shard's
      |      |           watermark (dataflows.detection; only with FlowSettings.detection)
      |    [detect] per district: one WaterPipeline, fed in event time behind the district's
      |      |      watermark, ticked every 15 minutes; the inlet's in-order readings also
      |      |      come at once (fast path) for the burst detector
      |      +──> [alerts] AlertSink (QoS1 to mw/v1/alerts/{district}/{kind}, PUBACK waited)
      |      +──> [influx] (mw_alert, mw_score, mw_detect)
      +──> [influx] InfluxSink (mw_telemetry, mw_silence, mw_flow)
      +──> [lake] LakeSink (Parquet by date, measured readings)

    [feedback] mw/v1/feedback/+ ──> [feedback_decode] by district ──> [detect] (FeedbackApplier,
      at the feedback's event time: held until the district's watermark reaches its ts_ms)
    [edge_scores] mw/v1/mesh/scores/{n} ──> [scores_decode] ──> [influx] (mw_edge_score)
      (bad payloads of both ──> DeadLetterSink; dataflows.connectors.side_inputs)

A *shard* is ``crc32(device) % (partitions * shards_per_partition)``: a fixed group of the
devices of one mesh partition. State is per device; the shard is the bytewax key so that one
call handles all of a message's readings for the shard (a keyed operator costs ~20 µs per
item, a reading ~2 µs here). Detection is keyed by district (the district leak detector
needs all of a district's customer meters), so the shards' readings cross workers once,
as columns.

Guarantees: at-least-once in (broker acks one snapshot late), exactly-once state (source skip
set, keyed de-duplication by ``(device, seq)``, district pipelines, all snapshotted in the
same epoch), idempotent out (points keyed by measurement, tags and event time; lake files
numbered by epoch; alerts at-least-once with deterministic ids).
"""

from __future__ import annotations

import base64
import pickle
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Dataflow, Stream
from bytewax.operators import StatefulBatchLogic

from dataflows.connectors.alerts import AlertSink
from dataflows.connectors.influx import InfluxSettings, InfluxSink
from dataflows.connectors.lake import LakeSink
from dataflows.connectors.mqtt import MeshMessage, MeshSource, MqttSourceSettings
from dataflows.connectors.publish import DeadLetterSink
from dataflows.connectors.side_inputs import TopicSource, decode_scores, route_feedback
from dataflows.detection import (
    DetectionLayout,
    DistrictChunk,
    DistrictFeedback,
    DistrictState,
    split_by_district,
)
from dataflows.ordering import OrderSettings, Released, ShardState, shard_of
from dataflows.records import DistrictOutput, ShardOutput
from edge_agent.publisher import BrokerAddress
from meshwatch.contract import Alert, ContractError, DeadLetter, TelemetryBatch, decode, topics
from models.water.pipeline import PipelineSettings

__all__ = ["Detection", "FlowSettings", "build_flow", "decode_message"]


@dataclass(frozen=True, eq=False)
class Detection:
    """The detection stage's inputs: the devices' districts and kinds, the pipeline settings.

    ``pipeline`` defaults to what ``meshwatch evaluate`` runs.
    """

    layout: DetectionLayout
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)
    feedback: bool = True
    """Take crews' feedback from ``mw/v1/feedback/+`` (:mod:`dataflows.connectors.side_inputs`),
    each applied at its event time (:mod:`dataflows.detection`)."""
    scores: bool = True
    """Write every scored reading's score (``mw_score``: one more line per reading)."""


@dataclass(frozen=True)
class FlowSettings:
    """Everything :func:`build_flow` needs."""

    source: MqttSourceSettings
    dead_letter_broker: BrokerAddress
    order: OrderSettings = field(default_factory=OrderSettings)
    shards_per_partition: int = 4
    idle_flush_s: float = 5.0
    influx: InfluxSettings | None = None
    lake_dir: Path | None = None
    cadences: Mapping[str, float] = field(default_factory=dict)
    detection: Detection | None = None
    edge_scores: bool = True
    """With ``influx``: store the edge models' scores (``mw/v1/mesh/scores/{n}``)."""


def decode_message(message: MeshMessage, partitions: int, shards_per_partition: int,
                   ) -> list[tuple[str, tuple[int, list[Any]]] | DeadLetter]:
    """A mesh message as ``(shard key, (shard, readings))`` items, or its dead letter.

    >>> from meshwatch.contract import Reading, encode
    >>> batch = TelemetryBatch(site="s1", gateway_id="gw-1", sent_ms=1767225600000,
    ...     readings=[Reading(device_id="m1", ts_ms=1767225600000, seq=0,
    ...                       metrics={"flow_lpm": 1.0})])
    >>> [(key, shard, len(rs)) for key, (shard, rs) in decode_message(
    ...     MeshMessage(0, "mw/v1/mesh/telemetry/0", encode(batch), 0), 1, 2)]
    [('1', 1, 1)]
    >>> [dl] = decode_message(MeshMessage(0, "mw/v1/mesh/telemetry/0", b"{oops", 1767225600000),
    ...                       1, 2)
    >>> dl.reason, dl.source_topic
    ('malformed_json', 'mw/v1/mesh/telemetry/0')
    """
    try:
        batch = decode(message.payload, TelemetryBatch)
    except ContractError as exc:
        return [DeadLetter(reason=exc.reason.value, detail=exc.detail[:2000],
                           payload_b64=base64.b64encode(message.payload).decode(),
                           received_ms=message.received_ms, source_topic=message.topic)]
    shards: dict[int, list[Any]] = {}
    for reading in batch.readings:
        shard = shard_of(reading.device_id, partitions, shards_per_partition)
        group = shards.get(shard)
        if group is None:
            shards[shard] = [reading]
        else:
            group.append(reading)
    return [(str(shard), (shard, readings)) for shard, readings in shards.items()]


class _ShardLogic(StatefulBatchLogic[tuple[int, list[Any]], ShardOutput, bytes]):
    """One shard's :class:`ShardState`; snapshots are pickled bytes (an immutable copy)."""

    def __init__(self, settings: FlowSettings, resume: bytes | None) -> None:
        self.settings = settings
        self.cadences = settings.cadences
        detection = settings.detection
        self.fast = detection.layout.fast_devices if detection is not None else frozenset()
        if resume is None:
            self.shard = -1
            self.state = ShardState(settings.order)
            self.stats_ms = 0
        else:
            self.shard, self.state, self.stats_ms = pickle.loads(resume)
        # readings restored as waiting are flushed even if no input ever comes again
        self._flush_at: datetime | None = self._idle_deadline()

    def _idle_deadline(self) -> datetime | None:
        if not len(self.state):
            return None
        return datetime.now(UTC) + timedelta(seconds=self.settings.idle_flush_s)

    def _output(self, released: Released, before: int | None) -> ShardOutput:
        self.stats_ms = max(self.stats_ms + 1, int(time.time() * 1000))
        return ShardOutput(self.shard, released, dict(self.state.counts), self.stats_ms,
                           self.state.watermark, before)

    def on_batch(self, values: list[tuple[int, list[Any]]]) -> tuple[list[ShardOutput], bool]:
        self.shard = values[0][0]
        before = self.state.watermark
        released = Released()
        for _, readings in values:  # message by message: the result does not depend on batching
            out = self.state.process(readings, self.cadences, self.fast)
            released.points += out.points
            released.silences += out.silences
            released.fast += out.fast
        self._flush_at = self._idle_deadline()
        return [self._output(released, before)], StatefulBatchLogic.RETAIN

    def on_notify(self) -> tuple[list[ShardOutput], bool]:
        self._flush_at = None
        before = self.state.watermark
        released = self.state.flush(self.cadences)
        return [self._output(released, before)], StatefulBatchLogic.RETAIN

    def notify_at(self) -> datetime | None:
        return self._flush_at

    def snapshot(self) -> bytes:
        return pickle.dumps((self.shard, self.state, self.stats_ms),
                            protocol=pickle.HIGHEST_PROTOCOL)


class _DistrictLogic(StatefulBatchLogic[DistrictChunk | DistrictFeedback, DistrictOutput,
                                         bytes]):
    """One district's :class:`DistrictState`; snapshots are pickled bytes.

    After ``idle_flush_s`` without the district's watermark moving while a shard is ahead
    of it, it stops waiting for the quiet shards (:meth:`DistrictState.release_idle`).
    """

    def __init__(self, settings: FlowSettings, resume: bytes | None) -> None:
        assert settings.detection is not None
        self.detection = settings.detection
        self.idle_s = settings.idle_flush_s
        self.state: DistrictState | None = None
        self.stats_ms = 0
        if resume is not None:
            self.state, self.stats_ms = pickle.loads(resume)
        self._idle_at: datetime | None = self._deadline()

    def _deadline(self) -> datetime | None:
        if self.state is None or not self.state.held_back:
            return None
        return datetime.now(UTC) + timedelta(seconds=self.idle_s)

    def _output(self, alerts: list[Alert]) -> list[DistrictOutput]:
        assert self.state is not None
        self.stats_ms = max(self.stats_ms + 1, int(time.time() * 1000))
        return [DistrictOutput(self.state.district, alerts, dict(self.state.counts),
                               self.stats_ms, self.state.watermark,
                               self.state.drain_scores(), self.state.drain_balance())]

    def on_batch(self, values: list[DistrictChunk | DistrictFeedback],
                 ) -> tuple[list[DistrictOutput], bool]:
        if self.state is None:
            self.state = DistrictState.of(self.detection.layout, values[0].district,
                                          self.detection.pipeline, self.detection.scores)
        state = self.state
        before = state.watermark
        alerts: list[Alert] = []
        chunks: list[DistrictChunk] = []
        for value in values:  # feedback first: it waits for the readings of its event time
            if isinstance(value, DistrictFeedback):
                alerts += state.feedback(value.feedback)
            else:
                chunks.append(value)
        alerts += state.take(chunks)
        if state.watermark != before or self._idle_at is None:
            self._idle_at = self._deadline()
        return self._output(alerts), StatefulBatchLogic.RETAIN

    def on_notify(self) -> tuple[list[DistrictOutput], bool]:
        assert self.state is not None
        alerts = self.state.release_idle()
        self._idle_at = self._deadline()
        return self._output(alerts), StatefulBatchLogic.RETAIN

    def notify_at(self) -> datetime | None:
        return self._idle_at

    def snapshot(self) -> bytes:
        return pickle.dumps((self.state, self.stats_ms), protocol=pickle.HIGHEST_PROTOCOL)


def build_flow(settings: FlowSettings, flow_id: str = "meshwatch") -> Dataflow:
    """The dataflow described in the module doc."""
    partitions = settings.source.partitions
    shards = settings.shards_per_partition
    flow = Dataflow(flow_id)
    messages = op.input("mesh", flow, MeshSource(settings.source))
    decoded = op.flat_map("decode", messages,
                          lambda m: decode_message(m, partitions, shards))
    branches = op.branch("split", decoded, lambda item: not isinstance(item, DeadLetter))
    dead_letters: Stream[DeadLetter] = branches.falses  # type: ignore[assignment]
    op.output("dead_letters", dead_letters,
              DeadLetterSink(settings.dead_letter_broker, settings.source.client_id,
                             protocol=settings.source.protocol))
    ordered = op.stateful_batch("order", branches.trues,  # type: ignore[arg-type]
                                lambda resume: _ShardLogic(settings, resume))
    to_influx: Stream[Any] = ordered
    detection = settings.detection
    if detection is not None:
        layout = detection.layout
        chunks: Stream[tuple[str, DistrictChunk | DistrictFeedback]] = op.flat_map(
            "by_district", ordered, lambda keyed: split_by_district(keyed[1], layout))
        if detection.feedback:
            source = replace(settings.source, partitions=1,
                             client_id=f"{settings.source.client_id}-fb")
            feedback = _side_input(flow, settings, ("feedback", "feedback"), source,
                                   topics.subscription("feedback"),
                                   lambda m: route_feedback(m, layout))
            chunks = op.merge("detect_in", chunks, feedback)
        detected = op.stateful_batch("detect", chunks,
                                     lambda resume: _DistrictLogic(settings, resume))
        alerts = op.flat_map("alerts", detected, lambda keyed: keyed[1].alerts)
        op.output("publish_alerts", alerts,
                  AlertSink(settings.dead_letter_broker, settings.source.client_id,
                            protocol=settings.source.protocol))
        to_influx = op.merge("to_influx", ordered, detected)
    if settings.influx is not None and settings.edge_scores:
        source = replace(settings.source, client_id=f"{settings.source.client_id}-sc")
        scores = _side_input(flow, settings, ("edge_scores", "scores"), source,
                             topics.TEMPLATES["mesh_scores"], decode_scores)
        to_influx = op.merge("to_influx_scores", to_influx, scores)
    if settings.influx is not None:
        op.output("influx", to_influx, InfluxSink(settings.influx))
    if settings.lake_dir is not None:
        op.output("lake", ordered, LakeSink(settings.lake_dir, partitions))
    return flow


def _side_input(flow: Dataflow, settings: FlowSettings, names: tuple[str, str],
                source: MqttSourceSettings, topic_filter: str,
                decode: Callable[[MeshMessage], list[Any]]) -> Stream[Any]:
    """A second MQTT input: decoded items out, its bad payloads to the dead-letter topic.

    ``names`` are the input's step id and the prefix of its other steps (``{prefix}_decode``,
    ``_split``, ``_dead_letters``): recovery snapshots are keyed by them.
    """
    input_id, prefix = names
    decoded = op.flat_map(f"{prefix}_decode",
                          op.input(input_id, flow, TopicSource(source, topic_filter)), decode)
    branches = op.branch(f"{prefix}_split", decoded,
                         lambda item: not isinstance(item, DeadLetter))
    dead: Stream[DeadLetter] = branches.falses  # type: ignore[assignment]
    op.output(f"{prefix}_dead_letters", dead,
              DeadLetterSink(settings.dead_letter_broker, source.client_id,
                             protocol=settings.source.protocol))
    return branches.trues
