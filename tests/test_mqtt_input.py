"""Raw readings of local devices over MQTT: seqs, dead letters, persistent session, fuzzing."""

from __future__ import annotations

import base64
import signal
import subprocess
import sys
import threading
from collections import defaultdict
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mqtt_ledger import Ledger, wait_until
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from servers import Mosquitto

from edge_agent.mqtt_input import Delivery, DeviceReading, InvalidMessage, MqttReadingInput
from edge_agent.publisher import paho_protocol
from meshwatch.contract import (
    DeadLetter,
    RawReading,
    TelemetryBatch,
    decode_event,
    encode,
    topics,
)

SITE, GATEWAY = "dma-01", "dma-01-gw-007"
T0 = 1_767_225_600_000
DEVICES = ["mtr-1", "mtr-2", "mtr-3", "dma-01-inlet"]


def _config(tmp_path: Path, broker: Mosquitto, protocol: str = "5") -> Path:
    path = tmp_path / "edge.toml"
    path.write_text(
        f'[site_broker]\nurl = "{broker.url}"\n[edge]\nsite = "{SITE}"\n'
        f'gateway_id = "{GATEWAY}"\noutbox_path = "{tmp_path / "o.db"}"\n'
        'outbox_synchronous = "NORMAL"\nbacklog_rate_per_s = 0\nshutdown_timeout_s = 5\n'
        f'raw_input_url = "{broker.url}"\nraw_input_protocol = "{protocol}"\n'
    )
    return path


