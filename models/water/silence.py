"""Silent device: expected readings that do not arrive.

Fed by the dataflow's gap detection, not by readings: an observation says, at event time
``ts_ms`` (the watermark), when the device's newest reading was stamped (``last_seen_ms``)
and how often it reports (``cadence_s``). The missed readings are ``(ts_ms - last_seen_ms)
/ cadence - 1`` (one interval of slack for delivery latency). The detector learns each
device's usual shortfall (exponentially weighted, from observations that are not flagged),
so a device on a flaky link needs a longer silence to alarm::

    score = 0.9 * missed / max(after_readings, usual_factor * usual)   (clipped to [0, 1])

With the default ``after_readings=24`` a 15-minute meter alarms after 6 hours of silence and
a 1-minute SCADA meter after 24 minutes: the same number of missed readings everywhere. The
fleet path :meth:`SilenceFleet.observe` takes arrays of devices at one watermark.

Per device: 13 bytes of numpy state; about 0.6 KB pickled as one :class:`SilenceDetector`.

>>> detector = SilenceDetector()
>>> start = 1_767_571_200_000
>>> for hour in range(1, 48):
...     detector.learn_one({"ts_ms": start + hour * 3_600_000,
...                         "last_seen_ms": start + hour * 3_600_000 - 900_000,
...                         "cadence_s": 900})
>>> gap = {"ts_ms": start + 60 * 3_600_000, "last_seen_ms": start + 47 * 3_600_000,
...        "cadence_s": 900}
>>> detector.score_one(gap), detector.explain(gap)["missed"]
(1.0, 51.0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from models.water.base import ColumnarDetector, Columns, FleetDetector, Scored


@dataclass(frozen=True)
class SilenceSettings:
    """Hyper-parameters of :class:`SilenceFleet` (see the module docs)."""

    after_readings: float = 24.0
    usual_factor: float = 4.0
    alpha: float = 0.02
    threshold: float = 0.9


class SilenceFleet(FleetDetector):
    """Silence state of many devices; inputs ``last_seen_ms`` and ``cadence_s``."""

    FIELDS: ClassVar = {
        "usual": (np.float32, 0.0),
        "seen": (np.bool_, False),
    }
    INPUTS = ("last_seen_ms", "cadence_s")
    EVIDENCE = ("missed", "silent_h", "usual_missed")
    MAX_STEP_H = 24.0

    def __init__(self, settings: SilenceSettings | None = None, capacity: int = 0) -> None:
        self.settings = settings or SilenceSettings()
        self.threshold = self.settings.threshold
        super().__init__(capacity)

    def observe(self, slot: np.ndarray, last_seen_ms: np.ndarray, cadence_s: np.ndarray,
                watermark_ms: int) -> Scored:
        """Score and learn one gap observation per device at ``watermark_ms``."""
        cols: Columns = {"ts_ms": np.full(len(slot), watermark_ms, np.int64),
                         "last_seen_ms": np.asarray(last_seen_ms, np.float64),
                         "cadence_s": np.asarray(cadence_s, np.float64)}
        return self.process(slot, cols)

    def _score(self, slot: np.ndarray, cols: dict[str, np.ndarray],
               dt_h: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        cfg = self.settings
        gap_ms = cols["ts_ms"] - cols["last_seen_ms"]
        missed = np.maximum(gap_ms / (cols["cadence_s"] * 1000) - 1.0, 0.0)
        level = np.maximum(cfg.after_readings, cfg.usual_factor * self.usual[slot])
        score = np.clip(cfg.threshold * missed / level, 0.0, 1.0)
        return score, {"missed": np.floor(missed), "silent_h": gap_ms / 3_600_000,
                       "usual_missed": self.usual[slot].astype(np.float64)}

    def _learn(self, slot: np.ndarray, cols: dict[str, np.ndarray], score: np.ndarray,
               aux: dict[str, np.ndarray]) -> None:
        keep = score < self.settings.threshold
        target = slot[keep]
        a = self.settings.alpha
        self.usual[target] = (1 - a) * self.usual[target] + a * aux["missed"][keep]
        self.seen[target] = True


class SilenceDetector(ColumnarDetector):
    """One device's silence detector (the contract over :class:`SilenceFleet`).

    ``x`` holds ``ts_ms`` (the watermark), ``last_seen_ms`` and ``cadence_s``.
    """

    FLEET = SilenceFleet

    def __init__(self, settings: SilenceSettings | None = None) -> None:
        super().__init__(settings or SilenceSettings())
        self.threshold = self.settings.threshold
