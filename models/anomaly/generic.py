"""The generic online anomaly detector for any numeric stream (one or many columns).

:class:`SeasonalResidualDetector` forecasts each column one step ahead, measures how far the
reading is from the forecast in units of a robust scale, and turns several views of that
residual into calibrated tail probabilities (:mod:`models.anomaly.calibrate`). It knows
nothing about the stream in advance: not its units, sampling step, period or noise.

Forecast (per column)
    ``forecast = level + season(phase)``. The *period* is found from the data: every time the
    number of rows reaches a power of two (64, 128, ...), the autocorrelation of a compact
    history (at most 256 block means that halve their resolution as the stream grows, so even a
    weekly cycle of minute data fits; gaps in event time are filled with forecasts) is searched
    for its first strong peak after the first zero crossing, then refined on the farthest
    multiple of it (:func:`detect_period`). With timestamps, a period within 10 % of a day or a
    week snaps to a day and the phase comes from event time (gaps and jitter do not shift it),
    with a weekly correction profile that is used only while it lowers the error. Profiles have
    at most ``max_bins`` bins with linear interpolation. A new period is warm-started by
    folding the history, then its first three cycles (two weeks for the weekly correction) are
    averaged in; a better estimate of the same period keeps the learned profile, rotated so the
    phase does not jump. Without a strong
    peak there is no season (white noise and random walks do not get an imaginary one).
    The *level* is not one smoother but four exponential ones (rates 1, 0.3, 0.05, 0.01) of the
    de-seasonalised value; the forecast uses the one with the lowest recent absolute error, so a
    random walk is forecast by its last value and a noisy stationary series by a slow mean.
    Updates are clipped at 4 scales (Huber-like).

Scale
    The mean absolute error of the chosen level (times 1.2533, the Gaussian ratio of sd to
    mean absolute deviation), tracked with clipped updates: robust, and it follows slow changes.

Evidence, each turned into a tail probability ``p`` by its own online calibrator
    ``spike``: ``|residual| / scale``; ``shift``: an exponential mean of the signed scaled
    residuals over about ``window`` readings (level shifts, steps); ``variance``: the same mean
    of their absolute values (noise bursts); ``flatline``: how many times in a row the exact
    same value repeated, in units of the usual run, against the lengths of completed runs
    (stuck sensors; a series that is always constant is not stuck); ``drift``: the distance
    between the slow level and a ten times slower anchor, in scales (slow drifts; only when the
    slow level is the best forecaster; after ``window`` rows of drift-only alarm it re-anchors,
    and drift-only alarms teach its calibrator, so a series that always trends stops
    alarming). The first three and ``drift`` have Gaussian-like tails and are calibrated
    squared (:class:`~models.anomaly.calibrate.TailCalibrator` with ``power=2``). The score is
    ``p_to_score(k * min p)`` over the ``k`` pieces of evidence of every column (Bonferroni):
    with the default threshold 0.9 about one normal reading in 4,000 alarms on a well-behaved
    stream, whatever its units and noise.

Learning
    Rows scoring at or above ``threshold`` are not learned: not by the levels, the scale, the
    calibration (drift-only alarms aside, see above), nor the seasonal profiles. One
    exception: in the few fresh cycles after a period is found, the profiles average every
    row, because a pattern that recurs (the first weekends, a sharp peak the coarse fold
    smoothed away) must be learned even while it alarms.
    Profiles learn against a reference level that moves over a whole cycle, with residuals
    clipped at 4 scales (Huber-like). If ``patience`` rows in a row are flagged, the detector
    accepts a new regime (a level shift, a noise level that stays): it re-centres the levels
    (and the profiles' reference) on the median of those rows and widens the scale if they were
    noisier, then learns again; so a step alarms for a while, not for ever. For
    ``4 * patience`` rows it keeps the old regime, and a flagged row that fits the old one
    restores it (a sensor stuck for a while, a temporary dip: one alarm at the return, not
    ``patience``). Missing keys, ``None``, NaN and infinities are "not measured": such a column
    has no evidence and learns nothing.

State per column: about 4.5–5 KB pickled (five calibrators of 0.5 KB, the 256-value history in
float32, profiles in float32), so two columns fit the 10 KB per device; measured in
``bench/bench_generic_detector.py`` and ``tests/test_generic_detector.py``. Cost: about 15–25 µs
per row and column for ``score_learn_one``.

>>> import math, random
>>> rng = random.Random(3)
>>> detector = SeasonalResidualDetector()
>>> def reading(i, bump=0.0):  # hourly, daily cycle, noise sd 1
...     value = 10 * math.sin(2 * math.pi * i / 24) + rng.gauss(0, 1) + bump
...     return {"ts_ms": 3_600_000 * i, "value": value}
>>> for i in range(24 * 21):
...     detector.learn_one(reading(i))
>>> detector.period_samples("value")
24.0
>>> normal, spike = reading(24 * 21), reading(24 * 21 + 1, bump=8.0)
>>> round(detector.score_one(normal), 2), round(detector.score_one(spike), 2)
(0.0, 1.0)
>>> evidence = detector.explain(spike)
>>> evidence["column"], evidence["evidence"], round(evidence["residual"], 1)
('value', 'spike', 6.1)
>>> round(evidence["expected"], 1), round(10 * math.sin(2 * math.pi * 505 / 24), 1)  # vs truth
(2.9, 2.6)
"""

