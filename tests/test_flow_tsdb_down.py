"""The TSDB goes away for 60 s: the flow back-pressures, stays small, catches up, loses nothing.

The first half of the load is stored, then VictoriaMetrics stops and the second half is
published. While the writer retries (back-off capped at ``flow.write_retry_max_s``, 1 s here):

- no epoch completes, so nothing new is committed (the lake stays as it was) and no message is
  acknowledged: the broker keeps the backlog, its stored-message count does not go down;
- the flow holds at most ``flow.receive_maximum`` messages per partition (20 here, of 250
  readings), not the backlog: its RSS stays within a few MB of what it was when the writes
  started failing, while the broker holds tens of thousands of readings for it.

Then VictoriaMetrics comes back and the flow catches up: every reading stored once, the
lake and the counters exact.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import paho.mqtt.client as mqtt
import pytest
from flow_support import (
    CLIENT_ID,
    FlowProcess,
    Load,
    build_load,
    counters,
    create_sessions,
    expected,
    lake_ids,
    publish,
    telemetry,
    wait_for,
    write_config,
    write_registry,
)
from paho.mqtt.enums import CallbackAPIVersion

from meshwatch.contract import TelemetryBatch, decode

pytestmark = pytest.mark.timeout(240)

OUTAGE_S = 60
RECEIVE_MAXIMUM = 20
PER_MESSAGE = 250
RSS_GROWTH_MAX_MB = 10
"""What the flow may grow by while the TSDB is down: the in-flight messages (4 partitions x 20
x 250 readings) and allocator noise. The ~47k readings of the backlog, decoded, would take
several times more (it grew by 0.1 MB when measured)."""
STORE_COUNT = "$SYS/broker/store/messages/count"
"""Messages mosquitto holds (queued or in flight, not yet acknowledged); published every 10 s
(``sys_interval``), and only when it changed."""
SYS_INTERVAL_S = 10


def halves(load: Load) -> tuple[Load, Load]:
    first, second = Load(), Load()
    for p, messages in load.messages.items():
        first.messages[p] = messages[:len(messages) // 2]
        second.messages[p] = messages[len(messages) // 2:]
    return first, second


class StoreCount:
    """The broker's stored-message count (``$SYS``), every value it publishes."""

    def __init__(self, broker) -> None:
        self.values: list[int] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe(STORE_COUNT, qos=0)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.values.append(int(msg.payload))

    def changes(self) -> int:
        with self._lock:
            return len(self.values)

    def latest(self) -> int:
        with self._lock:
            return self.values[-1]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_the_flow_waits_for_the_tsdb_and_catches_up(cloud, victoria_metrics, tmp_path) -> None:
    load = build_load(seed=8, devices=400, minutes=240, per_message=PER_MESSAGE)
    want = expected(load)
    first, second = halves(load)
    backlog = want_counts_of(second)["received"]
    lake = tmp_path / "lake"
    config = write_config(tmp_path / "flow.toml", cloud, victoria_metrics, lake,
                          write_registry(tmp_path / "registry.csv", load.registered),
                          receive_maximum=RECEIVE_MAXIMUM)
    create_sessions(cloud, CLIENT_ID)
    store = StoreCount(cloud)
    try:
        with FlowProcess(config, tmp_path / "flow.log", recovery=tmp_path / "recovery",
                         snapshot_s=0.5) as flow:
            publish(cloud, first)
            wait_for(lambda: len(lake_ids(lake)) > 0 and counters(victoria_metrics).get(
                "received", 0) == want_counts_of(first)["received"], 60, "the first half",
                flow)
            victoria_metrics.stop()
            publish(cloud, second)
            wait_for(lambda: "retrying in" in flow.tail(200), 10, "a failed write", flow)
            stalled_at = len(lake_ids(lake))
            rss = [flow.rss_mb()]
            for second_of_outage in range(1, OUTAGE_S + 1):
                time.sleep(1)
                rss.append(flow.rss_mb())
                if second_of_outage == SYS_INTERVAL_S + 2:  # the count after the publish
                    stored, changes = store.latest(), store.changes()
            # back-pressure: no epoch completes while a write waits, nothing is acknowledged
            assert len(lake_ids(lake)) == stalled_at
            assert flow.alive(), flow.tail()
            assert (store.changes(), store.latest()) == (changes, stored), (
                "the broker's store changed while the TSDB was down: messages were acknowledged")
            assert stored >= second.message_count - 4 * RECEIVE_MAXIMUM, (
                stored, second.message_count)
            # bounded: the flow did not take the backlog in
            assert max(rss) - rss[0] < RSS_GROWTH_MAX_MB, rss
            victoria_metrics.start()
            wait_for(lambda: len(lake_ids(lake)) >= len(load.readings)
                     and counters(victoria_metrics).get("received", 0) >= want.counts[
                         "received"], 60, "the flow to catch up", flow)
            time.sleep(2)  # idle flush and one more epoch
    finally:
        store.close()
    assert "failed (" in flow.log.read_text()
    stored_points = telemetry(victoria_metrics)
    assert set(stored_points["false"]) == set(want.measured)
    assert not [k for series in stored_points.values() for k, v in series.items() if len(v) > 1]
    ids = Counter(lake_ids(lake))
    assert set(ids) == load.readings
    assert max(ids.values()) == 1
    got = counters(victoria_metrics)
    assert got["received"] == want.counts["received"]
    assert got["duplicates"] == want.counts["duplicates"]
    assert got["measured"] + got["late"] == len(load.readings)
    print(f"outage {OUTAGE_S}s: {backlog} readings in {second.message_count} messages held "
          f"back, broker store {stored} messages, flow RSS {rss[0]:.1f} -> max {max(rss):.1f} MB")


def want_counts_of(part: Load) -> dict[str, int]:
    """Readings received (byte-identical copies excluded) in a part of the load."""
    received = 0
    for messages in part.messages.values():
        seen: set[bytes] = set()
        for payload in messages:
            if payload in seen:
                continue
            seen.add(payload)
            try:
                received += len(decode(payload, TelemetryBatch).readings)
            except ValueError:
                continue
    return {"received": received}
