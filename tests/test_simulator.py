"""The fleet simulator: determinism, ground truth against readings, comm faults, statistics."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import tracemalloc
from collections import defaultdict
from datetime import UTC, datetime

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshwatch.contract import TelemetryBatch, decode, encode
from simulators import (
    CommFault,
    CommFaultLog,
    CommRates,
    Episode,
    FleetConfig,
    FleetSimulator,
    IncidentRates,
    ReadingBlock,
    SimConfig,
)
from simulators.demand import profile_table
from simulators.fleet import CustomerType
from simulators.incidents import BATTERY_CUTOFF_V

CADENCE_MS = 900_000
HEALTHY = {"incidents": IncidentRates.none(), "comms": CommRates.none()}


class Run:
    """Everything one run produced, with readings concatenated per device kind."""

    def __init__(self, config: SimConfig) -> None:
        self.episodes: list[Episode] = []
        logs: list[CommFaultLog] = []
        self.simulator = FleetSimulator(config, on_episode=self.episodes.append,
                                        on_comm_faults=logs.append)
        self.blocks = list(self.simulator)
        self.fleet = self.simulator.fleet
        self.stats = self.simulator.stats
        self.faults = CommFaultLog.concat(logs) if logs else None
        self.kinds: dict[str, dict[str, np.ndarray]] = {}
        by_kind: dict[str, list[ReadingBlock]] = defaultdict(list)
        for block in self.blocks:
            by_kind[block.kind].append(block)
        for kind, blocks in by_kind.items():
            columns = {
                "device": np.concatenate([b.device_index for b in blocks]),
                "ts": np.concatenate([b.ts_ms for b in blocks]),
                "seq": np.concatenate([b.seq for b in blocks]),
                "sent": np.concatenate([np.full(len(b), b.sent_ms) for b in blocks]),
            }
            for name in blocks[0].metrics:
                columns[name] = np.concatenate([b.metrics[name] for b in blocks])
            self.kinds[kind] = columns

    def device(self, kind: str, device: int) -> dict[str, np.ndarray]:
        """One device's delivered readings, sorted by seq (duplicates kept)."""
        columns = self.kinds[kind]
        mine = np.flatnonzero(columns["device"] == device)
        mine = mine[np.argsort(columns["seq"][mine], kind="stable")]
        return {name: values[mine] for name, values in columns.items()}

    def incidents(self, kind: str) -> list[Episode]:
        return [e for e in self.episodes if e.kind == kind and e.episode_id.startswith("inc-")]


def digest(blocks: list[ReadingBlock]) -> str:
    sha = hashlib.sha256()
    for block in blocks:
        sha.update(f"{block.site}|{block.gateway_id}|{block.kind}|{block.sent_ms}".encode())
        for array in (block.device_index, block.ts_ms, block.seq, *block.metrics.values()):
            sha.update(np.ascontiguousarray(array).tobytes())
    return sha.hexdigest()


# -- determinism ----------------------------------------------------------------------------


def test_same_seed_same_blocks_and_other_seed_differs() -> None:
    config = SimConfig(fleet=FleetConfig(meters=400), days=0.5, seed=11)
    first = digest(list(FleetSimulator(config)))
    assert digest(list(FleetSimulator(config))) == first
    assert digest(list(FleetSimulator(dataclasses.replace(config, seed=12)))) != first


def test_a_simulator_runs_once() -> None:
    simulator = FleetSimulator(SimConfig(fleet=FleetConfig(meters=10), days=0.05))
    list(simulator)
    with pytest.raises(RuntimeError, match="create a new one"):
        iter(simulator)


def test_bad_config_says_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="meters is 0; expected at least 1"):
        FleetSimulator(SimConfig(fleet=FleetConfig(meters=0)))
    with pytest.raises(ValueError, match="loss_probability"):
        FleetSimulator(SimConfig(comms=CommRates(loss_probability=0.9)))
    with pytest.raises(ValueError, match="timezone-aware"):
        SimConfig(start=datetime(2026, 1, 1)).validate()


# -- ground truth agrees with the readings --------------------------------------------------


@pytest.fixture(scope="module")
def eventful() -> Run:
    """A small fleet with incident rates raised ~50-500x, so every kind happens."""
    rates = IncidentRates(
        customer_leak_per_meter_day=0.03, network_leak_per_district_day=0.5,
        burst_per_district_day=1.0, stuck_per_meter_day=0.01, stopped_per_meter_day=0.01,
        spikes_per_meter_day=0.01, drift_per_meter_day=0.01,
        battery_depletion_per_meter_day=0.03)
    config = SimConfig(fleet=FleetConfig(meters=600, districts=2), incidents=rates,
                       days=6, seed=5)
    return Run(config)