from __future__ import annotations

import itertools
import math
from array import array
from collections.abc import Sequence

from models.anomaly.base import AnomalyDetector, Features
from models.anomaly.calibrate import DEFAULT_DECADES, TailCalibrator, p_to_score

DAY_MS = 86_400_000
WEEK_MS = 7 * DAY_MS

_LEVEL_RATES = (1.0, 0.3, 0.05, 0.01)
_SLOW = 2  # levels from this index on are "slow": the series is stationary around them
_ANCHOR_RATE = 0.001
_TRACK_RATE = 0.02
_CLIP = 4.0
_HISTORY = 256
_WEEK_BINS = 84
_FRESH_CYCLES = 3  # cycles after a period is found that the profile averages, alarms included
_FRESH_WEEKS = 2  # the same for the weekly correction
_SD_PER_MAE = math.sqrt(math.pi / 2.0)  # 1.2533
_MEAN_ABS_Z = math.sqrt(2.0 / math.pi)  # 0.7979, E|z| of a standard normal
_EVIDENCE = ("spike", "shift", "variance", "flatline", "drift")
_SD_ABS_Z = math.sqrt(1.0 - 2.0 / math.pi)  # sd of |z|
_MIN_ACF = 0.3
_MIN_PROMINENCE = 0.6  # a peak must rise this much above the trough before it
_NO_P = (1.0,) * 5


