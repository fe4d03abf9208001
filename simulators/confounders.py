"""Legitimate uses that look like faults: garden watering, pool filling, night shifts.

They make detection honest: a detector that flags every steady night flow will flag
these too, and the ground truth says they are not incidents.

- Garden watering: 20 % of homes have an automatic sprinkler (UK/NL garden surveys put
  outdoor-tap ownership near 70 % and timer-controlled watering far lower). Each has a
  fixed schedule: 60 % early morning (04:00–06:30), the rest evening (19:00–21:30), 20–60
  minutes at 8–20 L/min, every 1–3 days, only in the warm season (district daily mean air
  temperature ≥ 15 °C) and skipped on 20 % of due days (rain, holidays).
- Pool filling: 3 % of homes have a pool or large hot tub; they fill 10–50 m³ at 15–30
  L/min (5–55 hours of steady flow that then stops), on average once per 45 warm days
  (daily mean ≥ 14 °C) and once per 400 cold days.
- Round-the-clock businesses (night shifts, hospitals) get their own demand profile
  (:mod:`simulators.demand`); they are listed here as confounders for the whole run.

>>> import numpy as np
>>> from simulators.config import FleetConfig
>>> from simulators.fleet import Fleet
>>> fleet = Fleet.build(FleetConfig(meters=2000), np.random.default_rng(0))
>>> start = 1_782_000_000_000  # June 2026
>>> confounders = Confounders(fleet, np.random.default_rng(1), start, start + 86_400_000)
>>> meters, litres = confounders.interval_volume(start, start + 900_000, np.array([20.0]))
>>> bool((litres >= 0).all()), len(confounders.drain_episodes()) > 0
(True, True)
"""

from __future__ import annotations

import numpy as np

from simulators.fleet import CustomerType, Fleet, Profile
from simulators.truth import Episode

MS_PER_MINUTE = 60_000
MS_PER_DAY = 86_400_000

SPRINKLER_SHARE = 0.20
MORNING_SHARE = 0.60
WARM_SEASON_C = 15.0
SKIP_SHARE = 0.20
POOL_SHARE = 0.03
POOL_WARM_C = 14.0
POOL_FILLS_PER_WARM_DAY = 1 / 45
POOL_FILLS_PER_COLD_DAY = 1 / 400


