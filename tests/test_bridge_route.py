"""Router: dead letters, identity, duplicates, lateness, partitions and the ledger; fuzzing."""

import base64
import itertools
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh_bridge.identity import Identity
from mesh_bridge.ledger import Counts
from mesh_bridge.route import Incoming, Routed, Router
from meshwatch.contract import (
    Alert,
    DeadLetter,
    DeviceStatus,
    EdgeScore,
    QualityFlag,
    Reading,
    TelemetryBatch,
    WindowScore,
    decode,
    encode,
    topics,
)
from meshwatch.registry import Device, DeviceKind, Registry

T0 = 1_767_225_600_000
HOUR = 3_600_000
OK_DEVICES = [f"ok-{i}" for i in range(12)]
FZ_DEVICES = [f"fz-{i}" for i in range(4)]


def registry() -> Registry:
    def row(device_id: str, gateway: str) -> Device:
        return Device(device_id=device_id, device_kind=DeviceKind.CUSTOMER_METER, site="s1",
                      district="d1", gateway_id=gateway, cadence_s=900)
    return Registry([row(d, "gw-ok") for d in OK_DEVICES] + [row(d, "gw-1") for d in FZ_DEVICES])


def router(partitions: int = 4) -> Router:
    return Router(Identity(registry()), partitions=partitions, late_horizon_ms=HOUR)


def batch(readings: list[tuple[str, int]], gateway: str = "gw-ok", ts_ms: int = T0,
          sent_ms: int = T0) -> TelemetryBatch:
    return TelemetryBatch(site="s1", gateway_id=gateway, sent_ms=sent_ms, readings=[
        Reading(device_id=d, ts_ms=ts_ms, seq=s, metrics={"flow_lpm": 1.5}) for d, s in readings
    ])


def incoming(payload: bytes, gateway: str = "gw-ok", kind: str = "site_telemetry") -> Incoming:
    topic = topics.build(kind, site="s1", gateway=gateway)
    return Incoming(topic, payload, T0 + 5, source_broker="site-a", client_id="bridge-1")


def forwarded(routed: Routed) -> list[Reading]:
    return [r for b in routed.batches for r in b.readings]


def letters(routed: Routed) -> list[DeadLetter]:
    return [decode(m.payload, DeadLetter) for m in routed.messages if "/deadletter/" in m.topic]


def test_valid_batch_is_forwarded_by_partition() -> None:
    r = router()
    readings = [(d, 1) for d in OK_DEVICES]
    routed = r.route(incoming(encode(batch(readings))))
    assert routed.counts.forwarded == len(OK_DEVICES)
    assert routed.counts.balanced
    assert routed.lag_ms == 5
    assert routed.messages == []
    for out in routed.batches:
        assert (out.site, out.gateway_id, out.sent_ms) == ("s1", "gw-ok", T0)
        assert all(topics.partition_of(x.device_id, 4) == out.partition for x in out.readings)
    assert sorted((x.device_id, x.seq) for x in forwarded(routed)) == sorted(readings)


@pytest.mark.parametrize(("topic", "payload", "reason"), [
    ("not/ours", b"{}", "bad_topic"),
    (topics.site_telemetry("s1", "gw-ok"), b"{nope", "malformed_json"),
    (topics.site_telemetry("s1", "gw-ok"), b"[1]", "not_an_object"),
    (topics.site_telemetry("s1", "gw-ok"), b'{"type": "telemetry"}', "missing_field"),
    (topics.site_telemetry("s1", "gw-ok"), b'{"type": "alert"}', "wrong_type"),
    (topics.site_status("s1", "gw-ok"), b'{"type": "status", "site": "s1"}', "missing_field"),
    (topics.build("site_alerts", site="s1", gateway="gw-ok"), b'{"type": "alert"}',
     "missing_field"),
    (topics.build("site_model", site="s1", gateway="gw-ok"), b"{}", "not_bridged"),
    (topics.mesh_telemetry(0), b"{}", "not_bridged"),
])
def test_rejects_become_dead_letters_with_source(topic: str, payload: bytes, reason: str) -> None:
    routed = router().route(Incoming(topic, payload, T0 + 5, "site-a", "cid"))
    [message] = routed.messages
    assert message.topic == topics.dead_letter(reason)
    letter = decode(message.payload, DeadLetter)
    assert (letter.reason, letter.source_topic, letter.source_broker) == (reason, topic, "site-a")
    assert (letter.client_id, letter.received_ms) == ("cid", T0 + 5)
    assert base64.b64decode(letter.payload_b64) == payload
    assert letter.detail
    assert routed.counts.dead_letters == {reason: 1}
    assert routed.counts.balanced