class SeasonalResidualDetector(AnomalyDetector):
    """Calibrated residuals of a self-tuning seasonal forecaster, for any numeric columns.

    Parameters
    ----------
    columns
        The keys of ``x`` to watch; ``None`` (default) watches every key but ``time_key``,
        adding a column the first time it appears.
    time_key
        The key of the event time in milliseconds (optional in ``x``).
    threshold
        Scores at or above it are alarms and are not learned.
    window
        Readings the ``shift`` and ``variance`` evidence average over.
    patience
        Flagged rows in a row after which a new regime is accepted.
    warmup
        Rows learned before any score above 0.
    max_bins
        Most bins of the main seasonal profile.
    season_rate
        Per-cycle learning rate of the seasonal profiles.
    decades, half_life
        Passed to each :class:`~models.anomaly.calibrate.TailCalibrator`.

    The detector is deterministic (there is nothing random in it, so no ``seed``).

    """

    def __init__(
        self,
        columns: Sequence[str] | None = None,
        time_key: str = "ts_ms",
        threshold: float = 0.9,
        window: int = 8,
        patience: int = 16,
        warmup: int = 32,
        max_bins: int = 256,
        season_rate: float = 0.1,
        decades: float = DEFAULT_DECADES,
        half_life: float = 10_000.0,
    ) -> None:
        self.columns = columns
        self.time_key = time_key
        self.threshold = threshold
        self.window = window
        self.patience = patience
        self.warmup = warmup
        self.max_bins = max_bins
        self.season_rate = season_rate
        self.decades = decades
        self.half_life = half_life
        self._beta = 2.0 / (window + 1.0)
        self._shift_sd = math.sqrt(self._beta / (2.0 - self._beta))  # sd of the mean of z
        self._columns: dict[str, _Column] = {}
        self._rows = 0
        self._flagged_run = 0

    # -- the contract ---------------------------------------------------------------------
    def score_one(self, x: Features) -> float:
        """The calibrated anomaly score of ``x`` in [0, 1]; the state is not changed."""
        return self._evaluate(x)[0]

    def learn_one(self, x: Features) -> None:
        """Learn ``x`` unless it scores at or above the threshold (see the module docs)."""
        self.score_learn_one(x)

    def score_learn_one(self, x: Features) -> float:
        """``score_one(x)`` then ``learn_one(x)`` in one pass (half the work); returns the score."""
        score, ts, evaluations = self._evaluate(x)
        flagged = score >= self.threshold
        self._flagged_run = self._flagged_run + 1 if flagged else 0
        accept = self._flagged_run >= self.patience
        for name, evaluation in evaluations.items():
            self._column(name).learn(self, evaluation, ts, self._rows, flagged, accept)
        if accept:
            self._flagged_run = 0
        self._rows += 1
        for column in self._columns.values():
            column.after_row(self, self._rows)
        return score

    def explain(self, x: Features) -> dict[str, float | str]:
        """The evidence behind ``score_one(x)``, for the column that drove it.

        Keys: ``score``, ``column``, ``evidence`` (spike, shift, variance, flatline, drift, or
        none), ``p_value`` (its tail probability), ``value``, ``expected`` (the forecast),
        ``residual``, ``scale`` and ``period_samples``.
        """
        score, _, evaluations = self._evaluate(x)
        out: dict[str, float | str] = {"score": score}
        worst: tuple[float, str, _Evaluation] | None = None
        for name in sorted(evaluations):
            evaluation = evaluations[name]
            p = min(evaluation.ps)
            if worst is None or p < worst[0]:
                worst = (p, name, evaluation)
        if worst is None:
            out["evidence"] = "none"
            return out
        p, name, evaluation = worst
        out.update({
            "column": name,
            "evidence": _EVIDENCE[evaluation.ps.index(p)],
            "p_value": p,
            "value": evaluation.value,
            "expected": evaluation.value - evaluation.residual,
            "residual": evaluation.residual,
            "scale": evaluation.sigma,
            "period_samples": self.period_samples(name),
        })
        return out

    def period_samples(self, column: str) -> float:
        """The period found in ``column``, in readings (0.0: none found yet)."""
        found = self._columns.get(column)
        return found.period if found is not None else 0.0

    # -- internals ------------------------------------------------------------------------
    def _column(self, name: str) -> _Column:
        column = self._columns.get(name)
        if column is None:
            column = self._columns[name] = _Column(self)
        return column

    def _evaluate(self, x: Features) -> tuple[float, float | None, dict[str, _Evaluation]]:
        ts = _finite(x.get(self.time_key))
        names = self.columns if self.columns is not None else [
            key for key in x if key != self.time_key
        ]
        evaluations: dict[str, _Evaluation] = {}
        ps: list[float] = []
        for name in names:
            value = _finite(x.get(name))
            column = self._columns.get(name)
            if value is None:
                continue
            if column is None:
                evaluation = _Evaluation(value, 0.0, 1.0, 0.0, 0.0, 0, _MEAN_ABS_Z, (), _NO_P)
            else:
                evaluation = column.evaluate(self, value, ts, self._rows)
            evaluations[name] = evaluation
            ps.extend(evaluation.ps)
        p = min(1.0, len(ps) * min(ps)) if ps else 1.0
        return p_to_score(p, self.decades), ts, evaluations


def _finite(value: object) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class _Evaluation:
    """What a column's reading looks like to the model (computed once, learned from after)."""

    __slots__ = ("m", "phases", "ps", "raws", "residual", "run", "season", "sigma", "v", "value")

    def __init__(
        self, value: float, season: float, sigma: float, residual: float, m: float, run: int,
        v: float, raws: tuple[float, ...], ps: tuple[float, ...],
        phases: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0),
    ) -> None:
        self.value, self.season, self.sigma, self.residual = value, season, sigma, residual
        self.m, self.run, self.v, self.raws, self.ps = m, run, v, raws, ps
        self.phases = phases  # (main season, weekly correction, main phase, weekly phase)


