"""Customer water demand: intermittent use events on diurnal, weekly and weather patterns.

Each customer meter draws, per interval, a number of use events ``~ Poisson(rate)`` and a
total volume ``~ Gamma(events * k, mean / k)`` (the sum of ``events`` gamma-distributed
uses), all meters at once with numpy. ``rate`` is the meter's daily volume times its
profile's share of the day in that interval, divided by its mean event volume. So a
healthy home is silent most of the night: at 01:00–04:00 it expects ~0.05 events per
15 minutes and reads exactly 0 in ~95 % of those intervals.

Defaults and where they come from:

- Residential: household size ``1 + Poisson(1.4)`` (mean 2.4, as in UK and NL censuses)
  times a per-person use that is log-normal with a median of 135 L/day (Waterwise UK
  ~140, Vewin NL ~120, AWWA REU2016 indoor ~220 L/person/day): 250–500 L/day for a mean
  home. Events average 10 L (toilet 4–9 L, tap 1–3 L, shower 40–70 L, washing machine
  ~50 L) with gamma shape 0.7 (many small uses, a few large).
- Commercial: log-normal median 1.2 m³/day (shops, offices, schools); events of 15 L.
  Hospitals and other critical customers: median 30 m³/day, round the clock.
- Industrial: log-normal median 15 m³/day; events of 40 L with shape 2.
- With the default type mix, non-household use is ~40 % of the volume, as in UK and
  Dutch utilities (30–40 %).
- Round-the-clock profiles (night shifts, hospitals, continuous processes) draw part of
  their volume as a steady base flow (cooling, process water), so they never read 0 at
  night: a legitimate night flow that looks like a leak.
- Profiles: hourly shares of the day's volume from published diurnal curves (morning peak
  07–08 on weekdays, 09–10 at weekends, evening peak 18–20, night trough ~0.3 %/h);
  weekends scale a business's day volume (offices 30 %, two-shift industry 20 %).
- Weather: indoor use rises 2 % per °C of daily mean air temperature above 12 °C (hot
  spells raise demand 10–30 %), capped at +30 %; garden watering and pools are separate
  (:mod:`simulators.confounders`).

>>> import numpy as np
>>> from simulators.config import FleetConfig
>>> from simulators.fleet import Fleet
>>> fleet = Fleet.build(FleetConfig(meters=500), np.random.default_rng(0))
>>> demand = CustomerDemand(fleet, np.random.default_rng(1))
>>> litres = demand.interval_volume(slot=30, weekend=False, interval_s=900,
...                                 daily_air_c=np.array([8.0]))
>>> litres.shape, bool((litres >= 0).all())
((500,), True)
"""

from __future__ import annotations

import numpy as np

from simulators.fleet import CustomerType, Fleet, Profile

# Hourly share (percent) of a weekday's and a weekend day's volume, per profile; 0h..23h.
HOURLY_PROFILES: dict[Profile, tuple[tuple[float, ...], tuple[float, ...]]] = {
    Profile.RESIDENTIAL: (
        (1.2, 0.5, 0.3, 0.3, 0.4, 1.5, 5.0, 8.0, 7.0, 5.5, 4.5, 4.2,
         4.3, 3.8, 3.3, 3.2, 3.8, 5.0, 6.2, 6.6, 6.0, 5.2, 4.2, 2.5),
        (1.8, 0.8, 0.4, 0.3, 0.3, 0.5, 1.5, 3.5, 6.5, 8.0, 7.5, 6.2,
         5.5, 4.8, 4.0, 3.8, 4.0, 4.8, 5.8, 6.2, 5.8, 5.0, 4.0, 2.8),
    ),
    Profile.OFFICE_HOURS: (
        (0.4, 0.3, 0.3, 0.3, 0.3, 0.5, 1.5, 4.5, 8.5, 9.0, 9.0, 9.0,
         9.5, 9.0, 8.5, 8.5, 7.5, 5.0, 2.5, 1.2, 0.8, 0.6, 0.5, 0.4),
        (0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.5, 2.0, 7.0, 10.0, 11.0, 11.0,
         11.0, 10.5, 10.0, 9.0, 7.0, 4.0, 2.0, 1.0, 0.5, 0.3, 0.3, 0.3),
    ),
    Profile.ROUND_THE_CLOCK: (
        (3.5, 3.3, 3.2, 3.2, 3.3, 3.6, 4.2, 4.8, 5.0, 4.9, 4.8, 4.7,
         4.8, 4.7, 4.6, 4.5, 4.5, 4.5, 4.4, 4.2, 4.0, 3.8, 3.7, 3.6),
        (3.5, 3.3, 3.2, 3.2, 3.3, 3.6, 4.2, 4.8, 5.0, 4.9, 4.8, 4.7,
         4.8, 4.7, 4.6, 4.5, 4.5, 4.5, 4.4, 4.2, 4.0, 3.8, 3.7, 3.6),
    ),
    Profile.TWO_SHIFTS: (
        (0.5, 0.5, 0.5, 0.5, 0.5, 1.5, 6.0, 6.5, 6.5, 6.5, 6.5, 6.5,
         6.0, 6.5, 6.5, 6.5, 6.5, 6.5, 6.5, 6.0, 6.0, 5.5, 2.0, 0.5),
        (0.5, 0.5, 0.5, 0.5, 0.5, 1.5, 6.0, 6.5, 6.5, 6.5, 6.5, 6.5,
         6.0, 6.5, 6.5, 6.5, 6.5, 6.5, 6.5, 6.0, 6.0, 5.5, 2.0, 0.5),
    ),
    Profile.CONTINUOUS_PROCESS: ((100 / 24,) * 24, (100 / 24,) * 24),
}

