"""Back-off policy: growth, cap, jitter bounds, seeding, reset, argument errors."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshwatch.backoff import Backoff


def test_no_jitter_doubles_up_to_the_cap() -> None:
    policy = Backoff(initial_s=0.25, max_s=3.0, jitter="none")
    assert [policy.next_delay() for _ in range(7)] == [0.25, 0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert policy.attempts == 7


def test_reset_starts_over() -> None:
    policy = Backoff(initial_s=1.0, max_s=60.0, multiplier=3.0, jitter="none")
    assert [policy.next_delay() for _ in range(3)] == [1.0, 3.0, 9.0]
    policy.reset()
    assert policy.attempts == 0
    assert policy.next_delay() == 1.0


@pytest.mark.parametrize("jitter", ["full", "decorrelated"])
def test_same_seed_same_delays_other_seed_other_delays(jitter: str) -> None:
    def delays(seed: int) -> list[float]:
        policy = Backoff(initial_s=0.5, max_s=30.0, jitter=jitter, seed=seed)  # type: ignore[arg-type]
        return [policy.next_delay() for _ in range(20)]

    assert delays(1) == delays(1)
    assert delays(1) != delays(2)


def test_full_jitter_stays_under_the_exponential_ceiling_and_spreads() -> None:
    policy = Backoff(initial_s=1.0, max_s=8.0, seed=3)
    ceilings = [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    samples = []
    for _ in range(200):
        policy.reset()
        row = [policy.next_delay() for _ in ceilings]
        assert all(0.0 <= d <= c for d, c in zip(row, ceilings, strict=True))
        samples.append(row[-1])
    # Uniform on [0, 8]: the mean of 200 samples is near 4, far from the cap.
    assert 3.0 < sum(samples) / len(samples) < 5.0


def test_decorrelated_jitter_starts_at_initial_and_respects_bounds() -> None:
    policy = Backoff(initial_s=0.5, max_s=10.0, jitter="decorrelated", seed=11)
    delays = [policy.next_delay() for _ in range(100)]
    assert delays[0] == 0.5
    assert all(0.5 <= d <= 10.0 for d in delays)
    assert all(b <= max(0.5, 3 * a) for a, b in itertools.pairwise(delays))
    assert max(delays) > 5.0  # it does grow towards the cap


@given(
    initial=st.floats(min_value=1e-3, max_value=10.0),
    extra=st.floats(min_value=0.0, max_value=100.0),
    multiplier=st.floats(min_value=1.0, max_value=10.0),
    jitter=st.sampled_from(["full", "decorrelated", "none"]),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_no_delay_is_ever_negative_or_above_the_cap(
    initial: float, extra: float, multiplier: float, jitter: str, seed: int
) -> None:
    policy = Backoff(
        initial_s=initial,
        max_s=initial + extra,
        multiplier=multiplier,
        jitter=jitter,
        seed=seed,  # type: ignore[arg-type]
    )
    for _ in range(2000):  # far past where multiplier**n overflows a float
        assert 0.0 <= policy.next_delay() <= initial + extra


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"initial_s": 0.0}, "initial_s must be > 0"),
        ({"initial_s": 2.0, "max_s": 1.0}, "must be >= initial_s"),
        ({"multiplier": 0.5}, "multiplier must be >= 1"),
        ({"jitter": "equal"}, "jitter must be one of full, decorrelated, none"),
    ],
)
def test_bad_arguments_say_what_is_wrong(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Backoff(**kwargs)  # type: ignore[arg-type]
