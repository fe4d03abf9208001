"""Air and water temperature per district: seasonal cycle, diurnal cycle and AR(1) weather.

Defaults follow a temperate maritime climate (Met Office 1991–2020 normals for southern
England, KNMI De Bilt for the Low Countries: annual mean ~10.5 °C, January ~3.5 °C, July
~18 °C, mean daily range ~8 °C). Hours are UTC, which is local (winter) time in the UK:
the fleet's diurnal patterns are laid out in UTC. Weather
anomalies are an AR(1) process with a 3-day memory and 3 °C spread, shared by the region
with a small local part per district (districts are a few km apart). Drinking water in
mains follows the ground: 4–20 °C over the year, about a month behind the air.

>>> import numpy as np
>>> weather = Weather(2, np.random.default_rng(0))
>>> air, daily = weather.advance(1_767_571_200_000, minutes=15, cadence_ms=60_000)
>>> air.shape, daily.shape, bool(-15 < daily.mean() < 15)
((2, 15), (2,), True)
"""

from __future__ import annotations

import numpy as np

MS_PER_DAY = 86_400_000
YEAR_DAYS = 365.2425

ANNUAL_MEAN_C = 10.5
SEASONAL_AMPLITUDE_C = 7.5
WARMEST_DAY_OF_YEAR = 200  # about 19 July
DIURNAL_AMPLITUDE_C = 4.0
WARMEST_HOUR = 15.0
ANOMALY_MEMORY_DAYS = 3.0
ANOMALY_SD_C = 3.0
LOCAL_SHARE = 0.2  # share of the anomaly variance that is local to a district

WATER_MEAN_C = 12.0
WATER_AMPLITUDE_C = 7.0
WATER_WARMEST_DAY = 230  # about 18 August: the ground lags the air


def day_of_year(ms: int | np.ndarray) -> np.ndarray:
    """Fractional day of the year (0 = 1 January), close enough for climate cycles."""
    days_since_epoch = np.asarray(ms) / MS_PER_DAY
    return np.mod(days_since_epoch - 0.5, YEAR_DAYS)  # 1970-01-01 is day 0 of its year


def water_temperature(ms: int) -> float:
    """Seasonal temperature of water in the mains at ``ms`` (UTC epoch ms), in °C."""
    phase = 2 * np.pi * (day_of_year(ms) - WATER_WARMEST_DAY) / YEAR_DAYS
    return float(WATER_MEAN_C + WATER_AMPLITUDE_C * np.cos(phase))


class Weather:
    """Air temperature of every district, advanced one engine step at a time."""

    def __init__(self, districts: int, rng: np.random.Generator) -> None:
        self._rng = rng
        self._regional = rng.normal(0.0, ANOMALY_SD_C)
        self._local = rng.normal(0.0, ANOMALY_SD_C * np.sqrt(LOCAL_SHARE), districts)
        self._districts = districts

    def advance(
        self, start_ms: int, minutes: int, cadence_ms: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Advance by one step; return air °C per (district, sample) and the smooth daily °C.

        Samples are at the ends of ``minutes`` sub-intervals of ``cadence_ms`` after
        ``start_ms``. The daily temperature leaves out the diurnal cycle: it drives
        demand, irrigation and pool filling.
        """
        step_days = minutes * cadence_ms / MS_PER_DAY
        keep = np.exp(-step_days / ANOMALY_MEMORY_DAYS)
        fresh = np.sqrt(1 - keep**2)
        self._regional = keep * self._regional + fresh * self._rng.normal(0.0, ANOMALY_SD_C)
        self._local = keep * self._local + fresh * self._rng.normal(
            0.0, ANOMALY_SD_C * np.sqrt(LOCAL_SHARE), self._districts)
        times = start_ms + cadence_ms * np.arange(1, minutes + 1)
        season = SEASONAL_AMPLITUDE_C * np.cos(
            2 * np.pi * (day_of_year(times) - WARMEST_DAY_OF_YEAR) / YEAR_DAYS)
        hours = np.mod(times, MS_PER_DAY) / 3_600_000
        diurnal = DIURNAL_AMPLITUDE_C * np.cos(2 * np.pi * (hours - WARMEST_HOUR) / 24)
        daily = ANNUAL_MEAN_C + season.mean() + self._regional + self._local
        air = daily[:, None] + diurnal[None, :] + (season - season.mean())[None, :]
        return air, daily
