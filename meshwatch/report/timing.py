"""Latency and throughput of the demo, from wall-clock stamps taken while it runs.

The stamps are real, never estimated:

- *at the site broker*: when the demo's own QoS1 subscriber to the site broker received the
  batch an edge agent published (:class:`Arrivals`); the bridge subscribes to the same
  broker, so this is the reading's arrival at the bridge's input (a batch's ``sent_ms``
  cannot serve: the edge agents stamp simulated time, the simulator's sending time);
- *in the mesh*: when the demo's subscriber to the mesh received the batch the bridge
  forwarded;
- *stored*: the modification time of the lake file that holds the reading; the dataflow writes
  a file at each snapshot and renames it into place, and never touches it again;
- *alert published*: when the demo's subscriber received the alert from the mesh.

Storage latency is per reading: ``stored - at the site broker`` (the path from the bridge's
input: bridge, mesh, dataflow ordering, epoch, Parquet) and ``stored - in the mesh``. Alert
latency is per alert of the dataflow: from the moment the first reading stamped at or after
the alert's ``last_ts_ms`` (the evidence that completed it) reached the mesh, to the alert
reaching the mesh; it includes the dataflow's wait for its watermark, and is never
understated (the reading that completed the evidence arrived at that moment or later).

>>> arrivals = Arrivals()
>>> arrivals.add([("m1", 1), ("m1", 2)], max_ts_ms=900_000, at_s=1.5)
>>> arrivals.add([("m2", 1), ("m1", 2)], max_ts_ms=1_800_000, at_s=2.0)
>>> arrivals.frontier_s(900_000), arrivals.frontier_s(1_000_000), arrivals.frontier_s(10**9)
(1.5, 2.0, None)
>>> arrivals.counts(), arrivals.arrived_s(("m1", 2))
([(1.5, 2), (2.0, 1)], 1.5)
>>> percentiles([0.1, 0.2, 0.3, 0.4, 10.0])
{'n': 5, 'p50_s': 0.3, 'p99_s': 9.616, 'max_s': 10.0}
>>> throughput([(0.2, 100), (0.7, 50), (2.1, 10)], bin_s=1.0, origin_s=0.0)
([0.0, 1.0, 2.0], [150.0, 0.0, 10.0])
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Key = tuple[str, int]
"""A reading's ``(device_id, seq)``."""


@dataclass
class Arrivals:
    """Readings that reached a subscriber: each once, with its batch's stamps; thread-safe.

    ``batches`` holds ``(at_s, new readings)`` per batch received, ``first`` the index of the
    batch that brought each reading first; :meth:`frontier_s` answers "when did event time
    ``t`` first reach here" from the running maximum of the batches' newest event times.
    """

    batches: list[tuple[float, int]] = field(default_factory=list)
    first: dict[Key, int] = field(default_factory=dict)
    _frontier_ts: list[int] = field(default_factory=list)
    _frontier_at: list[float] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, keys: Iterable[Key], max_ts_ms: int, at_s: float) -> None:
        """Record a batch received at wall time ``at_s`` (``time.time()``)."""
        with self._lock:
            index = len(self.batches)
            fresh = 0
            for key in keys:
                if key not in self.first:
                    self.first[key] = index
                    fresh += 1
            self.batches.append((at_s, fresh))
            if not self._frontier_ts or max_ts_ms > self._frontier_ts[-1]:
                self._frontier_ts.append(max_ts_ms)
                self._frontier_at.append(at_s)

    def frontier_s(self, ts_ms: int) -> float | None:
        """When the first reading stamped ``ts_ms`` or later arrived (None: none has)."""
        with self._lock:
            i = bisect.bisect_left(self._frontier_ts, ts_ms)
            return self._frontier_at[i] if i < len(self._frontier_at) else None

    def counts(self) -> list[tuple[float, int]]:
        """``(at_s, new readings)`` per batch, for :func:`throughput`."""
        with self._lock:
            return list(self.batches)

    def arrived_s(self, key: Key) -> float | None:
        """When a reading first arrived (None: never)."""
        index = self.first.get(key)
        return None if index is None else self.batches[index][0]


@dataclass(frozen=True)
class LakeTiming:
    """Per-reading storage latencies and the lake's commits over time."""

    site_to_lake_s: list[float]
    mesh_to_lake_s: list[float]
    commits: list[tuple[float, int]]  # (file mtime, rows)
    unmatched: int  # lake rows a subscriber never saw (none, when nothing is lost)


def lake_timing(lake: Path, site: Arrivals, mesh: Arrivals) -> LakeTiming:
    """Join every lake row to its arrivals; latencies from the lake files' mtimes."""
    import pyarrow.parquet as pq

    from_site: list[float] = []
    from_mesh: list[float] = []
    commits: list[tuple[float, int]] = []
    unmatched = 0
    for path in sorted(lake.glob("date=*/*.parquet")):
        stored = path.stat().st_mtime
        table = pq.read_table(path, columns=["device_id", "seq"])
        commits.append((stored, table.num_rows))
        for key in zip(table.column("device_id").to_pylist(), table.column("seq").to_pylist(),
                       strict=True):
            at_site, at_mesh = site.arrived_s(key), mesh.arrived_s(key)
            if at_site is None or at_mesh is None:
                unmatched += 1
                continue
            from_site.append(stored - at_site)
            from_mesh.append(stored - at_mesh)
    return LakeTiming(from_site, from_mesh, commits, unmatched)


def percentiles(values: Sequence[float]) -> dict[str, Any]:
    """Count, median, 99th percentile and maximum (seconds, linear interpolation)."""
    if not values:
        return {"n": 0, "p50_s": None, "p99_s": None, "max_s": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        position = q * (len(ordered) - 1)
        low = math.floor(position)
        high = min(low + 1, len(ordered) - 1)
        return round(ordered[low] + (ordered[high] - ordered[low]) * (position - low), 4)

    return {"n": len(ordered), "p50_s": at(0.5), "p99_s": at(0.99),
            "max_s": round(ordered[-1], 4)}


def throughput(events: Iterable[tuple[float, int]], bin_s: float = 1.0,
               origin_s: float | None = None) -> tuple[list[float], list[float]]:
    """Readings per second in bins of ``bin_s`` from ``(at_s, readings)`` events.

    Returns bin starts (seconds since ``origin_s``, default the first event) and rates.
    """
    items = list(events)
    if not items:
        return [], []
    origin = min(at for at, _ in items) if origin_s is None else origin_s
    bins = [0.0] * (int((max(at for at, _ in items) - origin) // bin_s) + 1)
    for at, n in items:
        bins[max(0, int((at - origin) // bin_s))] += n
    return [round(i * bin_s, 3) for i in range(len(bins))], [n / bin_s for n in bins]
