"""Per-device feature windows, computed incrementally and vectorised across devices.

Every device gets a *slot* (an index into struct-of-arrays state). For each slot the open
window keeps a fixed set of running statistics (count, means, co-moments, minima and maxima:
:data:`_FIELDS`, 19 numbers), so memory is O(1) per device per window whatever the cadence.
:meth:`FeatureWindows.add` takes a batch of readings as numpy columns and does no Python
work per reading: it sorts the batch by device, reduces each (device, window) group with
``np.add.reduceat`` and friends, and merges the groups into the open windows with Chan's
parallel update of means and co-moments (numerically stable, unlike raw sums of squares).

Windows are tumbling in event time, aligned to multiples of :attr:`WindowSpec.length_ms`
since the Unix epoch (UTC); the length divides a day, so windows also align with midnight.
A window ``[start, end)`` closes when a reading of the same device arrives at or after
``end``, or when :meth:`FeatureWindows.flush` is called with ``until_ms >= end`` (silent
devices, end of a run). Windows that close in one call come back together as one
:class:`ClosedWindows` (a float32 matrix plus device ids and bounds), ready for one batched
inference call.

Conventions:

- **Late readings.** A reading older than its device's open window (or in a window already
  closed by :meth:`~FeatureWindows.flush`) is not added anywhere; it is counted in
  :attr:`FeatureWindows.late_readings`. Inside one batch, a reading counts as late when an
  earlier reading of the same device in that batch already opened a newer window, so the
  result never depends on how readings are split into batches.
- **Duplicates.** A reading delivered twice is added twice: de-duplicate by
  ``(device_id, seq)`` before calling :meth:`~FeatureWindows.add`.
- **Invalid values.** A reading with a non-finite flow is skipped and counted in
  :attr:`FeatureWindows.invalid_readings`; a non-finite pressure counts as "no pressure"
  for that reading only.
- **Missing quantities.** All device kinds share one feature vector. A statistic with no
  data is 0 and a flag says whether it is real: ``pressure_*`` are 0 unless
  ``has_pressure`` is 1 (customer meters measure no pressure), ``night_min_flow`` is 0
  unless ``has_night`` is 1 (the window holds no reading in the night span). Slopes are 0
  when fewer than two distinct times were seen. No feature is ever NaN.
- **Units.** Flow in L/min, pressure in bar, slopes per hour (least squares over the
  readings' event times), ``zero_flow_ratio`` in [0, 1]. Standard deviations are
  population (``ddof=0``) values.
- **Night.** A reading is in the night span when its UTC time of day (its ``ts_ms``; meters
  stamp the end of their interval) lies in ``[night_start_min, night_end_min)``; a span
  may wrap midnight (e.g. 23:00–04:00).

>>> import numpy as np
>>> windows = FeatureWindows(WindowSpec(length_ms=3_600_000))
>>> slots = windows.slots(["mtr-1", "mtr-2"])
>>> hour = 1_767_571_200_000 + 3_600_000  # 2026-01-05T01:00Z
>>> ts = hour + np.array([0, 900_000, 1_800_000, 2_700_000])
>>> closed = windows.add(np.repeat(slots, 4), np.tile(ts, 2),
...                      flow=np.array([0.0, 0.0, 1.5, 0.0, 0.2, 0.3, 0.2, 0.4]))
>>> len(closed)  # both windows are still open
0
>>> closed = windows.add(slots[:1], np.array([hour + 3_600_000]), flow=np.array([0.0]))
>>> list(closed.device_ids), closed.start_ms.tolist() == [hour]
(['mtr-1'], True)
>>> row = dict(zip(FEATURE_NAMES, closed.features[0].tolist()))
>>> row["flow_max"], row["zero_flow_ratio"], row["reading_count"], row["has_pressure"]
(1.5, 0.75, 4.0, 0.0)
>>> closed = windows.flush(until_ms=hour + 3_600_000)  # mtr-2 fell silent
>>> list(closed.device_ids), round(float(closed.features[0, 10]), 3)  # night_min_flow
(['mtr-2'], 0.2)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

MS_PER_DAY = 86_400_000
MS_PER_HOUR = 3_600_000
MINUTES_PER_DAY = 1440

FEATURE_NAMES: tuple[str, ...] = (
    "flow_mean", "flow_min", "flow_max", "flow_std", "flow_slope",
    "pressure_mean", "pressure_min", "pressure_max", "pressure_std", "pressure_slope",
    "night_min_flow", "zero_flow_ratio", "reading_count", "has_pressure", "has_night",
)
"""The feature vector, in the order of :attr:`ClosedWindows.features` columns."""

PRESSURE_METRICS: tuple[str, ...] = ("pressure_bar", "outlet_pressure_bar")
"""Metric names used as a device's pressure, first match wins (see :func:`pressure_of`)."""

