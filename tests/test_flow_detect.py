"""The detection stage's logic (no bytewax, no servers): per-district pipelines behind watermarks.

The flow's steps are run by hand: the ordering shards take the mesh messages partition by
partition, interleaved at random (as bytewax's workers may), their outputs are split by
district and fed to :class:`~dataflows.detection.DistrictState` in random chunks. The alerts
must be those of ``meshwatch evaluate``'s pipeline on the same fleet whatever the
interleaving, and a state restored from a pickle in the middle must continue identically.
Crews' feedback acts at its event time, wherever it arrives among the readings (on
:class:`~detect_support.RoundTheClockTown`, whose businesses raise repeat false alarms).
``tests/test_flow_alerts.py`` checks the same claim through the real flow.
"""

from __future__ import annotations

import dataclasses
import pickle
import random
from collections import Counter, defaultdict

import numpy as np
import pytest
from detect_support import RoundTheClockTown, alert_keys, eval_settings, mesh_load, reference

from dataflows.detection import (
    COUNTERS,
    MAX_CATCH_UP_TICKS,
    QUIET_RELEASES,
    DetectionLayout,
    DistrictChunk,
    DistrictState,
    split_by_district,
)
from dataflows.ordering import OrderSettings, ShardState, shard_of
from dataflows.records import ShardOutput
from meshwatch.contract import (
    Alert,
    AlertStatus,
    Feedback,
    Outcome,
    Reading,
    TelemetryBatch,
    decode,
)
from models.water.pipeline import WaterPipeline
from simulators import CommFaultLog, CommRates, FleetSimulator
from simulators.comms import CommFault

PARTITIONS, SHARDS = 4, 2
T0 = 1_767_571_200_000


@pytest.fixture(scope="module")
def fleet() -> tuple[object, list[Alert], dict[int, list[bytes]], DetectionLayout]:
    settings = eval_settings()
    config = settings.sim_config()
    sim_fleet = FleetSimulator(config).fleet
    kinds = ("customer_meter", "district_meter", "pump_station")
    cadence = np.where(sim_fleet.kind == 0, config.fleet.customer_cadence_s,
                       config.fleet.scada_cadence_s)
    rows = [(str(d), kinds[k], sim_fleet.district_ids[t], float(c)) for d, k, t, c in zip(
        sim_fleet.device_ids.tolist(), sim_fleet.kind.tolist(), sim_fleet.district_of.tolist(),
        cadence.tolist(), strict=True)]
    layout = DetectionLayout.from_rows(rows, PARTITIONS, SHARDS)
    return settings, reference(settings), mesh_load(settings, PARTITIONS), layout


class Flow:
    """The flow's order → by_district → detect steps, run by hand."""

    def __init__(self, layout: DetectionLayout, lateness_ms: int = 60_000) -> None:
        self.layout = layout
        self.order = OrderSettings(allowed_lateness_ms=lateness_ms)
        self.shards: dict[int, ShardState] = {}
        self.districts: dict[str, DistrictState] = {}
        self.inbox: dict[str, list[DistrictChunk]] = defaultdict(list)
        self.alerts: list[Alert] = []
        self.fast = layout.fast_devices

    def message(self, payload: bytes) -> None:
        groups: dict[int, list] = defaultdict(list)
        for r in decode(payload, TelemetryBatch).readings:
            groups[shard_of(r.device_id, PARTITIONS, SHARDS)].append(r)
        for shard, readings in groups.items():
            state = self.shards.setdefault(shard, ShardState(self.order))
            before = state.watermark
            released = state.process(readings, {}, self.fast)
            self._split(ShardOutput(shard, released, {}, 0, state.watermark, before))

    def _split(self, output: ShardOutput) -> None:
        for district, chunk in split_by_district(output, self.layout):
            self.inbox[district].append(chunk)

    def detect(self, rng: random.Random) -> None:
        """Hand each district the chunks waiting for it, in one or a few batches."""
        for district, chunks in self.inbox.items():
            state = self.districts.get(district)
            if state is None:
                state = self.districts[district] = DistrictState.of(self.layout, district)
            while chunks:
                n = rng.randint(1, len(chunks))
                self.alerts += state.take(chunks[:n])
                del chunks[:n]

    def finish(self) -> None:
        """The idle flush of every shard, then of every district (as the flow's timers do)."""
        for shard, state in self.shards.items():
            before = state.watermark
            self._split(ShardOutput(shard, state.flush({}), {}, 0, state.watermark, before))
        self.detect(random.Random(0))
        for state in self.districts.values():
            self.alerts += state.release_idle()