def test_every_incident_kind_happens(eventful: Run) -> None:
    kinds = {e.kind for e in eventful.episodes if e.episode_id.startswith("inc-")}
    assert kinds == {"customer_leak", "network_leak", "burst", "stuck", "stopped", "spikes",
                     "drift", "battery_depletion"}
    assert sum(eventful.stats.incidents.values()) == len(
        [e for e in eventful.episodes if e.episode_id.startswith("inc-")])


def test_customer_leak_flow_never_drops_below_the_leak_rate(eventful: Run) -> None:
    checked = 0
    for leak in eventful.incidents("customer_leak"):
        readings = eventful.device("customer_meter", leak.device)
        full = (readings["ts"] - CADENCE_MS >= leak.start_ms) & (readings["ts"] <= leak.end_ms)
        # meters read within ±3 %; values are rounded to 3 decimals
        floor = leak.magnitude / 60 * 0.97 - 0.0005
        assert (readings["flow_lpm"][full] >= floor).all(), leak
        checked += int(full.sum())
    assert checked > 1000


def test_leaks_and_faults_never_overlap_on_one_meter(eventful: Run) -> None:
    device_kinds = {"customer_leak", "stuck", "stopped", "spikes", "drift", "battery_depletion"}
    spans: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for episode in eventful.episodes:
        if episode.kind in device_kinds:
            spans[episode.device].append((episode.start_ms, episode.end_ms))
    for device_spans in spans.values():
        device_spans.sort()
        for (_, end), (start, _) in itertools.pairwise(device_spans):
            assert end <= start


def test_burst_drops_pressure_and_raises_inlet_flow(eventful: Run) -> None:
    bursts = [b for b in eventful.incidents("burst")
              if b.start_ms - 900_000 > eventful.simulator.config.start_ms
              and b.end_ms - b.start_ms > 1_200_000]
    assert len(bursts) >= 5
    for burst in bursts:
        inlet = eventful.device("district_meter", eventful.fleet.inlet_device(burst.district))
        before = (inlet["ts"] >= burst.start_ms - 600_000) & (inlet["ts"] < burst.start_ms)
        during = (inlet["ts"] > burst.start_ms + 60_000) & (inlet["ts"] <= burst.start_ms + 660_000)
        drop = float(burst.detail.split("pressure_drop_bar=")[1].split(";")[0])
        pressure_fall = inlet["pressure_bar"][before].mean() - inlet["pressure_bar"][during].mean()
        assert pressure_fall >= 0.9 * drop, burst
        # the burst flows on top of demand (less leakage: pressure fell), never less
        assert inlet["flow_lpm"][during].min() >= 0.98 * burst.magnitude / 60, burst
        assert inlet["flow_lpm"][during].mean() > inlet["flow_lpm"][before].mean(), burst


def test_network_leak_raises_district_flow(eventful: Run) -> None:
    leaks = [leak for leak in eventful.incidents("network_leak")
             if leak.start_ms - 3_600_000 > eventful.simulator.config.start_ms
             and leak.end_ms - leak.start_ms > 3_600_000 and leak.magnitude > 1000]
    assert leaks
    for leak in leaks:
        inlet = eventful.device("district_meter", eventful.fleet.inlet_device(leak.district))
        pump = eventful.device("pump_station", eventful.fleet.pump_device(leak.district))
        assert len(pump["ts"]) > 0
        during = (inlet["ts"] > leak.start_ms) & (inlet["ts"] <= leak.start_ms + 3_600_000)
        # the inlet carries at least the leak on top of zero customer use
        assert inlet["flow_lpm"][during].min() >= 0.5 * leak.magnitude / 60


def test_stuck_meter_repeats_and_stopped_meter_reads_zero(eventful: Run) -> None:
    for kind in ("stuck", "stopped"):
        episodes = eventful.incidents(kind)
        assert episodes
        for fault in episodes:
            readings = eventful.device("customer_meter", fault.device)
            active = (readings["ts"] >= fault.start_ms) & (readings["ts"] < fault.end_ms)
            values = readings["flow_lpm"][active]
            if kind == "stopped":
                assert (values == 0).all()
            elif values.size:
                assert (values == values[0]).all()
                assert values[0] > 0