# Running statistics of one window; one float64 column each in the state matrix.
# Flow and pressure are (t, x) series: count, means, sums of squared deviations of t and x,
# and their co-moment, so that the std is sqrt(x_m2 / n) and the slope is tx_c / t_m2.
_SERIES = ("n", "t_mean", "x_mean", "t_m2", "x_m2", "tx_c", "min", "max")
_FIELDS = (*(f"f_{name}" for name in _SERIES), *(f"p_{name}" for name in _SERIES),
           "zero_n", "night_n", "night_min")
_COLUMN = {name: i for i, name in enumerate(_FIELDS)}
_NO_WINDOW = np.iinfo(np.int64).min


@dataclass(frozen=True)
class WindowSpec:
    """How readings are cut into windows; stored in the model manifest.

    ``length_ms`` must divide a day and be at least a minute. The night span is given in
    minutes after UTC midnight, ``[night_start_min, night_end_min)``; it may wrap midnight.

    >>> spec = WindowSpec(length_ms=3_600_000, night_start_min=60, night_end_min=240)
    >>> WindowSpec.from_dict(spec.to_dict()) == spec
    True
    >>> WindowSpec(length_ms=7 * 60_000)
    Traceback (most recent call last):
    ...
    ValueError: length_ms is 420000; expected a divisor of a day (86400000) of at least 60000
    """

    length_ms: int = MS_PER_HOUR
    night_start_min: int = 60
    night_end_min: int = 240

    def __post_init__(self) -> None:
        length = self.length_ms
        if isinstance(length, bool) or not isinstance(length, int) or length < 60_000 \
                or MS_PER_DAY % length:
            msg = (f"length_ms is {length!r}; expected a divisor of a day ({MS_PER_DAY}) "
                   "of at least 60000")
            raise ValueError(msg)
        for name in ("night_start_min", "night_end_min"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) \
                    or not 0 <= value < MINUTES_PER_DAY:
                msg = f"{name} is {value!r}; expected whole minutes after midnight, 0..1439"
                raise ValueError(msg)
        if self.night_start_min == self.night_end_min:
            msg = "night_start_min equals night_end_min; give a night span of at least a minute"
            raise ValueError(msg)

    def to_dict(self) -> dict[str, int]:
        """The spec as JSON-ready fields (the manifest's ``window_spec``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WindowSpec:
        """Read a spec written by :meth:`to_dict`; unknown keys are errors."""
        unknown = set(data) - {"length_ms", "night_start_min", "night_end_min"}
        if unknown:
            msg = f"window spec has unknown keys {sorted(unknown)}"
            raise ValueError(msg)
        return cls(**data)

    def in_night(self, ts_ms: np.ndarray) -> np.ndarray:
        """Whether each event time lies in the night span (boolean array)."""
        minute = (ts_ms % MS_PER_DAY) // 60_000
        start, end = self.night_start_min, self.night_end_min
        if start < end:
            return (minute >= start) & (minute < end)
        return (minute >= start) | (minute < end)


@dataclass(frozen=True, eq=False)
class ClosedWindows:
    """Windows that closed together: one row of :data:`FEATURE_NAMES` per window.

    ``features`` is a C-contiguous float32 matrix ``(len(self), len(FEATURE_NAMES))``;
    the other fields are aligned with its rows. Rows are ordered by slot, then start.
    """

    device_ids: np.ndarray  # object array of str
    slots: np.ndarray  # int64
    start_ms: np.ndarray  # int64, window start (inclusive)
    end_ms: np.ndarray  # int64, window end (exclusive)
    features: np.ndarray  # float32 (rows, features)

    def __len__(self) -> int:
        return len(self.slots)

    @staticmethod
    def concat(parts: Sequence[ClosedWindows]) -> ClosedWindows:
        """All rows of ``parts``, in order."""
        if not parts:
            return _empty_closed()
        return ClosedWindows(np.concatenate([p.device_ids for p in parts]),
                             np.concatenate([p.slots for p in parts]),
                             np.concatenate([p.start_ms for p in parts]),
                             np.concatenate([p.end_ms for p in parts]),
                             np.concatenate([p.features for p in parts]))


class FeatureWindows:
    """Open feature windows of many devices, updated batch by batch (see module docs).

    Not thread-safe: one gateway's input loop owns it.

    >>> windows = FeatureWindows(WindowSpec(length_ms=900_000))
    >>> slots = windows.slots(["dma-01-inlet", "dma-01-inlet"])  # one device, one slot
    >>> t = 1_767_571_200_000 + 60_000 * np.arange(2)
    >>> _ = windows.add(slots, t, flow=np.array([10.0, 12.0]), pressure=np.array([5.0, 4.0]))
    >>> closed = windows.flush()
    >>> features = dict(zip(FEATURE_NAMES, closed.features[0].tolist()))
    >>> features["flow_slope"], features["pressure_slope"], features["has_pressure"]
    (120.0, -60.0, 1.0)
    """

    def __init__(self, spec: WindowSpec | None = None, capacity: int = 1024) -> None:
        self.spec = spec if spec is not None else WindowSpec()
        self.late_readings = 0
        """Readings not added because their window was already closed."""
        self.invalid_readings = 0
        """Readings not added because their flow was not a finite number."""
        self._index: dict[str, int] = {}
        self._ids: list[str] = []
        self._id_array = np.empty(0, object)
        capacity = max(1, capacity)
        self._state = np.zeros((capacity, len(_FIELDS)))
        self._open = np.full(capacity, _NO_WINDOW, np.int64)  # open window number
        self._floor = np.full(capacity, _NO_WINDOW, np.int64)  # oldest window accepted

    @property
    def device_count(self) -> int:
        """How many devices have a slot."""
        return len(self._ids)

    def slots(self, device_ids: Iterable[str]) -> np.ndarray:
        """The slot of each device id (int64 array), giving new ids the next free slots.

        Map ids once per batch (or once per id table) and pass slots to :meth:`add`.
        """
        index = self._index
        slots = []
        for device in device_ids:
            slot = index.get(device)
            if slot is None:
                slot = index[device] = len(self._ids)
                self._ids.append(device)
            slots.append(slot)
        self._grow(len(self._ids))
        return np.array(slots, np.int64)

    def add(
        self, slots: np.ndarray, ts_ms: np.ndarray, flow: np.ndarray,
        pressure: np.ndarray | None = None,
    ) -> ClosedWindows:
        """Add readings (columns of equal length, in arrival order); return closed windows.

        ``slots`` come from :meth:`slots`; ``ts_ms`` are event times (UTC epoch ms);
        ``pressure`` is ``None`` for devices without pressure, or may hold NaN per reading.
        """
        slots = np.asarray(slots, np.int64)
        ts_ms = np.asarray(ts_ms, np.int64)
        flow = np.asarray(flow, np.float64)
        pressure = (np.full(len(slots), np.nan) if pressure is None
                    else np.asarray(pressure, np.float64))
        if not len(slots) == len(ts_ms) == len(flow) == len(pressure):
            msg = (f"columns differ in length: slots {len(slots)}, ts_ms {len(ts_ms)}, "
                   f"flow {len(flow)}, pressure {len(pressure)}")
            raise ValueError(msg)
        if len(slots) and (slots.min() < 0 or slots.max() >= len(self._ids)):
            msg = "slots must come from FeatureWindows.slots(); got an unknown slot"
            raise ValueError(msg)
        valid = np.isfinite(flow)
        self.invalid_readings += int(len(flow) - valid.sum())
        if not valid.all():
            slots, ts_ms, flow, pressure = slots[valid], ts_ms[valid], flow[valid], \
                pressure[valid]
        if not len(slots):
            return _empty_closed()

        # Sort by slot, keeping arrival order within a slot, and drop late readings: those
        # before the slot's floor, or behind a newer window seen earlier in this batch.
        order = np.argsort(slots, kind="stable")
        slots, ts_ms, flow, pressure = slots[order], ts_ms[order], flow[order], pressure[order]
        window = ts_ms // self.spec.length_ms
        span = int(window.max() - window.min())
        if span >= 1 << 32:
            msg = f"event times of one batch span {span} windows; check ts_ms (UTC epoch ms)"
            raise ValueError(msg)
        key = (slots << 32) + (window - window.min())
        on_time = (key == np.maximum.accumulate(key)) & (window >= self._floor[slots])
        self.late_readings += int(len(key) - on_time.sum())
        if not on_time.all():
            slots, ts_ms, flow, pressure, window, key = (
                slots[on_time], ts_ms[on_time], flow[on_time], pressure[on_time],
                window[on_time], key[on_time])
        if not len(slots):
            return _empty_closed()

        # Now sorted by (slot, window): reduce each group to one row of statistics.
        starts = np.flatnonzero(np.diff(key, prepend=key[0] - 1))
        group_slot, group_window = slots[starts], window[starts]
        groups = self._reduce(starts, ts_ms, window, flow, pressure)

        # Merge each slot's first group into its open window when they are the same window.
        first = np.flatnonzero(np.diff(group_slot, prepend=-1))
        same = group_window[first] == self._open[group_slot[first]]
        merge_groups, merge_slots = first[same], group_slot[first[same]]
        groups[merge_groups] = _merge(self._state[merge_slots], groups[merge_groups])
        # Open windows overtaken by a newer one close now.
        overtaken = group_slot[first[~same]]
        overtaken = overtaken[self._open[overtaken] != _NO_WINDOW]

        last = np.append(first[1:] - 1, len(group_slot) - 1)
        closing = np.ones(len(group_slot), bool)
        closing[last] = False
        closed = self._closed_rows(
            np.concatenate([overtaken, group_slot[closing]]),
            np.concatenate([self._open[overtaken], group_window[closing]]),
            np.concatenate([self._state[overtaken], groups[closing]]))
        new_slots = group_slot[last]
        self._state[new_slots] = groups[last]
        self._open[new_slots] = self._floor[new_slots] = group_window[last]
        return closed

    def flush(self, until_ms: int | None = None) -> ClosedWindows:
        """Close every open window that ends at or before ``until_ms`` (``None``: all).

        Later readings in a flushed window count as late.
        """
        due = self._open[:len(self._ids)] != _NO_WINDOW
        if until_ms is not None:
            due &= (self._open[:len(self._ids)] + 1) * self.spec.length_ms <= until_ms
        slots = np.flatnonzero(due)
        closed = self._closed_rows(slots, self._open[slots], self._state[slots])
        self._floor[slots] = self._open[slots] + 1
        self._open[slots] = _NO_WINDOW
        return closed

    def _grow(self, needed: int) -> None:
        capacity = len(self._open)
        if needed <= capacity:
            return
        extra = max(needed, capacity + capacity // 4) - capacity  # amortised O(1), 25% slack
        self._state = np.concatenate([self._state, np.zeros((extra, len(_FIELDS)))])
        self._open = np.concatenate([self._open, np.full(extra, _NO_WINDOW, np.int64)])
        self._floor = np.concatenate([self._floor, np.full(extra, _NO_WINDOW, np.int64)])

    def _reduce(self, starts: np.ndarray, ts_ms: np.ndarray, window: np.ndarray,
                flow: np.ndarray, pressure: np.ndarray) -> np.ndarray:
        """One row of running statistics per group of readings beginning at ``starts``."""
        spec = self.spec
        hours = (ts_ms - window * spec.length_ms) / MS_PER_HOUR
        rows = np.empty((len(starts), len(_FIELDS)))
        _reduce_series(rows, "f_", starts, hours, flow, np.ones(len(flow), bool))
        _reduce_series(rows, "p_", starts, hours, pressure, np.isfinite(pressure))
        rows[:, _COLUMN["zero_n"]] = np.add.reduceat(flow == 0, starts)
        night = spec.in_night(ts_ms)
        rows[:, _COLUMN["night_n"]] = np.add.reduceat(night, starts)
        rows[:, _COLUMN["night_min"]] = np.minimum.reduceat(np.where(night, flow, np.inf),
                                                            starts)
        return rows

    def _closed_rows(self, slots: np.ndarray, window: np.ndarray,
                     rows: np.ndarray) -> ClosedWindows:
        if not len(slots):
            return _empty_closed()
        order = np.lexsort((window, slots))
        slots, window, rows = slots[order], window[order], rows[order]
        start = window * self.spec.length_ms
        if len(self._id_array) != len(self._ids):
            self._id_array = np.array(self._ids, dtype=object)
        return ClosedWindows(self._id_array[slots], slots, start, start + self.spec.length_ms,
                             features_of(rows))


def pressure_of(metrics: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The pressure column of a reading set: the first of :data:`PRESSURE_METRICS` present.

    District meters report ``pressure_bar``, pump stations ``outlet_pressure_bar`` (the
    pressure they deliver into the district); customer meters have none (``None``).
    """
    for name in PRESSURE_METRICS:
        if name in metrics:
            return metrics[name]
    return None


