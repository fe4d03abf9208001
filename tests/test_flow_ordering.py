"""Property tests of the dataflow's per-device logic (dataflows.ordering): no I/O."""

from __future__ import annotations

import itertools
import pickle
import random
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataflows.ordering import DeviceSilent, Kind, Lane, OrderSettings, Point, ShardState
from meshwatch.contract import QualityFlag, Reading

T0 = 1_767_225_600_000
CADENCE_S = 60
CADENCE_MS = CADENCE_S * 1000
LATENESS_MS = 5 * CADENCE_MS
MAX_FILL = 4


@dataclass(frozen=True)
class Stream:
    """Per device: which seqs exist (the others are lost at the source); seq k is at minute k."""

    devices: dict[str, list[int]]
    duplicates: list[tuple[str, int]]
    seed: int

    def readings(self) -> list[Reading]:
        return [reading(d, s) for d, seqs in self.devices.items() for s in seqs]


def reading(device: str, seq: int) -> Reading:
    return Reading(device_id=device, ts_ms=T0 + seq * CADENCE_MS, seq=seq,
                   metrics={"flow_lpm": float(seq), "battery_v": 3.6})


@st.composite
def streams(draw: st.DrawFn) -> Stream:
    n_devices = draw(st.integers(1, 4))
    devices = {}
    for d in range(n_devices):
        length = draw(st.integers(1, 40))
        kept = draw(st.lists(st.booleans(), min_size=length, max_size=length))
        kept[0] = True
        devices[f"m{d}"] = [s for s in range(length) if kept[s] or draw(st.booleans())]
    pool = [(d, s) for d, seqs in devices.items() for s in seqs]
    duplicates = draw(st.lists(st.sampled_from(pool), max_size=20))
    return Stream(devices, duplicates, draw(st.integers(0, 2**32 - 1)))


def run(state: ShardState, arrivals: list[Reading], chunks: list[int],
        cadences: dict[str, float]) -> tuple[list[Point], list[DeviceSilent]]:
    points: list[Point] = []
    silences: list[DeviceSilent] = []
    start = 0
    for size in [*chunks, len(arrivals)]:
        out = state.process(arrivals[start:start + size], cadences)
        points += out.points
        silences += out.silences
        start += size
        if start >= len(arrivals):
            break
    out = state.flush(cadences)
    return points + out.points, silences + out.silences


def bounded_shuffle(items: list[Reading], lateness_ms: int, rng: random.Random) -> list[Reading]:
    """Arrival order where no reading comes after one stamped more than ``lateness_ms`` later."""
    keyed = [(r.ts_ms + rng.uniform(0, lateness_ms), i, r) for i, r in enumerate(items)]
    return [r for _, _, r in sorted(keyed)]


def with_duplicates(stream: Stream, arrivals: list[Reading], rng: random.Random) -> list[Reading]:
    """Copies of some readings, each somewhere after its original (a redelivery)."""
    out = list(arrivals)
    for device, seq in stream.duplicates:
        first = next(i for i, r in enumerate(out) if (r.device_id, r.seq) == (device, seq))
        out.insert(rng.randint(first + 1, len(out)), reading(device, seq))
    return out


def measured_ids(points: list[Point]) -> Counter[tuple[str, int]]:
    return Counter((p.device_id, p.seq) for p in points if p.kind is not Kind.IMPUTED)


def new_state() -> ShardState:
    return ShardState(OrderSettings(allowed_lateness_ms=LATENESS_MS,
                                    gap_fill_max_intervals=MAX_FILL))


@settings(max_examples=150, deadline=None)
@given(stream=streams(), chunk=st.integers(1, 30), displace=st.booleans())
def test_every_reading_comes_out_exactly_once(stream: Stream, chunk: int, displace: bool) -> None:
    rng = random.Random(stream.seed)
    arrivals = stream.readings()
    if displace:  # any order at all: some take the late path
        rng.shuffle(arrivals)
    arrivals = with_duplicates(stream, arrivals, rng)
    state = new_state()
    points, _ = run(state, arrivals, [chunk] * len(arrivals), {})
    expected = Counter((r.device_id, r.seq) for r in stream.readings())
    assert measured_ids(points) == expected
    assert state.counts["duplicates"] == len(stream.duplicates)
    assert state.counts["received"] == len(arrivals)
    assert state.counts["measured"] + state.counts["late"] == sum(expected.values())
    late = [p for p in points if p.kind is Kind.LATE]
    assert all(QualityFlag.LATE.value in p.quality for p in late)
    assert len(late) == state.counts["late"]


