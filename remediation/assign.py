"""Which crew gets a work order: district, skill, then workload. Pure.

A crew qualifies when it covers the district (an empty district list covers all) and has the
skill the incident needs (``pipes`` or ``meters``, see :func:`remediation.correlate.family`).
Among those, crews under their capacity come first, then the least loaded, then the crew id
(so the choice is deterministic).

>>> crews = [Crew("north", ("dma-01",), ("pipes",), 2), Crew("any", (), ("pipes", "meters"), 5)]
>>> choose_crew(crews, "dma-01", "pipes", {"north": 0, "any": 0})
'any'
>>> choose_crew(crews, "dma-01", "pipes", {"north": 0, "any": 1})
'north'
>>> choose_crew(crews, "dma-01", "pipes", {"north": 2, "any": 1})
'any'
>>> choose_crew(crews[:1], "dma-02", "pipes", {}) is None
True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple


class Crew(NamedTuple):
    """A crew as assignment sees it."""

    crew_id: str
    districts: tuple[str, ...]
    skills: tuple[str, ...]
    capacity: int


def choose_crew(crews: Sequence[Crew], district: str, skill: str,
                workload: Mapping[str, int]) -> str | None:
    """The crew to assign, or None when no crew covers ``district`` with ``skill``."""
    able = [c for c in crews
            if (not c.districts or district in c.districts) and skill in c.skills]
    if not able:
        return None

    def rank(crew: Crew) -> tuple[bool, int, str]:
        load = workload.get(crew.crew_id, 0)
        return (load >= crew.capacity, load, crew.crew_id)

    return min(able, key=rank).crew_id