def run(layout: DetectionLayout, load: dict[int, list[bytes]], seed: int,
        restore_at: int | None = None, legacy: bool = False) -> Flow:
    """The flow over ``load``; ``legacy``: without the fast path until ``restore_at``, where
    the states are pickled as the previous version did."""
    rng = random.Random(seed)
    flow = Flow(layout)
    if legacy:
        flow.fast = frozenset()
    queues = {p: list(messages) for p, messages in load.items()}
    taken = 0
    while any(queues.values()):
        p = rng.choice([p for p, q in queues.items() if q])
        for _ in range(rng.randint(1, 30)):  # a burst of one partition, as next_batch gives
            if queues[p]:
                flow.message(queues[p].pop(0))
                taken += 1
        if rng.random() < 0.5:
            flow.detect(rng)
        if restore_at is not None and taken >= restore_at:
            flow.detect(rng)
            if legacy:
                strip_fast_path(flow)
            flow.districts = pickle.loads(pickle.dumps(flow.districts))  # a snapshot
            flow.shards = pickle.loads(pickle.dumps(flow.shards))
            restore_at = None
    flow.detect(rng)
    flow.finish()
    return flow


@pytest.mark.parametrize("seed", [1, 2])
def test_district_pipelines_raise_evaluates_alerts_whatever_the_interleaving(fleet,
                                                                            seed) -> None:
    _, want, load, layout = fleet
    kinds = Counter(str(a.evidence["category"]) for a in want)
    for category in ("customer_leak", "sensor_fault", "burst", "silent"):  # it covers them
        assert kinds[category] > 0, (category, kinds)
    flow = run(layout, load, seed)
    assert alert_keys(flow.alerts) == alert_keys(want)
    counts = Counter()
    for state in flow.districts.values():
        counts.update(state.counts)
    assert counts["waiting"] == 0
    assert counts["behind"] == 0  # in-order delivery: nothing comes behind the ticks
    assert counts["fed"] == sum(s.pipeline.readings for s in flow.districts.values())
    assert counts["fast"] > 0  # the inlets' bursts went the fast path


def strip_fast_path(flow: Flow) -> None:
    """The states as the version before the fast path pickled them; the fast path from now."""
    for shard in flow.shards.values():
        for device in shard.devices.values():
            object.__delattr__(device, "newest")
            object.__delattr__(device, "slow_until")
    for state in flow.districts.values():
        for name in ("_fast", "_fast_seen", "_slow_seen", "_slow"):
            delattr(state, name)
        del state.counts["fast"]
    flow.fast = flow.layout.fast_devices


@pytest.mark.parametrize("legacy", [False, True])
def test_a_restored_snapshot_continues_identically(fleet, legacy) -> None:
    """Also one of the version before the fast path: the flow can be upgraded in place."""
    _, want, load, layout = fleet
    half = sum(len(m) for m in load.values()) // 2
    flow = run(layout, load, seed=3, restore_at=half, legacy=legacy)
    assert alert_keys(flow.alerts) == alert_keys(want)
    assert sum(state.counts["fast"] for state in flow.districts.values()) > 0


