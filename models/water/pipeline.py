"""The water detectors of a whole fleet, wired to the alert policy: the dataflow's batch path.

:class:`WaterPipeline` owns one fleet detector per kind (columnar state indexed by device or
district), a :class:`DistrictAggregator` that turns 1-minute inlet readings and 15-minute
customer readings into per-interval district observations, a :class:`ScoreDrift` monitor per
alert category, and an :class:`~models.alerting.AlertPolicy`. Feed it blocks of readings
in arrival order (:meth:`WaterPipeline.customer_readings`,
:meth:`WaterPipeline.inlet_readings`, :meth:`WaterPipeline.other_readings`) and call
:meth:`WaterPipeline.tick` as the watermark advances (silence checks, district intervals);
each returns the :class:`~meshwatch.contract.events.Alert` messages produced.

>>> import numpy as np
>>> layout = FleetLayout(
...     device_ids=np.array(["mtr-1", "mtr-2", "dma-01-inlet"], dtype=object),
...     kind=np.array([0, 0, 1], np.int8), district_of=np.array([0, 0, 0], np.int32),
...     district_ids=["dma-01"], cadence_s=np.array([900, 900, 60]))
>>> pipeline = WaterPipeline(layout)
>>> t0 = 1_767_571_200_000
>>> alerts = []
>>> for i in range(1, 4 * 30):  # meter 0 leaks from the start, meter 1 is healthy
...     ts = t0 + i * 900_000
...     alerts += pipeline.customer_readings(
...         np.array([0, 1]), np.array([ts, ts]),
...         {"flow_lpm": np.array([0.2 + 0.3 * (i % 3 == 0) if i > 2 else 0.0, 0.5 * (i % 2)]),
...          "battery_v": np.array([3.6, 3.6])})
...     alerts += pipeline.tick(ts)
>>> [(a.kind.value, a.device_id, a.status.value, a.severity.value) for a in alerts]
[('leak', 'mtr-1', 'open', 'minor')]
>>> alerts[0].est_loss_lph, alerts[0].first_ts_ms == t0 + (2 + 4 * 24) * 900_000
(12.0, True)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from river.drift import ADWIN

from meshwatch.contract.events import Alert
from models.alerting import CATEGORIES, AlertPolicy, PolicySettings
from models.water.base import Scored
from models.water.burst import BurstFleet, BurstSettings
from models.water.customer_leak import CustomerLeakFleet, CustomerLeakSettings
from models.water.district_leak import DistrictLeakFleet, DistrictLeakSettings
from models.water.sensor_faults import (
    FAULT_NAMES,
    SensorFaultFleet,
    SensorFaultSettings,
    profile_slot,
)
from models.water.silence import SilenceFleet, SilenceSettings

CUSTOMER, DISTRICT_METER, PUMP_STATION = 0, 1, 2
CLOCK_FAULT = FAULT_NAMES.index("clock_skew")
INTERVAL_MS = 900_000


@dataclass(frozen=True, eq=False)
class FleetLayout:
    """Which devices exist, all indexed by device slot.

    Ids, kinds (0 customer meter, 1 district inlet, 2 pump station), districts and
    reporting cadences.
    """

    device_ids: np.ndarray
    kind: np.ndarray
    district_of: np.ndarray
    district_ids: list[str]
    cadence_s: np.ndarray

    @property
    def inlet_of_district(self) -> np.ndarray:
        """The device slot of each district's inlet meter (-1 if it has none)."""
        inlets = np.full(len(self.district_ids), -1, np.int64)
        where = np.flatnonzero(self.kind == DISTRICT_METER)
        inlets[self.district_of[where]] = where
        return inlets

    @classmethod
    def from_simulator(cls, fleet: Any, customer_cadence_s: int,
                       scada_cadence_s: int) -> FleetLayout:
        """The layout of a :class:`simulators.Fleet` (its device numbering is kept)."""
        kind = np.asarray(fleet.kind, np.int8)
        return cls(device_ids=fleet.device_ids, kind=kind,
                   district_of=np.asarray(fleet.district_of, np.int32),
                   district_ids=list(fleet.district_ids),
                   cadence_s=np.where(kind == CUSTOMER, customer_cadence_s, scada_cadence_s))


