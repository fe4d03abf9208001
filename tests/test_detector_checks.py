"""Every check of models.checks on every detector of models.registry (river's check suite)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from models.checks import CHECKS
from models.registry import DETECTORS, Entry


@pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__)
@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_check(name: str, check: Callable[[Entry], None]) -> None:
    check(DETECTORS[name])


def test_the_suite_catches_broken_detectors() -> None:
    """The checks are not vacuous: detectors that break the contract fail them."""
    from models.anomaly.base import AnomalyDetector, Features

    class Mutating(AnomalyDetector):
        def learn_one(self, x: Features) -> None:
            x.pop("value", None)  # type: ignore[attr-defined]

        def score_one(self, x: Features) -> float:
            return 0.5

        def explain(self, x: Features) -> dict[str, float | str]:
            return {}

    class OrderSensitive(Mutating):
        def learn_one(self, x: Features) -> None:
            pass

        def score_one(self, x: Features) -> float:
            return 1.0 if next(iter(x)) == "value" else 0.0

    class OutOfRange(OrderSensitive):
        def score_one(self, x: Features) -> float:
            return 2.0

    class Constant(OrderSensitive):
        def score_one(self, x: Features) -> float:
            return 0.0

    stream = DETECTORS["generic"].stream
    from models import checks

    for detector, check in ((Mutating, checks.check_input_not_mutated),
                            (OrderSensitive, checks.check_key_order_irrelevant),
                            (OutOfRange, checks.check_scores_in_unit_interval),
                            (Constant, checks.check_better_than_chance)):
        with pytest.raises(AssertionError):
            check(Entry(factory=detector, stream=stream))


def test_registry_entries_are_well_formed() -> None:
    for name, entry in DETECTORS.items():
        assert isinstance(name, str)
        assert name
        pairs = list(entry.stream(1))
        assert pairs, name
        assert all(isinstance(label, bool) for _, label in pairs), name
        assert pairs == list(entry.stream(1)), f"{name}: the stream is not seeded"