@settings(max_examples=150, deadline=None)
@given(stream=streams(), chunk=st.integers(1, 30))
def test_within_the_lateness_every_device_comes_out_in_order(stream: Stream, chunk: int) -> None:
    rng = random.Random(stream.seed)
    arrivals = with_duplicates(stream, bounded_shuffle(stream.readings(), LATENESS_MS, rng), rng)
    state = new_state()
    points, _ = run(state, arrivals, [chunk] * len(arrivals), {})
    assert state.counts["late"] == 0
    for device in stream.devices:
        times = [p.ts_ms for p in points if p.device_id == device]
        assert times == sorted(set(times)), f"{device}: not strictly increasing"


@settings(max_examples=150, deadline=None)
@given(stream=streams(), chunk=st.integers(1, 30), registered=st.booleans())
def test_short_gaps_are_filled_and_long_ones_reported(stream: Stream, chunk: int,
                                                      registered: bool) -> None:
    rng = random.Random(stream.seed)
    arrivals = bounded_shuffle(stream.readings(), LATENESS_MS, rng)
    cadences = dict.fromkeys(stream.devices, float(CADENCE_S)) if registered else {}
    state = new_state()
    points, silences = run(state, arrivals, [chunk] * len(arrivals), cadences)
    for device, seqs in stream.devices.items():
        expected_imputed: set[int] = set()
        expected_long: list[int] = []
        learned: int | None = None
        for a, b in itertools.pairwise(seqs):
            cadence = 1 if registered else learned
            if cadence is not None:
                intervals = round((b - a) / cadence)
                if 2 <= intervals <= MAX_FILL and cadence == 1:
                    expected_imputed |= set(range(a + 1, b))
                elif intervals > MAX_FILL:
                    expected_long.append(a)
            learned = b - a if learned is None else min(learned, b - a)
        if not registered:
            # learned cadence: the minimum of the last 8 intervals, not of all; only check
            # what holds regardless: imputed points sit on the grid, inside gaps, flagged.
            imputed = [p for p in points if p.device_id == device and p.kind is Kind.IMPUTED]
            assert all(p.quality == (QualityFlag.IMPUTED.value,) and p.seq == -1
                       for p in imputed)
            assert not {(p.ts_ms - T0) / CADENCE_MS for p in imputed} & set(seqs)
            continue
        imputed = [p for p in points if p.device_id == device and p.kind is Kind.IMPUTED]
        assert sorted((p.ts_ms - T0) // CADENCE_MS for p in imputed) == sorted(expected_imputed)
        for p in imputed:  # the metric is linear in time: interpolation is exact
            assert p.metrics["flow_lpm"] == pytest.approx((p.ts_ms - T0) / CADENCE_MS)
            assert p.quality == (QualityFlag.IMPUTED.value,)
        resumed = [s for s in silences if s.device_id == device and s.resumed_ms is not None]
        assert [(s.last_seen_ms - T0) // CADENCE_MS for s in resumed] == expected_long
        onsets = [s for s in silences if s.device_id == device and s.resumed_ms is None]
        assert len(onsets) <= len(expected_long) + 1  # at most one per silence
    assert state.counts["imputed"] == sum(p.kind is Kind.IMPUTED for p in points)


@settings(max_examples=100, deadline=None)
@given(stream=streams(), chunk=st.integers(1, 30), cut=st.floats(0, 1), displace=st.booleans())
def test_a_pickled_state_continues_exactly_like_the_original(stream: Stream, chunk: int,
                                                             cut: float,
                                                             displace: bool) -> None:
    rng = random.Random(stream.seed)
    arrivals = stream.readings()
    if displace:
        rng.shuffle(arrivals)
    arrivals = with_duplicates(stream, arrivals, rng)
    at = int(cut * len(arrivals))
    cadences = dict.fromkeys(stream.devices, float(CADENCE_S))
    whole = new_state()
    first = whole.process(arrivals[:at], cadences)
    rest = whole.process(arrivals[at:], cadences)
    copy = new_state()
    first_copy = copy.process(arrivals[:at], cadences)
    copy = pickle.loads(pickle.dumps(copy))
    rest_copy = copy.process(arrivals[at:], cadences)
    assert (first.points, rest.points) == (first_copy.points, rest_copy.points)
    assert (first.silences, rest.silences) == (first_copy.silences, rest_copy.silences)
    assert whole.counts == copy.counts


def test_a_silent_device_is_reported_once_when_the_watermark_passes() -> None:
    state = new_state()
    cadences = {"quiet": 60.0, "busy": 60.0}
    state.process([reading("quiet", 0), reading("busy", 0)], cadences)
    silences = []
    for seq in range(1, 30):
        silences += state.process([reading("busy", seq)], cadences).silences
    onsets = [s for s in silences if s.device_id == "quiet"]
    assert len(onsets) == 1
    # watermark = minute 29 - 5; onset once it passes 4.5 intervals after minute 0
    assert onsets[0].last_seen_ms == T0
    assert onsets[0].resumed_ms is None
    assert onsets[0].ts_ms == T0 + 5 * CADENCE_MS
    assert state.counts["silent_onsets"] == 1
    back = state.process([reading("quiet", 40), reading("busy", 46)], cadences).silences
    assert [(s.device_id, s.resumed_ms, s.missed) for s in back if s.device_id == "quiet"] == [
        ("quiet", T0 + 40 * CADENCE_MS, 39)]
    # busy jumped from minute 29 to 46: at watermark 41 it had been silent 12 minutes
    assert [(s.resumed_ms, s.missed) for s in back if s.device_id == "busy"] == [(None, 12)]


def test_a_backlog_behind_the_watermark_closes_the_reported_silence() -> None:
    state = new_state()
    cadences = {"quiet": 60.0, "busy": 60.0}
    state.process([reading("quiet", 0), reading("busy", 0)], cadences)
    silences = []
    for seq in range(1, 20):
        silences += state.process([reading("busy", seq)], cadences).silences
    assert [(s.device_id, s.resumed_ms) for s in silences] == [("quiet", None)]
    # the edge agent's outbox drains: minute 1, 2, ... arrive, all behind the watermark
    out = state.process([reading("quiet", 1), reading("quiet", 2)], cadences)
    assert [p.kind for p in out.points] == [Kind.MEASURED, Kind.MEASURED]
    # resumed at minute 1; at watermark 14 its newest reading (minute 2) is still 12 old
    assert [(s.resumed_ms, s.missed) for s in out.silences] == [(T0 + CADENCE_MS, 0), (None, 12)]


def test_seqs_older_than_the_dedup_window_are_kept_unverified() -> None:
    state = ShardState(OrderSettings(allowed_lateness_ms=0, dedup_window=8))
    out = state.process([reading("m", 20), reading("m", 3), reading("m", 3)], {})
    assert sorted((p.seq, p.kind) for p in out.points) == [(3, Kind.LATE), (3, Kind.LATE),
                                                           (20, Kind.MEASURED)]
    assert state.counts["unverified"] == 2


@pytest.mark.parametrize("bad", [
    {"allowed_lateness_ms": -1}, {"gap_fill_max_intervals": 0}, {"dedup_window": 0}])
def test_settings_are_checked(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        OrderSettings(**bad)


def test_a_fast_devices_in_order_readings_go_out_at_once() -> None:
    state = new_state()  # 5 minutes of lateness: nothing is released yet
    out = state.process([reading("in", 3), reading("m", 3), reading("in", 1),
                         reading("in", 3), reading("in", 4)], {}, fast={"in"})
    assert out.points == []
    # in order: at once; behind a reading sent before: BEHIND (stale); duplicate: dropped
    assert [(lane, p.seq) for lane, p in out.fast] == [(Lane.FAST, 3), (Lane.BEHIND, 1),
                                                       (Lane.FAST, 4)]
    out = state.process([reading("in", 20)], {}, fast={"in"})
    assert [p.seq for p in out.points if p.device_id == "in"] == [1, 3, 4]  # in order, once
    assert [(lane, p.seq) for lane, p in out.fast] == [(Lane.FAST, 20)]


def test_a_snapshot_from_before_the_fast_path_keeps_the_readings_it_holds_in_order() -> None:
    """Readings waiting in an old snapshot were never sent on the fast path: until they are
    released, the device's new readings go as SLOW (the district scores them in order)."""
    state = new_state()
    state.process([reading("in", 0), reading("in", 1)], {})  # minutes 0 and 1 wait
    for device in state.devices.values():  # as the previous version pickled it
        object.__delattr__(device, "newest")
        object.__delattr__(device, "slow_until")
    restored = pickle.loads(pickle.dumps(state))
    out = restored.process([reading("in", 2)], {}, fast={"in"})
    assert [(lane, p.seq) for lane, p in out.fast] == [(Lane.SLOW, 2)]
    out = restored.process([reading("in", 6)], {}, fast={"in"})  # releases minutes 0, 1
    assert [(lane, p.seq) for lane, p in out.fast] == [(Lane.SLOW, 6)]
    out = restored.process([reading("in", 7)], {}, fast={"in"})
    assert [(lane, p.seq) for lane, p in out.fast] == [(Lane.FAST, 7)]