def test_payload_naming_another_gateway_is_a_mismatch() -> None:
    routed = router().route(incoming(encode(batch([("ok-1", 1)])), gateway="gw-1"))
    assert [x.reason for x in letters(routed)] == ["gateway_mismatch"]
    assert routed.counts.dead_lettered == 1
    assert routed.counts.balanced


def test_spoofed_readings_are_split_out_and_the_rest_forwarded() -> None:
    routed = router().route(incoming(encode(batch([("ok-1", 1), ("fz-1", 1), ("ok-2", 1),
                                                   ("ghost", 3)]))))
    assert [(x.device_id, x.seq) for x in forwarded(routed)] in (
        [("ok-1", 1), ("ok-2", 1)], [("ok-2", 1), ("ok-1", 1)])
    [letter] = letters(routed)
    assert letter.reason == "unauthorized_device"
    assert "fz-1, ghost" in letter.detail
    spoofed = decode(base64.b64decode(letter.payload_b64), TelemetryBatch)
    assert [x.device_id for x in spoofed.readings] == ["fz-1", "ghost"]
    assert (routed.counts.forwarded, routed.counts.dead_lettered) == (2, 2)
    assert routed.counts.balanced


def test_birth_authorizes_unregistered_devices() -> None:
    r = router()
    birth = DeviceStatus(site="s1", gateway_id="gw-1", state="birth", sent_ms=T0,
                         devices=["new-1", "ok-1"])
    routed = r.route(incoming(encode(birth), gateway="gw-1", kind="site_status"))
    assert routed.messages == []
    assert (routed.counts.status_applied, routed.counts.claims_refused) == (1, 1)
    routed = r.route(incoming(encode(batch([("new-1", 0), ("ok-1", 9)], gateway="gw-1")),
                              gateway="gw-1"))
    assert [x.device_id for x in forwarded(routed)] == ["new-1"]
    assert routed.counts.dead_lettered == 1


def test_duplicates_are_counted_not_forwarded() -> None:
    r = router()
    first = r.route(incoming(encode(batch([("ok-1", 1), ("ok-1", 2), ("ok-1", 1)]))))
    again = r.route(incoming(encode(batch([("ok-1", 2), ("ok-1", 3)]))))
    assert (first.counts.forwarded, first.counts.duplicates) == (2, 1)
    assert (again.counts.forwarded, again.counts.duplicates) == (1, 1)
    assert [x.seq for x in forwarded(again)] == [3]


def test_late_readings_are_flagged_by_sent_ms_and_forwarded() -> None:
    r = router()
    old = batch([("ok-1", 1), ("ok-2", 1)], ts_ms=T0 - HOUR - 1)
    routed = r.route(incoming(encode(old)))
    assert routed.counts.late == 2
    assert all(QualityFlag.LATE in x.quality for x in forwarded(routed))
    edge = batch([("ok-1", 2)], ts_ms=T0 - HOUR)
    assert r.route(incoming(encode(edge))).counts.late == 0
    flagged = TelemetryBatch(site="s1", gateway_id="gw-ok", sent_ms=T0, readings=[
        Reading(device_id="ok-1", ts_ms=T0 - 2 * HOUR, seq=3, metrics={"flow_lpm": 1.0},
                quality=(QualityFlag.LATE,))])
    [reading] = forwarded(r.route(incoming(encode(flagged))))
    assert reading.quality == (QualityFlag.LATE,)  # not flagged twice


def test_retract_lets_a_redelivery_through() -> None:
    r = router()
    payload = encode(batch([("ok-1", 1), ("ok-2", 1)]))
    routed = r.route(incoming(payload))
    r.retract(routed)
    assert r.route(incoming(payload)).counts.forwarded == 2


