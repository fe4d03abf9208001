"""The crews judge an alert against the ground truth active at that time, clock skews and
silences included."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from simulators import CommRates, Episode, FleetConfig, FleetSimulator, IncidentRates, SimConfig
from simulators.crews import SLACK_MS, TruthBook, TruthEpisode, load_truth, outcome_for
from simulators.truth import comm_episodes

DAY = 86_400_000


def test_an_ongoing_network_leak_is_known_before_it_ends() -> None:
    rates = dataclasses.replace(IncidentRates.none(), network_leak_per_district_day=2.0)
    config = SimConfig(fleet=FleetConfig(meters=60, districts=1), incidents=rates,
                       comms=CommRates.none(), days=1.0, seed=3)
    ended: list[object] = []
    simulator = FleetSimulator(config, on_episode=ended.append)
    book = TruthBook()
    fleet = simulator.fleet
    for block in simulator:
        for episode in simulator.ongoing_episodes():
            book.record_simulated(episode, fleet)
        if book.episodes():
            now = block.sent_ms
            break
    leak = book.episodes()[0]
    assert (leak.device_id, leak.district, leak.kind) == (None, "dma-01", "network_leak")
    assert leak.start_ms <= now < leak.end_ms  # it is going on: the simulator has not ended it
    assert not [e for e in ended if getattr(e, "kind", "") == "network_leak"]
    # a district leak alert raised now is confirmed; with only ended episodes it was not
    assert outcome_for("leak", None, "dma-01", now, now, book.episodes()) == "confirmed_leak"
    assert outcome_for("leak", None, "dma-01", now, now, []) == "false_alarm"


def test_an_ended_episode_replaces_its_ongoing_record() -> None:
    book = TruthBook()
    book.record("inc-1", TruthEpisode(None, "dma-01", "network_leak", 0, 30 * DAY))
    book.record("inc-1", TruthEpisode(None, "dma-01", "network_leak", 0, 2 * DAY))
    assert book.episodes() == [TruthEpisode(None, "dma-01", "network_leak", 0, 2 * DAY)]


def _simulate_comm_faults(**rates: float) -> tuple[SimConfig, Any, list[object], TruthBook]:
    """Two days of 80 meters with these communication-fault rates: the config, the fleet,
    the simulator's comm-fault logs and a TruthBook that recorded them as they came."""
    comms = dataclasses.replace(CommRates.none(), **rates)
    config = SimConfig(fleet=FleetConfig(meters=80, districts=1), incidents=IncidentRates.none(),
                       comms=comms, days=2.0, seed=5)
    logs: list[object] = []
    book = TruthBook()
    simulator = FleetSimulator(config)
    fleet = simulator.fleet
    cadence = fleet.cadence_s(config.fleet)

    def on_comm_faults(log: object) -> None:
        logs.append(log)
        book.record_comm_faults(log, fleet, cadence)

    simulator.on_comm_faults = on_comm_faults
    for _ in simulator:
        pass
    return config, fleet, logs, book


def test_clock_skews_from_the_comm_fault_log_match_what_evaluate_scores() -> None:
    config, fleet, logs, book = _simulate_comm_faults(clock_skew_per_device_day=0.2)
    cadence = np.where(np.arange(fleet.device_count) < fleet.customer_count, 900, 60)
    scored = [e for e in comm_episodes(logs, fleet.customer_count, fleet.district_of, cadence)
              if e.kind == "clock_skew"]
    skews = [e for e in book.episodes() if e.kind == "clock_skew"]
    assert len(scored) >= 5
    customer_skews = [e for e in skews if str(e.device_id).startswith("mtr-")]
    assert len(customer_skews) == len(scored)
    for episode in scored:  # the same device, the same span (evaluate adds one reading)
        device = str(fleet.device_ids[episode.device])
        mine = [e for e in customer_skews if e.device_id == device
                and e.start_ms == episode.start_ms]
        assert len(mine) == 1
        assert episode.end_ms - 900_000 == mine[0].end_ms
        middle = (episode.start_ms + episode.end_ms) // 2
        assert outcome_for("sensor_fault", device, mine[0].district, middle, middle,
                           book.episodes()) == "meter_fault"
    skewed = {e.device_id for e in skews}
    healthy = next(str(d) for d in fleet.device_ids[: fleet.customer_count]
                   if str(d) not in skewed)
    assert outcome_for("sensor_fault", healthy, "dma-01", config.start_ms + DAY,
                       config.start_ms + DAY, book.episodes()) == "false_alarm"


def test_silences_from_the_comm_fault_log_match_what_evaluate_scores() -> None:
    config, fleet, logs, book = _simulate_comm_faults(meter_gap_per_device_day=0.3,
                                                      gateway_outage_per_gateway_day=1.0)
    cadence = fleet.cadence_s(config.fleet)
    scored = sorted((str(fleet.device_ids[e.device]), e.start_ms, e.end_ms)
                    for e in comm_episodes(logs, fleet.customer_count, fleet.district_of,
                                           cadence) if e.kind == "silent")
    silences = [e for e in book.episodes() if e.kind == "silent"]
    assert {e.district for e in silences} == {"dma-01"}
    assert sorted((str(e.device_id), e.start_ms, e.end_ms) for e in silences) == scored
    sources = {e.detail for e in comm_episodes(logs, fleet.customer_count, fleet.district_of,
                                               cadence) if e.kind == "silent"}
    assert sources == {"source=gap", "source=gateway_outage"}
    assert len(scored) >= 10
    for device, start, end in scored:  # an alert raised while it is silent: a device problem
        middle = (start + end) // 2
        assert outcome_for("silent", device, "dma-01", middle, middle,
                           book.episodes()) == "meter_fault"
    silent = {device for device, _, _ in scored}
    quiet = next(str(d) for d in fleet.device_ids if str(d) not in silent)
    assert outcome_for("silent", quiet, "dma-01", config.start_ms + DAY, config.start_ms + DAY,
                       book.episodes()) == "false_alarm"


