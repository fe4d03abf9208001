"""Per-device stream logic of the dataflow: de-duplication, event-time order, late path, gaps.

Pure computation, no I/O: the flow keeps one :class:`ShardState` per shard (a fixed set of
devices, see :func:`shard_of`) and feeds it the readings of each mesh message. State is per
device; a shard only groups devices so that one operator call handles many readings.

**De-duplication.** Per device, a bitmap of the last ``dedup_window`` seqs seen. A seq seen
before is dropped (counted in ``duplicates``). A seq more than ``dedup_window`` below the
highest seen cannot be checked: it is kept, takes the late path and is counted in
``unverified``.

**Order.** The shard's watermark ``W`` trails the newest event time seen in the shard by
``allowed_lateness_ms`` and never goes back; it advances at the end of each
:meth:`ShardState.process` call (the flow makes one per mesh message, so results do not
depend on how bytewax batches messages). Readings wait in a heap until ``W`` passes them and
are then released in event-time order, so every device's released readings have strictly
increasing ``ts_ms``. When the input goes quiet, :meth:`ShardState.flush` moves ``W`` up to
the newest event time (the flow does that after ``idle_flush_s`` without input). A device
clock far in the future drags ``W`` of its whole shard ahead: its neighbours' readings then
take the late path (stored, flagged); the bridge flags such readings, this module does not
filter them.

**Late path.** A reading that arrives when its device has already released a reading at the
same or a later event time cannot be put in order any more: it is emitted at once as a
:attr:`Kind.LATE` point, stored like any other (TSDB and lake), counted in ``late``, and not
given to the detectors nor to gap filling. No alert is re-evaluated for late readings.

**Fast path.** :meth:`ShardState.process` takes the ids of *fast* devices (the flow passes
each district's only district meter: :attr:`dataflows.detection.DetectionLayout.fast_devices`).
A fast device's reading that arrives in order for its device (stamped after every reading of
it taken so far, not a duplicate) goes out at once in :attr:`Released.fast` as
:attr:`Lane.FAST`, and waits for the watermark like any other reading too. One that arrives
out of order (stamped before a reading taken already, but not late) goes out as
:attr:`Lane.BEHIND`: the detector that scores the fast path has seen a newer reading, so it
is stale there, as it is in ``meshwatch evaluate``'s delivery order. Late readings take the
late path only. While a device has in-order readings waiting that were not sent on the fast
path (a snapshot of the previous version restored, or the device just made fast), its new
in-order readings go out as :attr:`Lane.SLOW` instead, until those are released: the district
then scores them in order (:mod:`dataflows.detection`).

**Gaps.** Each device's cadence comes from the registry (``cadence_s``) or, for devices not
in it, is learned as the smallest of the last 8 positive intervals between its readings.
Between two consecutive released readings ``intervals = round(delta / cadence)``:

- ``2 <= intervals <= gap_fill_max_intervals``: the ``intervals - 1`` missing readings are
  filled by linear interpolation of the metrics both ends carry, as :attr:`Kind.IMPUTED`
  points with the ``imputed`` quality flag and no seq. They are never counted as measured.
- more: nothing is fabricated. A :class:`DeviceSilent` record is emitted when the watermark
  passes ``last + (gap_fill_max_intervals + 0.5) * cadence`` with no reading (onset), and
  another with ``resumed_ms`` set when the device reports again (also when its next reading
  closes the gap only partly, say an edge agent draining its backlog behind the watermark:
  every onset is followed by a resumption once the device reports).

>>> from meshwatch.contract import Reading
>>> state = ShardState(OrderSettings(allowed_lateness_ms=0, gap_fill_max_intervals=4))
>>> T0, MIN = 1_767_225_600_000, 60_000
>>> def r(seq, minute, flow):
...     return Reading(device_id="m1", ts_ms=T0 + minute * MIN, seq=seq,
...                    metrics={"flow_lpm": flow})
>>> out = state.process([r(0, 0, 1.0), r(1, 1, 2.0), r(1, 1, 2.0), r(2, 4, 5.0)],
...                     cadences={"m1": 60})
>>> for p in out.points:
...     print(p.kind.name, (p.ts_ms - T0) // MIN, p.metrics["flow_lpm"])
MEASURED 0 1.0
MEASURED 1 2.0
IMPUTED 2 3.0
IMPUTED 3 4.0
MEASURED 4 5.0
>>> state.counts["duplicates"], state.counts["imputed"]
(1, 2)
>>> out = state.process([r(3, 3, 9.0)], cadences={"m1": 60})  # before minute 4: late
>>> [(p.kind.name, p.seq) for p in out.points]
[('LATE', 3)]
>>> out = state.process([r(5, 5, 1.0)], cadences={"m1": 60}, fast={"m1"})  # sent at once too
>>> [(lane.name, p.seq) for lane, p in out.fast], [p.seq for p in out.points]
([('FAST', 5)], [5])
"""

