"""Labelled synthetic series for the generic detector: one module for tests, checks and bench.

Each *family* is a kind of anomaly on a kind of signal. Every series is built from a seed,
and the seed also draws the things a detector cannot know in advance (the sampling step, the
shape and phase of the daily cycle, the noise level and its tails), so that nothing can be
tuned to one set of constants:

================  ====================================================================
family            what is labelled
================  ====================================================================
seasonal_spikes   daily+weekly seasonal signal; isolated spikes and dips (3–8 noise sd)
level_shift       seasonal; the level steps by 3–6 noise sd; the first readings after
                  each step are labelled (afterwards it is the new normal)
noise_burst       seasonal; the noise sd grows 4–6× for a few hours
slow_drift        seasonal; a ramp grows to 4–8 noise sd over one to three days
flatline          seasonal; the sensor repeats one value for hours
random_walk       no seasonality, a random walk; isolated spikes
short_period      no timestamps' help: a cycle of 17–97 readings (UCR-like); spikes and
                  a distorted cycle
================  ====================================================================

The first quarter of every series is clean (a detector's warm-up). Timestamps are UTC epoch
milliseconds from 2026-01-05 (a Monday).

>>> s = series("level_shift", seed=3, n=2000)
>>> len(s.values), len(s.ts_ms), len(s.labels), sum(s.labels) > 0, any(s.labels[:500])
(2000, 2000, 2000, True, False)
>>> x, label = next(iter(labelled_stream("flatline", seed=1, n=10)))
>>> sorted(x), label
(['ts_ms', 'value'], False)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

FAMILIES = (
    "seasonal_spikes",
    "level_shift",
    "noise_burst",
    "slow_drift",
    "flatline",
    "random_walk",
    "short_period",
)
"""Every family :func:`series` builds."""

T0_MS = 1_767_571_200_000  # 2026-01-05T00:00:00Z, a Monday
DAY_S = 86_400
_STEPS_S = (300, 600, 900, 1800, 3600)


@dataclass(frozen=True)
class Series:
    """One labelled series: event times, values and a label per reading."""

    family: str
    ts_ms: list[int]
    values: list[float]
    labels: list[bool]
    step_s: int
    """Sampling step in seconds."""
    noise_sd: float
    """The standard deviation of the noise (the scale a perfect forecaster's residuals have)."""


def series(family: str, seed: int = 0, n: int = 4000) -> Series:
    """Build the labelled series of ``family`` from ``seed`` (``n`` readings)."""
    if family not in FAMILIES:
        msg = f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}"
        raise ValueError(msg)
    rng = np.random.default_rng([seed, FAMILIES.index(family)])
    step_s = int(rng.choice(_STEPS_S))
    t = np.arange(n, dtype=np.float64)
    ts_ms = [T0_MS + int(i) * step_s * 1000 for i in range(n)]
    labels = np.zeros(n, dtype=bool)
    sd = float(rng.uniform(0.5, 3.0))
    heavy = rng.random() < 0.3
    noise = sd * (rng.standard_t(5, n) / np.sqrt(5 / 3) if heavy else rng.standard_normal(n))

    if family == "random_walk":
        values = 100.0 + np.cumsum(sd * rng.standard_normal(n))
        _spikes(rng, values, labels, sd, n, count=6)
    elif family == "short_period":
        period = int(rng.integers(17, 98))
        phase = 2 * np.pi * t / period
        amplitude = sd * rng.uniform(4, 10)
        values = 20.0 + amplitude * (np.sin(phase) + 0.4 * np.sin(2 * phase + rng.uniform(0, 6)))
        values += noise
        _spikes(rng, values, labels, sd, n, count=4)
        start = int(rng.integers(n // 2, n - 2 * period))
        values[start : start + period] = (
            20.0 + amplitude * 0.2 * np.sin(phase[start : start + period] * 3) + noise[:period]
        )
        labels[start : start + period] = True
    else:
        values = _seasonal(rng, t, step_s, sd) + noise
        if family == "seasonal_spikes":
            _spikes(rng, values, labels, sd, n, count=8)
        elif family == "level_shift":
            for start in _starts(rng, n, 2):
                jump = sd * rng.uniform(3, 6) * rng.choice([-1, 1])
                values[start:] += jump
                labels[start : start + max(4, DAY_S // step_s // 8)] = True
        elif family == "noise_burst":
            for start in _starts(rng, n, 3):
                length = max(6, int(rng.uniform(2, 6) * 3600 / step_s))
                end = min(n, start + length)
                values[start:end] += noise[start:end] * rng.uniform(3, 5)
                labels[start:end] = True
        elif family == "slow_drift":
            start = _starts(rng, n, 1)[0]
            length = min(n - start, max(24, int(rng.uniform(1, 3) * DAY_S / step_s)))
            ramp = np.linspace(0.0, sd * rng.uniform(4, 8) * rng.choice([-1, 1]), length)
            values[start : start + length] += ramp
            labels[start : start + length] = True
        elif family == "flatline":
            for start in _starts(rng, n, 3):
                length = max(8, int(rng.uniform(3, 8) * 3600 / step_s))
                end = min(n, start + length)
                values[start:end] = values[start - 1]
                labels[start:end] = True
    return Series(
        family, ts_ms, [float(v) for v in values], [bool(b) for b in labels], step_s, sd
    )


def labelled_stream(
    family: str, seed: int = 0, n: int = 4000
) -> Iterator[tuple[dict[str, float], bool]]:
    """``({"ts_ms": ..., "value": ...}, is_anomaly)`` pairs of :func:`series` in order."""
    s = series(family, seed=seed, n=n)
    for ts, value, label in zip(s.ts_ms, s.values, s.labels, strict=True):
        yield {"ts_ms": float(ts), "value": value}, label


def _seasonal(rng: np.random.Generator, t: np.ndarray, step_s: int, sd: float) -> np.ndarray:
    """A daily cycle of two harmonics, quieter weekends, amplitude 3–10 noise sd."""
    day_phase = 2 * np.pi * (t * step_s % DAY_S) / DAY_S
    amplitude = sd * rng.uniform(3, 10)
    daily = np.sin(day_phase + rng.uniform(0, 2 * np.pi)) + rng.uniform(0.2, 0.6) * np.sin(
        2 * day_phase + rng.uniform(0, 2 * np.pi)
    )
    weekday = (t * step_s // DAY_S) % 7
    weekend = np.where(weekday >= 5, rng.uniform(0.5, 0.8), 1.0)
    return 50.0 + amplitude * daily * weekend + (weekend - 1.0) * amplitude * 0.5


def _starts(rng: np.random.Generator, n: int, count: int) -> list[int]:
    """``count`` event starts spread over the last three quarters, apart from one another."""
    lo, span = n // 4 + n // 20, n - n // 4 - n // 10
    return sorted(lo + (k * span) // count + int(rng.integers(0, max(1, span // (2 * count))))
                  for k in range(count))


def _spikes(
    rng: np.random.Generator, values: np.ndarray, labels: np.ndarray, sd: float, n: int, count: int
) -> None:
    for start in _starts(rng, n, count):
        values[start] += sd * rng.uniform(3, 8) * rng.choice([-1, 1])
        labels[start] = True
