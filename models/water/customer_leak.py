"""Customer-side leak: flow that never returns to ~0, and night minimum rising over baseline.

A healthy home is idle most of the night, so its interval flow reads exactly 0 many times a
day; a leak behind the meter (a running cistern, a dripping tap) adds a steady flow, so the
meter never reads 0 again. Two rules, per customer meter:

1. **Never ~0** (meters that have read ~0 before): the *observed* hours since the flow last
   read at most ``zero_lpm`` (gaps in the data count at most :attr:`FleetDetector.MAX_STEP_H`
   per reading, so missing data is never taken as evidence). Score ``0.9 * hours /
   window_h``: the threshold 0.9 is crossed after ``window_h`` hours (24 h by default) of
   flow that never reached ~0. The leak rate is estimated as the smallest interval flow in
   that time (``est_leak_lph``); it reads every leak above the meter's resolution (3
   decimals: 0.06 L/h), so the simulator's smallest leaks (2 L/h) are visible.
2. **Night minimum rising** (meters that never read ~0 in their first
   ``learn_continuous_h`` hours: round-the-clock businesses, hospitals): the minimum flow in
   the night window (``night_start_h``–``night_end_h`` UTC) against the meter's own learned
   baseline (exponentially weighted mean and mean absolute deviation of past nights, learned
   only from nights that were not flagged). ``z = rise / scale`` with ``scale`` at least
   ``relative_floor`` of the baseline and ``rise_floor_lpm``; score ``0.9 * z / z_alarm``,
   held just under the threshold unless the night before scored at least ``guard`` too
   (``confirm_nights``: a leak persists, while a skewed clock or one odd night does not).
   Nights scoring ``guard`` or more are not learned into the baseline.
   The verdict of a night holds until the next night has ``min_night_readings`` readings, so
   an alarm does not flicker by day. The leak rate is estimated as the rise.

``learn_continuous_h=None`` switches the second rule off: every meter is judged by rule 1
from its first reading, so a round-the-clock business alarms until feedback
(:meth:`CustomerLeakFleet.forgive`) teaches the detector that its flow is normal.

Feedback: after a false alarm the detector *forgives* the pattern: estimated leak rates
within a factor ``forgive_ratio`` of the one that was wrongly flagged score at most 0.5 on
that meter from then on; a larger flow (a real leak on top) still alarms.

Scores are calibrated by construction: each is the fraction of the alarm level reached by a
statistic measured against the meter's own history (hours without ~0, or night rise in units
of its own night-to-night spread), so the threshold 0.9 means the same on every meter.

State: :meth:`FleetDetector.state_bytes` is 113 bytes per meter in the fleet path; a
pickled one-meter :class:`CustomerLeakDetector` is about 1.5 KB (numpy array headers).

>>> detector = CustomerLeakDetector()
>>> start = 1_767_571_200_000  # a Monday, 00:00 UTC
>>> for i in range(1, 4 * 48):  # 48 h of 15-minute readings
...     flow = 0.0 if i < 4 * 10 and i % 3 else 0.25  # a 15 L/h leak starts at 10:00
...     x = {"ts_ms": start + i * 900_000, "flow_lpm": flow + (0.5 if i % 7 == 0 else 0)}
...     score, evidence = detector.score_one(x), detector.explain(x)
...     detector.learn_one(x)
>>> round(score, 2), evidence["est_leak_lph"], evidence["since_zero_h"]
(1.0, 15.0, 38.25)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from models.water.base import MS_PER_DAY, MS_PER_HOUR, ColumnarDetector, FleetDetector

RULE_NONE, RULE_NEVER_ZERO, RULE_NIGHT_RISE = 0, 1, 2
FORGIVEN_CAP = 0.5


@dataclass(frozen=True)
class CustomerLeakSettings:
    """Hyper-parameters of :class:`CustomerLeakFleet` (see the module docs)."""

    window_h: float = 24.0
    zero_lpm: float = 0.005
    learn_continuous_h: float | None = 48.0
    night_start_h: float = 1.0
    night_end_h: float = 5.0
    min_night_readings: int = 8
    min_nights: int = 3
    confirm_nights: bool = True
    guard: float = 0.6
    z_alarm: float = 6.0
    rise_floor_lpm: float = 0.05
    relative_floor: float = 0.1
    baseline_alpha: float = 0.2
    forgive_ratio: float = 2.0
    threshold: float = 0.9


class CustomerLeakFleet(FleetDetector):
    """Customer-leak state of many meters (see the module docs); input ``flow_lpm``."""

    FIELDS: ClassVar = {
        "hist_h": (np.float64, 0.0),
        "ever_zero": (np.bool_, False),
        "since_zero_h": (np.float64, 0.0),
        "run_min": (np.float64, np.inf),
        "night_id": (np.int64, -1),
        "night_min": (np.float64, np.inf),
        "night_n": (np.int32, 0),
        "night_score": (np.float64, 0.0),
        "night_raw": (np.float64, 0.0),
        "night_rise": (np.float64, 0.0),
        "base_min": (np.float64, 0.0),
        "base_dev": (np.float64, 0.0),
        "base_nights": (np.int32, 0),
        "forgive_lo": (np.float64, np.nan),
        "forgive_hi": (np.float64, np.nan),
    }
    INPUTS = ("flow_lpm",)
    EVIDENCE = ("rule", "since_zero_h", "est_leak_lph", "night_min_lph", "baseline_night_lph")

    def __init__(self, settings: CustomerLeakSettings | None = None, capacity: int = 0) -> None:
        self.settings = settings or CustomerLeakSettings()
        self.threshold = self.settings.threshold
        super().__init__(capacity)

    def _verdict(self, slot: np.ndarray, night_min: np.ndarray,
                 night_n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Score and rise (L/min) of a night's minimum against the learned baseline."""
        cfg = self.settings
        base = self.base_min[slot]
        scale = np.maximum(np.maximum(1.25 * self.base_dev[slot], cfg.relative_floor * base),
                           cfg.rise_floor_lpm)
        rise = np.where(np.isfinite(night_min), night_min - base, 0.0)
        usable = (night_n >= cfg.min_night_readings) & (self.base_nights[slot] >= cfg.min_nights)
        score = np.where(usable, np.clip(cfg.threshold * rise / scale / cfg.z_alarm, 0.0, 1.0),
                         0.0)
        return score, np.where(usable, np.maximum(rise, 0.0), 0.0)

    def _confirmed(self, raw: np.ndarray, previous_raw: np.ndarray) -> np.ndarray:
        """A night rise alarms only when the night before was flagged too (if configured)."""
        if not self.settings.confirm_nights:
            return raw
        th = self.settings.threshold
        return np.where(previous_raw >= self.settings.guard, raw, np.minimum(raw, th - 0.01))

    def _score(self, slot: np.ndarray, cols: dict[str, np.ndarray],
               dt_h: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        cfg = self.settings
        flow, ts = cols["flow_lpm"], cols["ts_ms"]
        zero = flow <= cfg.zero_lpm
        since = np.where(zero, 0.0, self.since_zero_h[slot] + dt_h)
        run_min = np.where(zero, np.inf, np.minimum(self.run_min[slot], flow))
        ever = self.ever_zero[slot] | zero
        hist = self.hist_h[slot] + dt_h
        if cfg.learn_continuous_h is None:
            continuous = np.zeros(len(slot), bool)
            judged = np.ones(len(slot), bool)
        else:
            continuous = ~ever & (hist >= cfg.learn_continuous_h)
            judged = ever
        s_zero = np.where(judged, np.clip(cfg.threshold * since / cfg.window_h, 0.0, 1.0), 0.0)
        est_zero = np.where(since > 0, run_min, 0.0)

        hour = (ts % MS_PER_DAY) / MS_PER_HOUR
        in_night = (hour >= cfg.night_start_h) & (hour < cfg.night_end_h)
        day = ts // MS_PER_DAY
        stored = self.night_id[slot]
        same = in_night & (stored == day)
        pending = (stored >= 0) & ~same  # a stored night that this reading closes
        cur_min = np.where(same, np.minimum(self.night_min[slot], flow),
                           np.where(in_night, flow, np.inf))
        cur_n = np.where(same, self.night_n[slot] + 1, np.where(in_night, 1, 0))
        closed_raw, closed_rise = self._verdict(slot, self.night_min[slot],
                                                self.night_n[slot])
        closed_score = self._confirmed(closed_raw, self.night_raw[slot])
        cur_raw, cur_rise = self._verdict(slot, cur_min, cur_n)
        cur_score = self._confirmed(cur_raw, np.where(pending, closed_raw, self.night_raw[slot]))
        last_score = np.where(pending, closed_score, self.night_score[slot])
        last_rise = np.where(pending, closed_rise, self.night_rise[slot])
        live = cur_n >= cfg.min_night_readings
        s_night = np.where(continuous, np.where(live, cur_score, last_score), 0.0)
        rise = np.where(live, cur_rise, last_rise)

        night_rule = s_night > s_zero
        score = np.maximum(s_zero, s_night)
        est = np.where(night_rule, rise, est_zero)
        forgiven = (est >= self.forgive_lo[slot]) & (est <= self.forgive_hi[slot])
        score = np.where(forgiven, np.minimum(score, FORGIVEN_CAP), score)
        rule = np.where(score <= 0, RULE_NONE,
                        np.where(night_rule, RULE_NIGHT_RISE, RULE_NEVER_ZERO))
        aux = {
            "rule": rule.astype(np.float64), "since_zero_h": since, "est_leak_lph": est * 60.0,
            "night_min_lph": np.where(np.isfinite(cur_min), cur_min, 0.0) * 60.0,
            "baseline_night_lph": self.base_min[slot] * 60.0,
            "_zero": zero, "_run_min": run_min, "_ever": ever, "_hist": hist,
            "_in_night": in_night, "_day": day, "_pending": pending, "_cur_min": cur_min,
            "_cur_n": cur_n, "_closed_score": closed_score, "_closed_rise": closed_rise,
            "_closed_raw": closed_raw,
            "_continuous": continuous,
        }
        return score, aux

    def _learn(self, slot: np.ndarray, cols: dict[str, np.ndarray], score: np.ndarray,
               aux: dict[str, np.ndarray]) -> None:
        cfg = self.settings
        self.since_zero_h[slot] = aux["since_zero_h"]
        self.run_min[slot] = aux["_run_min"]
        self.ever_zero[slot] = aux["_ever"]
        self.hist_h[slot] = aux["_hist"]
        pending = aux["_pending"]
        closed = slot[pending]
        if closed.size:
            self.night_score[closed] = aux["_closed_score"][pending]
            self.night_raw[closed] = aux["_closed_raw"][pending]
            self.night_rise[closed] = aux["_closed_rise"][pending]
            night = self.night_min[closed]
            learn = ((aux["_closed_raw"][pending] < cfg.guard)
                     & (self.night_n[closed] >= cfg.min_night_readings) & np.isfinite(night))
            target, value = closed[learn], night[learn]
            first = self.base_nights[target] == 0
            a = cfg.baseline_alpha
            base = self.base_min[target]
            dev = np.where(first, 0.0, (1 - a) * self.base_dev[target] + a * np.abs(value - base))
            self.base_min[target] = np.where(first, value, (1 - a) * base + a * value)
            self.base_dev[target] = dev
            self.base_nights[target] += 1
        in_night = aux["_in_night"]
        self.night_id[slot] = np.where(in_night, aux["_day"], -1)
        self.night_min[slot] = aux["_cur_min"]
        self.night_n[slot] = aux["_cur_n"]

    def forgive(self, slot: int, est_leak_lph: float) -> None:
        """Feedback "false alarm": stop alarming on leak rates near ``est_leak_lph`` here."""
        if slot >= self.capacity:
            self.grow(slot + 1)
        rate = max(est_leak_lph / 60.0, self.settings.zero_lpm)
        ratio = self.settings.forgive_ratio
        lo, hi = self.forgive_lo[slot], self.forgive_hi[slot]
        self.forgive_lo[slot] = rate / ratio if np.isnan(lo) else min(lo, rate / ratio)
        self.forgive_hi[slot] = rate * ratio if np.isnan(hi) else max(hi, rate * ratio)


class CustomerLeakDetector(ColumnarDetector):
    """One customer meter's leak detector (the contract over :class:`CustomerLeakFleet`).

    ``x`` holds ``ts_ms`` and ``flow_lpm`` (the interval's mean flow).
    """

    FLEET = CustomerLeakFleet

    def __init__(self, settings: CustomerLeakSettings | None = None) -> None:
        super().__init__(settings or CustomerLeakSettings())
        self.threshold = self.settings.threshold

    def forgive(self, est_leak_lph: float) -> None:
        """Feedback "false alarm" (see :meth:`CustomerLeakFleet.forgive`)."""
        state = self._state()
        assert isinstance(state, CustomerLeakFleet)
        state.forgive(0, est_leak_lph)
