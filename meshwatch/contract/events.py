"""Event contract v1: the messages that travel on the mesh.

Every event is a frozen pydantic model with a ``type`` tag and a
``schema_version`` (``"MAJOR.MINOR"``; absent means ``"1.0"``). Unknown fields
are ignored, so producers may add fields in a minor version; an unknown major
version is rejected. Times are UTC epoch milliseconds (``*_ms`` fields).

>>> r = Reading(device_id="mtr-000001", ts_ms=1767225600000, seq=7,
...             metrics={"flow_lpm": 0.8, "battery_v": 3.6})
>>> r.time.isoformat()
'2026-01-01T00:00:00+00:00'
>>> batch = TelemetryBatch(site="dma-01", gateway_id="gw-01", sent_ms=1767225605000,
...                        readings=[r])
>>> batch.type, batch.schema_version, len(batch.readings)
('telemetry', '1.0', 1)
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from meshwatch.contract.units import METRIC_NAME_PATTERN

SCHEMA_VERSION = "1.0"
"""The version this code writes."""

SUPPORTED_MAJOR = 1
"""Payloads with another major version are rejected."""

MIN_TS_MS = 946_684_800_000  # 2000-01-01T00:00:00Z
MAX_TS_MS = 4_102_444_800_000  # 2100-01-01T00:00:00Z

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
"""Ids of devices, gateways, sites and districts: safe as MQTT topic levels."""

Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
EpochMs = Annotated[int, Field(ge=MIN_TS_MS, lt=MAX_TS_MS, strict=True)]
MetricName = Annotated[str, StringConstraints(pattern=METRIC_NAME_PATTERN, max_length=64)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Score = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Text = Annotated[str, StringConstraints(max_length=2000)]


def ms_to_datetime(ms: int) -> datetime:
    """Convert UTC epoch milliseconds to an aware datetime.

    >>> ms_to_datetime(0).isoformat()
    '1970-01-01T00:00:00+00:00'
    """
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


class QualityFlag(StrEnum):
    """Per-reading quality flags."""

    ESTIMATED = "estimated"  # the device estimated the value
    IMPUTED = "imputed"  # filled in by the platform for a short gap, never measured
    CLOCK_SUSPECT = "clock_suspect"  # the device clock looked skewed
    BATTERY_LOW = "battery_low"
    TAMPER = "tamper"
    BACKFLOW = "backflow"
    OUT_OF_RANGE = "out_of_range"  # the value is outside the sensor's range
    LATE = "late"  # arrived later than the configured lateness horizon


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class _Event(_Model):
    schema_version: str = SCHEMA_VERSION

    @field_validator("schema_version")
    @classmethod
    def _known_major(cls, value: str) -> str:
        major, dot, minor = value.partition(".")
        if not (major.isdigit() and dot and minor.isdigit()):
            raise PydanticCustomError(
                "unsupported_version", "schema_version must look like '1.0', got {value!r}",
                {"value": value[:20]},
            )
        if int(major) != SUPPORTED_MAJOR:
            raise PydanticCustomError(
                "unsupported_version",
                "schema_version {value} has major {major}; this build reads major {supported}",
                {"value": value[:20], "major": int(major), "supported": SUPPORTED_MAJOR},
            )
        return value


class Reading(_Model):
    """One measurement of one device at one event time.

    ``seq`` is assigned once by the first hop that sees the reading (device or
    edge agent) and grows by one per reading, so gaps in it count losses.
    ``metrics`` maps ``<quantity>_<unit>`` names to finite numbers.
    """

    device_id: Id
    ts_ms: EpochMs
    seq: Annotated[int, Field(ge=0, strict=True)]
    metrics: Annotated[dict[MetricName, FiniteFloat], Field(min_length=1, max_length=64)]
    quality: tuple[QualityFlag, ...] = ()

    @property
    def time(self) -> datetime:
        """The event time as an aware UTC datetime."""
        return ms_to_datetime(self.ts_ms)


class TelemetryBatch(_Event):
    """Readings a gateway sends in one message (1 to 10,000 of them)."""

    type: Literal["telemetry"] = "telemetry"
    site: Id
    gateway_id: Id
    sent_ms: EpochMs
    readings: Annotated[list[Reading], Field(min_length=1, max_length=10_000)]


class WindowScore(_Model):
    """An edge model's score (0 normal .. 1 anomalous) for one device's feature window."""

    device_id: Id
    window_start_ms: EpochMs
    window_end_ms: EpochMs
    score: Score

    @model_validator(mode="after")
    def _ordered(self) -> WindowScore:
        if self.window_end_ms < self.window_start_ms:
            raise PydanticCustomError("window_order", "window_end_ms is before window_start_ms")
        return self


class EdgeScore(_Event):
    """Scores of one gateway's edge model for the windows that closed together (1 to 10,000).

    Batched like telemetry: one message per scoring call, not one per window.
    """

    type: Literal["edge_score"] = "edge_score"
    site: Id
    gateway_id: Id
    model_id: Id
    model_version: Id
    windows: Annotated[list[WindowScore], Field(min_length=1, max_length=10_000)]


class DeviceState(StrEnum):
    """Life-cycle messages of a gateway on its retained status topic."""

    BIRTH = "birth"
    DEATH = "death"
    HEARTBEAT = "heartbeat"


class DeviceStatus(_Event):
    """Birth, death (last will) or heartbeat of a gateway and the devices it serves."""

    type: Literal["status"] = "status"
    site: Id
    gateway_id: Id
    state: DeviceState
    sent_ms: EpochMs
    devices: list[Id] = []
    counters: dict[Id, Annotated[int, Field(ge=0)]] = {}
    agent_version: Text | None = None
    model_version: Id | None = None
    message: Text | None = None


class AlertKind(StrEnum):
    """What an alert is about."""

    LEAK = "leak"
    BURST = "burst"
    SENSOR_FAULT = "sensor_fault"
    SILENT = "silent"
    ANOMALY = "anomaly"


class Severity(StrEnum):
    """How urgent an alert is, from least to most."""

    INFO = "info"
    MINOR = "minor"
    MAJOR = "major"
    CRITICAL = "critical"


class AlertStatus(StrEnum):
    """An alert opens, may be updated with new evidence, and clears."""

    OPEN = "open"
    UPDATE = "update"
    CLEARED = "cleared"


class Alert(_Event):
    """A detection about a device or a district.

    ``alert_id`` is deterministic (derived from device or district, kind and
    incident start) so a replay produces the same id.
    """

    type: Literal["alert"] = "alert"
    alert_id: Id
    device_id: Id | None = None
    district: Id | None = None
    kind: AlertKind
    severity: Severity
    status: AlertStatus = AlertStatus.OPEN
    score: Score
    est_loss_lph: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] | None = None
    evidence: dict[str, JsonValue] = {}
    first_ts_ms: EpochMs
    last_ts_ms: EpochMs
    model_version: Id

    @model_validator(mode="after")
    def _subject_and_order(self) -> Alert:
        if self.device_id is None and self.district is None:
            raise PydanticCustomError("no_subject", "an alert needs a device_id or a district")
        if self.last_ts_ms < self.first_ts_ms:
            raise PydanticCustomError("window_order", "last_ts_ms is before first_ts_ms")
        return self


class WorkOrderState(StrEnum):
    """Work order life cycle: open → assigned → acknowledged → in_progress → an end state."""

    OPEN = "open"
    ASSIGNED = "assigned"
    ACKNOWLEDGED = "acknowledged"
    IN_PROGRESS = "in_progress"
    RESOLVED = "resolved"
    FALSE_ALARM = "false_alarm"
    CANCELLED = "cancelled"


class WorkOrderEvent(_Event):
    """A change to a work order: created, a state transition, or an escalation."""

    type: Literal["work_order"] = "work_order"
    work_order_id: Id
    incident_id: Id
    event: Literal["created", "transition", "assigned", "escalated"]
    state: WorkOrderState
    priority: Annotated[int, Field(ge=1, le=4)]
    ts_ms: EpochMs
    actor: Text
    crew_id: Id | None = None
    district: Id | None = None
    device_id: Id | None = None
    alert_ids: list[Id] = []
    note: Text | None = None


class Outcome(StrEnum):
    """What the crew found."""

    CONFIRMED_LEAK = "confirmed_leak"
    CONFIRMED_BURST = "confirmed_burst"
    METER_FAULT = "meter_fault"
    FALSE_ALARM = "false_alarm"
    NO_ACCESS = "no_access"
    OTHER = "other"


class Feedback(_Event):
    """A crew's outcome for a work order, fed back to the detectors (idempotent by work order)."""

    type: Literal["feedback"] = "feedback"
    work_order_id: Id
    alert_ids: Annotated[list[Id], Field(min_length=1)]
    outcome: Outcome
    ts_ms: EpochMs
    device_id: Id | None = None
    district: Id | None = None
    note: Text | None = None


