"""Duplicate detection by ``(device, seq)`` in a bounded window per device.

Per device the bridge keeps the highest seq seen (the high-water mark) and a bitmap of which of
the ``window`` seqs ending at it were seen. A seq is:

- **new** if it is above the mark, or inside the window and not yet seen, so a first arrival
  that is merely out of order within the window is never dropped;
- a **duplicate** if it is inside the window and was seen;
- **beyond the window** if it is older than ``mark - window + 1``. It is forwarded (never lose
  data) and counted; de-duplication is best effort there, and the dataflow de-duplicates again
  by ``(device, seq)``.

Memory is bounded: about ``window / 8 + 200`` bytes per device, for at most ``max_devices``
devices. Past that, the least recently seen device is forgotten (counted in ``evicted``); its
next reading counts as new, so at worst a duplicate passes, never a loss.

Marks are taken when a reading is checked. If the caller then fails to publish a reading it
will take again on redelivery, it must :meth:`Deduplicator.forget` it first.

>>> dedup = Deduplicator(window=4)
>>> [dedup.check("m1", s).value for s in (5, 3, 5, 4, 3, 9, 5)]
['new', 'new', 'duplicate', 'new', 'duplicate', 'new', 'beyond_window']
"""

from __future__ import annotations

from collections import OrderedDict
from enum import StrEnum

DEFAULT_WINDOW = 256
DEFAULT_MAX_DEVICES = 500_000


class Seen(StrEnum):
    """The verdict on one ``(device, seq)``."""

    NEW = "new"
    DUPLICATE = "duplicate"
    BEYOND_WINDOW = "beyond_window"


class Deduplicator:
    """Per-device high-water mark plus a ``window``-bit bitmap, LRU-capped at ``max_devices``.

    >>> dedup = Deduplicator(window=64, max_devices=1)
    >>> dedup.check("a", 1), dedup.check("b", 1), dedup.check("a", 1)
    (<Seen.NEW: 'new'>, <Seen.NEW: 'new'>, <Seen.NEW: 'new'>)
    >>> dedup.evicted, len(dedup)
    (2, 1)
    """

    def __init__(self, window: int = DEFAULT_WINDOW, max_devices: int = DEFAULT_MAX_DEVICES):
        if window < 1 or max_devices < 1:
            msg = f"window and max_devices must be at least 1, got {window} and {max_devices}"
            raise ValueError(msg)
        self.window = window
        self.max_devices = max_devices
        self.evicted = 0
        self._full = (1 << window) - 1
        # device -> [high-water seq, bitmap]; bit i set means seq (mark - i) was seen.
        self._state: OrderedDict[str, list[int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._state)

    def check(self, device_id: str, seq: int) -> Seen:
        """Record ``(device_id, seq)`` and say whether it was new, a duplicate or too old."""
        state = self._state.get(device_id)
        if state is None:
            self._state[device_id] = [seq, 1]
            if len(self._state) > self.max_devices:
                self._state.popitem(last=False)
                self.evicted += 1
            return Seen.NEW
        self._state.move_to_end(device_id)
        mark, bits = state
        if seq > mark:
            state[0] = seq
            state[1] = ((bits << (seq - mark)) | 1) & self._full if seq - mark < self.window else 1
            return Seen.NEW
        age = mark - seq
        if age >= self.window:
            return Seen.BEYOND_WINDOW
        bit = 1 << age
        if bits & bit:
            return Seen.DUPLICATE
        state[1] = bits | bit
        return Seen.NEW

    def forget(self, device_id: str, seq: int) -> None:
        """Unmark a seq that was checked but will not be published, so its redelivery is new.

        >>> dedup = Deduplicator()
        >>> dedup.check("m1", 7), dedup.forget("m1", 7), dedup.check("m1", 7)
        (<Seen.NEW: 'new'>, None, <Seen.NEW: 'new'>)
        """
        state = self._state.get(device_id)
        if state is not None and 0 <= state[0] - seq < self.window:
            state[1] &= ~(1 << (state[0] - seq))
