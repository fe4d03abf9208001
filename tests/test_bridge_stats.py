"""The bridge's pipeline statistics in a real TSDB: its ledger, dead letters, heartbeats."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from bridge_support import DEVICES, create_site_session, spawn_bridge, write_config
from mqtt_ledger import Ledger, wait_until
from paho.mqtt.enums import CallbackAPIVersion
from servers import Mosquitto, VictoriaMetrics

from meshwatch.contract import DeviceStatus, Reading, TelemetryBatch, encode, topics

pytestmark = pytest.mark.timeout(90)

T0 = 1_767_225_600_000
GW = "gw-0"


def newest(vm: VictoriaMetrics, match: str) -> tuple[int, float] | None:
    """(timestamp, value) of the newest sample of the one series matching ``match``."""
    vm.force_flush()
    series = vm.export(match)
    if not series:
        return None
    assert len(series) == 1, series
    return max(zip(series[0]["timestamps"], series[0]["values"], strict=True))


def value(vm: VictoriaMetrics, match: str) -> float | None:
    sample = newest(vm, match)
    return None if sample is None else sample[1]


def test_the_bridge_writes_its_ledger_and_heartbeats_and_never_waits_for_the_tsdb(
        mosquitto: Mosquitto, cloud: Mosquitto, victoria_metrics: VictoriaMetrics,
        tmp_path: Path) -> None:
    victoria_metrics.stop()  # down from the start: forwarding must not wait for it
    config = write_config(tmp_path, mosquitto, cloud, "bridge-stats", extra=(
        f'stats_s = 0.3\n[influxdb]\nurl = "{victoria_metrics.url}"\n'))
    ledger = Ledger(cloud, "cloud-ledger", topics.subscription("mesh_telemetry"))
    create_site_session(mosquitto, "bridge-stats")
    site = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="site-pub")
    site.connect(mosquitto.host, mosquitto.port)
    site.loop_start()
    bridge: subprocess.Popen[bytes] | None = None
    try:
        readings = [Reading(device_id=d, ts_ms=T0, seq=1, metrics={"flow_lpm": 1.0})
                    for d in DEVICES[GW]]
        batch = encode(TelemetryBatch(site="s1", gateway_id=GW, sent_ms=T0, readings=readings))
        beat_ms = int(time.time() * 1000)
        beat = encode(DeviceStatus(site="s1", gateway_id=GW, state="heartbeat", sent_ms=beat_ms,
                                   counters={"readings_in": 10, "queue_depth": 7,
                                             "oldest_age_s": 12, "readings_dropped": 0}))
        telemetry = topics.site_telemetry("s1", GW)
        for topic, payload in [(telemetry, batch), (telemetry, batch),  # 5 duplicates
                               (telemetry, b"{nope"),  # a dead letter
                               (topics.site_status("s1", GW), beat)]:
            site.publish(topic, payload, qos=1).wait_for_publish(10)
        bridge = spawn_bridge(config, tmp_path / "bridge.log")
        ledger.wait_for({(d, 1) for d in DEVICES[GW]}, timeout=30)  # TSDB still down

        victoria_metrics.start()
        wait_until(lambda: value(victoria_metrics, 'mw_ledger_received{hop="bridge"}') == 10,
                   timeout=30, what="the bridge's ledger in the TSDB")
        vm = victoria_metrics
        assert value(vm, 'mw_ledger_forwarded{hop="bridge"}') == 5
        assert value(vm, 'mw_ledger_duplicates{hop="bridge"}') == 5
        assert value(vm, 'mw_ledger_dropped{hop="bridge"}') == 0
        assert value(vm, 'mw_bridge_messages_in{bridge="bridge-stats"}') == 4
        assert value(vm, 'mw_bridge_readings_forwarded') == 5
        assert value(vm, 'mw_dead_letters_count{component="bridge",reason="malformed_json"}') == 1
        assert newest(vm, f'mw_edge_queue_depth{{site="s1",gateway="{GW}"}}') == (beat_ms, 7)
        assert value(vm, f'mw_edge_oldest_queued_age_s{{gateway="{GW}"}}') == 12
        assert newest(vm, f'mw_ledger_received{{hop="edge",instance="{GW}"}}') == (beat_ms, 10)
        assert value(vm, 'mw_bridge_cloud_connected') == 1
    finally:
        site.disconnect()
        site.loop_stop()
        ledger.close()
        if bridge is not None:
            bridge.terminate()
            assert bridge.wait(20) == 0, (tmp_path / "bridge.log").read_text()[-3000:]