class _Column:
    """The model of one column: levels, seasonal profiles, scale, evidence and calibrators."""

    __slots__ = (
        "accepted_at", "anchor", "best", "calibrators", "changes", "day_err", "drift_run", "dt",
        "history", "history_block", "history_count", "history_offset", "history_sum", "last_ts",
        "last_value", "learned", "levels", "m", "period", "period_error", "period_ms", "previous",
        "reference", "regime", "row", "run", "season", "season_start", "t0", "trackers", "v",
        "week", "week_err",
    )

    def __init__(self, detector: SeasonalResidualDetector) -> None:
        self.levels = [math.nan] * len(_LEVEL_RATES)
        self.trackers = [0.0] * len(_LEVEL_RATES)
        self.best = len(_LEVEL_RATES) - 1
        self.anchor = math.nan
        self.drift_run = 0
        self.reference = 0.0  # the level the seasonal profiles are learned against
        self.learned = 0
        self.m = 0.0
        self.v = _MEAN_ABS_Z
        self.run = 0
        self.changes = 1.0  # how often the value changes from one row to the next (EWMA)
        self.last_value = math.nan
        self.season = array("f")  # main profile (empty: no period)
        self.season_start = 0  # the row it was (re)started at
        self.row = 0
        self.week = array("f")  # weekly correction profile (time mode, daily period only)
        self.week_err = 0.0
        self.day_err = 0.0
        self.period = 0.0  # in rows
        self.period_error = math.inf  # its uncertainty, in rows
        self.period_ms = 0.0  # in event time (0: phase from the row index)
        self.t0: float | None = None
        self.last_ts = 0.0
        self.dt = 0.0  # typical step between timestamps, ms
        self.history = array("f")  # float32, relative to history_offset
        self.history_offset = math.nan
        self.history_block = 1
        self.history_sum = 0.0
        self.history_count = 0
        self.regime: list[float] = []  # de-seasonalised values of the current alarm run
        # the regime before the last accepted one: levels, trackers, anchor, reference, best
        self.previous: tuple[list[float], list[float], float, float, int] | None = None
        self.accepted_at = 0
        self.calibrators = _calibrators(detector)

    # -- forecast ---------------------------------------------------------------------------
    def _phase(self, ts: float | None, row: int, period_ms: float, period_rows: float) -> float:
        if period_ms > 0.0 and self.t0 is not None:
            t = ts if ts is not None else self.t0 + row * self.dt
            return ((t - self.t0) / period_ms) % 1.0
        return (row / period_rows) % 1.0

    def _seasonal(self, ts: float | None, row: int) -> tuple[float, float, float, float]:
        """(main season, weekly correction, main phase, weekly phase) at this row."""
        if not self.season:
            return 0.0, 0.0, 0.0, 0.0
        phase = self._phase(ts, row, self.period_ms, self.period)
        main = _interpolate(self.season, phase)
        if not self.week:
            return main, 0.0, phase, 0.0
        week_phase = self._phase(ts, row, WEEK_MS, self.period * 7)
        return main, _interpolate(self.week, week_phase), phase, week_phase

    def evaluate(
        self, detector: SeasonalResidualDetector, value: float, ts: float | None, row: int
    ) -> _Evaluation:
        phases = self._seasonal(ts, row)
        season = phases[0] + (phases[1] if self.week_err < self.day_err else 0.0)
        level = self.levels[self.best]
        if level != level:  # nothing learned yet
            return _Evaluation(value, season, 1.0, 0.0, 0.0, 0, _MEAN_ABS_Z, (), _NO_P, phases)
        residual = value - season - level
        sigma = max(self.trackers[self.best] * _SD_PER_MAE, 1e-9 * max(1.0, abs(level)))
        z = residual / sigma
        beta = detector._beta
        m = (1.0 - beta) * self.m + beta * max(-_CLIP * 2, min(_CLIP * 2, z))
        v = (1.0 - beta) * self.v + beta * min(abs(z), _CLIP + 1.0)
        run = self.run + 1 if value == self.last_value else 0
        shift_sd = detector._shift_sd
        raws = (
            abs(z),
            abs(m) / shift_sd,
            max(0.0, (v - _MEAN_ABS_Z) / (_SD_ABS_Z * shift_sd)),
            run * self.changes,  # the run in units of the usual run length
            abs(self.levels[-1] - self.anchor) / sigma,
        )
        if self.learned < detector.warmup:
            return _Evaluation(value, season, sigma, residual, m, run, v, raws, _NO_P, phases)
        ps = tuple(c.tail_probability(r) for c, r in zip(self.calibrators, raws, strict=True))
        if self.best < _SLOW:  # a wandering series: a slow level's distance means nothing
            ps = (*ps[:4], 1.0)
        return _Evaluation(value, season, sigma, residual, m, run, v, raws, ps, phases)

    # -- learning ---------------------------------------------------------------------------
    def learn(
        self, detector: SeasonalResidualDetector, e: _Evaluation, ts: float | None, row: int,
        flagged: bool, accept: bool,
    ) -> None:
        if ts is not None:
            if self.t0 is not None and self.dt > 0.0 and ts - self.last_ts > 1.5 * self.dt:
                self._fill_gap(ts, row)
            self._track_time(ts)
        if self.season and e.raws:
            self._learn_season(detector, e, row, flagged and not accept)
        if flagged and e.ps and e.ps[4] < min(e.ps[:4]):
            # the drift evidence alone says little after a short while (a shift that was
            # absorbed looks like a drift until the anchor catches up): re-anchor soon
            self.drift_run += 1
            if self.drift_run >= detector.window:
                self.anchor, self.drift_run = self.levels[-1], 0
            if e.raws and self.best >= _SLOW:  # a series that always trends: learn that it does
                self.calibrators[4].learn_one(e.raws[4])
        else:
            self.drift_run = 0
        if self.previous is not None and row - self.accepted_at > 4 * detector.patience:
            self.previous = None  # the new regime has lasted: forget the old one
        if flagged and not accept:
            self._remember(e.value)  # a recurring pattern must be found even if it alarms
            if self.previous is not None and self._back_to_previous(e):
                return
            self.regime.append(e.value - e.season)
            return
        if accept:
            self._remember(e.value)
            self._accept(e, row)
            return
        after_alarm = bool(self.regime)
        self.regime.clear()
        self._learn_value(detector, e, after_alarm)

    def _learn_season(
        self, detector: SeasonalResidualDetector, e: _Evaluation, row: int, flagged: bool
    ) -> None:
        """Learn the seasonal profiles from a row.

        They learn against a reference level that moves over a whole cycle, with residuals
        clipped at 4 scales. In the first three cycles after a period is found (two weeks for
        the weekly correction) they average every row unclipped, flagged or not: the history
        they were folded from is coarse, and a pattern that recurs (the first weekends, a sharp
        peak the fold smoothed) must be learned even while it alarms. After that, flagged rows
        teach them nothing, as they teach nothing to the levels, the scale and the calibration.
        """
        main, weekly, phase, week_phase = e.phases
        cycles = (row - self.season_start) // self.period  # whole cycles since it was found
        weeks = cycles // 7
        fresh, fresh_week = cycles < _FRESH_CYCLES, weeks < _FRESH_WEEKS
        if flagged and not fresh and not fresh_week:
            return
        rate = detector.season_rate
        limit = math.inf if fresh else _CLIP * e.sigma
        value = e.value
        # fresh cycles are averaged (1, 1/2, 1/3 ...), replacing the coarse fold; then rate
        gain = max(rate, 1.0 / (cycles + 1.0)) * len(self.season) / self.period
        resid = value - self.reference - main - (weekly if self.week else 0.0)
        if fresh or not flagged:
            _spread(self.season, phase, min(1.0, gain) * max(-limit, min(limit, resid)))
        if self.week:
            limit_w = math.inf if fresh_week else _CLIP * e.sigma
            gain_w = max(rate, 1.0 / (weeks + 1.0)) * _WEEK_BINS / (self.period * 7.0)
            _spread(self.week, week_phase, min(1.0, gain_w) * max(-limit_w, min(limit_w, resid)))
            base = abs(value - self.reference - main)
            self.day_err += _TRACK_RATE * (min(base, limit_w) - self.day_err)
            self.week_err += _TRACK_RATE * (min(abs(resid), limit_w) - self.week_err)
        if flagged and not fresh:
            return
        cycle = self.period * (7.0 if self.week else 1.0)
        deseasoned = value - main - (weekly if self.week else 0.0) - self.reference
        self.reference += min(0.01, 1.0 / cycle) * max(-limit, min(limit, deseasoned))

    def _fill_gap(self, ts: float, row: int) -> None:
        """Give the history forecasts for readings missing before ``ts`` (at most 4,096).

        So its autocorrelation keeps its time axis across gaps.
        """
        level = self.levels[self.best]
        if level != level:
            return
        missing = min(4096, round((ts - self.last_ts) / self.dt) - 1)
        for k in range(1, missing + 1):
            t = self.last_ts + k * self.dt
            self._remember(level + self._seasonal(t, row)[0])

    def _track_time(self, ts: float) -> None:
        """Track the typical step between timestamps (a frugal streaming median)."""
        if self.t0 is None:
            self.t0 = self.last_ts = ts
            return
        step = ts - self.last_ts
        self.last_ts = ts
        if step <= 0.0:
            return
        if self.dt <= 0.0:
            self.dt = step
        elif step != self.dt:
            self.dt *= 1.02 if step > self.dt else 0.98
            if abs(step / self.dt - 1.0) < 0.02:
                self.dt = step

    def _learn_value(
        self, detector: SeasonalResidualDetector, e: _Evaluation, after_alarm: bool
    ) -> None:
        value = e.value
        d = value - e.season
        first = self.levels[0] != self.levels[0]
        warm = self.learned < detector.warmup
        rate = max(_TRACK_RATE, 1.0 / (self.learned + 1))
        sigma = e.sigma
        limit = math.inf if warm else _CLIP * sigma
        best, best_err = 0, math.inf
        for i, alpha in enumerate(_LEVEL_RATES):
            if first:
                self.levels[i] = d
                continue
            err = d - self.levels[i]
            tracked = self.trackers[i]
            self.trackers[i] = tracked + rate * (min(abs(err), limit) - tracked)
            self.levels[i] += alpha * max(-limit, min(limit, err))
            if self.trackers[i] < best_err:
                best, best_err = i, self.trackers[i]
        if first:
            self.anchor = d
        else:
            self.best = best
            self.anchor += _ANCHOR_RATE * max(-limit, min(limit, self.levels[-1] - self.anchor))
        if not warm and e.raws:
            for calibrator, raw in zip(self.calibrators[:3], e.raws, strict=False):
                calibrator.learn_one(raw)
            if e.run == 0 and not after_alarm:  # a run of repeats ended: learn its length
                self.calibrators[3].learn_one(self.run * self.changes)
            if self.best >= _SLOW:
                self.calibrators[4].learn_one(e.raws[4])
        if self.learned:
            changed = 0.0 if e.run else 1.0
            self.changes += max(_TRACK_RATE, 1.0 / self.learned) * (changed - self.changes)
        self.m, self.v, self.run, self.last_value = e.m, e.v, e.run, value
        self.learned += 1
        if self.learned == detector.warmup:  # forget what the warm-up's rough scale said
            self.m, self.v = 0.0, _MEAN_ABS_Z
        self._remember(value)

    def _accept(self, e: _Evaluation, row: int) -> None:
        """A flagged run lasted ``patience`` rows: take it as the new normal.

        The old regime is kept for ``4 * patience`` rows, in case the excursion ends (a sensor
        stuck for a while, a temporary dip): see :meth:`_back_to_previous`.
        """
        if self.previous is None:  # a second accept in a row keeps the regime before both
            self.previous = (list(self.levels), list(self.trackers), self.anchor,
                             self.reference, self.best)
        self.accepted_at = row
        values = [*self.regime, e.value - e.season]
        centre = _median(values)
        spread = _median([abs(v - centre) for v in values]) * 1.4826
        self.reference += centre - self.levels[self.best]  # profiles keep their shape
        for i in range(len(self.levels)):
            self.levels[i] = centre
            self.trackers[i] = max(self.trackers[i], spread / _SD_PER_MAE)
        self.anchor = centre
        self.m, self.v, self.run, self.last_value = 0.0, _MEAN_ABS_Z, 0, e.value
        self.regime.clear()

    def _back_to_previous(self, e: _Evaluation) -> bool:
        """If a flagged row fits the regime before the last accepted one, restore that one."""
        assert self.previous is not None
        levels, trackers, anchor, reference, best = self.previous
        sigma = trackers[best] * _SD_PER_MAE
        if abs(e.value - e.season - levels[best]) > 3.0 * sigma:
            return False
        self.levels, self.trackers = list(levels), list(trackers)
        self.anchor, self.reference, self.best = anchor, reference, best
        self.previous = None
        self.regime.clear()
        self.m, self.v, self.run = 0.0, _MEAN_ABS_Z, 0
        return True

    def _remember(self, value: float) -> None:
        """Add to the compact history: block means, halving resolution when full."""
        if self.history_offset != self.history_offset:
            self.history_offset = value
        self.history_sum += value - self.history_offset
        self.history_count += 1
        if self.history_count < self.history_block:
            return
        self.history.append(self.history_sum / self.history_count)
        self.history_sum, self.history_count = 0.0, 0
        if len(self.history) >= _HISTORY:
            old = self.history
            self.history = array("f", [(old[i] + old[i + 1]) / 2 for i in range(0, len(old), 2)])
            self.history_block *= 2

    def after_row(self, detector: SeasonalResidualDetector, rows: int) -> None:
        """At 64, 128, 256... rows: look for a (new) period in the history."""
        self.row = rows
        if rows < 64 or rows & (rows - 1):
            return
        history = list(self.history)
        period_blocks, uncertainty = _detect_period(history)
        if period_blocks < 4.0:  # none, or too few blocks to tell it from a multiple
            return
        period = period_blocks * self.history_block
        uncertainty *= self.history_block
        if self.period:
            if self.period < 4 * self.history_block:
                return  # the history is now too coarse to see the current period: keep it
            ratio = period / self.period
            if ratio > 1.5 and abs(ratio - round(ratio)) < 0.05 * ratio:
                # a multiple of the period we have: keep ours if the data still show it
                acf = _autocorrelation(history)
                lag = round(self.period / self.history_block)
                if acf is not None and lag < len(acf) and acf[lag] > _MIN_ACF:
                    return
            if abs(ratio - 1.0) < 0.05 and (uncertainty > self.period_error
                                            or abs(period - self.period) < uncertainty):
                return  # the same period, estimated no better than we have it
        if abs(period - round(period)) < 0.15:
            period = float(round(period))  # periods counted in readings are mostly whole
        self.period_error = uncertainty
        period_ms = 0.0
        if self.t0 is not None and self.dt > 0.0:
            period_ms = period * self.dt
            for target in (DAY_MS, WEEK_MS):  # a week: daily profile + weekly correction
                if abs(period_ms / target - 1.0) < 0.1:
                    period_ms = float(DAY_MS)
                    period = DAY_MS / self.dt
        if period_ms and period_ms == self.period_ms:
            self.period = period  # the same day: only the typical step moved
            return
        if self.period and abs(period / self.period - 1.0) < 0.002:
            return
        if self.period and abs(period / self.period - 1.0) < 0.05:
            self._refine_season(detector, period, period_ms)
        else:
            self._start_season(detector, period, period_ms)

    def _refine_season(self, detector: SeasonalResidualDetector, period: float,
                       period_ms: float) -> None:
        """Adopt a better estimate of the same period, keeping what the profile learned.

        The profile is rotated so that the phase of the latest row does not jump, and
        resampled to the new number of bins.
        """
        ts = self.last_ts if self.t0 is not None else None
        old = self._phase(ts, self.row - 1, self.period_ms, self.period)
        new = self._phase(ts, self.row - 1, period_ms, period)
        bins = max(3, min(detector.max_bins, round(period)))
        profile = self.season
        self.season = array("f", [_interpolate(profile, (i / bins + old - new) % 1.0)
                                  for i in range(bins)])
        self.period, self.period_ms = period, period_ms

    def _start_season(self, detector: SeasonalResidualDetector, period: float,
                      period_ms: float) -> None:
        """Adopt a new period: fold the history into the profile and re-centre.

        The calibration starts afresh and the profile takes the next two cycles in unclipped.
        """
        self.period, self.period_ms = period, period_ms
        self.season_start = self.row
        bins = max(3, min(detector.max_bins, round(period)))
        block = self.history_block
        history = [value + self.history_offset for value in self.history]
        mean = sum(history) / len(history)
        # fold no finer than the history resolves, then resample to the profile's bins
        coarse = max(3, min(bins, int(period / block)))
        sums, counts = [0.0] * coarse, [0.0] * coarse
        phases = [self._phase(None, j * block + (block - 1) / 2.0, period_ms, period)
                  for j in range(len(history))]
        for phase, value in zip(phases, history, strict=True):
            _spread(sums, phase, value - mean)
            _spread(counts, phase, 1.0)
        if min(counts) <= 0.0:
            return  # not even one full cycle in the history
        fold = [total / count for total, count in zip(sums, counts, strict=True)]
        self.season = array("f", [_interpolate(fold, i / bins) for i in range(bins)])
        self.week = array("f", [0.0] * _WEEK_BINS) if period_ms == DAY_MS else array("f")
        self.week_err = self.day_err = 0.0
        # re-centre the levels and the scale on the de-seasonalised recent history
        deseason = [v - _interpolate(fold, phase) for phase, v in zip(phases, history,
                                                                      strict=True)]
        centre = _median(deseason[-8:])
        per_bin = len(history) / coarse  # the fold fits each value a little: undo that
        diffs = [abs(b - a) for a, b in itertools.pairwise(deseason)]
        if diffs and per_bin > 1.5:
            sigma = _median(diffs) * 1.4826 / math.sqrt(2.0) * math.sqrt(block)
            mae = sigma / math.sqrt(1.0 - 1.0 / per_bin) / _SD_PER_MAE
            for i in range(len(self.levels)):
                self.trackers[i] = mae
        for i in range(len(self.levels)):
            self.levels[i] = centre
        self.anchor = self.reference = centre
        self.calibrators = _calibrators(detector)