@pytest.mark.parametrize(("burst_at", "raised_at"), [(44, 44), (31, 36)])
def test_an_in_order_inlet_burst_is_alerted_before_the_district_watermark_passes_it(
        burst_at: int, raised_at: int) -> None:
    """The fast path: the inlet's shard sends its in-order readings at once, and the district
    scores them in the burst detector without waiting for its watermark, which a customer
    meter on a gateway 5 minutes behind holds back (with the shards' lateness, it reaches
    minute ``i`` at step ``i + 6``). Only a reading after a tick not done yet waits for the
    tick: minute 31 for the tick at minute 30 (step 36), still before its own (step 37)."""
    layout = DetectionLayout.from_rows([("mtr-4", "customer_meter", "dma-01", 60),
                                        ("dma-01-inlet", "district_meter", "dma-01", 60)], 1, 2)
    assert layout.fast_devices == {"dma-01-inlet"}
    assert {shard_of(d, 1, 2) for d in ("mtr-4", "dma-01-inlet")} == {0, 1}
    shards = {s: ShardState(OrderSettings(allowed_lateness_ms=60_000)) for s in (0, 1)}
    state = DistrictState.of(layout, "dma-01")
    reference = WaterPipeline(state.pipeline.layout)  # fed in event-time order, evaluate's way
    minute = 60_000
    start = T0 + 60 * minute

    def send(device: str, i: int, flow: float, pressure: float = float("nan")) -> list[Alert]:
        shard = shard_of(device, 1, 2)
        metrics = {"flow_lpm": flow} if device == "mtr-4" else {
            "flow_lpm": flow, "pressure_bar": pressure}
        before = shards[shard].watermark
        released = shards[shard].process([Reading(device_id=device, ts_ms=start + i * minute,
                                                  seq=i, metrics=metrics)], {},
                                         layout.fast_devices)
        out = ShardOutput(shard, released, {}, 0, shards[shard].watermark, before)
        return state.take([chunk for _, chunk in split_by_district(out, layout)])

    alerts: list[Alert] = []
    want: list[Alert] = []
    raised = watermark = None
    for i in range(1, 60):
        flow, pressure = (950.0, 3.2) if i == burst_at else (700.0 + 10 * (i % 3), 3.9)
        new = send("dma-01-inlet", i, flow, pressure)
        if i > 5:
            new += send("mtr-4", i - 5, 0.5)
        if raised is None and any(a.kind.value == "burst" for a in new):
            raised, watermark = i, state.watermark
        alerts += new
        if i % 15 == 0:
            want += reference.tick(start + i * minute)
        want += reference.inlet_readings(np.array([1]), np.array([start + i * minute]), {
            "flow_lpm": np.array([flow]), "pressure_bar": np.array([pressure])})
    assert raised == raised_at
    assert watermark is not None
    assert watermark < start + burst_at * minute  # the district's watermark: behind it
    bursts = [a for a in alerts if a.kind.value == "burst"]
    assert alert_keys(bursts) == alert_keys(a for a in want if a.kind.value == "burst")
    assert [a.status for a in bursts].count(AlertStatus.OPEN) == 1  # not again when fed
    assert state.counts["fast"] == 59


def test_a_slow_shard_is_not_jumped_over_until_it_is_quiet() -> None:
    layout = DetectionLayout.from_rows([("mtr-1", "customer_meter", "dma-01", 900),
                                        ("mtr-4", "customer_meter", "dma-01", 900)], 1, 2)
    state = DistrictState.of(layout, "dma-01")

    def chunk(shard: int, device: str, i: int) -> DistrictChunk:
        ts = T0 + i * 900_000
        return DistrictChunk("dma-01", shard, ts, np.array([0], np.int8),
                             np.array([layout.slot_of[device][1]]), np.array([ts]),
                             np.array([1.0]), np.array([3.6]), np.array([np.nan]))

    state.take([chunk(0, "mtr-4", 1), chunk(1, "mtr-1", 1)])
    for i in range(2, 40):  # shard 1 runs ahead; shard 0 is behind but still heard from
        state.take([chunk(1, "mtr-1", i)])
    for _ in range(QUIET_RELEASES - 1):
        state.release_idle()
    assert state.watermark == T0 + 900_000  # shard 0 is slow, not quiet: no jump over it
    state.take([chunk(0, "mtr-4", i) for i in range(2, 40)])
    assert (state.counts["behind"], state.counts["waiting"]) == (0, 0)
    for i in range(40, 45):  # now shard 0 sends nothing more
        state.take([chunk(1, "mtr-1", i)])
    state.release_idle()
    state.release_idle()
    assert state.watermark == T0 + 39 * 900_000
    state.release_idle()  # the QUIET_RELEASES-th release without shard 0: stop waiting
    assert state.watermark == T0 + 44 * 900_000


