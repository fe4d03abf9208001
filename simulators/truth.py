"""Ground-truth records: what really happened to a device or a district, and when.

Incidents (leaks, bursts, meter faults) and confounders (garden watering, pool filling,
round-the-clock businesses) share one record type, so they are written and tested alike.

>>> episode = Episode("inc-000001", "customer_leak", device=5, district=0,
...                   start_ms=1_767_571_200_000, end_ms=1_767_657_600_000,
...                   magnitude=12.5, unit="lph")
>>> episode.active_at(1_767_600_000_000), episode.duration_h
(True, 24.0)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Episode:
    """One incident or confounder: ``[start_ms, end_ms)`` on a device or a whole district.

    ``device`` is an index into :attr:`simulators.fleet.Fleet.device_ids`, or -1 for a
    district-wide event (network leak, burst). ``magnitude`` is in ``unit`` (``lph``,
    ``lpm``, ``bar``, ``v``, ``ratio``...); ``detail`` holds extra facts as ``key=value``
    pairs separated by ``;``.
    """

    episode_id: str
    kind: str
    device: int
    district: int
    start_ms: int
    end_ms: int
    magnitude: float
    unit: str
    detail: str = ""

    def active_at(self, ts_ms: int) -> bool:
        """Whether the episode covers the event time ``ts_ms``."""
        return self.start_ms <= ts_ms < self.end_ms

    @property
    def duration_h(self) -> float:
        """Duration in hours."""
        return (self.end_ms - self.start_ms) / 3_600_000
