"""The district water balance (mw_district) the detection step closes at every tick."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataflows.connectors.influx import lines_of
from dataflows.detection import DetectionLayout, DistrictChunk, DistrictState
from dataflows.district_balance import INTERVAL_MS
from dataflows.records import DistrictOutput

T0 = 1_767_571_200_000  # a Monday, 00:00 UTC
CUSTOMERS = [f"mtr-{k}" for k in range(4)]
INLET = "dma-01-inlet"
LAYOUT = DetectionLayout.from_rows(
    [(d, "customer_meter", "dma-01", 300) for d in CUSTOMERS]
    + [(INLET, "district_meter", "dma-01", 60)], partitions=1, shards_per_partition=1)

Row = tuple[str, int, float, float]  # device, ts_ms, flow, pressure


def chunk(rows: list[Row], watermark: int) -> DistrictChunk:
    _, slot, kind = zip(*(LAYOUT.slot_of[d] for d, *_ in rows), strict=True) if rows else (
        (), (), ())
    return DistrictChunk("dma-01", 0, watermark, np.array(kind, np.int8), np.array(slot),
                         np.array([r[1] for r in rows]), np.array([r[2] for r in rows]),
                         np.full(len(rows), np.nan), np.array([r[3] for r in rows]))


def reference(rows: list[Row], end_ms: int) -> dict[int, dict[str, float]]:
    """Brute force: per closed interval (start, start + 15 min], per meter means, summed."""
    out: dict[int, dict[str, float]] = {}
    for start in range(T0 - INTERVAL_MS, end_ms - INTERVAL_MS + 1, INTERVAL_MS):
        inside = [r for r in rows if start < r[1] <= start + INTERVAL_MS]
        if not inside:
            continue
        mean = {d: float(np.mean([r[2] for r in inside if r[0] == d]))
                for d in {r[0] for r in inside}}
        customers = [mean[d] for d in CUSTOMERS if d in mean]
        row: dict[str, float] = {"meters_reporting": len(customers)}
        if customers:
            row["customer_flow_lpm"] = sum(customers)
        if INLET in mean:
            row["inlet_flow_lpm"] = mean[INLET]
            row["pressure_bar"] = float(np.mean([r[3] for r in inside if r[0] == INLET]))
            if customers:
                row["balance_lpm"] = mean[INLET] - sum(customers)
        out[start] = row
    return out


readings = st.lists(
    st.tuples(st.sampled_from([*CUSTOMERS, INLET]), st.integers(1, 8 * 12),
              st.floats(0, 500), st.floats(1, 6)),
    min_size=1, max_size=120, unique_by=lambda r: (r[0], r[1]))


@settings(max_examples=60, deadline=None)
@given(readings, st.integers(1, 4))
def test_each_interval_is_the_sum_of_its_meters_means(drawn, parts) -> None:
    rows = sorted(((d, T0 + k * 300_000, flow, p) for d, k, flow, p in drawn),
                  key=lambda r: r[1])
    end = T0 + 8 * 3_600_000 + INTERVAL_MS
    state = DistrictState.of(LAYOUT, "dma-01")
    cut = np.array_split(np.arange(len(rows)), parts)
    closed = []
    for index in cut:  # in several takes, a pickle round trip between them
        part = [rows[j] for j in index]
        if part:
            state.take([chunk(part, part[-1][1] - 1)])
        state = pickle.loads(pickle.dumps(state))
        closed += state.drain_balance()
    state.take([chunk([], end)])
    closed += state.drain_balance()
    got = {row.start_ms: {k: v for k, v in {
        "customer_flow_lpm": row.customer_flow_lpm, "inlet_flow_lpm": row.inlet_flow_lpm,
        "balance_lpm": row.balance_lpm, "pressure_bar": row.pressure_bar,
        "meters_reporting": row.meters_reporting}.items() if v is not None} for row in closed}
    want = reference(rows, end)
    assert got.keys() == want.keys()
    for start, row in want.items():
        assert got[start] == {k: (v if k == "meters_reporting" else pytest.approx(v))
                              for k, v in row.items()}


def test_rows_become_mw_district_lines() -> None:
    state = DistrictState.of(LAYOUT, "dma-01")
    state.take([chunk([("mtr-0", T0 + 300_000, 2.0, np.nan), ("mtr-1", T0 + 600_000, 3.0,
                                                                np.nan),
                       (INLET, T0 + 600_000, 9.0, 3.5)], T0 + 2 * INTERVAL_MS)])
    output = DistrictOutput("dma-01", [], dict(state.counts), 1, state.watermark,
                            balance=state.drain_balance())
    district = [line for line in lines_of(output) if line.startswith("mw_district")]
    assert district == [
        f"mw_district,district=dma-01 inlet_flow_lpm=9.0,customer_flow_lpm=5.0,balance_lpm=4.0,"
        f"pressure_bar=3.5,meters_reporting=2i {T0}"]
