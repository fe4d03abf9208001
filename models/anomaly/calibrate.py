"""Calibration: from a raw "how unusual" number to a score in [0, 1] with a fixed meaning.

A detector computes a raw, non-negative statistic per reading (for example ``|residual| /
scale``). Its distribution differs from stream to stream, so a fixed cut-off on it means a
different alarm rate on every device. :class:`TailCalibrator` learns that distribution online
and returns the *tail probability* ``p = P(R >= r)`` of a new value ``r`` under what it has
learned; :func:`p_to_score` maps ``p`` onto [0, 1] on a log scale::

    score = min(1, -log10(p) / decades)        p = 10 ** (-decades * score)

so with the default ``decades=4`` a score of 0.5 means "1 in 100", 0.75 "1 in 1,000" and the
default threshold 0.9 "about 1 in 4,000 readings". The same threshold therefore means about the
same alarm rate on every stream, whatever its units or noise level.

How the tail is estimated (small state, robust, online):

- the body is an exponentially decayed histogram of the raw values on a log-spaced grid
  (``bins_per_decade`` bins between ``low`` and ``high``), so a value's tail mass is read off the
  cumulative counts; decay (``half_life`` learned values) lets it follow slow changes;
- beyond the ``tail_mass`` upper quantile ``u`` (5 % by default) the histogram is too thin, so
  the excesses over ``u`` are fitted with a generalised Pareto distribution by the method of
  moments (peaks over threshold, as in Siffer et al., "Anomaly detection in streams with
  extreme value theory", KDD 2017). Its shape is clipped to [0, 0.5]: never lighter than an
  exponential tail (a finite end point fitted on binned data would alarm far too often), never
  so heavy that nothing is ever unusual. Statistics with Gaussian-like tails (``|z|``) are
  therefore calibrated as ``z ** 2`` (``power=2``), whose tail is close to exponential: on
  Gaussian data the alarm rate at threshold 0.9 is then within ~20 % of the nominal one,
  and about half of it on Laplace data (heavier tails are estimated, not assumed);
- the tail fit is refreshed every ``refit_every`` learned values (it costs a pass over the
  bins), so a score costs about a microsecond;
- before data arrive, the histogram holds ``prior_weight`` pseudo-observations of a half-normal
  distribution of scale ``prior_scale`` (what ``|z|`` of a Gaussian residual looks like), so
  the first scores are sensible and the data take over quickly.

The caller decides what is learned: detectors do not learn values they flag, so the tail is
estimated on normal behaviour only.

>>> import random
>>> rng = random.Random(7)
>>> calibrator = TailCalibrator(power=2)  # |z| has a Gaussian-like tail
>>> for _ in range(20_000):
...     calibrator.learn_one(abs(rng.gauss(0.0, 1.0)))
>>> [round(calibrator.score(r), 2) for r in (0.5, 2.0, 3.0, 5.0)]
[0.05, 0.33, 0.64, 1.0]
>>> alarms = sum(calibrator.score(abs(rng.gauss(0.0, 1.0))) >= 0.9 for _ in range(200_000))
>>> alarms, round(200_000 * score_to_p(0.9))   # alarms at threshold 0.9, and the nominal count
(57, 50)
"""

from __future__ import annotations

import math
from array import array

DEFAULT_DECADES = 4.0
"""``score = -log10(p) / DEFAULT_DECADES``: a score of 1 means ``p <= 1e-4``."""

_XI_MIN, _XI_MAX = 0.0, 0.5
_RENORMALISE_AT = 1e30  # counts are float32 (max 3.4e38)


def p_to_score(p: float, decades: float = DEFAULT_DECADES) -> float:
    """Map a tail probability onto a score in [0, 1] (``-log10(p) / decades``, clipped).

    >>> p_to_score(1.0), p_to_score(0.01), p_to_score(1e-4), p_to_score(0.0)
    (0.0, 0.5, 1.0, 1.0)
    """
    if not p > 0.0:  # 0 or NaN is treated as "as unusual as it gets" only for 0
        return 0.0 if p != p else 1.0
    return min(1.0, max(0.0, -math.log10(min(p, 1.0)) / decades))


def score_to_p(score: float, decades: float = DEFAULT_DECADES) -> float:
    """The tail probability a score stands for: the inverse of :func:`p_to_score`.

    This is the nominal alarm rate of a threshold.

    >>> score_to_p(0.5), score_to_p(1.0)
    (0.01, 0.0001)
    """
    return float(10.0 ** (-decades * score))


def combine_p(ps: list[float]) -> float:
    """One tail probability for several tests: Bonferroni on the smallest (``k * min(p)``).

    Valid whatever the dependence between the tests, which is what several views of one
    stream (or several columns of one device) have.

    >>> combine_p([0.5, 0.001, 0.2])
    0.003
    >>> combine_p([])
    1.0
    """
    if not ps:
        return 1.0
    return min(1.0, len(ps) * min(ps))


