"""The flow's detection stage: one :class:`~models.water.pipeline.WaterPipeline` per district.

Pure computation, no I/O (the flow wraps it in a bytewax stateful step keyed by district).

**Why per district.** The water detectors are columnar fleet classes; the district leak
detector needs every customer meter of a district in one place (the night water balance),
and the alert policy's fusion ("no network leak during a burst") is per district. So the
ordering shards' output is re-keyed by district (:func:`split_by_district`, columns per
chunk, never one item per reading) and each district runs the same batch path that
``meshwatch evaluate`` runs (:mod:`models.evaluate`), with its own
:class:`~models.water.pipeline.FleetLayout` built from the registry
(:class:`DetectionLayout`). Alert ids name the device or district, not a slot, so they do
not depend on how the fleet is cut.

**Event time across shards.** A district's devices lie in many ordering shards, each with
its own watermark. A district's watermark is the *minimum* of the watermarks of the shards
that hold its registered devices (:attr:`DistrictState.watermark`). Readings wait in the
district until its watermark passes them, and are then fed in event-time order with
:meth:`~models.water.pipeline.WaterPipeline.tick` called at every 15-minute boundary ``T``
that the watermark reaches: readings stamped up to ``T``, then ``tick(T)``, then later
readings. That is the order ``meshwatch evaluate`` produces for a fleet that delivers in
order (before the first block of the next interval it ticks at the newest event time fed,
``T``), so the flow raises the same alerts. It needs an allowed lateness above zero: with
none, a shard's watermark reaches ``T`` with the first reading stamped ``T``, before other
gateways delivered theirs. A reading released behind the
district's watermark (a device's backlog) is fed at once, after ticks that already passed
it, as evaluate does with a late delivery; it is counted in ``behind``.

**Burst alerts without the wait (fast path).** The burst detector needs only its inlet's own
readings, in order. So the inlet of a district that has exactly one
(:attr:`DetectionLayout.fast_devices`) gets its in-order readings sent by its shard at once
(:mod:`dataflows.ordering`, fast path), and :meth:`DistrictState.take` scores them in the
burst detector and the alert policy straight away
(:meth:`~models.water.pipeline.WaterPipeline.inlet_bursts`), one reading per block as
``meshwatch evaluate`` gets them, waiting neither for the shard's lateness nor for the
district's watermark (``fast`` counts them). When the watermark feeds the same readings in
order, they go into the district balance with the calm flag the burst detector gave them
(:meth:`~models.water.pipeline.WaterPipeline.inlet_balance`) and are not scored again.

The alerts stay the same: the detector sees the same readings in the same order, and what
the alert policy does with them keeps its place among the ticks and the feedback, which go in
event time. A fast reading waits in the district (still ahead of the watermark) while it is
stamped after the next tick not done yet (at a tick, a district leak verdict looks at the
burst's alert: no network leak during a burst), or at or after the oldest feedback waiting,
and while inlet readings to be scored in order wait to be fed (those sent as ``Lane.SLOW``,
or waiting in a snapshot of the previous version). So a burst stamped within about the
allowed lateness (plus the lag of the district's slowest shard) after a 15-minute boundary
waits for the district's watermark to reach that boundary; any other burst waits for nothing.
An inlet reading out of order for its device (``Lane.BEHIND``) is stale for the burst
detector, which scored a newer one: it is neither scored nor put in the balance, where
``meshwatch evaluate`` (delivery order) gives the alert policy a score of 0 for it. A
district with two inlets keeps the ordered path. Feedback on a burst alert that arrives after
the fast path scored readings stamped after it acts on the burst's alert from its arrival
(the alert may have been updated or cleared in between): the one case where the fast path
lets the alerts depend on when something arrives.

A shard sends a district its watermark with its readings for that district, and otherwise
whenever its watermark crosses a minute (:data:`WATERMARK_STEP_MS`), so a district hears
from every shard about once per event-time minute, not once per message. When a shard
holding some of a district's devices never reports (all its devices silent since the flow
started) or stops reporting, :meth:`DistrictState.release_idle` (called by the flow every
``idle_flush_s`` of wall-clock time without progress while a shard is ahead) stops waiting
for it: the district's watermark moves up to the oldest watermark of the shards that are not
quiet, and what the quiet one sends later is fed behind the ticks. A shard is quiet when it
never reported, or sent the district nothing during the last :data:`QUIET_RELEASES` releases:
a shard that is merely slow, or about to flush what its own lateness holds (it does so
``idle_flush_s`` after its last input), keeps its readings in order.

**Feedback in event time.** A crew's :class:`~meshwatch.contract.events.Feedback` acts at
its own event time (``ts_ms``), not when it reaches the flow: it waits in the district
(``feedback_waiting``) until the district's watermark reaches ``ts_ms`` and is then applied
in order with the readings, after every reading stamped before ``ts_ms`` and before those
stamped at or after it (and before the tick at ``ts_ms``). So the readings at and after the
crew's report see what it taught the detectors, and a replay, a recovery or another number
of workers raises the same alerts, whenever the feedback arrived. Feedback stamped at or
before the watermark (the readings of its time were already fed) is applied at once, as a
late reading is, and counted in ``feedback_behind``. Feedback stamped more than
:data:`MAX_FEEDBACK_AHEAD_MS` after the watermark was stamped on another clock (a crew's wall
clock over a simulated or replayed fleet): it is applied at the watermark, as if stamped
then, and counted in ``feedback_ahead``. A work order seen before (waiting or applied) is
ignored: redelivery changes nothing.

>>> import numpy as np
>>> layout = DetectionLayout.from_rows([
...     ("mtr-1", "customer_meter", "dma-01", 900), ("mtr-4", "customer_meter", "dma-01", 900),
...     ("dma-01-inlet", "district_meter", "dma-01", 60)], partitions=1, shards_per_partition=2)
>>> layout.district_ids, sorted(layout.shards_of["dma-01"])
(['dma-01'], [0, 1])
>>> state = DistrictState.of(layout, "dma-01")
>>> T0 = 1_767_571_200_000
>>> def chunk(shard, watermark, device, ts, flow):
...     slot = layout.slot_of[device][1]
...     return DistrictChunk("dma-01", shard, watermark, np.array([0], np.int8),
...         np.array([slot]), np.array([ts]), np.array([flow]), np.array([np.nan]),
...         np.array([np.nan]))
>>> state.take([chunk(1, T0 + 900_000, "mtr-1", T0 + 900_000, 0.5)])  # shard 0 unheard: wait
[]
>>> state.counts["waiting"], state.watermark is None
(1, True)
>>> state.take([chunk(0, T0 + 1_800_000, "mtr-4", T0 + 1_800_000, 0.5)])
[]
>>> state.counts["fed"], state.counts["waiting"], state.watermark == T0 + 900_000
(1, 1, True)
>>> feedback = Feedback(work_order_id="wo-1", alert_ids=["al-x"], outcome="false_alarm",
...                     ts_ms=T0 + 3_600_000)
>>> state.feedback(feedback), state.feedback(feedback), state.counts["feedback_waiting"]
([], [], 1)
>>> state.take([chunk(0, T0 + 3_600_000, "mtr-4", T0 + 3_600_000, 0.5),
...             chunk(1, T0 + 3_600_000, "mtr-1", T0 + 3_600_000, 0.5)])  # applied at its time
[]
>>> state.counts["feedback_waiting"], state.counts["feedback_unknown_alerts"]
(0, 1)
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dataflows.ordering import Kind, Lane, shard_of
from dataflows.records import BalanceRow, ShardOutput
from meshwatch.contract.events import Alert, Feedback
from models.feedback import FeedbackApplier
from models.water.pipeline import (
    CUSTOMER,
    DISTRICT_METER,
    INTERVAL_MS,
    PUMP_STATION,
    FleetLayout,
    PipelineSettings,
    WaterPipeline,
)

__all__ = ["COUNTERS", "KIND_CODES", "MAX_CATCH_UP_TICKS", "MAX_FEEDBACK_AHEAD_MS",
           "QUIET_RELEASES", "TICK_MS",
           "WATERMARK_STEP_MS",
           "DetectionLayout", "DistrictChunk", "DistrictFeedback", "DistrictState",
           "split_by_district"]

TICK_MS = 900_000
"""Event-time step of :meth:`WaterPipeline.tick` (the same as ``meshwatch evaluate``)."""

WATERMARK_STEP_MS = 60_000
"""A shard tells a district it has no readings for about its watermark once per minute."""

KIND_CODES = {"customer_meter": CUSTOMER, "district_meter": DISTRICT_METER,
              "pump_station": PUMP_STATION, "other": PUMP_STATION}
"""Registry device kinds as :class:`FleetLayout` kinds (pump stations and others are only
seen: no detector scores them, the silence detector watches them)."""

MAX_CATCH_UP_TICKS = 4 * 24 * 7
"""At most a week of ticks in one jump of the watermark (a clock far ahead, dragged in by an
idle release): the boundaries before are skipped and counted in ``ticks_skipped``."""

QUIET_RELEASES = 3
"""A shard that sent nothing during this many idle releases is quiet: the district stops
waiting for it. A shard that still has readings flushes them ``idle_flush_s`` after its last
input, so a slow shard is never taken for a quiet one (module doc)."""

MAX_FEEDBACK_AHEAD_MS = 7 * 86_400_000
"""Feedback stamped further ahead of a district's watermark is on another clock (module doc)."""

