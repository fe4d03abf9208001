"""The columnar wire encoders write exactly what `encode` writes, and refuse what the models do."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshwatch.contract import (
    EdgeScore,
    Reading,
    TelemetryBatch,
    WindowScore,
    decode,
    encode,
)
from meshwatch.contract.events import MAX_TS_MS, MIN_TS_MS
from meshwatch.contract.units import UNITS
from meshwatch.contract.wire import edge_score_payloads, json_float, telemetry_payloads

ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}\Z")
epoch_ms = st.integers(MIN_TS_MS, MAX_TS_MS - 1)
finite = st.floats(allow_nan=False, allow_infinity=False)
metric_names = st.builds(
    lambda stem, unit: f"{stem}_{unit}",
    st.from_regex(r"\A[a-z][a-z0-9]{0,8}(_[a-z0-9]{1,5}){0,2}\Z"),
    st.sampled_from(sorted(UNITS)),
)


@st.composite
def telemetry(draw: st.DrawFn) -> dict[str, object]:
    names = draw(st.lists(metric_names, min_size=1, max_size=4, unique=True))
    rows = draw(st.integers(1, 30))
    return {
        "site": draw(ids), "gateway_id": draw(ids), "sent_ms": draw(epoch_ms),
        "device_ids": draw(st.lists(ids, min_size=rows, max_size=rows)),
        "ts_ms": np.array(draw(st.lists(epoch_ms, min_size=rows, max_size=rows)), np.int64),
        "seq": np.array(draw(st.lists(st.integers(0, 2**62), min_size=rows, max_size=rows)),
                        np.int64),
        "metrics": {name: np.array(draw(st.lists(finite, min_size=rows, max_size=rows)))
                    for name in names},
        "max_readings": draw(st.integers(1, 12)),
    }


@st.composite
def scores(draw: st.DrawFn) -> dict[str, object]:
    rows = draw(st.integers(1, 30))
    starts = draw(st.lists(st.integers(MIN_TS_MS, MAX_TS_MS - 10**7), min_size=rows,
                           max_size=rows))
    spans = draw(st.lists(st.integers(0, 10**7 - 1), min_size=rows, max_size=rows))
    return {
        "site": draw(ids), "gateway_id": draw(ids), "model_id": draw(ids),
        "model_version": draw(ids),
        "device_ids": draw(st.lists(ids, min_size=rows, max_size=rows)),
        "start_ms": np.array(starts, np.int64),
        "end_ms": np.array(starts, np.int64) + np.array(spans, np.int64),
        "scores": np.array(draw(st.lists(st.floats(0, 1), min_size=rows, max_size=rows))),
        "max_windows": draw(st.integers(1, 12)),
    }


@settings(max_examples=300, deadline=None)
@given(telemetry())
def test_telemetry_payloads_are_the_bytes_of_encode(case: dict[str, object]) -> None:
    c: dict = case  # type: ignore[type-arg]
    readings = [
        Reading(device_id=device, ts_ms=ts, seq=seq,
                metrics={name: values[i] for name, values in c["metrics"].items()})
        for i, (device, ts, seq) in enumerate(zip(c["device_ids"], c["ts_ms"].tolist(),
                                                  c["seq"].tolist(), strict=True))
    ]
    size = c["max_readings"]
    expected = [encode(TelemetryBatch(site=c["site"], gateway_id=c["gateway_id"],
                                      sent_ms=c["sent_ms"], readings=readings[i:i + size]))
                for i in range(0, len(readings), size)]
    assert telemetry_payloads(**c) == expected


@settings(max_examples=300, deadline=None)
@given(scores())
def test_edge_score_payloads_are_the_bytes_of_encode(case: dict[str, object]) -> None:
    c: dict = case  # type: ignore[type-arg]
    windows = [
        WindowScore(device_id=device, window_start_ms=start, window_end_ms=end, score=score)
        for device, start, end, score in zip(c["device_ids"], c["start_ms"].tolist(),
                                             c["end_ms"].tolist(), c["scores"].tolist(),
                                             strict=True)
    ]
    size = c["max_windows"]
    expected = [encode(EdgeScore(site=c["site"], gateway_id=c["gateway_id"],
                                 model_id=c["model_id"], model_version=c["model_version"],
                                 windows=windows[i:i + size]))
                for i in range(0, len(windows), size)]
    payloads = edge_score_payloads(**c)
    assert payloads == expected
    assert decode(payloads[0], EdgeScore).windows == windows[:size]


@settings(max_examples=1000)
@given(finite)
def test_floats_are_written_as_pydantic_writes_them(value: float) -> None:
    expected = encode(WindowScore.model_construct(device_id="m", window_start_ms=MIN_TS_MS,
                                                  window_end_ms=MIN_TS_MS, score=value))
    assert f'"score":{json_float(value)}}}'.encode() in expected


def _telemetry(**change: object) -> list[bytes]:
    case: dict = {"site": "dma-01", "gateway_id": "gw-01", "sent_ms": MIN_TS_MS,  # type: ignore[type-arg]
                  "device_ids": ["m1", "m2"], "ts_ms": np.array([MIN_TS_MS] * 2),
                  "seq": np.array([0, 1]), "metrics": {"flow_lpm": np.array([1.0, 2.0])}}
    return telemetry_payloads(**{**case, **change})


@pytest.mark.parametrize(("change", "message"), [
    ({"device_ids": ["m1", "m 2"]}, "device_id 'm 2'"),
    ({"device_ids": ["m1", "m1\nm2"]}, "device_id 'm1\\nm2'"),
    ({"site": "dma/01"}, "site 'dma/01'"),
    ({"ts_ms": np.array([MIN_TS_MS, MAX_TS_MS])}, "ts_ms must be"),
    ({"ts_ms": np.array([MIN_TS_MS, MIN_TS_MS + 0.5])}, "ts_ms must be"),
    ({"seq": np.array([0, -1])}, "seq must not be negative"),
    ({"metrics": {"flow_lpm": np.array([1.0, np.nan])}}, "not a finite number"),
    ({"metrics": {"flow": np.array([1.0, 2.0])}}, "metric name 'flow'"),
    ({"metrics": {}}, "1 to 64 metrics"),
    ({"max_readings": 10_001}, "1 to 10000 rows"),
])
def test_telemetry_that_breaks_the_contract_is_refused(change: dict[str, object],
                                                        message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("\\", "\\\\").replace("(", r"\(")):
        _telemetry(**change)


@pytest.mark.parametrize(("scores_", "end_shift", "message"), [
    ([0.5, float("nan")], 0, r"finite numbers in \[0, 1\]"),
    ([0.5, 1.5], 0, r"finite numbers in \[0, 1\]"),
    ([0.5, 0.5], -1, "window_end_ms is before window_start_ms"),
])
def test_edge_scores_that_break_the_contract_are_refused(scores_: list[float], end_shift: int,
                                                          message: str) -> None:
    start = np.array([MIN_TS_MS, MIN_TS_MS]) + 1000
    with pytest.raises(ValueError, match=message):
        edge_score_payloads("dma-01", "gw-01", "m", "1", ["a", "b"], start,
                            start + end_shift, np.array(scores_))
