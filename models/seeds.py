"""Every random seed the models use, in one place, so tuning never leaks into evaluation.

- :data:`TRAINING_SEEDS`: simulated runs that models are fitted on (the edge model's
  :data:`models.edge.train.DEFAULT_SEED`).
- :data:`TUNING_SEEDS`: runs looked at while choosing detector settings and thresholds, and
  the runs the unit tests simulate.
- :data:`EVALUATION_SEEDS`: held-out runs that ``meshwatch evaluate`` reports on; nothing is
  tuned on them. Seeds whose results were seen before a later change are moved to
  :data:`RETIRED_EVALUATION_SEEDS` and count as not held out. ``tests/test_evaluate.py``
  checks the sets are disjoint, and :func:`is_held_out` tells the evaluation report whether
  a seed was held out.

>>> is_held_out(EVALUATION_SEEDS[0]), is_held_out(TUNING_SEEDS[0])
(True, False)
>>> set(TRAINING_SEEDS) & set(EVALUATION_SEEDS)
set()
"""

from __future__ import annotations

TRAINING_SEEDS: tuple[int, ...] = (1_000_003,)
"""Seeds of training runs (the edge model's default training seed)."""

TUNING_SEEDS: tuple[int, ...] = (11, 12, 13, 21, 22, 31)
"""Seeds of runs used to choose settings, and of the unit tests' simulated fleets."""

EVALUATION_SEEDS: tuple[int, ...] = (2_026_501, 2_026_502, 2_026_503)
"""Held-out seeds: ``meshwatch evaluate`` uses the first by default."""

RETIRED_EVALUATION_SEEDS: tuple[int, ...] = (2_026_101, 2_026_102, 2_026_103,
                                             2_026_201, 2_026_202, 2_026_203,
                                             2_026_301, 2_026_302, 2_026_303,
                                             2_026_401, 2_026_402, 2_026_403)
"""Former evaluation seeds, no longer held out (BENCHMARKS.md keeps the results they gave):
2026101–103 were seen before the last change to the burst detector and the alert policy;
2026201–203 were seen (their missed district leaks looked at) before the change to the
district leak detector (persistent rises, robust baselines), to the district water balance
(faulty meters kept out, night-aware imputation) and to district-leak alert folding;
2026301–303 were seen (their sensor-fault results, drift 0 of 38 and stopped meters found
after ~36 h, were the reason for the change) before the stopped-meter rule used the
district's demand and the drift baseline stopped following a drift; 2026401–403 were seen
(bursts 60 of 65 within two readings) before the burst detector judged the step from the
last calm reading."""


def is_held_out(seed: int) -> bool:
    """Whether ``seed`` was never used for training or tuning (nor seen before a change)."""
    return seed not in TRAINING_SEEDS + TUNING_SEEDS + RETIRED_EVALUATION_SEEDS
