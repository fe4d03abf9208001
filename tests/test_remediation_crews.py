"""The crew simulator against a running remediation service: outcomes follow ground truth."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from remediation_support import T0, TOKENS, alert, service_config
from servers import Mosquitto, free_port

from remediation.command import Service
from remediation.store import Incoming
from simulators.crews import SLACK_MS, CrewSimulator, TruthEpisode, load_truth, outcome_for


def test_crews_confirm_real_leaks_and_dismiss_the_rest(tmp_path: Path,
                                                       mosquitto: Mosquitto) -> None:
    truth_file = tmp_path / "ground_truth.csv"
    truth_file.write_text(
        "incident_id,device_id,district,kind,start_ms,end_ms,start,end,magnitude,unit,detail\n"
        f"inc-0000001,mtr-1,dma-01,customer_leak,{T0 - 3600_000},{T0 + 86_400_000},,,"
        "40,lph,\n"
        f"inc-0000002,,dma-02,burst,{T0},{T0 + 7200_000},,,900,lph,\n"
        f"inc-0000003,mtr-3,dma-01,stuck,{T0},{T0 + 7200_000},,,0,lpm,\n")
    truth = load_truth(truth_file)
    assert truth[1] == TruthEpisode(None, "dma-02", "burst", T0, T0 + 7200_000)
    config = service_config(tmp_path, f"sqlite:///{tmp_path / 'r.db'}", mosquitto.url,
                            free_port())
    service = Service(config).start()
    try:
        service.store.ingest([Incoming(alert=a) for a in (
            alert("leak", device_id="mtr-1"),
            alert("burst", district="dma-02", kind="burst", severity="major"),
            alert("stuck", device_id="mtr-3", kind="sensor_fault"),
            alert("nothing", device_id="mtr-2", ts=T0 + 60_000))])
        sim = CrewSimulator(f"http://127.0.0.1:{config.remediation.http_port}",
                            {"crew-a": TOKENS["crew-a"], "crew-b": TOKENS["crew-b"]}, truth,
                            speed=100_000.0, seed=3)
        deadline = time.monotonic() + 20
        while len(sim.done) < 4 and time.monotonic() < deadline:
            sim.step()
            time.sleep(0.02)
        outcomes = {service.store.work_order(w)["device_id"]: o for w, o in sim.done.items()}
        assert outcomes == {"mtr-1": "confirmed_leak", None: "confirmed_burst",
                            "mtr-3": "meter_fault", "mtr-2": "false_alarm"}
        states = sorted(wo["state"] for wo in service.store.list_work_orders()[1])
        assert states == ["false_alarm", "resolved", "resolved", "resolved"]
    finally:
        service.stop()


HOUR = 3_600_000
TRUTH = [
    TruthEpisode("mtr-1", "dma-01", "customer_leak", T0, T0 + 24 * HOUR),
    TruthEpisode("mtr-3", "dma-01", "stuck", T0, T0 + 2 * HOUR),
    TruthEpisode(None, "dma-02", "burst", T0, T0 + 4 * HOUR),
    TruthEpisode(None, "dma-03", "network_leak", T0, T0 + 30 * 24 * HOUR),
]
"""Ground truth as the simulator writes it: district-wide episodes have no device."""


@pytest.mark.parametrize("device_id", [None, "dma-02-inlet"])
def test_a_district_burst_alert_is_confirmed(device_id: str | None) -> None:
    assert outcome_for("burst", device_id, "dma-02", T0 + HOUR, T0 + 2 * HOUR,
                       TRUTH) == "confirmed_burst"


@pytest.mark.parametrize("device_id", [None, "dma-03-inlet"])
def test_a_district_leak_alert_is_confirmed(device_id: str | None) -> None:
    # a network leak is found by the night flow, a day or more after it started
    assert outcome_for("leak", device_id, "dma-03", T0 + 30 * HOUR, T0 + 54 * HOUR,
                       TRUTH) == "confirmed_leak"


def test_device_alerts_match_their_devices_episodes_of_a_compatible_kind() -> None:
    assert outcome_for("leak", "mtr-1", "dma-01", T0 + HOUR, T0 + HOUR, TRUTH) == \
        "confirmed_leak"
    assert outcome_for("sensor_fault", "mtr-3", "dma-01", T0 + HOUR, T0 + HOUR, TRUTH) == \
        "meter_fault"


def test_district_episodes_count_within_the_grace_period_around_the_alert() -> None:
    end = T0 + 4 * HOUR  # the burst's end
    assert outcome_for("burst", None, "dma-02", end + SLACK_MS, end + 2 * SLACK_MS,
                       TRUTH) == "confirmed_burst"
    assert outcome_for("burst", None, "dma-02", end + SLACK_MS + 1, end + 2 * SLACK_MS,
                       TRUTH) == "false_alarm"
    assert outcome_for("burst", None, "dma-02", T0 - 2 * SLACK_MS, T0 - SLACK_MS,
                       TRUTH) == "confirmed_burst"
    assert outcome_for("burst", None, "dma-02", T0 - 2 * SLACK_MS, T0 - SLACK_MS - 1,
                       TRUTH) == "false_alarm"


@pytest.mark.parametrize(("kind", "device_id", "district"), [
    ("leak", "mtr-2", "dma-01"),           # a device with no episode
    ("burst", None, "dma-01"),             # a district with no episode
    ("burst", None, "dma-03"),             # a network leak is not a burst
    ("leak", None, "dma-02"),              # nor is a burst a network leak
    ("leak", "dma-01-inlet", "dma-01"),    # no network leak in dma-01
    ("burst", "dma-03-inlet", "dma-03"),   # the burst was in dma-02
    ("sensor_fault", "mtr-1", "dma-01"),   # a customer leak is not a meter fault
    ("leak", "mtr-3", "dma-01"),           # nor is a stuck meter a leak
    ("burst", "mtr-1", "dma-01"),          # a device burst needs that device's burst
    ("sensor_fault", None, "dma-02"),      # a district has no meter faults
    ("silent", "mtr-3", "dma-01"),         # kinds with no ground truth
    ("anomaly", None, "dma-02"),
])
def test_an_alert_with_no_matching_episode_is_a_false_alarm(
        kind: str, device_id: str | None, district: str) -> None:
    assert outcome_for(kind, device_id, district, T0 + HOUR, T0 + HOUR, TRUTH) == "false_alarm"
