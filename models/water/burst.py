"""Burst: a sudden flow step together with a pressure drop at the district inlet.

A main that bursts draws a large extra flow at once, and the pressure at the inlet falls
with it; a demand step (the morning rise) raises flow too but lowers pressure only a little,
and a sensor glitch moves one signal without the other. Per district inlet (1-minute
SCADA readings of ``flow_lpm`` and ``pressure_bar``), each reading is compared two ways, both
learned only from readings that are not flagged, so during a burst they stay at what came
before it:

- with a short *reference*: exponentially weighted means of the recent flow and pressure
  (``ref_alpha`` per reading);
- with the *last calm reading*: the step since the last reading that was not flagged.

The reference is steady against noise but lags a trend: while demand falls (the evening, the
end of the morning peak) it stays above the present flow and a burst's rise looks smaller
than it is; the step does not lag but is noisier. Each departure is judged against its own
learned spread, and the larger ratio counts::

    flow  = max(rise_ref / rise_alarm, rise_step / step_rise_alarm)
    press = max(drop_ref / drop_alarm, drop_step / step_drop_alarm)
    score = 0.9 * min(flow, press)                    (clipped to [0, 1])

where each flow alarm is at least ``min_rise_lpm`` and ``rise_z`` times its spread (the mean
absolute departure), and each pressure alarm at least ``min_drop_bar`` and ``z_alarm`` times
its spread (demand moves flow a lot and pressure little, so the pressure drop is the strict
test; the noisier step needs at least ``min_step_drop_bar``). The step counts only within
``STEP_MS`` of the last calm reading, at a burst's onset. Both flow and pressure must reach
their alarm level, so the first reading of a burst scores 0.9 or more: detection within one
reading. The detector learns only from readings scoring
below ``learn_below`` (a guard band under the threshold, so that a burst that scores just
under it on its first reading does not teach the reference), and a reference held for
``reanchor_h`` hours without a break is re-anchored to the present (a lasting change is the
new normal, not an endless burst).

Per district: 92 bytes of numpy state; about 1.2 KB pickled as one :class:`BurstDetector`.

>>> detector = BurstDetector()
>>> start = 1_767_571_200_000
>>> for i in range(1, 120):
...     x = {"ts_ms": start + i * 60_000, "flow_lpm": 700.0 + 10 * (i % 3),
...          "pressure_bar": 3.9 - 0.01 * (i % 2)}
...     detector.learn_one(x)
>>> burst = {"ts_ms": start + 120 * 60_000, "flow_lpm": 950.0, "pressure_bar": 3.2}
>>> detector.score_one(burst), round(detector.explain(burst)["drop_bar"], 2)
(1.0, 0.69)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from models.water.base import ColumnarDetector, FleetDetector


@dataclass(frozen=True)
class BurstSettings:
    """Hyper-parameters of :class:`BurstFleet` (see the module docs)."""

    ref_alpha: float = 0.1
    spread_alpha: float = 0.05
    rise_z: float = 3.0
    z_alarm: float = 6.0
    min_rise_lpm: float = 40.0
    min_drop_bar: float = 0.35
    min_step_drop_bar: float = 0.45
    min_readings: int = 10
    reanchor_h: float = 24.0
    learn_below: float = 0.5
    threshold: float = 0.9


class BurstFleet(FleetDetector):
    """Burst state of many district inlets; inputs ``flow_lpm`` and ``pressure_bar``."""

    FIELDS: ClassVar = {
        "ref_flow": (np.float64, 0.0),
        "ref_p": (np.float64, 0.0),
        "spread_flow": (np.float64, 0.0),
        "spread_p": (np.float64, 0.0),
        "n": (np.int32, 0),
        "flagged_h": (np.float64, 0.0),
        "last_flow": (np.float64, 0.0),
        "last_p": (np.float64, 0.0),
        "last_ms": (np.int64, 0),
        "step_spread_flow": (np.float64, 0.0),
        "step_spread_p": (np.float64, 0.0),
    }
    INPUTS = ("flow_lpm", "pressure_bar")
    EVIDENCE = ("rise_lpm", "drop_bar", "ref_flow_lpm", "ref_pressure_bar")
    MAX_STEP_H = 1 / 12
    STEP_MS = 300_000
    """The step from the last calm reading counts only this soon after it (at a burst's
    onset); later the reference alone decides (when the burst clears, say)."""

    def __init__(self, settings: BurstSettings | None = None, capacity: int = 0) -> None:
        self.settings = settings or BurstSettings()
        self.threshold = self.settings.threshold
        super().__init__(capacity)

    def _score(self, slot: np.ndarray, cols: dict[str, np.ndarray],
               dt_h: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        cfg = self.settings
        flow, pressure = cols["flow_lpm"], cols["pressure_bar"]
        rise, drop = flow - self.ref_flow[slot], self.ref_p[slot] - pressure
        recent = cols["ts_ms"] - self.last_ms[slot] <= self.STEP_MS
        step_rise = np.where(recent, flow - self.last_flow[slot], 0.0)
        step_drop = np.where(recent, self.last_p[slot] - pressure, 0.0)
        flow_ratio = np.maximum(rise / self._alarm(cfg.min_rise_lpm, cfg.rise_z,
                                                   self.spread_flow[slot]),
                                step_rise / self._alarm(cfg.min_rise_lpm, cfg.rise_z,
                                                        self.step_spread_flow[slot]))
        drop_ratio = np.maximum(drop / self._alarm(cfg.min_drop_bar, cfg.z_alarm,
                                                   self.spread_p[slot]),
                                step_drop / self._alarm(cfg.min_step_drop_bar, cfg.z_alarm,
                                                        self.step_spread_p[slot]))
        ready = self.n[slot] >= cfg.min_readings
        score = np.where(ready, np.clip(cfg.threshold * np.minimum(flow_ratio, drop_ratio),
                                        0.0, 1.0), 0.0)
        aux = {"rise_lpm": np.where(ready, np.maximum(rise, step_rise), 0.0),
               "drop_bar": np.where(ready, np.maximum(drop, step_drop), 0.0),
               "ref_flow_lpm": self.ref_flow[slot], "ref_pressure_bar": self.ref_p[slot],
               "_rise": rise, "_drop": drop, "_step_rise": step_rise, "_step_drop": step_drop,
               "_recent": recent}
        return score, aux

    @staticmethod
    def _alarm(floor: float, z: float, spread: np.ndarray) -> np.ndarray:
        """A departure's alarm level: ``z`` mean absolute departures (x 1.25 ~ one sigma)."""
        return np.maximum(floor, z * 1.25 * spread)

    def _learn(self, slot: np.ndarray, cols: dict[str, np.ndarray], score: np.ndarray,
               aux: dict[str, np.ndarray]) -> None:
        cfg = self.settings
        flow, pressure = cols["flow_lpm"], cols["pressure_bar"]
        flagged = score >= cfg.learn_below
        held = np.where(flagged, self.flagged_h[slot] + aux["dt_h"], 0.0)
        reanchor = held >= cfg.reanchor_h
        self.flagged_h[slot] = np.where(reanchor, 0.0, held)
        learn = ~flagged | reanchor
        target = slot[learn]
        f, p = flow[learn], pressure[learn]
        first = (self.n[target] == 0) | reanchor[learn]
        a, b = cfg.ref_alpha, cfg.spread_alpha
        self.spread_flow[target] = np.where(
            first, self.spread_flow[target],
            (1 - b) * self.spread_flow[target] + b * np.abs(aux["_rise"][learn]))
        self.spread_p[target] = np.where(
            first, self.spread_p[target],
            (1 - b) * self.spread_p[target] + b * np.abs(aux["_drop"][learn]))
        steps = ~first & aux["_recent"][learn]
        self.step_spread_flow[target] = np.where(
            steps, (1 - b) * self.step_spread_flow[target] + b * np.abs(aux["_step_rise"][learn]),
            self.step_spread_flow[target])
        self.step_spread_p[target] = np.where(
            steps, (1 - b) * self.step_spread_p[target] + b * np.abs(aux["_step_drop"][learn]),
            self.step_spread_p[target])
        self.last_flow[target], self.last_p[target] = f, p
        self.last_ms[target] = cols["ts_ms"][learn]
        self.ref_flow[target] = np.where(first, f, (1 - a) * self.ref_flow[target] + a * f)
        self.ref_p[target] = np.where(first, p, (1 - a) * self.ref_p[target] + a * p)
        self.n[target] += 1


class BurstDetector(ColumnarDetector):
    """One district inlet's burst detector (the contract over :class:`BurstFleet`).

    ``x`` holds ``ts_ms``, ``flow_lpm`` and ``pressure_bar``.
    """

    FLEET = BurstFleet

    def __init__(self, settings: BurstSettings | None = None) -> None:
        super().__init__(settings or BurstSettings())
        self.threshold = self.settings.threshold
