"""The crews judge an alert against the ground truth active at that time, clock skews included."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from models.evaluate import comm_episodes
from simulators import CommRates, FleetConfig, FleetSimulator, IncidentRates, SimConfig
from simulators.crews import TruthBook, TruthEpisode, load_truth, outcome_for

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


def test_clock_skews_from_the_comm_fault_log_match_what_evaluate_scores() -> None:
    comms = dataclasses.replace(CommRates.none(), clock_skew_per_device_day=0.2)
    config = SimConfig(fleet=FleetConfig(meters=80, districts=1), incidents=IncidentRates.none(),
                       comms=comms, days=2.0, seed=5)
    logs: list[object] = []
    book = TruthBook()
    simulator = FleetSimulator(config)
    fleet = simulator.fleet

    def on_comm_faults(log: object) -> None:
        logs.append(log)
        book.record_comm_faults(log, fleet)

    simulator.on_comm_faults = on_comm_faults
    for _ in simulator:
        pass
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


def test_load_truth_reads_the_clock_skews_of_comm_faults_csv(tmp_path: Path) -> None:
    truth = tmp_path / "ground_truth.csv"
    truth.write_text(
        "incident_id,device_id,district,kind,start_ms,end_ms,start,end,magnitude,unit,detail\n"
        "inc-0000001,mtr-1,dma-01,customer_leak,0,86400000,,,40,lph,\n")
    faults = tmp_path / "comm_faults.csv"
    faults.write_text(
        '"device_id","seq","ts_ms","fault","detail_ms"\n'
        '"mtr-2",4,3600000,"clock_skew",-600000\n'
        '"mtr-2",5,4500000,"clock_skew",-600000\n'
        '"mtr-2",6,5400000,"lost",0\n'
        '"mtr-3",1,900000,"gap",7200000\n')
    assert load_truth(truth, faults) == [
        TruthEpisode("mtr-1", "dma-01", "customer_leak", 0, 86_400_000),
        TruthEpisode("mtr-2", "", "clock_skew", 3_000_000, 4_500_000)]
    assert load_truth(truth) == load_truth(truth, faults)[:1]
