"""The district water balance written as mw_district: the district leak detector's input."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from dataflows.connectors.influx import lines_of
from dataflows.detection import DetectionLayout, DistrictChunk, DistrictState
from dataflows.records import BalanceRow, DistrictOutput
from models.water.pipeline import INTERVAL_MS

T0 = 1_767_614_400_000  # Monday 2026-01-05 12:00 UTC
CUSTOMERS = [f"mtr-{k}" for k in range(5)]
INLET = "dma-01-inlet"
LAYOUT = DetectionLayout.from_rows(
    [(d, "customer_meter", "dma-01", 900) for d in CUSTOMERS]
    + [(INLET, "district_meter", "dma-01", 300)], partitions=1, shards_per_partition=1)
FLOW = {d: 1.0 + k for k, d in enumerate(CUSTOMERS)}  # 1..5 L/min, 15 in all


def readings(interval: int, skip: str | None = None) -> list[tuple[str, int, float, float]]:
    """One interval: every customer once (but ``skip``), the inlet 3 times (20 + k L/min)."""
    end = T0 + (interval + 1) * INTERVAL_MS
    rows = [(d, end, FLOW[d], np.nan) for d in CUSTOMERS if d != skip]
    return rows + [(INLET, end - 600_000 + 300_000 * i, 19.0 + i + interval,
                    3.0 + 0.1 * i + 0.01 * interval) for i in range(3)]


def chunk(rows: list[tuple[str, int, float, float]], watermark: int) -> DistrictChunk:
    rows = sorted(rows, key=lambda r: r[1])
    _, slot, kind = zip(*(LAYOUT.slot_of[d] for d, *_ in rows), strict=True)
    return DistrictChunk("dma-01", 0, watermark, np.array(kind, np.int8), np.array(slot),
                         np.array([r[1] for r in rows]), np.array([r[2] for r in rows]),
                         np.full(len(rows), np.nan), np.array([r[3] for r in rows]))


def run(state: DistrictState, intervals: range, skip: dict[int, str]) -> list[BalanceRow]:
    rows = []
    for k in intervals:
        state.take([chunk(readings(k, skip.get(k)), T0 + (k + 1) * INTERVAL_MS)])
        state = pickle.loads(pickle.dumps(state))  # the flow snapshots it every epoch
        rows += state.drain_balance()
    return rows


def test_each_closed_interval_is_the_balance_the_leak_detector_saw() -> None:
    state = DistrictState.of(LAYOUT, "dma-01")
    rows = run(state, range(12), skip={6: "mtr-4"})
    # intervals close an hour (the aggregator's hold) behind the watermark: 0..7 of 0..11
    assert [r.start_ms for r in rows] == [T0 + k * INTERVAL_MS for k in range(8)]
    for k, row in enumerate(rows):
        assert row.inlet_flow_lpm == pytest.approx(20.0 + k), k  # the mean of its 3 readings
        assert row.pressure_bar == pytest.approx(3.1 + 0.01 * k), k
        # interval 6 lacks mtr-4 (5 L/min): imputed with its own steady flow
        assert row.customer_flow_lpm == pytest.approx(15.0), k
        assert row.balance_lpm == pytest.approx(5.0 + k), k


def test_too_few_meters_leave_the_customer_sum_and_balance_unknown() -> None:
    state = DistrictState.of(LAYOUT, "dma-01")
    rows = run(state, range(2), skip={})
    short = {"mtr-0", "mtr-1"}
    for k in range(2, 10):  # 3 of 5 meters (60 %) is below the aggregator's 80 % coverage
        rows_k = [r for r in readings(k) if r[0] not in short]
        state.take([chunk(rows_k, T0 + (k + 1) * INTERVAL_MS)])
        rows += state.drain_balance()
    row = next(r for r in rows if r.start_ms == T0 + 5 * INTERVAL_MS)
    assert (row.inlet_flow_lpm, row.customer_flow_lpm, row.balance_lpm) == (
        pytest.approx(25.0), None, None)


def test_rows_become_mw_district_lines() -> None:
    output = DistrictOutput("dma-01", [], {}, 1, None, balance=[
        BalanceRow(T0, 20.0, 15.0, 5.0, 3.1), BalanceRow(T0 + INTERVAL_MS, 20.0, None, None,
                                                           None)])
    district = [line for line in lines_of(output) if line.startswith("mw_district")]
    assert district == [
        f"mw_district,district=dma-01 inlet_flow_lpm=20.0,customer_flow_lpm=15.0,"
        f"balance_lpm=5.0,pressure_bar=3.1 {T0}",
        f"mw_district,district=dma-01 inlet_flow_lpm=20.0 {T0 + INTERVAL_MS}"]