COUNTERS = ("fed", "behind", "waiting", "ticks", "ticks_skipped", "alerts", "idle_releases",
            "feedback", "feedback_unknown_alerts", "feedback_waiting", "feedback_behind",
            "feedback_ahead", "fast")
"""A district's cumulative counters (:attr:`DistrictState.counts`; ``waiting`` and
``feedback_waiting`` are gauges; ``fast``: inlet readings scored on the fast path)."""


@dataclass(frozen=True, eq=False)
class DetectionLayout:
    """Every registered device's district, kind and slot, and each district's layout and shards.

    Build it with :meth:`from_registry` (or :meth:`from_rows`). Within a district, customer
    meters take the first slots (as :class:`WaterPipeline` requires), then district meters,
    then the rest, each group in registry order.
    """

    district_ids: list[str]
    layouts: dict[str, FleetLayout]
    slot_of: dict[str, tuple[str, int, int]]
    """device id -> (district, slot in the district's layout, kind code)."""
    shards_of: dict[str, frozenset[int]]
    """district -> the ordering shards that hold its devices."""
    districts_of_shard: dict[int, tuple[str, ...]]
    """shard -> the districts it holds devices of."""
    fast_devices: frozenset[str] = frozenset()
    """The inlets whose readings take the fast path: each district's district meter, when it
    has exactly one (module doc)."""

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[str, str, str, float]], partitions: int,
                  shards_per_partition: int) -> DetectionLayout:
        """From ``(device_id, device_kind, district, cadence_s)`` rows (registry order)."""
        by_district: dict[str, list[tuple[int, str, float]]] = {}
        for device_id, kind_name, district, cadence in rows:
            kind = KIND_CODES.get(str(kind_name))
            if kind is None:
                msg = f"device {device_id}: unknown device kind {kind_name!r}"
                raise ValueError(msg)
            by_district.setdefault(district, []).append((kind, device_id, float(cadence)))
        layouts: dict[str, FleetLayout] = {}
        slot_of: dict[str, tuple[str, int, int]] = {}
        shards_of: dict[str, set[int]] = {}
        districts_of_shard: dict[int, list[str]] = {}
        for district, devices in by_district.items():
            devices.sort(key=lambda row: row[0])  # stable: registry order within a kind
            ids = np.array([d for _, d, _ in devices], dtype=object)
            kinds = np.array([k for k, _, _ in devices], np.int8)
            layouts[district] = FleetLayout(
                device_ids=ids, kind=kinds, district_of=np.zeros(len(ids), np.int32),
                district_ids=[district],
                cadence_s=np.array([c for _, _, c in devices], np.float64))
            for slot, (kind, device_id, _) in enumerate(devices):
                slot_of[device_id] = (district, slot, kind)
                shard = shard_of(device_id, partitions, shards_per_partition)
                shards_of.setdefault(district, set()).add(shard)
            for shard in shards_of[district]:
                districts_of_shard.setdefault(shard, []).append(district)
        inlets: dict[str, list[str]] = {}
        for device_id, (district, _, kind) in slot_of.items():
            if kind == DISTRICT_METER:
                inlets.setdefault(district, []).append(device_id)
        return cls(list(by_district), layouts, slot_of,
                   {d: frozenset(s) for d, s in shards_of.items()},
                   {s: tuple(d) for s, d in districts_of_shard.items()},
                   frozenset(ids[0] for ids in inlets.values() if len(ids) == 1))

    @classmethod
    def from_registry(cls, registry: Iterable[Any], partitions: int,
                      shards_per_partition: int) -> DetectionLayout:
        """From a :class:`meshwatch.registry.Registry` (or any iterable of its devices)."""
        return cls.from_rows(((d.device_id, d.device_kind.value, d.district, d.cadence_s)
                              for d in registry), partitions, shards_per_partition)