def test_a_quiet_shard_holds_its_district_back_until_released() -> None:
    layout = DetectionLayout.from_rows([("mtr-1", "customer_meter", "dma-01", 900),
                                        ("mtr-4", "customer_meter", "dma-01", 900)], 1, 2)
    assert layout.shards_of["dma-01"] == {0, 1}
    state = DistrictState.of(layout, "dma-01")
    slot = layout.slot_of["mtr-1"][1]

    def chunk(i: int) -> DistrictChunk:
        ts = T0 + i * 900_000
        return DistrictChunk("dma-01", 1, ts, np.array([0], np.int8), np.array([slot]),
                             np.array([ts]), np.array([1.0]), np.array([3.6]),
                             np.array([np.nan]))

    for i in range(1, 40):  # shard 0 (mtr-4) never reports: everything waits
        state.take([chunk(i)])
    assert (state.counts["fed"], state.counts["waiting"], state.held_back) == (0, 39, True)
    state.release_idle()
    assert (state.counts["fed"], state.counts["waiting"], state.held_back) == (39, 0, False)
    assert (state.counts["ticks"], state.watermark) == (39, T0 + 39 * 900_000)
    state.take([chunk(40)])  # still unheard: waits for the next release
    assert state.counts["waiting"] == 1


def test_feedback_clears_an_alert_once_and_survives_a_snapshot(fleet) -> None:
    _, want, load, layout = fleet
    flow = run(layout, load, seed=4)
    leak = min((a for a in want if a.evidence["category"] == "customer_leak"),
               key=lambda a: a.alert_id)
    state = flow.districts[leak.district]
    feedback = Feedback(work_order_id="wo-1", alert_ids=[leak.alert_id, "al-unknown"],
                        outcome=Outcome.FALSE_ALARM, ts_ms=leak.last_ts_ms + 3_600_000)
    [cleared] = state.feedback(feedback)
    assert (cleared.alert_id, cleared.status, cleared.district) == (
        leak.alert_id, AlertStatus.CLEARED, leak.district)  # the district filled in
    assert cleared.evidence["cleared_by"] == "feedback"
    restored = pickle.loads(pickle.dumps(state))
    assert restored.feedback(feedback) == []  # the same work order again: nothing
    assert [label.alert_id for label in restored.labels] == [leak.alert_id]
    assert (restored.counts["feedback"], restored.counts["feedback_unknown_alerts"]) == (1, 1)


def test_a_watermark_jump_far_ahead_ticks_at_most_a_week() -> None:
    layout = DetectionLayout.from_rows([("mtr-1", "customer_meter", "dma-01", 900)], 1, 1)
    state = DistrictState.of(layout, "dma-01")

    def chunk(ts: int) -> DistrictChunk:
        return DistrictChunk("dma-01", 0, ts, np.array([0], np.int8), np.array([0]),
                             np.array([ts]), np.array([1.0]), np.array([3.6]),
                             np.array([np.nan]))

    state.take([chunk(T0 + 900_000)])
    state.take([chunk(T0 + 900_000 + 365 * 86_400_000)])  # a clock a year ahead
    assert state.counts["ticks"] == 1 + MAX_CATCH_UP_TICKS
    assert state.counts["ticks_skipped"] == 365 * 96 - MAX_CATCH_UP_TICKS
    assert state.counts["fed"] == 2


def test_with_reordering_comm_faults_the_incidents_agree_and_only_clear_times_differ(
        fleet) -> None:
    """Late retries, duplicates and skewed clocks on (see detect_support for why they differ).

    Same incidents (ids) and the same openings; a clear may come at another time: on a device
    whose own readings were reordered, or by one tick anywhere while some clock runs ahead
    (evaluate ticks at the newest event time it was fed, which such a clock drags ahead, so
    it ticks at ``T`` before the readings stamped ``T``; the flow's district watermark is a
    minimum over shards and is not dragged).
    """
    settings, _, _, layout = fleet
    settings = dataclasses.replace(settings, comms=CommRates(meter_gap_per_device_day=0.05))
    logs: list[CommFaultLog] = []
    simulator = FleetSimulator(settings.sim_config(), on_comm_faults=logs.append)
    for _ in simulator:
        pass
    log = CommFaultLog.concat(logs)
    reordering = (CommFault.LATE, CommFault.DUPLICATE, CommFault.CLOCK_SKEW)
    for fault in reordering:
        assert (log.fault == fault).any(), fault.name  # the run has each of them
    touched = {str(simulator.fleet.device_ids[d])
               for d in log.device[np.isin(log.fault, reordering)].tolist()}
    want = reference(settings)
    flow = run(layout, mesh_load(settings, PARTITIONS), seed=5)
    assert {a.alert_id for a in flow.alerts} == {a.alert_id for a in want}
    assert alert_keys(a for a in flow.alerts if a.status is AlertStatus.OPEN) == alert_keys(
        a for a in want if a.status is AlertStatus.OPEN)
    mine = {(a.alert_id, a.status): a for a in flow.alerts}
    theirs = {(a.alert_id, a.status): a for a in want}
    assert set(mine) == set(theirs)
    differ = [key for key in mine if alert_keys([mine[key]]) != alert_keys([theirs[key]])]
    assert len(differ) <= len(want) // 5
    for key in differ:
        ours, evaluated = mine[key], theirs[key]
        assert ours.device_id in touched or abs(ours.last_ts_ms - evaluated.last_ts_ms) <= (
            900_000), (key, ours.device_id, ours.last_ts_ms, evaluated.last_ts_ms)