def test_spiking_meter_spikes_and_healthy_meters_never_do(eventful: Run) -> None:
    spikes = eventful.incidents("spikes")
    faulty = {e.device for e in eventful.episodes if e.episode_id.startswith("inc-")}
    flows = eventful.kinds["customer_meter"]
    healthy = ~np.isin(flows["device"], list(faulty))
    residential = eventful.fleet.customer_type[flows["device"]] == CustomerType.RESIDENTIAL
    assert flows["flow_lpm"][healthy & residential].max() < 50
    seen = 0
    for fault in spikes:
        readings = eventful.device("customer_meter", fault.device)
        active = (readings["ts"] >= fault.start_ms) & (readings["ts"] < fault.end_ms)
        seen += int((readings["flow_lpm"][active] >= 50).sum())
    assert seen > 0


def test_battery_depletes_to_cutoff_then_the_meter_is_silent(eventful: Run) -> None:
    checked = 0
    for fault in eventful.incidents("battery_depletion"):
        silent_from = int(fault.detail.split("silent_from_ms=")[1].split(";")[0])
        readings = eventful.device("customer_meter", fault.device)
        assert (readings["ts"] < silent_from + CADENCE_MS).all()
        assert (readings["battery_v"] >= BATTERY_CUTOFF_V).all()
        if silent_from + CADENCE_MS > eventful.simulator.config.start_ms + 6 * 86_400_000:
            continue
        last = np.flatnonzero(readings["ts"] >= silent_from)
        if last.size:  # the final reading reports the cut-off (unless it was lost)
            assert readings["battery_v"][last[-1]] == BATTERY_CUTOFF_V
        after_start = readings["ts"] > fault.start_ms
        volts = readings["battery_v"][after_start]
        assert volts[-1] < volts[0] - 0.3
        checked += 1
    assert checked >= 3


# -- communication faults -------------------------------------------------------------------


@pytest.fixture(scope="module")
def noisy() -> Run:
    """Default incident rates, comm faults raised a little so every kind shows up."""
    comms = dataclasses.replace(CommRates(), gateway_outage_per_gateway_day=0.2,
                                clock_skew_per_device_day=0.01)
    return Run(SimConfig(fleet=FleetConfig(meters=3000, meters_per_gateway=100), comms=comms,
                         days=2, seed=3))


def test_comm_faults_happen_at_their_configured_rates(noisy: Run) -> None:
    faults, comms = noisy.faults, noisy.simulator.config.comms
    assert faults is not None
    customer = faults.device < noisy.fleet.customer_count
    produced = noisy.stats.produced_by_kind["customer_meter"]
    for fault, probability in ((CommFault.LOST, comms.loss_probability),
                               (CommFault.DUPLICATE, comms.duplicate_probability),
                               (CommFault.LATE, comms.late_probability)):
        observed = int(((faults.fault == fault) & customer).sum())
        expected = probability * produced  # slightly less: lost readings are not retried
        assert abs(observed - expected) < 5 * np.sqrt(expected) + 0.01 * expected, fault
    gaps = len({(d, u) for d, u in zip(faults.device[faults.fault == CommFault.GAP].tolist(),
                                       faults.detail_ms[faults.fault == CommFault.GAP].tolist(),
                                       strict=True)})
    expected_gaps = comms.meter_gap_per_device_day * noisy.fleet.device_count * 2
    assert 0.3 * expected_gaps < gaps < 1.2 * expected_gaps  # short gaps may hit no reading


def test_delivered_and_lost_readings_reconcile_with_the_fault_records(noisy: Run) -> None:
    faults = noisy.faults
    assert faults is not None
    delivered: dict[tuple[int, int], int] = defaultdict(int)
    for columns in noisy.kinds.values():
        for pair in zip(columns["device"].tolist(), columns["seq"].tolist(), strict=True):
            delivered[pair] += 1
    lost_mask = np.isin(faults.fault, [CommFault.LOST, CommFault.GAP])
    lost = set(zip(faults.device[lost_mask].tolist(), faults.seq[lost_mask].tolist(),
                   strict=True))
    dup_mask = faults.fault == CommFault.DUPLICATE
    duplicated = set(zip(faults.device[dup_mask].tolist(), faults.seq[dup_mask].tolist(),
                         strict=True))
    assert not lost & delivered.keys()
    assert {pair for pair, count in delivered.items() if count > 1} == duplicated
    assert all(delivered[pair] == 2 for pair in duplicated)
    assert len(delivered) + len(lost) == noisy.stats.produced
    assert noisy.stats.delivered == len(delivered)
    # per device, seq runs 0..n-1 without holes once lost readings are added back
    by_device: dict[int, list[int]] = defaultdict(list)
    for device, seq in (*delivered, *lost):
        by_device[device].append(seq)
    for seqs in by_device.values():
        assert sorted(seqs) == list(range(len(seqs)))