def _calibrators(detector: SeasonalResidualDetector) -> list[TailCalibrator]:
    """One per evidence; all but the run length have Gaussian-like tails (power 2)."""
    return [
        TailCalibrator(decades=detector.decades, half_life=detector.half_life,
                       power=1.0 if name == "flatline" else 2.0)
        for name in _EVIDENCE
    ]


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    half = len(ordered) // 2
    return ordered[half] if len(ordered) % 2 else (ordered[half - 1] + ordered[half]) / 2.0


def _interpolate(profile: Sequence[float], phase: float) -> float:
    pos = phase * len(profile)
    i = int(pos)
    w = pos - i
    n = len(profile)
    return profile[i % n] * (1.0 - w) + profile[(i + 1) % n] * w


def _spread(profile: array[float] | list[float], phase: float, delta: float) -> None:
    pos = phase * len(profile)
    i = int(pos)
    w = pos - i
    n = len(profile)
    profile[i % n] += delta * (1.0 - w)
    profile[(i + 1) % n] += delta * w


def detect_period(values: Sequence[float], min_acf: float = _MIN_ACF) -> float:
    """The dominant period of ``values`` in samples, from the autocorrelation (0.0: none).

    The series is detrended and clipped at 5 MADs (spikes do not make a period); the period is
    the first lag, after the autocorrelation first crosses zero, whose local peak is at least
    85 % of the highest peak, above ``min_acf`` and the noise level ``4 / sqrt(n - lag)``, and
    0.6 above the trough before it (red noise and random walks wander, not that regularly).
    Lags up to 40 % of the length are searched.
    The estimate is then refined on the farthest multiple of it in that range (the k-th peak
    pins the period k times more precisely).

    >>> import math
    >>> detect_period([math.sin(2 * math.pi * i / 12.5) for i in range(200)])
    12.5
    >>> detect_period([float(i % 2 == 0) * 0 + i for i in range(200)])  # a trend: no period
    0.0
    """
    return _detect_period(values, min_acf)[0]


