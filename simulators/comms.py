"""Communication faults between devices and the head end, recorded per reading touched.

Fault kinds (``CommFault``), and what ``detail_ms`` holds in their records:

- ``lost``: the reading is lost at random (detail 0).
- ``gap``: the device is off the network from a random moment for 5 minutes to
  ``gap_max_h`` (log-uniform); its readings are lost (detail: the gap's end, epoch ms).
- ``gateway_outage``: the gateway's backhaul is down for 10 minutes to ``outage_max_h``
  (log-uniform); it stores and forwards, so its readings arrive together when the link is
  back (detail: the delivery time, epoch ms).
- ``late``: the reading is retried 1 minute to ``late_max_h`` later (log-uniform), after
  its successors (detail: the delay in ms).
- ``duplicate``: the reading is delivered once more one step later, with the same seq
  (detail: the delay of the copy in ms).
- ``clock_skew``: while it lasts (1 hour to ``clock_skew_max_h``), the device reports
  ``ts_ms`` shifted by 30 s to 2 h either way (detail: the shift in ms). Never on a
  customer meter with a leak or a meter fault (see :mod:`simulators.incidents`).

Lost readings still consumed a ``seq``, so gaps in seq reveal loss. Held readings wait in
a buffer bounded by the longest delay, so memory does not grow with the run's length.

>>> import numpy as np
>>> from simulators.block import Readings
>>> from simulators.config import CommRates
>>> comms = CommFaults(CommRates(loss_probability=0.5), np.zeros(3, np.int32), 1,
...                    np.random.default_rng(0))
>>> readings = Readings(np.arange(3, dtype=np.int32), np.full(3, 1_767_571_200_000),
...                     np.zeros(3, np.int64), {"flow_lpm": np.ones(3)})
>>> on_time, log = comms.process(readings, 1_767_571_200_000, 900_000, scada=False)
>>> len(on_time) + int((log.fault == CommFault.LOST).sum())
3
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from simulators.block import Readings
from simulators.config import CommRates

MS_PER_DAY = 86_400_000
MS_PER_MINUTE = 60_000
MS_PER_HOUR = 3_600_000
GAP_MIN_MS = 5 * MS_PER_MINUTE
OUTAGE_MIN_MS = 10 * MS_PER_MINUTE
SKEW_MIN_MS = MS_PER_HOUR
SKEW_OFFSET_MS = (30_000, 2 * MS_PER_HOUR)
LATE_MIN_MS = MS_PER_MINUTE


class CommFault(IntEnum):
    """Kinds of communication fault; the value is the code in :class:`CommFaultLog`."""

    LOST = 0
    GAP = 1
    GATEWAY_OUTAGE = 2
    LATE = 3
    DUPLICATE = 4
    CLOCK_SKEW = 5


@dataclass(frozen=True, eq=False)
class CommFaultLog:
    """Readings touched by communication faults, as columns (one row per reading and fault).

    ``ts_ms`` is the true event time; ``fault`` a :class:`CommFault` code.
    """

    device: np.ndarray
    seq: np.ndarray
    ts_ms: np.ndarray
    fault: np.ndarray
    detail_ms: np.ndarray

    def __len__(self) -> int:
        return len(self.device)

    @staticmethod
    def concat(parts: list[CommFaultLog]) -> CommFaultLog:
        """One log with the rows of ``parts`` in order."""
        return CommFaultLog(*(np.concatenate([getattr(p, name) for p in parts])
                              for name in ("device", "seq", "ts_ms", "fault", "detail_ms")))


class CommFaults:
    """Applies communication faults to produced readings and holds delayed ones."""

    def __init__(
        self, rates: CommRates, gateway_of: np.ndarray, gateways: int, rng: np.random.Generator
    ) -> None:
        devices = len(gateway_of)
        self._rates, self._rng, self._gateway_of = rates, rng, gateway_of
        self._gap_from = np.zeros(devices, np.int64)
        self._gap_until = np.zeros(devices, np.int64)
        self._skew_from = np.zeros(devices, np.int64)
        self.skew_until = np.zeros(devices, np.int64)
        """End of each device's current clock skew (0 or in the past: none)."""
        self._skew_offset = np.zeros(devices, np.int64)
        self._outage_from = np.zeros(gateways, np.int64)
        self._outage_until = np.zeros(gateways, np.int64)
        self._held: list[tuple[int, int, int, Readings]] = []  # (release, order, kind, readings)
        self._order = 0

    @property
    def held_readings(self) -> int:
        """How many readings wait in the delay buffer."""
        return sum(len(item[3]) for item in self._held)

    def start_new(self, start_ms: int, end_ms: int, protected: np.ndarray) -> None:
        """Draw gaps, clock skews and gateway outages that begin in ``[start_ms, end_ms)``.

        ``protected`` marks devices that must not start a clock skew now.
        """
        rates, rng = self._rates, self._rng
        days = (end_ms - start_ms) / MS_PER_DAY
        devices = len(self._gap_until)
        for index, begin in self._onsets(rates.meter_gap_per_device_day * days, devices,
                                         start_ms, end_ms):
            if self._gap_until[index] <= begin:
                self._gap_from[index] = begin
                self._gap_until[index] = begin + _log_uniform(rng, GAP_MIN_MS,
                                                              rates.gap_max_h * MS_PER_HOUR)
        for index, begin in self._onsets(rates.clock_skew_per_device_day * days, devices,
                                         start_ms, end_ms):
            if self.skew_until[index] <= begin and not protected[index]:
                self._skew_from[index] = begin
                self.skew_until[index] = begin + _log_uniform(
                    rng, SKEW_MIN_MS, rates.clock_skew_max_h * MS_PER_HOUR)
                self._skew_offset[index] = _log_uniform(rng, *SKEW_OFFSET_MS) * rng.choice(
                    [-1, 1])
        for index, begin in self._onsets(rates.gateway_outage_per_gateway_day * days,
                                         len(self._outage_until), start_ms, end_ms):
            if self._outage_until[index] <= begin:
                self._outage_from[index] = begin
                self._outage_until[index] = begin + _log_uniform(
                    rng, OUTAGE_MIN_MS, rates.outage_max_h * MS_PER_HOUR)

    def _onsets(self, expected_per_item: float, items: int, start_ms: int,
                end_ms: int) -> list[tuple[int, int]]:
        count = self._rng.poisson(expected_per_item * items) if expected_per_item else 0
        if not count:
            return []
        chosen = self._rng.integers(0, items, count)
        times = self._rng.integers(start_ms, end_ms, count)
        return list(zip(chosen.tolist(), times.tolist(), strict=True))

    def process(
        self, readings: Readings, sent_ms: int, step_ms: int, scada: bool, kind: int = 0,
    ) -> tuple[Readings, CommFaultLog]:
        """Apply faults to readings produced for delivery at ``sent_ms``.

        Returns the readings delivered now (clock skew applied) and the fault records.
        Delayed readings and duplicates are held and come back from :meth:`release`,
        tagged with ``kind``.
        """
        rates, rng = self._rates, self._rng
        n = len(readings)
        device, ts = readings.device, readings.ts_ms
        logs: list[CommFaultLog] = []
        in_gap = (self._gap_from[device] <= ts) & (ts < self._gap_until[device])
        loss = rates.scada_loss_probability if scada else rates.loss_probability
        lost = ~in_gap & (rng.random(n) < loss)
        logs.append(self._log(readings, lost, CommFault.LOST, np.zeros(n, np.int64)))
        logs.append(self._log(readings, in_gap, CommFault.GAP, self._gap_until[device]))
        skewed = (self._skew_from[device] <= ts) & (ts < self.skew_until[device])
        if skewed.any():
            logs.append(self._log(readings, skewed, CommFault.CLOCK_SKEW,
                                  self._skew_offset[device]))
            readings = Readings(device, np.where(skewed, ts + self._skew_offset[device], ts),
                                readings.seq, readings.metrics)
        gateway = self._gateway_of[device]
        outage = ~(in_gap | lost) & (self._outage_from[gateway] <= sent_ms) & (
            sent_ms < self._outage_until[gateway])
        late = ~(in_gap | lost | outage) & (rng.random(n) < rates.late_probability)
        delay = np.zeros(n, np.int64)
        if late.any():
            delay[late] = np.exp(rng.uniform(np.log(LATE_MIN_MS),
                                             np.log(rates.late_max_h * MS_PER_HOUR),
                                             int(late.sum()))).astype(np.int64)
        release = np.where(outage, self._outage_until[gateway], sent_ms + delay)
        logs.append(self._log(readings, outage, CommFault.GATEWAY_OUTAGE, release, true_ts=ts))
        logs.append(self._log(readings, late, CommFault.LATE, delay, true_ts=ts))
        duplicate = ~(in_gap | lost) & (rng.random(n) < rates.duplicate_probability)
        logs.append(self._log(readings, duplicate, CommFault.DUPLICATE,
                              np.full(n, step_ms, np.int64), true_ts=ts))
        for mask, when in ((outage | late, release), (duplicate, release + step_ms)):
            self._hold(when, kind, readings, np.flatnonzero(mask))
        on_time = ~(in_gap | lost | outage | late)
        return readings.take(on_time), CommFaultLog.concat(logs)

    def release(self, now_ms: int) -> list[tuple[int, Readings]]:
        """Held readings due at or before ``now_ms``, as (kind, readings), oldest first."""
        due: list[tuple[int, Readings]] = []
        while self._held and self._held[0][0] <= now_ms:
            _, _, kind, readings = heapq.heappop(self._held)
            due.append((kind, readings))
        return due

    def next_release_ms(self) -> int | None:
        """When the earliest held reading is due, or None if nothing is held."""
        return self._held[0][0] if self._held else None

    def _hold(self, release_ms: np.ndarray, kind: int, readings: Readings,
              index: np.ndarray) -> None:
        """Hold ``readings[index]``, one heap entry per distinct release time."""
        if not index.size:
            return
        index = index[np.argsort(release_ms[index], kind="stable")]
        held, when = readings.take(index), release_ms[index]
        edges = np.flatnonzero(np.diff(when)) + 1
        for first, last in zip([0, *edges.tolist()], [*edges.tolist(), len(index)],
                               strict=True):
            self._order += 1
            heapq.heappush(self._held, (int(when[first]), self._order, kind,
                                        held.take(slice(first, last))))

    @staticmethod
    def _log(readings: Readings, mask: np.ndarray, fault: CommFault, detail: np.ndarray,
             true_ts: np.ndarray | None = None) -> CommFaultLog:
        ts = readings.ts_ms if true_ts is None else true_ts
        return CommFaultLog(readings.device[mask], readings.seq[mask], ts[mask],
                            np.full(int(mask.sum()), fault, np.int8), detail[mask])


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> int:
    return int(np.exp(rng.uniform(np.log(low), np.log(max(high, low)))))