class TailCalibrator:
    """Online tail probability of a non-negative raw statistic, and its calibrated score.

    Parameters
    ----------
    decades
        Score scale: ``score = -log10(p) / decades``.
    half_life
        Learned values after which an old value weighs half as much.
    power
        The histogram and the tail fit work on ``raw ** power``. The tail fit is never lighter
        than exponential, so for statistics with Gaussian-like tails (``|z|``) use 2: ``z**2``
        has an exponential-like tail and rare values get their due (with 1, ``|z| = 4``
        comes out about ten times less rare than it is). 1 suits heavy tails and counts.
    bins_per_decade, low, high
        The log-spaced histogram grid on ``raw ** power``; values outside ``[low, high]`` go to
        the end bins. Ratios to a robust scale fit the default ``[0.01, 100]``.
    tail_mass
        Upper quantile above which the generalised Pareto tail is used.
    refit_every
        Learned values between two refreshes of the cumulative counts and the tail fit.
    prior_weight, prior_scale
        Pseudo-observations of a half-normal ``raw`` of scale ``prior_scale`` seeded at start
        (``prior_weight=0`` for none).

    State: two float32 arrays of ``bins_per_decade * log10(high / low) + 2`` counts (42 by
    default) and their cumulative sums, plus a few numbers: about 0.7 KB pickled.

    >>> calibrator = TailCalibrator(prior_weight=0, refit_every=1)
    >>> calibrator.tail_probability(3.0)  # nothing learned: nothing is unusual
    1.0
    >>> for value in [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0] * 10:
    ...     calibrator.learn_one(value)
    >>> round(calibrator.tail_probability(0.55), 2), calibrator.score(0.05)
    (0.46, 0.0)
    >>> calibrator.score(4.0) > 0.9
    True

    """

    def __init__(
        self,
        decades: float = DEFAULT_DECADES,
        half_life: float = 10_000.0,
        power: float = 1.0,
        bins_per_decade: int = 10,
        low: float = 0.01,
        high: float = 100.0,
        tail_mass: float = 0.05,
        refit_every: int = 32,
        prior_weight: float = 30.0,
        prior_scale: float = 1.0,
    ) -> None:
        self.decades = decades
        self.half_life = half_life
        self.power = power
        self.bins_per_decade = bins_per_decade
        self.low = low
        self.high = high
        self.tail_mass = tail_mass
        self.refit_every = refit_every
        self.prior_weight = prior_weight
        self.prior_scale = prior_scale

        inner = round(bins_per_decade * math.log10(high / low))
        self._n_inner = inner
        self._log_low = math.log10(low)
        # bin 0: [0, low); bins 1..inner: log-spaced; bin inner+1: [high, inf)
        self._counts = array("f", [0.0] * (inner + 2))
        self._edges = self._grid()
        self._weight = 1.0  # the weight of the next learned value (grows instead of decaying)
        self._growth = 2.0 ** (1.0 / half_life)
        self._total = 0.0
        self._since_refit = 0
        self._above = array("f")  # cached: mass at or above each bin's lower edge
        self._fit_total = 0.0
        self._u = 0.0  # cached tail fit: threshold, scale, shape
        self._beta = 1.0
        self._xi = 0.0
        self._p_u = 1.0
        if prior_weight > 0:
            self._seed_prior()
        self._refit()

    # -- grid -----------------------------------------------------------------------------
    def _grid(self) -> list[float]:
        """Lower edges of every bin, plus a nominal upper edge (twice ``high``) for the last."""
        edges = [0.0] + [float(10.0 ** (self._log_low + i / self.bins_per_decade))
                         for i in range(self._n_inner + 1)]
        return [*edges, 2.0 * edges[-1]]

    def _edge(self, i: int) -> float:
        """Lower edge of bin ``i`` (bin 0 starts at 0)."""
        return self._edges[i]

    def _position(self, value: float) -> tuple[int, float]:
        """The bin of a transformed value, and where in it from 0 (lower edge) to 1.

        Log-uniform inside the log bins, uniform in bin 0.
        """
        if value < self.low:
            return 0, value / self.low
        offset = (math.log10(value) - self._log_low) * self.bins_per_decade
        i = int(offset)
        if i >= self._n_inner:
            return self._n_inner + 1, 0.0
        return i + 1, offset - i

    def _seed_prior(self) -> None:
        scale = self.prior_scale * math.sqrt(2.0)
        root = 1.0 / self.power
        for i in range(len(self._counts)):
            lo = self._edge(i) ** root
            hi = self._edge(i + 1) ** root if i <= self._n_inner else math.inf
            mass = math.erfc(lo / scale) - (math.erfc(hi / scale) if hi < math.inf else 0.0)
            self._counts[i] += self.prior_weight * mass
        self._total += self.prior_weight

    # -- learning ---------------------------------------------------------------------------
    def learn_one(self, raw: float) -> None:
        """Add one raw value (non-negative; NaN is ignored)."""
        if raw != raw:
            return
        raw = max(raw, 0.0)
        if self.power != 1.0:
            raw = raw * raw if self.power == 2.0 else raw**self.power
        self._counts[self._position(raw)[0]] += self._weight
        self._total += self._weight
        self._weight *= self._growth
        if self._weight > _RENORMALISE_AT:
            factor = 1.0 / self._weight
            for i in range(len(self._counts)):
                self._counts[i] *= factor
            self._total *= factor
            self._weight = 1.0
        self._since_refit += 1
        if self._since_refit >= self.refit_every:
            self._refit()

    @property
    def n_effective(self) -> float:
        """The effective number of values learned (prior included), in units of the newest."""
        return self._total / self._weight

    # -- scoring ----------------------------------------------------------------------------
    def _refit(self) -> None:
        counts, total = self._counts, self._total
        above = array("f", [0.0] * (len(counts) + 1))
        running = 0.0
        for i in range(len(counts) - 1, -1, -1):
            running += counts[i]
            above[i] = running
        self._above = above
        self._fit_total = total
        self._since_refit = 0
        if total <= 0.0:
            return
        # threshold u: the lower edge of the first bin whose mass above is <= tail_mass
        target = self.tail_mass * total
        k = len(counts) - 1
        for i in range(len(counts)):
            if above[i] <= target:
                k = i
                break
        k = max(k, 1)
        u = self._edge(k)
        p_u = above[k] / total
        # mean and variance of the excess over u, from geometric bin centres
        m1 = m2 = 0.0
        for i in range(k, len(counts)):
            if counts[i] <= 0.0:
                continue
            hi = self._edge(i + 1)
            centre = math.sqrt(self._edge(i) * hi)
            excess = centre - u
            m1 += counts[i] * excess
            m2 += counts[i] * excess * excess
        mass = above[k]
        if mass <= 0.0 or p_u <= 0.0:
            self._u, self._p_u, self._beta, self._xi = u, max(p_u, 1e-12), max(u, 1e-3), 0.0
            return
        mean = max(m1 / mass, 1e-6)
        var = max(m2 / mass - mean * mean, 1e-12)
        xi = 0.5 * (1.0 - mean * mean / var)
        xi = min(_XI_MAX, max(_XI_MIN, xi))
        self._u, self._p_u = u, p_u
        self._xi = xi
        self._beta = max(mean * (1.0 - xi), 1e-6)

    def tail_probability(self, raw: float) -> float:
        """``P(R >= raw)`` under what was learned (1.0 for NaN or when nothing was learned).

        Reads the fit of the last refresh only: scoring never changes the state.
        """
        if raw != raw or raw <= 0.0 or self._fit_total <= 0.0:
            return 1.0
        if self.power != 1.0:
            raw = raw * raw if self.power == 2.0 else raw**self.power
        if raw > self._u:
            z = (raw - self._u) / self._beta
            if abs(self._xi) < 1e-6:
                return self._p_u * math.exp(-z)
            base = 1.0 + self._xi * z
            if base <= 0.0:
                return 0.0
            return float(self._p_u * base ** (-1.0 / self._xi))
        i, frac = self._position(raw)
        mass = self._above[i + 1] + (1.0 - frac) * (self._above[i] - self._above[i + 1])
        return min(1.0, mass / self._fit_total)

    def score(self, raw: float) -> float:
        """The calibrated score of ``raw``: :func:`p_to_score` of its tail probability."""
        return p_to_score(self.tail_probability(raw), self.decades)

    _PARAMS = ("decades", "half_life", "power", "bins_per_decade", "low", "high", "tail_mass",
               "refit_every", "prior_weight", "prior_scale")

    def __getstate__(self) -> tuple[object, ...]:
        """A compact pickle: values in a fixed order, without attribute names."""
        return tuple(self.__dict__[name] for name in self._pickled())

    def __setstate__(self, state: tuple[object, ...]) -> None:
        """Restore what :meth:`__getstate__` saved."""
        self.__dict__.update(zip(self._pickled(), state, strict=True))
        self._edges = self._grid()

    @classmethod
    def _pickled(cls) -> tuple[str, ...]:
        return (*cls._PARAMS, "_n_inner", "_log_low", "_counts", "_weight", "_growth", "_total",
                "_since_refit", "_above", "_fit_total", "_u", "_beta", "_xi", "_p_u")