def test_late_outage_and_skewed_readings_arrive_as_recorded(noisy: Run) -> None:
    faults = noisy.faults
    assert faults is not None
    columns = noisy.kinds["customer_meter"]
    keys = list(zip(columns["device"].tolist(), columns["seq"].tolist(), strict=True))
    position: dict[tuple[int, int], int] = {}
    for index, key in enumerate(keys):  # delivery order; a duplicate keeps its first place
        position.setdefault(key, index)
    sent = dict(zip(keys, columns["sent"].tolist(), strict=True))
    ts = dict(zip(keys, columns["ts"].tolist(), strict=True))
    held = {(int(d), int(s)) for d, s, f in zip(faults.device, faults.seq, faults.fault,
                                                strict=True)
            if f in (CommFault.LATE, CommFault.GATEWAY_OUTAGE)}
    customer = faults.device < noisy.fleet.customer_count
    checked: dict[CommFault, int] = defaultdict(int)
    for kind in (CommFault.LATE, CommFault.GATEWAY_OUTAGE, CommFault.CLOCK_SKEW):
        rows = np.flatnonzero((faults.fault == kind) & customer)
        for row in rows.tolist():
            key = (int(faults.device[row]), int(faults.seq[row]))
            if key not in sent:  # lost as well (a skewed reading may be lost)
                continue
            true_ts, detail = int(faults.ts_ms[row]), int(faults.detail_ms[row])
            if kind == CommFault.LATE:
                assert sent[key] >= true_ts + detail
                successor = (key[0], key[1] + 1)
                if successor in position and successor not in held:
                    assert position[key] > position[successor]  # out of order
            elif kind == CommFault.GATEWAY_OUTAGE:
                assert sent[key] >= detail
            else:
                assert ts[key] == true_ts + detail
            checked[kind] += 1
    assert min(checked[kind] for kind in (CommFault.LATE, CommFault.GATEWAY_OUTAGE,
                                          CommFault.CLOCK_SKEW)) > 0, checked
    # readings off the 15-minute grid are exactly the skewed ones
    skew_rows = faults.fault == CommFault.CLOCK_SKEW
    skewed = set(zip(faults.device[skew_rows].tolist(), faults.seq[skew_rows].tolist(),
                     strict=True))
    off_grid = columns["ts"] % CADENCE_MS != 0
    assert off_grid.sum() == sum(key in skewed for key in keys)


def test_blocks_come_in_delivery_order(noisy: Run) -> None:
    sent = [block.sent_ms for block in noisy.blocks]
    assert sent == sorted(sent)
    late = noisy.faults.fault == CommFault.LATE if noisy.faults is not None else None
    assert late is not None
    assert late.any()


# -- a healthy fleet looks like a real one --------------------------------------------------


@pytest.fixture(scope="module")
def healthy() -> Run:
    return Run(SimConfig(fleet=FleetConfig(meters=4000), days=7, seed=2, **HEALTHY))


def test_healthy_daily_consumption_is_in_documented_ranges(healthy: Run) -> None:
    columns = healthy.kinds["customer_meter"]
    litres = np.bincount(columns["device"], columns["flow_lpm"] * 15,
                         minlength=healthy.fleet.customer_count) / 7
    types = healthy.fleet.customer_type[: healthy.fleet.customer_count]
    assert 250 <= litres[types == CustomerType.RESIDENTIAL].mean() <= 500
    assert 500 <= np.median(litres[types == CustomerType.COMMERCIAL]) <= 3000
    assert 5_000 <= np.median(litres[types == CustomerType.INDUSTRIAL]) <= 40_000
    assert (litres > 0).all()


def test_healthy_homes_read_zero_at_night(healthy: Run) -> None:
    columns = healthy.kinds["customer_meter"]
    hour = (columns["ts"] % 86_400_000) / 3_600_000
    night = (hour > 1) & (hour <= 4)
    minimum = np.full(healthy.fleet.customer_count, np.inf)
    np.minimum.at(minimum, columns["device"][night], columns["flow_lpm"][night])
    homes = healthy.fleet.customer_type[: healthy.fleet.customer_count] == 0
    assert np.median(minimum[homes]) == 0
    assert (minimum[homes] == 0).mean() > 0.95
    # round-the-clock businesses never rest: a legitimate night flow
    steady = [e.device for e in healthy.episodes if e.kind == "round_the_clock"]
    assert steady
    assert (minimum[steady] > 0).mean() > 0.9


