"""Columnar detector state shared by the water detectors, with a batch path.

The state is one numpy array per field with one slot per stream (device or district), and
the batch path gives the same results as the one-at-a-time path.

Every water detector comes in two shapes built on the same code:

- a *fleet* class (subclass of :class:`FleetDetector`) holding the state of many streams as
  numpy arrays indexed by a slot number; :meth:`FleetDetector.process` scores and learns a
  columnar block of readings of many streams at once (the dataflow's path);
- a per-stream class (subclass of :class:`ColumnarDetector`), the
  :class:`~models.anomaly.base.AnomalyDetector` contract (``learn_one``/``score_one``/
  ``explain``) over a fleet of one slot (the check suite's path).

Both run the same ``_score``/``_learn`` functions, so they give the same numbers;
``tests/test_water_batch.py`` checks it on simulated streams. A block may hold several
readings of one stream (a backlog after an outage): :meth:`FleetDetector.process` handles
them in *rounds* (the first reading of every stream, then the second...), so each stream
still sees its readings one at a time, in arrival order.

Event time only: a reading whose ``ts_ms`` is not after the stream's last processed reading
(late, duplicated, or behind a clock that jumped) is not scored (score 0) and not learned;
:attr:`FleetDetector.stale` counts them. Readings with a missing (NaN) input are skipped the
same way and counted in :attr:`FleetDetector.missing`.

What "learn" means here: detectors update their *counters* (hours since flow was last ~0,
the current night's minimum...) with every reading, since these measure the evidence itself;
*learned baselines* (what normal looks like for this stream) are updated only from readings
that score below :attr:`~models.anomaly.base.AnomalyDetector.threshold`, so a detector never
learns what it flags.

>>> import numpy as np
>>> class Maximum(FleetDetector):
...     '''Score 0.9 when a value exceeds twice the largest value learned so far.'''
...     FIELDS = {"high": (np.float64, 0.0)}
...     INPUTS = ("value",)
...     EVIDENCE = ("high",)
...     def _score(self, slot, cols, dt_h):
...         high = self.high[slot]
...         score = np.where((high > 0) & (cols["value"] > 2 * high), 0.9, 0.0)
...         return score, {"high": high}
...     def _learn(self, slot, cols, score, aux):
...         keep = score < self.threshold
...         self.high[slot[keep]] = np.maximum(self.high[slot[keep]], cols["value"][keep])
>>> fleet = Maximum(capacity=2)
>>> scored = fleet.process(np.array([0, 1, 0, 0]), {
...     "ts_ms": np.array([1, 1, 2, 3]), "value": np.array([1.0, 5.0, 3.0, 1.5])})
>>> scored.score.tolist(), fleet.high.tolist()
([0.0, 0.0, 0.9, 0.0], [1.5, 5.0])
"""

from __future__ import annotations

import abc
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from models.anomaly.base import AnomalyDetector, Features

MS_PER_HOUR = 3_600_000
MS_PER_DAY = 86_400_000
THRESHOLD = AnomalyDetector.threshold

Columns = Mapping[str, np.ndarray]
"""A columnar block: ``ts_ms`` (int64 epoch ms) and each input metric (float64)."""


@dataclass(frozen=True, eq=False)
class Scored:
    """Scores of a block, in the block's order, with the evidence arrays behind them."""

    score: np.ndarray
    evidence: dict[str, np.ndarray]
    fresh: np.ndarray | None = None
    """Which readings were scored and learned (not stale, nothing missing); None: all."""

    def row(self, i: int) -> dict[str, float]:
        """The evidence of reading ``i`` as a flat dict of floats."""
        return {name: float(values[i]) for name, values in self.evidence.items()}


