"""The bridge's counters, and the ledger identity they must satisfy.

For every input, and so for any sum of inputs::

    readings_in == forwarded + duplicates + dead_lettered

``late`` and ``beyond_window`` count forwarded readings that were flagged late or too old for
the de-duplication window; they are subsets of ``forwarded``, not extra terms.

>>> total = Counts()
>>> total.add(Counts(messages_in=1, readings_in=3, forwarded=2, duplicates=1))
>>> total.add(Counts(messages_in=1, dead_letters=Counter({"malformed_json": 1})))
>>> total.readings_in, total.messages_in, dict(total.dead_letters), total.balanced
(3, 2, {'malformed_json': 1}, True)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields


@dataclass(slots=True)
class Counts:
    """What one input (or a run of them) did; ``dead_letters`` counts messages by reason."""

    messages_in: int = 0
    readings_in: int = 0
    forwarded: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    late: int = 0
    beyond_window: int = 0
    status_applied: int = 0
    claims_refused: int = 0
    dead_letters: Counter[str] = field(default_factory=Counter)

    @property
    def balanced(self) -> bool:
        """Whether every reading in was forwarded, found a duplicate, or dead-lettered."""
        return self.readings_in == self.forwarded + self.duplicates + self.dead_lettered

    def add(self, other: Counts) -> None:
        """Add ``other`` into these counts (for running totals and metrics)."""
        for f in fields(self):
            if f.name == "dead_letters":
                self.dead_letters.update(other.dead_letters)
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
