"""The detector contract every model in :mod:`models` follows (river's, plus ``explain``).

A detector instance holds the state of *one* stream (one device, or one district): the
dataflow keeps one per key and snapshots it with pickle, so state must stay small (goal
≤ 10 KB per device) and picklable. ``x`` is a flat dict of numbers; water detectors read
``ts_ms`` (event time, UTC milliseconds) and metric names from the contract
(``flow_lpm``, ``pressure_bar``...). Missing keys and NaN values mean "not measured".

- ``learn_one(x)`` updates the state. Detectors do not learn from what they flag: a
  reading whose score is at or above :attr:`AnomalyDetector.threshold` is not learned.
- ``score_one(x)`` returns a calibrated score in [0, 1] (higher is more anomalous) and does
  not change the state; one threshold means about the same alarm rate on every stream.
- ``explain(x)`` returns the evidence behind the score as a flat, JSON-ready dict.

>>> class Above(AnomalyDetector):
...     '''Flags values above twice the largest value learned so far.'''
...     def __init__(self, metric: str = "flow_lpm") -> None:
...         self.metric = metric
...         self._max = 0.0
...     def learn_one(self, x: Features) -> None:
...         if self.score_one(x) < self.threshold:
...             self._max = max(self._max, x[self.metric])
...     def score_one(self, x: Features) -> float:
...         return 1.0 if 0 < 2 * self._max < x[self.metric] else 0.0
...     def explain(self, x: Features) -> dict[str, float | str]:
...         return {"value": x[self.metric], "learned_max": self._max}
>>> detector = Above()
>>> detector.learn_one({"flow_lpm": 3.0})
>>> detector.score_one({"flow_lpm": 7.0}), detector.explain({"flow_lpm": 7.0})
(1.0, {'value': 7.0, 'learned_max': 3.0})
>>> detector.learn_one({"flow_lpm": 7.0})  # flagged, so not learned
>>> detector.score_one({"flow_lpm": 6.5})
1.0
"""

from __future__ import annotations

import abc
from collections.abc import Mapping

Features = Mapping[str, float]
"""One observation: metric name (or ``ts_ms``) to value."""


class AnomalyDetector(abc.ABC):
    """Base class of every detector: river's anomaly contract, plus ``explain``.

    Subclasses store hyper-parameters unchanged in ``__init__`` and keep runtime state in
    ``_private`` attributes; randomness takes a ``seed``.
    """

    threshold: float = 0.9
    """Scores at or above this are alarms, and are not learned from."""

    @abc.abstractmethod
    def learn_one(self, x: Features) -> None:
        """Update the state with ``x`` unless ``x`` scores at or above the threshold."""

    @abc.abstractmethod
    def score_one(self, x: Features) -> float:
        """The calibrated anomaly score of ``x`` in [0, 1]; the state is not changed."""

    @abc.abstractmethod
    def explain(self, x: Features) -> dict[str, float | str]:
        """The evidence behind ``score_one(x)``: a flat dict fit for an alert."""
