"""De-duplication by (device, seq): unit cases and a property test against a set model."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_bridge.dedup import Deduplicator, Seen


def test_out_of_order_first_arrivals_within_the_window_are_new() -> None:
    dedup = Deduplicator(window=8)
    assert [dedup.check("m", s) for s in (10, 2, 3, 9, 8, 3)] == [
        Seen.NEW, Seen.BEYOND_WINDOW, Seen.NEW, Seen.NEW, Seen.NEW, Seen.DUPLICATE,  # 2: age 8
    ]


def test_a_jump_beyond_the_window_clears_the_bitmap() -> None:
    dedup = Deduplicator(window=4)
    dedup.check("m", 1)
    assert dedup.check("m", 100) is Seen.NEW
    assert dedup.check("m", 97) is Seen.NEW
    assert dedup.check("m", 96) is Seen.BEYOND_WINDOW


def test_devices_are_independent_and_lru_capped() -> None:
    dedup = Deduplicator(window=4, max_devices=2)
    dedup.check("a", 1)
    dedup.check("b", 1)
    dedup.check("a", 2)  # a is now most recent
    dedup.check("c", 1)  # evicts b
    assert len(dedup) == 2
    assert dedup.evicted == 1
    assert dedup.check("a", 1) is Seen.DUPLICATE
    assert dedup.check("b", 1) is Seen.NEW  # forgotten: best effort, never a loss


def test_forget_makes_a_redelivery_new() -> None:
    dedup = Deduplicator(window=4)
    dedup.check("m", 5)
    dedup.check("m", 4)
    dedup.forget("m", 4)
    dedup.forget("m", 99)  # unknown seqs and devices are ignored
    dedup.forget("nobody", 1)
    assert dedup.check("m", 4) is Seen.NEW
    assert dedup.check("m", 5) is Seen.DUPLICATE


def test_bad_arguments_say_what_to_do() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Deduplicator(window=0)


@settings(max_examples=300, deadline=None)
@given(
    window=st.integers(1, 70),
    events=st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 200)), max_size=300),
)
def test_matches_a_set_model_within_the_window(window: int, events: list[tuple[str, int]]) -> None:
    dedup = Deduplicator(window=window)
    seen: dict[str, set[int]] = {}
    for device, seq in events:
        history = seen.setdefault(device, set())
        mark = max(history, default=None)
        if mark is not None and seq <= mark - window:
            expected = Seen.BEYOND_WINDOW
        elif seq in history:
            expected = Seen.DUPLICATE
        else:
            expected = Seen.NEW
        assert dedup.check(device, seq) is expected, (device, seq)
        if expected is Seen.NEW:
            history.add(seq)
