"""Ground-truth records: what really happened to a device or a district, and when.

Incidents (leaks, bursts, meter faults) and confounders (garden watering, pool filling,
round-the-clock businesses) share one record type, so they are written and tested alike.
Two more kinds are derived from the simulator's records: ``clock_skew`` and ``silent``
from its communication-fault log (:func:`comm_episodes`), and the silence that ends a
battery's depletion (:func:`battery_silence`). The evaluation (:mod:`models.evaluate`)
scores against both; the crews (:mod:`simulators.crews`) judge ``silent`` alerts by them.

>>> episode = Episode("inc-000001", "customer_leak", device=5, district=0,
...                   start_ms=1_767_571_200_000, end_ms=1_767_657_600_000,
...                   magnitude=12.5, unit="lph")
>>> episode.active_at(1_767_600_000_000), episode.duration_h
(True, 24.0)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from simulators.comms import CommFault, CommFaultLog


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


def comm_episodes(logs: Iterable[CommFaultLog], customers: int, district_of: np.ndarray,
                  cadence_s: np.ndarray) -> list[Episode]:
    """``clock_skew`` and ``silent`` episodes from the simulator's communication-fault log.

    ``clock_skew`` (customer meters only): from the first to the last skewed reading, by true
    or reported time, whichever is wider, plus one reading. ``silent``: a device whose
    readings do not arrive (a network gap, or a gateway outage's held backlog), from its last
    reading before (one ``cadence_s`` before the first missed one) to the gap's end or the
    backlog's delivery. Rows are grouped by device and ``detail_ms`` (one gap, outage or
    skew), so the episodes of a log's steps taken one at a time, widened to cover each
    other, are those of the whole log (:class:`simulators.crews.TruthBook` does that).

    >>> log = CommFaultLog(np.array([0, 0]), np.array([4, 5]), np.array([3_600_000, 4_500_000]),
    ...                    np.array([CommFault.GAP] * 2, np.int8), np.array([9_000_000] * 2))
    >>> [(e.kind, e.device, e.start_ms, e.end_ms)
    ...  for e in comm_episodes([log], 1, np.zeros(1, np.int32), np.array([900]))]
    [('silent', 0, 2700000, 9000000)]
    """
    parts = list(logs)
    if not parts:
        return []
    log = CommFaultLog.concat(parts)
    found: list[Episode] = []
    groups = (
        ("clock_skew", CommFault.CLOCK_SKEW, False),
        ("silent", CommFault.GAP, True),
        ("silent", CommFault.GATEWAY_OUTAGE, True),
    )
    for kind, fault, ends_at_detail in groups:
        rows = log.fault == fault
        if kind == "clock_skew":
            rows &= log.device < customers
        device, ts, detail = log.device[rows], log.ts_ms[rows], log.detail_ms[rows]
        if not len(device):
            continue
        keys = np.stack([device.astype(np.int64), detail])
        uniq, inverse = np.unique(keys, axis=1, return_inverse=True)
        inverse = inverse.ravel()
        first = np.full(uniq.shape[1], np.iinfo(np.int64).max)
        last = np.zeros(uniq.shape[1], np.int64)
        np.minimum.at(first, inverse, ts)
        np.maximum.at(last, inverse, ts)
        for i in range(uniq.shape[1]):
            d = int(uniq[0, i])
            cadence = int(cadence_s[d]) * 1000
            if ends_at_detail:
                begin, finish = int(first[i]) - cadence, int(uniq[1, i])
            else:  # the skewed stamps may lie before the true times: cover both
                offset = int(uniq[1, i])
                begin = int(first[i]) + min(offset, 0)
                finish = int(last[i]) + max(offset, 0) + cadence
            found.append(Episode(f"{kind}-{d}-{begin}", kind, d, int(district_of[d]), begin,
                                 max(finish, begin + 1), float(uniq[1, i]), "ms",
                                 f"source={fault.name.lower()}"))
    return found


def battery_silence(episodes: Iterable[Episode], end_ms: int) -> list[Episode]:
    """``silent`` episodes of meters whose battery died (from the cut-off to ``end_ms``).

    A ``battery_depletion`` episode says when its meter goes silent (``silent_from_ms`` in
    its detail); one that goes silent at or after ``end_ms`` has no silence yet.

    >>> dying = Episode("inc-1", "battery_depletion", 3, 0, 0, 10_000, 3.0, "v",
    ...                 "silent_from_ms=4000")
    >>> [(e.episode_id, e.kind, e.start_ms, e.end_ms) for e in battery_silence([dying], 10_000)]
    [('silent-inc-1', 'silent', 4000, 10000)]
    >>> battery_silence([dying], 4000)
    []
    """
    found = []
    for episode in episodes:
        if episode.kind != "battery_depletion":
            continue
        detail = dict(item.split("=", 1) for item in episode.detail.split(";") if "=" in item)
        silent_from = int(detail.get("silent_from_ms", end_ms))
        if silent_from < end_ms:
            found.append(Episode(f"silent-{episode.episode_id}", "silent", episode.device,
                                 episode.district, silent_from, end_ms, 0.0, "ms",
                                 "source=battery"))
    return found