class ModelAnnouncement(_Event):
    """A new edge model for a gateway (retained); the agent verifies ``sha256`` before use."""

    type: Literal["model"] = "model"
    model_id: Id
    version: Id
    url: Annotated[str, StringConstraints(min_length=1, max_length=2000)]
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    ts_ms: EpochMs


class RawReading(_Event):
    """One reading a local device publishes on its gateway's ``site_raw`` topic.

    It carries neither device id nor seq: the device is the last level of the topic, and the
    edge agent assigns the seq when it accepts the reading.

    >>> RawReading(ts_ms=1767225600000, metrics={"flow_lpm": 0.8}).type
    'raw_reading'
    """

    type: Literal["raw_reading"] = "raw_reading"
    ts_ms: EpochMs
    metrics: Annotated[dict[MetricName, FiniteFloat], Field(min_length=1, max_length=64)]
    quality: tuple[QualityFlag, ...] = ()


class DeadLetter(_Event):
    """A message that could not be accepted, kept with its reason and source."""

    type: Literal["dead_letter"] = "dead_letter"
    reason: str
    detail: Text
    payload_b64: str
    received_ms: EpochMs
    source_broker: Text | None = None
    source_topic: Text | None = None
    client_id: Text | None = None


Event = Annotated[
    TelemetryBatch | EdgeScore | DeviceStatus | Alert | WorkOrderEvent | Feedback
    | ModelAnnouncement | RawReading | DeadLetter,
    Field(discriminator="type"),
]
"""Any event, told apart by its ``type`` field."""

EVENT_TYPES: tuple[type[BaseModel], ...] = (
    TelemetryBatch, EdgeScore, DeviceStatus, Alert, WorkOrderEvent, Feedback,
    ModelAnnouncement, RawReading, DeadLetter,
)