def town_chunks(town: RoundTheClockTown, layout: DetectionLayout, last: int,
                steps_per_chunk: int = 7) -> list[DistrictChunk]:
    """The town's readings (steps 1 to ``last``) as its shards' chunks, shard after shard
    for each run of ``steps_per_chunk`` steps, each chunk carrying its newest time as the
    shard's watermark."""
    ids, ts, flows = town.columns(1, last)
    shard = np.array([shard_of(d, 1, 2) for d in ids.tolist()])
    slot = np.array([layout.slot_of[d][1] for d in ids.tolist()])
    assert set(shard.tolist()) == {0, 1}, "the town's devices lie in both shards"
    chunks = []
    for first in range(1, last + 1, steps_per_chunk):
        run = (ts >= town.ts_ms(first)) & (ts < town.ts_ms(first + steps_per_chunk))
        for s in (0, 1):
            rows = run & (shard == s)
            chunks.append(DistrictChunk(town.district, s, int(ts[rows].max()),
                                        np.zeros(int(rows.sum()), np.int8), slot[rows],
                                        ts[rows], flows[rows], np.full(int(rows.sum()), 3.6),
                                        np.full(int(rows.sum()), np.nan)))
    return chunks


def town_feedback(town: RoundTheClockTown, last: int, at_ms: int) -> list[Feedback]:
    """False alarms on the alerts of biz-1 and biz-2, stamped ``at_ms``."""
    ids = {a.device_id: a.alert_id for a in town.reference(last)}
    return [Feedback(work_order_id=f"wo-{d}", alert_ids=[ids[d]], outcome=Outcome.FALSE_ALARM,
                     ts_ms=at_ms, device_id=d) for d in ("biz-1", "biz-2")]


