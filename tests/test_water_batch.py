"""The batch path of every water detector equals its one-at-a-time contract path."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from models.seeds import TUNING_SEEDS
from models.water import (
    BurstDetector,
    BurstFleet,
    CustomerLeakDetector,
    CustomerLeakFleet,
    DistrictLeakDetector,
    DistrictLeakFleet,
    SensorFaultDetector,
    SensorFaultFleet,
    SilenceDetector,
    SilenceFleet,
)
from simulators import FleetConfig, FleetSimulator, IncidentRates, SimConfig

RATES = IncidentRates(customer_leak_per_meter_day=0.05, stuck_per_meter_day=0.02,
                      stopped_per_meter_day=0.02, spikes_per_meter_day=0.02,
                      battery_depletion_per_meter_day=0.02, burst_per_district_day=1.0)


@pytest.fixture(scope="module")
def blocks() -> list:
    """Delivered blocks of a small faulty fleet, comm faults included (late, dup, skew)."""
    config = SimConfig(fleet=FleetConfig(meters=40, districts=2, meters_per_gateway=20),
                       incidents=RATES, days=4, seed=TUNING_SEEDS[0])
    return list(FleetSimulator(config))


def _one_at_a_time(make, rows: list[tuple[int, dict]]) -> np.ndarray:
    detectors: dict[int, object] = {}
    scores = []
    for slot, x in rows:
        detector = detectors.setdefault(slot, make())
        scores.append(detector.score_one(x))
        detector.learn_one(x)
    return np.array(scores)


def _rows(slot: np.ndarray, cols: dict[str, np.ndarray]) -> list[tuple[int, dict]]:
    names = list(cols)
    return [(int(s), {name: (int(cols[name][i]) if name == "ts_ms" else float(cols[name][i]))
                      for name in names}) for i, s in enumerate(slot)]


def _customer_cols(block) -> dict[str, np.ndarray]:
    return {"ts_ms": block.ts_ms, "flow_lpm": block.metrics["flow_lpm"],
            "battery_v": block.metrics["battery_v"]}


@pytest.mark.parametrize(("fleet_class", "detector_class"), [
    (CustomerLeakFleet, CustomerLeakDetector), (SensorFaultFleet, SensorFaultDetector)])
def test_customer_detectors_batch_equals_one_at_a_time(blocks, fleet_class, detector_class):
    fleet = fleet_class()
    batch, rows = [], []
    stale_seen = False
    for block in blocks:
        if block.kind != "customer_meter":
            continue
        cols = _customer_cols(block)
        stale_before = fleet.stale
        batch.append(fleet.process(block.device_index, cols).score)
        stale_seen |= fleet.stale > stale_before
        rows += _rows(block.device_index, cols)
    expected = _one_at_a_time(detector_class, rows)
    got = np.concatenate(batch)
    assert stale_seen, "the stream should hold late or duplicated readings"
    assert (got >= 0.9).any(), "the faulty fleet should raise some scores"
    np.testing.assert_array_equal(got, expected)


def test_several_readings_of_one_device_in_a_block_are_handled_in_order(blocks):
    """A backlog (many readings per device in one block) equals feeding them one by one."""
    readings = [b for b in blocks if b.kind == "customer_meter"]
    device = np.concatenate([b.device_index for b in readings])
    cols = {name: np.concatenate([_customer_cols(b)[name] for b in readings])
            for name in ("ts_ms", "flow_lpm", "battery_v")}
    whole = CustomerLeakFleet().process(device, cols).score  # one block, ~100 rounds
    fleet = CustomerLeakFleet()
    pieces = np.concatenate([fleet.process(b.device_index, _customer_cols(b)).score
                             for b in readings])
    np.testing.assert_array_equal(whole, pieces)


def test_burst_batch_equals_one_at_a_time(blocks):
    fleet = BurstFleet()
    batch, rows = [], []
    for block in blocks:
        if block.kind != "district_meter":
            continue
        slot = block.device_index - block.device_index.min()
        cols = {"ts_ms": block.ts_ms, "flow_lpm": block.metrics["flow_lpm"],
                "pressure_bar": block.metrics["pressure_bar"]}
        batch.append(fleet.process(slot, cols).score)
        rows += _rows(slot, cols)
    got = np.concatenate(batch)
    assert (got >= 0.9).any(), "a burst a day per district should be seen"
    np.testing.assert_array_equal(got, _one_at_a_time(BurstDetector, rows))


def test_district_leak_and_silence_batch_equal_one_at_a_time():
    rng = np.random.default_rng(TUNING_SEEDS[1])
    t0 = 1_767_571_200_000
    n = 96 * 14
    slot = np.tile([0, 1, 2], n)
    ts = np.repeat(t0 + 900_000 * np.arange(1, n + 1), 3)
    use = 300 + rng.normal(0, 5, len(ts))
    leak = np.where((slot == 1) & (ts > t0 + 10 * 86_400_000), 15.0, 0.0)
    flow = use + 20 + leak  # 20 L/min of background leakage, and a new leak in district 1
    customers = use + rng.normal(0, 0.5, len(ts))
    customers[rng.random(len(ts)) < 0.05] = np.nan  # no customer data now and then
    cols = {"ts_ms": ts, "flow_lpm": flow, "customer_flow_lpm": customers}
    got = DistrictLeakFleet().process(slot, cols).score
    assert got.max() >= 0.9
    np.testing.assert_array_equal(got, _one_at_a_time(DistrictLeakDetector, _rows(slot, cols)))

    last = ts - np.where(rng.random(len(ts)) < 0.02, 900_000 * 40, 900_000)
    cols = {"ts_ms": ts, "last_seen_ms": last.astype(np.float64),
            "cadence_s": np.full(len(ts), 900.0)}
    got = SilenceFleet().process(slot, cols).score
    assert got.max() >= 0.9
    np.testing.assert_array_equal(got, _one_at_a_time(SilenceDetector, _rows(slot, cols)))


@pytest.mark.parametrize("detector_class", [CustomerLeakDetector, SensorFaultDetector,
                                            BurstDetector, DistrictLeakDetector,
                                            SilenceDetector])
def test_state_is_small_and_survives_pickle(blocks, detector_class):
    """Per-device state stays under 10 KB and a pickled detector continues identically."""
    detector = detector_class()
    block = next(b for b in blocks if b.kind == "district_meter")
    t0 = int(block.ts_ms[0])
    xs = [{"ts_ms": t0 + i * 60_000, "flow_lpm": 5.0 + i % 7, "pressure_bar": 4.0,
           "battery_v": 3.6, "customer_flow_lpm": 3.0, "last_seen_ms": t0 + i * 60_000 - 60_000,
           "cadence_s": 60.0} for i in range(1, 3000)]
    for x in xs[:2000]:
        detector.learn_one(x)
    assert detector.state_size() <= 10_000
    copy = pickle.loads(pickle.dumps(detector))
    for x in xs[2000:]:
        assert copy.score_one(x) == detector.score_one(x)
        copy.learn_one(x)
        detector.learn_one(x)
