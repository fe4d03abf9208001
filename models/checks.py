"""The check suite every registered detector passes (as river's ``utils/estimator_checks``).

Each check is a function ``check_*(entry)`` taking a :class:`models.registry.Entry`; it raises
``AssertionError`` with a message saying what broke. :data:`CHECKS` lists them, and
``tests/test_detector_checks.py`` runs every check on every entry of
:data:`models.registry.DETECTORS`.

The checks replay the first :data:`CHECK_ROWS` readings of the entry's labelled stream (seed 0)
unless they need the whole stream. The metrics used by the "better than chance" check,
:func:`roc_auc` and :func:`best_f1`, are also used by the benchmark.

>>> from models.registry import DETECTORS
>>> check_scores_in_unit_interval(DETECTORS["generic"])
>>> roc_auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True])
0.75
>>> round(best_f1([0.1, 0.4, 0.35, 0.8], [False, False, True, True]), 3)
0.8
"""

from __future__ import annotations

import copy
import itertools
import pickle
from collections.abc import Callable, Sequence

from models.anomaly.base import AnomalyDetector, Features
from models.registry import Entry

CHECK_ROWS = 600
"""Readings replayed by the checks that do not need a whole stream."""


def _rows(entry: Entry, seed: int = 0, limit: int | None = CHECK_ROWS) -> list[Features]:
    stream = entry.stream(seed)
    rows = [x for x, _ in (stream if limit is None else itertools.islice(stream, limit))]
    assert rows, "the labelled stream is empty"
    return rows


def _replay(detector: AnomalyDetector, rows: Sequence[Features]) -> list[float]:
    """Score then learn each row, as a dataflow does; the scores in order."""
    scores = []
    for x in rows:
        scores.append(detector.score_one(x))
        detector.learn_one(x)
    return scores


def check_input_not_mutated(entry: Entry) -> None:
    """``learn_one``, ``score_one`` and ``explain`` leave ``x`` as it was."""
    detector = entry.factory()
    for x in _rows(entry):
        mine = dict(x)
        before = copy.deepcopy(mine)
        detector.score_one(mine)
        detector.explain(mine)
        detector.learn_one(mine)
        assert mine == before, f"x was changed: {before} became {mine}"


def check_key_order_irrelevant(entry: Entry) -> None:
    """The same readings with their keys in reverse order give the same scores."""
    rows = _rows(entry)
    reversed_rows = [dict(reversed(list(x.items()))) for x in rows]
    assert _replay(entry.factory(), rows) == _replay(entry.factory(), reversed_rows), (
        "scores depend on the order of the keys of x"
    )


def check_pickle_round_trip(entry: Entry) -> None:
    """A pickled and restored detector scores the rest of the stream exactly as the original."""
    rows = _rows(entry)
    half = len(rows) // 2
    detector = entry.factory()
    _replay(detector, rows[:half])
    restored = pickle.loads(pickle.dumps(detector))
    assert _replay(restored, rows[half:]) == _replay(detector, rows[half:]), (
        "scores changed after a pickle round-trip"
    )


def check_scoring_does_not_learn(entry: Entry) -> None:
    """``score_one`` and ``explain`` leave the state as it was (its pickle is unchanged)."""
    rows = _rows(entry)
    half = len(rows) // 2
    detector = entry.factory()
    _replay(detector, rows[:half])
    for x in rows[half:half + 50]:
        before = pickle.dumps(detector)
        detector.score_one(x)
        detector.explain(x)
        assert pickle.dumps(detector) == before, "score_one or explain changed the state"
        detector.learn_one(x)


def check_same_seed_same_scores(entry: Entry) -> None:
    """Two fresh detectors (same default seed) on the same stream give the same scores."""
    rows = _rows(entry)
    assert _replay(entry.factory(), rows) == _replay(entry.factory(), rows), (
        "two detectors built alike disagree"
    )


def check_scores_in_unit_interval(entry: Entry) -> None:
    """Every score is a float in [0, 1], also for readings with NaN values or a missing key."""
    detector = entry.factory()
    rows: list[Features] = []
    for i, x in enumerate(_rows(entry)):
        rows.append(x)
        keys = [key for key in x if key != "ts_ms"]
        if i % 97 == 50:
            rows.append({k: (v if k == "ts_ms" else float("nan")) for k, v in x.items()})
        if i % 89 == 40 and keys:
            rows.append({k: v for k, v in x.items() if k != keys[0]})
    for score in _replay(detector, rows):
        assert isinstance(score, float), f"score {score!r} is not a float"
        assert 0.0 <= score <= 1.0, f"score {score} is outside [0, 1]"


def check_better_than_chance(entry: Entry) -> None:
    """The detector does clearly better than chance on its labelled stream (seed 0).

    Its ROC-AUC must reach 0.6 (chance: 0.5) and its best F1 twice the F1 of flagging
    everything (the chance baseline of that same stream).
    """
    pairs = list(entry.stream(0))
    labels = [label for _, label in pairs]
    assert any(labels), "the labelled stream has no anomaly"
    assert not all(labels), "the labelled stream has no normal reading"
    scores = _replay(entry.factory(), [x for x, _ in pairs])
    auc = roc_auc(scores, labels)
    positives = sum(labels) / len(labels)
    chance_f1 = 2 * positives / (1 + positives)
    f1 = best_f1(scores, labels)
    assert auc >= 0.6, f"ROC-AUC {auc:.3f} is not clearly better than chance (0.5)"
    assert f1 >= 2 * chance_f1, f"best F1 {f1:.3f} is not clearly above chance ({chance_f1:.3f})"


CHECKS: tuple[Callable[[Entry], None], ...] = (
    check_input_not_mutated,
    check_key_order_irrelevant,
    check_pickle_round_trip,
    check_scoring_does_not_learn,
    check_same_seed_same_scores,
    check_scores_in_unit_interval,
    check_better_than_chance,
)
"""Every check, in the order the test suite runs them."""


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve (ties count half); 0.5 is chance. Needs both classes.

    It is the chance that a random anomaly scores above a random normal reading.
    """
    order = sorted(range(len(scores)), key=scores.__getitem__)
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):  # average ranks over ties
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2.0 + 1.0
        i = j + 1
    positives = sum(1 for label in labels if label)
    negatives = len(labels) - positives
    if not positives or not negatives:
        msg = "roc_auc needs at least one anomaly and one normal reading"
        raise ValueError(msg)
    rank_sum = sum(rank for rank, label in zip(ranks, labels, strict=True) if label)
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def best_f1(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """The best point-wise F1 over every threshold ``score >= t``."""
    pairs = sorted(zip(scores, labels, strict=True), key=lambda pair: -pair[0])
    positives = sum(1 for label in labels if label)
    if not positives:
        return 0.0
    true_pos = flagged = 0
    best_value = 0.0
    for i, (score, label) in enumerate(pairs):
        flagged += 1
        true_pos += bool(label)
        if i + 1 < len(pairs) and pairs[i + 1][0] == score:
            continue  # a threshold flags every tie at once
        f1 = 2.0 * true_pos / (flagged + positives)
        best_value = max(best_value, f1)
    return best_value