from __future__ import annotations

import heapq
import zlib
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, NamedTuple

from meshwatch.contract.events import QualityFlag

__all__ = [
    "COUNTERS",
    "DeviceSilent",
    "Kind",
    "Lane",
    "OrderSettings",
    "Point",
    "Released",
    "ShardState",
    "shard_of",
]

COUNTERS = ("received", "duplicates", "measured", "late", "unverified", "imputed", "gaps_filled",
            "silent_onsets", "long_gaps")
"""The cumulative counters of a shard (:attr:`ShardState.counts`)."""

_LEARN_DELTAS = 8
IMPUTED_FLAGS = (QualityFlag.IMPUTED.value,)


def shard_of(device_id: str, partitions: int, shards_per_partition: int) -> int:
    """The shard of a device: ``crc32 % (partitions * shards_per_partition)``.

    A shard lies in one mesh partition (``shard % partitions`` is the device's partition, see
    :func:`meshwatch.contract.topics.partition_of`), so its input comes in one broker order.

    >>> from meshwatch.contract.topics import partition_of
    >>> shard_of("mtr-000001", 8, 4) % 8 == partition_of("mtr-000001", 8)
    True
    """
    return zlib.crc32(device_id.encode()) % (partitions * shards_per_partition)


class Kind(IntEnum):
    """What a released point is."""

    MEASURED = 0
    IMPUTED = 1
    LATE = 2


class Lane(IntEnum):
    """What a fast device's reading is on the fast path (see the module doc)."""

    FAST = 0
    """In order: score it now."""
    SLOW = 1
    """In order, but the device has readings waiting that were not sent on the fast path: the
    district scores it in order (and waits for it before scoring newer fast readings)."""
    BEHIND = 2
    """Out of order (stamped before a reading already sent): it is stale for the fast path's
    detector, never scored there."""


@dataclass(frozen=True, slots=True)
class OrderSettings:
    """Knobs of :class:`ShardState` (see the module doc)."""

    allowed_lateness_ms: int = 60_000
    gap_fill_max_intervals: int = 4
    dedup_window: int = 1024

    def __post_init__(self) -> None:
        if self.allowed_lateness_ms < 0:
            msg = f"allowed_lateness_ms must not be negative, got {self.allowed_lateness_ms}"
            raise ValueError(msg)
        if self.gap_fill_max_intervals < 1:
            msg = f"gap_fill_max_intervals must be at least 1, got {self.gap_fill_max_intervals}"
            raise ValueError(msg)
        if self.dedup_window < 1:
            msg = f"dedup_window must be at least 1, got {self.dedup_window}"
            raise ValueError(msg)


class Point(NamedTuple):
    """A reading on its way to the sinks; ``seq`` is -1 for an imputed point."""

    device_id: str
    ts_ms: int
    seq: int
    metrics: Mapping[str, float]
    kind: Kind
    quality: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DeviceSilent:
    """A device missed more readings than gap filling covers (an input of the silence detector).

    ``ts_ms`` is the event time of the observation (the watermark at onset, the first new
    reading on resumption), ``last_seen_ms`` the event time of the device's last reading before
    the silence, ``missed`` the readings missed by ``ts_ms``; ``resumed_ms`` is None at onset.
    """

    device_id: str
    ts_ms: int
    last_seen_ms: int
    cadence_s: float
    missed: int
    resumed_ms: int | None = None


@dataclass(slots=True)
class Released:
    """What one call released: points (in order per device) and silence records.

    ``fast`` holds the fast devices' readings that arrived, at once, each with its
    :class:`Lane` (see the module doc); those not late are in ``points`` too once the
    watermark passes them.
    """

    points: list[Point] = field(default_factory=list)
    silences: list[DeviceSilent] = field(default_factory=list)
    fast: list[tuple[Lane, Point]] = field(default_factory=list)


