"""Meter faults: stuck, impossible values, stopped, drift, battery depletion and clock skew.

One detector per customer meter scores six faults and reports the strongest (``fault`` in the
evidence, a :data:`FAULT_NAMES` code). Counters advance with every reading; learned
baselines (typical daily volume, typical daily peak, battery level, clock phase) learn only
from readings that are not flagged.

- **stuck**: the same non-zero value repeated for ``stuck_h`` observed hours (a healthy
  meter's reading varies with use; a leak alone can repeat a value overnight, so
  ``stuck_h`` spans more than a night). Score ``0.9 * hours / stuck_h``. A value that
  comes back after a run of it was broken by other values is a *floor* (a leak under
  occasional use), not a stuck register, and does not count.
- **impossible**: a negative flow, or a jump of more than ``jump_lpm`` to above both
  ``max_flow_lpm`` (what a DN15 meter passes) and ``spike_factor`` times the meter's learned
  daily peak. Score 1.
- **stopped**: 0 while the meter's own use should have shown. ``missed_uses`` adds up,
  over the hours of zeros, the uses (of ``event_l`` litres) that the meter's learned hourly
  profile (L/h above its lowest flow of the day before, per hour of the day, weekdays and
  weekends apart, so a repaired leak is no missed use) expects, each hour
  weighted by the optional input ``district_demand_ratio`` (the district's customer flow
  over its baseline for that hour and day type: at most 1, 0 below 0.5 when the whole
  district is down, 1 when unknown). Missing ``ln(1 / stopped_p)`` uses happens by chance
  with probability ``stopped_p`` (Poisson). Score ``0.9 * missed_uses / ln(1 /
  stopped_p)`` once the zeros last ``busy_stopped_h`` while the district's demand is known,
  ``stopped_h`` otherwise. An empty home, or an office at night and over its closed
  weekend, expects no uses then, so its zeros are no evidence. Meters using under
  ``min_daily_l`` a day are not judged.
- **drift**: a fast (``fast_alpha``) against a slow (``slow_alpha``) exponentially weighted
  mean of the log daily volume, each day's step clipped to ±``clip_log`` so that one pool
  fill cannot move it; the gap is measured in units of the meter's own day-to-day spread.
  Score ``0.9 * gap / max(drift_z * spread, drift_log_min)`` after ``min_days`` days. A
  meter's daily volume varies ~0.27 in log from day to day and a week's mean ~0.15 from its
  first two weeks' (tuning seed 11), so only a drift that has moved the volume by a half
  or more stands out; a baseline that stopped learning once the gap opened would follow
  no seasonal change (garden watering) and a leak would look like drift.
- **battery**: the voltage's drop below its learned level (a slow mean, ``battery_alpha``
  per reading, so a decline over days is not learned as normal), against
  ``battery_drop_v`` (and 6 times the mean reading-to-reading change), or any reading at or below
  ``battery_low_v``.
- **clock skew**: a timestamp off the meter's learned phase on its cadence grid
  (``cadence_s``) by more than ``phase_tolerance_s``: interval meters report at interval
  ends, a skewed clock does not. Score 1 after ``min_phase_readings`` agreeing readings.

Per meter: 364 bytes of numpy state in the fleet path (200 of them the hourly profile and its
counts); about 2.3 KB pickled as one :class:`SensorFaultDetector`.

>>> detector = SensorFaultDetector()
>>> start = 1_767_571_200_000
>>> for i in range(1, 200):
...     x = {"ts_ms": start + i * 900_000, "flow_lpm": 1.5 if i > 100 else i % 4 * 0.5,
...          "battery_v": 3.6}
...     detector.learn_one(x)
>>> x = {"ts_ms": start + 200 * 900_000, "flow_lpm": 1.5, "battery_v": 3.6}
>>> evidence = detector.explain(x)
>>> FAULT_NAMES[int(evidence["fault"])], round(evidence["repeat_h"], 2), evidence["score"]
('stuck', 24.75, 1.0)
>>> skewed = {"ts_ms": start + 201 * 900_000 + 120_000, "flow_lpm": 1.0, "battery_v": 3.6}
>>> FAULT_NAMES[int(detector.explain(skewed)["fault"])]
'clock_skew'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from models.water.base import MS_PER_DAY, ColumnarDetector, FleetDetector

FAULT_NAMES = ("none", "stuck", "impossible", "stopped", "drift", "battery", "clock_skew")
"""Fault codes of the ``fault`` evidence, by index."""


@dataclass(frozen=True)
class SensorFaultSettings:
    """Hyper-parameters of :class:`SensorFaultFleet` (see the module docs)."""

    zero_lpm: float = 0.005
    stuck_h: float = 16.0
    max_flow_lpm: float = 45.0
    spike_factor: float = 3.0
    jump_lpm: float = 40.0
    stopped_h: float = 36.0
    stopped_p: float = 1e-6
    busy_stopped_h: float = 18.0
    profile_alpha: float = 0.05
    event_l: float = 10.0
    min_daily_l: float = 20.0
    fast_alpha: float = 0.3
    slow_alpha: float = 0.05
    clip_log: float = 0.7
    drift_z: float = 4.0
    drift_log_min: float = 0.25
    min_days: int = 14
    battery_drop_v: float = 0.05
    battery_alpha: float = 0.005
    battery_low_v: float = 3.2
    cadence_s: int = 900
    phase_tolerance_s: float = 5.0
    min_phase_readings: int = 4
    threshold: float = 0.9


def profile_slot(ts_ms: np.ndarray) -> np.ndarray:
    """The hourly-profile slot of readings ending at ``ts_ms``.

    The hour of the day (UTC), plus 24 on Saturdays and Sundays.

    >>> monday, saturday = 1_767_571_200_000, 1_767_571_200_000 + 5 * MS_PER_DAY
    >>> profile_slot(np.array([monday + 900_000, monday + 3_600_000 + 1, saturday + 900_000]))
    array([ 0,  1, 24])
    """
    start = np.asarray(ts_ms, np.int64) - 1  # a reading covers the interval it ends
    weekend = (start // MS_PER_DAY + 3) % 7 >= 5  # 0 on Mondays: 1970-01-01 was a Thursday
    return ((start // 3_600_000) % 24 + 24 * weekend).astype(np.int64)


class SensorFaultFleet(FleetDetector):
    """Meter-fault state of many customer meters; inputs ``flow_lpm``, ``battery_v``."""

    FIELDS: ClassVar = {
        "last_flow": (np.float64, np.nan),
        "repeat_h": (np.float64, 0.0),
        "floor_flow": (np.float64, np.nan),
        "zero_h": (np.float64, 0.0),
        "missed_uses": (np.float64, 0.0),
        "profile_lph": (np.dtype((np.float32, 48)), 0.0),
        "profile_n": (np.dtype((np.int32, 2)), 0),
        "low_today_lpm": (np.float32, np.inf),
        "low_lpm": (np.float32, 0.0),
        "day_id": (np.int64, -1),
        "day_l": (np.float64, 0.0),
        "day_h": (np.float64, 0.0),
        "day_max": (np.float64, 0.0),
        "days": (np.int32, 0),
        "fast_log": (np.float64, 0.0),
        "slow_log": (np.float64, 0.0),
        "spread_log": (np.float64, 0.0),
        "hi_flow": (np.float64, 0.0),
        "battery_base": (np.float64, np.nan),
        "battery_dev": (np.float64, 0.0),
        "battery_last": (np.float64, np.nan),
        "battery_n": (np.int32, 0),
        "phase_ms": (np.int64, -1),
        "phase_n": (np.int32, 0),
    }
    INPUTS = ("flow_lpm", "battery_v", "district_demand_ratio")
    OPTIONAL = ("battery_v", "district_demand_ratio")
    EVIDENCE = ("fault", "repeat_h", "zero_h", "missed_uses", "drift_log", "battery_drop_v",
                "phase_off_s")

    def __init__(self, settings: SensorFaultSettings | None = None, capacity: int = 0) -> None:
        self.settings = settings or SensorFaultSettings()
        self.threshold = self.settings.threshold
        super().__init__(capacity)

    def _score(self, slot: np.ndarray, cols: dict[str, np.ndarray],
               dt_h: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        cfg = self.settings
        flow, ts, volts = cols["flow_lpm"], cols["ts_ms"], cols["battery_v"]
        th = cfg.threshold
        nonzero = flow > cfg.zero_lpm
        prev = self.last_flow[slot]
        repeat = np.where(nonzero & (flow == prev), self.repeat_h[slot] + dt_h, 0.0)
        floor = flow == self.floor_flow[slot]  # a value that came back after others: a floor
        s_stuck = np.where(floor, 0.0, np.clip(th * repeat / cfg.stuck_h, 0.0, 1.0))

        limit = np.maximum(cfg.max_flow_lpm, cfg.spike_factor * self.hi_flow[slot])
        jump = flow - np.where(np.isnan(prev), 0.0, prev)
        s_impossible = np.where((flow < 0) | ((flow > limit) & (jump > cfg.jump_lpm)), 1.0, 0.0)

        zero_h = np.where(nonzero, 0.0, self.zero_h[slot] + dt_h)
        typical = np.exp(self.slow_log[slot]) * (self.days[slot] > 0)
        # uses the meter's own hourly profile expects in its hours of zeros, each weighted by
        # the district's demand ratio (unknown: 1; a district that is down: 0)
        hour_slot = profile_slot(ts)
        learned = 1 - (1 - cfg.profile_alpha) ** (self.profile_n[slot, hour_slot // 24] / 24)
        expected = np.where(learned > 0, self.profile_lph[slot, hour_slot] / np.maximum(
            learned, 1e-9), 0.0) / cfg.event_l * dt_h  # bias-corrected: the profile starts at 0
        ratio = cols["district_demand_ratio"]
        known = ~np.isnan(ratio)
        weight = np.where(known, np.where(ratio >= 0.5, np.minimum(ratio, 1.0), 0.0), 1.0)
        missed = np.where(nonzero, 0.0, self.missed_uses[slot] + expected * weight)
        floor_h = np.where(known, cfg.busy_stopped_h, cfg.stopped_h)
        s_stopped = np.where((typical >= cfg.min_daily_l) & (zero_h >= floor_h),
                             np.clip(th * missed / np.log(1 / cfg.stopped_p), 0.0, 1.0), 0.0)

        # daily volume: a reading of a new day closes the stored day
        day = ts // MS_PER_DAY
        closing = (self.day_id[slot] >= 0) & (day != self.day_id[slot]) & (
            self.day_h[slot] >= 16.0)
        day_l = np.maximum(self.day_l[slot] * 24.0 / np.maximum(self.day_h[slot], 1e-9), 1.0)
        step = np.clip(np.log(day_l) - self.slow_log[slot], -cfg.clip_log, cfg.clip_log)
        first_day = self.days[slot] == 0
        fast = np.where(closing, np.where(first_day, np.log(day_l),
                                          self.fast_log[slot] + cfg.fast_alpha * (
                                              self.slow_log[slot] + step - self.fast_log[slot])),
                        self.fast_log[slot])
        gap = np.abs(fast - self.slow_log[slot])
        noise = 1.25 * self.spread_log[slot] * np.sqrt(cfg.fast_alpha / (2 - cfg.fast_alpha))
        s_drift = np.where((self.days[slot] >= cfg.min_days) & (typical >= cfg.min_daily_l),
                           np.clip(th * gap / np.maximum(cfg.drift_z * noise, cfg.drift_log_min),
                                   0.0, 1.0), 0.0)

        base = self.battery_base[slot]
        drop = np.where(np.isnan(volts) | np.isnan(base), 0.0, base - volts)
        battery_scale = np.maximum(cfg.battery_drop_v, 6 * self.battery_dev[slot])
        s_battery = np.where(self.battery_n[slot] >= 8,
                             np.clip(th * drop / battery_scale, 0.0, 1.0), 0.0)
        s_battery = np.where(volts <= cfg.battery_low_v, 1.0, s_battery)

        cadence = cfg.cadence_s * 1000
        phase = ts % cadence
        stored = self.phase_ms[slot]
        off = np.abs(phase - stored)
        off = np.minimum(off, cadence - off)
        s_clock = np.where((self.phase_n[slot] >= cfg.min_phase_readings)
                           & (off > cfg.phase_tolerance_s * 1000), 1.0, 0.0)

        scores = np.stack([np.zeros(len(slot)), s_stuck, s_impossible, s_stopped, s_drift,
                           s_battery, s_clock])
        fault = np.argmax(scores, axis=0)
        score = scores[fault, np.arange(len(slot))]
        aux = {
            "fault": np.where(score > 0, fault, 0).astype(np.float64), "repeat_h": repeat,
            "zero_h": zero_h, "missed_uses": missed, "drift_log": fast - self.slow_log[slot],
            "battery_drop_v": drop,
            "phase_off_s": np.where(stored >= 0, off / 1000, 0.0),
            "_day": day, "_closing": closing, "_day_l": day_l, "_fast": fast, "_phase": phase,
            "_off": off, "_s_drift": s_drift, "_s_battery": s_battery, "_s_clock": s_clock,
            "_s_impossible": s_impossible, "_hour_slot": hour_slot,
        }
        return score, aux

    def _learn(self, slot: np.ndarray, cols: dict[str, np.ndarray], score: np.ndarray,
               aux: dict[str, np.ndarray]) -> None:
        cfg = self.settings
        th = cfg.threshold
        flow, volts, dt_h = cols["flow_lpm"], cols["battery_v"], aux["dt_h"]
        broke = (cols["flow_lpm"] != self.last_flow[slot]) & (self.repeat_h[slot] >= 1.0)
        self.floor_flow[slot] = np.where(broke, self.last_flow[slot], self.floor_flow[slot])
        self.repeat_h[slot] = aux["repeat_h"]
        self.zero_h[slot] = aux["zero_h"]
        self.missed_uses[slot] = aux["missed_uses"]
        clean = score < th
        # hourly profile (L/h) of uses above yesterday's lowest flow (a leak or a base flow
        # that stops is no missed use): learned from clean readings in their hour and day type
        target, hour_slot = slot[clean], aux["_hour_slot"][clean]
        old = self.profile_lph[target, hour_slot]
        uses_lph = np.maximum(flow[clean] - self.low_lpm[target], 0.0) * 60.0
        self.profile_lph[target, hour_slot] = old + cfg.profile_alpha * (uses_lph - old)
        np.add.at(self.profile_n, (target, hour_slot // 24), 1)
        new_day = aux["_day"] != self.day_id[slot]
        low_today = self.low_today_lpm[slot]
        self.low_lpm[slot] = np.where(new_day & np.isfinite(low_today), low_today,
                                      self.low_lpm[slot])
        real = aux["_s_impossible"] < th
        self.low_today_lpm[slot] = np.where(new_day, np.where(real, flow, np.inf), np.where(
            real, np.minimum(low_today, flow), low_today))
        # close days: the fast mean always moves, the slow baseline only if not drifting
        closing = aux["_closing"]
        done = slot[closing]
        if done.size:
            log_l = np.log(aux["_day_l"][closing])
            self.fast_log[done] = aux["_fast"][closing]
            first = self.days[done] == 0
            learn = first | (aux["_s_drift"][closing] < th)
            slow = self.slow_log[done]
            a = cfg.slow_alpha
            new_slow = np.where(first, log_l, slow + a * np.clip(log_l - slow, -cfg.clip_log,
                                                                  cfg.clip_log))
            new_spread = np.where(first, 0.3, (1 - a) * self.spread_log[done]
                                  + a * np.minimum(np.abs(log_l - slow), cfg.clip_log))
            self.slow_log[done] = np.where(learn, new_slow, slow)
            self.spread_log[done] = np.where(learn, new_spread, self.spread_log[done])
            peak = self.day_max[done]
            self.hi_flow[done] = np.where(first, peak, 0.9 * self.hi_flow[done] + 0.1 * peak)
            self.days[done] += 1
        new_day = aux["_day"] != self.day_id[slot]
        counted = clean | (aux["_s_impossible"] < th)  # impossible readings are not volume
        litres = np.where(counted, flow * dt_h * 60.0, 0.0)
        self.day_l[slot] = np.where(new_day, litres, self.day_l[slot] + litres)
        self.day_h[slot] = np.where(new_day, dt_h, self.day_h[slot] + dt_h)
        peak = np.where(aux["_s_impossible"] < th, flow, 0.0)
        self.day_max[slot] = np.where(new_day, peak, np.maximum(self.day_max[slot], peak))
        self.day_id[slot] = aux["_day"]
        self.last_flow[slot] = flow
        # battery level: learned from readings whose battery score is low
        good = ~np.isnan(volts) & (aux["_s_battery"] < th)
        target, v = slot[good], volts[good]
        first = self.battery_n[target] == 0
        base = self.battery_base[target]
        b = cfg.battery_alpha
        step = np.abs(v - self.battery_last[target])  # reading-to-reading: blind to a trend
        self.battery_dev[target] = np.where(first | np.isnan(step), self.battery_dev[target],
                                            0.95 * self.battery_dev[target] + 0.05 * step)
        self.battery_base[target] = np.where(first, v, (1 - b) * base + b * v)
        self.battery_last[target] = v
        self.battery_n[target] += 1
        # clock phase: learned from readings that are not off-phase
        on_grid = aux["_s_clock"] < th
        target = slot[on_grid]
        phase = aux["_phase"][on_grid]
        agree = (self.phase_ms[target] >= 0) & (aux["_off"][on_grid]
                                                <= cfg.phase_tolerance_s * 1000)
        self.phase_n[target] = np.where(agree, self.phase_n[target] + 1, 1)
        self.phase_ms[target] = np.where(agree, self.phase_ms[target], phase)


class SensorFaultDetector(ColumnarDetector):
    """One customer meter's fault detector (the contract over :class:`SensorFaultFleet`).

    ``x`` holds ``ts_ms``, ``flow_lpm`` and optionally ``battery_v`` and
    ``district_demand_ratio``.
    """

    FLEET = SensorFaultFleet

    def __init__(self, settings: SensorFaultSettings | None = None) -> None:
        super().__init__(settings or SensorFaultSettings())
        self.threshold = self.settings.threshold