def features_of(rows: np.ndarray) -> np.ndarray:
    """The float32 feature matrix (:data:`FEATURE_NAMES`) of rows of running statistics."""
    def col(name: str) -> np.ndarray:
        return rows[:, _COLUMN[name]]

    out = np.zeros((len(rows), len(FEATURE_NAMES)))
    for prefix, first in (("f_", 0), ("p_", 5)):
        n = col(prefix + "n")
        seen = n > 0
        out[:, first] = np.where(seen, col(prefix + "x_mean"), 0.0)
        out[:, first + 1] = np.where(seen, col(prefix + "min"), 0.0)
        out[:, first + 2] = np.where(seen, col(prefix + "max"), 0.0)
        out[:, first + 3] = np.sqrt(np.maximum(col(prefix + "x_m2"), 0.0)
                                    / np.maximum(n, 1.0))
        t_m2 = col(prefix + "t_m2")
        spread = t_m2 > 1e-12
        out[:, first + 4] = np.where(spread, col(prefix + "tx_c") / np.where(spread, t_m2, 1.0),
                                     0.0)
    night = col("night_n") > 0
    out[:, 10] = np.where(night, col("night_min"), 0.0)
    n = col("f_n")
    out[:, 11] = col("zero_n") / np.maximum(n, 1.0)
    out[:, 12] = n
    out[:, 13] = col("p_n") > 0
    out[:, 14] = night
    return np.ascontiguousarray(out, np.float32)


