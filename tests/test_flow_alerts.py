"""Detection end to end: a simulated fleet → cloud mosquitto → ``meshwatch flow`` → alert topic.

The fleet of ``tests/detect_support.py`` (300 meters, 2 districts, 3 days, incidents raised)
is published as mesh telemetry, partition by partition, before the flow starts. The alerts
the flow publishes to ``mw/v1/alerts/{district}/{kind}`` must be, message for message (id,
status, kind, device, district, severity, times, score, loss), those of ``meshwatch
evaluate``'s pipeline on the same seed: the fleet delivers each device's readings in order,
which is when the two must agree (``detect_support`` explains why they differ otherwise).
The same alerts are in VictoriaMetrics as ``mw_alert``, every scored reading as
``mw_score``. A crew's false alarm on ``mw/v1/feedback/{district}`` clears its leak alert
as it does in evaluate's pipeline, once however often it comes; an edge model's scores on
``mw/v1/mesh/scores/{n}`` are stored as ``mw_edge_score``. After ``kill -9`` and restarts
with recovery, the distinct alert messages are still exactly evaluate's (at-least-once: a
replayed epoch may publish a message twice, with the same id).
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter, defaultdict

import paho.mqtt.client as mqtt
import pytest
from detect_support import alert_keys, eval_settings, mesh_load, write_fleet_registry
from flow_support import (
    CLIENT_ID,
    PARTITIONS,
    AlertWatch,
    FlowProcess,
    Load,
    create_sessions,
    detect_counts,
    publish,
    publish_feedback,
    wait_for,
    write_config,
)
from paho.mqtt.enums import CallbackAPIVersion

from meshwatch.contract import (
    Alert,
    AlertStatus,
    EdgeScore,
    Feedback,
    Outcome,
    encode,
    topics,
)
from meshwatch.contract.topics import partition_of
from models.evaluate import simulate_and_detect
from models.feedback import FeedbackApplier

pytestmark = pytest.mark.timeout(150)


@pytest.fixture(scope="module")
def fleet() -> tuple[object, list[Alert], Load, Feedback, list[Alert]]:
    """The fleet, evaluate's alerts, the load, and a false alarm reported on a leak alert
    with the alert messages it causes in evaluate's pipeline."""
    settings = eval_settings()
    load = Load()
    for p, messages in mesh_load(settings, PARTITIONS).items():
        load.messages[p] = messages
    run = simulate_and_detect(settings)
    leak = min((a for a in run.alerts if a.evidence["category"] == "customer_leak"),
               key=lambda a: a.alert_id)
    feedback = Feedback(work_order_id="wo-test-1", alert_ids=[leak.alert_id],
                        outcome=Outcome.FALSE_ALARM, device_id=leak.device_id,
                        ts_ms=max(a.last_ts_ms for a in run.alerts))
    cleared = [a.model_copy(update={"district": leak.district})
               for a in FeedbackApplier(run.pipeline).apply(feedback)]
    return settings, run.alerts, load, feedback, cleared


def vm_alerts(vm) -> list[tuple[object, ...]]:
    """``(device, district, kind, severity, status, last_ts_ms, score)`` of each mw_alert point."""
    vm.force_flush()
    rows = []
    for series in vm.export('{__name__="mw_alert_score"}'):
        m = series["metric"]
        for ts, value in zip(series["timestamps"], series["values"], strict=True):
            rows.append((m.get("device", ""), m["district"], m["kind"], m["severity"], m["status"],
                         ts, round(value, 6)))
    return sorted(set(rows))


def vm_scores(vm) -> dict[tuple[str, int], list[float]]:
    """``{(device, ts_ms): [score samples]}`` of ``mw_score``."""
    vm.force_flush()
    out: dict[tuple[str, int], list[float]] = defaultdict(list)
    for series in vm.export('{__name__="mw_score_score"}'):
        for ts, value in zip(series["timestamps"], series["values"], strict=True):
            out[(series["metric"]["device"], ts)].append(value)
    return out


def want_vm(alerts: list[Alert]) -> list[tuple[object, ...]]:
    return sorted({(a.device_id or "", a.district, a.kind.value, a.severity.value, a.status.value,
                    a.last_ts_ms, round(a.score, 6)) for a in alerts})


def publish_edge_scores(cloud, alerts: list[Alert]) -> dict[tuple[str, int], float]:
    """An edge model's scores of the devices with alerts, to their mesh partitions."""
    devices = sorted({a.device_id for a in alerts if a.device_id is not None})
    end = max(a.last_ts_ms for a in alerts)
    windows = {(d, end - 3_600_000 * k): round(0.1 * (i % 10), 3)
               for i, d in enumerate(devices) for k in range(3)}
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(cloud.host, cloud.port)
    client.loop_start()
    for p in range(PARTITIONS):
        mine = [{"device_id": d, "window_start_ms": ts - 3_600_000, "window_end_ms": ts,
                 "score": score} for (d, ts), score in windows.items()
                if partition_of(d, PARTITIONS) == p]
        if mine:
            message = EdgeScore(site="dma-01", gateway_id="gw-1", model_id="edge-rf",
                                model_version="1", windows=mine)
            client.publish(topics.build("mesh_scores", partition=p), encode(message),
                           qos=1).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()
    return windows


def vm_edge_scores(vm) -> dict[tuple[str, int], float]:
    vm.force_flush()
    return {(series["metric"]["device"], ts): value
            for series in vm.export('{__name__="mw_edge_score_score"}')
            for ts, value in zip(series["timestamps"], series["values"], strict=True)}


def flow_config(tmp_path, cloud, victoria_metrics, fleet_settings, **flow):
    registry = write_fleet_registry(tmp_path / "registry.csv", fleet_settings)
    return write_config(tmp_path / "flow.toml", cloud, victoria_metrics, tmp_path / "lake",
                        registry, allowed_lateness_s=60, **flow)


