"""Items that travel between the dataflow's steps and into its sinks."""

from __future__ import annotations

from dataclasses import dataclass, field

from dataflows.ordering import Released

__all__ = ["ShardOutput"]


@dataclass(frozen=True, slots=True)
class ShardOutput:
    """What one shard released in one call, with its cumulative counters at that moment.

    ``stats_ms`` is the wall-clock time that stamps the counters (strictly increasing per
    shard, so the newest sample is the current value). ``scores`` holds ``(device, ts_ms,
    score)`` of the detection step, when there is one.
    """

    shard: int
    released: Released
    counts: dict[str, int]
    stats_ms: int
    scores: list[tuple[str, int, float]] = field(default_factory=list)
