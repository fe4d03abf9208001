"""True incidents and meter faults, with their ground truth.

Customer-side (one customer meter each; at most one of them at a time per meter, and
never while the meter's clock is skewed, so every record can be checked against the
readings alone):

- ``customer_leak``: a continuous flow that never returns to zero: initial rate
  log-uniform 2–100 L/h (a dripping tap to a running toilet cistern); half of them grow
  by 0–10 % per day up to five times their initial rate; repaired after a log-normal
  duration (median 30 days). Magnitude: the initial rate in L/h.
- ``stuck``: the meter repeats one flow value, its flow when it stuck (or 0.2–2 L/min if
  that was 0), for a median of 5 days.
- ``stopped``: the meter reads 0 while water flows (a seized mechanical meter; median 20
  days, until replaced). Magnitude of ``stuck`` and ``stopped``: 0 (the readings show the
  value).
- ``spikes``: 5–20 % of readings jump by 50–500 L/min, beyond what a DN15 meter can pass
  (median 3 days). Magnitude: the share of readings that spike.
- ``drift``: the reading drifts by ±0.5–3 % per day (median 30 days). Magnitude: the
  drift per day as a ratio.
- ``battery_depletion``: battery voltage falls from its normal ~3.6 V (Li-SOCl₂) to the
  3.0 V cut-off over 2–14 days, accelerating, then the meter goes silent for the rest of
  the run (no readings, so its ``seq`` stops too). Magnitude: the cut-off voltage.

District-wide (device -1):

- ``network_leak``: an unreported leak on a main or a service pipe: 200–3,000 L/h
  log-uniform at nominal pressure, flow proportional to pressure (FAVAD N1 = 1), found
  after a log-normal duration (median 30 days). It raises the minimum night flow.
- ``burst``: a sudden flow of 5–40 m³/h (log-uniform) with an extra pressure drop of
  0.5–2 bar at the district inlet, repaired after 2–12 hours. Magnitude: flow in L/h.

Every meter reads with a fixed accuracy bias (normal, sd 1 %, clipped to ±3 %: class 2
meters). Ground truth episodes are released when they end, and the rest at
:meth:`Incidents.finish` with their end clipped to the end of the run (``detail`` then
says ``ongoing=1``).

>>> import numpy as np
>>> from simulators.config import FleetConfig, IncidentRates
>>> from simulators.fleet import Fleet
>>> fleet = Fleet.build(FleetConfig(meters=100), np.random.default_rng(0))
>>> start = 1_767_571_200_000
>>> rates = IncidentRates(customer_leak_per_meter_day=5.0)
>>> incidents = Incidents(fleet, rates, np.random.default_rng(2), start, start + 86_400_000)
>>> incidents.start_new(start, start + 900_000, protected=np.zeros(100, bool))
>>> meters, litres = incidents.leak_litres(start, start + 900_000)
>>> len(meters) > 0, bool((litres > 0).all())
(True, True)
"""

from __future__ import annotations

import heapq
from enum import IntEnum

import numpy as np

from simulators.config import IncidentRates
from simulators.fleet import Fleet
from simulators.truth import Episode

MS_PER_DAY = 86_400_000
MS_PER_HOUR = 3_600_000


class Fault(IntEnum):
    """Meter faults; 0 means healthy."""

    NONE = 0
    STUCK = 1
    STOPPED = 2
    SPIKES = 3
    DRIFT = 4
    BATTERY_DEPLETION = 5


LEAK_MIN_LPH, LEAK_MAX_LPH = 2.0, 100.0
LEAK_GROWING_SHARE = 0.5
LEAK_MAX_GROWTH_PER_DAY = 0.10
LEAK_GROWTH_CAP = 5.0
LEAK_MEDIAN_DAYS = 30.0
FAULT_MEDIAN_DAYS = {Fault.STUCK: 5.0, Fault.STOPPED: 20.0, Fault.SPIKES: 3.0,
                     Fault.DRIFT: 30.0}
DURATION_SIGMA = 0.8
STUCK_IDLE_LPM = (0.2, 2.0)  # the value a register sticks at if it sticks while idle
SPIKE_SHARE = (0.05, 0.20)
SPIKE_LPM = (50.0, 500.0)
DRIFT_PER_DAY = (0.005, 0.03)
BATTERY_NOMINAL_V = (3.55, 3.67)
BATTERY_NOISE_V = 0.004
BATTERY_CUTOFF_V = 3.0
BATTERY_DECLINE_DAYS = (2.0, 14.0)
METER_BIAS_SD, METER_BIAS_MAX = 0.01, 0.03
NETWORK_LEAK_LPH = (200.0, 3000.0)
BURST_LPH = (5_000.0, 40_000.0)
BURST_DROP_BAR = (0.5, 2.0)
BURST_REPAIR_H = (2.0, 12.0)


