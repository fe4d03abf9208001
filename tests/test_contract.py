"""Event contract v1: round trips, typed errors for any bytes, versioning and limits."""

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshwatch.contract import (
    Alert,
    ContractError,
    DeadLetter,
    DeviceStatus,
    EdgeScore,
    Feedback,
    ModelAnnouncement,
    QualityFlag,
    RawReading,
    Reading,
    Reason,
    TelemetryBatch,
    WindowScore,
    WorkOrderEvent,
    decode,
    decode_event,
    encode,
)
from meshwatch.contract.events import EVENT_TYPES, MAX_TS_MS, MIN_TS_MS
from meshwatch.contract.units import UNITS

ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.:-]{0,20}\Z")
epoch_ms = st.integers(MIN_TS_MS, MAX_TS_MS - 1)
finite = st.floats(allow_nan=False, allow_infinity=False)
metric_names = st.builds(
    lambda quantity, unit: f"{quantity}_{unit}",
    st.from_regex(r"\A[a-z][a-z0-9]{0,8}(_[a-z0-9]{1,5}){0,2}\Z"),
    st.sampled_from(sorted(UNITS)),
)
readings = st.builds(
    Reading,
    device_id=ids,
    ts_ms=epoch_ms,
    seq=st.integers(0, 2**53),
    metrics=st.dictionaries(metric_names, finite, min_size=1, max_size=5),
    quality=st.lists(st.sampled_from(["estimated", "imputed", "late"]), max_size=2).map(tuple),
)
batches = st.builds(
    TelemetryBatch,
    site=ids,
    gateway_id=ids,
    sent_ms=epoch_ms,
    readings=st.lists(readings, min_size=1, max_size=20),
)
alerts = st.builds(
    lambda first, span, **kw: Alert(first_ts_ms=first, last_ts_ms=min(first + span, MAX_TS_MS - 1),
                                    **kw),
    first=epoch_ms,
    span=st.integers(0, 10**9),
    alert_id=ids,
    device_id=ids,
    kind=st.sampled_from(["leak", "burst", "sensor_fault", "silent", "anomaly"]),
    severity=st.sampled_from(["info", "minor", "major", "critical"]),
    score=st.floats(0, 1),
    est_loss_lph=st.none() | st.floats(0, 1e6),
    evidence=st.dictionaries(st.text(max_size=10), st.integers() | st.text(max_size=10)),
    model_version=ids,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(batches)
def test_telemetry_round_trip(batch: TelemetryBatch) -> None:
    assert decode(encode(batch), TelemetryBatch) == batch
    assert decode_event(encode(batch)) == batch


@settings(max_examples=200)
@given(alerts)
def test_alert_round_trip(alert: Alert) -> None:
    assert decode(encode(alert), Alert) == alert


@settings(max_examples=2000)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_the_typed_error(payload: bytes) -> None:
    for decoder in (lambda p: decode(p, TelemetryBatch), decode_event):
        try:
            decoder(payload)
        except ContractError as exc:
            assert isinstance(exc.reason, Reason)
            assert exc.detail


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | finite | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                        children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=500)
@given(batches, st.data())
def test_mutated_valid_payloads_raise_only_the_typed_error(batch, data) -> None:
    document = json.loads(encode(batch))
    reading = document["readings"][0]
    target = data.draw(st.sampled_from([document, reading, reading["metrics"]]))
    key = data.draw(st.sampled_from(sorted(target)) | st.text(max_size=8))
    target[key] = data.draw(json_values)
    payload = json.dumps(document).encode()
    try:
        decoded = decode(payload, TelemetryBatch)
    except ContractError as exc:
        assert isinstance(exc.reason, Reason)
    else:
        assert isinstance(decoded, TelemetryBatch)


def _batch_dict(**overrides):
    document = {
        "type": "telemetry",
        "schema_version": "1.0",
        "site": "dma-01",
        "gateway_id": "gw-01",
        "sent_ms": 1_767_225_605_000,
        "readings": [
            {"device_id": "mtr-1", "ts_ms": 1_767_225_600_000, "seq": 3,
             "metrics": {"flow_lpm": 1.5, "pressure_bar": 3.2}},
        ],
    }
    document.update(overrides)
    return document


def _reason_for(document) -> Reason:
    with pytest.raises(ContractError) as caught:
        decode(json.dumps(document).encode(), TelemetryBatch)
    return caught.value.reason


def test_unknown_fields_are_tolerated() -> None:
    document = _batch_dict(firmware="1.2.3")
    document["readings"][0]["rssi_dbm"] = -71
    batch = decode(json.dumps(document), TelemetryBatch)
    assert batch.readings[0].metrics == {"flow_lpm": 1.5, "pressure_bar": 3.2}


