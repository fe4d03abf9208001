"""Alert policy: hysteresis, folding, fusion, rate limits, deterministic ids."""

from __future__ import annotations

import numpy as np

from meshwatch.contract import encode
from meshwatch.contract.events import Alert, AlertKind, AlertStatus
from models.alerting import AlertPolicy, PolicySettings, make_alert_id
from models.evaluate import EvalSettings, simulate_and_detect
from models.seeds import TUNING_SEEDS
from simulators import IncidentRates

H = 3_600_000
T0 = 1_767_571_200_000
IDS = np.array(["mtr-0000001", "mtr-0000002"], dtype=object)
DISTRICTS = np.array(["dma-01", "dma-02"], dtype=object)


def _run(policy: AlertPolicy, category: str, scores: list[float], slot: int = 0,
         start_h: float = 0, step_h: float = 1.0, ids=IDS) -> list[Alert]:
    alerts: list[Alert] = []
    for i, score in enumerate(scores):
        alerts += policy.observe(category, np.array([slot]),
                                 np.array([int(T0 + (start_h + i * step_h) * H)]),
                                 np.array([score]), {"est_leak_lph": np.array([30.0])}, ids)
    return alerts


def test_hysteresis_keeps_one_alert_open_while_the_score_hovers():
    policy = AlertPolicy()
    alerts = _run(policy, "customer_leak", [0.95, 0.85, 0.92, 0.6, 0.91, 0.7, 0.93] + [0.1] * 8)
    assert [a.status for a in alerts] == [AlertStatus.OPEN, AlertStatus.CLEARED]
    assert alerts[1].last_ts_ms - alerts[0].first_ts_ms == 13 * H  # 6 h below 0.5, after 7 h
    assert alerts[0].kind is AlertKind.LEAK
    assert alerts[0].district is None
    assert Alert.model_validate_json(encode(alerts[0])) == alerts[0]  # a valid contract event


def test_same_incident_again_is_folded_into_the_same_alert():
    policy = AlertPolicy()
    first = _run(policy, "customer_leak", [0.95] + [0.1] * 7)
    again = _run(policy, "customer_leak", [0.96, 0.2], start_h=20)
    assert [a.status for a in first + again] == [AlertStatus.OPEN, AlertStatus.CLEARED,
                                                 AlertStatus.UPDATE]
    assert len({a.alert_id for a in first + again}) == 1
    later = _run(policy, "customer_leak", [0.1] * 7, start_h=22)
    assert [a.status for a in later] == [AlertStatus.CLEARED]
    later += _run(policy, "customer_leak", [0.97], start_h=100)  # 72 h later: a new incident
    assert later[-1].status is AlertStatus.OPEN
    assert later[-1].alert_id == make_alert_id("customer_leak", "mtr-0000001", T0 + 100 * H)


def test_bursts_hours_apart_are_separate_incidents():
    policy = AlertPolicy()
    alerts = _run(policy, "burst", [0.99] + [0.0] * 400, step_h=1 / 60, ids=DISTRICTS)
    alerts += _run(policy, "burst", [0.99], start_h=10, ids=DISTRICTS)
    opened = [a for a in alerts if a.status is AlertStatus.OPEN]
    assert len(opened) == 2
    assert opened[0].district == "dma-01"
    assert opened[0].device_id is None
    assert opened[0].severity.value == "critical"


def test_fault_on_a_meter_suppresses_its_leak_alert():
    policy = AlertPolicy()
    ev = {"fault": np.array([1.0]), "repeat_h": np.array([20.0])}
    policy.observe("sensor_fault", np.array([0]), np.array([T0]), np.array([0.95]), ev, IDS)
    leak = _run(policy, "customer_leak", [0.99, 0.99], start_h=1)
    assert leak == []
    assert policy.suppressed == 2
    other = _run(policy, "customer_leak", [0.99], slot=1, start_h=1)
    assert [a.device_id for a in other] == ["mtr-0000002"]


def test_rate_limit_caps_new_alerts_per_subject_and_day():
    policy = AlertPolicy(PolicySettings(max_opens_per_day=2, clear_after_h=0.0,
                                        fold_h_by_category={"clock_skew": 0.0}))
    scores = [0.95, 0.0, 0.0] * 5  # five separate short incidents in 15 hours
    alerts = _run(policy, "clock_skew", scores)
    assert sum(a.status is AlertStatus.OPEN for a in alerts) == 2
    assert policy.rate_limited == 3


def test_replay_gives_the_same_alert_ids():
    settings = EvalSettings(meters=150, days=3, warmup_days=1, seed=TUNING_SEEDS[2],
                            districts=1,
                            rates=IncidentRates(customer_leak_per_meter_day=0.05,
                                                stuck_per_meter_day=0.01,
                                                burst_per_district_day=1.0))
    first = simulate_and_detect(settings).alerts
    second = simulate_and_detect(settings).alerts
    assert len(first) >= 5
    assert [(a.alert_id, a.status) for a in first] == [(a.alert_id, a.status) for a in second]
    assert all(a.model_version == "water-1.0" for a in first)