def _detect_period(values: Sequence[float], min_acf: float = _MIN_ACF) -> tuple[float, float]:
    """``(period, uncertainty)`` in samples, ``(0.0, inf)`` when there is none.

    The uncertainty is a rough 0.1 sample for a parabola-refined peak, divided by the multiple
    it was read from.
    """
    acf = _autocorrelation(values)
    if acf is None:
        return 0.0, math.inf
    n = len(values)
    max_lag = len(acf) - 2
    below = [lag for lag in range(1, max_lag) if acf[lag] < 0]
    if not below:
        return 0.0, math.inf
    start = below[0]
    peaks = [
        lag for lag in range(max(start, 2), max_lag + 1)
        if acf[lag] >= acf[lag - 1] and acf[lag] >= acf[lag + 1]
        and acf[lag] > max(min_acf, 4.0 / math.sqrt(n - lag))  # above the noise at that lag
        and acf[lag] - min(acf[start:lag]) >= _MIN_PROMINENCE
    ]
    if not peaks:
        return 0.0, math.inf
    top = max(acf[lag] for lag in peaks)
    lag = next(lag for lag in peaks if acf[lag] >= 0.85 * top)
    period = _peak(acf, lag)
    for multiple in range(int(max_lag / period), 1, -1):
        centre = round(multiple * period)
        reach = max(1, round(period / 4))
        lo, hi = max(1, centre - reach), min(max_lag, centre + reach)
        if hi <= lo:
            continue
        best = max(range(lo, hi + 1), key=acf.__getitem__)
        if lo < best < hi and acf[best] > min_acf:
            return round(_peak(acf, best) / multiple, 2), 0.1 / multiple
    return round(period, 2), 0.1