WEEKEND_DAY_FACTOR = {
    Profile.RESIDENTIAL: 1.05, Profile.OFFICE_HOURS: 0.30, Profile.ROUND_THE_CLOCK: 0.95,
    Profile.TWO_SHIFTS: 0.20, Profile.CONTINUOUS_PROCESS: 1.0,
}
"""A weekend day's volume relative to a weekday's."""

PERSON_MEDIAN_L_DAY = 135.0
PERSON_SIGMA = 0.35
HOUSEHOLD_EXTRA_PERSONS = 1.4
COMMERCIAL_MEDIAN_L_DAY = 1_200.0
CRITICAL_MEDIAN_L_DAY = 30_000.0
INDUSTRIAL_MEDIAN_L_DAY = 15_000.0
BUSINESS_SIGMA = 0.8
EVENT_MEAN_L = {CustomerType.RESIDENTIAL: 10.0, CustomerType.COMMERCIAL: 15.0,
                CustomerType.INDUSTRIAL: 40.0}
EVENT_SHAPE = {CustomerType.RESIDENTIAL: 0.7, CustomerType.COMMERCIAL: 1.0,
               CustomerType.INDUSTRIAL: 2.0}
CONTINUOUS_SHARE = {Profile.ROUND_THE_CLOCK: 0.5, Profile.CONTINUOUS_PROCESS: 0.7}
"""Share of a profile's volume that flows steadily rather than in use events."""
CONTINUOUS_NOISE = 0.1
HEAT_THRESHOLD_C = 12.0
HEAT_GAIN_PER_C = 0.02
HEAT_MAX_GAIN = 0.30


def profile_table(slots_per_day: int) -> np.ndarray:
    """Share of a day's volume per (day type, profile, slot): weekday 0, weekend 1.

    Hourly shares are interpolated linearly between hour centres (wrapping at midnight),
    then each day sums to the profile's weekend factor (1 on weekdays).

    >>> table = profile_table(96)
    >>> table.shape, round(float(table[0, 0].sum()), 6), round(float(table[1, 1].sum()), 6)
    ((2, 5, 96), 1.0, 0.3)
    """
    centres = np.arange(24) + 0.5
    hours = (np.arange(slots_per_day) + 0.5) * 24 / slots_per_day
    table = np.empty((2, len(Profile), slots_per_day))
    for profile, days in HOURLY_PROFILES.items():
        for day_type, shares in enumerate(days):
            curve = np.interp(hours, centres, np.asarray(shares), period=24)
            factor = WEEKEND_DAY_FACTOR[profile] if day_type else 1.0
            table[day_type, profile] = curve / curve.sum() * factor
    return table


class CustomerDemand:
    """Indoor and business demand of every customer meter (without leaks and confounders)."""

    def __init__(self, fleet: Fleet, rng: np.random.Generator) -> None:
        n = fleet.customer_count
        ctype = fleet.customer_type[:n]
        self._rng = rng
        self._profile = fleet.profile
        self._district = fleet.district_of[:n]
        persons = 1 + np.minimum(rng.poisson(HOUSEHOLD_EXTRA_PERSONS, n), 7)
        residential = persons * rng.lognormal(np.log(PERSON_MEDIAN_L_DAY), PERSON_SIGMA, n)
        business = rng.lognormal(0.0, BUSINESS_SIGMA, n)
        daily = np.select(
            [fleet.critical[:n], ctype == CustomerType.COMMERCIAL,
             ctype == CustomerType.INDUSTRIAL],
            [CRITICAL_MEDIAN_L_DAY * business, COMMERCIAL_MEDIAN_L_DAY * business,
             INDUSTRIAL_MEDIAN_L_DAY * business],
            residential)
        event_mean = np.array([EVENT_MEAN_L[CustomerType(t)] for t in range(3)])[ctype]
        self._shape = np.array([EVENT_SHAPE[CustomerType(t)] for t in range(3)])[ctype]
        self._scale = event_mean / self._shape
        self.daily_volume_l = daily
        """Each meter's typical weekday volume in litres, before weather effects."""
        continuous = np.zeros(len(Profile))
        for profile, share in CONTINUOUS_SHARE.items():
            continuous[profile] = share
        self._steady = np.flatnonzero(continuous[self._profile])
        self._steady_l_day = (daily * continuous[self._profile])[self._steady]
        self._events_per_day = daily * (1 - continuous[self._profile]) / event_mean
        self._slots: dict[int, np.ndarray] = {}

    def interval_volume(
        self, slot: int, weekend: bool, interval_s: int, daily_air_c: np.ndarray
    ) -> np.ndarray:
        """Litres used by each customer meter in one interval.

        ``slot`` is the interval's index within the day (0 at midnight UTC), ``daily_air_c``
        the smooth daily air temperature of each district.
        """
        table = self._slots.get(interval_s)
        if table is None:
            table = self._slots[interval_s] = profile_table(86_400 // interval_s)
        heat = 1 + np.clip(HEAT_GAIN_PER_C * (daily_air_c - HEAT_THRESHOLD_C), 0, HEAT_MAX_GAIN)
        share = table[int(weekend), :, slot]
        rate = self._events_per_day * share[self._profile] * heat[self._district]
        events = self._rng.poisson(rate)
        using = np.flatnonzero(events)
        litres = np.zeros(len(rate))
        litres[using] = self._rng.gamma(events[using] * self._shape[using], self._scale[using])
        steady = self._steady
        litres[steady] += self._steady_l_day * share[self._profile[steady]] * heat[
            self._district[steady]] * np.clip(
            1 + CONTINUOUS_NOISE * self._rng.standard_normal(len(steady)), 0.0, None)
        return litres