def test_district_inlet_carries_customers_plus_leakage(healthy: Run) -> None:
    customers = healthy.kinds["customer_meter"]
    inlet = healthy.kinds["district_meter"]
    fleet = healthy.fleet
    used = np.bincount(fleet.district_of[customers["device"]], customers["flow_lpm"] * 15)
    supplied = np.bincount(fleet.district_of[inlet["device"]], inlet["flow_lpm"])
    assert ((supplied > used * 1.03) & (supplied < used * 1.5)).all()
    pump = healthy.kinds["pump_station"]
    pumped = np.bincount(fleet.district_of[pump["device"]], pump["flow_lpm"])
    assert np.allclose(pumped, supplied, rtol=0.02)
    assert (np.diff(healthy.device("pump_station", fleet.pump_device(0))["energy_kwh"]) >= 0).all()


def test_healthy_seq_is_contiguous_and_timestamps_on_cadence(healthy: Run) -> None:
    for kind, columns in healthy.kinds.items():
        order = np.lexsort((columns["seq"], columns["device"]))
        device, seq, ts = columns["device"][order], columns["seq"][order], columns["ts"][order]
        same = device[1:] == device[:-1]
        assert (seq[1:][same] == seq[:-1][same] + 1).all(), kind
        step = 900_000 if kind == "customer_meter" else 60_000
        assert (ts[1:][same] - ts[:-1][same] == step).all(), kind
    assert healthy.stats.lost == healthy.stats.duplicated == 0


def test_summer_brings_sprinklers_and_pools_that_the_readings_show() -> None:
    run = Run(SimConfig(fleet=FleetConfig(meters=800), days=2, seed=4,
                        start=datetime(2026, 7, 6, tzinfo=UTC), **HEALTHY))
    watering = [e for e in run.episodes if e.kind == "garden_watering"]
    assert len(watering) > 20
    assert any(4 <= (e.start_ms % 86_400_000) / 3_600_000 < 7 for e in watering)
    for episode in watering[:50]:
        readings = run.device("customer_meter", episode.device)
        covering = (readings["ts"] > episode.start_ms) & (
            readings["ts"] - CADENCE_MS < episode.end_ms)
        litres = readings["flow_lpm"][covering].sum() * 15
        assert litres >= 0.96 * episode.magnitude * episode.duration_h * 60


def test_profiles_sum_to_the_day() -> None:
    table = profile_table(96)
    assert np.allclose(table[0].sum(axis=1), 1.0)
    assert (table > 0).all()


# -- memory stays flat ----------------------------------------------------------------------


def _peak_bytes(days: float) -> int:
    config = SimConfig(fleet=FleetConfig(meters=300), days=days, seed=1)
    tracemalloc.start()
    try:
        for _ in FleetSimulator(config):
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_simulated_days() -> None:
    short, long = _peak_bytes(2), _peak_bytes(6)
    assert long < short * 1.15 + 200_000, (short, long)


# -- contract payloads ----------------------------------------------------------------------


def test_payloads_decode_with_the_contract_and_match_encode(noisy: Run) -> None:
    kinds_seen = set()
    for block in noisy.blocks[:: max(1, len(noisy.blocks) // 300)]:
        payloads = block.to_json_payloads(max_readings=97)
        batches = block.to_batches(max_readings=97)
        assert payloads == [encode(batch) for batch in batches]
        decoded = [decode(payload, TelemetryBatch) for payload in payloads]
        assert sum(len(batch.readings) for batch in decoded) == len(block)
        assert decoded[0] == batches[0]
        kinds_seen.add(block.kind)
    assert kinds_seen == {"customer_meter", "district_meter", "pump_station"}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=-1e13, max_value=1e13, allow_nan=False), min_size=1,
                max_size=20))
def test_fast_json_matches_pydantic_for_any_rounded_float(values: list[float]) -> None:
    flows = np.round(np.array(values), 3)
    block = ReadingBlock(
        site="dma-01", gateway_id="dma-01-gw-001", kind="customer_meter",
        sent_ms=1_767_571_230_000, id_table=np.array(["mtr-0000001"], object),
        device_index=np.zeros(len(flows), np.int32),
        ts_ms=np.full(len(flows), 1_767_571_200_000), seq=np.arange(len(flows)),
        metrics={"flow_lpm": flows, "energy_kwh": flows * 7})
    assert block.to_json_payloads(7) == [encode(b) for b in block.to_batches(7)]


def test_batch_size_outside_the_contract_is_refused(noisy: Run) -> None:
    with pytest.raises(ValueError, match="1 to 10000"):
        noisy.blocks[0].to_json_payloads(max_readings=10_001)