def _autocorrelation(values: Sequence[float]) -> list[float] | None:
    """The autocorrelation at lags 0 to 40 % of the length (+1), or ``None``.

    The series is detrended and clipped at 5 MADs first; ``None`` if it is too short, not
    finite or constant.
    """
    import numpy as np

    y = np.asarray(values, dtype=np.float64)
    n = len(y)
    if n < 16 or not np.all(np.isfinite(y)):
        return None
    t = np.arange(n, dtype=np.float64)
    y = y - np.polyval(np.polyfit(t, y, 1), t)
    median = np.median(y)
    mad = np.median(np.abs(y - median)) * 1.4826
    if mad <= 0:  # mostly one value (sparse events): the mean deviation still sees them
        mad = float(np.mean(np.abs(y - median))) * 1.2533
    if mad > 0:
        y = np.clip(y, median - 5 * mad, median + 5 * mad)
    y = y - y.mean()
    spectrum = np.fft.rfft(y, 2 * n)
    acf = np.fft.irfft(spectrum * np.conj(spectrum))[:n]
    if acf[0] <= 1e-12 * max(1.0, float(np.abs(y).max()) ** 2):
        return None
    max_lag = int(n * 0.4)
    acf = acf[: max_lag + 2] / acf[0] * n / (n - np.arange(max_lag + 2))
    return [float(a) for a in acf]


def _peak(acf: list[float], lag: int) -> float:
    """The lag of a local peak, refined by a parabola through it and its neighbours."""
    a, b, c = acf[lag - 1], acf[lag], acf[lag + 1]
    denominator = a - 2 * b + c
    offset = 0.5 * (a - c) / denominator if denominator < 0 else 0.0
    return float(lag + max(-0.5, min(0.5, offset)))