def test_bad_settings_say_what_to_do() -> None:
    with pytest.raises(ValueError, match="partitions must be >= 1"):
        Router(Identity(registry()), partitions=0)
    with pytest.raises(ValueError, match="epoch milliseconds"):
        Incoming("t", b"", received_ms=5)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(OK_DEVICES), st.integers(0, 30)), min_size=1,
                max_size=60), st.integers(1, 5))
def test_partitions_keep_per_device_order(events: list[tuple[str, int]], chunk: int) -> None:
    r = router(partitions=3)
    by_topic: dict[str, list[Reading]] = {}
    total = Counts()
    for start in range(0, len(events), chunk):
        routed = r.route(incoming(encode(batch(events[start:start + chunk]))))
        assert routed.counts.balanced
        total.add(routed.counts)
        for out in routed.batches:
            by_topic.setdefault(topics.mesh_telemetry(out.partition), []).extend(out.readings)
    assert total.balanced
    seen: set[tuple[str, int]] = set()
    expected = [e for e in events if not (e in seen or seen.add(e))]  # first arrivals, in order
    for device in OK_DEVICES:
        topic = topics.mesh_telemetry(topics.partition_of(device, 3))
        got = [x.seq for x in by_topic.get(topic, []) if x.device_id == device]
        assert got == [s for d, s in expected if d == device]


# --- fuzzing: >= 10,000 random and mutated payloads, interleaved with valid traffic ---------

GARBAGE_TOPICS = [topics.build(k, site="s1", gateway="gw-1") for k in
                  ("site_telemetry", "site_status", "site_scores", "site_alerts")] + [
    "mw/v1/site/s1/gw/gw-1/raw/fz-1", "mw/v1/site/s1/gw", "", "mw/v1/site/s1/gw/gw-ok/../x"]
TEMPLATES = [
    encode(batch([(d, i) for i, d in enumerate(FZ_DEVICES)], gateway="gw-1")),
    encode(DeviceStatus(site="s1", gateway_id="gw-1", state="birth", sent_ms=T0,
                        devices=["fz-1", "zz-9"])),
]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=3),
    max_leaves=6,
)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    payload = bytearray(draw(st.sampled_from(TEMPLATES)))
    how = draw(st.sampled_from(["flip", "cut", "insert", "field"]))
    at = draw(st.integers(0, len(payload) - 1))
    if how == "flip":
        payload[at] = draw(st.integers(0, 255))
    elif how == "cut":
        del payload[at:]
    elif how == "insert":
        payload[at:at] = draw(st.binary(min_size=1, max_size=8))
    else:
        doc = json.loads(payload)
        key = draw(st.sampled_from([*doc, "readings"]))
        if key == "readings" and "readings" in doc:
            reading = draw(st.sampled_from(doc["readings"]))
            reading[draw(st.sampled_from([*reading, "x"]))] = draw(JSON_VALUES)
        else:
            doc[key] = draw(JSON_VALUES)
        return json.dumps(doc, allow_nan=True).encode()
    return bytes(payload)


