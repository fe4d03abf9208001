"""The mesh source's ack protocol against a real mosquitto, without bytewax around it.

A *crash* here stops a partition's network loop without a DISCONNECT or an ack and connects a
new partition with the same client id, which takes the persistent session over. Every test
runs over MQTT 5 and over 3.1.1 (mosquitto speaks both; the embedded amqtt only 3.1.1), whose
persistent session is ``clean_session=False`` and whose in-flight bound is the source's own.
"""

from __future__ import annotations

import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from dataflows.connectors.mqtt import MeshSource, MqttSourceSettings, SourceState
from edge_agent.publisher import BrokerAddress
from meshwatch.contract import topics

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["5", "3.1.1"])
def protocol(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def source(broker, protocol: str, receive_maximum: int = 1000) -> MeshSource:
    return MeshSource(MqttSourceSettings(BrokerAddress(broker.host, broker.port), 1,
                                         client_id="src-test", session_expiry_s=600,
                                         receive_maximum=receive_maximum,
                                         protocol=protocol))  # type: ignore[arg-type]


def publish(broker, payloads: list[bytes]) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    for payload in payloads:
        client.publish(topics.mesh_telemetry(0), payload, qos=1).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


def take(part, expect: int, wait_s: float = 5.0) -> list[bytes]:
    """Poll next_batch until ``expect`` messages came, then a little longer for extras."""
    got: list[bytes] = []
    deadline = time.monotonic() + wait_s
    quiet_until = None
    while time.monotonic() < deadline:
        got += [m.payload for m in part.next_batch()]
        if len(got) >= expect and quiet_until is None:
            quiet_until = time.monotonic() + 0.5
        if quiet_until is not None and time.monotonic() > quiet_until:
            break
        time.sleep(0.02)
    return got


def crash(part) -> None:
    part._client.loop_stop()  # no ack, no DISCONNECT: the session keeps what is in flight


def started(src: MeshSource, resume: SourceState | None):
    part = src.build_part("mesh", "0", resume)
    deadline = time.monotonic() + 5
    while not part._connected:
        assert time.monotonic() < deadline, "the partition did not connect"
        time.sleep(0.02)
    time.sleep(0.2)  # the subscription
    return part


def test_acks_wait_one_snapshot_and_a_restart_skips_what_the_state_holds(mosquitto,
                                                                          protocol) -> None:
    src = source(mosquitto, protocol)
    part = started(src, None)
    publish(mosquitto, [b"m1", b"m2", b"m3"])
    assert take(part, 3) == [b"m1", b"m2", b"m3"]
    state = part.snapshot()  # epoch 1 ends: m1-m3 pending, nothing acked yet
    assert len(state.skip) == 3
    crash(part)
    # restart from that snapshot: the broker redelivers m1-m3, the restored state has them,
    # so they are acknowledged and skipped
    part = started(src, state)
    publish(mosquitto, [b"m4", b"m5"])
    assert take(part, 2) == [b"m4", b"m5"]
    assert part.skipped_count == 3
    crash(part)  # before any snapshot: m4 and m5 are in no committed state
    part = started(src, state)
    assert take(part, 2) == [b"m4", b"m5"]  # they come again: at-least-once
    part.snapshot()  # epoch 1 ends: m4, m5 pending
    state = part.snapshot()  # epoch 2 ends: epoch 1 is committed, m4, m5 are acknowledged now
    time.sleep(0.3)
    crash(part)
    part = started(src, state)
    publish(mosquitto, [b"m6"])
    assert take(part, 1) == [b"m6"]  # nothing else: m1-m5 were all acknowledged
    assert part.skipped_count == 0
    part.close()


def test_a_redelivered_copy_of_a_pending_message_is_skipped_and_acked_later(mosquitto,
                                                                            protocol) -> None:
    src = source(mosquitto, protocol)
    part = started(src, None)
    publish(mosquitto, [b"same", b"same", b"other"])  # a bridge republish: same bytes twice
    assert take(part, 2) == [b"same", b"other"]
    assert part.skipped_count == 1
    assert part.taken_count == 2
    part.snapshot()
    part.snapshot()  # both copies of "same" and "other" are acknowledged now
    time.sleep(0.3)
    crash(part)
    part = started(src, None)  # no resume state: anything unacknowledged would be taken
    assert take(part, 0, wait_s=1.5) == []
    part.close()


def test_at_most_receive_maximum_messages_are_held_until_acked(mosquitto, protocol) -> None:
    # MQTT 5: the broker stops at Receive Maximum; 3.1.1: the partition stops reading
    src = source(mosquitto, protocol, receive_maximum=2)
    part = started(src, None)
    publish(mosquitto, [b"m1", b"m2", b"m3", b"m4", b"m5"])
    assert take(part, 2, wait_s=1.5) == [b"m1", b"m2"]  # m3-m5 wait while m1, m2 are held
    part.snapshot()  # m1, m2 pending for one more snapshot: still nothing more
    assert take(part, 0, wait_s=1.0) == []
    part.snapshot()  # m1, m2 acknowledged: slots free, the rest comes as acks go out
    rest: list[bytes] = []
    for _ in range(6):
        rest += take(part, 1, wait_s=1.0)
        part.snapshot()
    assert rest == [b"m3", b"m4", b"m5"]
    part.snapshot()
    time.sleep(0.3)
    crash(part)
    part = started(src, None)  # all five were acknowledged: nothing comes again
    assert take(part, 0, wait_s=1.0) == []
    part.close()