@dataclass(slots=True)
class _Device:
    max_seq: int = -1
    seen: int = 0  # bit i set: seq max_seq - i was seen
    last_ts: int | None = None  # last released (in-order) reading
    last_metrics: Mapping[str, float] | None = None
    deltas: list[int] = field(default_factory=list)
    learned_ms: float | None = None  # min(deltas)
    silent_since: int | None = None  # last_ts when a silence onset was reported
    watched: bool = False  # has an entry in the silence heap
    newest: int | None = None  # newest event time taken (waiting or released)
    slow_until: int | None = None  # newest in-order reading not sent on the fast path


class ShardState:
    """The de-duplication, ordering and gap state of the devices of one shard.

    Picklable; the flow snapshots it every epoch. ``counts`` holds :data:`COUNTERS`.
    """

    def __init__(self, settings: OrderSettings) -> None:
        self.settings = settings
        self.devices: dict[str, _Device] = {}
        self.max_ts: int | None = None
        self.watermark: int | None = None
        self.counts: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._pending: list[tuple[int, int, str, int, Mapping[str, float],
                                  tuple[str, ...]]] = []
        # (deadline, device): at most one per device, checked again when the watermark passes
        self._silence: list[tuple[int, str]] = []
        self._tick = 0

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore a snapshot, also one taken before the fast path (its readings: slow)."""
        self.__dict__.update(state)
        newest: dict[str, int] = {}
        for ts, _, device_id, *_ in self._pending:
            newest[device_id] = max(ts, newest.get(device_id, ts))
        for device_id, device in self.devices.items():
            if not hasattr(device, "newest"):
                stamps = [t for t in (device.last_ts, newest.get(device_id)) if t is not None]
                device.newest = device.slow_until = max(stamps) if stamps else None

    def __len__(self) -> int:
        """Readings waiting for the watermark."""
        return len(self._pending)

    def process(self, readings: Iterable[Any], cadences: Mapping[str, float],
                fast: Container[str] = ()) -> Released:
        """Take readings (anything with the :class:`~meshwatch.contract.Reading` attributes).

        ``cadences`` maps device ids to registered cadences in seconds; others are learned.
        The in-order readings of the ``fast`` devices also go out at once (module doc).
        """
        out = Released()
        window = self.settings.dedup_window
        counts = self.counts
        devices = self.devices
        max_ts = self.max_ts
        for reading in readings:
            counts["received"] += 1
            device_id = reading.device_id
            device = devices.get(device_id)
            if device is None:
                device = devices[device_id] = _Device()
            seq = reading.seq
            unverified = False
            if seq > device.max_seq:
                shift = seq - device.max_seq
                device.seen = 1 if shift >= window else ((device.seen << shift) | 1) & (
                    (1 << window) - 1)
                device.max_seq = seq
            else:
                back = device.max_seq - seq
                if back >= window:
                    unverified = True
                    counts["unverified"] += 1
                elif device.seen >> back & 1:
                    counts["duplicates"] += 1
                    continue
                else:
                    device.seen |= 1 << back
            ts = reading.ts_ms
            quality = reading.quality  # QualityFlag members are str
            if unverified or (device.last_ts is not None and ts <= device.last_ts):
                self._late(out, device_id, ts, seq, reading.metrics, quality)
                continue
            if max_ts is None or ts > max_ts:
                max_ts = ts
            if device.newest is None or ts > device.newest:  # in order for its device
                device.newest = ts
                if device_id in fast:
                    slow = device.slow_until
                    lane = Lane.FAST if slow is None or (
                        device.last_ts is not None and slow <= device.last_ts) else Lane.SLOW
                    out.fast.append((lane, Point(device_id, ts, seq, reading.metrics,
                                                 Kind.MEASURED, quality)))
                else:
                    device.slow_until = ts
            elif device_id in fast and ts < device.newest:
                out.fast.append((Lane.BEHIND, Point(device_id, ts, seq, reading.metrics,
                                                    Kind.MEASURED, quality)))
            self._tick += 1
            heapq.heappush(self._pending,
                           (ts, self._tick, device_id, seq, reading.metrics, quality))
        self.max_ts = max_ts
        if max_ts is not None:
            self._advance(out, max_ts - self.settings.allowed_lateness_ms, cadences)
        return out

    def flush(self, cadences: Mapping[str, float]) -> Released:
        """Move the watermark up to the newest event time: release everything waiting."""
        out = Released()
        if self.max_ts is not None:
            self._advance(out, self.max_ts, cadences)
        return out

    # -- internals --------------------------------------------------------------------------

    def _late(self, out: Released, device_id: str, ts: int, seq: int,
              metrics: Mapping[str, float], quality: tuple[str, ...]) -> None:
        self.counts["late"] += 1
        flags = quality if QualityFlag.LATE.value in quality else (*quality,
                                                                   QualityFlag.LATE.value)
        out.points.append(Point(device_id, ts, seq, metrics, Kind.LATE, flags))

    def _advance(self, out: Released, to_ms: int, cadences: Mapping[str, float]) -> None:
        if self.watermark is not None and to_ms <= self.watermark:
            to_ms = self.watermark
        self.watermark = to_ms
        pending = self._pending
        while pending and pending[0][0] <= to_ms:
            ts, _, device_id, seq, metrics, quality = heapq.heappop(pending)
            self._release(out, device_id, ts, seq, metrics, quality, cadences)
        self._check_silence(out, to_ms, cadences)

    def _cadence_ms(self, device_id: str, device: _Device,
                    cadences: Mapping[str, float]) -> float | None:
        registered = cadences.get(device_id)
        if registered:
            return registered * 1000.0
        return device.learned_ms

    def _release(self, out: Released, device_id: str, ts: int, seq: int,
                 metrics: Mapping[str, float], quality: tuple[str, ...],
                 cadences: Mapping[str, float]) -> None:
        device = self.devices[device_id]
        last = device.last_ts
        if last is not None and ts <= last:  # same event time as a released reading
            self._late(out, device_id, ts, seq, metrics, quality)
            return
        registered = cadences.get(device_id)
        cadence = registered * 1000.0 if registered else device.learned_ms
        if last is not None:
            delta = ts - last
            resumed = False
            if cadence:
                intervals = round(delta / cadence)
                if intervals > self.settings.gap_fill_max_intervals:
                    self.counts["long_gaps"] += 1
                    resumed = True
                    out.silences.append(DeviceSilent(
                        device_id, ts, last, cadence / 1000.0, intervals - 1,
                        resumed_ms=ts))
                elif intervals >= 2:
                    self._fill(out, device_id, device, last, ts, intervals, metrics)
            if device.silent_since is not None and not resumed:
                # an onset went out, then the device's backlog came in behind the watermark:
                # close the silence all the same
                missed = max(0, round(delta / cadence) - 1) if cadence else 0
                out.silences.append(DeviceSilent(device_id, ts, last,
                                                 (cadence or 0.0) / 1000.0, missed,
                                                 resumed_ms=ts))
            deltas = device.deltas
            deltas.append(delta)
            if len(deltas) > _LEARN_DELTAS:
                del deltas[0]
            device.learned_ms = float(min(deltas))
            if cadence is None:
                cadence = device.learned_ms
        device.last_ts = ts
        device.last_metrics = metrics
        device.silent_since = None
        self.counts["measured"] += 1
        out.points.append(Point(device_id, ts, seq, metrics, Kind.MEASURED, quality))
        if cadence and not device.watched:
            device.watched = True
            heapq.heappush(self._silence, (self._deadline(ts, cadence), device_id))

    def _deadline(self, last: int, cadence: float) -> int:
        """When a device that last reported at ``last`` counts as silent."""
        return last + int((self.settings.gap_fill_max_intervals + 0.5) * cadence)

    def _fill(self, out: Released, device_id: str, device: _Device, last: int, ts: int,
              intervals: int, metrics: Mapping[str, float]) -> None:
        before = device.last_metrics or {}
        names = [name for name in metrics if name in before]
        if not names:
            return
        self.counts["gaps_filled"] += 1
        for k in range(1, intervals):
            frac = k / intervals
            at = last + round((ts - last) * frac)
            values = {name: before[name] + (metrics[name] - before[name]) * frac
                      for name in names}
            self.counts["imputed"] += 1
            out.points.append(Point(device_id, at, -1, values, Kind.IMPUTED, IMPUTED_FLAGS))

    def _check_silence(self, out: Released, watermark: int,
                       cadences: Mapping[str, float]) -> None:
        heap = self._silence
        while heap and heap[0][0] < watermark:
            _, device_id = heapq.heappop(heap)
            device = self.devices[device_id]
            device.watched = False
            last = device.last_ts
            cadence = self._cadence_ms(device_id, device, cadences)
            if last is None or not cadence:
                continue
            deadline = self._deadline(last, cadence)
            if deadline >= watermark:  # it reported since: watch its newest reading
                device.watched = True
                heapq.heappush(heap, (deadline, device_id))
            elif device.silent_since != last:
                device.silent_since = last
                self.counts["silent_onsets"] += 1
                out.silences.append(DeviceSilent(device_id, watermark, last, cadence / 1000.0,
                                                 int((watermark - last) // cadence)))