class Incidents:
    """Starts, applies and records incidents for the whole fleet, step by step."""

    def __init__(
        self, fleet: Fleet, rates: IncidentRates, rng: np.random.Generator,
        start_ms: int, end_ms: int,
    ) -> None:
        n = fleet.customer_count
        self._fleet, self._rates, self._rng = fleet, rates, rng
        self._run_end = end_ms
        self.bias = 1 + np.clip(rng.normal(0, METER_BIAS_SD, n), -METER_BIAS_MAX, METER_BIAS_MAX)
        """Each customer meter's multiplicative accuracy bias."""
        self.battery_nominal_v = rng.uniform(*BATTERY_NOMINAL_V, n)
        self.leak_until = np.zeros(n, np.int64)
        """End of each meter's current customer leak (0 or in the past: none)."""
        self._leak_start = np.zeros(n, np.int64)
        self._leak_lph = np.zeros(n)
        self._leak_growth = np.zeros(n)
        self.fault = np.zeros(n, np.int8)
        """Each meter's current :class:`Fault` (set from its start to its end)."""
        self.fault_until = np.zeros(n, np.int64)
        self._fault_start = np.zeros(n, np.int64)
        self._fault_param = np.zeros(n)
        self._fault_value = np.full(n, np.nan)
        self.silent_after = np.full(n, np.iinfo(np.int64).max)
        """Event time after which a meter whose battery died sends nothing."""
        d = fleet.district_count
        self._network_leak_until = np.zeros(d, np.int64)
        self._network_leak_start = np.zeros(d, np.int64)
        self._network_leak_lph = np.zeros(d)
        self._burst_start = np.zeros(d, np.int64)
        self._burst_until = np.zeros(d, np.int64)
        self._burst_lph = np.zeros(d)
        self._burst_drop = np.zeros(d)
        self._pending: list[tuple[int, int, Episode]] = []  # heap by end time
        self._count = 0
        self.started: dict[str, int] = {}
        """How many incidents of each kind started so far."""

    # -- onsets -------------------------------------------------------------------------------

    def start_new(self, start_ms: int, end_ms: int, protected: np.ndarray) -> None:
        """Draw the incidents that begin in ``[start_ms, end_ms)``.

        ``protected`` marks customer meters that must not start a leak or a fault now
        (their clock is skewed).
        """
        rates = self._rates
        days = (end_ms - start_ms) / MS_PER_DAY
        free = ~protected & (self.leak_until <= start_ms) & (self.fault == Fault.NONE) & (
            self.silent_after == np.iinfo(np.int64).max)
        for meter, at in self._onsets(rates.customer_leak_per_meter_day, days, free, start_ms,
                                      end_ms):
            self._start_leak(meter, at)
            free[meter] = False
        for fault, rate in ((Fault.STUCK, rates.stuck_per_meter_day),
                            (Fault.STOPPED, rates.stopped_per_meter_day),
                            (Fault.SPIKES, rates.spikes_per_meter_day),
                            (Fault.DRIFT, rates.drift_per_meter_day),
                            (Fault.BATTERY_DEPLETION, rates.battery_depletion_per_meter_day)):
            for meter, at in self._onsets(rate, days, free, start_ms, end_ms):
                self._start_fault(meter, Fault(fault), at)
                free[meter] = False
        idle = self._network_leak_until <= start_ms
        for district, at in self._onsets(rates.network_leak_per_district_day, days, idle,
                                         start_ms, end_ms):
            self._start_network_leak(district, at)
        idle = self._burst_until <= start_ms
        for district, at in self._onsets(rates.burst_per_district_day, days, idle, start_ms,
                                         end_ms):
            self._start_burst(district, at)

    def _onsets(
        self, per_day: float, days: float, eligible: np.ndarray, start_ms: int, end_ms: int
    ) -> list[tuple[int, int]]:
        count = self._rng.poisson(per_day * days * len(eligible)) if per_day else 0
        if not count:
            return []
        chosen = np.unique(self._rng.integers(0, len(eligible), count))
        chosen = chosen[eligible[chosen]]
        times = self._rng.integers(start_ms, end_ms, len(chosen))
        return list(zip(chosen.tolist(), times.tolist(), strict=True))

    def _duration(self, median_days: float) -> int:
        days = median_days * np.exp(self._rng.normal(0, DURATION_SIGMA))
        return int(max(days, 1 / 24) * MS_PER_DAY)

    def _start_leak(self, meter: int, at: int) -> None:
        rng = self._rng
        lph = float(np.exp(rng.uniform(np.log(LEAK_MIN_LPH), np.log(LEAK_MAX_LPH))))
        growth = float(rng.uniform(0, LEAK_MAX_GROWTH_PER_DAY)) \
            if rng.random() < LEAK_GROWING_SHARE else 0.0
        until = at + self._duration(LEAK_MEDIAN_DAYS)
        self._leak_start[meter], self.leak_until[meter] = at, until
        self._leak_lph[meter], self._leak_growth[meter] = lph, growth
        self._record("customer_leak", meter, at, until, lph, "lph",
                     f"growth_per_day={growth:.4f};cap_lph={lph * LEAK_GROWTH_CAP:.3f}")

    def _start_fault(self, meter: int, fault: Fault, at: int) -> None:
        rng = self._rng
        self._fault_start[meter] = at
        self._fault_value[meter] = np.nan
        if fault == Fault.BATTERY_DEPLETION:
            decline = int(rng.uniform(*BATTERY_DECLINE_DAYS) * MS_PER_DAY)
            self.fault[meter], self.fault_until[meter] = fault, self._run_end
            self._fault_param[meter] = decline
            self.silent_after[meter] = at + decline
            self._record("battery_depletion", meter, at, self._run_end, BATTERY_CUTOFF_V, "v",
                         f"silent_from_ms={at + decline}")
            return
        until = at + self._duration(FAULT_MEDIAN_DAYS[fault])
        self.fault[meter], self.fault_until[meter] = fault, until
        if fault == Fault.SPIKES:
            param, unit, detail = float(rng.uniform(*SPIKE_SHARE)), "ratio", "spike_lpm=50..500"
        elif fault == Fault.DRIFT:
            param = float(rng.uniform(*DRIFT_PER_DAY) * rng.choice([-1, 1]))
            unit, detail = "ratio", "per_day=1"
        else:
            param, unit, detail = 0.0, "lpm", ""
        self._fault_param[meter] = param
        self._record(fault.name.lower(), meter, at, until, param, unit, detail)

    def _start_network_leak(self, district: int, at: int) -> None:
        lph = float(np.exp(self._rng.uniform(*np.log(NETWORK_LEAK_LPH))))
        until = at + self._duration(LEAK_MEDIAN_DAYS)
        self._network_leak_start[district], self._network_leak_until[district] = at, until
        self._network_leak_lph[district] = lph
        self._record("network_leak", -1, at, until, lph, "lph", "pressure_exponent=1.0",
                     district)

    def _start_burst(self, district: int, at: int) -> None:
        rng = self._rng
        lph = float(np.exp(rng.uniform(*np.log(BURST_LPH))))
        drop = float(rng.uniform(*BURST_DROP_BAR))
        until = at + int(rng.uniform(*BURST_REPAIR_H) * MS_PER_HOUR)
        self._burst_start[district], self._burst_until[district] = at, until
        self._burst_lph[district], self._burst_drop[district] = lph, drop
        self._record("burst", -1, at, until, lph, "lph", f"pressure_drop_bar={drop:.3f}",
                     district)

    def _record(self, kind: str, device: int, start: int, end: int, magnitude: float,
                unit: str, detail: str, district: int | None = None) -> None:
        self._count += 1
        self.started[kind] = self.started.get(kind, 0) + 1
        where = int(self._fleet.district_of[device]) if district is None else district
        episode = Episode(f"inc-{self._count:07d}", kind, device, where, start, end,
                          round(magnitude, 6), unit, detail)
        heapq.heappush(self._pending, (end, self._count, episode))

    # -- effects ------------------------------------------------------------------------------

    def leak_litres(self, start_ms: int, end_ms: int) -> tuple[np.ndarray, np.ndarray]:
        """Customer meters with a leak in ``[start_ms, end_ms)`` and the litres it lost."""
        meters = np.flatnonzero(self.leak_until > start_ms)
        begin = np.maximum(self._leak_start[meters], start_ms)
        finish = np.minimum(self.leak_until[meters], end_ms)
        keep = finish > begin
        meters, begin, finish = meters[keep], begin[keep], finish[keep]
        return meters, self._leak_lph_at(meters, (begin + finish) / 2) * (
            finish - begin) / MS_PER_HOUR

    def _leak_lph_at(self, meters: np.ndarray, at_ms: np.ndarray) -> np.ndarray:
        days = (at_ms - self._leak_start[meters]) / MS_PER_DAY
        base = self._leak_lph[meters]
        return np.minimum(base * np.exp(self._leak_growth[meters] * days),
                          base * LEAK_GROWTH_CAP)

    def apply_meter_faults(self, ts_ms: int, flow_lpm: np.ndarray) -> None:
        """Turn true flows (all customer meters, reading at ``ts_ms``) into faulty readings."""
        meters = np.flatnonzero(self.fault)
        if not meters.size:
            return
        active = meters[(self._fault_start[meters] <= ts_ms) & (ts_ms < self.fault_until[meters])]
        kinds = self.fault[active]
        stuck = active[kinds == Fault.STUCK]
        unset = stuck[np.isnan(self._fault_value[stuck])]
        typical = self._rng.uniform(*STUCK_IDLE_LPM, len(unset))  # stuck while idle
        self._fault_value[unset] = np.where(flow_lpm[unset] > 0, flow_lpm[unset], typical)
        flow_lpm[stuck] = self._fault_value[stuck]
        flow_lpm[active[kinds == Fault.STOPPED]] = 0.0
        spiky = active[kinds == Fault.SPIKES]
        spiky = spiky[self._rng.random(len(spiky)) < self._fault_param[spiky]]
        flow_lpm[spiky] += self._rng.uniform(*SPIKE_LPM, len(spiky))
        drift = active[kinds == Fault.DRIFT]
        days = (ts_ms - self._fault_start[drift]) / MS_PER_DAY
        flow_lpm[drift] *= np.maximum(0.0, 1 + self._fault_param[drift] * days)
        ended = meters[(self.fault_until[meters] <= ts_ms)]
        self.fault[ended] = Fault.NONE

    def battery_v(self, ts_ms: int, water_c: np.ndarray) -> np.ndarray:
        """Battery voltage of every customer meter at ``ts_ms`` (water temperature in °C)."""
        volts = self.battery_nominal_v + 0.002 * (water_c - 12.0) + self._rng.normal(
            0, BATTERY_NOISE_V, len(water_c))
        dying = np.flatnonzero(self.silent_after < np.iinfo(np.int64).max)
        started = dying[self._fault_start[dying] <= ts_ms]
        if started.size:
            progress = (ts_ms - self._fault_start[started]) / self._fault_param[started]
            fall = (self.battery_nominal_v[started] - BATTERY_CUTOFF_V) * np.minimum(
                progress, 1.0) ** 2
            volts[started] = np.maximum(self.battery_nominal_v[started] - fall,
                                        BATTERY_CUTOFF_V)
        return volts

    def alive(self, ts_ms: int, cadence_ms: int) -> np.ndarray:
        """Customer meters that still send at ``ts_ms``: the last reading reports cut-off."""
        return self.silent_after > ts_ms - cadence_ms

    def district_flows(self, times_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Network leak L/min (at nominal pressure), burst L/min and burst pressure drop (bar).

        Each array is (district, time) for event times ``times_ms``.
        """
        t = times_ms[None, :]
        leak = (self._network_leak_start[:, None] <= t) & (t < self._network_leak_until[:, None])
        burst = (self._burst_start[:, None] <= t) & (t < self._burst_until[:, None])
        return (leak * (self._network_leak_lph / 60)[:, None],
                burst * (self._burst_lph / 60)[:, None],
                burst * self._burst_drop[:, None])

    # -- ground truth -------------------------------------------------------------------------

    def ongoing(self) -> list[Episode]:
        """Episodes that have begun and not ended yet, with their planned ends."""
        return [episode for _, _, episode in self._pending]

    def drain_ended(self, now_ms: int) -> list[Episode]:
        """Episodes that ended at or before ``now_ms``, oldest end first."""
        ended: list[Episode] = []
        while self._pending and self._pending[0][0] <= now_ms:
            ended.append(heapq.heappop(self._pending)[2])
        return ended

    def finish(self) -> list[Episode]:
        """All remaining episodes, their ends clipped to the end of the run."""
        remaining: list[Episode] = []
        while self._pending:
            episode = heapq.heappop(self._pending)[2]
            if episode.end_ms > self._run_end:
                detail = f"{episode.detail};ongoing=1" if episode.detail else "ongoing=1"
                episode = Episode(episode.episode_id, episode.kind, episode.device,
                                  episode.district, episode.start_ms, self._run_end,
                                  episode.magnitude, episode.unit, detail)
            remaining.append(episode)
        return remaining
