"""The registry of detectors: what the check suite (:mod:`models.checks`) runs over.

Each entry is a name mapped to an :class:`Entry` of two functions:

- ``factory()``: a fresh detector with its default settings;
- ``stream(seed)``: a seeded, finite labelled stream of ``(x, is_anomaly)`` pairs on which
  that detector should do better than chance (the last check of the suite). ``x`` is what the
  detector's ``learn_one``/``score_one`` take. Keep it a few thousand readings so the suite
  stays fast.

To add a detector, insert one entry in :data:`DETECTORS` (import inside the functions, so this
module stays cheap to import). ``tests/test_detector_checks.py`` then runs every check on it.

>>> entry = DETECTORS["generic"]
>>> detector = entry.factory()
>>> x, is_anomaly = next(iter(entry.stream(0)))
>>> sorted(x), is_anomaly, 0.0 <= detector.score_one(x) <= 1.0
(['ts_ms', 'value'], False, True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from models.anomaly.base import AnomalyDetector, Features

LabelledStream = Iterable[tuple[Features, bool]]
"""``(x, is_anomaly)`` pairs in stream order."""


@dataclass(frozen=True)
class Entry:
    """One registered detector: how to build it and a labelled stream to check it on."""

    factory: Callable[[], AnomalyDetector]
    """A fresh detector with default settings."""
    stream: Callable[[int], LabelledStream]
    """``stream(seed)``: a seeded labelled stream the detector should beat chance on."""
    description: str = ""


def _generic() -> AnomalyDetector:
    from models.anomaly.generic import SeasonalResidualDetector

    return SeasonalResidualDetector()


def _generic_stream(seed: int) -> LabelledStream:
    from models.anomaly.synthetic import labelled_stream

    return labelled_stream("seasonal_spikes", seed=seed, n=3000)


def _water(name: str) -> Callable[[], AnomalyDetector]:
    def factory() -> AnomalyDetector:
        import models.water

        return getattr(models.water, name)()  # type: ignore[no-any-return]

    return factory


def _water_stream(name: str) -> Callable[[int], LabelledStream]:
    def stream(seed: int) -> LabelledStream:
        import models.water.streams

        return getattr(models.water.streams, name)(seed)  # type: ignore[no-any-return]

    return stream


DETECTORS: dict[str, Entry] = {
    "generic": Entry(
        factory=_generic,
        stream=_generic_stream,
        description="generic online detector for any numeric stream (models.anomaly.generic)",
    ),
    "water.customer_leak": Entry(
        factory=_water("CustomerLeakDetector"), stream=_water_stream("customer_leak_stream"),
        description="customer-side leak: flow never ~0, night minimum rising (models.water)",
    ),
    "water.sensor_faults": Entry(
        factory=_water("SensorFaultDetector"), stream=_water_stream("sensor_fault_stream"),
        description="meter faults: stuck, impossible, stopped, drift, battery, clock skew",
    ),
    "water.burst": Entry(
        factory=_water("BurstDetector"), stream=_water_stream("burst_stream"),
        description="burst at a district inlet: flow step with pressure drop (models.water)",
    ),
    "water.district_leak": Entry(
        factory=_water("DistrictLeakDetector"), stream=_water_stream("district_leak_stream"),
        description="district leak: minimum night flow and water balance (models.water)",
    ),
    "water.silence": Entry(
        factory=_water("SilenceDetector"), stream=_water_stream("silence_stream"),
        description="silent device: expected readings not arriving (models.water)",
    ),
}
"""Name → :class:`Entry` for every detector the check suite covers."""