@pytest.mark.parametrize("arrival", ["first", "midway", "just_before", "split_snapshot"])
def test_feedback_acts_at_its_event_time_whenever_it_arrives_before_it(arrival) -> None:
    """Feedback stamped ``F`` applies after the readings before ``F`` and before those at or
    after it, however early it came and through a snapshot: the alerts are those of one
    pipeline fed in event time with the feedback applied at ``F``."""
    town = RoundTheClockTown()
    last = town.step_at(6 * 24)
    layout = DetectionLayout.from_rows(town.registry_rows(), 1, 2)
    reported_ms = town.ts_ms(town.step_at(100))  # the alert's second raise is open
    feedback = town_feedback(town, last, reported_ms)
    want = town.reference(last, feedback)
    assert alert_keys(want) != alert_keys(town.reference(last))  # the feedback matters
    chunks = town_chunks(town, layout, last)
    passes = next(i for i, c in enumerate(chunks) if c.watermark >= reported_ms
                  and chunks[i - 1].watermark >= reported_ms)  # both shards passed it
    at = {"first": 0, "midway": passes // 2, "just_before": passes - 1,
          "split_snapshot": passes // 2}[arrival]
    state = DistrictState.of(layout, town.district)
    alerts: list[Alert] = []
    for i, chunk in enumerate(chunks):
        if i == at:
            assert [a for message in feedback for a in state.feedback(message)] == []
            assert state.counts["feedback_waiting"] == 2
            assert state.feedback(feedback[0]) == []  # a redelivery: ignored
            assert [f.work_order_id for f in state.feedback_waiting] == ["wo-biz-1", "wo-biz-2"]
            if arrival == "split_snapshot":
                state = pickle.loads(pickle.dumps(state))
        alerts += state.take([chunk])
    assert alert_keys(alerts) == alert_keys(want)
    assert (state.counts["feedback"], state.counts["feedback_waiting"],
            state.counts["feedback_behind"]) == (2, 0, 0)


def test_feedback_behind_the_watermark_applies_at_once() -> None:
    """Feedback stamped before the readings already fed cannot go back in time: it acts when
    it comes (as a late reading does), is counted, and only once."""
    town = RoundTheClockTown()
    last = town.step_at(6 * 24)
    layout = DetectionLayout.from_rows(town.registry_rows(), 1, 2)
    state = DistrictState.of(layout, town.district)
    for chunk in town_chunks(town, layout, town.step_at(102)):  # the alert is open
        state.take([chunk])
    assert state.watermark is not None
    assert state.watermark > town.ts_ms(town.step_at(100))
    feedback = town_feedback(town, last, town.ts_ms(town.step_at(100)))
    cleared = [a for message in feedback for a in state.feedback(message)]
    assert [(a.device_id, a.status, a.last_ts_ms, a.district) for a in cleared] == [
        (f.device_id, AlertStatus.CLEARED, f.ts_ms, town.district) for f in feedback]
    assert state.feedback(feedback[0]) == []
    assert (state.counts["feedback"], state.counts["feedback_waiting"],
            state.counts["feedback_behind"]) == (2, 0, 2)


def test_feedback_stamped_on_another_clock_applies_at_the_watermark() -> None:
    """A crew's wall clock over a simulated fleet: feedback stamped long after the district's
    event time would wait for ever; it acts at the watermark, as if stamped then."""
    town = RoundTheClockTown()
    layout = DetectionLayout.from_rows(town.registry_rows(), 1, 2)
    chunks = town_chunks(town, layout, town.step_at(102))  # the alert is open
    feedback = town_feedback(town, town.step_at(6 * 24),
                             town.ts_ms(town.step_at(102)) + 300 * 86_400_000)
    state = DistrictState.of(layout, town.district)
    for chunk in chunks:
        state.take([chunk])
    cleared = [a for message in feedback for a in state.feedback(message)]
    assert [(a.device_id, a.status, a.last_ts_ms) for a in cleared] == [
        (f.device_id, AlertStatus.CLEARED, state.watermark) for f in feedback]
    assert (state.counts["feedback_ahead"], state.counts["feedback_behind"]) == (2, 0)
    early = DistrictState.of(layout, town.district)  # it came before any reading: it waits
    assert early.feedback(feedback[0]) == []
    early.take(chunks[:2])  # the first watermark: it cannot be that far ahead
    assert (early.counts["feedback_waiting"], early.counts["feedback_ahead"],
            early.counts["feedback_unknown_alerts"]) == (0, 1, 1)


def test_a_snapshot_from_before_event_time_feedback_restores() -> None:
    """A recovery directory written by the previous version (no waiting feedback in its
    district states) still restores: the flow can be upgraded in place."""
    town = RoundTheClockTown()
    layout = DetectionLayout.from_rows(town.registry_rows(), 1, 2)
    chunks = town_chunks(town, layout, town.step_at(102))
    state = DistrictState.of(layout, town.district)
    for chunk in chunks[:-2]:
        state.take([chunk])
    for name in ("_feedback_waiting", "_work_orders", "_fast", "_fast_seen", "_slow_seen",
                 "_slow"):  # as the previous version pickled it
        delattr(state, name)
    state.counts = {k: v for k, v in state.counts.items()
                    if not k.startswith("feedback_") and k != "fast"}
    restored = pickle.loads(pickle.dumps(state))
    feedback = town_feedback(town, town.step_at(6 * 24), town.ts_ms(town.step_at(102)))
    assert restored.feedback(feedback[0]) == []  # it waits for its time
    assert len(restored.take(chunks[-2:])) == 1  # and clears the alert then
    assert set(restored.counts) == set(COUNTERS)