def test_minor_version_is_accepted_and_unknown_major_rejected() -> None:
    assert decode(json.dumps(_batch_dict(schema_version="1.7")), TelemetryBatch)
    assert _reason_for(_batch_dict(schema_version="2.0")) is Reason.UNSUPPORTED_VERSION
    assert _reason_for(_batch_dict(schema_version="one")) is Reason.UNSUPPORTED_VERSION


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda d: d.pop("site"), Reason.MISSING_FIELD),
        (lambda d: d.update(type="alert"), Reason.WRONG_TYPE),
        (lambda d: d.update(readings=[]), Reason.INVALID_FIELD),
        (lambda d: d["readings"][0].update(seq=-1), Reason.INVALID_FIELD),
        (lambda d: d["readings"][0].update(ts_ms=1.5e12), Reason.INVALID_FIELD),
        (lambda d: d["readings"][0].update(ts_ms="2026-01-01"), Reason.INVALID_FIELD),
        (lambda d: d["readings"][0].update(device_id="a/b"), Reason.INVALID_FIELD),
        (lambda d: d["readings"][0].update(device_id="#"), Reason.INVALID_FIELD),
        (lambda d: d["readings"][0].update(metrics={"flow": 1.0}), Reason.INVALID_FIELD),
        (lambda d: d["readings"][0].update(metrics={"flow_furlongs": 1.0}), Reason.INVALID_FIELD),
        (lambda d: d["readings"][0].update(metrics={"flow_lpm": "lots"}), Reason.INVALID_FIELD),
        (lambda d: d["readings"][0].update(metrics={}), Reason.INVALID_FIELD),
        (lambda d: d["readings"][0].update(quality=["sparkly"]), Reason.INVALID_FIELD),
    ],
)
def test_invalid_batches_name_their_reason(change, reason) -> None:
    document = _batch_dict()
    change(document)
    assert _reason_for(document) is reason


def test_nan_and_infinity_are_rejected() -> None:
    text = json.dumps(_batch_dict()).replace("1.5", "NaN")
    with pytest.raises(ContractError) as caught:
        decode(text, TelemetryBatch)
    assert caught.value.reason is Reason.INVALID_FIELD
    with pytest.raises(ValueError, match="finite"):
        Reading(device_id="m", ts_ms=MIN_TS_MS, seq=0, metrics={"flow_lpm": math.inf})


def test_error_detail_says_where() -> None:
    document = _batch_dict()
    document["readings"][0]["metrics"] = {"flow_lpm": "lots"}
    with pytest.raises(ContractError, match=r"readings\.0\.metrics\.flow_lpm"):
        decode(json.dumps(document), TelemetryBatch)


def test_payload_size_limit_and_non_objects() -> None:
    with pytest.raises(ContractError) as caught:
        decode(b" " * (4 * 1024 * 1024 + 1), TelemetryBatch)
    assert caught.value.reason is Reason.TOO_LARGE
    for payload in (b"[1, 2]", b'"telemetry"', b"42"):
        with pytest.raises(ContractError) as caught:
            decode_event(payload)
        assert caught.value.reason is Reason.NOT_AN_OBJECT
    with pytest.raises(ContractError) as caught:
        decode_event(b'{"type": "gossip"}')
    assert caught.value.reason is Reason.UNKNOWN_TYPE


def test_every_event_type_round_trips_through_decode_event() -> None:
    t = 1_767_225_600_000
    examples = [
        EdgeScore(site="dma-01", gateway_id="gw-01", model_id="edge-rf", model_version="3",
                  windows=[WindowScore(device_id="mtr-1", window_start_ms=t,
                                       window_end_ms=t + 3_600_000, score=0.9)]),
        DeviceStatus(site="dma-01", gateway_id="gw-01", state="birth", sent_ms=t,
                     devices=["mtr-1", "mtr-2"]),
        Alert(alert_id="a1", district="dma-01", kind="burst", severity="critical", score=1.0,
              est_loss_lph=36_000.0, evidence={"pressure_drop_bar": 1.1}, first_ts_ms=t,
              last_ts_ms=t + 60_000, model_version="burst-1"),
        WorkOrderEvent(work_order_id="wo-1", incident_id="inc-1", event="created", state="open",
                       priority=1, ts_ms=t, actor="mediator", alert_ids=["a1"]),
        Feedback(work_order_id="wo-1", alert_ids=["a1"], outcome="false_alarm", ts_ms=t),
        ModelAnnouncement(model_id="edge-rf", version="4", url="file:///models/4/model.onnx",
                          sha256="0" * 64, ts_ms=t),
        RawReading(ts_ms=t, metrics={"flow_lpm": 1.5, "battery_v": 3.6},
                   quality=[QualityFlag.BATTERY_LOW]),
        DeadLetter(reason="malformed_json", detail="payload: EOF", payload_b64="e30=",
                   received_ms=t, source_topic="mw/v1/site/dma-01/gw/gw-01/telemetry"),
    ]
    assert {type(e) for e in examples} | {TelemetryBatch} == set(EVENT_TYPES)
    for event in examples:
        assert decode_event(encode(event)) == event


def test_alert_needs_a_subject_and_ordered_times() -> None:
    base = {"alert_id": "a1", "kind": "leak", "severity": "minor", "score": 0.5,
            "first_ts_ms": MIN_TS_MS, "last_ts_ms": MIN_TS_MS, "model_version": "1",
            "type": "alert"}
    with pytest.raises(ContractError, match="device_id or a district"):
        decode(json.dumps(base), Alert)
    with pytest.raises(ContractError, match="before"):
        decode(json.dumps({**base, "device_id": "m", "first_ts_ms": MIN_TS_MS + 1}), Alert)
