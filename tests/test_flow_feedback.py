"""Crews' feedback through the real flow: false alarms stop repeating, and feedback acts at its
event time.

The district is :class:`~detect_support.RoundTheClockTown`: five round-the-clock businesses
whose normal flow looks like a leak to the customer-leak detector (it alarms every other day)
and three homes. Its telemetry goes to a real mosquitto as mesh messages, ``meshwatch flow``
(with a registry: detection on; VictoriaMetrics for the ``mw_detect`` counters) runs on it,
and the alerts are read back from ``mw/v1/alerts/#``.

- **Repeat false alarms fall.** Six days of telemetry: each business raises its alert three
  times. A crew reports a false alarm on three of them (``mw/v1/feedback/{district}``), and
  eight more days come in: those three raise nothing more, while the two businesses without
  feedback (the control) raise theirs four more times.
- **Event time.** Feedback stamped ``ts_ms`` applies to the readings stamped at or after it,
  however early it reaches the flow: published before the flow starts, with telemetry only up
  to three days earlier, it waits in the district; the alerts of the whole run, with 1 and 2
  workers, and after a ``kill -9`` while it waits and a restart from the snapshots, are those
  of one pipeline fed in event time with the feedback applied at its time
  (:meth:`~detect_support.RoundTheClockTown.reference`). Applied on arrival, it would have
  forgiven the businesses before their second alarm.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from detect_support import RoundTheClockTown, alert_keys
from flow_support import (
    CLIENT_ID,
    PARTITIONS,
    AlertWatch,
    FlowProcess,
    Load,
    create_sessions,
    publish,
    publish_feedback,
    wait_for,
    write_config,
    write_registry,
)
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from meshwatch.contract import Alert, AlertStatus, Feedback, Outcome, topics

pytestmark = pytest.mark.timeout(120)

TOWN = RoundTheClockTown()
LAST = TOWN.step_at(14 * 24)
"""Fourteen days of readings."""
WITH_FEEDBACK = ("biz-1", "biz-2", "biz-3")
CONTROL = ("biz-4", "biz-5")
RAISED = (AlertStatus.OPEN, AlertStatus.UPDATE)


def false_alarms(alerts: list[Alert], at_ms: int) -> list[Feedback]:
    """A crew's ``false_alarm`` on the alert of each of :data:`WITH_FEEDBACK`, at ``at_ms``."""
    ids = {a.device_id: a.alert_id for a in alerts if a.status is AlertStatus.OPEN}
    return [Feedback(work_order_id=f"wo-{device}", alert_ids=[ids[device]],
                     outcome=Outcome.FALSE_ALARM, ts_ms=at_ms, device_id=device,
                     district=TOWN.district) for device in WITH_FEEDBACK]


def raises(alerts: list[Alert], since_ms: int, until_ms: int) -> Counter[str]:
    """Alerts raised (opened, or re-opened as an update) per device in ``[since, until)``."""
    return Counter(a.device_id for a in alerts
                   if a.status in RAISED and since_ms <= a.last_ts_ms < until_ms)