def _edge(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "meshwatch.cli", "edge", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _stop(process: subprocess.Popen[str]) -> str:
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "Traceback" not in err
    return out


def _open_agent_session(broker: Mosquitto, protocol: str) -> None:
    """Create the agent's persistent session, as its first start would: the broker queues."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"mw-edge-raw-{SITE}-{GATEWAY}",
                         protocol=paho_protocol(protocol),
                         clean_session=False if protocol == "3.1.1" else None)
    if protocol == "5":
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 600
        client.connect(broker.host, broker.port, clean_start=False, properties=properties)
    else:
        client.connect(broker.host, broker.port)
    subscribed = threading.Event()
    client.on_subscribe = lambda *_: subscribed.set()
    client.loop_start()
    client.subscribe(topics.subscription("site_raw", site=SITE, gateway=GATEWAY), 1)
    assert subscribed.wait(10), "could not create the agent's session"
    client.disconnect()
    client.loop_stop()


class Devices:
    """Local devices publishing raw messages at QoS1."""

    def __init__(self, broker: Mosquitto) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="devices")
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.sent: dict[str, list[int]] = defaultdict(list)  # device -> ts_ms, in order

    def reading(self, device: str, ts_ms: int) -> None:
        payload = encode(RawReading(ts_ms=ts_ms, metrics={"flow_lpm": ts_ms % 1000 / 10}))
        self.raw(self.topic(device), payload)
        self.sent[device].append(ts_ms)

    def readings(self, count: int, start: int = 0) -> None:
        for i in range(start, start + count):
            for device in DEVICES:
                self.reading(device, T0 + i * 60_000)

    @staticmethod
    def topic(device: str) -> str:
        return f"mw/v1/site/{SITE}/gw/{GATEWAY}/raw/{device}"

    def raw(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _delivered(ledger: Ledger) -> dict[str, dict[int, int]]:
    """Device -> ts_ms -> seq of every reading that reached the site broker."""
    found: dict[str, dict[int, int]] = defaultdict(dict)
    for event in list(ledger.events):
        if isinstance(event, TelemetryBatch):
            for r in event.readings:
                found[r.device_id].setdefault(r.ts_ms, r.seq)
    return found


def _assert_numbered_in_order(ledger: Ledger, devices: Devices) -> None:
    """Every sent reading arrived once, with seqs 0..n-1 in the order it was sent."""
    delivered = _delivered(ledger)
    assert set(delivered) == set(devices.sent)
    for device, sent in devices.sent.items():
        seqs = [delivered[device].get(ts) for ts in sent]
        assert seqs == list(range(len(sent))), f"{device}: {seqs}"
    arrivals = [(d, s) for d, s in ledger.arrivals]
    assert len(set(arrivals)) == sum(len(s) for s in devices.sent.values())  # no extra seq


def _wait_delivered(ledger: Ledger, devices: Devices) -> None:
    def complete() -> bool:
        delivered = _delivered(ledger)
        return all(set(ts) <= set(delivered[d]) for d, ts in devices.sent.items())
    wait_until(complete, 20, "every raw reading at the site broker")


@pytest.fixture
def ledger(mosquitto: Mosquitto) -> Ledger:
    ledger = Ledger(mosquitto, "ledger-raw", topics.subscription("site_telemetry"),
                    topics.subscription("site_dead_letter", site=SITE, gateway=GATEWAY))
    yield ledger
    ledger.close()


def test_raw_readings_get_seqs_and_bad_ones_become_dead_letters(
    tmp_path, mosquitto, ledger
) -> None:
    _open_agent_session(mosquitto, "5")
    agent = _edge(_config(tmp_path, mosquitto))
    devices = Devices(mosquitto)
    topic = devices.topic("mtr-1")
    t = T0
    bad = [  # (topic, payload, reason)
        (topic, b'{"ts_ms": 1767225600000, "metrics": {"flow_lpm": 1', "malformed_json"),
        (topic, b'{"ts_ms": 1767225600000, "metrics": {"Flow": 1}}', "invalid_field"),
        (topic, b'{"ts_ms": 1767225600000, "metrics": {"flow_lpm": NaN}}', "invalid_field"),
        (topic, b'{"ts_ms": 1767225600000, "metrics": {"flow_lpm": "high"}}', "invalid_field"),
        (topic, b'{"type": "telemetry", "ts_ms": 1767225600000, "metrics": {}}', "wrong_type"),
        (topic, b"[]", "not_an_object"),
        (devices.topic("-not-an-id"), encode(RawReading(ts_ms=t, metrics={"flow_lpm": 1.0})),
         "bad_topic"),
    ]
    try:
        devices.readings(10)
        for bad_topic, payload, _ in bad:
            devices.raw(bad_topic, payload)
        devices.readings(10, start=10)  # good readings keep flowing behind the bad ones
        _wait_delivered(ledger, devices)
        wait_until(lambda: len(_dead_letters(ledger)) >= len(bad), 10, "the dead letters")
    finally:
        out = _stop(agent)
        devices.close()
    _assert_numbered_in_order(ledger, devices)
    dead = _dead_letters(ledger)
    assert sorted((d.source_topic, base64.b64decode(d.payload_b64), d.reason) for d in dead) \
        == sorted(bad)
    assert all(d.client_id == f"mw-edge-raw-{SITE}-{GATEWAY}" for d in dead)
    assert "dead_letters" in out


def _dead_letters(ledger: Ledger) -> list[DeadLetter]:
    return [e for e in list(ledger.events) if isinstance(e, DeadLetter)]


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_readings_sent_while_the_agent_is_down_arrive_after_its_restart(
    tmp_path, mosquitto, ledger, protocol
) -> None:
    _open_agent_session(mosquitto, protocol)
    config = _config(tmp_path, mosquitto, protocol)
    devices = Devices(mosquitto)
    agent = _edge(config)
    try:
        devices.readings(5)
        _wait_delivered(ledger, devices)
    finally:
        _stop(agent)
    devices.readings(5, start=5)  # the agent is down: the broker queues for its session
    agent = _edge(config)
    try:
        _wait_delivered(ledger, devices)
    finally:
        _stop(agent)
        devices.close()
    # none missing, and none twice: the first run acknowledged all it stored before leaving
    _assert_numbered_in_order(ledger, devices)


level = st.one_of(st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}\Z"),
                  st.text(st.characters(blacklist_categories=("Cs",)), max_size=80))
payloads = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda ts, v: encode(RawReading(ts_ms=ts, metrics={"flow_lpm": v})),
              st.integers(946_684_800_000, 4_102_444_799_999),
              st.floats(allow_nan=False, allow_infinity=False)),
    st.dictionaries(st.text(max_size=10), st.none() | st.integers() | st.floats() | st.text(),
                    max_size=4).map(lambda d: repr(d).encode()),
)


@given(device=level, payload=payloads,
       prefix=st.sampled_from([f"mw/v1/site/{SITE}/gw/{GATEWAY}/raw/", "mw/v1/site/x/gw/y/raw/",
                               "", "mw/v1/"]))
def test_any_message_gives_a_reading_or_a_dead_letter(device, payload, prefix) -> None:
    got: list[DeviceReading | InvalidMessage] = []
    source = MqttReadingInput("mqtt://127.0.0.1:1", site=SITE, gateway_id=GATEWAY,
                              on_reading=got.append, on_invalid=got.append)
    topic = prefix + device
    source.handle(topic, payload, Delivery(1, 1, 0))
    assert len(got) == 1
    item = got[0]
    if isinstance(item, DeviceReading):
        assert item.device_id == device
        assert topic == Devices.topic(device)
    else:
        dead = source.dead_letter(item)
        assert decode_event(encode(dead)) == dead
        assert base64.b64decode(dead.payload_b64) == payload
