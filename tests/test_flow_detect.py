"""The detection plug of the dataflow: one stateful step, per device, in event-time order."""

from __future__ import annotations

import pickle

from dataflows.flow import _detect_step
from dataflows.ordering import Kind, Point, Released
from dataflows.records import ShardOutput

T0 = 1_767_225_600_000


class Recorder:
    """A stand-in with the detector contract that records the calls it gets."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.calls: list[tuple[str, float]] = []

    def score_one(self, x: dict[str, float]) -> float:
        self.calls.append(("score", x["ts_ms"]))
        return min(1.0, len(self.calls) / 10)

    def learn_one(self, x: dict[str, float]) -> None:
        self.calls.append(("learn", x["ts_ms"]))


def output(*points: Point) -> ShardOutput:
    return ShardOutput(0, Released(list(points)), {}, 0)


def test_each_device_gets_its_own_detector_and_only_in_order_measured_readings() -> None:
    made: list[str] = []

    def factory(device: str) -> Recorder:
        made.append(device)
        return Recorder(device)

    step = _detect_step(factory)
    state, out = step(None, output(
        Point("a", T0, 0, {"flow_lpm": 1.0}, Kind.MEASURED),
        Point("a", T0 + 60_000, -1, {"flow_lpm": 1.5}, Kind.IMPUTED),
        Point("b", T0, 0, {"flow_lpm": 2.0}, Kind.MEASURED),
        Point("a", T0 - 60_000, 5, {"flow_lpm": 9.0}, Kind.LATE),
    ))
    assert made == ["a", "b"]
    assert [(d, ts) for d, ts, _ in out.scores] == [("a", T0), ("b", T0)]
    assert state["a"].calls == [("score", T0), ("learn", T0)]  # score first, then learn
    state = pickle.loads(pickle.dumps(state))  # bytewax snapshots it
    state, out = step(state, output(Point("a", T0 + 120_000, 1, {"flow_lpm": 2.0},
                                          Kind.MEASURED)))
    assert made == ["a", "b"]  # resumed, not rebuilt
    assert state["a"].calls[-2:] == [("score", T0 + 120_000), ("learn", T0 + 120_000)]
    assert out.scores == [("a", T0 + 120_000, 0.3)]