@dataclass(frozen=True, eq=False, slots=True)
class DistrictChunk:
    """One shard's in-order measured readings of one district, as columns, and its watermark.

    ``kind`` holds layout kind codes; ``slot`` indexes the district's layout; a metric a
    reading does not carry is NaN.
    """

    district: str
    shard: int
    watermark: int | None
    kind: np.ndarray
    slot: np.ndarray
    ts: np.ndarray
    flow: np.ndarray
    battery: np.ndarray
    pressure: np.ndarray
    fast: bool = False
    """Readings of the fast path (:attr:`~dataflows.ordering.Released.fast`), in arrival
    order; ``kind`` then holds their :class:`~dataflows.ordering.Lane`."""

    def __len__(self) -> int:
        return len(self.ts)

    def take(self, index: np.ndarray) -> DistrictChunk:
        """The readings at ``index`` (a mask or positions), same district, shard, watermark."""
        return DistrictChunk(self.district, self.shard, self.watermark, self.kind[index],
                             self.slot[index], self.ts[index], self.flow[index],
                             self.battery[index], self.pressure[index])

    @staticmethod
    def concat(parts: Sequence[DistrictChunk]) -> DistrictChunk:
        """The readings of ``parts`` in order (district, shard and watermark of the last)."""
        last = parts[-1]
        if len(parts) == 1:
            return last
        return DistrictChunk(last.district, last.shard, last.watermark,
                             *(np.concatenate([getattr(p, name) for p in parts])
                               for name in ("kind", "slot", "ts", "flow", "battery",
                                            "pressure")))