def test_a_silent_alert_on_a_meter_with_a_gap_is_not_a_false_alarm() -> None:
    book = TruthBook([TruthEpisode("mtr-9", "dma-01", "customer_leak", 0, 30 * DAY)])
    assert outcome_for("silent", "mtr-9", "dma-01", DAY, DAY, book.episodes()) == "false_alarm"
    book.record("inc-2", TruthEpisode("mtr-9", "dma-01", "stuck", 0, 30 * DAY))
    assert outcome_for("silent", "mtr-9", "dma-01", DAY, DAY, book.episodes()) == "false_alarm"
    book.record("gap", TruthEpisode("mtr-9", "dma-01", "silent", DAY - 3_600_000, DAY + 7_200_000))
    truth = book.episodes()
    assert outcome_for("silent", "mtr-9", "dma-01", DAY, DAY, truth) == "meter_fault"
    assert outcome_for("silent", "mtr-8", "dma-01", DAY, DAY, truth) == "false_alarm"
    late = DAY + 7_200_000 + SLACK_MS + 1  # after the gap, beyond the slack
    assert outcome_for("silent", "mtr-9", "dma-01", late, late, truth) == "false_alarm"
    # a silence does not confirm another kind of alert
    assert outcome_for("leak", "mtr-8", "dma-01", DAY, DAY, truth) == "false_alarm"


def test_a_dead_battery_is_a_silence_from_its_cut_off() -> None:
    rates = dataclasses.replace(IncidentRates.none(), battery_depletion_per_meter_day=0.05)
    config = SimConfig(fleet=FleetConfig(meters=60, districts=1), incidents=rates,
                       comms=CommRates.none(), days=5.0, seed=3)
    simulator = FleetSimulator(config)
    fleet = simulator.fleet
    book = TruthBook()
    seen: dict[str, Episode] = {}
    for _ in simulator:
        for episode in simulator.ongoing_episodes():
            book.record_simulated(episode, fleet)
            seen[episode.episode_id] = episode
    assert seen  # a meter dies only after days of decline: silent if that fell in the run
    for episode in seen.values():
        silent_from = int(episode.detail.removeprefix("silent_from_ms="))
        silence = TruthEpisode(str(fleet.device_ids[episode.device]), "dma-01", "silent",
                               silent_from, episode.end_ms)
        assert (silence in book.episodes()) == (silent_from < episode.end_ms)
    assert any(e.kind == "silent" for e in book.episodes())
    dying = Episode("inc-9", "battery_depletion", 4, 0, 0, 10 * DAY, 3.0, "v",
                    f"silent_from_ms={6 * DAY}")
    book.record_simulated(dying, fleet)
    meter = str(fleet.device_ids[4])
    assert TruthEpisode(meter, "dma-01", "silent", 6 * DAY, 10 * DAY) in book.episodes()
    truth = book.episodes()
    assert outcome_for("silent", meter, "dma-01", 7 * DAY, 7 * DAY, truth) == "meter_fault"
    assert outcome_for("silent", meter, "dma-01", 5 * DAY, 5 * DAY, truth) == "false_alarm"


def test_load_truth_reads_the_clock_skews_of_comm_faults_csv(tmp_path: Path) -> None:
    truth = tmp_path / "ground_truth.csv"
    truth.write_text(
        "incident_id,device_id,district,kind,start_ms,end_ms,start,end,magnitude,unit,detail\n"
        "inc-0000001,mtr-1,dma-01,customer_leak,0,86400000,,,40,lph,\n"
        "inc-0000002,mtr-4,dma-01,battery_depletion,0,864000000,,,3.0,v,"
        "silent_from_ms=518400000\n")
    faults = tmp_path / "comm_faults.csv"
    faults.write_text(
        '"device_id","seq","ts_ms","fault","detail_ms"\n'
        '"mtr-2",4,3600000,"clock_skew",-600000\n'
        '"mtr-2",5,4500000,"clock_skew",-600000\n'
        '"mtr-2",6,5400000,"lost",0\n'
        '"mtr-3",1,900000,"gap",7200000\n'
        '"mtr-3",2,1800000,"gap",7200000\n'
        '"mtr-5",8,7200000,"gateway_outage",9000000\n')
    loaded = load_truth(truth, faults)
    assert loaded == [
        TruthEpisode("mtr-1", "dma-01", "customer_leak", 0, 86_400_000),
        TruthEpisode("mtr-4", "dma-01", "battery_depletion", 0, 864_000_000),
        TruthEpisode("mtr-4", "dma-01", "silent", 518_400_000, 864_000_000),
        TruthEpisode("mtr-2", "", "clock_skew", 3_000_000, 4_500_000),
        # from the reading before the first one missed (15 minutes) to the gap's end
        TruthEpisode("mtr-3", "", "silent", 0, 7_200_000),
        TruthEpisode("mtr-5", "", "silent", 6_300_000, 9_000_000)]
    assert load_truth(truth) == loaded[:3]
    assert outcome_for("silent", "mtr-3", "dma-01", 5_400_000, 5_400_000, loaded) == "meter_fault"
    assert outcome_for("silent", "mtr-2", "dma-01", 5_400_000, 5_400_000, loaded) == "false_alarm"
