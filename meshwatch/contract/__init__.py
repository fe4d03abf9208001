"""Event contract v1: events, topics, JSON codec and the typed decoding error.

>>> from meshwatch.contract import Reading, TelemetryBatch, decode, encode, topics
>>> topics.site_telemetry("dma-01", "gw-01")
'mw/v1/site/dma-01/gw/gw-01/telemetry'
"""

from meshwatch.contract import topics
from meshwatch.contract.codec import decode, decode_event, encode
from meshwatch.contract.errors import ContractError, Reason
from meshwatch.contract.events import (
    SCHEMA_VERSION,
    Alert,
    AlertKind,
    AlertStatus,
    DeadLetter,
    DeviceState,
    DeviceStatus,
    EdgeScore,
    Event,
    Feedback,
    ModelAnnouncement,
    Outcome,
    QualityFlag,
    RawReading,
    Reading,
    Severity,
    TelemetryBatch,
    WindowScore,
    WorkOrderEvent,
    WorkOrderState,
    ms_to_datetime,
)

__all__ = [
    "SCHEMA_VERSION",
    "Alert",
    "AlertKind",
    "AlertStatus",
    "ContractError",
    "DeadLetter",
    "DeviceState",
    "DeviceStatus",
    "EdgeScore",
    "Event",
    "Feedback",
    "ModelAnnouncement",
    "Outcome",
    "QualityFlag",
    "RawReading",
    "Reading",
    "Reason",
    "Severity",
    "TelemetryBatch",
    "WindowScore",
    "WorkOrderEvent",
    "WorkOrderState",
    "decode",
    "decode_event",
    "encode",
    "ms_to_datetime",
    "topics",
]