class FleetDetector(abc.ABC):
    """State of one detector for many streams, as numpy arrays indexed by slot.

    Subclasses declare :attr:`FIELDS` (name → (dtype, initial value)), :attr:`INPUTS` (the
    metric columns read), :attr:`EVIDENCE` (the evidence arrays ``_score`` returns) and
    ``OPTIONAL`` lists inputs that may be NaN; the others must be present. Subclasses
    implement ``_score`` (pure: it must not change the state) and ``_learn``. ``dt_h`` is
    the time since the stream's previous reading in hours, capped at :attr:`MAX_STEP_H`
    (0 for a stream's first reading), so a long gap in the data never counts as hours of
    observed behaviour.
    """

    FIELDS: ClassVar[dict[str, tuple[Any, float]]] = {}
    INPUTS: ClassVar[tuple[str, ...]] = ()
    EVIDENCE: ClassVar[tuple[str, ...]] = ()
    OPTIONAL: ClassVar[tuple[str, ...]] = ()
    MAX_STEP_H: ClassVar[float] = 0.5
    threshold: float = THRESHOLD

    def __init__(self, capacity: int = 0) -> None:
        self.last_ts = np.zeros(capacity, np.int64)
        for name, (dtype, fill) in self.FIELDS.items():
            setattr(self, name, np.full(capacity, fill, dtype))
        self.stale = 0
        """Readings skipped because they were not after their stream's last reading."""
        self.missing = 0
        """Readings skipped because an input was missing (NaN)."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore a snapshot, also one taken before a field was added (it starts fresh).

        >>> from models.water.burst import BurstFleet
        >>> fleet = BurstFleet(capacity=2)
        >>> old = fleet.__getstate__()
        >>> del old["last_flow"]  # as pickled by a version without it
        >>> restored = BurstFleet.__new__(BurstFleet)
        >>> restored.__setstate__(old)
        >>> restored.last_flow.tolist()
        [0.0, 0.0]
        """
        self.__dict__.update(state)
        for name, (dtype, fill) in self.FIELDS.items():
            if name not in state:
                setattr(self, name, np.full(self.capacity, fill, dtype))

    @property
    def capacity(self) -> int:
        """How many slots the state holds."""
        return len(self.last_ts)

    def grow(self, capacity: int) -> None:
        """Make room for slots ``0 .. capacity-1`` (new slots start fresh)."""
        extra = capacity - self.capacity
        if extra <= 0:
            return
        self.last_ts = np.concatenate([self.last_ts, np.zeros(extra, np.int64)])
        for name, (dtype, fill) in self.FIELDS.items():
            setattr(self, name, np.concatenate([getattr(self, name),
                                                np.full(extra, fill, dtype)]))

    def state_bytes(self) -> int:
        """Bytes of numpy state per slot (the columnar cost of one stream)."""
        return 8 + sum(np.dtype(dtype).itemsize for dtype, _ in self.FIELDS.values())

    # -- the batch path -----------------------------------------------------------------------
    def process(self, slot: np.ndarray, cols: Columns) -> Scored:
        """Score, then learn, every reading of a block; each stream's readings in order."""
        slot = np.asarray(slot, np.int64)
        n = len(slot)
        if n and int(slot.max()) >= self.capacity:
            self.grow(int(slot.max()) + 1)
        score = np.zeros(n)
        evidence = {name: np.zeros(n) for name in self.EVIDENCE}
        fresh = np.zeros(n, bool)
        if n == 0:
            return Scored(score, evidence, fresh)
        order = np.argsort(slot, kind="stable")
        ordered = slot[order]
        first = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        if len(first) == n:  # one reading per stream: a single round
            self._round(np.arange(n), slot, cols, score, evidence, fresh)
            return Scored(score, evidence, fresh)
        rank = np.arange(n) - np.repeat(first, np.diff(np.r_[first, n]))
        rank_of = np.empty(n, np.int64)
        rank_of[order] = rank
        for r in range(int(rank.max()) + 1):
            rows = np.flatnonzero(rank_of == r)
            self._round(rows, slot, cols, score, evidence, fresh)
        return Scored(score, evidence, fresh)

    def _round(self, rows: np.ndarray, slot: np.ndarray, cols: Columns, score: np.ndarray,
               evidence: dict[str, np.ndarray], fresh: np.ndarray) -> None:
        """Score and learn ``rows``, which hold at most one reading per stream."""
        s = slot[rows]
        ts = np.asarray(cols["ts_ms"], np.int64)[rows]
        sub = {name: _column(cols, name, len(slot))[rows] for name in self.INPUTS}
        last = self.last_ts[s]
        ok = ts > last
        self.stale += int((~ok).sum())
        for name in self.INPUTS:
            if name in self.OPTIONAL:
                continue
            bad = ok & np.isnan(sub[name])
            self.missing += int(bad.sum())
            ok &= ~bad
        if not ok.all():
            rows, s, ts, last = rows[ok], s[ok], ts[ok], last[ok]
            sub = {name: values[ok] for name, values in sub.items()}
        if not len(rows):
            return
        sub["ts_ms"] = ts
        dt_h = np.where(last > 0, np.minimum((ts - last) / MS_PER_HOUR, self.MAX_STEP_H), 0.0)
        values, aux = self._score(s, sub, dt_h)
        self._learn(s, sub, values, {**aux, "dt_h": dt_h})
        self.last_ts[s] = ts
        fresh[rows] = True
        score[rows] = values
        for name in self.EVIDENCE:
            evidence[name][rows] = aux[name]

    def peek(self, slot: np.ndarray, cols: Columns) -> Scored:
        """Scores of one reading per slot without changing the state (``score_one``)."""
        slot = np.asarray(slot, np.int64)
        if len(slot) and int(slot.max()) >= self.capacity:
            self.grow(int(slot.max()) + 1)  # fresh slots: the same as no state
        ts = np.asarray(cols["ts_ms"], np.int64)
        sub: dict[str, np.ndarray] = {name: _column(cols, name, len(slot))
                                      for name in self.INPUTS}
        last = self.last_ts[slot]
        ok = ts > last
        for name in self.INPUTS:
            if name not in self.OPTIONAL:
                ok &= ~np.isnan(sub[name])
        n = len(slot)
        score = np.zeros(n)
        evidence = {name: np.zeros(n) for name in self.EVIDENCE}
        if not ok.any():
            return Scored(score, evidence)
        sub = {name: values[ok] for name, values in sub.items()}
        sub["ts_ms"] = ts[ok]
        dt_h = np.where(last[ok] > 0,
                        np.minimum((ts[ok] - last[ok]) / MS_PER_HOUR, self.MAX_STEP_H), 0.0)
        values, aux = self._score(slot[ok], sub, dt_h)
        score[ok] = values
        for name in self.EVIDENCE:
            evidence[name][ok] = aux[name]
        return Scored(score, evidence)

    # -- what subclasses implement ------------------------------------------------------------
    @abc.abstractmethod
    def _score(self, slot: np.ndarray, cols: dict[str, np.ndarray],
               dt_h: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Scores and evidence of the readings at ``slot`` (state unchanged)."""

    @abc.abstractmethod
    def _learn(self, slot: np.ndarray, cols: dict[str, np.ndarray], score: np.ndarray,
               aux: dict[str, np.ndarray]) -> None:
        """Update the state of ``slot`` with readings that were scored ``score``."""


def _column(cols: Columns, name: str, n: int) -> np.ndarray:
    """Input column ``name`` as float64; an absent column means "not measured" (NaN)."""
    if name in cols:
        return np.asarray(cols[name], np.float64)
    return np.full(n, np.nan)


class ColumnarDetector(AnomalyDetector):
    """The :class:`~models.anomaly.base.AnomalyDetector` contract over a one-slot fleet.

    Subclasses set :attr:`FLEET` and pass their settings to ``__init__``; the fleet is built
    lazily, so an unused detector costs nothing.
    """

    FLEET: ClassVar[type[FleetDetector]]
    _ZERO: ClassVar[np.ndarray] = np.zeros(1, np.int64)

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self._fleet: FleetDetector | None = None

    def _state(self) -> FleetDetector:
        if self._fleet is None:
            self._fleet = self.FLEET(self.settings, capacity=1)  # type: ignore[call-arg]
        return self._fleet

    def _columns(self, x: Features) -> dict[str, np.ndarray]:
        if "ts_ms" not in x:
            msg = f"{type(self).__name__} reads event time: x needs 'ts_ms' (UTC epoch ms)"
            raise ValueError(msg)
        cols = {name: np.array([float(x.get(name, np.nan))]) for name in self.FLEET.INPUTS}
        cols["ts_ms"] = np.array([int(x["ts_ms"])], np.int64)
        return cols

    def learn_one(self, x: Features) -> None:
        """Update counters with ``x``, and learned baselines unless ``x`` is flagged."""
        self._state().process(self._ZERO, self._columns(x))

    def score_one(self, x: Features) -> float:
        """The score of ``x`` in [0, 1]; the state is not changed."""
        return float(self._state().peek(self._ZERO, self._columns(x)).score[0])

    def explain(self, x: Features) -> dict[str, float | str]:
        """The evidence behind ``score_one(x)``, with the score itself."""
        scored = self._state().peek(self._ZERO, self._columns(x))
        return {"score": float(scored.score[0]), **scored.row(0)}

    def state_size(self) -> int:
        """Bytes of this detector pickled (the per-device cost in a keyed dataflow)."""
        self._state()
        return len(pickle.dumps(self))