def _reduce_series(rows: np.ndarray, prefix: str, starts: np.ndarray, t: np.ndarray,
                   x: np.ndarray, valid: np.ndarray) -> None:
    """Fill the ``prefix`` series columns of ``rows`` from the groups' valid (t, x) pairs."""
    def put(name: str, values: np.ndarray) -> None:
        rows[:, _COLUMN[prefix + name]] = values

    sizes = np.diff(np.append(starts, len(t)))
    n = np.add.reduceat(valid, starts).astype(np.float64)
    t_valid = np.where(valid, t, 0.0)
    x_valid = np.where(valid, x, 0.0)
    safe_n = np.maximum(n, 1.0)
    t_mean = np.add.reduceat(t_valid, starts) / safe_n
    x_mean = np.add.reduceat(x_valid, starts) / safe_n
    dt = np.where(valid, t - np.repeat(t_mean, sizes), 0.0)
    dx = np.where(valid, x - np.repeat(x_mean, sizes), 0.0)
    put("n", n)
    put("t_mean", t_mean)
    put("x_mean", x_mean)
    put("t_m2", np.add.reduceat(dt * dt, starts))
    put("x_m2", np.add.reduceat(dx * dx, starts))
    put("tx_c", np.add.reduceat(dt * dx, starts))
    put("min", np.minimum.reduceat(np.where(valid, x, np.inf), starts))
    put("max", np.maximum.reduceat(np.where(valid, x, -np.inf), starts))