GARBAGE = st.tuples(
    st.sampled_from(GARBAGE_TOPICS) | st.text(max_size=30),
    st.binary(max_size=64) | st.text(max_size=64).map(str.encode) | mutated()
    | JSON_VALUES.map(lambda v: json.dumps(v).encode()),
)
PER_EXAMPLE = 100
EXAMPLES = 105
fuzzed = itertools.count()


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(GARBAGE, min_size=PER_EXAMPLE, max_size=PER_EXAMPLE),
       st.lists(st.booleans(), min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
def test_fuzzed_payloads_never_raise_and_valid_traffic_all_goes_through(
    garbage: list[tuple[str, bytes]], valid_after: list[bool],
) -> None:
    r = router()
    seq = itertools.count()
    sent: list[tuple[str, int]] = []
    got: list[tuple[str, int]] = []
    for (topic, payload), then_valid in zip(garbage, valid_after, strict=True):
        next(fuzzed)
        routed = r.route(Incoming(topic, payload, T0, "site-a"))
        counts = routed.counts
        assert counts.balanced
        assert counts.dead_letters or counts.forwarded or counts.duplicates or (
            counts.status_applied), (topic, payload)
        for letter in letters(routed):
            assert letter.reason
            assert letter.detail
            assert letter.source_topic == topic[:2000]
        if then_valid:
            readings = [(OK_DEVICES[n % len(OK_DEVICES)], n) for n in itertools.islice(seq, 7)]
            sent += readings
            routed = r.route(incoming(encode(batch(readings))))
            assert routed.counts.forwarded == len(readings)
            got += [(x.device_id, x.seq) for x in forwarded(routed)]
    assert sorted(got) == sorted(sent)


def test_fuzzing_covered_at_least_10000_payloads() -> None:
    if next(fuzzed) == 0:  # selected alone: run the fuzz test, which counts its payloads
        test_fuzzed_payloads_never_raise_and_valid_traffic_all_goes_through()
    assert next(fuzzed) >= 10_000


def test_site_dead_letter_is_forwarded_unchanged_under_its_reason() -> None:
    letter = DeadLetter(reason="malformed_json", detail="bad", payload_b64="e30=",
                        received_ms=T0)
    topic = topics.build("site_dead_letter", site="s1", gateway="gw-ok", reason="malformed_json")
    routed = router().route(Incoming(topic, encode(letter), T0 + 5))
    assert routed.messages == [(topics.dead_letter("malformed_json"), encode(letter))]
    assert routed.counts.dead_letters == {"malformed_json": 1}
    assert routed.counts.balanced


def test_site_dead_letter_that_is_not_one_is_dead_lettered() -> None:
    topic = topics.build("site_dead_letter", site="s1", gateway="gw-ok", reason="x")
    routed = router().route(Incoming(topic, b'{"type": "telemetry"}', T0 + 5))
    assert [x.reason for x in letters(routed)] == ["wrong_type"]


def scores(devices: list[str], gateway: str = "gw-ok") -> EdgeScore:
    return EdgeScore(site="s1", gateway_id=gateway, model_id="edge-rf", model_version="v1",
                     windows=[WindowScore(device_id=d, window_start_ms=T0, window_end_ms=T0 + 1,
                                          score=0.5) for d in devices])


def test_edge_scores_go_to_their_devices_partitions_and_spoofs_to_dead_letters() -> None:
    topic = topics.build("site_scores", site="s1", gateway="gw-ok")
    routed = router().route(Incoming(topic, encode(scores([*OK_DEVICES, "fz-1"])), T0 + 5))
    [letter] = letters(routed)
    assert letter.reason == "unauthorized_device"
    spoofed = decode(base64.b64decode(letter.payload_b64), EdgeScore)
    assert [w.device_id for w in spoofed.windows] == ["fz-1"]
    forwarded_windows = []
    for message in routed.messages:
        if "/mesh/scores/" in message.topic:
            out = decode(message.payload, EdgeScore)
            part = int(message.topic.rsplit("/", 1)[1])
            assert {topics.partition_of(w.device_id, 4) for w in out.windows} == {part}
            assert (out.model_id, out.model_version) == ("edge-rf", "v1")
            forwarded_windows += [w.device_id for w in out.windows]
    assert sorted(forwarded_windows) == sorted(OK_DEVICES)
    mismatch = router().route(Incoming(topic, encode(scores(OK_DEVICES, gateway="gw-1")), T0))
    assert [x.reason for x in letters(mismatch)] == ["gateway_mismatch"]


def test_edge_alerts_are_forwarded_unchanged_unless_about_a_foreign_device() -> None:
    topic = topics.build("site_alerts", site="s1", gateway="gw-ok")

    def alert(device: str) -> Alert:
        return Alert(alert_id=f"edge-{device}", device_id=device, kind="burst",
                     severity="critical", score=0.97, first_ts_ms=T0, last_ts_ms=T0,
                     model_version="v1")

    ok = encode(alert("ok-1"))
    routed = router().route(Incoming(topic, ok, T0 + 5))
    assert routed.messages == [(topics.alerts("s1", "burst"), ok)]
    [letter] = letters(router().route(Incoming(topic, encode(alert("fz-1")), T0 + 5)))
    assert letter.reason == "unauthorized_device"
    assert "does not own devices [fz-1]" in letter.detail