class DistrictAggregator:
    """Per-district, per-interval sums of inlet flow and customer flow, closed by watermark.

    Interval ``k`` holds readings stamped in ``(k * 15 min, (k + 1) * 15 min]`` (readings are
    stamped at the end of their interval). An interval closes once the watermark is
    ``hold_ms`` past its end; readings for a closed interval are counted in :attr:`late` and
    left out. A meter that did not report for a closed interval (one bit per meter and
    interval of the last 64 says whether it did) is imputed with its own
    recent flow (an exponentially weighted mean, ``alpha`` per reading), so a big consumer
    off the network does not look like a leak; in the night hours (``night_h``, UTC) with
    its own mean of night readings instead, since a night's use is a fraction of the day's
    and a gateway outage at night would otherwise add the meters' evening use to the
    balance. The customer sum is given only when at least ``min_coverage`` of the
    district's meters reported.

    >>> agg = DistrictAggregator(np.array([0, 0, 0]), districts=1, hold_ms=0, min_coverage=0.5)
    >>> agg.add_customers(np.array([0, 1, 2]), np.array([900_000] * 3), np.array([1., 2., 3.]))
    >>> agg.add_inlet(np.array([0]), np.array([900_000]), np.array([7.0]))
    >>> agg.add_customers(np.array([0, 1]), np.array([1_800_000] * 2), np.array([1.0, 2.0]))
    >>> agg.add_inlet(np.array([0]), np.array([1_800_000]), np.array([7.0]))
    >>> district, end, inlet, customers = agg.close(1_800_000)
    >>> end.tolist(), inlet.tolist(), customers.tolist()  # meter 2 imputed in interval 2
    ([900000, 1800000], [7.0, 7.0], [6.0, 6.0])
    """

    def __init__(self, meter_district: np.ndarray, districts: int, hold_ms: int = 3_600_000,
                 ring: int = 192, min_coverage: float = 0.8, alpha: float = 0.05,
                 night_h: tuple[float, float] = (1.0, 5.0)) -> None:
        self.meter_district = np.asarray(meter_district, np.int64)
        self.meters = np.bincount(self.meter_district, minlength=districts).astype(np.float64)
        self.hold_ms = hold_ms
        self.min_coverage = min_coverage
        self.alpha = alpha
        self.night_h = night_h
        self._ring = ring
        self._interval = np.full((districts, ring), -1, np.int64)
        self._sums = np.zeros((4, districts, ring))  # inlet sum, n, customer sum, n
        self._recent = np.zeros(len(self.meter_district))
        self._night = np.full(len(self.meter_district), np.nan)  # NaN: no night seen yet
        self._reported = np.zeros(len(self.meter_district), np.uint64)  # bit k % 64: k open
        self._last_k = np.full(len(self.meter_district), -1, np.int64)
        self._closed_before = -1  # intervals below this index are closed
        self.late = 0
        """Readings that arrived after their interval closed."""

    def _add(self, district: np.ndarray, ts: np.ndarray, values: np.ndarray,
             which: int) -> np.ndarray:
        k = (np.asarray(ts, np.int64) - 1) // INTERVAL_MS
        if self._closed_before < 0 and len(k):
            self._closed_before = int(k.min())
        ok = k >= self._closed_before
        self.late += int((~ok).sum())
        district, kk, values = district[ok], k[ok], values[ok]
        pos = kk % self._ring
        stale = self._interval[district, pos] != kk
        if stale.any():
            self._interval[district[stale], pos[stale]] = kk[stale]
            self._sums[:, district[stale], pos[stale]] = 0.0
        np.add.at(self._sums[which], (district, pos), values)
        np.add.at(self._sums[which + 1], (district, pos), 1.0)
        return k

    def add_inlet(self, district: np.ndarray, ts: np.ndarray, flow: np.ndarray) -> None:
        """Add inlet readings (1-minute means) of ``district`` at ``ts``."""
        self._add(district, ts, flow, 0)

    def add_customers(self, meter: np.ndarray, ts: np.ndarray, flow: np.ndarray) -> None:
        """Add customer readings (interval means) of ``meter`` (customer slots) at ``ts``."""
        meter = np.asarray(meter, np.int64)
        k = self._add(self.meter_district[meter], ts, flow, 2)
        a = self.alpha
        fresh = self._last_k[meter] < 0
        self._recent[meter] = np.where(fresh, flow, (1 - a) * self._recent[meter] + a * flow)
        night = self._is_night(k)
        old = self._night[meter[night]]
        self._night[meter[night]] = np.where(np.isnan(old), flow[night],
                                             (1 - a) * old + a * flow[night])
        np.maximum.at(self._last_k, meter, k)
        ok = k >= self._closed_before
        np.bitwise_or.at(self._reported, meter[ok], np.left_shift(
            np.uint64(1), (k[ok] % 64).astype(np.uint64)))

    def _is_night(self, k: np.ndarray) -> np.ndarray:
        hour = (np.asarray(k) % (86_400_000 // INTERVAL_MS)) * INTERVAL_MS / 3_600_000
        return (hour >= self.night_h[0]) & (hour < self.night_h[1])

    def close(self, watermark_ms: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Close every interval ending at least ``hold_ms`` before the watermark.

        Returns (district, interval end ms, mean inlet flow, customer flow or NaN), ordered
        by interval then district; intervals without inlet readings are skipped.
        """
        upto = (watermark_ms - self.hold_ms) // INTERVAL_MS  # intervals < upto can close
        empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros(0))
        if self._closed_before < 0 or upto <= self._closed_before:
            return empty
        first = max(self._closed_before, upto - self._ring)
        if first - self._closed_before >= 64:
            self._reported[:] = 0
        else:
            for k in range(self._closed_before, first):
                self._reported &= ~np.left_shift(np.uint64(1), np.uint64(k % 64))
        self._closed_before = int(upto)
        parts = []
        d = len(self.meters)
        for k in range(first, int(upto)):
            bit = np.left_shift(np.uint64(1), np.uint64(k % 64))
            missing = (self._last_k >= 0) & ((self._reported & bit) == 0)
            self._reported &= ~bit  # from now on the bit is interval k + 64's
            pos = k % self._ring
            valid = (self._interval[:, pos] == k) & (self._sums[1][:, pos] > 0)
            if not valid.any():
                continue
            districts = np.flatnonzero(valid)
            inlet = self._sums[0][districts, pos] / self._sums[1][districts, pos]
            typical = self._recent
            if self._is_night(np.array([k]))[0]:
                typical = np.where(np.isnan(self._night), self._recent, self._night)
            imputed = np.bincount(self.meter_district[missing], typical[missing],
                                  minlength=d)[districts]
            reported = self._sums[3][districts, pos]
            coverage = reported / np.maximum(self.meters[districts], 1)
            customers = np.where(coverage >= self.min_coverage,
                                 self._sums[2][districts, pos] + imputed, np.nan)
            self._interval[districts, pos] = -1
            parts.append((districts, np.full(len(districts), (k + 1) * INTERVAL_MS, np.int64),
                          inlet, customers))
        if not parts:
            return empty
        columns = [np.concatenate(column) for column in zip(*parts, strict=True)]
        return columns[0], columns[1], columns[2], columns[3]


class DistrictDemand:
    """Each district's customer flow against its baseline for the hour and day type.

    :meth:`update` takes the intervals :meth:`DistrictAggregator.close` gives; :attr:`ratio`
    is, per district, its last closed interval's customer flow over the baseline for that
    hour of the day (weekdays and weekends apart: :func:`profile_slot`), NaN until both are
    known. The baseline is an exponentially weighted mean (``alpha`` per interval of its slot)
    learned from intervals at ``learn_above`` of it or more, so a district that is down is
    not learned as normal. The sensor-fault detector reads the ratio as
    ``district_demand_ratio``.

    >>> demand = DistrictDemand(districts=1)
    >>> day = 86_400_000
    >>> for i in range(14):  # two weeks at 100 L/min at 08:00
    ...     demand.update(np.array([0]), np.array([i * day + 8 * 3_600_000]), np.array([100.0]))
    >>> demand.update(np.array([0]), np.array([14 * day + 8 * 3_600_000]), np.array([20.0]))
    >>> demand.ratio.tolist()
    [0.2]
    """

    def __init__(self, districts: int, alpha: float = 0.1, learn_above: float = 0.5) -> None:
        self.alpha = alpha
        self.learn_above = learn_above
        self._baseline = np.full((districts, 48), np.nan)
        self.ratio = np.full(districts, np.nan)

    def update(self, district: np.ndarray, end_ms: np.ndarray, customers: np.ndarray) -> None:
        """Take closed intervals (in time order): update :attr:`ratio`, then the baselines."""
        for d, slot, flow in zip(district.tolist(), profile_slot(end_ms).tolist(),
                                 customers.tolist(), strict=True):
            base = self._baseline[d, slot]
            self.ratio[d] = flow / base if base > 0 else np.nan  # NaN flow or base: NaN
            if np.isnan(flow) or flow < self.learn_above * base:
                continue
            self._baseline[d, slot] = flow if np.isnan(base) else base + self.alpha * (
                flow - base)


class ScoreDrift:
    """Drift of one detector's score distribution: river's ADWIN over per-block mean scores.

    :attr:`changes` (changes detected so far) and :attr:`level` (ADWIN's current estimate of
    the mean score) are the numbers a dataflow exports as metrics.

    >>> drift = ScoreDrift()
    >>> for i in range(400):
    ...     drift.update(np.full(50, 0.05 if i < 200 else 0.5))
    >>> drift.changes >= 1, round(drift.level, 2)
    (True, 0.5)
    """

    def __init__(self, delta: float = 0.002) -> None:
        self.delta = delta
        self._adwin = ADWIN(delta=delta)
        self.changes = 0
        self.level = 0.0

    def update(self, scores: np.ndarray) -> None:
        """Add one block of scores (its mean is one ADWIN observation)."""
        if len(scores):
            self._adwin.update(float(np.mean(scores)))
            self.changes += int(self._adwin.drift_detected)
            self.level = float(self._adwin.estimation)


@dataclass(frozen=True)
class PipelineSettings:
    """Settings of every detector and of the alert policy."""

    customer_leak: CustomerLeakSettings = field(default_factory=CustomerLeakSettings)
    sensor_faults: SensorFaultSettings = field(default_factory=SensorFaultSettings)
    burst: BurstSettings = field(default_factory=BurstSettings)
    district_leak: DistrictLeakSettings = field(default_factory=DistrictLeakSettings)
    silence: SilenceSettings = field(default_factory=SilenceSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    district_hold_ms: int = 3_600_000
    balance_fault_hold_ms: int = 48 * 3_600_000


class WaterPipeline:
    """Every water detector of a fleet plus the alert policy (see the module docs)."""

    def __init__(self, layout: FleetLayout, settings: PipelineSettings | None = None) -> None:
        self.layout = layout
        self.settings = cfg = settings or PipelineSettings()
        n, d = len(layout.device_ids), len(layout.district_ids)
        self.leak = CustomerLeakFleet(cfg.customer_leak, capacity=n)
        self.faults = SensorFaultFleet(cfg.sensor_faults, capacity=n)
        self.burst = BurstFleet(cfg.burst, capacity=d)
        self.district_leak = DistrictLeakFleet(cfg.district_leak, capacity=d)
        self.silence = SilenceFleet(cfg.silence, capacity=n)
        self.policy = AlertPolicy(cfg.policy)
        customers = np.flatnonzero(layout.kind == CUSTOMER)
        if len(customers) and customers[-1] != len(customers) - 1:
            msg = "customer meters must be the first device slots (0 .. customers-1)"
            raise ValueError(msg)
        night = (cfg.district_leak.night_start_h, cfg.district_leak.night_end_h)
        self.aggregator = DistrictAggregator(layout.district_of[customers], districts=d,
                                             hold_ms=cfg.district_hold_ms, night_h=night)
        self.demand = DistrictDemand(d)
        self.drift = {category: ScoreDrift() for category in CATEGORIES}
        self.last_seen = np.zeros(n, np.int64)
        self._fault_until = np.zeros(n, np.int64)
        self.max_ts = 0
        self._district_names = np.array(layout.district_ids, dtype=object)
        self._device_district = self._district_names[layout.district_of]
        self.readings = 0
        self.score_log: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
        """When a list, each scored block of readings appends ``(device slots, ts, score)``
        (a customer meter's score is the higher of its leak and fault scores, an inlet's its
        burst score): the dataflow writes them as ``mw_score``. None: not kept."""
        self.balance_log: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] | None = None
        """When a list, every tick appends the district intervals it closed, as
        :meth:`DistrictAggregator.close` gives them to the district leak detector
        ``(district slots, interval end ms, inlet flow, customer flow or NaN)``: the dataflow
        writes them as ``mw_district``. None: not kept."""

    def _seen(self, device: np.ndarray, ts: np.ndarray) -> None:
        np.maximum.at(self.last_seen, device, ts)
        if len(ts):
            self.max_ts = max(self.max_ts, int(ts.max()))
        self.readings += len(ts)

    def customer_readings(self, device: np.ndarray, ts: np.ndarray,
                          metrics: Mapping[str, np.ndarray]) -> list[Alert]:
        """Score a block of customer-meter readings (``flow_lpm``, optional ``battery_v``)."""
        device = np.asarray(device, np.int64)
        ts = np.asarray(ts, np.int64)
        flow = np.asarray(metrics["flow_lpm"], np.float64)
        battery = np.asarray(metrics.get("battery_v", np.full(len(ts), np.nan)), np.float64)
        self._seen(device, ts)
        cols = {"ts_ms": ts, "flow_lpm": flow, "battery_v": battery,
                "district_demand_ratio": self.demand.ratio[self.layout.district_of[device]]}
        leak = self.leak.process(device, cols)
        faults = self.faults.process(device, cols)
        if self.score_log is not None:
            self.score_log.append((device, ts, np.maximum(leak.score, faults.score)))
        # the district balance takes each reading once, and none of a meter whose readings a
        # fault flagged in the last ``balance_fault_hold_ms`` (spikes come in runs, and a
        # stuck register is flagged long after it stuck): it is imputed meanwhile
        flagged = faults.fresh & (faults.score >= self.faults.threshold)
        np.maximum.at(self._fault_until, device[flagged],
                      ts[flagged] + self.settings.balance_fault_hold_ms)
        usable = faults.fresh & ~flagged & (ts > self._fault_until[device])
        self.aggregator.add_customers(device[usable], ts[usable], flow[usable])
        clock = faults.evidence["fault"] == CLOCK_FAULT
        alerts = self._policy("sensor_fault", device, ts, Scored(
            np.where(clock, 0.0, faults.score), faults.evidence))
        alerts += self._policy("clock_skew", device, ts, Scored(
            np.where(clock, faults.score, 0.0), faults.evidence))
        alerts += self._policy("customer_leak", device, ts, leak)
        return alerts

    def inlet_readings(self, device: np.ndarray, ts: np.ndarray,
                       metrics: Mapping[str, np.ndarray]) -> list[Alert]:
        """Score a block of district inlet readings (``flow_lpm``, ``pressure_bar``).

        The same as :meth:`inlet_bursts` then :meth:`inlet_balance` (the dataflow calls them
        apart: a burst alert need not wait for the district's other devices).
        """
        alerts, calm = self.inlet_bursts(device, ts, metrics)
        self.inlet_balance(device, ts, metrics["flow_lpm"], calm)
        return alerts

    def inlet_bursts(self, device: np.ndarray, ts: np.ndarray, metrics: Mapping[str, np.ndarray],
                     ) -> tuple[list[Alert], np.ndarray]:
        """The burst detector and its alerts on inlet readings; also which readings are calm.

        Calm readings (fresh, scoring below the burst detector's ``learn_below``) are the
        ones :meth:`inlet_balance` adds to the district balance.
        """
        device = np.asarray(device, np.int64)
        ts = np.asarray(ts, np.int64)
        district = self.layout.district_of[device].astype(np.int64)
        scored = self.burst.process(district, {
            "ts_ms": ts, "flow_lpm": np.asarray(metrics["flow_lpm"], np.float64),
            "pressure_bar": np.asarray(metrics["pressure_bar"], np.float64)})
        if self.score_log is not None:
            self.score_log.append((device, ts, scored.score))
        # the night flow leaves out what a burst adds (a burst night is no baseline, no leak)
        calm = scored.score < self.burst.settings.learn_below
        if scored.fresh is not None:
            calm &= scored.fresh
        return self._policy("burst", district, ts, scored, districts=True), calm

    def inlet_balance(self, device: np.ndarray, ts: np.ndarray, flow: np.ndarray,
                      calm: np.ndarray) -> None:
        """Inlet readings seen, the ``calm`` ones (:meth:`inlet_bursts`) in the district balance."""
        device = np.asarray(device, np.int64)
        ts = np.asarray(ts, np.int64)
        self._seen(device, ts)
        district = self.layout.district_of[device].astype(np.int64)
        self.aggregator.add_inlet(district[calm], ts[calm], np.asarray(flow, np.float64)[calm])

    def other_readings(self, device: np.ndarray, ts: np.ndarray) -> None:
        """Readings of devices no detector scores (pump stations): they count as seen."""
        self._seen(np.asarray(device, np.int64), np.asarray(ts, np.int64))

    def tick(self, watermark_ms: int) -> list[Alert]:
        """Advance event time: close district intervals, check every device for silence."""
        alerts: list[Alert] = []
        district, end, inlet, customers = self.aggregator.close(watermark_ms)
        if len(district):
            if self.balance_log is not None:
                self.balance_log.append((district, end, inlet, customers))
            self.demand.update(district, end, customers)
            scored = self.district_leak.process(district, {
                "ts_ms": end, "flow_lpm": inlet, "customer_flow_lpm": customers})
            alerts += self._policy("network_leak", district, end, scored, districts=True)
        seen = np.flatnonzero(self.last_seen > 0)
        if len(seen):
            scored = self.silence.observe(seen, self.last_seen[seen],
                                          self.layout.cadence_s[seen], watermark_ms)
            scored.evidence["cadence_s"] = self.layout.cadence_s[seen].astype(np.float64)
            alerts += self._policy("silent", seen, np.full(len(seen), watermark_ms, np.int64),
                                   scored)
        return alerts

    def _policy(self, category: str, slot: np.ndarray, ts: np.ndarray, scored: Scored,
                districts: bool = False) -> list[Alert]:
        self.drift[category].update(scored.score)
        if districts:
            return self.policy.observe(category, slot, ts, scored.score, scored.evidence,
                                       self._district_names)
        return self.policy.observe(category, slot, ts, scored.score, scored.evidence,
                                   self.layout.device_ids, self._device_district)

    def drift_metrics(self) -> dict[str, float]:
        """Per category: ADWIN's mean score estimate and the changes detected, for export."""
        metrics: dict[str, float] = {}
        for category, drift in self.drift.items():
            metrics[f"{category}_score_level"] = drift.level
            metrics[f"{category}_score_changes"] = float(drift.changes)
        return metrics
