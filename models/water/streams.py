"""Seeded labelled streams for the detector check suite (:mod:`models.registry`).

Each function returns ``(x, is_anomaly)`` pairs for one device or district in event-time
order, a few thousand long, with one incident of the kind its detector is for. They are
small synthetic versions of what :mod:`simulators` produces (the evaluation harness uses the
real simulator).

>>> pairs = customer_leak_stream(0)
>>> len(pairs), sum(label for _, label in pairs) > 0, sorted(pairs[0][0])
(2880, True, ['flow_lpm', 'ts_ms'])
"""

from __future__ import annotations

import numpy as np

from models.anomaly.base import Features

T0 = 1_767_571_200_000  # Monday 2026-01-05 00:00 UTC
INTERVAL_MS = 900_000
Stream = list[tuple[Features, bool]]


def _home_use(rng: np.random.Generator, n: int) -> np.ndarray:
    """Interval flows of a home: idle at night, intermittent use by day (L/min)."""
    hours = (np.arange(1, n + 1) * 0.25) % 24
    busy = np.where(hours < 6, 0.05, 0.45)
    use = rng.random(n) < busy
    return np.round(np.where(use, rng.gamma(0.7, 4.0, n), 0.0), 3)


def customer_leak_stream(seed: int, days: int = 30) -> Stream:
    """A home whose leak (5–60 L/h) runs from day 12 to day 20."""
    rng = np.random.default_rng(seed)
    n = 96 * days
    flow = _home_use(rng, n)
    leak = (np.arange(n) >= 96 * 12) & (np.arange(n) < 96 * 20)
    flow = np.round(flow + leak * rng.uniform(5, 60) / 60, 3)
    return [({"ts_ms": T0 + (i + 1) * INTERVAL_MS, "flow_lpm": float(flow[i])}, bool(leak[i]))
            for i in range(n)]


def sensor_fault_stream(seed: int, days: int = 30) -> Stream:
    """A meter that sticks on day 10–13 and spikes on day 20–22 (battery and clock sound)."""
    rng = np.random.default_rng(seed)
    n = 96 * days
    flow = _home_use(rng, n) + 0.01 * (rng.random(n) < 0.3)
    index = np.arange(n)
    stuck = (index >= 96 * 10) & (index < 96 * 13)
    flow[stuck] = 0.842
    spiky = (index >= 96 * 20) & (index < 96 * 22) & (rng.random(n) < 0.15)
    flow[spiky] += rng.uniform(50, 500, int(spiky.sum()))
    volts = 3.6 + rng.normal(0, 0.004, n)
    return [({"ts_ms": T0 + (i + 1) * INTERVAL_MS, "flow_lpm": float(round(flow[i], 3)),
              "battery_v": float(round(volts[i], 3))}, bool(stuck[i] or spiky[i]))
            for i in range(n)]


def burst_stream(seed: int, minutes: int = 3000) -> Stream:
    """A district inlet (1-minute readings) with a burst of 100–600 L/min for 3 hours."""
    rng = np.random.default_rng(seed)
    t = np.arange(1, minutes + 1)
    demand = 600 + 250 * np.sin(2 * np.pi * t / 1440) + rng.normal(0, 15, minutes)
    burst = (t >= 2000) & (t < 2180)
    flow = demand + burst * rng.uniform(100, 600)
    pressure = 4.6 - 0.8 * (flow / 1200) ** 2 - burst * rng.uniform(0.5, 2.0) + rng.normal(
        0, 0.01, minutes)
    return [({"ts_ms": T0 + int(t[i]) * 60_000, "flow_lpm": float(flow[i]),
              "pressure_bar": float(pressure[i])}, bool(burst[i])) for i in range(minutes)]


def district_leak_stream(seed: int, days: int = 30) -> Stream:
    """A district's 15-minute inlet and customer flows; a network leak from day 25 on."""
    rng = np.random.default_rng(seed)
    n = 96 * days
    hours = (np.arange(1, n + 1) * 0.25) % 24
    use = 300 + 200 * np.sin(np.pi * np.clip(hours - 6, 0, 16) / 16) + rng.normal(0, 8, n)
    leak = np.arange(n) >= 96 * 25
    inlet = use + 40 + leak * rng.uniform(5, 30) + rng.normal(0, 0.5, n)
    return [({"ts_ms": T0 + (i + 1) * INTERVAL_MS, "flow_lpm": float(inlet[i]),
              "customer_flow_lpm": float(use[i])}, bool(leak[i])) for i in range(n)]


def silence_stream(seed: int, observations: int = 2000) -> Stream:
    """Gap observations of a 15-minute meter every 15 minutes; silent for 2 × 12 hours."""
    rng = np.random.default_rng(seed)
    pairs: Stream = []
    last = T0
    for i in range(1, observations + 1):
        now = T0 + i * INTERVAL_MS
        silent = 600 <= i < 648 or 1400 <= i < 1448
        if not silent and rng.random() > 0.003:
            last = now - int(rng.integers(0, 60_000))
        pairs.append(({"ts_ms": now, "last_seen_ms": float(last), "cadence_s": 900.0},
                      silent and i - (600 if i < 1000 else 1400) >= 25))
    return pairs