def start_town(tmp_path: Path, cloud, victoria_metrics) -> Path:
    """The flow's config and registry; its telemetry and feedback sessions exist (so what is
    published before it starts waits for it)."""
    registry = write_registry(tmp_path / "registry.csv",
                              {d: TOWN.step_ms // 1000 for d in TOWN.devices})
    config = write_config(tmp_path / "flow.toml", cloud, victoria_metrics, tmp_path / "lake",
                          registry)
    create_sessions(cloud, CLIENT_ID)
    create_feedback_session(cloud)
    return config


def create_feedback_session(cloud) -> None:
    """The flow's persistent session on ``mw/v1/feedback/+`` (client ``{client_id}-fb-p0``)."""
    subscribed = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{CLIENT_ID}-fb-p0",
                         protocol=mqtt.MQTTv5)
    client.on_subscribe = lambda *_: subscribed.set()
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 3600
    client.connect(cloud.host, cloud.port, clean_start=True, properties=properties)
    client.loop_start()
    client.subscribe(topics.subscription("feedback"), qos=1)
    assert subscribed.wait(10)
    client.disconnect()
    client.loop_stop()


def publish_steps(cloud, first: int, last: int) -> None:
    """Steps ``first`` to ``last`` of the town as mesh telemetry, at QoS1."""
    publish(cloud, Load(messages=TOWN.mesh_load(first, last, PARTITIONS)))


def detect_counters(vm) -> dict[str, int]:
    """The district's newest ``mw_detect`` feedback counters."""
    vm.force_flush()
    out = {}
    for name in ("feedback", "feedback_waiting", "feedback_behind", "feedback_ahead"):
        series = vm.export(f'{{__name__="mw_detect_{name}"}}')
        out[name] = int(max(zip(series[0]["timestamps"], series[0]["values"],
                                strict=True))[1]) if series else -1
    return out


def settle(watch: AlertWatch, want: list[Alert], flow: FlowProcess, vm) -> dict[str, int]:
    """Wait for ``want``'s number of alerts and a little more; the flow's detection counters."""
    wait_for(lambda: len(watch.distinct()) >= len(want), 40, "the alerts", flow)
    time.sleep(1.5)  # nothing more may come
    assert flow.alive(), flow.tail()
    return detect_counters(vm)


def test_a_false_alarm_stops_the_repeat_alerts_of_its_device(cloud, victoria_metrics,
                                                             tmp_path) -> None:
    config = start_town(tmp_path, cloud, victoria_metrics)
    first_days = TOWN.step_at(6 * 24)
    reported_ms = TOWN.ts_ms(first_days)  # the crew reports at the end of the sixth day
    watch = AlertWatch(cloud)
    try:
        publish_steps(cloud, 1, first_days)
        with FlowProcess(config, tmp_path / "flow.log", workers=1) as flow:
            before_want = TOWN.reference(first_days)
            wait_for(lambda: len(watch.distinct()) >= len(before_want), 40,
                     "the first six days' alerts", flow)
            before = watch.distinct()
            feedback = false_alarms(before, reported_ms)
            for message in feedback:
                publish_feedback(cloud, message, before)
            wait_for(lambda: sum(a.evidence.get("cleared_by") == "feedback"
                                 for a in watch.distinct()) == len(feedback), 20,
                     "the alerts cleared by feedback", flow)
            publish_steps(cloud, first_days + 1, LAST)
            want = TOWN.reference(LAST, feedback)
            counters = settle(watch, want, flow, victoria_metrics)
    finally:
        watch.close()
    alerts = watch.distinct()
    assert alert_keys(before) == alert_keys(before_want)
    assert alert_keys(alerts) == alert_keys(want)
    repeats_before = raises(alerts, 0, reported_ms)
    repeats_after = raises(alerts, reported_ms, TOWN.ts_ms(LAST + 1))
    print(f"alerts raised per device before the feedback {dict(sorted(repeats_before.items()))}, "
          f"after {dict(sorted(repeats_after.items()))}")
    # every business's normal flow looked like a leak: its alert was raised three times
    assert repeats_before == dict.fromkeys(WITH_FEEDBACK + CONTROL, 3)
    # after the crew's false alarm, only the businesses without feedback raise it again
    assert repeats_after == dict.fromkeys(CONTROL, 4)
    cleared = [a for a in alerts if a.evidence.get("cleared_by") == "feedback"]
    assert sorted((a.device_id, a.last_ts_ms) for a in cleared) == [
        (device, reported_ms) for device in WITH_FEEDBACK]
    assert (counters["feedback"], counters["feedback_waiting"]) == (len(WITH_FEEDBACK), 0)


@pytest.mark.parametrize(("workers", "crash"), [(1, False), (2, False), (2, True)])
def test_feedback_acts_at_its_event_time_not_on_arrival(workers, crash, cloud, victoria_metrics,
                                                        tmp_path) -> None:
    """``crash``: kill -9 while the feedback waits, restart from the snapshots."""
    config = start_town(tmp_path, cloud, victoria_metrics)
    first_days = TOWN.step_at(3 * 24)
    reported_ms = TOWN.ts_ms(TOWN.step_at(100))  # during the second raise of the alert
    feedback = false_alarms(TOWN.reference(first_days), reported_ms)
    want = TOWN.reference(LAST, feedback)
    watch = AlertWatch(cloud)
    try:
        publish_steps(cloud, 1, first_days)
        for message in feedback:  # it reaches the flow long before the readings of its time
            publish_feedback(cloud, message, want)
        recovery = tmp_path / "recovery" if crash else None
        with FlowProcess(config, tmp_path / "flow.log", workers=workers, recovery=recovery,
                         snapshot_s=0.5) as flow:
            wait_for(lambda: detect_counters(victoria_metrics)["feedback_waiting"] == 3, 30,
                     "the feedback waiting in the district", flow)
            early = TOWN.reference(first_days)
            wait_for(lambda: len(watch.distinct()) >= len(early), 20,
                     "the first three days' alerts", flow)
            assert alert_keys(watch.distinct()) == alert_keys(early)  # it did not act yet
            if crash:
                time.sleep(1.0)  # two epochs: the snapshots hold the waiting feedback
                flow.kill()
                flow.start()
            publish_steps(cloud, first_days + 1, LAST)
            counters = settle(watch, want, flow, victoria_metrics)
    finally:
        watch.close()
    alerts = watch.distinct()
    assert alert_keys(alerts) == alert_keys(want)
    # the readings before the feedback's time still raised the alerts of the businesses
    # with feedback (on arrival, it would have forgiven them before they were raised again)
    by_device: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for a in sorted(alerts, key=lambda a: a.last_ts_ms):
        by_device[a.device_id or ""].append(
            (a.status.value, (a.last_ts_ms - TOWN.start_ms) / 3_600_000))
    for device in WITH_FEEDBACK:
        assert by_device[device] == [("open", 26.75), ("cleared", 56.0), ("update", 74.75),
                                     ("cleared", 100.0)], by_device[device]
    assert raises(alerts, reported_ms, TOWN.ts_ms(LAST + 1)) == dict.fromkeys(CONTROL, 5)
    assert counters == {"feedback": 3, "feedback_waiting": 0, "feedback_behind": 0,
                        "feedback_ahead": 0}