@dataclass(frozen=True, slots=True)
class DistrictFeedback:
    """A crew's feedback for the alerts of one district's pipeline."""

    district: str
    feedback: Feedback


def split_by_district(item: ShardOutput, layout: DetectionLayout,
                      ) -> list[tuple[str, DistrictChunk]]:
    """A shard output as ``(district, chunk)`` items: its in-order measured readings by district.

    Imputed and late points are left out (never scored). Districts without readings in the
    output get an empty chunk when the shard's watermark crossed a minute (see module doc).
    Readings of devices the registry does not know are left out (the TSDB and the lake still
    have them). The fast path's readings (:attr:`~dataflows.ordering.Released.fast`) come
    as a ``fast`` chunk, before the district's other chunk.

    >>> from dataflows.ordering import Point, Released
    >>> layout = DetectionLayout.from_rows([("m1", "customer_meter", "d1", 900),
    ...     ("m2", "customer_meter", "d2", 900)], partitions=1, shards_per_partition=1)
    >>> out = ShardOutput(0, Released([Point("m1", 900_000, 0, {"flow_lpm": 1.0},
    ...     Kind.MEASURED), Point("x9", 900_000, 0, {"flow_lpm": 1.0}, Kind.MEASURED)]),
    ...     {}, 0, watermark=900_000, watermark_before=0)
    >>> sorted((d, len(c), c.watermark) for d, c in split_by_district(out, layout))
    [('d1', 1, 900000), ('d2', 0, 900000)]
    """
    groups: dict[str, list[tuple[int, int, int, Any]]] = {}
    slot_of = layout.slot_of
    for point in item.released.points:
        if point.kind is not Kind.MEASURED:
            continue
        where = slot_of.get(point.device_id)
        if where is None:
            continue
        district, slot, kind = where
        group = groups.get(district)
        if group is None:
            group = groups[district] = []
        group.append((kind, slot, point.ts_ms, point.metrics))
    watermark = item.watermark
    before = item.watermark_before
    crossed = watermark is not None and (
        before is None or watermark // WATERMARK_STEP_MS > before // WATERMARK_STEP_MS)
    out: list[tuple[str, DistrictChunk]] = []
    if crossed:
        for district in layout.districts_of_shard.get(item.shard, ()):
            if district not in groups:
                out.append((district, _chunk(district, item.shard, watermark, [])))
    fast: dict[str, list[tuple[int, int, int, Any]]] = {}
    for lane, point in item.released.fast:  # before the ordered readings: the district
        where = slot_of.get(point.device_id)  # must know them first
        if where is not None:
            district, slot, _ = where
            fast.setdefault(district, []).append((lane, slot, point.ts_ms, point.metrics))
    for district, rows in fast.items():
        out.append((district, _chunk(district, item.shard, watermark, rows, fast=True)))
    for district, rows in groups.items():
        out.append((district, _chunk(district, item.shard, watermark, rows)))
    return out


def _chunk(district: str, shard: int, watermark: int | None,
           rows: list[tuple[int, int, int, Any]], fast: bool = False) -> DistrictChunk:
    nan = float("nan")
    return DistrictChunk(
        district, shard, watermark,
        np.array([r[0] for r in rows], np.int8),
        np.array([r[1] for r in rows], np.int64),
        np.array([r[2] for r in rows], np.int64),
        np.array([r[3].get("flow_lpm", nan) for r in rows], np.float64),
        np.array([r[3].get("battery_v", nan) for r in rows], np.float64),
        np.array([r[3].get("pressure_bar", nan) for r in rows], np.float64), fast)


class DistrictState:
    """One district's pipeline, shard watermarks and waiting readings (see the module doc).

    ``shards`` are the ordering shards that hold the district's devices. Picklable: the
    flow snapshots it every epoch, and a restored copy continues identically.
    """

    def __init__(self, layout: FleetLayout, shards: frozenset[int],
                 settings: PipelineSettings | None = None, scores: bool = False) -> None:
        self.pipeline = WaterPipeline(layout, settings)
        if scores:
            self.pipeline.score_log = []
        self.district = layout.district_ids[0]
        self.shards = shards
        self.shard_watermarks: dict[int, int] = {}
        self.watermark: int | None = None
        """Readings up to here were fed (and ticks up to it done)."""
        self.next_tick: int | None = None
        self.counts = dict.fromkeys(COUNTERS, 0)
        self._waiting: list[DistrictChunk] = []
        self._feedback = FeedbackApplier(self.pipeline)
        self._feedback_waiting: list[Feedback] = []
        """Feedback stamped after the watermark, by (event time, work order)."""
        self._work_orders: set[str] = set()
        self._unheard: dict[int, int] = {}
        """Per shard, the :meth:`release_idle` calls since it last sent a chunk."""
        self.pipeline.balance_log = []
        self._pressure: dict[int, tuple[float, int]] = {}
        """Inlet pressure (sum, count) per 15-minute interval index, until its row closes."""
        self._fast: list[DistrictChunk] = []
        """Fast-path readings waiting for a tick, feedback or slow readings (module doc)."""
        self._fast_seen: dict[int, bool | None] = {}
        """Event time of each fast-path reading not yet fed in order -> calm (whether it goes
        into the district balance; None: not scored yet)."""
        self._slow_seen: set[int] = set()
        """Event times of the fast path's slow readings not yet fed in order."""
        self._slow = 0
        """Inlet readings to be scored in order, not fed yet: the fast path waits for them."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore a snapshot, also one taken before feedback waited for its event time."""
        state.setdefault("_feedback_waiting", [])
        state.setdefault("_work_orders", set())
        state.setdefault("_pressure", {})
        state.setdefault("_unheard", {})
        state.setdefault("_fast", [])
        state.setdefault("_fast_seen", {})
        state.setdefault("_slow_seen", set())
        if "_slow" not in state:  # every inlet reading waiting came before the fast path
            state["_slow"] = sum(int((c.kind == DISTRICT_METER).sum()) for c in state["_waiting"])
        if state["pipeline"].balance_log is None:
            state["pipeline"].balance_log = []
        state["counts"] = dict.fromkeys(COUNTERS, 0) | state["counts"]
        self.__dict__.update(state)

    @classmethod
    def of(cls, layout: DetectionLayout, district: str,
           settings: PipelineSettings | None = None, scores: bool = False) -> DistrictState:
        """The state of ``district`` of a detection layout (``scores``: keep them)."""
        return cls(layout.layouts[district], layout.shards_of[district], settings, scores)

    def drain_scores(self) -> list[tuple[str, int, float]]:
        """``(device, ts_ms, score)`` of every reading scored since the last call."""
        log = self.pipeline.score_log
        if not log:
            return []
        ids = self.pipeline.layout.device_ids
        out = [(str(device), ts, score) for slots, stamps, values in log
               for device, ts, score in zip(ids[slots].tolist(), stamps.tolist(),
                                            values.tolist(), strict=True)]
        log.clear()
        return out

    def drain_balance(self) -> list[BalanceRow]:
        """The district water balance the leak detector saw, closed since the last call.

        One row per 15-minute interval (``mw_district``), stamped at the interval's start: the
        inlet's mean flow, the customers' flow (:class:`models.water.pipeline.DistrictAggregator`:
        missing meters imputed; None below its coverage), their difference, and the inlet's
        mean pressure.
        """
        log = self.pipeline.balance_log
        if not log:
            return []
        rows = []
        for _, ends, inlets, customers in log:
            for end, inlet, customer in zip(ends.tolist(), inlets.tolist(), customers.tolist(),
                                            strict=True):
                known = customer == customer  # not NaN
                total, n = self._pressure.pop(end // INTERVAL_MS - 1, (0.0, 0))
                rows.append(BalanceRow(end - INTERVAL_MS, inlet, customer if known else None,
                                       inlet - customer if known else None,
                                       total / n if n else None))
        log.clear()
        if rows:  # pressure of intervals that closed without a row (late inlet readings)
            oldest = rows[-1].start_ms // INTERVAL_MS
            for k in [k for k in self._pressure if k < oldest]:
                del self._pressure[k]
        return rows

    @property
    def waiting(self) -> int:
        """Readings waiting for the district's watermark."""
        return self.counts["waiting"]

    @property
    def held_back(self) -> bool:
        """Whether some shard is ahead of the district's watermark (a quiet one holds it)."""
        marks = self.shard_watermarks
        return bool(marks) and (self.watermark is None or max(marks.values()) > self.watermark)

    def take(self, chunks: Iterable[DistrictChunk]) -> list[Alert]:
        """Take shards' chunks; feed what the district's watermark passed; return the alerts."""
        marks = self.shard_watermarks
        fed_to = self.watermark
        behind = False  # readings at or before the watermark: fed now
        for chunk in chunks:
            self._unheard[chunk.shard] = 0
            if chunk.watermark is not None and chunk.watermark > marks.get(chunk.shard, -1):
                marks[chunk.shard] = chunk.watermark
            if chunk.fast:
                self._take_fast(chunk)
            elif len(chunk):
                self._waiting.append(chunk)
                self.counts["waiting"] += len(chunk)
                behind = behind or (fed_to is not None and int(chunk.ts.min()) <= fed_to)
                inlets = chunk.ts[chunk.kind == DISTRICT_METER].tolist()
                if inlets:
                    self._slow += sum(ts not in self._fast_seen and ts not in self._slow_seen
                                      for ts in inlets)
        alerts = self._score_fast()
        self.counts["alerts"] += len(alerts)
        target = fed_to
        if self.shards.issubset(marks):
            target = min(marks[s] for s in self.shards)
        if target is None or (fed_to is not None and target <= fed_to and not behind):
            return alerts  # nothing to feed: do not touch what waits
        return alerts + self._feed(target)

    def _take_fast(self, chunk: DistrictChunk) -> None:
        """Queue the fast path's inlet readings; note the slow ones and those behind."""
        seen = self._fast_seen
        for lane, ts in zip(chunk.kind.tolist(), chunk.ts.tolist(), strict=True):
            if lane == Lane.SLOW:
                self._slow_seen.add(ts)
                self._slow += 1
            elif lane == Lane.BEHIND:
                if ts not in self._slow_seen:  # (a slow reading stamped the same: scored)
                    seen.setdefault(ts, False)  # stale for the burst detector: never scored
            else:
                seen[ts] = None
        fast = chunk.kind == Lane.FAST
        if fast.any():
            self._fast.append(chunk.take(fast))

    def _score_fast(self, through: int | None = None) -> list[Alert]:
        """Score the fast path's waiting readings in the burst detector, in arrival order.

        Up to the first that must wait (module doc): for a tick not done yet (stamped after
        :attr:`next_tick`), for feedback waiting (stamped at or after it), or for slow
        readings. ``through``: score every reading stamped up to it, whatever waits (a
        safety net, never needed: a reading fed in order is never still queued).
        """
        if not self._fast:
            return []
        queue = DistrictChunk.concat(self._fast)
        if through is not None:
            end = int(np.searchsorted(queue.ts, through, side="right"))
        elif self.next_tick is None or self._slow > 0:
            end = 0
        else:
            end = int(np.searchsorted(queue.ts, self.next_tick, side="right"))
            if self._feedback_waiting:
                end = min(end, int(np.searchsorted(queue.ts, self._feedback_waiting[0].ts_ms,
                                                   side="left")))
        if not end:
            self._fast = [queue]
            return []
        now = queue.take(np.arange(end))
        rest = queue.take(np.arange(end, len(queue)))
        self._fast = [rest] if len(rest) else []
        alerts: list[Alert] = []
        for k in range(end):  # one by one, as they arrived: the alert policy takes each
            one = slice(k, k + 1)  # block at once (a new track is active from the next one)
            raised, calm = self.pipeline.inlet_bursts(
                now.slot[one], now.ts[one], {"flow_lpm": now.flow[one],
                                             "pressure_bar": now.pressure[one]})
            alerts += raised
            self._fast_seen[int(now.ts[k])] = bool(calm[0])
        self.counts["fast"] += end
        return alerts

    def feedback(self, feedback: Feedback) -> list[Alert]:
        """Take a crew's feedback; it acts at its event time (see the module doc).

        Returns the alerts it clears now: none while it waits for the district's watermark
        (a later :meth:`take` or :meth:`release_idle` applies it and returns them). A work
        order seen before changes nothing.
        """
        if feedback.work_order_id in self._work_orders:
            return []
        self._work_orders.add(feedback.work_order_id)
        watermark = self.watermark
        if watermark is not None and feedback.ts_ms > watermark + MAX_FEEDBACK_AHEAD_MS:
            feedback = self._restamped(feedback, watermark)
        elif watermark is None or feedback.ts_ms > watermark:
            self._wait(feedback)
            return []
        else:
            self.counts["feedback_behind"] += 1
        alerts = self._apply(feedback)
        self.counts["alerts"] += len(alerts)
        return alerts

    @property
    def feedback_waiting(self) -> list[Feedback]:
        """Feedback waiting for the district's watermark, in the order it will be applied."""
        return list(self._feedback_waiting)

    def _wait(self, feedback: Feedback) -> None:
        bisect.insort(self._feedback_waiting, feedback, key=lambda f: (f.ts_ms, f.work_order_id))
        self.counts["feedback_waiting"] = len(self._feedback_waiting)

    def _restamped(self, feedback: Feedback, ts_ms: int) -> Feedback:
        """Feedback stamped on another clock (module doc), as if stamped ``ts_ms``."""
        self.counts["feedback_ahead"] += 1
        return feedback.model_copy(update={"ts_ms": ts_ms})

    def _apply(self, feedback: Feedback) -> list[Alert]:
        """Apply feedback to the pipeline as it stands (:mod:`models.feedback`)."""
        applier = self._feedback
        unknown = applier.unknown_alerts
        # the policy's "cleared by feedback" message names no district: this is its district
        alerts = [a if a.district is not None else a.model_copy(update={"district": self.district})
                  for a in applier.apply(feedback)]
        self.counts["feedback"] = len(applier.labels)
        self.counts["feedback_unknown_alerts"] += applier.unknown_alerts - unknown
        return alerts

    @property
    def labels(self) -> list[Any]:
        """Every crew outcome applied (:class:`models.feedback.Label`)."""
        return self._feedback.labels

    def release_idle(self) -> list[Alert]:
        """Stop waiting for quiet shards (see the module doc); returns the alerts raised.

        A shard is quiet when it never reported, or sent nothing during the last
        :data:`QUIET_RELEASES` calls. The watermark moves up to the oldest watermark of the
        shards that are not quiet (or the newest of all, when every one is).
        """
        if not self.held_back:
            return []
        unheard = self._unheard
        for shard in unheard:
            unheard[shard] += 1
        marks = self.shard_watermarks
        active = [mark for shard, mark in marks.items()
                  if unheard.get(shard, QUIET_RELEASES) < QUIET_RELEASES]
        self.counts["idle_releases"] += 1
        return self._feed(min(active) if active else max(marks.values()))

    def _feed(self, to_ms: int | None) -> list[Alert]:
        if to_ms is None:
            return []
        if self.watermark is not None and to_ms < self.watermark:
            to_ms = self.watermark
        self.watermark = to_ms
        if self.next_tick is not None:
            skip = (to_ms - self.next_tick) // TICK_MS + 1 - MAX_CATCH_UP_TICKS
            if skip > 0:
                self.next_tick += skip * TICK_MS
                self.counts["ticks_skipped"] += skip
        if not self._waiting and not self._feedback_waiting:
            return self._ticks(to_ms)
        now = self._ready(to_ms)
        alerts: list[Alert] = []
        if self.next_tick is None and len(now):
            self.next_tick = -(-int(now.ts[0]) // TICK_MS) * TICK_MS  # the boundary >= it
            alerts += self._score_fast()
        if self.next_tick is not None:
            self.counts["behind"] += int(np.searchsorted(now.ts, self.next_tick - TICK_MS,
                                                         side="right"))
        feedback = self._feedback_waiting
        while feedback and feedback[-1].ts_ms > to_ms + MAX_FEEDBACK_AHEAD_MS:  # came first
            self._wait(self._restamped(feedback.pop(), to_ms))
        start = 0
        while True:  # ticks and feedback up to to_ms, in event time, readings in between
            tick = self.next_tick
            if tick is not None and tick > to_ms:
                tick = None
            due = feedback[0] if feedback and feedback[0].ts_ms <= to_ms else None
            if due is not None and (tick is None or due.ts_ms <= tick):
                # after the readings stamped before it, before those at or after it
                end = int(np.searchsorted(now.ts, due.ts_ms, side="left"))
                alerts += self._readings(now.take(np.arange(start, end)))
                alerts += self._score_fast()  # what waited for slow readings among those
                start = end
                alerts += self._apply(feedback.pop(0))
            elif tick is not None:
                end = int(np.searchsorted(now.ts, tick, side="right"))
                alerts += self._readings(now.take(np.arange(start, end)))
                alerts += self._score_fast()
                start = end
                alerts += self._tick()
            else:
                break
            alerts += self._score_fast()  # what waited for that tick or feedback
        self.counts["feedback_waiting"] = len(feedback)
        alerts += self._readings(now.take(np.arange(start, len(now))))
        alerts += self._score_fast()  # what waited for slow readings
        self.counts["alerts"] += len(alerts)
        return alerts

    def _ready(self, to_ms: int) -> DistrictChunk:
        """The waiting readings stamped up to ``to_ms``, in event-time order (the rest wait)."""
        if not self._waiting:
            return _chunk(self.district, -1, to_ms, [])
        waiting = DistrictChunk.concat(self._waiting)
        ready = waiting.ts <= to_ms
        rest = waiting.take(~ready)
        self._waiting = [rest] if len(rest) else []
        self.counts["waiting"] = len(rest)
        now = waiting.take(ready)
        return now.take(np.argsort(now.ts, kind="stable"))

    def _ticks(self, to_ms: int) -> list[Alert]:
        alerts: list[Alert] = []
        while self.next_tick is not None and self.next_tick <= to_ms:
            alerts += self._tick()
            alerts += self._score_fast()
        self.counts["alerts"] += len(alerts)
        return alerts

    def _tick(self) -> list[Alert]:
        assert self.next_tick is not None
        alerts = self.pipeline.tick(self.next_tick)
        self.next_tick += TICK_MS
        self.counts["ticks"] += 1
        return alerts

    def _readings(self, chunk: DistrictChunk) -> list[Alert]:
        if not len(chunk):
            return []
        self.counts["fed"] += len(chunk)
        alerts: list[Alert] = []
        pipeline = self.pipeline
        customers = chunk.kind == CUSTOMER
        if customers.any():
            alerts += pipeline.customer_readings(
                chunk.slot[customers], chunk.ts[customers],
                {"flow_lpm": chunk.flow[customers], "battery_v": chunk.battery[customers]})
        inlets = chunk.kind == DISTRICT_METER
        if inlets.any():
            alerts += self._inlets(chunk.take(inlets))
        others = ~(customers | inlets)
        if others.any():
            pipeline.other_readings(chunk.slot[others], chunk.ts[others])
        return alerts

    def _inlets(self, chunk: DistrictChunk) -> list[Alert]:
        """Inlet readings fed in order: the burst detector scores those not scored before.

        The fast path scored its own already (their calm flag waits in ``_fast_seen``); the
        calm ones go into the district balance.
        """
        ts = chunk.ts
        self._add_pressure(ts, chunk.pressure)
        alerts: list[Alert] = []
        if self._fast and int(self._fast[0].ts[0]) <= int(ts.max()):
            alerts += self._score_fast(through=int(ts.max()))
        calm = np.zeros(len(ts), bool)
        slow = np.ones(len(ts), bool)
        seen, slow_seen = self._fast_seen, self._slow_seen
        if seen or slow_seen:
            for i, stamp in enumerate(ts.tolist()):
                if stamp in slow_seen:
                    slow_seen.discard(stamp)
                    continue
                flag = seen.pop(stamp, None)
                if flag is not None:
                    slow[i] = False
                    calm[i] = flag
        if slow.any():
            self._slow = max(0, self._slow - int(slow.sum()))
            scored, calm[slow] = self.pipeline.inlet_bursts(
                chunk.slot[slow], ts[slow],
                {"flow_lpm": chunk.flow[slow], "pressure_bar": chunk.pressure[slow]})
            alerts += scored
        self.pipeline.inlet_balance(chunk.slot, ts, chunk.flow, calm)
        return alerts

    def _add_pressure(self, ts: np.ndarray, pressure: np.ndarray) -> None:
        for stamp, value in zip(ts.tolist(), pressure.tolist(), strict=True):
            if value == value:  # not NaN
                k = (stamp - 1) // INTERVAL_MS
                total, n = self._pressure.get(k, (0.0, 0))
                self._pressure[k] = (total + value, n + 1)
