"""Incremental feature windows against a straightforward batch computation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.edge.features import (
    FEATURE_NAMES,
    ClosedWindows,
    FeatureWindows,
    WindowSpec,
    pressure_of,
)

T0 = 1_767_571_200_000  # 2026-01-05T00:00Z
MIN = 60_000
SPEC = WindowSpec(length_ms=30 * MIN, night_start_min=60, night_end_min=240)


def reference(spec: WindowSpec, readings: list[tuple[int, int, float, float]]) -> dict:
    """Per-reading semantics, then plain numpy statistics per (device, window)."""
    newest: dict[int, int] = {}
    groups: dict[tuple[int, int], list[tuple[int, float, float]]] = {}
    late = 0
    for device, ts, flow, pressure in readings:
        window = ts // spec.length_ms
        if window < newest.get(device, window):
            late += 1
            continue
        newest[device] = window
        groups.setdefault((device, window), []).append((ts, flow, pressure))
    rows = {}
    for (device, window), items in groups.items():
        ts = np.array([item[0] for item in items])
        flow = np.array([item[1] for item in items])
        pressure = np.array([item[2] for item in items])
        hours = (ts - window * spec.length_ms) / 3_600_000
        has_p = np.isfinite(pressure)
        night = spec.in_night(ts)
        row = [*series(hours, flow), *series(hours[has_p], pressure[has_p]),
               flow[night].min() if night.any() else 0.0, np.mean(flow == 0), len(flow),
               float(has_p.any()), float(night.any())]
        rows[(device, window * spec.length_ms)] = np.array(row)
    return {"rows": rows, "late": late}


def series(t: np.ndarray, x: np.ndarray) -> list[float]:
    if not len(x):
        return [0.0] * 5
    spread = np.sum((t - t.mean()) ** 2)
    slope = np.sum((t - t.mean()) * (x - x.mean())) / spread if spread > 1e-12 else 0.0
    return [x.mean(), x.min(), x.max(), x.std(), slope]


def rows_of(closed: ClosedWindows) -> dict:
    return {(int(slot), int(start)): row.astype(np.float64)
            for slot, start, row in zip(closed.slots, closed.start_ms, closed.features,
                                        strict=True)}


def assert_rows_equal(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for key, row in expected.items():
        np.testing.assert_allclose(got[key], row, rtol=2e-6, atol=2e-5, err_msg=str(key))


def run(windows: FeatureWindows, readings: list, cuts: list[int]) -> ClosedWindows:
    columns = list(zip(*readings, strict=True))
    slots, ts, flow, pressure = (np.array(column) for column in columns)
    bounds = [0, *sorted(cut % (len(readings) + 1) for cut in cuts), len(readings)]
    parts = [windows.add(slots[a:b], ts[a:b], flow[a:b], pressure[a:b])
             for a, b in itertools.pairwise(bounds)]
    return ClosedWindows.concat([*parts, windows.flush()])


flows = st.one_of(st.just(0.0), st.floats(0, 500).map(lambda v: round(v, 3)))
pressures = st.one_of(st.just(math.nan), st.floats(0.5, 7).map(lambda v: round(v, 3)))
reading = st.tuples(st.integers(0, 3), st.integers(0, 6 * 60 * MIN), flows, pressures)


@settings(max_examples=150, deadline=None)
@given(readings=st.lists(reading, min_size=1, max_size=60),
       cuts=st.lists(st.integers(0, 10_000), max_size=4))
def test_incremental_equals_batch_for_any_order_and_split(readings, cuts):
    readings = [(device, T0 + ts, flow, p) for device, ts, flow, p in readings]
    windows = FeatureWindows(SPEC, capacity=1)
    windows.slots(["d0", "d1", "d2", "d3"])
    closed = run(windows, readings, cuts)
    expected = reference(SPEC, readings)
    assert_rows_equal(rows_of(closed), expected["rows"])
    assert windows.late_readings == expected["late"]
    assert closed.features.dtype == np.float32
    assert np.isfinite(closed.features).all()


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_order_within_a_window_does_not_matter(data):
    values = data.draw(st.lists(st.tuples(st.integers(0, 29 * MIN), flows, pressures),
                                min_size=1, max_size=40))
    shuffled = data.draw(st.permutations(values))
    results = []
    for items in (values, shuffled):
        windows = FeatureWindows(SPEC)
        slot = windows.slots(["d"])
        ts, flow, pressure = (np.array(column) for column in zip(*items, strict=True))
        windows.add(np.repeat(slot, len(ts)), T0 + ts, flow, pressure)
        results.append(windows.flush().features)
    np.testing.assert_allclose(results[0], results[1], rtol=2e-6, atol=2e-5)


def test_late_readings_are_counted_not_added():
    windows = FeatureWindows(SPEC)
    slot = windows.slots(["d"])
    windows.add(slot, [T0 + 31 * MIN], [1.0])
    closed = windows.add(slot, [T0 + 5 * MIN], [9.0])  # the window before the open one
    assert len(closed) == 0
    assert windows.late_readings == 1
    closed = windows.flush(T0 + 60 * MIN)
    assert closed.features[0, FEATURE_NAMES.index("flow_max")] == 1.0
    windows.add(slot, [T0 + 59 * MIN], [5.0])  # in the window flush closed
    assert windows.late_readings == 2


def test_flush_closes_only_windows_that_ended():
    windows = FeatureWindows(SPEC)
    slots = windows.slots(["early", "late"])
    windows.add(slots, [T0, T0 + 40 * MIN], [1.0, 2.0])
    assert list(windows.flush(T0 + 30 * MIN).device_ids) == ["early"]
    assert len(windows.flush(T0 + 59 * MIN)) == 0
    assert list(windows.flush().device_ids) == ["late"]


def test_non_finite_flow_is_skipped_and_counted():
    windows = FeatureWindows(SPEC)
    slot = windows.slots(["d"])
    windows.add(np.repeat(slot, 3), [T0, T0 + MIN, T0 + 2 * MIN], [1.0, math.nan, math.inf])
    assert windows.invalid_readings == 2
    assert windows.flush().features[0, FEATURE_NAMES.index("reading_count")] == 1


def test_bad_input_is_rejected_with_a_reason():
    windows = FeatureWindows(SPEC)
    slot = windows.slots(["d"])
    with pytest.raises(ValueError, match="differ in length"):
        windows.add(slot, [T0, T0], [1.0])
    with pytest.raises(ValueError, match=r"FeatureWindows\.slots"):
        windows.add([7], [T0], [1.0])
    with pytest.raises(ValueError, match="night_start_min"):
        WindowSpec(night_start_min=1440)
    with pytest.raises(ValueError, match="unknown keys"):
        WindowSpec.from_dict({"length_ms": 60_000, "colour": 1})


def test_night_span_may_wrap_midnight():
    spec = WindowSpec(night_start_min=23 * 60, night_end_min=4 * 60)
    hours = np.array([22, 23, 0, 3, 4]) * 3_600_000 + 30 * MIN
    assert spec.in_night(T0 + hours).tolist() == [False, True, True, True, False]


def test_pressure_of_picks_the_device_kinds_pressure():
    column = np.ones(2)
    assert pressure_of({"flow_lpm": column, "pressure_bar": column}) is column
    assert pressure_of({"outlet_pressure_bar": column, "inlet_pressure_bar": -column}) is column
    assert pressure_of({"flow_lpm": column}) is None


def test_memory_per_device_does_not_grow_with_readings():
    windows = FeatureWindows(SPEC, capacity=2)
    slot = windows.slots(["d"])
    before = windows._state.nbytes
    for minute in range(0, 600):
        windows.add(slot, [T0 + minute * MIN], [float(minute % 7)])
    assert windows._state.nbytes == before