@pytest.mark.parametrize("workers", [1, 2])
def test_the_flow_publishes_evaluates_alerts(workers, fleet, cloud, victoria_metrics,
                                             tmp_path) -> None:
    settings, want, load, feedback, cleared = fleet
    assert [(a.alert_id, a.status) for a in cleared] == [(feedback.alert_ids[0],
                                                          AlertStatus.CLEARED)]
    kinds = Counter(a.kind.value for a in want)
    assert set(kinds) == {"leak", "burst", "silent", "sensor_fault"}, kinds
    config = flow_config(tmp_path, cloud, victoria_metrics, settings)
    create_sessions(cloud, CLIENT_ID)
    watch = AlertWatch(cloud)
    try:
        publish(cloud, load)  # all of it waits in the sessions: the flow sees broker order
        started = time.monotonic()
        with FlowProcess(config, tmp_path / "flow.log", workers=workers) as flow:
            wait_for(lambda: len(watch.distinct()) >= len(want), 60, "the alerts", flow)
            wait_for(lambda: len(vm_alerts(victoria_metrics)) >= len(want_vm(want)), 20,
                     "mw_alert in VictoriaMetrics", flow)
            time.sleep(1.5)  # nothing more may come
            elapsed = time.monotonic() - started
            assert alert_keys(watch.alerts) == alert_keys(want)  # each once, all, no other
            # a crew reports a false alarm: the leak alert is cleared, once
            for _ in range(2):  # the second copy is a repeat of the work order: no effect
                publish_feedback(cloud, feedback, want)
            wait_for(lambda: len(watch.alerts) > len(want), 20, "the cleared alert", flow)
            wait_for(lambda: len(vm_alerts(victoria_metrics)) >= len(want_vm(want + cleared)),
                     20, "the cleared alert in VictoriaMetrics", flow)
            # an edge model's scores are stored beside the flow's
            windows = publish_edge_scores(cloud, want)
            wait_for(lambda: len(vm_edge_scores(victoria_metrics)) >= len(windows), 20,
                     "the edge scores in VictoriaMetrics", flow)
            time.sleep(1.5)
            assert flow.alive(), flow.tail()
            counts = detect_counts(victoria_metrics)
    finally:
        watch.close()
    assert alert_keys(watch.alerts) == alert_keys(want + cleared)
    assert watch.alerts[-1].evidence["cleared_by"] == "feedback"
    assert counts["feedback"] == 1
    for alert, topic in zip(watch.alerts, watch.topics, strict=True):
        assert topic == topics.alerts(alert.district, alert.kind.value)
    assert vm_alerts(victoria_metrics) == want_vm(want + cleared)
    assert vm_edge_scores(victoria_metrics) == windows
    assert (counts["waiting"], counts["behind"]) == (0, 0)
    rows = [r for ms in load.messages.values() for m in ms for r in json.loads(m)["readings"]]
    assert counts["fed"] == len(rows)  # every reading of a registered device, once
    # one score per scored reading (pump stations are not scored), at the alarm level
    # where a device alert opened
    scores = vm_scores(victoria_metrics)
    assert set(scores) == {(r["device_id"], r["ts_ms"]) for r in rows
                           if not r["device_id"].endswith("-pump")}
    opened = [a for a in want if a.status is AlertStatus.OPEN
              and a.evidence["category"] in ("customer_leak", "sensor_fault")]
    assert opened
    assert all(scores[(a.device_id, a.first_ts_ms)][0] >= 0.9 for a in opened)
    print(f"{workers} worker(s): {len(rows)} readings, {len(want)} alerts in {elapsed:.1f}s")


def test_detection_state_survives_kill_9(fleet, cloud, victoria_metrics, tmp_path) -> None:
    settings, want, load, _, _ = fleet
    rng = random.Random(6)
    # idle flushes longer than any pause of the publisher or restart: a restart must not
    # look like quiet input (see tests/test_flow_crash.py)
    config = flow_config(tmp_path, cloud, victoria_metrics, settings, idle_flush_s=8)
    create_sessions(cloud, CLIENT_ID)
    watch = AlertWatch(cloud)
    flow = FlowProcess(config, tmp_path / "flow.log", workers=2,
                       recovery=tmp_path / "recovery", snapshot_s=0.5).start()
    publisher = threading.Thread(target=publish, args=(cloud, load),
                                 kwargs={"pause_every": 60, "pause_s": 0.3})
    publisher.start()
    seen_at_kill = []
    try:
        for _ in range(3):  # while the fleet comes in
            time.sleep(rng.uniform(2.5, 5.5))
            seen_at_kill.append(len(watch.distinct()))
            flow.kill()
            time.sleep(rng.uniform(0.0, 0.5))
            flow.start()
        publisher.join(60)
        assert not publisher.is_alive()
        wait_for(lambda: len(watch.distinct()) >= len(want), 60, "the alerts", flow)
        time.sleep(10)  # the idle flushes (8 s), then one more epoch: nothing more may come
        assert flow.alive(), flow.tail()
    finally:
        flow.kill()
        watch.close()
    assert (tmp_path / "flow.log").read_text().count("=== start") == 4
    # some kills came while alerts were being raised: the restored pipelines went on
    assert any(0 < n < len(want) for n in seen_at_kill), seen_at_kill
    assert alert_keys(watch.distinct()) == alert_keys(want)
    ids = Counter(a.alert_id for a in watch.alerts)
    assert set(ids) == {a.alert_id for a in want}
    print(f"kills after {seen_at_kill} alerts; {len(watch.alerts)} alert messages for "
          f"{len(want)} distinct ones")