def _merge(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rows of statistics of the union of the readings behind rows ``a`` and ``b``."""
    out = np.empty_like(a)
    for prefix in ("f_", "p_"):
        def col(rows: np.ndarray, name: str, prefix: str = prefix) -> np.ndarray:
            return rows[:, _COLUMN[prefix + name]]

        def put(name: str, values: np.ndarray, prefix: str = prefix) -> None:
            out[:, _COLUMN[prefix + name]] = values

        na, nb = col(a, "n"), col(b, "n")
        n = na + nb
        wb = nb / np.maximum(n, 1.0)
        weight = na * wb  # na * nb / n
        dt = col(b, "t_mean") - col(a, "t_mean")
        dx = col(b, "x_mean") - col(a, "x_mean")
        put("n", n)
        put("t_mean", col(a, "t_mean") + dt * wb)
        put("x_mean", col(a, "x_mean") + dx * wb)
        put("t_m2", col(a, "t_m2") + col(b, "t_m2") + dt * dt * weight)
        put("x_m2", col(a, "x_m2") + col(b, "x_m2") + dx * dx * weight)
        put("tx_c", col(a, "tx_c") + col(b, "tx_c") + dt * dx * weight)
        put("min", np.minimum(col(a, "min"), col(b, "min")))
        put("max", np.maximum(col(a, "max"), col(b, "max")))
    for name in ("zero_n", "night_n"):
        out[:, _COLUMN[name]] = a[:, _COLUMN[name]] + b[:, _COLUMN[name]]
    night = _COLUMN["night_min"]
    out[:, night] = np.minimum(a[:, night], b[:, night])
    return out


def _empty_closed() -> ClosedWindows:
    empty = np.empty(0, np.int64)
    return ClosedWindows(np.empty(0, object), empty, empty, empty,
                         np.empty((0, len(FEATURE_NAMES)), np.float32))
