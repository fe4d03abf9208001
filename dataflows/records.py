"""Items that travel between the dataflow's steps and into its sinks."""

from __future__ import annotations

from dataclasses import dataclass, field

from dataflows.ordering import Released
from meshwatch.contract.events import Alert

__all__ = ["BalanceRow", "DistrictOutput", "ShardOutput"]


@dataclass(frozen=True, slots=True)
class ShardOutput:
    """What one shard released in one call, with its cumulative counters at that moment.

    ``stats_ms`` is the wall-clock time that stamps the counters (strictly increasing per
    shard, so the newest sample is the current value). ``watermark`` is the shard's
    event-time watermark after the call and ``watermark_before`` the one before it (None:
    no reading yet); the detection stage merges districts' shards by them.
    """

    shard: int
    released: Released
    counts: dict[str, int]
    stats_ms: int
    watermark: int | None = None
    watermark_before: int | None = None


@dataclass(frozen=True, slots=True)
class BalanceRow:
    """One district and 15-minute interval of its water balance (``None``: not known)."""

    start_ms: int
    inlet_flow_lpm: float
    customer_flow_lpm: float | None
    balance_lpm: float | None
    pressure_bar: float | None


@dataclass(frozen=True, slots=True)
class DistrictOutput:
    """What one district's detection step produced in one call, with its counters.

    ``alerts`` are contract alerts in the order the district's pipeline raised them;
    ``scores`` the ``(device, ts_ms, score)`` of the readings scored (when kept);
    ``balance`` the district's water balance rows closed (:meth:`DistrictState.drain_balance
    <dataflows.detection.DistrictState.drain_balance>`);
    ``counts`` are :data:`dataflows.detection.COUNTERS`, stamped with wall-clock ``stats_ms``
    (strictly increasing per district) like a shard's.
    """

    district: str
    alerts: list[Alert]
    counts: dict[str, int]
    stats_ms: int
    watermark: int | None = None
    scores: list[tuple[str, int, float]] = field(default_factory=list)
    balance: list[BalanceRow] = field(default_factory=list)