class Confounders:
    """Sprinklers and pool fills of the fleet, advanced interval by interval."""

    def __init__(
        self, fleet: Fleet, rng: np.random.Generator, start_ms: int, end_ms: int
    ) -> None:
        n = fleet.customer_count
        homes = np.flatnonzero(fleet.customer_type[:n] == CustomerType.RESIDENTIAL)
        self._rng = rng
        self._fleet = fleet
        self._sprinklers = np.sort(rng.choice(homes, round(SPRINKLER_SHARE * len(homes)),
                                              replace=False))
        k = len(self._sprinklers)
        morning = rng.random(k) < MORNING_SHARE
        self._water_start_min = np.where(morning, rng.integers(240, 391, k),
                                         rng.integers(1140, 1291, k))
        self._water_minutes = rng.integers(20, 61, k)
        self._water_lpm = np.round(rng.uniform(8, 20, k), 1)
        self._every_days = rng.integers(1, 4, k)
        self._phase = rng.integers(0, 3, k)
        self._waters_today = np.zeros(k, bool)
        self._day = -1
        self._pools = np.sort(rng.choice(homes, round(POOL_SHARE * len(homes)), replace=False))
        self._filling_until = np.zeros(len(self._pools), np.int64)
        self._fill_lpm = np.zeros(len(self._pools))
        self._fill_start = np.zeros(len(self._pools), np.int64)
        self._episodes: list[Episode] = []
        self._count = 0
        busy = np.flatnonzero(np.isin(fleet.profile, [Profile.ROUND_THE_CLOCK,
                                                       Profile.CONTINUOUS_PROCESS]))
        for meter in busy.tolist():
            label = "critical" if fleet.critical[meter] else "night_shift"
            self._add("round_the_clock", meter, start_ms, end_ms,
                      1.0, "ratio", f"reason={label}")

    def drain_episodes(self) -> list[Episode]:
        """Return the episodes that started since the last call and forget them."""
        episodes, self._episodes = self._episodes, []
        return episodes

    def interval_volume(
        self, start_ms: int, end_ms: int, daily_air_c: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Meter indices and litres of confounding use in ``[start_ms, end_ms)``."""
        day = start_ms // MS_PER_DAY
        if day != self._day:
            self._plan_watering(day, daily_air_c)
        self._start_pool_fills(start_ms, end_ms, daily_air_c)
        day_start = day * MS_PER_DAY
        first = (start_ms - day_start) / MS_PER_MINUTE
        last = (end_ms - day_start) / MS_PER_MINUTE
        window_end = self._water_start_min + self._water_minutes
        minutes = np.clip(np.minimum(window_end, last) - np.maximum(self._water_start_min,
                                                                    first), 0, None)
        watering = self._waters_today & (minutes > 0)
        fill_minutes = np.clip(
            (np.minimum(self._filling_until, end_ms)
             - np.maximum(self._fill_start, start_ms)) / MS_PER_MINUTE, 0, None)
        filling = fill_minutes > 0
        meters = np.concatenate([self._sprinklers[watering], self._pools[filling]])
        litres = np.concatenate([(self._water_lpm * minutes)[watering],
                                 (self._fill_lpm * fill_minutes)[filling]])
        return meters, litres

    def _plan_watering(self, day: int, daily_air_c: np.ndarray) -> None:
        self._day = day
        district = self._fleet.district_of[self._sprinklers]
        due = (day + self._phase) % self._every_days == 0
        warm = daily_air_c[district] >= WARM_SEASON_C
        self._waters_today = due & warm & (self._rng.random(len(due)) >= SKIP_SHARE)
        for i in np.flatnonzero(self._waters_today).tolist():
            start = day * MS_PER_DAY + int(self._water_start_min[i]) * MS_PER_MINUTE
            self._add("garden_watering", int(self._sprinklers[i]), start,
                      start + int(self._water_minutes[i]) * MS_PER_MINUTE,
                      float(self._water_lpm[i]), "lpm",
                      f"every_days={self._every_days[i]}")

    def _start_pool_fills(self, start_ms: int, end_ms: int, daily_air_c: np.ndarray) -> None:
        district = self._fleet.district_of[self._pools]
        per_day = np.where(daily_air_c[district] >= POOL_WARM_C, POOL_FILLS_PER_WARM_DAY,
                           POOL_FILLS_PER_COLD_DAY)
        idle = self._filling_until <= start_ms
        starts = idle & (self._rng.random(len(idle)) < per_day * (end_ms - start_ms) / MS_PER_DAY)
        for i in np.flatnonzero(starts).tolist():
            lpm = round(float(self._rng.uniform(15, 30)), 1)
            litres = float(self._rng.uniform(10_000, 50_000))
            begin = start_ms + int(self._rng.integers(0, end_ms - start_ms))
            self._fill_start[i] = begin
            self._filling_until[i] = begin + int(litres / lpm * MS_PER_MINUTE)
            self._fill_lpm[i] = lpm
            self._add("pool_filling", int(self._pools[i]), begin, int(self._filling_until[i]),
                      lpm, "lpm", f"volume_l={litres:.0f}")

    def _add(self, kind: str, meter: int, start_ms: int, end_ms: int, magnitude: float,
             unit: str, detail: str) -> None:
        self._count += 1
        self._episodes.append(Episode(
            f"cf-{self._count:07d}", kind, meter, int(self._fleet.district_of[meter]),
            start_ms, end_ms, magnitude, unit, detail))
