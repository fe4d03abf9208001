"""A district's water balance per 15 minutes of event time, for the district dashboard.

The detection step feeds each district's readings in event-time order with a tick at every
15-minute boundary (:mod:`dataflows.detection`); :class:`DistrictBalance` sums what was fed
between two ticks and, at the tick, closes one :class:`BalanceRow` (``mw_district``):

- ``customer_flow_lpm``: the sum over the district's customer meters of each meter's mean
  flow in the interval (a meter that did not report adds nothing: ``meters_reporting`` says
  how many customer meters did);
- ``inlet_flow_lpm``: the same over its inlet (district) meters, and ``pressure_bar`` their
  mean pressure;
- ``balance_lpm``: inlet minus customers, when both reported (the water the district loses,
  plus what unregistered or silent meters use).

A row is stamped with its interval's start. Readings fed behind a tick (late for it) count in
the interval open when they are fed. Imputed and late readings never reach detection, so the
balance is made of measured readings only.

>>> import numpy as np
>>> balance = DistrictBalance(slots=3)
>>> kind = np.array([CUSTOMER, CUSTOMER, DISTRICT_METER, CUSTOMER])
>>> balance.add(kind, np.array([0, 1, 2, 0]), np.array([2.0, 3.0, 9.0, 4.0]),
...             np.array([np.nan, np.nan, 3.5, np.nan]))
>>> balance.close(1767225600000)
BalanceRow(start_ms=1767224700000, inlet_flow_lpm=9.0, customer_flow_lpm=6.0, balance_lpm=3.0, \
pressure_bar=3.5, meters_reporting=2)
>>> balance.close(1767226500000) is None  # nothing fed since
True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.water.pipeline import CUSTOMER, DISTRICT_METER

__all__ = ["INTERVAL_MS", "BalanceRow", "DistrictBalance"]

INTERVAL_MS = 900_000
"""The interval of a row: the detection step's tick."""


@dataclass(frozen=True, slots=True)
class BalanceRow:
    """One district and interval of the balance (``None``: no such meter reported)."""

    start_ms: int
    inlet_flow_lpm: float | None
    customer_flow_lpm: float | None
    balance_lpm: float | None
    pressure_bar: float | None
    meters_reporting: int


class DistrictBalance:
    """Per-meter sums of the open interval; picklable with the district's state."""

    def __init__(self, slots: int) -> None:
        self._flow = np.zeros(slots)
        self._count = np.zeros(slots, dtype=np.int64)
        self._is_inlet = np.zeros(slots, dtype=bool)
        self._pressure_sum = 0.0
        self._pressure_count = 0

    def add(self, kind: np.ndarray, slot: np.ndarray, flow: np.ndarray,
            pressure: np.ndarray) -> None:
        """Count readings of the open interval (layout kind codes and slots; NaN: absent)."""
        meters = ((kind == CUSTOMER) | (kind == DISTRICT_METER)) & np.isfinite(flow)
        np.add.at(self._flow, slot[meters], flow[meters])
        np.add.at(self._count, slot[meters], 1)
        self._is_inlet[slot[meters & (kind == DISTRICT_METER)]] = True
        pressures = pressure[(kind == DISTRICT_METER) & np.isfinite(pressure)]
        self._pressure_sum += float(pressures.sum())
        self._pressure_count += len(pressures)

    def close(self, tick_ms: int) -> BalanceRow | None:
        """The row of the interval ending at ``tick_ms``, None if nothing was fed; starts anew."""
        reported = self._count > 0
        if not reported.any():
            return None
        means = np.divide(self._flow, self._count, where=reported, out=np.zeros_like(self._flow))
        inlets = reported & self._is_inlet
        customers = reported & ~self._is_inlet
        inlet = float(means[inlets].sum()) if inlets.any() else None
        customer = float(means[customers].sum()) if customers.any() else None
        row = BalanceRow(
            tick_ms - INTERVAL_MS, inlet, customer,
            None if inlet is None or customer is None else inlet - customer,
            self._pressure_sum / self._pressure_count if self._pressure_count else None,
            int(customers.sum()))
        self._flow[:] = 0.0
        self._count[:] = 0
        self._pressure_sum, self._pressure_count = 0.0, 0
        return row
